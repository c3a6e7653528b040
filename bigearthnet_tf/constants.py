"""Domain constants of BigEarthNet: bands, their statistics, the two label nomenclatures.

Everything that decides how pixels and labels are interpreted lives here, in one place, so that
readers, writers, models and checkpoints agree. Orders matter: the 43 and 19 class orders are the
2019 index orders (never sort them), and band orders are stored with every prepared set and model.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from bigearthnet_tf.errors import UserError


@dataclass(frozen=True)
class Band:
    """One Sentinel-2 band as stored in the archive."""

    name: str
    resolution_m: int
    size: int  # pixels per side of a 1200 m patch at this resolution
    mean: float  # BigEarthNet v1 statistics on raw uint16 values
    std: float


S2_BANDS: tuple[Band, ...] = (
    Band("B01", 60, 20, 340.76769064, 554.81258967),
    Band("B02", 10, 120, 429.9430203, 572.41639287),
    Band("B03", 10, 120, 614.21682446, 582.87945694),
    Band("B04", 10, 120, 590.23569706, 675.88746967),
    Band("B05", 20, 60, 950.68368468, 729.89827633),
    Band("B06", 20, 60, 1792.46290469, 1096.01480586),
    Band("B07", 20, 60, 2075.46795189, 1273.45393088),
    Band("B08", 10, 120, 2218.94553375, 1365.45589904),
    Band("B8A", 20, 60, 2266.46036911, 1356.13789355),
    Band("B09", 60, 20, 2246.0605464, 1302.3292881),
    Band("B11", 20, 60, 1594.42694882, 1079.19066363),
    Band("B12", 20, 60, 1009.32729131, 818.86747235),
)
S2_BAND_NAMES: tuple[str, ...] = tuple(band.name for band in S2_BANDS)
BANDS_BY_NAME = MappingProxyType({band.name: band for band in S2_BANDS})

# Bands grouped by resolution, in the order the prepared records store them (channels last).
BANDS_10M: tuple[str, ...] = ("B02", "B03", "B04", "B08")
BANDS_20M: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")
BANDS_60M: tuple[str, ...] = ("B01", "B09")
GROUP_SIZES = MappingProxyType({"10m": 120, "20m": 60, "60m": 20})

# Input of the 2019 ResNet and VGG models: the 10 m bands in this order, then the 20 m bands
# bicubic-upsampled to 120x120. B01 and B09 are not used by them.
RGB_NIR_SWIR_BANDS: tuple[str, ...] = ("B04", "B03", "B02", "B08", *BANDS_20M)

PATCH_SIZE = 120  # pixels per side at 10 m

DEFAULT_THRESHOLD = 0.5  # 2019: a class is predicted when its sigmoid probability is >= 0.5

# Kernels that upsample the 20 m bands to 120x120 (a model option; see models.preprocessing).
TF1_BICUBIC = "tf1_bicubic"  # the 2019 graph's tf.image.resize_bicubic (TF1 legacy op)
TF2_BICUBIC = "tf2_bicubic"  # tf.image.resize(..., "bicubic"): half-pixel centres
UPSAMPLING_KERNELS: tuple[str, ...] = (TF1_BICUBIC, TF2_BICUBIC)


@dataclass(frozen=True)
class S1Band:
    """One Sentinel-1 polarisation (float32 backscatter in dB, 120x120)."""

    name: str
    mean: float
    std: float


S1_BANDS: tuple[S1Band, ...] = (
    S1Band("VV", -12.619993741972035, 5.115911777546365),
    S1Band("VH", -19.29044597721542, 5.464428464912864),
)
S1_BAND_NAMES: tuple[str, ...] = tuple(band.name for band in S1_BANDS)

# The 43 labels of BigEarthNet v1 in the 2019 index order, with their CORINE Land Cover codes.
ORIGINAL_LABELS_WITH_CODES: tuple[tuple[int, str], ...] = (
    (111, "Continuous urban fabric"),
    (112, "Discontinuous urban fabric"),
    (121, "Industrial or commercial units"),
    (122, "Road and rail networks and associated land"),
    (123, "Port areas"),
    (124, "Airports"),
    (131, "Mineral extraction sites"),
    (132, "Dump sites"),
    (133, "Construction sites"),
    (141, "Green urban areas"),
    (142, "Sport and leisure facilities"),
    (211, "Non-irrigated arable land"),
    (212, "Permanently irrigated land"),
    (213, "Rice fields"),
    (221, "Vineyards"),
    (222, "Fruit trees and berry plantations"),
    (223, "Olive groves"),
    (231, "Pastures"),
    (241, "Annual crops associated with permanent crops"),
    (242, "Complex cultivation patterns"),
    (243, "Land principally occupied by agriculture, with significant areas of natural vegetation"),
    (244, "Agro-forestry areas"),
    (311, "Broad-leaved forest"),
    (312, "Coniferous forest"),
    (313, "Mixed forest"),
    (321, "Natural grassland"),
    (322, "Moors and heathland"),
    (323, "Sclerophyllous vegetation"),
    (324, "Transitional woodland/shrub"),
    (331, "Beaches, dunes, sands"),
    (332, "Bare rock"),
    (333, "Sparsely vegetated areas"),
    (334, "Burnt areas"),
    (411, "Inland marshes"),
    (412, "Peatbogs"),
    (421, "Salt marshes"),
    (422, "Salines"),
    (423, "Intertidal flats"),
    (511, "Water courses"),
    (512, "Water bodies"),
    (521, "Coastal lagoons"),
    (522, "Estuaries"),
    (523, "Sea and ocean"),
)
ORIGINAL_LABELS: tuple[str, ...] = tuple(name for _, name in ORIGINAL_LABELS_WITH_CODES)

# BigEarthNet-19 in its index order, each with the 43-class indices merged into it.
BIGEARTHNET_19_SOURCES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("Urban fabric", (0, 1)),
    ("Industrial or commercial units", (2,)),
    ("Arable land", (11, 12, 13)),
    ("Permanent crops", (14, 15, 16, 18)),
    ("Pastures", (17,)),
    ("Complex cultivation patterns", (19,)),
    ("Land principally occupied by agriculture, with significant areas of natural vegetation", (20,)),
    ("Agro-forestry areas", (21,)),
    ("Broad-leaved forest", (22,)),
    ("Coniferous forest", (23,)),
    ("Mixed forest", (24,)),
    ("Natural grassland and sparsely vegetated areas", (25, 31)),
    ("Moors, heathland and sclerophyllous vegetation", (26, 27)),
    ("Transitional woodland, shrub", (28,)),
    ("Beaches, dunes, sands", (29,)),
    ("Inland wetlands", (33, 34)),
    ("Coastal wetlands", (35, 36)),
    ("Inland waters", (38, 39)),
    ("Marine waters", (40, 41, 42)),
)
BIGEARTHNET_19_LABELS: tuple[str, ...] = tuple(name for name, _ in BIGEARTHNET_19_SOURCES)

# 43-class index -> 19-class index; classes dropped by BigEarthNet-19 are absent.
ORIGINAL_TO_19 = MappingProxyType(
    {source: target for target, (_, sources) in enumerate(BIGEARTHNET_19_SOURCES) for source in sources}
)


class LabelType(enum.StrEnum):
    """A label nomenclature, named as in the 2019 configs and TFRecord keys (compares equal to its name)."""

    ORIGINAL = "original"
    BIGEARTHNET_19 = "BigEarthNet-19"

    def __repr__(self) -> str:  # messages quote the name users write, not the enum
        return repr(self.value)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in index order (the multi-hot order)."""
        return LABEL_TYPES[self]


ORIGINAL = LabelType.ORIGINAL
BIGEARTHNET_19 = LabelType.BIGEARTHNET_19
LABEL_TYPES = MappingProxyType({ORIGINAL: ORIGINAL_LABELS, BIGEARTHNET_19: BIGEARTHNET_19_LABELS})


def parse_label_type(value: object) -> LabelType:
    """`value` as a LabelType; a UserError naming it and the choices otherwise."""
    try:
        return LabelType(value)  # type: ignore[arg-type]  # any JSON value; ValueError if not a name
    except ValueError:
        expected = ", ".join(LabelType)
        raise UserError(f"unknown label_type {value!r}; expected one of {expected}") from None


def class_names(label_type: LabelType) -> tuple[str, ...]:
    """The class names of a label type, in index order (`parse_label_type` a string first)."""
    return LABEL_TYPES[label_type]


def original_to_19(original_names: Iterable[str]) -> tuple[str, ...]:
    """Map 43-class label names to the BigEarthNet-19 names they fall into, in 19-class order."""
    indices = {ORIGINAL_LABELS.index(name) for name in original_names}
    targets = sorted({ORIGINAL_TO_19[i] for i in indices if i in ORIGINAL_TO_19})
    return tuple(BIGEARTHNET_19_LABELS[i] for i in targets)


# Band name -> (mean, std) on raw values: BigEarthNet v1 S2 statistics and the 2021 S1 statistics.
DEFAULT_STATISTICS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {band.name: (band.mean, band.std) for bands in (S2_BANDS, S1_BANDS) for band in bands}
)
_STATISTICS_ORDER = tuple(DEFAULT_STATISTICS)


def checked_statistics(
    values: Mapping[str, object], where: str, error: type[UserError] = UserError
) -> dict[str, tuple[float, float]]:
    """`{band: (mean, std)}` from `values` (band -> a (mean, std) pair), in band order; `error` naming
    `where`, the band and the value unless each band is known and its mean finite, its std finite and > 0.

    The one rule for statistics, wherever they come from: a statistics file, a config, a checkpoint.
    """
    unknown = [band for band in values if band not in DEFAULT_STATISTICS]
    if unknown:
        raise error(f"{where}: unknown band {unknown[0]!r}; expected some of {', '.join(DEFAULT_STATISTICS)}")
    checked = {}
    for band in sorted(values, key=_STATISTICS_ORDER.index):
        value = values[band]
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
            raise error(f"{where}.{band} must be a (mean, std) pair, got {value!r}")
        mean = finite_number(value[0], f"{where}.{band}.mean", error)
        std = finite_number(value[1], f"{where}.{band}.std", error)
        if not math.isfinite(mean):
            raise error(f"{where}.{band}.mean must be finite, got {value[0]!r}")
        if not (math.isfinite(std) and std > 0):
            raise error(f"{where}.{band}.std must be finite and > 0, got {value[1]!r}")
        checked[band] = (mean, std)
    return checked


def finite_number(value: object, where: str, error: type[UserError] = UserError) -> float:
    """`value` as a float; `error` naming `where` unless it is a JSON number (not a boolean)."""
    # bool is an int in Python, but `true` is no mean.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{where} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        raise error(f"{where} must be a finite number, got an integer of {len(str(value))} digits") from None
