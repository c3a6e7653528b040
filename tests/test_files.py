"""Atomic writers (`files.py`): the new file or the old one, never half of one, one temporary naming."""

from __future__ import annotations

import os
import stat

import pytest

from bigearthnet_tf.files import (
    open_atomically,
    remove_stale_temporaries,
    replace_atomically,
    temporary_name,
    write_text_atomically,
)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_text_and_bytes_replace_the_old_file_with_plain_permissions(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_text_atomically(path, "old")
    with open_atomically(path, "wb") as stream:
        stream.write(b"new\x00bytes")
    assert path.read_bytes() == b"new\x00bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_an_error_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomically(path, "old")
    with pytest.raises(RuntimeError):
        with open_atomically(path) as stream:
            stream.write("half")
            seen = [p.name for p in tmp_path.iterdir() if p.name != "a.txt"]
            raise RuntimeError("killed")
    assert seen and all(name.startswith(temporary_name(path)) for name in seen)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_exclusive_never_replaces_a_file_even_one_that_appeared_meanwhile(tmp_path):
    path = tmp_path / "stats.json"
    with open_atomically(path, exclusive=True) as stream:
        stream.write("first")
    assert path.read_text() == "first"
    with pytest.raises(FileExistsError):
        with open_atomically(path, exclusive=True) as stream:
            stream.write("second")
    other = tmp_path / "late.json"
    with pytest.raises(FileExistsError):
        with open_atomically(other, exclusive=True) as stream:
            stream.write("ours")
            other.write_text("theirs")  # another process got there while we wrote
    assert path.read_text() == "first" and other.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.json", "stats.json"]


def test_writers_that_take_a_path_get_a_fresh_name_with_their_suffix(tmp_path):
    target = tmp_path / "model.keras"
    names = []

    def write(temporary: str) -> None:
        names.append(os.path.basename(temporary))
        assert not os.path.exists(temporary)  # some writers refuse an existing empty file
        with open(temporary, "wb") as stream:
            stream.write(b"zip")

    replace_atomically(target, write, suffix=".keras")
    assert target.read_bytes() == b"zip"
    assert names[0].startswith(".model.keras.tmp-") and names[0].endswith(".keras")


def test_stale_temporaries_of_a_killed_writer_are_found_by_their_name(tmp_path):
    target = tmp_path / "map.tif"
    stale = tmp_path / (temporary_name(target) + "abc123.tif")
    stale.write_bytes(b"half")
    (tmp_path / "other.tif").write_bytes(b"kept")
    assert remove_stale_temporaries(tmp_path, "map.tif") == [stale]
    assert [p.name for p in tmp_path.iterdir()] == ["other.tif"]
