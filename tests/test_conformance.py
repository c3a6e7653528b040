"""Every registered model, plug-ins included, passes the conformance checks of `models.conformance`
(modalities, float32 logits, safe-mode `.keras` round trip, mixed precision, XLA for the small ones).
All but two tiny models are marked slow: building and saving a big one takes most of a minute."""

from __future__ import annotations

import pytest

from bigearthnet_tf.models import load_model_plugin, model_names
from bigearthnet_tf.models.conformance import ConformanceError, check_model

TINY = ("K-BranchCNN-Tiny", "ResNet-Tiny", "VGG-Tiny", "ViT-S8-Tiny")
# What each model builds for by default (SSL4EO models read the modality of their weights).
EXPECTED_MODALITIES = {"SSL4EO-ResNet": ("S2",), "SSL4EO-ViT": ("S2",)}


FAST = ("ResNet-Tiny", "VGG-Tiny")  # the fast tier checks the helper on two; the full run on all


def _marks(name: str):
    return [] if name in FAST else [pytest.mark.slow]


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in model_names()])
def test_every_registered_model_conforms(name):
    passed = check_model(name, xla=name in TINY, save_first_modality_only=name not in TINY)
    assert passed == EXPECTED_MODALITIES.get(name, ("S2", "S1", "MM"))


def test_the_checks_catch_a_model_that_breaks_them(tmp_path, monkeypatch):
    """A plug-in through the documented route; one with float16 logits fails with a line naming it."""
    from bigearthnet_tf.models import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    plugin = tmp_path / "conformance_plugin.py"
    plugin.write_text(
        "import keras\n"
        "from bigearthnet_tf.models import register_model\n\n"
        "@register_model('GoodPlug')\n"
        "def good(num_classes, modality='S2', statistics=None):\n"
        "    return keras.Sequential([keras.layers.Conv2D(4, 8, strides=8), keras.layers.GlobalAveragePooling2D(),"
        " keras.layers.Dense(num_classes)])\n\n"
        "@register_model('HalfPlug')\n"
        "def half(num_classes, modality='S2', statistics=None):\n"
        "    return keras.Sequential([keras.layers.Conv2D(4, 8, strides=8), keras.layers.GlobalAveragePooling2D(),"
        " keras.layers.Dense(num_classes, dtype='float16')])\n"
    )
    load_model_plugin(plugin)
    assert check_model("GoodPlug", xla=True) == ("S2", "S1", "MM")
    with pytest.raises(ConformanceError, match=r"model 'HalfPlug' \(S2\): logits are float16, expected float32"):
        check_model("HalfPlug", modalities=("S2",), mixed_precision=False)
