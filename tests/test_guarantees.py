"""What bigearthnet-tf guarantees (README, "What bigearthnet-tf guarantees"), tried as a hostile tester
would: files that are not what they claim, metadata that contradicts itself, the operating system
refusing, and two runs on one output. Each test names the principle of issue 10 it checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bigearthnet_tf.archive import BadPatchError, open_archive, read_split_csv
from bigearthnet_tf.cli import main
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.tiff import MAX_BAND_FILE_BYTES, read_band


def cli(*args: object) -> None:
    main([str(arg) for arg in args])


def cli_error(capsys, *args: object) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        cli(*args)
    return stop.value.code, capsys.readouterr().err


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of hanging: a read that blocks (a FIFO without writer) is interrupted."""

    def interrupt(*_):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def patch_archive(example_paths, tmp_path) -> tuple[Path, list[str]]:
    """A writable v1 archive of the six real example patches."""
    root = tmp_path / "BigEarthNet-v1.0"
    shutil.copytree(example_paths.s2, root)
    names = sorted(path.name for path in root.iterdir() if path.is_dir())
    return root, names


# --- 2. only what the archive really holds is read, and reading is bounded ---------------------------


@pytest.mark.parametrize("file_kind", ["band", "labels"])
def test_a_fifo_is_refused_at_once_not_waited_on(patch_archive, file_kind):
    root, names = patch_archive
    name = names[0]
    target = root / name / (f"{name}_B02.tif" if file_kind == "band" else f"{name}_labels_metadata.json")
    target.unlink()
    os.mkfifo(target)
    with no_hang(), pytest.raises(BadPatchError) as caught:
        open_archive(root, version=1).read_patch(name)
    assert caught.value.file == target.name and "not a regular file" in caught.value.reason


def test_a_huge_band_file_is_refused_before_it_is_read(patch_archive):
    root, names = patch_archive
    band = root / names[0] / f"{names[0]}_B03.tif"
    with open(band, "r+b") as handle:  # sparse: claims 17 MB without using the disk
        handle.truncate(MAX_BAND_FILE_BYTES + 1)
    with pytest.raises(BadPatchError) as caught:
        open_archive(root, version=1).read_patch(names[0])
    assert f"{MAX_BAND_FILE_BYTES + 1:,} bytes, more than the {MAX_BAND_FILE_BYTES:,}" in caught.value.reason


def test_a_split_list_that_is_a_folder_or_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "train.csv")
    with no_hang(), pytest.raises(UserError, match=r"train.csv cannot be read: not a regular file"):
        read_split_csv(tmp_path / "train.csv")


# --- 7. files that real users produce are read -----------------------------------------------------


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd"])
def test_bands_resaved_compressed_are_read_exactly(patch_archive, compression):
    root, names = patch_archive
    name = names[1]
    original = open_archive(root, version=1).read_patch(name)
    for band in ("B02", "B05", "B09"):
        path = root / name / f"{name}_{band}.tif"
        tifffile.imwrite(path, original.bands[band], compression=compression)
        np.testing.assert_array_equal(
            read_band(path, original.bands[band].shape, "uint16"), original.bands[band]
        )
    reread = open_archive(root, version=1).read_patch(name)
    for band, values in original.bands.items():
        np.testing.assert_array_equal(reread.bands[band], values, err_msg=band)
