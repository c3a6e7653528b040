"""ResNet v1 50/101/152 as TF-Slim `resnet_v1` defined them, the way the 2019 BigEarthNet code used them.

Facts (BIGEARTHNET.md section 4, TF-Slim `resnet_v1` / `resnet_utils`):

- Root: 7x7/2 conv, 64 filters, no bias, BN, ReLU; then 3x3/2 max pool with SAME padding.
- Strided convs with kernel > 1 use slim's `conv2d_same`: explicit symmetric zero padding of k-1
  (floor half before) followed by a VALID conv, so the result does not depend on input parity the way
  TF's asymmetric SAME padding does.
- Four blocks of bottleneck units (1x1 -> 3x3 -> 1x1, base depths 64, 128, 256, 512, output x4); the
  stride 2 sits on the 3x3 conv of the LAST unit of blocks 1-3; block 4 has stride 1.
- Shortcut: identity when the depth is unchanged, subsampled by a 1x1 max pool with the unit's stride
  (slim `subsample`); otherwise a 1x1 conv with the unit's stride + BN, no ReLU. With the stride on the
  last unit, the projection always has stride 1 and the strided shortcut is the max-pool subsample.
- Every conv without bias, followed by BN (epsilon 1e-5, decay 0.997, scale on: slim
  `resnet_arg_scope` defaults); ReLU after the residual sum.
- Head: global average pool, 1x1 conv with bias to the classes (the logits), no BN, no activation.
- Initialiser: He normal (slim's `variance_scaling_initializer`, fan-in, factor 2), the logits included.
- The 20 m bands are upsampled with the 2019 graph's TF1 bicubic kernel unless `upsampling` says
  otherwise (see `preprocessing`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import keras

from bigearthnet_tf.layout import Modality
from bigearthnet_tf.models.preprocessing import (
    S2,
    TF1_BICUBIC,
    Statistics,
    check_upsampling,
    raw_inputs,
    resolve_statistics,
    stacked_image,
    stacked_input_keys,
)
from bigearthnet_tf.models.registry import register_model
from bigearthnet_tf.models.tf1_naming import SLIM_LEAVES, TF1Naming

BN_MOMENTUM = 0.997
TINY_BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
BOTTLENECK_EXPANSION = 4


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet v1 variant: units per block, bottleneck depth per block, and root filters."""

    units: tuple[int, ...]
    base_depths: tuple[int, ...] = (64, 128, 256, 512)
    strides: tuple[int, ...] = (2, 2, 2, 1)  # applied in the last unit of each block
    root_filters: int = 64
    bn_momentum: float = BN_MOMENTUM


RESNET_VARIANTS: Mapping[str, ResNetConfig] = MappingProxyType(
    {
        "ResNet50": ResNetConfig(units=(3, 4, 6, 3)),
        "ResNet101": ResNetConfig(units=(3, 4, 23, 3)),
        "ResNet152": ResNetConfig(units=(3, 8, 36, 3)),
        # Two units in block 1 so every shortcut kind is exercised: projection (unit 1), max-pool
        # subsample (strided unit 2), and strided projection (the single unit of blocks 2-3).
        # Tiny runs last a few hundred iterations: BN statistics must settle faster than 0.997 allows.
        "ResNet-Tiny": ResNetConfig(
            units=(2, 1, 1, 1), base_depths=(8, 16, 32, 64), root_filters=8, bn_momentum=TINY_BN_MOMENTUM
        ),
    }
)


def _conv_bn(
    x: keras.KerasTensor,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    relu: bool = True,
    momentum: float = BN_MOMENTUM,
) -> keras.KerasTensor:
    padding = "same"
    if stride > 1 and kernel > 1:  # slim conv2d_same
        before = (kernel - 1) // 2
        after = kernel - 1 - before
        x = keras.layers.ZeroPadding2D(((before, after), (before, after)), name=f"{name}_pad")(x)
        padding = "valid"
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )(x)
    x = keras.layers.BatchNormalization(momentum=momentum, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _bottleneck(
    x: keras.KerasTensor, depth: int, bottleneck_depth: int, stride: int, name: str, momentum: float
):
    if x.shape[-1] == depth:
        shortcut = x
        if stride > 1:
            shortcut = keras.layers.MaxPooling2D(1, strides=stride, name=f"{name}_shortcut_subsample")(x)
    else:
        shortcut = _conv_bn(x, depth, 1, stride, f"{name}_shortcut", relu=False, momentum=momentum)
    residual = _conv_bn(x, bottleneck_depth, 1, 1, f"{name}_conv1", momentum=momentum)
    residual = _conv_bn(residual, bottleneck_depth, 3, stride, f"{name}_conv2", momentum=momentum)
    residual = _conv_bn(residual, depth, 1, 1, f"{name}_conv3", relu=False, momentum=momentum)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def build_resnet(
    num_classes: int,
    modality: Modality = S2,
    statistics: Statistics | None = None,
    *,
    config: ResNetConfig = RESNET_VARIANTS["ResNet50"],
    name: str = "ResNet50",
    upsampling: str = TF1_BICUBIC,
) -> keras.Model:
    """ResNet v1 on the stacked 120x120 image of `modality`; outputs logits (batch, num_classes).

    `upsampling` is the bicubic kernel of the 20 m bands: the 2019 graph's by default.
    """
    inputs = raw_inputs(stacked_input_keys(modality))
    x = stacked_image(inputs, modality, resolve_statistics(statistics), check_upsampling(upsampling))
    x = _conv_bn(x, config.root_filters, 7, 2, name="conv1", momentum=config.bn_momentum)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for block, (units, base_depth, stride) in enumerate(
        zip(config.units, config.base_depths, config.strides, strict=True), start=1
    ):
        for unit in range(1, units + 1):
            x = _bottleneck(
                x,
                depth=base_depth * BOTTLENECK_EXPANSION,
                bottleneck_depth=base_depth,
                stride=stride if unit == units else 1,
                name=f"block{block}_unit_{unit}",
                momentum=config.bn_momentum,
            )
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="global_pool")(x)
    # float32 logits even under a mixed-precision policy (stable sigmoid cross-entropy).
    x = keras.layers.Conv2D(
        num_classes, 1, use_bias=True, kernel_initializer="he_normal", dtype="float32", name="logits"
    )(x)
    logits = keras.layers.Flatten(dtype="float32", name="spatial_squeeze")(x)
    return keras.Model(inputs, logits, name=name)


def tf1_layer_scope(layer_name: str) -> str | None:
    """The 2019 (TF-Slim resnet_v1) scope of one of our layers, below the model's top scope."""
    base, batch_norm = (layer_name[:-3], True) if layer_name.endswith("_bn") else (layer_name, False)
    match = re.fullmatch(r"block(\d+)_unit_(\d+)_(shortcut|conv[123])", base)
    if match:
        block, unit, part = match.groups()
        scope = f"block{block}/unit_{unit}/bottleneck_v1/{part}"
    elif base == "conv1" or (base == "logits" and not batch_norm):
        scope = base
    else:
        return None
    return f"{scope}/BatchNorm" if batch_norm else scope


# Top scopes of the 2019 checkpoints (Tiny has none in 2019: the same rule, a scope of our own).
TF1_SCOPES = {"ResNet50": "resnet_v1_50", "ResNet101": "resnet_v1_101", "ResNet152": "resnet_v1_152"}

for _name, _config in RESNET_VARIANTS.items():
    _tf1 = TF1Naming(TF1_SCOPES.get(_name, "resnet_v1_tiny"), tf1_layer_scope, SLIM_LEAVES, "logits")
    register_model(_name, tf1=_tf1)(
        functools.partial(build_resnet, config=_config, name=_name)
    )
