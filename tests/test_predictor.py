"""Which thresholds a loaded model uses (`predictor.describe_thresholds`), the same rule in every command.

A Predictor here carries no network: the rule reads only the model's classes, its source, the digest
its thresholds are bound to and its metadata.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigearthnet_tf.constants import LabelType
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.model_meta import ModelMeta
from bigearthnet_tf.predictor import Predictor, describe_thresholds, resolve_thresholds
from bigearthnet_tf.thresholds import THRESHOLDS_FORMAT, thresholds_path

CLASSES = ("Urban fabric", "Arable land", "Pastures")


def _predictor(tmp_path, thresholds=None) -> Predictor:
    meta = ModelMeta(
        "Tiny", LabelType.BIGEARTHNET_19, Modality.S2, CLASSES, {"bands_10m": ("B02",)}, thresholds=thresholds
    )
    return Predictor(model=None, meta=meta, source=tmp_path / "best", model_sha256="abc")


def test_the_default_and_one_threshold_for_every_class(tmp_path):
    predictor = _predictor(tmp_path)
    values, said = describe_thresholds(predictor)
    assert values.tolist() == [0.5, 0.5, 0.5] and said == "0.5 for every class"
    values, said = describe_thresholds(predictor, threshold=0.3)
    assert values.tolist() == [0.3, 0.3, 0.3] and said == "0.3 for every class"
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(UserError, match=r"--threshold must be in \(0, 1\]"):
            describe_thresholds(predictor, threshold=bad)


def test_a_file_names_some_classes_the_rest_take_the_threshold(tmp_path):
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"Pastures": 0.2}))
    values, said = describe_thresholds(_predictor(tmp_path), threshold=0.4, thresholds_file=file)
    assert values.tolist() == [0.4, 0.4, 0.2]
    assert said == f"per class, from {file} (2 classes at 0.4)"


def test_stored_thresholds_beside_the_checkpoint_then_in_the_metadata(tmp_path):
    predictor = _predictor(tmp_path)
    with pytest.raises(UserError, match="has no stored thresholds"):
        describe_thresholds(predictor, thresholds_file="stored")
    exported = _predictor(tmp_path, thresholds={"Urban fabric": 0.7})
    values, said = describe_thresholds(exported, thresholds_file="stored")
    assert values.tolist() == [0.7, 0.5, 0.5] and said.startswith("per class, from the metadata of")
    document = {
        "format": THRESHOLDS_FORMAT,
        "model_sha256": "abc",
        "thresholds": dict(zip(CLASSES, (0.1, 0.2, 0.3), strict=True)),
    }
    thresholds_path(predictor.source).write_text(json.dumps(document))
    printed = []
    console = type("Console", (), {"print": lambda self, text, **_: printed.append(text)})()
    values = resolve_thresholds(predictor, thresholds_file="stored", console=console)
    np.testing.assert_array_equal(values, [0.1, 0.2, 0.3])
    assert printed == [f"thresholds: per class, stored in {thresholds_path(predictor.source)}"]
