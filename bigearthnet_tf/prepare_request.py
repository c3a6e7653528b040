"""What `prepare` was asked to do, checked once where the arguments enter, then read by every phase.

The stream phase (`prepare_stream`), the plan and job folder (`prepare_job`) and the worker processes
(`prepare_workers`) all take this one frozen object; none of them re-reads or re-checks an argument.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bigearthnet_tf.archive import Archive
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.job_folder import fingerprint
from bigearthnet_tf.record_formats import FORMAT_VERSION, RecordFormat, parse_record_format
from bigearthnet_tf.tarstream import is_archive_file

WORK_DIR_NAME = ".prepare-work"  # the writing phase's job folder in the output folder
SPOOL_DIR_NAME = ".prepare-spool"  # the stream phase's (archive files only)

# ~80 MB per shard in the default format (about 160 kB per S2 record): large enough for efficient
# sequential reads, small enough that a few thousand patches still spread over all cores.
DEFAULT_SHARD_SIZE = 512


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PrepareRequest:
    """The arguments of `prepare` (see its docstring), checked; built by `PrepareRequest.checked`."""

    root: str
    out: Path
    record_format: RecordFormat
    workers: int
    inflate_threads: int  # threads inflating a .tar.gz (1: one isal thread, memory bounded)
    shard_size: int | None  # None for formats written as one file per split
    skip_bad: bool
    overwrite: bool
    version: int | None
    s1_root: str | None
    split_files: tuple[str, ...] | None
    official_splits: bool
    exclude_snow_cloud: bool
    include_snow_cloud: bool

    @classmethod
    def checked(
        cls,
        root: str | os.PathLike[str],
        out: str | os.PathLike[str],
        split_files: Sequence[str | os.PathLike[str]] | None = None,
        official_splits: bool = False,
        record_format: str | RecordFormat = "default",
        workers: int | None = None,
        shard_size: int | None = None,
        exclude_snow_cloud: bool = False,
        include_snow_cloud: bool = False,
        skip_bad: bool = False,
        overwrite: bool = False,
        version: int | None = None,
        s1_root: str | os.PathLike[str] | None = None,
        inflate_threads: int | None = None,
    ) -> PrepareRequest:
        """The request, or UserError naming the argument at fault."""
        fmt = parse_record_format(record_format)
        workers = usable_cores() if workers is None else workers
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        inflate_threads = usable_cores() if inflate_threads is None else inflate_threads
        if inflate_threads < 1:
            raise UserError(f"--inflate-threads must be at least 1, got {inflate_threads}")
        if shard_size is not None and not fmt.sharded:
            raise UserError(f"--shard-size applies to sharded formats only; {fmt} writes one file per split")
        shard_size = DEFAULT_SHARD_SIZE if shard_size is None and fmt.sharded else shard_size
        if shard_size is not None and shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {shard_size}")
        root = os.fspath(root)
        if s1_root is not None and os.path.isfile(s1_root) and not is_archive_file(root):
            raise UserError(
                f"--s1-root {s1_root} is an archive file; give the Sentinel-2 archive as a file too "
                f"(-r <the .tar, .tar.gz or .tar.zst>), or the extracted Sentinel-1 folder"
            )
        return cls(
            root=root,
            out=Path(out),
            record_format=fmt,
            workers=workers,
            inflate_threads=inflate_threads,
            shard_size=shard_size,
            skip_bad=skip_bad,
            overwrite=overwrite,
            version=version,
            s1_root=None if s1_root is None else os.fspath(s1_root),
            split_files=None if split_files is None else tuple(os.fspath(path) for path in split_files),
            official_splits=official_splits,
            exclude_snow_cloud=exclude_snow_cloud,
            include_snow_cloud=include_snow_cloud,
        )

    @property
    def from_file(self) -> bool:
        """The archive is a .tar, .tar.gz or .tar.zst file (read by the stream phase)."""
        return is_archive_file(self.root)

    @property
    def work_dir(self) -> Path:
        return self.out / WORK_DIR_NAME

    @property
    def spool_dir(self) -> Path:
        return self.out / SPOOL_DIR_NAME

    @property
    def unit_patches(self) -> int:
        """Patches per shard, or per part of a split written as one file."""
        return self.record_format.unit_patches(self.shard_size)

    @property
    def split_arguments(self) -> tuple[list[str] | None, bool, bool, bool, bool]:
        """The arguments of `prepare_splits.resolve_splits` that come from the request."""
        lists = None if self.split_files is None else list(self.split_files)
        return lists, self.official_splits, self.exclude_snow_cloud, self.include_snow_cloud, self.skip_bad

    def fingerprint(self, archive: Archive, splits: dict[str, list[str]]) -> str:
        """The fingerprint of a job folder of this request over `splits` (both phases build it here)."""
        return fingerprint(
            {
                "format": self.record_format.name,
                "format_version": FORMAT_VERSION,
                "shard_size": self.shard_size,
                "part_size": self.record_format.part_size,
                "archive": [archive.version, source_identity(archive.s2_dir)],
                "s1": source_identity(archive.s1_file or archive.s1_dir),
                "skip_bad": self.skip_bad,
                "splits": splits,
            }
        )


def source_identity(path: str | None) -> list[str | int] | None:
    """A folder's real path; for a file, also its size and modification time (a changed archive file
    is a new job)."""
    if path is None:
        return None
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return [real]
    info = os.stat(real)
    return [real, info.st_size, info.st_mtime_ns]
