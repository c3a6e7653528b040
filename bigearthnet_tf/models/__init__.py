"""Model registry and architectures; band selection, resampling and standardisation are model layers.

Public API::

    build_model(name, num_classes, modality="S2", statistics=None) -> keras.Model   # logits
    model_names() -> tuple[str, ...]
    register_model(name)                        # decorator for builder(num_classes, modality, statistics)
    load_model_plugin(path_or_module) -> tuple[str, ...]
    parameter_count(model) -> int
    print_model_table(label_type, as_json)      # `bigearthnet models`
    input_keys(model) -> tuple[str, ...]        # which raw-band inputs to feed
    model_statistics(model) -> {band: (mean, std)}

Registered: ResNet50, ResNet101, ResNet152, VGG16, VGG19, K-BranchCNN (2019 TF-Slim-faithful) and their
tiny twins ResNet-Tiny, VGG-Tiny, K-BranchCNN-Tiny (same code, far fewer filters) for tests and the demo;
modern backbones EfficientNetV2-S, ConvNeXt-Tiny, ViT-S8 and ViT-S8-Tiny (see `modern`); the reBEN
(BigEarthNet v2.0) pretrained families reBEN-ResNet, reBEN-ConvNeXtV2, reBEN-ViT and reBEN-Mixer,
timm-faithful networks for imported weights (see `reben`, `timm_nets`, and `bigearthnet import reben`).

Every model takes a dict of raw band values at native resolution (float32, channels last; see
`preprocessing`), accepts modality S2, S1 or MM, and outputs logits (batch, num_classes): apply a
sigmoid for probabilities and train with `from_logits=True`. Saved `.keras` files load with
`safe_mode=True` once this package is imported (its custom layers are registered serialisable).

User models: entry points in the group `bigearthnet_tf.models`, or the environment variable
`BIGEARTHNET_TF_MODEL_PLUGINS` (see `registry`); a 2019-style `dnn_model(nb_class)` works there.
A builder may return a network on one 120x120 image with `len(STACKED_CHANNELS[modality])` channels;
the registry then adds the raw-band preprocessing in front of it. That is how modern backbones fit any
modality, e.g.::

    @register_model("MyConvNeXt")
    def my_convnext(num_classes, modality="S2", statistics=None):
        channels = len(STACKED_CHANNELS[modality])
        backbone = keras.applications.ConvNeXtTiny(
            include_top=False, weights=None, input_shape=(120, 120, channels), pooling="avg",
            include_preprocessing=False,
        )
        return keras.Sequential([backbone, keras.layers.Dense(num_classes)])
"""

from bigearthnet_tf.layout import MODALITIES
from bigearthnet_tf.models import kbranch, modern, reben, resnet, ssl4eo, vgg  # noqa: F401  (registers the built-in models)
from bigearthnet_tf.models.preprocessing import (
    DEFAULT_STATISTICS,
    INPUTS,
    STACKED_CHANNELS,
    BandStandardization,
    BicubicResize,
    input_keys,
    model_statistics,
    resolve_statistics,
)
from bigearthnet_tf.models.registry import (
    ENTRY_POINT_GROUP,
    PLUGIN_ENV,
    ModelSpec,
    build_model,
    get_model_spec,
    load_model_plugin,
    model_names,
    refresh_model_plugins,
    register_model,
)
from bigearthnet_tf.models.summary import (
    model_table,
    parameter_count,
    print_model_table,
    trainable_parameter_count,
)

__all__ = [
    "DEFAULT_STATISTICS",
    "ENTRY_POINT_GROUP",
    "INPUTS",
    "MODALITIES",
    "PLUGIN_ENV",
    "STACKED_CHANNELS",
    "BandStandardization",
    "BicubicResize",
    "ModelSpec",
    "build_model",
    "get_model_spec",
    "input_keys",
    "load_model_plugin",
    "model_names",
    "model_statistics",
    "model_table",
    "parameter_count",
    "print_model_table",
    "refresh_model_plugins",
    "register_model",
    "resolve_statistics",
    "trainable_parameter_count",
]
