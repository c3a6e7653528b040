"""Weights files read without trusting them: every claimed size is checked before memory is spent.

`SafetensorsFile` reads the safetensors format (an 8-byte little-endian header length, a JSON header
of `name -> {dtype, shape, data_offsets}`, then the raw data) from a memory map. The header is
checked whole before any tensor is read: its length against the file, each tensor's shape and dtype
against its byte range, each range inside the data and apart from the others. A tensor is converted
to float32 only when asked for (`array`), exactly for float16 and bfloat16 (every value of either is
a float32 value), and refused when it holds NaN or infinity.

`TorchStateDict` reads a PyTorch state dict saved by `torch.save` (the zip format of PyTorch 1.6 and
later: `<name>/data.pkl`, a pickle of the dict, and one stored member `<name>/data/<key>` per storage)
without PyTorch and without running the file's code. A pickle can call any importable function, so the
unpickler resolves only the globals that rebuild tensors and dicts (`ALLOWED_GLOBALS`) and refuses any
other with one line naming it; storages are checked against their zip member (stored, not compressed,
of exactly numel x itemsize bytes) and each tensor's extent against its storage before a byte is read.
"""

from __future__ import annotations

import collections
import io
import json
import mmap
import os
import pickle
import zipfile
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


# ---------------------------------------------------------------------------------------------------
# PyTorch `.pth` state dicts

MAX_PICKLE_BYTES = 64 << 20  # a state dict's pickle holds names and shapes only: kilobytes
_TORCH_STORAGES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # bit patterns, converted like safetensors' BF16
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
ALLOWED_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        *(("torch", name) for name in _TORCH_STORAGES),
    }
)


@dataclass(frozen=True)
class _Storage:
    dtype_name: str
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor the pickle describes: a strided view of a storage, not yet read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, shape, stride, *_ignored) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(n) for n in shape), tuple(int(n) for n in stride))


def _rebuild_parameter(data, *_ignored):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UserError(
                f"{self.where}: refused: the pickle asks for {module}.{name}, which no state dict needs "
                "(a pickle can run code; only tensors and dicts are rebuilt)"
            )
        if module == "collections":
            return collections.OrderedDict
        if name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if name == "_rebuild_parameter":
            return _rebuild_parameter
        return name  # a storage type: its name is all we need

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UserError(f"{self.where}: not a PyTorch state dict (unknown persistent id {str(pid)[:80]})")
        _, dtype_name, key, _location, numel = pid
        if dtype_name not in _TORCH_STORAGES or not isinstance(numel, int) or numel < 0:
            raise UserError(f"{self.where}: not a PyTorch state dict (storage {str(pid)[:80]})")
        return _Storage(dtype_name, str(key), numel)


class TorchStateDict:
    """The tensors of a `torch.save`d state dict, checked when opened; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd = open_input_file(self.path)
        self._file = os.fdopen(fd, "rb")
        try:
            self.tensors = self._read_index()
        except BaseException:
            self.close()
            raise

    def _refuse(self, problem: str) -> UserError:
        return UserError(f"{self.path}: truncated or not a PyTorch state dict ({problem})")

    def _read_index(self) -> dict[str, _TensorRef]:
        try:
            self._zip = zipfile.ZipFile(self._file)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise self._refuse(
                f"not a zip archive: {error}; files from PyTorch before 1.6 must be saved again with torch.save"
            ) from None
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise self._refuse(f"{len(pickles)} data.pkl members")
        self._prefix = pickles[0][: -len("data.pkl")]
        info = self._zip.getinfo(pickles[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise self._refuse(f"a pickle of {info.file_size:,} bytes")
        try:
            state = _StateDictUnpickler(self._zip.read(info), str(self.path)).load()
        except UserError:
            raise
        except Exception as error:  # a damaged pickle can fail in any of pickle's own ways
            raise self._refuse(f"the pickle does not load: {type(error).__name__}: {str(error)[:120]}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # a training checkpoint around the state dict
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise self._refuse("the pickle holds no dict of named tensors")
        tensors = {}
        for name, value in state.items():
            if not isinstance(value, _TensorRef):
                continue  # buffers of other types (none in timm's networks) are no weights
            self._check(name, value)
            tensors[name] = value
        return tensors

    def _check(self, name: str, ref: _TensorRef) -> None:
        member = f"{self._prefix}data/{ref.storage.key}"
        try:
            info = self._zip.getinfo(member)
        except KeyError:
            raise self._refuse(f"tensor {name}: storage {member} is missing") from None
        itemsize = _TORCH_STORAGES[ref.storage.dtype_name].itemsize
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != ref.storage.numel * itemsize:
            raise self._refuse(
                f"tensor {name}: storage {member} holds {info.file_size:,} bytes, expected "
                f"{ref.storage.numel:,} x {itemsize}"
            )
        if any(n < 0 for n in ref.shape) or any(n < 0 for n in ref.stride) or len(ref.shape) != len(ref.stride):
            raise self._refuse(f"tensor {name}: shape {list(ref.shape)} with strides {list(ref.stride)}")
        if int(np.prod(ref.shape, dtype=object)):
            last = ref.offset + sum((n - 1) * step for n, step in zip(ref.shape, ref.stride, strict=True))
            if ref.offset < 0 or last >= ref.storage.numel:
                raise self._refuse(
                    f"tensor {name}: {list(ref.shape)} from element {ref.offset} reaches past its storage of "
                    f"{ref.storage.numel:,} elements"
                )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: ref.shape for name, ref in self.tensors.items()}

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 array; UserError for a non-float dtype or values that are not finite."""
        ref = self.tensors[name]
        if ref.storage.dtype_name not in ("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage"):
            raise UserError(f"{self.path}: tensor {name} is {ref.storage.dtype_name}, not floating point")
        dtype = _TORCH_STORAGES[ref.storage.dtype_name]
        raw = np.frombuffer(self._zip.read(f"{self._prefix}data/{ref.storage.key}"), dtype)
        view = np.lib.stride_tricks.as_strided(
            raw[ref.offset :], ref.shape, tuple(step * dtype.itemsize for step in ref.stride), writeable=False
        )
        if ref.storage.dtype_name == "BFloat16Storage":
            values = (view.astype(np.uint32) << 16).view(np.float32)
        else:
            values = view.astype(np.float32)
        return finite_float32(values, str(self.path), name)

    def close(self) -> None:
        zip_file = getattr(self, "_zip", None)
        if zip_file is not None:
            zip_file.close()
        self._file.close()

    def __enter__(self) -> TorchStateDict:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
