"""Read a `.tar`, `.tar.gz` or `.tar.zst` file in one streaming pass, into shared memory blocks.

The downloads of BigEarthNet are tar files of ~8 million small members. Python's `tarfile` spends
most of a core per 1,300 patches on them; this reader does only what preparation needs:

- `ArchiveStream` opens the file, tells the compression from its first bytes (`compression_of`: gzip
  through `isal`, zstd through `zstandard`, both several times faster than zlib), and counts
  compressed bytes and the seconds spent reading and decompressing. A gzip file, one stream that
  one thread inflates at ~300 MB/s whatever the machine, can instead be inflated on several
  threads by `rapidgzip` (`inflate_threads`; what `prepare` does on a machine with cores to spare).
- `BlockRing` holds the decompressed stream in a few large blocks of shared memory (memfd on Linux),
  which worker processes map read-only: member data reaches them without being copied or pickled.
  An uncompressed tar needs none: `MappedFile` maps the file itself.
- `TarParser` walks the tar headers (ustar, GNU long names, pax) across those blocks and yields each
  member with the places of its data, checking header checksums and refusing unsafe names.

A `Filler` thread (a `ProcessFiller` process for compressed files, whose inflating would otherwise
share the GIL with the parser) fills free blocks, so reading and decompressing overlap with parsing
in the main thread and with encoding in the workers. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import mmap
import os
import queue
import re
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import open_input_file

BLOCK_BYTES = 32 << 20  # a multiple of the 512-byte tar record, so headers never straddle blocks
_RECORD = 512
_READ_CHUNK = 4 << 20  # compressed bytes handed to a decompressor at a time

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_COMPRESSIONS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}
SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd")

# Type flags (POSIX and GNU).
REGULAR = "file"
DIRECTORY = "directory"
LINK = "link"
OTHER = "other"
_EXTENSIONS = frozenset((b"L", b"K", b"x", b"g"))  # GNU long names, pax headers: they describe the next
_ZERO_RECORD = bytes(_RECORD)
_TYPES = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"5": DIRECTORY, b"1": LINK, b"2": LINK}


_ENDS_EARLY = ("ended before", "truncated", "end of file reached")  # what inflaters say of a cut file
POLL_SECONDS = 0.05  # how long a waiting reader of blocks sleeps before it looks again
MAX_ZSTD_WINDOW = 1 << 31  # bytes: zstd's largest window (--long=31)


class ArchiveFileError(UserError):
    """A damaged or unsafe archive file; the message is `<archive>: <where>: <problem>`.

    `unverified`: the compressed data is corrupt, so what was inflated before the fault is not
    verified either (gzip's CRC and zstd's checksum come at the end of a member or frame); a cut file
    or a bad tar header leaves what came before as good as any.
    """

    def __init__(self, archive: str, where: str, problem: str, unverified: bool = False) -> None:
        super().__init__(f"{archive}: {where}: {problem}")
        self.archive, self.where, self.problem, self.unverified = archive, where, problem, unverified

    def __reduce__(self):
        return (type(self), (self.archive, self.where, self.problem, self.unverified))


def is_archive_file(path: str | os.PathLike) -> bool:
    """Whether `path` names an archive file (rather than a folder) to prepare from."""
    return os.path.isfile(path) or os.fspath(path).endswith(SUFFIXES)


# --- the byte stream -------------------------------------------------------------------------------


class _CountingFile(io.RawIOBase):
    """The compressed file, counting bytes and the seconds spent in read calls."""

    def __init__(self, path: str) -> None:
        self._fd = open_input_file(path)
        if hasattr(os, "posix_fadvise"):  # the kernel may read ahead more aggressively
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self.bytes_read = 0
        self.read_seconds = 0.0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        started = time.perf_counter()
        count = os.readv(self._fd, [buffer])
        self.read_seconds += time.perf_counter() - started
        self.bytes_read += count
        return count

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class ArchiveStream:
    """The decompressed bytes of an archive file, read with `readinto`.

    `compression` is "none", "gzip" or "zstd"; `bytes_read` counts the file's (compressed) bytes;
    `read_seconds` and `decompress_seconds` say where the reading time went (the parallel inflater
    reads the file itself: its reading counts as decompressing). With `inflate_threads` > 1 a gzip
    file is inflated on that many threads (`parallel`), else by one isal thread.
    """

    def __init__(self, path: str | os.PathLike, inflate_threads: int = 1) -> None:
        self.path = os.fspath(path)
        self.compression = compression_of(self.path)
        self._file = _CountingFile(self.path)  # also where a path that is no readable file is refused
        self.decompress_seconds = 0.0
        self.parallel = self.compression == "gzip" and inflate_threads > 1 and _has_rapidgzip()
        if self.parallel:
            self._reader = _ParallelGzipReader(self.path, inflate_threads)
        elif self.compression == "gzip":
            self._reader = _GzipReader(self._file)
        elif self.compression == "zstd":
            import zstandard

            # Multi-frame files (zstd -T0, pzstd) are read through to their end.
            # Windows up to zstd's largest (--long=31: 2 GiB) are accepted; memory grows by the window.
            self._reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(
                self._file, read_size=_READ_CHUNK, read_across_frames=True
            )
        else:
            self._reader = self._file

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read if self.parallel else self._file.bytes_read

    @property
    def read_seconds(self) -> float:
        return self._file.read_seconds

    def readinto(self, buffer) -> int:
        """Fill `buffer` as far as the stream goes; fewer bytes only at its end."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            read_before = self._file.read_seconds
            started = time.perf_counter()
            try:
                count = self._reader.readinto(view[done:])
            except OSError as error:
                if self._reader is self._file:
                    raise ArchiveFileError(self.path, "reading", error.strerror or str(error)) from None
                raise self._corrupt(error) from None
            except Exception as error:  # decompressors raise their own types (zstd.ZstdError, EOFError)
                raise self._corrupt(error) from None
            finally:
                if self._reader is not self._file:
                    elapsed = time.perf_counter() - started
                    self.decompress_seconds += elapsed - (self._file.read_seconds - read_before)
            if not count:
                break
            done += count
        return done

    def _corrupt(self, error: Exception) -> ArchiveFileError:
        where = f"compressed byte {self.bytes_read:,}"
        if "too much memory" in str(error):
            return ArchiveFileError(
                self.path,
                where,
                f"a zstd window larger than the {MAX_ZSTD_WINDOW >> 20:,} MiB this reader allows; "
                "recompress without --long",
            )
        if isinstance(error, InflateRatioError):
            return ArchiveFileError(self.path, where, str(error))
        text = str(error)
        if isinstance(error, EOFError) or any(sign in text.lower() for sign in _ENDS_EARLY):
            return ArchiveFileError(
                self.path, where, f"the {self.compression} data ends early (truncated file?)"
            )
        # rapidgzip's messages start with "[Class][Thread id]" tags and go on about its internals
        text = re.sub(r"^(\[[^]]*\])+\s*", "", text).split("!", 1)[0].split("\n", 1)[0][:160]
        return ArchiveFileError(
            self.path, where, f"corrupt {self.compression} data ({text})", unverified=True
        )

    def close(self) -> None:
        if self._reader is not self._file:
            self._reader.close()
        self._file.close()


class _GzipReader(io.RawIOBase):
    """Gzip members (one, or several as pigz and bgzip write) inflated by `isal` straight from 4 MB
    reads: half again as fast as `isal.igzip.IGzipFile`, whose buffering costs more than inflating."""

    def __init__(self, source: _CountingFile) -> None:
        from isal import isal_zlib

        self._zlib = isal_zlib
        self._source = source
        self._inflate = isal_zlib.decompressobj(31)  # 31: a gzip header and trailer
        self._pending = memoryview(b"")
        self._input = memoryview(b"")  # compressed bytes not yet given to the inflater
        self._chunk = bytearray(_READ_CHUNK)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        # Inflated output is capped at the caller's buffer: a small member that inflates to gigabytes
        # (a "zip bomb") never sits in memory, whatever it claims.
        while not self._pending:
            if self._inflate.eof and (self._inflate.unused_data or self._input):
                # The next member of a multi-member file (pigz, bgzip, cat a.gz b.gz).
                self._input = memoryview(self._inflate.unused_data + bytes(self._input))
                self._inflate = self._zlib.decompressobj(31)
            if not self._input:
                count = self._source.readinto(self._chunk)
                if not count:
                    if not self._inflate.eof:
                        raise EOFError("the gzip data ends early")
                    return 0
                self._input = memoryview(self._chunk)[:count]
                if self._inflate.eof:  # a member ended exactly where the last read did
                    self._inflate = self._zlib.decompressobj(31)
            self._pending = memoryview(self._inflate.decompress(self._input, max(len(buffer), 1 << 16)))
            self._input = memoryview(self._inflate.unconsumed_tail)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class InflateRatioError(ValueError):
    """A gzip file that inflates far more than any archive of patches does (a "zip bomb")."""


def _has_rapidgzip() -> bool:
    try:
        import rapidgzip  # noqa: F401
    except ImportError:  # a platform without its wheel: one isal thread instead
        return False
    return True


class _ParallelGzipReader(io.RawIOBase):
    """A gzip file inflated on several threads by `rapidgzip`, which finds deflate block boundaries
    in one gzip stream itself and checks every member's CRC-32.

    Two checks of ours beside it: rapidgzip ends a stream that is cut short without an error, so
    the end must lie at the end of the file; and it holds chunks of inflated data in memory, so a
    file that inflates more than `MAX_INFLATE_RATIO` times its size (satellite images compress
    about 1.3:1) is refused once `RATIO_JUDGED_AFTER` bytes are out. One isal thread
    (`inflate_threads` 1) streams any file in bounded memory.
    """

    MAX_INFLATE_RATIO = 64
    RATIO_JUDGED_AFTER = 256 << 20

    def __init__(self, path: str, threads: int) -> None:
        import rapidgzip

        self._size = os.path.getsize(path)
        self._file = rapidgzip.RapidgzipFile(path, parallelization=threads)
        self.inflated = 0
        self.read_seconds = 0.0  # rapidgzip's own reads are not timed apart from inflating

    @property
    def bytes_read(self) -> int:
        return int(self._file.tell_compressed()) // 8  # it counts bits

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._file.readinto(buffer)
        self.inflated += count
        if not count and self.bytes_read < self._size:
            raise EOFError("the gzip data ends early")
        if (
            self.inflated > self.RATIO_JUDGED_AFTER
            and self.inflated > self.MAX_INFLATE_RATIO * self.bytes_read
        ):
            raise InflateRatioError(
                f"inflates more than {self.MAX_INFLATE_RATIO} times its size (a gzip bomb?); "
                "--inflate-threads 1 reads it in bounded memory"
            )
        return count

    def close(self) -> None:
        self._file.close()  # its threads must end before the interpreter does
        super().close()


def compression_of(path: str | os.PathLike) -> str:
    """ "none", "gzip" or "zstd", from the first bytes of archive file `path`; UserError otherwise."""
    try:
        fd = open_input_file(path)
        try:
            head = os.pread(fd, _RECORD, 0)
        finally:
            os.close(fd)
    except OSError as error:
        raise UserError(f"cannot read archive file {path}: {error.strerror}") from None
    return _compression(os.fspath(path), head)


def _compression(path: str, head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    for magic, name in _OTHER_COMPRESSIONS.items():
        if head.startswith(magic):
            raise UserError(
                f"{path}: a {name} file; expected .tar, .tar.gz or .tar.zst (recompress it, or extract it "
                "and pass the folder)"
            )
    if len(head) < _RECORD or head[257:262] != b"ustar" and _checksum_problem(head) is not None:
        raise UserError(f"{path}: not a tar, .tar.gz or .tar.zst file")
    return "none"


# --- shared memory blocks ----------------------------------------------------------------------------


class BlockRing:
    """`count` blocks of shared memory that worker processes open by path (read-only).

    On Linux each block is a memfd, opened by workers through /proc/<pid>/fd: the memory goes away
    with the last process that maps it, even if this one is killed. Elsewhere it is a temporary file.
    """

    def __init__(self, count: int, size: int | None = None) -> None:
        self.size = size = size or BLOCK_BYTES
        self._fds: list[int] = []
        self._temporary: list[str] = []
        self.maps: list[mmap.mmap] = []
        self.paths: list[str] = []
        try:
            for index in range(count):
                if hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd"):
                    fd = os.memfd_create(f"bigearthnet-block-{index}")
                    path = f"/proc/{os.getpid()}/fd/{fd}"
                else:
                    fd, path = tempfile.mkstemp(prefix="bigearthnet-block-")
                    self._temporary.append(path)
                self._fds.append(fd)
                os.ftruncate(fd, size)
                self.maps.append(mmap.mmap(fd, size))
                self.paths.append(path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for block in self.maps:
            try:
                block.close()
            except BufferError:  # a view is still alive somewhere; the fd close below still frees it
                pass
        for fd in self._fds:
            os.close(fd)
        for path in self._temporary:
            os.unlink(path)
        self.maps, self._fds, self._temporary = [], [], []


class MappedFile:
    """An uncompressed tar read in place: block 0 is the whole file, mapped read-only, and the page
    cache is the buffer; nothing is copied on the way to the workers, who map it too.

    A `Filler` hands it out in BLOCK_BYTES steps, each read into the page cache by the filling
    thread first, so the disk stays busy while the main thread parses what came before.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.paths = [path]
        self._fd = open_input_file(path)
        self.size = os.fstat(self._fd).st_size
        self.maps = [mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)]
        self.read_seconds = 0.0
        self._scratch: bytearray | None = None
        self._null: int | None = None
        if sys.platform.startswith("linux"):  # sendfile to any file (here /dev/null): Linux only
            self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._null is not None:
            os.close(self._null)
            self._null = None
        for block in self.maps:
            try:
                block.close()
            except BufferError:
                pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.maps = []

    def fill(self, start: int, end: int) -> None:
        """Bring bytes [start, end) into the page cache; return when they are there.

        Waited for in a system call that does not hold the GIL (a page fault on the map would hold
        it and stall the parsing thread): `sendfile` to /dev/null, which reads the pages in and
        copies nothing (a fifth of the CPU of a read), else `preadv` into a scratch buffer."""
        started = time.perf_counter()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_WILLNEED)
        position = start
        if self._null is not None:
            try:
                while position < end:
                    count = os.sendfile(self._null, self._fd, position, end - position)
                    if count <= 0:
                        break
                    position += count
            except OSError:  # not on this system or file system: read instead
                os.close(self._null)
                self._null = None
        if position < end and self._scratch is None:
            self._scratch = bytearray(BLOCK_BYTES)
        while position < end:  # one call a step: the GIL is taken back once a step, not once a piece
            count = os.preadv(self._fd, [memoryview(self._scratch)[: end - position]], position)
            if count <= 0:
                break
            position += count
        self.read_seconds += time.perf_counter() - started


class BlockViews:
    """A worker's read-only maps of a ring's blocks (opened once per process)."""

    def __init__(self, paths: list[str]) -> None:
        self._maps = []
        for path in paths:
            with open(path, "rb") as handle:
                self._maps.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))

    def read(self, parts: tuple[tuple[int, int, int], ...]) -> memoryview | bytes:
        """The bytes at `parts` ((block, offset, length), ...): a view when they lie in one block."""
        if len(parts) == 1:
            block, offset, length = parts[0]
            return memoryview(self._maps[block])[offset : offset + length]
        return b"".join(self._maps[block][offset : offset + length] for block, offset, length in parts)


class Filler:
    """Fills free blocks in stream order, beside the thread that parses them: `put(block)` hands a
    block over (for a `MappedFile`, a token for one more step of block 0); `get(timeout)` gives
    `(block, length, stream_offset)` (queue.Empty if none came), then None at the end, or the
    exception that ended the stream. `bytes_read`, `read_seconds`, `decompress_seconds` say how far
    and how long. This one is a thread: enough when reading holds the GIL only briefly."""

    def __init__(self, path: str, ring: BlockRing | MappedFile, inflate_threads: int = 1) -> None:
        self._stream = ArchiveStream(path, inflate_threads)  # rapidgzip inflates without the GIL
        self._ring = ring
        self._free: queue.Queue = queue.Queue()
        self._filled: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._fill, name="archive-reader", daemon=True)
        self._thread.start()

    def put(self, block: int | None) -> None:
        self._free.put(block)

    def get(self, timeout: float):
        return self._filled.get(timeout=timeout)

    @property
    def bytes_read(self) -> int:
        return self._stream.bytes_read

    @property
    def read_seconds(self) -> float:
        if isinstance(self._ring, MappedFile):
            return self._ring.read_seconds
        return self._stream.read_seconds

    @property
    def decompress_seconds(self) -> float:
        return self._stream.decompress_seconds

    def close(self) -> None:
        self._free.put(None)
        self._thread.join()
        self._stream.close()

    def _fill(self) -> None:
        try:
            mapped = self._ring if isinstance(self._ring, MappedFile) else None
            free = iter(self._free.get, None)
            for item in _fill_blocks(self._stream, self._ring.maps, self._ring.size, mapped, free):
                self._filled.put(item)
        except BaseException as error:  # handed to the parsing thread, which raises it
            self._filled.put(error)


def _fill_blocks(stream: ArchiveStream, maps: list, size: int, mapped: MappedFile | None, free) -> Iterator:
    """What a filler does: for each block number from `free`, read the next part of the stream into
    it (blocks of `size` bytes; for a mapped file, one more step of it) and yield `(block, length,
    offset)`; yield None after the last."""
    offset = 0
    for block in free:
        if mapped is not None:
            end = min(offset + BLOCK_BYTES, size)
            mapped.fill(offset, end)
            yield (0, end, 0)
            offset = end
            if end == size:
                yield None
                return
            continue
        length = stream.readinto(maps[block])
        yield (block, length, offset)
        offset += length
        if length < size:
            yield None
            return


class ProcessFiller:
    """A `Filler` in a process of its own: decompressing then never competes with parsing for the
    GIL (gzip's inflating holds it in every 4 MB call; a thread ran at half speed beside the parser)."""

    def __init__(self, path: str, ring: BlockRing, context, inflate_threads: int = 1) -> None:
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_fill_in_process,
            args=(path, ring.paths, ring.size, child, inflate_threads),
            name="archive-reader",
            daemon=True,
        )
        self._process.start()
        child.close()
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.decompress_seconds = 0.0

    def put(self, block: int | None) -> None:
        try:
            self._connection.send(block)
        except OSError:  # the reader has reached the end and gone: it needs no more blocks
            pass

    def get(self, timeout: float):
        if not self._connection.poll(timeout):
            if not self._process.is_alive():
                raise UserError("the archive reader process died unexpectedly (killed, or out of memory?)")
            raise queue.Empty
        item, self.bytes_read, self.read_seconds, self.decompress_seconds = self._connection.recv()
        return item

    def close(self) -> None:
        self.put(None)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._connection.close()


def _fill_in_process(path: str, block_paths: list[str], size: int, connection, inflate_threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    stream = ArchiveStream(path, inflate_threads)
    if stream.parallel:  # rapidgzip prints its own notes (a cut file, say); errors come through `report`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    maps = []
    for block_path in block_paths:
        with open(block_path, "r+b") as handle:
            maps.append(mmap.mmap(handle.fileno(), size))

    def report(item) -> None:
        connection.send((item, stream.bytes_read, stream.read_seconds, stream.decompress_seconds))

    try:
        for item in _fill_blocks(stream, maps, size, None, iter(connection.recv, None)):
            report(item)
    except EOFError:  # the parent went away
        return
    except BaseException as error:
        report(error)
    finally:
        stream.close()


# --- tar headers ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Member:
    """One tar member: its name, kind, size and where its data is (in the ring, and in the stream)."""

    name: str
    kind: str  # REGULAR, DIRECTORY, LINK or OTHER
    size: int
    parts: tuple[tuple[int, int, int], ...]  # (block, offset, length); empty unless asked for
    offset: int  # of the data in the decompressed stream (the file offset for an uncompressed tar)
    key: object = None  # what `wants` returned for it


def _byte_sum(header: bytes) -> int:
    """The sum of a 512-byte header's bytes, from Adler-32's running sum (1 + sum mod 65521): exact
    for halves of 256 bytes, whose sums stay below 65521, and ten times faster than `sum`."""
    return (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2


def _checksum_problem(header: bytes) -> str | None:
    field = header[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field or b"x", 8)
    except ValueError:
        return f"header checksum field {bytes(header[148:156])!r} is not a number"
    unsigned = _byte_sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return None
    signed = unsigned - 256 * sum(1 for byte in header if byte >= 128)  # old tars summed signed bytes
    if stored == signed:
        return None
    return f"bad header checksum (stored {stored}, computed {unsigned})"


def _checksum_holds(header: bytes) -> bool:
    """Whether a header's checksum field holds the unsigned sum of its bytes (the field counted as
    spaces), as every tar writer today stores it; `_checksum_problem` judges the rest."""
    field = header[148:156]
    try:
        stored = int(field.split(b"\0", 1)[0].strip() or b"x", 8)
    except ValueError:
        return False
    # The field's own bytes from Adler-32's running sum (1 + sum), as in `_byte_sum`.
    return stored == _byte_sum(header) - (zlib.adler32(field) & 0xFFFF) + 1 + 8 * 32


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _size(field: bytes | str, archive: str, where: Callable[[], str], pax: bool = False) -> int:
    """A member's size from its header field (octal, GNU base-256) or pax record (decimal); every
    value that is not a size of zero or more is an ArchiveFileError (at `where()`, named only then:
    the walk reads a size per header), so that no header can send the parser backwards (a loop) or
    past the end of the stream."""
    try:
        size = int(field) if pax and str(field).strip().isdigit() else (-1 if pax else _number(field))
    except ValueError:
        size = -1
    if size < 0:
        kind = "pax size record" if pax else "size field"
        text = field.decode("ascii", "replace").strip("\0 ") if isinstance(field, bytes) else field
        raise ArchiveFileError(archive, where(), f"{kind} {text[:40]!r} is not a size")
    return size


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def safe_name(name: str) -> str | None:
    """Why `name` may not be used as a member path (absolute, `..`), or None if it is fine."""
    if name.startswith("/"):
        return "absolute member name"
    if ".." in name.split("/"):
        return "member name with '..'"
    return None


class TarParser:
    """Walk tar headers across filled blocks; `feed` a block, then take the members it completed.

    `wants(name, kind)` decides whether a member's data places are computed (the caller will read
    them); other members are only named. Blocks are released (`released`) once no member that is
    still to come can need them.
    """

    def __init__(self, archive: str, blocks: list[mmap.mmap], max_member_bytes: int) -> None:
        self.archive = archive
        self._maps = blocks
        self.max_member_bytes = max_member_bytes
        self._blocks: deque[tuple[int, int, int]] = deque()  # (block, stream offset, length)
        self._end = 0  # stream offset just past the data fed so far
        self._position = 0  # stream offset of the next header
        self._long_name: str | None = None
        self._pax: dict[str, str] = {}
        self._last_name: str | None = None
        self._waiting: str | None = None  # a member whose data is not all in yet
        self.finished = False  # the end-of-archive marker was seen
        self.released: list[int] = []

    def feed(self, block: int, length: int, offset: int) -> None:
        if self._blocks and self._blocks[-1][:2] == (block, offset):  # more of a mapped file
            self._blocks[-1] = (block, offset, length)
        else:
            self._blocks.append((block, offset, length))
        self._end = offset + length

    def members(self, wants) -> Iterator[Member]:
        """The members whose header and data lie in what has been fed; stops where data runs out.

        `wants(name)` returns a key (anything true) for a regular file whose data will be read; the
        member then carries that key and the places of its data.
        """
        # The walk runs block by block, with the block's map and bounds in locals: 13 members a patch
        # pass through here, so the per-header work is kept to what the checks need.
        while not self.finished and self._position + _RECORD <= self._end:
            block, offset = self._locate(self._position)
            base = self._position - offset  # stream offset of the block's first byte
            fed = self._fed_in(block)
            data = self._maps[block]
            if offset + _RECORD > fed:
                raise AssertionError(f"the header at stream offset {self._position} straddles two blocks")
            while offset + _RECORD <= fed:
                header = data[offset : offset + _RECORD]  # never straddles two blocks
                if header == _ZERO_RECORD:
                    self.finished = True  # end-of-archive marker (its second zero record is not needed)
                    break
                if not _checksum_holds(header):
                    problem = _checksum_problem(header)  # None for old tars that summed signed bytes
                    if problem is not None:
                        raise ArchiveFileError(self.archive, self._after(), problem)
                size = _size(header[124:136], self.archive, self._after)
                flag = header[156:157]
                data_start = base + offset + _RECORD
                if flag in _EXTENSIONS:
                    if size > 1 << 20:
                        raise ArchiveFileError(self.archive, self._after(), "oversized extended header")
                    if data_start + size > self._end:
                        self._release()
                        return  # wait for its data
                    extension = self._bytes(data_start, size)
                    if flag == b"L":
                        self._long_name = _text(extension)
                    elif flag == b"x":
                        self._pax = _pax_records(extension, self.archive, self._after())
                    self._position = data_start + -(-size // _RECORD) * _RECORD
                    offset = self._position - base
                    continue
                name = self._member_name(header)
                if "size" in self._pax:
                    size = _size(self._pax["size"], self.archive, self._after, pax=True)
                kind = _TYPES.get(flag, OTHER)
                key = wants(name) if kind == REGULAR and size <= self.max_member_bytes else None
                if key and data_start + size > self._end:
                    self._waiting = name
                    self._release()
                    return  # its data is not all in yet; skipped data may run past what is fed
                self._waiting = None
                if not key:
                    parts: tuple[tuple[int, int, int], ...] = ()
                elif size and data_start + size <= base + fed:
                    parts = ((block, offset + _RECORD, size),)
                else:
                    parts = self._parts(data_start, size)
                self._position = data_start + -(-size // _RECORD) * _RECORD
                offset = self._position - base
                if self._long_name is not None or self._pax:
                    self._long_name, self._pax = None, {}
                self._last_name = name
                yield Member(name, kind, size, parts, data_start, key)
        self._release()

    def _after(self) -> str:
        last = self._last_name
        return "the first header" if last is None else f"the header after member {last}"

    def _locate(self, position: int) -> tuple[int, int]:
        """(block, offset in it) of a stream position that has been fed."""
        for block, offset, length in reversed(self._blocks):
            if offset <= position < offset + length:
                return block, position - offset
        raise AssertionError(f"position {position} is not in a fed block")

    def _member_name(self, header: bytes) -> str:
        if "path" in self._pax:
            return self._pax["path"]
        if self._long_name is not None:
            return self._long_name
        name = _text(header[0:100])
        if header[257:263] == b"ustar\x00":  # POSIX ustar: a prefix in front of the name
            prefix = _text(header[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        return name

    def _bytes(self, start: int, length: int) -> bytes:
        return b"".join(self._maps[block][begin:end] for block, begin, end in self._spans(start, length))

    def _parts(self, start: int, length: int) -> tuple[tuple[int, int, int], ...]:
        if length == 0:  # an empty file may start where the data fed so far ends: no block holds it
            block, _, fed = self._blocks[-1]
            return ((block, fed, 0),)
        block, offset = self._locate(start)
        if offset + length <= self._fed_in(block):
            return ((block, offset, length),)
        return tuple((block, begin, end - begin) for block, begin, end in self._spans(start, length))

    def _fed_in(self, block: int) -> int:
        for fed, _, length in reversed(self._blocks):
            if fed == block:
                return length
        return 0

    def _spans(self, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        end = start + length
        for block, offset, size in self._blocks:
            if offset + size <= start or offset >= end:
                continue
            yield block, max(start, offset) - offset, min(end, offset + size) - offset

    def _release(self) -> None:
        while self._blocks and self._blocks[0][1] + self._blocks[0][2] <= self._position:
            self.released.append(self._blocks.popleft()[0])

    def check_complete(self) -> None:
        """At the end of the stream: ArchiveFileError unless the archive ended where it should."""
        if self.finished:
            return
        if self._position != self._end and (self._waiting or self._last_name):
            where = f"member {self._waiting or self._last_name}"
            raise ArchiveFileError(
                self.archive, where, "the archive ends inside this member (truncated file?)"
            )
        where = "the start" if self._last_name is None else f"after member {self._last_name}"
        raise ArchiveFileError(self.archive, where, "no end-of-archive marker (truncated file?)")


def _pax_records(data: bytes, archive: str, last: str) -> dict[str, str]:
    records: dict[str, str] = {}
    position = 0
    while position < len(data) and data[position : position + 1] not in (b"\0", b""):
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise ArchiveFileError(archive, f"the pax header after {last}", "malformed record") from None
        record = data[space + 1 : position + length - 1]
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += length
        if length <= 0:
            raise ArchiveFileError(archive, f"the pax header after {last}", "malformed record")
    return records


# --- streaming the members of an archive file into a consumer -------------------------------------------


class HeldBlocks:
    """The block ring with reference counts: a block goes back to the reader when neither a batch
    in flight nor an incomplete patch points into it and the parser is past it."""

    def __init__(self, storage: BlockRing | MappedFile) -> None:
        self.ring = storage
        self.mapped = isinstance(storage, MappedFile)  # never refilled: nothing to free or spill
        self.refs = [0] * len(storage.maps)
        self.retired: set[int] = set()
        self.free_queue: queue.Queue | None = None

    def hold(self, parts: Iterable[tuple[int, int, int]]) -> list[int]:
        """Count one more holder of each block `parts` lie in; return those blocks."""
        blocks = [] if self.mapped else sorted({part[0] for part in parts})
        for block in blocks:
            self.refs[block] += 1
        return blocks

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        self._maybe_free(block)

    def retire(self, block: int) -> None:
        self.retired.add(block)
        self._maybe_free(block)

    def _maybe_free(self, block: int) -> None:
        if block in self.retired and self.refs[block] == 0 and not self.mapped:
            self.retired.discard(block)
            if self.free_queue is not None:
                self.free_queue.put(block)


@dataclass
class MemberSink:
    """What `stream_members` calls: `wants(name)` picks the members whose data is kept (its answer becomes
    `Member.key`), `on_member` gets them, `after_block` runs once a block is parsed, `wait_for_work`
    while the reader has nothing new."""

    wants: Callable[[str], object]
    on_member: Callable[[Member], None]
    after_block: Callable[[int], None] = lambda block: None
    wait_for_work: Callable[[], None] = lambda: None


def stream_members(
    path: str,
    filler: Filler | ProcessFiller,
    blocks: int,
    ring: HeldBlocks,
    sink: MemberSink,
    max_member_bytes: int,
    progress: Callable[[int], None] = lambda count: None,
) -> tuple[float, float, float, ArchiveFileError | None]:
    """Parse every member of archive file `path` into `sink` (data kept for wanted members of at most
    `max_member_bytes`). Returns the seconds spent reading, decompressing and parsing, and the error
    that ended the stream early, if any."""
    parse = 0.0
    ring.free_queue = filler
    for block in range(blocks):
        filler.put(block)
    parser = TarParser(path, ring.ring.maps, max_member_bytes)
    failure: ArchiveFileError | None = None
    try:
        while True:
            try:
                item = filler.get(timeout=POLL_SECONDS)
            except queue.Empty:
                sink.wait_for_work()
                continue
            if item is None:
                parser.check_complete()
                break
            if isinstance(item, BaseException):
                raise item
            block, length, offset = item
            started = time.perf_counter()
            parser.feed(block, length, offset)
            for member in parser.members(sink.wants):
                sink.on_member(member)
            parse += time.perf_counter() - started
            for done in parser.released:
                ring.retire(done)
            parser.released.clear()
            sink.after_block(block)
            if ring.mapped:
                filler.put(0)  # one more step of the file may be read ahead
            progress(length if ring.mapped else filler.bytes_read)
            sink.wait_for_work()
    except ArchiveFileError as error:
        failure = error
    finally:
        ring.free_queue = None  # blocks freed from now on are not read into again
        filler.close()
    return filler.read_seconds, filler.decompress_seconds, parse, failure
