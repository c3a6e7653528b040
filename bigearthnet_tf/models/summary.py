"""Parameter counts and the `bigearthnet models` table."""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from typing import TextIO

import keras

from bigearthnet_tf.constants import LabelType, class_names, parse_label_type
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.model_catalogue import print_model_rows
from bigearthnet_tf.models.preprocessing import S2, input_keys
from bigearthnet_tf.models.registry import build_model, get_model_spec, model_names


def parameter_count(model: keras.Model) -> int:
    """All weights of the network, trainable and not (batch-norm moving statistics included).

    Input preprocessing holds its statistics as config, not weights, so it adds nothing; random-seed
    state and optimizer slots are not weights and are not counted.
    """
    return sum(math.prod(weight.shape) for weight in model.weights)


def trainable_parameter_count(model: keras.Model) -> int:
    """Trainable weights only (batch-norm moving statistics excluded)."""
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)


def model_table(
    label_type: LabelType = LabelType.BIGEARTHNET_19,
    modality: Modality = S2,
    names: Sequence[str] | None = None,
    parameters: bool = False,
) -> list[dict]:
    """One row per registered model (or per name of `names`): name, description, origin; with
    `parameters`, each model is built for `label_type`'s class count and its weights and inputs counted."""
    classes = len(class_names(label_type))
    rows = []
    for name in names or model_names():
        spec = get_model_spec(name)
        row = {"name": name, "description": spec.description, "origin": spec.origin}
        if parameters:
            model = build_model(name, classes, modality=modality)
            row |= {
                "parameters": parameter_count(model),
                "trainable_parameters": trainable_parameter_count(model),
                "classes": classes,
                "label_type": label_type,
                "modality": modality,
                "input_keys": list(input_keys(model)),
            }
            del model
            gc.collect()  # VGG's fc6 alone is 400 MB; do not hold every model at once
        rows.append(row)
    return rows


def print_model_table(
    label_type: LabelType | str = LabelType.BIGEARTHNET_19,
    as_json: bool = False,
    file: TextIO | None = None,
    names: Sequence[str] | None = None,
    parameters: bool = False,
) -> None:
    """Print the registered models (a rich table, or JSON with `as_json`); building each to count its
    parameters takes a while, so that happens only with `parameters`."""
    label_type = parse_label_type(label_type)  # where the command line's string enters
    rows = model_table(label_type, names=names, parameters=parameters)
    print_model_rows(rows, label_type, as_json=as_json, parameters=parameters, file=file)
