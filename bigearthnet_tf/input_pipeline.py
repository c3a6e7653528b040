"""TFRecords (our default format, our legacy format, and files written by the 2019 scripts) -> batches.

Pure functions do one thing each and work eagerly as well as inside ``Dataset.map``:

- :func:`list_files` expands globs and folders; :func:`detect_format` takes what a prepared set's
  manifest (``dataset.json``) says of the files it lists and peeks at the first record of any other,
  and checks up front that each has the keys the chosen label type, modality and options need.
- :func:`feature_spec`, :func:`decode_bands`, :func:`decode_labels` and :func:`parse_batch` turn a
  *batch* of serialized ``tf.train.Example`` into ``(inputs, labels)``: one ``tf.io.parse_example`` per
  batch (parsing batched records is several times faster than one ``parse_single_example`` per record),
  then ``decode_raw`` + ``reshape`` per resolution group for the default format, or reshape + stack of the
  2019 per-band int64 lists into the same groups for the legacy format.

:func:`make_dataset` assembles them in a fixed order (see its body): list files, shard (distribution),
then per epoch: shuffle file order, interleave-read with per-file verification, shard by record, shuffle
records; then repeat epochs, skip (resume), batch, parse/decode, prefetch.

Records whose inputs are raw buffers (the default format) take a faster route with the same order,
batches and checks: the steps above move only where each record is (file index, data offset, data
length, from each file's frame headers), and a :class:`~bigearthnet_tf.batch_reader.BatchReader` reads
and decodes each batch in one call (see its module). The 2019 schema, and any read with
``skip_corrupt``, go through ``TFRecordDataset`` and ``parse_batch``.

Output: ``inputs`` is exactly the model input dict of the modality (``bands_10m`` (120, 120, 4),
``bands_20m`` (60, 60, 6), ``bands_60m`` (20, 20, 2) for S2; ``bands_s1`` (120, 120, 2) = VV, VH for S1;
all four for MM), raw values as float32 (or, with ``native_dtype``, raw buffers in their stored dtype:
uint16 for S2); ``labels`` is float32 multi-hot (batch, classes).
``with_names=True`` adds ``inputs["patch_name"]`` (a string tensor, aligned with the labels).

Shuffle memory
--------------
The 2019 code shuffled 130,000 serialized records (about 20 GB for Sentinel-2). Here the record shuffle
buffer holds serialized records too (the smallest form: decoded float32 is 2-4 times larger), but its
size is capped: ``effective = min(shuffle_buffer, shuffle_memory_mb / record size)`` (record size is
measured on the first record of the files), see :func:`effective_shuffle_buffer`. The buffer never holds
more than one epoch of one pipeline, because records are shuffled before epochs are repeated. The capped
buffer is logged at INFO level when it is smaller than the one asked for. Randomness lost to the cap is
recovered at file level: the file order is shuffled again every epoch and records are interleaved from
up to ``cycle_length`` files at a time, so with the sharded default format a batch mixes patches from
across the whole split. A single big file (the 2019 layout) only gets the record buffer: raise
``shuffle_memory_mb`` or re-prepare in the sharded default format for a better shuffle. Besides the
buffer, each open file holds a read buffer (1 MiB) and one verification chunk (16 records), so reading
costs ~``cycle_length`` x 3.5 MiB. Measured (2,000 default-format records, batch 100, 2 epochs, peak RSS
above the process before iterating): no shuffle +219 MiB; ``shuffle_buffer=130_000`` with a 64 MiB budget
(418 records) +338 MiB; with the default 1 GiB budget the whole 306 MiB set fits and costs +787 MiB
(the allocator keeps freed record memory, so allow up to about twice the budget).

Determinism and resuming
------------------------
Each epoch's file order and record order are stateless permutations (``tf.random.experimental.
stateless_shuffle``) seeded from ``(seed, epoch)`` only, so the order of epoch ``e`` does not depend on the
epochs before it, nor on a global ``tf.random.set_seed``. Records are permuted in consecutive blocks of the
buffer size (the same memory as ``Dataset.shuffle``'s buffer), after interleaving several files.
To resume mid-training, build the dataset again with ``skip_batches=n`` (the number of batches already
consumed by this pipeline, e.g. the iteration counter): whole epochs before the resume point are not
read at all (their size comes from :func:`count_records`), and the records of the partial epoch are read
but not parsed. The continuation is identical to the uninterrupted stream from batch ``n`` on. (``ds.skip
(n)`` gives the same batches, but reads and parses everything before them.) With ``skip_corrupt`` and a
corrupt file the epoch size used for the jump counts the unreadable records too, so the resumed order is
then only approximately the same.

Corrupt files
-------------
Every file is read through a check that the bytes of the records delivered add up to the file's size.
TensorFlow stops reading a file at its first bad CRC or truncated record and raises a ``DataLossError``
that does not say which file; here the read is made to end quietly at that point and the check then fails
naming the file. By default that is an error (``tf.errors.InvalidArgumentError`` raised while iterating;
wrap the loop in :func:`corrupt_files_as_user_errors` to turn it into a one-line :class:`UserError`).
With ``skip_corrupt=True`` the unreadable rest of the file is skipped, a warning line names the file and
the number of records skipped (counted with a framing scan made up front), and an optional
:class:`CorruptRecordCounter` adds them up. Records after a bad one in the same file are skipped too:
TensorFlow's reader cannot resynchronise inside a file.

Distribution
------------
With ``input_context`` (``tf.distribute.InputContext``, as given to ``distribute_datasets_from_function``)
``batch_size`` stays the global batch and each pipeline batches its per-replica share. Pipelines shard by
file when there are enough files (:func:`shard_policy`), otherwise they all read every file and keep every
n-th record of the same seeded order. ``tf.data``'s own auto-sharding is switched off for such datasets.
A dataset built without ``input_context`` also works with ``strategy.experimental_distribute_dataset``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from bigearthnet_tf import constants
from bigearthnet_tf.batch_reader import BAD_RECORD_TAG, CORRUPT_TAG, PAYLOAD_TAG, BatchReader, reads_raw
from bigearthnet_tf.constants import LabelType
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import (
    INPUTS,
    SENSORS,
    Modality,
    label_key,
    modality_inputs,
    parse_modality,
    sensors_of,
)
from bigearthnet_tf.record_formats import (
    FORMAT_VERSION_KEY,
    NAME_KEYS,
    PATCH_NAME,
    Encoding,
    Manifest,
    RecordFormat,
    Stored,
    format_of,
    parse_record_format,
    read_manifest,
)
from bigearthnet_tf.records import count_frames, read_frames

logger = logging.getLogger(__name__)


DEFAULT_SHUFFLE_MEMORY_MB = 1024  # cap of the record shuffle buffer; about 6,500 default-format S2 records
DEFAULT_CYCLE_LENGTH = 16  # files read at once: mixes files, bounds open files and read buffers
READ_BUFFER_BYTES = 1 << 20  # per open file; records are ~160 KB, so this saves syscalls
VERIFY_CHUNK_RECORDS = 16  # records per size check: cheap in CPU, ~2.5 MB held per open file
TFRECORD_OVERHEAD_BYTES = 16  # per record: uint64 length, masked CRC of it, masked CRC of the data
MIN_FILES_PER_PIPELINE = 4  # below this, sharding by file leaves pipelines badly unbalanced

# What parse_example says when a list of a record (a band of the 2019 schema) has the wrong length.
_LIST_LENGTH_PATTERN = re.compile(
    r"Key: (?P<key>[^,]+), Index: \d+\.\s+Number of (?P<kind>\w+) values != expected\.\s+"
    r"Values size: (?P<got>\d+) but output shape: \[(?P<shape>[\d, ]*)\]"
)
_PAYLOAD_PATTERN = re.compile(
    r"\[" + re.escape(PAYLOAD_TAG) + r"\] \[(?P<path>.*?)\] \[patch\] \[(?P<patch>.*?)\] \[(?P<key>\w+)\] "
    r"\[holds\] \[(?P<bytes>\d+)\] \[bytes, expected\] \[(?P<expected>\d+)\]"
)
_BAD_RECORD_PATTERN = re.compile(
    r"\[" + re.escape(BAD_RECORD_TAG) + r"\] \[(?P<path>.*?)\] \[(?P<what>.*?)\]"
)
_CORRUPT_PATTERN = re.compile(
    r"\[" + re.escape(CORRUPT_TAG) + r"\] \[(?P<path>.*?)\] \[readable bytes:\] \[(?P<read>\d+)\] "
    r"\[of\] \[(?P<size>\d+)\]"
)


# --------------------------------------------------------------------------------------------------
# Files: listing, framing, format detection
# --------------------------------------------------------------------------------------------------


def list_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand globs and folders (``<dir>/*.tfrecord``) into a sorted list of distinct files.

    Sorting makes the list, and so sharding and the seeded order, independent of the file system.
    """
    entries = [files] if isinstance(files, str | os.PathLike) else list(files)
    if not entries:
        raise UserError("no TFRecord files given")
    found: set[str] = set()
    for entry in entries:
        entry = os.fspath(entry)
        if os.path.isdir(entry):
            matches = glob.glob(os.path.join(glob.escape(entry), "*.tfrecord"))
            if not matches:
                raise UserError(f"folder {entry} holds no *.tfrecord files")
        elif glob.has_magic(entry):
            matches = [path for path in glob.glob(entry) if os.path.isfile(path)]
            if not matches:
                raise UserError(f"no TFRecord files match {entry!r}")
        elif os.path.isfile(entry):
            matches = [entry]
        else:
            raise UserError(f"TFRecord file {entry} does not exist")
        found.update(matches)
    return sorted(found)


def _count_file(path: str, skip_corrupt: bool) -> int:
    count, broken = count_frames(path)
    if broken is not None and not skip_corrupt:
        raise UserError(f"corrupt or truncated TFRecord file {path}: {broken}")
    return count


def count_records(
    files: str | os.PathLike | Sequence[str | os.PathLike], *, skip_corrupt: bool = False
) -> int:
    """Number of records in the files, from a scan of the record headers (no payload is read).

    Broken framing (truncation, bad length checksum) raises a :class:`UserError` naming the file; with
    ``skip_corrupt`` the records up to and including the broken one are counted instead.
    """
    return sum(_count_file(path, skip_corrupt) for path in list_files(files))


def manifest_shortfalls(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """What the record files lack of the splits their manifests describe, one sentence per split.

    For every split of a `dataset.json` that at least one of `files` belongs to: the records these
    files hold against the patches the manifest promises, and the split's files not among them (not
    given, or gone). Empty when every such split is whole, so a reader can say how much it used of
    what was promised instead of quietly reading a part.
    """
    manifests: dict[str, Manifest | None] = {}
    counted: dict[tuple[Path, str], int] = {}
    given: set[str] = set()
    for path in list_files(files):
        folder, name = os.path.split(os.path.abspath(path))
        given.add(os.path.join(folder, name))
        if folder not in manifests:
            manifests[folder] = read_manifest(folder)
        manifest = manifests[folder]
        for split, names in manifest.splits.items() if manifest is not None else ():
            if name in names:
                key = (manifest.path, split)
                counted[key] = counted.get(key, 0) + _count_file(path, True)
    shortfalls = []
    for (manifest_path, split), records in counted.items():
        manifest = manifests[str(manifest_path.parent)]
        absent = [name for name in manifest.splits[split] if str(manifest_path.parent / name) not in given]
        if records == manifest.patches[split] and not absent:
            continue
        missing = f"; its files not read: {', '.join(absent[:3])}" if absent else ""
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        shortfalls.append(
            f"{records:,} records of the {manifest.patches[split]:,} that {manifest_path} lists for split "
            f"{split!r}{missing}{more}"
        )
    return shortfalls


@dataclass(frozen=True)
class RecordFiles:
    """What the first records of a set of files hold (see :func:`detect_format`)."""

    format: RecordFormat
    label_types: frozenset[str]  # label types whose multi-hot key every file has
    modalities: frozenset[str]  # the sensors (layout.SENSORS) whose pixel keys every file has
    name_key: str | None  # "patch_name", or "patch_name_s2" in 2021 multimodal files
    record_bytes: int  # largest first record seen, to size the shuffle buffer
    files: tuple[str, ...]  # the files examined


def _first_example(path: str, skip_corrupt: bool) -> tf.train.Example | None:
    try:
        first = next(read_frames(path, with_data=True), None)
    except ValueError as error:
        if skip_corrupt:
            return None
        raise UserError(f"corrupt or truncated TFRecord file {path}: {error}") from None
    if first is None:
        return None  # an empty file (a shard that received no patch) is fine
    try:
        return tf.train.Example.FromString(first[1])
    except Exception as error:  # protobuf's DecodeError; the exact type depends on the backend
        raise UserError(f"{path}: the first record is not a tf.train.Example ({error})") from None


def _list_length(feature: tf.train.Feature) -> tuple[str | None, int]:
    kind = feature.WhichOneof("kind")
    if kind is None:
        return None, 0
    return kind, len(getattr(feature, kind).value)


def _file_format(path: str, example: tf.train.Example, record_bytes: int) -> RecordFiles:
    """Classify one record and check the shapes of what it holds, so mistakes surface before training."""
    features = example.features.feature

    def check(key: str, kind: str, length: int, nbytes: int | None = None) -> bool:
        if key not in features:
            return False
        found_kind, found_length = _list_length(features[key])
        if found_kind != kind or found_length != length:
            raise UserError(
                f"{path}: key {key!r} holds {found_length} x {found_kind}, expected {length} x {kind}"
            )
        if nbytes is not None and len(features[key].bytes_list.value[0]) != nbytes:
            raise UserError(
                f"{path}: key {key!r} holds {len(features[key].bytes_list.value[0])} bytes, expected {nbytes}"
            )
        return True

    def check_stored(stored: Stored) -> bool:
        if stored.encoding is Encoding.RAW:
            return check(stored.key, "bytes_list", 1, stored.nbytes)
        return check(stored.key, stored.encoding.value, stored.values)

    fmt = format_of(features)
    if fmt is None:
        raise UserError(
            f"{path}: not a BigEarthNet record (neither format_version nor per-band keys such as B02); "
            f"keys: {', '.join(sorted(features)) or 'none'}"
        )
    if fmt.format_version is not None:
        check(FORMAT_VERSION_KEY, "int64_list", 1)
        version = features[FORMAT_VERSION_KEY].int64_list.value[0]
        if version != fmt.format_version:
            raise UserError(
                f"{path}: format_version {version} is not supported by this version of bigearthnet-tf "
                f"(supported: {fmt.format_version}); upgrade it or re-prepare"
            )
    modalities = {
        modality
        for modality in SENSORS
        if all([check_stored(stored) for stored in fmt.stored_keys(modality)])
    }
    label_types = {
        label_type
        for label_type, names in constants.LABEL_TYPES.items()
        if check(label_key(label_type), "int64_list", len(names))
    }
    name_key = next((key for key in NAME_KEYS if key in features), None)
    return RecordFiles(fmt, frozenset(label_types), frozenset(modalities), name_key, record_bytes, (path,))


def _missing_label_message(label_type: LabelType, path: str, present: frozenset[str]) -> str:
    key = label_key(label_type)
    has = ", ".join(label_key(name) for name in sorted(present)) or "no label set"
    if label_type == constants.ORIGINAL:
        hint = (
            "a BigEarthNet v2 or BigEarthNet-19 file? v2 has no 43-class labels; "
            f"use label_type {constants.BIGEARTHNET_19!r}"
        )
    else:
        hint = f"a 2019 file written for the 43 original labels? use label_type {constants.ORIGINAL!r}"
    return f"label_type {label_type!r} needs {key}, which {path} does not have (it has {has}; {hint})"


def _missing_modality_message(modality: Modality, needs: Modality, path: str, fmt: RecordFormat) -> str:
    keys = [stored.key for stored in fmt.stored_keys(needs)]
    if len(keys) > 3:
        keys = sorted(keys)
        described = f"{keys[0]} ... {keys[-1]}"
    else:
        described = " and ".join(keys) if len(keys) == 2 else ", ".join(keys)
    if needs == Modality.S1:
        hint = "prepared without Sentinel-1 (--s1-root)? use modality 'S2'"
    else:
        hint = "a Sentinel-1-only file? use modality 'S1'"
    return f"modality {modality!r} needs {described}, which {path} does not have ({hint})"


def detect_format(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    label_type: LabelType | None = None,
    modality: Modality | None = None,
    *,
    with_names: bool = False,
    skip_corrupt: bool = False,
) -> RecordFiles:
    """Format, label sets and modalities of the files; check requirements.

    A file that a prepared set's manifest (`dataset.json` beside it) lists is described by the
    manifest; any other is read: the first record is classified and its shapes are checked.
    Given ``label_type``, ``modality`` or ``with_names``, every file must have the keys they need, or a
    :class:`UserError` names the first file that lacks them and says what it has. All files must be of
    one format. Empty files are ignored; a file whose first record is unreadable is an error unless
    ``skip_corrupt``.
    """
    paths = list_files(files)
    manifests: dict[str, Manifest | None] = {}
    found_files: list[RecordFiles] = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in manifests:
            manifests[folder] = read_manifest(folder or ".")
        manifest = manifests[folder]
        if manifest is not None and name in manifest.record_bytes:
            found = RecordFiles(
                manifest.format,
                manifest.label_types,
                manifest.modalities,
                PATCH_NAME,
                manifest.record_bytes[name],
                (path,),
            )
        else:
            example = _first_example(path, skip_corrupt)
            if example is None:
                continue
            found = _file_format(path, example, example.ByteSize())
        if found_files and found.format is not found_files[0].format:
            raise UserError(
                f"{path} is in the {found.format} format but {found_files[0].files[0]} is in the "
                f"{found_files[0].format} format; use files of one format together"
            )
        if label_type is not None and label_type not in found.label_types:
            raise UserError(_missing_label_message(label_type, path, found.label_types))
        if modality is not None:
            for needs in sensors_of(modality):
                if needs not in found.modalities:
                    raise UserError(_missing_modality_message(modality, needs, path, found.format))
        if with_names and found.name_key is None:
            raise UserError(f"with_names needs patch_name, which {path} does not have")
        found_files.append(found)
    if not found_files:
        raise UserError(f"no readable records in {', '.join(paths)}")
    name_keys = {found.name_key for found in found_files}
    if with_names and len(name_keys) > 1:
        raise UserError(
            "with_names needs one patch name key, but the files mix "
            f"{' and '.join(sorted(str(key) for key in name_keys))}; use files of one kind together"
        )
    return RecordFiles(
        format=found_files[0].format,
        label_types=frozenset.intersection(*(found.label_types for found in found_files)),
        modalities=frozenset.intersection(*(found.modalities for found in found_files)),
        name_key=name_keys.pop() if len(name_keys) == 1 else None,
        record_bytes=max(found.record_bytes for found in found_files),
        files=tuple(paths),
    )


# --------------------------------------------------------------------------------------------------
# Parsing and decoding (pure; eager or inside Dataset.map)
# --------------------------------------------------------------------------------------------------

# How each encoding is parsed: the feature's dtype, and whether it is one bytes value or a list.
_PARSED_DTYPES = {Encoding.RAW: tf.string, Encoding.INT64_LIST: tf.int64, Encoding.FLOAT_LIST: tf.float32}


def feature_spec(
    kind: str | RecordFormat,
    label_type: LabelType | None,
    modality: Modality = Modality.S2,
    name_key: str | None = None,
) -> dict[str, tf.io.FixedLenFeature]:
    """The ``tf.io.parse_example`` spec: only the keys that this label type and modality need.

    Asking for nothing else is what lets 2019 files with a single label set, and v2 files without the
    43-class labels, be read for the label type they do have.
    """
    spec: dict[str, tf.io.FixedLenFeature] = {}
    for stored in parse_record_format(kind).stored_keys(modality):
        shape = [] if stored.encoding is Encoding.RAW else [stored.values]
        spec[stored.key] = tf.io.FixedLenFeature(shape, _PARSED_DTYPES[stored.encoding])
    if label_type is not None:
        spec[label_key(label_type)] = tf.io.FixedLenFeature(
            [len(constants.class_names(label_type))], tf.int64
        )
    if name_key is not None:
        spec[name_key] = tf.io.FixedLenFeature([], tf.string)
    return spec


def _decode_group(raw: tf.Tensor, dtype: tf.DType, size: int, channels: int, native_dtype: bool) -> tf.Tensor:
    """Raw little-endian bytes of a batch -> (batch, size, size, channels), float32 or ``dtype``."""
    values = tf.reshape(tf.io.decode_raw(raw, dtype, little_endian=True), [-1, size, size, channels])
    return values if native_dtype else tf.cast(values, tf.float32)


def _stack_bands(features: Mapping[str, tf.Tensor], names: Sequence[str], size: int) -> tf.Tensor:
    """Per-band flat lists of a batch -> (batch, size, size, len(names)) float32, in ``names`` order."""
    # Cast before stacking: int64 is twice the size of float32, and the stack copies.
    planes = [tf.reshape(tf.cast(features[name], tf.float32), [-1, size, size]) for name in names]
    return tf.stack(planes, axis=-1)


def decode_bands(
    features: Mapping[str, tf.Tensor],
    kind: str | RecordFormat,
    modality: Modality = Modality.S2,
    native_dtype: bool = False,
) -> dict[str, tf.Tensor]:
    """Parsed features of a batch -> the model input dict of the modality, channels last: float32,
    or with ``native_dtype`` raw buffers in their stored dtype (lists are always float32)."""
    fmt = parse_record_format(kind)
    inputs: dict[str, tf.Tensor] = {}
    for key in modality_inputs(modality):
        spec, stored = INPUTS[key], fmt.stored(key)
        if len(stored) == 1 and stored[0].encoding is Encoding.RAW:
            dtype = tf.as_dtype(np.dtype(spec.dtype))
            inputs[key] = _decode_group(
                features[stored[0].key], dtype, spec.size, len(spec.bands), native_dtype
            )
        else:
            inputs[key] = _stack_bands(features, [item.key for item in stored], spec.size)
    return inputs


def _checked_payloads(
    features: dict[str, tf.Tensor], fmt: RecordFormat, paths: tf.Tensor, name_key: str | None
) -> dict:
    """`features` once every raw payload of the batch has its exact byte length; else an assertion
    that `corrupt_files_as_user_errors` turns into a UserError naming the file and the patch."""
    checks = []
    names = features[name_key] if name_key is not None else tf.strings.as_string(tf.range(tf.size(paths)))
    for stored in fmt.stored_keys(Modality.MM):
        if stored.key not in features or stored.encoding is not Encoding.RAW:
            continue
        expected = stored.nbytes
        lengths = tf.strings.length(features[stored.key])
        wrong = tf.where(tf.not_equal(lengths, expected))[:, 0]
        first = tf.concat([wrong, tf.zeros([1], wrong.dtype)], axis=0)[0]  # the first wrong one, else 0
        checks.append(
            tf.debugging.Assert(
                tf.size(wrong) == 0,
                [
                    PAYLOAD_TAG,
                    tf.gather(paths, first),
                    "patch",
                    tf.gather(names, first),
                    stored.key,
                    "holds",
                    tf.gather(lengths, first),
                    "bytes, expected",
                    expected,
                ],
                summarize=1,
            )
        )
    with tf.control_dependencies(checks):
        return {key: tf.identity(value) for key, value in features.items()}


def decode_labels(features: Mapping[str, tf.Tensor], label_type: LabelType) -> tf.Tensor:
    """The int64 multi-hot of ``label_type`` -> float32 (batch, classes), the dtype the loss takes."""
    return tf.cast(features[label_key(label_type)], tf.float32)


def parse_batch(
    serialized: tf.Tensor,
    *,
    kind: str | RecordFormat,
    label_type: LabelType | None,
    modality: Modality = Modality.S2,
    name_key: str | None = None,
    paths: tf.Tensor | None = None,
    check_name_key: str | None = None,
    native_dtype: bool = False,
) -> tuple[dict[str, tf.Tensor], tf.Tensor] | dict[str, tf.Tensor]:
    """A batch (vector) of serialized Examples -> ``(inputs, labels)``, or ``inputs`` without a label type.

    With ``name_key``, ``inputs["patch_name"]`` holds the patch names (read from ``name_key``). With
    ``paths`` (each record's file), every raw pixel payload's byte length is checked before it is
    decoded: a record whose checksums are valid but whose payload is not (a band of the wrong size,
    written by another tool) fails naming the file and the patch (``check_name_key`` holds the names).
    ``native_dtype``: see :func:`decode_bands`.
    """
    fmt = parse_record_format(kind)
    spec = feature_spec(fmt, label_type, modality, name_key or check_name_key)
    features = tf.io.parse_example(serialized, spec)
    if paths is not None:
        features = _checked_payloads(features, fmt, paths, check_name_key or name_key)
    inputs = decode_bands(features, fmt, modality, native_dtype)
    if name_key is not None:
        inputs["patch_name"] = features[name_key]
    if label_type is None:
        return inputs
    return inputs, decode_labels(features, label_type)


# --------------------------------------------------------------------------------------------------
# Reading with per-file verification
# --------------------------------------------------------------------------------------------------


class CorruptRecordCounter:
    """Totals of records and file passes skipped by ``skip_corrupt``, updated while the data is read.

    Create it outside any ``tf.distribute`` strategy scope (its variables live on the host). A corrupt
    file is counted once per pass over it, so once per epoch.
    """

    def __init__(self) -> None:
        with tf.device("/cpu:0"):
            self.records = tf.Variable(0, dtype=tf.int64, trainable=False, name="corrupt_records_skipped")
            self.files = tf.Variable(0, dtype=tf.int64, trainable=False, name="corrupt_file_passes")

    def result(self) -> dict[str, int]:
        """``{"records": ..., "files": ...}`` as Python ints."""
        return {"records": int(self.records.numpy()), "files": int(self.files.numpy())}


def _verified_records(
    path: tf.Tensor,
    size: tf.Tensor,
    framed_records: tf.Tensor,
    *,
    skip_corrupt: bool,
    counter: CorruptRecordCounter | None,
) -> tf.data.Dataset:
    """(serialized record, path) of one file; fails naming the file (or skips, counted) if it is unreadable.

    ``ignore_errors`` makes the reader end the file quietly at a bad CRC or truncated record; an empty
    end-of-file chunk then compares the bytes delivered with the file size, which is the only way to learn
    which file was bad (the reader's own DataLossError does not say). The bytes are added up per chunk of
    ``VERIFY_CHUNK_RECORDS`` records: one function call per record would cost as much CPU as the reading.
    """
    chunks = tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES).ignore_errors()
    chunks = chunks.batch(VERIFY_CHUNK_RECORDS)
    # batch() never yields an empty chunk, so an empty one can only be the end-of-file marker, and it
    # vanishes in unbatch() below without a filter.
    chunks = chunks.concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.string)))

    def account(state, records):
        read_bytes, read_records = state
        count = tf.size(records, out_type=tf.int64)
        read_bytes += tf.reduce_sum(tf.cast(tf.strings.length(records), tf.int64))
        read_bytes += TFRECORD_OVERHEAD_BYTES * count
        read_records += count
        complete = tf.logical_or(count > 0, tf.equal(read_bytes, size))
        if not skip_corrupt:
            check = tf.debugging.Assert(
                complete, [CORRUPT_TAG, path, "readable bytes:", read_bytes, "of", size]
            )
        else:

            def report() -> tf.Tensor:
                # The framing scan counted the file's records up front; at least one was unreadable.
                skipped = tf.maximum(framed_records - read_records, 1)
                ops = [
                    tf.print(
                        "warning: skipped",
                        skipped,
                        "unreadable record(s) at the end of corrupt or truncated TFRecord file",
                        path,
                        "(readable bytes:",
                        read_bytes,
                        "of",
                        size,
                        ")",
                        output_stream=sys.stderr,
                    )
                ]
                if counter is not None:
                    ops += [counter.records.assign_add(skipped), counter.files.assign_add(1)]
                with tf.control_dependencies(ops):
                    return tf.constant(True)

            check = tf.cond(complete, lambda: tf.constant(True), report)
        with tf.control_dependencies([check]):
            # Each record travels with its file's path, so a bad payload can be named (see parse_batch).
            return (read_bytes, read_records), (tf.identity(records), tf.fill(tf.shape(records), path))

    chunks = chunks.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), account)
    return chunks.unbatch()


def _located_records(reader: BatchReader, file_id: tf.Tensor) -> tf.data.Dataset:
    """(file index, data offset, data length) of each record of one file, from a scan of its frame
    headers made when the file's turn comes (a corrupt file fails there, naming itself)."""
    offsets, lengths = tf.numpy_function(reader.index, [file_id], [tf.int64, tf.int64], stateful=False)
    return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(offsets), file_id), offsets, lengths))


def _read_batch(
    reader: BatchReader, file_ids: tf.Tensor, offsets: tf.Tensor, lengths: tf.Tensor
) -> tuple[dict[str, tf.Tensor], tf.Tensor] | dict[str, tf.Tensor]:
    """A batch of located records -> what `parse_batch` gives for serialized ones."""
    outputs = reader.outputs()
    dtypes = [tf.string if dtype.kind == "O" else tf.as_dtype(dtype) for dtype, _ in outputs]
    arrays = tf.numpy_function(reader.read, [file_ids, offsets, lengths], dtypes, stateful=False)
    for array, (_, shape) in zip(arrays, outputs, strict=True):
        array.set_shape(shape)
    inputs = {group.key: array for group, array in zip(reader.groups, arrays, strict=False)}
    if reader.with_names:
        inputs["patch_name"] = arrays[-1]
    if reader.label_key is None:
        return inputs
    return inputs, arrays[len(reader.groups)]


@contextlib.contextmanager
def corrupt_files_as_user_errors() -> Iterator[None]:
    """Turn the failed file check of :func:`make_dataset` (and a bare DataLossError) into a UserError.

    Wrap the loop that iterates the dataset (``model.fit``, an evaluation loop) in it.
    """
    try:
        yield
    except tf.errors.OpError as error:
        payload = _PAYLOAD_PATTERN.search(error.message or "")
        if payload:
            raise UserError(
                f"{payload['path']}: the record of patch {payload['patch']} has valid checksums but its "
                f"{payload['key']} holds {payload['bytes']} bytes, expected {payload['expected']}; the file "
                "was not written by this format's writer or is damaged: prepare it again"
            ) from None
        listed = _LIST_LENGTH_PATTERN.search(error.message or "")
        if listed:
            raise UserError(
                f"a record holds {listed['got']} {listed['kind']} values under {listed['key']}, expected "
                f"{listed['shape'] or 1}: a file of these records is damaged or of another schema; prepare "
                "it again"
            ) from None
        bad = _BAD_RECORD_PATTERN.search(error.message or "")
        if bad:
            raise UserError(
                f"{bad['path']}: {bad['what']}; the file is damaged or of another schema"
            ) from None
        match = _CORRUPT_PATTERN.search(error.message or "")
        if match:
            raise UserError(
                f"corrupt or truncated TFRecord file {match['path']}: only the first {match['read']} of its "
                f"{match['size']} bytes hold readable records (bad checksum or truncated); re-create "
                "the file or skip its unreadable records with skip_corrupt"
            ) from None
        if isinstance(error, tf.errors.DataLossError):
            raise UserError(f"unreadable TFRecord data: {error.message.splitlines()[0]}") from None
        raise


# --------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------


def shard_policy(num_files: int, num_pipelines: int) -> str:
    """How ``num_pipelines`` input pipelines split ``num_files`` files: ``none``, ``file`` or ``record``.

    By file when the files divide evenly or there are at least ``MIN_FILES_PER_PIPELINE`` per pipeline
    (each pipeline then reads only its files; prepared shards hold equal patch counts, so the load is
    balanced); otherwise by record: every pipeline reads every file in the same seeded order and keeps
    every ``num_pipelines``-th record, which is balanced to one record at the cost of reading more.
    """
    if num_pipelines <= 1:
        return "none"
    if num_files >= num_pipelines and (
        num_files % num_pipelines == 0 or num_files >= num_pipelines * MIN_FILES_PER_PIPELINE
    ):
        return "file"
    return "record"


def effective_shuffle_buffer(shuffle_buffer: int, record_bytes: int, shuffle_memory_mb: float) -> int:
    """The record shuffle buffer actually used: the one asked for, capped by the memory budget.

    The buffer holds serialized records, so it needs about ``buffer * record_bytes`` bytes; the 2019
    buffer of 130,000 would hold ~20 GB. (A buffer larger than an epoch costs nothing extra: it only fills
    up to the epoch's records, since records are shuffled before epochs are repeated.)
    """
    if shuffle_buffer <= 0:
        return 0
    fits = int(shuffle_memory_mb * 2**20) // max(record_bytes, 1)
    return max(1, min(shuffle_buffer, fits))


def _permuted(columns: tuple[tf.Tensor, ...], seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """The rows of ``columns`` (equal lengths), all in one random order that depends on ``seed`` alone."""
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(columns[0])[0]), seed=seed)
    return tuple(tf.gather(column, order) for column in columns)


def subset_size(total: int, fraction: float) -> int:
    """How many of ``total`` records a ``fraction`` keeps: rounded, at least one."""
    return min(total, max(1, round(fraction * total)))


def subset_mask(counts: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Which records (over files of ``counts`` records, in list order) a seeded ``fraction`` keeps.

    Exactly :func:`subset_size` records, drawn without replacement by a NumPy generator seeded with
    ``seed``: the same files and seed give the same subset on every machine and in every epoch.
    """
    total = int(sum(counts))
    keep = np.zeros(total, bool)
    if total:
        keep[np.random.default_rng(seed).permutation(total)[: subset_size(total, fraction)]] = True
    return keep


def resume_position(skip_batches: int, batch_size: int, epoch_records: int) -> tuple[int, int]:
    """``(first epoch to read, records of that epoch to skip)`` after ``skip_batches`` batches.

    Batches are cut after epochs are repeated, so they span epoch boundaries and every batch before the
    last one is full: ``skip_batches * batch_size`` records were consumed.
    """
    consumed = skip_batches * batch_size
    if epoch_records <= 0:
        return 0, 0
    return consumed // epoch_records, consumed % epoch_records


def _check_positive(name: str, value: int | None, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class _ReadPlan:
    """What one pipeline of `make_dataset` reads: its files (with their sizes, framed record counts and
    the offset of their first record in the whole list), the subset mask over the whole list, the
    records of one epoch, how it is sharded, its batch and its shuffle buffer."""

    found: RecordFiles
    paths: list[str]
    sizes: list[int]
    framed: list[int]
    offsets: list[int]
    keep: np.ndarray
    subset: bool
    policy: str
    pipeline_id: int
    num_pipelines: int
    local_batch: int
    epoch_records: int
    buffer: int
    reader: BatchReader | None  # reads the batches, for raw-buffer formats (not with skip_corrupt)


def _read_plan(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    label_type: LabelType | None,
    modality: Modality,
    batch_size: int,
    *,
    with_names: bool,
    skip_corrupt: bool,
    input_context: tf.distribute.InputContext | None,
    skip_batches: int,
    fraction: float,
    seed: int,
    shuffle_buffer: int,
    shuffle_memory_mb: float,
    cycle_length: int,
    native_dtype: bool,
) -> _ReadPlan:
    """Steps 1 and 2 of `make_dataset`, and the counts the later steps need."""
    # 1. List the files and check, before any reading, that they hold what was asked for.
    paths = list_files(files)
    found = detect_format(paths, label_type, modality, with_names=with_names, skip_corrupt=skip_corrupt)

    # 2. Shard for distribution. File sharding happens here, on the sorted list, so that the
    #    pipelines' subsets are disjoint; record sharding happens after reading (step 5).
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    local_batch = input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size
    policy = shard_policy(len(paths), num_pipelines)
    # A subset is drawn over the records of all files (before sharding), so every pipeline agrees on it.
    subset = fraction < 1
    all_framed = [_count_file(path, skip_corrupt) for path in paths] if subset else None
    keep = subset_mask(all_framed, fraction, seed) if all_framed is not None else np.ones(0, bool)
    offsets = list(np.cumsum([0, *all_framed[:-1]])) if all_framed else [0] * len(paths)
    if policy == "file":
        paths = paths[pipeline_id::num_pipelines]
        offsets = offsets[pipeline_id::num_pipelines]
        if all_framed is not None:
            all_framed = all_framed[pipeline_id::num_pipelines]

    sizes = [os.path.getsize(path) for path in paths]
    # Framed record counts are needed only to report skipped records and to jump whole epochs on resume;
    # the header scan costs one small read per record, so it is skipped otherwise.
    counted = skip_corrupt or skip_batches > 0
    if all_framed is not None:
        framed = all_framed
        epoch_records = sum(int(keep[o : o + n].sum()) for o, n in zip(offsets, framed, strict=True))
    else:
        framed = [_count_file(path, skip_corrupt) if counted else 0 for path in paths]
        epoch_records = sum(framed)
    if policy == "record":
        epoch_records = max(0, (epoch_records - pipeline_id + num_pipelines - 1) // num_pipelines)

    buffer = effective_shuffle_buffer(shuffle_buffer, found.record_bytes, shuffle_memory_mb)
    if buffer < shuffle_buffer:
        logger.info(
            "shuffle buffer: %d records asked, %d used (%.0f MiB budget at %.0f KiB per record; "
            "file order is reshuffled every epoch and %d files are interleaved)",
            shuffle_buffer,
            buffer,
            shuffle_memory_mb,
            found.record_bytes / 1024,
            min(len(paths), cycle_length),
        )
    logger.info(
        "input pipeline: %d %s-format file(s), shard %s (%d of %d), batch %d, shuffle buffer %d",
        len(paths),
        found.format,
        policy,
        pipeline_id,
        num_pipelines,
        local_batch,
        buffer,
    )

    # Records whose inputs are raw buffers are read by a BatchReader; with skip_corrupt, TensorFlow's
    # reader is kept for its way of ending a bad file quietly and counting what it skipped.
    reader = None
    if reads_raw(found.format, modality) and not skip_corrupt:
        reader = BatchReader(
            paths, found.format, modality, label_type, found.name_key, with_names=with_names,
            native_dtype=native_dtype,
        )  # fmt: skip
    return _ReadPlan(
        found, paths, sizes, framed, offsets, keep, subset, policy, pipeline_id, num_pipelines,
        local_batch, epoch_records, buffer, reader,
    )  # fmt: skip


def _epoch_reader(
    plan: _ReadPlan,
    seed: int,
    cycle_length: int,
    skip_corrupt: bool,
    corrupt_counter: CorruptRecordCounter | None,
) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """Steps 3 to 6 of `make_dataset`: epoch -> that epoch's serialized records."""
    paths, buffer, policy, subset = plan.paths, plan.buffer, plan.policy, plan.subset
    num_pipelines, pipeline_id = plan.num_pipelines, plan.pipeline_id
    paths_t = tf.constant(paths, tf.string)
    sizes_t = tf.constant(plan.sizes, tf.int64)
    framed_t = tf.constant(plan.framed, tf.int64)
    offsets_t = tf.constant(plan.offsets, tf.int64)
    keep_t = tf.constant(plan.keep, tf.bool)
    ids_t = tf.range(len(paths), dtype=tf.int64)
    reader = plan.reader

    def read_file(path, size, framed_records, offset, file_id):
        if reader is not None:
            records = _located_records(reader, file_id)
        else:
            records = _verified_records(
                path, size, framed_records, skip_corrupt=skip_corrupt, counter=corrupt_counter
            )
        if not subset:
            return records
        # Record i of this file is record offset + i of the whole list; keep it if the mask says so.
        kept = records.enumerate().filter(lambda index, record: tf.gather(keep_t, offset + index))
        return kept.map(lambda index, record: record)

    def epoch_records_dataset(epoch: tf.Tensor) -> tf.data.Dataset:
        """One epoch of serialized records, its order a function of (seed, epoch) only."""
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.range(len(paths))
        # 3. Shuffle the file order, afresh each epoch (stateless: epoch e needs no epochs before it).
        if buffer:
            order = tf.random.experimental.stateless_shuffle(order, seed=epoch_seed)
        file_list = tf.data.Dataset.from_tensor_slices(
            tuple(tf.gather(column, order) for column in (paths_t, sizes_t, framed_t, offsets_t, ids_t))
        )
        # 4. Read: interleave records of several files (mixing them before the buffer), each file
        #    verified so that a corrupt one is named. deterministic=True keeps seeded runs repeatable.
        records = file_list.interleave(
            read_file,
            cycle_length=max(1, min(len(paths), cycle_length)),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        # 5. Shard by record when there are too few files; all pipelines see the same order.
        if policy == "record":
            records = records.shard(num_pipelines, pipeline_id)
        # 6. Shuffle serialized records (the smallest form) in blocks of the capped buffer size, each
        #    block permuted by a stateless seed folded from (seed, epoch, block). Dataset.shuffle would
        #    mix the global TensorFlow seed in (and fails outright in a graph when that seed is 0).
        if buffer:
            block_seed = tf.random.experimental.stateless_fold_in(epoch_seed, 1)
            records = (
                records.batch(buffer)
                .enumerate()
                .map(
                    lambda block, rows: _permuted(
                        rows, tf.random.experimental.stateless_fold_in(block_seed, block)
                    )
                )
                .unbatch()
            )
        return records

    return epoch_records_dataset


def make_dataset(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    label_type: LabelType | str | None,
    batch_size: int,
    *,
    modality: Modality | str = Modality.S2,
    shuffle_buffer: int = 0,
    epochs: int | None = 1,
    seed: int = 42,
    drop_remainder: bool = False,
    with_names: bool = False,
    skip_corrupt: bool = False,
    corrupt_counter: CorruptRecordCounter | None = None,
    input_context: tf.distribute.InputContext | None = None,
    skip_batches: int = 0,
    shuffle_memory_mb: float = DEFAULT_SHUFFLE_MEMORY_MB,
    cycle_length: int = DEFAULT_CYCLE_LENGTH,
    fraction: float = 1.0,
    native_dtype: bool = False,
) -> tf.data.Dataset:
    """Batched ``(inputs, labels)`` from TFRecord files of any of our formats or the 2019 scripts.

    Args:
        files: file paths, globs or folders (``<dir>/*.tfrecord``).
        label_type: ``original`` or ``BigEarthNet-19``; ``None`` yields ``inputs`` alone (prediction).
        batch_size: the global batch; with ``input_context``, this pipeline batches its per-replica share.
        modality: ``S2``, ``S1`` or ``MM``; decides the keys of ``inputs``.
        shuffle_buffer: records to shuffle over (0: no shuffle, files and records in a fixed order);
            capped by ``shuffle_memory_mb``, see the module docstring.
        epochs: passes over the data; ``None`` repeats forever.
        seed: seeds file order and record shuffle of every epoch.
        drop_remainder: drop the last, smaller batch.
        with_names: add ``inputs["patch_name"]``.
        skip_corrupt: skip (and count) unreadable records instead of failing on them.
        corrupt_counter: with ``skip_corrupt``, adds up the skipped records.
        input_context: from ``tf.distribute``; shards by file or by record (:func:`shard_policy`).
        skip_batches: resume after that many batches of this pipeline (module docstring).
        shuffle_memory_mb: memory budget of the record shuffle buffer.
        cycle_length: files read at the same time.
        fraction: read only this seeded share of the records (:func:`subset_mask`), the same records
            every epoch; ``1.0`` reads all.
        native_dtype: deliver inputs stored as raw buffers in their stored dtype (uint16 for S2,
            float32 for S1) instead of float32. A Keras model converts them to its float32 inputs
            inside its step, so on an accelerator the conversion runs there and half the S2 bytes
            cross to it; the values are the same (uint16 is exact in float32).

    Iterate inside :func:`corrupt_files_as_user_errors` to get a corrupt file as a UserError.
    """
    # Where the caller's strings enter: parsed once, enums from here on.
    modality = parse_modality(modality)
    label_type = None if label_type is None else constants.parse_label_type(label_type)
    _check_positive("batch_size", batch_size, 1)
    _check_positive("epochs", epochs, 1, allow_none=True)
    _check_positive("shuffle_buffer", shuffle_buffer, 0)
    _check_positive("skip_batches", skip_batches, 0)
    _check_positive("cycle_length", cycle_length, 1)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")

    plan = _read_plan(
        files, label_type, modality, batch_size, with_names=with_names, skip_corrupt=skip_corrupt,
        input_context=input_context, skip_batches=skip_batches, fraction=fraction, seed=seed,
        shuffle_buffer=shuffle_buffer, shuffle_memory_mb=shuffle_memory_mb, cycle_length=cycle_length,
        native_dtype=native_dtype,
    )  # fmt: skip
    epoch_records_dataset = _epoch_reader(plan, seed, cycle_length, skip_corrupt, corrupt_counter)

    # 7. Repeat epochs, starting at the resume point; 8. skip the consumed part of the first epoch
    #    (read but not parsed).
    start_epoch, skip_records = resume_position(skip_batches, plan.local_batch, plan.epoch_records)
    epoch_ids = (
        tf.data.Dataset.counter(start_epoch) if epochs is None else tf.data.Dataset.range(start_epoch, epochs)
    )
    records = epoch_ids.flat_map(epoch_records_dataset)
    if skip_records:
        records = records.skip(skip_records)
    # 9. Batch, then 10. parse and decode whole batches (one parse_example per batch).
    batches = records.batch(plan.local_batch, drop_remainder=drop_remainder)
    if plan.reader is not None:
        # One Python call per batch; a second call in parallel would only contend for the GIL.
        batches = batches.map(
            functools.partial(_read_batch, plan.reader), num_parallel_calls=1, deterministic=True
        )
    else:
        parse = functools.partial(
            parse_batch,
            native_dtype=native_dtype,
            kind=plan.found.format,
            label_type=label_type,
            modality=modality,
            name_key=plan.found.name_key if with_names else None,
            check_name_key=plan.found.name_key,
        )
        batches = batches.map(
            lambda serialized, paths: parse(serialized, paths=paths),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    if input_context is not None:
        # We shard ourselves; stop tf.distribute from sharding the already-sharded pipeline again.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        batches = batches.with_options(options)
    # 11. Prefetch, so decoding overlaps the training step.
    return batches.prefetch(tf.data.AUTOTUNE)
