"""The 2019 BigEarthNet metric set plus micro and macro average precision, over a whole set.

`compute_metrics(y_true, probabilities)` takes the true multi-hot labels and the sigmoid
probabilities of a WHOLE evaluation set (never per-batch averages) and returns every metric the
2019 `eval.py` wrote to `eval_result.json`, under its 2019 name, plus the average precision
numbers the field reports first today. It is pure NumPy (no TensorFlow, no scikit-learn), fully
vectorised, and returns plain Python floats that are never NaN or infinite.

Notation: for sample n, Y = its true labels, Z = its predicted labels (probability >= threshold,
as in 2019); per class c over the set, TP, FP, FN, TN are counts; F-beta is
(1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP), which equals the harmonic form of precision and recall.

Sample-based metrics, computed per sample and then averaged over all samples
    sample_precision        |Y & Z| / |Z|
    sample_recall           |Y & Z| / |Y|
    sample_f{1,2,0_5}_score F-beta from the sample's counts
    hamming_loss            |Y xor Z| / number of classes
    subset_accuracy         1 if Y == Z else 0
    sample_accuracy         Jaccard index |Y & Z| / |Y | Z| (the multi-label "accuracy" of
                            Godbole and Sarawagi, 2004, which is what 2019 called accuracy)
    label_cardinality       |Y|
    one_error               1 if the highest-probability class is not in Y (ties: lowest index)
    coverage                number of classes scored >= the lowest-scored true class, as
                            scikit-learn's `coverage_error` (no "- 1")
    ranking_loss            fraction of (true, false) class pairs with score(true) <= score(false),
                            as scikit-learn's `label_ranking_loss` (a tie counts as an error)
    label_ranking_avg_precision
                            scikit-learn's `label_ranking_average_precision_score`; rank of a
                            class = number of classes scored >= it (ties share the worst rank)

Micro metrics: counts summed over all classes, then one ratio (`micro_precision`,
`micro_recall`, `micro_f{1,2,0_5}_score`, `micro_accuracy` = sum TP / sum (TP + FP + FN)).

Per class `macro_<metric>_class<i>` for precision, recall, f1_score, f2_score, f0_5_score,
accuracy and average_precision; `macro_<metric>_class_avg` is the plain mean over ALL classes
(as in 2019 and scikit-learn's average="macro"). "Accuracy" is the Jaccard index everywhere,
as in the 2019 code: per class TP / (TP + FP + FN), micro over the summed counts, per sample
over label sets. Plain (TP + TN) / N would be near 1 for every rare class and say nothing; the
Jaccard reading keeps our numbers comparable with published 2019 results.

Average precision (AP): non-interpolated, as scikit-learn's `average_precision_score`:
sum over distinct score thresholds, highest first, of (R_n - R_{n-1}) P_n; samples with equal
scores enter at the same threshold together.
    macro_average_precision_class<i>  AP of class i over the set
    micro_average_precision           AP of the flattened (samples x classes) matrix
    macro_average_precision           mean of the per-class AP over the classes that have at
                                      least one positive in the set (AP is undefined without
                                      positives; this is what torchmetrics, and hence the
                                      published BigEarthNet v2 numbers, do)
    macro_average_precision_excluded_classes
                                      how many classes were left out of that mean

Also `support_class<i>` (positives of class i in the set), `num_samples`, and the threshold used:
`threshold` when one holds for every class, else `threshold_class<i>` per class.

Zero denominators: every case is defined, so no NaN or inf ever reaches the output.
    - A ratio whose denominator is 0 is 0: precision with nothing predicted, recall with no true
      labels, F-beta with TP + FP + FN = 0, accuracy (Jaccard) with an empty union; this holds
      per sample, per class and micro. It is the 2019 convention for every ratio (their
      per-class accuracy was the one exception: it divided by zero for a class never present
      nor predicted and wrote NaN; that class now scores 0, like its precision, recall and F).
      It equals scikit-learn with `zero_division=0`.
    - AP of a class with no positives is 0.0 in its per-class key and is excluded from
      `macro_average_precision`; if no class has positives, macro and micro AP are 0.0.
    - Sample with no true labels: coverage 0, ranking_loss 0, label_ranking_avg_precision 1
      (scikit-learn: any ranking is perfect; 2019 wrote 0 here), one_error 1 (its top class is
      not a true one). A sample whose classes are all true: ranking_loss 0 and LRAP 1.
    The official BigEarthNet splits hold no sample without labels, so the sample-level cases
    only matter for other data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigearthnet_tf.constants import DEFAULT_THRESHOLD
from bigearthnet_tf.files import write_text_atomically

# Metric names of the 2019 eval_result.json, in its order.
SAMPLE_METRICS: tuple[str, ...] = (
    "sample_precision",
    "sample_recall",
    "sample_f1_score",
    "sample_f2_score",
    "sample_f0_5_score",
    "hamming_loss",
    "subset_accuracy",
    "sample_accuracy",
    "one_error",
    "coverage",
    "label_cardinality",
    "ranking_loss",
    "label_ranking_avg_precision",
)
MICRO_METRICS: tuple[str, ...] = (
    "micro_precision",
    "micro_recall",
    "micro_f1_score",
    "micro_f2_score",
    "micro_f0_5_score",
    "micro_accuracy",
)
# Per-class metrics: key `macro_<name>_class<i>`; all but average_precision also `_class_avg`.
PER_CLASS_METRICS: tuple[str, ...] = (
    "precision",
    "recall",
    "f1_score",
    "f2_score",
    "f0_5_score",
    "accuracy",
    "average_precision",
)
F_BETAS: Mapping[str, float] = {"f1_score": 1.0, "f2_score": 2.0, "f0_5_score": 0.5}


def per_class_key(metric: str, class_index: int) -> str:
    """The eval_result.json key of a per-class metric, e.g. `macro_f1_score_class3`."""
    return f"macro_{metric}_class{class_index}"


def support_key(class_index: int) -> str:
    """The key holding the number of positives of a class in the evaluated set."""
    return f"support_class{class_index}"


def compute_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    threshold: float | Sequence[float] = DEFAULT_THRESHOLD,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """All 2019 metrics plus micro/macro average precision over a whole set (see module docstring).

    `y_true` is (samples, classes) multi-hot (0/1 or bool), `probabilities` the same shape in
    [0, 1]; a class is predicted when its probability is >= `threshold` (one for all classes, or
    one per class). `class_names`, when given, only checks that the number of classes matches.
    Returns plain floats, never NaN.
    """
    truth, scores = _validate(y_true, probabilities, threshold, class_names)
    predicted = scores >= np.asarray(threshold, dtype=np.float64)
    num_samples, num_classes = truth.shape

    metrics: dict[str, float] = {}
    metrics.update(_sample_metrics(truth, predicted, scores))
    metrics.update(_micro_metrics(truth, predicted))

    per_class = _per_class_threshold_metrics(truth, predicted)
    per_class["average_precision"] = _average_precision_per_class(truth, scores)
    for metric in PER_CLASS_METRICS:
        if metric != "average_precision":
            metrics[f"macro_{metric}_class_avg"] = float(per_class[metric].mean())

    support = truth.sum(axis=0)
    has_positives = support > 0
    metrics["micro_average_precision"] = _average_precision(truth.ravel(), scores.ravel())
    metrics["macro_average_precision"] = (
        float(per_class["average_precision"][has_positives].mean()) if has_positives.any() else 0.0
    )
    metrics["macro_average_precision_excluded_classes"] = float(num_classes - has_positives.sum())

    for metric in PER_CLASS_METRICS:
        for index, value in enumerate(per_class[metric]):
            metrics[per_class_key(metric, index)] = float(value)
    for index, count in enumerate(support):
        metrics[support_key(index)] = float(count)
    metrics["num_samples"] = float(num_samples)
    thresholds = np.asarray(threshold, dtype=np.float64)
    if thresholds.ndim == 0:
        metrics["threshold"] = float(thresholds)
    else:
        for index, value in enumerate(thresholds):
            metrics[f"threshold_class{index}"] = float(value)

    bad = [name for name, value in metrics.items() if not np.isfinite(value)]
    if bad:  # a bug, never a user mistake: the conventions above cover every case
        raise AssertionError(f"non-finite metrics: {', '.join(bad)}")
    return metrics


@dataclass(frozen=True)
class ClassRow:
    """One class's metrics, for tables and charts. Values are None when the dict lacks them."""

    index: int
    name: str
    support: float | None
    precision: float | None
    recall: float | None
    f1_score: float | None
    f2_score: float | None
    f0_5_score: float | None
    accuracy: float | None
    average_precision: float | None


def per_class_table(metrics: Mapping[str, float | str], class_names: Sequence[str]) -> list[ClassRow]:
    """The per-class metrics as one row per class, in class order.

    Works on our dicts and on 2019 eval_result.json files (string values, no AP, no support);
    missing keys give None.
    """

    def value(key: str) -> float | None:
        raw = metrics.get(key)
        return None if raw is None else float(raw)

    return [
        ClassRow(
            index=index,
            name=name,
            support=value(support_key(index)),
            **{metric: value(per_class_key(metric, index)) for metric in PER_CLASS_METRICS},
        )
        for index, name in enumerate(class_names)
    ]


# --- validation ---------------------------------------------------------------------------


def _validate(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    threshold: float | Sequence[float],
    class_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check inputs; return truth as bool and probabilities as float64 (exact for float32)."""
    truth = np.asarray(y_true)
    scores = np.asarray(probabilities)
    if truth.ndim != 2 or scores.ndim != 2:
        raise ValueError(
            "y_true and probabilities must be 2-D (samples, classes); "
            f"got shapes {truth.shape} and {scores.shape}"
        )
    if truth.shape != scores.shape:
        raise ValueError(f"y_true has shape {truth.shape} but probabilities has shape {scores.shape}")
    if truth.shape[0] == 0 or truth.shape[1] == 0:
        raise ValueError(f"need at least one sample and one class; got shape {truth.shape}")
    if class_names is not None and len(class_names) != truth.shape[1]:
        raise ValueError(f"{len(class_names)} class names given for {truth.shape[1]} classes in y_true")
    if not (np.issubdtype(truth.dtype, np.number) or truth.dtype == np.bool_):
        raise ValueError(f"y_true must be numeric 0/1 or bool; got dtype {truth.dtype}")
    if truth.dtype != np.bool_:
        not_binary = (truth != 0) & (truth != 1)
        if not_binary.any():
            row, col = np.argwhere(not_binary)[0]
            found = truth[row, col].item()
            raise ValueError(f"y_true must be binary (0 or 1); found {found!r} at sample {row}, class {col}")
    real = np.issubdtype(scores.dtype, np.number) and not np.issubdtype(scores.dtype, np.complexfloating)
    if not (real or scores.dtype == np.bool_):
        raise ValueError(f"probabilities must be real numbers; got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    out_of_range = ~((scores >= 0.0) & (scores <= 1.0))  # also catches NaN
    if out_of_range.any():
        row, col = np.argwhere(out_of_range)[0]
        found = scores[row, col].item()
        raise ValueError(
            f"probabilities must lie in [0, 1]; found {found!r} at sample {row}, class {col} "
            "(pass sigmoid outputs, not logits)"
        )
    thresholds = np.asarray(threshold, dtype=np.float64)
    if thresholds.ndim > 1 or (thresholds.ndim == 1 and thresholds.shape != (scores.shape[1],)):
        raise ValueError(
            f"threshold must be one number or one per class ({scores.shape[1]}); got {threshold!r}"
        )
    if not np.all((thresholds >= 0.0) & (thresholds <= 1.0)):
        raise ValueError(f"threshold must lie in [0, 1]; got {threshold!r}")
    return truth.astype(bool), scores


# --- threshold metrics --------------------------------------------------------------------


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, and 0 where the denominator is 0 (our single 0/0 convention)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _ratios(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, the F-beta scores and Jaccard "accuracy" from counts (any shape)."""
    ratios = {
        "precision": _safe_divide(tp, tp + fp),
        "recall": _safe_divide(tp, tp + fn),
        "accuracy": _safe_divide(tp, tp + fp + fn),
    }
    for name, beta in F_BETAS.items():
        weight = 1.0 + beta * beta
        ratios[name] = _safe_divide(weight * tp, weight * tp + beta * beta * fn + fp)
    return ratios


def _counts(truth: np.ndarray, predicted: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    tp = np.count_nonzero(truth & predicted, axis=axis)
    fp = np.count_nonzero(~truth & predicted, axis=axis)
    fn = np.count_nonzero(truth & ~predicted, axis=axis)
    return tp, fp, fn


def _sample_metrics(truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    num_classes = truth.shape[1]
    tp, fp, fn = _counts(truth, predicted, axis=1)
    ratios = _ratios(tp, fp, fn)
    ranking_loss, lrap = _ranking_loss_and_lrap(truth, scores)
    per_sample = {
        "sample_precision": ratios["precision"],
        "sample_recall": ratios["recall"],
        "sample_f1_score": ratios["f1_score"],
        "sample_f2_score": ratios["f2_score"],
        "sample_f0_5_score": ratios["f0_5_score"],
        "hamming_loss": (fp + fn) / num_classes,
        "subset_accuracy": (fp + fn == 0).astype(np.float64),
        "sample_accuracy": ratios["accuracy"],
        "one_error": _one_error(truth, scores),
        "coverage": _coverage(truth, scores),
        "label_cardinality": truth.sum(axis=1, dtype=np.float64),
        "ranking_loss": ranking_loss,
        "label_ranking_avg_precision": lrap,
    }
    return {name: float(per_sample[name].mean()) for name in SAMPLE_METRICS}


def _micro_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    tp, fp, fn = (count.sum() for count in _counts(truth, predicted, axis=1))
    ratios = _ratios(tp, fp, fn)
    return {f"micro_{name}": float(ratios[name]) for name in ("precision", "recall", *F_BETAS, "accuracy")}


def _per_class_threshold_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    return _ratios(*_counts(truth, predicted, axis=0))


# --- ranking metrics (per sample, ties as scikit-learn) -------------------------------------


def _one_error(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    top_class = np.argmax(scores, axis=1)  # lowest index among ties, like tf.argmax in 2019
    return (~truth[np.arange(truth.shape[0]), top_class]).astype(np.float64)


def _coverage(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # Rows without true labels compare against +inf and count 0, as scikit-learn.
    lowest_true_score = np.where(truth, scores, np.inf).min(axis=1, keepdims=True)
    return np.count_nonzero(scores >= lowest_true_score, axis=1).astype(np.float64)


def _ranking_loss_and_lrap(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample label ranking loss and label ranking average precision, from one sort.

    For a true class t: rank_t = classes scored >= t, above_t = true classes scored >= t (a tie
    counts as ranked above, as scikit-learn). LRAP = mean over t of above_t / rank_t; and
    rank_t - above_t is the number of false classes scored >= t, so summing it over t counts
    the misordered (true, false) pairs of the ranking loss.
    """
    num_samples, num_classes = scores.shape
    order = np.argsort(-scores, axis=1)  # stability is irrelevant: ties are resolved below
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    sorted_truth = np.take_along_axis(truth, order, axis=1)

    # Position of the last member of each run of equal scores: a reversed running minimum over
    # the run ends, so every member of a tie sees the whole tie.
    positions = np.arange(num_classes)
    is_run_end = np.ones((num_samples, num_classes), dtype=bool)
    is_run_end[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    run_end = np.where(is_run_end, positions, num_classes)
    run_end = np.minimum.accumulate(run_end[:, ::-1], axis=1)[:, ::-1]

    rank = run_end + 1.0
    true_above = np.take_along_axis(np.cumsum(sorted_truth, axis=1, dtype=np.float64), run_end, axis=1)
    num_true = truth.sum(axis=1)

    misordered_pairs = np.where(sorted_truth, rank - true_above, 0.0).sum(axis=1)
    ranking_loss = _safe_divide(misordered_pairs, num_true * (num_classes - num_true))

    precision_sum = np.where(sorted_truth, true_above / rank, 0.0).sum(axis=1)
    lrap = np.where(num_true > 0, _safe_divide(precision_sum, num_true), 1.0)
    return ranking_loss, lrap


# --- average precision ----------------------------------------------------------------------


def _average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Non-interpolated AP of one ranking (1-D); 0.0 without positives.

    AP = sum over thresholds of (R_n - R_{n-1}) P_n, which is the mean over positives of the
    precision at the threshold where each enters: (positives scored >= it) / (all scored >= it).
    Tied scores enter together, as in scikit-learn. Two sorts and binary searches, no argsort.
    """
    positive_scores = np.sort(scores[truth])
    if positive_scores.size == 0:
        return 0.0
    all_scores = np.sort(scores)
    scored_at_or_above = all_scores.size - np.searchsorted(all_scores, positive_scores, side="left")
    positives_at_or_above = positive_scores.size - np.searchsorted(
        positive_scores, positive_scores, side="left"
    )
    return float(np.mean(positives_at_or_above / scored_at_or_above))


def _average_precision_per_class(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # A loop over classes (43 at most), each step vectorised over all samples.
    return np.array([_average_precision(truth[:, c], scores[:, c]) for c in range(truth.shape[1])])


def write_eval_result(metrics: Mapping[str, float], path: str | os.PathLike[str]) -> Path:
    """`eval_result.json`: the metrics as JSON numbers (NaN/inf are refused, never written)."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        number = float(value)
        if not math.isfinite(number):
            raise AssertionError(f"metric {key} is {number}; metrics must define every case")
        clean[key] = number
    return write_text_atomically(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")
