"""Scenes made of patches: a grid of BigEarthNet patch folders written as a Sentinel-2 scene in each
form `map` reads (a folder of band files, a multi-band GeoTIFF, a `.SAFE` product with JP2 bands and
a baseline-04.00 offset, its `.zip`), with the Sentinel-1 pair. Window (i, j) at stride 120 of such a
scene holds exactly the pixels of patch (i, j), which is what makes `map` checkable against `predict`.
Also used by the map benchmark to make full-size products.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bigearthnet_tf.archive import read_s1_bands, read_s2_bands
from bigearthnet_tf.constants import BANDS_BY_NAME, PATCH_SIZE, S1_BAND_NAMES, S2_BAND_NAMES

LAYOUTS = ("folder", "geotiff", "safe", "zip")
DEFAULT_CRS = "EPSG:32632"
DEFAULT_ORIGIN = (600000.0, 5300040.0)  # upper-left corner, metres (a 60 m pixel's corner)
DEFAULT_TILE = "32UQD"
_BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


def mosaic_bands(
    grid: Sequence[Sequence[str | os.PathLike[str] | None]], s1_folders=None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The 12 bands (uint16, native resolution) of patch folders laid out on `grid` (rows of folders,
    None for an empty cell: DN 0), and with `s1_folders` (the same shape) VV and VH (float32, NaN in
    empty cells)."""
    rows, columns = len(grid), len(grid[0])
    bands = {}
    for band in S2_BAND_NAMES:
        side = BANDS_BY_NAME[band].size
        bands[band] = np.zeros((rows * side, columns * side), np.uint16)
    s1 = None
    if s1_folders is not None:
        s1 = {
            band: np.full((rows * PATCH_SIZE, columns * PATCH_SIZE), np.nan, np.float32)
            for band in S1_BAND_NAMES
        }
    for i, row in enumerate(grid):
        for j, folder in enumerate(row):
            if folder is None:
                continue
            folder = Path(folder)
            patch = read_s2_bands(str(folder), folder.name)
            for band, values in patch.items():
                side = values.shape[0]
                bands[band][i * side : (i + 1) * side, j * side : (j + 1) * side] = values
            if s1 is not None and s1_folders[i][j] is not None:
                s1_folder = Path(s1_folders[i][j])
                for band, values in read_s1_bands(str(s1_folder), folder.name, s1_folder.name).items():
                    s1[band][i * PATCH_SIZE : (i + 1) * PATCH_SIZE, j * PATCH_SIZE : (j + 1) * PATCH_SIZE] = (
                        values
                    )
    return bands, s1


def write_scene(
    bands: dict[str, np.ndarray],
    out: str | os.PathLike[str],
    layout: str,
    *,
    offset: int = 0,
    crs: str = DEFAULT_CRS,
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    date: str = "20220315T101021",
    baseline: str = "04.00",
    level: str = "L2A",
) -> Path:
    """Write native-resolution bands (`mosaic_bands`) as a scene in `layout`; return its path.

    `offset` is the product's BOA_ADD_OFFSET (-1000 from baseline 04.00): the stored DN is the value
    minus it, so that (DN + offset) gives back the patches' values; DN 0 stays 0 (nodata).
    """
    import rasterio
    from affine import Affine

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    out = Path(out)
    stored = {
        band: np.where(values > 0, values.astype(np.int64) - offset, 0).astype(np.uint16)
        for band, values in bands.items()
    }

    def transform(resolution: int):
        return Affine(resolution, 0, origin[0], 0, -resolution, origin[1])

    def write(path: Path, arrays: list[np.ndarray], resolution: int, driver: str, names: list[str]) -> None:
        profile = {
            "driver": driver,
            "width": arrays[0].shape[1],
            "height": arrays[0].shape[0],
            "count": len(arrays),
            "dtype": arrays[0].dtype,
            "crs": crs,
            "transform": transform(resolution),
        }
        if driver == "GTiff":
            profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
        else:
            profile.update(QUALITY=100, REVERSIBLE="YES", YCBCR420="NO")
        with rasterio.open(path, "w", **profile) as dataset:
            for index, (array, name) in enumerate(zip(arrays, names, strict=True), start=1):
                dataset.write(array, index)
                dataset.set_band_description(index, name)

    if layout == "folder":
        out.mkdir(parents=True, exist_ok=True)
        for band, values in stored.items():
            write(
                out / f"T{DEFAULT_TILE}_{date}_{band}.tif",
                [values],
                BANDS_BY_NAME[band].resolution_m,
                "GTiff",
                [band],
            )
        return out
    if layout == "geotiff":
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays = []
        for band in S2_BAND_NAMES:  # every band at 10 m: native pixels repeated
            factor = BANDS_BY_NAME[band].resolution_m // 10
            arrays.append(np.repeat(np.repeat(stored[band], factor, axis=0), factor, axis=1))
        write(out, arrays, 10, "GTiff", list(S2_BAND_NAMES))
        return out
    name = f"S2A_MSI{level}_{date}_N{baseline.replace('.', '')}_R022_T{DEFAULT_TILE}_{date}"
    safe = (out.parent / f"{name}.SAFE") if layout == "zip" else out
    granule = safe / "GRANULE" / f"{level}_T{DEFAULT_TILE}_A000000_{date}" / "IMG_DATA"
    for band, values in stored.items():
        resolution = BANDS_BY_NAME[band].resolution_m
        folder = granule / f"R{resolution}m" if level == "L2A" else granule
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"_{resolution}m" if level == "L2A" else ""
        write(
            folder / f"T{DEFAULT_TILE}_{date}_{band}{suffix}.jp2", [values], resolution, "JP2OpenJPEG", [band]
        )
    for extra in granule.rglob("*.aux.xml"):
        extra.unlink()
    offsets = "".join(
        f'<BOA_ADD_OFFSET band_id="{index}">{offset}</BOA_ADD_OFFSET>' for index in range(len(_BAND_IDS))
    )
    metadata = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">'
        f"<n1:General_Info><Product_Info><PRODUCT_START_TIME>{date[:4]}-{date[4:6]}-{date[6:8]}T10:10:21.024Z"
        f"</PRODUCT_START_TIME><PRODUCT_URI>{name}.SAFE</PRODUCT_URI><PROCESSING_LEVEL>Level-{level[1:]}"
        f"</PROCESSING_LEVEL><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE></Product_Info>"
        "<Product_Image_Characteristics><QUANTIFICATION_VALUES_LIST>"
        f'<BOA_QUANTIFICATION_VALUE unit="none">10000'
        f"</BOA_QUANTIFICATION_VALUE></QUANTIFICATION_VALUES_LIST>"
        f"<BOA_ADD_OFFSET_VALUES_LIST>{offsets if offset else ''}</BOA_ADD_OFFSET_VALUES_LIST>"
        f"</Product_Image_Characteristics></n1:General_Info></n1:Level-2A_User_Product>\n"
    )
    (safe / f"MTD_MSI{level}.xml").write_text(metadata, encoding="utf-8")
    if layout == "safe":
        return safe
    zipped = out if out.suffix == ".zip" else out.with_suffix(".zip")
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(safe.rglob("*")):
            if path.is_file():
                archive.write(path, f"{safe.name}/{path.relative_to(safe)}")
    return zipped


def write_s1(
    s1: dict[str, np.ndarray],
    out: str | os.PathLike[str],
    *,
    crs: str = DEFAULT_CRS,
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    linear: bool = False,
) -> list[Path]:
    """VV and VH (dB, or linear power with `linear`) as two float32 GeoTIFFs on the scene's 10 m grid."""
    import rasterio
    from affine import Affine

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for band in S1_BAND_NAMES:
        values = s1[band]
        if linear:
            values = (10.0 ** (values.astype(np.float64) / 10)).astype(np.float32)
        path = out / f"{band}.tif"
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=values.shape[1],
            height=values.shape[0],
            count=1,
            dtype="float32",
            crs=crs,
            transform=Affine(10, 0, origin[0], 0, -10, origin[1]),
            nodata=float("nan"),
        ) as dataset:
            dataset.write(values, 1)
        paths.append(path)
    return paths
