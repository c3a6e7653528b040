"""Reading archives: v1 and v2, Sentinel-2 and Sentinel-1, bad patches, split and exclusion lists."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import tifffile

from bigearthnet_tf.archive import (
    ArchiveV1,
    ArchiveV2,
    BadPatchError,
    Patch,
    detect_version,
    missing_patches,
    official_v1_splits,
    official_v2_splits,
    open_archive,
    read_patch,
    s1_pairs_v1,
    snow_cloud_v1,
    snow_cloud_v2,
)
from bigearthnet_tf.constants import BANDS_BY_NAME, S2_BAND_NAMES
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.prepare_splits import find_split, read_split_csv, split_name
from bigearthnet_tf.tiff import write_geotiff

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
    assert archive == ArchiveV1(root=str(example_paths.s2), s2_dir=str(example_paths.s2))
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


# --------------------------------------------------------------------------------------------
# Sentinel-1 (v1): the real example patches


def test_real_s1_patches_pair_with_their_s2_patches_and_read_pixel_identical(example_paths):
    archive = open_archive(example_paths.s2, s1_root=example_paths.s1)
    assert archive.s1_dir == str(example_paths.s1)
    for s1_folder in sorted(example_paths.s1.iterdir()):
        s1_name = s1_folder.name
        metadata = json.loads((s1_folder / f"{s1_name}_labels_metadata.json").read_text())
        assert "lly" in metadata["coordinates"]  # the real files' key typo; pairing does not mind
        s2_name = metadata["corresponding_s2_patch"]
        patch = archive.read_patch(s2_name)
        assert patch.name == s2_name and patch.s1_name == s1_name
        assert list(patch.s1_bands) == ["VV", "VH"]
        for band in ("VV", "VH"):
            expected = tifffile.imread(s1_folder / f"{s1_name}_{band}.tif")
            assert patch.s1_bands[band].dtype == np.float32
            np.testing.assert_array_equal(patch.s1_bands[band], expected)
        assert not np.array_equal(patch.s1_bands["VV"], patch.s1_bands["VH"])
        assert patch.labels_43 == tuple(metadata["labels"])  # S1 and S2 JSON agree on labels


def test_s1_pairing_from_the_official_table_agrees_with_the_json_files(example_paths, monkeypatch):
    from bigearthnet_tf import archive as archive_module

    from_json = dict(s1_pairs_v1(str(example_paths.s1)))
    assert len(from_json) == 6
    archive_module.s1_pairs_v1.cache_clear()
    monkeypatch.setattr(archive_module, "_S1_JSON_SCAN_LIMIT", 0)  # as for the full 590,326 folders
    monkeypatch.setattr(archive_module, "_corresponding_s2", _refuse_json)
    try:
        assert archive_module.s1_pairs_v1(str(example_paths.s1)) == from_json
    finally:
        archive_module.s1_pairs_v1.cache_clear()


def _refuse_json(s1_dir, s1_name):
    raise AssertionError(f"read the JSON of {s1_name} although the official table knows it")


def _constant_s1_archive(tmp_path, example_paths, vv_value, vh_value, s1_json=None):
    """A v1 S2 archive of one real patch and an S1 twin whose VV and VH are constants."""
    s2_root = tmp_path / "BigEarthNet-v1.0"
    shutil.copytree(example_paths.s2 / ONE, s2_root / ONE)
    s1_name = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"
    folder = tmp_path / "BigEarthNet-S1-v1.0" / s1_name
    folder.mkdir(parents=True)
    for band, value in (("VV", vv_value), ("VH", vh_value)):
        write_geotiff(
            folder / f"{s1_name}_{band}.tif",
            np.full((120, 120), value, np.float32),
            ulx=404400,
            uly=5342400,
            pixel_size=10,
            epsg=32633,
        )
    metadata = s1_json or {"coordinates": {"ulx": 404400, "uly": 5342400, "lrx": 405600, "lry": 5341200}}
    metadata = {**metadata, "corresponding_s2_patch": ONE}
    (folder / f"{s1_name}_labels_metadata.json").write_text(json.dumps(metadata))
    return s2_root, tmp_path / "BigEarthNet-S1-v1.0", s1_name


@pytest.mark.parametrize("corner_key", ["lry", "lly"])
def test_vv_and_vh_are_never_swapped_v1(tmp_path, example_paths, corner_key):
    s1_json = {"coordinates": {"ulx": 404400, "uly": 5342400, "lrx": 405600, corner_key: 5341200}}
    s2_root, s1_root, s1_name = _constant_s1_archive(tmp_path, example_paths, -7.25, -21.5, s1_json)
    # The S1 root may be BigEarthNet-S1-v1.0 itself or its parent.
    for given in (s1_root, s1_root.parent):
        patch = open_archive(s2_root, s1_root=given).read_patch(ONE)
        assert patch.s1_name == s1_name
        assert np.all(patch.s1_bands["VV"] == np.float32(-7.25))
        assert np.all(patch.s1_bands["VH"] == np.float32(-21.5))


def test_missing_s1_band_and_missing_pairing_are_bad_patches(tmp_path, example_paths):
    s2_root, s1_root, s1_name = _constant_s1_archive(tmp_path, example_paths, -7.0, -20.0)
    (s1_root / s1_name / f"{s1_name}_VH.tif").unlink()
    archive = open_archive(s2_root, s1_root=s1_root)
    with pytest.raises(BadPatchError) as caught:
        archive.read_patch(ONE)
    assert str(caught.value) == f"patch {ONE}: {s1_name}_VH.tif: missing band file"
    other = "S2A_MSIL2A_20170613T101031_1_2"
    shutil.copytree(s2_root / ONE, s2_root / other)
    for path in (s2_root / other).iterdir():
        path.rename(path.with_name(path.name.replace(ONE, other)))
    with pytest.raises(BadPatchError) as caught:
        archive.read_patch(other)
    assert str(caught.value) == f"patch {other}: {s1_root}: no Sentinel-1 patch is paired with this patch"


def test_s1_json_without_pairing_key_is_reported(tmp_path, example_paths):
    s2_root, s1_root, s1_name = _constant_s1_archive(tmp_path, example_paths, -7.0, -20.0)
    (s1_root / s1_name / f"{s1_name}_labels_metadata.json").write_text('{"labels": []}')
    with pytest.raises(UserError, match=rf"Sentinel-1 patch {s1_name}: .*: no 'corresponding_s2_patch' key"):
        open_archive(s2_root, s1_root=s1_root).read_patch(ONE)


# --------------------------------------------------------------------------------------------
# v2 (reBEN)


def _write_v2_metadata(root, rows, file_name="metadata.parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "patch_id": pa.string(),
        "labels": pa.list_(pa.string()),
        "split": pa.string(),
        "country": pa.string(),
        "s1_name": pa.string(),
        "s2v1_name": pa.string(),
        "contains_seasonal_snow": pa.bool_(),
        "contains_cloud_or_shadow": pa.bool_(),
    }
    defaults = {"country": "Austria", "s2v1_name": "x", "contains_seasonal_snow": False}
    full = [{**defaults, "contains_cloud_or_shadow": False, **row} for row in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=pa.schema(list(columns.items()))), root / file_name)


V2_ID = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_87_48"
V2_S1 = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"


@pytest.fixture
def tiny_v2(tmp_path, example_paths):
    """A v2 archive of one real patch (renamed to a v2 patch_id) with constant VV/VH."""
    folder = tmp_path / "BigEarthNet-S2" / "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP" / V2_ID
    folder.mkdir(parents=True)
    for band in S2_BAND_NAMES:
        shutil.copy(example_paths.s2 / ONE / f"{ONE}_{band}.tif", folder / f"{V2_ID}_{band}.tif")
    s1_folder = tmp_path / "BigEarthNet-S1" / "S1A_IW_GRDH_1SDV_20170613T165043" / V2_S1
    s1_folder.mkdir(parents=True)
    for band, value in (("VV", -3.5), ("VH", -30.0)):
        write_geotiff(
            s1_folder / f"{V2_S1}_{band}.tif",
            np.full((120, 120), value, np.float32),
            ulx=404400,
            uly=5342400,
            pixel_size=10,
            epsg=32633,
        )
    rows = [
        # Labels deliberately out of 19-class order: the reader restores it.
        {"patch_id": V2_ID, "labels": ["Pastures", "Arable land"], "split": "train", "s1_name": V2_S1},
        {
            "patch_id": "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_1",
            "labels": ["Pastures"],
            "split": "test",
        },
        {"patch_id": "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_2", "labels": [], "split": "validation"},
        {
            "patch_id": "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_3",
            "labels": ["Volcanoes"],
            "split": "train",
        },
    ]
    _write_v2_metadata(tmp_path, rows)
    flagged = [
        {
            "patch_id": "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_2_2",
            "labels": ["Coniferous forest"],
            "split": "validation",
            "contains_seasonal_snow": True,
        }
    ]
    _write_v2_metadata(tmp_path, flagged, "metadata_for_patches_with_snow_cloud_or_shadow.parquet")
    return tmp_path


def test_v2_patch_reads_with_19_labels_only_and_unswapped_s1(tiny_v2, example_paths):
    assert detect_version(tiny_v2) == 2
    assert detect_version(tiny_v2 / "BigEarthNet-S2") == 2
    for root in (tiny_v2, tiny_v2 / "BigEarthNet-S2"):
        archive = open_archive(root, s1_root=tiny_v2)
        assert archive == ArchiveV2(
            str(tiny_v2), str(tiny_v2 / "BigEarthNet-S2"), str(tiny_v2 / "BigEarthNet-S1")
        )
        patch = archive.read_patch(V2_ID)
        assert patch.labels_43 is None
        assert patch.labels_19 == ("Arable land", "Pastures")
        assert patch.s1_name == V2_S1
        assert np.all(patch.s1_bands["VV"] == np.float32(-3.5)) and np.all(
            patch.s1_bands["VH"] == np.float32(-30)
        )
        for band in S2_BAND_NAMES:
            np.testing.assert_array_equal(
                patch.bands[band], tifffile.imread(example_paths.s2 / ONE / f"{ONE}_{band}.tif")
            )


def test_v2_bad_patches(tiny_v2):
    archive = open_archive(tiny_v2)
    with pytest.raises(BadPatchError) as caught:
        archive.read_patch("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_3")
    assert caught.value.file == "metadata.parquet"
    assert caught.value.reason == "unknown label 'Volcanoes' (not one of the 19 BigEarthNet-19 labels)"
    with pytest.raises(
        BadPatchError, match=r"_9_9: metadata.parquet: patch is not listed in the archive's metadata"
    ):
        archive.read_patch("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_9_9")
    folder = tiny_v2 / "BigEarthNet-S2" / "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"
    with pytest.raises(BadPatchError) as caught:
        archive.read_patch("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_1")
    assert caught.value.reason == "no such patch folder"
    assert caught.value.file == str(folder / "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_1")
    assert archive.missing_patches([V2_ID, "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_1"]) == [
        "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_1"
    ]
    with pytest.raises(UserError, match=r"invalid v2 patch_id 'nounderscores'"):
        archive.read_patch("nounderscores")


def test_s1_name_from_metadata_cannot_leave_the_s1_folder(tiny_v2):
    _write_v2_metadata(
        tiny_v2, [{"patch_id": V2_ID, "labels": ["Pastures"], "split": "train", "s1_name": "../../x"}]
    )
    with pytest.raises(BadPatchError) as caught:
        open_archive(tiny_v2, s1_root=tiny_v2).read_patch(V2_ID)
    assert str(caught.value) == f"patch {V2_ID}: metadata.parquet: invalid Sentinel-1 patch name '../../x'"


def test_official_v2_splits_leave_out_snow_and_cloud_unless_asked(tiny_v2):
    prefix = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_"
    assert official_v2_splits(tiny_v2) == {
        "train": [V2_ID, prefix + "1_3"],
        "validation": [prefix + "1_2"],
        "test": [prefix + "1_1"],
    }
    with_flagged = official_v2_splits(tiny_v2, include_snow_cloud=True)
    assert with_flagged["validation"] == [prefix + "1_2", prefix + "2_2"]
    assert snow_cloud_v2(tiny_v2) == frozenset({prefix + "2_2"})
    assert open_archive(tiny_v2).official_splits() == official_v2_splits(tiny_v2)
    assert open_archive(tiny_v2).snow_cloud() == snow_cloud_v2(tiny_v2)


def test_v2_archive_without_metadata_is_rejected(tmp_path):
    (tmp_path / "BigEarthNet-S2").mkdir()
    with pytest.raises(UserError, match=r"is not a BigEarthNet v2 archive: metadata.parquet is missing"):
        open_archive(tmp_path)


def test_v2_metadata_with_a_missing_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "BigEarthNet-S2").mkdir()
    pq.write_table(pa.table({"patch_id": ["a_1_1"], "labels": [["Pastures"]]}), tmp_path / "metadata.parquet")
    with pytest.raises(
        UserError, match=r"metadata.parquet has no column 'split'; reading it needs patch_id, split"
    ):
        official_v2_splits(tmp_path)


def test_v2_metadata_needs_only_the_columns_it_reads(tmp_path):
    """TorchGeo's v2 test parquet has no `country` or `s2v1_name`: nothing here reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "BigEarthNet-S2").mkdir()
    table = {
        "patch_id": ["S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57"],
        "labels": [["Pastures"]],
        "split": ["test"],
        "s1_name": ["S1A_IW_GRDH_1SDV_20170613T165043_33UUP_26_57"],
        "contains_seasonal_snow": [False],
        "contains_cloud_or_shadow": [False],
    }
    pq.write_table(pa.table(table), tmp_path / "metadata.parquet")
    assert official_v2_splits(tmp_path)["test"] == table["patch_id"]


def test_v1_archive_knows_its_official_lists(one_patch_archive):
    archive = open_archive(one_patch_archive)
    assert archive.snow_cloud() is snow_cloud_v1()
    assert len(archive.official_splits()["val"]) == 123_723


def test_read_speed_of_real_patches(example_paths):
    """Not a timed assertion: reports the patches/s read_patch reaches on the example patches."""
    import time

    archive = open_archive(example_paths.s2)
    names = sorted(p.name for p in example_paths.s2.iterdir())
    for name in names:  # warm the page cache
        archive.read_patch(name)
    start = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        for name in names:
            archive.read_patch(name)
    rate = rounds * len(names) / (time.perf_counter() - start)
    print(f"read_patch: {rate:,.0f} patches/s on one core")
    assert rate > 0
