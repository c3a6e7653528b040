"""Reading inputs safely, and writing outputs so that a crash never leaves a half-written one.

- `read_input_file`: reads only regular files (a FIFO or device given by mistake is refused at once,
  never waited on) and at most a stated number of bytes, so memory stays bounded whatever size a file
  has; refusals are `InputFileError` (an OSError whose `strerror` says why).

- `open_atomically`, `replace_atomically`, `write_text_atomically`: a temporary file in the same
  folder, fsynced, then `os.replace`d (or, `exclusive`, hard-linked: never replacing a file that
  appeared meanwhile); readers see the old file or the new one. Every temporary file and folder is
  named `.<target>.tmp-<random>` (`temporary_name`).
- `publish_folder`: a set of files (an evaluation's results, a SavedModel) is written into a temporary
  folder beside the target, then renamed into place as a whole; an existing set is swapped with it
  atomically, so at every instant the target holds the complete old set or the complete new one.
  Temporary folders that a killed run left are removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY_MARK = ".tmp-"  # in the names of files and folders being written


class InputFileError(OSError):
    """An input file refused before it is read: not a regular file, or larger than allowed."""


def open_input_file(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular file `path`; InputFileError for anything else.

    Every input a command opens itself goes through here (or `read_input_file`): opened without
    blocking (a FIFO would wait for a writer forever), checked with fstat, then switched back to
    blocking reads.
    """
    fd, _ = _open_regular(path)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """A non-blocking read-only descriptor of the regular file `path` and its fstat."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(errno.EINVAL, "not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_input_file(path: str | os.PathLike[str], max_bytes: int) -> bytearray:
    """The bytes of the regular file `path`, if it holds at most `max_bytes`; InputFileError otherwise.

    `open_input_file`'s checks with fewer system calls (prepare reads 13 small files per patch): its
    one fstat gives the size too, and the descriptor stays non-blocking, which regular files ignore
    (open(2)).
    """
    fd, info = _open_regular(path)
    try:
        size = info.st_size
        if size > max_bytes:
            raise InputFileError(
                errno.EFBIG,
                f"{size:,} bytes, more than the {max_bytes:,} such a file can hold",
                os.fspath(path),
            )
        buffer = bytearray(size)  # writable: arrays viewing it may be normalised in place
        done = os.readv(fd, [buffer]) if size else 0
        while done < size:  # short reads are legal (network file systems); finish the job
            got = os.readv(fd, [memoryview(buffer)[done:]])
            if got == 0:
                del buffer[done:]
                break
            done += got
        return buffer
    finally:
        os.close(fd)


def append_synced_line(path: str | os.PathLike[str], entry: dict[str, Any]) -> None:
    """Append `entry` as one JSON line to the journal `path` and wait until it is on the disk (a
    torn last line, from a kill mid-write, is for the reader to skip)."""
    with open(path, "a", encoding="utf-8") as journal:
        journal.write(json.dumps(entry) + "\n")
        journal.flush()
        os.fsync(journal.fileno())


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """InputFileError unless `path` is a regular file (for readers that open files themselves)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputFileError(errno.EINVAL, "not a regular file", os.fspath(path))


def make_readable(path: str | os.PathLike[str]) -> None:
    """Give a file from `tempfile.mkstemp` (mode 0600) the permissions a plain `open` would: 0666 - umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def open_atomically(
    path: str | os.PathLike[str], mode: str = "w", *, exclusive: bool = False
) -> Iterator[IO[Any]]:
    """A stream (`mode` "w" for text, "wb" for bytes) whose content becomes `path` when the block
    ends without an exception.

    It writes to a temporary file in the same folder, fsyncs it and moves it onto `path`; readers see
    the old file or the new one, never a partial one, even if the process dies mid-write. On an
    exception the temporary file is removed and `path` is left as it was. `exclusive`: never replace
    a file; FileExistsError if `path` exists when the new one is put in place (see `_replacing`).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path, "", exclusive) as (handle, _):
        text = mode == "w"
        with os.fdopen(
            handle, mode, encoding="utf-8" if text else None, newline="" if text else None
        ) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())


def replace_atomically(
    target: str | os.PathLike[str],
    write: Callable[[str], object],
    suffix: str = "",
    *,
    exclusive: bool = False,
) -> Path:
    """`open_atomically` for writers that take a path (Keras, NumPy, ONNX): `write(temporary_path)`
    writes the new file, which is fsynced and moved onto `target`. `suffix` ends the temporary name,
    for writers that insist on theirs (Keras on `.weights.h5` and `.keras`)."""
    target = Path(target)
    with _replacing(target, suffix, exclusive) as (handle, temporary):
        os.close(handle)
        os.unlink(temporary)  # some writers (h5py, Keras' zip) refuse to open an existing empty file
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
    return target


def temporary_name(target: Path) -> str:
    """The prefix of every temporary file or folder written for `target`: `.<name>.tmp-` (then a
    random part and the suffix), which `remove_stale_temporaries` and `checkpoints.remove_temporaries`
    find after a kill."""
    return f".{target.name}{TEMPORARY_MARK}"


@contextlib.contextmanager
def _replacing(target: Path, suffix: str, exclusive: bool = False) -> Iterator[tuple[int, str]]:
    """A new empty file beside `target` (the same file system, so it can be renamed onto it), as
    (open handle, path), named by `temporary_name`. When the block, which writes and fsyncs it, ends
    without an exception, it is made readable and moved onto `target`; otherwise it is removed and
    `target` left as it was. `exclusive`: hard-linked into place instead, which fails with
    FileExistsError if `target` exists, even if it appeared while the file was written (on a file
    system without hard links, renamed after a last check)."""
    handle, temporary = tempfile.mkstemp(prefix=temporary_name(target), suffix=suffix, dir=target.parent)
    try:
        yield handle, temporary
        make_readable(temporary)
        if not exclusive:
            os.replace(temporary, target)
        else:
            try:
                os.link(temporary, target)
            except FileExistsError:
                raise
            except OSError:
                if target.exists():
                    raise FileExistsError(errno.EEXIST, "File exists", os.fspath(target)) from None
                os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def check_free_space(folder: str | os.PathLike[str], needed: int, target: str | os.PathLike[str]) -> None:
    """OSError (ENOSPC) naming `target` when the file system of `folder` has fewer than `needed` bytes
    free. Called before writers that crash rather than fail on a full disk (HDF5 ends the process
    with a segmentation fault), and before an old output is touched."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: writing it needs about {needed / 1e6:,.1f} MB, "
            f"{free / 1e6:,.1f} MB are free",
            os.fspath(target),
        )


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically (see `open_atomically`); return `path`."""
    with open_atomically(path) as stream:
        stream.write(text)
    return Path(path)


def new_temporary_folder(target: str | os.PathLike[str]) -> Path:
    """A new empty folder beside `target` (same file system, so it can be renamed onto it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=temporary_name(target), dir=target.parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder


def publish_folder(temporary: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the finished folder `temporary` to `target` as a whole, replacing an existing `target`.

    An existing target is swapped with the new folder in one atomic `renameat2(RENAME_EXCHANGE)` (Linux)
    and then removed. Where the kernel or file system cannot swap, the old folder is renamed aside
    first; a kill between the two renames is repaired by `remove_stale_temporaries` (it puts the old
    folder back), so a reader never finds a mix.
    """
    temporary, target = Path(temporary), Path(target)
    for path in temporary.iterdir():
        if path.is_file():
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())
    if not target.exists():
        os.replace(temporary, target)
    elif exchange(temporary, target):
        shutil.rmtree(temporary, ignore_errors=True)  # it now holds the old set
    else:
        aside = Path(tempfile.mkdtemp(prefix=temporary_name(target) + ASIDE, dir=target.parent))
        os.replace(target, aside / target.name)
        os.replace(temporary, target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_directory(target.parent)
    return target


def exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    if _renameat2 is None:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the kernel or the file system cannot swap: fall back to two renames
    raise OSError(error, os.strerror(error), os.fspath(second))


def _load_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = _load_renameat2() if sys.platform.startswith("linux") else None
ASIDE = "old-"  # marks the folder holding an old set during a two-rename replacement


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporary folders and files that killed runs left in `folder` (only those of output
    `name` when given); return them. Call it while holding the output's lock."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        # A two-rename replacement killed in between: its old set goes back where it was.
        for aside in folder.glob(f".{glob.escape(name) if name else '*'}{TEMPORARY_MARK}{ASIDE}*"):
            for old in aside.iterdir() if aside.is_dir() else ():
                if not (folder / old.name).exists():
                    os.replace(old, folder / old.name)
        for path in folder.glob(f".{glob.escape(name) if name else '*'}{TEMPORARY_MARK}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_directory(directory: Path) -> None:
    """Make renames durable (POSIX); harmless where directories cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
