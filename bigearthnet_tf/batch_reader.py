"""Records of the default format -> batches of arrays, read with `os.pread` and numpy.

`tf.data.TFRecordDataset` followed by `tf.io.parse_example` copies every payload four to five times
(file buffer, record string, batch of strings, parsed feature, decoded tensor) and computes the data
checksum in software; on a 2-core machine that alone costs ~150 CPU-us per Sentinel-2 patch. Records
of the default format hold each input group as one raw little-endian buffer, so the input pipeline
instead moves *where* records are (file, offset, length) through its interleave, shuffle and batch
steps, and a :class:`BatchReader` reads each batch in one call: one `pread` per record (the data and
its checksum), the checksum by `google-crc32c` (hardware CRC-32C) on a view, the Example's fields
located by a small wire-format walk (`records.example_values`, no copies), and each group copied
once, converted to float32 on the way, into the batch array.

The checks are the ones the TensorFlow route makes: a record whose data checksum fails, or a file
that is shorter than its frames, is reported as a corrupt file with the bytes readable before it;
a payload of the wrong size names the file and the patch. Errors are raised as ValueError with
tagged messages that `input_pipeline.corrupt_files_as_user_errors` turns into one-line UserErrors.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bigearthnet_tf import constants
from bigearthnet_tf.constants import LabelType
from bigearthnet_tf.layout import Modality, label_key, modality_inputs
from bigearthnet_tf.record_formats import Encoding, RecordFormat, Stored
from bigearthnet_tf.records import FRAME_HEADER_BYTES, data_checksum_holds, example_values, frame_index

Fields = dict[str, tuple[int, memoryview]]  # what records.example_values finds in a record

CORRUPT_TAG = "corrupt or truncated TFRecord file:"
PAYLOAD_TAG = "record payload of the wrong size:"
BAD_RECORD_TAG = "unreadable record:"
CHECKSUM_BYTES = 4
# TensorFlow takes a numpy array over without a copy only when it is aligned to 64 bytes.
TENSOR_ALIGNMENT = 64
MAX_OPEN_FILES = 64  # a pipeline reads a few files at a time (its cycle length); bounds descriptors
_INT64_KIND = 3


class _Calls:
    """The calls TensorFlow's threads make into the readers of this process, for a clean exit.

    A tf.data thread that enters Python once the interpreter is finalizing is ended by Python on
    the spot, and the pipeline then waits for its call forever: a script that ends with a live
    iterator of a BatchReader pipeline would hang at exit. So at exit (`quiesce`, before
    finalizing) every new call fails at once, and the exit waits until none is running and none
    came for a moment: the pipeline's buffers are then full of those errors and its threads idle.
    """

    QUIET_SECONDS = 0.1
    MAX_WAIT_SECONDS = 3.0

    def __init__(self) -> None:
        self.closing = False
        self.running = 0
        self.last = 0.0  # time.monotonic() of the last call's start or end; 0.0: none yet
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        with self._lock:
            if self.closing:
                raise RuntimeError("the interpreter is exiting")
            self.running += 1
            self.last = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
                self.last = time.monotonic()

    def quiesce(self) -> None:
        with self._lock:
            self.closing = True
        if not self.last:
            return
        deadline = time.monotonic() + self.MAX_WAIT_SECONDS
        while time.monotonic() < deadline and (
            self.running or time.monotonic() - self.last < self.QUIET_SECONDS
        ):
            time.sleep(0.01)  # releases the GIL: calls in flight finish, new ones fail


_CALLS = _Calls()
atexit.register(_CALLS.quiesce)


def corrupt_message(path: str, readable: int, size: int) -> str:
    """The tagged message of a corrupt file (`input_pipeline` parses it; the TensorFlow route's
    assertion prints the same fields)."""
    return f"[{CORRUPT_TAG}] [{path}] [readable bytes:] [{readable}] [of] [{size}]"


def _nbytes(shape: tuple[int, ...], dtype: np.dtype | type) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _aligned_view(raw: np.ndarray, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An array of `shape` in `raw` whose data starts on a `TENSOR_ALIGNMENT` boundary."""
    start = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[start : start + _nbytes(shape, dtype)].view(dtype).reshape(shape)


# sys.getrefcount of a pooled buffer that nothing else refers to: the pool's list, the loop
# variable and getrefcount's own argument.
_UNREFERENCED = 3


class BatchArrays:
    """Aligned batch arrays whose memory is used again once nothing refers to it.

    A batch of S1+S2 float32 is ~28 MB; fresh memory for every batch costs the kernel zeroing it
    (~35 CPU-us per S2 sample here, more than copying the pixels in). A batch handed to TensorFlow
    without a copy stays referenced by its tensor, and every numpy view of it refers to the buffer
    it was cut from (numpy's `base`), so a buffer whose reference count is back to the pool's own is
    free: no tensor, array or memoryview can still reach it. Up to `per_size` buffers are kept per
    batch size; with more batches in flight, new ones are allocated as before.
    """

    def __init__(self, per_size: int = 8) -> None:
        self.per_size = per_size
        self._buffers: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()  # two readers must not take the same free buffer

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
        size = _nbytes(shape, dtype) + TENSOR_ALIGNMENT
        with self._lock:
            buffers = self._buffers.setdefault(size, [])
            for raw in buffers:
                if sys.getrefcount(raw) == _UNREFERENCED:
                    break
            else:
                raw = np.empty(size, np.uint8)
                if len(buffers) < self.per_size:
                    buffers.append(raw)
            return _aligned_view(raw, shape, dtype)  # referring to `raw` marks it taken


def _readable(name: bytes) -> str:
    """A stored patch name for a message (decoded only there: the hot path keeps the bytes)."""
    return name.decode("utf-8", "replace")


def reads_raw(fmt: RecordFormat, modality: Modality) -> bool:
    """Whether every input of `modality` is one raw buffer in `fmt` (what a BatchReader reads)."""
    return all(
        len(stored) == 1 and stored[0].encoding is Encoding.RAW
        for stored in (fmt.stored(key) for key in modality_inputs(modality))
    )


@dataclass(frozen=True)
class _Group:
    key: str  # the model input
    stored: Stored  # its record key, shape and dtype
    nbytes: int  # of its raw buffer


class BatchReader:
    """Reads batches of records of `paths` given as (file index, data offset, data length).

    One instance serves one pipeline; `index` and `read` are called from `tf.numpy_function`. The
    patch names (`name_key`) name the patch in errors, and are read out with `with_names`.
    """

    def __init__(
        self,
        paths: Sequence[str],
        fmt: RecordFormat,
        modality: Modality,
        label_type: LabelType | None,
        name_key: str | None,
        *,
        with_names: bool,
        native_dtype: bool = False,
    ) -> None:
        self.paths = list(paths)
        stored = [fmt.stored(key)[0] for key in modality_inputs(modality)]  # one raw buffer each
        self.groups = [
            _Group(key, group, group.nbytes)
            for key, group in zip(modality_inputs(modality), stored, strict=True)
        ]
        self.label_key = None if label_type is None else label_key(label_type)
        self.classes = 0 if label_type is None else len(constants.class_names(label_type))
        self.name_key = name_key  # names the patch in errors
        self.with_names = with_names  # and is read out
        # float32, or each group's stored dtype (uint16 for S2), for the model to convert
        self.dtypes = [np.dtype(g.stored.dtype if native_dtype else np.float32) for g in self.groups]
        self._files: dict[int, int] = {}  # file index -> open descriptor, oldest first
        self._lock = threading.Lock()
        self._scratch = threading.local()  # `_frame_buffer`
        self._arrays = BatchArrays()

    # --- what the pipeline asks ---------------------------------------------------------------

    def outputs(self) -> list[tuple[np.dtype, list[int | None]]]:
        """Dtype and shape (batch dimension unknown) of each array `read` returns, in its order; the
        names are bytes objects."""
        outputs: list[tuple[np.dtype, list[int | None]]] = [
            (dtype, [None, *group.stored.shape])
            for group, dtype in zip(self.groups, self.dtypes, strict=True)
        ]
        if self.label_key is not None:
            outputs.append((np.dtype(np.float32), [None, self.classes]))
        if self.with_names:
            outputs.append((np.dtype(object), [None]))
        return outputs

    def index(self, file_index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        """Data offsets and lengths of the records of one file; a corrupt file raises ValueError."""
        with _CALLS.call():
            path = self.paths[int(file_index)]
            offsets, lengths, broken = frame_index(path)
            if broken is not None:
                raise ValueError(corrupt_message(path, broken, os.path.getsize(path)))
            return offsets, lengths

    def read(self, file_indices: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        """One batch: each input group as (batch, size, size, channels) in `dtypes`, then the float32
        multi-hot labels (with a label type), then the patch names (with a name key)."""
        with _CALLS.call():
            return self._read(file_indices, offsets, lengths)

    def _read(self, file_indices: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        count = len(file_indices)
        groups = [
            self._arrays.empty((count, *group.stored.shape), dtype)
            for group, dtype in zip(self.groups, self.dtypes, strict=True)
        ]
        labels = self._arrays.empty((count, self.classes))
        names = np.empty(count, object)
        located = zip(file_indices.tolist(), offsets.tolist(), lengths.tolist(), strict=True)
        for row, (file_index, offset, length) in enumerate(located):
            path = self.paths[file_index]
            values = self._record(file_index, path, offset, length)
            name = self._name(values, path, offset)
            for group, out in zip(self.groups, groups, strict=True):
                payload = self._payload(values, group, path, name)
                out[row] = np.frombuffer(payload, group.stored.dtype).reshape(group.stored.shape)
            if self.label_key is not None:
                labels[row] = self._labels(values, path, name)
            if self.with_names:
                names[row] = name
        result = groups
        if self.label_key is not None:
            result.append(labels)
        if self.with_names:
            result.append(names)
        return result

    # --- one record --------------------------------------------------------------------------

    def _descriptor(self, file_index: int) -> int:
        with self._lock:
            descriptor = self._files.get(file_index)
            if descriptor is None:
                if len(self._files) >= MAX_OPEN_FILES:
                    os.close(self._files.pop(next(iter(self._files))))
                descriptor = self._files[file_index] = os.open(self.paths[file_index], os.O_RDONLY)
            return descriptor

    def _frame_buffer(self, size: int) -> memoryview:
        """This thread's buffer for one record, reused: a new 200 kB bytes object per record (as
        `os.pread` makes) costs more than reading into it; the batch copies out of it."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._scratch.buffer = bytearray(max(size, 2 * len(buffer or b"")))
        return memoryview(buffer)[:size]

    def _record(self, file_index: int, path: str, offset: int, length: int) -> Fields:
        buffer = self._frame_buffer(length + CHECKSUM_BYTES)
        frame = buffer[: os.preadv(self._descriptor(file_index), [buffer], offset)]
        header_offset = offset - FRAME_HEADER_BYTES
        if len(frame) < length + CHECKSUM_BYTES or not data_checksum_holds(frame, length):
            raise ValueError(corrupt_message(path, header_offset, os.path.getsize(path)))
        try:
            return example_values(memoryview(frame)[:length])
        except ValueError as error:
            raise ValueError(
                f"[{BAD_RECORD_TAG}] [{path}] [record at byte {header_offset}: {error}]"
            ) from None

    def _name(self, values: Fields, path: str, offset: int) -> bytes:
        """The patch name as stored (bytes, as TensorFlow's parser gives it); "?" for errors if absent."""
        found = values.get(self.name_key) if self.name_key else None
        if found is not None:
            return bytes(found[1])
        if self.with_names:
            raise ValueError(
                f"[{BAD_RECORD_TAG}] [{path}] [the record at byte {offset - FRAME_HEADER_BYTES} has no "
                f"{self.name_key}]"
            )
        return b"?"

    def _payload(self, values: Fields, group: _Group, path: str, name: bytes) -> memoryview:
        found = values.get(group.stored.key)
        if found is not None and len(found[1]) == group.nbytes:
            return found[1]
        held = 0 if found is None else len(found[1])
        raise ValueError(
            f"[{PAYLOAD_TAG}] [{path}] [patch] [{_readable(name)}] [{group.stored.key}] [holds] [{held}] "
            f"[bytes, expected] [{group.nbytes}]"
        )

    def _labels(self, values: Fields, path: str, name: bytes) -> np.ndarray:
        found = values.get(self.label_key) if self.label_key else None
        # 0/1 multi-hot: one varint byte per class, each below 0x80 (an ASCII test: a tenth of numpy's max)
        if found and found[0] == _INT64_KIND and len(found[1]) == self.classes and bytes(found[1]).isascii():
            return np.frombuffer(found[1], np.uint8)
        held = "nothing" if found is None else f"{len(found[1])} bytes of kind {found[0]}"
        raise ValueError(
            f"[{BAD_RECORD_TAG}] [{path}] [patch {_readable(name)}: {self.label_key} holds {held}, expected "
            f"{self.classes} values of 0 or 1]"
        )

    def close(self) -> None:
        with self._lock:
            for descriptor in self._files.values():
                os.close(descriptor)
            self._files.clear()

    def __del__(self) -> None:
        self.close()
