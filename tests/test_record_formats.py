"""Record formats (`record_formats.py`): what each format stores, how its files are named and found,
and the manifest of a prepared set. The bytes of records are checked with TensorFlow in test_records."""

from __future__ import annotations

import glob
import json

import pytest

from bigearthnet_tf.constants import LabelType
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.record_formats import (
    DEFAULT,
    FORMATS,
    LEGACY,
    MANIFEST_NAME,
    Encoding,
    format_of,
    parse_record_format,
    read_manifest,
)


def test_formats_by_name():
    assert list(FORMATS) == ["default", "legacy"]
    assert parse_record_format("legacy") is LEGACY and parse_record_format(DEFAULT) is DEFAULT
    with pytest.raises(UserError, match="unknown record format 'tfrecord'; expected one of default, legacy"):
        parse_record_format("tfrecord")


def test_shards_and_parts_are_named_and_found_by_the_format(tmp_path):
    assert DEFAULT.unit_patches(512) == 512 and LEGACY.unit_patches(None) == LEGACY.part_size
    assert DEFAULT.unit_files("train", 2) == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    assert DEFAULT.split_files("train", 2) == tuple(DEFAULT.unit_files("train", 2))
    assert LEGACY.unit_files("val", 2) == ["val.part-00000", "val.part-00001"]
    assert LEGACY.split_files("val", 2) == ("val.tfrecord",)
    for name in (
        "train-00000-of-00002.tfrecord",
        "train-00011-of-00012.tfrecord",
        "train.tfrecord",
        "x.tfrecord",
    ):
        (tmp_path / name).touch()
    found = sorted(p.rsplit("/", 1)[-1] for p in glob.glob(str(tmp_path / DEFAULT.file_glob("train"))))
    assert found == ["train-00000-of-00002.tfrecord", "train-00011-of-00012.tfrecord"]
    assert glob.glob(str(tmp_path / LEGACY.file_glob("train"))) == [str(tmp_path / "train.tfrecord")]


def test_what_each_format_stores_for_each_modality():
    assert [(s.key, s.shape, s.encoding, s.nbytes) for s in DEFAULT.stored_keys(Modality.S2)] == [
        ("bands_10m", (120, 120, 4), Encoding.RAW, 115200),
        ("bands_20m", (60, 60, 6), Encoding.RAW, 43200),
        ("bands_60m", (20, 20, 2), Encoding.RAW, 1600),
    ]
    legacy = {s.key: (s.shape, s.encoding) for s in LEGACY.stored_keys(Modality.MM)}
    assert legacy["B01"] == ((20, 20), Encoding.INT64_LIST) and legacy["VH"] == (
        (120, 120),
        Encoding.FLOAT_LIST,
    )
    assert len(legacy) == 14
    assert DEFAULT.bands(Modality.S1) == {"bands_s1": ["VV", "VH"]}
    assert LEGACY.shapes(Modality.S2)["B08"] == [120, 120]


def test_a_record_is_recognised_by_its_keys():
    assert format_of({"format_version", "bands_10m"}) is DEFAULT
    assert format_of({"B01", "B02", "patch_name"}) is LEGACY
    assert format_of({"VV", "VH"}) is LEGACY  # a 2021 Sentinel-1-only file
    assert format_of({"image", "label"}) is None


def _manifest(**changes) -> dict:
    document = {
        "format": "default",
        "format_version": 1,
        "label_types": ["BigEarthNet-19"],
        "modalities": ["S2", "S1"],
        "splits": {"train": {"files": ["train-00000-of-00001.tfrecord"], "patches": 2}},
    }
    document.update(changes)
    return document


def test_the_manifest_is_read_into_enums_with_record_sizes(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "train-00000-of-00001.tfrecord").write_bytes(bytes(1000))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(_manifest()))
    manifest = read_manifest(tmp_path)
    assert manifest.format is DEFAULT
    assert manifest.label_types == {LabelType.BIGEARTHNET_19}
    assert manifest.modalities == {Modality.S2, Modality.S1}
    assert all(isinstance(value, Modality) for value in manifest.modalities)
    assert manifest.splits == {"train": ("train-00000-of-00001.tfrecord",)} and manifest.patches == {
        "train": 2
    }
    assert manifest.record_bytes == {"train-00000-of-00001.tfrecord": 500}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "tfds"}, "key 'format' is missing or malformed"),
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"label_types": ["BigEarthNet-43"]}, "key 'label_types' is missing or malformed"),
        ({"modalities": ["S3"]}, "key 'modalities' is missing or malformed"),
        ({"splits": {"train": {"files": "a", "patches": 1}}}, r"key 'splits\.train\.files'"),
        ({"splits": {"train": {"files": [], "patches": -1}}}, r"key 'splits\.train\.patches'"),
    ],
)
def test_a_manifest_this_version_did_not_write_is_refused_by_key(tmp_path, changes, message):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(_manifest(**changes)))
    with pytest.raises(UserError, match=f"dataset manifest .*{MANIFEST_NAME}: .*{message}"):
        read_manifest(tmp_path)
