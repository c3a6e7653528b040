"""Evaluation: eval_result.json (every 2019 metric, numbers, no NaN), predictions.csv, the chart, and the
errors a user can make (wrong label type, corrupt files), on a checkpoint written without training."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from bigearthnet_tf import checkpoints
from bigearthnet_tf.archive import Patch
from bigearthnet_tf.cli import main
from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.constants import (
    BANDS_10M,
    BANDS_20M,
    BANDS_60M,
    BIGEARTHNET_19_LABELS,
    LABEL_TYPES,
    ORIGINAL_LABELS,
    S2_BANDS,
    original_to_19,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.evaluate import evaluate
from bigearthnet_tf.inference import sigmoid
from bigearthnet_tf.metrics import compute_metrics
from bigearthnet_tf.record_formats import DEFAULT
from bigearthnet_tf.records import RecordWriter

MODEL = "K-BranchCNN-Tiny"
TEST_PATCHES = 12
BATCH = 5  # batches of 5, 5 and 2: metrics must still be over the whole set
METRICS_2019 = (
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
    "micro_precision",
    "micro_recall",
    "micro_f1_score",
    "micro_f2_score",
    "micro_f0_5_score",
    "micro_accuracy",
    "macro_precision_class_avg",
    "macro_recall_class_avg",
    "macro_f1_score_class_avg",
    "macro_f2_score_class_avg",
    "macro_f0_5_score_class_avg",
    "macro_accuracy_class_avg",
)
PER_CLASS_2019 = ("precision", "recall", "f1_score", "f2_score", "f0_5_score", "accuracy")


def random_label_patches(count: int, seed: int) -> list[Patch]:
    rng = np.random.default_rng(seed)
    patches = []
    for index in range(count):
        labels_43 = tuple(
            ORIGINAL_LABELS[i] for i in sorted(rng.choice(43, size=rng.integers(1, 4), replace=False))
        )
        bands = {band.name: rng.integers(0, 5000, (band.size,) * 2).astype(np.uint16) for band in S2_BANDS}
        patches.append(Patch(f"S2B_MSIL2A_TEST_{index}", bands, labels_43, original_to_19(labels_43)))
    return patches


def model_inputs(patches: list[Patch]) -> dict[str, np.ndarray]:
    """The raw-band input dict, built from the patches directly (not through the input pipeline)."""
    return {
        key: np.stack([np.stack([p.bands[b] for b in bands], axis=-1) for p in patches]).astype(np.float32)
        for key, bands in (("bands_10m", BANDS_10M), ("bands_20m", BANDS_20M), ("bands_60m", BANDS_60M))
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Test records and one untrained-but-saved checkpoint per label type."""
    import keras

    from bigearthnet_tf.models import build_model

    folder = tmp_path_factory.mktemp("evaluate")
    patches = random_label_patches(TEST_PATCHES, 11)
    with RecordWriter(folder / "test.tfrecord") as writer:
        for patch in patches:
            writer.write(DEFAULT.encode(patch))
    models = {}
    for label_type, classes in LABEL_TYPES.items():
        keras.utils.set_random_seed(5)
        model = build_model(MODEL, len(classes))
        models[label_type] = model
        checkpoints.save_checkpoint(
            folder / label_type / "models" / "iteration-3",
            model,
            model_name=MODEL,
            label_type=label_type,
            modality="S2",
            iteration=3,
        )
    return folder, patches, models


def eval_config(folder, checkpoint_type="BigEarthNet-19", out="out", **changes):
    """An evaluation config for the checkpoint of `checkpoint_type`; `changes` are extra keys."""
    values = {
        "batch_size": BATCH,
        "out_dir": str(folder / out),
        "test_tf_record_files": [str(folder / "test.tfrecord")],
        "model_file": str(folder / checkpoint_type / "models" / "iteration-3"),
        **changes,
    }
    return config_from_dict({k: v for k, v in values.items() if v is not ...}, "evaluate")


def read_json_strict(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("label_type", ["BigEarthNet-19", "original"])
def test_outputs(setup, label_type, capsys):
    folder, patches, models = setup
    out = f"out-{label_type}"
    result = evaluate(eval_config(folder, label_type, out=out, test_size=TEST_PATCHES))
    out_dir = folder / out / "eval" / "iteration-3-test"  # <checkpoint>-<data>
    assert result.eval_result == out_dir / "eval_result.json"
    class_names = LABEL_TYPES[label_type]

    # eval_result.json: every 2019 metric under its 2019 name, per class for every class, plus AP;
    # the 2019 path <out_dir>/eval_result.json holds the same.
    metrics = read_json_strict(out_dir / "eval_result.json")
    assert read_json_strict(folder / out / "eval_result.json") == metrics
    assert all(isinstance(value, int | float) and math.isfinite(value) for value in metrics.values())
    missing = [key for key in METRICS_2019 if key not in metrics]
    missing += [
        f"macro_{name}_class{i}"
        for name in (*PER_CLASS_2019, "average_precision")
        for i in range(len(class_names))
        if f"macro_{name}_class{i}" not in metrics
    ]
    assert not missing
    assert "micro_average_precision" in metrics and "macro_average_precision" in metrics
    assert metrics["num_samples"] == TEST_PATCHES and result.num_samples == TEST_PATCHES

    # predictions.csv: header, one row per patch in file order, probabilities from the model itself.
    with open(out_dir / "predictions.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["patch_name", *class_names, *(f"true:{name}" for name in class_names)]
    assert [row[0] for row in rows[1:]] == [patch.name for patch in patches]
    probabilities = np.array([[float(v) for v in row[1 : 1 + len(class_names)]] for row in rows[1:]])
    truth = np.array([[int(v) for v in row[1 + len(class_names) :]] for row in rows[1:]])
    assert all(len(value.split(".")[1]) >= 6 for row in rows[1:] for value in row[1 : 1 + len(class_names)])
    expected = sigmoid(np.asarray(models[label_type](model_inputs(patches), training=False)))
    np.testing.assert_allclose(probabilities, expected, atol=2e-6)
    label_sets = [p.labels_43 if label_type == "original" else p.labels_19 for p in patches]
    expected_truth = np.array([[int(name in labels) for name in class_names] for labels in label_sets])
    np.testing.assert_array_equal(truth, expected_truth)

    # Metrics are over the whole set (12 patches in batches of 5, 5, 2), not averages of batches.
    whole_set = compute_metrics(truth, probabilities, class_names=class_names)
    for key in ("macro_average_precision", "micro_average_precision", "micro_f1_score", "ranking_loss"):
        assert metrics[key] == pytest.approx(whole_set[key], abs=1e-6), key

    png = out_dir / "per_class_metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out_dir / "eval_config.json").read_text())["batch_size"] == BATCH
    thresholds = json.loads((out_dir / "thresholds.json").read_text())
    assert thresholds == {"source": "threshold", "thresholds": dict.fromkeys(class_names, 0.5)}
    assert metrics["threshold"] == 0.5
    assert not (folder / out / "config.json").exists()  # the training run's config is never overwritten
    printed = capsys.readouterr().out
    assert "Summary" in printed and "Per class" in printed and class_names[1].split()[0] in printed


def test_results_are_never_lost(setup, capsys):
    """A second evaluation of the same checkpoint and data keeps the first one's folder; another
    checkpoint or data gets its own; only --overwrite replaces, and then as a whole set."""
    folder, _, _ = setup
    evaluate(eval_config(folder, out="again"))
    eval_dir = folder / "again" / "eval"
    first = (eval_dir / "iteration-3-test" / "eval_result.json").read_text()
    first_config = (eval_dir / "iteration-3-test" / "eval_config.json").read_text()
    capsys.readouterr()
    result = evaluate(eval_config(folder, out="again", test_size=99))
    printed = " ".join(capsys.readouterr().out.split())
    assert "test_size is 99 but the test files hold 12 records" in printed
    assert (
        f"earlier results of this checkpoint and data are kept in {eval_dir / 'iteration-3-test'}" in printed
    )
    assert result.eval_result == eval_dir / "iteration-3-test-2" / "eval_result.json"
    assert (eval_dir / "iteration-3-test" / "eval_config.json").read_text() == first_config  # untouched
    assert json.loads((eval_dir / "iteration-3-test-2" / "eval_config.json").read_text())["test_size"] == 99
    assert result.eval_result.read_text() == first  # deterministic
    evaluate(eval_config(folder, out="again", test_size=98), overwrite=True)
    assert json.loads((eval_dir / "iteration-3-test" / "eval_config.json").read_text())["test_size"] == 98
    assert sorted(path.name for path in eval_dir.iterdir()) == ["iteration-3-test", "iteration-3-test-2"]
    assert sorted(path.name for path in (eval_dir / "iteration-3-test").iterdir()) == [
        "eval_config.json", "eval_result.json", "per_class_metrics.png", "predictions.csv", "thresholds.json"
    ]  # fmt: skip


def test_a_killed_evaluation_leaves_the_old_set_and_is_cleaned_up(setup, monkeypatch):
    """Killed while writing its set (here: the chart fails), an evaluation leaves the earlier folder
    complete and no temporary folder; a temporary left by a real kill is removed by the next run."""
    from bigearthnet_tf import report

    folder, _, _ = setup
    evaluate(eval_config(folder, out="killed"))
    eval_dir = folder / "killed" / "eval"
    before = {path.name: path.read_bytes() for path in (eval_dir / "iteration-3-test").iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(report, "save_figure_atomically", crash)
        with pytest.raises(KeyboardInterrupt):
            evaluate(eval_config(folder, out="killed", test_size=50), overwrite=True)
    assert {path.name: path.read_bytes() for path in (eval_dir / "iteration-3-test").iterdir()} == before
    assert [path.name for path in eval_dir.iterdir()] == ["iteration-3-test"]
    stale = eval_dir / ".iteration-3-test.tmp-abc"  # what SIGKILL during the writing leaves
    stale.mkdir()
    (stale / "eval_result.json").write_text("{")
    evaluate(eval_config(folder, out="killed"))
    assert not stale.exists()


def test_stored_and_file_thresholds(setup, tmp_path):
    """ "thresholds": "stored" uses predict --choose-thresholds' file (bound to the weights); a JSON
    file works too; the metrics and thresholds.json name the thresholds per class."""
    from bigearthnet_tf.thresholds import THRESHOLDS_FORMAT, thresholds_path

    folder, patches, _ = setup
    base = folder / "BigEarthNet-19" / "models" / "iteration-3"
    with pytest.raises(
        UserError, match=r'"thresholds": "stored" but no thresholds are stored beside .*--choose-thresholds'
    ):
        evaluate(eval_config(folder, out=str(tmp_path / "none"), thresholds="stored"))
    chosen = {name: 0.2 + 0.01 * index for index, name in enumerate(LABEL_TYPES["BigEarthNet-19"])}
    sha256 = checkpoints.read_metadata(base)["files"]["weights"]["sha256"]
    stored = {"format": THRESHOLDS_FORMAT, "model_sha256": sha256, "thresholds": chosen}
    thresholds_path(base).write_text(json.dumps(stored))
    try:
        result = evaluate(eval_config(folder, out=str(tmp_path / "stored"), thresholds="stored"))
        metrics = json.loads(result.eval_result.read_text())
        assert "threshold" not in metrics
        assert [metrics[f"threshold_class{i}"] for i in range(19)] == pytest.approx(list(chosen.values()))
        document = json.loads((result.eval_result.parent / "thresholds.json").read_text())
        assert document["source"] == f"stored {thresholds_path(base)}" and document[
            "thresholds"
        ] == pytest.approx(chosen)
        truth = np.array(
            [[int(name in p.labels_19) for name in LABEL_TYPES["BigEarthNet-19"]] for p in patches]
        )
        with open(result.predictions, newline="") as stream:
            rows = list(csv.reader(stream))[1:]
        probabilities = np.array([[float(v) for v in row[1:20]] for row in rows])
        expected = compute_metrics(truth, probabilities, threshold=list(chosen.values()))
        assert metrics["micro_f1_score"] == pytest.approx(expected["micro_f1_score"], abs=1e-9)
        stored["model_sha256"] = "0" * 64
        thresholds_path(base).write_text(json.dumps(stored))
        with pytest.raises(UserError, match="chosen for other weights"):
            evaluate(eval_config(folder, out=str(tmp_path / "stale"), thresholds="stored"))
    finally:
        thresholds_path(base).unlink()
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"Arable land": 0.9}))
    result = evaluate(eval_config(folder, out=str(tmp_path / "file"), thresholds=str(file)))
    metrics = json.loads(result.eval_result.read_text())
    assert metrics["threshold_class2"] == 0.9 and metrics["threshold_class0"] == 0.5


def test_keys_set_in_the_config_must_match_the_checkpoint(setup, tmp_path):
    folder, _, _ = setup
    with pytest.raises(UserError, match=r"trained for label_type 'BigEarthNet-19'.*asks for 'original'"):
        evaluate(eval_config(folder, out=str(tmp_path), label_type="original"))
    with pytest.raises(UserError, match=r"trained on modality 'S2' but the config asks for 'S1'"):
        evaluate(eval_config(folder, out=str(tmp_path), modality="S1"))
    with pytest.raises(UserError, match=r"holds model 'K-BranchCNN-Tiny' but the config names 'VGG16'"):
        evaluate(eval_config(folder, out=str(tmp_path), model_name="VGG16"))


def test_cli_wrong_label_type_is_one_line_exit_1(setup, tmp_path, capsys):
    folder, _, _ = setup
    path = tmp_path / "eval.json"
    path.write_text(
        json.dumps(
            {
                "model_name": MODEL,
                "label_type": "original",
                "batch_size": BATCH,
                "out_dir": str(tmp_path),
                "test_tf_record_files": [str(folder / "test.tfrecord")],
                "model_file": str(folder / "BigEarthNet-19" / "models" / "iteration-3"),
            }
        )
    )
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", str(path)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and "'original'" in err and err.count("\n") == 1


def test_corrupt_test_file_is_named_or_skipped(setup, tmp_path, capsys):
    folder, _, _ = setup
    data = bytearray((folder / "test.tfrecord").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a record's payload: its CRC fails
    corrupt = tmp_path / "corrupt.tfrecord"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"corrupt or truncated TFRecord file .*corrupt\.tfrecord"):
        evaluate(eval_config(folder, out=str(tmp_path / "a"), test_tf_record_files=[str(corrupt)]))
    result = evaluate(
        eval_config(
            folder, out=str(tmp_path / "b"), test_tf_record_files=[str(corrupt)], skip_corrupt_records=True
        )
    )
    assert 0 < result.num_samples < TEST_PATCHES
    assert "skipped" in capsys.readouterr().out


def test_exported_keras_model_is_evaluated_in_safe_mode(setup, tmp_path):
    folder, _, models = setup
    path = tmp_path / "exported.keras"
    models["BigEarthNet-19"].save(path)
    result = evaluate(eval_config(folder, out=str(tmp_path / "out"), model_file=str(path)))
    assert result.class_names == BIGEARTHNET_19_LABELS and result.num_samples == TEST_PATCHES


def test_a_model_exported_with_probabilities_evaluates_like_its_checkpoint(setup, tmp_path):
    """`export --format keras` appends a sigmoid; evaluation must not apply a second one."""
    from bigearthnet_tf.export import export_model

    folder, _, _ = setup
    exported = tmp_path / "exported.keras"
    export_model(str(folder / "BigEarthNet-19" / "models" / "iteration-3"), "keras", exported)
    from_checkpoint = evaluate(eval_config(folder, out=str(tmp_path / "a")))
    from_export = evaluate(eval_config(folder, out=str(tmp_path / "b"), model_file=str(exported)))
    for key, value in from_checkpoint.metrics.items():
        assert from_export.metrics[key] == pytest.approx(value, abs=1e-6), key


def test_records_short_of_the_manifest_are_named(setup, example_paths, tmp_path, capsys):
    """A split that dataset.json says holds 6 patches, of which one shard of 3 is left: evaluate and
    inspect say how many records they read of how many were promised, and which file is not there."""
    from bigearthnet_tf.inspect_data import inspect
    from bigearthnet_tf.prepare import prepare

    folder, _, _ = setup
    names = sorted(path.name for path in example_paths.s2.iterdir())
    (tmp_path / "test.csv").write_text("\n".join(names) + "\n")
    prepared = tmp_path / "prepared"
    prepare(example_paths.s2, prepared, [tmp_path / "test.csv"], shard_size=3, workers=1, show_progress=False)
    (prepared / "test-00001-of-00002.tfrecord").unlink()
    capsys.readouterr()
    result = evaluate(
        eval_config(folder, out=str(tmp_path / "out"), test_tf_record_files=[str(prepared / "*.tfrecord")])
    )
    assert result.num_samples == 3
    expected = "3 records of the 6 that .*dataset.json lists for split 'test'; its files not read: "
    pattern = expected + "test-00001-of-00002.tfrecord"
    import re

    assert re.search("note: test_tf_record_files hold " + pattern, capsys.readouterr().out.replace("\n", ""))
    inspect([str(prepared)])
    assert re.search("note: the records hold " + pattern, capsys.readouterr().out.replace("\n", ""))
