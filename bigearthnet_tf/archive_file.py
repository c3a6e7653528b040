"""The patches of a downloaded archive file (.tar, .tar.gz, .tar.zst) without extracting it: its
version and S1 pairing (`open_archive_file`), and its patches one by one as `Archive.read_patch` gives
a folder's (`patches_in_file`, for predict, inspect and show). `prepare` reads archive files in its
own stream phase (`prepare_stream`), with the same member naming (`patch_file_of`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Collection, Iterator

from bigearthnet_tf import tarstream
from bigearthnet_tf.archive import (
    Archive,
    BadPatchError,
    Patch,
    archive_class,
    decode_patch_files,
    v2_product,
    v2_s1_product,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.tarstream import (
    POLL_SECONDS,
    REGULAR,
    ArchiveFileError,
    ArchiveStream,
    BlockRing,
    Filler,
    HeldBlocks,
    Member,
    MemberSink,
    TarParser,
    is_archive_file,
    safe_name,
    stream_members,
)
from bigearthnet_tf.tiff import MAX_BAND_FILE_BYTES


def patch_file_of(name: str) -> tuple[str, str, str] | None:
    """(parent of the patch folder, patch folder, file) of a member path `.../<folder>/<folder>_x`."""
    parts = name.split("/")
    if "" in parts or "." in parts:  # `./x`, `a//b`, a folder's trailing slash
        parts = [part for part in parts if part not in ("", ".")]
    if len(parts) < 2 or not parts[-1].startswith(parts[-2] + "_"):
        return None
    return (parts[-3] if len(parts) > 2 else "", parts[-2], parts[-1])


def _layout_version(parent: str, folder: str, s1: bool) -> int:
    """2 if the patch folder sits in its v2 product folder, else 1."""
    try:
        product = v2_s1_product(folder) if s1 else v2_product(folder)
    except UserError:
        return 1
    return 2 if parent == product else 1


def peek_version(path: str, *, s1: bool = False) -> int:
    """The archive version (1 or 2) of an archive file, from the first patch file in it."""
    stream = ArchiveStream(path)
    try:
        buffer = bytearray(4 << 20)
        length = stream.readinto(buffer)
    finally:
        stream.close()
    parser = TarParser(path, [bytes(buffer[:length])], MAX_BAND_FILE_BYTES)
    parser.feed(0, length, 0)
    for member in parser.members(lambda name: None):  # a damaged header here is named at once
        found = patch_file_of(member.name) if member.kind == REGULAR else None
        if found is not None:
            return _layout_version(found[0], found[1], s1)
    kind = "Sentinel-1" if s1 else "Sentinel-2"
    raise UserError(f"{path}: no BigEarthNet {kind} patch files at its start; is this a BigEarthNet archive?")


def open_archive_file(
    path: str | os.PathLike, version: int | None = None, s1_root: str | os.PathLike | None = None
) -> Archive:
    """The `Archive` of an archive file: its version (from its members), where the v2 metadata is
    (beside the file), and the Sentinel-1 folder when S1 is a folder rather than a file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"archive file {path} does not exist or is not a file")
    found = peek_version(path)
    if version is not None and version != found:
        raise UserError(f"{path} holds a v{found} archive, not v{version}")
    kind = archive_class(found)
    top = os.path.dirname(os.path.abspath(path))
    if kind.metadata_file is not None and not os.path.isfile(os.path.join(top, kind.metadata_file)):
        raise UserError(f"{path}: a v{found} archive needs {kind.metadata_file} beside it, in {top}")
    s1_dir = s1_file = None
    if s1_root is not None and not is_archive_file(s1_root):
        s1_dir = kind.locate_s1(s1_root)
    elif s1_root is not None:
        s1_file = os.fspath(s1_root)
        if peek_version(s1_file, s1=True) != found:
            raise UserError(f"{s1_root} is not a Sentinel-1 archive of the same version (v{found}) as {path}")
    return kind(root=top if kind.metadata_file else path, s2_dir=path, s1_dir=s1_dir, s1_file=s1_file)


def patches_in_file(
    archive: Archive, wanted: Collection[str] | None = None
) -> Iterator[Patch | BadPatchError]:
    """The patches of the archive file `archive.s2_dir` (those in `wanted`, or all), decoded as
    `Archive.read_patch` decodes a folder's, in the file's order as each one completes; a patch that
    cannot be decoded, or whose files are incomplete at the end, comes as its BadPatchError. Sentinel-1
    comes from `archive.s1_dir` (a folder). A damaged or unsafe file raises ArchiveFileError.

    The file is parsed in a thread a bounded number of patches ahead; stopping early (closing the
    generator) stops it.
    """
    path = archive.s2_dir
    expected = frozenset(archive.file_suffixes)
    results: queue.Queue = queue.Queue(maxsize=_PATCHES_AHEAD)
    stop = threading.Event()
    done = object()

    def hand_over(item) -> None:
        while not stop.is_set():
            try:
                results.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue
        raise _Stopped

    def wants(name: str):
        found = patch_file_of(name)
        if found is None or (wanted is not None and found[1] not in wanted):
            return None
        return found if found[2][len(found[1]) + 1 :] in expected else None

    pending: dict[str, dict[str, bytes]] = {}
    complete: set[str] = set()
    ring = HeldBlocks(BlockRing(4 + MAX_BAND_FILE_BYTES // tarstream.BLOCK_BYTES))

    def on_member(member: Member) -> None:
        problem = safe_name(member.name)
        if problem is not None:
            raise ArchiveFileError(path, f"member {member.name}", problem)
        if not member.parts:
            return
        folder, file = member.key[1:]
        files = pending.setdefault(folder, {})
        if file in files or folder in complete:
            raise ArchiveFileError(path, f"member {member.name}", f"{file} is in {path} twice")
        files[file] = b"".join(ring.ring.maps[b][o : o + n] for b, o, n in member.parts)
        if len(files) == len(expected):
            del pending[folder]
            complete.add(folder)
            try:
                hand_over(archive.with_s1(decode_patch_files(archive, folder, files)))
            except BadPatchError as error:
                hand_over(error)

    def run() -> None:
        try:
            filler = Filler(path, ring.ring)
            sink = MemberSink(wants, on_member)
            *_, failure = stream_members(path, filler, len(ring.ring.maps), ring, sink, MAX_BAND_FILE_BYTES)
            if failure is not None:
                raise failure
            for name, files in pending.items():
                missing = sorted(f"{name}_{suffix}" for suffix in expected if f"{name}_{suffix}" not in files)
                hand_over(BadPatchError(name, missing[0], f"missing from {path}"))
            hand_over(done)
        except _Stopped:
            pass
        except BaseException as error:  # handed to the consumer, raised there
            with contextlib.suppress(_Stopped):
                hand_over(error)
        finally:
            ring.ring.close()

    thread = threading.Thread(target=run, name="archive-file-patches", daemon=True)
    thread.start()
    try:
        while True:
            item = results.get()
            if item is done:
                return
            if isinstance(item, BaseException) and not isinstance(item, BadPatchError):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


_PATCHES_AHEAD = 64  # decoded patches waiting for the consumer


class _Stopped(Exception):
    """The consumer of `patches_in_file` stopped early."""
