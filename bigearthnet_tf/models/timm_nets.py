"""Keras 3 networks that compute exactly what timm's ResNet, ConvNeXtV2, ViT and MLP-Mixer compute.

They exist to run weights trained with timm (the reBEN BigEarthNet v2.0 models, see `models.reben`)
in Keras. Each network maps one image (batch, height, width, channels), channels last, to logits.
Every layer that holds weights is named by its timm module path (`layer1.0.conv1`, `blocks.3.attn.qkv`,
`stages.2.blocks.0.mlp.grn`), so a timm state dict fills the network by name (`timm_tensor_names`).

What makes them equal to timm (timm 0.9 / 1.0 code, `timm/models/{resnet,convnext,vision_transformer,
mlp_mixer}.py`):
- PyTorch pads convolutions and max pools symmetrically (`padding=k // 2`); Keras' "same" pads an
  even-sized strided input only after. Strided and odd-kernel layers therefore get an explicit
  `ZeroPadding2D` before a "valid" layer. The max pool follows a ReLU, so zero padding equals
  PyTorch's -inf padding.
- Batch norm epsilon 1e-5 (PyTorch); layer norm epsilon 1e-6 (timm's LayerNorm / LayerNorm2d); exact
  (erf) GELU, as `nn.GELU()`.
- ResNet (`resnet18/34/50/101/152`, plain stem): 7x7/2 conv, BN, ReLU, 3x3/2 max pool, four stages of
  basic or bottleneck blocks with the stride on the first block's 3x3 conv, a 1x1 conv + BN projection
  where shape changes, average pool, dropout, linear head.
- ConvNeXtV2 (`convnextv2_*`, patch stem, `conv_mlp=False`): 4x4/4 patch conv + LayerNorm2d; stages of
  LayerNorm2d + 2x2/2 conv (not before stage 0), then blocks: 7x7 depthwise conv, LayerNorm, Linear,
  GELU, global response norm (GRN), Linear, residual; average pool, LayerNorm, dropout, linear head.
- ViT (`vit_*`, class token, `global_pool="token"`): patch conv, class token concatenated first, learned
  position embedding added (one entry per token, class token included), pre-norm blocks with one qkv
  projection (q scaled by head_dim ** -0.5) and an MLP, final LayerNorm, the class token to the head.
- MLP-Mixer (`mixer_*`): patch conv (a 120 px image under patch 16 gives 7x7 tokens: the last 8 rows
  and columns fall outside, as in timm), blocks mixing tokens (on the transposed sequence) then
  channels, final LayerNorm, mean over tokens, linear head.

Regularisation for fine-tuning follows timm's schedules (stochastic depth on residual branches: ResNet
`rate * block / (blocks - 1)`, ConvNeXt and ViT `linspace(0, rate, blocks)`, Mixer the same rate in
every block; dropout before the head); at inference both are the identity.

The architecture is data (`ResNetArchitecture`, ...), read from a state dict's shapes by
`architecture_from_tensors`, so a reduced-width test model built by timm itself loads as readily as
the published ones. Attention heads cannot be read from shapes: timm's ViTs all use 64-wide heads
(ViT-Ti/S/B/L: 3/6/12/16 heads), so heads = width // 64.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from bigearthnet_tf.models.modern import DropPath

BATCH_NORM_EPSILON = 1e-5  # PyTorch's BatchNorm2d
LAYER_NORM_EPSILON = 1e-6  # timm's LayerNorm, LayerNorm2d and the ViT / Mixer norm layers
GRN_EPSILON = 1e-6
BATCH_NORM_MOMENTUM = 0.9  # PyTorch's momentum 0.1
VIT_HEAD_WIDTH = 64
FAMILIES: tuple[str, ...] = ("resnet", "convnextv2", "vit", "mixer", "mobilevit")
# Buffers of a timm state dict that hold no weight (PyTorch's batch-norm update counter).
SKIPPED_TENSORS = re.compile(r"(^|\.)num_batches_tracked$")


class ArchitectureError(ValueError):
    """A state dict that none of these networks can hold (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _padded(x, padding: int, name: str):
    return keras.layers.ZeroPadding2D(padding, name=f"{name}.pad")(x) if padding else x


def _conv(x, filters: int, kernel: int, stride: int, padding: int, name: str, bias: bool = False):
    """A PyTorch `nn.Conv2d` (symmetric zero padding)."""
    x = _padded(x, padding, name)
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=bias, name=name)(x)


def _batch_norm(x, name: str):
    return keras.layers.BatchNormalization(
        epsilon=BATCH_NORM_EPSILON, momentum=BATCH_NORM_MOMENTUM, name=name
    )(x)


def _layer_norm(x, name: str):
    return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name)(x)


def _gelu(x, name: str):
    return keras.layers.Activation("gelu", name=name)(x)  # Keras' gelu is the exact (erf) one by default


def _head(features, num_classes: int, dropout: float, name: str):
    x = keras.layers.Dropout(dropout, name="head_dropout")(features)
    return keras.layers.Dense(num_classes, dtype="float32", name=name)(x)


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class GlobalResponseNorm(keras.layers.Layer):
    """ConvNeXtV2's GRN on channels-last input: x + bias + weight * x * (|x|_2 over space / channel mean)."""

    def __init__(self, epsilon: float = GRN_EPSILON, **kwargs) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape) -> None:
        self.weight = self.add_weight(name="weight", shape=(input_shape[-1],), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        spatial_norm = ops.sqrt(ops.sum(ops.square(x), axis=(1, 2), keepdims=True))
        normalised = spatial_norm / (ops.mean(spatial_norm, axis=-1, keepdims=True) + self.epsilon)
        return x + self.bias + self.weight * (x * normalised)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class ClassTokenAndPosition(keras.layers.Layer):
    """ViT's embedding: the learned class token put first, then the learned position embedding added
    (timm's `cls_token` (1, 1, width) and `pos_embed` (1, tokens + 1, width))."""

    def build(self, input_shape) -> None:
        tokens, width = input_shape[1], input_shape[2]
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, width), initializer=init)
        self.pos_embed = self.add_weight(name="pos_embed", shape=(1, tokens + 1, width), initializer=init)

    def call(self, tokens):
        batch = ops.shape(tokens)[0]
        cls_token = ops.broadcast_to(ops.cast(self.cls_token, tokens.dtype), (batch, 1, tokens.shape[2]))
        return ops.concatenate([cls_token, tokens], axis=1) + ops.cast(self.pos_embed, tokens.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] + 1, input_shape[2])


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class SelfAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention on timm's fused qkv projection (batch, tokens, 3 * width)
    laid out as (3, heads, head_width); returns (batch, tokens, width) before the output projection."""

    def __init__(self, heads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads = int(heads)

    def call(self, qkv):
        tokens, width = qkv.shape[1], qkv.shape[2] // 3
        head_width = width // self.heads
        qkv = ops.reshape(qkv, (-1, tokens, 3, self.heads, head_width))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # (3, batch, heads, tokens, head_width)
        query, key, value = qkv[0] * ops.cast(head_width**-0.5, qkv.dtype), qkv[1], qkv[2]
        weights = ops.softmax(ops.matmul(query, ops.transpose(key, (0, 1, 3, 2))), axis=-1)
        attended = ops.transpose(ops.matmul(weights, value), (0, 2, 1, 3))
        return ops.reshape(attended, (-1, tokens, width))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], input_shape[2] // 3)

    def get_config(self) -> dict:
        return {**super().get_config(), "heads": self.heads}


def _residual(x, branch, rate: float, name: str):
    branch = DropPath(rate, name=f"{name}.drop_path")(branch)
    return keras.layers.Add(name=f"{name}.add")([x, branch])


# ---------------------------------------------------------------------------------------------
# ResNet


@dataclass(frozen=True)
class ResNetArchitecture:
    """timm ResNet: block kind, blocks per stage, planes per stage, stem width."""

    block: str = "bottleneck"  # or "basic"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    channels: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


def resnet(image, num_classes: int, arch: ResNetArchitecture, dropout: float, drop_path_rate: float):
    x = _conv(image, arch.stem_width, 7, 2, 3, "conv1")
    x = keras.layers.ReLU(name="act1")(_batch_norm(x, "bn1"))
    x = _padded(x, 1, "maxpool")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    total, index = sum(arch.layers), 0
    for stage, (blocks, planes) in enumerate(zip(arch.layers, arch.channels, strict=True), start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            rate = drop_path_rate * index / (total - 1) if total > 1 else 0.0
            out = planes * arch.expansion
            shortcut = x
            if stride != 1 or x.shape[-1] != out:
                shortcut = _conv(x, out, 1, stride, 0, f"{name}.downsample.0")
                shortcut = _batch_norm(shortcut, f"{name}.downsample.1")
            if arch.block == "bottleneck":
                y = keras.layers.ReLU(name=f"{name}.act1")(
                    _batch_norm(_conv(x, planes, 1, 1, 0, f"{name}.conv1"), f"{name}.bn1")
                )
                y = _conv(y, planes, 3, stride, 1, f"{name}.conv2")
                y = keras.layers.ReLU(name=f"{name}.act2")(_batch_norm(y, f"{name}.bn2"))
                y = _batch_norm(_conv(y, out, 1, 1, 0, f"{name}.conv3"), f"{name}.bn3")
            else:
                y = _conv(x, planes, 3, stride, 1, f"{name}.conv1")
                y = keras.layers.ReLU(name=f"{name}.act1")(_batch_norm(y, f"{name}.bn1"))
                y = _batch_norm(_conv(y, out, 3, 1, 1, f"{name}.conv2"), f"{name}.bn2")
            x = keras.layers.ReLU(name=f"{name}.out")(_residual(shortcut, y, rate, name))
            index += 1
    features = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    return _head(features, num_classes, dropout, "fc")


def _resnet_architecture(shapes: Mapping[str, tuple[int, ...]]) -> ResNetArchitecture:
    if "conv1.weight" not in shapes or len(shapes["conv1.weight"]) != 4 or shapes["conv1.weight"][2] != 7:
        raise ArchitectureError("only timm ResNets with the plain 7x7 stem are supported (conv1.weight)")
    layers = tuple(_count_indexed(shapes, rf"layer{stage}\.(\d+)\.") for stage in range(1, 5))
    if not all(layers):
        raise ArchitectureError(f"expected blocks in layer1 to layer4, found {layers}")
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    channels = tuple(_shape(shapes, f"layer{stage}.0.conv1.weight")[0] for stage in range(1, 5))
    return ResNetArchitecture(block, layers, channels, stem_width=shapes["conv1.weight"][0])


# ---------------------------------------------------------------------------------------------
# ConvNeXtV2


@dataclass(frozen=True)
class ConvNeXtV2Architecture:
    """timm ConvNeXt with global response norm and no layer scale (the V2 models)."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (128, 256, 512, 1024)
    patch_size: int = 4
    kernel_size: int = 7
    mlp_ratio: int = 4


def convnextv2(image, num_classes: int, arch: ConvNeXtV2Architecture, dropout: float, drop_path_rate: float):
    x = _conv(image, arch.dims[0], arch.patch_size, arch.patch_size, 0, "stem.0", bias=True)
    x = _layer_norm(x, "stem.1")
    rates = np.linspace(0.0, drop_path_rate, sum(arch.depths))
    index = 0
    for stage, (depth, dim) in enumerate(zip(arch.depths, arch.dims, strict=True)):
        if stage > 0:
            x = _layer_norm(x, f"stages.{stage}.downsample.0")
            x = _conv(x, dim, 2, 2, 0, f"stages.{stage}.downsample.1", bias=True)
        for block in range(depth):
            name = f"stages.{stage}.blocks.{block}"
            y = _padded(x, arch.kernel_size // 2, f"{name}.conv_dw")
            y = keras.layers.DepthwiseConv2D(arch.kernel_size, padding="valid", name=f"{name}.conv_dw")(y)
            y = _layer_norm(y, f"{name}.norm")
            y = keras.layers.Dense(dim * arch.mlp_ratio, name=f"{name}.mlp.fc1")(y)
            y = _gelu(y, f"{name}.mlp.act")
            y = GlobalResponseNorm(name=f"{name}.mlp.grn")(y)
            y = keras.layers.Dense(dim, name=f"{name}.mlp.fc2")(y)
            x = _residual(x, y, float(rates[index]), name)
            index += 1
    features = keras.layers.GlobalAveragePooling2D(name="head.global_pool")(x)
    return _head(_layer_norm(features, "head.norm"), num_classes, dropout, "head.fc")


def _convnextv2_architecture(shapes: Mapping[str, tuple[int, ...]]) -> ConvNeXtV2Architecture:
    if "stages.0.blocks.0.mlp.grn.weight" not in shapes:
        raise ArchitectureError(
            "not a ConvNeXtV2 (no global response norm: stages.0.blocks.0.mlp.grn.weight)"
        )
    depths = tuple(_count_indexed(shapes, rf"stages\.{stage}\.blocks\.(\d+)\.") for stage in range(4))
    dims = tuple(_shape(shapes, f"stages.{stage}.blocks.0.conv_dw.weight")[0] for stage in range(4))
    stem = _shape(shapes, "stem.0.weight")
    ratio, remainder = divmod(_shape(shapes, "stages.0.blocks.0.mlp.fc1.weight")[0], dims[0])
    if remainder:
        raise ArchitectureError("stages.0.blocks.0.mlp.fc1.weight is not a whole multiple of the width")
    kernel = _shape(shapes, "stages.0.blocks.0.conv_dw.weight")[2]
    return ConvNeXtV2Architecture(depths, dims, patch_size=stem[2], kernel_size=kernel, mlp_ratio=ratio)


# ---------------------------------------------------------------------------------------------
# ViT


@dataclass(frozen=True)
class ViTArchitecture:
    """timm VisionTransformer with a class token read out by the head."""

    patch_size: int = 8
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_width: int = 3072


def vit(image, num_classes: int, arch: ViTArchitecture, dropout: float, drop_path_rate: float):
    x = _conv(image, arch.width, arch.patch_size, arch.patch_size, 0, "patch_embed.proj", bias=True)
    x = keras.layers.Reshape((x.shape[1] * x.shape[2], arch.width), name="patch_embed.flatten")(x)
    x = ClassTokenAndPosition(name="embedding")(x)
    for block, rate in enumerate(np.linspace(0.0, drop_path_rate, arch.depth)):
        name = f"blocks.{block}"
        y = keras.layers.Dense(3 * arch.width, name=f"{name}.attn.qkv")(_layer_norm(x, f"{name}.norm1"))
        y = SelfAttention(arch.heads, name=f"{name}.attn")(y)
        y = keras.layers.Dense(arch.width, name=f"{name}.attn.proj")(y)
        x = _residual(x, y, float(rate), f"{name}.attn")
        y = keras.layers.Dense(arch.mlp_width, name=f"{name}.mlp.fc1")(_layer_norm(x, f"{name}.norm2"))
        y = keras.layers.Dense(arch.width, name=f"{name}.mlp.fc2")(_gelu(y, f"{name}.mlp.act"))
        x = _residual(x, y, float(rate), f"{name}.mlp")
    x = _layer_norm(x, "norm")
    x = keras.layers.Cropping1D((0, x.shape[1] - 1), name="class_token")(x)
    return _head(keras.layers.Flatten(name="class_token.flatten")(x), num_classes, dropout, "head")


def _vit_architecture(shapes: Mapping[str, tuple[int, ...]], image_size: int) -> ViTArchitecture:
    proj = _shape(shapes, "patch_embed.proj.weight")
    width, patch = proj[0], proj[2]
    tokens = (image_size // patch) ** 2
    if _shape(shapes, "pos_embed") != (1, tokens + 1, width) or "cls_token" not in shapes:
        raise ArchitectureError(
            f"pos_embed {shapes.get('pos_embed')} does not fit a class token and {tokens} patch tokens "
            f"of width {width} ({image_size} px images, patch {patch})"
        )
    if width % VIT_HEAD_WIDTH:
        raise ArchitectureError(f"width {width} is no multiple of timm's {VIT_HEAD_WIDTH}-wide heads")
    depth = _count_indexed(shapes, r"blocks\.(\d+)\.")
    mlp_width = _shape(shapes, "blocks.0.mlp.fc1.weight")[0]
    return ViTArchitecture(patch, width, depth, width // VIT_HEAD_WIDTH, mlp_width)


# ---------------------------------------------------------------------------------------------
# MobileViT


MOBILEVIT_NORM_EPSILON = 1e-5  # its transformer uses PyTorch's nn.LayerNorm default
MOBILEVIT_HEADS = 4  # timm's MobileVitBlock default (not readable from shapes)
MOBILEVIT_PATCH = 2  # mobilevit_s / xs / xxs


@dataclass(frozen=True)
class MobileViTArchitecture:
    """timm `mobilevit_*` (a ByobNet): 3x3/2 stem, five stages of inverted-residual blocks (the first
    of stages 2 to 5 with stride 2), stages 3 to 5 ending in a MobileViT block, 1x1 final conv, head.

    Per stage: output channels, inverted-residual blocks and their hidden width; transformer width,
    depth and MLP width (0 where the stage has no MobileViT block)."""

    stem_width: int = 16
    channels: tuple[int, ...] = (32, 64, 96, 128, 160)
    blocks: tuple[int, ...] = (1, 3, 1, 1, 1)
    expansion: float = 4.0
    transformer_widths: tuple[int, ...] = (0, 0, 144, 192, 240)
    transformer_depths: tuple[int, ...] = (0, 0, 2, 4, 3)
    mlp_ratio: float = 2.0
    final_width: int = 640


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class PatchUnfold(keras.layers.Layer):
    """(batch, H, W, C) -> (batch * p * p, H/p * W/p, C): one sequence per position inside the p x p
    patches, the tokens in row-major patch order, as timm's MobileVitBlock unfolds."""

    def __init__(self, patch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.patch = int(patch)

    def call(self, x):
        height, width, channels = x.shape[1], x.shape[2], x.shape[3]
        p = self.patch
        x = ops.reshape(x, (-1, height // p, p, width // p, p, channels))
        x = ops.transpose(x, (0, 2, 4, 1, 3, 5))  # (batch, p, p, rows, columns, channels)
        return ops.reshape(x, (-1, (height // p) * (width // p), channels))

    def compute_output_shape(self, input_shape):
        p = self.patch
        return (None, (input_shape[1] // p) * (input_shape[2] // p), input_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "patch": self.patch}


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class PatchFold(keras.layers.Layer):
    """The inverse of `PatchUnfold` for a (height, width) feature map."""

    def __init__(self, patch: int, height: int, width: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.patch, self.height, self.width = int(patch), int(height), int(width)

    def call(self, x):
        p, channels = self.patch, x.shape[2]
        x = ops.reshape(x, (-1, p, p, self.height // p, self.width // p, channels))
        x = ops.transpose(x, (0, 3, 1, 4, 2, 5))
        return ops.reshape(x, (-1, self.height, self.width, channels))

    def compute_output_shape(self, input_shape):
        return (None, self.height, self.width, input_shape[2])

    def get_config(self) -> dict:
        return {**super().get_config(), "patch": self.patch, "height": self.height, "width": self.width}


def _conv_norm_act(x, filters: int, kernel: int, stride: int, name: str, act: bool = True, depthwise: bool = False):
    """timm's ConvNormAct: conv (symmetric padding k // 2, no bias), batch norm, SiLU."""
    x = _padded(x, kernel // 2 if kernel > 1 else 0, f"{name}.conv")
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="valid", use_bias=False, name=f"{name}.conv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False, name=f"{name}.conv")(x)
    x = _batch_norm(x, f"{name}.bn")
    return keras.layers.Activation("silu", name=f"{name}.act")(x) if act else x


def _mobilevit_block(x, width: int, depth: int, mlp_width: int, rate: float, name: str):
    from bigearthnet_tf.models.preprocessing import LinearResize

    shortcut, channels = x, x.shape[-1]
    y = _conv_norm_act(x, channels, 3, 1, f"{name}.conv_kxk")
    y = keras.layers.Conv2D(width, 1, use_bias=False, name=f"{name}.conv_1x1")(y)
    height, breadth = y.shape[1], y.shape[2]
    padded_h = -(-height // MOBILEVIT_PATCH) * MOBILEVIT_PATCH
    padded_w = -(-breadth // MOBILEVIT_PATCH) * MOBILEVIT_PATCH
    resized = (padded_h, padded_w) != (height, breadth)
    if resized:  # timm interpolates (bilinear, half-pixel) to a multiple of the patch, and back
        y = LinearResize(padded_h, padded_w, name=f"{name}.resize_in")(y)
    y = PatchUnfold(MOBILEVIT_PATCH, name=f"{name}.unfold")(y)
    for index in range(depth):
        block = f"{name}.transformer.{index}"
        z = keras.layers.LayerNormalization(epsilon=MOBILEVIT_NORM_EPSILON, name=f"{block}.norm1")(y)
        z = keras.layers.Dense(3 * width, name=f"{block}.attn.qkv")(z)
        z = SelfAttention(MOBILEVIT_HEADS, name=f"{block}.attn")(z)
        z = keras.layers.Dense(width, name=f"{block}.attn.proj")(z)
        y = _residual(y, z, rate, f"{block}.attn")
        z = keras.layers.LayerNormalization(epsilon=MOBILEVIT_NORM_EPSILON, name=f"{block}.norm2")(y)
        z = keras.layers.Dense(mlp_width, name=f"{block}.mlp.fc1")(z)
        z = keras.layers.Activation("silu", name=f"{block}.mlp.act")(z)
        z = keras.layers.Dense(width, name=f"{block}.mlp.fc2")(z)
        y = _residual(y, z, rate, f"{block}.mlp")
    y = keras.layers.LayerNormalization(epsilon=MOBILEVIT_NORM_EPSILON, name=f"{name}.norm")(y)
    y = PatchFold(MOBILEVIT_PATCH, padded_h, padded_w, name=f"{name}.fold")(y)
    if resized:
        y = LinearResize(height, breadth, name=f"{name}.resize_out")(y)
    y = _conv_norm_act(y, channels, 1, 1, f"{name}.conv_proj")
    y = keras.layers.Concatenate(name=f"{name}.concat")([shortcut, y])
    return _conv_norm_act(y, channels, 3, 1, f"{name}.conv_fusion")


def mobilevit(image, num_classes: int, arch: MobileViTArchitecture, dropout: float, drop_path_rate: float):
    x = _conv_norm_act(image, arch.stem_width, 3, 2, "stem")
    depths = [blocks + (1 if width else 0) for blocks, width in zip(arch.blocks, arch.transformer_widths, strict=True)]
    rates = iter(np.linspace(0.0, drop_path_rate, sum(depths)))  # ByobNet's schedule over all blocks
    for stage, (out, blocks) in enumerate(zip(arch.channels, arch.blocks, strict=True)):
        for block in range(blocks):
            name = f"stages.{stage}.{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            rate = float(next(rates))
            hidden = int(round(x.shape[-1] * arch.expansion))
            y = _conv_norm_act(x, hidden, 1, 1, f"{name}.conv1_1x1")
            y = _conv_norm_act(y, hidden, 3, stride, f"{name}.conv2_kxk", depthwise=True)
            y = _conv_norm_act(y, out, 1, 1, f"{name}.conv3_1x1", act=False)
            x = _residual(x, y, rate, name) if stride == 1 and x.shape[-1] == out else y
        if arch.transformer_widths[stage]:
            width = arch.transformer_widths[stage]
            mlp_width = int(round(width * arch.mlp_ratio))
            x = _mobilevit_block(
                x, width, arch.transformer_depths[stage], mlp_width, float(next(rates)), f"stages.{stage}.{blocks}"
            )
    x = _conv_norm_act(x, arch.final_width, 1, 1, "final_conv")
    features = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    return _head(features, num_classes, dropout, "head.fc")


def _mobilevit_architecture(shapes: Mapping[str, tuple[int, ...]]) -> MobileViTArchitecture:
    stem = _shape(shapes, "stem.conv.weight")
    if stem[2:] != (3, 3):
        raise ArchitectureError(f"stem.conv.weight {stem}: a MobileViT stem is one 3x3 convolution")
    stages = _count_indexed(shapes, r"stages\.(\d+)\.")
    channels, blocks, widths, depths = [], [], [], []
    expansion = mlp_ratio = None
    for stage in range(stages):
        count = _count_indexed(shapes, rf"stages\.{stage}\.(\d+)\.")
        vit = f"stages.{stage}.{count - 1}.transformer.0.attn.qkv.weight" in shapes
        ir_blocks = count - 1 if vit else count
        channels.append(_shape(shapes, f"stages.{stage}.0.conv3_1x1.conv.weight")[0])
        blocks.append(ir_blocks)
        first = _shape(shapes, f"stages.{stage}.0.conv1_1x1.conv.weight")
        expansion = expansion or first[0] / first[1]
        if vit:
            block = f"stages.{stage}.{count - 1}"
            widths.append(_shape(shapes, f"{block}.conv_1x1.weight")[0])
            depths.append(_count_indexed(shapes, rf"stages\.{stage}\.{count - 1}\.transformer\.(\d+)\."))
            mlp_ratio = mlp_ratio or _shape(shapes, f"{block}.transformer.0.mlp.fc1.weight")[0] / widths[-1]
        else:
            widths.append(0)
            depths.append(0)
    return MobileViTArchitecture(
        stem_width=stem[0],
        channels=tuple(channels),
        blocks=tuple(blocks),
        expansion=float(expansion or 4.0),
        transformer_widths=tuple(widths),
        transformer_depths=tuple(depths),
        mlp_ratio=float(mlp_ratio or 2.0),
        final_width=_shape(shapes, "final_conv.conv.weight")[0],
    )


# ---------------------------------------------------------------------------------------------
# MLP-Mixer


@dataclass(frozen=True)
class MixerArchitecture:
    """timm MlpMixer: patch size, width, blocks, and the token- and channel-mixing MLP widths."""

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    tokens_mlp_width: int = 384
    channels_mlp_width: int = 3072


def mixer(image, num_classes: int, arch: MixerArchitecture, dropout: float, drop_path_rate: float):
    x = _conv(image, arch.width, arch.patch_size, arch.patch_size, 0, "stem.proj", bias=True)
    tokens = x.shape[1] * x.shape[2]
    x = keras.layers.Reshape((tokens, arch.width), name="stem.flatten")(x)
    for block in range(arch.depth):
        name = f"blocks.{block}"
        y = keras.layers.Permute((2, 1), name=f"{name}.to_tokens")(_layer_norm(x, f"{name}.norm1"))
        y = keras.layers.Dense(arch.tokens_mlp_width, name=f"{name}.mlp_tokens.fc1")(y)
        y = keras.layers.Dense(tokens, name=f"{name}.mlp_tokens.fc2")(_gelu(y, f"{name}.mlp_tokens.act"))
        y = keras.layers.Permute((2, 1), name=f"{name}.to_channels")(y)
        x = _residual(x, y, drop_path_rate, f"{name}.mlp_tokens")
        y = keras.layers.Dense(arch.channels_mlp_width, name=f"{name}.mlp_channels.fc1")(
            _layer_norm(x, f"{name}.norm2")
        )
        y = keras.layers.Dense(arch.width, name=f"{name}.mlp_channels.fc2")(
            _gelu(y, f"{name}.mlp_channels.act")
        )
        x = _residual(x, y, drop_path_rate, f"{name}.mlp_channels")
    features = keras.layers.GlobalAveragePooling1D(name="global_pool")(_layer_norm(x, "norm"))
    return _head(features, num_classes, dropout, "head")


def _mixer_architecture(shapes: Mapping[str, tuple[int, ...]], image_size: int) -> MixerArchitecture:
    proj = _shape(shapes, "stem.proj.weight")
    width, patch = proj[0], proj[2]
    tokens_mlp = _shape(shapes, "blocks.0.mlp_tokens.fc1.weight")
    tokens = (image_size // patch) ** 2
    if tokens_mlp[1] != tokens:
        raise ArchitectureError(
            f"blocks.0.mlp_tokens.fc1.weight mixes {tokens_mlp[1]} tokens; {image_size} px images under "
            f"patch {patch} give {tokens}"
        )
    depth = _count_indexed(shapes, r"blocks\.(\d+)\.")
    channels_mlp = _shape(shapes, "blocks.0.mlp_channels.fc1.weight")[0]
    return MixerArchitecture(patch, width, depth, tokens_mlp[0], channels_mlp)


# ---------------------------------------------------------------------------------------------
# Families, architectures as data, and weight names

ARCHITECTURES: Mapping[str, type] = {
    "resnet": ResNetArchitecture,
    "convnextv2": ConvNeXtV2Architecture,
    "vit": ViTArchitecture,
    "mixer": MixerArchitecture,
    "mobilevit": MobileViTArchitecture,
}
NETWORKS = {"resnet": resnet, "convnextv2": convnextv2, "vit": vit, "mixer": mixer, "mobilevit": mobilevit}
HEAD_LAYERS = {"resnet": "fc", "convnextv2": "head.fc", "vit": "head", "mixer": "head", "mobilevit": "head.fc"}
_FAMILY_OF_TIMM_NAME = (
    (re.compile(r"^resnet(18|34|50|101|152)$"), "resnet"),
    (re.compile(r"^convnextv2_"), "convnextv2"),
    (re.compile(r"^vit_"), "vit"),
    (re.compile(r"^mixer_"), "mixer"),
    (re.compile(r"^mobilevit_(s|xs|xxs)$"), "mobilevit"),
)


def family_of(timm_model_name: str) -> str:
    """The family of a timm model name; ArchitectureError for a name none of these networks builds."""
    for pattern, family in _FAMILY_OF_TIMM_NAME:
        if pattern.search(timm_model_name):
            return family
    raise ArchitectureError(
        f"timm architecture {timm_model_name!r} is not supported; supported: resnet18/34/50/101/152, "
        "convnextv2_*, vit_*, mixer_* and mobilevit_s/xs/xxs"
    )


def architecture_from_tensors(family: str, shapes: Mapping[str, tuple[int, ...]], image_size: int):
    """The architecture of `family` whose weights have these shapes (timm key -> shape)."""
    readers = {
        "resnet": lambda: _resnet_architecture(shapes),
        "convnextv2": lambda: _convnextv2_architecture(shapes),
        "vit": lambda: _vit_architecture(shapes, image_size),
        "mixer": lambda: _mixer_architecture(shapes, image_size),
        "mobilevit": lambda: _mobilevit_architecture(shapes),
    }
    return readers[family]()


def architecture_to_dict(architecture) -> dict[str, Any]:
    """A JSON-ready dict of an architecture (tuples as lists), as checkpoint metadata stores it."""
    return {
        key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(architecture).items()
    }


def architecture_from_dict(family: str, values: Mapping[str, Any] | None):
    """The architecture of `family` from a dict (None: the family's default, the published size)."""
    kind = ARCHITECTURES[family]
    if values is None:
        return kind()
    if not isinstance(values, Mapping) or set(values) - {f.name for f in dataclasses.fields(kind)}:
        raise ArchitectureError(f"not a {family} architecture: {values!r}")
    return kind(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})


def timm_tensor_names(network: keras.Model) -> dict[str, tuple[keras.Variable, str]]:
    """timm key -> (Keras variable, layout) for every weight of `network`; layout says how a PyTorch
    tensor becomes the Keras value (`conv`, `depthwise`, `dense`, or `same`)."""
    names = {}
    for layer in network.layers:
        for attribute, (suffix, layout) in _WEIGHT_NAMES.get(type(layer), {}).items():
            variable = getattr(layer, attribute, None)
            if variable is not None:
                prefix = "" if isinstance(layer, ClassTokenAndPosition) else f"{layer.name}."
                names[prefix + suffix] = (variable, layout)
    return names


_LAYOUT_AXES = {"conv": (2, 3, 1, 0), "depthwise": (2, 3, 0, 1), "dense": (1, 0)}


def keras_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape `keras_value` gives a PyTorch weight of `shape` (as it is when the rank is not the
    layout's: then it fits no Keras weight and is reported as mis-shaped)."""
    axes = _LAYOUT_AXES.get(layout)
    if axes is None or len(shape) != len(axes):
        return tuple(shape)
    return tuple(shape[axis] for axis in axes)


def keras_value(tensor: np.ndarray, layout: str) -> np.ndarray:
    """A PyTorch weight as the matching Keras weight."""
    if layout == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return tensor.transpose(2, 3, 1, 0)
    if layout == "depthwise":  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return tensor.transpose(2, 3, 0, 1)
    if layout == "dense":  # (out, in) -> (in, out)
        return tensor.T
    return tensor


_WEIGHT_NAMES: Mapping[type, Mapping[str, tuple[str, str]]] = {
    keras.layers.Conv2D: {"kernel": ("weight", "conv"), "bias": ("bias", "same")},
    keras.layers.DepthwiseConv2D: {"kernel": ("weight", "depthwise"), "bias": ("bias", "same")},
    keras.layers.Dense: {"kernel": ("weight", "dense"), "bias": ("bias", "same")},
    keras.layers.BatchNormalization: {
        "gamma": ("weight", "same"),
        "beta": ("bias", "same"),
        "moving_mean": ("running_mean", "same"),
        "moving_variance": ("running_var", "same"),
    },
    keras.layers.LayerNormalization: {"gamma": ("weight", "same"), "beta": ("bias", "same")},
    GlobalResponseNorm: {"weight": ("weight", "same"), "bias": ("bias", "same")},
    ClassTokenAndPosition: {"cls_token": ("cls_token", "same"), "pos_embed": ("pos_embed", "same")},
}


def _count_indexed(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    """How many distinct indices the regular expression's group takes among the keys."""
    found = {int(match.group(1)) for key in shapes if (match := re.match(pattern, key))}
    if found and found != set(range(len(found))):
        raise ArchitectureError(f"blocks matching {pattern!r} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ArchitectureError(f"tensor {key!r} is missing")
    return tuple(shapes[key])
