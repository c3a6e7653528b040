"""Per-class thresholds (`thresholds.py`): chosen by F1, checked wherever they come from, bound to weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.thresholds import (
    THRESHOLDS_FORMAT,
    checked_thresholds,
    choose_thresholds,
    predicted_labels,
    read_thresholds_file,
    stored_thresholds,
    thresholds_path,
)

CLASSES = ("Urban fabric", "Arable land", "Pastures")


def _best_f1_by_brute_force(truth: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for cut in np.unique(scores):
        predicted = scores >= cut
        tp = float(np.sum(truth & predicted))
        best = max(best, 2 * tp / (truth.sum() + predicted.sum()))
    return best


def test_chosen_thresholds_reach_the_best_f1_with_a_margin():
    rng = np.random.default_rng(3)
    labels = rng.random((400, 3)) < [0.3, 0.5, 0.01]  # the last class has a handful of positives
    scores = np.clip(labels * 0.35 + rng.random((400, 3)) * 0.7, 0, 1).round(3)  # ties included
    choice = choose_thresholds(labels, scores, CLASSES)
    for index, name in enumerate(CLASSES[:2]):
        truth, column = labels[:, index], scores[:, index]
        assert choice.f1[name] == pytest.approx(_best_f1_by_brute_force(truth, column), abs=1e-12)
        threshold = choice.thresholds[name]
        # Halfway between the lowest score predicted and the next lower one: the same set here.
        predicted = column >= threshold
        assert choice.f1[name] == pytest.approx(
            2 * np.sum(truth & predicted) / (truth.sum() + predicted.sum()), abs=1e-12
        )
        below = column[column < threshold]
        assert below.size == 0 or threshold == pytest.approx((column[predicted].min() + below.max()) / 2)
    positives = int(labels[:, 2].sum())
    assert positives < 10
    assert choice.thresholds[CLASSES[2]] == 0.5 and choice.too_few_positives == {CLASSES[2]: positives}


def test_choose_refuses_mismatched_shapes():
    with pytest.raises(UserError, match=r"must both be \(samples, 3\)"):
        choose_thresholds(np.zeros((4, 3)), np.zeros((4, 2)), CLASSES)


def test_predicted_labels_use_greater_or_equal_in_class_order():
    probabilities = np.array([[0.5, 0.49, 0.9], [0.1, 0.2, 0.3]])
    assert predicted_labels(probabilities, 0.5, CLASSES) == [["Urban fabric", "Pastures"], []]
    assert predicted_labels(probabilities, np.array([0.6, 0.1, 0.95]), CLASSES) == [
        ["Arable land"],
        ["Arable land"],
    ]


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ([0.5], "expected an object of class name -> threshold"),
        ({"Forest": 0.5}, "unknown class 'Forest'; the model's classes are 'Urban fabric'"),
        ({"Pastures": 0}, r"class 'Pastures': threshold must be in \(0, 1\], got 0"),
        ({"Pastures": True}, "got True"),
        ({"Pastures": "0.5"}, "got '0.5'"),
    ],
)
def test_every_source_of_thresholds_gets_the_same_checks(mapping, message):
    with pytest.raises(UserError, match=f"where: .*{message}"):
        checked_thresholds(mapping, CLASSES, "where")


def test_files_plain_or_stored_and_bound_to_their_weights(tmp_path):
    plain = tmp_path / "mine.json"
    plain.write_text(json.dumps({"Pastures": 0.3}))
    assert read_thresholds_file(plain, CLASSES) == {"Pastures": 0.3}

    base = tmp_path / "models" / "best"
    assert thresholds_path(base).name == "best.thresholds.json"
    assert thresholds_path(tmp_path / "m.keras").name == "m.thresholds.json"
    assert stored_thresholds(base, "abc", CLASSES) is None  # none stored
    base.parent.mkdir()
    document = {"format": THRESHOLDS_FORMAT, "model_sha256": "abc", "thresholds": {"Urban fabric": 0.25}}
    thresholds_path(base).write_text(json.dumps(document))
    assert stored_thresholds(base, "abc", CLASSES) == {"Urban fabric": 0.25}
    assert read_thresholds_file(thresholds_path(base), CLASSES) == {"Urban fabric": 0.25}
    with pytest.raises(UserError, match="chosen for other weights than those of .*best"):
        stored_thresholds(base, "other-weights", CLASSES)
