"""The layout of the data, owned here once: modalities, the inputs a record and a model carry, and
the record keys of the labels.

An input is one array of a patch: its key (in records, model inputs and statistics files), its bands in
channel order, its side in pixels, its dtype and the modality it belongs to. A modality (S2, S1 or MM,
both) selects inputs. Strings are parsed once, where they enter (a config, the command line, a file),
with `parse_modality`; everything inside receives a `Modality`, which compares equal to its string.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from bigearthnet_tf.constants import (
    BANDS_10M,
    BANDS_20M,
    BANDS_60M,
    GROUP_SIZES,
    PATCH_SIZE,
    S1_BAND_NAMES,
    S2_BAND_NAMES,
    LabelType,
)
from bigearthnet_tf.errors import ConfigError


class Modality(enum.StrEnum):
    """Which sensors a model reads: Sentinel-2, Sentinel-1, or both (multi-modal)."""

    S2 = "S2"
    S1 = "S1"
    MM = "MM"

    def __repr__(self) -> str:  # messages quote the name users write, not the enum
        return repr(self.value)


MODALITIES: tuple[Modality, ...] = tuple(Modality)
# The modalities of one sensor each, in record order (MM reads all of them), with their bands in
# archive order (the order of statistics files and reports).
SENSOR_BANDS = MappingProxyType({Modality.S2: S2_BAND_NAMES, Modality.S1: S1_BAND_NAMES})
SENSORS: tuple[Modality, ...] = tuple(SENSOR_BANDS)


@dataclass(frozen=True)
class Input:
    """One array of a patch as records store it and models read it (channels last)."""

    key: str
    bands: tuple[str, ...]
    size: int  # pixels per side
    dtype: str  # little-endian, as stored
    modality: Modality  # S2 or S1


S1_INPUT = "bands_s1"
INPUTS = MappingProxyType(
    {
        spec.key: spec
        for spec in (
            Input("bands_10m", BANDS_10M, GROUP_SIZES["10m"], "<u2", Modality.S2),
            Input("bands_20m", BANDS_20M, GROUP_SIZES["20m"], "<u2", Modality.S2),
            Input("bands_60m", BANDS_60M, GROUP_SIZES["60m"], "<u2", Modality.S2),
            Input(S1_INPUT, S1_BAND_NAMES, PATCH_SIZE, "<f4", Modality.S1),
        )
    }
)
S2_INPUTS: tuple[str, ...] = tuple(key for key, spec in INPUTS.items() if spec.modality == Modality.S2)


def parse_modality(value: object) -> Modality:
    """`value` as a Modality; ConfigError (a UserError) naming it and the choices otherwise."""
    try:
        return Modality(value)  # type: ignore[arg-type]  # any JSON value; ValueError if not a name
    except ValueError:
        raise ConfigError(f"unknown modality {value!r}; expected one of {', '.join(MODALITIES)}") from None


def sensors_of(modality: Modality) -> tuple[Modality, ...]:
    """The sensors a modality reads: itself, or every sensor for MM."""
    return SENSORS if modality == Modality.MM else (modality,)


def modality_of_sensors(sensors: Iterable[str]) -> Modality | None:
    """The modality that reads exactly these sensors (None for none)."""
    given = set(sensors)
    present = [sensor for sensor in SENSORS if sensor in given]
    if not present:
        return None
    return present[0] if len(present) == 1 else Modality.MM


def modality_inputs(modality: Modality) -> tuple[str, ...]:
    """The record inputs of a modality, in record order (MM: the S2 inputs, then S1)."""
    return tuple(key for key, spec in INPUTS.items() if modality == Modality.MM or spec.modality == modality)


def modality_of(keys: Iterable[str]) -> Modality:
    """The modality of a model reading `keys`: S1 for the S1 input alone, MM for it and others, else S2."""
    keys = tuple(keys)
    has_s1 = S1_INPUT in keys
    has_s2 = any(key != S1_INPUT for key in keys)
    return Modality.MM if has_s1 and has_s2 else Modality.S1 if has_s1 else Modality.S2


def label_names_key(label_type: LabelType) -> str:
    """The record key of a label type's class names, e.g. `BigEarthNet-19_labels` (the 2019 names)."""
    return f"{label_type}_labels"


def label_key(label_type: LabelType) -> str:
    """The record key of a label type's multi-hot vector, e.g. `BigEarthNet-19_labels_multi_hot`."""
    return f"{label_names_key(label_type)}_multi_hot"
