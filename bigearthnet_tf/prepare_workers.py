"""The worker side of `prepare`: tasks (units) written by worker processes, never importing TensorFlow.

A unit is a shard, or a part of a split for formats written as one file per split; a worker reads its
patches (from folders, or from the spool the stream phase of an archive file encoded), encodes them
with the record format and writes them in list order to a temporary file that it renames into place.
`Workers` runs units in processes (or in this process for one worker) and reports dead workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from bigearthnet_tf.archive import Archive, BadPatchError, decode_patch_files
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.prepare_request import PrepareRequest
from bigearthnet_tf.prepare_stream import copy_records
from bigearthnet_tf.record_formats import RecordFormat
from bigearthnet_tf.records import RecordWriter

TEMP_SUFFIX = ".tmp"  # temporary files carry the writer's pid before it
PROGRESS_POLL_SECONDS = 0.1
# Patches each worker reads ahead from folders, each in a thread of its own, once reads are slow: a
# cold disk delivers several times more small files per second with many reads in flight than with one.
READ_AHEAD = 16
COLD_READ_SECONDS = 0.0005  # a patch's 13 files take ~60 us from the page cache, milliseconds from a disk
COLD_READS = 3  # slow reads that tell a cold disk from a passing hiccup


@dataclass(frozen=True)
class Unit:
    """One worker task: a shard (default format) or a part of a split (legacy), written in list order."""

    split: str
    index: int
    file_name: str  # final name: a shard in `out`, or a part in the work folder
    names: tuple[str, ...]
    # From an archive file: per name its record in the spool (spool, offset, length) or its fault
    # (file, reason); None when patches are read from folders.
    places: tuple[tuple, ...] | None = None


@dataclass(frozen=True)
class UnitResult:
    """What a worker did with one unit."""

    file_name: str
    written: int
    size: int
    skipped: tuple[tuple[str, str, str], ...]  # (patch, file, reason)
    error: tuple[str, str, str] | None = None  # the first bad patch when not skipping
    seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)  # read, encode, write


@dataclass(frozen=True)
class WorkerJob:
    """What every unit of one run shares; sent once to each worker process."""

    request: PrepareRequest
    archive: Archive  # as opened (an archive file's S1 pairing lives in the spool)

    @property
    def record_format(self) -> RecordFormat:
        return self.request.record_format

    @property
    def skip_bad(self) -> bool:
        return self.request.skip_bad

    @property
    def work_dir(self) -> str:
        """Temporaries, and the parts of formats written as one file per split."""
        return str(self.request.work_dir)

    @property
    def out(self) -> str:
        """The output folder: shards are renamed straight into it."""
        return str(self.request.out)

    @property
    def spool_dir(self) -> str:
        """The stream phase's spool (archive files only)."""
        return str(self.request.spool_dir)


# A worker process's job and patch counter, set once by `_init_worker` (a process pool can hand
# a task only picklable arguments, so what all tasks share is sent once, here).
_job: WorkerJob | None = None
_count_patch: Callable[[], None] = lambda: None  # noqa: E731


def _init_worker(job: WorkerJob, counter) -> None:
    """Worker set-up: remember the job and count patches in a shared counter for the progress bar."""
    global _job, _count_patch
    # The parent handles Ctrl-C and terminates the pool; workers must not die mid-write on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def count_patch() -> None:
        with counter.get_lock():
            counter.value += 1

    _job, _count_patch = job, count_patch


def _run_unit(unit: Unit) -> UnitResult:
    return write_unit(_job, unit, _count_patch)


def _patch_files(archive: Archive, names: Sequence[str]) -> Iterator[tuple[str, dict | None]]:
    """(name, its raw files) in order. Read here while reads are fast (a warm page cache: threads
    would only cost CPU); once COLD_READS patches took longer than COLD_READ_SECONDS each, the rest
    are read ahead in READ_AHEAD threads, so that a cold disk has many reads in flight."""
    position = slow = 0
    for name in names:
        started = time.perf_counter()
        files = archive.read_patch_files(name)
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
            futures.append((name, pool.submit(archive.read_patch_files, name)))
            if len(futures) > READ_AHEAD:
                name, future = futures.pop(0)
                yield name, future.result()
        for name, future in futures:
            yield name, future.result()


def write_unit(job: WorkerJob, unit: Unit, on_patch: Callable[[], None]) -> UnitResult:
    """Read, encode and write one unit to a temporary file, then rename it to its final name.
    `on_patch()` is called once per patch done (the progress bar)."""
    temporary = os.path.join(job.work_dir, f"{unit.file_name}.{os.getpid()}{TEMP_SUFFIX}")
    final_dir = job.out if job.record_format.sharded else job.work_dir
    try:
        if unit.places is None:
            result = _encode_unit(job, unit, temporary, on_patch)
        else:
            result = _copy_unit(job, unit, temporary, on_patch)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if result.error is None:
        os.replace(temporary, os.path.join(final_dir, unit.file_name))
    return result


def _encode_unit(job: WorkerJob, unit: Unit, temporary: str, on_patch: Callable[[], None]) -> UnitResult:
    """Read the unit's patches from their folders (`_patch_files`), encode, write."""
    archive, serialize = job.archive, job.record_format.serialize
    skipped: list[tuple[str, str, str]] = []
    read = encode = write = 0.0
    with RecordWriter(temporary) as writer:
        patches = _patch_files(archive, unit.names)
        while True:
            started = time.perf_counter()
            name, files = next(patches, (None, None))
            if name is None:
                break
            waited = time.perf_counter()
            try:
                record = serialize(archive.with_s1(decode_patch_files(archive, name, files)))
            except BadPatchError as error:
                if not job.skip_bad:
                    writer.close()
                    os.unlink(temporary)
                    return UnitResult(unit.file_name, 0, 0, (), (error.patch, error.file, error.reason))
                skipped.append((error.patch, error.file, error.reason))
                encoded = time.perf_counter()
            else:
                encoded = time.perf_counter()
                writer.write(record)
            read += waited - started
            encode += encoded - waited
            write += time.perf_counter() - encoded
            on_patch()
        started = time.perf_counter()
        writer.flush(sync=True)
        write += time.perf_counter() - started
        written = writer.count
    return UnitResult(
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


def _copy_unit(job: WorkerJob, unit: Unit, temporary: str, on_patch: Callable[[], None]) -> UnitResult:
    """Write the unit from records the stream phase encoded into the spool, in list order."""
    started = time.perf_counter()
    skipped = [(name, *place) for name, place in zip(unit.names, unit.places, strict=True) if len(place) == 2]
    if skipped and not job.skip_bad:
        return UnitResult(unit.file_name, 0, 0, (), skipped[0])
    records = [place for place in unit.places if len(place) == 3]
    spool = os.path.join(job.spool_dir, records[0][0]) if records else ""
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
            copy_records(fd, records, job.spool_dir)
            os.fsync(fd)
        finally:
            os.close(fd)
    for _ in unit.names:
        on_patch()
    seconds = (0.0, 0.0, time.perf_counter() - started)
    return UnitResult(
        unit.file_name, len(records), os.path.getsize(temporary), tuple(skipped), seconds=seconds
    )


def worker_context() -> multiprocessing.context.BaseContext:
    """How worker processes start: `fork` when that is safe, else a `forkserver` started right away.

    Forking copies this process in milliseconds, which is safe while it runs no other thread and
    has not loaded TensorFlow (whose threads and locks a fork must not copy): the command line case.
    Otherwise (tests, the demo, notebooks) workers come from a fork server, a fresh interpreter that
    imports only this module (never TensorFlow); it is started here so that its imports overlap the planning.
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


class Workers:
    """Runs units in worker processes (or in this process for one worker), yielding results as they end.

    All units are submitted at construction, so the processes exist before the progress bar starts
    its refresh thread (a fork then copies no running thread). A worker that dies (killed, out of
    memory) turns into a UserError instead of a wait without end.
    """

    def __init__(
        self,
        units: list[Unit],
        workers: int,
        context: multiprocessing.context.BaseContext | None,
        job: WorkerJob,
    ) -> None:
        self._units = units
        self._job = job
        self._executor: ProcessPoolExecutor | None = None
        self._futures: set[Future] = set()
        if context is not None and workers > 1 and len(units) > 1:
            self._counter = context.Value("q", 0)
            self._executor = ProcessPoolExecutor(
                max_workers=min(workers, len(units)),
                mp_context=context,
                initializer=_init_worker,
                initargs=(job, self._counter),
            )
            self._futures = {self._executor.submit(_run_unit, unit) for unit in units}

    def results(self, advance: Callable[[int], None]) -> Iterator[UnitResult]:
        """Run every unit; `advance(n)` is called as patches get done."""
        if self._executor is None:
            for unit in self._units:
                yield write_unit(self._job, unit, lambda: advance(1))
            return
        seen = 0
        pending = self._futures
        while pending:
            done, pending = wait(pending, timeout=PROGRESS_POLL_SECONDS, return_when=FIRST_COMPLETED)
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
