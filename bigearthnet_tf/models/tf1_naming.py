"""How a model's weights were named in the 2019 TensorFlow 1 code: the shape of the rule each
architecture module fills in beside its builder (`resnet.py`, `vgg.py`, `kbranch.py`), so that
`bigearthnet import tf1` reads a 2019 checkpoint into the Keras model. No Keras here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Keras weight attribute -> variable leaf name, per naming convention.
SLIM_LEAVES = MappingProxyType({"kernel": "weights", "bias": "biases"})  # TF-Slim layers
TF_LAYERS_LEAVES = MappingProxyType({"kernel": "kernel", "bias": "bias"})  # tf.layers
BATCH_NORM_LEAVES = MappingProxyType(
    {name: name for name in ("gamma", "beta", "moving_mean", "moving_variance")}
)


@dataclass(frozen=True)
class TF1Naming:
    """How one model's weights were named in 2019: top scope, layer rule, leaf names, classifier."""

    scope: str  # "" when the 2019 code had no top-level scope
    # Keras layer name -> its 2019 variable scope below `scope`; None: no 2019 counterpart.
    layer_scope: Callable[[str], str | None]
    leaves: Mapping[str, str]  # conv / dense weight attribute -> leaf name
    classifier: str  # scope of the classifier layer, for the label-type hint

    def name(self, path: str) -> str:
        return f"{self.scope}/{path}" if self.scope else path
