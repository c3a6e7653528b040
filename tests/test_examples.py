"""Extraction of the real example patches of bigearthnet-common."""

from __future__ import annotations

from pathlib import Path

from bigearthnet_tf import examples
from bigearthnet_tf.examples import ExamplePaths, default_cache_dir, example_archive

S2_NAMES = {
    "S2A_MSIL2A_20170613T101031_87_48",
    "S2A_MSIL2A_20170617T113321_36_85",
    "S2A_MSIL2A_20170617T113321_4_55",
    "S2A_MSIL2A_20171221T112501_56_35",
    "S2B_MSIL2A_20170924T93020_69_24",
    "S2B_MSIL2A_20180204T94161_57_38",
}


def test_example_archive_holds_six_s2_and_six_s1_patches(example_paths):
    assert isinstance(example_paths, ExamplePaths)
    assert {folder.name for folder in example_paths.s2.iterdir()} == S2_NAMES
    s1_folders = sorted(example_paths.s1.iterdir())
    assert len(s1_folders) == 6
    for folder in example_paths.s2.iterdir():
        assert len(list(folder.glob(f"{folder.name}_B*.tif"))) == 12
        assert (folder / f"{folder.name}_labels_metadata.json").is_file()
    for folder in s1_folders:
        assert folder.name.startswith("S1")
        assert {p.name for p in folder.glob("*.tif")} == {f"{folder.name}_VV.tif", f"{folder.name}_VH.tif"}


def test_second_call_reuses_the_extracted_folders(tmp_path, monkeypatch):
    first = example_archive(tmp_path)
    marker = first.s2 / "marker"
    marker.write_text("kept")

    def refuse(*args, **kwargs):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(examples.tarfile, "open", refuse)
    second = example_archive(tmp_path)
    assert second == first and marker.read_text() == "kept"
    # Nothing but the two folders is left behind: staging folders are removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BigEarthNet-S1-Example", "BigEarthNet-S2-Example"]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BIGEARTHNET_TF_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("BIGEARTHNET_TF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bigearthnet-tf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == Path(tmp_path / "home" / ".cache" / "bigearthnet-tf")


def test_default_location_is_used_without_an_argument(monkeypatch, tmp_path):
    monkeypatch.setenv("BIGEARTHNET_TF_CACHE", str(tmp_path / "cache"))
    paths = example_archive()
    assert paths.s2 == tmp_path / "cache" / "BigEarthNet-S2-Example"
    assert len(list(paths.s1.iterdir())) == 6
