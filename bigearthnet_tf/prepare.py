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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bigearthnet_tf.archive import Archive, BadPatchError, open_archive
from bigearthnet_tf.archive_file import open_archive_file
from bigearthnet_tf.console import plain_console, progress_bar, status_console
from bigearthnet_tf.console import say as say_on
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import write_text_atomically
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.prepare_job import (
    MANIFEST_NAME,
    SKIPPED_REPORT_NAME,
    Plan,
    discard_job,
    join_parts,
    manifest,
    pending_units,
    refuse_stale_outputs,
    remove_temporaries,
    skipped_report,
    split_entries,
    start_or_resume,
)
from bigearthnet_tf.prepare_request import DEFAULT_SHARD_SIZE, WORK_DIR_NAME, PrepareRequest
from bigearthnet_tf.prepare_splits import SkippedPatch, resolve_splits
from bigearthnet_tf.prepare_stream import (
    SpoolIndex,
    StreamJob,
    open_spool,
    spool_folder,
    stream_to_spool,
)
from bigearthnet_tf.prepare_workers import WorkerJob, Workers, worker_context
from bigearthnet_tf.record_formats import RecordFormat
from bigearthnet_tf.tarstream import ArchiveFileError

__all__ = [
    "prepare",
    "PrepareSummary",
    "SkippedPatch",
    "DEFAULT_SHARD_SIZE",
    "MANIFEST_NAME",
    "WORK_DIR_NAME",
]


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
    request: PrepareRequest, archive: Archive, listed: dict[str, list[str]], context, console, say
) -> SpoolIndex:
    """Stream the archive file into the spool (`prepare_stream`), with a progress bar in bytes and patches."""
    # The shards (or legacy parts) if the file holds every listed patch: the stream phase hands
    # patches to workers shard by shard, so that each spool file is a shard in the common case.
    tentative = Plan(request, archive, listed)
    units = {
        name: (i, place) for i, unit in enumerate(tentative.units) for place, name in enumerate(unit.names)
    }
    folder = spool_folder(request, archive, listed)
    if (
        not request.overwrite
        and folder.recorded_fingerprint() is tentative.folder.recorded_fingerprint() is None
    ):
        refuse_stale_outputs(tentative)  # now rather than after a whole pass over the archive
    done = open_spool(folder, request.overwrite, say)
    progress = progress_bar(console, amounts=True)
    size = os.path.getsize(request.root)
    tasks = {
        "bytes": progress.add_task(f"reading {os.path.basename(request.root)}", total=size, unit="bytes"),
        "patches": progress.add_task("encoding", total=len(units), completed=len(done), unit="patches"),
    }
    try:
        return stream_to_spool(
            StreamJob(request, archive, units, context),
            done,
            say,
            lambda kind, count: progress.update(tasks[kind], completed=count),
            progress,
        )
    except (BadPatchError, ArchiveFileError):
        shutil.rmtree(request.spool_dir, ignore_errors=True)
        raise


def _listed(request: PrepareRequest, say) -> tuple[Archive, dict[str, list[str]], list[SkippedPatch]]:
    """The archive, the patches of each split and the listed patches it lacks. For an archive file
    that is known only after the stream phase: here the lists are checked, quietly, and kept whole."""
    if not request.from_file:
        archive = open_archive(request.root, version=request.version, s1_root=request.s1_root)
        return archive, *resolve_splits(archive, *request.split_arguments, say)
    archive = open_archive_file(request.root, request.version, request.s1_root)
    listed, _ = resolve_splits(
        archive,
        *request.split_arguments,
        lambda message: None,
        missing_of=lambda splits: dict.fromkeys(splits, []),
    )
    return archive, listed, []


def _present(request: PrepareRequest, archive: Archive, index: SpoolIndex, say) -> tuple[dict, list]:
    """After the stream phase: the splits without the listed patches the archive file does not hold."""
    try:
        return resolve_splits(
            archive,
            *request.split_arguments,
            say,
            missing_of=lambda splits: {
                split: [name for name in names if name not in index.present]
                for split, names in splits.items()
            },
        )
    except UserError:  # listed patches the file does not hold: this job ends here
        shutil.rmtree(request.spool_dir, ignore_errors=True)
        raise


def _write_units(plan: Plan, context, console, say, stage_seconds: dict[str, float]) -> tuple[dict, int]:
    """Write every unit not finished by an earlier run (joining legacy parts as they come); return the
    journal entries by file name (units and finished legacy split files) and the patches resumed."""
    request = plan.request
    done, appended = start_or_resume(plan, say)
    finished = dict(done)
    pending, resumed = pending_units(plan, finished)
    for split in plan.splits:
        if not plan.record_format.sharded:
            join_parts(plan, split, finished, appended)
    total = sum(len(unit.names) for unit in plan.units)
    progress = progress_bar(console, "patches")
    description = "writing shards" if request.from_file else "preparing"
    task = progress.add_task(description, total=total, completed=resumed, resumed=resumed)
    unit_split = {unit.file_name: unit.split for unit in plan.units}
    try:
        # Workers start before the progress bar's refresh thread, so a fork copies no running
        # thread; closing() stops them on an error before this job's files are removed.
        workers = Workers(pending, request.workers, context, WorkerJob(request, plan.archive))
        with contextlib.closing(workers) as runner, progress:
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
                plan.folder.record(entry)
                finished[result.file_name] = entry
                if not plan.record_format.sharded:
                    join_parts(plan, unit_split[result.file_name], finished, appended)
            progress.update(task, completed=total)
    except BadPatchError:
        discard_job(plan)
        shutil.rmtree(request.spool_dir, ignore_errors=True)
        raise
    except BaseException as error:
        if isinstance(error, UserError) and not finished:
            # Refused before any file was finished (bad metadata, say): nothing to resume, so
            # nothing is left in the way of a corrected run with other arguments.
            shutil.rmtree(plan.work_dir, ignore_errors=True)
            shutil.rmtree(request.spool_dir, ignore_errors=True)
        elif plan.work_dir.exists():
            # Interrupted or failed for another reason: finished files stay for a restart.
            remove_temporaries(plan)
        raise
    return finished, resumed


def _publish(
    plan: Plan, missing: list[SkippedPatch], finished: dict
) -> tuple[dict[str, int], list[SkippedPatch]]:
    """Write `skipped.csv` (with skip_bad) and the manifest, remove the job folders; return the
    patches written and the patches skipped per split, in list order."""
    # Tallies in list order, whatever order the workers finished in: missing folders first, then
    # unreadable patches, each in list order.
    written = {split: 0 for split in plan.splits}
    skipped = {split: [item for item in missing if item.split == split] for split in plan.splits}
    for split in plan.splits:
        for entry in split_entries(plan, split, finished):
            written[split] += entry["patches"]
            skipped[split].extend(SkippedPatch(split, *item) for item in entry["skipped"])
    all_skipped = [item for split in plan.splits for item in skipped[split]]
    if plan.request.skip_bad:
        write_text_atomically(plan.out / SKIPPED_REPORT_NAME, skipped_report(all_skipped))
    described = manifest(plan, written, {split: len(skipped[split]) for split in plan.splits})
    write_text_atomically(plan.out / MANIFEST_NAME, json.dumps(described, indent=2) + "\n")
    shutil.rmtree(plan.work_dir)
    shutil.rmtree(plan.request.spool_dir, ignore_errors=True)
    return written, all_skipped


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
    inflate_threads: int | None = None,
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
        inflate_threads: threads inflating a `.tar.gz` archive file, S2 or S1 (rapidgzip); default:
            all usable cores. 1 inflates with one isal thread, in memory bounded whatever the file
            holds (the parallel inflater refuses files that inflate more than 64:1 instead).
        show_progress: print the progress bar and the summary.

    Raises:
        BadPatchError: a patch cannot be read (and `skip_bad` is False); no record file is left.
        UserError: bad arguments, existing outputs without `overwrite`.
    """
    started = time.perf_counter()
    request = PrepareRequest.checked(
        root, out, split_files, official_splits, record_format, workers, shard_size,
        exclude_snow_cloud, include_snow_cloud, skip_bad, overwrite, version, s1_root, inflate_threads,
    )  # fmt: skip
    console = status_console(show_progress)

    def say(message: str) -> None:
        say_on(console, message)

    context = worker_context() if request.workers > 1 else None
    archive, splits, missing = _listed(request, say)
    if request.out.exists() and not request.out.is_dir():
        raise UserError(f"output folder {request.out} exists and is not a folder")
    request.out.mkdir(parents=True, exist_ok=True)
    # One writer per output folder: a second run would remove this one's temporary files.
    with output_lock(request.out, "prepare", f"output folder {request.out}"):
        index = None
        if request.from_file:
            index = _stream_phase(request, archive, splits, context, console, say)
            splits, missing = _present(request, archive, index, say)
        plan = Plan(request, archive, splits, index)
        stage_seconds = dict(index.seconds) if index is not None else {}
        finished, resumed = _write_units(plan, context, console, say, stage_seconds)
        written, skipped = _publish(plan, missing, finished)
    summary = PrepareSummary(
        out=plan.out,
        record_format=plan.record_format.name,
        files=dict(plan.files),
        patches=written,
        skipped=tuple(skipped),
        seconds=time.perf_counter() - started,
        resumed_patches=resumed if index is None else index.resumed,
        stage_seconds=stage_seconds,
    )
    if show_progress:
        _print_summary(summary, plain_console(file=sys.stdout))
    return summary
