"""The JSON configuration of `train.py` / `eval.py` as one typed, validated, frozen dataclass.

Every key of the 2019 README keeps its 2019 meaning; new keys have defaults that reproduce the 2019
behaviour. `load_config(path, purpose)` reads a file, checks every key and returns a `Config`; a mistake
raises `ConfigError` (exit code 2 on the command line) with one line naming the file, the key and the
value at fault.

Every key, with its type, default and meaning, is in `KEY_DOCS` below (`bigearthnet config keys`
prints it; 2019 keys are marked). On the command line, `--set KEY=VALUE` overrides a key of the file
(VALUE is read as JSON when it parses, else as a string) and is checked exactly like it.

Paths
-----
The 2019 configs held paths relative to the working directory, and that still comes first: a relative
input path (record files, `model_file`, `statistics_file`) is looked up in the working directory and,
when nothing is there, in the config file's folder, so a config shipped next to its data also works.
`out_dir` (an output) is relative to the working directory. File lists take one string or a list; each
entry is a file, a glob (`prepared/train-*.tfrecord`) or a folder (its `*.tfrecord` files). The lists a
purpose needs are expanded at load time into sorted absolute paths; an entry matching nothing is an
error. The saved config holds these resolved paths, so a run can be repeated from anywhere.

Keys the purpose does not use are still type-checked (one file serves `train.py` and `eval.py`, as in
2019) but their files are not looked up.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bigearthnet_tf.checkpoint_lookup import checkpoint_listing, resolve_checkpoint
from bigearthnet_tf.constants import DEFAULT_THRESHOLD, UPSAMPLING_KERNELS, LabelType
from bigearthnet_tf.errors import ConfigError, UserError
from bigearthnet_tf.files import write_text_atomically
from bigearthnet_tf.jsonfiles import json_type, read_json_object
from bigearthnet_tf.layout import MODALITIES, Modality
from bigearthnet_tf.stats import load_statistics

TRAIN = "train"
EVALUATE = "evaluate"
PURPOSES: tuple[str, ...] = (TRAIN, EVALUATE)

DISTRIBUTIONS: tuple[str, ...] = ("auto", "mirrored", "multi_worker", "none")
RESUME_MODES: tuple[str, ...] = ("never", "auto")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")

STORED_THRESHOLDS = "stored"  # "thresholds": the ones `predict --choose-thresholds` stored
DEFAULT_SEED = 42  # the 2019 SEED
SEED_MAX = 2**32 - 1  # NumPy's seed range
INT64_MAX = 2**63 - 1
DEFAULT_SHUFFLE_BUFFER = 130_000  # what every 2019 config used
MAX_SUGGESTED_KEY_LENGTH = 100
SHOWN_LENGTH = 80  # characters of a bad value echoed in an error message
RECORD_SUFFIX = ".tfrecord"  # what a folder entry of a file list expands to
# The next step, where a missing file has one.
PREPARE_HINT = "; make records with: bigearthnet prepare -r ARCHIVE -o FOLDER --splits ..."
STATS_HINT = "; compute it with: bigearthnet stats TRAINING_RECORDS --out FILE"

SAVED_CONFIG_NAMES = MappingProxyType({TRAIN: "config.json", EVALUATE: "eval_config.json"})


@dataclass(frozen=True)
class KeyDoc:
    """What `bigearthnet config keys` says of one key."""

    key: str
    type: str
    default: str
    meaning: str
    from_2019: bool  # a key of the 2019 README


KEY_DOCS: tuple[KeyDoc, ...] = tuple(
    [
        KeyDoc(
            "model_name",
            "str",
            "train: required",
            "a name in the model registry (`bigearthnet models`)",
            True,
        ),
        KeyDoc("label_type", "str", "train: required", "`original` (43 classes) or `BigEarthNet-19`", True),
        KeyDoc("batch_size", "int", "required", "the global batch (all replicas together)", True),
        KeyDoc("nb_epoch", "int", "train: required", "passes over the training files", True),
        KeyDoc("learning_rate", "float", "train: required", "(initial) learning rate of Adam", True),
        KeyDoc(
            "out_dir",
            "path",
            "required",
            "logs, checkpoints (`out_dir/models/iteration-<N>`) and results",
            True,
        ),
        KeyDoc(
            "save_checkpoint_after_iteration",
            "int",
            "0",
            "no periodic checkpoint before this iteration",
            True,
        ),
        KeyDoc(
            "save_checkpoint_per_iteration",
            "int",
            "none",
            "a checkpoint when `N % value == 0` (none: final only)",
            True,
        ),
        KeyDoc("tr_tf_record_files", "files", "train: required", "training TFRecords", True),
        KeyDoc(
            "val_tf_record_files",
            "files",
            "none",
            "validation TFRecords (validated every epoch when given)",
            True,
        ),
        KeyDoc("test_tf_record_files", "files", "evaluate: required", "test TFRecords", True),
        KeyDoc("fine_tune", "bool", "false", "start training from `model_file`", True),
        KeyDoc(
            "model_file",
            "str",
            "evaluate: required",
            "a checkpoint base name, e.g. `out/models/iteration-600`",
            True,
        ),
        KeyDoc(
            "shuffle_buffer_size",
            "int",
            "130000",
            "records shuffled (memory-capped by the input pipeline)",
            True,
        ),
        KeyDoc(
            "training_size",
            "int",
            "none",
            "size of the training set: progress total, checked against the files",
            True,
        ),
        KeyDoc(
            "test_size",
            "int",
            "none",
            "size of the test set: progress total, checked against the files",
            True,
        ),
        KeyDoc("modality", "str", "`S2`", "`S2`, `S1` (VV, VH) or `MM` (S2 then S1)", True),
        KeyDoc("seed", "int", "42", "seeds Python, NumPy, TensorFlow, Keras and the data order", False),
        KeyDoc(
            "distribution",
            "str",
            "`auto`",
            "`auto`, `mirrored`, `multi_worker` (`TF_CONFIG`) or `none`",
            False,
        ),
        KeyDoc(
            "resume",
            "str",
            "`never`",
            "`auto`: continue from the newest complete checkpoint in `out_dir/models`",
            False,
        ),
        KeyDoc(
            "mixed_precision",
            "bool",
            "false",
            "bfloat16 compute on CPU, float16 with loss scaling on GPU",
            False,
        ),
        KeyDoc("jit_compile", "bool", "false", "compile the training step with XLA", False),
        KeyDoc(
            "statistics_file",
            "path",
            "none",
            "a `bigearthnet stats` file; its bands override the v1 statistics",
            False,
        ),
        KeyDoc(
            "skip_corrupt_records",
            "bool",
            "false",
            "skip (and count) unreadable records instead of failing",
            False,
        ),
        KeyDoc(
            "threshold", "float", "0.5", "probability at which a class counts as predicted (metrics)", False
        ),
        KeyDoc("optimizer", "str", "`adam`", "`adam` (2019) or `adamw`", False),
        KeyDoc("weight_decay", "float", "0.0", "decoupled weight decay (`adamw` only)", False),
        KeyDoc(
            "lr_schedule",
            "str",
            "`constant`",
            "`constant` (2019) or `cosine` (decay to 0 over the run)",
            False,
        ),
        KeyDoc(
            "warmup_iterations",
            "int",
            "0",
            "linear warm-up from 0 to `learning_rate` over this many iterations",
            False,
        ),
        KeyDoc(
            "augmentation",
            "bool",
            "false",
            "random flips and 90-degree rotations of the training patches",
            False,
        ),
        KeyDoc(
            "early_stopping_patience",
            "int",
            "none",
            "stop after this many validations without a better macro AP",
            False,
        ),
        KeyDoc(
            "dropout",
            "float",
            "model's",
            "head dropout, for models that take it (EfficientNetV2-S, ConvNeXt, ViT)",
            False,
        ),
        KeyDoc(
            "drop_path_rate",
            "float",
            "model's",
            "stochastic depth of models that take it (same models)",
            False,
        ),
        KeyDoc(
            "upsampling",
            "str",
            "model's",
            "ResNet/VGG 20 m band kernel: `tf1_bicubic` (2019, default), `tf2_bicubic`",
            False,
        ),
        KeyDoc(
            "thresholds",
            "str",
            "none",
            "evaluate with per-class thresholds: `stored` (beside the checkpoint) or a JSON file",
            False,
        ),
        KeyDoc(
            "training_fraction",
            "float",
            "1.0",
            "train on this seeded share of the training records (0.01 for a 1 % label-efficiency run)",
            False,
        ),
        KeyDoc(
            "backbone_weights",
            "path",
            "none",
            "backbone checkpoint (`bigearthnet import torchgeo`) the model's backbone starts from",
            False,
        ),
        KeyDoc(
            "freeze_backbone",
            "bool",
            "false",
            "train the head only (a linear probe); the backbone's batch norms stay in inference mode",
            False,
        ),
        KeyDoc(
            "backbone_learning_rate_scale",
            "float",
            "1.0",
            "the backbone's learning rate is `learning_rate` times this (the head's is `learning_rate`)",
            False,
        ),
        KeyDoc(
            "layer_decay",
            "float",
            "1.0",
            "ViT layer-wise rate decay: block i of n learns at `layer_decay ** (n - i)`, the embedding at `** (n + 1)`",
            False,
        ),
    ]
)


def format_key_docs() -> str:
    """`bigearthnet config keys`: one row per key (2019 keys marked), as an aligned text table."""
    rows = [("key", "type", "default", "2019", "meaning")]
    rows += [(d.key, d.type, d.default, "yes" if d.from_2019 else "", d.meaning) for d in KEY_DOCS]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    )


# Names people plausibly write for a key, where difflib's spelling distance would not find it.
KEY_HINTS = MappingProxyType(
    {
        "pretrained_model_path": "model_file",  # the 2019 README's name for model_file in one sentence
        "epochs": "nb_epoch",
        "lr": "learning_rate",
        "model": "model_name",
        "labels": "label_type",
    }
)


@dataclass(frozen=True)
class Config:
    """A validated configuration; field names are the JSON keys (see the module docstring)."""

    # The 2019 keys.
    batch_size: int
    out_dir: Path
    model_name: str | None = None  # required to train; evaluation takes it from the checkpoint
    label_type: LabelType | None = None  # idem
    nb_epoch: int | None = None  # required to train
    learning_rate: float | None = None  # required to train
    save_checkpoint_after_iteration: int = 0
    save_checkpoint_per_iteration: int | None = None
    tr_tf_record_files: tuple[str, ...] = ()
    val_tf_record_files: tuple[str, ...] = ()
    test_tf_record_files: tuple[str, ...] = ()
    fine_tune: bool = False
    model_file: str | None = None
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER
    training_size: int | None = None
    test_size: int | None = None
    modality: Modality = Modality.S2
    # New keys.
    seed: int = DEFAULT_SEED
    distribution: str = "auto"
    resume: str = "never"
    mixed_precision: bool = False
    jit_compile: bool = False
    statistics_file: Path | None = None
    skip_corrupt_records: bool = False
    threshold: float = DEFAULT_THRESHOLD
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_iterations: int = 0
    augmentation: bool = False
    early_stopping_patience: int | None = None
    dropout: float | None = None
    drop_path_rate: float | None = None
    upsampling: str | None = None
    thresholds: str | None = None
    training_fraction: float = 1.0
    backbone_weights: str | None = None
    freeze_backbone: bool = False
    backbone_learning_rate_scale: float = 1.0
    layer_decay: float = 1.0
    # Where the config came from; not keys.
    purpose: str = dataclasses.field(default=TRAIN, compare=False)
    source: Path | None = dataclasses.field(default=None, compare=False)
    statistics: Mapping[str, tuple[float, float]] | None = dataclasses.field(default=None, compare=False)
    given_keys: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)  # set in the file
    # A test run (`--test-run N`): at most N training iterations, validation and evaluation batches.
    max_batches: int | None = dataclasses.field(default=None, compare=False)

    def given(self, key: str) -> bool:
        """True when the file set `key` (to a non-null value), as opposed to it taking its default."""
        return key in self.given_keys

    def to_dict(self) -> dict[str, Any]:
        """The keys as JSON values (paths as strings); `load_config` reads this back unchanged."""
        values = {}
        for name in KEY_NAMES:
            value = getattr(self, name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value) or None  # an unset file list reads back as "not given"
            values[name] = value
        return values

    @property
    def saved_config_path(self) -> Path:
        """Where the resolved config of this purpose is saved: `out_dir/config.json` for training."""
        return self.out_dir / SAVED_CONFIG_NAMES[self.purpose]


_NOT_A_KEY = {"purpose", "source", "statistics", "given_keys", "max_batches"}
KEY_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name not in _NOT_A_KEY)


# --------------------------------------------------------------------------------------------------
# Per-key rules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """How one key is checked: its kind, bounds or choices, and for which purposes it is required."""

    kind: str  # "int", "float", "bool", "str", "choice", "files", "input_path", "output_path", "model"
    required_for: tuple[str, ...] = ()
    minimum: float | None = None
    exclusive_minimum: bool = False
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None  # a choice's typed value (an enum), made once here


_RULES: Mapping[str, _Rule] = MappingProxyType(
    {
        "model_name": _Rule("model", required_for=(TRAIN,)),
        "label_type": _Rule("choice", required_for=(TRAIN,), choices=tuple(LabelType), parse=LabelType),
        "batch_size": _Rule("int", required_for=(TRAIN, EVALUATE), minimum=1),
        "nb_epoch": _Rule("int", required_for=(TRAIN,), minimum=1),
        "learning_rate": _Rule("float", required_for=(TRAIN,), minimum=0, exclusive_minimum=True),
        "out_dir": _Rule("output_path", required_for=(TRAIN, EVALUATE)),
        "save_checkpoint_after_iteration": _Rule("int", minimum=0),
        "save_checkpoint_per_iteration": _Rule("int", minimum=1),
        "tr_tf_record_files": _Rule("files", required_for=(TRAIN,)),
        "val_tf_record_files": _Rule("files"),
        "test_tf_record_files": _Rule("files", required_for=(EVALUATE,)),
        "fine_tune": _Rule("bool"),
        "model_file": _Rule("input_path", required_for=(EVALUATE,)),
        "shuffle_buffer_size": _Rule("int", minimum=0),
        "training_size": _Rule("int", minimum=1),
        "test_size": _Rule("int", minimum=1),
        "modality": _Rule("choice", choices=MODALITIES, parse=Modality),
        "seed": _Rule("int", minimum=0, maximum=SEED_MAX),
        "distribution": _Rule("choice", choices=DISTRIBUTIONS),
        "resume": _Rule("choice", choices=RESUME_MODES),
        "mixed_precision": _Rule("bool"),
        "jit_compile": _Rule("bool"),
        "statistics_file": _Rule("input_path"),
        "skip_corrupt_records": _Rule("bool"),
        "threshold": _Rule("float", minimum=0, exclusive_minimum=True, maximum=1),
        "optimizer": _Rule("choice", choices=OPTIMIZERS),
        "weight_decay": _Rule("float", minimum=0),
        "lr_schedule": _Rule("choice", choices=LR_SCHEDULES),
        "warmup_iterations": _Rule("int", minimum=0),
        "augmentation": _Rule("bool"),
        "early_stopping_patience": _Rule("int", minimum=1),
        "dropout": _Rule("float", minimum=0, maximum=0.99),
        "drop_path_rate": _Rule("float", minimum=0, maximum=0.99),
        "upsampling": _Rule("choice", choices=UPSAMPLING_KERNELS),
        "thresholds": _Rule("thresholds"),
        "training_fraction": _Rule("float", minimum=0, exclusive_minimum=True, maximum=1),
        "backbone_weights": _Rule("str"),
        "freeze_backbone": _Rule("bool"),
        "backbone_learning_rate_scale": _Rule("float", minimum=0, exclusive_minimum=True, maximum=1),
        "layer_decay": _Rule("float", minimum=0, exclusive_minimum=True, maximum=1),
    }
)
assert set(_RULES) == set(KEY_NAMES), "every Config key needs a rule"
assert sorted(doc.key for doc in KEY_DOCS) == sorted(KEY_NAMES), "every Config key needs one KEY_DOCS row"

# Which file lists each purpose reads (and therefore resolves at load time).
_FILES_READ = MappingProxyType(
    {TRAIN: ("tr_tf_record_files", "val_tf_record_files"), EVALUATE: ("test_tf_record_files",)}
)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], purpose: str = TRAIN, overrides: Sequence[str] = ()) -> Config:
    """Read, check and resolve the JSON config at `path` for `purpose` (`train` or `evaluate`).

    `overrides` are `KEY=VALUE` texts (the command line's `--set`) laid over the file's keys first.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    source = Path(path)
    raw = _read_json_object(source)
    changes = dict(parse_override(text) for text in overrides)
    _reject_unknown_keys(changes, "--set")
    return config_from_dict({**raw, **changes}, purpose, source=source)


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` as (key, value): VALUE as JSON when it parses (numbers, true, null, lists, quoted
    strings), else as the plain string (`--set model_name=ResNet50`)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"--set {_show(text)}: expected KEY=VALUE, e.g. --set batch_size=32")
    try:
        parsed = json.loads(value, parse_constant=lambda name: name)  # NaN stays a string: refused later
    except ValueError:
        parsed = value
    return key.strip(), parsed


def config_from_dict(raw: Mapping[str, Any], purpose: str = TRAIN, source: Path | None = None) -> Config:
    """Check and resolve a config given as a dict (as read from JSON); see `load_config`."""
    where = str(source) if source is not None else "config"
    checker = _Checker(where, purpose, source.parent if source is not None else None)
    _reject_unknown_keys(raw, where)
    values: dict[str, Any] = {}
    for name, rule in _RULES.items():
        value = raw.get(name)
        # JSON null means "not given", so a 2019 config may carry "model_file": null or "", and
        # "val_tf_record_files": [] ("not used for now" in 2019).
        given = value is not None and not (rule.kind in ("str", "input_path") and value == "")
        given = given and not (rule.kind == "files" and value == [] and purpose not in rule.required_for)
        if not given:
            if purpose in rule.required_for:
                raise ConfigError(f"{where}: missing key {name!r} (required to {purpose})")
            continue
        values[name] = checker.check(name, rule, value)

    _check_combinations(values, where, purpose)
    for name in _FILES_READ[purpose]:
        if name in values:
            values[name] = checker.resolve_files(name, values[name])
    if purpose == EVALUATE and values.get("thresholds") not in (None, STORED_THRESHOLDS):
        values["thresholds"] = str(checker.resolve_input_path("thresholds", values["thresholds"]))
    if "model_file" in values and (purpose == EVALUATE or values.get("fine_tune")):
        values["model_file"] = checker.resolve_model_file(values["model_file"])
    if "backbone_weights" in values and purpose == TRAIN:
        values["backbone_weights"] = checker.resolve_model_file(values["backbone_weights"], "backbone_weights")
    statistics = None
    if "statistics_file" in values:
        values["statistics_file"] = checker.resolve_input_path("statistics_file", values["statistics_file"])
        statistics = MappingProxyType(read_statistics_file(values["statistics_file"]))
    return Config(
        **values, purpose=purpose, source=source, statistics=statistics, given_keys=frozenset(values)
    )


def save_config(config: Config, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the resolved config (default: `config.saved_config_path`) atomically; return the path.

    An existing file with the same content is left alone. A different one belongs to an earlier run in
    the same `out_dir`: it is kept, renamed to `<name>.<n>.json` (n = 1, 2, ...), so the history of
    what was run there is never lost.
    """
    target = Path(path) if path is not None else config.saved_config_path
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        try:
            previous = target.read_text(encoding="utf-8")
        except OSError:
            previous = None
        if previous == text:
            return target
        index = 1
        while (kept := target.with_name(f"{target.stem}.{index}{target.suffix}")).exists():
            index += 1
        os.replace(target, kept)
    write_text_atomically(target, text)
    return target


def read_statistics_file(path: str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    """Band name -> (mean, std) from a statistics file as `bigearthnet stats` writes it (see `stats`).

    Bands the file does not name keep the BigEarthNet v1 / 2021 S1 statistics. A bad file is a
    ConfigError (exit code 2), since the config named it.
    """

    try:
        return load_statistics(path)
    except ConfigError:
        raise
    except UserError as error:
        raise ConfigError(f"statistics_file: {error}") from None


# --------------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; anything else (missing, not JSON, NaN, duplicate keys) is a ConfigError."""
    return read_json_object(path, "config file", ConfigError)


def _reject_unknown_keys(raw: Mapping[str, Any], where: str) -> None:
    for key in raw:
        if key in _RULES:
            continue
        # Spelling suggestions only for key-sized strings: difflib is slow and memory-hungry on huge ones.
        plausible = len(str(key)) <= MAX_SUGGESTED_KEY_LENGTH
        hint = KEY_HINTS.get(str(key).lower()) or next(
            iter(difflib.get_close_matches(str(key), KEY_NAMES, n=1, cutoff=0.6) if plausible else ()), None
        )
        suggestion = f" (did you mean {hint!r}?)" if hint else ""
        shown = repr(key) if len(str(key)) <= SHOWN_LENGTH else repr(str(key)[:SHOWN_LENGTH]) + "..."
        raise ConfigError(f"{where}: unknown key {shown}{suggestion}")


def _check_combinations(values: Mapping[str, Any], where: str, purpose: str) -> None:
    """Rules that involve more than one key."""
    if purpose == TRAIN and values.get("fine_tune") and "model_file" not in values:
        raise ConfigError(f"{where}: missing key 'model_file' (required when fine_tune is true)")
    if values.get("weight_decay", 0.0) > 0 and values.get("optimizer", "adam") != "adamw":
        raise ConfigError(
            f'{where}: key \'weight_decay\': {values["weight_decay"]!r} needs "optimizer": "adamw" '
            "(the 2019 Adam had no weight decay)"
        )
    # key -> its no-op value
    backbone_options = {"freeze_backbone": False, "backbone_learning_rate_scale": 1.0, "layer_decay": 1.0}
    for key, no_op in backbone_options.items():
        given = values.get(key, no_op) != no_op
        if purpose == TRAIN and given and "backbone_weights" not in values and not values.get("fine_tune"):
            raise ConfigError(
                f"{where}: key {key!r} needs backbone_weights (a backbone checkpoint) or a fine_tune model_file"
            )
    if purpose == TRAIN and "backbone_weights" in values and values.get("fine_tune"):
        raise ConfigError(
            f"{where}: key 'backbone_weights' and fine_tune both say where the weights come from; give one"
        )
    if purpose == TRAIN and "early_stopping_patience" in values and "val_tf_record_files" not in values:
        raise ConfigError(
            f"{where}: key 'early_stopping_patience': {values['early_stopping_patience']!r} needs "
            "val_tf_record_files (it watches the validation macro average precision)"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A value as the user wrote it in JSON, shortened for a one-line message."""
    if isinstance(value, str) and len(value) > SHOWN_LENGTH:
        value = value[:SHOWN_LENGTH]  # never serialise a huge value only to cut it
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= SHOWN_LENGTH else text[: SHOWN_LENGTH - 3] + "..."


class _Checker:
    """Checks values of keys for one config file; messages name the file, the key and the value."""

    def __init__(self, where: str, purpose: str, config_dir: Path | None) -> None:
        self.where = where
        self.purpose = purpose
        self.config_dir = config_dir

    def fail(self, name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: key {name!r}: expected {expected}, got {_show(value)}")

    def check(self, name: str, rule: _Rule, value: Any) -> Any:
        checks: Mapping[str, Callable[[str, _Rule, Any], Any]] = {
            "int": self._int,
            "float": self._float,
            "bool": self._bool,
            "str": self._str,
            "choice": self._choice,
            "files": self._files,
            "input_path": self._path_text,
            "thresholds": self._path_text,
            "output_path": self._output_path,
            "model": self._model,
        }
        return checks[rule.kind](name, rule, value)

    def _bounds(self, name: str, rule: _Rule, value: float, kind: str) -> None:
        low_ok = rule.minimum is None or (
            value > rule.minimum if rule.exclusive_minimum else value >= rule.minimum
        )
        high_ok = rule.maximum is None or value <= rule.maximum
        if low_ok and high_ok:
            return

        def number(bound: float) -> str:
            return str(bound) if isinstance(bound, int) else f"{bound:g}"

        parts = []
        if rule.minimum is not None:
            parts.append(f"{'>' if rule.exclusive_minimum else '>='} {number(rule.minimum)}")
        if rule.maximum is not None:
            parts.append(f"<= {number(rule.maximum)}")
        raise self.fail(name, value, f"{kind} {' and '.join(parts)}")

    def _int(self, name: str, rule: _Rule, value: Any) -> int:
        # bool is a subclass of int in Python; `"batch_size": true` must not mean 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, value, f"an integer, not {json_type(value)}")
        # Every count ends up in an int64 tensor (seeds in NumPy's 32-bit seed): refuse what cannot fit.
        if rule.maximum is None and abs(value) > INT64_MAX:
            raise self.fail(name, value, f"an integer of at most {INT64_MAX}")
        self._bounds(name, rule, value, "an integer")
        return value

    def _float(self, name: str, rule: _Rule, value: Any) -> float:
        if not _is_number(value):
            raise self.fail(name, value, f"a number, not {json_type(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range, e.g. 10**400
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(name, value, "a finite number")
        self._bounds(name, rule, number, "a number")
        return number

    def _bool(self, name: str, rule: _Rule, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(name, value, f"true or false, not {json_type(value)}")
        return value

    def _str(self, name: str, rule: _Rule, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(name, value, f"a string, not {json_type(value)}")
        return value

    def _choice(self, name: str, rule: _Rule, value: Any) -> str:
        if not isinstance(value, str) or value not in rule.choices:
            close = difflib.get_close_matches(str(value), rule.choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close and isinstance(value, str) else ""
            accepted = " | ".join(rule.choices)
            raise ConfigError(
                f"{self.where}: key {name!r}: unknown value {_show(value)}{hint}; expected {accepted}"
            )
        return value if rule.parse is None else rule.parse(value)

    def _files(self, name: str, rule: _Rule, value: Any) -> tuple[str, ...]:
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list) or not all(isinstance(entry, str) and entry for entry in entries):
            raise self.fail(name, value, "a file name, glob or folder, or a list of them")
        if not entries:
            raise self.fail(name, value, "at least one file")
        return tuple(self._path_text(name, rule, entry) for entry in entries)

    def _path_text(self, name: str, rule: _Rule, value: Any) -> str:
        """A string the file system can take: no NUL, encodable (a lone surrogate is not)."""
        text = self._str(name, rule, value)
        try:
            if "\0" in text:
                raise ValueError
            os.fsencode(text)
        except (ValueError, UnicodeError):
            raise self.fail(name, value, "a path without NUL or unencodable characters") from None
        return text

    def _output_path(self, name: str, rule: _Rule, value: Any) -> Path:
        text = self._path_text(name, rule, value)
        if not text.strip():
            raise self.fail(name, value, "a folder path")
        return Path(os.path.expanduser(text)).absolute()

    def _model(self, name: str, rule: _Rule, value: Any) -> str:
        text = self._str(name, rule, value)
        # Only ever a key into the registry: a config never makes the program import a module.
        from bigearthnet_tf.model_catalogue import is_builtin

        if is_builtin(text):
            return text  # known without loading Keras
        from bigearthnet_tf.models import get_model_spec

        try:
            get_model_spec(text)
        except ConfigError as error:
            raise ConfigError(f"{self.where}: key 'model_name': {error}") from None
        return text

    # --- paths -----------------------------------------------------------------------------------

    def _bases(self) -> list[Path]:
        """Folders a relative input path is looked up in, in order: working directory, config folder."""
        bases = [Path.cwd()]
        if self.config_dir is not None and self.config_dir.absolute() != bases[0]:
            bases.append(self.config_dir.absolute())
        return bases

    def _looked_in(self, entry: str) -> str:
        if os.path.isabs(entry):
            return ""
        return " (looked in " + " and ".join(str(base) for base in self._bases()) + ")"

    def resolve_files(self, name: str, entries: tuple[str, ...]) -> tuple[str, ...]:
        """Sorted, distinct absolute paths of the files that the entries name."""
        found: set[str] = set()
        for entry in entries:
            matches = self._expand(name, os.path.expanduser(entry))
            if not matches:
                what = "no file matches" if glob.has_magic(entry) else "no such file or folder"
                raise ConfigError(
                    f"{self.where}: key {name!r}: {what}: {entry!r}{self._looked_in(entry)}{PREPARE_HINT}"
                )
            found.update(matches)
        return tuple(sorted(found))

    def _expand(self, name: str, entry: str) -> list[str]:
        candidates = [Path(entry)] if os.path.isabs(entry) else [base / entry for base in self._bases()]
        for candidate in candidates:
            text = str(candidate)
            if glob.has_magic(entry):
                matches = [path for path in glob.glob(text) if os.path.isfile(path)]
            elif candidate.is_dir():
                matches = glob.glob(os.path.join(glob.escape(text), "*" + RECORD_SUFFIX))
                if not matches:
                    raise ConfigError(
                        f"{self.where}: key {name!r}: folder {text} holds no *{RECORD_SUFFIX} files"
                        + PREPARE_HINT
                    )
            elif candidate.is_file():
                matches = [text]
            else:
                matches = []
            if matches:
                return [os.path.abspath(path) for path in matches]
        return []

    def resolve_input_path(self, name: str, value: str) -> Path:
        entry = os.path.expanduser(value)
        candidates = [Path(entry)] if os.path.isabs(entry) else [base / entry for base in self._bases()]
        for candidate in candidates:
            if candidate.is_file():
                return candidate.absolute()
        hint = STATS_HINT if name == "statistics_file" else ""
        raise ConfigError(
            f"{self.where}: key {name!r}: no such file: {value!r}{self._looked_in(entry)}{hint}"
        )

    def resolve_model_file(self, value: str, key: str = "model_file") -> str:
        """The checkpoint that `value` means (`checkpoints.resolve_checkpoint`: a base name, one of its
        files, a run folder or a `.keras` file), as an absolute path; relative values are looked up in
        the working directory, then beside the config file."""

        entry = os.path.expanduser(value)
        candidates = [Path(entry)] if os.path.isabs(entry) else [base / entry for base in self._bases()]
        for candidate in candidates:
            if candidate.exists() or any(candidate.parent.glob(glob.escape(candidate.name) + ".*")):
                try:
                    return str(resolve_checkpoint(candidate).absolute())
                except UserError as error:
                    raise ConfigError(f"{self.where}: key {key!r}: {error}") from None
        name = Path(value).name
        raise ConfigError(
            f"{self.where}: key {key!r}: no checkpoint {value!r} (expected files such as "
            f"{name}.json and {name}.weights.h5){checkpoint_listing(candidates[0].parent)}"
            f"{self._looked_in(entry)}"
        )
