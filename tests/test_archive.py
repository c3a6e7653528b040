"""Reading archives: v1 Sentinel-2 patches, bad patches, split lists, exclusion lists."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import tifffile

from bigearthnet_tf.archive import (
    Archive,
    BadPatchError,
    Patch,
    detect_version,
    find_split,
    missing_patches,
    official_v1_splits,
    open_archive,
    read_patch,
    read_split_csv,
    snow_cloud_v1,
    split_name,
)
from bigearthnet_tf.constants import BANDS_BY_NAME, S2_BAND_NAMES
from bigearthnet_tf.errors import UserError

HOUR_BUG = "S2B_MSIL2A_20170924T93020_69_24"
ONE = "S2A_MSIL2A_20170613T101031_87_48"

EXPECTED_LABELS = {
    ONE: (
        (
            "Non-irrigated arable land",
            "Land principally occupied by agriculture, with significant areas of natural vegetation",
        ),
        (
            "Arable land",
            "Land principally occupied by agriculture, with significant areas of natural vegetation",
        ),
    ),
    "S2A_MSIL2A_20170617T113321_4_55": (("Pastures",), ("Pastures",)),
    HOUR_BUG: (
        ("Coniferous forest", "Mixed forest", "Transitional woodland/shrub", "Peatbogs", "Water bodies"),
        (
            "Coniferous forest",
            "Mixed forest",
            "Transitional woodland, shrub",
            "Inland wetlands",
            "Inland waters",
        ),
    ),
    "S2B_MSIL2A_20180204T94161_57_38": (
        ("Non-irrigated arable land", "Coniferous forest", "Mixed forest"),
        ("Arable land", "Coniferous forest", "Mixed forest"),
    ),
}


@pytest.fixture
def one_patch_archive(example_paths, tmp_path):
    """A v1 archive folder holding a writable copy of one real patch."""
    root = tmp_path / "BigEarthNet-v1.0"
    shutil.copytree(example_paths.s2 / ONE, root / ONE)
    return root


def _bad_patch(root, name=ONE) -> BadPatchError:
    with pytest.raises(BadPatchError) as caught:
        open_archive(root, version=1).read_patch(name)
    return caught.value


# --------------------------------------------------------------------------------------------
# Reading real v1 patches


def test_real_patches_read_pixel_identical_with_both_label_sets(example_paths):
    archive = open_archive(example_paths.s2)
    assert archive == Archive(version=1, root=str(example_paths.s2), s2_dir=str(example_paths.s2))
    names = sorted(p.name for p in example_paths.s2.iterdir())
    for name in names:
        patch = archive.read_patch(name)
        assert isinstance(patch, Patch) and patch.name == name
        assert list(patch.bands) == list(S2_BAND_NAMES)
        for band, array in patch.bands.items():
            size = BANDS_BY_NAME[band].size
            assert array.shape == (size, size) and array.dtype == np.uint16
            expected = tifffile.imread(example_paths.s2 / name / f"{name}_{band}.tif")
            np.testing.assert_array_equal(array, expected)
        metadata = json.loads((example_paths.s2 / name / f"{name}_labels_metadata.json").read_text())
        assert patch.labels_43 == tuple(metadata["labels"])
        assert patch.s1_name is None and patch.s1_bands is None
    for name, (labels_43, labels_19) in EXPECTED_LABELS.items():
        patch = archive.read_patch(name)
        assert (patch.labels_43, patch.labels_19) == (labels_43, labels_19)


def test_name_with_the_hour_bug_reads(example_paths):
    patch = read_patch(example_paths.s2, HOUR_BUG)
    assert patch.name == HOUR_BUG and patch.labels_19 == EXPECTED_LABELS[HOUR_BUG][1]


def test_root_may_be_the_archive_folder_or_its_parent(one_patch_archive):
    from_parent = open_archive(one_patch_archive.parent)
    from_folder = open_archive(one_patch_archive)
    assert from_parent.s2_dir == from_folder.s2_dir == str(one_patch_archive)
    assert from_parent.read_patch(ONE).labels_43 == EXPECTED_LABELS[ONE][0]


# --------------------------------------------------------------------------------------------
# Version detection


def test_detect_version_v1(example_paths, one_patch_archive):
    assert detect_version(example_paths.s2) == 1
    assert detect_version(one_patch_archive) == 1
    assert detect_version(one_patch_archive.parent) == 1


def test_detect_version_rejects_other_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is not a BigEarthNet archive: expected BigEarthNet-v1.0/"):
        detect_version(tmp_path / "empty")
    with pytest.raises(UserError, match=r"archive root .*absent does not exist"):
        detect_version(tmp_path / "absent")
    with pytest.raises(UserError, match=r"unknown archive version 3"):
        open_archive(tmp_path / "empty", version=3)


# --------------------------------------------------------------------------------------------
# Bad patches: each names the patch, the file and what is wrong


def test_missing_band_file(one_patch_archive):
    (one_patch_archive / ONE / f"{ONE}_B05.tif").unlink()
    error = _bad_patch(one_patch_archive)
    assert (error.patch, error.file, error.reason) == (ONE, f"{ONE}_B05.tif", "missing band file")
    assert str(error) == f"patch {ONE}: {ONE}_B05.tif: missing band file"


def test_raster_of_the_wrong_size(one_patch_archive):
    folder = one_patch_archive / ONE
    shutil.copy(folder / f"{ONE}_B05.tif", folder / f"{ONE}_B02.tif")
    error = _bad_patch(one_patch_archive)
    assert str(error) == f"patch {ONE}: {ONE}_B02.tif: raster is 60x60 pixels, expected 120x120"


def test_truncated_tiff(one_patch_archive):
    path = one_patch_archive / ONE / f"{ONE}_B08.tif"
    path.write_bytes(path.read_bytes()[:10_000])
    error = _bad_patch(one_patch_archive)
    assert (
        str(error)
        == f"patch {ONE}: {ONE}_B08.tif: truncated file: strip 1 ends at byte 16712, file has 10000 bytes"
    )


def test_file_that_is_not_a_tiff(one_patch_archive):
    (one_patch_archive / ONE / f"{ONE}_B11.tif").write_text("not an image")
    error = _bad_patch(one_patch_archive)
    assert str(error) == f"patch {ONE}: {ONE}_B11.tif: not a TIFF file (starts with b'not ')"


def test_malformed_json(one_patch_archive):
    (one_patch_archive / ONE / f"{ONE}_labels_metadata.json").write_text('{"labels": ["Pastures"')
    error = _bad_patch(one_patch_archive)
    assert error.file == f"{ONE}_labels_metadata.json"
    assert error.reason.startswith("malformed JSON: ")


def test_unknown_label_is_named(one_patch_archive):
    path = one_patch_archive / ONE / f"{ONE}_labels_metadata.json"
    metadata = json.loads(path.read_text())
    metadata["labels"] = ["Pastures", "Lava fields"]
    path.write_text(json.dumps(metadata))
    error = _bad_patch(one_patch_archive)
    assert str(error) == (
        f"patch {ONE}: {ONE}_labels_metadata.json: "
        "unknown label 'Lava fields' (not one of the 43 BigEarthNet labels)"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"coordinates": {}}, "no 'labels' key"),
        ([1, 2], "no 'labels' key"),
        ({"labels": "Pastures"}, "'labels' is not a list of label names"),
        ({"labels": [17]}, "'labels' is not a list of label names"),
    ],
)
def test_json_without_usable_labels(one_patch_archive, content, reason):
    (one_patch_archive / ONE / f"{ONE}_labels_metadata.json").write_text(json.dumps(content))
    assert _bad_patch(one_patch_archive).reason == reason


def test_missing_metadata_file(one_patch_archive):
    (one_patch_archive / ONE / f"{ONE}_labels_metadata.json").unlink()
    error = _bad_patch(one_patch_archive)
    assert str(error) == f"patch {ONE}: {ONE}_labels_metadata.json: missing metadata file"


def test_patch_with_no_folder(one_patch_archive):
    name = "S2A_MSIL2A_20170613T101031_99_99"
    error = _bad_patch(one_patch_archive, name)
    assert str(error) == f"patch {name}: {one_patch_archive / name}: no such patch folder"


def test_empty_label_list_gives_empty_label_sets(one_patch_archive):
    (one_patch_archive / ONE / f"{ONE}_labels_metadata.json").write_text('{"labels": []}')
    patch = open_archive(one_patch_archive).read_patch(ONE)
    assert patch.labels_43 == () and patch.labels_19 == ()


def test_labels_only_in_dropped_classes_give_no_19_class_label(one_patch_archive):
    (one_patch_archive / ONE / f"{ONE}_labels_metadata.json").write_text(
        '{"labels": ["Bare rock", "Airports"]}'
    )
    patch = open_archive(one_patch_archive).read_patch(ONE)
    assert patch.labels_43 == ("Bare rock", "Airports") and patch.labels_19 == ()


def test_bad_patch_error_survives_pickling():
    error = pickle.loads(pickle.dumps(BadPatchError("P", "P_B01.tif", "missing band file")))
    assert isinstance(error, UserError)
    assert (error.patch, error.file, error.reason) == ("P", "P_B01.tif", "missing band file")
    assert str(error) == "patch P: P_B01.tif: missing band file"


@pytest.mark.parametrize("name", ["..", ".", "../secret", "/etc", "a/b", "a\\b", "", " S2A_x"])
def test_patch_names_cannot_leave_the_archive(one_patch_archive, name):
    with pytest.raises(UserError) as caught:
        open_archive(one_patch_archive).read_patch(name)
    assert not isinstance(caught.value, BadPatchError)
    assert f"invalid patch name {name!r}" in str(caught.value)


def test_missing_patches_lists_names_without_folders(one_patch_archive):
    names = ["S2A_MSIL2A_20170613T101031_1_1", ONE, "S2A_MSIL2A_20170613T101031_2_2"]
    assert missing_patches(one_patch_archive, names) == [names[0], names[2]]
    assert open_archive(one_patch_archive).missing_patches([ONE]) == []


# --------------------------------------------------------------------------------------------
# Split lists


def test_split_csv_with_crlf_blank_lines_and_bom(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbfS2A_a_1_1\r\nS2B_b_2_2\r\n\r\n  S2A_c_3_3 \r\nS2A_d_4_4,extra\r\n")
    assert read_split_csv(path) == ["S2A_a_1_1", "S2B_b_2_2", "S2A_c_3_3", "S2A_d_4_4"]


def test_split_csv_rejects_duplicates_and_bad_names(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text("a_1_1\nb_2_2\na_1_1\n")
    with pytest.raises(UserError, match=r"val.csv: line 3: patch a_1_1 is listed twice \(first on line 1\)"):
        read_split_csv(path)
    path.write_text("a_1_1\n../../etc\n")
    with pytest.raises(UserError, match=r"val.csv: line 2: invalid patch name '\.\./\.\./etc'"):
        read_split_csv(path)
    with pytest.raises(UserError, match=r"split file .*absent.csv does not exist"):
        read_split_csv(tmp_path / "absent.csv")


def test_split_names_come_from_file_names():
    assert split_name("/data/train.csv") == "train"
    assert split_name("val.csv.bz2") == "val"
    assert split_name("validation.csv") == "validation"
    assert split_name("test") == "test"


def test_val_and_validation_name_the_same_split():
    assert find_split("val", ["train", "validation"]) == "validation"
    assert find_split("validation", ["val", "test"]) == "val"
    assert find_split("test", ["test"]) == "test"
    with pytest.raises(UserError, match=r"no split 'dev'; available: train, val"):
        find_split("dev", ["train", "val"])


def test_official_v1_splits_and_exclusion_lists():
    splits = official_v1_splits()
    assert {name: len(names) for name, names in splits.items()} == {
        "train": 269_695,
        "val": 123_723,
        "test": 125_866,
    }
    assert splits["train"][0] == "S2A_MSIL2A_20170717T113321_28_87"
    excluded = snow_cloud_v1()
    assert len(excluded) == 61_707 + 9_280
    assert "S2B_MSIL2A_20170831T095029_27_76" in excluded
    assert excluded.isdisjoint(splits["train"]) and excluded.isdisjoint(splits["test"])
    splits["train"].clear()  # callers get their own lists
    assert len(official_v1_splits()["train"]) == 269_695
