"""Weights files read without trusting them: every claimed size is checked before memory is spent.

`SafetensorsFile` reads the safetensors format (an 8-byte little-endian header length, a JSON header
of `name -> {dtype, shape, data_offsets}`, then the raw data) from a memory map. The header is
checked whole before any tensor is read: its length against the file, each tensor's shape and dtype
against its byte range, each range inside the data and apart from the others. A tensor is converted
to float32 only when asked for (`array`), exactly for float16 and bfloat16 (every value of either is
a float32 value), and refused when it holds NaN or infinity.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import open_input_file

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # bit patterns: the upper half of a float32
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it (checked against the file)."""

    dtype: str  # safetensors' name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file
    end: int


def finite_float32(values: np.ndarray, where: str, name: str) -> np.ndarray:
    """`values` as float32; UserError naming the file and tensor when it holds NaN or infinity
    (weights like that give NaN logits for every input, silently)."""
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise UserError(
            f"{where}: tensor {name} holds {bad:,} NaN or infinite values; these weights are unusable"
        )
    return values


class SafetensorsFile:
    """A safetensors file, its header checked when opened; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd = open_input_file(self.path)
        try:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        try:
            self.tensors, self.metadata = self._header(size)
        except BaseException:
            self.close()
            raise

    def _refuse(self, problem: str) -> UserError:
        return UserError(f"{self.path}: truncated or not a safetensors file ({problem})")

    def _header(self, size: int) -> tuple[dict[str, TensorEntry], dict]:
        if size < 8 or self._map is None:
            raise self._refuse(f"{size} bytes")
        length = int.from_bytes(self._map[:8], "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise self._refuse(f"a header of {length:,} bytes in a file of {size:,}")
        try:
            header = json.loads(bytes(self._map[8 : 8 + length]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise self._refuse(f"header is not JSON: {error}") from None
        if not isinstance(header, dict):
            raise self._refuse("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        start, tensors, spans = 8 + length, {}, []
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                valid = (
                    dtype in _DTYPES
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in (begin, end))
                )
            except (KeyError, TypeError, ValueError):
                valid = False
            if not valid:
                raise self._refuse(f"tensor {name}: malformed entry {str(entry)[:200]}")
            claimed = int(np.prod(shape, dtype=object)) * _DTYPES[dtype].itemsize
            if not 0 <= begin <= end or end - begin != claimed or start + end > size:
                raise self._refuse(
                    f"tensor {name}: {dtype} {list(shape)} needs {claimed:,} bytes, but its data_offsets "
                    f"[{begin}, {end}] give {end - begin:,} in a data section of {size - start:,}"
                )
            tensors[name] = TensorEntry(dtype, shape, start + begin, start + end)
            spans.append((begin, end, name))
        spans.sort()
        for (_, first_end, first), (second_begin, _, second) in zip(spans, spans[1:], strict=False):
            if second_begin < first_end:
                raise self._refuse(f"tensors {first} and {second} overlap")
        return tensors, metadata

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 array (copied out of the map); UserError for a non-float dtype
        or values that are not finite."""
        entry = self.tensors[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise UserError(f"{self.path}: tensor {name} is {entry.dtype}, not floating point")
        dtype = _DTYPES[entry.dtype]
        raw = np.frombuffer(
            self._map, dtype, count=(entry.end - entry.begin) // dtype.itemsize, offset=entry.begin
        )
        if entry.dtype == "BF16":
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        del raw  # no view of the map may outlive this call (the map could not be closed)
        return finite_float32(values.reshape(entry.shape), str(self.path), name)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
