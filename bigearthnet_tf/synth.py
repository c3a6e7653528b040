"""Seeded synthetic BigEarthNet archives in the exact v1 or v2 layout, that a model can learn.

Each synthetic land-cover class has its own spectral signature over the 12 Sentinel-2 bands (and its
own VV/VH backscatter), shaped like the real material (vegetation bright in the near infrared, water
dark everywhere, sand bright everywhere...) and placed so that the archive's band means land near the
real ones. A patch is a Voronoi mosaic of 1-4 classes drawn at 10 m; the 20 m and 60 m bands are
area means of the 10 m scene; each class region covers at least 15% of the patch, and a patch's
labels are exactly the classes in it. Shading and noise keep it from being trivial, but classes stay
well apart so that a small CNN trained for a couple of minutes separates them.

Every patch draws from its own random stream (seed, patch index), so the same seed gives the same
bytes, and the first N patches do not change when more are asked for.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigearthnet_tf.archive import (
    V1_METADATA_SUFFIX,
    V1_S1_FOLDER,
    V1_S2_FOLDER,
    V2_METADATA,
    V2_S1_FOLDER,
    V2_S2_FOLDER,
    V2_SNOW_CLOUD_METADATA,
)
from bigearthnet_tf.constants import (
    BANDS_10M,
    BANDS_20M,
    BANDS_60M,
    BANDS_BY_NAME,
    ORIGINAL_LABELS,
    PATCH_SIZE,
    S2_BAND_NAMES,
    original_to_19,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.examples import example_archive
from bigearthnet_tf.tiff import encode_geotiff, utm_epsg

__all__ = ["SynthClass", "CLASSES", "write_synthetic_archive", "add_example_patches", "SPLIT_FRACTIONS"]


@dataclass(frozen=True)
class SynthClass:
    """A synthetic land-cover class: a 43-class label, its reflectances (x10,000) and S1 backscatter (dB)."""

    label: str
    weight: float  # relative frequency, roughly following the real archive
    reflectance: tuple[float, ...]  # the 12 bands in S2_BAND_NAMES order
    vv: float
    vh: float


# Bands:                 B01   B02   B03   B04   B05   B06   B07   B08   B8A   B09   B11   B12
CLASSES: tuple[SynthClass, ...] = (
    SynthClass("Discontinuous urban fabric", 5,
               (700, 850, 1000, 1100, 1350, 1650, 1850, 2000, 2100, 1950, 2300, 1900), -6.0, -13.0),
    SynthClass("Continuous urban fabric", 1,
               (900, 1050, 1200, 1300, 1450, 1500, 1550, 1600, 1650, 1550, 2300, 2200), -3.5, -11.5),
    SynthClass("Industrial or commercial units", 2,
               (1300, 1550, 1700, 1850, 2000, 2100, 2150, 2200, 2250, 2100, 3000, 2900), -4.5, -12.5),
    SynthClass("Non-irrigated arable land", 10,
               (380, 480, 760, 820, 1200, 2000, 2300, 2450, 2550, 2350, 2500, 1750), -11.0, -18.5),
    SynthClass("Fruit trees and berry plantations", 2,
               (250, 320, 600, 400, 980, 2450, 2950, 3100, 3200, 3000, 2450, 1450), -9.0, -16.0),
    SynthClass("Pastures", 8,
               (230, 280, 680, 330, 1000, 3000, 3900, 4200, 4300, 4100, 2200, 1000), -12.5, -19.5),
    SynthClass("Complex cultivation patterns", 6,
               (450, 560, 840, 900, 1300, 1850, 2050, 2150, 2250, 2100, 2050, 1300), -10.0, -17.0),
    SynthClass(
        "Land principally occupied by agriculture, with significant areas of natural vegetation", 6,
        (320, 400, 640, 620, 1050, 2300, 2850, 3050, 3150, 2950, 1600, 780), -10.5, -17.5),
    SynthClass("Broad-leaved forest", 7,
               (190, 230, 440, 230, 680, 2400, 3200, 3450, 3600, 3350, 1450, 600), -8.0, -13.5),
    SynthClass("Coniferous forest", 10,
               (140, 160, 280, 150, 400, 1150, 1400, 1500, 1580, 1450, 650, 280), -8.5, -14.5),
    SynthClass("Mixed forest", 8,
               (180, 210, 390, 210, 590, 1850, 2400, 2600, 2700, 2500, 1150, 520), -8.2, -14.0),
    SynthClass("Natural grassland", 2,
               (560, 700, 980, 1100, 1500, 1900, 2150, 2300, 2400, 2250, 3000, 2350), -13.0, -20.5),
    SynthClass("Moors and heathland", 1,
               (330, 380, 520, 560, 820, 1250, 1450, 1550, 1600, 1500, 1650, 1150), -14.0, -21.0),
    SynthClass("Transitional woodland/shrub", 7,
               (230, 270, 500, 360, 800, 1750, 2150, 2300, 2400, 2250, 2000, 1100), -9.5, -16.5),
    SynthClass("Beaches, dunes, sands", 1,
               (1700, 1900, 2200, 2500, 2800, 3000, 3100, 3200, 3300, 3150, 3900, 3400), -15.0, -24.0),
    SynthClass("Peatbogs", 3,
               (260, 300, 430, 420, 650, 1000, 1100, 1150, 1200, 1120, 1250, 750), -15.5, -22.0),
    SynthClass("Inland marshes", 1,
               (300, 380, 640, 500, 880, 1600, 1850, 1950, 2050, 1900, 1100, 600), -13.5, -20.0),
    SynthClass("Salt marshes", 1,
               (460, 580, 820, 760, 1000, 1250, 1350, 1400, 1450, 1350, 1000, 620), -16.5, -23.0),
    SynthClass("Water bodies", 6,
               (380, 420, 560, 420, 420, 330, 300, 260, 250, 220, 90, 60), -21.0, -27.0),
    SynthClass("Sea and ocean", 3,
               (300, 700, 620, 220, 150, 100, 90, 80, 75, 65, 25, 15), -23.0, -29.0),
    # Dropped by BigEarthNet-19: patches keep it in their 43-class labels only.
    SynthClass("Bare rock", 1,
               (1500, 1600, 1800, 2000, 2200, 2350, 2450, 2550, 2650, 2500, 3500, 3000), -10.0, -19.0),
)  # fmt: skip

SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))
V2_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}

_MIN_CLASS_FRACTION = 0.15  # every class present covers at least this share of the patch
_CLASS_COUNT_WEIGHTS = (0.3, 0.4, 0.2, 0.1)  # patches with 1, 2, 3, 4 classes
_SHADING = 0.04  # smooth multiplicative brightness variation within a patch
_CLASS_JITTER = 0.02  # per patch and class: brightness and per-band deviations from the signature
_NOISE = 0.02  # pixel noise, relative to the signal ...
_NOISE_FLOOR = 8.0  # ... plus a constant, in reflectance units
_S1_SPECKLE_DB = 1.0
_PATCHES_PER_ACQUISITION = 40
_SNOW_CLOUD_SHARE = 0.06  # v2: patches listed in the snow/cloud/shadow parquet
_DROPPED = frozenset(i for i, cls in enumerate(CLASSES) if not original_to_19([cls.label]))


@dataclass(frozen=True)
class _Tile:
    """A Sentinel-2 tile the synthetic patches are placed in."""

    tile: str
    zone: int
    orbit: str
    country: str
    ulx: int  # upper-left corner of the tile (UTM metres)
    uly: int
    utc_hour: int  # local overpass ~10:30; UTC hour 9 reproduces the archive's lost leading zero


_TILES: tuple[_Tile, ...] = (
    _Tile("33UUP", 33, "R022", "Austria", 399960, 5400000, 10),
    _Tile("35VPK", 35, "R036", "Finland", 600000, 7000020, 9),
    _Tile("29UPU", 29, "R080", "Ireland", 600000, 5900040, 11),
    _Tile("29SND", 29, "R037", "Portugal", 499980, 4400040, 11),
    _Tile("34TDQ", 34, "R079", "Serbia", 399960, 5000040, 9),
    _Tile("31UFS", 31, "R051", "Belgium", 600000, 5700000, 10),
    _Tile("32TMT", 32, "R065", "Switzerland", 399960, 5300040, 10),
    _Tile("34VFH", 34, "R036", "Lithuania", 600000, 6200040, 9),
    _Tile("34TEN", 34, "R036", "Kosovo", 499980, 4700040, 9),
    _Tile("31UGQ", 31, "R108", "Luxembourg", 699960, 5600040, 10),
)
_TILE_GRID = 90  # patches per tile side (1200 m patches in a ~109.8 km tile)
_FIRST_DAY = np.datetime64("2017-06-01")
_DAYS = 365
MAX_PATCHES = 100_000  # distinct (tile, date) acquisitions of 40 patches run out at 146,000


def write_synthetic_archive(
    out: str | os.PathLike, patches: int = 600, seed: int = 0, version: int = 1, with_s1: bool = False
) -> Path:
    """Write a synthetic archive under `out` and return `out`, the folder to pass as `prepare -r`.

    v1: `out/BigEarthNet-v1.0/<name>/` (12 GeoTIFFs + `<name>_labels_metadata.json`) and the split
    lists `out/train.csv`, `out/val.csv`, `out/test.csv` (60/20/20, CRLF); with `with_s1`,
    `out/BigEarthNet-S1-v1.0/<s1 name>/` (`_VV.tif`, `_VH.tif`, JSON). `prepare -r out -n out/*.csv`
    (and `--s1-root out`) reads it, since the readers accept the parent of the archive folders.
    v2: `out/BigEarthNet-S2/<product>/<patch_id>/`, `out/metadata.parquet`,
    `out/metadata_for_patches_with_snow_cloud_or_shadow.parquet` (about 6% of the patches, with a
    cloud or snow blob drawn in), and with `with_s1` `out/BigEarthNet-S1/<product>/<s1_name>/`.
    """
    if isinstance(patches, bool) or not isinstance(patches, int) or not 1 <= patches <= MAX_PATCHES:
        raise UserError(f"--patches must be a number of patches from 1 to {MAX_PATCHES:,}, got {patches!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")
    if version not in (1, 2):
        raise UserError(f"unknown archive version {version!r}; expected 1 or 2")
    out = Path(out)
    outputs = _output_names(version, with_s1)
    existing = [name for name in outputs if (out / name).exists()]
    if existing:
        raise UserError(f"{out / existing[0]} already exists; choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)

    specs = [_patch_spec(seed, index) for index in range(patches)]
    splits = _assign_splits(seed, patches)
    # Written into a hidden staging folder and moved into place at the end, so an interrupted
    # run leaves no half archive that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    try:
        if version == 1:
            _write_v1(staging, specs, splits, with_s1, seed)
        else:
            _write_v2(staging, specs, splits, with_s1, seed)
        for name in outputs:
            (staging / name).rename(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _output_names(version: int, with_s1: bool) -> list[str]:
    if version == 1:
        names = [V1_S2_FOLDER] + [f"{split}.csv" for split, _ in SPLIT_FRACTIONS]
        return names + ([V1_S1_FOLDER] if with_s1 else [])
    names = [V2_S2_FOLDER, V2_METADATA, V2_SNOW_CLOUD_METADATA]
    return names + ([V2_S1_FOLDER] if with_s1 else [])


# --------------------------------------------------------------------------------------------
# What a patch is: names, place, date, classes


@dataclass(frozen=True)
class _PatchSpec:
    index: int
    tile: _Tile
    satellite: str  # "S2A" / "S2B"
    date: str  # YYYYMMDD
    time: str  # HHMMSS (UTC)
    s1_satellite: str
    s1_date: str
    s1_time: str
    column: int
    row: int
    snow_cloud: str | None  # v2 only: None, "snow" or "cloud"

    @property
    def v1_name(self) -> str:
        # The real v1 names dropped the hour's leading zero (T93020 for 09:30:20): keep that quirk.
        return f"{self.satellite}_MSIL2A_{self.date}T{self.time.lstrip('0') or '0'}_{self.column}_{self.row}"

    @property
    def s2_product(self) -> str:
        return f"{self.satellite}_MSIL2A_{self.date}T{self.time}_N9999_{self.tile.orbit}_T{self.tile.tile}"

    @property
    def v2_name(self) -> str:
        return f"{self.s2_product}_{self.column}_{self.row}"

    @property
    def s1_product(self) -> str:
        return f"{self.s1_satellite}_IW_GRDH_1SDV_{self.s1_date}T{self.s1_time}"

    @property
    def s1_name(self) -> str:
        return f"{self.s1_product}_{self.tile.tile}_{self.column}_{self.row}"

    @property
    def ulx(self) -> int:
        return self.tile.ulx + 1200 * self.column

    @property
    def uly(self) -> int:
        return self.tile.uly - 1200 * self.row


@functools.lru_cache(maxsize=4)
def _acquisition_order(seed: int) -> np.ndarray:
    # A seeded order of all (tile, day) pairs: acquisition k takes the k-th, so no two acquisitions
    # share a tile and a date, and patch names (which hold the date, not the tile) never collide.
    order = np.random.default_rng([seed, 0]).permutation(len(_TILES) * _DAYS)
    # The first acquisition is over a tile imaged at 09:xx UTC, so even a small archive has names
    # with the lost leading zero of the hour.
    first = next(i for i, pair in enumerate(order) if _TILES[pair // _DAYS].utc_hour < 10)
    order[[0, first]] = order[[first, 0]]
    return order


def _patch_spec(seed: int, index: int) -> _PatchSpec:
    # Patches come in acquisitions of 40: the same tile, date and time, distinct grid cells.
    acquisition, slot = divmod(index, _PATCHES_PER_ACQUISITION)
    rng = np.random.default_rng([seed, 1, acquisition])
    tile_index, day_index = divmod(int(_acquisition_order(seed)[acquisition]), _DAYS)
    tile = _TILES[tile_index]
    day = _FIRST_DAY + np.timedelta64(day_index, "D")
    s1_day = day + np.timedelta64(int(rng.integers(-2, 3)), "D")
    # Minutes and seconds follow the acquisition number (37 and 53 are prime to 3600), so names stay
    # distinct even where two acquisitions share a date (S2, other tiles) or an S1 date (S1).
    minute, second = divmod((acquisition * 53 + 1237 + seed * 131) % 3600, 60)
    s1_hour = 4 if tile.zone >= 33 else 6  # S1 passes near dawn
    s1_minute, s1_second = divmod(acquisition * 37 % 3600, 60)
    s1_time = f"{s1_hour:02d}{s1_minute:02d}{s1_second:02d}"
    cells = rng.permutation(_TILE_GRID * _TILE_GRID)[:_PATCHES_PER_ACQUISITION]
    row, column = divmod(int(cells[slot]), _TILE_GRID)
    satellite = "S2A" if rng.random() < 0.5 else "S2B"
    s1_satellite = "S1A" if rng.random() < 0.7 else "S1B"
    patch_rng = np.random.default_rng([seed, 2, index])
    draw = patch_rng.random()
    snow_cloud = None if draw >= _SNOW_CLOUD_SHARE else ("snow" if draw < _SNOW_CLOUD_SHARE / 3 else "cloud")
    return _PatchSpec(
        index=index,
        tile=tile,
        satellite=satellite,
        date=str(day).replace("-", ""),
        time=f"{tile.utc_hour:02d}{minute:02d}{second:02d}",
        s1_satellite=s1_satellite,
        s1_date=str(s1_day).replace("-", ""),
        s1_time=s1_time,
        column=column,
        row=row,
        snow_cloud=snow_cloud,
    )


def _assign_splits(seed: int, patches: int) -> list[str]:
    order = np.random.default_rng([seed, 3]).permutation(patches)
    splits = [""] * patches
    start = 0
    for position, (split, fraction) in enumerate(SPLIT_FRACTIONS):
        stop = patches if position == len(SPLIT_FRACTIONS) - 1 else start + round(fraction * patches)
        for index in order[start:stop]:
            splits[int(index)] = split
        start = stop
    return splits


# --------------------------------------------------------------------------------------------
# Pixels

_WEIGHTS = np.array([cls.weight for cls in CLASSES], dtype=np.float64)
_SIGNATURES = np.array([cls.reflectance for cls in CLASSES], dtype=np.float32)  # (classes, 12)
_S1_SIGNATURES = np.array([(cls.vv, cls.vh) for cls in CLASSES], dtype=np.float32)  # (classes, 2)
_BAND_POSITION = {name: i for i, name in enumerate(S2_BAND_NAMES)}
_GROUPS = (
    (BANDS_10M, 1),  # band names, pixels of 10 m per pixel side
    (BANDS_20M, 2),
    (BANDS_60M, 6),
)
_ROWS, _COLUMNS = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE].astype(np.float32) + 0.5


def _smooth_field(rng: np.random.Generator, scale: float, nodes: int = 5) -> np.ndarray:
    """A smooth random 120x120 field: bilinear interpolation of a coarse grid of normal values."""
    coarse = rng.normal(0.0, scale, (nodes, nodes)).astype(np.float32)
    return _INTERPOLATION @ coarse @ _INTERPOLATION.T


def _interpolation_matrix(size: int, nodes: int) -> np.ndarray:
    positions = np.linspace(0, nodes - 1, size)
    lower = np.minimum(positions.astype(int), nodes - 2)
    fraction = positions - lower
    matrix = np.zeros((size, nodes), dtype=np.float32)
    matrix[np.arange(size), lower] = 1 - fraction
    matrix[np.arange(size), lower + 1] = fraction
    return matrix


_INTERPOLATION = _interpolation_matrix(PATCH_SIZE, 5)


def _class_map(rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """The class of each 10 m pixel (Voronoi mosaic) and the classes present, in class order."""
    count = int(rng.choice(len(_CLASS_COUNT_WEIGHTS), p=_CLASS_COUNT_WEIGHTS)) + 1
    while True:
        classes = [
            int(c) for c in rng.choice(len(CLASSES), size=count, replace=False, p=_WEIGHTS / _WEIGHTS.sum())
        ]
        if any(c not in _DROPPED for c in classes):
            break  # every patch keeps at least one BigEarthNet-19 label
    minimum = _MIN_CLASS_FRACTION * PATCH_SIZE * PATCH_SIZE
    for _ in range(20):
        seeds = rng.uniform(0, PATCH_SIZE, (count + int(rng.integers(0, count + 1)), 2)).astype(np.float32)
        owners = np.concatenate([np.arange(count), rng.integers(0, count, len(seeds) - count)])
        distances = (_ROWS[..., None] - seeds[:, 0]) ** 2 + (_COLUMNS[..., None] - seeds[:, 1]) ** 2
        region = owners[np.argmin(distances, axis=-1)]
        if np.bincount(region.ravel(), minlength=count).min() >= minimum:
            break
    else:  # seeds kept giving slivers: fall back to vertical stripes of equal width
        region = np.minimum((_COLUMNS.astype(int) * count) // PATCH_SIZE, count - 1)
    class_map = np.asarray(classes)[region]
    return class_map, sorted(classes)


def _render_s2(
    spec: _PatchSpec, seed: int, snow_cloud: bool
) -> tuple[dict[str, np.ndarray], np.ndarray, list[int]]:
    """S2 bands (uint16, native size), the 10 m class map and the classes present."""
    rng = np.random.default_rng([seed, 4, spec.index])
    class_map, present = _class_map(rng)
    # The scene is a mix of "materials" (the classes present, plus snow or cloud): per 10 m pixel a
    # weight for each, times a smooth shading. A band is then signatures @ weights, and the 20 m and
    # 60 m bands are the same product on block-averaged weights: an exact area mean of the 10 m
    # scene at a fraction of the cost of averaging all 12 bands.
    signatures = _SIGNATURES[present].copy()  # (materials, 12)
    # Each class in this patch deviates a little from its signature (brightness and per band).
    signatures *= (1 + rng.normal(0, _CLASS_JITTER, (len(present), 1))) * (
        1 + rng.normal(0, _CLASS_JITTER / 2, (len(present), 12))
    )
    shading = 1 + _smooth_field(rng, _SHADING)
    weights = (class_map == np.asarray(present)[:, None, None]) * shading  # (materials, 120, 120)
    if snow_cloud and spec.snow_cloud is not None:  # v2 only: v1 flags patches by official lists
        cover = _snow_or_cloud_cover(rng)
        weights = np.concatenate([weights * (1 - cover), cover[None]])
        signatures = np.concatenate([signatures, _SNOW if spec.snow_cloud == "snow" else _CLOUD])
    signatures = signatures.astype(np.float32)
    weights = weights.astype(np.float32)

    bands = {}
    for names, factor in _GROUPS:
        size = PATCH_SIZE // factor
        group_weights = weights
        if factor > 1:  # area mean over factor x factor blocks of 10 m pixels
            group_weights = weights.reshape(len(weights), size, factor, size, factor).mean(axis=(2, 4))
        positions = [_BAND_POSITION[name] for name in names]
        clean = signatures[:, positions].T @ group_weights.reshape(len(weights), -1)  # (bands, pixels)
        noise = rng.standard_normal(clean.shape, dtype=np.float32)
        pixels = np.clip(np.rint(clean + noise * (clean * _NOISE + _NOISE_FLOOR)), 1, 65535).astype(np.uint16)
        for k, name in enumerate(names):
            bands[name] = pixels[k].reshape(size, size)
    return {name: bands[name] for name in S2_BAND_NAMES}, class_map, present


def _render_s1(spec: _PatchSpec, seed: int, class_map: np.ndarray) -> dict[str, np.ndarray]:
    """VV and VH (float32 dB, 120x120): each class's backscatter plus speckle."""
    # Its own random stream, so the S2 bytes are the same with and without S1.
    rng = np.random.default_rng([seed, 5, spec.index])
    return {
        band: _S1_SIGNATURES[class_map, k]
        + rng.standard_normal((PATCH_SIZE, PATCH_SIZE), dtype=np.float32) * np.float32(_S1_SPECKLE_DB)
        for k, band in enumerate(("VV", "VH"))
    }


# Clouds are bright in every band; snow is bright in the visible and dark in the SWIR.
_CLOUD = np.full((1, 12), 6000, dtype=np.float32)
_SNOW = np.array([[7000, 7500, 7300, 7100, 6800, 6500, 6200, 6000, 5800, 5500, 700, 500]], np.float32)


def _snow_or_cloud_cover(rng: np.random.Generator) -> np.ndarray:
    """A soft round blob: 1 in its core, fading to 0 at 1.5 radii."""
    centre = rng.uniform(20, PATCH_SIZE - 20, 2)
    radius = rng.uniform(25, 50)
    distance = np.hypot(_ROWS - centre[0], _COLUMNS - centre[1])
    return np.clip(1.5 - distance / radius, 0, 1)


# --------------------------------------------------------------------------------------------
# Writing the layouts

# WKT of the real archive's JSON files ("projection"), for WGS 84 / UTM zone {zone}N.
_WKT = (
    'PROJCS["WGS 84 / UTM zone {zone}N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
    '298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,'
    'AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,AUTHORITY["EPSG","9122"]],'
    'AXIS["Latitude",NORTH],AXIS["Longitude",EAST],AUTHORITY["EPSG","4326"]],'
    'PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],'
    'PARAMETER["central_meridian",{meridian}],PARAMETER["scale_factor",0.9996],'
    'PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1,'
    'AUTHORITY["EPSG","9001"]],AXIS["Easting",EAST],AXIS["Northing",NORTH],AUTHORITY["EPSG","{epsg}"]]'
)


def _projection(zone: int) -> str:
    return _WKT.format(zone=zone, meridian=6 * zone - 183, epsg=utm_epsg(zone))


def _write_s2_bands(folder: Path, name: str, spec: _PatchSpec, bands: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True)
    epsg = utm_epsg(spec.tile.zone)
    for band, array in bands.items():
        resolution = BANDS_BY_NAME[band].resolution_m
        data = encode_geotiff(array, ulx=spec.ulx, uly=spec.uly, pixel_size=resolution, epsg=epsg)
        (folder / f"{name}_{band}.tif").write_bytes(data)


def _write_s1_bands(folder: Path, name: str, spec: _PatchSpec, s1_bands: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True)
    epsg = utm_epsg(spec.tile.zone)
    for band, array in s1_bands.items():
        data = encode_geotiff(array, ulx=spec.ulx, uly=spec.uly, pixel_size=10, epsg=epsg)
        (folder / f"{name}_{band}.tif").write_bytes(data)


def _labels_43(present: list[int]) -> list[str]:
    return [label for label in ORIGINAL_LABELS if label in {CLASSES[c].label for c in present}]


def _write_v1(root: Path, specs: list[_PatchSpec], splits: list[str], with_s1: bool, seed: int) -> None:
    s2_root = root / V1_S2_FOLDER
    s1_root = root / V1_S1_FOLDER
    s2_root.mkdir()
    if with_s1:
        s1_root.mkdir()
    names = []
    for spec in specs:
        bands, class_map, present = _render_s2(spec, seed, snow_cloud=False)
        name = spec.v1_name
        names.append(name)
        labels = _labels_43(present)
        _write_s2_bands(s2_root / name, name, spec, bands)
        coordinates = {"ulx": spec.ulx, "uly": spec.uly, "lrx": spec.ulx + 1200, "lry": spec.uly - 1200}
        hh, mm, ss = spec.time[:2], spec.time[2:4], spec.time[4:]
        metadata = {
            "labels": labels,
            "coordinates": coordinates,
            "projection": _projection(spec.tile.zone),
            "tile_source": _tile_source(spec),
            "acquisition_date": f"{spec.date[:4]}-{spec.date[4:6]}-{spec.date[6:]} {hh}:{mm}:{ss}",
        }
        (s2_root / name / f"{name}{V1_METADATA_SUFFIX}").write_text(json.dumps(metadata))
        if with_s1:
            s1_name = spec.s1_name
            _write_s1_bands(s1_root / s1_name, s1_name, spec, _render_s1(spec, seed, class_map))
            # The real S1 JSON files spell the lower-right y key "lly"; so do we.
            s1_coordinates = {
                "ulx": spec.ulx,
                "uly": spec.uly,
                "lrx": spec.ulx + 1200,
                "lly": spec.uly - 1200,
            }
            s1_metadata = {
                "labels": labels,
                "coordinates": s1_coordinates,
                "projection": _projection(spec.tile.zone),
                "corresponding_s2_patch": name,
                "scene_source": _scene_source(spec),
                "acquisition_time": f"{spec.s1_date[:4]}-{spec.s1_date[4:6]}-{spec.s1_date[6:]}T"
                f"{spec.s1_time[:2]}:{spec.s1_time[2:4]}:{spec.s1_time[4:]}",
            }
            (s1_root / s1_name / f"{s1_name}{V1_METADATA_SUFFIX}").write_text(json.dumps(s1_metadata))
    for split, _ in SPLIT_FRACTIONS:
        listed = [name for name, assigned in zip(names, splits, strict=True) if assigned == split]
        (root / f"{split}.csv").write_bytes("".join(f"{name}\r\n" for name in listed).encode("ascii"))


def _tile_source(spec: _PatchSpec) -> str:
    # The L1C product the patch was cut from; its name lost the hour's zero just as the patch's did.
    product_time = spec.time.lstrip("0") or "0"
    return (
        f"{spec.satellite}_MSIL1C_{spec.date}T{product_time}_N0205_{spec.tile.orbit}_T{spec.tile.tile}_"
        f"{spec.date}T{_later(spec.time, 337)}.SAFE"
    )


def _scene_source(spec: _PatchSpec) -> str:
    # <product>_<stop time>_<absolute orbit>_<mission data take>_<product id>, as in the real JSON.
    orbit = 17000 + spec.index % 900
    return (
        f"{spec.s1_product}_{spec.s1_date}T{_later(spec.s1_time, 25)}_{orbit:06d}_"
        f"{0x01C000 + spec.index % 4096:06X}_{(spec.index * 7919) % 65536:04X}"
    )


def _later(hhmmss: str, seconds: int) -> str:
    total = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:]) + seconds
    return f"{total // 3600 % 24:02d}{total // 60 % 60:02d}{total % 60:02d}"


def _write_v2(root: Path, specs: list[_PatchSpec], splits: list[str], with_s1: bool, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    s2_root = root / V2_S2_FOLDER
    s1_root = root / V2_S1_FOLDER
    s2_root.mkdir()
    if with_s1:
        s1_root.mkdir()
    rows: dict[bool, list[dict]] = {False: [], True: []}  # flagged with snow/cloud/shadow or not
    for spec, split in zip(specs, splits, strict=True):
        bands, class_map, present = _render_s2(spec, seed, snow_cloud=True)
        name = spec.v2_name
        _write_s2_bands(s2_root / spec.s2_product / name, name, spec, bands)
        if with_s1:
            s1_bands = _render_s1(spec, seed, class_map)
            _write_s1_bands(s1_root / spec.s1_product / spec.s1_name, spec.s1_name, spec, s1_bands)
        labels_19 = original_to_19([CLASSES[c].label for c in present])
        rows[spec.snow_cloud is not None].append(
            {
                "patch_id": name,
                "labels": list(labels_19),
                "split": V2_SPLIT_NAMES[split],
                "country": spec.tile.country,
                "s1_name": spec.s1_name,
                "s2v1_name": spec.v1_name,
                "contains_seasonal_snow": spec.snow_cloud == "snow",
                "contains_cloud_or_shadow": spec.snow_cloud == "cloud",
            }
        )
    schema = pa.schema(
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
    for flagged, file_name in ((False, V2_METADATA), (True, V2_SNOW_CLOUD_METADATA)):
        table = pa.Table.from_pylist(rows[flagged], schema=schema)
        pq.write_table(table, root / file_name)


def add_example_patches(
    archive_root: str | os.PathLike, csv_dir: str | os.PathLike | None = None, split: str = "train"
) -> list[str]:
    """Copy the six real example patches into a synthetic v1 archive and append them to `<split>.csv`.

    `archive_root` is what `write_synthetic_archive` returned (the folder holding `BigEarthNet-v1.0`);
    the S1 twins are copied too when the archive has `BigEarthNet-S1-v1.0`. The names go to
    `csv_dir/<split>.csv` (default: beside the archive folder). Returns the S2 names added.
    """

    root = Path(archive_root)
    s2_root = root / V1_S2_FOLDER
    if not s2_root.is_dir():
        raise UserError(
            f"{root} holds no {V1_S2_FOLDER} folder; pass the folder write_synthetic_archive returned"
        )
    csv_path = Path(csv_dir if csv_dir is not None else root) / f"{split}.csv"
    examples = example_archive()
    names = sorted(folder.name for folder in examples.s2.iterdir() if folder.is_dir())
    for name in names:
        if (s2_root / name).exists():
            raise UserError(f"{s2_root / name} already exists; the example patches were added before")
    for name in names:
        shutil.copytree(examples.s2 / name, s2_root / name)
    if (root / V1_S1_FOLDER).is_dir():
        for folder in sorted(examples.s1.iterdir()):
            if folder.is_dir():
                shutil.copytree(folder, root / V1_S1_FOLDER / folder.name)
    existing = csv_path.read_bytes() if csv_path.exists() else b""
    if existing and not existing.endswith(b"\n"):
        existing += b"\r\n"
    csv_path.write_bytes(existing + "".join(f"{name}\r\n" for name in names).encode("ascii"))
    return names
