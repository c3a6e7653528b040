"""BigEarthNet archives on disk: layouts (v1, v2; Sentinel-2 and Sentinel-1), split lists, `read_patch`.

Layouts:

- v1 Sentinel-2: `BigEarthNet-v1.0/<name>/<name>_<BAND>.tif` (12 bands) + `<name>_labels_metadata.json`
  (43-class labels). The root given to us may be `BigEarthNet-v1.0` itself or its parent.
- v1 Sentinel-1: `BigEarthNet-S1-v1.0/<s1>/<s1>_VV.tif`, `_VH.tif` + a JSON naming its
  `corresponding_s2_patch`.
- v2 (reBEN): `BigEarthNet-S2/<product>/<patch_id>/<patch_id>_<BAND>.tif`, where the product is the
  patch_id minus its last two `_`-parts; labels (19 classes only), splits and the Sentinel-1 name come
  from `metadata.parquet` (and `metadata_for_patches_with_snow_cloud_or_shadow.parquet`);
  `BigEarthNet-S1/<s1 product>/<s1_name>/<s1_name>_{VV,VH}.tif` with the S1 product being the
  s1_name minus its last three `_`-parts (tile, column, row). The root holds the parquet files.

Reading is on the hot path of `prepare` (13 files per patch, hundreds of thousands of patches), so
`read_patch` builds paths as strings, reads each raster with one system call (`tiff.read_band`) and
parses JSON with `json.loads`; everything that needs a scan (v2 metadata, the S1 pairing) is done once
per process and cached. Patch names are never parsed for dates: some real names lost the hour's
leading zero (`S2B_MSIL2A_20170924T93020_69_24`).
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import importlib.resources
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from bigearthnet_tf.constants import (
    BANDS_BY_NAME,
    BIGEARTHNET_19,
    BIGEARTHNET_19_LABELS,
    ORIGINAL,
    ORIGINAL_LABELS,
    PATCH_SIZE,
    S1_BAND_NAMES,
    S2_BAND_NAMES,
    original_to_19,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import InputFileError, check_regular_file, read_input_file
from bigearthnet_tf.tiff import MAX_BAND_FILE_BYTES, TiffError, decode_band, read_band

__all__ = [
    "Patch",
    "BadPatchError",
    "Archive",
    "ArchiveV1",
    "ArchiveV2",
    "archive_class",
    "open_archive",
    "detect_version",
    "read_patch",
    "missing_patches",
    "official_v1_splits",
    "snow_cloud_v1",
    "official_v2_splits",
    "snow_cloud_v2",
    "s1_pairs_v1",
    "v2_product",
    "v2_s1_product",
    "check_patch_name",
]

V1_S2_FOLDER = "BigEarthNet-v1.0"
V1_S1_FOLDER = "BigEarthNet-S1-v1.0"
V2_S2_FOLDER = "BigEarthNet-S2"
V2_S1_FOLDER = "BigEarthNet-S1"
V2_METADATA = "metadata.parquet"
V2_SNOW_CLOUD_METADATA = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
MAX_METADATA_FILE_BYTES = 1 << 20  # a patch's JSON is about 1 KB
V2_COLUMNS = (
    "patch_id",
    "labels",
    "split",
    "country",
    "s1_name",
    "s2v1_name",
    "contains_seasonal_snow",
    "contains_cloud_or_shadow",
)
V1_METADATA_SUFFIX = "_labels_metadata.json"

# v1 split lists and exclusion lists shipped as resources of bigearthnet-common.
_LIST_PACKAGE = "bigearthnet_common"
_V1_SPLIT_FILES = {"train": "train.csv.bz2", "val": "val.csv.bz2", "test": "test.csv.bz2"}
_V1_SNOW_FILE = "patches_with_seasonal_snow.csv.bz2"
_V1_CLOUD_FILE = "patches_with_cloud_and_shadow.csv.bz2"
_V1_S1_S2_TABLE = "s1_s2_name_country_season.csv.bz2"

# Pairing S1 to S2 by reading every S1 JSON costs ~15 us per folder; past this many folders the
# official table of bigearthnet-common (2 s to load) is cheaper for the names it knows.
_S1_JSON_SCAN_LIMIT = 50_000
# Checking this many names for a v1 patch folder costs about as much as listing the archive's folder.
_STAT_EACH_LIMIT = 1_000

_ORIGINAL_SET = frozenset(ORIGINAL_LABELS)
_INDEX_19 = {name: index for index, name in enumerate(BIGEARTHNET_19_LABELS)}
# (band name, expected shape) in archive order; computed once because read_patch runs per patch.
_S2_SHAPES = MappingProxyType({name: (BANDS_BY_NAME[name].size,) * 2 for name in S2_BAND_NAMES})
_S1_SHAPE = (PATCH_SIZE, PATCH_SIZE)
_UINT16 = np.dtype(np.uint16)
_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class Patch:
    """One patch: S2 bands at native size (uint16), labels in both nomenclatures, optional S1 bands."""

    name: str
    bands: dict[str, np.ndarray]
    labels_43: tuple[str, ...] | None
    labels_19: tuple[str, ...]
    s1_name: str | None = None
    s1_bands: dict[str, np.ndarray] | None = None


class BadPatchError(UserError):
    """A patch that cannot be read; the message is `patch <name>: <file>: <reason>`."""

    def __init__(self, patch: str, file: str, reason: str) -> None:
        super().__init__(f"patch {patch}: {file}: {reason}")
        self.patch = patch
        self.file = file
        self.reason = reason

    def __reduce__(self):
        # Workers of `prepare` raise this in another process; the default pickling would call
        # __init__ with the message alone and fail.
        return (type(self), (self.patch, self.file, self.reason))


def check_patch_name(name: str) -> str:
    """Return `name` if it is a plain folder name; raise UserError if it could leave the archive."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or (os.sep != "/" and os.sep in name)
        or name != name.strip()
    ):
        raise UserError(
            f"invalid patch name {name!r}: expected a patch folder name "
            "(no path separators, '..' or surrounding spaces)"
        )
    return name


def v2_product(patch_id: str) -> str:
    """The v2 S2 product folder of a patch_id: the patch_id minus its last two `_`-parts."""
    parts = patch_id.rsplit("_", 2)
    if len(parts) != 3 or parts[0] in ("", ".", ".."):  # '..__' would lead out of BigEarthNet-S2
        raise UserError(f"invalid v2 patch_id {patch_id!r}: expected <product>_<column>_<row>")
    return parts[0]


def v2_s1_product(s1_name: str) -> str:
    """The v2 S1 product folder of an s1_name: the name minus its last three `_`-parts (tile, column, row)."""
    parts = s1_name.rsplit("_", 3)
    if len(parts) != 4 or parts[0] in ("", ".", ".."):
        raise UserError(f"invalid v2 s1_name {s1_name!r}: expected <product>_<tile>_<column>_<row>")
    return parts[0]


# --------------------------------------------------------------------------------------------
# Archive layout


def detect_version(root: str | os.PathLike) -> int:
    """1 or 2, from what lies in `root`; UserError naming the folder if it is neither."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"archive root {root} does not exist or is not a folder")
    if (root / V2_METADATA).is_file() or (root / V2_S2_FOLDER).is_dir():
        return 2
    if root.name == V2_S2_FOLDER and (root.parent / V2_METADATA).is_file():
        return 2
    if (root / V1_S2_FOLDER).is_dir():
        return 1
    # A folder of v1 patch folders (the real archive under another name, the example patches):
    # look at the first few entries only, since the real archive has 590,326 of them.
    with os.scandir(root) as entries:
        for count, entry in enumerate(entries):
            if count >= 32:
                break
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, entry.name + V1_METADATA_SUFFIX)):
                return 1
    raise UserError(
        f"{root} is not a BigEarthNet archive: expected {V1_S2_FOLDER}/ or patch folders with "
        f"*{V1_METADATA_SUFFIX} (v1), or {V2_METADATA} and {V2_S2_FOLDER}/ (v2)"
    )


@dataclass(frozen=True)
class Archive(ABC):
    """Where an archive's patches are; `read_patch` reads one. Cheap to pickle (paths only).

    What differs between the versions (folder layout, where labels and the S1 pairing come from, the
    official splits) lives in `ArchiveV1` and `ArchiveV2`; `open_archive` picks one.
    """

    root: str  # v1: the folder holding the patch folders; v2: the folder holding metadata.parquet
    s2_dir: str  # v1: same as root; v2: root/BigEarthNet-S2
    s1_dir: str | None = None  # folder holding the S1 patch folders (v1) or S1 product folders (v2)
    s1_file: str | None = None  # or the downloaded S1 archive file (read by the stream phase)

    version: ClassVar[int]
    label_types: ClassVar[tuple[str, ...]]  # the label types its patches have
    s2_folder_name: ClassVar[str]
    s1_folder_name: ClassVar[str]
    # Per S2 patch, the file that holds its labels, as a suffix of the patch name (None: labels are
    # in the archive's metadata).
    labels_file_suffix: ClassVar[str | None]
    # The archive-wide metadata file beside the S2 folder: labels, splits and the S1 pairing (None:
    # each patch's JSON holds its labels, and each S1 folder's JSON names its S2 twin).
    metadata_file: ClassVar[str | None]
    official_source: ClassVar[str]  # where the official splits come from, for messages
    snow_cloud_optional: ClassVar[bool]  # whether official splits can keep snow/cloud patches

    @classmethod
    @abstractmethod
    def locate(cls, root: Path) -> tuple[Path, Path]:
        """(root, s2_dir) of an archive given its root (or, where the layout allows, its S2 folder);
        UserError when this version's folders are not there."""

    @classmethod
    def locate_s1(cls, s1_root: str | os.PathLike) -> str:
        """The folder of S1 patch folders (v1) or products (v2): `s1_root` or its folder of the
        version's name; UserError if `s1_root` is not a folder."""
        s1_path = Path(s1_root)
        if not s1_path.is_dir():
            raise UserError(f"Sentinel-1 root {s1_path} does not exist or is not a folder")
        inside = s1_path / cls.s1_folder_name
        return str(inside if inside.is_dir() else s1_path)

    @abstractmethod
    def patch_folder(self, name: str) -> str:
        """The folder of S2 patch `name` (a string path; no check that it exists)."""

    @abstractmethod
    def s1_folder(self, s1_name: str) -> str:
        """The folder of Sentinel-1 patch `s1_name`."""

    @abstractmethod
    def read_labels(self, name: str) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        """(43-class labels or None for v2, 19-class labels) of patch `name`; BadPatchError if unusable."""

    @abstractmethod
    def labels_of(
        self, name: str, files: Mapping[str, object] | None
    ) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        """`read_labels` for a patch whose files are in memory (None: no folder); the same checks."""

    @abstractmethod
    def patch_names(self) -> list[str]:
        """The names of the S2 patch folders on disk, sorted."""

    @abstractmethod
    def official_splits(self, include_snow_cloud: bool = False) -> dict[str, list[str]]:
        """The official split lists."""

    @abstractmethod
    def snow_cloud(self) -> frozenset[str]:
        """The names of patches with seasonal snow, clouds or cloud shadows."""

    @abstractmethod
    def _paired_s1(self, name: str) -> str | None:
        """The name of the S1 patch paired with S2 patch `name`, None if there is none; BadPatchError
        for a pairing that contradicts itself."""

    def s1_twins(self, names: Iterable[str]) -> dict[str, str] | None:
        """S1 name -> S2 name for the S2 patches `names` that the archive's metadata pairs with one;
        None where the pairing is in the S1 folders' files instead (v1)."""
        return None

    @property
    def file_suffixes(self) -> tuple[str, ...]:
        """What follows `<name>_` in the names of the files of a patch: the labels file, then the bands."""
        labels = () if self.labels_file_suffix is None else (self.labels_file_suffix[1:],)
        return (*labels, *(f"{band}.tif" for band in S2_BAND_NAMES))

    def patch_file_names(self, name: str) -> list[str]:
        """The files of S2 patch `name` that preparation reads: the labels file (v1), then the bands."""
        return [f"{name}_{suffix}" for suffix in self.file_suffixes]

    def read_patch(self, name: str) -> Patch:
        """Read one patch (and its S1 twin when the archive has an S1 folder); BadPatchError if unusable."""
        return self.with_s1(decode_patch_files(self, name, self.read_patch_files(name)))

    def read_patch_files(self, name: str) -> dict[str, object] | None:
        """The raw files of S2 patch `name`: file name -> bytes, or the OSError reading it raised
        (absent files are left out; `decode_patch_files` names them); None if there is no such
        folder. Only I/O: threads can run many of these at once on a cold disk."""
        folder = self.patch_folder(name)
        files: dict[str, object] = {}
        for file_name in self.patch_file_names(name):
            limit = MAX_METADATA_FILE_BYTES if file_name.endswith(".json") else MAX_BAND_FILE_BYTES
            try:
                files[file_name] = read_input_file(os.path.join(folder, file_name), limit)
            except FileNotFoundError:
                continue
            except OSError as error:
                files[file_name] = error
        if not files and not os.path.isdir(folder):
            return None
        return files

    @property
    def has_s1(self) -> bool:
        """Whether its patches carry Sentinel-1 bands, whichever way S1 is read (folder or file)."""
        return self.s1_dir is not None or self.s1_file is not None

    @property
    def s1_source(self) -> str | None:
        """The real path of the S1 folder or file, for job fingerprints; None without S1."""
        where = self.s1_dir or self.s1_file
        return None if where is None else os.path.realpath(where)

    def with_s1(self, patch: Patch) -> Patch:
        """`patch` with the bands of its Sentinel-1 twin, when this archive has an S1 folder."""
        if self.s1_dir is None:
            return patch
        s1_name = self.s1_name(patch.name)
        s1_bands = read_s1_bands(self.s1_folder(s1_name), patch.name, s1_name)
        return dataclasses.replace(patch, s1_name=s1_name, s1_bands=s1_bands)

    def present_official_splits(self) -> dict[str, list[str]]:
        """The official splits, with only the patches present on disk."""
        splits = self.official_splits()
        absent = set(self.missing_patches([name for names in splits.values() for name in names]))
        return {split: [name for name in names if name not in absent] for split, names in splits.items()}

    def missing_patches(self, names: Iterable[str]) -> list[str]:
        """The names among `names` that have no S2 patch folder, in the order given."""
        return [name for name in names if not os.path.isdir(self.patch_folder(name))]

    def s1_name(self, name: str) -> str:
        """The Sentinel-1 patch paired with S2 patch `name`; BadPatchError if there is none."""
        if self.s1_dir is None:
            raise UserError("this archive was opened without a Sentinel-1 folder")
        s1_name = self._paired_s1(name)
        where = self.metadata_file or self.s1_dir
        if not s1_name:
            raise BadPatchError(name, where, "no Sentinel-1 patch is paired with this patch")
        try:
            # It becomes a path: metadata must not lead out of the S1 folder.
            self.s1_folder(check_patch_name(s1_name))
        except UserError:
            raise BadPatchError(name, where, f"invalid Sentinel-1 patch name {s1_name!r}") from None
        return s1_name


@dataclass(frozen=True)
class ArchiveV1(Archive):
    """BigEarthNet v1: a folder per patch, labels in its JSON; S1 folders name their S2 twin."""

    version = 1
    label_types = (ORIGINAL, BIGEARTHNET_19)
    s2_folder_name = V1_S2_FOLDER
    s1_folder_name = V1_S1_FOLDER
    labels_file_suffix = V1_METADATA_SUFFIX
    metadata_file = None
    official_source = "the official v1 splits"
    snow_cloud_optional = False

    @classmethod
    def locate(cls, root: Path) -> tuple[Path, Path]:
        s2_dir = root / V1_S2_FOLDER if (root / V1_S2_FOLDER).is_dir() else root
        return s2_dir, s2_dir

    def patch_folder(self, name: str) -> str:
        return os.path.join(self.s2_dir, check_patch_name(name))

    def s1_folder(self, s1_name: str) -> str:
        return os.path.join(self.s1_dir, s1_name)

    def read_labels(self, name: str) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        return _read_v1_labels(self.patch_folder(name), name)

    def labels_of(
        self, name: str, files: Mapping[str, object] | None
    ) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        if files is None:
            raise BadPatchError(name, self.patch_folder(name), "no such patch folder")
        file_name = name + V1_METADATA_SUFFIX
        return decode_v1_labels(_file_bytes(files, file_name, name, "missing metadata file"), name, file_name)

    def patch_names(self) -> list[str]:
        return sorted(entry.name for entry in os.scandir(self.s2_dir) if entry.is_dir())

    def missing_patches(self, names: Iterable[str]) -> list[str]:
        # The official lists name 519,284 patches: a stat each costs seconds, one listing of the
        # folder a fraction of that.
        names = list(names)
        if len(names) < _STAT_EACH_LIMIT:
            return super().missing_patches(names)
        with os.scandir(self.s2_dir) as entries:
            present = {entry.name for entry in entries if entry.is_dir()}
        return [name for name in names if name not in present]

    def official_splits(self, include_snow_cloud: bool = False) -> dict[str, list[str]]:
        """bigearthnet-common's lists (they name every patch; a partial archive holds some)."""
        return official_v1_splits()

    def snow_cloud(self) -> frozenset[str]:
        return snow_cloud_v1()

    def _paired_s1(self, name: str) -> str | None:
        s1_name = s1_pairs_v1(self.s1_dir).get(name)
        if isinstance(s1_name, AmbiguousPair):
            raise BadPatchError(name, self.s1_dir, f"claimed by several Sentinel-1 patches: {s1_name}")
        return s1_name


@dataclass(frozen=True)
class ArchiveV2(Archive):
    """BigEarthNet v2 (reBEN): patches in product folders; labels, splits and the S1 pairing in
    metadata.parquet."""

    version = 2
    label_types = (BIGEARTHNET_19,)
    s2_folder_name = V2_S2_FOLDER
    s1_folder_name = V2_S1_FOLDER
    labels_file_suffix = None
    metadata_file = V2_METADATA
    official_source = f"the official v2 splits ({V2_METADATA})"
    snow_cloud_optional = True

    @classmethod
    def locate(cls, root: Path) -> tuple[Path, Path]:
        top = root.parent if root.name == V2_S2_FOLDER else root
        if not (top / V2_METADATA).is_file():
            raise UserError(f"{top} is not a BigEarthNet v2 archive: {V2_METADATA} is missing")
        if not (top / V2_S2_FOLDER).is_dir():
            raise UserError(f"{top} is not a BigEarthNet v2 archive: {V2_S2_FOLDER}/ is missing")
        return top, top / V2_S2_FOLDER

    def patch_folder(self, name: str) -> str:
        return os.path.join(self.s2_dir, v2_product(check_patch_name(name)), name)

    def s1_folder(self, s1_name: str) -> str:
        return os.path.join(self.s1_dir, v2_s1_product(s1_name), s1_name)

    def read_labels(self, name: str) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        metadata = _v2_metadata(self.root)
        if name in metadata.repeated:
            raise BadPatchError(name, V2_METADATA, f"listed twice in the metadata: {metadata.repeated[name]}")
        entry = metadata.get(name)
        if entry is None:
            raise BadPatchError(name, V2_METADATA, "patch is not listed in the archive's metadata")
        labels = entry[0]
        if labels is None:
            raise BadPatchError(
                name, V2_METADATA, "its labels cell is null (an empty list [] means no labels)"
            )
        unknown = [label for label in labels if label not in _INDEX_19]
        if unknown:
            raise BadPatchError(
                name, V2_METADATA, f"unknown label {unknown[0]!r} (not one of the 19 BigEarthNet-19 labels)"
            )
        return None, tuple(sorted(set(labels), key=_INDEX_19.__getitem__))

    def labels_of(
        self, name: str, files: Mapping[str, object] | None
    ) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        labels = self.read_labels(name)  # the metadata's faults come first: v2 has no labels file
        if files is None:
            raise BadPatchError(name, self.patch_folder(name), "no such patch folder")
        return labels

    def patch_names(self) -> list[str]:
        names = []
        for product in os.scandir(self.s2_dir):
            if product.is_dir():
                names.extend(entry.name for entry in os.scandir(product.path) if entry.is_dir())
        return sorted(names)

    def present_official_splits(self) -> dict[str, list[str]]:
        """The parquet's splits: the metadata describes the archive it comes with."""
        return self.official_splits()

    def official_splits(self, include_snow_cloud: bool = False) -> dict[str, list[str]]:
        return official_v2_splits(self.root, include_snow_cloud=include_snow_cloud)

    def snow_cloud(self) -> frozenset[str]:
        return snow_cloud_v2(self.root)

    def s1_twins(self, names: Iterable[str]) -> dict[str, str] | None:
        metadata = _v2_metadata(self.root)
        twins = {}
        for name in names:
            entry = metadata.get(name)
            if entry is not None and entry[1]:
                twins[entry[1]] = name
        return twins

    def _paired_s1(self, name: str) -> str | None:
        entry = _v2_metadata(self.root).get(name)
        return None if entry is None else entry[1]


ARCHIVE_VERSIONS: Mapping[int, type[Archive]] = MappingProxyType({1: ArchiveV1, 2: ArchiveV2})


def archive_class(version: object) -> type[Archive]:
    """The archive class of a version number; UserError naming it otherwise."""
    try:
        return ARCHIVE_VERSIONS[version]
    except (KeyError, TypeError):
        choices = " or ".join(map(str, ARCHIVE_VERSIONS))
        raise UserError(f"unknown archive version {version!r}; expected {choices}") from None


def open_archive(
    root: str | os.PathLike, *, version: int | None = None, s1_root: str | os.PathLike | None = None
) -> Archive:
    """Locate an archive's folders (version detected unless given); UserError if they are not there."""
    root_path = Path(root)
    if version is None:
        version = detect_version(root_path)
    kind = archive_class(version)
    if not root_path.is_dir():
        raise UserError(f"archive root {root_path} does not exist or is not a folder")
    top, s2_dir = kind.locate(root_path)
    s1_dir = None if s1_root is None else kind.locate_s1(s1_root)
    return kind(root=str(top), s2_dir=str(s2_dir), s1_dir=s1_dir)


@functools.lru_cache(maxsize=8)
def _cached_archive(root: str, version: int | None, s1_root: str | None) -> Archive:
    return open_archive(root, version=version, s1_root=s1_root)


def read_patch(
    root: str | os.PathLike,
    name: str,
    *,
    version: int | None = None,
    s1_root: str | os.PathLike | None = None,
) -> Patch:
    """Read patch `name` of the archive at `root` (see `Archive.read_patch`); layout looked up once."""
    archive = _cached_archive(os.fspath(root), version, None if s1_root is None else os.fspath(s1_root))
    return archive.read_patch(name)


def missing_patches(
    root: str | os.PathLike, names: Iterable[str], *, version: int | None = None
) -> list[str]:
    """The names among `names` with no S2 patch folder in the archive at `root`, in the order given."""
    return _cached_archive(os.fspath(root), version, None).missing_patches(names)


# --------------------------------------------------------------------------------------------
# Reading one patch


def _read_v1_labels(folder: str, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    file_name = name + V1_METADATA_SUFFIX
    try:
        raw = read_input_file(os.path.join(folder, file_name), MAX_METADATA_FILE_BYTES)
    except FileNotFoundError:
        if not os.path.isdir(folder):
            raise BadPatchError(name, folder, "no such patch folder") from None
        raise BadPatchError(name, file_name, "missing metadata file") from None
    except OSError as error:
        raise BadPatchError(name, file_name, f"cannot read: {error.strerror}") from None
    return decode_v1_labels(raw, name, file_name)


def _file_bytes(files: Mapping[str, object], file_name: str, name: str, missing: str):
    data = files.get(file_name)
    if data is None:
        raise BadPatchError(name, file_name, missing)
    if isinstance(data, OSError):
        raise BadPatchError(name, file_name, f"cannot read: {data.strerror}")
    return data


def decode_v1_labels(raw, name: str, file_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The labels in the bytes of a v1 `<name>_labels_metadata.json`; BadPatchError if unusable."""
    try:
        metadata = json.loads(bytes(raw))
    except (ValueError, RecursionError) as error:  # also too deep nesting, integers over 4,300 digits
        raise BadPatchError(name, file_name, f"malformed JSON: {error}") from None
    if not isinstance(metadata, dict) or "labels" not in metadata:
        raise BadPatchError(name, file_name, "no 'labels' key")
    labels = metadata["labels"]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise BadPatchError(name, file_name, "'labels' is not a list of label names")
    for label in labels:
        if label not in _ORIGINAL_SET:
            raise BadPatchError(
                name, file_name, f"unknown label {label!r} (not one of the 43 BigEarthNet labels)"
            )
    # Kept in the archive's order (the 43-class order in the real archive), as the 2019 records did.
    labels_43 = tuple(labels)
    return labels_43, original_to_19(labels_43)


def read_s2_bands(folder: str, name: str, bands: Iterable[str] = S2_BAND_NAMES) -> dict[str, np.ndarray]:
    """The named S2 bands of patch `name` in `folder`, uint16 at native size; BadPatchError if unusable."""
    prefix = os.path.join(folder, name + "_")
    return {
        band: read_raster(prefix + band + ".tif", _S2_SHAPES[band], _UINT16, name, folder) for band in bands
    }


def read_s1_bands(folder: str, name: str, s1_name: str) -> dict[str, np.ndarray]:
    """VV and VH of S1 patch `s1_name` in `folder`; errors are BadPatchErrors naming S2 patch `name`."""
    prefix = os.path.join(folder, s1_name + "_")
    return {
        band: read_raster(prefix + band + ".tif", _S1_SHAPE, _FLOAT32, name, folder) for band in S1_BAND_NAMES
    }


def decode_patch_files(
    archive: Archive,
    name: str,
    files: Mapping[str, object] | None,
    s1_name: str | None = None,
    s1_files: Mapping[str, object] | None = None,
) -> Patch:
    """`Archive.read_patch` for a patch whose files are in memory (file name -> bytes-like, or
    None for a patch without a folder), as `Archive.read_patch_files` or an archive file give
    them; the same checks, in the same order, and the same BadPatchErrors."""
    labels_43, labels_19 = archive.labels_of(name, files)
    bands = {
        band: decode_raster(files, f"{name}_{band}.tif", _S2_SHAPES[band], _UINT16, name)
        for band in S2_BAND_NAMES
    }
    if s1_name is None:
        return Patch(name, bands, labels_43, labels_19)
    s1_bands = {
        band: decode_raster(s1_files or {}, f"{s1_name}_{band}.tif", _S1_SHAPE, _FLOAT32, name)
        for band in S1_BAND_NAMES
    }
    return Patch(name, bands, labels_43, labels_19, s1_name, s1_bands)


def decode_raster(
    files: Mapping[str, object], file_name: str, shape: tuple[int, int], dtype: np.dtype, name: str
) -> np.ndarray:
    """One band of patch `name` from `files`; every failure is a BadPatchError naming the file."""
    data = _file_bytes(files, file_name, name, "missing band file")
    try:
        return decode_band(data, shape, dtype)
    except TiffError as error:
        raise BadPatchError(name, file_name, error.reason) from None


def read_raster(path: str, shape: tuple[int, int], dtype: np.dtype, name: str, folder: str) -> np.ndarray:
    """One band of patch `name` (in `folder`); every failure is a BadPatchError naming the file."""
    try:
        return read_band(path, shape, dtype)
    except TiffError as error:
        raise BadPatchError(name, os.path.basename(path), error.reason) from None
    except FileNotFoundError:
        if not os.path.isdir(folder):
            raise BadPatchError(name, folder, "no such patch folder") from None
        raise BadPatchError(name, os.path.basename(path), "missing band file") from None
    except OSError as error:
        raise BadPatchError(name, os.path.basename(path), f"cannot read: {error.strerror}") from None


def _package_list(file_name: str) -> tuple[str, ...]:
    resource = importlib.resources.files(_LIST_PACKAGE) / file_name
    return tuple(bz2.decompress(resource.read_bytes()).decode("ascii").split())


@functools.cache
def _official_v1_split_tuples() -> dict[str, tuple[str, ...]]:
    return {split: _package_list(file_name) for split, file_name in _V1_SPLIT_FILES.items()}


def official_v1_splits() -> dict[str, list[str]]:
    """The official v1 splits `train`, `val`, `test` (269,695 / 123,723 / 125,866 patch names)."""
    return {split: list(names) for split, names in _official_v1_split_tuples().items()}


@functools.cache
def snow_cloud_v1() -> frozenset[str]:
    """v1 patches with seasonal snow (61,707) or clouds and cloud shadows (9,280)."""
    return frozenset(_package_list(_V1_SNOW_FILE)) | frozenset(_package_list(_V1_CLOUD_FILE))


# --------------------------------------------------------------------------------------------
# Sentinel-1 pairing (v1)


@functools.cache
def _official_s1_to_s2() -> dict[str, str]:
    resource = importlib.resources.files(_LIST_PACKAGE) / _V1_S1_S2_TABLE
    lines = bz2.decompress(resource.read_bytes()).decode("ascii").splitlines()
    pairs = {}
    for line in lines[1:]:  # header: s1_name,s2_name,country,season
        s1_name, s2_name, _ = line.split(",", 2)
        pairs[s1_name] = s2_name
    return pairs


@functools.lru_cache(maxsize=4)
def s1_pairs_v1(s1_dir: str | os.PathLike) -> dict[str, str]:
    """S2 patch name -> S1 patch name for the S1 folders in `s1_dir`, from their JSON metadata."""
    s1_dir = os.fspath(s1_dir)
    try:
        s1_names = [entry.name for entry in os.scandir(s1_dir) if entry.is_dir()]
    except OSError as error:
        raise UserError(f"Sentinel-1 folder {s1_dir} cannot be listed: {error.strerror}") from None
    # The real archive's 590,326 pairs are in bigearthnet-common's table; reading that many JSON
    # files would take much longer. Folders the table does not know (synthetic archives) are read.
    known = _official_s1_to_s2() if len(s1_names) > _S1_JSON_SCAN_LIMIT else {}
    claims: dict[str, list[str]] = {}
    for s1_name in sorted(s1_names):
        s2_name = known.get(s1_name) or _corresponding_s2(s1_dir, s1_name)
        if s2_name is not None:
            claims.setdefault(s2_name, []).append(s1_name)
    # An S2 patch claimed by several S1 patches is a contradiction: no pair, and `Archive.s1_name`
    # names the claimants, rather than the folder listing order deciding.
    return {
        s2_name: names[0] if len(names) == 1 else AmbiguousPair(names) for s2_name, names in claims.items()
    }


class AmbiguousPair(str):
    """The value `s1_pairs_v1` gives an S2 patch that several Sentinel-1 patches claim."""

    def __new__(cls, claimants: Sequence[str]) -> AmbiguousPair:
        pair = super().__new__(cls, " and ".join(claimants))
        pair.claimants = tuple(claimants)
        return pair


def _corresponding_s2(s1_dir: str, s1_name: str) -> str | None:
    file_name = s1_name + V1_METADATA_SUFFIX
    try:
        raw = read_input_file(os.path.join(s1_dir, s1_name, file_name), MAX_METADATA_FILE_BYTES)
    except FileNotFoundError:
        return None  # not an S1 patch folder
    except OSError as error:
        reason = error.strerror or error
        raise UserError(f"Sentinel-1 patch {s1_name}: {file_name}: unreadable metadata ({reason})") from None
    return corresponding_s2(raw, s1_name)


def corresponding_s2(raw, s1_name: str, where: str = "") -> str:
    """The S2 patch named by the bytes of v1 S1 patch `s1_name`'s JSON; UserError (after `where: `,
    when given) if they are not JSON or name none."""
    problem = f"{where}: " if where else ""
    problem += f"Sentinel-1 patch {s1_name}: {s1_name + V1_METADATA_SUFFIX}: "
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise UserError(f"{problem}unreadable metadata ({error})") from None
    s2_name = metadata.get("corresponding_s2_patch") if isinstance(metadata, dict) else None
    if not isinstance(s2_name, str) or not s2_name:
        raise UserError(f"{problem}no 'corresponding_s2_patch' key")
    return s2_name


# --------------------------------------------------------------------------------------------
# v2 metadata


def _read_parquet(path: Path, columns: tuple[str, ...]):
    """Some columns of a metadata parquet file as a pyarrow Table of the types `_v2_column_type` gives;
    UserError naming the file and a column that is missing or holds values of another type."""
    import pyarrow.parquet as pq  # imported here: v1 never needs pyarrow

    try:
        check_regular_file(path)  # pyarrow would wait forever on a FIFO
        names = pq.read_schema(path).names
        # Only the columns this reading needs: other tools write files without `country` or
        # `s2v1_name` (TorchGeo's test data), and nothing here reads those.
        missing = [column for column in columns if column not in names]
        if missing:
            raise UserError(f"{path} has no column {missing[0]!r}; reading it needs {', '.join(columns)}")
        table = pq.read_table(path, columns=list(columns))
        # Parquet readers do not check UTF-8; invalid text would surface much later, in to_pylist.
        table.validate(full=True)
        for index, field in enumerate(table.schema):
            target, expected = _v2_column_type(field.name)
            if not _castable(field.type, target):
                raise UserError(f"{path}: column {field.name!r} holds {field.type}, expected {expected}")
            if field.type != target:  # one type per column, so both files' chunks can be joined
                table = table.set_column(index, field.name, table.column(index).cast(target))
        return table
    except UserError:
        raise
    except InputFileError as error:
        raise UserError(f"{path}: {error.strerror}") from None
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"{path} cannot be read as parquet: {error}") from None


def _v2_column_type(column: str) -> tuple:
    """(the arrow type a v2 metadata column is read as, what its values are in words)."""
    import pyarrow as pa

    if column == "labels":
        return pa.list_(pa.string()), "lists of label names"
    if column.startswith("contains_"):
        return pa.bool_(), "true/false flags"
    return pa.string(), "text"


def _castable(arrow_type, target) -> bool:
    """Whether a column of `arrow_type` holds the same values as `target`: large and dictionary-encoded
    text (other tools write those), and the null type of a column with no values, but never numbers."""
    import pyarrow as pa

    def text(kind) -> bool:
        if pa.types.is_dictionary(kind):
            return text(kind.value_type)
        return any(
            check(kind)
            for check in (
                pa.types.is_null,
                pa.types.is_string,
                pa.types.is_large_string,
                pa.types.is_string_view,
            )
        )

    if pa.types.is_null(arrow_type):
        return True
    if pa.types.is_list(target):
        lists = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
        return lists and text(arrow_type.value_type)
    if pa.types.is_boolean(target):
        return pa.types.is_boolean(arrow_type)
    return text(arrow_type)


def _v2_tables(root: str, columns: tuple[str, ...]) -> tuple:
    """(metadata.parquet, the snow/cloud/shadow parquet or None), these columns only."""
    # Not cached: the split lists are asked for once per run, and the whole tables of the real
    # archive would stay in memory in every worker process.
    main = _read_parquet(Path(root) / V2_METADATA, columns)
    flagged_path = Path(root) / V2_SNOW_CLOUD_METADATA
    flagged = _read_parquet(flagged_path, columns) if flagged_path.is_file() else None
    return main, flagged


@dataclass(frozen=True)
class _V2Metadata:
    """Per-patch lookups over both parquet files, kept columnar: for the 549,488 v2 patches, Python
    lists of every column would take ~570 MB in each worker process; this takes about a third."""

    rows: dict[str, int]  # patch_id -> row in the concatenation of the tables
    labels: object  # pyarrow ChunkedArray of lists of 19-class names
    s1_names: object  # pyarrow ChunkedArray of strings
    repeated: dict[str, str]  # patch_id listed more than once -> where (for the message)

    def get(self, patch_id: str) -> tuple[list[str] | None, str | None] | None:
        """(labels, None when the cell is null; s1_name), or None when the patch is not listed."""
        row = self.rows.get(patch_id)
        if row is None:
            return None
        return self.labels[row].as_py(), self.s1_names[row].as_py()


@functools.lru_cache(maxsize=4)
def _v2_metadata(root: str) -> _V2Metadata:
    import pyarrow as pa

    tables = [table for table in _v2_tables(root, ("patch_id", "labels", "s1_name")) if table is not None]
    files = [V2_METADATA, V2_SNOW_CLOUD_METADATA]
    rows: dict[str, int] = {}
    where: dict[str, str] = {}
    repeated: dict[str, str] = {}
    row = 0
    for file_name, table in zip(files, tables, strict=False):
        for index, name in enumerate(table.column("patch_id").to_pylist()):
            here = f"{file_name} row {index}"
            if name in rows:  # a contradiction whatever the rows say: refused for this patch
                repeated[name] = f"{where[name]} and {here}"
            rows.setdefault(name, row)
            where.setdefault(name, here)
            row += 1
    return _V2Metadata(
        rows=rows,
        repeated=repeated,
        # Typed, since tables without rows may have no chunks at all.
        labels=pa.chunked_array(
            [chunk for t in tables for chunk in t.column("labels").chunks], type=_v2_column_type("labels")[0]
        ),
        s1_names=pa.chunked_array(
            [chunk for t in tables for chunk in t.column("s1_name").chunks],
            type=_v2_column_type("s1_name")[0],
        ),
    )


def _columns(table, *names: str) -> list[list]:
    return [table.column(name).to_pylist() for name in names]


def _v2_top(root: str | os.PathLike) -> Path:
    top = Path(root)
    if top.name == V2_S2_FOLDER and not (top / V2_METADATA).is_file():
        top = top.parent
    if not (top / V2_METADATA).is_file():
        raise UserError(f"{top} is not a BigEarthNet v2 archive: {V2_METADATA} is missing")
    return top


def official_v2_splits(root: str | os.PathLike, include_snow_cloud: bool = False) -> dict[str, list[str]]:
    """Splits `train`, `validation`, `test` of a v2 archive from its parquet files (snow/cloud left out)."""
    top = _v2_top(root)
    flags = ("contains_seasonal_snow", "contains_cloud_or_shadow")
    main, flagged = _v2_tables(str(top), ("patch_id", "split", *flags))
    tables = [(top / V2_METADATA, main)]
    if include_snow_cloud:
        if flagged is None:
            raise UserError(
                f"{top / V2_SNOW_CLOUD_METADATA} is missing; it lists the snow/cloud/shadow patches"
            )
        tables.append((top / V2_SNOW_CLOUD_METADATA, flagged))
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for path, table in tables:
        for patch_id, split, snow, cloud in zip(*_columns(table, "patch_id", "split", *flags), strict=True):
            if (snow or cloud) and not include_snow_cloud:
                continue
            try:  # checked here, like the names of split CSV files, rather than when a patch is read
                check_patch_name(patch_id)
            except UserError as error:
                raise UserError(f"{path}: {error}") from None
            split = "validation" if split == "val" else split
            if split not in splits:
                raise UserError(
                    f"{path}: patch {patch_id} has split {split!r}; expected train, validation or test"
                )
            splits[split].append(patch_id)
    return splits


def snow_cloud_v2(root: str | os.PathLike) -> frozenset[str]:
    """v2 patch_ids with seasonal snow, clouds or cloud shadows (flagged or listed in the parquet files)."""
    columns = ("patch_id", "contains_seasonal_snow", "contains_cloud_or_shadow")
    main, flagged = _v2_tables(str(_v2_top(root)), columns)
    names: set[str] = set()
    for table in (main, flagged):
        if table is None:
            continue
        rows = zip(*_columns(table, *columns), strict=True)
        names.update(patch_id for patch_id, snow, cloud in rows if snow or cloud)
    if flagged is not None:
        names.update(flagged.column("patch_id").to_pylist())
    return frozenset(names)
