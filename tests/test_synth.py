"""The synthetic archive generator: exact layouts, learnable content, determinism."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from bigearthnet_tf.archive import open_archive
from bigearthnet_tf.constants import (
    BANDS_BY_NAME,
    BIGEARTHNET_19_LABELS,
    ORIGINAL_LABELS,
    S2_BAND_NAMES,
    S2_BANDS,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.prepare_splits import read_split_csv
from bigearthnet_tf.synth import CLASSES, add_example_patches, write_synthetic_archive

V1_NAME = re.compile(r"^S2[AB]_MSIL2A_20(17|18)\d{4}T\d{5,6}_\d{1,2}_\d{1,2}$")
V2_NAME = re.compile(r"^(S2[AB]_MSIL2A_20(17|18)\d{4}T\d{6}_N9999_R\d{3}_T\d{2}[A-Z]{3})_\d{1,2}_\d{1,2}$")
S1_NAME = re.compile(r"^(S1[AB]_IW_GRDH_1SDV_20(17|18)\d{4}T\d{6})_\d{2}[A-Z]{3}_\d{1,2}_\d{1,2}$")


def _all_names(root) -> list[str]:
    return [name for split in ("train", "val", "test") for name in read_split_csv(root / f"{split}.csv")]


def _digest(root) -> str:
    """One hash over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _nearest_classes(patch) -> set[str]:
    """Classify each 20 m pixel by its nearest class signature (standardised bands); keep classes
    covering at least 5% of the patch. Uses only what a reader sees: the 12 bands."""
    stack = []
    for band in S2_BANDS:
        pixels = patch.bands[band.name].astype(np.float64)
        if band.size == 120:
            pixels = pixels.reshape(60, 2, 60, 2).mean(axis=(1, 3))
        elif band.size == 20:
            pixels = np.repeat(np.repeat(pixels, 3, axis=0), 3, axis=1)
        stack.append(pixels / band.std)
    pixels = np.stack(stack, axis=-1).reshape(-1, 12)
    signatures = np.array([cls.reflectance for cls in CLASSES]) / np.array([band.std for band in S2_BANDS])
    nearest = np.argmin(((pixels[:, None, :] - signatures[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(CLASSES))
    return {CLASSES[i].label for i in np.flatnonzero(counts >= 0.05 * len(nearest))}


# --------------------------------------------------------------------------------------------
# v1 layout


def test_v1_layout_names_and_split_lists(synthetic_v1):
    root = synthetic_v1
    assert sorted(p.name for p in root.iterdir()) == ["BigEarthNet-v1.0", "test.csv", "train.csv", "val.csv"]
    sizes = {split: len(read_split_csv(root / f"{split}.csv")) for split in ("train", "val", "test")}
    assert sizes == {"train": 29, "val": 10, "test": 9}  # 60/20/20 of 48
    for split in ("train", "val", "test"):
        raw = (root / f"{split}.csv").read_bytes()
        assert raw.endswith(b"\r\n") and raw.count(b"\r\n") == raw.count(b"\n") == sizes[split]
    names = _all_names(root)
    assert len(set(names)) == 48
    assert sorted(p.name for p in (root / "BigEarthNet-v1.0").iterdir()) == sorted(names)
    assert all(V1_NAME.match(name) for name in names), names
    # Some names carry the archive's lost leading zero of the hour (T9xxxx for 09:xx:xx).
    assert any(re.search(r"T9\d{4}_", name) for name in names)
    folder = root / "BigEarthNet-v1.0" / names[0]
    expected = {f"{names[0]}_{band}.tif" for band in S2_BAND_NAMES} | {f"{names[0]}_labels_metadata.json"}
    assert {p.name for p in folder.iterdir()} == expected


def test_v1_json_has_every_key_and_matches_the_geotiffs(synthetic_v1):
    root = synthetic_v1 / "BigEarthNet-v1.0"
    for name in _all_names(synthetic_v1)[:8]:
        metadata = json.loads((root / name / f"{name}_labels_metadata.json").read_text())
        assert list(metadata) == ["labels", "coordinates", "projection", "tile_source", "acquisition_date"]
        assert metadata["labels"] and set(metadata["labels"]) <= set(ORIGINAL_LABELS)
        # Labels are listed in the 43-class order, as in the real archive.
        order = [ORIGINAL_LABELS.index(label) for label in metadata["labels"]]
        assert order == sorted(order)
        coordinates = metadata["coordinates"]
        assert (
            coordinates["lrx"] - coordinates["ulx"] == 1200
            and coordinates["uly"] - coordinates["lry"] == 1200
        )
        date, time = name.split("_")[2].split("T")
        assert metadata["acquisition_date"].replace("-", "").replace(":", "").replace(
            " ", ""
        ) == date + time.zfill(6)
        assert metadata["tile_source"].startswith(f"{name[:3]}_MSIL1C_{date}T{time}_N0205_R")
        epsg = int(re.search(r'AUTHORITY\["EPSG","(\d+)"\]\]$', metadata["projection"]).group(1))
        for band in ("B02", "B05", "B01"):
            with tifffile.TiffFile(root / name / f"{name}_{band}.tif") as handle:
                geo = handle.geotiff_metadata
                assert handle.pages[0].compression == 1 and handle.pages[0].dtype == np.uint16
            resolution = BANDS_BY_NAME[band].resolution_m
            assert geo["ModelPixelScale"] == [resolution, resolution, 0.0]
            assert geo["ModelTiepoint"][3:5] == [coordinates["ulx"], coordinates["uly"]]
            assert int(geo["ProjectedCSTypeGeoKey"]) == epsg


def test_v1_patches_read_back_with_labels_that_match_their_pixels(synthetic_v1):
    archive = open_archive(synthetic_v1)
    names = _all_names(synthetic_v1)
    label_counts = set()
    for name in names:
        patch = archive.read_patch(name)
        assert 1 <= len(patch.labels_43) <= 4
        label_counts.add(len(patch.labels_43))
        # The labels are exactly the classes a nearest-signature classifier finds in the pixels.
        assert _nearest_classes(patch) == set(patch.labels_43), name
        assert patch.labels_19 and set(patch.labels_19) <= set(BIGEARTHNET_19_LABELS)
    assert label_counts == {1, 2, 3, 4}


def test_band_means_are_near_the_real_ones(synthetic_v1):
    archive = open_archive(synthetic_v1)
    means = np.mean(
        [
            [archive.read_patch(name).bands[b.name].mean() for b in S2_BANDS]
            for name in _all_names(synthetic_v1)
        ],
        axis=0,
    )
    for band, mean in zip(S2_BANDS, means, strict=True):
        assert abs(mean - band.mean) < 0.5 * band.std, (band.name, mean, band.mean)


def test_class_signatures_are_far_apart():
    standardised = np.array([cls.reflectance for cls in CLASSES]) / np.array([b.std for b in S2_BANDS])
    distances = np.sqrt(((standardised[:, None] - standardised[None]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    assert distances.min() > 0.75
    assert len({cls.label for cls in CLASSES}) == len(CLASSES)
    assert {cls.label for cls in CLASSES} <= set(ORIGINAL_LABELS)


def test_same_seed_same_bytes_and_prefix_stability(tmp_path):
    first = write_synthetic_archive(tmp_path / "a", patches=6, seed=3, with_s1=True)
    second = write_synthetic_archive(tmp_path / "b", patches=6, seed=3, with_s1=True)
    third = write_synthetic_archive(tmp_path / "c", patches=6, seed=4, with_s1=True)
    assert _digest(first) == _digest(second)
    assert _digest(first) != _digest(third)
    # Asking for more patches leaves the first ones (names and bytes) unchanged.
    more = write_synthetic_archive(tmp_path / "d", patches=9, seed=3)
    for name in _all_names(first):
        for path in (first / "BigEarthNet-v1.0" / name).iterdir():
            assert (more / "BigEarthNet-v1.0" / name / path.name).read_bytes() == path.read_bytes()


def test_v2_archive_is_deterministic(tmp_path):
    first = write_synthetic_archive(tmp_path / "a", patches=5, seed=9, version=2, with_s1=True)
    second = write_synthetic_archive(tmp_path / "b", patches=5, seed=9, version=2, with_s1=True)
    assert _digest(first) == _digest(second)


def test_v1_sentinel1_layout(synthetic_v1_s1):
    root = synthetic_v1_s1
    s1_root = root / "BigEarthNet-S1-v1.0"
    s2_names = set(_all_names(root))
    paired = set()
    for folder in sorted(s1_root.iterdir()):
        name = folder.name
        assert S1_NAME.match(name), name
        assert {p.name for p in folder.iterdir()} == {
            f"{name}_VV.tif",
            f"{name}_VH.tif",
            f"{name}_labels_metadata.json",
        }
        metadata = json.loads((folder / f"{name}_labels_metadata.json").read_text())
        assert list(metadata) == [
            "labels",
            "coordinates",
            "projection",
            "corresponding_s2_patch",
            "scene_source",
            "acquisition_time",
        ]
        assert set(metadata["coordinates"]) == {"ulx", "uly", "lrx", "lly"}  # the real files' typo
        assert metadata["scene_source"].startswith(name.rsplit("_", 3)[0] + "_")
        s2_name = metadata["corresponding_s2_patch"]
        assert s2_name.split("_")[-2:] == name.split("_")[-2:]
        paired.add(s2_name)
        s2_metadata = json.loads(
            (root / "BigEarthNet-v1.0" / s2_name / f"{s2_name}_labels_metadata.json").read_text()
        )
        assert metadata["labels"] == s2_metadata["labels"]
        for band in ("VV", "VH"):
            pixels = tifffile.imread(folder / f"{name}_{band}.tif")
            assert pixels.dtype == np.float32 and pixels.shape == (120, 120)
    assert paired == s2_names


def test_s1_backscatter_follows_the_classes(synthetic_v1_s1):
    archive = open_archive(synthetic_v1_s1, s1_root=synthetic_v1_s1)
    vv_means, vh_means = [], []
    for name in _all_names(synthetic_v1_s1):
        patch = archive.read_patch(name)
        expected_vv = np.mean([_by_label(label).vv for label in patch.labels_43])
        vv_means.append(patch.s1_bands["VV"].mean())
        vh_means.append(patch.s1_bands["VH"].mean())
        assert patch.s1_bands["VV"].min() >= expected_vv - 15  # speckle, not garbage
    # VH is the weaker polarisation everywhere, as in real data.
    assert all(vh < vv for vv, vh in zip(vv_means, vh_means, strict=True))


def _by_label(label: str):
    return next(cls for cls in CLASSES if cls.label == label)


def test_s2_bytes_do_not_depend_on_with_s1(synthetic_v1_s1, tmp_path):
    plain = write_synthetic_archive(tmp_path / "plain", patches=24, seed=5)
    name = _all_names(plain)[0]
    for band in ("B02", "B8A", "B09"):
        file = f"{name}/{name}_{band}.tif"
        assert (plain / "BigEarthNet-v1.0" / file).read_bytes() == (
            synthetic_v1_s1 / "BigEarthNet-v1.0" / file
        ).read_bytes()


# --------------------------------------------------------------------------------------------
# v2 layout


def test_v2_layout_and_parquet_types(synthetic_v2):
    root = synthetic_v2
    assert sorted(p.name for p in root.iterdir()) == [
        "BigEarthNet-S1",
        "BigEarthNet-S2",
        "metadata.parquet",
        "metadata_for_patches_with_snow_cloud_or_shadow.parquet",
    ]
    expected_schema = pa.schema(
        [
            ("patch_id", pa.string()),
            ("labels", pa.list_(pa.string())),
            ("split", pa.string()),
            ("country", pa.string()),
            ("s1_name", pa.string()),
            ("s2v1_name", pa.string()),
            ("contains_seasonal_snow", pa.bool_()),
            ("contains_cloud_or_shadow", pa.bool_()),
        ]
    )
    main = pq.read_table(root / "metadata.parquet")
    flagged = pq.read_table(root / "metadata_for_patches_with_snow_cloud_or_shadow.parquet")
    assert main.schema.equals(expected_schema) and flagged.schema.equals(expected_schema)
    rows = main.to_pylist() + flagged.to_pylist()
    assert len(rows) == 48 and len({row["patch_id"] for row in rows}) == 48
    assert {row["split"] for row in rows} == {"train", "validation", "test"}
    assert not any(
        row["contains_seasonal_snow"] or row["contains_cloud_or_shadow"] for row in main.to_pylist()
    )
    assert all(
        row["contains_seasonal_snow"] != row["contains_cloud_or_shadow"] for row in flagged.to_pylist()
    )
    for row in rows:
        match = V2_NAME.match(row["patch_id"])
        assert match, row["patch_id"]
        folder = root / "BigEarthNet-S2" / match.group(1) / row["patch_id"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{row['patch_id']}_{b}.tif" for b in S2_BAND_NAMES
        )
        assert row["labels"] == [label for label in BIGEARTHNET_19_LABELS if label in row["labels"]]
        assert row["labels"] and row["country"]
        assert V1_NAME.match(row["s2v1_name"])
        assert row["s2v1_name"].split("_")[-2:] == row["patch_id"].split("_")[-2:]
        s1_match = S1_NAME.match(row["s1_name"])
        assert s1_match, row["s1_name"]
        s1_folder = root / "BigEarthNet-S1" / s1_match.group(1) / row["s1_name"]
        assert sorted(p.name for p in s1_folder.iterdir()) == [
            f"{row['s1_name']}_VH.tif",
            f"{row['s1_name']}_VV.tif",
        ]


def test_v2_patches_read_back(synthetic_v2):
    archive = open_archive(synthetic_v2, s1_root=synthetic_v2)
    assert archive.version == 2
    rows = pq.read_table(synthetic_v2 / "metadata.parquet").to_pylist()
    for row in rows[:10]:
        patch = archive.read_patch(row["patch_id"])
        assert patch.labels_43 is None and list(patch.labels_19) == row["labels"]
        assert patch.s1_name == row["s1_name"] and set(patch.s1_bands) == {"VV", "VH"}


def test_flagged_v2_patches_show_snow_or_cloud(synthetic_v2):
    archive = open_archive(synthetic_v2)
    flagged = pq.read_table(
        synthetic_v2 / "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
    ).to_pylist()
    clean = pq.read_table(synthetic_v2 / "metadata.parquet").to_pylist()
    assert flagged
    brightest_clean = max(archive.read_patch(row["patch_id"]).bands["B02"].max() for row in clean)
    for row in flagged:
        assert archive.read_patch(row["patch_id"]).bands["B02"].max() > max(4000, brightest_clean)


# --------------------------------------------------------------------------------------------
# Arguments, outputs in place, example patches


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"patches": 0}, "--patches must be a number of patches from 1 to 100,000, got 0"),
        ({"patches": 10, "seed": -1}, "--seed must be a non-negative integer, got -1"),
        ({"patches": 10, "version": 3}, "unknown archive version 3"),
    ],
)
def test_bad_arguments(tmp_path, arguments, message):
    with pytest.raises(UserError, match=re.escape(message)):
        write_synthetic_archive(tmp_path / "out", **arguments)


def test_existing_archive_is_never_overwritten(tmp_path):
    write_synthetic_archive(tmp_path, patches=2, seed=1)
    with pytest.raises(UserError, match=r"BigEarthNet-v1.0 already exists; choose an empty --out folder"):
        write_synthetic_archive(tmp_path, patches=2, seed=1)
    # No staging folder is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "BigEarthNet-v1.0",
        "test.csv",
        "train.csv",
        "val.csv",
    ]


def test_add_example_patches(tmp_path, example_paths, monkeypatch):
    monkeypatch.setenv("BIGEARTHNET_TF_CACHE", str(example_paths.s2.parent))
    root = write_synthetic_archive(tmp_path, patches=5, seed=2, with_s1=True)
    before = read_split_csv(root / "train.csv")
    added = add_example_patches(root)
    assert len(added) == 6 and "S2B_MSIL2A_20170924T93020_69_24" in added
    assert read_split_csv(root / "train.csv") == before + added
    assert (root / "train.csv").read_bytes().count(b"\n") == (root / "train.csv").read_bytes().count(b"\r\n")
    archive = open_archive(root, s1_root=root)
    patch = archive.read_patch("S2B_MSIL2A_20170924T93020_69_24")
    assert patch.s1_name == "S1A_IW_GRDH_1SDV_20170925T043256_35VPK_69_24"
    assert archive.missing_patches(read_split_csv(root / "train.csv")) == []
    with pytest.raises(UserError, match="the example patches were added before"):
        add_example_patches(root)


def test_cli_synth_prints_the_root(tmp_path, capsys):
    from bigearthnet_tf.cli import main

    main(["synth", "--out", str(tmp_path / "cli"), "--patches", "3", "--seed", "1", "--version", "2"])
    assert (
        capsys.readouterr().out.strip() == f"synthetic BigEarthNet v2 archive written to {tmp_path / 'cli'}"
    )
    assert (tmp_path / "cli" / "metadata.parquet").is_file()
