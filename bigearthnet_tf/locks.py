"""One writer per output: a second `prepare`, `train`, `evaluate` or `export` on the same output refuses
while the first is alive, instead of deleting its temporary files or mixing its results.

The lock is an advisory `flock` on a small file in the output (`.bigearthnet-<kind>.lock`), taken
without waiting. The kernel releases it when its process ends, however it ends, so a killed run never
leaves a stuck lock; the file holds the owner's pid for the message, and is removed on release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from bigearthnet_tf.errors import UserError

LOCK_PREFIX = ".bigearthnet-"


def lock_path(folder: str | os.PathLike[str], kind: str) -> Path:
    """The lock file of `kind` (prepare, train, evaluate, export) in `folder`."""
    return Path(folder) / f"{LOCK_PREFIX}{kind}.lock"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str], kind: str, what: str) -> Iterator[None]:
    """Hold the `kind` lock of `folder` (created if needed) for the block; UserError naming `what`
    and the process that holds it, when another process does."""
    path = lock_path(folder, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"{what} is being written by another bigearthnet {kind} (process {holder}); wait for it to "
                "finish, or choose another output"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder removed the file while we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
