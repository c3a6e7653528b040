"""A model as backbone + classifier: where the head is, starting from another checkpoint's backbone,
freezing it, and giving it its own learning rate.

The classifier is the last Dense layer of the model, or of the timm network nested in it (`network`,
as in the reBEN and SSL4EO models); everything else with weights is the backbone. That split serves
`embed` (the features are the classifier's input) and training from `backbone_weights`: the backbone
checkpoint's model is rebuilt with its own network options (architecture, input protocol), and every
weight but the classifier's (batch-norm statistics included) is copied into the new model, whose head
is freshly initialised for the run's label type.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import keras

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import Modality

NESTED_NETWORK = "network"


def classifier_layer(model: keras.Model) -> tuple[keras.layers.Dense, keras.Model]:
    """The classifier (the last Dense layer) and the model that holds it (`model` or its `network`)."""

    def last_dense(container):
        dense = [layer for layer in container.layers if isinstance(layer, keras.layers.Dense)]
        return dense[-1] if dense else None

    head = last_dense(model)
    if head is not None and head is model.layers[-1]:
        return head, model
    try:
        network = model.get_layer(NESTED_NETWORK)
    except ValueError:
        network = None
    head = last_dense(network) if isinstance(network, keras.Model) else None
    if head is None:
        raise UserError(
            f"model {model.name!r}: no classifier layer found (a Dense layer last, or in a nested "
            f"{NESTED_NETWORK!r}); it cannot be split into backbone and head"
        )
    return head, network


def feature_model(model: keras.Model) -> keras.Model:
    """A Keras model from `model`'s inputs to its classifier's input: the pooled features."""
    head, holder = classifier_layer(model)
    if holder is model:
        return keras.Model(model.input, head.input, name=f"{model.name}_features")
    pooled = keras.Model(holder.input, head.input, name="pooled")
    network_input = holder._inbound_nodes[0].input_tensors[0]  # what the outer model feeds the network
    return keras.Model(model.input, pooled(network_input), name=f"{model.name}_features")


def _backbone_weights(model: keras.Model) -> list:
    head_ids = {id(variable) for variable in classifier_layer(model)[0].weights}
    return [variable for variable in model.weights if id(variable) not in head_ids]


def copy_backbone(source: keras.Model, target: keras.Model, where: str) -> int:
    """Copy every backbone weight of `source` into `target` (the same network, another head); the count."""
    theirs, ours = _backbone_weights(source), _backbone_weights(target)
    mismatched = [
        f"{mine.path} {tuple(mine.shape)} vs {tuple(other.shape)}"
        for mine, other in zip(ours, theirs, strict=False)
        if tuple(mine.shape) != tuple(other.shape)
    ]
    if len(theirs) != len(ours) or mismatched:
        raise UserError(
            f"{where}: its backbone does not fit this model ({len(theirs)} weights, this model's {len(ours)}"
            f"{'; first difference ' + mismatched[0] if mismatched else ''})"
        )
    for mine, other in zip(ours, theirs, strict=True):
        mine.assign(other)
    return len(ours)


def load_backbone(
    base: str | os.PathLike[str], num_classes: int, *, model_name: str, modality: Modality, **training_options
) -> keras.Model:
    """A new model of `num_classes` whose backbone comes from checkpoint `base` (its network options kept)."""
    from bigearthnet_tf import checkpoints
    from bigearthnet_tf.models import build_model

    source, _, meta = checkpoints.load_checkpoint(base, model_name=model_name, modality=modality)
    options = {**checkpoints.network_options(meta), **training_options}
    model = build_model(meta.model_name, num_classes, meta.modality, dict(meta.statistics), **options)
    copy_backbone(source, model, f"backbone_weights {base}")
    return model


def freeze_backbone(model: keras.Model) -> None:
    """Make every layer but the classifier untrainable (Keras then runs batch norm in inference mode)."""
    head, holder = classifier_layer(model)
    for layer in _flat_layers(model):
        if layer is not head and layer is not holder and layer is not model:
            layer.trainable = False


def _flat_layers(model: keras.Model) -> Sequence[keras.layers.Layer]:
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_flat_layers(layer))
    return found


_BLOCK = re.compile(r"^blocks\.(\d+)\.")  # a timm ViT's transformer blocks


def learning_rate_scales(model: keras.Model, backbone_scale: float, layer_decay: float = 1.0) -> list[float]:
    """One factor per trainable variable (in `model.trainable_variables` order): 1 for the classifier,
    `backbone_scale` for the backbone, times, in a ViT of n blocks, `layer_decay ** (n - i)` for block i
    and `layer_decay ** (n + 1)` for the embedding (BEiT's layer-wise decay; the final norm keeps 1)."""
    head, _ = classifier_layer(model)
    head_ids = {id(variable) for variable in head.trainable_weights}
    layer_of = {id(variable): layer.name for layer in _flat_layers(model) for variable in layer.trainable_weights}
    blocks = {int(match[1]) for name in layer_of.values() if (match := _BLOCK.match(name))}
    depth = max(blocks) + 1 if blocks else 0
    scales = []
    for variable in model.trainable_variables:
        if id(variable) in head_ids:
            scales.append(1.0)
            continue
        name = layer_of.get(id(variable), "")
        match = _BLOCK.match(name)
        if not depth:
            exponent = 0
        elif match:
            exponent = depth - int(match[1])
        elif name.startswith(("patch_embed", "embedding")):
            exponent = depth + 1
        else:
            exponent = 0  # the final norm, beside the head
        scales.append(float(backbone_scale) * float(layer_decay) ** exponent)
    return scales
