"""Tests of the input pipeline on records built here with TensorFlow's own tf.train.Example API.

The records follow the schemas of docs/ARCHITECTURE.md and BIGEARTHNET.md section 3 independently of
records.py, so these tests also pin the format that the encoder must write.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bigearthnet_tf import constants
from bigearthnet_tf import input_pipeline as ip
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import MODALITIES, S2_INPUTS, modality_inputs

ORIGINAL, BEN19 = constants.ORIGINAL, constants.BIGEARTHNET_19
VV_VALUE, VH_VALUE = -11.5, -23.25  # distinct constants: a swap of VV and VH cannot go unnoticed


# ------------------------------------------------------------------------------------------------
# Building records with tf.train.Example
# ------------------------------------------------------------------------------------------------


def _bytes_feature(*values: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _int_feature(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in np.ravel(values)]))


def _float_feature(values) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(values).tolist()))


def make_patch(index: int, seed: int = 0, s1_constant: bool = False) -> dict:
    """A random patch: 12 uint16 bands at native size, VV/VH float32, 43- and 19-class multi-hots.

    The 43-class labels always include class ``index % 43`` so labels differ from patch to patch.
    """
    rng = np.random.default_rng([seed, index])
    bands = {
        band.name: rng.integers(0, 20000, size=(band.size, band.size), dtype=np.uint16)
        for band in constants.S2_BANDS
    }
    if s1_constant:
        vv = np.full((120, 120), VV_VALUE, np.float32)
        vh = np.full((120, 120), VH_VALUE, np.float32)
    else:
        vv = rng.normal(-12, 5, size=(120, 120)).astype(np.float32)
        vh = rng.normal(-19, 5, size=(120, 120)).astype(np.float32)
    original = np.zeros(43, np.int64)
    original[index % 43] = 1
    original[rng.integers(0, 43)] = 1
    ben19 = np.zeros(19, np.int64)
    for source in np.flatnonzero(original):
        if source in constants.ORIGINAL_TO_19:
            ben19[constants.ORIGINAL_TO_19[source]] = 1
    return {
        "name": f"S2A_MSIL2A_20170613T101031_{index}_{seed}",
        "bands": bands,
        "VV": vv,
        "VH": vh,
        ORIGINAL: original,
        BEN19: ben19,
    }


def _label_features(patch: dict, label_types) -> dict[str, tf.train.Feature]:
    features = {}
    for label_type in label_types:
        names = constants.class_names(label_type)
        hot = patch[label_type]
        features[f"{label_type}_labels"] = _bytes_feature(*(names[i].encode() for i in np.flatnonzero(hot)))
        features[f"{label_type}_labels_multi_hot"] = _int_feature(hot)
    return features


def group(patch: dict, names) -> np.ndarray:
    """The expected channels-last group, in the documented channel order."""
    return np.stack([patch["bands"][name] for name in names], axis=-1)


def default_example(patch: dict, label_types=(ORIGINAL, BEN19), s1: bool = False) -> bytes:
    """The default format (format_version 1): raw little-endian bytes per resolution group."""
    features = {
        "format_version": _int_feature([1]),
        "patch_name": _bytes_feature(patch["name"].encode()),
        "bands_10m": _bytes_feature(group(patch, constants.BANDS_10M).astype("<u2").tobytes()),
        "bands_20m": _bytes_feature(group(patch, constants.BANDS_20M).astype("<u2").tobytes()),
        "bands_60m": _bytes_feature(group(patch, constants.BANDS_60M).astype("<u2").tobytes()),
        **_label_features(patch, label_types),
    }
    if s1:
        features["bands_s1"] = _bytes_feature(
            np.stack([patch["VV"], patch["VH"]], -1).astype("<f4").tobytes()
        )
        features["patch_name_s1"] = _bytes_feature(b"S1_" + patch["name"].encode())
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def legacy_example(
    patch: dict, label_types=(ORIGINAL, BEN19), s1: bool = False, multimodal_names=False
) -> bytes:
    """The 2019 schema: one int64 list per band; the 2021 multimodal variant adds float VV/VH lists."""
    features = {name: _int_feature(values) for name, values in patch["bands"].items()}
    features.update(_label_features(patch, label_types))
    if multimodal_names:  # the 2021 multimodal script named the patch patch_name_s2 (and _s1)
        features["patch_name_s2"] = _bytes_feature(patch["name"].encode())
        features["patch_name_s1"] = _bytes_feature(b"S1_" + patch["name"].encode())
    else:
        features["patch_name"] = _bytes_feature(patch["name"].encode())
    if s1:
        features["VV"] = _float_feature(patch["VV"])
        features["VH"] = _float_feature(patch["VH"])
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_records(path: Path, records) -> str:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def collect(dataset: tf.data.Dataset) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All batches concatenated: inputs by key, labels."""
    inputs, labels = {}, []
    for batch_inputs, batch_labels in dataset.as_numpy_iterator():
        for key, value in batch_inputs.items():
            inputs.setdefault(key, []).append(value)
        labels.append(batch_labels)
    return {key: np.concatenate(parts) for key, parts in inputs.items()}, np.concatenate(labels)


def names_of(dataset: tf.data.Dataset) -> list[str]:
    return [name.decode() for inputs, _ in dataset.as_numpy_iterator() for name in inputs["patch_name"]]


@pytest.fixture(scope="module")
def patches() -> list[dict]:
    return [make_patch(i) for i in range(6)]


@pytest.fixture(scope="module")
def sharded_set(tmp_path_factory) -> tuple[str, list[str]]:
    """Four default-format S2 files of 5, 5, 5 and 4 patches; returns (folder, patch names)."""
    folder = tmp_path_factory.mktemp("sharded")
    patches = [make_patch(i, seed=1) for i in range(19)]
    for shard in range(4):
        part = patches[shard * 5 : shard * 5 + 5]
        write_records(folder / f"train-{shard:05d}-of-00004.tfrecord", [default_example(p) for p in part])
    return str(folder), [p["name"] for p in patches]


# ------------------------------------------------------------------------------------------------
# Decoding: exact values, both formats, all modalities
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["default", "legacy"])
def test_decoding_gives_the_encoded_arrays_exactly(tmp_path, patches, kind):
    encode = default_example if kind == "default" else legacy_example
    path = write_records(tmp_path / "set.tfrecord", [encode(p, s1=True) for p in patches])
    assert ip.detect_format(path).format.name == kind

    for label_type in (ORIGINAL, BEN19):
        ds = ip.make_dataset(path, label_type, batch_size=4, modality="MM", with_names=True)
        inputs, labels = collect(ds)
        assert set(inputs) == {"bands_10m", "bands_20m", "bands_60m", "bands_s1", "patch_name"}
        assert [n.decode() for n in inputs["patch_name"]] == [p["name"] for p in patches]
        for key in ("bands_10m", "bands_20m", "bands_60m", "bands_s1"):
            assert inputs[key].dtype == np.float32
        np.testing.assert_array_equal(
            inputs["bands_10m"], np.stack([group(p, constants.BANDS_10M) for p in patches])
        )
        np.testing.assert_array_equal(
            inputs["bands_20m"], np.stack([group(p, constants.BANDS_20M) for p in patches])
        )
        np.testing.assert_array_equal(
            inputs["bands_60m"], np.stack([group(p, constants.BANDS_60M) for p in patches])
        )
        np.testing.assert_array_equal(
            inputs["bands_s1"], np.stack([np.stack([p["VV"], p["VH"]], -1) for p in patches])
        )
        assert labels.dtype == np.float32
        np.testing.assert_array_equal(labels, np.stack([p[label_type] for p in patches]).astype(np.float32))


def test_parse_batch_is_the_same_eagerly_and_inside_map(patches):
    serialized = tf.constant([default_example(p, s1=True) for p in patches[:3]])
    parse = dict(kind="default", label_type=BEN19, modality="MM", name_key="patch_name")
    eager_inputs, eager_labels = ip.parse_batch(serialized, **parse)
    ds = tf.data.Dataset.from_tensors(serialized).map(lambda s: ip.parse_batch(s, **parse))
    mapped_inputs, mapped_labels = next(iter(ds))
    for key in eager_inputs:
        np.testing.assert_array_equal(eager_inputs[key].numpy(), mapped_inputs[key].numpy())
    np.testing.assert_array_equal(eager_labels.numpy(), mapped_labels.numpy())
    # without a label type: inputs alone (prediction)
    assert set(ip.parse_batch(serialized, kind="default", label_type=None)) == set(S2_INPUTS)


@pytest.mark.parametrize("kind", ["default", "legacy"])
def test_modalities_give_the_model_keys_and_never_swap_vv_and_vh(tmp_path, kind):
    patches = [make_patch(i, s1_constant=True) for i in range(3)]
    encode = default_example if kind == "default" else legacy_example
    path = write_records(tmp_path / "s1.tfrecord", [encode(p, s1=True) for p in patches])
    for modality in MODALITIES:
        keys = modality_inputs(modality)
        inputs, _ = collect(ip.make_dataset(path, BEN19, 2, modality=modality))
        assert tuple(inputs) == keys
    inputs, _ = collect(ip.make_dataset(path, BEN19, 3, modality="S1"))
    assert inputs["bands_s1"].shape == (3, 120, 120, 2)
    assert np.all(inputs["bands_s1"][..., 0] == VV_VALUE)
    assert np.all(inputs["bands_s1"][..., 1] == VH_VALUE)


def test_without_label_type_only_inputs_are_yielded(sharded_set):
    folder, names = sharded_set
    batches = list(ip.make_dataset(folder, None, 8, with_names=True).as_numpy_iterator())
    assert all(isinstance(batch, dict) for batch in batches)
    assert set(batches[0]) == {*S2_INPUTS, "patch_name"}
    assert sorted(n.decode() for batch in batches for n in batch["patch_name"]) == sorted(names)


def test_2021_multimodal_files_name_patches_by_patch_name_s2(tmp_path, patches):
    records = [legacy_example(p, s1=True, multimodal_names=True) for p in patches[:3]]
    path = write_records(tmp_path / "mm.tfrecord", records)
    ds = ip.make_dataset(path, ORIGINAL, 3, modality="MM", with_names=True)
    assert names_of(ds) == [p["name"] for p in patches[:3]]


# ------------------------------------------------------------------------------------------------
# Clear errors for what a file does not have
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has, lacks", [(BEN19, ORIGINAL), (ORIGINAL, BEN19)])
def test_2019_single_label_set_files(tmp_path, patches, has, lacks):
    path = write_records(
        tmp_path / "train.tfrecord", [legacy_example(p, label_types=(has,)) for p in patches]
    )
    _, labels = collect(ip.make_dataset(path, has, 4))
    np.testing.assert_array_equal(labels, np.stack([p[has] for p in patches]))
    with pytest.raises(
        UserError, match=rf"label_type '{lacks}' needs {lacks}_labels_multi_hot, which .*train\.tfrecord"
    ):
        ip.make_dataset(path, lacks, 4)


def test_v2_records_without_original_labels_refuse_label_type_original(tmp_path, patches):
    path = write_records(
        tmp_path / "v2.tfrecord", [default_example(p, label_types=(BEN19,)) for p in patches]
    )
    with pytest.raises(UserError, match=r"original_labels_multi_hot, which .*v2\.tfrecord .*v2"):
        ip.make_dataset(path, ORIGINAL, 4)
    assert ip.detect_format(path).label_types == {BEN19}


def test_missing_modality_and_bad_arguments_are_clear_errors(tmp_path, patches):
    path = write_records(tmp_path / "s2.tfrecord", [default_example(p) for p in patches[:2]])
    with pytest.raises(UserError, match=r"modality 'S1' needs bands_s1, which .*s2\.tfrecord"):
        ip.make_dataset(path, BEN19, 2, modality="S1")
    with pytest.raises(UserError, match=r"modality 'MM' needs bands_s1"):
        ip.make_dataset(path, BEN19, 2, modality="MM")
    with pytest.raises(UserError, match=r"unknown modality 'S3'"):
        ip.make_dataset(path, BEN19, 2, modality="S3")
    with pytest.raises(UserError, match=r"unknown label_type 'CLC'"):
        ip.make_dataset(path, "CLC", 2)
    with pytest.raises(UserError, match=r"batch_size must be an integer >= 1, got 0"):
        ip.make_dataset(path, BEN19, 0)


def test_mixed_formats_and_foreign_records_are_refused(tmp_path, patches):
    default = write_records(tmp_path / "a.tfrecord", [default_example(patches[0])])
    legacy = write_records(tmp_path / "b.tfrecord", [legacy_example(patches[0])])
    with pytest.raises(UserError, match=r"b\.tfrecord is in the legacy format but .*a\.tfrecord"):
        ip.detect_format([default, legacy])
    other = tf.train.Example(features=tf.train.Features(feature={"image": _bytes_feature(b"x")}))
    foreign = write_records(tmp_path / "c.tfrecord", [other.SerializeToString()])
    with pytest.raises(UserError, match=r"c\.tfrecord: not a BigEarthNet record .*keys: image"):
        ip.detect_format(foreign)


# ------------------------------------------------------------------------------------------------
# Order: batching, shuffling, epochs, resume
# ------------------------------------------------------------------------------------------------


def test_batches_and_drop_remainder(sharded_set):
    folder, names = sharded_set
    sizes = [len(y) for _, y in ip.make_dataset(folder, BEN19, 5).as_numpy_iterator()]
    assert sizes == [5, 5, 5, 4]
    sizes = [len(y) for _, y in ip.make_dataset(folder, BEN19, 5, drop_remainder=True, epochs=2)]
    assert sizes == [5] * 7  # 38 records: batches span epochs, only the last partial one is dropped
    no_shuffle = names_of(ip.make_dataset(folder, BEN19, 4, with_names=True))
    assert sorted(no_shuffle) == sorted(names)


def test_names_stay_aligned_with_labels(sharded_set):
    folder, _ = sharded_set
    ds = ip.make_dataset(folder, ORIGINAL, 4, shuffle_buffer=50, with_names=True)
    seen = 0
    for inputs, labels in ds.as_numpy_iterator():
        for name, label in zip(inputs["patch_name"], labels, strict=True):
            index = int(name.decode().split("_")[-2])
            np.testing.assert_array_equal(label, make_patch(index, seed=1)[ORIGINAL])
            seen += 1
    assert seen == 19


def test_seeded_shuffle_is_repeatable_and_reshuffles_every_epoch(sharded_set):
    folder, names = sharded_set

    def stream(seed):
        return names_of(
            ip.make_dataset(folder, BEN19, 4, shuffle_buffer=8, epochs=3, seed=seed, with_names=True)
        )

    first = stream(42)
    assert first == stream(42)
    assert first != stream(43)
    epochs = [first[i * 19 : (i + 1) * 19] for i in range(3)]
    assert all(sorted(epoch) == sorted(names) for epoch in epochs)  # each epoch is the whole set once
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != names


@pytest.mark.parametrize("global_seed", [0, 1234])
def test_order_ignores_the_global_tensorflow_seed(sharded_set, global_seed):
    """A config with seed 0 seeds TensorFlow globally with 0; the order is (seed, epoch)'s alone."""
    folder, _ = sharded_set
    options = dict(shuffle_buffer=8, epochs=2, seed=5, with_names=True)
    unseeded = names_of(ip.make_dataset(folder, BEN19, 4, **options))
    tf.random.set_seed(global_seed)
    try:
        assert names_of(ip.make_dataset(folder, BEN19, 4, **options)) == unseeded
    finally:
        tf.random.set_seed(None)


def test_training_fraction_is_a_seeded_subset_the_same_every_epoch(sharded_set):
    folder, names = sharded_set  # 19 records in several files

    def stream(seed, **options):
        return names_of(ip.make_dataset(folder, BEN19, 4, fraction=0.5, seed=seed, with_names=True, **options))

    subset = stream(3)
    assert len(subset) == ip.subset_size(19, 0.5) == 10 and len(set(subset)) == 10
    assert set(subset) <= set(names)
    assert subset == stream(3) and set(subset) != set(stream(4))
    shuffled = stream(3, shuffle_buffer=8, epochs=3)
    epochs = [shuffled[i * 10 : (i + 1) * 10] for i in range(3)]
    assert all(sorted(epoch) == sorted(subset) for epoch in epochs)  # the same records, reshuffled
    assert epochs[0] != epochs[1]
    resumed = names_of(
        ip.make_dataset(
            folder, BEN19, 4, fraction=0.5, seed=3, with_names=True, shuffle_buffer=8, epochs=3, skip_batches=4
        )
    )
    assert resumed == shuffled[16:]
    # Two pipelines split the same subset between them.
    halves = [
        names_of(
            ip.make_dataset(
                folder, BEN19, 4, fraction=0.5, seed=3, with_names=True,
                input_context=tf.distribute.InputContext(2, index, 2),
            )
        )
        for index in range(2)
    ]
    assert sorted(halves[0] + halves[1]) == sorted(subset)
    assert ip.subset_size(19, 0.01) == 1 and ip.subset_size(1000, 0.01) == 10


@pytest.mark.parametrize("skip_batches", [3, 5, 11])
def test_skip_batches_continues_the_uninterrupted_order(sharded_set, skip_batches):
    folder, _ = sharded_set
    options = dict(shuffle_buffer=6, epochs=3, seed=7, with_names=True)
    full = names_of(ip.make_dataset(folder, BEN19, 4, **options))
    resumed = names_of(ip.make_dataset(folder, BEN19, 4, skip_batches=skip_batches, **options))
    assert resumed == full[skip_batches * 4 :]


def test_shuffle_buffer_is_capped_by_the_memory_budget(sharded_set, caplog):
    folder, _ = sharded_set
    record_bytes = ip.detect_format(folder).record_bytes
    assert 160_000 < record_bytes < 162_000  # the documented default-format S2 record size
    assert ip.effective_shuffle_buffer(130_000, record_bytes, 1024) == 1024 * 2**20 // record_bytes
    assert ip.effective_shuffle_buffer(100, record_bytes, 1024) == 100
    assert ip.effective_shuffle_buffer(0, record_bytes, 1024) == 0
    assert ip.effective_shuffle_buffer(130_000, record_bytes, 0.1) == 1
    with caplog.at_level(logging.INFO, logger=ip.__name__):
        ip.make_dataset(folder, BEN19, 4, shuffle_buffer=130_000, shuffle_memory_mb=1)
    assert "130000 records asked, 6 used" in caplog.text


def test_resume_position():
    assert ip.resume_position(0, 500, 1000) == (0, 0)
    assert ip.resume_position(5, 500, 1000) == (2, 500)
    assert ip.resume_position(3, 4, 19) == (0, 12)


# ------------------------------------------------------------------------------------------------
# Files: globs, counting, distribution
# ------------------------------------------------------------------------------------------------


def test_globs_folders_and_missing_files(sharded_set, tmp_path):
    folder, _ = sharded_set
    assert len(ip.list_files(folder)) == 4
    assert ip.list_files(os.path.join(folder, "train-0000[01]-*.tfrecord")) == ip.list_files(folder)[:2]
    assert ip.list_files([os.path.join(folder, "*.tfrecord"), ip.list_files(folder)[0]]) == ip.list_files(
        folder
    )
    assert ip.count_records(os.path.join(folder, "*.tfrecord")) == 19
    with pytest.raises(UserError, match=r"no TFRecord files match '.*nothing-\*\.tfrecord'"):
        ip.list_files(os.path.join(folder, "nothing-*.tfrecord"))
    with pytest.raises(UserError, match=r"TFRecord file .*absent\.tfrecord does not exist"):
        ip.make_dataset(str(tmp_path / "absent.tfrecord"), BEN19, 2)


def test_shard_policy():
    assert ip.shard_policy(1, 1) == "none"
    assert ip.shard_policy(4, 2) == "file"
    assert ip.shard_policy(9, 2) == "file"
    assert ip.shard_policy(3, 2) == "record"
    assert ip.shard_policy(1, 2) == "record"


@pytest.mark.parametrize("pipelines, policy", [(2, "file"), (3, "record")])
def test_pipelines_split_the_data_without_overlap(sharded_set, pipelines, policy):
    folder, names = sharded_set
    assert ip.shard_policy(4, pipelines) == policy
    seen = []
    for pipeline in range(pipelines):
        context = tf.distribute.InputContext(pipelines, pipeline, num_replicas_in_sync=pipelines)
        ds = ip.make_dataset(folder, BEN19, 6, shuffle_buffer=10, with_names=True, input_context=context)
        batches = list(ds.as_numpy_iterator())
        assert max(len(labels) for _, labels in batches) == 6 // pipelines  # per-replica batch
        seen += [name.decode() for inputs, _ in batches for name in inputs["patch_name"]]
    assert sorted(seen) == sorted(names)


# ------------------------------------------------------------------------------------------------
# Corrupt files
# ------------------------------------------------------------------------------------------------


def _corrupt_copy(source: str, target: Path, record: int, truncate: bool = False) -> str:
    """Copy ``source``, flipping a byte in the payload of ``record`` (or cutting the file inside it)."""
    data = bytearray(Path(source).read_bytes())
    offset = 0
    for _ in range(record):
        offset += 16 + int.from_bytes(data[offset : offset + 8], "little")
    if truncate:
        data = data[: offset + 100]
    else:
        data[offset + 12 + 1000] ^= 0xFF  # inside the payload: the data checksum no longer matches
    target.write_bytes(bytes(data))
    return str(target)


def test_corrupt_record_is_a_user_error_naming_the_file(sharded_set, tmp_path):
    folder, _ = sharded_set
    good = ip.list_files(folder)
    bad = _corrupt_copy(good[1], tmp_path / "bad-00001.tfrecord", record=3)
    ds = ip.make_dataset([good[0], bad, good[2]], BEN19, 4, shuffle_buffer=10)
    with pytest.raises(UserError, match=r"corrupt or truncated TFRecord file .*bad-00001\.tfrecord"):
        with ip.corrupt_files_as_user_errors():
            collect(ds)
    # Without the wrapper, the tf error still names the file.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"bad-00001\.tfrecord"):
        collect(ds)


def test_truncated_file_is_a_user_error_naming_the_file(sharded_set, tmp_path):
    folder, _ = sharded_set
    cut = _corrupt_copy(ip.list_files(folder)[0], tmp_path / "cut.tfrecord", record=4, truncate=True)
    with pytest.raises(UserError, match=r"corrupt or truncated TFRecord file .*cut\.tfrecord"):
        with ip.corrupt_files_as_user_errors():
            collect(ip.make_dataset(cut, BEN19, 2))
    with pytest.raises(UserError, match=r"cut\.tfrecord: truncated record at byte"):
        ip.count_records(cut)
    assert ip.count_records(cut, skip_corrupt=True) == 5


def test_skip_corrupt_skips_and_counts(sharded_set, tmp_path):
    folder, names = sharded_set
    good = ip.list_files(folder)
    bad = _corrupt_copy(good[1], tmp_path / "bad.tfrecord", record=3)  # records 3 and 4 are lost
    counter = ip.CorruptRecordCounter()
    ds = ip.make_dataset(
        [good[0], bad, *good[2:]],
        BEN19,
        4,
        epochs=2,
        with_names=True,
        skip_corrupt=True,
        corrupt_counter=counter,
    )
    delivered = names_of(ds)
    assert len(delivered) == 2 * 17
    assert names[8] not in delivered and names[9] not in delivered and names[7] in delivered
    assert counter.result() == {"records": 4, "files": 2}  # two records per epoch, one file per epoch


def test_skip_corrupt_counts_a_truncated_file(sharded_set, tmp_path):
    folder, _ = sharded_set
    cut = _corrupt_copy(ip.list_files(folder)[0], tmp_path / "cut.tfrecord", record=4, truncate=True)
    counter = ip.CorruptRecordCounter()
    ds = ip.make_dataset(cut, BEN19, 3, skip_corrupt=True, corrupt_counter=counter)
    assert sum(len(labels) for _, labels in ds.as_numpy_iterator()) == 4
    assert counter.result() == {"records": 1, "files": 1}


def test_corrupt_first_record_is_caught_before_reading(sharded_set, tmp_path):
    folder, _ = sharded_set
    bad = _corrupt_copy(ip.list_files(folder)[0], tmp_path / "head.tfrecord", record=0)
    with pytest.raises(
        UserError, match=r"corrupt or truncated TFRecord file .*head\.tfrecord: bad data checksum"
    ):
        ip.make_dataset(bad, BEN19, 2)


# --- a prepared set's manifest ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_v2(synthetic_v2, tmp_path_factory) -> Path:
    from bigearthnet_tf.prepare import prepare

    out = tmp_path_factory.mktemp("prepared_v2")
    prepare(synthetic_v2, out, official_splits=True, workers=1, shard_size=8, show_progress=False)
    return out


def test_files_a_manifest_lists_are_described_by_it_without_reading_them(prepared_v2, monkeypatch):
    files = sorted(str(path) for path in prepared_v2.glob("train-*.tfrecord"))
    with monkeypatch.context() as without_manifest:
        without_manifest.setattr(ip, "read_manifest", lambda folder: None)
        peeked = ip.detect_format(files)  # what the records themselves say
    assert peeked.format.name == "default" and peeked.label_types == {BEN19} and peeked.modalities == {"S2"}

    def no_reading(*args, **kwargs):
        raise AssertionError("a record was read although the manifest describes the file")

    monkeypatch.setattr(ip, "read_frames", no_reading)
    found = ip.detect_format(files, BEN19, "S2", with_names=True)
    assert (found.format, found.label_types, found.modalities) == (
        peeked.format,
        peeked.label_types,
        peeked.modalities,
    )
    assert found.name_key == peeked.name_key == "patch_name"
    assert 0.9 * peeked.record_bytes < found.record_bytes < 1.1 * peeked.record_bytes  # a mean, not the first
    with pytest.raises(UserError, match="label_type 'original' needs original_labels_multi_hot"):
        ip.detect_format(files, ORIGINAL)  # v2 has no 43-class labels, and the manifest says so


def test_files_a_manifest_does_not_list_are_read(prepared_v2, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copied.tfrecord"
    shutil.copy(next(prepared_v2.glob("train-*.tfrecord")), copy)
    shutil.copy(prepared_v2 / "dataset.json", tmp_path / "dataset.json")
    read = []
    real = ip.read_frames
    monkeypatch.setattr(
        ip, "read_frames", lambda *args, **kwargs: read.append(args[0]) or real(*args, **kwargs)
    )
    assert ip.detect_format(str(copy)).format.name == "default" and read == [str(copy)]


def test_a_malformed_manifest_is_a_user_error_naming_it_and_the_key(prepared_v2, tmp_path):
    import json
    import shutil

    for path in prepared_v2.iterdir():
        shutil.copy(path, tmp_path / path.name)
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    manifest["modalities"] = ["S3"]
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(
        UserError, match=r"dataset manifest .*dataset\.json: key 'modalities' is missing or malformed"
    ):
        ip.detect_format(str(tmp_path / "train-*.tfrecord"))
