"""Sentinel foundation backbones (SSL4EO-S12, DeCUR, SoftCon; served by TorchGeo) as registered models of ours.

The self-supervised ResNets of SSL4EO-S12 (MoCo, DINO), DeCUR and SoftCon, and its ViT-S/16s (MoCo, DINO,
FG-MAE), were trained on 13 Sentinel-2 L1C
bands or on Sentinel-1 VV, VH; TorchGeo serves them as timm state dicts (`timm.create_model('resnet50',
in_chans=13)`), without a head. `torchgeo_import` reads those files; this module builds the model they
fill: our raw-band inputs, the weights' own input protocol as the first layers, the timm ResNet or ViT
of `models.timm_nets` (`SSL4EO-ResNet`, `SSL4EO-ViT`), and a new head of 19 or 43 classes.

Input protocols (`band_order`, recorded in checkpoints; facts and sources in docs/PRETRAINED.md):

- `ssl4eo-s2`: the 13 channels B01, B02, B03, B04, B05, B06, B07, B08, B8A, B09, B10, B11, B12.
  BigEarthNet has no B10 (the cirrus band is not in L2A); SSL4EO-S12's own BigEarthNet transfer script
  inserts a channel of zeros in its place, and so does the `InsertZeroChannel` layer here. Values are
  reflectance x 10000 divided by 10000 (TorchGeo's transform of these weights).
- `softcon-s2`: the same 13 channels, standardised with the per-band statistics of SSL4EO-S12's L1C
  data (TorchGeo's transform of the SoftCon weights); the missing B10 is a raw zero, so after
  standardisation it is the constant (0 - mean) / std of B10.
- `ssl4eo-s1` / `decur-s1`: VV, VH in dB, standardised with the statistics of SSL4EO-S12's S1 data
  (SSL4EO-S12's BigEarthNet dataset code) or of DeCUR's transfer script (TorchGeo's transform).

Every band is resampled from its native grid to `image_size` x `image_size` (default 224, the size these
networks were pretrained and evaluated at) by bilinear interpolation with half-pixel centres, as a
fixed matrix product (`LinearResize`; PyTorch's `F.interpolate(mode="bilinear", align_corners=False)`
and `tf.image.resize(..., "bilinear")` compute the same). Standardisation is per channel and affine, so
it commutes with the resampling.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import keras
from keras import ops

from bigearthnet_tf.constants import S1_BAND_NAMES
from bigearthnet_tf.errors import ConfigError
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.models import timm_nets
from bigearthnet_tf.models.modern import _check_rate
from bigearthnet_tf.models.preprocessing import (
    INPUTS,
    S1,
    S2,
    BandStandardization,
    LinearResize,
    Statistics,
    raw_inputs,
)
from bigearthnet_tf.models.registry import register_model

NETWORK_LAYER = "network"  # the timm network inside the model: image -> logits
DEFAULT_IMAGE_SIZE = 224
L1C_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
ZERO_BAND = "B10"


@dataclass(frozen=True)
class InputProtocol:
    """What a family of weights expects as input: channels in order, and (mean, std) per channel."""

    modality: Modality
    channels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str


PROTOCOLS: Mapping[str, InputProtocol] = MappingProxyType(
    {
        "ssl4eo-s2": InputProtocol(
            S2, L1C_BANDS, (0.0,) * 13, (10000.0,) * 13, "13 L1C bands (B10 zero), reflectance / 10000"
        ),
        "softcon-s2": InputProtocol(
            S2,
            L1C_BANDS,
            (1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7, 22.0, 2195.2, 1537.4),
            (791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5, 47.5, 1340.0, 1142.9),
            "13 L1C bands (B10 zero), SSL4EO-S12 L1C statistics",
        ),
        "ssl4eo-s1": InputProtocol(
            S1,
            S1_BAND_NAMES,
            (-12.54847273, -20.19237134),
            (5.25697717, 5.91150917),
            "VV, VH in dB, SSL4EO-S12 statistics",
        ),
        "decur-s1": InputProtocol(
            S1, S1_BAND_NAMES, (-12.59, -20.26), (5.26, 5.91), "VV, VH in dB, DeCUR statistics"
        ),
    }
)
SSL4EO_MODEL = "SSL4EO-ResNet"
# Registered name -> timm family of the network.
SSL4EO_MODELS: Mapping[str, str] = MappingProxyType({SSL4EO_MODEL: "resnet", "SSL4EO-ViT": "vit"})


def check_protocol(band_order: str) -> InputProtocol:
    if band_order not in PROTOCOLS:
        raise ConfigError(f"unknown band_order {band_order!r} for {SSL4EO_MODEL}; expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[band_order]


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class InsertZeroChannel(keras.layers.Layer):
    """A band the data lacks but the weights expect, inserted at `index` as a raw zero: after the
    protocol's scaling that is the constant `value`, (0 - mean) / std of the band."""

    def __init__(self, index: int, value: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = int(index)
        self.value = float(value)

    def call(self, images):
        constant = ops.zeros_like(images[..., :1]) + ops.cast(self.value, images.dtype)
        return ops.concatenate([images[..., : self.index], constant, images[..., self.index :]], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 1)

    def get_config(self) -> dict:
        return {**super().get_config(), "index": self.index, "value": self.value}


def input_keys_of(protocol: InputProtocol) -> tuple[str, ...]:
    return ("bands_10m", "bands_20m", "bands_60m") if protocol.modality == S2 else ("bands_s1",)


def protocol_image(
    inputs: Mapping[str, keras.KerasTensor], protocol: InputProtocol, image_size: int
) -> keras.KerasTensor:
    """The network input of `protocol` from our raw bands: resampled, ordered, scaled, B10 added."""
    parts, names = [], []
    for key in input_keys_of(protocol):
        parts.append(LinearResize(image_size, image_size, name=f"resize_{key}")(inputs[key]))
        names += INPUTS[key].bands
    stacked = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="stack_bands")(parts)
    present = [band for band in protocol.channels if band != ZERO_BAND]
    scaled = BandStandardization(
        input_bands=names,
        output_bands=present,
        mean=[m for band, m in zip(protocol.channels, protocol.mean, strict=True) if band != ZERO_BAND],
        std=[s for band, s in zip(protocol.channels, protocol.std, strict=True) if band != ZERO_BAND],
        name="scale_bands",
    )(stacked)
    if ZERO_BAND in protocol.channels:
        index = protocol.channels.index(ZERO_BAND)
        value = (0.0 - protocol.mean[index]) / protocol.std[index]
        scaled = InsertZeroChannel(index, value, name="zero_b10")(scaled)
    return scaled


def build_ssl4eo(
    num_classes: int,
    modality: Modality = S2,
    statistics: Statistics | None = None,
    *,
    architecture: Mapping | None = None,
    band_order: str = "ssl4eo-s2",
    image_size: int = DEFAULT_IMAGE_SIZE,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    family: str = "resnet",
    name: str = SSL4EO_MODEL,
) -> keras.Model:
    """A timm ResNet or ViT with the input protocol `band_order`, for imported Sentinel backbones.

    `statistics` are not used: the protocol's own scaling is part of what the weights mean.
    """
    protocol = check_protocol(band_order)
    if modality != protocol.modality:
        raise ConfigError(
            f"model {name!r} with band_order {band_order!r} reads modality {protocol.modality}, not {modality}"
        )
    if not isinstance(image_size, int) or not 32 <= image_size <= 1024:
        raise ConfigError(f"model {name!r}: image_size must be an integer from 32 to 1024, got {image_size!r}")
    dropout = _check_rate("dropout", dropout)
    drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
    try:
        arch = timm_nets.architecture_from_dict(family, architecture)
    except (TypeError, timm_nets.ArchitectureError) as error:
        raise ConfigError(f"model {name!r}: {error}") from None
    image = keras.Input((image_size, image_size, len(protocol.channels)), name="image")
    logits = timm_nets.NETWORKS[family](image, num_classes, arch, dropout, drop_path_rate)
    network = keras.Model(image, logits, name=NETWORK_LAYER)
    inputs = raw_inputs(input_keys_of(protocol))
    return keras.Model(inputs, network(protocol_image(inputs, protocol, image_size)), name=name)


for _name, _family in SSL4EO_MODELS.items():
    register_model(_name)(
        functools.partial(build_ssl4eo, family=_family, name=_name)
    )
