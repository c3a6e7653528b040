"""Per-class decision thresholds: choosing them on validation data, storing them beside a checkpoint,
and reading them back, bound to the weights they were chosen for.

A class is predicted when its probability is >= its threshold (`DEFAULT_THRESHOLD`, 0.5, as in 2019,
unless chosen). `predict --choose-thresholds` stores `<base>.thresholds.json` beside a checkpoint (a new
file: the checkpoint's checksums stay untouched); it records the SHA-256 of the weights it was chosen
for, and `stored_thresholds` refuses it for other weights, in `predict`, `export` and `evaluate` alike.

Which thresholds a loaded model uses (`predictor.resolve_thresholds`) is the same rule in every command
(`predict`, `show`, `map`, and `evaluate` through its config keys): `threshold` for every class (0.5
unless given), unless thresholds are named: a file of class -> threshold (classes it leaves out take
`threshold`), or `stored` for those stored beside the checkpoint (for an exported `.keras` model: those
its metadata carries over from the checkpoint). Chosen thresholds are never applied unasked, and every
command says which thresholds it used. `predicted_labels` applies them.

Choosing needs positives: a class with fewer than `MIN_POSITIVES` positives in the validation data
keeps the default threshold (an F1 maximised over two or three positives picks thresholds near 0 that
do not carry over to new data), and is reported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigearthnet_tf.constants import DEFAULT_THRESHOLD
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.jsonfiles import read_json_object

THRESHOLDS_SUFFIX = ".thresholds.json"
THRESHOLDS_FORMAT = "bigearthnet-tf-thresholds"
THRESHOLDS_FORMAT_VERSION = 1
KERAS_SUFFIX = ".keras"
MAX_BYTES = 1 << 20  # a thresholds file holds one number per class
STORED = "stored"  # names the thresholds stored with the model, where a file could be named
MIN_POSITIVES = 10  # positives a class needs in the validation data for its threshold to be chosen


def thresholds_path(model: str | os.PathLike[str]) -> Path:
    """Where the thresholds of a checkpoint base name (or `.keras` file) are stored."""
    model = Path(model)
    if model.suffix == KERAS_SUFFIX:
        return model.with_suffix(THRESHOLDS_SUFFIX)
    return model.with_name(model.name + THRESHOLDS_SUFFIX)


@dataclass(frozen=True)
class ThresholdChoice:
    """Per-class thresholds chosen on labelled data, with the F1 each reaches there."""

    thresholds: dict[str, float]
    f1: dict[str, float]  # at the chosen threshold
    f1_at_default: dict[str, float]  # at DEFAULT_THRESHOLD, for comparison
    too_few_positives: dict[str, int]  # classes left at the default -> their positives (< MIN_POSITIVES)


def choose_thresholds(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    default: float = DEFAULT_THRESHOLD,
    min_positives: int = MIN_POSITIVES,
) -> ThresholdChoice:
    """For each class, the threshold that maximises its F1 on (labels, probabilities).

    Every distinct probability is a candidate (a class is predicted at p >= t); the best one is moved
    down to halfway to the next lower probability, which predicts the same set here but leaves a
    margin on new data. Ties keep the highest threshold. A class with fewer than `min_positives`
    positives keeps `default`.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.shape != probabilities.shape or labels.ndim != 2 or labels.shape[1] != len(class_names):
        raise UserError(
            f"labels {labels.shape} and probabilities {probabilities.shape} must both be "
            f"(samples, {len(class_names)})"
        )
    thresholds, f1, f1_default, too_few = {}, {}, {}, {}
    for index, class_name in enumerate(class_names):
        truth = labels[:, index] > 0
        scores = probabilities[:, index]
        f1_default[class_name] = _f1(truth, scores >= default)
        positives = int(truth.sum())
        if positives < min_positives:
            thresholds[class_name] = float(default)
            f1[class_name] = f1_default[class_name]
            too_few[class_name] = positives
            continue
        order = np.argsort(-scores, kind="stable")
        sorted_scores = scores[order]
        true_positives = np.cumsum(truth[order])
        # Candidate cuts: after the last of each run of equal scores (all equal scores go together).
        last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
        predicted = np.flatnonzero(last_of_run) + 1
        scores_f1 = 2 * true_positives[predicted - 1] / (positives + predicted)
        best = int(np.flatnonzero(scores_f1 == scores_f1.max())[0])  # first = highest threshold
        cut = predicted[best]
        upper = sorted_scores[cut - 1]
        lower = sorted_scores[cut] if cut < len(sorted_scores) else 0.0
        thresholds[class_name] = float((upper + lower) / 2) if upper > lower else float(upper)
        f1[class_name] = float(scores_f1[best])
    return ThresholdChoice(thresholds, f1, f1_default, too_few)


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    true_positives = float(np.sum(truth & predicted))
    denominator = float(truth.sum() + predicted.sum())
    return 2 * true_positives / denominator if denominator else 0.0


def read_thresholds_file(path: str | os.PathLike[str], class_names: Sequence[str]) -> dict[str, float]:
    """Class name -> threshold from a JSON file: `{class: t}` or a stored file (`"thresholds": {...}`).

    Unknown class names and values outside (0, 1] raise a UserError naming them.
    """
    path = Path(path)
    return _file_thresholds(path, read_json_object(path, "thresholds file", max_bytes=MAX_BYTES), class_names)


def _file_thresholds(path: Path, document: dict, class_names: Sequence[str]) -> dict[str, float]:
    mapping = (
        document.get("thresholds", document) if document.get("format") == THRESHOLDS_FORMAT else document
    )
    return checked_thresholds(mapping, class_names, f"thresholds file {path}")


def checked_thresholds(mapping: object, class_names: Sequence[str], where: str) -> dict[str, float]:
    """Class name -> threshold from `mapping`; a UserError naming `where` unless it is an object of
    the model's class names, each with a threshold in (0, 1]. The one rule for thresholds, wherever
    they come from: a file, the stored file beside a checkpoint, an exported model's metadata."""
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected an object of class name -> threshold")
    known = set(class_names)
    thresholds = {}
    for name, value in mapping.items():
        if name not in known:
            raise UserError(
                f"{where}: unknown class {name!r}; the model's classes are "
                + ", ".join(repr(c) for c in class_names)
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise UserError(f"{where}: class {name!r}: threshold must be in (0, 1], got {value!r}")
        thresholds[name] = float(value)
    return thresholds


def stored_thresholds(
    model: str | os.PathLike[str], model_sha256: str, class_names: Sequence[str]
) -> dict[str, float] | None:
    """The thresholds stored beside checkpoint (or `.keras` file) `model`; None when there are none.

    Thresholds chosen for other weights (their SHA-256 differs) are refused: they would be wrong.
    """
    path = thresholds_path(model)
    if not path.is_file():
        return None
    document = read_json_object(path, "thresholds file", max_bytes=MAX_BYTES)
    if document.get("model_sha256") != model_sha256:
        raise UserError(
            f"thresholds file {path} was chosen for other weights than those of {model} (SHA-256 differs); "
            "choose them again with bigearthnet predict --choose-thresholds, or delete the file"
        )
    return _file_thresholds(path, document, class_names)


def predicted_labels(
    probabilities: np.ndarray, thresholds: np.ndarray | float, class_names: Sequence[str]
) -> list[list[str]]:
    """Per row, the class names whose probability is >= their threshold, in class order."""
    chosen = np.asarray(probabilities) >= np.asarray(thresholds)
    return [[class_names[i] for i in np.flatnonzero(row)] for row in chosen]
