"""Record formats as objects: what a record of each format holds, how it is written, named and found.

A format answers every question the rest of the package asks about records, so nothing else branches
on a format's name: `prepare` writes with `serialize` and names files with `unit_files` /
`split_files`, the manifest describes a set with `bands` / `shapes`, and the input pipeline recognises
a file with `recognises` and builds its parse spec and decoding from `stored` (which record keys hold
each model input, and how). `read_manifest` reads what a prepared set's `dataset.json` says of its
files, which readers take instead of peeking at records. No TensorFlow here: preparation workers use
this module.

To add a format: subclass `RecordFormat` here and add an instance to `FORMATS`; see
docs/ARCHITECTURE.md ("How to add a record format").
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from bigearthnet_tf.constants import (
    BANDS_BY_NAME,
    BIGEARTHNET_19,
    BIGEARTHNET_19_LABELS,
    LABEL_TYPES,
    ORIGINAL,
    ORIGINAL_LABELS,
    PATCH_SIZE,
    S1_BAND_NAMES,
    S2_BAND_NAMES,
    LabelType,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.jsonfiles import read_json_object
from bigearthnet_tf.layout import (
    INPUTS,
    S1_INPUT,
    S2_INPUTS,
    SENSOR_BANDS,
    Modality,
    label_key,
    label_names_key,
    modality_inputs,
)
from bigearthnet_tf.records import (
    Serialized,
    bytes_list,
    example,
    float_list,
    int64_list,
    multi_hot,
    raw_bytes,
)

if TYPE_CHECKING:
    from bigearthnet_tf.archive import Patch

_TFRECORD_SUFFIX = ".tfrecord"

# Version of the default schema, stored in every default record under `format_version`.
FORMAT_VERSION = 1

# Record keys (the 2019 names, and ours for the default schema).
PATCH_NAME = "patch_name"
ORIGINAL_LABELS_KEY = label_names_key(ORIGINAL)
ORIGINAL_MULTI_HOT_KEY = label_key(ORIGINAL)
BIGEARTHNET_19_LABELS_KEY = label_names_key(BIGEARTHNET_19)
BIGEARTHNET_19_MULTI_HOT_KEY = label_key(BIGEARTHNET_19)
FORMAT_VERSION_KEY = "format_version"  # default schema only
PATCH_NAME_S1 = "patch_name_s1"
PATCH_NAME_S2 = "patch_name_s2"  # legacy multimodal (2021) schema only
# Keys that may name the patch of a record, in the order readers look for them.
NAME_KEYS = (PATCH_NAME, PATCH_NAME_S2)


class Encoding(enum.Enum):
    """How one record key holds pixel values."""

    RAW = "raw"  # one bytes value: the little-endian values of the input's dtype, channels last
    INT64_LIST = "int64_list"  # one int64 per pixel (the 2019 schema)
    FLOAT_LIST = "float_list"  # one float32 per pixel (the 2021 multimodal schema)


@dataclass(frozen=True)
class Stored:
    """One record key that holds pixels: its bands (channels last), array shape, encoding and dtype."""

    key: str
    bands: tuple[str, ...]
    shape: tuple[int, ...]
    encoding: Encoding
    dtype: str  # the values' numpy dtype as the input carries them ("<u2", "<f4")

    @property
    def values(self) -> int:
        """Number of pixel values."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of a RAW value."""
        return self.values * np.dtype(self.dtype).itemsize


class RecordFormat(ABC):
    """One way of writing a patch as a `tf.train.Example`, and what that means for files and readers."""

    name: ClassVar[str]
    # The `format_version` every record carries (checked by readers), or None when records carry none.
    format_version: ClassVar[int | None]
    # True: a split is written as shards of `shard_size` patches, straight into the output folder.
    # False: one file per split, written by workers in parts of `part_size` patches that are joined.
    sharded: ClassVar[bool]
    part_size: ClassVar[int | None] = None

    def __repr__(self) -> str:
        return repr(self.name)

    def __str__(self) -> str:
        return self.name

    @abstractmethod
    def serialize(self, patch: Patch) -> Serialized:
        """The patch as one record, unjoined (see `records.Serialized`)."""

    def encode(self, patch: Patch) -> bytes:
        """The patch as one serialized record."""
        return bytes(self.serialize(patch))

    @abstractmethod
    def stored(self, input_key: str) -> tuple[Stored, ...]:
        """The record keys that hold a model input (`layout.INPUTS`), in channel order."""

    @abstractmethod
    def recognises(self, keys: Collection[str]) -> bool:
        """Whether a record with these keys is of this format."""

    def stored_keys(self, modality: Modality) -> tuple[Stored, ...]:
        """Every record key that holds the pixels of a modality, in record order."""
        return tuple(stored for key in modality_inputs(modality) for stored in self.stored(key))

    def bands(self, modality: Modality) -> dict[str, list[str]]:
        """Record key -> band names stored there (the manifest's `bands`)."""
        return {stored.key: list(stored.bands) for stored in self.stored_keys(modality)}

    def shapes(self, modality: Modality) -> dict[str, list[int]]:
        """Record key -> array shape (the manifest's `shapes`)."""
        return {stored.key: list(stored.shape) for stored in self.stored_keys(modality)}

    def unit_patches(self, shard_size: int | None) -> int:
        """Patches per worker task: a shard, or a part."""
        return shard_size if self.sharded else self.part_size

    def unit_files(self, split: str, count: int) -> list[str]:
        """The names of the files that the `count` worker tasks of a split write."""
        if self.sharded:
            return [f"{split}-{i:05d}-of-{count:05d}{_TFRECORD_SUFFIX}" for i in range(count)]
        return [f"{split}.part-{i:05d}" for i in range(count)]

    def file_glob(self, split: str) -> str:
        """A glob pattern for the final files of a split, whatever their count (`split` escaped)."""
        if self.sharded:
            return f"{split}-{'[0-9]' * 5}-of-{'[0-9]' * 5}{_TFRECORD_SUFFIX}"
        return split + _TFRECORD_SUFFIX

    def split_files(self, split: str, count: int) -> tuple[str, ...]:
        """The final files of a split written in `count` tasks."""
        return tuple(self.unit_files(split, count)) if self.sharded else (split + _TFRECORD_SUFFIX,)


_FORMAT_VERSION_FEATURE = (FORMAT_VERSION_KEY, b"".join(int64_list([FORMAT_VERSION])))


class DefaultFormat(RecordFormat):
    """Raw little-endian pixel bytes grouped by resolution, sharded (`format_version` 1)."""

    name = "default"
    format_version = FORMAT_VERSION
    sharded = True

    def serialize(self, patch: Patch) -> Serialized:
        """Keys, in this order: `format_version`, `patch_name`, `bands_10m`, `bands_20m`, `bands_60m`
        (uint16 little-endian, channels last in layout.INPUTS band order), `original_labels`,
        `original_labels_multi_hot` (v1 only), `BigEarthNet-19_labels`, `BigEarthNet-19_labels_multi_hot`,
        then with Sentinel-1 `bands_s1` (float32 little-endian (120, 120, 2): VV, VH) and `patch_name_s1`.
        """
        features = [_FORMAT_VERSION_FEATURE, (PATCH_NAME, bytes_list([patch.name]))]
        for key in S2_INPUTS:
            features.append((key, raw_bytes(_stack(patch.bands, INPUTS[key]))))
        features.extend(_label_features(patch))
        if patch.s1_bands is not None:
            features.append((S1_INPUT, raw_bytes(_stack(patch.s1_bands, INPUTS[S1_INPUT]))))
            features.append((PATCH_NAME_S1, bytes_list([patch.s1_name or ""])))
        return example(features)

    def stored(self, input_key: str) -> tuple[Stored, ...]:
        spec = INPUTS[input_key]
        shape = (spec.size, spec.size, len(spec.bands))
        return (Stored(spec.key, spec.bands, shape, Encoding.RAW, spec.dtype),)

    def recognises(self, keys: Collection[str]) -> bool:
        return FORMAT_VERSION_KEY in keys


class LegacyFormat(RecordFormat):
    """The 2019 schema of prep_splits.py (one int64 list per band), one file per split; with S1 the
    2021 multimodal keys. Also the format of files written by the 2019 and 2021 scripts."""

    name = "legacy"
    format_version = None
    sharded = False
    part_size = 256

    def serialize(self, patch: Patch) -> Serialized:
        """Keys: `B01` ... `B12` (int64 lists, row-major, native size), both label key pairs (the
        `original_*` pair only for v1 patches), `patch_name`; with Sentinel-1 the 2021 multimodal keys
        `VV`, `VH` (float lists of 14,400), `patch_name_s1` and `patch_name_s2` are added (`patch_name`
        stays, holding the S2 name, so 2019 readers keep working).
        """
        features = [(name, int64_list(patch.bands[name])) for name in S2_BAND_NAMES]
        features.extend(_label_features(patch))
        features.append((PATCH_NAME, bytes_list([patch.name])))
        if patch.s1_bands is not None:
            features.extend((name, float_list(patch.s1_bands[name])) for name in S1_BAND_NAMES)
            features.append((PATCH_NAME_S1, bytes_list([patch.s1_name or ""])))
            features.append((PATCH_NAME_S2, bytes_list([patch.name])))
        return example(features)

    def stored(self, input_key: str) -> tuple[Stored, ...]:
        spec = INPUTS[input_key]
        if spec.modality == Modality.S1:
            shape, encoding = (PATCH_SIZE, PATCH_SIZE), Encoding.FLOAT_LIST
            return tuple(Stored(band, (band,), shape, encoding, spec.dtype) for band in spec.bands)
        return tuple(
            Stored(band, (band,), (BANDS_BY_NAME[band].size,) * 2, Encoding.INT64_LIST, spec.dtype)
            for band in spec.bands
        )

    def recognises(self, keys: Collection[str]) -> bool:
        return any(name in keys for name in (*S2_BAND_NAMES, *S1_BAND_NAMES))


def _label_features(patch: Patch) -> tuple[tuple[str, bytes], ...]:
    """Both label key pairs (the 43-class pair only when the patch has 43-class labels, i.e. v1)."""
    return _encoded_labels(patch.labels_43, patch.labels_19)


# Patches share a few thousand label sets, so each is encoded once per process.
@functools.lru_cache(maxsize=4096)
def _encoded_labels(
    labels_43: tuple[str, ...] | None, labels_19: tuple[str, ...]
) -> tuple[tuple[str, bytes], ...]:
    features = []
    if labels_43 is not None:
        features.append((ORIGINAL_LABELS_KEY, bytes_list(labels_43)))
        features.append((ORIGINAL_MULTI_HOT_KEY, int64_list(multi_hot(labels_43, ORIGINAL_LABELS))))
    features.append((BIGEARTHNET_19_LABELS_KEY, bytes_list(labels_19)))
    features.append((BIGEARTHNET_19_MULTI_HOT_KEY, int64_list(multi_hot(labels_19, BIGEARTHNET_19_LABELS))))
    # Small lists are one bytes buffer each (records._SMALL_PAYLOAD); joined, they are immutable.
    return tuple(
        (key, b"".join(feature) if isinstance(feature, list) else feature) for key, feature in features
    )


def _stack(bands: dict[str, np.ndarray], spec) -> np.ndarray:
    """An input's bands stacked channels last, in its band order and little-endian dtype."""
    first = bands[spec.bands[0]]
    stacked = np.empty((*first.shape, len(spec.bands)), dtype=spec.dtype)
    for channel, name in enumerate(spec.bands):
        stacked[..., channel] = bands[name]
    return stacked


DEFAULT = DefaultFormat()
LEGACY = LegacyFormat()
# Name -> format, in the order readers try them.
FORMATS = MappingProxyType({fmt.name: fmt for fmt in (DEFAULT, LEGACY)})


def parse_record_format(value: str | RecordFormat) -> RecordFormat:
    """A format from its name (or itself); a UserError naming the value and the choices otherwise."""
    if isinstance(value, RecordFormat):
        return value
    try:
        return FORMATS[value]
    except (KeyError, TypeError):
        raise UserError(f"unknown record format {value!r}; expected one of {', '.join(FORMATS)}") from None


def format_of(keys: Collection[str]) -> RecordFormat | None:
    """The format whose records have these keys, or None."""
    return next((fmt for fmt in FORMATS.values() if fmt.recognises(keys)), None)


# --- the manifest of a prepared set ---------------------------------------------------------------

MANIFEST_NAME = "dataset.json"  # written by `prepare` last: its presence means the set is complete
MAX_MANIFEST_BYTES = 64 << 20  # the official splits' manifest lists a few thousand files


@dataclass(frozen=True)
class Manifest:
    """What a prepared set's `dataset.json` says about its record files: readers take it instead of
    peeking at the first record of each file."""

    path: Path
    format: RecordFormat
    label_types: frozenset[LabelType]
    modalities: frozenset[Modality]  # sensors (layout.SENSORS)
    splits: dict[str, tuple[str, ...]]  # split -> its file names, in order
    record_bytes: dict[str, int]  # file name -> mean bytes per record of its split (0 when empty)
    patches: dict[str, int]  # split -> the records its files hold


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The manifest in `folder`, None when there is none; a UserError naming it and the key at fault
    when it is not one this version wrote or reads."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    document = read_json_object(path, "dataset manifest", max_bytes=MAX_MANIFEST_BYTES)

    def malformed(key: str) -> UserError:
        return UserError(f"dataset manifest {path}: key {key!r} is missing or malformed")

    fmt = FORMATS.get(document.get("format"))
    if fmt is None:
        raise malformed("format")
    if document.get("format_version") != fmt.format_version:
        raise UserError(
            f"dataset manifest {path}: format_version {document.get('format_version')!r} is not supported "
            f"by this version of bigearthnet-tf (supported: {fmt.format_version}); upgrade it or re-prepare"
        )
    label_types = document.get("label_types")
    if not isinstance(label_types, list) or not all(value in LABEL_TYPES for value in label_types):
        raise malformed("label_types")
    modalities = document.get("modalities")
    if not isinstance(modalities, list) or not all(value in SENSOR_BANDS for value in modalities):
        raise malformed("modalities")
    splits = document.get("splits")
    if not isinstance(splits, dict):
        raise malformed("splits")
    record_bytes, split_files, split_patches = {}, {}, {}
    for split, entry in splits.items():
        entry = entry if isinstance(entry, dict) else {}
        files, patches = entry.get("files"), entry.get("patches")
        if not (isinstance(files, list) and all(isinstance(name, str) for name in files)):
            raise malformed(f"splits.{split}.files")
        if isinstance(patches, bool) or not isinstance(patches, int) or patches < 0:
            raise malformed(f"splits.{split}.patches")
        size = 0
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a file gone since: readers name it later
                size += os.path.getsize(path.parent / name)
        for name in files:
            record_bytes[name] = size // patches if patches else 0
        split_files[split] = tuple(files)
        split_patches[split] = patches
    return Manifest(
        path,
        fmt,
        frozenset(LabelType(value) for value in label_types),  # where the file's strings enter
        frozenset(Modality(value) for value in modalities),
        split_files,
        record_bytes,
        split_patches,
    )
