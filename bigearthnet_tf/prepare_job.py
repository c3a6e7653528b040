"""The plan and the job folder of `prepare`: units, fingerprint, journal, resume, the manifest.

A plan cuts each split's list into units (shards, or parts joined into one file per split) as the
record format says. Everything is first written under `out/.prepare-work/`: `job.json` fingerprints
the job and `journal.jsonl` records each finished file, so a run killed at any moment and started
again with the same arguments keeps what the journal vouches for and redoes the rest (`job_folder`).
"""

from __future__ import annotations

import csv
import glob
import io
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bigearthnet_tf import __version__
from bigearthnet_tf.archive import Archive
from bigearthnet_tf.constants import LABEL_TYPES, LabelType
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.job_folder import JobFolder
from bigearthnet_tf.layout import Modality, sensors_of
from bigearthnet_tf.prepare_request import PrepareRequest
from bigearthnet_tf.prepare_splits import SkippedPatch
from bigearthnet_tf.prepare_stream import SpoolIndex
from bigearthnet_tf.prepare_workers import TEMP_SUFFIX, Unit
from bigearthnet_tf.record_formats import FORMATS, MANIFEST_NAME, RecordFormat

SKIPPED_REPORT_NAME = "skipped.csv"
JOURNAL_FILE = "journal.jsonl"  # the JobFolder default


@dataclass
class Plan:
    """The units of a request over `splits`, the final files per split, and the job folder."""

    request: PrepareRequest
    archive: Archive
    splits: dict[str, list[str]]
    index: SpoolIndex | None = None  # what the stream phase encoded, for an archive file
    units: list[Unit] = field(default_factory=list)
    # Final files in `out` per split, in order.
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fmt = self.record_format
        for split, names in self.splits.items():
            chunks = _chunks(names, self.request.unit_patches)
            file_names = fmt.unit_files(split, len(chunks))
            self.files[split] = fmt.split_files(split, len(chunks))
            for i, chunk in enumerate(chunks):
                places = None
                if self.index is not None:
                    places = tuple(self.index.records.get(name) or self.index.bad[name] for name in chunk)
                self.units.append(Unit(split, i, file_names[i], chunk, places))
        self.folder = JobFolder(self.work_dir, self.request.fingerprint(self.archive, self.splits))

    @property
    def out(self) -> Path:
        return self.request.out

    @property
    def work_dir(self) -> Path:
        return self.request.work_dir

    @property
    def record_format(self) -> RecordFormat:
        return self.request.record_format


def _chunks(names: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """`names` cut into consecutive chunks of `size`; at least one (possibly empty) chunk."""
    count = max(1, math.ceil(len(names) / size))
    return [tuple(names[i * size : (i + 1) * size]) for i in range(count)]


# --- the job folder: fingerprint, journal, clean-up ------------------------------------------------


def remove_temporaries(plan: Plan) -> None:
    plan.folder.remove_files(lambda name: name.endswith(TEMP_SUFFIX))


def _final_paths(plan: Plan) -> list[Path]:
    return [plan.out / name for names in plan.files.values() for name in names]


def stale_outputs(plan: Plan) -> list[Path]:
    """Files in `out` that this job would replace or that would mix with it (other shard counts)."""
    found = [plan.out / MANIFEST_NAME, plan.out / SKIPPED_REPORT_NAME, *_final_paths(plan)]
    for split in plan.splits:
        for fmt in FORMATS.values():
            found.extend(plan.out.glob(fmt.file_glob(glob.escape(split))))
    unique = dict.fromkeys(path for path in found if path.exists())
    return list(unique)


def refuse_stale_outputs(plan: Plan) -> None:
    """UserError naming the first output in the way, unless the request says to overwrite."""
    stale = stale_outputs(plan)
    if stale and not plan.request.overwrite:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise UserError(f"{stale[0]} exists{more}; pass --overwrite to replace it")


def discard_job(plan: Plan) -> None:
    """Remove every file of this job: temporaries, parts, and the shards it has renamed into place."""
    for path in _final_paths(plan):
        path.unlink(missing_ok=True)
    shutil.rmtree(plan.work_dir, ignore_errors=True)


def start_or_resume(plan: Plan, say: Callable[[str], None]) -> tuple[dict[str, dict], dict[str, int]]:
    """Make the work folder ready; return the journal entries of what an earlier run finished, and
    per legacy split the number of parts already appended (see `_resume_parts`)."""
    folder = plan.folder
    if folder.resumable():
        remove_temporaries(plan)
        journal = folder.journal()
        parts = set() if plan.record_format.sharded else {unit.file_name for unit in plan.units}
        done = folder.vouched(journal, lambda name: (plan.work_dir if name in parts else plan.out) / name)
        # Parts that the journal does not vouch for are redone.
        folder.remove_files(lambda name: name in parts and name not in done)
        appended = {} if plan.record_format.sharded else _resume_parts(plan, journal, done)
        if done:
            say(f"resuming an unfinished run in {plan.out}: {len(done)} finished file(s) kept")
        return done, appended

    folder.refuse_other_job(plan.request.overwrite)
    refuse_stale_outputs(plan)
    for path in stale_outputs(plan):
        path.unlink()
    folder.begin()
    return {}, {split: 0 for split in plan.splits}


def _partial_name(plan: Plan, split: str) -> str:
    return plan.files[split][0] + ".partial"


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


def _resume_parts(plan: Plan, journal: dict[str, dict], done: dict[str, dict]) -> dict[str, int]:
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
        path = plan.work_dir / _partial_name(plan, split)
        entry = journal.get(_partial_name(plan, split))
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


def join_parts(plan: Plan, split: str, finished: dict[str, dict], appended: dict[str, int]) -> None:
    """Append the split's finished parts that are next in list order to its partial file; when all
    are in, rename it to `<split>.tfrecord`. Parts are deleted once appended, so the disk holds
    little more than one copy of the split."""
    final_name = plan.files[split][0]
    if final_name in finished:
        return
    parts = [unit.file_name for unit in plan.units if unit.split == split]
    partial = plan.work_dir / _partial_name(plan, split)
    if appended[split] < len(parts) and parts[appended[split]] in finished:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            while appended[split] < len(parts) and parts[appended[split]] in finished:
                part = plan.work_dir / parts[appended[split]]
                _append_file(part, fd)
                appended[split] += 1
                size = os.fstat(fd).st_size
                plan.folder.record({"file": partial.name, "bytes": size, "parts": appended[split]})
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
    plan.folder.record(entry)
    finished[final_name] = entry


def pending_units(plan: Plan, finished: dict[str, dict]) -> tuple[list[Unit], int]:
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


def split_entries(plan: Plan, split: str, finished: dict[str, dict]) -> list[dict]:
    """The journal entries that make up a finished split, in list order."""
    if not plan.record_format.sharded:
        return [finished[plan.files[split][0]]]
    return [finished[unit.file_name] for unit in plan.units if unit.split == split]


# --- manifest, report, summary -------------------------------------------------------------------


def manifest(plan: Plan, patches: dict[str, int], skipped: dict[str, int]) -> dict:
    """`dataset.json` of a finished job (its keys are documented in prepare.py)."""
    modality = Modality.MM if plan.archive.has_s1 else Modality.S2
    skip_bad = plan.request.skip_bad
    label_types = [LabelType(name) for name in plan.archive.label_types]
    return {
        "format": plan.record_format.name,
        "format_version": plan.record_format.format_version,
        "archive_version": plan.archive.version,
        "modalities": list(sensors_of(modality)),
        "bands": plan.record_format.bands(modality),
        "shapes": plan.record_format.shapes(modality),
        "label_types": label_types,
        "labels": {label_type: list(LABEL_TYPES[label_type]) for label_type in label_types},
        "shard_size": plan.request.shard_size,
        "splits": {
            split: {"files": list(plan.files[split]), "patches": patches[split], "skipped": skipped[split]}
            for split in plan.splits
        },
        "patches": sum(patches.values()),
        "skipped": sum(skipped.values()),
        "skipped_report": SKIPPED_REPORT_NAME if skip_bad else None,
        "created_by": f"bigearthnet-tf {__version__}",
    }


def skipped_report(skipped: Sequence[SkippedPatch]) -> str:
    """`skipped.csv`: `split,patch,file,reason`, a row per skipped patch."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "patch", "file", "reason"])
    writer.writerows((item.split, item.patch, item.file, item.reason) for item in skipped)
    return buffer.getvalue()
