"""VGG16/19 as TF-Slim `vgg` defined them, the way the 2019 BigEarthNet code used them.

Facts (BIGEARTHNET.md section 4, TF-Slim `vgg_16` / `vgg_19` and `vgg_arg_scope`):

- Five stages of 3x3 convs with bias and ReLU, SAME padding, widths 64, 128, 256, 512, 512;
  2 / 2 / 3 / 3 / 3 convs per stage (VGG16) or 2 / 2 / 4 / 4 / 4 (VGG19); each stage ends with a
  2x2/2 max pool, VALID (slim's `max_pool2d` default). 120 px -> 60, 30, 15, 7, 3.
- fc6: a 7x7 conv with 4096 filters and SAME padding (the 2019 code passed `fc_conv_padding='SAME'`;
  on the 3x3 map a VALID 7x7 would not fit), ReLU, dropout 0.5.
- fc7: 1x1 conv, 4096, ReLU; global average pool; dropout 0.5; fc8: 1x1 conv to the classes with
  bias and no activation (the logits).
- Initialiser: Glorot uniform (slim's `xavier_initializer`), zero biases.
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

DROPOUT = 0.5  # slim's dropout_keep_prob=0.5


@dataclass(frozen=True)
class VGGConfig:
    """A VGG variant: convs per stage, stage widths, fc6/fc7 width and fc6 kernel size."""

    convs_per_stage: tuple[int, ...]
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    fc_width: int = 4096
    fc6_kernel: int = 7


VGG_VARIANTS: Mapping[str, VGGConfig] = MappingProxyType(
    {
        "VGG16": VGGConfig(convs_per_stage=(2, 2, 3, 3, 3)),
        "VGG19": VGGConfig(convs_per_stage=(2, 2, 4, 4, 4)),
        "VGG-Tiny": VGGConfig(convs_per_stage=(1, 1, 1, 1, 1), widths=(8, 16, 32, 32, 32), fc_width=64),
    }
)


def build_vgg(
    num_classes: int,
    modality: Modality = S2,
    statistics: Statistics | None = None,
    *,
    config: VGGConfig = VGG_VARIANTS["VGG16"],
    name: str = "VGG16",
    upsampling: str = TF1_BICUBIC,
) -> keras.Model:
    """VGG on the stacked 120x120 image of `modality`; outputs logits (batch, num_classes).

    `upsampling` is the bicubic kernel of the 20 m bands: the 2019 graph's by default.
    """
    inputs = raw_inputs(stacked_input_keys(modality))
    x = stacked_image(inputs, modality, resolve_statistics(statistics), check_upsampling(upsampling))
    for stage, (convs, width) in enumerate(zip(config.convs_per_stage, config.widths, strict=True), start=1):
        for index in range(1, convs + 1):
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{stage}_{index}")(
                x
            )
        x = keras.layers.MaxPooling2D(2, strides=2, padding="valid", name=f"pool{stage}")(x)
    x = keras.layers.Conv2D(
        config.fc_width, config.fc6_kernel, padding="same", activation="relu", name="fc6"
    )(x)
    x = keras.layers.Dropout(DROPOUT, name="dropout6")(x)
    x = keras.layers.Conv2D(config.fc_width, 1, activation="relu", name="fc7")(x)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="global_pool")(x)
    x = keras.layers.Dropout(DROPOUT, name="dropout7")(x)
    # float32 logits even under a mixed-precision policy (stable sigmoid cross-entropy).
    x = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="fc8")(x)
    logits = keras.layers.Flatten(dtype="float32", name="spatial_squeeze")(x)
    return keras.Model(inputs, logits, name=name)


def tf1_layer_scope(layer_name: str) -> str | None:
    """The 2019 (TF-Slim vgg) scope of one of our layers, below the model's top scope."""
    match = re.fullmatch(r"conv(\d+)_(\d+)", layer_name)
    if match:
        return f"conv{match.group(1)}/{layer_name}"
    return layer_name if layer_name in ("fc6", "fc7", "fc8") else None


# Top scopes of the 2019 checkpoints (Tiny has none in 2019: the same rule, a scope of our own).
TF1_SCOPES = {"VGG16": "vgg_16", "VGG19": "vgg_19"}

for _name, _config in VGG_VARIANTS.items():
    _tf1 = TF1Naming(TF1_SCOPES.get(_name, "vgg_tiny"), tf1_layer_scope, SLIM_LEAVES, "fc8")
    register_model(_name, tf1=_tf1)(
        functools.partial(build_vgg, config=_config, name=_name)
    )
