"""Modern backbones on the stacked 120x120 image: EfficientNetV2-S, ConvNeXt-Tiny and a small ViT.

Each builder returns a single-image network on `len(STACKED_CHANNELS[modality])` channels (S2: 10,
S1: 2, MM: 12) that outputs logits; the registry puts the raw-band preprocessing (band selection,
bicubic upsampling, standardisation) in front of it. All are randomly initialised: nothing is
downloaded, and ImageNet weights would not fit 10 or 12 reflectance channels anyway.

| name | backbone | features | dropout | drop path | parameters (S2, 19 classes) |
|---|---|---|---|---|---|
| `EfficientNetV2-S` | `keras.applications.EfficientNetV2S` | 1280 | 0.2 | 0.2 | 20,357,211 |
| `ConvNeXt-Tiny` | `keras.applications.ConvNeXtTiny` | 768 | 0.0 | 0.1 | 27,845,491 |
| `ViT-S8` | ViT-S/8: width 384, depth 12, 6 heads, MLP 1536 | 384 | 0.0 | 0.1 | 21,634,195 |
| `ViT-S8-Tiny` | the same code, width 32, depth 2, 2 heads (tests, demos) | 32 | 0.0 | 0.1 | 45,491 |

The applications are built without top and without their ImageNet input scaling
(`include_preprocessing=False`): our inputs arrive standardised per band.

Head (all): global average pool (the applications' `pooling="avg"`; ConvNeXt adds its LayerNorm),
dropout, then a dense layer to the classes in float32 (stable sigmoid cross-entropy under mixed
precision). The dropout / drop-path defaults are those of the reference recipes (Keras' EfficientNetV2
defaults; ConvNeXt-T and DeiT-S on ImageNet-1k); a training recipe passes its own as builder keyword
arguments (`dropout`, `drop_path_rate`, and for the ViT `attention_dropout`).

Drop path (stochastic depth) follows the usual linear schedule: block i of n drops its residual branch
with probability `drop_path_rate * i / n` (EfficientNetV2, as Keras does it) or
`drop_path_rate * i / (n - 1)` (ConvNeXt and ViT, as their papers' code does). The applications
expose no drop-path argument (EfficientNetV2S fixes 0.2, ConvNeXtTiny 0.0), so the built graph is
cloned with its residual-branch placeholders replaced by `DropPath` layers: same weights, same
wiring, only the rates differ.

ViT decision: patch 8 on 120 px gives 15 x 15 = 225 tokens of 80 m x 80 m; patch 15 would leave
8 x 8 tokens of 150 m, coarser than most land-cover parcels. Cost is about 5.3 GMACs per image (the
ViT-S/16 of ImageNet at 224 px: 4.6). No class token: the logits come from the average of the
final-normed patch tokens, which suits multi-label scenes where evidence is spread over the patch.
Blocks are pre-norm (LayerNorm epsilon 1e-6) with GELU MLPs; the position embedding is learned
(truncated normal, stddev 0.02). Other patch sizes that divide 120 are a `ViTConfig` away.
"""

from __future__ import annotations

import functools
import numbers
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import keras
import numpy as np
from keras import ops

from bigearthnet_tf.constants import PATCH_SIZE
from bigearthnet_tf.errors import ConfigError
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.models.preprocessing import S2, STACKED_CHANNELS
from bigearthnet_tf.models.registry import register_model

# Reference defaults (see the module docstring).
EFFICIENTNET_DROPOUT = 0.2
EFFICIENTNET_DROP_PATH = 0.2
CONVNEXT_DROPOUT = 0.0
CONVNEXT_DROP_PATH = 0.1
VIT_DROPOUT = 0.0
VIT_ATTENTION_DROPOUT = 0.0
VIT_DROP_PATH = 0.1

LAYER_NORM_EPSILON = 1e-6
POSITION_EMBEDDING_STDDEV = 0.02

# The applications warn about more than 3 channels; for multispectral input that is the point.
_CHANNEL_WARNING = "This model usually expects 1 or 3 input channels"


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class DropPath(keras.layers.Layer):
    """Stochastic depth: while training, zero a residual branch per sample with probability `rate`.

    Kept samples are scaled by 1 / (1 - rate), so inference (identity) needs no rescaling.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"{self.name}: rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed
        if self.rate > 0:  # like keras.layers.Dropout: a seed state only where it is used
            self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, inputs, training: bool = False):
        if not training or self.rate == 0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        draw = keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype)
        mask = ops.cast(draw < keep, inputs.dtype)
        return inputs * mask / ops.cast(keep, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of shape (tokens, width) to a (batch, tokens, width) sequence."""

    def __init__(self, stddev: float = POSITION_EMBEDDING_STDDEV, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stddev = float(stddev)

    def build(self, input_shape) -> None:
        if input_shape[1] is None or input_shape[2] is None:
            raise ValueError(f"{self.name}: needs a static token count and width, got {tuple(input_shape)}")
        self.embedding = self.add_weight(
            name="embedding",
            shape=(input_shape[1], input_shape[2]),
            initializer=keras.initializers.TruncatedNormal(stddev=self.stddev),
        )

    def call(self, tokens):
        return tokens + ops.cast(self.embedding, tokens.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "stddev": self.stddev}


def stacked_channels(modality: Modality) -> int:
    """Channels of the stacked 120x120 image that single-image networks see for `modality`."""
    return len(STACKED_CHANNELS[modality])


def _check_rate(name: str, value: float) -> float:
    """`value` as a float if it is a rate in [0, 1); otherwise ConfigError naming `name` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _classifier(
    image: keras.KerasTensor, features: keras.KerasTensor, num_classes: int, dropout: float, name: str
) -> keras.Model:
    """The network from `image` to pooled `features`, then dropout and float32 dense logits."""
    x = keras.layers.Dropout(dropout, name="head_dropout")(features)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(image, logits, name=name)


def _replace_layers(
    model: keras.Model, replacement: Callable[[keras.layers.Layer], keras.layers.Layer | None]
) -> keras.Model:
    """`model` rewired with some layers swapped: `replacement(layer)` returns the new layer or None.

    Every other layer is reused as is (same object, same weights).
    """

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        new = replacement(layer)
        return layer if new is None else new

    return keras.models.clone_model(model, clone_function=clone_function)


# ---------------------------------------------------------------------------------------------
# EfficientNetV2-S

_EFFICIENTNET_BLOCK = re.compile(r"^block(\d+[a-z])_")
_EFFICIENTNET_DROP = re.compile(r"^block\d+[a-z]_drop$")


def efficientnet_drop_path_rates(model: keras.Model, drop_path_rate: float) -> dict[str, float]:
    """Residual-branch layer name -> drop rate `drop_path_rate * i / n` for block i of the n blocks.

    Blocks without a residual branch (they change width or stride) count in n but get no layer.
    """
    blocks: list[str] = []
    for layer in model.layers:
        match = _EFFICIENTNET_BLOCK.match(layer.name)
        if match and match.group(1) not in blocks:
            blocks.append(match.group(1))
    rates = {}
    for layer in model.layers:
        if _EFFICIENTNET_DROP.match(layer.name):
            index = blocks.index(_EFFICIENTNET_BLOCK.match(layer.name).group(1))
            rates[layer.name] = drop_path_rate * index / len(blocks)
    return rates


def build_efficientnet_v2_s(
    num_classes: int,
    modality: Modality = S2,
    *,
    dropout: float = EFFICIENTNET_DROPOUT,
    drop_path_rate: float = EFFICIENTNET_DROP_PATH,
) -> keras.Model:
    """EfficientNetV2-S (keras.applications, random init) on the stacked image of `modality`; logits."""
    dropout = _check_rate("dropout", dropout)
    drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CHANNEL_WARNING)
        backbone = keras.applications.EfficientNetV2S(
            include_top=False,
            weights=None,
            input_shape=(PATCH_SIZE, PATCH_SIZE, stacked_channels(modality)),
            pooling="avg",
            include_preprocessing=False,
        )
    rates = efficientnet_drop_path_rates(backbone, drop_path_rate)
    # Keras builds each residual branch's stochastic depth as Dropout(noise_shape=(None, 1, 1, 1)) at
    # its fixed 0.2 schedule; DropPath at our rate takes its place.
    backbone = _replace_layers(
        backbone,
        lambda layer: DropPath(rates[layer.name], name=layer.name) if layer.name in rates else None,
    )
    return _classifier(backbone.input, backbone.output, num_classes, dropout, name="efficientnetv2_s_image")


# ---------------------------------------------------------------------------------------------
# ConvNeXt-Tiny

_CONVNEXT_IDENTITY = re.compile(r"^(.*_stage_(\d+)_block_(\d+))_identity$")


def build_convnext_tiny(
    num_classes: int,
    modality: Modality = S2,
    *,
    dropout: float = CONVNEXT_DROPOUT,
    drop_path_rate: float = CONVNEXT_DROP_PATH,
) -> keras.Model:
    """ConvNeXt-Tiny (keras.applications, random init) on the stacked image of `modality`; logits."""
    dropout = _check_rate("dropout", dropout)
    drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CHANNEL_WARNING)
        backbone = keras.applications.ConvNeXtTiny(
            include_top=False,
            weights=None,
            input_shape=(PATCH_SIZE, PATCH_SIZE, stacked_channels(modality)),
            pooling="avg",
            include_preprocessing=False,
        )
    # With drop_path_rate 0 Keras puts a linear Activation ("..._identity") where the stochastic
    # depth goes; those placeholders come in stage, then block, order.
    placeholders = [layer.name for layer in backbone.layers if _CONVNEXT_IDENTITY.match(layer.name)]
    schedule = np.linspace(0.0, drop_path_rate, len(placeholders))
    rates = {name: float(rate) for name, rate in zip(placeholders, schedule, strict=True)}

    def replacement(layer: keras.layers.Layer) -> keras.layers.Layer | None:
        match = _CONVNEXT_IDENTITY.match(layer.name)
        return DropPath(rates[layer.name], name=f"{match.group(1)}_drop_path") if match else None

    backbone = _replace_layers(backbone, replacement)
    return _classifier(backbone.input, backbone.output, num_classes, dropout, name="convnext_tiny_image")


# ---------------------------------------------------------------------------------------------
# ViT


@dataclass(frozen=True)
class ViTConfig:
    """A ViT variant: patch side in pixels, token width, blocks, attention heads, MLP width."""

    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_width: int

    @property
    def tokens(self) -> int:
        """Patch tokens of a 120x120 image."""
        return (PATCH_SIZE // self.patch_size) ** 2


VIT_VARIANTS: Mapping[str, ViTConfig] = MappingProxyType(
    {
        "ViT-S8": ViTConfig(patch_size=8, width=384, depth=12, heads=6, mlp_width=1536),
        "ViT-S8-Tiny": ViTConfig(patch_size=8, width=32, depth=2, heads=2, mlp_width=64),
    }
)


def build_vit(
    num_classes: int,
    modality: Modality = S2,
    *,
    config: ViTConfig = VIT_VARIANTS["ViT-S8"],
    name: str = "ViT-S8",
    dropout: float = VIT_DROPOUT,
    attention_dropout: float = VIT_ATTENTION_DROPOUT,
    drop_path_rate: float = VIT_DROP_PATH,
) -> keras.Model:
    """Pre-norm ViT on the stacked image of `modality`, average-pooled tokens to logits.

    `dropout` applies to the embedded tokens, each attention and MLP output, and before the
    classifier; `attention_dropout` to the attention weights; `drop_path_rate` is the drop rate of
    the last block's residual branches (linear from 0 at the first block).
    """
    dropout = _check_rate("dropout", dropout)
    attention_dropout = _check_rate("attention_dropout", attention_dropout)
    drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
    if PATCH_SIZE % config.patch_size or config.width % config.heads:
        raise ValueError(
            f"{name}: patch size {config.patch_size} must divide {PATCH_SIZE} and the heads "
            f"{config.heads} the width {config.width}"
        )
    grid = PATCH_SIZE // config.patch_size
    image = keras.Input((PATCH_SIZE, PATCH_SIZE, stacked_channels(modality)), name="image")
    x = keras.layers.Conv2D(
        config.width, config.patch_size, strides=config.patch_size, name="patch_embedding"
    )(image)
    x = keras.layers.Reshape((grid * grid, config.width), name="patch_tokens")(x)
    x = PositionEmbedding(name="position_embedding")(x)
    x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    schedule = np.linspace(0.0, drop_path_rate, config.depth)
    for index, rate in enumerate(schedule):
        prefix = f"block_{index}"
        y = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=f"{prefix}_attention_norm")(x)
        y = keras.layers.MultiHeadAttention(
            config.heads,
            config.width // config.heads,
            dropout=attention_dropout,
            name=f"{prefix}_attention",
        )(y, y)
        y = keras.layers.Dropout(dropout, name=f"{prefix}_attention_dropout")(y)
        y = DropPath(float(rate), name=f"{prefix}_attention_drop_path")(y)
        x = keras.layers.Add(name=f"{prefix}_attention_residual")([x, y])
        y = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=f"{prefix}_mlp_norm")(x)
        y = keras.layers.Dense(config.mlp_width, activation="gelu", name=f"{prefix}_mlp_hidden")(y)
        y = keras.layers.Dropout(dropout, name=f"{prefix}_mlp_hidden_dropout")(y)
        y = keras.layers.Dense(config.width, name=f"{prefix}_mlp_output")(y)
        y = keras.layers.Dropout(dropout, name=f"{prefix}_mlp_dropout")(y)
        y = DropPath(float(rate), name=f"{prefix}_mlp_drop_path")(y)
        x = keras.layers.Add(name=f"{prefix}_mlp_residual")([x, y])
    x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="final_norm")(x)
    features = keras.layers.GlobalAveragePooling1D(name="token_pool")(x)
    return _classifier(image, features, num_classes, dropout, name=f"{name.lower().replace('-', '_')}_image")


register_model("EfficientNetV2-S")(
    build_efficientnet_v2_s
)
register_model("ConvNeXt-Tiny")(
    build_convnext_tiny
)
for _name, _config in VIT_VARIANTS.items():
    register_model(_name)(
        functools.partial(build_vit, config=_config, name=_name)
    )
