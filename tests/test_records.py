"""records.py: hand-encoded tf.train.Example and TFRecord framing, checked against TensorFlow itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tifffile

from bigearthnet_tf import record_formats, records
from bigearthnet_tf.archive import Patch, open_archive
from bigearthnet_tf.constants import (
    BANDS_10M,
    BANDS_20M,
    BANDS_60M,
    BIGEARTHNET_19_LABELS,
    ORIGINAL_LABELS,
    S2_BAND_NAMES,
    original_to_19,
)

EXAMPLE_PATCH = "S2A_MSIL2A_20170613T101031_87_48"
EXAMPLE_LABELS = (
    "Non-irrigated arable land",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
)


def tf_int64_feature(values) -> bytes:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values])).SerializeToString()


@pytest.fixture(scope="module")
def example_patches(example_paths) -> list[Patch]:
    archive = open_archive(example_paths.s2, s1_root=example_paths.s1)
    names = sorted(path.name for path in example_paths.s2.iterdir())
    return [archive.read_patch(name) for name in names]


def geotiff(folder: Path, name: str, band: str) -> np.ndarray:
    return tifffile.imread(folder / name / f"{name}_{band}.tif")


# --- wire-format primitives ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.array([0, 1, 127, 128, 16383, 16384, 65535], dtype=np.uint16),  # every varint length of uint16
        np.array([5, 100, 127], dtype=np.uint16),  # one byte each
        np.array([128, 3000, 16383], dtype=np.uint16),  # two bytes each
        np.array([7, 3000, 8, 128], dtype=np.uint16),  # one and two bytes mixed
        np.random.default_rng(0).integers(0, 65536, 20_000).astype(np.uint16),
        np.array([0, -1, 1, 2**31, 2**62, -(2**63), 2**63 - 1], dtype=np.int64),  # negatives take 10 bytes
        np.random.default_rng(1).integers(-(2**63), 2**63 - 1, 500, dtype=np.int64),
        np.array([], dtype=np.int64),
    ],
)
def test_int64_feature_is_byte_identical_to_tensorflow(values):
    assert records.int64_feature(values) == tf_int64_feature(values)


def test_float_and_bytes_features_are_byte_identical_to_tensorflow():
    floats = np.array([0.0, -1.5, 3.25e-7, np.float32(-30.123)], dtype=np.float32)
    expected_float = tf.train.Feature(
        float_list=tf.train.FloatList(value=floats.tolist())
    ).SerializeToString()
    assert records.float_feature(floats) == expected_float
    strings = ["Pastures", "", "ümlaut"]
    expected_bytes = tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[s.encode() for s in strings])
    ).SerializeToString()
    assert records.bytes_list(strings) == expected_bytes
    assert records.bytes_list([]) == tf.train.Feature(bytes_list=tf.train.BytesList()).SerializeToString()


def test_encode_example_parses_with_tensorflow():
    serialized = records.encode_example(
        [("a", records.int64_feature([1, 2])), ("b", records.bytes_list([b"\x00\xff"]))]
    )
    example = tf.train.Example.FromString(serialized)
    assert list(example.features.feature["a"].int64_list.value) == [1, 2]
    assert list(example.features.feature["b"].bytes_list.value) == [b"\x00\xff"]
    assert sorted(example.features.feature) == ["a", "b"]


def test_multi_hot_rejects_unknown_names():
    assert records.multi_hot(["Pastures", "Peatbogs"], ORIGINAL_LABELS).tolist() == [
        1 if name in ("Pastures", "Peatbogs") else 0 for name in ORIGINAL_LABELS
    ]
    with pytest.raises(ValueError, match="unknown label 'Lava'"):
        records.multi_hot(["Lava"], BIGEARTHNET_19_LABELS)


# --- the two schemas on the six real patches --------------------------------------------------------


def default_spec(with_43: bool = True) -> dict:
    spec = {
        "format_version": tf.io.FixedLenFeature([1], tf.int64),
        "patch_name": tf.io.FixedLenFeature([], tf.string),
        "bands_10m": tf.io.FixedLenFeature([], tf.string),
        "bands_20m": tf.io.FixedLenFeature([], tf.string),
        "bands_60m": tf.io.FixedLenFeature([], tf.string),
        "BigEarthNet-19_labels": tf.io.VarLenFeature(tf.string),
        "BigEarthNet-19_labels_multi_hot": tf.io.FixedLenFeature([19], tf.int64),
    }
    if with_43:
        spec["original_labels"] = tf.io.VarLenFeature(tf.string)
        spec["original_labels_multi_hot"] = tf.io.FixedLenFeature([43], tf.int64)
    return spec


def expected_multi_hot(names, classes) -> list[int]:
    return [1 if name in names else 0 for name in classes]


def test_default_schema_round_trips_the_real_patches(example_paths, example_patches):
    assert len(example_patches) == 6
    for patch in example_patches:
        parsed = tf.io.parse_single_example(record_formats.DEFAULT.encode(patch), default_spec())
        assert int(parsed["format_version"][0]) == record_formats.FORMAT_VERSION
        assert parsed["patch_name"].numpy().decode() == patch.name
        for key, bands, size in (
            ("bands_10m", BANDS_10M, 120),
            ("bands_20m", BANDS_20M, 60),
            ("bands_60m", BANDS_60M, 20),
        ):
            pixels = tf.reshape(tf.io.decode_raw(parsed[key], tf.uint16), (size, size, len(bands))).numpy()
            for channel, band in enumerate(bands):
                np.testing.assert_array_equal(
                    pixels[..., channel], geotiff(example_paths.s2, patch.name, band)
                )
        labels_43 = [v.decode() for v in tf.sparse.to_dense(parsed["original_labels"]).numpy()]
        labels_19 = [v.decode() for v in tf.sparse.to_dense(parsed["BigEarthNet-19_labels"]).numpy()]
        assert tuple(labels_43) == patch.labels_43
        assert tuple(labels_19) == original_to_19(labels_43)
        assert parsed["original_labels_multi_hot"].numpy().tolist() == expected_multi_hot(
            labels_43, ORIGINAL_LABELS
        )
        assert parsed["BigEarthNet-19_labels_multi_hot"].numpy().tolist() == expected_multi_hot(
            labels_19, BIGEARTHNET_19_LABELS
        )
        # Sentinel-1 keys appear only when the patch has S1 bands.
        without_s1 = record_formats.DEFAULT.encode(_without_s1(patch))
        assert "bands_s1" not in tf.train.Example.FromString(without_s1).features.feature


def test_known_patch_labels(example_patches):
    patch = next(p for p in example_patches if p.name == EXAMPLE_PATCH)
    example = tf.train.Example.FromString(record_formats.LEGACY.encode(patch)).features.feature
    assert [v.decode() for v in example["original_labels"].bytes_list.value] == list(EXAMPLE_LABELS)
    assert list(example["original_labels_multi_hot"].int64_list.value) == [
        1 if i in (11, 20) else 0 for i in range(43)
    ]
    assert [v.decode() for v in example["BigEarthNet-19_labels"].bytes_list.value] == [
        "Arable land",
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    ]
    assert list(example["BigEarthNet-19_labels_multi_hot"].int64_list.value) == [
        1 if i in (2, 6) else 0 for i in range(19)
    ]


def legacy_spec_2019() -> dict:
    """The feature spec the 2019 reading code used (int64 band lists, both label pairs)."""
    spec = {
        name: tf.io.FixedLenFeature(
            [{"B01": 400, "B09": 400}.get(name, 14_400 if name in BANDS_10M else 3_600)], tf.int64
        )
        for name in S2_BAND_NAMES
    }
    spec.update(
        {
            "original_labels": tf.io.VarLenFeature(tf.string),
            "original_labels_multi_hot": tf.io.FixedLenFeature([43], tf.int64),
            "BigEarthNet-19_labels": tf.io.VarLenFeature(tf.string),
            "BigEarthNet-19_labels_multi_hot": tf.io.FixedLenFeature([19], tf.int64),
            "patch_name": tf.io.VarLenFeature(tf.string),
        }
    )
    return spec


def test_legacy_schema_round_trips_the_real_patches(example_paths, example_patches):
    for patch in example_patches:
        plain = _without_s1(patch)
        serialized = record_formats.LEGACY.encode(plain)
        keys = set(tf.train.Example.FromString(serialized).features.feature)
        assert keys == {
            *S2_BAND_NAMES,
            "original_labels",
            "original_labels_multi_hot",
            "BigEarthNet-19_labels",
            "BigEarthNet-19_labels_multi_hot",
            "patch_name",
        }
        parsed = tf.io.parse_single_example(serialized, legacy_spec_2019())
        for band in S2_BAND_NAMES:
            tiff = geotiff(example_paths.s2, patch.name, band)
            np.testing.assert_array_equal(parsed[band].numpy().reshape(tiff.shape), tiff)
        assert tf.sparse.to_dense(parsed["patch_name"]).numpy().tolist() == [patch.name.encode()]
        labels_43 = [v.decode() for v in tf.sparse.to_dense(parsed["original_labels"]).numpy()]
        assert tuple(labels_43) == patch.labels_43
        assert parsed["original_labels_multi_hot"].numpy().tolist() == expected_multi_hot(
            labels_43, ORIGINAL_LABELS
        )
        assert parsed["BigEarthNet-19_labels_multi_hot"].numpy().tolist() == expected_multi_hot(
            original_to_19(labels_43), BIGEARTHNET_19_LABELS
        )


def test_sentinel1_keys_in_both_schemas(example_paths, example_patches):
    for patch in example_patches:
        assert patch.s1_name is not None
        folder = example_paths.s1 / patch.s1_name
        vv = tifffile.imread(folder / f"{patch.s1_name}_VV.tif")
        vh = tifffile.imread(folder / f"{patch.s1_name}_VH.tif")
        assert not np.array_equal(vv, vh)

        default = tf.train.Example.FromString(record_formats.DEFAULT.encode(patch)).features.feature
        bands_s1 = np.frombuffer(default["bands_s1"].bytes_list.value[0], dtype="<f4").reshape(120, 120, 2)
        np.testing.assert_array_equal(bands_s1[..., 0], vv)
        np.testing.assert_array_equal(bands_s1[..., 1], vh)
        assert default["patch_name_s1"].bytes_list.value[0].decode() == patch.s1_name

        legacy = tf.io.parse_single_example(
            record_formats.LEGACY.encode(patch),
            {
                "VV": tf.io.FixedLenFeature([14_400], tf.float32),
                "VH": tf.io.FixedLenFeature([14_400], tf.float32),
                "patch_name_s1": tf.io.FixedLenFeature([], tf.string),
                "patch_name_s2": tf.io.FixedLenFeature([], tf.string),
                "B02": tf.io.FixedLenFeature([14_400], tf.int64),
            },
        )
        np.testing.assert_array_equal(legacy["VV"].numpy().reshape(120, 120), vv)
        np.testing.assert_array_equal(legacy["VH"].numpy().reshape(120, 120), vh)
        assert legacy["patch_name_s1"].numpy().decode() == patch.s1_name
        assert legacy["patch_name_s2"].numpy().decode() == patch.name


def test_v2_patches_have_no_original_label_keys(example_patches):
    patch = example_patches[0]
    v2 = Patch(
        name="S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57",
        bands=patch.bands,
        labels_43=None,
        labels_19=("Pastures",),
    )
    for encode in (record_formats.DEFAULT.encode, record_formats.LEGACY.encode):
        features = tf.train.Example.FromString(encode(v2)).features.feature
        assert "original_labels" not in features and "original_labels_multi_hot" not in features
        assert [v.decode() for v in features["BigEarthNet-19_labels"].bytes_list.value] == ["Pastures"]
        assert list(features["BigEarthNet-19_labels_multi_hot"].int64_list.value) == expected_multi_hot(
            ["Pastures"], BIGEARTHNET_19_LABELS
        )


def test_encoding_is_deterministic(example_patches):
    for patch in example_patches:
        assert record_formats.DEFAULT.encode(patch) == record_formats.DEFAULT.encode(patch)
        assert record_formats.LEGACY.encode(patch) == record_formats.LEGACY.encode(patch)


def _without_s1(patch: Patch) -> Patch:
    return Patch(patch.name, patch.bands, patch.labels_43, patch.labels_19)


# --- TFRecord framing ------------------------------------------------------------------------------


def test_framing_is_byte_identical_to_tf_record_writer(tmp_path, example_patches):
    payloads = [record_formats.DEFAULT.encode(patch) for patch in example_patches] + [b"", b"x" * 300]
    ours = tmp_path / "ours.tfrecord"
    with records.RecordWriter(ours) as writer:
        for payload in payloads:
            writer.write(payload)
    assert writer.count == len(payloads)
    theirs = tmp_path / "theirs.tfrecord"
    with tf.io.TFRecordWriter(str(theirs)) as tf_writer:
        for payload in payloads:
            tf_writer.write(payload)
    assert ours.read_bytes() == theirs.read_bytes()
    read_back = [r.numpy() for r in tf.data.TFRecordDataset(str(ours))]
    assert read_back == payloads


def test_corrupted_payload_fails_the_crc_check(tmp_path):
    path = tmp_path / "one.tfrecord"
    with records.RecordWriter(path) as writer:
        writer.write(b"payload bytes")
    data = bytearray(path.read_bytes())
    data[12 + 3] ^= 0x01  # a payload byte (after the 8-byte length and its 4-byte CRC)
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(path)))


def test_records_module_does_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, bigearthnet_tf.records, bigearthnet_tf.prepare; "
        "sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
