"""Every metric against scikit-learn (the independent oracle), hand-computed values, and the
documented zero-denominator conventions."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn import metrics as skm

from bigearthnet_tf.constants import ORIGINAL_LABELS
from bigearthnet_tf.metrics import (
    MICRO_METRICS,
    PER_CLASS_METRICS,
    SAMPLE_METRICS,
    compute_metrics,
    per_class_key,
    per_class_table,
    support_key,
)

BETAS = {"f1_score": 1.0, "f2_score": 2.0, "f0_5_score": 0.5}


def sklearn_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """The expected metrics, computed by scikit-learn (plus plain NumPy for one_error and
    label_cardinality, which scikit-learn lacks)."""
    y_true = np.asarray(y_true, dtype=int)
    predicted = (probabilities >= threshold).astype(int)
    num_classes = y_true.shape[1]
    expected: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning on the zero-division cases
        for average in ("samples", "micro"):
            prefix = "sample" if average == "samples" else "micro"
            expected[f"{prefix}_precision"] = skm.precision_score(
                y_true, predicted, average=average, zero_division=0
            )
            expected[f"{prefix}_recall"] = skm.recall_score(
                y_true, predicted, average=average, zero_division=0
            )
            for name, beta in BETAS.items():
                expected[f"{prefix}_{name}"] = skm.fbeta_score(
                    y_true, predicted, beta=beta, average=average, zero_division=0
                )
            expected[f"{prefix}_accuracy"] = skm.jaccard_score(
                y_true, predicted, average=average, zero_division=0
            )
        expected["hamming_loss"] = skm.hamming_loss(y_true, predicted)
        expected["subset_accuracy"] = skm.accuracy_score(y_true, predicted)
        expected["coverage"] = skm.coverage_error(y_true, probabilities)
        expected["ranking_loss"] = skm.label_ranking_loss(y_true, probabilities)
        expected["label_ranking_avg_precision"] = skm.label_ranking_average_precision_score(
            y_true, probabilities
        )
        expected["label_cardinality"] = y_true.sum(axis=1).mean()
        top = [int(np.argmax(row)) for row in probabilities]
        expected["one_error"] = np.mean([y_true[n, top[n]] == 0 for n in range(len(top))])

        per_class = {
            "precision": skm.precision_score(y_true, predicted, average=None, zero_division=0),
            "recall": skm.recall_score(y_true, predicted, average=None, zero_division=0),
            "accuracy": skm.jaccard_score(y_true, predicted, average=None, zero_division=0),
        }
        for name, beta in BETAS.items():
            per_class[name] = skm.fbeta_score(y_true, predicted, beta=beta, average=None, zero_division=0)
        for name in ("precision", "recall", "accuracy", *BETAS):
            expected[f"macro_{name}_class_avg"] = float(np.mean(per_class[name]))
        # The macro averages match scikit-learn's own average="macro" too.
        assert expected["macro_f1_score_class_avg"] == pytest.approx(
            skm.f1_score(y_true, predicted, average="macro", zero_division=0), abs=1e-12
        )
        with_positives = [c for c in range(num_classes) if y_true[:, c].any()]
        per_class["average_precision"] = np.array(
            [
                skm.average_precision_score(y_true[:, c], probabilities[:, c]) if c in with_positives else 0.0
                for c in range(num_classes)
            ]
        )
        expected["macro_average_precision"] = (
            float(np.mean(per_class["average_precision"][with_positives])) if with_positives else 0.0
        )
        expected["macro_average_precision_excluded_classes"] = num_classes - len(with_positives)
        expected["micro_average_precision"] = (
            skm.average_precision_score(y_true, probabilities, average="micro") if y_true.any() else 0.0
        )
    for name, values in per_class.items():
        for index, value in enumerate(values):
            expected[per_class_key(name, index)] = value
    for index, count in enumerate(y_true.sum(axis=0)):
        expected[support_key(index)] = count
    return {name: float(value) for name, value in expected.items()}


def assert_matches_sklearn(y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> None:
    ours = compute_metrics(y_true, probabilities, threshold=threshold)
    expected = sklearn_metrics(y_true, probabilities, threshold)
    mismatched = {
        name: (ours[name], value)
        for name, value in expected.items()
        if not np.isclose(ours[name], value, rtol=1e-10, atol=1e-12)
    }
    assert not mismatched, mismatched


def random_case(seed: int, samples: int, classes: int, density: float, decimals: int | None):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((samples, classes)) < density).astype(np.int64)
    # Scores that lean towards the truth, so metrics are neither 0 nor 1.
    probabilities = np.clip(0.35 * y_true + 0.65 * rng.random((samples, classes)), 0.0, 1.0)
    if decimals is not None:  # coarse values make many ties
        probabilities = np.round(probabilities, decimals)
    return y_true, probabilities


# --- against scikit-learn -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "samples", "classes", "density", "decimals"),
    [
        (0, 300, 19, 0.15, None),
        (1, 500, 43, 0.07, 1),  # heavy ties
        (2, 200, 5, 0.5, 2),
        (3, 50, 43, 0.02, None),  # several classes without positives
        (4, 1000, 19, 0.2, 3),
    ],
)
def test_random_matrices_match_sklearn(seed, samples, classes, density, decimals):
    y_true, probabilities = random_case(seed, samples, classes, density, decimals)
    assert_matches_sklearn(y_true, probabilities)


def test_hand_made_edge_rows_and_columns_match_sklearn():
    y_true, probabilities = random_case(5, 40, 6, 0.4, 1)
    y_true[0] = 0  # sample without labels
    y_true[1] = 1  # sample with every label
    probabilities[2] = 0.3  # sample with all scores tied, nothing predicted
    probabilities[3] = 0.9  # sample with all scores tied, everything predicted
    y_true[:, 4] = 0  # class never present ...
    probabilities[:, 4] = 0.1  # ... nor predicted
    y_true[:, 5] = 0  # class never present but predicted
    probabilities[:, 5] = 0.7
    assert_matches_sklearn(y_true, probabilities)


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_threshold_matches_sklearn(threshold):
    y_true, probabilities = random_case(6, 120, 8, 0.3, 1)
    assert_matches_sklearn(y_true, probabilities, threshold)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 12).flatmap(
        lambda samples: st.integers(2, 6).flatmap(
            lambda classes: st.tuples(
                hnp.arrays(np.int8, (samples, classes), elements=st.integers(0, 1)),
                # Values from a small grid, so ties between samples and classes are common.
                hnp.arrays(
                    np.float64, (samples, classes), elements=st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0])
                ),
            )
        )
    )
)
@pytest.mark.slow  # also run by the full suite; the fast tier keeps a quicker test of the same module
def test_small_matrices_match_sklearn(case):
    y_true, probabilities = case
    assert_matches_sklearn(y_true, probabilities)


# --- hand-computed values -------------------------------------------------------------------

# A 3x3 example worked out on paper (threshold 0.5; a score equal to it counts as predicted).
#
#   y_true     probabilities      predicted
#   1 0 1      0.9 0.6 0.4        1 1 0
#   0 1 0      0.2 0.7 0.1        0 1 0
#   1 1 0      0.5 0.3 0.8        1 0 1
#
# Per sample (TP, FP, FN): s0 (1, 1, 1), s1 (1, 0, 0), s2 (1, 1, 1).
#   precision = recall = every F-beta = (1/2 + 1 + 1/2) / 3 = 2/3
#   Jaccard: (1/3 + 1 + 1/3) / 3 = 5/9; hamming: (2/3 + 0 + 2/3) / 3 = 4/9; subset: 1/3
#   one_error: top classes 0, 1, 2; class 2 is not true for s2 -> 1/3
#   coverage: s0 lowest true score 0.4 -> 3 classes >= it; s1 0.7 -> 1; s2 0.3 -> 3: 7/3
#   label_cardinality: (2 + 1 + 2) / 3 = 5/3
#   ranking_loss: s0 (0.4 <= 0.6) 1 of 2 pairs; s1 0 of 2; s2 2 of 2 -> (1/2 + 0 + 1) / 3 = 1/2
#   LRAP: s0 ranks 1 and 3 -> (1/1 + 2/3) / 2 = 5/6; s1 1; s2 ranks 2 and 3 -> (1/2 + 2/3) / 2
#         = 7/12 -> (5/6 + 1 + 7/12) / 3 = 29/36
# Per class (TP, FP, FN): c0 (2, 0, 0), c1 (1, 1, 1), c2 (0, 1, 1).
#   precision = recall = F-beta: 1, 1/2, 0 -> averages 1/2; accuracy (Jaccard) 1, 1/3, 0 -> 4/9
# Micro: TP 3, FP 2, FN 2 -> precision = recall = F-beta = 3/5, accuracy 3/7.
# AP: c0 scores (+0.9, +0.5, -0.2) -> 1; c1 (+0.7, -0.6, +0.3) -> (1 + 2/3) / 2 = 5/6;
#   c2 (-0.8, +0.4, -0.1) -> 1/2; macro (1 + 5/6 + 1/2) / 3 = 7/9.
#   micro: ranked 0.9+ 0.8- 0.7+ 0.6- 0.5+ 0.4+ 0.3+ 0.2- 0.1-, positives at 1, 3, 5, 6, 7 ->
#   (1/1 + 2/3 + 3/5 + 4/6 + 5/7) / 5 = 383/525.
HAND_TRUTH = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
HAND_PROBABILITIES = np.array([[0.9, 0.6, 0.4], [0.2, 0.7, 0.1], [0.5, 0.3, 0.8]])
HAND_EXPECTED = {
    "sample_precision": 2 / 3,
    "sample_recall": 2 / 3,
    "sample_f1_score": 2 / 3,
    "sample_f2_score": 2 / 3,
    "sample_f0_5_score": 2 / 3,
    "hamming_loss": 4 / 9,
    "subset_accuracy": 1 / 3,
    "sample_accuracy": 5 / 9,
    "one_error": 1 / 3,
    "coverage": 7 / 3,
    "label_cardinality": 5 / 3,
    "ranking_loss": 1 / 2,
    "label_ranking_avg_precision": 29 / 36,
    "micro_precision": 3 / 5,
    "micro_recall": 3 / 5,
    "micro_f1_score": 3 / 5,
    "micro_f2_score": 3 / 5,
    "micro_f0_5_score": 3 / 5,
    "micro_accuracy": 3 / 7,
    "macro_precision_class_avg": 1 / 2,
    "macro_recall_class_avg": 1 / 2,
    "macro_f1_score_class_avg": 1 / 2,
    "macro_f2_score_class_avg": 1 / 2,
    "macro_f0_5_score_class_avg": 1 / 2,
    "macro_accuracy_class_avg": 4 / 9,
    "macro_accuracy_class1": 1 / 3,
    "macro_f1_score_class2": 0.0,
    "macro_average_precision_class0": 1.0,
    "macro_average_precision_class1": 5 / 6,
    "macro_average_precision_class2": 1 / 2,
    "macro_average_precision": 7 / 9,
    "macro_average_precision_excluded_classes": 0.0,
    "micro_average_precision": 383 / 525,
    "support_class0": 2.0,
    "support_class1": 2.0,
    "support_class2": 1.0,
    "num_samples": 3.0,
    "threshold": 0.5,
}


def test_hand_computed_3x3():
    metrics = compute_metrics(HAND_TRUTH, HAND_PROBABILITIES)
    assert {name: metrics[name] for name in HAND_EXPECTED} == pytest.approx(HAND_EXPECTED, abs=1e-12)


def test_tied_scores_enter_average_precision_together():
    # Threshold 0.5 admits both tied samples: P 1/2 at R 1/2; then 0.1: P 2/3 at R 1.
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12, whatever order the tie is stored in.
    for truth in ([[1], [0], [1]], [[0], [1], [1]]):
        metrics = compute_metrics(np.array(truth), np.array([[0.5], [0.5], [0.1]]))
        assert metrics["macro_average_precision_class0"] == pytest.approx(7 / 12)
        assert metrics["micro_average_precision"] == pytest.approx(7 / 12)


def test_tied_scores_in_ranking_metrics():
    # All three scores tied: every class has rank 3, a tie is a misordered pair.
    metrics = compute_metrics(np.array([[1, 0, 0]]), np.array([[0.4, 0.4, 0.4]]))
    assert metrics["coverage"] == 3.0
    assert metrics["ranking_loss"] == 1.0
    assert metrics["label_ranking_avg_precision"] == pytest.approx(1 / 3)
    assert metrics["one_error"] == 0.0  # ties go to the lowest index, class 0


# --- zero denominators ----------------------------------------------------------------------


def assert_clean(metrics: dict[str, float]) -> None:
    assert all(type(value) is float for value in metrics.values())
    assert all(np.isfinite(value) for value in metrics.values())
    json.dumps(metrics, allow_nan=False)


def test_nothing_predicted_gives_zero_precision_and_f():
    y_true = np.array([[1, 0], [0, 1]])
    metrics = compute_metrics(y_true, np.full((2, 2), 0.1))
    assert_clean(metrics)
    for name in (
        "sample_precision",
        "sample_f1_score",
        "micro_precision",
        "micro_f1_score",
        "micro_accuracy",
    ):
        assert metrics[name] == 0.0, name
    assert metrics["macro_precision_class0"] == 0.0
    assert metrics["macro_average_precision"] > 0.0  # ranking metrics still see the scores


def test_class_never_present_nor_predicted_scores_zero_not_nan():
    # The 2019 code wrote NaN for this class's accuracy (0 / 0) and hence for the average.
    y_true = np.array([[1, 0], [1, 0], [0, 0]])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.0]])
    metrics = compute_metrics(y_true, probabilities)
    assert_clean(metrics)
    for metric in PER_CLASS_METRICS:
        assert metrics[per_class_key(metric, 1)] == 0.0, metric
    assert metrics["macro_accuracy_class0"] == 1.0
    assert metrics["macro_accuracy_class_avg"] == 0.5
    # AP: the class without positives is left out of the macro mean, and counted.
    assert metrics["macro_average_precision"] == 1.0
    assert metrics["macro_average_precision_excluded_classes"] == 1.0


def test_sample_without_true_labels():
    y_true = np.array([[0, 0, 0]])
    metrics = compute_metrics(y_true, np.array([[0.2, 0.6, 0.1]]))
    assert_clean(metrics)
    assert metrics["sample_recall"] == 0.0
    assert metrics["sample_precision"] == 0.0
    assert metrics["coverage"] == 0.0
    assert metrics["ranking_loss"] == 0.0
    assert metrics["label_ranking_avg_precision"] == 1.0
    assert metrics["one_error"] == 1.0
    assert metrics["micro_average_precision"] == 0.0
    assert metrics["macro_average_precision"] == 0.0
    assert metrics["macro_average_precision_excluded_classes"] == 3.0


def test_sample_without_true_or_predicted_labels():
    metrics = compute_metrics(np.array([[0, 0]]), np.array([[0.1, 0.2]]))
    assert_clean(metrics)
    assert metrics["sample_accuracy"] == 0.0  # empty union: 0 / 0 -> 0
    assert metrics["sample_f1_score"] == 0.0
    assert metrics["hamming_loss"] == 0.0
    assert metrics["subset_accuracy"] == 1.0


def test_sample_with_every_label():
    metrics = compute_metrics(np.array([[1, 1, 1]]), np.array([[0.9, 0.1, 0.5]]))
    assert_clean(metrics)
    assert metrics["ranking_loss"] == 0.0
    assert metrics["label_ranking_avg_precision"] == 1.0
    assert metrics["coverage"] == 3.0


def test_single_sample_single_class():
    assert_clean(compute_metrics(np.array([[1]]), np.array([[0.7]])))
    assert_clean(compute_metrics(np.array([[0]]), np.array([[0.7]])))


# --- structure and inputs -------------------------------------------------------------------


def test_every_2019_key_present_and_per_class_for_every_class():
    y_true, probabilities = random_case(7, 60, 43, 0.1, None)
    metrics = compute_metrics(y_true, probabilities, class_names=ORIGINAL_LABELS)
    assert_clean(metrics)
    expected_keys = {*SAMPLE_METRICS, *MICRO_METRICS, "micro_average_precision", "macro_average_precision"}
    expected_keys |= {f"macro_{m}_class_avg" for m in PER_CLASS_METRICS if m != "average_precision"}
    expected_keys |= {per_class_key(m, c) for m in PER_CLASS_METRICS for c in range(43)}
    assert expected_keys <= metrics.keys()
    assert list(metrics)[: len(SAMPLE_METRICS)] == list(SAMPLE_METRICS)


def test_accepts_bool_and_float32_inputs():
    y_true, probabilities = random_case(8, 80, 6, 0.3, 2)
    reference = compute_metrics(y_true, probabilities.astype(np.float32))
    assert compute_metrics(y_true.astype(bool), probabilities.astype(np.float32)) == reference
    assert compute_metrics(y_true.astype(np.float32), probabilities.astype(np.float32)) == reference


def test_sample_order_does_not_matter_and_class_order_permutes_classes():
    y_true, probabilities = random_case(9, 100, 5, 0.3, 1)
    metrics = compute_metrics(y_true, probabilities)
    rows = np.random.default_rng(0).permutation(100)
    assert compute_metrics(y_true[rows], probabilities[rows]) == pytest.approx(metrics, abs=1e-12)
    reversed_classes = compute_metrics(y_true[:, ::-1], probabilities[:, ::-1])
    for metric in PER_CLASS_METRICS:
        assert reversed_classes[per_class_key(metric, 0)] == pytest.approx(metrics[per_class_key(metric, 4)])


@pytest.mark.parametrize(
    ("y_true", "probabilities", "message"),
    [
        (np.ones((3, 2)), np.ones((3, 3)), r"shape \(3, 2\) but probabilities has shape \(3, 3\)"),
        (np.ones(3), np.ones(3), "must be 2-D"),
        (np.ones((0, 2)), np.ones((0, 2)), "at least one sample"),
        (np.array([[0, 2]]), np.array([[0.1, 0.2]]), r"binary \(0 or 1\); found 2 at sample 0, class 1"),
        (np.array([[0, 0.5]]), np.array([[0.1, 0.2]]), "binary"),
        (np.array([[0, 1]]), np.array([[0.1, 1.5]]), r"\[0, 1\]; found 1.5 at sample 0, class 1"),
        (np.array([[0, 1]]), np.array([[-3.0, 0.2]]), "not logits"),
        (np.array([[0, 1]]), np.array([[np.nan, 0.2]]), "found nan"),
        (np.array([["a", "b"]]), np.array([[0.1, 0.2]]), "numeric 0/1 or bool"),
    ],
)
def test_invalid_inputs_raise_clear_value_errors(y_true, probabilities, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(y_true, probabilities)


def test_invalid_threshold_and_class_names():
    with pytest.raises(ValueError, match="threshold must lie in"):
        compute_metrics(np.array([[1]]), np.array([[0.5]]), threshold=1.5)
    with pytest.raises(ValueError, match="43 class names given for 19 classes"):
        compute_metrics(np.ones((2, 19)), np.ones((2, 19)), class_names=ORIGINAL_LABELS)


def test_per_class_table_reads_our_dicts_and_2019_files():
    metrics = compute_metrics(HAND_TRUTH, HAND_PROBABILITIES)
    rows = per_class_table(metrics, ["a", "b", "c"])
    assert [row.name for row in rows] == ["a", "b", "c"]
    assert rows[1].average_precision == pytest.approx(5 / 6)
    assert rows[1].accuracy == pytest.approx(1 / 3)
    assert rows[0].support == 2.0
    # 2019 eval_result.json: values written as strings, no AP, no support.
    legacy = {"macro_precision_class0": "0.75", "macro_recall_class0": "0.5"}
    (row,) = per_class_table(legacy, ["a"])
    assert row.precision == 0.75 and row.recall == 0.5
    assert row.average_precision is None and row.support is None


def test_full_bigearthnet_test_split_size_is_fast():
    # 125,866 x 43, the size of the official v1 test split; the bound is loose for shared CPUs.
    rng = np.random.default_rng(10)
    y_true = rng.random((125_866, 43)) < 0.07
    probabilities = rng.random((125_866, 43), dtype=np.float32)
    start = time.perf_counter()
    metrics = compute_metrics(y_true, probabilities)
    elapsed = time.perf_counter() - start
    assert_clean(metrics)
    assert elapsed < 30.0, f"{elapsed:.1f} s"
    # Random scores: AP near the positive rate; ranking loss near 1/2 on samples with labels
    # (about 4% have none, and count 0).
    with_labels = y_true.any(axis=1).mean()
    assert metrics["micro_average_precision"] == pytest.approx(0.07, abs=0.005)
    assert metrics["ranking_loss"] == pytest.approx(0.5 * with_labels, abs=0.005)
