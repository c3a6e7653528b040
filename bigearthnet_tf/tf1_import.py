"""Import of the 2019 TF1 checkpoints (TF-Slim and `tf.layers` variable names) into our Keras models.

People who kept the 2019 pretrained weights (`<out_dir>/models/iteration-<N>.{index,data-*,meta}`) can
load them into the matching registered model, from the command line::

    bigearthnet import tf1 K-BranchCNN/iteration-6000 --model K-BranchCNN --label-type original \
        --out runs/imported/models/iteration-6000

or in Python::

    model = import_tf1_checkpoint("K-BranchCNN/iteration-6000", "K-BranchCNN", "original")
    save_imported(model, "runs/imported/models/iteration-6000")   # a checkpoint our tools load

The checkpoint is read with `tf.train.load_checkpoint` (TF2 reads TF1 checkpoints; no graph, no `.meta`).
Every checkpoint variable must fill exactly one model weight of the same shape, and every model weight
must be filled; otherwise nothing is imported and a `TF1ImportError` lists the variables without a place
in the model, the weights the checkpoint lacks, and the shapes that differ. Only the 2019 optimizer
state is skipped, by name: Adam's slots `<variable>/Adam` and `<variable>/Adam_1`, its `beta1_power`
and `beta2_power`, and `global_step` (the 2019 `train.py` saved `tf.global_variables()`).

Variable names (2019 code: `models/<name>.py` of the BigEarthNet(-19) model repositories; the models are
S2 only, so only modality S2 is importable):

- ResNet50/101/152, TF-Slim `resnet_v1_<depth>` under `resnet_arg_scope` (no conv biases):
  `resnet_v1_50/conv1/weights`, `resnet_v1_50/conv1/BatchNorm/{beta,gamma,moving_mean,moving_variance}`,
  `resnet_v1_50/block<b>/unit_<u>/bottleneck_v1/{shortcut,conv1,conv2,conv3}/{weights,BatchNorm/...}`,
  `resnet_v1_50/logits/{weights,biases}`. Our layers `conv1`, `block<b>_unit_<u>_<part>` and their `_bn`.
- VGG16/19, TF-Slim `vgg_16` / `vgg_19`: `vgg_16/conv<s>/conv<s>_<i>/{weights,biases}`,
  `vgg_16/fc6`, `fc7`, `fc8` (convolutions, as slim defines them). Our layers `conv<s>_<i>`, `fc6`-`fc8`.
- K-BranchCNN, plain `tf.layers` inside variable scopes:
  `CNN_{10m,20m,60m}_branch/conv_block_<i>/conv_layer/{kernel,bias}`,
  `CNN_<r>_branch/conv_block_<i>/batch_norm/{gamma,beta,moving_mean,moving_variance}`,
  `CNN_<r>_branch/fc_block_0/{fc_layer,batch_norm}/...`, `feature_fusion/fc_block_0/{fc_layer,batch_norm}/...`
  and the classifier `classification/fc_layer/{kernel,bias}`. Flatten order (rows, columns, channels)
  is the same in `tf.contrib.layers.flatten` and Keras, so dense kernels carry over unchanged.

Kernels have the same layout in TF1 and Keras ((h, w, in, out) and (in, out)), so values are copied
as they are. The tiny twins have no 2019 checkpoints; they get the same naming rules under the scopes
`resnet_v1_tiny` and `vgg_tiny` so that the mapping code can be exercised on small checkpoints.

The imported ResNet and VGG upsample the 20 m bands with the 2019 graph's kernel (TF1
`tf.image.resize_bicubic`, the models' default `upsampling`), so they see exactly the inputs they were
trained on and give the 2019 logits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import keras
import numpy as np
import tensorflow as tf

from bigearthnet_tf.checkpoints import iteration_of, new_checkpoint, save_checkpoint
from bigearthnet_tf.constants import LABEL_TYPES, LabelType, class_names, parse_label_type
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.models import build_model, get_model_spec, model_names
from bigearthnet_tf.models.tf1_naming import BATCH_NORM_LEAVES, TF1Naming
from bigearthnet_tf.tensor_files import finite_float32

IMPORT_MODALITY = "S2"  # the 2019 models read Sentinel-2 only

# Optimizer state and counters the 2019 Saver wrote next to the model; never imported.
OPTIMIZER_SLOT_SUFFIXES = ("/Adam", "/Adam_1")
NON_MODEL_VARIABLES = frozenset({"beta1_power", "beta2_power", "global_step"})
# Written by TF2's object-based saving; harmless in a name-based checkpoint.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

REPORT_LIMIT = 6  # names listed per problem kind in an error message

_CHECKPOINT_SUFFIXES = re.compile(r"\.(index|meta|data-\d+-of-\d+)$")
_ITERATION = re.compile(r"iteration-(\d+)$")


def importable_models() -> tuple[str, ...]:
    """The registered models that have 2019 TF1 checkpoints (their modules give their naming); the
    2019 models first, their test twins last."""
    names = [name for name in model_names() if get_model_spec(name).tf1 is not None]
    return tuple(sorted(names, key=lambda name: name.endswith("-Tiny")))


def tf1_naming(model_name: str) -> TF1Naming:
    """The 2019 naming of `model_name`; a model without 2019 checkpoints raises UserError."""
    naming = get_model_spec(model_name).tf1 if model_name in model_names() else None
    if naming is None:
        raise UserError(
            f"model {model_name!r} has no 2019 TF1 checkpoints to import; importable models: "
            f"{', '.join(importable_models())}"
        )
    return naming


def tf1_variable_map(model: keras.Model, model_name: str) -> dict[str, keras.Variable]:
    """2019 variable name -> the weight of `model` (built as `model_name`) that it fills.

    Weights of layers without a 2019 counterpart are left out; `unnamed_weights` lists them.
    """
    naming = tf1_naming(model_name)
    mapping: dict[str, keras.Variable] = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        path = naming.layer_scope(layer.name)
        if path is None:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            leaves = BATCH_NORM_LEAVES
        elif isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            leaves = naming.leaves
        else:
            continue
        for attribute, leaf in leaves.items():
            variable = getattr(layer, attribute, None)
            if variable is not None:  # no bias / no scale in this layer
                mapping[naming.name(f"{path}/{leaf}")] = variable
    return mapping


def unnamed_weights(model: keras.Model, mapping: Mapping[str, keras.Variable]) -> list[str]:
    """Paths of the weights of `model` that `mapping` does not fill."""
    named = {id(variable) for variable in mapping.values()}
    return [weight.path for weight in model.weights if id(weight) not in named]


# ---------------------------------------------------------------------------------------------
# Reading checkpoints


class CheckpointReader(Protocol):
    """What `tf.train.load_checkpoint` returns, as far as the import uses it."""

    def get_variable_to_shape_map(self) -> dict[str, list[int]]: ...

    def get_variable_to_dtype_map(self) -> dict[str, tf.dtypes.DType]: ...

    def get_tensor(self, name: str) -> np.ndarray: ...


def is_ignored_variable(name: str) -> bool:
    """True for the 2019 optimizer state and counters (and TF2's object graph), which are not imported."""
    return name in NON_MODEL_VARIABLES or name == OBJECT_GRAPH_KEY or name.endswith(OPTIMIZER_SLOT_SUFFIXES)


def resolve_tf1_checkpoint(path: str | os.PathLike[str]) -> str:
    """The checkpoint prefix that `path` names.

    Accepts the prefix itself (`.../iteration-6000`), any of its files (`.index`, `.meta`,
    `.data-00000-of-00001`), or a folder: there, the only checkpoint or the highest `iteration-<N>`.
    A folder's `checkpoint` file is not trusted, as it holds the absolute paths of the machine that
    trained.
    """
    text = os.fspath(path)
    folder = Path(text)
    if folder.is_dir():
        prefixes = sorted(str(index)[: -len(".index")] for index in folder.glob("*.index"))
        if len(prefixes) > 1:
            numbered = [(int(m.group(1)), p) for p in prefixes if (m := _ITERATION.search(p))]
            if len(numbered) != len(prefixes):
                raise UserError(
                    f"TF1 checkpoint folder {text} holds several checkpoints "
                    f"({', '.join(Path(p).name for p in prefixes)}); name one of them"
                )
            prefixes = [max(numbered)[1]]
        if not prefixes:
            raise UserError(f"TF1 checkpoint folder {text} holds no checkpoint (no *.index file)")
        return prefixes[0]
    prefix = _CHECKPOINT_SUFFIXES.sub("", text)
    if not Path(prefix + ".index").is_file() and not Path(prefix).is_file():
        raise UserError(f"TF1 checkpoint {prefix}: not found ({prefix}.index does not exist)")
    return prefix


def read_tf1_checkpoint(path: str | os.PathLike[str]) -> tuple[str, CheckpointReader]:
    """(prefix, reader) for the checkpoint `path` names; an unreadable one raises UserError."""
    prefix = resolve_tf1_checkpoint(path)
    try:
        return prefix, tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as error:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise UserError(f"TF1 checkpoint {prefix}: cannot be read: {first_line}") from None


# ---------------------------------------------------------------------------------------------
# Import


@dataclass(frozen=True)
class TF1ImportReport:
    """How a checkpoint's variables meet a model's weights; complete lists, sorted by name."""

    checkpoint: str
    model_name: str
    label_type: LabelType
    assigned: tuple[str, ...]  # variables that fit (copied into the model when the report is ok)
    ignored: tuple[str, ...]  # optimizer state and counters, skipped by name
    unmapped: tuple[str, ...]  # checkpoint variables with no place in the model
    unfilled: tuple[str, ...]  # model weights the checkpoint lacks (2019 name, or Keras path)
    mismatched: tuple[str, ...]  # "name: checkpoint <shape> <dtype>, model <shape>"
    hint: str = ""

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.unfilled or self.mismatched)

    def message(self) -> str:
        """One line naming the checkpoint, the model and every kind of problem (lists truncated)."""
        classes = len(LABEL_TYPES[self.label_type])
        problems = []
        for items, what in (
            (self.unmapped, "checkpoint variable(s) with no place in the model"),
            (self.unfilled, "model weight(s) missing from the checkpoint"),
            (self.mismatched, "shape/dtype mismatch(es)"),
        ):
            if items:
                problems.append(f"{len(items)} {what}: {_truncated(items)}")
        text = (
            f"TF1 checkpoint {self.checkpoint} does not match model {self.model_name} "
            f"({self.label_type}, {classes} classes): {'; '.join(problems)}"
        )
        return f"{text} ({self.hint})" if self.hint else text


class TF1ImportError(UserError):
    """A checkpoint that does not fit the model; `.report` holds the complete lists."""

    def __init__(self, report: TF1ImportReport) -> None:
        super().__init__(report.message())
        self.report = report


def plan_tf1_import(
    reader: CheckpointReader, prefix: str, model: keras.Model, model_name: str, label_type: LabelType
) -> tuple[TF1ImportReport, dict[str, keras.Variable]]:
    """Compare the checkpoint with `model`; return the report and the name -> weight mapping."""
    naming = tf1_naming(model_name)
    mapping = tf1_variable_map(model, model_name)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    ignored = sorted(name for name in shapes if is_ignored_variable(name))
    stored = {name: tuple(shape) for name, shape in shapes.items() if not is_ignored_variable(name)}
    unmapped = sorted(set(stored) - set(mapping))
    unfilled = sorted(set(mapping) - set(stored)) + unnamed_weights(model, mapping)
    assigned, mismatched = [], []
    for name in sorted(set(stored) & set(mapping)):
        expected = tuple(mapping[name].shape)
        dtype = dtypes[name]
        if stored[name] == expected and dtype.is_floating:
            assigned.append(name)
        else:
            mismatched.append(f"{name}: checkpoint {stored[name]} {dtype.name}, model {expected}")
    report = TF1ImportReport(
        checkpoint=prefix,
        model_name=model_name,
        label_type=label_type,
        assigned=tuple(assigned),
        ignored=tuple(ignored),
        unmapped=tuple(unmapped),
        unfilled=tuple(unfilled),
        mismatched=tuple(mismatched),
        hint=_label_type_hint(stored, naming, label_type),
    )
    return report, mapping


def import_tf1_checkpoint(
    checkpoint_prefix: str | os.PathLike[str], model_name: str, label_type: LabelType | str
) -> keras.Model:
    """Build `model_name` for `label_type` (modality S2) and fill it from a 2019 TF1 checkpoint.

    Every checkpoint variable (optimizer state aside) must fill one weight of the same shape and every
    weight must be filled; otherwise a TF1ImportError reports the differences and nothing is returned.
    """

    tf1_naming(model_name)
    label_type = parse_label_type(label_type)
    num_classes = len(class_names(label_type))
    prefix, reader = read_tf1_checkpoint(checkpoint_prefix)
    model = build_model(model_name, num_classes, modality=IMPORT_MODALITY)
    report, mapping = plan_tf1_import(reader, prefix, model, model_name, label_type)
    if not report.ok:
        raise TF1ImportError(report)
    values = {}
    for name in report.assigned:  # all read and checked before any is assigned
        try:
            value = np.asarray(reader.get_tensor(name))
        except Exception as error:  # TF raises IndexError, OpError, ... for a damaged .data file
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"{prefix}: variable {name} cannot be read: the .data file is truncated or damaged ({detail})"
            ) from None
        floating = np.issubdtype(value.dtype, np.floating)
        values[name] = finite_float32(value, prefix, name) if floating else value
    for name, value in values.items():
        variable = mapping[name]
        variable.assign(value.astype(variable.dtype, copy=False))
    return model


def save_imported(
    model: keras.Model,
    out_base: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    label_type: LabelType | str | None = None,
    iteration: int | None = None,
) -> Path:
    """Save an imported model as a checkpoint of ours (`checkpoints.save_checkpoint`); return its base.

    `model_name` defaults to the model's name (the registry name `build_model` gives it), `label_type`
    to the one whose class count equals the model's outputs, `iteration` to the N of an
    `iteration-<N>` base name (0 otherwise), so fine-tuning resumes the 2019 counter.
    """

    model_name = model_name or model.name
    label_type = None if label_type is None else parse_label_type(label_type)
    tf1_naming(model_name)
    outputs = int(model.outputs[0].shape[-1])
    if label_type is None:
        matches = [name for name, names in LABEL_TYPES.items() if len(names) == outputs]
        if len(matches) != 1:
            raise UserError(f"model {model_name!r} has {outputs} outputs, which match no label type")
        label_type = matches[0]
    if len(class_names(label_type)) != outputs:
        raise UserError(
            f"model {model_name!r} has {outputs} outputs but label_type {label_type!r} has "
            f"{len(class_names(label_type))} classes"
        )
    if iteration is None:
        iteration = iteration_of(out_base) or 0
    return save_checkpoint(
        out_base,
        model,
        model_name=model_name,
        label_type=label_type,
        modality=IMPORT_MODALITY,
        iteration=iteration,
    )


def convert_tf1_checkpoint(
    checkpoint_prefix: str | os.PathLike[str],
    model_name: str,
    label_type: LabelType | str,
    out_base: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """`bigearthnet import tf1`: import a 2019 checkpoint and save it as our checkpoint `out_base`.

    An existing checkpoint at `out_base` is replaced only with `overwrite`; a failed import writes nothing.
    """

    label_type = parse_label_type(label_type)  # where the command line's string enters
    with new_checkpoint(out_base, overwrite):
        model = import_tf1_checkpoint(checkpoint_prefix, model_name, label_type)
        return save_imported(model, out_base, model_name=model_name, label_type=label_type)


def _truncated(items: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(items[:REPORT_LIMIT])
    more = len(items) - REPORT_LIMIT
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _label_type_hint(stored: Mapping[str, tuple[int, ...]], naming: TF1Naming, label_type: LabelType) -> str:
    """A suggestion when the checkpoint's classifier has another label type's class count."""
    bias = stored.get(naming.name(f"{naming.classifier}/{naming.leaves['bias']}"))
    if not bias or bias[-1] == len(LABEL_TYPES[label_type]):
        return ""
    others = [name for name, names in LABEL_TYPES.items() if len(names) == bias[-1]]
    suggestion = f"; label_type {others[0]!r}?" if others else ""
    return f"the checkpoint's classifier has {bias[-1]} outputs{suggestion}"
