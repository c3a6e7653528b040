"""Encode the patches of an archive file (.tar, .tar.gz, .tar.zst) in one streaming pass.

`stream_to_spool` is the first phase of `prepare` when the archive is a file. The tar members arrive
in whatever order the file has them; records must come out in list order, sharded as from the
extracted folder. So this phase encodes each wanted patch as soon as all its files have streamed
past and appends the record to a spool file in the job's work folder; `prepare` then writes the
shards (or legacy parts) from the spool in list order with `os.copy_file_range`, through the same
planning, journal and resume code as for folders.

Why a spool and not shards at once: which patches a shard holds depends on which listed patches are
in the archive at all (absent ones are dropped from the lists before sharding, as for folders), and
that is known only at the end of the stream. The spool costs one in-kernel copy of the output.

Pipeline (memory bounded by the block ring, whatever the archive size):

- a reader thread fills 32 MB shared-memory blocks with the decompressed stream (`tarstream`);
- the main thread parses the headers, groups members by patch folder, and hands each complete
  patch (the places of its files in the blocks) to a worker process in batches;
- workers map the blocks read-only, decode the TIFFs, serialize the record and append it to their
  batch's spool file; a block is refilled once no batch or incomplete patch needs it. Files of
  incomplete patches in a block about to be refilled (a tar whose patch members are not
  contiguous) are first copied to a spill file.

Sentinel-1 in a second archive file is read first, in a pass of its own: the wanted VV/VH files
are indexed (an uncompressed .tar is read in place later) or copied to a store file (compressed),
so that the S2 pass finds each twin by an index lookup. Pairing needs only the S1 archive and the
v2 metadata or the v1 S1 JSON files, and the two archives' orders need not agree.

Resume: finished spool files are journalled (`spool.jsonl`); a rerun streams the archive again but
decodes only the patches no finished spool file holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bigearthnet_tf import tarstream
from bigearthnet_tf.archive import (
    V1_METADATA_SUFFIX,
    Archive,
    BadPatchError,
    corresponding_s2,
    decode_patch_files,
)
from bigearthnet_tf.archive_file import patch_file_of
from bigearthnet_tf.constants import S1_BAND_NAMES
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import append_synced_line, write_text_atomically
from bigearthnet_tf.job_folder import JobFolder
from bigearthnet_tf.prepare_request import PrepareRequest
from bigearthnet_tf.record_formats import RecordFormat
from bigearthnet_tf.records import RecordWriter
from bigearthnet_tf.tarstream import (
    DIRECTORY,
    LINK,
    REGULAR,
    ArchiveFileError,
    BlockRing,
    BlockViews,
    Filler,
    HeldBlocks,
    MappedFile,
    Member,
    MemberSink,
    ProcessFiller,
    compression_of,
    safe_name,
    stream_members,
)
from bigearthnet_tf.tiff import MAX_BAND_FILE_BYTES

_JOURNAL_FILE = "spool.jsonl"
_S1_INDEX_FILE = "s1-index.json"
_S1_STORE_FILE = "s1-store.bin"
_SPILL_FILE = "spill.bin"
MAX_RING_BYTES = 1 << 30  # shared memory for the decompressed stream, at most

# A file reference as workers get it: ("b", ((block, offset, length), ...)) in the block ring, or
# ("f", path, offset, length) in a file (the uncompressed S1 tar, the S1 store, the spill file).
Ref = tuple


# --- what the archive files hold -----------------------------------------------------------------


# --- the result of the stream phase ---------------------------------------------------------------


@dataclass
class SpoolIndex:
    """Where each encoded patch's framed record is, which patches are bad, which were in the archive."""

    records: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # name -> (spool, offset, length)
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (file, reason)
    present: set[str] = field(default_factory=set)  # listed names with a folder or file in the archive
    seconds: dict[str, float] = field(default_factory=dict)  # read, decompress, parse, encode, write
    resumed: int = 0  # patches encoded by an earlier run


@dataclass
class StreamStats:
    """Seconds of the stream phase's own work: parsing here, encoding and writing summed over workers."""

    encode: float = 0.0
    write: float = 0.0
    parse: float = 0.0


# --- workers ---------------------------------------------------------------------------------------


@dataclass
class _WorkerState:
    archive: Archive
    serialize: Callable
    spool_dir: str
    views: BlockViews | None


_state: _WorkerState | None = None


def _init_worker(
    archive: Archive, record_format: RecordFormat, spool_dir: str, block_paths: list[str]
) -> None:
    global _state
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _state = _WorkerState(archive, record_format.serialize, spool_dir, BlockViews(block_paths))


def _read_ref(ref: Ref):
    if ref[0] == "b":
        return _state.views.read(ref[1])
    _, path, offset, length = ref
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _encode_batch(task: int, patches: list[tuple], whole: bool) -> tuple[str, list, float, float]:
    """Encode `patches` ((name, {file: ref}, s1) each) into spool file `task`; per patch
    [name, offset, length, None] or, if it is bad, [name, None, None, [file, reason]]. `whole`:
    they are a whole shard, whose spool file will most likely be renamed into place."""
    spool = f"spool-{task:07d}.tfrecord"
    path = os.path.join(_state.spool_dir, spool)
    entries = []
    encode = write = 0.0
    with RecordWriter(path) as writer:
        for name, refs, s1 in patches:
            started = time.perf_counter()
            try:
                record = _state.serialize(_decode(name, refs, s1))
            except BadPatchError as error:
                entries.append([name, None, None, [error.file, error.reason]])
                encode += time.perf_counter() - started
                continue
            before = writer.bytes_written
            middle = time.perf_counter()
            writer.write(record)
            entries.append([name, before, writer.bytes_written - before, None])
            encode += middle - started
            write += time.perf_counter() - middle
        if whole and hasattr(os, "posix_fadvise"):
            # The shard it will become must reach the disk: start writing it back now, without
            # waiting (Linux starts write-back for DONTNEED), so that the fsync after is short.
            os.posix_fadvise(writer.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        # Other spool files are not synced: they are temporary (copied into shards, which are). A
        # kill loses nothing; after a power failure, journal sizes (synced) that files no longer
        # reach (ext4 and xfs extend a file only with its data) make those spools redone.
    return spool, entries, encode, write


def _decode(name: str, refs: dict[str, Ref], s1):
    files = {file: _read_ref(ref) for file, ref in refs.items()}
    archive = _state.archive
    if s1 is None:  # no S1, or S1 in a folder beside the S2 archive file (`with_s1` reads it)
        return archive.with_s1(decode_patch_files(archive, name, files))
    if s1[0] == "bad":
        raise BadPatchError(name, s1[1], s1[2])
    s1_name, s1_refs = s1
    s1_files = {file: _read_ref(ref) for file, ref in s1_refs.items()}
    return decode_patch_files(archive, name, files, s1_name, s1_files)


# --- the job folder ----------------------------------------------------------------------------------


def open_spool(folder: JobFolder, overwrite: bool, say: Callable[[str], None]) -> dict[str, tuple]:
    """Make the spool folder ready for its job; return what an earlier run of the same job encoded:
    patch -> (spool, offset, length), or (file, reason) for a bad patch."""
    if not folder.resumable():
        folder.refuse_other_job(overwrite)
        folder.begin()
        return {}
    kept = folder.vouched(folder.journal(), lambda spool: folder.path / spool)
    folder.remove_files(lambda name: name.startswith("spool-") and name not in kept)
    done: dict[str, tuple] = {}
    for spool, entry in kept.items():
        for name, offset, length, fault in entry["patches"]:
            done[name] = (spool, offset, length) if fault is None else tuple(fault)
    if done:
        say(f"resuming: {len(done):,} patches were encoded by an earlier run")
    return done


def spool_folder(request: PrepareRequest, archive: Archive, listed: dict[str, list[str]]) -> JobFolder:
    """The stream phase's job folder, fingerprinted over the lists as given (before absent patches
    are known)."""
    return JobFolder(request.spool_dir, request.fingerprint(archive, listed), _JOURNAL_FILE, key="spool")


# --- streaming -------------------------------------------------------------------------------------


class _Spill:
    """Where the files of incomplete patches go when their block is needed again."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._file: BinaryIO | None = None
        self.size = 0

    def put(self, data: bytes) -> Ref:
        if self._file is None:
            self._file = open(self.path, "ab")
            self.size = self._file.tell()
        self._file.write(data)
        self._file.flush()  # workers read it with pread
        ref = ("f", self.path, self.size, len(data))
        self.size += len(data)
        return ref

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        Path(self.path).unlink(missing_ok=True)


@dataclass(frozen=True)
class StreamJob:
    """Everything `stream_to_spool` needs to know."""

    request: PrepareRequest
    archive: Archive  # version, v2 metadata root; s1_dir for S1 in a folder, s1_file for a file
    units: dict[str, tuple[int, int]]  # every listed patch -> (its shard or legacy part, its place there)
    context: object  # multiprocessing context, None for workers == 1

    @property
    def s2_path(self) -> str:
        return self.request.root

    @property
    def s1_path(self) -> str | None:
        return self.archive.s1_file

    @property
    def spool_dir(self) -> Path:
        return self.request.spool_dir

    @property
    def workers(self) -> int:
        return self.request.workers

    @property
    def skip_bad(self) -> bool:
        return self.request.skip_bad

    @property
    def record_format(self) -> RecordFormat:
        return self.request.record_format


class _InProcess:
    """An executor that runs each task at once, in this process (workers == 1)."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


@contextlib.contextmanager
def _encoders(job: StreamJob, block_paths: list[str]) -> Iterator[ProcessPoolExecutor | _InProcess]:
    """The worker processes that encode batches, all started (before any thread of ours runs: a
    fork copies no running thread), and stopped at the end without waiting for their tasks."""
    if job.context is None or job.workers == 1:
        # The worker state in this process, but Ctrl-C keeps whatever handler the caller had.
        previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
        try:
            _init_worker(job.archive, job.record_format, str(job.spool_dir), block_paths)
        finally:
            signal.signal(signal.SIGINT, previous)
        yield _InProcess()
        return
    executor = ProcessPoolExecutor(
        max_workers=job.workers,
        mp_context=job.context,
        initializer=_init_worker,
        initargs=(job.archive, job.record_format, str(job.spool_dir), block_paths),
    )
    try:
        try:
            for future in [executor.submit(os.getpid) for _ in range(job.workers)]:
                future.result()
        except BrokenProcessPool:
            raise UserError("the worker processes could not start (out of memory?)") from None
        yield executor
    finally:
        _stop_now(executor)


def _stop_now(executor: ProcessPoolExecutor) -> None:
    """Shut `executor` down, terminating workers busy with a batch (after an error or Ctrl-C, a
    whole shard's work is not waited for)."""
    executor.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(executor, "terminate_workers", None)  # Python 3.14 and later
    if terminate is not None:
        terminate()
    else:  # earlier: the processes are only in a private field
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            if process.is_alive():
                process.terminate()
    executor.shutdown(wait=True)


def _ring_blocks(job: StreamJob) -> int:
    """Blocks for a shard being read, one waiting and one per worker (~180 kB a patch), within
    MAX_RING_BYTES: with fewer, shards are handed over in parts and copied together afterwards."""
    unit_blocks = -(-job.request.unit_patches * 180_000 // tarstream.BLOCK_BYTES) + 1
    return min(
        max(2 * job.workers + 4, (job.workers + 2) * unit_blocks + 3),
        max(8, MAX_RING_BYTES // tarstream.BLOCK_BYTES),
    )


class SpoolStream:
    """The scheduler of the stream phase: it takes the members of the S2 archive file as the parser
    finds them, groups them by patch, hands complete patches to `executor` (shard by shard, in list
    order; in parts when the ring runs short) and keeps the index of what the spool files hold.

    `executor.submit(encode, task, batch, whole)` returns a future of what `_encode_batch` returns;
    tests give a thread pool and a fake `encode`. `s1(name)` is the S1 argument of a patch (None
    without an S1 archive file)."""

    def __init__(
        self,
        job: StreamJob,
        done: dict[str, tuple],
        ring: HeldBlocks,
        blocks: int,
        executor: ProcessPoolExecutor | _InProcess,
        *,
        say: Callable[[str], None],
        progress: Callable[[str, int], None],
        s1: Callable[[str], tuple] | None = None,
        encode: Callable | None = None,
    ) -> None:
        self.job, self.ring, self.blocks, self.executor = job, ring, blocks, executor
        self.encode = encode or _encode_batch  # looked up now: tests replace it
        self.say, self.progress, self.s1 = say, progress, s1
        self.index = SpoolIndex(resumed=len(done))
        for name, place in done.items():
            if len(place) == 3:
                self.index.records[name] = place
            else:
                self.index.bad[name] = place
        self.wanted = set(job.units.keys() - done.keys())
        self.expected = frozenset(job.archive.file_suffixes)
        self.pending: dict[str, dict[str, Ref]] = {}  # incomplete patches: file -> ref
        # Where each file of an incomplete patch began, and where each complete patch was completed: a
        # second copy of a file is named with both places rather than one copy chosen silently.
        self.pending_at: dict[str, dict[str, int]] = {}
        self.completed_at: dict[str, int] = {}
        self.duplicated: dict[str, tuple[str, str]] = {}  # complete patches with a second copy (skip_bad)
        self.in_block: dict[int, set[str]] = {}  # block -> incomplete patches with a file in it
        # Complete patches not handed over yet, by shard (or legacy part), and per shard how many of its
        # wanted patches are neither handed over nor bad: when all are ready the whole shard goes to one
        # worker, which writes them in list order, and that spool file becomes the shard (renamed, not
        # copied) when the file held every listed patch.
        self.ready: dict[int, list[tuple]] = {}
        self.ready_bytes = 0  # of the files of ready patches
        self.open_count: dict[int, int] = {}
        for name in self.wanted:
            unit = job.units[name][0]
            self.open_count[unit] = self.open_count.get(unit, 0) + 1
        self.unit_sizes = dict(self.open_count) if not done else {}  # after a resume, no spool is whole
        self.futures: dict[Future, list[int]] = {}  # batches in flight -> the blocks they hold
        # Spool files of an earlier run are kept: number the new ones after them.
        self.task = max(
            (int(n[6:13]) for n in os.listdir(job.spool_dir) if n.startswith("spool-")), default=0
        )
        self.encoded = len(done)
        self.stats = StreamStats()
        self.spill = _Spill(job.spool_dir / _SPILL_FILE)

    # --- members in --------------------------------------------------------------------------------

    def wants(self, name: str) -> tuple[str, str, str] | None:
        found = patch_file_of(name)
        if found is not None and found[1] in self.wanted and found[2][len(found[1]) + 1 :] in self.expected:
            return found
        return None

    def on_member(self, member: Member) -> None:
        found = member.key or patch_file_of(member.name)
        folder = None
        if found is not None:
            folder = found[1]
        elif member.kind == DIRECTORY:
            folder = member.name.rstrip("/").rsplit("/", 1)[-1]
        problem = safe_name(member.name) if member.name[:1] == "/" or ".." in member.name else None
        if problem is not None:
            self._unsafe(member, folder, problem)
            return
        # A member with a key: `wants` found its folder wanted and the file one of a patch's.
        if member.key is None and (folder is None or folder not in self.job.units):
            return
        self.index.present.add(folder)
        if member.key is None:
            if found is None or found[2][len(folder) + 1 :] not in self.expected:
                return
            if folder not in self.wanted:
                if folder in self.completed_at:
                    self._second_copy(folder, found[2], member, f"before byte {self.completed_at[folder]:,}")
                return
        file = found[2]
        fault = self._member_fault(member)
        if fault is not None:
            self._bad(folder, file, fault)
            return
        refs = self.pending.setdefault(folder, {})
        if file in refs:
            self._second_copy(folder, file, member, f"at byte {self.pending_at[folder][file]:,}")
            return
        refs[file] = ("b", member.parts)
        self.pending_at.setdefault(folder, {})[file] = member.offset
        for block in self.ring.hold(member.parts):  # blocks are refilled: count who needs each
            self.in_block.setdefault(block, set()).add(folder)
        if len(refs) == len(self.expected):
            self._complete(folder, member.offset)

    def _member_fault(self, member: Member) -> str | None:
        path = self.job.s2_path
        if member.kind == LINK:
            return f"is a link in {path}, not a file"
        if member.kind != REGULAR:
            return f"is not a regular file in {path}"
        if member.size > MAX_BAND_FILE_BYTES:
            return f"{member.size:,} bytes, more than the {MAX_BAND_FILE_BYTES:,} a band file can hold"
        return None

    def _unsafe(self, member: Member, folder: str | None, problem: str) -> None:
        if not self.job.skip_bad:
            raise ArchiveFileError(self.job.s2_path, f"member {member.name}", problem)
        if folder in self.job.units:
            self.index.present.add(folder)
            self._bad(folder, member.name, f"{problem} in {self.job.s2_path}")
        else:
            self.say(f"{self.job.s2_path}: member {member.name}: {problem}; ignored")

    def _complete(self, folder: str, offset: int) -> None:
        refs = self.pending.pop(folder)
        del self.pending_at[folder]
        self.completed_at[folder] = offset
        self.wanted.discard(folder)
        for ref in refs.values():
            for block in {part[0] for part in ref[1]} if ref[0] == "b" else ():
                self.in_block.get(block, set()).discard(folder)
        unit = self.job.units[folder][0]
        group = self.ready.setdefault(unit, [])
        group.append((folder, refs, None if self.s1 is None else self.s1(folder)))
        self.ready_bytes += _ref_bytes(refs)
        if len(group) == self.open_count[unit]:
            self.dispatch(unit)

    def _bad(self, name: str, file: str, reason: str) -> None:
        if name not in self.wanted:
            return
        self.wanted.discard(name)
        self.index.bad[name] = (file, reason)
        self._unpin(name)
        unit = self.job.units[name][0]
        self.open_count[unit] -= 1
        if self.ready.get(unit) and len(self.ready[unit]) == self.open_count[unit]:
            self.dispatch(unit)

    def _second_copy(self, folder: str, file: str, member: Member, first: str) -> None:
        """A file of a patch met twice: `tar -x` would keep the second copy, we took the first; as
        the copies may differ, the patch is bad (the whole job stops without skip_bad)."""
        reason = (
            f"is in {self.job.s2_path} twice: a copy {first} and another at byte {member.offset:,} of "
            "its tar stream (tar -x would keep the second)"
        )
        if not self.job.skip_bad:
            raise ArchiveFileError(self.job.s2_path, f"member {member.name}", reason)
        if folder in self.wanted:
            self._bad(folder, file, reason)
        else:
            self.duplicated.setdefault(folder, (file, reason))

    def _unpin(self, name: str) -> None:
        self.pending_at.pop(name, None)
        for ref in self.pending.pop(name, {}).values():
            if ref[0] == "b" and not self.ring.mapped:
                for block in {part[0] for part in ref[1]}:
                    self.in_block.get(block, set()).discard(name)
                    self.ring.release(block)

    # --- blocks ----------------------------------------------------------------------------------------

    def after_block(self, block: int) -> None:
        self._spill_retired()
        self._relieve()
        # One task waiting beside each worker's: the reader needs free blocks, workers need work.
        while len(self.futures) > self.job.workers:
            self.wait_for_work(block_until_one=True)

    def _spill_retired(self) -> None:
        """Blocks the parser is past that incomplete patches still point into (a tar whose patch
        members are not contiguous): copy those files out so that the blocks can be refilled."""
        if self.ring.mapped:
            return
        for block in list(self.ring.retired):
            for name in list(self.in_block.pop(block, ())):
                refs = self.pending[name]
                for file, ref in list(refs.items()):
                    if ref[0] == "b" and any(part[0] == block for part in ref[1]):
                        maps = self.ring.ring.maps
                        refs[file] = self.spill.put(b"".join(maps[b][o : o + n] for b, o, n in ref[1]))
                        for other in {part[0] for part in ref[1]}:
                            self.ring.release(other)
                for other, names in self.in_block.items():  # still pointing into other blocks?
                    if name in names and not any(
                        ref[0] == "b" and any(part[0] == other for part in ref[1]) for ref in refs.values()
                    ):
                        names.discard(name)

    def _relieve(self) -> None:
        """When nearly every block is held by patches waiting for the rest of their shard (an archive
        whose order is not the lists' order), hand those over as they are, largest groups first. A
        mapped tar has no blocks to run out of, but waiting patches are bounded all the same: past
        MAX_RING_BYTES the page cache might drop them before a worker reads them."""
        while self.ready and (
            self.ready_bytes > MAX_RING_BYTES
            if self.ring.mapped
            else len(self.ring.retired) >= self.blocks - 3
        ):
            self.dispatch(max(self.ready, key=lambda unit: len(self.ready[unit])))

    # --- batches out -----------------------------------------------------------------------------------

    def dispatch(self, unit: int) -> None:
        """Hand the ready patches of `unit` to a worker, in list order."""
        units = self.job.units
        batch = sorted(self.ready.pop(unit), key=lambda patch: units[patch[0]][1])
        self.ready_bytes -= sum(_ref_bytes(refs) for _, refs, _ in batch)
        whole = len(batch) == self.open_count[unit] == self.unit_sizes.get(unit)
        self.open_count[unit] -= len(batch)
        # The patches' holds on their blocks pass to the batch, released when it is done.
        used = (
            []
            if self.ring.mapped
            else [
                part[0] for _, refs, _ in batch for ref in refs.values() if ref[0] == "b" for part in ref[1]
            ]
        )
        self.task += 1
        future = self.executor.submit(self.encode, self.task, batch, whole)
        self.futures[future] = used
        if future.done():  # encoded in this process
            self._collect([future])

    def wait_for_work(self, block_until_one: bool = False) -> None:
        """Take in the batches that are done (with `block_until_one`, wait for one at least)."""
        self._relieve()
        if self.futures:
            timeout = None if block_until_one else 0
            done_now, _ = wait(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)
            self._collect(done_now)

    def _collect(self, futures: Iterable[Future]) -> None:
        for future in futures:
            used = self.futures.pop(future)
            try:
                spool, entries, encode, write = future.result()
            except BrokenProcessPool:
                raise UserError(
                    "a worker process died unexpectedly (killed, or out of memory?); encoded patches "
                    "are kept: run the same command again to resume"
                ) from None
            self.stats.encode += encode
            self.stats.write += write
            size = os.path.getsize(self.job.spool_dir / spool)
            append_synced_line(
                self.job.spool_dir / _JOURNAL_FILE, {"spool": spool, "bytes": size, "patches": entries}
            )
            for name, offset, length, fault in entries:
                if fault is None:
                    self.index.records[name] = (spool, offset, length)
                else:
                    self.index.bad[name] = tuple(fault)
            for block in used:
                self.ring.release(block)
            self.encoded += len(entries)
            self.progress("patches", self.encoded)

    def drain(self) -> None:
        """After the last member: hand over what is ready and wait for every batch."""
        for unit in list(self.ready):
            self.dispatch(unit)
        while self.futures:
            self.wait_for_work(block_until_one=True)

    # --- the result ------------------------------------------------------------------------------------

    def result(self, failure: ArchiveFileError | None) -> SpoolIndex:
        """The index, with patches left incomplete by the end of the stream (or by `failure`) as bad."""
        index = self.index
        for name, fault in self.duplicated.items():  # encoded before their second copy came: left out
            index.records.pop(name, None)
            index.bad[name] = fault
        if failure is not None:
            _raise_unless_skippable(failure, self.job.skip_bad)
            self.say(f"{failure}; the patches not complete by then are skipped")
            for name in sorted(self.wanted):
                index.present.add(name)
                index.bad[name] = (
                    self.job.s2_path,
                    f"not complete where the archive ends early ({failure.problem})",
                )
            return index
        for name, refs in self.pending.items():
            missing = sorted(f"{name}_{suffix}" for suffix in self.expected if f"{name}_{suffix}" not in refs)
            reason = (
                "missing metadata file" if missing[0].endswith(V1_METADATA_SUFFIX) else "missing band file"
            )
            index.bad[name] = (missing[0], reason)
        return index

    def sink(self) -> MemberSink:
        return MemberSink(self.wants, self.on_member, self.after_block, self.wait_for_work)


def stream_to_spool(
    job: StreamJob,
    done: dict[str, tuple],
    say: Callable[[str], None],
    progress: Callable[[str, int], None],
    display,
) -> SpoolIndex:
    """Encode every listed patch of the archive file not in `done` into spool files (see the module
    docstring); `progress(kind, completed)` with kind "bytes" or "patches". `display` (a context
    manager: the progress bar) is entered once the worker processes exist, as its refresh thread
    must not run while they are forked."""
    s1 = _s1_pass(job, say) if job.s1_path is not None else None
    blocks = _ring_blocks(job)
    # An uncompressed tar is read in place (page cache, no copy); a compressed one through the ring.
    in_place = compression_of(job.s2_path) == "none"
    storage = MappedFile(job.s2_path) if in_place else BlockRing(blocks)
    stream = None
    try:
        with _encoders(job, storage.paths) as executor:
            ring = HeldBlocks(storage)
            stream = SpoolStream(job, done, ring, blocks, executor, say=say, progress=progress, s1=s1)
            # The reader starts before the progress bar's thread (a fork copies no running thread).
            # Inflating and decompressing run in a process of their own, a mapped tar in a thread.
            if in_place or job.context is None:
                filler = Filler(job.s2_path, storage, job.request.inflate_threads)
            else:
                filler = ProcessFiller(job.s2_path, storage, job.context, job.request.inflate_threads)
            with display:
                read, decompress, stream.stats.parse, failure = stream_members(
                    job.s2_path,
                    filler,
                    blocks,
                    ring,
                    stream.sink(),
                    MAX_BAND_FILE_BYTES,
                    lambda count: progress("bytes", count),
                )
                stream.drain()
    finally:
        if stream is not None:
            stream.spill.close()
        storage.close()
    index = stream.result(failure)
    index.seconds = {
        "read": read,
        "decompress": decompress,
        "parse": stream.stats.parse,
        "encode": stream.stats.encode,
        "write": stream.stats.write,
    }
    return index


def _raise_unless_skippable(failure: ArchiveFileError, skip_bad: bool) -> None:
    """Raise the error that ended an archive file's stream, unless `skip_bad` may keep what came
    before it: not after corrupt compressed data, which leaves all of it unverified."""
    if not skip_bad:
        raise failure
    if failure.unverified:
        raise ArchiveFileError(
            failure.archive,
            failure.where,
            f"{failure.problem}; what was inflated before it is not verified either (the checksum comes "
            "at the end), so --skip-bad keeps nothing of this file: download it again",
            unverified=True,
        )


def _ref_bytes(refs: dict[str, Ref]) -> int:
    """The size of a patch's files from their references."""
    return sum(sum(part[2] for part in ref[1]) if ref[0] == "b" else ref[3] for ref in refs.values())


# --- Sentinel-1 in its own archive file -----------------------------------------------------------------


def _s1_pass(job: StreamJob, say: Callable[[str], None]) -> Callable[[str], tuple]:
    """Index the VV/VH files of the S1 twins of the listed patches; return name -> s1 argument of a batch."""
    index_file = job.spool_dir / _S1_INDEX_FILE
    if index_file.exists():  # an earlier run of this job got this far
        found = json.loads(index_file.read_text(encoding="utf-8"))
        return _s1_lookup(
            job,
            {
                name: (value[0], {f: tuple(r) for f, r in value[1].items()})
                for name, value in found.items()
                if isinstance(value[1], dict)
            },
            found,
        )
    in_place = compression_of(job.s1_path) == "none"
    # S1 name -> S2 name from the archive's metadata (v2); None: each S1 folder's JSON names its twin.
    wanted_s1 = job.archive.s1_twins(job.units)
    bands = {f"{band}.tif" for band in S1_BAND_NAMES}
    store_path = job.spool_dir / _S1_STORE_FILE
    store = None if in_place else open(store_path, "wb")
    store_size = [0]
    pending: dict[str, dict[str, object]] = {}
    twins: dict[str, tuple[str, dict]] = {}  # S2 name -> (s1 name, {file: ref})
    claims: dict[str, list[str]] = {}
    done_s1: dict[str, str] = {}  # complete S1 folders -> their S2 twin
    duplicated: dict[str, str] = {}  # S1 folders with a file met twice (skip_bad) -> why
    ring = HeldBlocks(BlockRing(4))

    def wants(name: str) -> tuple[str, str, str] | None:
        found = patch_file_of(name)
        if found is None:
            return None
        folder, file = found[1], found[2]
        if wanted_s1 is not None and folder not in wanted_s1:
            return None
        if file[len(folder) + 1 :] in bands or (wanted_s1 is None and file == folder + V1_METADATA_SUFFIX):
            return found
        return None

    def on_member(member: Member) -> None:
        problem = safe_name(member.name)
        if problem is not None:
            if not job.skip_bad:
                raise ArchiveFileError(job.s1_path, f"member {member.name}", problem)
            say(f"{job.s1_path}: member {member.name}: {problem}; ignored")
            return
        if not member.parts:
            return
        folder, file = member.key[1:]
        files = pending.setdefault(folder, {})
        key = "json" if file.endswith(V1_METADATA_SUFFIX) else file
        if key in files or folder in done_s1:
            reason = f"{file} is in {job.s1_path} twice (another copy at byte {member.offset:,})"
            if not job.skip_bad:
                raise ArchiveFileError(job.s1_path, f"member {member.name}", reason)
            duplicated.setdefault(folder, reason)
            return
        data = b"".join(ring.ring.maps[b][o : o + n] for b, o, n in member.parts)
        if file.endswith(V1_METADATA_SUFFIX):
            files["json"] = data
        elif in_place:
            files[file] = ("f", os.path.realpath(job.s1_path), member.offset, member.size)
        else:
            store.write(data)
            files[file] = ("f", str(store_path), store_size[0], len(data))
            store_size[0] += len(data)
        needed = len(bands) + (1 if wanted_s1 is None else 0)
        if len(files) == needed:
            del pending[folder]
            if wanted_s1 is None:
                s2_name = corresponding_s2(files.pop("json"), folder, job.s1_path)
            else:
                s2_name = wanted_s1[folder]
            done_s1[folder] = s2_name
            if s2_name in job.units:
                claims.setdefault(s2_name, []).append(folder)
                twins[s2_name] = (folder, files)

    say(f"indexing the Sentinel-1 archive {job.s1_path}")
    try:
        filler = Filler(job.s1_path, ring.ring, job.request.inflate_threads)
        *_, failure = stream_members(
            job.s1_path, filler, 4, ring, MemberSink(wants, on_member), MAX_BAND_FILE_BYTES
        )
    finally:
        ring.ring.close()
        if store is not None:
            store.close()
    if failure is not None:
        _raise_unless_skippable(failure, job.skip_bad)
        say(f"{failure}; Sentinel-1 patches after that point are missing")
    ambiguous = {name: folders for name, folders in claims.items() if len(folders) > 1}
    serial = {
        name: ([" and ".join(ambiguous[name]), None] if name in ambiguous else [twin[0], twin[1]])
        for name, twin in twins.items()
    }
    for folder, reason in duplicated.items():
        twin = done_s1.get(folder) or (wanted_s1 or {}).get(folder)
        if twin is not None:
            serial[twin] = ["bad", job.s1_path, reason]
    write_text_atomically(index_file, json.dumps(serial))
    return _s1_lookup(job, twins, serial)


def _s1_lookup(job: StreamJob, twins: dict, serial: dict) -> Callable[[str], tuple]:
    def lookup(name: str) -> tuple:
        entry = serial.get(name)
        if entry is None:
            where = job.archive.metadata_file or job.s1_path
            return ("bad", where, "no Sentinel-1 patch is paired with this patch")
        if len(entry) == 3:  # a fault found while indexing
            return tuple(entry)
        if entry[1] is None:
            return ("bad", job.s1_path, f"claimed by several Sentinel-1 patches: {entry[0]}")
        return twins[name]

    return lookup


def copy_records(target_fd: int, places: Iterable[tuple[str, int, int]], spool_dir: str) -> None:
    """Append the framed records at `places` ((spool, offset, length), ...) to `target_fd`, in order;
    adjacent records of one spool file are copied in one call, in the kernel where possible."""
    runs: list[list] = []
    for spool, offset, length in places:
        if runs and runs[-1][0] == spool and runs[-1][1] + runs[-1][2] == offset:
            runs[-1][2] += length
        else:
            runs.append([spool, offset, length])
    handles: dict[str, int] = {}
    try:
        for spool, offset, length in runs:
            fd = handles.get(spool)
            if fd is None:
                fd = handles[spool] = os.open(os.path.join(spool_dir, spool), os.O_RDONLY)
            while length > 0:
                try:
                    copied = os.copy_file_range(fd, target_fd, length, offset)
                except OSError:
                    copied = os.write(target_fd, os.pread(fd, min(length, 8 << 20), offset))
                if copied <= 0:
                    raise OSError(f"could not copy from {spool}")
                offset += copied
                length -= copied
    finally:
        for fd in handles.values():
            os.close(fd)


# --- patches of an archive file, one by one (predict, inspect, show) -----------------------------------
