"""The layout of the data (`layout.py`): modalities parsed once, the one table of inputs, label keys."""

from __future__ import annotations

import pytest

from bigearthnet_tf.constants import BANDS_10M, BANDS_20M, BANDS_60M, S1_BAND_NAMES, LabelType
from bigearthnet_tf.errors import ConfigError
from bigearthnet_tf.layout import (
    INPUTS,
    S1_INPUT,
    S2_INPUTS,
    SENSORS,
    Modality,
    label_key,
    label_names_key,
    modality_inputs,
    modality_of,
    modality_of_sensors,
    parse_modality,
    sensors_of,
)


def test_a_modality_is_parsed_once_and_compares_equal_to_its_name():
    assert parse_modality("MM") is Modality.MM and parse_modality(Modality.S1) is Modality.S1
    assert Modality.S2 == "S2" and f"{Modality.S2}" == "S2" and repr(Modality.S2) == "'S2'"
    for bad in ("s2", "S3", None, 2):
        with pytest.raises(ConfigError, match=f"unknown modality {bad!r}; expected one of S2, S1, MM"):
            parse_modality(bad)


def test_the_one_table_of_inputs():
    assert [(spec.key, spec.bands, spec.size, spec.dtype) for spec in INPUTS.values()] == [
        ("bands_10m", BANDS_10M, 120, "<u2"),
        ("bands_20m", BANDS_20M, 60, "<u2"),
        ("bands_60m", BANDS_60M, 20, "<u2"),
        (S1_INPUT, S1_BAND_NAMES, 120, "<f4"),
    ]
    assert S2_INPUTS == ("bands_10m", "bands_20m", "bands_60m")
    assert len(BANDS_10M + BANDS_20M + BANDS_60M) == 12


def test_inputs_and_sensors_of_each_modality_in_record_order():
    assert modality_inputs(Modality.S2) == S2_INPUTS
    assert modality_inputs(Modality.S1) == (S1_INPUT,)
    assert modality_inputs(Modality.MM) == (*S2_INPUTS, S1_INPUT)
    assert SENSORS == (Modality.S2, Modality.S1)
    assert sensors_of(Modality.MM) == SENSORS and sensors_of(Modality.S1) == (Modality.S1,)
    for modality in Modality:
        assert modality_of(modality_inputs(modality)) is modality
        assert modality_of_sensors(sensors_of(modality)) is modality
    assert modality_of_sensors([]) is None


def test_label_keys_are_the_2019_names():
    assert label_names_key(LabelType.ORIGINAL) == "original_labels"
    assert label_key(LabelType.BIGEARTHNET_19) == "BigEarthNet-19_labels_multi_hot"
