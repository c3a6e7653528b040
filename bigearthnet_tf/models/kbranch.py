"""K-BranchCNN (Sumbul and Demir, IGARSS 2019): one small CNN per input resolution, fused late.

Faithful to the 2019 definition (BIGEARTHNET.md section 4 and the 2019 `K-BranchCNN.py`):

- 10 m branch (B04, B03, B02, B08 at 120x120): conv5x5x32, pool, conv5x5x32, pool, conv3x3x64,
  flatten, FC128.
- 20 m branch (B05, B06, B07, B8A, B11, B12 at 60x60): conv3x3x32, pool, conv3x3x32, conv3x3x64,
  flatten, FC128.
- 60 m branch (B01, B09 at 20x20): three conv2x2x32, flatten, FC128.
- Every conv and FC: bias, batch norm, ReLU. Convs use SAME padding (the 2019 `padding='same'`), max pools
  are 2x2/2 VALID; dropout 0.25 after each conv block, 0.5 after each branch FC.
- Fusion: concat -> FC128 (+BN+ReLU) -> dropout 0.25; classifier: dropout 0.5 -> dense logits.
- Batch norm: the 2019 code used `tf.layers.batch_normalization` defaults (momentum 0.99, epsilon 1e-3,
  centre and scale), which are also Keras' defaults; initialisers Glorot uniform (2019: Xavier).

Sentinel-1 (decision): VV, VH at 120x120 get their own branch with the 10 m architecture. S1 alone is that
single branch; MM is four branches (10 m, 20 m, 60 m, S1) fused from 4 x 128 features. A separate branch
keeps the S2 branches identical to the S2 model (its weights transfer) and respects K-Branch's idea of
one branch per input grid, rather than mixing dB backscatter with reflectance in the first filters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import keras

from bigearthnet_tf.constants import BANDS_20M, BANDS_60M, S1_BAND_NAMES
from bigearthnet_tf.layout import Modality, modality_inputs
from bigearthnet_tf.models.preprocessing import (
    BANDS_10M_2019_ORDER,
    MM,
    S1,
    S2,
    Statistics,
    raw_inputs,
    resolve_statistics,
    standardized,
)
from bigearthnet_tf.models.registry import register_model
from bigearthnet_tf.models.tf1_naming import TF_LAYERS_LEAVES, TF1Naming

CONV_DROPOUT = 0.25
BRANCH_FC_DROPOUT = 0.5
FUSION_DROPOUT = 0.25
CLASSIFIER_DROPOUT = 0.5


@dataclass(frozen=True)
class ConvBlock:
    """One conv + BN + ReLU, optionally followed by a 2x2/2 VALID max pool (then dropout)."""

    filters: int
    kernel: int
    pool: bool = False


@dataclass(frozen=True)
class KBranchConfig:
    """A K-BranchCNN variant: the conv blocks of each branch kind and the width of every FC."""

    branch_10m: tuple[ConvBlock, ...]
    branch_20m: tuple[ConvBlock, ...]
    branch_60m: tuple[ConvBlock, ...]
    feature_size: int = 128
    bn_momentum: float = 0.99  # tf.layers.batch_normalization's default, as in 2019


def _scaled(config: KBranchConfig, divisor: int, feature_size: int, bn_momentum: float) -> KBranchConfig:
    """The same architecture with every conv `divisor` times narrower: for fast tests and the demo."""

    def narrow(blocks: tuple[ConvBlock, ...]) -> tuple[ConvBlock, ...]:
        return tuple(ConvBlock(b.filters // divisor, b.kernel, b.pool) for b in blocks)

    return KBranchConfig(
        narrow(config.branch_10m),
        narrow(config.branch_20m),
        narrow(config.branch_60m),
        feature_size,
        bn_momentum,
    )


K_BRANCH_2019 = KBranchConfig(
    branch_10m=(ConvBlock(32, 5, pool=True), ConvBlock(32, 5, pool=True), ConvBlock(64, 3)),
    branch_20m=(ConvBlock(32, 3, pool=True), ConvBlock(32, 3), ConvBlock(64, 3)),
    branch_60m=(ConvBlock(32, 2), ConvBlock(32, 2), ConvBlock(32, 2)),
)

K_BRANCH_VARIANTS: Mapping[str, KBranchConfig] = MappingProxyType(
    {
        "K-BranchCNN": K_BRANCH_2019,
        # Tiny runs last a few hundred iterations: BN statistics must settle faster than 0.99 allows.
        "K-BranchCNN-Tiny": _scaled(K_BRANCH_2019, divisor=4, feature_size=32, bn_momentum=0.9),
    }
)


def _dense_bn_relu(x: keras.KerasTensor, units: int, name: str, momentum: float) -> keras.KerasTensor:
    x = keras.layers.Dense(units, name=f"{name}_fc")(x)
    x = keras.layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _branch(x: keras.KerasTensor, blocks: tuple[ConvBlock, ...], config: KBranchConfig, name: str):
    for index, block in enumerate(blocks):
        prefix = f"{name}_conv_block_{index}"
        x = keras.layers.Conv2D(block.filters, block.kernel, padding="same", name=f"{prefix}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=config.bn_momentum, name=f"{prefix}_bn")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
        if block.pool:
            x = keras.layers.MaxPooling2D(2, strides=2, padding="valid", name=f"{prefix}_pool")(x)
        x = keras.layers.Dropout(CONV_DROPOUT, name=f"{prefix}_dropout")(x)
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    x = _dense_bn_relu(x, config.feature_size, f"{name}_fc_block", config.bn_momentum)
    return keras.layers.Dropout(BRANCH_FC_DROPOUT, name=f"{name}_fc_dropout")(x)


def kbranch_input_keys(modality: Modality) -> tuple[str, ...]:
    """Input keys K-BranchCNN reads for `modality`."""
    return modality_inputs(modality)  # all of them: the 60 m bands too


def build_kbranch(
    num_classes: int,
    modality: Modality = S2,
    statistics: Statistics | None = None,
    *,
    config: KBranchConfig = K_BRANCH_2019,
    name: str = "K-BranchCNN",
) -> keras.Model:
    """K-BranchCNN on raw bands of `modality`; outputs logits (batch, num_classes)."""
    statistics = resolve_statistics(statistics)
    inputs = raw_inputs(kbranch_input_keys(modality))
    # (input key, channels in the 2019 order, branch blocks, branch name)
    branches = []
    if modality in (S2, MM):
        branches += [
            ("bands_10m", BANDS_10M_2019_ORDER, config.branch_10m, "branch_10m"),
            ("bands_20m", BANDS_20M, config.branch_20m, "branch_20m"),
            ("bands_60m", BANDS_60M, config.branch_60m, "branch_60m"),
        ]
    if modality in (S1, MM):
        branches.append(("bands_s1", S1_BAND_NAMES, config.branch_10m, "branch_s1"))
    features = []
    for key, bands, blocks, branch_name in branches:
        image = standardized(inputs, key, bands, statistics)
        features.append(_branch(image, blocks, config, branch_name))
    fused = features[0] if len(features) == 1 else keras.layers.Concatenate(name="fusion_concat")(features)
    fused = _dense_bn_relu(fused, config.feature_size, "fusion_fc_block", config.bn_momentum)
    fused = keras.layers.Dropout(FUSION_DROPOUT, name="fusion_dropout")(fused)
    x = keras.layers.Dropout(CLASSIFIER_DROPOUT, name="classifier_dropout")(fused)
    # float32 logits even under a mixed-precision policy (stable sigmoid cross-entropy).
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def tf1_layer_scope(layer_name: str) -> str | None:
    """The 2019 (tf.layers, no top scope) scope of one of our layers; the S1 branch has none."""
    parts = {"conv": "conv_layer", "fc": "fc_layer", "bn": "batch_norm"}
    match = re.fullmatch(r"branch_(10m|20m|60m)_conv_block_(\d+)_(conv|bn)", layer_name)
    if match:
        resolution, index, part = match.groups()
        return f"CNN_{resolution}_branch/conv_block_{index}/{parts[part]}"
    match = re.fullmatch(r"branch_(10m|20m|60m)_fc_block_(fc|bn)", layer_name)
    if match:
        resolution, part = match.groups()
        return f"CNN_{resolution}_branch/fc_block_0/{parts[part]}"
    match = re.fullmatch(r"fusion_fc_block_(fc|bn)", layer_name)
    if match:
        return f"feature_fusion/fc_block_0/{parts[match.group(1)]}"
    return "classification/fc_layer" if layer_name == "logits" else None


TF1 = TF1Naming("", tf1_layer_scope, TF_LAYERS_LEAVES, "classification/fc_layer")

for _name, _config in K_BRANCH_VARIANTS.items():
    register_model(_name, tf1=TF1)(
        functools.partial(build_kbranch, config=_config, name=_name)
    )
