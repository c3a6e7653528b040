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

from bigearthnet_tf import checkpoints
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import S1_INPUT
from bigearthnet_tf.model_meta import ModelMeta
from bigearthnet_tf.thresholds import thresholds_path

__all__ = ["Predictor", "load_predictor"]


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
