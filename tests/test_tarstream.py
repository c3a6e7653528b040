"""Tar archives read in one pass (`tarstream.py`): the header walker across blocks, the byte streams of
.tar/.tar.gz/.tar.zst, and the faults it names. Archives here are made with Python's `tarfile`."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import pytest
import zstandard

from bigearthnet_tf import tarstream
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.tarstream import (
    REGULAR,
    ArchiveFileError,
    ArchiveStream,
    TarParser,
    compression_of,
    is_archive_file,
    safe_name,
)

FILES = {
    "BigEarthNet-v1.0/P_1_1/P_1_1_B02.tif": b"a" * 700,
    "BigEarthNet-v1.0/P_1_1/P_1_1_B03.tif": b"b" * 1300,
    "BigEarthNet-v1.0/" + "long-folder-name/" * 8 + "P_2_2_B02.tif": b"c" * 5,  # a GNU long name
}


def _tar(files=FILES, format=tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as archive:
        archive.addfile(tarfile.TarInfo("BigEarthNet-v1.0/P_1_1"), None)  # no type set: a file of 0 bytes
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _parse(data: bytes, block_size: int, wants=lambda name: name):
    """Feed `data` block by block as the reader does; return the members and each one's bytes."""
    blocks = [data[i : i + block_size] for i in range(0, len(data), block_size)]
    parser = TarParser("test.tar", blocks, 1 << 20)
    found = []
    for index, block in enumerate(blocks):
        parser.feed(index, len(block), index * block_size)
        for member in parser.members(wants):
            content = b"".join(blocks[b][o : o + n] for b, o, n in member.parts)
            found.append((member.name, member.kind, member.size, content))
    parser.check_complete()
    return found, parser


@pytest.mark.parametrize("block_size", [512, 1024, 4096, 1 << 20])
@pytest.mark.parametrize("format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_and_their_bytes_whatever_the_block_boundaries(block_size, format):
    found, parser = _parse(_tar(format=format), block_size)
    files = [(name, size, content) for name, kind, size, content in found if kind == REGULAR and size]
    assert files == [(name, len(data), data) for name, data in FILES.items()]
    assert parser.finished
    assert sorted(parser.released) == list(range(len(parser.released)))  # each block once, in order


def test_members_not_wanted_are_named_without_their_data():
    found, _ = _parse(_tar(), 1024, wants=lambda name: name.endswith("B03.tif"))
    contents = {name: content for name, _, _, content in found}
    assert contents["BigEarthNet-v1.0/P_1_1/P_1_1_B03.tif"] == b"b" * 1300
    assert contents["BigEarthNet-v1.0/P_1_1/P_1_1_B02.tif"] == b""


def test_a_damaged_header_and_a_truncated_archive_are_named():
    data = bytearray(_tar())
    data[512 + 100] ^= 0xFF  # inside the second header's mode field
    with pytest.raises(ArchiveFileError, match="header after member BigEarthNet-v1.0/P_1_1.*checksum"):
        _parse(bytes(data), 4096)
    with pytest.raises(ArchiveFileError, match="ends inside this member.*truncated|no end-of-archive marker"):
        _parse(_tar()[:1536], 512)


def _with_header(data: bytes, index: int, edit) -> bytes:
    """`data` with header `index` (counted in 512-byte records) changed by `edit(header)` and its
    checksum stored again as tar writes it (the unsigned sum, the field counted as spaces)."""
    data = bytearray(data)
    header = bytearray(data[index * 512 : (index + 1) * 512])
    edit(header)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[index * 512 : (index + 1) * 512] = header
    return bytes(data)


def test_sizes_in_gnu_base_256_and_old_signed_checksums_are_read():
    data = _tar()
    # The second header (P_1_1_B02.tif, 700 bytes) with its size in base-256, as GNU tar writes 8 GiB and more.
    base_256 = _with_header(
        data, 1, lambda header: header.__setitem__(slice(124, 136), b"\x80" + (700).to_bytes(11, "big"))
    )
    files = {
        name: content for name, kind, size, content in _parse(base_256, 1024)[0] if kind == REGULAR and size
    }
    assert files["BigEarthNet-v1.0/P_1_1/P_1_1_B02.tif"] == b"a" * 700

    # Old tars summed the header as signed bytes: a name byte >= 128 makes the two sums differ.
    def signed(header: bytearray) -> None:
        header[40] = 0xE9  # inside the name field, past its NUL: the name stays the same
        header[148:156] = b" " * 8
        total = sum(byte - 256 if byte >= 128 else byte for byte in header)
        header[148:156] = b"%06o\0 " % total

    data_signed = bytearray(data)
    header = bytearray(data[512:1024])
    signed(header)
    data_signed[512:1024] = header
    files = {
        name: content
        for name, kind, size, content in _parse(bytes(data_signed), 4096)[0]
        if kind == REGULAR and size
    }
    assert files["BigEarthNet-v1.0/P_1_1/P_1_1_B02.tif"] == b"a" * 700


@pytest.mark.parametrize(
    "field, message",
    [(b"abc" + b"\0" * 9, "size field 'abc' is not a size"), (b"\xff" * 12, "size field .* is not a size")],
    ids=["not-octal", "negative-base-256"],
)
def test_a_size_field_that_is_not_a_size_is_named(field, message):
    data = _with_header(_tar(), 1, lambda header: header.__setitem__(slice(124, 124 + len(field)), field))
    with pytest.raises(ArchiveFileError, match=f"header after member BigEarthNet-v1.0/P_1_1.*{message}"):
        _parse(data, 4096)


def test_names_that_would_escape_the_output_are_refused():
    assert safe_name("BigEarthNet-v1.0/P/P_B02.tif") is None
    assert safe_name("/etc/passwd") == "absolute member name"
    assert safe_name("a/../../b") == "member name with '..'"
    assert safe_name("a/..b/c") is None  # only a whole '..' component climbs


def _read_all(stream: ArchiveStream, size: int = 777) -> bytes:
    read = bytearray()
    buffer = bytearray(size)
    try:
        while count := stream.readinto(buffer):
            read += buffer[:count]
    finally:
        stream.close()
    return bytes(read)


def _pixels_like(size: int) -> bytes:
    """Noise beside runs of zeros, big enough for several of rapidgzip's chunks; cut in half, its gzip
    ends without an error from rapidgzip (not every stream does)."""
    rng = random.Random(3)
    return b"".join(rng.randbytes(1000) + bytes(3000) for _ in range(size // 4000))


def test_the_three_compressions_stream_the_same_bytes(tmp_path):
    data = _tar()
    paths = {
        "none": tmp_path / "a.tar",
        "gzip": tmp_path / "a.tar.gz",
        "zstd": tmp_path / "a.tar.zst",
    }
    paths["none"].write_bytes(data)
    paths["gzip"].write_bytes(gzip.compress(data[:2000]) + gzip.compress(data[2000:]))  # two members, as pigz
    paths["zstd"].write_bytes(zstandard.ZstdCompressor().compress(data))
    for kind, path in paths.items():
        assert compression_of(path) == kind and is_archive_file(path)
        assert _read_all(ArchiveStream(path)) == data, kind
    parallel = ArchiveStream(paths["gzip"], inflate_threads=2)
    assert parallel.parallel
    assert _read_all(parallel) == data
    assert is_archive_file(tmp_path / "missing.tar.gz") and not is_archive_file(tmp_path)


@pytest.mark.parametrize("members", [1, 3])
def test_the_parallel_inflater_gives_isal_s_bytes_and_counts_the_file(tmp_path, members):
    data = _pixels_like(12 << 20)
    step = -(-len(data) // members)
    path = tmp_path / "a.tar.gz"
    path.write_bytes(b"".join(gzip.compress(data[i : i + step], 1) for i in range(0, len(data), step)))
    stream = ArchiveStream(path, inflate_threads=2)
    read = bytearray()
    buffer = bytearray(1 << 20)
    while count := stream.readinto(buffer):
        read += buffer[:count]
    assert stream.parallel and stream.bytes_read == path.stat().st_size  # the progress bar's count
    stream.close()
    assert bytes(read) == data == _read_all(ArchiveStream(path, inflate_threads=1))


def test_without_rapidgzip_gzip_is_inflated_by_one_isal_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(tarstream, "_has_rapidgzip", lambda: False)
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(_tar()))
    stream = ArchiveStream(path, inflate_threads=4)
    assert not stream.parallel
    assert _read_all(stream) == _tar()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("keep", [0.5, 0.97, 0.9999])
def test_a_gzip_file_cut_short_is_named_by_either_inflater(tmp_path, threads, keep):
    """rapidgzip ends a cut stream as if it were whole (here: cut in half); the stream must not."""
    compressed = gzip.compress(_pixels_like(6 << 20), 1)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(compressed[: int(len(compressed) * keep)])
    with pytest.raises(
        ArchiveFileError, match=r"cut\.tar\.gz: compressed byte [\d,]+: .*(ends early|corrupt gzip)"
    ) as caught:
        _read_all(ArchiveStream(cut, inflate_threads=threads), 1 << 20)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("where", [40, 0.33, -6])
def test_corrupt_gzip_from_the_parallel_inflater_is_one_plain_line(tmp_path, where):
    compressed = bytearray(gzip.compress(_pixels_like(6 << 20), 1))
    start = where if isinstance(where, int) else int(len(compressed) * where)
    compressed[start : start + 20 if start > 0 else None] = bytes(20 if start > 0 else -start)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(compressed))
    with pytest.raises(
        ArchiveFileError, match=r"bad\.tar\.gz: compressed byte [\d,]+: corrupt gzip data \("
    ) as caught:
        _read_all(ArchiveStream(bad, inflate_threads=2), 1 << 20)
    message = str(caught.value)
    assert "\n" not in message and "Thread" not in message and "[" not in message  # no rapidgzip internals


def test_the_parallel_inflater_refuses_a_gzip_bomb(tmp_path, monkeypatch):
    """It holds inflated chunks in memory, so a file inflating far beyond any archive's ratio is refused."""
    monkeypatch.setattr(tarstream._ParallelGzipReader, "RATIO_JUDGED_AFTER", 8 << 20)
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(bytes(64 << 20), 9))  # ~1000:1
    with pytest.raises(ArchiveFileError, match=r"bomb\.tar\.gz: .*inflates more than 64 times its size"):
        _read_all(ArchiveStream(bomb, inflate_threads=2), 1 << 20)
    assert len(_read_all(ArchiveStream(bomb, inflate_threads=1), 1 << 20)) == 64 << 20  # streamed


def test_a_corrupt_gzip_and_a_foreign_compression_are_one_line(tmp_path):
    broken = tmp_path / "b.tar.gz"
    compressed = bytearray(gzip.compress(_tar()))
    compressed[40:60] = bytes(20)
    broken.write_bytes(bytes(compressed))
    stream = ArchiveStream(broken)
    with pytest.raises(ArchiveFileError, match=str(broken)):
        while stream.readinto(bytearray(1 << 16)):
            pass
    stream.close()
    xz = tmp_path / "c.tar.xz"
    xz.write_bytes(b"\xfd7zXZ\x00" + bytes(600))
    with pytest.raises(UserError, match="c.tar.xz"):
        compression_of(xz)


def test_an_empty_wanted_file_where_a_block_ends():
    """A zero-byte band file whose header fills a block exactly: its data starts in no block fed yet."""
    data = _tar({"BigEarthNet-v1.0/P_1_1/P_1_1_B02.tif": b""}, format=tarfile.USTAR_FORMAT)
    found, _ = _parse(data, 1024)  # the second header ends the first block
    assert ("BigEarthNet-v1.0/P_1_1/P_1_1_B02.tif", REGULAR, 0, b"") in found
