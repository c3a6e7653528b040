"""Patches for a model, straight from patch folders or an archive: found, read in threads, batched.

`locate_folders` / `locate_archive` find the patches (with the Sentinel-1 twin when the model reads
S1), `PatchReader` reads one patch as the model's inputs in the model's band order, and `batches`
reads a few batches ahead in a thread pool (GeoTIFF reads are system calls that release the GIL) and
yields batches of one fixed shape (the last padded), so a model function is traced once. No
TensorFlow here; `inference.predict_patches` runs a model over these batches.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigearthnet_tf.archive import (
    V2_METADATA,
    V2_S2_FOLDER,
    Archive,
    BadPatchError,
    check_patch_name,
    open_archive,
    read_s1_bands,
    read_s2_bands,
)
from bigearthnet_tf.archive_file import open_archive_file, patches_in_file
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import S1_INPUT
from bigearthnet_tf.prepare_splits import read_split_lists
from bigearthnet_tf.tarstream import is_archive_file

DEFAULT_BATCH_SIZE = 64  # patches per model call
PREFETCH_BATCHES = 2  # batches read ahead while the model runs on the current one


def default_read_threads() -> int:
    """Threads reading patches: 2 per core (reads wait on the disk more than on the CPU), at most 16."""
    return min(16, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class PatchLocation:
    """Where one patch's bands are: its S2 folder and, when needed, the archive that pairs its S1 twin."""

    name: str
    folder: str
    archive: Archive | None  # for the S1 pairing (and, in archive mode, for reading the whole patch)
    split: str | None = None  # the split list that named it (archive mode with splits)


class PatchReader:
    """Reads the model inputs of one patch: `{input key: array (side, side, channels)}` in band order.

    S2 bands stay uint16 (as in the records) until a batch is assembled; S1 bands are float32.
    """

    def __init__(self, band_order: Mapping[str, Sequence[str]], *, archive_mode: bool) -> None:
        self.band_order = {key: tuple(bands) for key, bands in band_order.items()}
        self.archive_mode = archive_mode
        self._s2_keys = [key for key in self.band_order if key != S1_INPUT]
        self._needs_s1 = S1_INPUT in self.band_order

    def read(self, location: PatchLocation) -> dict[str, np.ndarray]:
        """The stacked input arrays of a patch; BadPatchError naming the patch and file if unreadable."""
        if self.archive_mode:
            patch = location.archive.read_patch(location.name)  # type: ignore[union-attr]
            s2_bands, s1_bands = patch.bands, patch.s1_bands
        else:
            wanted = {band for key in self._s2_keys for band in self.band_order[key]}
            s2_bands = read_s2_bands(location.folder, location.name, wanted)
            s1_bands = _read_s1_twin(location) if self._needs_s1 else None
        return self.arrays(s2_bands, s1_bands)

    def arrays(self, s2_bands, s1_bands) -> dict[str, np.ndarray]:
        """The stacked input arrays of a patch's bands (S2 and, for models reading S1, S1)."""
        arrays = {}
        for key, bands in self.band_order.items():
            source = s1_bands if key == S1_INPUT else s2_bands
            arrays[key] = np.stack([source[band] for band in bands], axis=-1)  # type: ignore[index]
        return arrays


def _read_s1_twin(location: PatchLocation) -> dict[str, np.ndarray]:
    archive = location.archive
    assert archive is not None and archive.s1_dir is not None
    s1_name = archive.s1_name(location.name)  # BadPatchError when no S1 patch is paired
    return read_s1_bands(archive.s1_folder(s1_name), location.name, s1_name)


def check_archive_root(root: str | os.PathLike[str]) -> None:
    """UserError unless `root` is a folder or an archive file (what it holds is checked when it is
    opened)."""
    if not Path(root).is_dir() and not is_archive_file(root):
        raise UserError(f"--archive {root}: no such folder or archive file (.tar, .tar.gz, .tar.zst)")


def check_patch_folders(folders: Sequence[str | os.PathLike[str]], skip_bad: bool = False) -> None:
    """UserError naming the first argument that is not a patch folder, and what it is instead: a folder
    of patch folders (then: use --archive), or (unless `skip_bad`, which skips those later) a file,
    nothing, or a folder without band files."""
    for entry in folders:
        folder = Path(entry)
        name = folder.name or folder.resolve().name
        if folder.is_dir() and not (folder / f"{name}_B02.tif").exists():
            inner = _patch_folders_below(folder)
            if inner:
                raise UserError(
                    f"{folder} is not a patch folder: it holds {inner:,} patch folders; to predict them "
                    f"all, use --archive {folder}"
                )
        if skip_bad:
            continue
        if not folder.exists():
            raise BadPatchError(name, str(folder), "no such patch folder")
        if not folder.is_dir():
            raise BadPatchError(name, str(folder), "a file, not a patch folder (<patch>/<patch>_B02.tif ...)")


def _patch_folders_below(folder: Path, limit: int = 3) -> int:
    """How many patch folders lie up to `limit` levels below `folder` (an archive root or product)."""
    count = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_dir():
                continue
            if os.path.exists(os.path.join(entry.path, f"{entry.name}_B02.tif")):
                count += 1
            elif limit > 1:
                count += _patch_folders_below(Path(entry.path), limit - 1)
    return count


def locate_folders(
    folders: Sequence[str | os.PathLike[str]], *, s1_root: str | os.PathLike[str] | None, needs_s1: bool
) -> list[PatchLocation]:
    """Patch folders -> locations; the folder's name is the patch name. A v2 folder inside an archive
    (`BigEarthNet-S2/<product>/<patch_id>` beside `metadata.parquet`) is paired with S1 through it."""
    if needs_s1 and s1_root is None:
        raise UserError(
            "the model reads Sentinel-1 bands (bands_s1); give the Sentinel-1 root with --s1-root"
        )
    archives: dict[tuple[int, str], Archive] = {}
    locations: list[PatchLocation] = []
    seen: dict[str, str] = {}
    for entry in folders:
        folder = Path(entry)
        name = folder.name or folder.resolve().name
        check_patch_name(name)
        if name in seen:
            raise UserError(f"patch {name} is given twice: {seen[name]} and {folder}")
        seen[name] = str(folder)
        archive = None
        if needs_s1:
            top = folder.parent.parent
            v2 = folder.parent.parent.name == V2_S2_FOLDER and (top.parent / V2_METADATA).is_file()
            version, root = (2, str(top.parent)) if v2 else (1, str(folder.parent))
            archive = archives.get((version, root))
            if archive is None:
                archive = open_archive(root, version=version, s1_root=s1_root)
                archives[(version, root)] = archive
        locations.append(PatchLocation(name, str(folder), archive))
    return locations


def locate_archive(
    root: str | os.PathLike[str],
    *,
    split_files: Sequence[str | os.PathLike[str]] | None,
    official: bool,
    s1_root: str | os.PathLike[str] | None,
    needs_s1: bool,
    split: str | None = None,
) -> list[PatchLocation]:
    """The patches of an archive: those of the split lists (in list order, each once, with the name of
    the first split naming it; only split `split` when given), the official splits, or (neither)
    every patch folder on disk in name order."""
    archive = open_archive(root)
    if needs_s1:
        if s1_root is None:  # the S1 folder often lies beside the S2 one
            s1_folder = archive.s1_folder_name
            candidates = [Path(archive.root), Path(archive.root).parent]
            s1_root = next((c for c in candidates if (c / s1_folder).is_dir()), None)
            if s1_root is None:
                raise UserError(
                    "the model reads Sentinel-1 bands (bands_s1) and no Sentinel-1 folder lies beside "
                    f"{archive.root}; give it with --s1-root"
                )
        archive = open_archive(root, version=archive.version, s1_root=s1_root)
    if official:
        splits = archive.present_official_splits()
    elif split_files:
        splits = read_split_lists(split_files)
    else:
        splits = {None: archive.patch_names()}
    if split is not None:
        if split not in splits:
            known = ", ".join(str(name) for name in splits if name is not None) or "none (no --splits)"
            raise UserError(f"--split {split!r}: no such split; the splits given are {known}")
        splits = {split: splits[split]}
    pairs = [(name, split_of) for split_of, names in splits.items() for name in names]
    if official and not pairs:
        raise UserError(f"{root} holds none of the patches of the official v{archive.version} splits")
    first_split = dict(reversed(pairs))  # a patch in two lists is predicted once, under its first split
    if not first_split:
        raise UserError(f"no patches to predict in {root}")
    return [
        PatchLocation(name, archive.patch_folder(name), archive, first_split[name])
        for name in dict.fromkeys(n for n, _ in pairs)
    ]


@dataclass(frozen=True)
class ArchiveFileSource:
    """The patches of a downloaded archive file: read in one pass in the file's order (there are no
    folders to look into), those of `wanted` (name -> split) or, when None, all."""

    archive: Archive
    wanted: dict[str, str | None] | None
    official: bool  # absent patches of the official lists are normal (a partial download)


def locate_archive_file(
    path: str | os.PathLike[str],
    *,
    split_files: Sequence[str | os.PathLike[str]] | None,
    official: bool,
    s1_root: str | os.PathLike[str] | None,
    needs_s1: bool,
    split: str | None = None,
) -> ArchiveFileSource:
    """`locate_archive` for an archive file (S1 from a folder: `--s1-root`, or beside the file)."""
    if needs_s1 and s1_root is not None and is_archive_file(s1_root):
        raise UserError(
            f"--s1-root {s1_root}: predicting from archive files reads Sentinel-1 from its extracted folder"
        )
    archive = open_archive_file(path, None, None)
    if needs_s1:
        if s1_root is None:
            beside = Path(path).resolve().parent / archive.s1_folder_name
            if not beside.is_dir():
                raise UserError(
                    "the model reads Sentinel-1 bands (bands_s1) and no Sentinel-1 folder lies beside "
                    f"{path}; give it with --s1-root"
                )
            s1_root = beside
        archive = open_archive_file(path, archive.version, s1_root)
    if official:
        splits: dict | None = archive.official_splits()
    elif split_files:
        splits = read_split_lists(split_files)
    else:
        splits = None
    if split is not None:
        if splits is None or split not in splits:
            known = ", ".join(splits or ()) or "none (no --splits)"
            raise UserError(f"--split {split!r}: no such split; the splits given are {known}")
        splits = {split: splits[split]}
    wanted = None
    if splits is not None:
        wanted = {}
        for split_of, names in splits.items():
            for name in names:
                wanted.setdefault(name, split_of)  # a patch in two lists: under its first split
    return ArchiveFileSource(archive, wanted, official)


def archive_file_batches(
    reader: PatchReader,
    source: ArchiveFileSource,
    batch_size: int,
    skip_bad: bool,
    skipped: list[tuple[str, str]],
) -> Iterator[Batch]:
    """`batches` for an archive file: its wanted patches in the file's order. Listed patches the file
    does not hold are BadPatchErrors at the end (skipped with `skip_bad`; left out silently for the
    official lists, as on a partial archive)."""
    seen: set[str] = set()
    names: list[str] = []
    arrays: list[dict[str, np.ndarray]] = []
    attempted = 0

    def bad(name: str, error: BadPatchError) -> None:
        if not skip_bad:
            raise error
        skipped.append((name, str(error)))

    for item in patches_in_file(source.archive, source.wanted):
        attempted += 1
        if isinstance(item, BadPatchError):
            seen.add(item.patch)
            bad(item.patch, item)
        else:
            seen.add(item.name)
            names.append(item.name)
            arrays.append(reader.arrays(item.bands, item.s1_bands))
        if len(names) == batch_size:
            yield Batch(names, _stack(reader.band_order, arrays, batch_size), attempted)
            names, arrays, attempted = [], [], 0
    if names or attempted:
        yield Batch(names, _stack(reader.band_order, arrays, batch_size) if names else {}, attempted)
    if source.wanted is not None and not source.official:
        for name in source.wanted:
            if name not in seen:
                bad(name, BadPatchError(name, source.archive.s2_dir, "listed but not in the archive file"))


@dataclass
class Batch:
    """Patches read for one model call."""

    names: list[str]
    inputs: dict[str, np.ndarray]  # (batch_size, ...) float32; rows past len(names) are padding
    attempted: int  # patches read for this batch, skipped ones included (for the progress bar)


def batches(
    reader: PatchReader,
    locations: Sequence[PatchLocation],
    batch_size: int,
    workers: int,
    skip_bad: bool,
    skipped: list[tuple[str, str]],
) -> Iterator[Batch]:
    """Fixed-shape float32 batches, read by `workers` threads `PREFETCH_BATCHES` batches ahead."""
    chunks = (locations[start : start + batch_size] for start in range(0, len(locations), batch_size))
    pending: collections.deque[tuple[Sequence[PatchLocation], list[Future]]] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="patch-read")

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append((chunk, [pool.submit(reader.read, location) for location in chunk]))

    try:
        for _ in range(PREFETCH_BATCHES + 1):
            submit_next()
        while pending:
            chunk, futures = pending.popleft()
            submit_next()
            names, arrays = [], []
            for location, future in zip(chunk, futures, strict=True):
                try:
                    arrays.append(future.result())
                except BadPatchError as error:
                    if not skip_bad:
                        raise
                    skipped.append((location.name, str(error)))
                    continue
                names.append(location.name)
            if names:
                yield Batch(names, _stack(reader.band_order, arrays, batch_size), len(chunk))
            else:
                yield Batch([], {}, len(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stack(
    band_order: Mapping[str, Sequence[str]], arrays: list[dict[str, np.ndarray]], batch_size: int
) -> dict[str, np.ndarray]:
    """One float32 array per input key, padded with zeros to `batch_size` rows."""
    batch = {}
    for key in band_order:
        first = arrays[0][key]
        stacked = np.zeros((batch_size, *first.shape), dtype=np.float32)
        for row, patch in enumerate(arrays):
            stacked[row] = patch[key]
        batch[key] = stacked
    return batch


def patch_locations(
    patch_folders: Sequence[str | os.PathLike[str]],
    archive: str | os.PathLike[str] | None,
    split_files: Sequence[str | os.PathLike[str]] | None,
    official_splits: bool,
    split: str | None,
    s1_root: str | os.PathLike[str] | None,
    needs_s1: bool,
):
    """Where the patches to apply a model to are: folders, an archive folder, or an archive file."""
    if archive is None:
        return locate_folders(patch_folders, s1_root=s1_root, needs_s1=needs_s1)
    locate = locate_archive_file if is_archive_file(archive) else locate_archive
    return locate(
        archive, split_files=split_files, official=official_splits, s1_root=s1_root, needs_s1=needs_s1, split=split
    )
