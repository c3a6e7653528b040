"""`bigearthnet map`: scenes made of patches (the six real example patches, synthetic patches with
their Sentinel-1 twins) mapped by every route equal `predict` on the source patches; the outputs are
georeferenced as documented; bad input is one line."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bigearthnet_tf import checkpoints
from bigearthnet_tf.archive import s1_pairs_v1
from bigearthnet_tf.cli import main
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS_WITH_CODES
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.mapping import MapOptions, map_scenes
from bigearthnet_tf.predict import predict
from bigearthnet_tf.synth_scene import DEFAULT_ORIGIN, mosaic_bands, write_s1, write_scene

ATOL = 1e-6
S2_MODEL = "K-BranchCNN-Tiny"


def _checkpoint(folder: Path, modality: str, seed: int) -> Path:
    import keras

    from bigearthnet_tf.models import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(S2_MODEL, len(BIGEARTHNET_19_LABELS), modality)
    base = folder / f"{modality}" / "best"
    checkpoints.save_checkpoint(
        base, model, model_name=S2_MODEL, label_type="BigEarthNet-19", modality=modality, iteration=1
    )
    return base


@pytest.fixture(scope="module")
def examples(example_paths, tmp_path_factory):
    """The six example patches on a 2 x 3 grid, written in every scene layout, and an S2 model."""
    base = tmp_path_factory.mktemp("map_examples")
    folders = sorted(path for path in example_paths.s2.iterdir() if path.is_dir())
    grid = [folders[:3], folders[3:]]
    bands, _ = mosaic_bands(grid)
    scenes = {
        "folder": write_scene(bands, base / "folder_scene", "folder"),
        "geotiff": write_scene(bands, base / "scene.tif", "geotiff"),
        "safe": write_scene(bands, base / "product.SAFE", "safe", offset=-1000),
        "zip": write_scene(bands, base / "zipped" / "product.zip", "zip", offset=-1000),
    }
    model = _checkpoint(base / "models", "S2", 3)
    expected = predict(model, folders, show_progress=False, emit=False)
    return base, grid, bands, scenes, model, expected


def _probabilities(folder: Path) -> np.ndarray:
    with rasterio.open(folder / "probabilities.tif") as dataset:
        return dataset.read()


def _map(scene, model, out, **options):
    return map_scenes([scene], model, out, MapOptions(**options), show_progress=False)[0]


@pytest.mark.parametrize("layout", ["folder", "geotiff", "safe", "zip"])
def test_every_route_equals_predict_on_the_patches(examples, tmp_path, layout):
    _, grid, _, scenes, model, expected = examples
    result = _map(scenes[layout], model, tmp_path / "maps")
    probabilities = _probabilities(result.folder)
    assert probabilities.shape == (19, 2, 3)
    for i, row in enumerate(grid):
        for j in range(len(row)):
            np.testing.assert_allclose(probabilities[:, i, j], expected.probabilities[i * 3 + j], atol=ATOL)
    with rasterio.open(result.folder / "probabilities.tif") as dataset:
        assert dataset.crs.to_epsg() == 32632 and dataset.descriptions == BIGEARTHNET_19_LABELS
        assert tuple(dataset.transform)[:6] == (
            1200.0,
            0.0,
            DEFAULT_ORIGIN[0],
            0.0,
            -1200.0,
            DEFAULT_ORIGIN[1],
        )
        assert dataset.profile["tiled"] and dataset.compression is not None
    with rasterio.open(result.folder / "labels.tif") as dataset:
        bits = dataset.read(1)
        assert (
            dataset.crs.to_epsg() == 32632
            and dataset.transform == rasterio.open(result.folder / "probabilities.tif").transform
        )
    for i in range(2):
        for j in range(3):
            labels = expected.labels[i * 3 + j]
            assert bits[i, j] == sum(1 << BIGEARTHNET_19_LABELS.index(name) for name in labels)
    document = json.loads((result.folder / "map.json").read_text())
    offsets = document["offsets_applied"]["boa_add_offset"]
    assert (
        (offsets == dict.fromkeys(offsets, -1000) and len(offsets) == 12)
        if layout in ("safe", "zip")
        else offsets == {}
    )
    assert document["counts"] == {"windows": 6, "predicted": 6, "nodata": 0}
    if layout in ("safe", "zip"):
        assert document["scene"]["processing_baseline"] == "04.00" and document["scene"]["tile"] == "32UQD"
    with open(result.folder / "windows.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(int(r["row"]), int(r["column"])) for r in rows] == [(i, j) for i in range(2) for j in range(3)]
    first = rows[0]
    assert float(first["x"]) == DEFAULT_ORIGIN[0] + 600 and float(first["y"]) == DEFAULT_ORIGIN[1] - 600
    assert 5 < float(first["lon"]) < 20 and 40 < float(first["lat"]) < 50  # UTM 32N
    assert first["predicted"] == ";".join(expected.labels[0])
    assert (result.folder / "quicklook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlapping_windows_grid_and_parquet(examples, tmp_path):
    """Stride 60: 3 x 5 windows, pixels of 600 m centred on the windows; every other one is a patch."""
    _, _, _, scenes, model, expected = examples
    result = _map(
        scenes["folder"], model, tmp_path / "maps", stride=60, windows_format="parquet", dtype="uint8"
    )
    with rasterio.open(result.folder / "probabilities.tif") as dataset:
        assert dataset.shape == (3, 5) and dataset.dtypes[0] == "uint8" and dataset.nodata == 255
        # Pixel (0, 0)'s centre is the first window's centre, 600 m into the scene.
        assert dataset.transform @ (0.5, 0.5) == (DEFAULT_ORIGIN[0] + 600, DEFAULT_ORIGIN[1] - 600)
        assert dataset.transform.a == 600
        scaled = dataset.read()
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(
                scaled[:, 2 * i, 2 * j], np.rint(expected.probabilities[i * 3 + j] * 254)
            )
    import pyarrow.parquet as pq

    table = pq.read_table(result.folder / "windows.parquet")
    assert table.num_rows == 15 and table.column_names[:6] == ["row", "column", "x", "y", "lon", "lat"]


def test_nodata_windows_and_an_area(examples, tmp_path):
    """A cell without data (DN 0) is nodata in every output; --bbox maps only the windows it meets."""
    base, grid, _, _, model, expected = examples
    holes = [list(grid[0]), list(grid[1])]
    holes[1][2] = None
    bands, _ = mosaic_bands(holes)
    scene = write_scene(bands, tmp_path / "holes", "folder")
    result = _map(scene, model, tmp_path / "maps")
    probabilities = _probabilities(result.folder)
    assert np.isnan(probabilities[:, 1, 2]).all() and np.isfinite(probabilities[:, :, :2]).all()
    with rasterio.open(result.folder / "labels.tif") as dataset:
        assert dataset.read(1)[1, 2] == dataset.nodata == np.iinfo(np.uint32).max
    assert json.loads((result.folder / "map.json").read_text())["counts"] == {
        "windows": 6,
        "predicted": 5,
        "nodata": 1,
    }
    # The window of patch (1, 1) alone: a box around its centre.
    from rasterio.warp import transform as to_lonlat

    x, y = DEFAULT_ORIGIN[0] + 1800, DEFAULT_ORIGIN[1] - 1800
    (lon0, lon1), (lat0, lat1) = to_lonlat("EPSG:32632", "EPSG:4326", [x - 100, x + 100], [y - 100, y + 100])
    part = _map(scene, model, tmp_path / "part", bbox=(lon0, lat0, lon1, lat1))
    with rasterio.open(part.folder / "probabilities.tif") as dataset:
        assert dataset.shape == (1, 1) and dataset.transform @ (0.5, 0.5) == (x, y)
        np.testing.assert_allclose(dataset.read()[:, 0, 0], expected.probabilities[4], atol=ATOL)


@pytest.fixture(scope="module")
def with_s1(synthetic_v1_s1, tmp_path_factory):
    """Synthetic patches with their S1 twins on a 2 x 2 grid, the S1 pair as files, and MM and S1 models."""
    base = tmp_path_factory.mktemp("map_s1")
    s2_root = synthetic_v1_s1 / "BigEarthNet-v1.0"
    s1_root = synthetic_v1_s1 / "BigEarthNet-S1-v1.0"
    pairs = s1_pairs_v1(s1_root)
    names = sorted(pairs)[:4]
    grid = [[s2_root / names[0], s2_root / names[1]], [s2_root / names[2], s2_root / names[3]]]
    s1_grid = [[s1_root / pairs[folder.name] for folder in row] for row in grid]
    bands, s1 = mosaic_bands(grid, s1_grid)
    scene = write_scene(bands, base / "scene", "folder")
    return base, grid, scene, s1, synthetic_v1_s1


@pytest.mark.parametrize("modality", ["MM", "S1"])
def test_sentinel1_models_equal_predict(with_s1, tmp_path, modality):
    base, grid, scene, s1, archive_root = with_s1
    model = _checkpoint(base / "models", modality, 5)
    folders = [folder for row in grid for folder in row]
    expected = predict(model, folders, s1_root=archive_root, show_progress=False, emit=False).probabilities
    s1_files = write_s1(s1, tmp_path / "s1")
    probabilities = _probabilities(_map(scene, model, tmp_path / "maps", s1=tuple(map(str, s1_files))).folder)
    for index in range(4):
        np.testing.assert_allclose(probabilities[:, index // 2, index % 2], expected[index], atol=ATOL)
    # Linear backscatter converted to dB: the same up to float32 rounding of the round trip.
    linear = write_s1(s1, tmp_path / "s1_linear", linear=True)
    converted = _probabilities(
        _map(scene, model, tmp_path / "linear", s1=tuple(map(str, linear)), s1_linear=True).folder
    )
    np.testing.assert_allclose(converted, probabilities, atol=1e-4)
    with pytest.raises(UserError, match="reads Sentinel-1"):
        _map(scene, model, tmp_path / "none")


def test_a_reference_map_gives_the_metrics_evaluate_gives(examples, example_paths, tmp_path):
    """A CORINE raster (20 m, codes of each patch's 43-class labels in stripes) gives every window the
    labels of its patch; the metrics equal `evaluate` on records prepared from the same patches."""
    from bigearthnet_tf.archive import open_archive
    from bigearthnet_tf.config import config_from_dict
    from bigearthnet_tf.evaluate import evaluate
    from bigearthnet_tf.prepare import prepare

    base, grid, _, scenes, model, _ = examples
    codes = dict((name, code) for code, name in ORIGINAL_LABELS_WITH_CODES)
    archive = open_archive(example_paths.s2)
    reference = np.zeros((2 * 60, 3 * 60), np.uint16)
    for i, row in enumerate(grid):
        for j, folder in enumerate(row):
            labels_43, _ = archive.read_labels(folder.name)
            stripes = np.array_split(np.arange(60), len(labels_43))
            for stripe, name in zip(stripes, labels_43, strict=True):
                reference[i * 60 : (i + 1) * 60, j * 60 + stripe] = codes[name]
    reference[0, 0] = 335  # glaciers: a CORINE class outside the 43, counted and named
    from affine import Affine

    path = tmp_path / "clc.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=180,
        height=120,
        count=1,
        dtype="uint16",
        crs="EPSG:32632",
        transform=Affine(20, 0, DEFAULT_ORIGIN[0], 0, -20, DEFAULT_ORIGIN[1]),
        nodata=0,
    ) as dataset:
        dataset.write(reference, 1)
    result = _map(scenes["folder"], model, tmp_path / "maps", reference=str(path))
    mapped = json.loads((result.folder / "eval_result.json").read_text())
    document = json.loads((result.folder / "map.json").read_text())
    assert document["reference"]["unmapped_codes"] == {"335": 1}
    assert document["reference"]["windows_with_reference"] == 6

    names = sorted(folder.name for row in grid for folder in row)
    (tmp_path / "test.csv").write_text("\n".join(names) + "\n")
    prepare(example_paths.s2, tmp_path / "records", [tmp_path / "test.csv"], workers=1, show_progress=False)
    config = config_from_dict(
        {
            "batch_size": 4,
            "out_dir": str(tmp_path / "eval"),
            "test_tf_record_files": [str(tmp_path / "records" / "*.tfrecord")],
            "model_file": str(model),
        },
        "evaluate",
    )
    evaluated = json.loads(evaluate(config).eval_result.read_text())
    assert mapped.keys() == evaluated.keys()
    for key, value in evaluated.items():
        assert mapped[key] == pytest.approx(value, abs=1e-6), key


def _cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in args])
    assert stop.value.code == 1
    printed = capsys.readouterr().err.strip()
    error = printed.splitlines()[-1]  # after the progress bar, when the damage is met while reading
    assert error.startswith("error: ") and "Traceback" not in printed
    assert all(line.startswith(("thresholds:", "mapping ", " ")) for line in printed.splitlines()[:-1])
    return error


def test_bad_input_is_one_line_and_leaves_nothing(examples, tmp_path, capsys):
    base, grid, bands, scenes, model, _ = examples
    out = tmp_path / "maps"

    def refused(scene, *extra) -> str:
        error = _cli_error(capsys, "map", scene, "--model", model, "--out", out, *extra)
        assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".bigearthnet-")]
        return error

    l1c = write_scene(bands, tmp_path / "l1c.SAFE", "safe", level="L1C")
    assert "a Level-1C product" in refused(l1c) and "--allow-l1c" in refused(l1c)
    lacking = tmp_path / "lacking"
    shutil.copytree(scenes["folder"], lacking)
    next(lacking.glob("*_B01.tif")).unlink()
    assert "the model reads B01, which the scene lacks" in refused(lacking)
    small, _ = mosaic_bands([[grid[0][0]]])
    tiny = {band: values[: values.shape[0] // 2] for band, values in small.items()}
    assert "smaller than one 120 x 120 window" in refused(write_scene(tiny, tmp_path / "tiny", "folder"))
    unsafe = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(unsafe, "w") as archive:
        archive.writestr("../MTD_MSIL2A.xml", "<x/>")
    assert "unsafe member name" in refused(unsafe)
    damaged = tmp_path / "damaged.SAFE"
    shutil.copytree(scenes["safe"], damaged)
    band = next(damaged.rglob("*_B04_10m.jp2"))
    band.write_bytes(band.read_bytes()[: band.stat().st_size // 2])
    assert "B04" in refused(damaged)
    far = write_s1(
        {"VV": np.zeros((120, 120), "float32"), "VH": np.zeros((120, 120), "float32")},
        tmp_path / "far",
        origin=(100000.0, 1000020.0),
    )
    s1_model = _checkpoint(tmp_path / "m", "MM", 1)
    error = _cli_error(capsys, "map", scenes["folder"], "--model", s1_model, "--out", out, "--s1", *far)
    assert "does not overlap the scene" in error
    assert "--stride must be a multiple of 6" in refused(scenes["folder"], "--stride", "50")


def test_many_scenes_resume_skip_and_shard(examples, tmp_path, capsys):
    _, _, _, scenes, model, _ = examples
    out = tmp_path / "maps"
    options = MapOptions()
    done = map_scenes(
        [scenes["folder"], scenes["geotiff"]], model, out, options, shard=(1, 2), show_progress=False
    )
    assert [result.scene for result in done] == ["scene"] and not (out / "folder_scene").exists()
    stamp = (out / "scene" / "map.json").stat().st_mtime_ns
    again = map_scenes([scenes["folder"], scenes["geotiff"]], model, out, options, show_progress=False)
    assert [result.skipped_existing for result in again] == [False, True]
    assert (out / "scene" / "map.json").stat().st_mtime_ns == stamp
    (out / "other_scene").mkdir()
    renamed = tmp_path / "other_scene"
    shutil.copytree(scenes["folder"], renamed)
    with pytest.raises(UserError, match="exists and is not the output of bigearthnet map"):
        map_scenes([renamed], model, out, options, show_progress=False)
