"""Models: parameter counts against hand formulas, output shapes per modality, exact preprocessing,
registry errors, the plug-in route, and `.keras` round trips in safe mode.

Expected parameter counts are computed here from the architecture description (BIGEARTHNET.md
section 4), layer by layer, never read back from a model; the literal values pin the formulas.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from bigearthnet_tf import cli
from bigearthnet_tf.constants import BANDS_BY_NAME, S1_BANDS, S2_BAND_NAMES
from bigearthnet_tf.errors import ConfigError, UserError
from bigearthnet_tf.models import (
    INPUTS,
    MODALITIES,
    PLUGIN_ENV,
    STACKED_CHANNELS,
    BicubicResize,
    build_model,
    input_keys,
    load_model_plugin,
    model_names,
    model_statistics,
    parameter_count,
    refresh_model_plugins,
    registry,
    summary,
    trainable_parameter_count,
)

REAL_MODELS = ("K-BranchCNN", "VGG16", "VGG19", "ResNet50", "ResNet101", "ResNet152")
TINY_MODELS = ("K-BranchCNN-Tiny", "VGG-Tiny", "ResNet-Tiny")
S2_CHANNELS = 10  # B04, B03, B02, B08 + six 20 m bands; B01, B09 unused by ResNet/VGG
S1_STATS = {band.name: (band.mean, band.std) for band in S1_BANDS}


# ---------------------------------------------------------------------------------------------
# Hand formulas. Each returns (all weights, batch-norm channels); BN holds 4 values per channel
# (gamma, beta, moving mean, moving variance), 2 of them trainable.


def conv(kernel: int, channels_in: int, channels_out: int, bias: bool) -> int:
    return kernel * kernel * channels_in * channels_out + (channels_out if bias else 0)


def dense(units_in: int, units_out: int) -> int:
    return units_in * units_out + units_out


def resnet_v1_params(units, classes, channels=S2_CHANNELS, base_depths=(64, 128, 256, 512), root=64):
    """Slim resnet_v1: no conv biases; projection shortcut (1x1 conv + BN) only where depth changes."""
    total, bn_channels = conv(7, channels, root, bias=False), root
    depth_in = root
    for unit_count, base in zip(units, base_depths, strict=True):
        depth = 4 * base
        for _ in range(unit_count):
            if depth_in != depth:
                total += conv(1, depth_in, depth, bias=False)
                bn_channels += depth
            total += conv(1, depth_in, base, False) + conv(3, base, base, False) + conv(1, base, depth, False)
            bn_channels += base + base + depth
            depth_in = depth
    total += conv(1, depth_in, classes, bias=True)  # logits: 1x1 conv with bias, no BN
    return total + 4 * bn_channels, bn_channels


def vgg_params(convs_per_stage, classes, channels=S2_CHANNELS, widths=(64, 128, 256, 512, 512), fc=4096):
    """Slim vgg: 3x3 convs with biases, fc6 7x7 conv, fc7 and fc8 1x1 convs, no BN."""
    total, channels_in = 0, channels
    for convs, width in zip(convs_per_stage, widths, strict=True):
        for _ in range(convs):
            total += conv(3, channels_in, width, bias=True)
            channels_in = width
    total += conv(7, channels_in, fc, True) + conv(1, fc, fc, True) + conv(1, fc, classes, True)
    return total, 0


def kbranch_params(classes, modality="S2"):
    """Conv/FC with bias + BN everywhere; flatten sizes from SAME convs and 2x2 VALID pools."""

    def branch_10m(channels):  # 120 -> pool 60 -> pool 30; 64 maps of 30x30
        weights = conv(5, channels, 32, True) + conv(5, 32, 32, True) + conv(3, 32, 64, True)
        weights += dense(30 * 30 * 64, 128)
        return weights, 32 + 32 + 64 + 128

    def branch_20m():  # 60 -> pool 30
        weights = (
            conv(3, 6, 32, True) + conv(3, 32, 32, True) + conv(3, 32, 64, True) + dense(30 * 30 * 64, 128)
        )
        return weights, 32 + 32 + 64 + 128

    def branch_60m():  # 20x20 throughout
        weights = (
            conv(2, 2, 32, True) + conv(2, 32, 32, True) + conv(2, 32, 32, True) + dense(20 * 20 * 32, 128)
        )
        return weights, 32 + 32 + 32 + 128

    branches = {"S2": [branch_10m(4), branch_20m(), branch_60m()], "S1": [branch_10m(2)]}
    branches["MM"] = branches["S2"] + branches["S1"]
    parts = branches[modality]
    weights = sum(w for w, _ in parts) + dense(128 * len(parts), 128) + dense(128, classes)
    bn_channels = sum(c for _, c in parts) + 128
    return weights + 4 * bn_channels, bn_channels


EXPECTED = {
    "ResNet50": lambda k: resnet_v1_params((3, 4, 6, 3), k),
    "ResNet101": lambda k: resnet_v1_params((3, 4, 23, 3), k),
    "ResNet152": lambda k: resnet_v1_params((3, 8, 36, 3), k),
    "VGG16": lambda k: vgg_params((2, 2, 3, 3, 3), k),
    "VGG19": lambda k: vgg_params((2, 2, 4, 4, 4), k),
    "K-BranchCNN": lambda k: kbranch_params(k),
}

# The formulas' values, pinned: (19 classes, 43 classes).
LITERAL_COUNTS = {
    "K-BranchCNN": (16_524_979, 16_528_075),
    "VGG16": (134_342_419, 134_440_747),
    "VGG19": (139_652_115, 139_750_443),
    "ResNet50": (23_622_035, 23_671_211),
    "ResNet101": (42_666_387, 42_715_563),
    "ResNet152": (58_356_115, 58_405_291),
}


def raw_bands(keys, batch=2, seed=0):
    """Random raw band values in the range of real uint16 reflectances / dB backscatter."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in keys:
        side, bands = INPUTS[key].size, INPUTS[key].bands
        low, high = (-30.0, 5.0) if key == "bands_s1" else (0.0, 10000.0)
        out[key] = rng.uniform(low, high, (batch, side, side, len(bands))).astype("float32")
    return out


@pytest.fixture
def isolated_registry(monkeypatch):
    """Plug-ins registered by a test vanish after it."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_loaded_plugins", dict(registry._loaded_plugins))
    monkeypatch.setattr(registry, "_entry_points_scanned", registry._entry_points_scanned)
    monkeypatch.delenv(PLUGIN_ENV, raising=False)


# ---------------------------------------------------------------------------------------------
# Registry


def test_builtin_names_registered():
    names = model_names()
    for name in (*REAL_MODELS, *TINY_MODELS):
        assert name in names


def test_the_catalogue_names_every_built_in_in_registry_order():
    """`bigearthnet models` and config checks read the Keras-free catalogue; the registry agrees."""
    from bigearthnet_tf.model_catalogue import BUILTIN_MODELS, BUILTIN_ORIGIN
    from bigearthnet_tf.models import get_model_spec

    builtins = [name for name in model_names() if get_model_spec(name).origin == BUILTIN_ORIGIN]
    assert builtins == list(BUILTIN_MODELS)
    assert all(get_model_spec(name).description == BUILTIN_MODELS[name] for name in builtins)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as caught:
        build_model("ResNet51", 19)
    message = str(caught.value)
    assert "'ResNet51'" in message and "did you mean 'ResNet50'" in message
    for name in (*REAL_MODELS, *TINY_MODELS):
        assert name in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"num_classes": 19, "modality": "S3"}, "'S3'"),
        ({"num_classes": 19, "statistics": {"B13": (0.0, 1.0)}}, "'B13'"),
        ({"num_classes": 19, "statistics": {"B02": (0.0, 0.0)}}, "B02"),
        ({"num_classes": 19, "statistics": {"VV": "x"}}, "VV"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_model("ResNet-Tiny", **kwargs)


# ---------------------------------------------------------------------------------------------
# Parameter counts and shapes of the real models (built, one forward pass for ResNet50 only)


def test_formulas_match_pinned_literals():
    for name, (at_19, at_43) in LITERAL_COUNTS.items():
        assert (EXPECTED[name](19)[0], EXPECTED[name](43)[0]) == (at_19, at_43), name


@pytest.mark.parametrize("classes", [19, 43])
@pytest.mark.parametrize("name", REAL_MODELS)
@pytest.mark.slow
def test_real_model_parameter_count_and_shape(name, classes):
    model = build_model(name, classes)
    total, bn_channels = EXPECTED[name](classes)
    assert parameter_count(model) == total == LITERAL_COUNTS[name][classes == 43]
    # BN moving mean and variance are the only non-trainable weights, and they are counted.
    assert trainable_parameter_count(model) == total - 2 * bn_channels
    assert model.output.shape == (None, classes)
    expected_keys = (
        ("bands_10m", "bands_20m", "bands_60m") if name == "K-BranchCNN" else ("bands_10m", "bands_20m")
    )
    assert input_keys(model) == expected_keys
    assert model.name == name
    if name == "ResNet50" and classes == 19:
        logits = model(raw_bands(input_keys(model), batch=1), training=False)
        assert logits.shape == (1, 19) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_resnet_and_vgg_counts_follow_the_modality_channels(modality):
    channels = {"S2": 10, "S1": 2, "MM": 12}[modality]
    resnet = build_model("ResNet-Tiny", 19, modality=modality)
    expected, _ = resnet_v1_params((2, 1, 1, 1), 19, channels=channels, base_depths=(8, 16, 32, 64), root=8)
    assert parameter_count(resnet) == expected
    vgg = build_model("VGG-Tiny", 19, modality=modality)
    expected, _ = vgg_params((1, 1, 1, 1, 1), 19, channels=channels, widths=(8, 16, 32, 32, 32), fc=64)
    assert parameter_count(vgg) == expected


@pytest.mark.parametrize("modality", ["S1", "MM"])
def test_kbranch_other_modalities(modality):
    model = build_model("K-BranchCNN", 43, modality=modality)
    assert parameter_count(model) == kbranch_params(43, modality)[0]
    keys = {"S1": ("bands_s1",), "MM": ("bands_10m", "bands_20m", "bands_60m", "bands_s1")}[modality]
    assert input_keys(model) == keys


# ---------------------------------------------------------------------------------------------
# Tiny variants: forward passes for every modality


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_forward_shapes(name, modality):
    model = build_model(name, 19, modality=modality)
    inputs = raw_bands(input_keys(model), batch=3)
    for training in (False, True):
        logits = model(inputs, training=training)
        assert logits.shape == (3, 19)
        assert logits.dtype == "float32"
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))
    s1_keys = {"bands_s1"} if modality in ("S1", "MM") else set()
    assert ("bands_s1" in input_keys(model)) == bool(s1_keys)
    assert ("bands_10m" in input_keys(model)) == (modality != "S1")


def test_tiny_model_logits_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("ResNet-Tiny", 19, modality="MM")
        standardize = model.get_layer("standardize_bands_10m")
        assert standardize.compute_dtype == "float32"
        assert model(raw_bands(input_keys(model)), training=False).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------------------------------------
# Preprocessing: exact values, channel order, statistics


def tf1_resize_bicubic(images, size):
    """The 2019 graph's `tf.image.resize_bicubic` (TF1 defaults), through TensorFlow's own legacy op."""
    return tf.raw_ops.ResizeBicubic(
        images=images, size=size, align_corners=False, half_pixel_centers=False
    ).numpy()


def _expected_s2_image(bands_10m, bands_20m, statistics=None, upsampling="tf1_bicubic"):
    """numpy standardisation, 2019 channel order, then TensorFlow's own bicubic op on the 20 m bands."""
    stats = {name: (band.mean, band.std) for name, band in BANDS_BY_NAME.items()} | (statistics or {})

    def standardise(values, names):
        mean = np.array([stats[n][0] for n in names], dtype="float32")
        std = np.array([stats[n][1] for n in names], dtype="float32")
        return (values - mean) / std

    order_10m = [("B02", "B03", "B04", "B08").index(b) for b in ("B04", "B03", "B02", "B08")]
    image_10m = standardise(bands_10m[..., order_10m], ("B04", "B03", "B02", "B08"))
    image_20m = standardise(bands_20m, ("B05", "B06", "B07", "B8A", "B11", "B12"))
    if upsampling == "tf1_bicubic":
        upsampled = tf1_resize_bicubic(image_20m, (120, 120))
    else:
        upsampled = tf.image.resize(image_20m, (120, 120), method="bicubic").numpy()
    return np.concatenate([image_10m, upsampled], axis=-1)


def assert_float32_close(got, expected):
    """Equal up to float32 rounding of sums whose terms reach the largest magnitude present."""
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(expected).max())))


def _layer_output(model, layer_name, inputs):
    probe = keras.Model(model.inputs, model.get_layer(layer_name).output)
    return keras.ops.convert_to_numpy(probe(inputs))


@pytest.mark.parametrize("name", ["ResNet-Tiny", "VGG-Tiny"])
def test_2019_architectures_upsample_with_the_2019_kernel_by_default(name):
    model = build_model(name, 19)
    assert model.model_options == {"upsampling": "tf1_bicubic"}
    inputs = raw_bands(input_keys(model), batch=2, seed=3)
    got = _layer_output(model, "stack_bands", inputs)
    expected = _expected_s2_image(inputs["bands_10m"], inputs["bands_20m"])
    assert got.shape == (2, 120, 120, 10)
    assert_float32_close(got, expected)


def test_tf2_kernel_stays_available():
    model = build_model("ResNet-Tiny", 19, upsampling="tf2_bicubic")
    assert model.model_options == {"upsampling": "tf2_bicubic"}
    inputs = raw_bands(input_keys(model), batch=2, seed=3)
    got = _layer_output(model, "stack_bands", inputs)
    expected = _expected_s2_image(inputs["bands_10m"], inputs["bands_20m"], upsampling="tf2_bicubic")
    assert_float32_close(got, expected)
    with pytest.raises(ConfigError, match="unknown upsampling 'bilinear'; expected one of tf1_bicubic"):
        build_model("ResNet-Tiny", 19, upsampling="bilinear")
    with pytest.raises(ConfigError, match="takes no option upsampling"):
        build_model("K-BranchCNN-Tiny", 19, upsampling="tf2_bicubic")


@pytest.mark.parametrize(
    ("size_in", "size_out"), [((60, 60), (120, 120)), ((20, 20), (120, 120)), ((13, 9), (7, 16))]
)
def test_bicubic_resize_equals_tf_image_resize(size_in, size_out):
    images = np.random.default_rng(6).normal(0.0, 3.0, (2, *size_in, 3)).astype("float32")
    got = keras.ops.convert_to_numpy(BicubicResize(*size_out)(images))
    expected = tf.image.resize(images, size_out, method="bicubic").numpy()
    assert_float32_close(got, expected)


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [((60, 60), (120, 120)), ((20, 20), (120, 120)), ((13, 9), (7, 16)), ((7, 5), (13, 11))],
)
def test_tf1_kernel_equals_the_legacy_op(size_in, size_out):
    images = np.random.default_rng(8).normal(0.0, 3.0, (2, *size_in, 3)).astype("float32")
    got = keras.ops.convert_to_numpy(BicubicResize(*size_out, kernel="tf1_bicubic")(images))
    assert_float32_close(got, tf1_resize_bicubic(images, size_out))


def test_tf1_kernel_on_the_real_example_patches(example_paths):
    """The 20 m bands of the six real patches, standardised as the 2019 pipeline did, upsampled by our
    layer and by TensorFlow's legacy op: equal to 1e-5 (the two kernels differ by up to whole stds)."""
    from bigearthnet_tf.archive import read_patch
    from bigearthnet_tf.constants import BANDS_20M

    names = sorted(p.name for p in example_paths.s2.iterdir() if p.is_dir())
    patches = [read_patch(example_paths.s2, name) for name in names]
    assert len(patches) == 6
    mean = np.array([BANDS_BY_NAME[b].mean for b in BANDS_20M], dtype="float32")
    std = np.array([BANDS_BY_NAME[b].std for b in BANDS_20M], dtype="float32")
    images = np.stack([np.stack([p.bands[b] for b in BANDS_20M], -1) for p in patches]).astype("float32")
    images = (images - mean) / std
    got = keras.ops.convert_to_numpy(BicubicResize(120, 120, kernel="tf1_bicubic")(images))
    expected = tf1_resize_bicubic(images, (120, 120))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    modern = tf.image.resize(images, (120, 120), method="bicubic").numpy()
    assert np.abs(modern - expected).max() > 0.1  # the kernel choice matters on real data


def test_resnet_logits_are_he_initialised():
    logits = build_model("ResNet-Tiny", 19).get_layer("logits")
    assert isinstance(logits.kernel_initializer, keras.initializers.HeNormal)


def test_preprocessing_trains_under_xla():
    """Keras compiles with XLA by default on GPUs, so every preprocessing op needs an XLA kernel
    (TF's own resize ops have none). The MM preprocessing (reorder, standardise, upsample, stack)
    under a small head keeps the compile quick; the convolutions behind it are stock Keras layers."""
    full = build_model("ResNet-Tiny", 19, modality="MM")
    features = keras.layers.GlobalAveragePooling2D()(full.get_layer("stack_bands").output)
    model = keras.Model(full.inputs, keras.layers.Dense(19)(features))
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=True)
    labels = (np.random.default_rng(7).random((4, 19)) > 0.5).astype("float32")
    history = model.fit(raw_bands(input_keys(model), batch=4), labels, batch_size=4, epochs=1, verbose=0)
    assert model.jit_compile and np.isfinite(history.history["loss"][0])


def test_statistics_override_reaches_the_layers_and_the_values():
    custom = {"B03": (100.0, 50.0), "B12": (7.0, 3.0), "VH": (-20.0, 2.0)}
    model = build_model("VGG-Tiny", 19, modality="MM", statistics=custom)
    inputs = raw_bands(input_keys(model), batch=1, seed=4)
    got = _layer_output(model, "stack_bands", inputs)
    expected = _expected_s2_image(inputs["bands_10m"], inputs["bands_20m"], custom)
    assert_float32_close(got[..., :10], expected)
    assert_float32_close(got[..., 11], (inputs["bands_s1"][..., 1] + 20.0) / 2.0)
    stats = model_statistics(model)
    assert stats["B03"] == (100.0, 50.0) and stats["VH"] == (-20.0, 2.0)
    assert stats["B02"] == (BANDS_BY_NAME["B02"].mean, BANDS_BY_NAME["B02"].std)


def _constant_bands(keys):
    """Each band filled with mean + code * std, so after standardisation it reads `code` exactly."""
    codes = {name: float(i + 1) for i, name in enumerate(S2_BAND_NAMES)} | {"VV": 20.0, "VH": 30.0}
    stats = {name: (band.mean, band.std) for name, band in BANDS_BY_NAME.items()} | S1_STATS
    out = {}
    for key in keys:
        side, bands = INPUTS[key].size, INPUTS[key].bands
        planes = [np.full((side, side), stats[b][0] + codes[b] * stats[b][1]) for b in bands]
        out[key] = np.stack(planes, axis=-1)[None].astype("float32")
    return out, codes


def test_mm_channel_order_and_vv_vh_never_swapped():
    model = build_model("ResNet-Tiny", 19, modality="MM")
    inputs, codes = _constant_bands(input_keys(model))
    got = _layer_output(model, "stack_bands", inputs)
    assert STACKED_CHANNELS["MM"] == (
        "B04",
        "B03",
        "B02",
        "B08",
        "B05",
        "B06",
        "B07",
        "B8A",
        "B11",
        "B12",
        "VV",
        "VH",
    )
    for channel, band in enumerate(STACKED_CHANNELS["MM"]):
        np.testing.assert_allclose(got[..., channel], codes[band], atol=1e-4, err_msg=band)


def test_kbranch_branches_get_the_2019_bands():
    model = build_model("K-BranchCNN-Tiny", 19, modality="MM")
    inputs, codes = _constant_bands(input_keys(model))
    branches = {
        "standardize_bands_10m": ("B04", "B03", "B02", "B08"),
        "standardize_bands_20m": ("B05", "B06", "B07", "B8A", "B11", "B12"),
        "standardize_bands_60m": ("B01", "B09"),
        "standardize_bands_s1": ("VV", "VH"),
    }
    sides = {"standardize_bands_10m": 120, "standardize_bands_20m": 60, "standardize_bands_60m": 20}
    for layer, bands in branches.items():
        got = _layer_output(model, layer, inputs)
        assert got.shape[1:3] == (sides.get(layer, 120),) * 2  # native resolution, no resampling
        for channel, band in enumerate(bands):
            np.testing.assert_allclose(got[..., channel], codes[band], atol=1e-4, err_msg=f"{layer} {band}")


def test_preprocessing_holds_no_weights():
    model = build_model("K-BranchCNN-Tiny", 19, modality="MM")
    for layer in model.layers:
        if layer.name.startswith(("standardize_", "upsample_", "stack_")):
            assert layer.weights == []


# ---------------------------------------------------------------------------------------------
# Saving and loading in safe mode


@pytest.mark.parametrize(
    ("name", "modality"), [("K-BranchCNN-Tiny", "MM"), ("ResNet-Tiny", "S2"), ("VGG-Tiny", "S1")]
)
def test_keras_round_trip_in_safe_mode(tmp_path, name, modality):
    custom = {"B04": (500.0, 600.0), "VV": (-11.0, 4.0)}
    model = build_model(name, 43, modality=modality, statistics=custom)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    inputs = raw_bands(input_keys(model), batch=2, seed=5)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(inputs, training=False)),
        keras.ops.convert_to_numpy(model(inputs, training=False)),
    )
    assert loaded.name == name
    assert model_statistics(loaded) == model_statistics(model)
    assert parameter_count(loaded) == parameter_count(model)


# ---------------------------------------------------------------------------------------------
# The extension route


LEGACY_PLUGIN = """
import keras

def dnn_model(nb_class):
    # 2019 habit: one builder taking the class count; a network on the 120x120x10 S2 image.
    return keras.Sequential(
        [
            keras.Input((120, 120, 10)),
            keras.layers.Conv2D(4, 3, strides=4),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(nb_class),
        ]
    )
"""

DECORATOR_PLUGIN = """
import keras
from bigearthnet_tf.models import STACKED_CHANNELS, build_model, register_model

@register_model("WideTinyResNet")
def build(num_classes, modality="S2", statistics=None):
    # returns a model that already reads the raw-band dict: used as is
    return build_model("ResNet-Tiny", num_classes, modality=modality, statistics=statistics)


@register_model("SingleImageNet")
def build_single_image(num_classes, modality="S2", statistics=None):
    # a network on the stacked image (how modern backbones plug in): the registry adds preprocessing
    channels = len(STACKED_CHANNELS[modality])
    layers = [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(num_classes)]
    return keras.Sequential([keras.Input((120, 120, channels)), *layers])
"""


def test_legacy_dnn_model_plugin_via_environment(isolated_registry, tmp_path, monkeypatch):
    plugin = tmp_path / "LegacyNet.py"
    plugin.write_text(LEGACY_PLUGIN)
    monkeypatch.setenv(PLUGIN_ENV, str(plugin))
    assert "LegacyNet" in model_names()
    model = build_model("LegacyNet", 19)
    assert input_keys(model) == ("bands_10m", "bands_20m")  # wrapped with the default S2 inputs
    assert model.name == "LegacyNet"
    assert model(raw_bands(input_keys(model)), training=False).shape == (2, 19)
    assert model_statistics(model)["B04"] == (BANDS_BY_NAME["B04"].mean, BANDS_BY_NAME["B04"].std)
    with pytest.raises(UserError, match="does not accept the S1 input image"):
        build_model("LegacyNet", 19, modality="S1")


def test_decorator_plugin_via_function(isolated_registry, tmp_path):
    plugin = tmp_path / "my_models.py"
    plugin.write_text(DECORATOR_PLUGIN)
    assert load_model_plugin(plugin) == ("WideTinyResNet", "SingleImageNet")
    assert load_model_plugin(plugin) == ("WideTinyResNet", "SingleImageNet")  # idempotent
    model = build_model("WideTinyResNet", 43, modality="S1")
    assert model.output.shape == (None, 43) and input_keys(model) == ("bands_s1",)
    assert registry.get_model_spec("WideTinyResNet").origin == f"plugin {plugin.resolve()}"
    custom = {"VH": (-18.0, 4.0)}
    model = build_model("SingleImageNet", 19, modality="MM", statistics=custom)
    assert input_keys(model) == ("bands_10m", "bands_20m", "bands_s1")
    assert model_statistics(model)["VH"] == (-18.0, 4.0)
    assert model(raw_bands(input_keys(model)), training=False).shape == (2, 19)


def test_entry_point_plugin(isolated_registry, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "ep_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "ep_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n"
    )
    (site / "ep_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[bigearthnet_tf.models]\nEntryNet = ep_legacy_models\n"
    )
    (site / "ep_legacy_models.py").write_text(LEGACY_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    refresh_model_plugins()
    assert "EntryNet" in model_names()
    assert registry.get_model_spec("EntryNet").builder is None  # nothing imported until built
    model = build_model("EntryNet", 19)
    assert model(raw_bands(input_keys(model)), training=False).shape == (2, 19)


def test_config_cannot_import_a_module(isolated_registry, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef dnn_model(n): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("evil_module", "evil_module.dnn_model", str(tmp_path / "evil_module.py"), "os.path"):
        with pytest.raises(ConfigError, match="unknown model_name"):
            build_model(name, 19)
    assert not marker.exists()


def test_bad_plugins_are_user_errors(isolated_registry, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match=r"broken\.py: import failed: RuntimeError: boom"):
        load_model_plugin(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(UserError, match="registers no model"):
        load_model_plugin(empty)
    with pytest.raises(UserError, match="no such file"):
        load_model_plugin(tmp_path / "missing.py")
    clash = tmp_path / "clash.py"
    clash.write_text("from bigearthnet_tf.models import register_model\nregister_model('ResNet50')(print)\n")
    with pytest.raises(UserError, match="'ResNet50' is already registered by bigearthnet_tf"):
        load_model_plugin(clash)
    wrong_output = tmp_path / "WrongOut.py"
    wrong_output.write_text(LEGACY_PLUGIN.replace("Dense(nb_class)", "Dense(nb_class + 1)"))
    load_model_plugin(wrong_output)
    with pytest.raises(UserError, match=r"expected one output of shape \(batch, 19\)"):
        build_model("WrongOut", 19)


# ---------------------------------------------------------------------------------------------
# `bigearthnet models`


@pytest.mark.slow
def test_models_command_json_and_table(monkeypatch, capsys):
    monkeypatch.setattr(summary, "model_names", lambda: TINY_MODELS)
    cli.main(["models", "--json", "--label-type", "original", "--parameters"])
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(TINY_MODELS)
    for row in rows:
        assert row["classes"] == 43
        assert row["parameters"] == parameter_count(build_model(row["name"], 43))
        assert row["input_keys"][:2] == ["bands_10m", "bands_20m"]
    cli.main(["models", "--parameters"])
    table = capsys.readouterr().out
    for name in TINY_MODELS:
        assert name in table
    with pytest.raises(SystemExit) as caught:
        cli.main(["models", "--label-type", "nineteen"])
    assert caught.value.code == 1


# ---------------------------------------------------------------------------------------------
# `bigearthnet models`


def test_models_command_lists_names_without_building_any(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("listing names must not build models")

    monkeypatch.setattr(summary, "build_model", refuse)
    cli.main(["models", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(model_names())
    assert {"ResNet50", "reBEN-ViT", "K-BranchCNN-Tiny"} <= {row["name"] for row in rows}
    cli.main(["models"])
    assert "bigearthnet models --parameters" in capsys.readouterr().out


def test_models_command_counts_parameters_on_request(capsys):
    cli.main(
        ["models", "ResNet-Tiny", "K-BranchCNN-Tiny", "--parameters", "--json", "--label-type", "original"]
    )
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == ["ResNet-Tiny", "K-BranchCNN-Tiny"]
    for row in rows:
        model = build_model(row["name"], 43)
        assert row["parameters"] == parameter_count(model) and row["classes"] == 43
        assert row["trainable_parameters"] == trainable_parameter_count(model)
    with pytest.raises(SystemExit) as stop:
        cli.main(["models", "ResNet51"])
    assert stop.value.code == 2 and "did you mean 'ResNet50'" in capsys.readouterr().err
