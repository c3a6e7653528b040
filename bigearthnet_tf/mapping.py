"""`bigearthnet map`: a model applied over whole Sentinel-2 scenes, written as georeferenced maps.

Windows of 120 x 120 px (one BigEarthNet patch, 1.2 km) are cut on a regular grid from the scene's
top-left corner every `stride` pixels; window (i, j) becomes output pixel (i, j), so the output grid
has pixels of stride x 10 m, centred on the windows, in the scene's CRS. Each window is read exactly
as `predict` reads a patch (`scenes`: native resolutions, the product's offset applied), so a window
cut from a mosaic of patches gives `predict`'s probabilities on those patches. A window with more
than `max_nodata` of nodata pixels is not predicted and is nodata in every output.

Written to `<out>/<scene name>/` as one set (a kill leaves the complete old set or none):
- `probabilities.tif`: cloud-optimised GeoTIFF, one band per class in the model's class order (band
  descriptions = class names), float32 with NaN as nodata, or with `dtype="uint8"` p * 254 rounded
  and 255 as nodata;
- `labels.tif`: the predicted label set of each window as a bit mask over the class order (bit i =
  class i; uint32 for up to 32 classes, else uint64), all bits set where there is no data;
- `quicklook.png`: the windows' true colour beside the most probable class, with a legend;
- `windows.csv` (or `.parquet`): row, column, the window centre in the scene's CRS and in lon/lat,
  one probability column per class name, and the predicted labels (`;`-joined);
- `map.json`: the model and its source, the scene (product id, date, tile, baseline), stride,
  thresholds, offsets applied, counts and where the time went;
- with a `reference` CORINE Land Cover raster: `eval_result.json` (the metrics of `evaluate`) and
  `per_class_metrics.png` over the windows that have reference labels.

Reading runs in a thread one strip ahead of the model, so reading and inference overlap. Memory holds
a few strips of the scene and the outputs (a few MB per scene at stride 120), whatever the scene size.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigearthnet_tf import __version__
from bigearthnet_tf.console import progress_bar, status_console
from bigearthnet_tf.constants import (
    ORIGINAL_LABELS,
    ORIGINAL_LABELS_WITH_CODES,
    PATCH_SIZE,
    original_to_19,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import (
    check_free_space,
    new_temporary_folder,
    publish_folder,
    remove_stale_temporaries,
    write_text_atomically,
)
from bigearthnet_tf.inference import logits_function, sigmoid
from bigearthnet_tf.layout import S1_INPUT
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.metrics import compute_metrics, write_eval_result
from bigearthnet_tf.predictor import Predictor, describe_thresholds, load_predictor
from bigearthnet_tf.report import save_figure_atomically, save_per_class_chart
from bigearthnet_tf.scenes import PIXEL_M, Scene, open_s1, open_scene

MAP_FILE = "map.json"
PROBABILITIES_FILE = "probabilities.tif"
LABELS_FILE = "labels.tif"
QUICKLOOK_FILE = "quicklook.png"
WINDOWS_FILE = "windows"  # + .csv or .parquet
EVAL_RESULT_FILE = "eval_result.json"
CHART_FILE = "per_class_metrics.png"
DEFAULT_STRIDE = PATCH_SIZE
DEFAULT_MAX_NODATA = 0.1
DEFAULT_BATCH_SIZE = 64
UINT8_NODATA = 255
GDAL_CACHE_MB = 512
# Strides keep the 60 m bands whole: a window starts on a 60 m pixel's corner.
STRIDE_STEP = 6
CLC_CODES = {code: name for code, name in ORIGINAL_LABELS_WITH_CODES}


@dataclass(frozen=True)
class MapOptions:
    """How a scene is mapped (the command line's options; see `map_scenes`)."""

    stride: int = DEFAULT_STRIDE
    bbox: tuple[float, float, float, float] | None = None  # lon/lat: west, south, east, north
    aoi: str | os.PathLike[str] | None = None  # a GeoJSON file whose extent is mapped
    bands: tuple[str, ...] | None = None  # of a multi-band GeoTIFF
    s1: tuple[str, ...] = ()  # VV.tif VH.tif, or one two-band file
    s1_linear: bool = False
    boa_offset: int | None = None
    allow_l1c: bool = False
    max_nodata: float = DEFAULT_MAX_NODATA
    dtype: str = "float32"  # of probabilities.tif: float32 or uint8
    threshold: float | None = None
    thresholds_file: str | None = None
    reference: str | os.PathLike[str] | None = None  # a CORINE Land Cover raster (level-3 codes)
    windows_format: str = "csv"  # or parquet
    batch_size: int = DEFAULT_BATCH_SIZE
    overwrite: bool = False

    def check(self) -> None:
        if self.stride < STRIDE_STEP or self.stride % STRIDE_STEP or self.stride > PATCH_SIZE:
            raise UserError(
                f"--stride must be a multiple of {STRIDE_STEP} from {STRIDE_STEP} to {PATCH_SIZE} (a window "
                f"starts on a 60 m pixel), got {self.stride}"
            )
        if not 0 <= self.max_nodata <= 1:
            raise UserError(f"--max-nodata must be a fraction from 0 to 1, got {self.max_nodata}")
        if self.dtype not in ("float32", "uint8"):
            raise UserError(f"--dtype must be float32 or uint8, got {self.dtype!r}")
        if self.windows_format not in ("csv", "parquet"):
            raise UserError(f"--windows-format must be csv or parquet, got {self.windows_format!r}")
        if self.bbox is not None and self.aoi is not None:
            raise UserError("give --bbox or --aoi, not both")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class MapResult:
    """One scene's outputs and figures."""

    scene: str
    folder: Path
    windows: int = 0  # in the mapped grid
    predicted: int = 0
    skipped_existing: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] | None = None


def map_scenes(
    scenes: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str] | Predictor,
    out: str | os.PathLike[str],
    options: MapOptions | None = None,
    *,
    shard: tuple[int, int] | None = None,
    show_progress: bool = True,
) -> list[MapResult]:
    """Map every scene (with `shard=(i, n)`, every n-th from the i-th, 0-based) into `out/<scene>/`.

    A scene whose complete output exists is skipped unless `options.overwrite`, so an interrupted list
    resumes when run again, and n machines can share one list without talking to each other.
    """
    import rasterio

    options = options or MapOptions()
    options.check()
    # GDAL's block cache defaults to a share of the machine's memory and would fill with the scene as
    # it is read: a fixed size holds a row of tiles of every band (JP2 tiles are 1024 px) and no more.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        return _map_scenes(scenes, model, out, options, shard, show_progress)


def _map_scenes(scenes, model, out, options: MapOptions, shard, show_progress: bool) -> list[MapResult]:
    if not scenes:
        raise UserError("no scene given")
    if shard is not None:
        index, count = shard
        if count < 1 or not 0 <= index < count:
            raise UserError(f"--shard I/N needs 0 <= I < N, got {index}/{count}")
        scenes = list(scenes)[index::count]
    # Every scene is opened (its files and metadata checked) before the model is loaded.
    opened = [
        open_scene(path, bands=options.bands, boa_offset=options.boa_offset, allow_l1c=options.allow_l1c)
        for path in scenes
    ]
    for path in (
        *options.s1,
        *([options.reference] if options.reference else []),
        *([options.aoi] if options.aoi else []),
    ):
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist or is not a file")
    console = status_console(show_progress)
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    if predictor.needs_s1 and not options.s1:
        raise UserError(
            f"model {predictor.source} reads Sentinel-1 ({predictor.meta.modality}); give --s1 VV.tif VH.tif"
        )
    thresholds, described = describe_thresholds(
        predictor, threshold=options.threshold, thresholds_file=options.thresholds_file
    )
    jobs = [_checked_job(scene, predictor, options) for scene in opened]  # all refusals come first
    console.print(f"thresholds: {described}", markup=False)
    results = []
    for job in jobs:
        results.append(_map_one(*job, predictor, Path(out), options, thresholds, described, console))
    return results


def _checked_job(scene: Scene, predictor: Predictor, options: MapOptions):
    """What mapping `scene` needs, checked: the model's bands, the S1 pair, the window range and the
    reference map (UserError for the first thing that is wrong)."""
    s2_bands = sorted(
        {band for key, bands in predictor.band_order.items() if key != S1_INPUT for band in bands}
    )
    missing = [band for band in s2_bands if band not in scene.bands]
    if missing:
        raise UserError(
            f"scene {scene.info.source}: the model reads {', '.join(missing)}, which the scene lacks"
        )
    s1 = open_s1(options.s1, scene, linear=options.s1_linear) if predictor.needs_s1 else None
    rows, columns = _window_range(scene, options)
    reference = _Reference(options.reference, scene) if options.reference else None
    return scene, s1, rows, columns, reference


def _map_one(
    scene, s1, rows, columns, reference, predictor, out: Path, options, thresholds, described, console
):
    started = time.perf_counter()
    target = out / scene.name
    if target.exists():
        if not (target / MAP_FILE).is_file():
            raise UserError(
                f"{target} exists and is not the output of bigearthnet map; remove it or choose --out"
            )
        if not options.overwrite:
            console.print(
                f"{scene.name}: complete output exists in {target}; skipped (--overwrite redoes it)"
            )
            return MapResult(scene.name, target, skipped_existing=True)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, f"map-{scene.name}", f"map output {target}"):
        remove_stale_temporaries(out, scene.name)
        try:
            grid = _run(scene, s1, predictor, options, rows, columns, reference, console, thresholds)
        finally:
            scene.close()
            if s1 is not None:
                s1.close()
            if reference is not None:
                reference.close()
        # The outputs are a few times the probabilities' size (GeoTIFFs, table, quick look).
        check_free_space(out, 4 * grid.probabilities.nbytes + (8 << 20), target)
        temporary = new_temporary_folder(target)
        try:
            result = _write_outputs(
                temporary, scene, predictor, options, rows, columns, grid, thresholds, described
            )
            result.seconds = {**grid.seconds, "total": time.perf_counter() - started}
            _write_map_json(
                temporary, scene, predictor, options, rows, columns, grid, thresholds, described, result
            )
            publish_folder(temporary, target)
        except BaseException as error:
            shutil.rmtree(temporary, ignore_errors=True)
            if "No space left on device" in str(error) and not isinstance(error, OSError):
                raise OSError(errno.ENOSPC, "No space left on device", os.fspath(target)) from None
            raise
    result.folder = target
    _print_summary(console, result, target)
    return result


# --- the window grid ------------------------------------------------------------------------------------


def _window_range(scene: Scene, options: MapOptions) -> tuple[range, range]:
    """The window rows and columns to map: all, or those whose window meets the --bbox / --aoi."""
    count_rows, count_columns = scene.windows(options.stride)
    if count_rows < 1 or count_columns < 1:
        raise UserError(f"scene {scene.info.source}: smaller than one {PATCH_SIZE} x {PATCH_SIZE} window")
    area = options.bbox
    if options.aoi is not None:
        area = _aoi_bounds(Path(options.aoi))
    if area is None:
        return range(count_rows), range(count_columns)
    from rasterio.warp import transform_bounds

    west, south, east, north = area
    if not (west < east and south < north):
        raise UserError(
            f"--bbox {west},{south},{east},{north}: needs west < east and south < north (lon/lat)"
        )
    left, bottom, right, top = transform_bounds("EPSG:4326", scene.crs, west, south, east, north)
    inverse = ~scene.transform
    col_a, row_a = inverse @ (left, top)
    col_b, row_b = inverse @ (right, bottom)
    c0, c1 = sorted((col_a, col_b))
    r0, r1 = sorted((row_a, row_b))
    stride = options.stride
    # Windows [k * stride, k * stride + 120) that meet [c0, c1).
    first_column = max(0, int(np.floor((c0 - PATCH_SIZE) / stride)) + 1)
    last_column = min(count_columns - 1, int(np.ceil(c1 / stride)) - 1)
    first_row = max(0, int(np.floor((r0 - PATCH_SIZE) / stride)) + 1)
    last_row = min(count_rows - 1, int(np.ceil(r1 / stride)) - 1)
    if first_column > last_column or first_row > last_row:
        raise UserError(
            f"the area {west},{south},{east},{north} (lon/lat) does not overlap scene {scene.info.source}"
        )
    return range(first_row, last_row + 1), range(first_column, last_column + 1)


def _aoi_bounds(path: Path) -> tuple[float, float, float, float]:
    from bigearthnet_tf.jsonfiles import read_json_object

    document = read_json_object(path, "GeoJSON file", max_bytes=64 << 20)
    points: list[tuple[float, float]] = []

    def walk(value) -> None:
        if isinstance(value, list) and len(value) >= 2 and all(isinstance(v, int | float) for v in value[:2]):
            points.append((float(value[0]), float(value[1])))
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            if "coordinates" in value:
                walk(value["coordinates"])
            for key in ("geometry", "features", "geometries"):
                if key in value:
                    walk(value[key])

    walk(document)
    if not points:
        raise UserError(f"--aoi {path}: no coordinates (a GeoJSON geometry, feature or feature collection)")
    xs, ys = zip(*points, strict=True)
    return min(xs), min(ys), max(xs), max(ys)


# --- reading and inference -------------------------------------------------------------------------------


@dataclass
class _Grid:
    """What the pass over the scene produced, on the mapped window grid."""

    probabilities: np.ndarray  # (rows, columns, classes) float32, NaN where not predicted
    rgb: np.ndarray  # (rows, columns, 3): the windows' mean B04, B03, B02 (NaN without data)
    reference: np.ndarray | None  # (rows, columns, classes) 0/1, -1 where there is no reference
    unmapped_codes: dict[int, int]  # reference codes outside the nomenclature -> windows holding them
    nodata_windows: int
    seconds: dict[str, float]


def _run(scene, s1, predictor, options, rows, columns, reference, console, thresholds) -> _Grid:
    stride = options.stride
    keys = predictor.band_order
    s2_keys = [key for key in keys if key != S1_INPUT]
    s2_bands = sorted({band for key in s2_keys for band in keys[key]})
    rgb_bands = [band for band in ("B04", "B03", "B02") if band in scene.bands]
    read_bands = sorted(set(s2_bands) | set(rgb_bands) | ({"B02"} & set(scene.bands)))
    classes = len(predictor.class_names)
    shape = (len(rows), len(columns))
    probabilities = np.full((*shape, classes), np.nan, np.float32)
    rgb = np.full((*shape, 3), np.nan, np.float32)
    truth = np.full((*shape, classes), -1, np.int8) if reference is not None else None
    unmapped: dict[int, int] = {}
    pixel_columns = (columns.start * stride, (columns.stop - 1) * stride + PATCH_SIZE)
    seconds = {"read": 0.0, "assemble": 0.0, "model": 0.0}
    apply = logits_function(predictor.model)
    nodata_windows = 0

    def read(row: int):
        started = time.perf_counter()
        top = row * stride
        strip = scene.read_strip(read_bands, top, pixel_columns)
        s1_strip = s1.read_strip(top, pixel_columns) if s1 is not None else None
        codes = reference.read_strip(top, pixel_columns) if reference is not None else None
        return strip, s1_strip, codes, time.perf_counter() - started

    progress = progress_bar(console, "windows", disable=console.quiet)
    task = progress.add_task(f"mapping {scene.name}", total=len(rows) * len(columns))
    with ThreadPoolExecutor(1) as reader, progress:
        pending = reader.submit(read, rows[0])
        for index in range(len(rows)):
            strip, s1_strip, codes, read_seconds = pending.result()
            if index + 1 < len(rows):
                pending = reader.submit(read, rows[index + 1])  # the next strip is read during inference
            seconds["read"] += read_seconds
            assembling, model_before = time.perf_counter(), seconds["model"]
            inputs, missing = _window_inputs(strip, s1_strip, keys, len(columns), stride)
            valid = missing <= options.max_nodata
            nodata_windows += int((~valid).sum())
            selected = np.flatnonzero(valid)
            for start in range(0, len(selected), options.batch_size):
                chosen = selected[start : start + options.batch_size]
                batch = {key: value[chosen] for key, value in inputs.items()}
                started = time.perf_counter()
                logits = apply(batch).numpy()
                seconds["model"] += time.perf_counter() - started
                probabilities[index, chosen] = sigmoid(logits)
            for channel, band in enumerate(rgb_bands):
                means = _window_view(strip[band], 1, len(columns), stride).mean(axis=(1, 2))
                rgb[index, valid, channel] = means[valid]
            if truth is not None:
                labels, found = reference.labels(codes, len(columns), stride, predictor.class_names)
                truth[index] = labels
                for code, count in found.items():
                    unmapped[code] = unmapped.get(code, 0) + count
            seconds["assemble"] += time.perf_counter() - assembling - (seconds["model"] - model_before)
            progress.advance(task, len(columns))
    return _Grid(probabilities, rgb, truth, unmapped, nodata_windows, seconds)


def _window_view(values: np.ndarray, factor: int, count: int, stride: int) -> np.ndarray:
    """The `count` windows of a strip at a band's native grid (`factor` 10 m pixels per pixel)."""
    side, step = PATCH_SIZE // factor, stride // factor
    windows = np.lib.stride_tricks.sliding_window_view(values, side, axis=1)[:, ::step][:, :count]
    return np.moveaxis(windows, 0, 1)  # (count, side, side)


def _window_inputs(strip, s1_strip, band_order, count: int, stride: int):
    """The model's inputs for the windows of one strip, and each window's nodata fraction."""
    from bigearthnet_tf.constants import BANDS_BY_NAME

    inputs = {}
    for key, bands in band_order.items():
        stacked = []
        for band in bands:
            if key == S1_INPUT:
                stacked.append(_window_view(s1_strip[band], 1, count, stride))
            else:
                factor = BANDS_BY_NAME[band].resolution_m // PIXEL_M
                stacked.append(_window_view(strip[band], factor, count, stride))
        inputs[key] = np.ascontiguousarray(np.stack(stacked, axis=-1), dtype=np.float32)
    nodata = np.zeros((count, PATCH_SIZE, PATCH_SIZE), bool)
    s2_keys = [key for key in band_order if key != S1_INPUT]
    if s2_keys:  # DN 0 in every 10 m band read is outside the swath
        ten = [band for band in ("B02", "B03", "B04", "B08") if band in strip]
        nodata |= np.logical_and.reduce([_window_view(strip[band], 1, count, stride) == 0 for band in ten])
    if S1_INPUT in band_order:
        nodata |= np.logical_or.reduce(
            [~np.isfinite(_window_view(s1_strip[b], 1, count, stride)) for b in s1_strip]
        )
        inputs[S1_INPUT] = np.nan_to_num(inputs[S1_INPUT], nan=0.0)
    return inputs, nodata.mean(axis=(1, 2))


# --- the reference map --------------------------------------------------------------------------------------


class _Reference:
    """A CORINE Land Cover raster (level-3 codes 111-523), read strip by strip on the scene's grid
    (nearest neighbour), giving each window the classes present in it as BigEarthNet made its labels."""

    def __init__(self, path, scene: Scene) -> None:
        import rasterio
        from rasterio.vrt import WarpedVRT
        from rasterio.warp import transform_bounds

        self.path = str(path)
        try:
            dataset = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as error:
            raise UserError(f"--reference {path}: cannot be read as a raster ({error})") from None
        if dataset.crs is None:
            raise UserError(f"--reference {path}: no coordinate reference system")
        left, top = scene.transform @ (0, 0)
        right, bottom = scene.transform @ (scene.width, scene.height)
        bounds = transform_bounds(dataset.crs, scene.crs, *dataset.bounds)
        if bounds[0] >= right or bounds[2] <= left or bounds[1] >= top or bounds[3] <= bottom:
            raise UserError(f"--reference {path}: does not overlap the scene {scene.info.source}")
        self._dataset = dataset
        self._view = WarpedVRT(
            dataset,
            crs=scene.crs,
            transform=scene.transform,
            width=scene.width,
            height=scene.height,
            resampling=rasterio.enums.Resampling.nearest,
            nodata=0,
        )

    def read_strip(self, row: int, columns: tuple[int, int]) -> np.ndarray:
        from rasterio.windows import Window

        window = Window(columns[0], row, columns[1] - columns[0], PATCH_SIZE)
        return self._view.read(1, window=window).astype(np.int64)

    def labels(
        self, codes: np.ndarray, count: int, stride: int, class_names
    ) -> tuple[np.ndarray, dict[int, int]]:
        """Per window: the multi-hot labels in `class_names` order (-1 for a window without any
        reference code), and the codes outside the nomenclature with the number of windows they are in."""
        windows = _window_view(codes, 1, count, stride)
        nineteen = len(class_names) != len(ORIGINAL_LABELS)
        out = np.full((count, len(class_names)), -1, np.int8)
        unmapped: dict[int, int] = {}
        index = {name: i for i, name in enumerate(class_names)}
        for window_index in range(count):
            present = [int(code) for code in np.unique(windows[window_index]) if code != 0]
            names = [CLC_CODES[code] for code in present if code in CLC_CODES]
            for code in present:
                if code not in CLC_CODES:
                    unmapped[code] = unmapped.get(code, 0) + 1
            if not names:
                continue
            if nineteen:
                names = list(original_to_19(names))
            out[window_index] = 0
            for name in names:
                out[window_index, index[name]] = 1
        return out, unmapped

    def close(self) -> None:
        self._view.close()
        self._dataset.close()


# --- outputs ------------------------------------------------------------------------------------------


def output_transform(scene: Scene, stride: int, rows: range, columns: range):
    """The output grid: pixel (i, j) is window (rows[i], columns[j]), its centre the window's centre."""
    from affine import Affine

    half = (PATCH_SIZE - stride) / 2  # the window's centre is half a window in; the pixel's, half a stride
    return (
        scene.transform
        @ Affine.translation(columns.start * stride + half, rows.start * stride + half)
        @ Affine.scale(stride)
    )


def _write_outputs(
    folder: Path, scene, predictor, options, rows, columns, grid: _Grid, thresholds, described
):
    class_names = predictor.class_names
    transform = output_transform(scene, options.stride, rows, columns)
    valid = np.isfinite(grid.probabilities[..., 0])
    height, width, classes = grid.probabilities.shape
    profile = {"crs": scene.crs, "transform": transform, "width": width, "height": height}
    bands = np.moveaxis(grid.probabilities, -1, 0)
    if options.dtype == "uint8":
        scaled = np.where(valid, np.rint(np.nan_to_num(bands) * 254), UINT8_NODATA).astype(np.uint8)
        _write_cog(folder / PROBABILITIES_FILE, scaled, profile, UINT8_NODATA, class_names)
    else:
        _write_cog(folder / PROBABILITIES_FILE, bands.astype(np.float32), profile, float("nan"), class_names)
    predicted = np.nan_to_num(grid.probabilities, nan=-1.0) >= np.asarray(thresholds, np.float32)
    dtype = np.uint32 if classes <= 32 else np.uint64
    weights = (np.ones(1, dtype) << np.arange(classes, dtype=dtype)).astype(dtype)
    mask = np.where(valid, (predicted.astype(dtype) * weights).sum(axis=-1, dtype=dtype), np.iinfo(dtype).max)
    _write_cog(
        folder / LABELS_FILE, mask[None].astype(dtype), profile, int(np.iinfo(dtype).max), ["labels bit mask"]
    )
    _write_quicklook(folder / QUICKLOOK_FILE, scene, grid, class_names, valid)
    _write_windows(folder, scene, options, rows, columns, grid, class_names, predicted, valid, transform)
    result = MapResult(scene.name, folder, windows=height * width, predicted=int(valid.sum()))
    if grid.reference is not None:
        result.metrics = _evaluate(folder, grid, valid, class_names, thresholds, predictor, scene, described)
    return result


def _write_cog(path: Path, data: np.ndarray, profile: dict, nodata, descriptions) -> None:
    """A tiled, compressed, cloud-optimised GeoTIFF with overviews, from an in-memory array."""
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy

    count = data.shape[0]
    with MemoryFile() as memory:
        with memory.open(driver="GTiff", count=count, dtype=data.dtype, nodata=nodata, **profile) as dataset:
            dataset.write(data)
            for index, description in enumerate(descriptions, start=1):
                dataset.set_band_description(index, description)
        with memory.open() as dataset:
            predictor = 3 if data.dtype.kind == "f" else 2
            copy(
                dataset,
                str(path),
                driver="COG",
                COMPRESS="DEFLATE",
                PREDICTOR=predictor,
                BLOCKSIZE=256,
                OVERVIEWS="AUTO",
                RESAMPLING="NEAREST",
            )


def _write_windows(
    folder, scene, options, rows, columns, grid, class_names, predicted, valid, transform
) -> None:
    from rasterio.warp import transform as transform_points

    stride = options.stride
    row_index, column_index = np.nonzero(valid)
    xs, ys = [], []
    for i, j in zip(row_index, column_index, strict=True):
        x, y = scene.transform @ (columns[j] * stride + PATCH_SIZE / 2, rows[i] * stride + PATCH_SIZE / 2)
        xs.append(x)
        ys.append(y)
    lons, lats = transform_points(scene.crs, "EPSG:4326", xs, ys) if xs else ([], [])
    table = {
        "row": [rows[i] for i in row_index],
        "column": [columns[j] for j in column_index],
        "x": xs,
        "y": ys,
        "lon": list(lons),
        "lat": list(lats),
    }
    for index, name in enumerate(class_names):
        table[name] = [float(v) for v in grid.probabilities[row_index, column_index, index]]
    table["predicted"] = [
        ";".join(name for name, on in zip(class_names, predicted[i, j], strict=True) if on)
        for i, j in zip(row_index, column_index, strict=True)
    ]
    if options.windows_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.table(table), buffer)
        from bigearthnet_tf.files import replace_atomically

        replace_atomically(
            folder / f"{WINDOWS_FILE}.parquet", lambda path: Path(path).write_bytes(buffer.getvalue())
        )
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(list(table))
    for values in zip(*table.values(), strict=True):
        writer.writerow([f"{v:.8f}" if isinstance(v, float) else v for v in values])
    write_text_atomically(folder / f"{WINDOWS_FILE}.csv", text.getvalue())


def _write_quicklook(path: Path, scene, grid: _Grid, class_names, valid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rgb = grid.rgb
    finite = rgb[np.isfinite(rgb)]
    low, high = np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0)
    image = np.clip((np.nan_to_num(rgb) - low) / max(high - low, 1e-6), 0, 1)
    image[~valid] = 1.0
    top = np.where(valid, np.nanargmax(np.nan_to_num(grid.probabilities, nan=-1), axis=-1), -1)
    colours = plt.get_cmap("tab20" if len(class_names) <= 20 else "gist_ncar", len(class_names))
    palette = ListedColormap([colours(i) for i in range(len(class_names))])
    figure, axes = plt.subplots(1, 2, figsize=(14, 7.5), constrained_layout=True)
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("true colour (B04, B03, B02), window means")
    shown = np.ma.masked_less(top, 0)
    axes[1].imshow(shown, cmap=palette, vmin=-0.5, vmax=len(class_names) - 0.5, interpolation="nearest")
    axes[1].set_title("most probable class")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    present = sorted({int(v) for v in np.unique(top) if v >= 0})
    handles = [Patch(color=colours(i), label=class_names[i]) for i in present]
    if handles:
        figure.legend(
            handles=handles,
            loc="lower center",
            ncol=2,
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, -0.02 - 0.025 * ((len(handles) + 1) // 2)),
        )
    figure.suptitle(f"{scene.name}: {int(valid.sum()):,} windows mapped")
    try:
        save_figure_atomically(figure, path)
    finally:
        plt.close(figure)


def _evaluate(
    folder, grid: _Grid, valid, class_names, thresholds, predictor, scene, described
) -> dict[str, float]:
    with_reference = valid & (grid.reference[..., 0] >= 0)
    if not with_reference.any():
        raise UserError(
            "--reference: no mapped window has reference labels (the raster holds no CORINE code there)"
        )
    labels = grid.reference[with_reference].astype(np.float32)
    probabilities = grid.probabilities[with_reference]
    values = np.asarray(thresholds, np.float64)
    threshold = float(values[0]) if np.all(values == values[0]) else values  # as evaluate reports it
    metrics = compute_metrics(labels, probabilities, threshold=threshold, class_names=class_names)
    write_eval_result(metrics, folder / EVAL_RESULT_FILE)
    save_per_class_chart(
        metrics,
        class_names,
        folder / CHART_FILE,
        title=f"{predictor.meta.model_name} on {scene.name}",
        context=f"{predictor.source} against the reference map ({int(with_reference.sum()):,} windows); "
        f"thresholds: {described}",
    )
    return metrics


def _write_map_json(
    folder, scene, predictor, options, rows, columns, grid, thresholds, described, result
) -> None:
    info = scene.info
    valid = np.isfinite(grid.probabilities[..., 0])
    document = {
        "created_by": f"bigearthnet-tf {__version__}",
        "model": {
            "source": str(predictor.source),
            "model_name": predictor.meta.model_name,
            "label_type": str(predictor.meta.label_type),
            "modality": str(predictor.meta.modality),
            "class_names": list(predictor.class_names),
            "band_order": {key: list(bands) for key, bands in predictor.band_order.items()},
        },
        "scene": {
            "name": scene.name,
            "kind": info.kind,
            "source": info.source,
            "product_id": info.product_id,
            "date": info.date,
            "tile": info.tile,
            "processing_baseline": info.processing_baseline,
            "processing_level": info.processing_level,
            "crs": scene.crs.to_string(),
            "width": scene.width,
            "height": scene.height,
            "bands": sorted(scene.bands),
        },
        "offsets_applied": {"boa_add_offset": dict(info.boa_offsets), "source": info.offset_source},
        "sentinel1": {"files": list(options.s1), "linear_converted": options.s1_linear}
        if options.s1
        else None,
        "stride": options.stride,
        "window": PATCH_SIZE,
        "pixel_size_m": options.stride * PIXEL_M,
        "window_rows": [rows.start, rows.stop],
        "window_columns": [columns.start, columns.stop],
        "area": {"bbox": options.bbox, "aoi": str(options.aoi) if options.aoi else None},
        "max_nodata": options.max_nodata,
        "thresholds": {
            "description": described,
            "values": dict(zip(predictor.class_names, map(float, thresholds), strict=True)),
        },
        "probabilities_dtype": options.dtype,
        "counts": {
            "windows": int(valid.size),
            "predicted": int(valid.sum()),
            "nodata": int(grid.nodata_windows),
        },
        "seconds": {key: round(value, 3) for key, value in result.seconds.items()},
    }
    if grid.reference is not None:
        with_reference = valid & (grid.reference[..., 0] >= 0)
        document["reference"] = {
            "file": str(options.reference),
            "windows_with_reference": int(with_reference.sum()),
            "windows_without_reference": int((valid & ~with_reference).sum()),
            "unmapped_codes": {str(code): count for code, count in sorted(grid.unmapped_codes.items())},
        }
    write_text_atomically(folder / MAP_FILE, json.dumps(document, indent=2) + "\n")


def _print_summary(console, result: MapResult, target: Path) -> None:
    seconds = result.seconds
    rate = result.windows / seconds["total"] if seconds.get("total") else 0.0
    console.print(
        f"{result.scene}: {result.predicted:,} of {result.windows:,} windows mapped ({rate:,.1f} windows/s; "
        f"reading {seconds.get('read', 0):.1f} s, in the model {seconds.get('model', 0):.1f} s, "
        f"total {seconds.get('total', 0):.1f} s)\n  written: {target}",
        markup=False,
        soft_wrap=True,
    )
