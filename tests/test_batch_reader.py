"""The BatchReader route of the input pipeline: the same batches as TensorFlow's reader, bit for bit,
and the same checks (checksums, framing, payload sizes, labels), each a one-line error naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bigearthnet_tf import batch_reader, records
from bigearthnet_tf import input_pipeline as ip
from bigearthnet_tf.constants import BIGEARTHNET_19
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.record_formats import DEFAULT, LEGACY
from tests.helpers import make_patches, write_records


@pytest.fixture(scope="module")
def mm_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("batch_reader")
    patches = make_patches(21, seed=5, with_s1=True)
    return [str(write_records(folder / f"mm-{i}.tfrecord", patches[i::3])) for i in range(3)]


def _batches(files, modality, **options):
    dataset = ip.make_dataset(files, BIGEARTHNET_19, 4, modality=modality, with_names=True, **options)
    return list(dataset.as_numpy_iterator())


@pytest.mark.parametrize("modality", [Modality.S2, Modality.S1, Modality.MM])
@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_the_same_batches_as_tensorflows_reader(mm_files, modality, shuffle_buffer):
    options = dict(shuffle_buffer=shuffle_buffer, epochs=2, seed=3)
    ours = _batches(mm_files, modality, **options)
    tensorflow = _batches(mm_files, modality, skip_corrupt=True, **options)  # the TFRecordDataset route
    assert len(ours) == len(tensorflow) == 11  # 42 records in batches of 4
    for (inputs, labels), (expected, expected_labels) in zip(ours, tensorflow, strict=True):
        assert inputs.keys() == expected.keys()
        for key, values in expected.items():
            assert inputs[key].dtype == values.dtype
            np.testing.assert_array_equal(inputs[key], values)
        np.testing.assert_array_equal(labels, expected_labels)


def test_native_dtype_holds_the_same_values(mm_files):
    native = _batches(mm_files, Modality.MM, native_dtype=True)
    converted = _batches(mm_files, Modality.MM)
    for (inputs, _), (expected, _) in zip(native, converted, strict=True):
        assert inputs["bands_10m"].dtype == np.uint16 and inputs["bands_s1"].dtype == np.float32
        for key in ("bands_10m", "bands_20m", "bands_60m", "bands_s1"):
            np.testing.assert_array_equal(inputs[key].astype(np.float32), expected[key])
    tensorflow_route = _batches(mm_files, Modality.MM, native_dtype=True, skip_corrupt=True)
    np.testing.assert_array_equal(tensorflow_route[0][0]["bands_20m"], native[0][0]["bands_20m"])


def test_the_2019_schema_keeps_tensorflows_reader(mm_files, tmp_path):
    legacy = write_records(tmp_path / "legacy.tfrecord", make_patches(3, seed=1), encode=LEGACY.encode)
    assert not batch_reader.reads_raw(LEGACY, Modality.S2) and batch_reader.reads_raw(DEFAULT, Modality.MM)
    inputs, _ = _batches([str(legacy)], Modality.S2)[0]
    assert inputs["bands_10m"].shape == (3, 120, 120, 4)


def test_example_values_are_views_of_the_record():
    patch = make_patches(1, seed=2)[0]
    data = DEFAULT.encode(patch)
    values = records.example_values(data)
    parsed = tf.train.Example.FromString(data).features.feature
    assert set(values) == set(parsed)
    kind, raw = values["bands_20m"]
    assert kind == 1 and bytes(raw) == parsed["bands_20m"].bytes_list.value[0]
    assert raw.obj is data  # a view, not a copy
    assert values["format_version"][0] == 3 and bytes(values["patch_name"][1]) == patch.name.encode()
    with pytest.raises(ValueError, match="ends early"):
        records.example_values(data[:-50])
    with pytest.raises(ValueError, match="not an Example"):
        records.example_values(b"\x12\x00")


def test_frame_index_lists_the_frames_before_a_break(tmp_path):
    path = write_records(tmp_path / "f.tfrecord", make_patches(4, seed=3))
    offsets, lengths, broken = records.frame_index(path)
    framed = [offset for offset, _ in records.read_frames(path, with_data=False)]
    assert broken is None and list(offsets) == [offset + records.FRAME_HEADER_BYTES for offset in framed]
    data = path.read_bytes()
    assert [len(d) for _, d in records.read_frames(path, with_data=True)] == list(lengths)
    (tmp_path / "cut.tfrecord").write_bytes(data[: framed[2] + 30])
    cut_offsets, _, cut_at = records.frame_index(tmp_path / "cut.tfrecord")
    assert len(cut_offsets) == 2 and cut_at == framed[2]


def _rewrite(source: str, target: Path, change) -> str:
    """A copy of `source` whose second record is replaced by `change(record)`, framed afresh."""
    frames = [data for _, data in records.read_frames(source, with_data=True)]
    frames[1] = change(frames[1])
    with records.RecordWriter(target) as writer:
        for data in frames:
            writer.write(data)
    return str(target)


def _read_all(files, modality=Modality.S2):
    with ip.corrupt_files_as_user_errors():
        return _batches(files, modality)


def test_a_payload_of_the_wrong_size_names_the_file_and_the_patch(tmp_path):
    patch = make_patches(1, seed=9)[0]
    source = write_records(tmp_path / "one.tfrecord", [patch, patch])
    short = _rewrite_field(patch, "bands_20m", lambda raw: raw[:-2])  # valid checksums, 2 bytes short
    path = _rewrite(str(source), tmp_path / "payload.tfrecord", lambda _: short)
    with pytest.raises(
        UserError,
        match=r"payload\.tfrecord: the record of patch S2A_TEST_9_0 .*bands_20m holds 43198 bytes, "
        r"expected 43200",
    ):
        _read_all([path])


def _rewrite_field(patch, key: str, change) -> bytes:
    """The patch's record with one raw field's bytes changed (encoded afresh, so checksums hold)."""
    from bigearthnet_tf.records import encode_example

    data = DEFAULT.encode(patch)
    parsed = tf.train.Example.FromString(data).features.feature
    features = []
    for name, feature in parsed.items():
        if name == key:
            feature = tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[change(feature.bytes_list.value[0])])
            )
        features.append((name, feature.SerializeToString()))
    return encode_example(features)


@pytest.mark.parametrize(
    "values",
    [[200] * 19, [200] + [0] * 17],  # 38 bytes; 19 bytes of which one is not a one-byte varint (18 values)
)
def test_labels_that_are_not_multi_hot_name_the_file(tmp_path, values):
    patch = make_patches(1, seed=4)[0]
    source = write_records(tmp_path / "labels.tfrecord", [patch, patch])
    data = DEFAULT.encode(patch)
    parsed = tf.train.Example.FromString(data).features.feature
    from bigearthnet_tf.records import encode_example

    key = f"{BIGEARTHNET_19}_labels_multi_hot"
    features = [
        (
            name,
            (
                tf.train.Feature(int64_list=tf.train.Int64List(value=values)) if name == key else f
            ).SerializeToString(),
        )
        for name, f in parsed.items()
    ]
    path = _rewrite(str(source), tmp_path / "bad-labels.tfrecord", lambda _: encode_example(features))
    with pytest.raises(
        UserError, match=r"bad-labels\.tfrecord: patch S2A_TEST_4_0: .*expected 19 values of 0 or 1"
    ):
        _read_all([path])


def test_a_file_that_shrinks_after_its_index_is_read(tmp_path):
    path = write_records(tmp_path / "shrinks.tfrecord", make_patches(3, seed=6))
    reader = batch_reader.BatchReader(
        [str(path)], DEFAULT, Modality.S2, BIGEARTHNET_19, "patch_name", with_names=False
    )
    offsets, lengths = reader.index(np.int64(0))
    data = path.read_bytes()
    path.write_bytes(data[: int(offsets[2]) + 10])
    ids = np.zeros(3, np.int64)
    with pytest.raises(
        ValueError,
        match=r"\[corrupt or truncated TFRecord file:\] \[.*shrinks\.tfrecord\] \[readable bytes:\] \[\d+\]",
    ):
        reader.read(ids, offsets, lengths)
    first_two = reader.read(ids[:2], offsets[:2], lengths[:2])
    assert (
        first_two[0].shape == (2, 120, 120, 4)
        and first_two[0].ctypes.data % batch_reader.TENSOR_ALIGNMENT == 0
    )


def test_open_files_stay_bounded(mm_files, monkeypatch):
    monkeypatch.setattr(batch_reader, "MAX_OPEN_FILES", 2)
    reader = batch_reader.BatchReader(mm_files, DEFAULT, Modality.S1, None, "patch_name", with_names=True)
    for file_index in (0, 1, 2, 0):
        offsets, lengths = reader.index(np.int64(file_index))
        (s1, names) = reader.read(np.full(len(offsets), file_index), offsets, lengths)
        assert s1.shape == (7, 120, 120, 2) and len(reader._files) <= 2
    assert names[0] == b"S2A_TEST_5_0"
    reader.close()
    assert not reader._files


def test_batch_memory_is_used_again_only_once_nothing_refers_to_it(mm_files):
    reader = batch_reader.BatchReader(mm_files, DEFAULT, Modality.S1, None, "patch_name", with_names=False)
    offsets, lengths = reader.index(np.int64(0))
    files = np.zeros(len(offsets), np.int64)
    first = reader.read(files, offsets, lengths)[0]
    kept = first.copy()
    view = first[2:, 10:20]  # a view outlives the array it was taken from
    del first
    for _ in range(3):
        second = reader.read(files[::-1].copy(), offsets[::-1].copy(), lengths[::-1].copy())[0]
        np.testing.assert_array_equal(view, kept[2:, 10:20])  # never written over
        np.testing.assert_array_equal(second, kept[::-1])
        assert second.ctypes.data % batch_reader.TENSOR_ALIGNMENT == 0
    del view, second
    pooled = {
        buffer.ctypes.data + (-buffer.ctypes.data % batch_reader.TENSOR_ALIGNMENT)
        for buffers in reader._arrays._buffers.values()
        for buffer in buffers
    }
    # Nothing refers to those buffers any more: the next batch is written into one of them.
    third = reader.read(files, offsets, lengths)[0]
    assert third.ctypes.data in pooled
    np.testing.assert_array_equal(third, kept)


def test_batches_held_by_tensorflow_are_not_written_over(mm_files):
    dataset = ip.make_dataset(mm_files, BIGEARTHNET_19, 4, modality=Modality.MM, epochs=3, shuffle_buffer=0)
    held = list(dataset)  # tensors made from the batch arrays without a copy, all alive at once
    again = list(dataset.as_numpy_iterator())
    assert len(held) == len(again) == 16
    for (inputs, labels), (expected, expected_labels) in zip(held, again, strict=True):
        for key, values in expected.items():
            np.testing.assert_array_equal(inputs[key].numpy(), values)
        np.testing.assert_array_equal(labels.numpy(), expected_labels)


# A script that ends while an iterator of the BatchReader route is live: tf.data's threads keep
# calling into Python, and a thread that does so once the interpreter is finalizing is ended by
# Python, leaving the pipeline waiting for its call at exit. Reads made slow (a slow disk) keep a
# call in flight when the script ends; without `batch_reader._Calls.quiesce` the exit hangs.
_EXIT_WITH_A_LIVE_ITERATOR = """
import sys, time
from bigearthnet_tf import batch_reader
from bigearthnet_tf.input_pipeline import make_dataset
read = batch_reader.BatchReader._read
def slow_read(self, *arguments):
    time.sleep(0.05)
    return read(self, *arguments)
batch_reader.BatchReader._read = slow_read
batches = iter(make_dataset(sys.argv[1:], "BigEarthNet-19", 2, modality="MM", epochs=None))
next(batches)
print("read", flush=True)
"""


@pytest.mark.slow
def test_a_script_ending_with_a_live_iterator_exits(mm_files):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _EXIT_WITH_A_LIVE_ITERATOR, *mm_files],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert (run.returncode, run.stdout) == (0, "read\n"), run.stderr[-2000:]
