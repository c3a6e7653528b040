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

The pieces: `prepare_splits.py` decides what each split holds, `prepare_job.py` plans the units and
keeps the job folder (journal, resume, joining parts, the manifest), `prepare_workers.py` writes units
in worker processes, and `prepare_stream.py` (with `tarstream.py`) reads archive files.

Workers (`workers`, default all usable cores; 1 runs in this process) import only numpy, the TIFF
reader and `prepare_workers`, never TensorFlow (tests/test_layers.py guards this). They are forked
when this process runs no other thread and has not loaded TensorFlow (the command line); otherwise
(tests, the demo, notebooks) they come from a `forkserver`, a fresh interpreter. A worker killed from
outside ends the run with a UserError; its finished shards stay for a restart. Ctrl-C stops the
workers and keeps finished shards too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bigearthnet_tf import __version__
from bigearthnet_tf.archive import Archive, BadPatchError, open_archive
from bigearthnet_tf.console import plain_console, progress_bar, status_console
from bigearthnet_tf.console import say as say_on
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import write_text_atomically
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.prepare_job import (
    JOB_FILE,
    MANIFEST_NAME,
    SKIPPED_REPORT_NAME,
    WORK_DIR_NAME,
    Plan,
    discard_job,
    fingerprint_of,
    join_parts,
    journal_append,
    manifest,
    pending_units,
    plan_units,
    remove_temporaries,
    skipped_report,
    split_entries,
    stale_outputs,
    start_or_resume,
)
from bigearthnet_tf.prepare_splits import SkippedPatch, resolve_splits
from bigearthnet_tf.prepare_stream import (
    SPOOL_DIR_NAME,
    SpoolIndex,
    StreamJob,
    archive_identity,
    open_archive_file,
    open_spool,
    stream_to_spool,
)
from bigearthnet_tf.prepare_workers import WorkerJob, Workers, worker_context
from bigearthnet_tf.record_formats import FORMAT_VERSION, RecordFormat, parse_record_format
from bigearthnet_tf.tarstream import ArchiveFileError, is_archive_file

__all__ = ["prepare", "PrepareSummary", "SkippedPatch", "DEFAULT_SHARD_SIZE", "MANIFEST_NAME"]

# ~80 MB per shard in the default format (about 160 kB per S2 record): large enough for efficient
# sequential reads, small enough that a few thousand patches still spread over all cores.
DEFAULT_SHARD_SIZE = 512


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
    s1_file = archive.s1_file
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
    tentative = Plan(out, out / WORK_DIR_NAME, record_format, shard_size, archive, listed, [])
    plan_units(tentative)
    units = {
        name: (i, place) for i, unit in enumerate(tentative.units) for place, name in enumerate(unit.names)
    }
    resumable = (spool_dir / JOB_FILE).exists() or (out / WORK_DIR_NAME / JOB_FILE).exists()
    if not overwrite and not resumable:
        # Refuse existing outputs now rather than after a whole pass over the archive.
        stale = stale_outputs(tentative)
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
    progress = progress_bar(console, amounts=True)
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
    console = status_console(show_progress)

    def say(message: str) -> None:
        say_on(console, message)

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

    context = worker_context() if workers > 1 else None
    from_file = is_archive_file(root)
    split_args = (split_files, official_splits, exclude_snow_cloud, include_snow_cloud, skip_bad)
    if from_file:
        archive = open_archive_file(root, version, s1_root)
        # Which listed patches the file holds is known only after streaming it: here the lists
        # are checked, quietly; the stream phase then tells which ones are absent.
        listed, _ = resolve_splits(
            archive, *split_args, lambda message: None, missing_of=lambda splits: dict.fromkeys(splits, [])
        )
    else:
        if s1_root is not None and os.path.isfile(s1_root):
            raise UserError(
                f"--s1-root {s1_root} is an archive file; give the Sentinel-2 archive as a file too "
                f"(-r <the .tar, .tar.gz or .tar.zst>), or the extracted Sentinel-1 folder"
            )
        archive = open_archive(root, version=version, s1_root=s1_root)
        splits, missing = resolve_splits(archive, *split_args, say)
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
                splits, missing = resolve_splits(
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
        plan = Plan(out_path, out_path / WORK_DIR_NAME, fmt, shard_size, archive, splits, [], index)
        plan_units(plan)
        plan.fingerprint = fingerprint_of(plan, skip_bad)
        done, appended = start_or_resume(plan, overwrite, say)

        # Journal entries by file name: units (shards or legacy parts) and finished legacy split files.
        finished = dict(done)
        pending, resumed = pending_units(plan, finished)
        for split in splits:
            if not fmt.sharded:
                join_parts(plan, split, finished, appended)

        total = sum(len(unit.names) for unit in plan.units)
        progress = progress_bar(console, "patches")
        description = "writing shards" if from_file else "preparing"
        task = progress.add_task(description, total=total, completed=resumed, resumed=resumed)
        spool_dir = out_path / SPOOL_DIR_NAME
        job = WorkerJob(plan.archive, fmt, skip_bad, str(plan.work_dir), str(plan.out), str(spool_dir))
        stage_seconds = dict(index.seconds) if index is not None else {}
        unit_split = {unit.file_name: unit.split for unit in plan.units}
        try:
            # Workers start before the progress bar's refresh thread, so a fork copies no running
            # thread; closing() stops them on an error before this job's files are removed.
            with contextlib.closing(Workers(pending, workers, context, job)) as runner, progress:
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
                    journal_append(plan.work_dir, entry)
                    finished[result.file_name] = entry
                    split = unit_split[result.file_name]
                    if not fmt.sharded:
                        join_parts(plan, split, finished, appended)
                progress.update(task, completed=total)
        except BadPatchError:
            discard_job(plan)
            shutil.rmtree(spool_dir, ignore_errors=True)
            raise
        except BaseException as error:
            if isinstance(error, UserError) and not finished:
                # Refused before any file was finished (bad metadata, say): nothing to resume, so
                # nothing is left in the way of a corrected run with other arguments.
                shutil.rmtree(plan.work_dir, ignore_errors=True)
                shutil.rmtree(spool_dir, ignore_errors=True)
            elif plan.work_dir.exists():
                # Interrupted or failed for another reason: finished files stay for a restart.
                remove_temporaries(plan.work_dir)
            raise

        # Tallies in list order, whatever order the workers finished in: missing folders first, then
        # unreadable patches, each in list order.
        written = {split: 0 for split in splits}
        skipped = {split: [item for item in missing if item.split == split] for split in splits}
        for split in splits:
            for entry in split_entries(plan, split, finished):
                written[split] += entry["patches"]
                skipped[split].extend(SkippedPatch(split, *item) for item in entry["skipped"])
        all_skipped = [item for split in splits for item in skipped[split]]
        if skip_bad:
            write_text_atomically(plan.out / SKIPPED_REPORT_NAME, skipped_report(all_skipped))
        described = manifest(plan, written, {split: len(skipped[split]) for split in splits}, skip_bad)
        write_text_atomically(plan.out / MANIFEST_NAME, json.dumps(described, indent=2) + "\n")
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
            _print_summary(summary, plain_console(file=sys.stdout))
        return summary
