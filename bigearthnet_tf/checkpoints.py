"""Checkpoints that carry their meaning: atomic save, verified load, newest-complete lookup.

Layout (as in 2019, `out_dir/models/iteration-<N>` is the base name that `model_file` takes; the files
add extensions to it)::

    out_dir/models/iteration-600.weights.h5   model weights (Keras `save_weights`)
    out_dir/models/iteration-600.state.npz    optimizer variables and dropout RNG states (NumPy, no pickle)
    out_dir/models/iteration-600.json         metadata: written LAST, it marks the checkpoint complete
    out_dir/models/best.*                     the same three files for the best validation macro AP

Metadata keys (`iteration-<N>.json`)::

    format, format_version        "bigearthnet-tf-checkpoint", 1
    kind                          "iteration" or "best"
    model_name, label_type, modality, num_classes
    model_options                 builder options that define the network (e.g. the upsampling kernel);
                                  absent in checkpoints written before it existed: they keep the
                                  tf2_bicubic kernel they were trained with
    source                        where imported weights came from (name, version, licence); null else
    class_names                   in index order (never sorted)
    input_keys                    the raw-band inputs the model reads, e.g. ["bands_10m", "bands_20m"]
    band_order                    input key -> band names in channel order
    statistics                    band -> [mean, std] held by the model's standardisation layers
    iteration                     iterations done (training resumes at iteration + 1)
    data_position                 batches_consumed, epoch, batch_in_epoch, epoch_records, batch_size
    validation                    the validation metrics (macro/micro AP, ...) of a `best` checkpoint
    training                      model-selection state: best macro AP so far, its iteration, and
                                  validations since (so early stopping survives a resume)
    optimizer                     optimizer class and number of saved variables (null without state)
    config                        the resolved training config
    versions                      bigearthnet_tf, tensorflow, keras, numpy, python
    files                         role -> {name, bytes, sha256} of the other files
    created                       UTC time (ISO 8601)

Every file is written to a temporary name in the same folder and moved into place with `os.replace`;
an existing metadata file of the same base name is removed first, so at every instant the base name
either has a metadata file whose sizes and checksums match its files, or none. A checkpoint is
complete only then, and `latest_complete_checkpoint` and `load_checkpoint` accept nothing else.

Loading never runs code from the checkpoint: the model is rebuilt through the registry from the
metadata and the weights are read into it. A `.keras` file given as `model_file` (an exported model)
is opened with Keras safe mode.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Where checkpoints are and whether they are complete (no Keras): used here, and by callers as checkpoints.X.
from bigearthnet_tf.checkpoint_lookup import (  # noqa: F401
    BEST_NAME,
    FORMAT,
    FORMAT_VERSION,
    ITERATION_PREFIX,
    KERAS_SUFFIX,
    LISTED_CHECKPOINTS,
    METADATA_SUFFIX,
    MODELS_DIR,
    STATE_SUFFIX,
    TF1_INDEX_SUFFIX,
    WEIGHTS_SUFFIX,
    checkpoint_base,
    checkpoint_files,
    checkpoint_listing,
    describe_file,
    file_sha256,
    is_complete,
    iteration_of,
    latest_complete_checkpoint,
    list_checkpoints,
    models_dir,
    read_checkpoint,
    read_metadata,
    resolve_checkpoint,
)
from bigearthnet_tf.constants import TF2_BICUBIC, LabelType
from bigearthnet_tf.constants import class_names as class_names_of
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import (
    check_free_space,
    fsync_directory,
    replace_atomically,
    write_text_atomically,
)
from bigearthnet_tf.jsonfiles import read_json_object
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.model_meta import ModelMeta

KIND_ITERATION = "iteration"
KIND_BEST = "best"
KIND_BACKBONE = "backbone"  # an imported backbone (`import torchgeo`): its head is zeros

_TEMPORARY_MARK = ".tmp"  # in the names of files being written; a killed save may leave them
# Optimizer variables that the config, not the checkpoint, decides (a fine-tune may change the rate).
_CONFIG_OWNED_OPTIMIZER_VARIABLES = ("learning_rate",)

PROBABILITIES_LAYER = "probabilities"  # the sigmoid layer `export` appends to a logits model


@dataclass(frozen=True)
class DataPosition:
    """Where the training input stream stands after `batches_consumed` batches."""

    batches_consumed: int
    batch_size: int
    epoch_records: int  # records per epoch of the training files (0 when unknown)

    @property
    def epoch(self) -> int:
        """0-based epoch that the next record comes from."""
        return self.batches_consumed * self.batch_size // self.epoch_records if self.epoch_records else 0

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already consumed (batches may straddle epochs)."""
        if not self.epoch_records:
            return self.batches_consumed
        return (self.batches_consumed * self.batch_size % self.epoch_records) // self.batch_size

    def to_dict(self) -> dict[str, int]:
        return {
            "batches_consumed": self.batches_consumed,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_records": self.epoch_records,
            "batch_size": self.batch_size,
        }


class LoadedCheckpoint(NamedTuple):
    """What `load_checkpoint` returns: unpack as `model, state, meta = load_checkpoint(base)`."""

    model: Any  # keras.Model
    state: dict[str, np.ndarray] | None  # `optimizer/<i>` and `rng/<i>` arrays; None without a state file
    meta: ModelMeta


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def refuse_existing(base: str | os.PathLike[str], overwrite: bool) -> None:
    """UserError when a file of checkpoint `base` exists and `overwrite` is not set."""
    existing = [path for path in checkpoint_files(base).values() if path.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace the checkpoint {base}")


@contextlib.contextmanager
def new_checkpoint(base: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
    """Hold the one-writer lock of checkpoint `base` (an importer writes it inside the block), after
    refusing an existing checkpoint without `overwrite`: two imports into one base cannot both
    succeed, and the check and the write cannot be raced."""
    base = Path(base)
    with output_lock(base.parent, f"checkpoint-{base.name}", f"checkpoint {base}"):
        refuse_existing(base, overwrite)
        yield base


def should_save(iteration: int, per_iteration: int | None, after_iteration: int) -> bool:
    """The 2019 rule: save at N when N % per_iteration == 0 and N >= after_iteration."""
    return per_iteration is not None and iteration % per_iteration == 0 and iteration >= after_iteration


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    base: str | os.PathLike[str],
    model,
    *,
    model_name: str,
    label_type: LabelType,
    modality: Modality,
    iteration: int,
    optimizer=None,
    data_position: DataPosition | None = None,
    config: Mapping[str, Any] | None = None,
    validation: Mapping[str, float] | None = None,
    training: Mapping[str, Any] | None = None,
    kind: str = KIND_ITERATION,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write the checkpoint `base` (weights, optional optimizer/RNG state, then metadata); return base.

    Each file is replaced atomically and the metadata, which lists sizes and SHA-256 of the others,
    comes last, so a crash at any moment leaves either the complete new checkpoint or no metadata.
    """
    from bigearthnet_tf.models import INPUTS, input_keys, model_statistics

    base = Path(base)
    files = checkpoint_files(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    class_names = class_names_of(label_type)

    # Room for the new files is checked before the old checkpoint is touched (and before HDF5, which
    # crashes the process on a full disk instead of failing).
    weight_bytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights)
    needed = weight_bytes * (4 if optimizer is not None else 1) + (1 << 20)
    check_free_space(base.parent, needed, files["weights"])
    # The old marker goes first: from here until the new one lands, this base name is incomplete.
    files["metadata"].unlink(missing_ok=True)
    replace_atomically(files["weights"], model.save_weights, suffix=WEIGHTS_SUFFIX)  # Keras insists on it
    written = {"weights": files["weights"]}
    optimizer_meta = None
    if optimizer is not None:
        state = training_state(model, optimizer)
        replace_atomically(
            files["state"], lambda temporary: _write_npz(temporary, state), suffix=STATE_SUFFIX
        )
        written["state"] = files["state"]
        optimizer_meta = {
            "class": type(_inner_optimizer(optimizer)).__name__,
            "variables": sum(1 for key in state if key.startswith("optimizer/")),
        }
    else:
        files["state"].unlink(missing_ok=True)

    keys = input_keys(model)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_name": model_name,
        "label_type": label_type,
        "modality": modality,
        "num_classes": len(class_names),
        "model_options": dict(getattr(model, "model_options", {})),
        "source": dict(source) if source is not None else None,
        "class_names": list(class_names),
        "input_keys": list(keys),
        "band_order": {key: list(INPUTS[key].bands) for key in keys if key in INPUTS},
        "statistics": {band: list(value) for band, value in model_statistics(model).items()},
        "iteration": int(iteration),
        "data_position": data_position.to_dict() if data_position is not None else None,
        "validation": dict(validation) if validation is not None else None,
        "training": dict(training) if training is not None else None,
        "optimizer": optimizer_meta,
        "config": dict(config) if config is not None else None,
        "versions": library_versions(),
        "files": {role: describe_file(path) for role, path in written.items()},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(metadata, indent=2, allow_nan=False) + "\n"
    write_text_atomically(files["metadata"], text)
    fsync_directory(base.parent)
    return base


def training_state(model, optimizer) -> dict[str, np.ndarray]:
    """The optimizer's variables and the model's RNG states, in their (deterministic) creation order.

    The learning rate is left out: the config decides it. RNG states are the dropout seed generators
    (variables of the model that are not weights); saving them makes a resumed run draw the same
    dropout masks as an uninterrupted one.
    """
    state: dict[str, np.ndarray] = {}
    for index, variable in enumerate(_optimizer_variables(optimizer)):
        state[f"optimizer/{index:05d}"] = np.asarray(variable.numpy())
    for index, variable in enumerate(_rng_variables(model)):
        state[f"rng/{index:05d}"] = np.asarray(variable.numpy())
    return state


def restore_training_state(
    model, optimizer, state: Mapping[str, np.ndarray], where: str = "checkpoint"
) -> None:
    """Assign a `training_state` back; the optimizer is built for the model's trainable variables first.

    A state saved for another model or optimizer (different count or shapes) raises a UserError.
    """
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    groups = {
        "optimizer": _optimizer_variables(optimizer),
        "rng": _rng_variables(model),
    }
    for group, variables in groups.items():
        saved = sorted(key for key in state if key.startswith(group + "/"))
        if len(saved) != len(variables):
            raise UserError(
                f"{where}: its {group} state has {len(saved)} variables but this run's has "
                f"{len(variables)}; was it written with another model, optimizer or mixed_precision setting?"
            )
        for key, variable in zip(saved, variables, strict=True):
            value = state[key]
            if tuple(value.shape) != tuple(variable.shape):
                raise UserError(
                    f"{where}: {group} variable {variable.path} has shape {tuple(variable.shape)} "
                    f"here but {tuple(value.shape)} in the checkpoint"
                )
            variable.assign(value.astype(variable.dtype))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def remove_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed save left in `directory` (`.<file>.<random>.tmp...`)."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for path in directory.glob(f".*{_TEMPORARY_MARK}*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def load_checkpoint(
    base: str | os.PathLike[str],
    *,
    label_type: LabelType | None = None,
    modality: Modality | None = None,
    model_name: str | None = None,
    statistics: Mapping[str, tuple[float, float]] | None = None,
    training_options: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Rebuild the model of checkpoint `base` through the registry and read its weights and state.

    The model is built with the checkpoint's `model_options` and the given `training_options`
    (regularisation such as `dropout`, for fine-tuning; None values keep the model's defaults).

    The requested `label_type`, `modality`, `model_name` and `statistics`, when given, must agree with
    the checkpoint, and its class names and band orders with this library's: otherwise a UserError
    explains the difference instead of silently mixing up classes or bands. A `.keras` file (an exported
    model) is opened with Keras safe mode; it has no state and minimal metadata.
    """
    base = Path(base)
    if base.suffix == KERAS_SUFFIX and base.is_file():
        return _load_keras_file(base, label_type=label_type, modality=modality)
    from bigearthnet_tf.models import build_model

    metadata, meta = read_checkpoint(base, verify=True)
    meta.check_request(f"checkpoint {base}", label_type=label_type, modality=modality, model_name=model_name)
    saved_statistics = dict(meta.statistics)
    if statistics is not None:
        differ = sorted(
            band
            for band, value in statistics.items()
            if band in saved_statistics and not np.allclose(saved_statistics[band], value, rtol=1e-9)
        )
        if differ:
            raise UserError(
                f"checkpoint {base}: its normalisation statistics differ from the statistics_file for "
                f"{', '.join(differ)}; a model must see the statistics it was trained with"
            )
    options = {**network_options(meta), **(training_options or {})}
    model = build_model(meta.model_name, meta.num_classes, meta.modality, saved_statistics, **options)
    weights = checkpoint_files(base)["weights"]
    try:
        model.load_weights(str(weights))
    except (ValueError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"checkpoint {base}: its weights do not fit model {meta.model_name!r}: {first_line}"
        ) from None
    state = None
    if "state" in metadata["files"]:
        with np.load(checkpoint_files(base)["state"], allow_pickle=False) as archive:
            state = {key: archive[key] for key in archive.files}
    return LoadedCheckpoint(model, state, meta)


def network_options(meta: ModelMeta) -> dict[str, Any]:
    """The builder options recorded in checkpoint metadata; for checkpoints written before they were
    recorded, the TF2 bicubic kernel that every upsampling model used then."""
    from bigearthnet_tf.models.registry import model_option_names

    if meta.model_options is not None:
        return dict(meta.model_options)
    return {"upsampling": TF2_BICUBIC} if "upsampling" in model_option_names(meta.model_name) else {}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide what a checkpoint means and how it reads back."""
    import importlib.metadata

    import keras
    import tensorflow as tf

    try:
        ours = importlib.metadata.version("bigearthnet-tf")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {
        "bigearthnet_tf": ours,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _load_keras_file(path: Path, *, label_type: LabelType | None, modality: Modality | None) -> LoadedCheckpoint:
    """An exported `.keras` model, opened in safe mode (no arbitrary code), with what can be checked."""
    import keras

    import bigearthnet_tf.models  # noqa: F401  (registers the custom layers safe mode may deserialize)
    from bigearthnet_tf.models import input_keys

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad or unsafe file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model file {path}: cannot be loaded in safe mode: {first_line}") from None
    model = _logits_model(model)
    where = f"model file {path}"
    outputs = int(model.outputs[0].shape[-1])
    meta = ModelMeta.of_model(where, model.name, outputs, input_keys(model), label_type)
    document = keras_export_metadata(path)
    if document is not None:
        meta = meta.with_export(where, document)
    meta.check_request(where, modality=modality)
    return LoadedCheckpoint(model, None, meta)


def _logits_model(model):
    """`model` without the `probabilities` sigmoid `export` appends: every loaded model outputs logits."""
    import keras

    last = model.layers[-1] if model.layers else None
    if (
        isinstance(last, keras.layers.Activation)
        and last.name == PROBABILITIES_LAYER
        and keras.activations.serialize(last.activation) == "sigmoid"
    ):
        return keras.Model(model.inputs, last.input, name=model.name)
    return model


def _inner_optimizer(optimizer):
    """The optimizer that owns the slots (a LossScaleOptimizer wraps one)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _optimizer_variables(optimizer) -> list:
    return [v for v in optimizer.variables if v.name not in _CONFIG_OWNED_OPTIMIZER_VARIABLES]


def _rng_variables(model) -> list:
    weights = {id(variable) for variable in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def _write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    # Via an open file: np.savez would append ".npz" to a name that lacks it.
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)


def keras_metadata_path(path: str | os.PathLike[str]) -> Path:
    """Where bigearthnet-tf 0.1 wrote an exported `.keras` model's metadata (`m.metadata.json`)."""
    return Path(path).with_suffix(".metadata.json")


KERAS_METADATA_ENTRY = "bigearthnet_tf/metadata.json"  # inside the `.keras` zip, beside Keras' own files


def keras_export_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The export metadata of a `.keras` file: inside it (`export` writes it there, so model and
    metadata are one file), else in a 0.1-style sidecar; None for a plain Keras file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            if KERAS_METADATA_ENTRY in archive.namelist():
                document = json.loads(archive.read(KERAS_METADATA_ENTRY))
                if not isinstance(document, dict):
                    raise UserError(f"model file {path}: {KERAS_METADATA_ENTRY} is not a JSON object")
                return document
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UserError(f"model file {path}: its metadata cannot be read: {error}") from None
    sidecar = keras_metadata_path(path)
    return read_json_object(sidecar, "model metadata file") if sidecar.is_file() else None
