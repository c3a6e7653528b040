"""Record I/O without TensorFlow: `tf.train.Example` wire encoding, TFRecord framing and checksums,
reading frames back and counting them.

Preparation runs in worker processes that must start in milliseconds, so this module encodes the
protobuf wire format by hand with numpy and frames records with `google-crc32c`. What it writes is
byte-for-byte a valid serialized `tf.train.Example`; the tests parse it back with TensorFlow.

Wire format used (proto3, field numbers from tensorflow/core/example/{example,feature}.proto)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # each entry: { string key = 1; Feature value = 2; }
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed]; }     # little-endian float32
    Int64List { repeated int64 value = 1 [packed]; }     # varints

What a record holds (the schemas of our formats) is in `record_formats.py`; this module only knows
messages, features and frames.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np

from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS

# Wire types and the tags of the messages above.
_WIRE_LENGTH_DELIMITED = 2
_TAG_FIELD_1 = bytes([1 << 3 | _WIRE_LENGTH_DELIMITED])  # Features in Example, map entry, key, values
_TAG_FIELD_2 = bytes([2 << 3 | _WIRE_LENGTH_DELIMITED])  # map entry value; float_list in Feature
_TAG_FIELD_3 = bytes([3 << 3 | _WIRE_LENGTH_DELIMITED])  # int64_list in Feature

_LABEL_INDEX_43 = {name: index for index, name in enumerate(ORIGINAL_LABELS)}
_LABEL_INDEX_19 = {name: index for index, name in enumerate(BIGEARTHNET_19_LABELS)}

# TFRecord framing: uint64 length, masked crc32c(length), data, masked crc32c(data).
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_CRC_MASK_DELTA = 0xA282EAD8

# Values below these take one and two varint bytes.
_ONE_BYTE_LIMIT = 1 << 7
_TWO_BYTE_LIMIT = 1 << 14
# Packed lists up to this many bytes are copied into the record's small bytes; longer ones stay
# separate buffers.
_SMALL_PAYLOAD = 256
_ONE_BYTE_VARINTS = tuple(bytes([value]) for value in range(_ONE_BYTE_LIMIT))


# --- protobuf primitives -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    """One non-negative integer as a protobuf varint (lengths and single values)."""
    if value < _ONE_BYTE_LIMIT:
        return _ONE_BYTE_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varints(values: np.ndarray | Sequence[int]) -> bytes:
    """Integers as concatenated protobuf int64 varints, vectorised (no per-value Python loop)."""
    return bytes(_varint_array(np.asarray(values)))


def _varint_array(values: np.ndarray) -> np.ndarray:
    """Varints of `values` (row-major) as a uint8 array.

    Pixels (unsigned, at most 16 bits) take fast paths: all below 2**7 is one byte each; all in
    [2**7, 2**14) is two bytes each by arithmetic; a mix of one- and two-byte values keeps each value's
    second byte only where needed. Anything else goes through `_varints_columns`.
    """
    flat = values.reshape(-1)
    if flat.size == 0:
        return np.empty(0, dtype=np.uint8)
    if flat.dtype.kind in "iu" and flat.size <= _SMALL_PAYLOAD:
        low, high = int(flat.min()), int(flat.max())
        if low >= 0 and high < _ONE_BYTE_LIMIT:  # multi-hot vectors, format_version
            return flat.astype(np.uint8)
    if flat.dtype.kind == "u" and flat.dtype.itemsize <= 2:
        low, high = int(flat.min()), int(flat.max())
        if high < _ONE_BYTE_LIMIT:
            return flat.astype(np.uint8)
        if high < _TWO_BYTE_LIMIT:
            pixels = flat.astype(np.uint16)
            # Little-endian uint16 whose first byte is the low 7 bits with the continuation bit set
            # and whose second byte is the remaining 7 bits.
            pairs = ((pixels & 0x7F) | 0x80 | ((pixels >> 7) << 8)).astype("<u2")
            if low >= _ONE_BYTE_LIMIT:
                return pairs.view(np.uint8)
            one_byte = pixels < _ONE_BYTE_LIMIT
            pairs[one_byte] = pixels[one_byte]  # no continuation bit, second byte dropped below
            keep = np.empty((flat.size, 2), dtype=bool)
            keep[:, 0] = True
            np.logical_not(one_byte, out=keep[:, 1])
            return pairs.view(np.uint8)[keep.reshape(-1)]
        return _varints_columns(flat.astype(np.uint32))
    return _varints_columns(flat.astype(np.int64).view(np.uint64))


def _varints_columns(work: np.ndarray) -> np.ndarray:
    """Varints of non-negative uint32, or int64 viewed as uint64 (negatives take 10 bytes).

    Each value is cut into 7-bit groups, one column per group; a value uses as many columns as its
    highest non-zero group needs, all but its last with the continuation bit. Row-major boolean
    selection then yields the bytes in order.
    """
    groups = max(1, (int(work.max()).bit_length() + 6) // 7)
    shifts = np.arange(groups, dtype=work.dtype) * work.dtype.type(7)
    columns = ((work[:, None] >> shifts) & work.dtype.type(0x7F)).astype(np.uint8)
    # Bytes per value: 1 + the number of thresholds 2**7, 2**14, ... that it reaches.
    lengths = np.ones(work.shape, dtype=np.uint8)
    for group in range(1, groups):
        lengths += work >= work.dtype.type(1 << (7 * group))
    column_index = np.arange(groups, dtype=np.uint8)
    columns |= (column_index < lengths[:, None] - 1).astype(np.uint8) << 7
    return columns[column_index < lengths[:, None]]


# A serialized message as a list of buffers: bytes for the small parts (tags, lengths, names,
# labels) and read-only uint8 arrays for pixel payloads, which are never copied in Python.
Buffer = bytes | np.ndarray


class Serialized:
    """A serialized protobuf message kept as buffers (`bytes(serialized)` joins them).

    `RecordWriter` writes the buffers with one `os.writev` and checksums them in place, so a record
    of 160 kB is never concatenated or copied in Python.
    """

    __slots__ = ("buffers", "size")

    def __init__(self, buffers: list[Buffer], size: int) -> None:
        self.buffers = buffers
        self.size = size

    def __bytes__(self) -> bytes:
        return b"".join(
            bytes(buffer) if isinstance(buffer, np.ndarray) else buffer for buffer in self.buffers
        )


def _payload(array: np.ndarray) -> np.ndarray:
    """A contiguous array's bytes as a read-only flat uint8 view (google-crc32c takes read-only only)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    flat.flags.writeable = False
    return flat


def bytes_list(values: Iterable[bytes | str]) -> bytes:
    """A serialized `Feature` holding a `BytesList` of small values (str is UTF-8 encoded), as bytes."""
    items = []
    for value in values:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        items.append(_TAG_FIELD_1 + _varint(len(data)) + data)
    content = b"".join(items)
    return _TAG_FIELD_1 + _varint(len(content)) + content


def raw_bytes(array: np.ndarray) -> list[Buffer]:
    """A serialized `Feature` whose `BytesList` holds one value, the raw bytes of `array`."""
    payload = _payload(array)
    value_head = _TAG_FIELD_1 + _varint(payload.size)
    return [_TAG_FIELD_1 + _varint(len(value_head) + payload.size) + value_head, payload]


def _packed_feature(kind_tag: bytes, packed: np.ndarray) -> list[Buffer]:
    """A serialized `Feature` holding a packed list (`kind_tag` selects float_list or int64_list)."""
    if packed.size == 0:
        return [kind_tag + b"\x00"]
    if packed.size <= _SMALL_PAYLOAD:
        data = packed.tobytes()
        content = _TAG_FIELD_1 + _varint(len(data)) + data
        return [kind_tag + _varint(len(content)) + content]
    payload = _payload(packed)
    values_head = _TAG_FIELD_1 + _varint(payload.size)
    return [kind_tag + _varint(len(values_head) + payload.size) + values_head, payload]


def float_list(values: np.ndarray) -> list[Buffer]:
    """A serialized `Feature` holding a packed `FloatList` (row-major float32), as buffers."""
    return _packed_feature(_TAG_FIELD_2, np.asarray(values, dtype="<f4"))


def int64_list(values: np.ndarray | Sequence[int]) -> list[Buffer]:
    """A serialized `Feature` holding a packed `Int64List` (row-major varints), as buffers."""
    return _packed_feature(_TAG_FIELD_3, _varint_array(np.asarray(values)))


def float_feature(values: np.ndarray) -> bytes:
    """A serialized `Feature` holding a packed `FloatList` (row-major float32)."""
    return bytes(Serialized(float_list(values), 0))


def int64_feature(values: np.ndarray | Sequence[int]) -> bytes:
    """A serialized `Feature` holding a packed `Int64List` (row-major)."""
    return bytes(Serialized(int64_list(values), 0))


def example(features: Iterable[tuple[str, list[Buffer] | bytes]]) -> Serialized:
    """An `Example` from (key, serialized Feature as buffers) pairs, in the given order.

    Adjacent small buffers are merged, so a record is a handful of buffers: the bytes between
    pixel payloads, and the payloads.
    """
    buffers: list[Buffer] = []
    pending = bytearray()  # small bytes not yet appended to `buffers`
    size = 0  # of the payloads in `buffers`
    for key, feature in features:
        if isinstance(feature, bytes):
            feature_size = len(feature)
        else:
            feature_size = sum(len(part) if isinstance(part, bytes) else part.size for part in feature)
        key_field = _key_field(key)
        value_head = _TAG_FIELD_2 + _varint(feature_size)
        pending += (
            _TAG_FIELD_1 + _varint(len(key_field) + len(value_head) + feature_size) + key_field + value_head
        )
        if isinstance(feature, bytes):
            pending += feature
            continue
        for part in feature:
            if isinstance(part, bytes):
                pending += part
            else:
                buffers.append(bytes(pending))
                pending.clear()
                buffers.append(part)
                size += part.size
    if pending:
        buffers.append(bytes(pending))
    size += sum(len(buffer) for buffer in buffers if isinstance(buffer, bytes))
    head = _TAG_FIELD_1 + _varint(size)
    if buffers and isinstance(buffers[0], bytes):
        buffers[0] = head + buffers[0]
    else:
        buffers.insert(0, head)
    return Serialized(buffers, size + len(head))


@functools.lru_cache(maxsize=256)
def _key_field(key: str) -> bytes:
    """A feature map entry's key field (records reuse a handful of keys)."""
    key_bytes = key.encode("utf-8")
    return _TAG_FIELD_1 + _varint(len(key_bytes)) + key_bytes


def encode_example(features: Iterable[tuple[str, bytes]]) -> bytes:
    """A serialized `Example` from (key, serialized Feature) pairs, written in the given order."""
    return bytes(example(features))


# --- labels -----------------------------------------------------------------------------------


def multi_hot(names: Iterable[str], classes: Sequence[str]) -> np.ndarray:
    """A 0/1 int64 vector over `classes` with a 1 for each name; an unknown name raises ValueError."""
    if classes is ORIGINAL_LABELS:
        index = _LABEL_INDEX_43
    elif classes is BIGEARTHNET_19_LABELS:
        index = _LABEL_INDEX_19
    else:
        index = {name: i for i, name in enumerate(classes)}
    vector = np.zeros(len(classes), dtype=np.int64)
    for name in names:
        try:
            vector[index[name]] = 1
        except KeyError:
            raise ValueError(f"unknown label {name!r}; not one of the {len(classes)} classes") from None
    return vector


# --- TFRecord framing ----------------------------------------------------------------------------


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC-32C of `data`, masked as TFRecord files store it (rotated and offset, so that CRCs
    of data holding CRCs stay well distributed)."""
    return _mask(google_crc32c.value(data))


def _frame_buffers(record: bytes | Serialized) -> list[bytes | np.ndarray]:
    """Length, masked CRC of the length, the record's buffers, masked CRC of the data."""
    if isinstance(record, Serialized):
        buffers, size = record.buffers, record.size
        crc = 0
        for buffer in buffers:
            crc = google_crc32c.extend(crc, buffer)
    else:
        buffers, size = [record], len(record)
        crc = google_crc32c.value(record)
    length = _LENGTH.pack(size)
    return [length + _CRC.pack(masked_crc32c(length)), *buffers, _CRC.pack(_mask(crc))]


def frame(record: bytes | Serialized) -> bytes:
    """One record with its TFRecord framing: length, masked CRC of length, data, masked CRC of data."""
    return b"".join(bytes(b) if isinstance(b, np.ndarray) else b for b in _frame_buffers(record))


class RecordWriter:
    """Appends framed records to a binary file (a TFRecord file without compression).

    Each record goes to the file in one `os.writev` call straight from its buffers. Use as a
    context manager; `count` is the number of records written so far.
    """

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self.count = 0
        self.bytes_written = 0  # by this writer, framing included
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self._fd: int | None = os.open(self.path, flags, 0o666)

    def write(self, record: bytes | Serialized) -> None:
        """Frame and append one serialized record (bytes, or a `Serialized` from `SERIALIZERS`)."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        buffers = _frame_buffers(record)
        expected = sum(len(buffer) for buffer in buffers)
        written = os.writev(self._fd, buffers)
        if written != expected:  # a short write (rare on regular files): write the rest in one go
            os.write(self._fd, b"".join(bytes(b) for b in buffers)[written:])
        self.count += 1
        self.bytes_written += expected

    def fileno(self) -> int:
        """The file descriptor (for the kernel's hints)."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def flush(self, *, sync: bool = False) -> None:
        """Nothing is buffered in Python; with `sync=True`, wait until the bytes are on the disk."""
        if sync and self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- reading frames back -------------------------------------------------------------------------

_HEADER_BYTES = _LENGTH.size + _CRC.size
FRAME_HEADER_BYTES = _HEADER_BYTES  # length and its checksum, before each record's data


def _frame_headers(stream: BinaryIO, size: int, *, seek: bool) -> Iterator[tuple[int, int]]:
    """Yield `(offset, data length)` per frame of an open TFRecord file of `size` bytes; ValueError
    where the framing breaks. With `seek` the payloads are skipped, else the caller reads them."""
    offset = 0
    while offset < size:
        header = stream.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES:
            raise ValueError(f"truncated record header at byte {offset}")
        (length,) = _LENGTH.unpack_from(header)
        if masked_crc32c(header[: _LENGTH.size]) != _CRC.unpack_from(header, _LENGTH.size)[0]:
            raise ValueError(f"bad length checksum at byte {offset}")
        end = offset + _HEADER_BYTES + length + _CRC.size
        if end > size:
            raise ValueError(f"truncated record at byte {offset}")
        yield offset, length
        if seek:
            stream.seek(end)
        offset = end


def read_frames(path: str | Path, *, with_data: bool) -> Iterator[tuple[int, bytes | None]]:
    """Yield `(offset, data or None)` per record of a TFRecord file; ValueError where the framing breaks.

    Without data only the 12-byte headers are read and the payloads are seeked over, which makes
    counting cheap; the payload CRC is then not checked (`TFRecordDataset` checks it while reading).
    """
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        for offset, length in _frame_headers(stream, size, seek=not with_data):
            data = None
            if with_data:
                data = stream.read(length)
                (data_crc,) = _CRC.unpack(stream.read(_CRC.size))
                if masked_crc32c(data) != data_crc:
                    raise ValueError(f"bad data checksum in the record at byte {offset}")
            yield offset, data


def count_frames(path: str | Path) -> tuple[int, str | None]:
    """Records in a TFRecord file from its headers, and what broke the framing (None if nothing).

    A broken frame counts as one record: what follows it cannot be framed."""
    count = 0
    try:
        for _ in read_frames(path, with_data=False):
            count += 1
    except ValueError as error:
        return count + 1, str(error)
    return count, None


def frame_index(path: str | Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Where each record's data lies in a TFRecord file: ``(data offsets, data lengths, broken)``.

    ``broken`` is the byte offset of the first frame whose header does not hold (truncated, bad length
    checksum), or None; the frames before it are listed. Only the headers are read.
    """
    offsets: list[int] = []
    lengths: list[int] = []
    broken = None
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        frames = _frame_headers(stream, size, seek=True)
        try:
            for offset, length in frames:
                offsets.append(offset + _HEADER_BYTES)
                lengths.append(length)
        except ValueError:
            broken = offsets[-1] + lengths[-1] + _CRC.size if offsets else 0
    return np.array(offsets, np.int64), np.array(lengths, np.int64), broken


def data_checksum_holds(frame: bytes | memoryview, length: int) -> bool:
    """Whether `frame` (a record's data followed by its 4-byte masked CRC) is intact."""
    data = np.frombuffer(frame, np.uint8, length)  # a read-only view: no copy for the CRC
    return _mask(google_crc32c.value(data)) == _CRC.unpack_from(frame, length)[0]


# --- reading Examples without TensorFlow -------------------------------------------------------------


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    byte = buffer[position]
    if byte < 0x80:  # most tags and lengths of a record take one byte
        return byte, position + 1
    result = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def example_values(data: bytes | memoryview) -> dict[str, tuple[int, memoryview]]:
    """The features of a serialized `Example`: key -> (kind, the list's first value or packed values).

    Kind is the Feature field number (1 bytes, 2 float, 3 int64). For a bytes list the view is its
    first value, for a packed list its packed bytes; views, not copies. ValueError where the bytes
    are not an Example of this shape (or end early).
    """
    buffer = memoryview(data)
    values: dict[str, tuple[int, memoryview]] = {}
    try:
        if not len(buffer):
            return values
        if buffer[0] != _TAG_FIELD_1[0]:
            raise ValueError("not an Example: no features")
        length, position = _read_varint(buffer, 1)
        end = position + length
        while position < end:
            length, position = _read_varint(buffer, position + 1)  # a map entry
            entry_end = position + length
            if buffer[position] != _TAG_FIELD_1[0]:
                raise ValueError("a feature without a key")
            length, position = _read_varint(buffer, position + 1)
            key = str(buffer[position : position + length], "utf-8")
            position += length
            if buffer[position] != _TAG_FIELD_2[0]:
                raise ValueError(f"feature {key!r} without a value")
            length, position = _read_varint(buffer, position + 1)
            kind = buffer[position] >> 3
            length, position = _read_varint(buffer, position + 1)
            if length:  # an empty list holds no value
                if buffer[position] != _TAG_FIELD_1[0]:  # one bytes value, or a packed list
                    raise ValueError(f"feature {key!r} holds an unpacked list")
                length, position = _read_varint(buffer, position + 1)
                values[key] = (kind, buffer[position : position + length])
            position = entry_end
        if position != end or end > len(buffer):
            raise ValueError("the features end early")
    except IndexError:
        raise ValueError("the record ends early") from None
    return values
