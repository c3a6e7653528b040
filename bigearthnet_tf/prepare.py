"""Archive -> TFRecords: parallel over all cores, deterministic, atomic, resumable, `--skip-bad`.

`prepare(...)` (the `bigearthnet prepare` and `prep_splits.py` command) reads the patches named by
split lists and writes one `tf.train.Example` per patch (`records.py`), in list order.

Output layout in `out`:

- default format: `<split>-<i:05d>-of-<n:05d>.tfrecord`, shard `i` holding patches
  `[i * shard_size, (i + 1) * shard_size)` of the split's list (bad patches left out with `skip_bad`);
  the shard count depends only on the list and `shard_size`, never on `workers`, so a restarted run
  finds the same shards. A split always has at least one shard (an empty list gives one empty file).
- legacy format: exactly one `<split>.tfrecord` per split in the 2019 schema. Workers write parts of
  `LegacyFormat.part_size` patches; each part is appended, in list order, to the split's partial file as
  soon as the parts before it are in (then deleted), and the partial file is renamed when complete.
- `dataset.json`, the manifest (written last; its presence means the set is complete)::

      format               "default" | "legacy"
      format_version       1 (the `format_version` in each default record) | null (legacy)
      archive_version      1 | 2
      modalities           ["S2"] | ["S2", "S1"]
      bands                record key -> band names stored there, channels last
                           (default: bands_10m/20m/60m[, bands_s1]; legacy: B01 ... B12[, VV, VH])
      shapes               record key -> array shape ([120, 120, 4], ...; legacy [20, 20], ...)
      label_types          ["original", "BigEarthNet-19"] (v1) | ["BigEarthNet-19"] (v2)
      labels               label type -> class names in index order (the multi-hot order)
      shard_size           patches per shard (default format) | null (legacy)
      splits               split -> {"files": [...], "patches": written, "skipped": count}
      patches, skipped     totals
      skipped_report       "skipped.csv" with skip_bad, else null
      created_by           "bigearthnet-tf <version>"

- `skipped.csv` (only with `skip_bad`): header `split,patch,file,reason`, one row per skipped patch;
  per split, listed patches without a folder first, then unreadable ones, each in list order.

Atomicity and restarts: everything is first written under `out/.prepare-work/` (temporary names
carry the writer's pid) and renamed into place when complete. `job.json` there fingerprints the job
(archive, lists, format, shard size, S1, skip_bad) and `journal.jsonl` records each finished shard or
part. A run killed at any moment and started again with the same arguments keeps the finished shards
the journal vouches for, deletes temporary files, and redoes the rest; the work folder is removed when
the manifest is written. Existing outputs that do not belong to such an unfinished job are never
replaced unless `overwrite=True` (then the old files of these splits are deleted first).

Bad input (missing band file, wrong raster size, unreadable or truncated TIFF, malformed JSON,
unknown label, listed patch with no folder): by default the run stops with `archive.BadPatchError`
(`patch <name>: <file>: <reason>`) and leaves no TFRecord file of this job behind; with `skip_bad` such
patches are left out, listed in `skipped.csv` and counted in the manifest.

Workers (`workers`, default all usable cores; 1 runs in this process) import only numpy, the TIFF
reader and this module, never TensorFlow. They are forked when this process runs no other thread and
has not loaded TensorFlow (the command line); otherwise (tests, the demo, notebooks) they come from a
`forkserver`, a fresh interpreter. A worker killed from outside ends the run with a UserError; its
finished shards stay for a restart. Ctrl-C stops the workers and keeps finished shards too.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from bigearthnet_tf import __version__
from bigearthnet_tf.archive import (
    SPLIT_ALIASES,
    V2_METADATA,
    Archive,
    BadPatchError,
    decode_patch_files,
    open_archive,
    read_split_csv,
    split_name,
)
from bigearthnet_tf.constants import (
    BIGEARTHNET_19,
    BIGEARTHNET_19_LABELS,
    ORIGINAL,
    ORIGINAL_LABELS,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import append_synced_line
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.prepare_stream import (
    SPOOL_DIR_NAME,
    SpoolIndex,
    StreamJob,
    archive_identity,
    copy_records,
    open_spool,
    peek_version,
    stream_to_spool,
)
from bigearthnet_tf.record_formats import FORMAT_VERSION, RecordFormat, parse_record_format
from bigearthnet_tf.records import RecordWriter
from bigearthnet_tf.tarstream import ArchiveFileError, is_archive_file

__all__ = ["prepare", "PrepareSummary", "SkippedPatch", "DEFAULT_SHARD_SIZE", "MANIFEST_NAME"]

# ~80 MB per shard in the default format (about 160 kB per S2 record): large enough for efficient
# sequential reads, small enough that a few thousand patches still spread over all cores.
DEFAULT_SHARD_SIZE = 512

MANIFEST_NAME = "dataset.json"
SKIPPED_REPORT_NAME = "skipped.csv"
WORK_DIR_NAME = ".prepare-work"
_JOB_FILE = "job.json"
_JOURNAL_FILE = "journal.jsonl"
_TFRECORD_SUFFIX = ".tfrecord"
_TEMP_SUFFIX = ".tmp"
_SHARD_GLOB = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]" + _TFRECORD_SUFFIX
_PROGRESS_POLL_SECONDS = 0.1
# Patches each worker reads ahead from folders, each in a thread of its own, once reads are slow: a
# cold disk delivers several times more small files per second with many reads in flight than with one.
READ_AHEAD = 16
COLD_READ_SECONDS = 0.0005  # a patch's 13 files take ~60 us from the page cache, milliseconds from a disk
COLD_READS = 3  # slow reads that tell a cold disk from a passing hiccup


@dataclass(frozen=True)
class SkippedPatch:
    """A patch left out with `skip_bad`: which one, which file, what is wrong."""

    split: str
    patch: str
    file: str
    reason: str


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare` wrote: files and patch counts per split, skipped patches, time taken."""

    out: Path
    record_format: str
    files: dict[str, tuple[str, ...]]
    patches: dict[str, int]
    skipped: tuple[SkippedPatch, ...]
    seconds: float
    resumed_patches: int = 0
    # Where the time went, summed over threads and workers: read, decompress, parse, encode, write.
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_patches(self) -> int:
        """Patches written over all splits."""
        return sum(self.patches.values())


# --- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One worker task: a shard (default format) or a part of a split (legacy), written in list order."""

    split: str
    index: int
    file_name: str  # final name: a shard in `out`, or a part in the work folder
    names: tuple[str, ...]
    # From an archive file: per name its record in the spool (spool, offset, length) or its fault
    # (file, reason); None when patches are read from folders.
    places: tuple[tuple, ...] | None = None


@dataclass(frozen=True)
class _UnitResult:
    file_name: str
    written: int
    size: int
    skipped: tuple[tuple[str, str, str], ...]  # (patch, file, reason)
    error: tuple[str, str, str] | None = None  # the first bad patch when not skipping
    seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)  # read, encode, write


@dataclass
class _Plan:
    out: Path
    work_dir: Path
    record_format: RecordFormat
    shard_size: int | None
    archive: Archive
    splits: dict[str, list[str]]
    units: list[_Unit]
    index: SpoolIndex | None = None  # what the stream phase encoded, for an archive file
    # Final files in `out` per split, in order.
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fingerprint: str = ""


def _chunks(names: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """`names` cut into consecutive chunks of `size`; at least one (possibly empty) chunk."""
    count = max(1, math.ceil(len(names) / size))
    return [tuple(names[i * size : (i + 1) * size]) for i in range(count)]


def _plan_units(plan: _Plan) -> None:
    fmt = plan.record_format
    for split, names in plan.splits.items():
        chunks = _chunks(names, fmt.unit_patches(plan.shard_size))
        file_names = fmt.unit_files(split, len(chunks))
        plan.files[split] = fmt.split_files(split, len(chunks))
        for i, chunk in enumerate(chunks):
            places = None
            if plan.index is not None:
                places = tuple(plan.index.records.get(name) or plan.index.bad[name] for name in chunk)
            plan.units.append(_Unit(split, i, file_names[i], chunk, places))


def _fingerprint(plan: _Plan, skip_bad: bool) -> str:
    """A digest of everything that decides the output bytes; a restart resumes only when it matches."""
    job = {
        "format": plan.record_format.name,
        "format_version": FORMAT_VERSION,
        "shard_size": plan.shard_size,
        "part_size": plan.record_format.part_size,
        "archive": [plan.archive.version, os.path.realpath(plan.archive.s2_dir)],
        "s1": None if plan.archive.s1_dir is None else os.path.realpath(plan.archive.s1_dir),
        "skip_bad": skip_bad,
        "splits": plan.splits,
        "created_by": __version__,
    }
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode("utf-8")).hexdigest()


def _missing_patches(archive: Archive, splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per split, the names without a patch folder, in order.

    v1 lists its one folder of patch folders once (a stat per name costs seconds over the 519,284
    official names); v2 asks the archive, which knows its product folders.
    """
    if archive.version != 1:
        return {split: archive.missing_patches(names) for split, names in splits.items()}
    with os.scandir(archive.s2_dir) as entries:
        present = {entry.name for entry in entries if entry.is_dir()}
    return {split: [name for name in names if name not in present] for split, names in splits.items()}


def _without_contradictions(
    splits: dict[str, list[str]], sources: Mapping[str, str], skip_bad: bool
) -> tuple[dict[str, list[str]], list[SkippedPatch]]:
    """The splits without the patches that several lists (or one list twice) name: which split a
    patch belongs to would be a silent choice. BadPatchError naming both places, or with `skip_bad`
    every occurrence left out and reported."""
    places: dict[str, list[str]] = {}
    for split, names in splits.items():
        for name in names:
            places.setdefault(name, []).append(split)
    repeated = {name: found for name, found in places.items() if len(found) > 1}
    if not repeated:
        return splits, []
    if not skip_bad:
        name, (first, second, *_) = next(iter(repeated.items()))
        raise BadPatchError(
            name, sources[second], f"listed in split {first} ({sources[first]}) and again in split {second}"
        )
    kept = {split: [name for name in names if name not in repeated] for split, names in splits.items()}
    skipped = [
        SkippedPatch(split, name, sources[split], f"listed in several splits: {', '.join(found)}")
        for name, found in repeated.items()
        for split in dict.fromkeys(found)
    ]
    return kept, skipped


def _resolve_splits(
    archive: Archive,
    split_files: Sequence[str | os.PathLike] | None,
    official_splits: bool,
    exclude_snow_cloud: bool,
    include_snow_cloud: bool,
    skip_bad: bool,
    say: Callable[[str], None],
    missing_of: Callable[[dict[str, list[str]]], dict[str, list[str]]] | None = None,
) -> tuple[dict[str, list[str]], list[SkippedPatch]]:
    """Split name -> patch names in list order, and the listed patches that have no folder (skip_bad).

    `missing_of(splits)` gives per split the names that are not in the archive (default: those
    without a folder; for an archive file, those its stream did not hold)."""
    missing_of = missing_of or (lambda splits: _missing_patches(archive, splits))
    if include_snow_cloud and (archive.version != 2 or not official_splits):
        raise UserError(
            "--include-snow-cloud applies to the official v2 splits only (the v1 lists and user CSVs "
            "are taken as given; use --exclude-snow-cloud to drop flagged patches from CSVs)"
        )
    if official_splits and split_files:
        raise UserError("give either split files or the official splits, not both")
    if official_splits:
        if exclude_snow_cloud:
            raise UserError(
                "--exclude-snow-cloud applies to split CSVs; the official splits already leave out snow/cloud"
            )
        splits = archive.official_splits(include_snow_cloud=include_snow_cloud)
        listed = sum(len(names) for names in splits.values())
        missing = {name for names in missing_of(splits).values() for name in names}
        if len(missing) == listed:
            raise UserError(
                f"none of the {listed:,} patches of the official v{archive.version} splits is in "
                f"{archive.s2_dir}; is this the right archive root?"
            )
        if missing:
            # A partial archive (the example patches, a download in progress) is a normal use of the
            # official lists, so their absent patches are not errors: report the count and go on.
            splits = {split: [n for n in names if n not in missing] for split, names in splits.items()}
            say(
                f"official v{archive.version} splits: {listed - len(missing):,} of {listed:,} listed patches "
                f"are in {archive.s2_dir}; preparing those"
            )
        source = f"the official v{archive.version} splits" + (
            f" ({V2_METADATA})" if archive.version == 2 else ""
        )
        splits, skipped = _without_contradictions(splits, dict.fromkeys(splits, source), skip_bad)
        return _without_empty_splits(splits, say), skipped

    if not split_files:
        raise UserError("no split files given; pass CSV files (-n train.csv val.csv test.csv) or --official")
    splits: dict[str, list[str]] = {}
    sources: dict[str, Path] = {}
    for split_file in split_files:
        path = Path(split_file)
        split = split_name(path)
        for other in (split, SPLIT_ALIASES.get(split)):
            if other in sources:
                raise UserError(f"{path} and {sources[other]} both name split {split!r}")
        sources[split] = path
        splits[split] = read_split_csv(path)
    splits, skipped = _without_contradictions(
        splits, {split: str(path) for split, path in sources.items()}, skip_bad
    )
    if exclude_snow_cloud:
        flagged = archive.snow_cloud()
        for split, names in splits.items():
            kept = [name for name in names if name not in flagged]
            if len(kept) != len(names):
                say(f"{split}: left out {len(names) - len(kept):,} snow/cloud/shadow patches")
            splits[split] = kept

    for split, missing in missing_of(splits).items():
        if not missing:
            continue
        if not skip_bad:
            raise BadPatchError(
                missing[0],
                archive.patch_folder(missing[0]),
                f"listed in {sources[split]} but no such patch folder",
            )
        gone = set(missing)
        splits[split] = [name for name in splits[split] if name not in gone]
        skipped.extend(
            SkippedPatch(
                split,
                name,
                archive.patch_folder(name),
                f"listed in {sources[split]} but no such patch folder",
            )
            for name in missing
        )
    return _without_empty_splits(splits, say), skipped


def _without_empty_splits(splits: dict[str, list[str]], say: Callable[[str], None]) -> dict[str, list[str]]:
    """The splits that have patches left: an empty split gets no file (an empty record file would
    only make training or evaluation fail later); what was left out is said."""
    empty = [split for split, names in splits.items() if not names]
    for split in empty:
        say(f"split {split}: none of its patches is left to prepare; no {split} files are written")
    if len(empty) == len(splits):
        raise UserError("no patches left to prepare in any split")
    return {split: names for split, names in splits.items() if names}


# --- workers -------------------------------------------------------------------------------------

# Set in each worker by `_init_worker` (or in the parent for in-process runs).
_archive: Archive | None = None
_record_format: RecordFormat | None = None
_skip_bad = False
_work_dir = ""
_out = ""
_spool_dir = ""
_on_patch: Callable[[], None] = lambda: None  # noqa: E731


def _init_worker(
    archive: Archive,
    record_format: RecordFormat,
    skip_bad: bool,
    work_dir: str,
    out: str,
    spool_dir: str,
    counter,
) -> None:
    """Worker set-up: remember the job and count patches in a shared counter for the progress bar."""
    import signal

    # The parent handles Ctrl-C and terminates the pool; workers must not die mid-write on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _configure(archive, record_format, skip_bad, work_dir, out, spool_dir)

    def count_patch() -> None:
        with counter.get_lock():
            counter.value += 1

    global _on_patch
    _on_patch = count_patch


def _configure(
    archive: Archive, record_format: RecordFormat, skip_bad: bool, work_dir: str, out: str, spool_dir: str
) -> None:
    global _archive, _record_format, _skip_bad, _work_dir, _out, _spool_dir
    _archive, _record_format, _skip_bad = archive, record_format, skip_bad
    _work_dir, _out, _spool_dir = work_dir, out, spool_dir


def _patch_files(names: Sequence[str]) -> Iterator[tuple[str, dict | None]]:
    """(name, its raw files) in order. Read here while reads are fast (a warm page cache: threads
    would only cost CPU); once COLD_READS patches took longer than COLD_READ_SECONDS each, the rest
    are read ahead in READ_AHEAD threads, so that a cold disk has many reads in flight."""
    position = slow = 0
    for name in names:
        started = time.perf_counter()
        files = _archive.read_patch_files(name)
        slow += time.perf_counter() - started > COLD_READ_SECONDS
        position += 1
        yield name, files
        if slow >= COLD_READS:
            break
    rest = names[position:]
    if not rest:
        return
    with ThreadPoolExecutor(READ_AHEAD, "patch-reader") as pool:
        futures: list[tuple[str, Future]] = []
        for name in rest:
            futures.append((name, pool.submit(_archive.read_patch_files, name)))
            if len(futures) > READ_AHEAD:
                name, future = futures.pop(0)
                yield name, future.result()
        for name, future in futures:
            yield name, future.result()


def _write_unit(unit: _Unit) -> _UnitResult:
    """Read, encode and write one unit to a temporary file, then rename it to its final name."""
    temporary = os.path.join(_work_dir, f"{unit.file_name}.{os.getpid()}{_TEMP_SUFFIX}")
    final_dir = _out if _record_format.sharded else _work_dir
    try:
        if unit.places is None:
            result = _encode_unit(unit, temporary)
        else:
            result = _copy_unit(unit, temporary)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if result.error is None:
        os.replace(temporary, os.path.join(final_dir, unit.file_name))
    return result


def _encode_unit(unit: _Unit, temporary: str) -> _UnitResult:
    """Read the unit's patches from their folders (`_patch_files`), encode, write."""
    serialize = _record_format.serialize
    skipped: list[tuple[str, str, str]] = []
    read = encode = write = 0.0
    with RecordWriter(temporary) as writer:
        patches = _patch_files(unit.names)
        while True:
            started = time.perf_counter()
            name, files = next(patches, (None, None))
            if name is None:
                break
            waited = time.perf_counter()
            try:
                record = serialize(_archive.with_s1(decode_patch_files(_archive, name, files)))
            except BadPatchError as error:
                if not _skip_bad:
                    writer.close()
                    os.unlink(temporary)
                    return _UnitResult(unit.file_name, 0, 0, (), (error.patch, error.file, error.reason))
                skipped.append((error.patch, error.file, error.reason))
                encoded = time.perf_counter()
            else:
                encoded = time.perf_counter()
                writer.write(record)
            read += waited - started
            encode += encoded - waited
            write += time.perf_counter() - encoded
            _on_patch()
        started = time.perf_counter()
        writer.flush(sync=True)
        write += time.perf_counter() - started
        written = writer.count
    return _UnitResult(
        unit.file_name, written, os.path.getsize(temporary), tuple(skipped), seconds=(read, encode, write)
    )


def _is_whole_file(records: list[tuple[str, int, int]], path: str) -> bool:
    """Whether `records` ((spool, offset, length), ...) are one spool file from its start to its end."""
    position = 0
    for spool, offset, length in records:
        if spool != records[0][0] or offset != position:
            return False
        position += length
    return os.path.getsize(path) == position


def _copy_unit(unit: _Unit, temporary: str) -> _UnitResult:
    """Write the unit from records the stream phase encoded into the spool, in list order."""
    started = time.perf_counter()
    skipped = [(name, *place) for name, place in zip(unit.names, unit.places, strict=True) if len(place) == 2]
    if skipped and not _skip_bad:
        return _UnitResult(unit.file_name, 0, 0, (), skipped[0])
    records = [place for place in unit.places if len(place) == 3]
    spool = os.path.join(_spool_dir, records[0][0]) if records else ""
    if records and _is_whole_file(records, spool):
        # The common case: one worker wrote exactly this unit, in order. Rename it, once on disk.
        fd = os.open(spool, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(spool, temporary)
    else:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            copy_records(fd, records, _spool_dir)
            os.fsync(fd)
        finally:
            os.close(fd)
    for _ in unit.names:
        _on_patch()
    seconds = (0.0, 0.0, time.perf_counter() - started)
    return _UnitResult(
        unit.file_name, len(records), os.path.getsize(temporary), tuple(skipped), seconds=seconds
    )


# --- the job folder: fingerprint, journal, clean-up ------------------------------------------------


def _read_journal(work_dir: Path) -> dict[str, dict]:
    """Finished files recorded by an earlier run of the same job (a torn last line is ignored)."""
    entries: dict[str, dict] = {}
    try:
        text = (work_dir / _JOURNAL_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        entries[entry["file"]] = entry
    return entries


def _journal_append(work_dir: Path, entry: dict) -> None:
    append_synced_line(work_dir / _JOURNAL_FILE, entry)


def _write_atomically(path: Path, text: str, work_dir: Path) -> None:
    temporary = work_dir / f"{path.name}.{os.getpid()}{_TEMP_SUFFIX}"
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _remove_temporaries(work_dir: Path) -> None:
    for entry in os.scandir(work_dir):
        if entry.name.endswith(_TEMP_SUFFIX):
            os.unlink(entry.path)


def _final_paths(plan: _Plan) -> list[Path]:
    return [plan.out / name for names in plan.files.values() for name in names]


def _stale_outputs(plan: _Plan) -> list[Path]:
    """Files in `out` that this job would replace or that would mix with it (other shard counts)."""
    found = [plan.out / MANIFEST_NAME, plan.out / SKIPPED_REPORT_NAME, *_final_paths(plan)]
    for split in plan.splits:
        found.append(plan.out / (split + _TFRECORD_SUFFIX))
        found.extend(plan.out.glob(glob.escape(split) + _SHARD_GLOB))
    unique = dict.fromkeys(path for path in found if path.exists())
    return list(unique)


def _discard_job(plan: _Plan) -> None:
    """Remove every file of this job: temporaries, parts, and the shards it has renamed into place."""
    for path in _final_paths(plan):
        path.unlink(missing_ok=True)
    shutil.rmtree(plan.work_dir, ignore_errors=True)


def _start_or_resume(
    plan: _Plan, overwrite: bool, say: Callable[[str], None]
) -> tuple[dict[str, dict], dict[str, int]]:
    """Make the work folder ready; return the journal entries of what an earlier run finished, and
    per legacy split the number of parts already appended (see `_resume_parts`)."""
    job_file = plan.work_dir / _JOB_FILE
    try:
        previous = json.loads(job_file.read_text(encoding="utf-8")).get("fingerprint")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        previous = None

    if previous == plan.fingerprint:
        _remove_temporaries(plan.work_dir)
        journal = _read_journal(plan.work_dir)
        done = {}
        parts = set() if plan.record_format.sharded else {unit.file_name for unit in plan.units}
        for name, entry in journal.items():
            path = (plan.work_dir if name in parts else plan.out) / name
            if path.exists() and path.stat().st_size == entry["bytes"]:
                done[name] = entry
        # Parts that the journal does not vouch for are redone.
        for entry in os.scandir(plan.work_dir):
            if entry.name in parts and entry.name not in done:
                os.unlink(entry.path)
        appended = {} if plan.record_format.sharded else _resume_parts(plan, journal, done)
        if done:
            say(f"resuming an unfinished run in {plan.out}: {len(done)} finished file(s) kept")
        return done, appended

    if plan.work_dir.exists():
        # Without a job file nothing was written yet (it is written first): a leftover of ours.
        if previous is not None and not overwrite:
            raise UserError(
                f"{plan.work_dir} holds an unfinished preparation with other arguments; rerun that "
                "command to finish it, or pass --overwrite to discard it"
            )
        shutil.rmtree(plan.work_dir)
    stale = _stale_outputs(plan)
    if stale and not overwrite:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise UserError(f"{stale[0]} exists{more}; pass --overwrite to replace it")
    for path in stale:
        path.unlink()
    plan.work_dir.mkdir(parents=True)
    _write_atomically(job_file, json.dumps({"fingerprint": plan.fingerprint}) + "\n", plan.work_dir)
    return {}, {split: 0 for split in plan.splits}


def _partial_name(split: str) -> str:
    return f"{split}{_TFRECORD_SUFFIX}.partial"


def _append_file(source: Path, target_fd: int) -> None:
    """Append the bytes of `source` to the open file `target_fd` (in the kernel where possible)."""
    with open(source, "rb") as handle:
        remaining = os.fstat(handle.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(handle.fileno(), target_fd, remaining)
                if copied == 0:
                    raise OSError("copy_file_range copied nothing")
                remaining -= copied
        except OSError:  # file systems without copy_file_range: copy what is left in Python
            handle.seek(os.fstat(handle.fileno()).st_size - remaining)
            while chunk := handle.read(1 << 20):
                os.write(target_fd, chunk)


def _resume_parts(plan: _Plan, journal: dict[str, dict], done: dict[str, dict]) -> dict[str, int]:
    """Per split written in parts, the parts already appended to its partial file by an earlier run.

    The partial file is cut back to the size the journal recorded (bytes appended after that were
    not recorded); if it is shorter than recorded (power loss), the split starts over. Appended
    parts count as done (their files are gone; their journal entries keep their tallies).
    """
    appended = {}
    for split in plan.splits:
        appended[split] = 0
        if plan.files[split][0] in done:
            continue
        path = plan.work_dir / _partial_name(split)
        entry = journal.get(_partial_name(split))
        units = [unit for unit in plan.units if unit.split == split]
        if (
            entry is not None
            and path.exists()
            and path.stat().st_size >= entry["bytes"]
            and all(unit.file_name in journal for unit in units[: entry["parts"]])
        ):
            os.truncate(path, entry["bytes"])
            appended[split] = entry["parts"]
            done.update({unit.file_name: journal[unit.file_name] for unit in units[: entry["parts"]]})
        else:
            path.unlink(missing_ok=True)
    return appended


def _join_parts(plan: _Plan, split: str, finished: dict[str, dict], appended: dict[str, int]) -> None:
    """Append the split's finished parts that are next in list order to its partial file; when all
    are in, rename it to `<split>.tfrecord`. Parts are deleted once appended, so the disk holds
    little more than one copy of the split."""
    final_name = plan.files[split][0]
    if final_name in finished:
        return
    parts = [unit.file_name for unit in plan.units if unit.split == split]
    partial = plan.work_dir / _partial_name(split)
    if appended[split] < len(parts) and parts[appended[split]] in finished:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            while appended[split] < len(parts) and parts[appended[split]] in finished:
                part = plan.work_dir / parts[appended[split]]
                _append_file(part, fd)
                appended[split] += 1
                size = os.fstat(fd).st_size
                _journal_append(
                    plan.work_dir, {"file": partial.name, "bytes": size, "parts": appended[split]}
                )
                part.unlink()
            if appended[split] == len(parts):
                os.fsync(fd)
        finally:
            os.close(fd)
    if appended[split] < len(parts):
        return
    if not partial.exists():  # an empty split whose one empty part was already appended
        partial.touch()
    size = partial.stat().st_size
    os.replace(partial, plan.out / final_name)
    entry = {
        "file": final_name,
        "bytes": size,
        "patches": sum(finished[part]["patches"] for part in parts),
        "skipped": [item for part in parts for item in finished[part]["skipped"]],
    }
    _journal_append(plan.work_dir, entry)
    finished[final_name] = entry


def _pending_units(plan: _Plan, finished: dict[str, dict]) -> tuple[list[_Unit], int]:
    """Units still to write (largest first) and the number of patches an earlier run finished."""
    pending, resumed = [], 0
    for unit in plan.units:
        split_done = not plan.record_format.sharded and plan.files[unit.split][0] in finished
        if split_done or unit.file_name in finished:
            resumed += len(unit.names)
        else:
            pending.append(unit)
    # Largest first, so that the last tasks are short and no core waits long at the end.
    pending.sort(key=lambda unit: -len(unit.names))
    return pending, resumed


def _split_entries(plan: _Plan, split: str, finished: dict[str, dict]) -> list[dict]:
    """The journal entries that make up a finished split, in list order."""
    if not plan.record_format.sharded:
        return [finished[plan.files[split][0]]]
    return [finished[unit.file_name] for unit in plan.units if unit.split == split]


# --- manifest, report, summary -------------------------------------------------------------------


def _manifest(plan: _Plan, patches: dict[str, int], skipped: dict[str, int], skip_bad: bool) -> dict:
    with_s1 = plan.archive.s1_dir is not None
    modality = Modality.MM if with_s1 else Modality.S2
    label_types = [ORIGINAL, BIGEARTHNET_19] if plan.archive.version == 1 else [BIGEARTHNET_19]
    labels = {ORIGINAL: list(ORIGINAL_LABELS), BIGEARTHNET_19: list(BIGEARTHNET_19_LABELS)}
    return {
        "format": plan.record_format.name,
        "format_version": plan.record_format.format_version,
        "archive_version": plan.archive.version,
        "modalities": ["S2", "S1"] if with_s1 else ["S2"],
        "bands": plan.record_format.bands(modality),
        "shapes": plan.record_format.shapes(modality),
        "label_types": label_types,
        "labels": {label_type: labels[label_type] for label_type in label_types},
        "shard_size": plan.shard_size,
        "splits": {
            split: {"files": list(plan.files[split]), "patches": patches[split], "skipped": skipped[split]}
            for split in plan.splits
        },
        "patches": sum(patches.values()),
        "skipped": sum(skipped.values()),
        "skipped_report": SKIPPED_REPORT_NAME if skip_bad else None,
        "created_by": f"bigearthnet-tf {__version__}",
    }


def _skipped_report(skipped: Sequence[SkippedPatch]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "patch", "file", "reason"])
    writer.writerows((item.split, item.patch, item.file, item.reason) for item in skipped)
    return buffer.getvalue()


def _print_summary(summary: PrepareSummary, console) -> None:
    rate = summary.total_patches / summary.seconds if summary.seconds > 0 else 0.0
    lines = [
        f"prepared {summary.total_patches:,} patches ({summary.record_format} format) in "
        f"{summary.seconds:.1f} s, {rate:,.0f} patches/s -> {summary.out}"
    ]
    skipped_by_split: dict[str, int] = {}
    for item in summary.skipped:
        skipped_by_split[item.split] = skipped_by_split.get(item.split, 0) + 1
    for split, count in summary.patches.items():
        files = len(summary.files[split])
        lines.append(
            f"  {split}: {count:,} patches in {files} file{'s' if files != 1 else ''}"
            + (f", {skipped_by_split[split]:,} skipped" if split in skipped_by_split else "")
        )
    lines.append(
        f"  skipped: {len(summary.skipped):,}"
        + (f" (see {summary.out / SKIPPED_REPORT_NAME})" if summary.skipped else "")
    )
    if summary.resumed_patches:
        lines.append(f"  resumed: {summary.resumed_patches:,} patches were already done by an earlier run")
    if summary.stage_seconds:
        stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in summary.stage_seconds.items())
        lines.append(f"  time: {stages} (summed over threads and worker processes)")
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


# --- running -------------------------------------------------------------------------------------


def _progress_bar(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class PatchRateColumn(ProgressColumn):
        """Patches per second, smoothed by rich over the last seconds."""

        def render(self, task) -> Text:
            # Average over this run (patches done by an earlier run do not count).
            done = task.completed - task.fields.get("resumed", 0)
            if not task.elapsed or done <= 0:
                return Text("-- patches/s", style="progress.data.speed")
            return Text(f"{done / task.elapsed:,.0f} patches/s", style="progress.data.speed")

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        PatchRateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _worker_context() -> multiprocessing.context.BaseContext:
    """How worker processes start: `fork` when that is safe, else a `forkserver` started right away.

    Forking copies this process in milliseconds, which is safe while it runs no other thread and
    has not loaded TensorFlow (whose threads and locks a fork must not copy): the command line case.
    Otherwise (tests, the demo, notebooks) workers come from a fork server, a fresh interpreter that
    imports only this module; it is started here so that its imports overlap the planning.
    """
    if (
        "fork" in multiprocessing.get_all_start_methods()
        and "tensorflow" not in sys.modules
        and threading.active_count() == 1
    ):
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    # `__main__` stays first as in multiprocessing's default, so workers do not re-import the script.
    context.set_forkserver_preload(["__main__", __name__])
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return context


class _Workers:
    """Runs units in worker processes (or in this process for one worker), yielding results as they end.

    All units are submitted at construction, so the processes exist before the progress bar starts
    its refresh thread (a fork then copies no running thread). A worker that dies (killed, out of
    memory) turns into a UserError instead of a wait without end.
    """

    def __init__(
        self,
        units: list[_Unit],
        workers: int,
        context: multiprocessing.context.BaseContext | None,
        settings: tuple,
    ) -> None:
        self._units = units
        self._executor: ProcessPoolExecutor | None = None
        self._futures: set[Future] = set()
        if context is not None and workers > 1 and len(units) > 1:
            self._counter = context.Value("q", 0)
            self._executor = ProcessPoolExecutor(
                max_workers=min(workers, len(units)),
                mp_context=context,
                initializer=_init_worker,
                initargs=(*settings, self._counter),
            )
            self._futures = {self._executor.submit(_write_unit, unit) for unit in units}
        else:
            _configure(*settings)

    def results(self, advance: Callable[[int], None]) -> Iterator[_UnitResult]:
        """Run every unit; `advance(n)` is called as patches get done."""
        global _on_patch
        if self._executor is None:
            _on_patch = lambda: advance(1)  # noqa: E731
            try:
                for unit in self._units:
                    yield _write_unit(unit)
            finally:
                _on_patch = lambda: None  # noqa: E731
            return
        seen = 0
        pending = self._futures
        while pending:
            done, pending = wait(pending, timeout=_PROGRESS_POLL_SECONDS, return_when=FIRST_COMPLETED)
            current = self._counter.value
            advance(current - seen)
            seen = current
            # Results first, so that units finished alongside a failure are still recorded.
            for future in sorted(done, key=lambda future: future.exception() is not None):
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise UserError(
                        "a worker process died unexpectedly (killed, or out of memory?); finished files "
                        "are kept: run the same command again to resume"
                    ) from None
                yield result
        self._executor.shutdown(wait=True)
        self._executor = None

    def close(self) -> None:
        """Stop unfinished work at once: workers are terminated, not waited for."""
        if self._executor is None:
            return
        # ProcessPoolExecutor cannot terminate its workers before Python 3.14; its process table
        # is private, hence the getattr.
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        self._executor.shutdown(wait=True)
        self._executor = None


def _open_archive_file(
    path: str | os.PathLike, version: int | None, s1_root: str | os.PathLike | None
) -> Archive:
    """The `Archive` of an archive file: its version (from its members), where the v2 metadata is
    (beside the file), and the Sentinel-1 folder when S1 is a folder rather than a file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"archive file {path} does not exist or is not a file")
    found = peek_version(path)
    if version is not None and version != found:
        raise UserError(f"{path} holds a v{found} archive, not v{version}")
    top = os.path.dirname(os.path.abspath(path))
    if found == 2 and not os.path.isfile(os.path.join(top, V2_METADATA)):
        raise UserError(f"{path}: a v2 archive needs {V2_METADATA} beside it, in {top}")
    s1_dir = None
    if s1_root is not None and not is_archive_file(s1_root):
        s1_dir = open_archive(top if found == 2 else s1_root, version=found, s1_root=s1_root).s1_dir
    elif s1_root is not None and peek_version(os.fspath(s1_root), s1=True) != found:
        raise UserError(f"{s1_root} is not a Sentinel-1 archive of the same version (v{found}) as {path}")
    return Archive(version=found, root=top if found == 2 else path, s2_dir=path, s1_dir=s1_dir)


def _stream_phase(
    archive: Archive,
    root: str | os.PathLike,
    s1_root: str | os.PathLike | None,
    listed: dict[str, list[str]],
    record_format: RecordFormat,
    shard_size: int | None,
    workers: int,
    skip_bad: bool,
    overwrite: bool,
    context,
    out: Path,
    console,
    say: Callable[[str], None],
) -> SpoolIndex:
    """Stream the archive file into the spool (`prepare_stream`), with a progress bar in bytes and patches."""
    s1_file = os.fspath(s1_root) if s1_root is not None and archive.s1_dir is None else None
    spool_dir = out / SPOOL_DIR_NAME
    job = {
        "format": record_format.name,
        "format_version": FORMAT_VERSION,
        "skip_bad": skip_bad,
        "version": archive.version,
        "s2": archive_identity(os.fspath(root)),
        "s1": archive_identity(s1_file) if s1_file else archive.s1_dir and os.path.realpath(archive.s1_dir),
        "splits": listed,
        "created_by": __version__,
    }
    # The shards (or legacy parts) if the file holds every listed patch: the stream phase hands
    # patches to workers shard by shard, so that each spool file is a shard in the common case.
    tentative = _Plan(out, out / WORK_DIR_NAME, record_format, shard_size, archive, listed, [])
    _plan_units(tentative)
    units = {
        name: (i, place) for i, unit in enumerate(tentative.units) for place, name in enumerate(unit.names)
    }
    resumable = (spool_dir / _JOB_FILE).exists() or (out / WORK_DIR_NAME / _JOB_FILE).exists()
    if not overwrite and not resumable:
        # Refuse existing outputs now rather than after a whole pass over the archive.
        stale = _stale_outputs(tentative)
        if stale:
            more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
            raise UserError(f"{stale[0]} exists{more}; pass --overwrite to replace it")
    done = open_spool(spool_dir, job, overwrite, say)
    unit_patches = record_format.unit_patches(shard_size)
    stream_job = StreamJob(
        archive,
        os.fspath(root),
        s1_file,
        units,
        unit_patches,
        record_format,
        workers,
        skip_bad,
        spool_dir,
        context,
    )
    progress = _stream_progress(console)
    size = os.path.getsize(root)
    tasks = {
        "bytes": progress.add_task(f"reading {os.path.basename(root)}", total=size, unit="bytes"),
        "patches": progress.add_task("encoding", total=len(units), completed=len(done), unit="patches"),
    }
    try:
        return stream_to_spool(
            stream_job, done, say, lambda kind, count: progress.update(tasks[kind], completed=count), progress
        )
    except (BadPatchError, ArchiveFileError):
        shutil.rmtree(spool_dir, ignore_errors=True)
        raise


def _stream_progress(console):
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class AmountColumn(ProgressColumn):
        """Done / total and the rate over this run, in bytes or patches."""

        def render(self, task) -> Text:
            bytes_ = task.fields.get("unit") == "bytes"
            scale, unit = (1e6, "MB") if bytes_ else (1, "patches")
            digits = 1 if bytes_ and (task.total or 0) < 100e6 else 0  # small files: 0.4/1.1 MB
            done = f"{task.completed / scale:,.{digits}f}/{(task.total or 0) / scale:,.{digits}f} {unit}"
            rate = f"{task.completed / scale / task.elapsed:,.{digits}f} {unit}/s" if task.elapsed else "--"
            return Text(f"{done}  {rate}", style="progress.data.speed")

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        AmountColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def prepare(
    root: str | os.PathLike,
    out: str | os.PathLike,
    split_files: Sequence[str | os.PathLike] | None = None,
    official_splits: bool = False,
    record_format: str | RecordFormat = "default",
    workers: int | None = None,
    shard_size: int | None = None,
    exclude_snow_cloud: bool = False,
    include_snow_cloud: bool = False,
    skip_bad: bool = False,
    overwrite: bool = False,
    version: int | None = None,
    s1_root: str | os.PathLike | None = None,
    *,
    show_progress: bool = True,
) -> PrepareSummary:
    """Convert the patches of the given splits into TFRecord files in `out` (see the module docstring).

    Args:
        root: archive root (v1: the folder of patch folders or its parent; v2: the folder holding
            metadata.parquet).
        out: output folder, created if needed.
        split_files: split lists (CSV, one patch name per line); each file's base name names its
            split (`val` and `validation` are the same split and may not both be given).
        official_splits: use the official splits instead. v1: bigearthnet-common's train/val/test
            lists, restricted to the patches present under `root` (a partial archive is normal
            here, so absent patches are counted and reported, not errors; none present is an
            error). v2: the parquet's train/validation/test.
        record_format: a name in `record_formats.FORMATS`: "default" (raw pixel bytes, sharded) or
            "legacy" (the 2019 schema, one file per split).
        workers: worker processes; default: all usable cores. 1 runs in this process.
        shard_size: patches per shard in the default format (default `DEFAULT_SHARD_SIZE`).
        exclude_snow_cloud: drop patches on the snow and cloud/shadow lists from split CSVs.
        include_snow_cloud: v2 official splits: keep the flagged patches.
        skip_bad: leave out unreadable patches and list them in `skipped.csv` instead of stopping.
        overwrite: replace existing outputs of these splits.
        version: archive version 1 or 2; detected when None.
        s1_root: Sentinel-1 archive root; adds VV and VH to every record.
        show_progress: print the progress bar and the summary.

    Raises:
        BadPatchError: a patch cannot be read (and `skip_bad` is False); no record file is left.
        UserError: bad arguments, existing outputs without `overwrite`.
    """
    started = time.perf_counter()
    from rich.console import Console

    console = Console(stderr=True, quiet=not show_progress, highlight=False)

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    fmt = parse_record_format(record_format)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if shard_size is not None and not fmt.sharded:
        raise UserError(f"--shard-size applies to sharded formats only; {fmt} writes one file per split")
    shard_size = DEFAULT_SHARD_SIZE if shard_size is None and fmt.sharded else shard_size
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")

    context = _worker_context() if workers > 1 else None
    from_file = is_archive_file(root)
    split_args = (split_files, official_splits, exclude_snow_cloud, include_snow_cloud, skip_bad)
    if from_file:
        archive = _open_archive_file(root, version, s1_root)
        # Which listed patches the file holds is known only after streaming it: here the lists
        # are checked, quietly; the stream phase then tells which ones are absent.
        listed, _ = _resolve_splits(
            archive, *split_args, lambda message: None, missing_of=lambda splits: dict.fromkeys(splits, [])
        )
    else:
        if s1_root is not None and os.path.isfile(s1_root):
            raise UserError(
                f"--s1-root {s1_root} is an archive file; give the Sentinel-2 archive as a file too "
                f"(-r <the .tar, .tar.gz or .tar.zst>), or the extracted Sentinel-1 folder"
            )
        archive = open_archive(root, version=version, s1_root=s1_root)
        splits, missing = _resolve_splits(archive, *split_args, say)
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"output folder {out_path} exists and is not a folder")
    out_path.mkdir(parents=True, exist_ok=True)
    # One writer per output folder: a second run would remove this one's temporary files.
    with output_lock(out_path, "prepare", f"output folder {out_path}"):
        index = None
        if from_file:
            index = _stream_phase(
                archive,
                root,
                s1_root,
                listed,
                fmt,
                shard_size,
                workers,
                skip_bad,
                overwrite,
                context,
                out_path,
                console,
                say,
            )
            try:
                splits, missing = _resolve_splits(
                    archive,
                    *split_args,
                    say,
                    missing_of=lambda splits: {
                        split: [name for name in names if name not in index.present]
                        for split, names in splits.items()
                    },
                )
            except UserError:  # listed patches the file does not hold: this job ends here
                shutil.rmtree(out_path / SPOOL_DIR_NAME, ignore_errors=True)
                raise
        plan = _Plan(out_path, out_path / WORK_DIR_NAME, fmt, shard_size, archive, splits, [], index)
        _plan_units(plan)
        plan.fingerprint = _fingerprint(plan, skip_bad)
        done, appended = _start_or_resume(plan, overwrite, say)

        # Journal entries by file name: units (shards or legacy parts) and finished legacy split files.
        finished = dict(done)
        pending, resumed = _pending_units(plan, finished)
        for split in splits:
            if not fmt.sharded:
                _join_parts(plan, split, finished, appended)

        total = sum(len(unit.names) for unit in plan.units)
        progress = _progress_bar(console)
        description = "writing shards" if from_file else "preparing"
        task = progress.add_task(description, total=total, completed=resumed, resumed=resumed)
        spool_dir = out_path / SPOOL_DIR_NAME
        settings = (
            plan.archive,
            plan.record_format,
            skip_bad,
            str(plan.work_dir),
            str(plan.out),
            str(spool_dir),
        )
        stage_seconds = dict(index.seconds) if index is not None else {}
        unit_split = {unit.file_name: unit.split for unit in plan.units}
        try:
            # Workers start before the progress bar's refresh thread, so a fork copies no running
            # thread; closing() stops them on an error before this job's files are removed.
            with contextlib.closing(_Workers(pending, workers, context, settings)) as runner, progress:
                for result in runner.results(lambda n: progress.advance(task, n)):
                    if result.error is not None:
                        raise BadPatchError(*result.error)
                    for stage, seconds in zip(("read", "encode", "write"), result.seconds, strict=True):
                        stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
                    entry = {
                        "file": result.file_name,
                        "bytes": result.size,
                        "patches": result.written,
                        "skipped": [list(item) for item in result.skipped],
                    }
                    _journal_append(plan.work_dir, entry)
                    finished[result.file_name] = entry
                    split = unit_split[result.file_name]
                    if not fmt.sharded:
                        _join_parts(plan, split, finished, appended)
                progress.update(task, completed=total)
        except BadPatchError:
            _discard_job(plan)
            shutil.rmtree(spool_dir, ignore_errors=True)
            raise
        except BaseException:
            # Interrupted or failed for another reason: finished files stay for a restart.
            if plan.work_dir.exists():
                _remove_temporaries(plan.work_dir)
            raise

        # Tallies in list order, whatever order the workers finished in: missing folders first, then
        # unreadable patches, each in list order.
        written = {split: 0 for split in splits}
        skipped = {split: [item for item in missing if item.split == split] for split in splits}
        for split in splits:
            for entry in _split_entries(plan, split, finished):
                written[split] += entry["patches"]
                skipped[split].extend(SkippedPatch(split, *item) for item in entry["skipped"])
        all_skipped = [item for split in splits for item in skipped[split]]
        if skip_bad:
            _write_atomically(plan.out / SKIPPED_REPORT_NAME, _skipped_report(all_skipped), plan.work_dir)
        manifest = _manifest(plan, written, {split: len(skipped[split]) for split in splits}, skip_bad)
        _write_atomically(plan.out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n", plan.work_dir)
        shutil.rmtree(plan.work_dir)
        shutil.rmtree(spool_dir, ignore_errors=True)

        summary = PrepareSummary(
            out=plan.out,
            record_format=fmt.name,
            files=dict(plan.files),
            patches=written,
            skipped=tuple(all_skipped),
            seconds=time.perf_counter() - started,
            resumed_patches=resumed if index is None else index.resumed,
            stage_seconds=stage_seconds,
        )
        if show_progress:
            _print_summary(summary, Console(file=sys.stdout, highlight=False))
        return summary
