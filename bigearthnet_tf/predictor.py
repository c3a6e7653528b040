"""A trained model ready to apply: a checkpoint or an exported `.keras` file, loaded with what it
means (its classes in index order, the bands of each input in channel order, the digest its
thresholds are bound to). Shared by `predict`, `export` and `show`, so that no command imports another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigearthnet_tf import checkpoints
from bigearthnet_tf.constants import DEFAULT_THRESHOLD
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import S1_INPUT
from bigearthnet_tf.model_meta import ModelMeta
from bigearthnet_tf.thresholds import STORED, read_thresholds_file, stored_thresholds, thresholds_path

__all__ = ["Predictor", "load_predictor", "resolve_thresholds", "describe_thresholds"]


@dataclass(frozen=True)
class Predictor:
    """A model ready to apply: which bands it reads in which order, its classes, its output kind."""

    model: Any  # keras.Model
    meta: ModelMeta
    source: Path
    model_sha256: str  # of the weights (checkpoint) or of the file (.keras): what thresholds bind to

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names

    @property
    def band_order(self) -> Mapping[str, tuple[str, ...]]:
        """Input key -> band names in channel order."""
        return self.meta.band_order

    @property
    def input_keys(self) -> tuple[str, ...]:
        return self.meta.input_keys

    @property
    def needs_s1(self) -> bool:
        return S1_INPUT in self.band_order

    @property
    def thresholds_file(self) -> Path:
        return thresholds_path(self.source)


def load_predictor(path: str | os.PathLike[str], allow_backbone: bool = False) -> Predictor:
    """Load a checkpoint (verified, rebuilt through the registry) or an exported `.keras` file.

    A backbone checkpoint (`import torchgeo`: its head is zeros) has no predictions to give and is
    refused unless `allow_backbone` (for `embed`, which reads only its features).
    """

    source = checkpoints.resolve_checkpoint(path)
    model, _, meta = checkpoints.load_checkpoint(source)
    if meta.kind == checkpoints.KIND_BACKBONE and not allow_backbone:
        raise UserError(
            f"model {source} is a backbone without a trained head; fine-tune it first "
            '("backbone_weights" in a training config), or take its features with bigearthnet embed'
        )
    if int(model.outputs[0].shape[-1]) != meta.num_classes:
        raise UserError(
            f"model {source}: outputs {model.outputs[0].shape[-1]} classes but names {meta.num_classes}"
        )
    model_sha256 = meta.weights_sha256 or checkpoints.file_sha256(source)  # a .keras file: the file
    return Predictor(model, meta, source, model_sha256)


# --- which thresholds a loaded model uses (the rule of `thresholds`' docstring) ---


def resolve_thresholds(
    predictor: Predictor,
    *,
    threshold: float | None = None,
    thresholds_file: str | os.PathLike[str] | None = None,
    console=None,
) -> np.ndarray:
    """The threshold of each class of a loaded model, by the rule of the module docstring; with
    `console`, says which thresholds these are."""
    values, description = describe_thresholds(predictor, threshold=threshold, thresholds_file=thresholds_file)
    if console is not None:
        console.print(f"thresholds: {description}", markup=False, soft_wrap=True)
    return values


def describe_thresholds(
    predictor: Predictor,
    *,
    threshold: float | None = None,
    thresholds_file: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, str]:
    """`resolve_thresholds`' values, and a sentence that says where they come from."""
    if threshold is not None and not (
        isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 < threshold <= 1
    ):
        raise UserError(f"--threshold must be in (0, 1], got {threshold!r}")
    base = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    description = f"{base:g} for every class"
    per_class: dict[str, float] = {}
    if thresholds_file is not None and os.fspath(thresholds_file) == STORED:
        if predictor.thresholds_file.is_file():
            per_class = stored_thresholds(predictor.source, predictor.model_sha256, predictor.class_names)
            description = f"per class, stored in {predictor.thresholds_file}"
        elif predictor.meta.thresholds:
            per_class = dict(predictor.meta.thresholds)
            description = f"per class, from the metadata of {predictor.source}"
        else:
            raise UserError(
                f"--thresholds stored: {predictor.source} has no stored thresholds (choose them with "
                "bigearthnet predict --choose-thresholds VALIDATION_RECORDS)"
            )
    elif thresholds_file is not None:
        per_class = read_thresholds_file(thresholds_file, predictor.class_names)
        description = f"per class, from {thresholds_file}"
    if per_class and len(per_class) < len(predictor.class_names):
        description += f" ({len(predictor.class_names) - len(per_class)} classes at {base:g})"
    values = np.array([per_class.get(name, base) for name in predictor.class_names], dtype=np.float64)
    return values, description
