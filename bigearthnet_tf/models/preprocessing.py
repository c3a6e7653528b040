"""The first layers of every model: raw bands in, standardised channels in the 2019 order out.

Decision (issue 3): the input pipeline only decodes; band selection, reordering, bicubic upsampling and
standardisation are model layers. A saved model therefore takes raw band values at native resolution,
the accelerator does the arithmetic, and the statistics a model was trained with travel inside it
(as layer *config*, not weights, so they never count as parameters and are never trained).

Model inputs (a dict, float32, channels last; see docs/ARCHITECTURE.md "Model inputs"):

| key | shape | channels |
|---|---|---|
| `bands_10m` | (120, 120, 4) | B02, B03, B04, B08 |
| `bands_20m` | (60, 60, 6) | B05, B06, B07, B8A, B11, B12 |
| `bands_60m` | (20, 20, 2) | B01, B09 |
| `bands_s1` | (120, 120, 2) | VV, VH |

A model declares only the inputs it uses (ResNet/VGG on S2 do not read `bands_60m`); `input_keys(model)`
tells a consumer which keys to feed.

Order of operations, as in 2019: standardise each band on its raw values, then upsample the 20 m bands.
(The 2019 pipeline standardised in `tf.data` and upsampled in the graph.) Bicubic interpolation is affine
with weights summing to one, so the order changes results only by float rounding.

Upsampling is bicubic with one of two kernels, a named model option (`upsampling`) stored in every
checkpoint's metadata:

- `tf1_bicubic`, the 2019 kernel and the default of the 2019 architectures (ResNet, VGG): TF1's
  `tf.image.resize_bicubic` (the legacy `ResizeBicubic` op with align_corners and half_pixel_centers
  both False): output pixel o samples input position o * in/out, Keys' cubic with a = -0.75, taps
  outside the image clamped to the edge pixel. Imported 2019 weights see exactly the inputs they were
  trained on.
- `tf2_bicubic`: TF2 `tf.image.resize(..., "bicubic")` (and `keras.ops.image.resize`): half-pixel
  centres, a = -0.5, taps outside the image dropped and the rest renormalised. Checkpoints written
  before the option existed keep it, as do the modern backbones.

Both are written as two small fixed matrix products (`BicubicResize`) rather than a call to a resize
op, because TensorFlow's resize kernels (ResizeBicubic, ScaleAndTranslate) have no XLA implementation
and Keras compiles with XLA by default on a GPU (`jit_compile="auto"`): a model holding them fails to
train there. Matrix products compile everywhere and cost nothing on an accelerator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import keras
import numpy as np
from keras import ops

from bigearthnet_tf.constants import (
    BANDS_10M,
    BANDS_20M,
    DEFAULT_STATISTICS,
    PATCH_SIZE,
    RGB_NIR_SWIR_BANDS,
    S1_BAND_NAMES,
    TF1_BICUBIC,
    TF2_BICUBIC,
    UPSAMPLING_KERNELS,
    checked_statistics,
)
from bigearthnet_tf.errors import ConfigError
from bigearthnet_tf.layout import INPUTS, Modality

S2, S1, MM = Modality.S2, Modality.S1, Modality.MM

# Input key -> (side in pixels, channel names in the stored order), from the one table of inputs.

# The 2019 10 m channel order (B04, B03, B02, B08: red, green, blue, NIR), used by every model.
BANDS_10M_2019_ORDER: tuple[str, ...] = RGB_NIR_SWIR_BANDS[: len(BANDS_10M)]

# Channels of the single 120x120 image that ResNet and VGG see, per modality (MM: S2 then VV, VH,
# as the 2021 multimodal code did).
STACKED_CHANNELS = MappingProxyType(
    {S2: RGB_NIR_SWIR_BANDS, S1: S1_BAND_NAMES, MM: (*RGB_NIR_SWIR_BANDS, *S1_BAND_NAMES)}
)

Statistics = Mapping[str, tuple[float, float]]


def resolve_statistics(statistics: Statistics | None = None) -> dict[str, tuple[float, float]]:
    """The default statistics with `statistics` (band name -> (mean, std)) laid over them, validated."""
    return {**DEFAULT_STATISTICS, **checked_statistics(statistics or {}, "statistics", ConfigError)}


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class BandStandardization(keras.layers.Layer):
    """Pick channels by band name (reordering them) and standardise each: `(x - mean) / std`.

    `input_bands` names the channels of the input in their stored order, `output_bands` the channels to
    emit; `mean` and `std` belong to `output_bands`. They are plain config values, so the statistics
    are saved with the model but are neither weights nor trainable.
    """

    def __init__(
        self,
        input_bands: Sequence[str],
        output_bands: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        **kwargs,
    ) -> None:
        # Raw values reach ~2e4: half precision would lose whole units before standardising.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.input_bands = tuple(input_bands)
        self.output_bands = tuple(output_bands)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        missing = [band for band in self.output_bands if band not in self.input_bands]
        if missing:
            raise ValueError(f"output bands {missing} are not among the input bands {self.input_bands}")
        if not len(self.mean) == len(self.std) == len(self.output_bands):
            raise ValueError("mean and std need one value per output band")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        self._indices = tuple(self.input_bands.index(band) for band in self.output_bands)

    def build(self, input_shape) -> None:
        if input_shape[-1] != len(self.input_bands):
            raise ValueError(
                f"{self.name}: expected {len(self.input_bands)} channels {self.input_bands}, "
                f"got shape {tuple(input_shape)}"
            )

    def call(self, bands):
        if self._indices != tuple(range(len(self.input_bands))):
            bands = ops.take(bands, list(self._indices), axis=-1)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (bands - mean) / std

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], len(self.output_bands))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "input_bands": list(self.input_bands),
            "output_bands": list(self.output_bands),
            "mean": list(self.mean),
            "std": list(self.std),
        }


# Keys' cubic coefficient of each kernel: TF1's legacy op used -0.75, TF2 and JAX use -0.5.
KEYS_CUBIC_A = MappingProxyType({TF1_BICUBIC: -0.75, TF2_BICUBIC: -0.5})
KERNEL_TABLE_SIZE = 1024  # TF samples the cubic kernel at multiples of 1/1024 of a pixel


def check_upsampling(upsampling: str) -> str:
    """Return `upsampling` if it names a kernel, else raise ConfigError naming it and the accepted ones."""
    if upsampling not in UPSAMPLING_KERNELS:
        raise ConfigError(
            f"unknown upsampling {upsampling!r}; expected one of {', '.join(UPSAMPLING_KERNELS)}"
        )
    return upsampling


def _keys_cubic(distance: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient `a` at the given distances (in input pixels)."""
    t = np.abs(distance)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int, kernel: str = TF2_BICUBIC) -> np.ndarray:
    """(out_size, in_size) float32 weights of 1-D bicubic resampling with TensorFlow's `kernel`.

    Output pixel o samples input position (o + 0.5) * in/out - 0.5 (`tf2_bicubic`) or o * in/out
    (`tf1_bicubic`), computed in float32 as TF does, from its four nearest input pixels, with the
    fractional offset rounded to TF's 1/1024 kernel table (exact for the 2x upsampling of the 20 m
    bands). Taps outside the image get no weight and the rest are renormalised (`tf2_bicubic`), or
    fall on the nearest edge pixel (`tf1_bicubic`).
    """
    a = KEYS_CUBIC_A[check_upsampling(kernel)]
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    scale = np.float32(in_size) / np.float32(out_size)
    for out_index in range(out_size):
        if kernel == TF2_BICUBIC:
            position = (np.float32(out_index) + np.float32(0.5)) * scale - np.float32(0.5)
        else:
            position = np.float32(out_index) * scale
        start = int(np.floor(position))
        offset = np.rint((position - start) * KERNEL_TABLE_SIZE) / KERNEL_TABLE_SIZE
        taps = np.arange(start - 1, start + 3)
        tap_weights = _keys_cubic(offset - np.arange(-1, 3), a)
        if kernel == TF2_BICUBIC:
            inside = (taps >= 0) & (taps < in_size)
            weights[out_index, taps[inside]] = tap_weights[inside]
            weights[out_index] /= weights[out_index].sum()
        else:
            np.add.at(weights[out_index], np.clip(taps, 0, in_size - 1), tap_weights)
    return weights.astype(np.float32)


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class BicubicResize(keras.layers.Layer):
    """Bicubic resampling of (batch, height, width, channels) images to a fixed size, XLA-compilable.

    Equal (to float rounding) to TensorFlow's resize with `kernel` (`tf2_bicubic`:
    `tf.image.resize(images, size, "bicubic")`; `tf1_bicubic`: TF1's `tf.image.resize_bicubic`),
    computed as one matrix product along the rows and one along the columns; the matrices derive from
    the sizes and the kernel, so they are neither weights nor config. Files saved before the kernel was
    an option have none in their config and keep `tf2_bicubic`.
    """

    def __init__(self, height: int, width: int, kernel: str = TF2_BICUBIC, **kwargs) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.height = int(height)
        self.width = int(width)
        self.kernel = check_upsampling(kernel)

    def build(self, input_shape) -> None:
        if input_shape[1] is None or input_shape[2] is None:
            raise ValueError(f"{self.name}: needs a static input height and width, got {tuple(input_shape)}")
        self._rows = bicubic_resize_matrix(input_shape[1], self.height, self.kernel)
        self._columns = bicubic_resize_matrix(input_shape[2], self.width, self.kernel)

    def call(self, images):
        rows = ops.convert_to_tensor(self._rows, dtype=self.compute_dtype)
        columns = ops.convert_to_tensor(self._columns, dtype=self.compute_dtype)
        images = ops.einsum("oh,bhwc->bowc", rows, images)
        return ops.einsum("pw,bowc->bopc", columns, images)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "height": self.height, "width": self.width, "kernel": self.kernel}


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of 1-D linear resampling with half-pixel centres, edges clamped."""
    weights = np.zeros((out_size, in_size), np.float64)
    for out_index in range(out_size):
        position = max((out_index + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(np.floor(position)), in_size - 1)
        high = min(low + 1, in_size - 1)
        fraction = position - low
        weights[out_index, low] += 1 - fraction
        weights[out_index, high] += fraction
    return weights.astype(np.float32)


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class LinearResize(keras.layers.Layer):
    """Bilinear resampling of (batch, height, width, channels) to a fixed size, as two matrix products."""

    def __init__(self, height: int, width: int, **kwargs) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)

    def build(self, input_shape) -> None:
        self._rows = bilinear_resize_matrix(input_shape[1], self.height)
        self._columns = bilinear_resize_matrix(input_shape[2], self.width)

    def call(self, images):
        rows = ops.convert_to_tensor(self._rows, dtype=self.compute_dtype)
        columns = ops.convert_to_tensor(self._columns, dtype=self.compute_dtype)
        return ops.einsum("pw,bowc->bopc", columns, ops.einsum("oh,bhwc->bowc", rows, images))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "height": self.height, "width": self.width}


def raw_inputs(keys: Sequence[str]) -> dict[str, keras.KerasTensor]:
    """Keras inputs for the given keys of `INPUTS`, named by their key."""
    inputs = {}
    for key in keys:
        side, bands = INPUTS[key].size, INPUTS[key].bands
        inputs[key] = keras.Input(shape=(side, side, len(bands)), dtype="float32", name=key)
    return inputs


def standardized(
    inputs: Mapping[str, keras.KerasTensor],
    key: str,
    output_bands: Sequence[str],
    statistics: Statistics,
    name: str | None = None,
) -> keras.KerasTensor:
    """The bands `output_bands` of input `key`, in that order, standardised with `statistics`."""
    layer = BandStandardization(
        input_bands=INPUTS[key].bands,
        output_bands=output_bands,
        mean=[statistics[band][0] for band in output_bands],
        std=[statistics[band][1] for band in output_bands],
        name=name or f"standardize_{key}",
    )
    return layer(inputs[key])


def upsample(
    image: keras.KerasTensor, upsampling: str, size: int = PATCH_SIZE, name: str | None = None
) -> keras.KerasTensor:
    """Bicubic resampling to `size` x `size` with the TensorFlow kernel `upsampling`."""
    return BicubicResize(size, size, kernel=upsampling, name=name)(image)


def stacked_input_keys(modality: Modality) -> tuple[str, ...]:
    """Input keys a single-image model (ResNet, VGG, wrapped plug-ins) reads for `modality`."""
    keys = {S2: ("bands_10m", "bands_20m"), S1: ("bands_s1",)}
    return keys[S2] + keys[S1] if modality == MM else keys[modality]


def stacked_image(
    inputs: Mapping[str, keras.KerasTensor],
    modality: Modality,
    statistics: Statistics,
    upsampling: str = TF2_BICUBIC,
) -> keras.KerasTensor:
    """One standardised 120x120 image in `STACKED_CHANNELS[modality]` order (S2: 10 channels), the
    20 m bands upsampled with the kernel `upsampling`."""
    parts = []
    if modality in (S2, MM):
        parts.append(standardized(inputs, "bands_10m", BANDS_10M_2019_ORDER, statistics))
        bands_20m = standardized(inputs, "bands_20m", BANDS_20M, statistics)
        parts.append(upsample(bands_20m, upsampling, name="upsample_bands_20m"))
    if modality in (S1, MM):
        parts.append(standardized(inputs, "bands_s1", S1_BAND_NAMES, statistics))
    if len(parts) == 1:
        return parts[0]
    return keras.layers.Concatenate(axis=-1, dtype="float32", name="stack_bands")(parts)


def input_keys(model: keras.Model) -> tuple[str, ...]:
    """The input keys a built model reads (feed only these to avoid Keras' structure warning)."""
    return tuple(tensor.name for tensor in model.inputs)


def model_statistics(model: keras.Model) -> dict[str, tuple[float, float]]:
    """Band name -> (mean, std) as held by the model's standardisation layers."""
    statistics = {}
    for layer in _all_layers(model):
        if isinstance(layer, BandStandardization):
            statistics.update(zip(layer.output_bands, zip(layer.mean, layer.std, strict=True), strict=True))
    return statistics


def _all_layers(layer: keras.layers.Layer):
    """`layer` and every layer nested in it (models wrapped in models included)."""
    yield layer
    for sublayer in getattr(layer, "layers", ()):
        yield from _all_layers(sublayer)
