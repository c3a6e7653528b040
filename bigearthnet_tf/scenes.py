"""Sentinel-2 scenes (and a Sentinel-1 pair) read on the scene's 10 m grid, strip by strip, each band at
its native resolution, exactly as `prepare` and `predict` read a patch.

A scene is one of:
- a Sentinel-2 product as downloaded: the `.SAFE` folder or its `.zip` (bands from the JP2 files in
  `GRANULE/*/IMG_DATA/R10m|R20m|R60m`, each from the folder of its native resolution; product id,
  date, tile, processing baseline and `BOA_ADD_OFFSET` from `MTD_MSIL2A.xml`);
- a folder of single-band rasters (GeoTIFF, COG, JP2) whose names carry the band (`..._B8A.tif`);
- one multi-band GeoTIFF whose band order `bands` names (or whose band descriptions do).

The scene's grid is the grid of its 10 m bands. A band stored finer than its native resolution (a
20 m band in a 10 m file) is brought back to its native grid by block average, so a file made by
repeating native pixels gives exactly those pixels; one stored coarser is refused. `read_strip` gives
the bands for the rows of one row of windows, as float32 digital numbers plus the scene's offset
(`BOA_ADD_OFFSET`, clipped at 0: BigEarthNet's patches, made before baseline 04.00, hold no negative
values), so a model sees values on the scale it was trained on. DN 0 is nodata. Only the rows asked
for are read: memory does not grow with the scene.

Sentinel-1 (`S1Pair`) is backscatter in dB (or linear, converted), in any CRS: read directly where its
grid is the scene's, else reprojected (bilinear) onto the scene's 10 m grid; outside it is nodata.
"""

from __future__ import annotations

import os
import re
import stat
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigearthnet_tf.constants import BANDS_BY_NAME, PATCH_SIZE, S1_BAND_NAMES, S2_BAND_NAMES
from bigearthnet_tf.errors import UserError

PIXEL_M = 10  # metres per pixel of the scene grid
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")
MAX_METADATA_BYTES = 16 << 20  # MTD_MSIL2A.xml is a few hundred kB
# The band in a file name: B02 ... B12 and B8A, between separators (T32UQD_20220315T101021_B8A_20m.jp2).
_BAND_TOKEN = re.compile(r"(?:^|[_.\-])(B0[1-9]|B1[0-2]|B8A)(?=[_.\-]|$)", re.IGNORECASE)
# The band index in BOA_ADD_OFFSET's band_id: the order of the 13 bands of the product.
_PRODUCT_BAND_IDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)
_SAFE_RESOLUTIONS = {10: "R10m", 20: "R20m", 60: "R60m"}


def _rasterio():
    import rasterio  # GDAL's start-up is not paid by commands that never read a scene

    return rasterio


@dataclass(frozen=True)
class BandFile:
    """Where one band of a scene is: a GDAL path, the band index in it, and its grid."""

    band: str
    path: str  # a file, or /vsizip/<zip>/<member>
    index: int  # 1-based
    factor: int  # file pixels per native pixel along a side (1: stored at native resolution)
    row_offset: int  # the file row and column of the scene grid's origin (file pixels)
    col_offset: int
    width: int  # of the file, in its pixels
    height: int


@dataclass(frozen=True)
class SceneInfo:
    """What a scene is, for `map.json`."""

    kind: str  # "safe", "folder" or "geotiff"
    source: str
    product_id: str | None = None
    date: str | None = None
    tile: str | None = None
    processing_baseline: str | None = None
    processing_level: str | None = None
    boa_offsets: Mapping[str, int] = field(default_factory=dict)  # band -> offset added to the DN
    offset_source: str = ""  # where the offsets come from


@dataclass(frozen=True)
class Scene:
    """A scene's grid (10 m), its bands and what it is. Open it with `open_scene`."""

    name: str
    crs: object  # rasterio CRS
    transform: object  # affine.Affine of the 10 m grid
    width: int  # 10 m pixels
    height: int
    bands: Mapping[str, BandFile]
    info: SceneInfo
    _datasets: dict = field(default_factory=dict, compare=False, repr=False)  # path -> open dataset

    def windows(self, stride: int) -> tuple[int, int]:
        """The number of window rows and columns of `stride` that fit in the scene."""
        return (self.height - PATCH_SIZE) // stride + 1, (self.width - PATCH_SIZE) // stride + 1

    def read_strip(self, bands: Sequence[str], row: int, columns: tuple[int, int]) -> dict[str, np.ndarray]:
        """Bands -> float32 array on each band's native grid for the 10 m rows [row, row + 120) and
        columns [columns[0], columns[1]) of the scene (offset applied; nodata, DN 0, stays 0)."""
        arrays = {}
        for band in bands:
            native = BANDS_BY_NAME[band].resolution_m // PIXEL_M  # 10 m pixels per native pixel
            source = self.bands[band]
            rows = PATCH_SIZE // native
            top, left = row // native, columns[0] // native
            width = (columns[1] - columns[0]) // native
            values = _read_block(self._dataset(source.path), source, top, left, rows, width)
            offset = self.info.boa_offsets.get(band, 0)
            if offset:
                valid = values > 0
                values = np.where(valid, np.maximum(values + np.float32(offset), 0), 0).astype(np.float32)
            arrays[band] = values
        return arrays

    def _dataset(self, path: str):
        """Each file opened once (JP2 and zip headers are parsed once); not for several threads."""
        if path not in self._datasets:
            self._datasets[path] = _rasterio().open(path)
        return self._datasets[path]

    def close(self) -> None:
        for dataset in self._datasets.values():
            dataset.close()
        self._datasets.clear()


def _read_block(dataset, source: BandFile, top: int, left: int, rows: int, width: int) -> np.ndarray:
    """Native pixels [top, top + rows) x [left, left + width) of a band, zero outside its file."""
    factor = source.factor
    file_top, file_left = source.row_offset + top * factor, source.col_offset + left * factor
    file_rows, file_cols = rows * factor, width * factor
    out = np.zeros((file_rows, file_cols), np.float32)
    r0, c0 = max(file_top, 0), max(file_left, 0)
    r1, c1 = min(file_top + file_rows, source.height), min(file_left + file_cols, source.width)
    if r1 > r0 and c1 > c0:
        rasterio = _rasterio()
        try:
            data = dataset.read(source.index, window=rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0))
        except rasterio.errors.RasterioError as error:
            raise UserError(
                f"{_shown(source.path)}: band {source.band} cannot be read at rows {r0}-{r1} "
                f"({_first_line(error)}); is the file damaged?"
            ) from None
        out[r0 - file_top : r1 - file_top, c0 - file_left : c1 - file_left] = data
    if factor > 1:  # back to the native grid: the mean of each factor x factor block
        out = out.reshape(rows, factor, width, factor).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
    return out


# --- opening -------------------------------------------------------------------------------------------


def open_scene(
    path: str | os.PathLike[str],
    *,
    bands: Sequence[str] | None = None,
    boa_offset: int | None = None,
    allow_l1c: bool = False,
) -> Scene:
    """The scene at `path` (a `.SAFE` folder or `.zip`, a folder of band files, a multi-band GeoTIFF);
    UserError naming the file and the problem for anything that cannot be read as one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"scene {path} does not exist")
    if path.is_dir() and (path.name.upper().endswith(".SAFE") or list(path.glob("MTD_MSI*.xml"))):
        return _open_safe(path, _SafeFolder(path), boa_offset, allow_l1c)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _open_safe(path, _SafeZip(path), boa_offset, allow_l1c)
    if bands is not None and path.is_dir():
        raise UserError(f"--bands names the bands of one multi-band file; {path} is a folder")
    if path.is_dir():
        return _open_band_folder(path, boa_offset)
    if path.is_file() and path.suffix.lower() in RASTER_SUFFIXES:
        return _open_multiband(path, bands, boa_offset)
    raise UserError(
        f"scene {path}: not a Sentinel-2 product (.SAFE folder or .zip), a folder of band files or a GeoTIFF"
    )


def _offsets_given(boa_offset: int | None, bands: Sequence[str]) -> tuple[dict[str, int], str]:
    if boa_offset is None or boa_offset == 0:
        return {}, "none: the scene has no product metadata (pass --boa-offset -1000 for baseline 04.00+)"
    return {band: int(boa_offset) for band in bands}, f"--boa-offset {boa_offset}"


def _open_band_folder(folder: Path, boa_offset: int | None) -> Scene:
    found: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() in RASTER_SUFFIXES and entry.is_file():
            tokens = {match.group(1).upper() for match in _BAND_TOKEN.finditer(entry.stem)}
            if len(tokens) == 1:
                found.setdefault(tokens.pop(), []).append(entry)
    if not found:
        raise UserError(
            f"scene {folder}: no band files (GeoTIFF, COG or JP2 files whose names carry the band, e.g. "
            "T32UQD_20220315T101021_B02_10m.jp2 or B02.tif)"
        )
    files = {}
    for band, paths in found.items():
        if len(paths) > 1:
            native = [p for p in paths if _resolution(str(p)) == BANDS_BY_NAME[band].resolution_m]
            if len(native) != 1:
                raise UserError(
                    f"scene {folder}: band {band} is in several files: {', '.join(p.name for p in paths)}"
                )
            paths = native
        files[band] = (str(paths[0]), 1)
    offsets, source = _offsets_given(boa_offset, list(files))
    info = SceneInfo("folder", str(folder), boa_offsets=offsets, offset_source=source)
    return _scene(folder.name, files, info)


def _open_multiband(path: Path, bands: Sequence[str] | None, boa_offset: int | None) -> Scene:
    try:
        with _rasterio().open(path) as dataset:
            count, descriptions = dataset.count, dataset.descriptions
    except _rasterio().errors.RasterioIOError as error:
        raise UserError(f"scene {path}: cannot be read as a raster ({_first_line(error)})") from None
    if bands is None:
        bands = [str(description or "").strip().upper() for description in descriptions]
        if not all(band in S2_BAND_NAMES for band in bands):
            raise UserError(
                f"scene {path}: its band descriptions do not name Sentinel-2 bands "
                f"({', '.join(map(str, descriptions))}); pass --bands B02,B03,... in its band order"
            )
    bands = [band.strip().upper() for band in bands]
    unknown = [band for band in bands if band not in S2_BAND_NAMES]
    if unknown:
        raise UserError(f"--bands: {', '.join(unknown)} not Sentinel-2 bands ({', '.join(S2_BAND_NAMES)})")
    if len(bands) != count:
        raise UserError(f"--bands names {len(bands)} bands but {path} holds {count}")
    if len(set(bands)) != len(bands):
        raise UserError(f"--bands names a band twice: {','.join(bands)}")
    files = {band: (str(path), index) for index, band in enumerate(bands, start=1)}
    offsets, source = _offsets_given(boa_offset, bands)
    info = SceneInfo("geotiff", str(path), boa_offsets=offsets, offset_source=source)
    return _scene(path.stem, files, info)


def _resolution(path: str) -> float:
    with _rasterio().open(path) as dataset:
        return abs(dataset.transform.a)


def _scene(name: str, files: Mapping[str, tuple[str, int]], info: SceneInfo) -> Scene:
    """Check that the band files share one CRS and a grid the 10 m bands define; build the scene."""
    rasterio = _rasterio()
    grids = {}
    for band, (path, index) in files.items():
        try:
            with rasterio.open(path) as dataset:
                grids[band] = (dataset.crs, dataset.transform, dataset.width, dataset.height, path, index)
        except rasterio.errors.RasterioIOError as error:
            raise UserError(f"{_shown(path)}: cannot be read as a raster ({_first_line(error)})") from None
    reference_band = next((band for band in ("B02", "B03", "B04", "B08") if band in grids), None)
    if reference_band is None:
        reference_band = min(grids, key=lambda band: abs(grids[band][1].a))
    crs, transform, width, height, reference_path, _ = grids[reference_band]
    if crs is None:
        raise UserError(
            f"{_shown(reference_path)}: no coordinate reference system; a scene must be georeferenced"
        )
    if transform.b or transform.d:
        raise UserError(f"{_shown(reference_path)}: a rotated grid; scenes must be north-up")
    scale = abs(transform.a) / PIXEL_M  # file pixel of the reference in 10 m pixels
    if abs(scale - round(scale)) > 1e-6 or round(scale) != 1:
        raise UserError(
            f"{_shown(reference_path)}: pixels of {abs(transform.a):g} m; the 10 m bands of a scene must be "
            "at 10 m"
        )
    grid = transform  # the scene's 10 m grid: that of its 10 m band files
    sources = {}
    for band, (band_crs, band_transform, band_width, band_height, path, index) in grids.items():
        native = BANDS_BY_NAME[band].resolution_m
        size = abs(band_transform.a)
        if band_crs != crs:
            raise UserError(
                f"{_shown(path)}: band {band} is in {band_crs} but the scene's {reference_band} in {crs}; "
                "the bands cannot be aligned"
            )
        factor = native / size
        if (
            abs(factor - round(factor)) > 1e-6
            or round(factor) < 1
            or abs(abs(band_transform.e) - size) > 1e-6
        ):
            raise UserError(
                f"{_shown(path)}: band {band} has pixels of {size:g} m; its native resolution is {native} m, "
                f"so the file must hold it at {native} m or at a resolution that divides it"
            )
        # The scene origin in this file's pixels must be a native pixel's corner.
        col = (grid.c - band_transform.c) / size
        row = (band_transform.f - grid.f) / size
        if (
            abs(col - round(col)) > 1e-6
            or abs(row - round(row)) > 1e-6
            or round(col) % round(factor)
            or round(row) % round(factor)
        ):
            raise UserError(
                f"{_shown(path)}: band {band}'s grid is offset from the scene's {reference_band} grid by "
                f"({row:g}, {col:g}) pixels; the bands cannot be aligned"
            )
        sources[band] = BandFile(
            band, path, index, round(factor), round(row), round(col), band_width, band_height
        )
    scene = Scene(name, crs, grid, width, height, sources, info)
    if scene.height < PATCH_SIZE or scene.width < PATCH_SIZE:
        raise UserError(
            f"scene {info.source}: {width} x {height} pixels, smaller than one {PATCH_SIZE} x {PATCH_SIZE} "
            "window"
        )
    return scene


# --- Sentinel-2 products (.SAFE folder or zip) ---------------------------------------------------------


class _SafeFolder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def names(self) -> list[str]:
        return [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        from bigearthnet_tf.files import read_input_file

        return bytes(read_input_file(self.path / name, MAX_METADATA_BYTES))

    def gdal_path(self, name: str) -> str:
        return str(self.path / name)


class _SafeZip:
    """A zipped product, read in place through GDAL's /vsizip/; member names checked first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError) as error:
            raise UserError(f"{path}: not a readable zip file ({error})") from None
        for info in infos:
            parts = info.filename.split("/")
            if info.filename.startswith("/") or ".." in parts or "\\" in info.filename:
                raise UserError(f"{path}: member {info.filename}: unsafe member name (absolute or with '..')")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UserError(f"{path}: member {info.filename}: a link; products hold files only")
        self._infos = {info.filename: info for info in infos if not info.is_dir()}

    def names(self) -> list[str]:
        return list(self._infos)

    def read(self, name: str) -> bytes:
        info = self._infos[name]
        if info.file_size > MAX_METADATA_BYTES:
            raise UserError(f"{self.path}: member {name}: {info.file_size:,} bytes, too large for metadata")
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(info)

    def gdal_path(self, name: str) -> str:
        return f"/vsizip/{self.path.resolve()}/{name}"


def _open_safe(path: Path, product, boa_offset: int | None, allow_l1c: bool) -> Scene:
    names = product.names()
    metadata = [n for n in names if re.fullmatch(r"(?:[^/]+/)?MTD_MSIL(1C|2A)\.xml", n)]
    if len(metadata) != 1:
        raise UserError(f"{path}: no product metadata (MTD_MSIL2A.xml) at the top of the product")
    level = "L2A" if metadata[0].endswith("MTD_MSIL2A.xml") else "L1C"
    root_prefix = metadata[0].rsplit("/", 1)[0] + "/" if "/" in metadata[0] else ""
    info = _product_metadata(path, metadata[0], product.read(metadata[0]), level, boa_offset)
    if level == "L1C" and not allow_l1c:
        raise UserError(
            f"{path}: a Level-1C product (top-of-atmosphere reflectance); BigEarthNet models were trained on "
            "Level-2A (bottom-of-atmosphere) patches. Use the L2A product, or pass --allow-l1c"
        )
    files = {}
    for band in S2_BAND_NAMES:
        native = BANDS_BY_NAME[band].resolution_m
        if level == "L2A":
            folder = _SAFE_RESOLUTIONS[native]
            pattern = rf"{re.escape(root_prefix)}GRANULE/[^/]+/IMG_DATA/{folder}/[^/]*_{band}_{native}m\.jp2"
        else:
            pattern = rf"{re.escape(root_prefix)}GRANULE/[^/]+/IMG_DATA/[^/]*_{band}\.jp2"
        matches = [n for n in names if re.fullmatch(pattern, n)]
        if len(matches) > 1:
            raise UserError(f"{path}: band {band} is in several files: {', '.join(matches)}")
        if matches:
            files[band] = (product.gdal_path(matches[0]), 1)
    if not files:
        raise UserError(f"{path}: no band files under GRANULE/*/IMG_DATA/R10m|R20m|R60m")
    return _scene(info.product_id, files, info)  # the product, whether zipped or not


def _product_metadata(path: Path, member: str, raw: bytes, level: str, boa_offset: int | None) -> SceneInfo:
    where = f"{path}/{member}" if path.is_dir() else f"{path}: {member}"
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError as error:
        raise UserError(f"{where}: not valid XML ({error})") from None

    def text(tag: str) -> str | None:
        found = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == tag), None)
        return found.text.strip() if found is not None and found.text else None

    product_id = text("PRODUCT_URI") or path.name
    for suffix in (".zip", ".SAFE", ".safe"):
        product_id = product_id.removesuffix(suffix)
    if not re.fullmatch(r"[\w.-]+", product_id):
        raise UserError(f"{where}: PRODUCT_URI {product_id!r} is not a product name")
    tile = re.search(r"_T(\d{2}[A-Z]{3})_", product_id)
    offsets: dict[str, int] = {}
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "BOA_ADD_OFFSET":
            try:
                band = _PRODUCT_BAND_IDS[int(element.get("band_id", ""))]
                offsets[band] = int(float(element.text or ""))
            except (ValueError, IndexError):
                raise UserError(
                    f"{where}: BOA_ADD_OFFSET {element.attrib} {element.text!r} is not a band's offset"
                ) from None
    source = (
        f"{member} (BOA_ADD_OFFSET)" if offsets else f"{member}: no BOA_ADD_OFFSET (baseline before 04.00)"
    )
    if boa_offset is not None:
        source += f"; --boa-offset {boa_offset} is ignored for a product with metadata"
    quantification = text("BOA_QUANTIFICATION_VALUE") or text("QUANTIFICATION_VALUE")
    if quantification is not None and float(quantification) != 10000:
        raise UserError(f"{where}: quantification value {quantification}; BigEarthNet's is 10000")
    return SceneInfo(
        "safe",
        str(path),
        product_id=product_id,
        date=text("PRODUCT_START_TIME") or text("DATATAKE_SENSING_START"),
        tile=tile.group(1) if tile else None,
        processing_baseline=text("PROCESSING_BASELINE"),
        processing_level=level,
        boa_offsets={band: value for band, value in offsets.items() if band in S2_BAND_NAMES and value},
        offset_source=source,
    )


# --- Sentinel-1 -----------------------------------------------------------------------------------------


@dataclass
class S1Pair:
    """VV and VH on a scene's 10 m grid: `read_strip` as for the scene's bands (NaN outside them)."""

    scene: Scene
    sources: Mapping[str, tuple[str, int]]  # VV/VH -> (path, band index)
    linear: bool
    _vrts: dict = field(default_factory=dict)

    def read_strip(self, row: int, columns: tuple[int, int]) -> dict[str, np.ndarray]:
        Window = _rasterio().windows.Window
        arrays = {}
        for band, (path, index) in self.sources.items():
            window = Window(columns[0], row, columns[1] - columns[0], PATCH_SIZE)
            dataset = self._dataset(path)
            values = dataset.read(index, window=window).astype(np.float32)
            if dataset.nodata is not None and not np.isnan(dataset.nodata):
                values[values == dataset.nodata] = np.nan
            if self.linear:
                with np.errstate(divide="ignore", invalid="ignore"):
                    values = np.where(values > 0, 10 * np.log10(values), np.nan).astype(np.float32)
            arrays[band] = values
        return arrays

    def _dataset(self, path: str):
        """The file itself where its grid is the scene's; else a warped view on the scene's grid."""
        rasterio = _rasterio()
        if path not in self._vrts:
            dataset = rasterio.open(path)
            aligned = (
                dataset.crs == self.scene.crs
                and dataset.transform.almost_equals(self.scene.transform)
                and (dataset.width, dataset.height) == (self.scene.width, self.scene.height)
            )
            if not aligned:
                from rasterio.vrt import WarpedVRT

                dataset = WarpedVRT(
                    dataset,
                    crs=self.scene.crs,
                    transform=self.scene.transform,
                    width=self.scene.width,
                    height=self.scene.height,
                    resampling=rasterio.enums.Resampling.bilinear,
                    src_nodata=dataset.nodata if dataset.nodata is not None else np.nan,
                    nodata=np.nan,
                    dtype="float32",
                )
            self._vrts[path] = dataset
        return self._vrts[path]

    def close(self) -> None:
        for dataset in self._vrts.values():
            dataset.close()
        self._vrts.clear()


def open_s1(paths: Sequence[str | os.PathLike[str]], scene: Scene, *, linear: bool = False) -> S1Pair:
    """VV and VH from two single-band files (VV first) or one two-band file; UserError naming the file
    when it cannot be read or does not overlap the scene."""
    rasterio = _rasterio()
    from rasterio.warp import transform_bounds

    paths = [str(path) for path in paths]
    if len(paths) == 1:
        sources = {"VV": (paths[0], 1), "VH": (paths[0], 2)}
    elif len(paths) == 2:
        sources = {"VV": (paths[0], 1), "VH": (paths[1], 1)}
    else:
        raise UserError(f"--s1 takes VV.tif VH.tif or one two-band file, got {len(paths)} files")
    left, top = scene.transform @ (0, 0)
    right, bottom = scene.transform @ (scene.width, scene.height)
    for path, index in sources.values():
        try:
            with rasterio.open(path) as dataset:
                if dataset.count < index:
                    raise UserError(f"--s1 {path}: {dataset.count} band(s); one file must hold VV and VH")
                if dataset.crs is None:
                    raise UserError(f"--s1 {path}: no coordinate reference system")
                bounds = transform_bounds(dataset.crs, scene.crs, *dataset.bounds)
        except rasterio.errors.RasterioIOError as error:
            raise UserError(f"--s1 {path}: cannot be read as a raster ({_first_line(error)})") from None
        if bounds[0] >= right or bounds[2] <= left or bounds[1] >= top or bounds[3] <= bottom:
            raise UserError(f"--s1 {path}: does not overlap the scene {scene.info.source}")
    assert tuple(sources) == S1_BAND_NAMES
    return S1Pair(scene, sources, linear)


def _shown(path: str) -> str:
    return path.removeprefix("/vsizip/")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
