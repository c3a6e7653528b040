"""The built-in model names and what they are, known without TensorFlow.

`bigearthnet models` lists them and a config's `model_name` is checked against them without
importing Keras (both answer in well under a second). `models.registry` registers the builders, in
this order, when `bigearthnet_tf.models` is imported, and takes each built-in's description from
here; `tests/test_models.py` keeps the two in step. Plug-ins (`PLUGIN_ENV`, entry points) are only
known to the registry, so with plug-ins configured the listing goes through it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, TextIO

from bigearthnet_tf.constants import LabelType

ENTRY_POINT_GROUP = "bigearthnet_tf.models"
PLUGIN_ENV = "BIGEARTHNET_TF_MODEL_PLUGINS"
BUILTIN_ORIGIN = "bigearthnet_tf"

_KBRANCH = "three native-resolution branches (+S1 branch), late fusion"
_VIT = "ViT, patch 8, on the stacked image"
_REBEN = "reBEN (BigEarthNet v2.0) timm {}, for imported weights"
_SLIM_RESNET = "TF-Slim resnet_v1 on the stacked 120x120 image"
_SSL4EO = "timm {} for SSL4EO-S12 / DeCUR / SoftCon / FG-MAE backbones (import torchgeo)"
_SLIM_VGG = "TF-Slim vgg on the stacked 120x120 image"

# Name -> description, in the order the registry lists them.
BUILTIN_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "K-BranchCNN": _KBRANCH,
        "K-BranchCNN-Tiny": _KBRANCH,
        "EfficientNetV2-S": "keras.applications EfficientNetV2S on the stacked image",
        "ConvNeXt-Tiny": "keras.applications ConvNeXtTiny on the stacked image",
        "ViT-S8": _VIT,
        "ViT-S8-Tiny": _VIT,
        "reBEN-ResNet": _REBEN.format("resnet"),
        "reBEN-ConvNeXtV2": _REBEN.format("convnextv2"),
        "reBEN-ViT": _REBEN.format("vit"),
        "reBEN-Mixer": _REBEN.format("mixer"),
        "reBEN-MobileViT": _REBEN.format("mobilevit"),
        "ResNet50": _SLIM_RESNET,
        "ResNet101": _SLIM_RESNET,
        "ResNet152": _SLIM_RESNET,
        "ResNet-Tiny": _SLIM_RESNET,
        "SSL4EO-ResNet": _SSL4EO.format("resnet"),
        "SSL4EO-ViT": _SSL4EO.format("vit"),
        "VGG16": _SLIM_VGG,
        "VGG19": _SLIM_VGG,
        "VGG-Tiny": _SLIM_VGG,
    }
)


def plugins_configured() -> bool:
    """Whether models beyond the built-ins may exist (then only the registry knows them all)."""
    if os.environ.get(PLUGIN_ENV, "").strip():
        return True
    return bool(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def is_builtin(name: Any) -> bool:
    return isinstance(name, str) and name in BUILTIN_MODELS


def builtin_rows(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """`bigearthnet models` rows (name, description, origin): of every built-in, or of `names` (each a
    built-in; the caller checks)."""
    return [
        {"name": name, "description": BUILTIN_MODELS[name], "origin": BUILTIN_ORIGIN}
        for name in (names or BUILTIN_MODELS)
    ]


def print_model_rows(
    rows: list[dict[str, Any]], label_type: LabelType, *, as_json: bool, parameters: bool, file: TextIO | None = None
) -> None:
    """The `bigearthnet models` table (rich) or JSON of `rows`."""
    from rich.table import Table

    from bigearthnet_tf.console import plain_console
    from bigearthnet_tf.constants import class_names

    out = file or sys.stdout
    if as_json:
        print(json.dumps(rows, indent=2), file=out)
        return
    classes = len(class_names(label_type))
    title = f"Models for {label_type} ({classes} classes, S2 input)" if parameters else "Registered models"
    table = Table(title=title)
    table.add_column("name", no_wrap=True)
    if parameters:
        table.add_column("parameters", justify="right", no_wrap=True)
        table.add_column("trainable", justify="right", no_wrap=True)
        table.add_column("inputs")
    else:
        table.add_column("description")
    show_origin = any(row["origin"] != BUILTIN_ORIGIN for row in rows)
    if show_origin:
        table.add_column("origin")
    for row in rows:
        if parameters:
            cells = [
                row["name"],
                f"{row['parameters']:,}",
                f"{row['trainable_parameters']:,}",
                " ".join(key.removeprefix("bands_") for key in row["input_keys"]),
            ]
        else:
            cells = [row["name"], row["description"]]
        table.add_row(*cells, *([row["origin"]] if show_origin else []))
    plain_console(file=out).print(table)
    if parameters:
        print(
            "parameters: every weight, batch-norm moving statistics included (preprocessing has none)",
            file=out,
        )
    else:
        print("parameter counts: bigearthnet models --parameters [NAME ...]", file=out)
