"""Preparing straight from archive files (.tar, .tar.gz, .tar.zst): same shards as from the folders,
bounded memory whatever the member order, resume, and one clear line for every kind of damage."""

from __future__ import annotations

import csv
import filecmp
import gzip
import io
import json
import random
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from isal import igzip

from bigearthnet_tf import prepare_request, prepare_stream, tarstream
from bigearthnet_tf.archive import BadPatchError
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.prepare import MANIFEST_NAME, prepare


def _compressed(data: bytes, name: str) -> bytes:
    if name.endswith(".gz"):
        return igzip.compress(data, compresslevel=1)
    if name.endswith(".zst"):
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def _pack(folder: Path, arcname: str, target: Path, order: list[str] | None = None) -> Path:
    """`folder` as a tar (members in `order`, relative paths, when given), compressed by suffix."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if order is None:
            tar.add(folder, arcname=arcname)
        else:
            for relative in order:
                tar.add(folder / relative, arcname=f"{arcname}/{relative}", recursive=False)
    target.write_bytes(_compressed(buffer.getvalue(), target.name))
    return target


def _same_shards(expected: Path, actual: Path) -> None:
    """The whole output folder is the same by both routes: every shard, the manifest and the reports
    byte for byte, nothing more, nothing less."""
    manifest = json.loads((expected / MANIFEST_NAME).read_text())
    names = [name for split in manifest["splits"].values() for name in split["files"]]
    assert names
    assert sorted(p.name for p in actual.glob("*.tfrecord")) == sorted(names)
    expected_files = sorted(p.relative_to(expected) for p in expected.rglob("*"))
    assert sorted(p.relative_to(actual) for p in actual.rglob("*")) == expected_files
    for name in expected_files:
        if name == Path("skipped.csv"):  # its file column names the source, folder or archive file
            rows = [_skipped_rows(folder / name) for folder in (expected, actual)]
            assert rows[0] == rows[1]
        elif (expected / name).is_file():
            assert filecmp.cmp(expected / name, actual / name, shallow=False), name
    assert not (actual / prepare_request.SPOOL_DIR_NAME).exists()


def _skipped_rows(path: Path) -> list[tuple[str, str, str]]:
    rows = list(csv.reader(path.read_text().splitlines()))
    return [(split, patch, reason) for split, patch, _, reason in rows]


@pytest.fixture(scope="module")
def v1_files(example_paths, tmp_path_factory):
    """The six real example patches as .tar, .tar.gz and .tar.zst, split lists, the folder outputs."""
    base = tmp_path_factory.mktemp("v1_files")
    names = sorted(path.name for path in example_paths.s2.iterdir())
    (base / "train.csv").write_text("\n".join(names[:4]) + "\n")
    (base / "test.csv").write_text("\n".join(reversed(names[4:])) + "\n")  # not the archive's order
    lists = [base / "train.csv", base / "test.csv"]
    for record_format in ("default", "legacy"):
        prepare(
            example_paths.s2,
            base / f"folder-{record_format}",
            lists,
            record_format=record_format,
            shard_size=3 if record_format == "default" else None,
            workers=1,
            show_progress=False,
        )
    files = {
        suffix: _pack(example_paths.s2, "BigEarthNet-v1.0", base / f"s2{suffix}")
        for suffix in (".tar", ".tar.gz", ".tar.zst")
    }
    return base, lists, files, names


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
@pytest.mark.parametrize("record_format", ["default", "legacy"])
def test_archive_file_gives_the_folder_shards(v1_files, tmp_path, suffix, record_format):
    base, lists, files, _ = v1_files
    summary = prepare(
        files[suffix],
        tmp_path / "out",
        lists,
        record_format=record_format,
        shard_size=3 if record_format == "default" else None,
        workers=2,
        show_progress=False,
    )
    _same_shards(base / f"folder-{record_format}", tmp_path / "out")
    assert summary.total_patches == 6
    assert set(summary.stage_seconds) == {"read", "decompress", "parse", "encode", "write"}
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["patches"] == 6 and manifest["format"] == record_format


@pytest.mark.parametrize("threads", [1, 2])
def test_a_tar_gz_gives_the_folder_shards_with_any_inflate_threads(v1_files, tmp_path, threads):
    """One isal thread, or rapidgzip on two threads in the reader process: the same shards."""
    base, lists, files, _ = v1_files
    out = tmp_path / "out"
    prepare(
        files[".tar.gz"], out, lists, shard_size=3, workers=2, inflate_threads=threads, show_progress=False
    )
    _same_shards(base / "folder-default", out)
    with pytest.raises(UserError, match="^--inflate-threads must be at least 1, got 0$"):
        prepare(files[".tar.gz"], tmp_path / "zero", lists, inflate_threads=0, show_progress=False)


def _count_copies(monkeypatch) -> list:
    """Calls of `copy_records` in this process (workers=1): shards written by copying from the spool."""
    import bigearthnet_tf.prepare_workers as prepare_workers

    copies = []
    original = prepare_workers.copy_records
    monkeypatch.setattr(prepare_workers, "copy_records", lambda *args: copies.append(1) or original(*args))
    return copies


def test_spool_files_become_shards(v1_files, example_paths, tmp_path, monkeypatch):
    """A worker gets a whole shard at a time and writes it in list order, whatever the archive's
    order, so its spool file is renamed into place: the records are written once."""
    _, _, files, names = v1_files
    copies = _count_copies(monkeypatch)
    shuffled = tmp_path / "train.csv"
    shuffled.write_text("\n".join([names[0], names[5], names[1], names[4], names[2], names[3]]) + "\n")
    options = {"shard_size": 3, "workers": 1, "show_progress": False}
    prepare(example_paths.s2, tmp_path / "folder", [shuffled], **options)
    prepare(files[".tar.gz"], tmp_path / "file", [shuffled], **options)
    _same_shards(tmp_path / "folder", tmp_path / "file")
    assert copies == []


@pytest.mark.parametrize("suffix", [".tar", ".tar.zst"])
def test_members_out_of_order_and_blocks_refilled(v1_files, example_paths, tmp_path, monkeypatch, suffix):
    """Members of different patches interleaved: still the folder's shards. Compressed, through
    blocks so small that files of incomplete patches are spilled before their block is refilled;
    uncompressed, read in place (the file is mapped; nothing is copied or spilled)."""
    base, lists, _, names = v1_files
    files = {name: sorted(p.name for p in (example_paths.s2 / name).iterdir()) for name in names}
    order = [f"{name}/{files[name][i]}" for i in range(13) for name in names]  # round robin
    tar = _pack(example_paths.s2, "BigEarthNet-v1.0", tmp_path / f"mixed{suffix}", order)
    monkeypatch.setattr(tarstream, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(prepare_stream, "MAX_RING_BYTES", 8 * (64 << 10))  # less than the tar
    spilled = []
    original = prepare_stream._Spill.put
    monkeypatch.setattr(
        prepare_stream._Spill, "put", lambda self, data: spilled.append(1) or original(self, data)
    )
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare(tar, out, lists, shard_size=3, workers=workers, show_progress=False)
        _same_shards(base / "folder-default", out)
    assert bool(spilled) == (suffix != ".tar")


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar"])
def test_shards_waiting_for_blocks_are_handed_over_in_parts(
    v1_files, example_paths, tmp_path, monkeypatch, suffix
):
    """Complete patches that wait for the rest of their shard hold blocks (or, from a mapped tar,
    page cache); past the bound they go to workers as they are, and the shard is copied together
    from the parts in list order."""
    _, lists, files, _ = v1_files
    monkeypatch.setattr(tarstream, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(prepare_stream, "MAX_RING_BYTES", 4 * (64 << 10))  # 8 blocks, at least
    copies = _count_copies(monkeypatch)
    options = {"shard_size": 6, "workers": 1, "show_progress": False}
    prepare(example_paths.s2, tmp_path / "folder", lists, **options)
    prepare(files[suffix], tmp_path / "file", lists, **options)
    _same_shards(tmp_path / "folder", tmp_path / "file")
    assert copies


def test_v2_with_s1_in_two_archive_files(synthetic_v2, tmp_path):
    expected = tmp_path / "folders"
    prepare(
        synthetic_v2, expected, official_splits=True, s1_root=synthetic_v2, workers=1, show_progress=False
    )
    packed = tmp_path / "download"
    packed.mkdir()
    for name in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        shutil.copyfile(synthetic_v2 / name, packed / name)
    s2 = _pack(synthetic_v2 / "BigEarthNet-S2", "BigEarthNet-S2", packed / "BigEarthNet-S2.tar.zst")
    s1 = _pack(synthetic_v2 / "BigEarthNet-S1", "BigEarthNet-S1", packed / "BigEarthNet-S1.tar")
    prepare(s2, tmp_path / "files", official_splits=True, s1_root=s1, workers=2, show_progress=False)
    _same_shards(expected, tmp_path / "files")
    # S1 compressed too: its files are copied to the spool's store rather than read in place.
    s1_zst = _pack(synthetic_v2 / "BigEarthNet-S1", "BigEarthNet-S1", packed / "BigEarthNet-S1.tar.zst")
    prepare(s2, tmp_path / "files2", official_splits=True, s1_root=s1_zst, workers=1, show_progress=False)
    _same_shards(expected, tmp_path / "files2")


@pytest.mark.parametrize("workers,threads", [(2, 2), (1, 2), (2, 1)])
def test_v1_s1_archive_file_pairs_through_its_json(synthetic_v1_s1, tmp_path, workers, threads):
    """Both .tar.gz files inflated by rapidgzip (in the reader process or in a thread) or by isal."""
    lists = sorted(synthetic_v1_s1.glob("*.csv"))
    expected = tmp_path / "folders"
    prepare(synthetic_v1_s1, expected, lists, s1_root=synthetic_v1_s1, workers=1, show_progress=False)
    s2 = _pack(synthetic_v1_s1 / "BigEarthNet-v1.0", "BigEarthNet-v1.0", tmp_path / "s2.tar.gz")
    s1 = _pack(synthetic_v1_s1 / "BigEarthNet-S1-v1.0", "BigEarthNet-S1-v1.0", tmp_path / "s1.tar.gz")
    prepare(
        s2,
        tmp_path / "files",
        lists,
        s1_root=s1,
        workers=workers,
        inflate_threads=threads,
        show_progress=False,
    )
    _same_shards(expected, tmp_path / "files")


def test_listed_patches_absent_from_the_file(v1_files, example_paths, tmp_path):
    """Absent patches shift the shards exactly as absent folders do; without skip_bad an error."""
    _, lists, _, names = v1_files
    partial_folder = tmp_path / "partial"
    partial_folder.mkdir()
    for name in names[1:]:
        shutil.copytree(example_paths.s2 / name, partial_folder / name)
    tar = _pack(partial_folder, "BigEarthNet-v1.0", tmp_path / "partial.tar")
    with pytest.raises(BadPatchError, match=f"patch {names[0]}: .*no such patch folder"):
        prepare(tar, tmp_path / "out", lists, shard_size=3, workers=1, show_progress=False)
    assert not list((tmp_path / "out").glob("*.tfrecord"))
    options = {"shard_size": 3, "skip_bad": True, "workers": 1, "show_progress": False}
    prepare(partial_folder, tmp_path / "expected", lists, **options)
    prepare(tar, tmp_path / "out", lists, **options)
    _same_shards(tmp_path / "expected", tmp_path / "out")
    assert "no such patch folder" in (tmp_path / "out" / "skipped.csv").read_text()


def _raw_tar(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar of (name, data or None, type flag) members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, flag in members:
            info = tarfile.TarInfo(name)
            info.type = flag
            if flag == tarfile.SYMTYPE:
                info.linkname = "elsewhere.tif"
            if data is not None and flag == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _patch_members(example_paths, name: str, skip: str | None = None) -> list:
    folder = example_paths.s2 / name
    return [
        (f"BigEarthNet-v1.0/{name}/{p.name}", p.read_bytes(), tarfile.REGTYPE)
        for p in sorted(folder.iterdir())
        if p.name != skip
    ]


def _one_split(tmp_path: Path, names: list[str]) -> list[Path]:
    path = tmp_path / "train.csv"
    path.write_text("\n".join(names) + "\n")
    return [path]


def _refused(root: Path, tmp_path: Path, lists, match: str, **options) -> None:
    out = tmp_path / "refused"
    with pytest.raises(UserError, match=match) as caught:
        prepare(root, out, lists, **{"workers": 1, "show_progress": False, **options})
    assert "\n" not in str(caught.value)
    assert not list(out.glob("*.tfrecord")) and not (out / MANIFEST_NAME).exists()
    assert not (out / prepare_request.SPOOL_DIR_NAME).exists()


def test_truncated_archive_one_line_then_skip_bad_writes_the_rest(v1_files, example_paths, tmp_path):
    _, _, files, names = v1_files
    lists = _one_split(tmp_path, names)
    whole = _raw_tar([m for name in names for m in _patch_members(example_paths, name)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    _refused(
        cut, tmp_path, lists, r"cut\.tar: member BigEarthNet-v1.0/.*: the archive ends inside this member"
    )
    summary = prepare(cut, tmp_path / "out", lists, skip_bad=True, workers=1, show_progress=False)
    assert 0 < summary.total_patches < 6
    assert len(summary.skipped) == 6 - summary.total_patches
    assert all("archive ends early" in item.reason for item in summary.skipped)
    # Compressed files cut short say so too.
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(files[".tar.gz"].read_bytes()[:-2000])
    _refused(gz, tmp_path, lists, r"cut\.tar\.gz: .*(ends early|ends inside|end-of-archive)")


@pytest.mark.parametrize(
    "suffix,match", [(".tar.gz", "corrupt gzip data|gzip data ends early"), (".tar.zst", "corrupt zstd data")]
)
def test_corrupt_compressed_block(v1_files, tmp_path, suffix, match):
    _, _, files, names = v1_files
    data = bytearray(files[suffix].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(bytes(data))
    _refused(bad, tmp_path, _one_split(tmp_path, names), rf"bad{suffix.replace('.', '[.]')}: .*({match})")


@pytest.mark.parametrize("suffix,threads", [(".tar.gz", 1), (".tar.gz", 2), (".tar.zst", 1)])
def test_corrupt_compressed_data_is_refused_even_with_skip_bad(v1_files, tmp_path, suffix, threads):
    """A flipped byte in stored data inflates without a fault until the checksum at the end: every
    patch before it was read from unverified bytes, so --skip-bad may keep none of them."""
    _, _, files, names = v1_files
    # The six patches, then 8 MB of noise: the flip lies past every patch and past the 4 MB read to
    # tell the archive's version, so without this rule all six patches would be kept.
    buffer = io.BytesIO()
    with tarfile.open(files[".tar"]) as source, tarfile.open(fileobj=buffer, mode="w") as target:
        for member in source.getmembers():
            target.addfile(member, source.extractfile(member) if member.isfile() else None)
        noise = random.Random(5).randbytes(8 << 20)
        info = tarfile.TarInfo("BigEarthNet-v1.0/zz-notes.bin")
        info.size = len(noise)
        target.addfile(info, io.BytesIO(noise))
    raw = buffer.getvalue()
    if suffix == ".tar.gz":
        data = bytearray(gzip.compress(raw, 0))  # stored blocks
    else:
        data = bytearray(zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw))
    data[len(data) * 3 // 4] ^= 0x01
    bad = tmp_path / f"flipped{suffix}"
    bad.write_bytes(bytes(data))
    lists = _one_split(tmp_path, names)
    match = rf"flipped{suffix.replace('.', '[.]')}: .*corrupt .* data .*--skip-bad keeps nothing of this file"
    _refused(bad, tmp_path, lists, match, skip_bad=True, workers=2, inflate_threads=threads)


def test_corrupt_data_in_the_sentinel_1_file_is_refused_even_with_skip_bad(synthetic_v1_s1, tmp_path):
    """The S1 index pass keeps the twins it met before a fault only where their bytes were verified."""
    lists = sorted(synthetic_v1_s1.glob("*.csv"))
    s1_folder = tmp_path / "s1"
    shutil.copytree(synthetic_v1_s1 / "BigEarthNet-S1-v1.0", s1_folder)
    (s1_folder / "zz-notes.bin").write_bytes(random.Random(6).randbytes(8 << 20))  # after every patch
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(s1_folder, arcname="BigEarthNet-S1-v1.0")  # members sorted: the notes come last
    data = bytearray(gzip.compress(buffer.getvalue(), 0))
    data[len(data) * 3 // 4] ^= 0x01
    s1 = tmp_path / "flipped-s1.tar.gz"
    s1.write_bytes(bytes(data))
    s2 = _pack(synthetic_v1_s1 / "BigEarthNet-v1.0", "BigEarthNet-v1.0", tmp_path / "s2.tar.gz")
    match = r"flipped-s1\.tar\.gz: .*corrupt gzip data .*--skip-bad keeps nothing of this file"
    _refused(s2, tmp_path, lists, match, s1_root=s1, skip_bad=True)


def test_bad_header_checksum(example_paths, tmp_path):
    names = sorted(p.name for p in example_paths.s2.iterdir())[:2]
    first = _patch_members(example_paths, names[0])
    data = bytearray(_raw_tar(first + _patch_members(example_paths, names[1])))
    second_header = 512 + -(-len(first[0][1]) // 512) * 512
    data[second_header + 10] ^= 0x55  # inside the name of the second member
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    lists = _one_split(tmp_path, names)
    _refused(bad, tmp_path, lists, r"bad\.tar: the header after member .*: bad header checksum")


@pytest.mark.parametrize("name", ["../evil.tif", "/abs/evil.tif", "BigEarthNet-v1.0/../x/x_B01.tif"])
def test_unsafe_member_names(example_paths, tmp_path, name):
    names = sorted(p.name for p in example_paths.s2.iterdir())[:2]
    members = _patch_members(example_paths, names[0]) + [(name, b"x", tarfile.REGTYPE)]
    members += _patch_members(example_paths, names[1])
    tar = tmp_path / "unsafe.tar"
    tar.write_bytes(_raw_tar(members))
    lists = _one_split(tmp_path, names)
    problem = "(absolute member name|member name with '[.][.]')"
    _refused(tar, tmp_path, lists, rf"unsafe\.tar: member {name.replace('.', '[.]')}: {problem}")
    summary = prepare(tar, tmp_path / "out", lists, skip_bad=True, workers=1, show_progress=False)
    assert summary.total_patches == 2


def test_link_and_incomplete_patch(example_paths, tmp_path):
    names = sorted(p.name for p in example_paths.s2.iterdir())[:3]
    linked = [
        (m[0], None, tarfile.SYMTYPE) if m[0].endswith("_B02.tif") else m
        for m in _patch_members(example_paths, names[0])
    ]
    members = linked + _patch_members(example_paths, names[1])
    members += _patch_members(example_paths, names[2], skip=f"{names[2]}_B12.tif")
    tar = tmp_path / "odd.tar"
    tar.write_bytes(_raw_tar(members))
    lists = _one_split(tmp_path, names)
    with pytest.raises(
        BadPatchError, match=rf"patch {names[0]}: {names[0]}_B02\.tif: is a link in .*odd\.tar"
    ):
        prepare(tar, tmp_path / "refused", lists, workers=1, show_progress=False)
    summary = prepare(tar, tmp_path / "out", lists, skip_bad=True, workers=2, show_progress=False)
    assert summary.total_patches == 1
    assert {(item.patch, item.file, item.reason) for item in summary.skipped} == {
        (names[0], f"{names[0]}_B02.tif", f"is a link in {tar}, not a file"),
        (names[2], f"{names[2]}_B12.tif", "missing band file"),
    }


def test_not_an_archive(tmp_path, v1_files):
    _, lists, _, _ = v1_files
    for name, data, match in [
        ("notes.tar", b"hello" * 200, "not a tar, .tar.gz or .tar.zst file"),
        ("x.tar.bz2", b"BZh91AY&SY" + bytes(600), "a bzip2 file"),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        _refused(path, tmp_path, lists, match)
    _refused(tmp_path / "missing.tar.gz", tmp_path, lists, "does not exist")


def test_resume_after_interruption(v1_files, tmp_path, monkeypatch):
    base, lists, files, _ = v1_files
    calls = []
    original = prepare_stream._encode_batch

    def interrupted(task, patches, whole):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(task, patches, whole)

    monkeypatch.setattr(prepare_stream, "_encode_batch", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(files[".tar.zst"], out, lists, shard_size=3, workers=1, show_progress=False)
    assert (out / prepare_request.SPOOL_DIR_NAME / "spool.jsonl").exists()
    calls.clear()
    monkeypatch.setattr(
        prepare_stream,
        "_encode_batch",
        lambda task, patches, whole: calls.append(task) or original(task, patches, whole),
    )
    summary = prepare(files[".tar.zst"], out, lists, shard_size=3, workers=1, show_progress=False)
    # Workers get a shard at a time: train-00000 (3 patches) was done; train-00001 and test-00000 are left.
    assert summary.resumed_patches == 3 and len(calls) == 2
    _same_shards(base / "folder-default", out)


def test_existing_outputs_refused_before_streaming(v1_files, tmp_path):
    base, lists, files, _ = v1_files
    out = tmp_path / "out"
    prepare(files[".tar"], out, lists, shard_size=3, workers=1, show_progress=False)
    with pytest.raises(UserError, match="exists.*pass --overwrite"):
        prepare(files[".tar"], out, lists, shard_size=3, workers=1, show_progress=False)
    prepare(files[".tar"], out, lists, shard_size=3, workers=1, overwrite=True, show_progress=False)
    _same_shards(base / "folder-default", out)


def test_command_line(v1_files, tmp_path):
    base, lists, files, _ = v1_files
    out = tmp_path / "cli"
    arguments = ["-o", str(out), "-n", *map(str, lists), "--shard-size", "3", "--workers", "2"]
    done = subprocess.run(
        ["bigearthnet", "prepare", "-r", str(files[".tar.gz"]), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "MB/s" in done.stderr and "patches/s" in done.stderr
    assert "time: read" in done.stdout
    _same_shards(base / "folder-default", out)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(files[".tar"].read_bytes()[:20000])
    done = subprocess.run(
        ["bigearthnet", "prepare", "-r", str(bad), "-o", str(tmp_path / "bad-out"), "-n", *map(str, lists)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]  # after the progress bars, one line says what is wrong
    assert "bad.tar: member BigEarthNet-v1.0/" in last and "the archive ends inside this member" in last
    assert "Traceback" not in done.stderr and not list((tmp_path / "bad-out").glob("*.tfrecord"))
    # The parallel inflater in the reader process, on a .tar.gz cut in half: one line as well.
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(files[".tar.gz"].read_bytes()[: files[".tar.gz"].stat().st_size // 2])
    done = subprocess.run(
        ["bigearthnet", "prepare", "-r", str(cut), "-o", str(tmp_path / "cut-out"), "-n", *map(str, lists)]
        + ["--workers", "2", "--inflate-threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    lines = [
        line for line in done.stderr.strip().splitlines() if "patches/s" not in line and "MB/s" not in line
    ]
    assert len(lines) == 1 and "cut.tar.gz: " in lines[0], done.stderr
    assert re.search("ends early|ends inside|end-of-archive", lines[0]), lines[0]


def test_s2_file_with_s1_folder_and_the_reverse(synthetic_v1_s1, tmp_path):
    lists = sorted(synthetic_v1_s1.glob("*.csv"))
    expected = tmp_path / "folders"
    prepare(synthetic_v1_s1, expected, lists, s1_root=synthetic_v1_s1, workers=1, show_progress=False)
    s2 = _pack(synthetic_v1_s1 / "BigEarthNet-v1.0", "BigEarthNet-v1.0", tmp_path / "s2.tar.zst")
    prepare(s2, tmp_path / "files", lists, s1_root=synthetic_v1_s1, workers=2, show_progress=False)
    _same_shards(expected, tmp_path / "files")
    s1 = _pack(synthetic_v1_s1 / "BigEarthNet-S1-v1.0", "BigEarthNet-S1-v1.0", tmp_path / "s1.tar")
    _refused(synthetic_v1_s1, tmp_path, lists, "--s1-root .*s1.tar is an archive file", s1_root=s1)


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_every_tar_format_of_long_v2_names(synthetic_v2, tmp_path, tar_format):
    """v2 member paths are ~150 characters: pax headers, ustar prefixes or GNU long-name records."""
    expected = tmp_path / "folders"
    prepare(synthetic_v2, expected, official_splits=True, workers=1, show_progress=False)
    packed = tmp_path / "download"
    packed.mkdir()
    shutil.copyfile(synthetic_v2 / "metadata.parquet", packed / "metadata.parquet")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        tar.add(synthetic_v2 / "BigEarthNet-S2", arcname="./BigEarthNet-S2")
    (packed / "BigEarthNet-S2.tar").write_bytes(buffer.getvalue())
    prepare(
        packed / "BigEarthNet-S2.tar", tmp_path / "file", official_splits=True, workers=1, show_progress=False
    )
    _same_shards(expected, tmp_path / "file")


_BLOCKING_TASK = """
import os, time
from bigearthnet_tf import prepare_stream
_encode = prepare_stream._encode_batch
def _encode_batch(task, patches, whole):
    if patches[0][0] == os.environ["BIGEARTHNET_TEST_BLOCKED_PATCH"]:
        while True:
            time.sleep(1)
    return _encode(task, patches, whole)
prepare_stream._encode_batch = _encode_batch
"""


def test_sigkill_during_the_stream_then_resume(v1_files, tmp_path):
    """A real SIGKILL of the whole process group while a worker encodes the last shard: the rerun
    keeps the journalled shards' encodings and writes the folder's bytes."""
    import os
    import signal
    import sys
    import time

    base, lists, files, names = v1_files
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_BLOCKING_TASK)
    repo = Path(__file__).resolve().parents[1]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), str(repo), os.environ.get("PYTHONPATH", "")]),
        "BIGEARTHNET_TEST_BLOCKED_PATCH": names[5],  # the first of the test list: its shard blocks
    }
    out = tmp_path / "out"
    arguments = ["prepare", "-r", str(files[".tar.gz"]), "-o", str(out), "-n", *map(str, lists)]
    arguments += ["--shard-size", "3", "--workers", "2"]
    command = [sys.executable, "-c", "from bigearthnet_tf.cli import main; main()", *arguments]
    process = subprocess.Popen(command, env=environment, start_new_session=True, stderr=subprocess.PIPE)
    journal = out / prepare_request.SPOOL_DIR_NAME / "spool.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (journal.exists() and journal.read_text().count("\n") >= 2):  # both train shards
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the train shards were not encoded"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        while True:  # forked workers hold the output lock until they are gone
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the process group outlived SIGKILL"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()
    assert not (out / MANIFEST_NAME).exists()
    summary = prepare(files[".tar.gz"], out, lists, shard_size=3, workers=2, show_progress=False)
    assert summary.resumed_patches == 4
    _same_shards(base / "folder-default", out)


def test_fifo_refused_at_once_whichever_option_names_it(v1_files, tmp_path):
    """A FIFO named like an archive file, as -r or as --s1-root: refused before it is waited on."""
    import os

    _, lists, files, _ = v1_files
    fifo = tmp_path / "s1.tar.zst"
    os.mkfifo(fifo)
    for root, s1_root in ((fifo, None), (files[".tar"], fifo)):
        with pytest.raises((OSError, UserError), match="not a regular file|not a file"):
            prepare(root, tmp_path / "out", lists, s1_root=s1_root, workers=1, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_file_twice_with_other_content_is_named_then_skipped(example_paths, tmp_path):
    """tar -x would keep the second copy; we name both places and stop, or leave the patch out."""
    names = sorted(path.name for path in example_paths.s2.iterdir())[:2]
    members = [m for name in names for m in _patch_members(example_paths, name)]
    band = next(m for m in members if m[0].endswith("_B02.tif") and names[0] in m[0])
    changed = bytearray(band[1])
    changed[-1] ^= 0xFF
    members.append((band[0], bytes(changed), tarfile.REGTYPE))  # after the patch was complete
    archive = tmp_path / "twice.tar.gz"
    archive.write_bytes(_compressed(_raw_tar(members), archive.name))
    lists = _one_split(tmp_path, names)
    _refused(archive, tmp_path, lists, rf"member .*{names[0]}_B02.tif: .* twice: a copy before byte")
    summary = prepare(archive, tmp_path / "out", lists, workers=1, skip_bad=True, show_progress=False)
    assert summary.total_patches == 1 and [item.patch for item in summary.skipped] == [names[0]]
    # Inside a patch that is not complete yet: both byte positions are named.
    early = [band, (band[0], bytes(changed), tarfile.REGTYPE)] + [m for m in members[:-1] if m != band]
    archive.write_bytes(_compressed(_raw_tar(early), archive.name))
    _refused(archive, tmp_path, lists, r"twice: a copy at byte [\d,]+ and another at byte [\d,]+")


@pytest.mark.parametrize("field", ["plain", "pax", "pax-word"])
def test_impossible_tar_sizes_are_one_line_never_a_loop(example_paths, tmp_path, field):
    name = sorted(path.name for path in example_paths.s2.iterdir())[0]
    data = _raw_tar(_patch_members(example_paths, name))
    header = bytearray(data[:512])
    if field == "plain":  # GNU base-256 with the sign bit: -1
        header[124:136] = b"\xff" * 12
        header[148:156] = b"        "
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        data = bytes(header) + data[512:]
    else:
        value = "-512" if field == "pax" else "twelve"
        record = f"size={value}\n"
        length = len(record) + 3
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type = tarfile.XHDTYPE
        body = f"{length} {record}".encode()
        pax.size = len(body)
        data = pax.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512) + data
    archive = tmp_path / "sizes.tar"
    archive.write_bytes(data)
    _refused(
        archive, tmp_path, _one_split(tmp_path, [name]), r"(size field|pax size record) '.*' is not a size"
    )


def test_multi_member_gzip_and_long_window_zstd_are_read(v1_files, tmp_path):
    """What pigz, bgzip and `cat a.gz b.gz` write, and `zstd --long=31`: valid files, read as such."""
    base, lists, files, _ = v1_files
    raw = files[".tar"].read_bytes()
    step = len(raw) // 3 + 1
    multi = tmp_path / "multi.tar.gz"
    multi.write_bytes(b"".join(igzip.compress(raw[i : i + step]) for i in range(0, len(raw), step)))
    prepare(multi, tmp_path / "gz", lists, shard_size=3, workers=1, show_progress=False)
    _same_shards(base / "folder-default", tmp_path / "gz")
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    long = tmp_path / "long.tar.zst"
    with (
        open(long, "wb") as handle,
        zstandard.ZstdCompressor(compression_params=params).stream_writer(handle) as writer,
    ):
        writer.write(raw)
    prepare(long, tmp_path / "zst", lists, shard_size=3, workers=1, show_progress=False)
    _same_shards(base / "folder-default", tmp_path / "zst")


@pytest.mark.slow
def test_a_gzip_bomb_member_is_inflated_in_bounded_memory(tmp_path):
    """2 MB of gzip that inflates to 2 GiB of zeros in one member: streamed through, never held."""
    import resource
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    header = tarfile.TarInfo("BigEarthNet-v1.0/P/P_B01.tif")
    header.size = 2 << 30
    chunks = [compressor.compress(header.tobuf(tarfile.GNU_FORMAT))]
    zeros = bytes(1 << 24)
    chunks += [compressor.compress(zeros) for _ in range(128)]
    chunks.append(compressor.flush())
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(b"".join(chunks))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stream = tarstream.ArchiveStream(bomb)
    buffer, total = bytearray(4 << 20), 0
    while count := stream.readinto(buffer):
        total += count
    stream.close()
    assert total == 512 + (2 << 30)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: < 200 MB more
