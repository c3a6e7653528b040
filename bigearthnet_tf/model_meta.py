"""What a saved model means, typed: read and checked once, then passed on as a `ModelMeta`.

A checkpoint's metadata file (checkpoints.py) and an exported `.keras` model (its output count, its
inputs and the export metadata inside it) both become a `ModelMeta`. The checks that decide whether
its outputs may be read at all happen here and nowhere else: the label type is known and its class
names are that nomenclature's in index order, every input's band order is the one this library
reads, and statistics follow `constants.checked_statistics`. Without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from bigearthnet_tf.constants import LABEL_TYPES, LabelType, checked_statistics
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import INPUTS, Modality, modality_of
from bigearthnet_tf.thresholds import checked_thresholds


@dataclass(frozen=True)
class ModelMeta:
    """A model's meaning: its architecture, classes, inputs and where its weights came from."""

    model_name: str
    label_type: LabelType
    modality: Modality
    class_names: tuple[str, ...]
    band_order: Mapping[str, tuple[str, ...]]  # input key -> bands in channel order, in input order
    # Band -> (mean, std) of the standardisation the model's first layers hold.
    statistics: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    model_options: Mapping[str, Any] | None = None  # builder options; None: written before they were
    iteration: int | None = None
    weights_sha256: str | None = None  # of the checkpoint's weights file: what thresholds bind to
    training: Mapping[str, Any] | None = None  # the trainer's progress (best value, patience)
    thresholds: Mapping[str, float] | None = None  # an exported model's, carried over from its checkpoint
    kind: str | None = None  # the checkpoint's kind: iteration, best, or backbone (a head of zeros)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_keys(self) -> tuple[str, ...]:
        return tuple(self.band_order)

    @classmethod
    def from_checkpoint(cls, where: str, metadata: Mapping[str, Any]) -> ModelMeta:
        """The meaning recorded in checkpoint metadata; a UserError naming `where` and the key at fault
        for anything malformed (a hand-edited or foreign file) or meaning other classes or bands."""

        def malformed(key: str) -> UserError:
            return UserError(f"{where}: metadata key {key!r} is missing or malformed")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = metadata.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise malformed(key)
            return value

        model_name = get("model_name", str)
        class_names = get("class_names", list)
        keys = get("input_keys", list)
        for key, values in (("class_names", class_names), ("input_keys", keys)):
            if not all(isinstance(value, str) for value in values):
                raise malformed(key)
        if get("num_classes", int) != len(class_names):
            raise malformed("num_classes")
        saved_order = get("band_order", dict)
        for key, bands in saved_order.items():
            if not isinstance(bands, list) or not all(isinstance(band, str) for band in bands):
                raise malformed(f"band_order.{key}")
        statistics = get("statistics", dict)
        for band, value in statistics.items():
            if not (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            ):
                raise malformed(f"statistics.{band}")
        for key in ("model_options", "source", "training"):
            if not isinstance(metadata.get(key), dict | None):
                raise malformed(key)
        iteration = metadata.get("iteration")
        if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool)):
            raise malformed("iteration")
        label_type = _saved_label_type(where, get("label_type", str))
        _check_classes(where, label_type, class_names)
        band_order = _checked_band_order(where, keys, saved_order)
        try:
            modality = Modality(get("modality", str))
        except ValueError:
            raise malformed("modality") from None
        weights = (metadata.get("files") or {}).get("weights") or {}
        return cls(
            model_name=model_name,
            label_type=label_type,
            modality=modality,
            class_names=tuple(class_names),
            band_order=band_order,
            statistics=MappingProxyType(checked_statistics(statistics, f"{where}: statistics")),
            model_options=metadata.get("model_options"),
            iteration=iteration,
            weights_sha256=weights.get("sha256"),
            training=metadata.get("training"),
            kind=metadata.get("kind") if isinstance(metadata.get("kind"), str) else None,
        )

    @classmethod
    def of_model(
        cls, where: str, model_name: str, outputs: int, input_keys: tuple[str, ...], label_type: LabelType | None
    ) -> ModelMeta:
        """What a model file without our metadata can tell: its classes by its output count (or the
        label type asked for), its bands by its input names (this library's orders)."""
        if label_type is None:
            matches = [name for name, classes in LABEL_TYPES.items() if len(classes) == outputs]
            if len(matches) != 1:
                raise UserError(f"{where}: {outputs} outputs match no label type; set label_type")
            label_type = matches[0]
        label_type = LabelType(label_type)
        if len(label_type.classes) != outputs:
            classes = len(label_type.classes)
            raise UserError(f"{where} outputs {outputs} classes but label_type {label_type!r} has {classes}")
        return cls(
            model_name=model_name,
            label_type=label_type,
            modality=modality_of(input_keys),
            class_names=label_type.classes,
            band_order=_checked_band_order(where, input_keys, {}),
        )

    def with_export(self, where: str, document: Mapping[str, Any]) -> ModelMeta:
        """This meaning completed by an export's metadata (`export.export_metadata`): its model
        name, modality and thresholds; its label type and classes must be these."""
        label_type = document.get("label_type")
        if label_type is not None and label_type != self.label_type:
            raise UserError(
                f"{where}: its metadata names label_type {label_type!r} but the model outputs the "
                f"{self.num_classes} {self.label_type} classes"
            )
        thresholds = document.get("thresholds")
        if thresholds is not None:
            thresholds = checked_thresholds(thresholds, self.class_names, f"{where}: metadata thresholds")
        modality = document.get("modality")
        return dataclasses.replace(
            self,
            model_name=document.get("model_name") or self.model_name,
            modality=self.modality if modality is None else Modality(modality),
            iteration=(document.get("source") or {}).get("iteration"),
            thresholds=thresholds,
        )

    def check_request(
        self,
        where: str,
        *,
        label_type: LabelType | None = None,
        modality: Modality | None = None,
        model_name: str | None = None,
    ) -> None:
        """Refuse a model whose label type, modality or architecture differ from what is asked."""
        if label_type is not None and label_type != self.label_type:
            raise UserError(
                f"{where} was trained for label_type {self.label_type!r} ({self.num_classes} classes) but "
                f"the config asks for {label_type!r} ({len(LABEL_TYPES[label_type])} classes)"
            )
        if modality is not None and modality != self.modality:
            raise UserError(
                f"{where} was trained on modality {self.modality!r} but the config asks for {modality!r}"
            )
        if model_name is not None and model_name != self.model_name:
            raise UserError(f"{where} holds model {self.model_name!r} but the config names {model_name!r}")


def _saved_label_type(where: str, value: str) -> LabelType:
    try:
        return LabelType(value)
    except ValueError:
        raise UserError(f"{where}: unknown label_type {value!r} in its metadata") from None


def _check_classes(where: str, label_type: LabelType, class_names: list[str]) -> None:
    if tuple(class_names) != label_type.classes:
        raise UserError(
            f"{where}: its class names are not the {label_type} classes in index order; "
            "refusing to read its outputs with the wrong classes"
        )


def _checked_band_order(
    where: str, input_keys: tuple[str, ...] | list[str], saved: Mapping[str, list[str]]
) -> Mapping[str, tuple[str, ...]]:
    """Per input, the bands recorded (else this library's), refused where they differ from ours."""
    for key, bands in saved.items():
        if key not in INPUTS or list(INPUTS[key].bands) != list(bands):
            expected = list(INPUTS[key].bands) if key in INPUTS else "no such input"
            raise UserError(
                f"{where}: input {key!r} has bands {bands} but this version reads {expected}; "
                "refusing to feed the model the wrong bands"
            )
    unknown = [key for key in input_keys if key not in INPUTS]
    if unknown:
        raise UserError(f"{where}: input {unknown[0]!r} is not one of {', '.join(INPUTS)}")
    return MappingProxyType({key: INPUTS[key].bands for key in input_keys})
