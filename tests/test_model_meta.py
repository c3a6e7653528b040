"""A model's meaning (`model_meta.ModelMeta`), checked once from checkpoint metadata, without Keras."""

from __future__ import annotations

import copy

import pytest

from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, LabelType
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import INPUTS, Modality
from bigearthnet_tf.model_meta import ModelMeta

S2_KEYS = ["bands_10m", "bands_20m", "bands_60m"]


def _metadata(**changes) -> dict:
    metadata = {
        "model_name": "ResNet50",
        "label_type": "BigEarthNet-19",
        "modality": "S2",
        "num_classes": 19,
        "class_names": list(BIGEARTHNET_19_LABELS),
        "input_keys": S2_KEYS,
        "band_order": {key: list(INPUTS[key].bands) for key in S2_KEYS},
        "statistics": {"B02": [429.9, 572.4]},
        "model_options": {"upsampling": "tf2_bicubic"},
        "iteration": 600,
        "kind": "best",
        "files": {"weights": {"name": "best.weights.h5", "bytes": 1, "sha256": "ab" * 32}},
    }
    metadata.update(changes)
    return metadata


def test_a_checkpoints_meaning_is_read_as_enums_and_tuples():
    meta = ModelMeta.from_checkpoint("checkpoint x", _metadata())
    assert meta.label_type is LabelType.BIGEARTHNET_19 and meta.modality is Modality.S2
    assert meta.class_names == BIGEARTHNET_19_LABELS and meta.num_classes == 19
    assert meta.input_keys == tuple(S2_KEYS)
    assert meta.band_order["bands_10m"] == ("B02", "B03", "B04", "B08")
    assert meta.statistics["B02"] == (429.9, 572.4)
    assert meta.weights_sha256 == "ab" * 32 and meta.iteration == 600 and meta.kind == "best"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_name": 3}, "metadata key 'model_name' is missing or malformed"),
        ({"num_classes": 18}, "'num_classes' is missing or malformed"),
        ({"class_names": [1] * 19}, "'class_names' is missing or malformed"),
        ({"statistics": {"B02": [1.0]}}, r"'statistics\.B02' is missing or malformed"),
        ({"iteration": True}, "'iteration' is missing or malformed"),
        ({"modality": "S3"}, "'modality' is missing or malformed"),
        ({"model_options": []}, "'model_options' is missing or malformed"),
    ],
)
def test_malformed_metadata_names_the_key(changes, message):
    with pytest.raises(UserError, match=f"checkpoint x: (metadata key )?{message}"):
        ModelMeta.from_checkpoint("checkpoint x", _metadata(**changes))


def test_classes_in_another_order_or_bands_reordered_are_refused():
    shuffled = _metadata(class_names=list(reversed(BIGEARTHNET_19_LABELS)))
    with pytest.raises(UserError, match="checkpoint x"):
        ModelMeta.from_checkpoint("checkpoint x", shuffled)
    swapped = copy.deepcopy(_metadata())
    swapped["band_order"]["bands_10m"] = ["B03", "B02", "B04", "B08"]
    with pytest.raises(UserError, match="checkpoint x.*bands_10m"):
        ModelMeta.from_checkpoint("checkpoint x", swapped)


def test_a_model_file_without_metadata_is_read_by_its_outputs_and_inputs():
    meta = ModelMeta.of_model("model m.keras", "Plain", 19, ("bands_10m", "bands_20m", "bands_s1"), None)
    assert meta.label_type is LabelType.BIGEARTHNET_19 and meta.modality is Modality.MM
    assert meta.band_order["bands_s1"] == ("VV", "VH")
    with pytest.raises(UserError, match="model m.keras: 7 outputs match no label type"):
        ModelMeta.of_model("model m.keras", "Plain", 7, ("bands_10m",), None)
    with pytest.raises(UserError, match="outputs 43 classes but label_type 'BigEarthNet-19' has 19"):
        ModelMeta.of_model("model m.keras", "Plain", 43, ("bands_10m",), LabelType.BIGEARTHNET_19)
