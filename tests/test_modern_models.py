"""Modern backbones: parameter counts against reference totals and hand formulas, shapes per modality,
drop-path schedules, the DropPath layer itself, mixed precision, XLA, and safe-mode round trips.

The keras.applications counts are derived from the ImageNet reference totals (1000 classes, 3 channels,
with top) by swapping the stem's input channels and the classifier; the ViT count is computed layer by
layer. The literal values pin the formulas.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bigearthnet_tf.errors import ConfigError
from bigearthnet_tf.models import (
    INPUTS,
    MODALITIES,
    build_model,
    get_model_spec,
    input_keys,
    model_names,
    parameter_count,
    trainable_parameter_count,
)
from bigearthnet_tf.models.modern import (
    VIT_VARIANTS,
    DropPath,
    PositionEmbedding,
    ViTConfig,
    build_convnext_tiny,
    build_efficientnet_v2_s,
    build_vit,
)

MODERN_MODELS = ("EfficientNetV2-S", "ConvNeXt-Tiny", "ViT-S8")
CHANNELS = {"S2": 10, "S1": 2, "MM": 12}

# keras.applications.<Model>(include_top=True, weights=None, classes=1000) on 3 channels; the
# slow test below rebuilds them.
EFFICIENTNET_V2_S_IMAGENET = 21_612_360
CONVNEXT_TINY_IMAGENET = 28_589_128
IMAGENET_CLASSES = 1000


def dense(units_in: int, units_out: int) -> int:
    return units_in * units_out + units_out


def efficientnet_v2_s_params(channels: int, classes: int) -> int:
    """Reference total, stem 3x3x24 conv without bias re-fed, 1280-feature classifier swapped."""
    stem = 3 * 3 * 24  # per input channel
    return (
        EFFICIENTNET_V2_S_IMAGENET
        + stem * (channels - 3)
        - dense(1280, IMAGENET_CLASSES)
        + dense(1280, classes)
    )


def convnext_tiny_params(channels: int, classes: int) -> int:
    """Reference total, 4x4/4 stem conv (96 filters, bias) re-fed, 768-feature classifier swapped.

    Without the top, `pooling="avg"` keeps a LayerNorm of the same size as the head's.
    """
    stem = 4 * 4 * 96  # per input channel
    return CONVNEXT_TINY_IMAGENET + stem * (channels - 3) - dense(768, IMAGENET_CLASSES) + dense(768, classes)


def vit_params(config: ViTConfig, channels: int, classes: int) -> int:
    """Patch conv with bias, learned positions, pre-norm blocks (2 LayerNorms, attention with biases,
    two-layer MLP), final LayerNorm, dense classifier; no class token."""
    width = config.width
    layer_norm = 2 * width
    patch = config.patch_size * config.patch_size * channels * width + width
    positions = config.tokens * width
    attention = 4 * (width * width + width)  # query, key, value and output projections
    mlp = dense(width, config.mlp_width) + dense(config.mlp_width, width)
    blocks = config.depth * (2 * layer_norm + attention + mlp)
    return patch + positions + blocks + layer_norm + dense(width, classes)


EXPECTED = {
    "EfficientNetV2-S": efficientnet_v2_s_params,
    "ConvNeXt-Tiny": convnext_tiny_params,
    "ViT-S8": lambda channels, classes: vit_params(VIT_VARIANTS["ViT-S8"], channels, classes),
}
FEATURES = {"EfficientNetV2-S": 1280, "ConvNeXt-Tiny": 768, "ViT-S8": 384}

# The formulas' values, pinned: (S2 with 19 classes, MM with 43 classes).
LITERAL_COUNTS = {
    "EfficientNetV2-S": (20_357_211, 20_388_387),
    "ConvNeXt-Tiny": (27_845_491, 27_867_019),
    "ViT-S8": (21_634_195, 21_692_587),
}


def raw_bands(keys, batch=2, seed=0):
    """Random raw band values in the range of real reflectances / dB backscatter."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in keys:
        side, bands = INPUTS[key].size, INPUTS[key].bands
        low, high = (-30.0, 5.0) if key == "bands_s1" else (0.0, 10000.0)
        out[key] = rng.uniform(low, high, (batch, side, side, len(bands))).astype("float32")
    return out


def image_network(model: keras.Model) -> keras.Model:
    """The single-image network the registry wrapped (the one nested model)."""
    (inner,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return inner


def drop_path_rates(network: keras.Model) -> dict[str, float]:
    return {layer.name: layer.rate for layer in network.layers if isinstance(layer, DropPath)}


def as_numpy(tensor) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


# ---------------------------------------------------------------------------------------------
# Registry and parameter counts


def test_modern_names_registered():
    names = model_names()
    for name in (*MODERN_MODELS, "ViT-S8-Tiny"):
        assert name in names
        assert get_model_spec(name).origin == "bigearthnet_tf"


def test_formulas_match_pinned_literals():
    for name, (s2_19, mm_43) in LITERAL_COUNTS.items():
        assert (EXPECTED[name](10, 19), EXPECTED[name](12, 43)) == (s2_19, mm_43), name


@pytest.mark.parametrize("name", MODERN_MODELS)
@pytest.mark.slow
def test_real_model_parameter_counts_and_shapes(name):
    s2 = build_model(name, 19, modality="S2")
    assert parameter_count(s2) == EXPECTED[name](10, 19) == LITERAL_COUNTS[name][0]
    assert s2.output.shape == (None, 19) and s2.name == name
    assert input_keys(s2) == ("bands_10m", "bands_20m")
    logits = as_numpy(s2(raw_bands(input_keys(s2), batch=1), training=False))
    assert logits.shape == (1, 19) and logits.dtype == np.float32 and np.all(np.isfinite(logits))

    mm = build_model(name, 43, modality="MM")
    assert parameter_count(mm) == EXPECTED[name](12, 43) == LITERAL_COUNTS[name][1]
    assert input_keys(mm) == ("bands_10m", "bands_20m", "bands_s1")
    # Only the stem sees the channels and only the classifier the classes.
    stem_weights_per_channel = {
        "EfficientNetV2-S": 3 * 3 * 24,
        "ConvNeXt-Tiny": 4 * 4 * 96,
        "ViT-S8": 8 * 8 * 384,
    }
    assert parameter_count(mm) - parameter_count(s2) == (
        2 * stem_weights_per_channel[name] + (FEATURES[name] + 1) * (43 - 19)
    )
    if name == "ViT-S8":  # no batch norm: every weight trains
        assert trainable_parameter_count(mm) == parameter_count(mm)


@pytest.mark.slow
def test_imagenet_reference_totals():
    efficientnet = keras.applications.EfficientNetV2S(weights=None, classes=IMAGENET_CLASSES)
    assert efficientnet.count_params() == EFFICIENTNET_V2_S_IMAGENET
    convnext = keras.applications.ConvNeXtTiny(weights=None, classes=IMAGENET_CLASSES)
    assert convnext.count_params() == CONVNEXT_TINY_IMAGENET


@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_vit_every_modality(modality):
    config = VIT_VARIANTS["ViT-S8-Tiny"]
    model = build_model("ViT-S8-Tiny", 19, modality=modality)
    assert parameter_count(model) == vit_params(config, CHANNELS[modality], 19)
    inputs = raw_bands(input_keys(model), batch=3)
    for training in (False, True):
        logits = as_numpy(model(inputs, training=training))
        assert logits.shape == (3, 19) and logits.dtype == np.float32 and np.all(np.isfinite(logits))
    tokens = image_network(model).get_layer("patch_tokens").output
    assert tuple(tokens.shape) == (None, 15 * 15, config.width)  # patch 8 on 120 px


# ---------------------------------------------------------------------------------------------
# Dropout and drop path


def test_efficientnet_drop_path_schedule():
    network = build_efficientnet_v2_s(19, drop_path_rate=0.3, dropout=0.25)
    rates = drop_path_rates(network)
    # EfficientNetV2-S has 40 blocks; the 34 with a residual branch drop it at 0.3 * index / 40.
    assert len(rates) == 34
    assert rates["block1b_drop"] == pytest.approx(0.3 * 1 / 40)
    assert rates["block6o_drop"] == pytest.approx(0.3 * 39 / 40)
    assert rates["block4b_drop"] == pytest.approx(0.3 * 11 / 40)  # 1a 1b 2a-2d 3a-3d 4a 4b
    assert [layer.name for layer in network.layers if type(layer) is keras.layers.Dropout] == ["head_dropout"]
    assert network.get_layer("head_dropout").rate == 0.25
    assert network.count_params() == EXPECTED["EfficientNetV2-S"](10, 19)


def test_convnext_drop_path_schedule():
    network = build_convnext_tiny(19, modality="S1", drop_path_rate=0.2, dropout=0.1)
    rates = drop_path_rates(network)
    assert len(rates) == 18  # depths 3, 3, 9, 3
    assert list(rates.values()) == pytest.approx(list(np.linspace(0.0, 0.2, 18)))
    assert rates["convnext_tiny_stage_3_block_2_drop_path"] == pytest.approx(0.2)
    assert not any(layer.name.endswith("_identity") for layer in network.layers)
    assert network.get_layer("head_dropout").rate == 0.1
    assert network.count_params() == EXPECTED["ConvNeXt-Tiny"](2, 19)


def test_vit_rates_reach_their_layers():
    network = build_vit(
        19,
        config=VIT_VARIANTS["ViT-S8-Tiny"],
        name="ViT-S8-Tiny",
        dropout=0.1,
        attention_dropout=0.05,
        drop_path_rate=0.2,
    )
    rates = drop_path_rates(network)
    assert rates == {
        "block_0_attention_drop_path": 0.0,
        "block_0_mlp_drop_path": 0.0,
        "block_1_attention_drop_path": pytest.approx(0.2),
        "block_1_mlp_drop_path": pytest.approx(0.2),
    }
    assert network.get_layer("block_1_attention")._dropout == 0.05
    dropouts = {layer.rate for layer in network.layers if isinstance(layer, keras.layers.Dropout)}
    assert dropouts == {0.1}


@pytest.mark.parametrize(
    ("builder", "keywords"),
    [
        (build_efficientnet_v2_s, {"dropout": 1.0}),
        (build_convnext_tiny, {"drop_path_rate": -0.1}),
        (build_vit, {"attention_dropout": "0.1"}),
    ],
)
def test_bad_rates_are_refused(builder, keywords):
    (argument,) = keywords
    with pytest.raises(
        ConfigError, match=rf"{argument} must be a number in \[0, 1\), got {keywords[argument]!r}"
    ):
        builder(19, **keywords)


def test_vit_config_must_tile_the_patch():
    with pytest.raises(ValueError, match="patch size 7 must divide 120"):
        build_vit(19, config=ViTConfig(patch_size=7, width=32, depth=1, heads=2, mlp_width=64))


def test_drop_path_layer():
    ones = np.ones((2000, 3, 4), dtype="float32")
    layer = DropPath(0.5, seed=1)
    np.testing.assert_array_equal(as_numpy(layer(ones, training=False)), ones)
    dropped = as_numpy(layer(ones, training=True))
    per_sample = dropped.reshape(len(ones), -1)
    # Whole samples are dropped or kept; kept ones are scaled by 1 / (1 - rate).
    assert np.all((per_sample == 0.0).all(axis=1) | (per_sample == 2.0).all(axis=1))
    kept = (per_sample[:, 0] == 2.0).mean()
    assert 0.45 < kept < 0.55  # 2000 Bernoulli(0.5) draws: 4.5 standard deviations
    identity = DropPath(0.0)
    np.testing.assert_array_equal(as_numpy(identity(ones, training=True)), ones)
    assert identity.variables == [] and layer.weights == []
    with pytest.raises(ValueError, match="rate must be in"):
        DropPath(1.0)


def test_position_embedding_adds_a_learned_table():
    layer = PositionEmbedding()
    tokens = np.zeros((2, 5, 3), dtype="float32")
    out = as_numpy(layer(tokens))
    embedding = as_numpy(layer.embedding)
    assert embedding.shape == (5, 3) and np.abs(embedding).max() <= 2 * 0.02  # truncated at 2 stddev
    np.testing.assert_array_equal(out, np.broadcast_to(embedding, (2, 5, 3)))


# ---------------------------------------------------------------------------------------------
# Mixed precision, XLA, saving


def test_tiny_vit_logits_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("ViT-S8-Tiny", 19, modality="MM")
        assert image_network(model).get_layer("block_0_attention").compute_dtype == "float16"
        logits = model(raw_bands(input_keys(model)), training=True)
        assert logits.dtype == "float32" and np.all(np.isfinite(as_numpy(logits)))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_drop_path_trains_under_xla():
    """Keras compiles with XLA by default on GPUs; DropPath's random draws must compile too.

    A small residual network keeps the compile quick; the rest of the backbones are stock Keras layers.
    """
    tokens = keras.Input((15, 8))
    branch = keras.layers.Dense(8)(tokens)
    x = keras.layers.Add()([tokens, DropPath(0.5, seed=2)(branch)])
    network = keras.Model(tokens, keras.layers.Dense(19)(keras.layers.GlobalAveragePooling1D()(x)))
    network.compile(
        optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=True
    )
    rng = np.random.default_rng(3)
    history = network.fit(
        rng.normal(size=(8, 15, 8)).astype("float32"),
        (rng.random((8, 19)) > 0.5).astype("float32"),
        batch_size=4,
        epochs=1,
        verbose=0,
    )
    assert network.jit_compile and np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(("name", "modality"), [("ViT-S8-Tiny", "MM"), ("ConvNeXt-Tiny", "S1")])
def test_keras_round_trip_in_safe_mode(tmp_path, name, modality):
    model = build_model(name, 43, modality=modality)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    inputs = raw_bands(input_keys(model), batch=2, seed=5)
    np.testing.assert_array_equal(
        as_numpy(loaded(inputs, training=False)), as_numpy(model(inputs, training=False))
    )
    assert loaded.name == name and parameter_count(loaded) == parameter_count(model)
    assert drop_path_rates(image_network(loaded)) == drop_path_rates(image_network(model))


@pytest.mark.slow
def test_efficientnet_round_trip_in_safe_mode(tmp_path):
    test_keras_round_trip_in_safe_mode(tmp_path, "EfficientNetV2-S", "S2")


def _layer_named(model, name):
    """The layer called `name` anywhere in `model` (builders nest the image network)."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            found = _layer_named(layer, name)
            if found is not None:
                return found
    return None


def test_recipe_options_reach_the_builders_that_take_them():
    model = build_model("ViT-S8-Tiny", 19, dropout=0.3, drop_path_rate=0.2)
    assert _layer_named(model, "head_dropout").rate == 0.3
    build_model("ResNet-Tiny", 19, dropout=None, drop_path_rate=None)  # None: the builder's default
    with pytest.raises(ConfigError, match="'ResNet-Tiny' takes no option dropout"):
        build_model("ResNet-Tiny", 19, dropout=0.3)
