"""A trained model ready to apply: a checkpoint or an exported `.keras` file, loaded with what it
means (its classes in index order, the bands of each input in channel order, the digest its
thresholds are bound to). Shared by `predict`, `export` and `show`, so that no command imports another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigearthnet_tf import checkpoints
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.jsonfiles import read_json_object
from bigearthnet_tf.layout import S1_INPUT, modality_of
from bigearthnet_tf.thresholds import thresholds_path

__all__ = [
    "Predictor",
    "load_predictor",
    "keras_metadata_path",
    "keras_export_metadata",
    "KERAS_METADATA_ENTRY",
]


@dataclass(frozen=True)
class Predictor:
    """A model ready to apply: which bands it reads in which order, its classes, its output kind."""

    model: Any  # keras.Model
    meta: dict[str, Any]
    source: Path
    class_names: tuple[str, ...]
    band_order: dict[str, tuple[str, ...]]  # input key -> band names in channel order
    model_sha256: str  # of the weights (checkpoint) or of the file (.keras): what thresholds bind to

    @property
    def input_keys(self) -> tuple[str, ...]:
        return tuple(self.band_order)

    @property
    def needs_s1(self) -> bool:
        return S1_INPUT in self.band_order

    @property
    def thresholds_file(self) -> Path:
        return thresholds_path(self.source)


def load_predictor(path: str | os.PathLike[str]) -> Predictor:
    """Load a checkpoint (verified, rebuilt through the registry) or an exported `.keras` file."""
    from bigearthnet_tf.models import INPUTS, input_keys

    source = checkpoints.resolve_checkpoint(path)
    model, _, meta = checkpoints.load_checkpoint(source)
    keys = input_keys(model)
    saved_order = meta.get("band_order") or {}
    band_order = {key: tuple(saved_order.get(key, INPUTS[key][1])) for key in keys}
    if source.suffix == checkpoints.KERAS_SUFFIX:
        meta = {**meta, **(keras_export_metadata(source) or {})}
        if not meta.get("modality"):
            meta["modality"] = modality_of(keys)
        model_sha256 = checkpoints.file_sha256(source)
    else:
        model_sha256 = meta["files"]["weights"]["sha256"]
    class_names = tuple(meta["class_names"])
    if int(model.outputs[0].shape[-1]) != len(class_names):
        raise UserError(
            f"model {source}: outputs {model.outputs[0].shape[-1]} classes but names {len(class_names)}"
        )
    return Predictor(model, meta, source, class_names, band_order, model_sha256)


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
