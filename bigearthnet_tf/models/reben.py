"""The reBEN (BigEarthNet v2.0) pretrained models as registered models of ours.

reBEN publishes timm networks trained on BigEarthNet v2.0 (the Hugging Face organisation
`BIFOLD-BigEarthNetv2-0`, MIT licence); `reben_import` reads their files. This module builds the
matching Keras model: our raw-band inputs, reBEN's preprocessing as the first layers, then the timm
network of `models.timm_nets`. Facts from ConfigILM (`configilm/extra/BENv2_utils.py`,
`BENv2_DataModule.py`; v0.6.7 for the v0.1.1 weights, v0.7.0 for v0.2.0) and the reBEN training
scripts, gathered in BIGEARTHNET.md section 8:

- Channels: S1 (`s1`, 2), S2 (`s2`, 10: B01 and B09 unused) or both (`all`, 12), in an order that
  changed between weights versions (`REBEN_BAND_ORDERS`). Our modality S1 / S2 / MM is theirs
  s1 / s2 / all.
- Bands not at 120x120 are upsampled by nearest neighbour (pixel repetition), then each channel is
  standardised with reBEN's "120_nearest" statistics (`REBEN_STATISTICS`); S1 is used as stored (dB).
  Pixel repetition commutes with a per-channel affine map, so the order of the two is immaterial.
- Logit i of their head is class `sorted(19 class names)[i]`. The import reorders the head's rows,
  so these models output our (2019) class order like every model here.

Registered names: `reBEN-ResNet`, `reBEN-ConvNeXtV2`, `reBEN-ViT`, `reBEN-Mixer`, `reBEN-MobileViT`. Options that define
the network (recorded in checkpoints): `architecture` (a dict of the family's architecture; default
the published size: ResNet50, ConvNeXtV2-Base, ViT-B/8, Mixer-B/16) and `band_order` (the weights
version whose channel order the network expects, default `v0.2.0`). `dropout` (0.15) and
`drop_path_rate` (0.15) are reBEN's training values.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import keras

from bigearthnet_tf.constants import BANDS_10M, BANDS_20M, PATCH_SIZE, S1_BAND_NAMES
from bigearthnet_tf.errors import ConfigError
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.models import timm_nets
from bigearthnet_tf.models.modern import _check_rate
from bigearthnet_tf.models.preprocessing import (
    MM,
    S1,
    S2,
    BandStandardization,
    Statistics,
    raw_inputs,
    resolve_statistics,
    stacked_input_keys,
)
from bigearthnet_tf.models.registry import register_model

REBEN_VERSIONS: tuple[str, ...] = ("v0.1.1", "v0.2.0")
REBEN_MODALITY_TOKENS = MappingProxyType({"s1": S1, "s2": S2, "all": MM})

_S2_V011 = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B11", "B12", "B8A")
_S2_V020 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
# Channel order of the network input, per weights version and modality.
REBEN_BAND_ORDERS: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "v0.1.1": MappingProxyType({S1: ("VH", "VV"), S2: _S2_V011, MM: (*_S2_V011, "VH", "VV")}),
        "v0.2.0": MappingProxyType({S1: ("VV", "VH"), S2: _S2_V020, MM: ("VV", "VH", *_S2_V020)}),
    }
)

# ConfigILM's "120_nearest" statistics (mean, std) of BigEarthNet v2.0.
REBEN_STATISTICS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "B02": (438.3720703125, 607.02685546875),
        "B03": (614.0556640625, 603.2968139648438),
        "B04": (588.4096069335938, 684.56884765625),
        "B05": (942.8433227539062, 738.4326782226562),
        "B06": (1769.931640625, 1100.4560546875),
        "B07": (2049.551513671875, 1275.805419921875),
        "B08": (2193.2919921875, 1369.3717041015625),
        "B8A": (2235.556640625, 1356.5440673828125),
        "B11": (1568.226806640625, 1070.1612548828125),
        "B12": (997.7324829101562, 813.5276489257812),
        "VV": (-12.643863677978516, 5.133493900299072),
        "VH": (-19.352558135986328, 5.590505599975586),
    }
)

REBEN_DROPOUT = 0.15
REBEN_DROP_PATH = 0.15
NETWORK_LAYER = "network"  # the timm network inside the model: image (120, 120, C) -> logits

# Registered name -> timm family.
REBEN_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "reBEN-ResNet": "resnet",
        "reBEN-ConvNeXtV2": "convnextv2",
        "reBEN-ViT": "vit",
        "reBEN-Mixer": "mixer",
        "reBEN-MobileViT": "mobilevit",
    }
)


def check_band_order(band_order: str) -> str:
    """`band_order` if it names a reBEN weights version, else ConfigError."""
    if band_order not in REBEN_VERSIONS:
        raise ConfigError(f"unknown band_order {band_order!r}; expected one of {', '.join(REBEN_VERSIONS)}")
    return band_order


def reben_image(
    inputs: Mapping[str, keras.KerasTensor], modality: Modality, band_order: str, statistics: Statistics
) -> keras.KerasTensor:
    """reBEN's network input from our raw bands: nearest upsampling, reBEN channel order, standardised."""
    parts, names = [], []
    if modality in (S2, MM):
        upsampled = keras.layers.UpSampling2D(
            PATCH_SIZE // inputs["bands_20m"].shape[1], interpolation="nearest", name="upsample_bands_20m"
        )(inputs["bands_20m"])
        parts += [inputs["bands_10m"], upsampled]
        names += [*BANDS_10M, *BANDS_20M]
    if modality in (S1, MM):
        parts.append(inputs["bands_s1"])
        names += list(S1_BAND_NAMES)
    stacked = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="stack_bands")(parts)
    order = REBEN_BAND_ORDERS[band_order][modality]
    return BandStandardization(
        input_bands=names,
        output_bands=order,
        mean=[statistics[band][0] for band in order],
        std=[statistics[band][1] for band in order],
        name="standardize_reben",
    )(stacked)


def build_reben(
    num_classes: int,
    modality: Modality = MM,
    statistics: Statistics | None = None,
    *,
    family: str = "resnet",
    architecture: Mapping | None = None,
    band_order: str = "v0.2.0",
    dropout: float = REBEN_DROPOUT,
    drop_path_rate: float = REBEN_DROP_PATH,
    name: str = "reBEN-ResNet",
) -> keras.Model:
    """A reBEN model of `family` on our raw bands; outputs logits (batch, num_classes)."""
    check_band_order(band_order)
    dropout = _check_rate("dropout", dropout)
    drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
    try:
        arch = timm_nets.architecture_from_dict(family, architecture)
    except (TypeError, timm_nets.ArchitectureError) as error:
        raise ConfigError(f"model {name!r}: {error}") from None
    channels = len(REBEN_BAND_ORDERS[band_order][modality])
    image = keras.Input((PATCH_SIZE, PATCH_SIZE, channels), name="image")
    logits = timm_nets.NETWORKS[family](image, num_classes, arch, dropout, drop_path_rate)
    network = keras.Model(image, logits, name=NETWORK_LAYER)
    inputs = raw_inputs(stacked_input_keys(modality))  # B01 and B09 are in no reBEN model
    stats = resolve_statistics(statistics)
    return keras.Model(inputs, network(reben_image(inputs, modality, band_order, stats)), name=name)


for _name, _family in REBEN_MODELS.items():
    register_model(_name)(
        functools.partial(build_reben, family=_family, name=_name)
    )
