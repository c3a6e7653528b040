"""Prediction on patch folders and archives: equal to eval.py on the same patches' prepared records,
S1 pairing (v1 JSON, v2 parquet), output formats, thresholds chosen on validation records, bad patches,
and the command line. Models are tiny and untrained (saved with non-default statistics, so the test
also shows that the statistics travel with the checkpoint)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bigearthnet_tf import checkpoints
from bigearthnet_tf.archive import BadPatchError, open_archive
from bigearthnet_tf.cli import main
from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, S1_BAND_NAMES
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.evaluate import evaluate
from bigearthnet_tf.inference import sigmoid
from bigearthnet_tf.models import DEFAULT_STATISTICS, INPUTS
from bigearthnet_tf.predict import PREDICTED_COLUMN, predict, tune_thresholds
from bigearthnet_tf.predictor import load_predictor
from bigearthnet_tf.prepare import prepare
from bigearthnet_tf.prepare_splits import read_split_csv
from bigearthnet_tf.thresholds import MIN_POSITIVES, choose_thresholds, thresholds_path

MODEL = "K-BranchCNN-Tiny"
LABEL_TYPE = "BigEarthNet-19"
BATCH = 4  # smaller than the sets: several batches and a padded last one
EQUALITY_ATOL = 1e-6  # predict vs evaluate; the CSVs hold 8 decimals


def save_model(folder: Path, modality: str = "S2", seed: int = 3) -> Path:
    """An untrained tiny checkpoint with statistics shifted from the defaults."""
    import keras

    from bigearthnet_tf.models import build_model

    statistics = {band: (mean * 1.1, std * 0.9) for band, (mean, std) in DEFAULT_STATISTICS.items()}
    keras.utils.set_random_seed(seed)
    model = build_model(MODEL, len(BIGEARTHNET_19_LABELS), modality, statistics)
    return checkpoints.save_checkpoint(
        folder / "models" / "iteration-1",
        model,
        model_name=MODEL,
        label_type=LABEL_TYPE,
        modality=modality,
        iteration=1,
    )


def read_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    return rows[0], {row[0]: row[1:] for row in rows[1:]}


def probabilities_of(rows: dict[str, list[str]], names: list[str], classes: int) -> np.ndarray:
    return np.array([[float(value) for value in rows[name][:classes]] for name in names])


def direct_probabilities(model_base: Path, patches) -> np.ndarray:
    """The model applied to arrays stacked here from `read_patch` results (no predict code)."""
    predictor = load_predictor(model_base)
    inputs = {}
    for key in predictor.input_keys:
        bands = INPUTS[key].bands
        source = [p.s1_bands if key == "bands_s1" else p.bands for p in patches]
        inputs[key] = np.stack([np.stack([s[b] for b in bands], axis=-1) for s in source]).astype(np.float32)
    return sigmoid(np.asarray(predictor.model(inputs, training=False)))


@pytest.fixture(scope="module")
def v1_setup(synthetic_v1, tmp_path_factory):
    """The v1 test and val splits prepared, an S2 checkpoint, and evaluate's predictions.csv on test."""
    folder = tmp_path_factory.mktemp("predict_v1")
    prepare(
        synthetic_v1,
        folder / "records",
        split_files=[synthetic_v1 / "test.csv", synthetic_v1 / "val.csv"],
        workers=1,
        show_progress=False,
    )
    base = save_model(folder / "run")
    config = config_from_dict(
        {
            "batch_size": BATCH,
            "out_dir": str(folder / "eval"),
            "test_tf_record_files": [str(folder / "records" / "test-*.tfrecord")],
            "model_file": str(base),
        },
        "evaluate",
    )
    return folder, base, evaluate(config).predictions, load_predictor(base)


def patch_folders(root: Path, names: list[str]) -> list[Path]:
    return [root / "BigEarthNet-v1.0" / name for name in names]


def test_predict_on_folders_equals_evaluate_on_records(synthetic_v1, v1_setup, tmp_path):
    folder, base, evaluated, _ = v1_setup
    names = read_split_csv(synthetic_v1 / "test.csv")
    out = tmp_path / "predictions.csv"
    result = predict(base, patch_folders(synthetic_v1, names), out=out, batch_size=BATCH, show_progress=False)

    header, rows = read_csv(out)
    assert header == ["patch_name", *BIGEARTHNET_19_LABELS, PREDICTED_COLUMN]
    assert list(rows) == names == result.names
    _, evaluated_rows = read_csv(evaluated)
    assert sorted(evaluated_rows) == sorted(names)
    ours = probabilities_of(rows, names, len(BIGEARTHNET_19_LABELS))
    theirs = probabilities_of(evaluated_rows, names, len(BIGEARTHNET_19_LABELS))
    difference = float(np.abs(ours - theirs).max())
    print(f"max |predict - evaluate| over {len(names)} patches x 19 classes: {difference:.2e}")
    assert difference <= EQUALITY_ATOL
    np.testing.assert_allclose(result.probabilities, theirs, atol=EQUALITY_ATOL)
    # The predicted labels are exactly the classes at or above 0.5, in class order.
    for name, row in zip(names, ours, strict=True):
        expected = [c for c, p in zip(BIGEARTHNET_19_LABELS, row, strict=True) if p >= 0.5]
        assert rows[name][-1] == ";".join(expected)


def test_archive_mode_with_split_lists_equals_folder_mode(synthetic_v1, v1_setup, tmp_path):
    _, _, _, predictor = v1_setup  # loaded once, traced once
    names = read_split_csv(synthetic_v1 / "test.csv") + read_split_csv(synthetic_v1 / "val.csv")
    by_archive = predict(
        predictor,
        archive=synthetic_v1,
        split_files=[synthetic_v1 / "test.csv", synthetic_v1 / "val.csv"],
        out=tmp_path / "archive.json",
        batch_size=5,
        workers=2,
        show_progress=False,
    )
    assert by_archive.names == names
    by_folders = predict(predictor, patch_folders(synthetic_v1, names), batch_size=7, show_progress=False)
    np.testing.assert_allclose(by_archive.probabilities, by_folders.probabilities, atol=1e-6)
    everything = predict(predictor, archive=synthetic_v1, show_progress=False)  # every folder, sorted
    assert everything.names == sorted(everything.names) and set(names) <= set(everything.names)

    document = json.loads((tmp_path / "archive.json").read_text())
    assert [entry["patch_name"] for entry in document] == names
    first = document[0]
    assert list(first) == ["patch_name", "split", "probabilities", "labels"]
    test_names = read_split_csv(synthetic_v1 / "test.csv")
    assert [entry["split"] for entry in document] == ["test"] * len(test_names) + ["val"] * (
        len(names) - len(test_names)
    )
    assert everything.splits is None  # no split lists: no split column
    assert list(first["probabilities"]) == list(BIGEARTHNET_19_LABELS)
    assert first["probabilities"][BIGEARTHNET_19_LABELS[0]] == pytest.approx(
        by_archive.probabilities[0, 0], abs=1e-8
    )
    assert first["labels"] == by_archive.labels[0]


def test_s1_models_read_s1_from_v1_json_pairing(synthetic_v1_s1, tmp_path):
    """An MM model on v1 folders + --s1-root equals evaluate on records prepared with S1."""
    base = save_model(tmp_path / "run", modality="MM")
    prepare(
        synthetic_v1_s1,
        tmp_path / "records",
        split_files=[synthetic_v1_s1 / "test.csv"],
        s1_root=synthetic_v1_s1,
        workers=1,
        show_progress=False,
    )
    config = config_from_dict(
        {
            "batch_size": BATCH,
            "out_dir": str(tmp_path / "eval"),
            "test_tf_record_files": [str(tmp_path / "records")],
            "model_file": str(base),
        },
        "evaluate",
    )
    _, evaluated = read_csv(evaluate(config).predictions)
    names = read_split_csv(synthetic_v1_s1 / "test.csv")
    with pytest.raises(UserError, match="reads Sentinel-1 bands.*--s1-root"):
        predict(base, patch_folders(synthetic_v1_s1, names), show_progress=False)
    result = predict(
        base,
        patch_folders(synthetic_v1_s1, names),
        s1_root=synthetic_v1_s1,
        batch_size=BATCH,
        show_progress=False,
    )
    expected = probabilities_of(evaluated, names, len(BIGEARTHNET_19_LABELS))
    assert float(np.abs(result.probabilities - expected).max()) <= EQUALITY_ATOL
    # Archive mode finds BigEarthNet-S1-v1.0 beside BigEarthNet-v1.0 without --s1-root.
    by_archive = predict(
        base, archive=synthetic_v1_s1, split_files=[synthetic_v1_s1 / "test.csv"], show_progress=False
    )
    np.testing.assert_allclose(by_archive.probabilities, result.probabilities, atol=1e-6)


def test_v2_folders_pair_s1_through_the_parquet(synthetic_v2, tmp_path):
    base = save_model(tmp_path / "run", modality="MM")
    archive = open_archive(synthetic_v2, s1_root=synthetic_v2)
    names = archive.official_splits()["test"][:6]
    folders = [Path(archive.patch_folder(name)) for name in names]
    result = predict(base, folders, s1_root=synthetic_v2, batch_size=BATCH, show_progress=False)
    patches = [archive.read_patch(name) for name in names]
    assert all(set(p.s1_bands) == set(S1_BAND_NAMES) for p in patches)
    np.testing.assert_allclose(result.probabilities, direct_probabilities(base, patches), atol=1e-6)
    official = predict(base, archive=synthetic_v2, official_splits=True, show_progress=False)
    assert set(names) <= set(official.names)


def test_real_example_patches(example_paths, tmp_path):
    folders = sorted(path for path in example_paths.s2.iterdir() if path.is_dir())
    assert len(folders) == 6
    archive = open_archive(example_paths.s2, s1_root=example_paths.s1)
    patches = [archive.read_patch(folder.name) for folder in folders]
    for modality in ("S2", "MM"):
        base = save_model(tmp_path / modality, modality=modality)
        result = predict(base, folders, s1_root=example_paths.s1, show_progress=False)
        assert result.names == [folder.name for folder in folders]
        np.testing.assert_allclose(result.probabilities, direct_probabilities(base, patches), atol=1e-6)


def test_bad_patch_is_one_line_or_skipped(synthetic_v1, v1_setup, tmp_path):
    _, _, _, predictor = v1_setup  # loaded once, traced once
    names = read_split_csv(synthetic_v1 / "test.csv")[:5]
    copies = []
    for name in names:
        shutil.copytree(synthetic_v1 / "BigEarthNet-v1.0" / name, tmp_path / "patches" / name)
        copies.append(tmp_path / "patches" / name)
    bad = names[2]
    (copies[2] / f"{bad}_B8A.tif").unlink()
    out = tmp_path / "out.csv"
    with pytest.raises(BadPatchError) as caught:
        predict(predictor, copies, out=out, batch_size=2, show_progress=False)
    assert str(caught.value) == f"patch {bad}: {bad}_B8A.tif: missing band file"
    assert not out.exists() and not list(tmp_path.glob(".out.csv*"))

    result = predict(
        predictor,
        [*copies, tmp_path / "patches" / "nowhere"],
        out=out,
        batch_size=2,
        skip_bad=True,
        show_progress=False,
    )
    assert result.names == [name for name in names if name != bad]
    assert [name for name, _ in result.skipped] == [bad, "nowhere"]
    assert "no such patch folder" in result.skipped[1][1]
    _, rows = read_csv(out)
    assert list(rows) == result.names

    # Truncated band file: the reason comes from the TIFF reader and names the file.
    band = copies[0] / f"{names[0]}_B02.tif"
    band.write_bytes(band.read_bytes()[:100])
    with pytest.raises(BadPatchError, match=rf"patch {names[0]}: {names[0]}_B02.tif: "):
        predict(predictor, copies[:1], show_progress=False)


def test_output_rules(synthetic_v1, v1_setup, tmp_path, capsys):
    _, _, _, predictor = v1_setup  # loaded once, traced once
    folders = patch_folders(synthetic_v1, read_split_csv(synthetic_v1 / "test.csv")[:3])
    out = tmp_path / "p.csv"
    out.write_text("keep me")
    with pytest.raises(UserError, match=r"already exists; pass --overwrite"):
        predict(predictor, folders, out=out, show_progress=False)
    assert out.read_text() == "keep me"
    predict(predictor, folders, out=out, overwrite=True, show_progress=False)
    assert out.read_text().startswith("patch_name,")
    with pytest.raises(UserError, match=r"unknown output format '\.txt'"):
        predict(predictor, folders, out=tmp_path / "p.txt", show_progress=False)
    with pytest.raises(UserError, match="either patch folders or --archive"):
        predict(predictor, [], show_progress=False)
    with pytest.raises(UserError, match="given twice"):
        predict(predictor, [folders[0], folders[0]], show_progress=False)
    with pytest.raises(UserError, match="--threshold must be in"):
        predict(predictor, folders, threshold=1.5, show_progress=False)
    # No --out: CSV on standard output.
    capsys.readouterr()
    result = predict(predictor, folders, threshold=0.4, show_progress=False)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("patch_name,Urban fabric,") and len(printed) == 4
    assert np.all(result.thresholds == 0.4)


def test_choose_thresholds_maximises_each_class_f1():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    labels = (rng.random((60, 4)) < [0.3, 0.5, 0.05, 0.0]).astype(np.float32)
    probabilities = np.clip(labels * 0.3 + rng.random((60, 4)) * 0.7, 0, 1)
    probabilities[:10, 1] = 0.5  # ties enter together
    choice = choose_thresholds(labels, probabilities, classes, min_positives=1)
    for index, name in enumerate(classes[:3]):
        candidates = np.unique(probabilities[:, index])
        best = max(
            f1_score(labels[:, index], probabilities[:, index] >= t, zero_division=0) for t in candidates
        )
        at_choice = f1_score(
            labels[:, index], probabilities[:, index] >= choice.thresholds[name], zero_division=0
        )
        assert at_choice == pytest.approx(best, abs=1e-12)
        assert choice.f1[name] == pytest.approx(best, abs=1e-12)
        assert 0 < choice.thresholds[name] <= 1
    assert choice.thresholds["d"] == 0.5 and choice.too_few_positives == {"d": 0}
    # With the documented minimum, a class with a handful of positives keeps the default and is named.
    few = int(labels[:, 2].sum())
    assert 0 < few < MIN_POSITIVES
    guarded = choose_thresholds(labels, probabilities, classes)
    assert guarded.thresholds["c"] == 0.5 and guarded.too_few_positives == {"c": few, "d": 0}
    assert guarded.thresholds["a"] == choice.thresholds["a"]
    # The threshold lies halfway between the lowest score kept and the highest score left out.
    kept = probabilities[probabilities[:, 0] >= choice.thresholds["a"], 0].min()
    left = probabilities[probabilities[:, 0] < choice.thresholds["a"], 0].max()
    assert choice.thresholds["a"] == pytest.approx((kept + left) / 2)


def test_thresholds_tuned_on_validation_are_stored_and_used(synthetic_v1, v1_setup, tmp_path):
    folder, _, _, _ = v1_setup
    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    base = run / "models" / "iteration-1"
    path = tune_thresholds(base, [folder / "records" / "val-00000-of-00001.tfrecord"], batch_size=BATCH)
    assert path == thresholds_path(base) == run / "models" / "iteration-1.thresholds.json"
    assert checkpoints.is_complete(base)  # the checkpoint's files and checksums are untouched
    stored = json.loads(path.read_text())
    assert stored["class_names"] == list(BIGEARTHNET_19_LABELS)
    assert stored["validation"]["patches"] == len(read_split_csv(synthetic_v1 / "val.csv"))
    thresholds = np.array([stored["thresholds"][name] for name in BIGEARTHNET_19_LABELS])

    folders = patch_folders(synthetic_v1, read_split_csv(synthetic_v1 / "test.csv"))
    predictor = load_predictor(base)
    # Never applied unasked: 0.5 for every class, as in evaluate; "stored" applies them.
    assert np.all(predict(predictor, folders, show_progress=False).thresholds == 0.5)
    used = predict(predictor, folders, thresholds_file="stored", show_progress=False)
    np.testing.assert_array_equal(used.thresholds, thresholds)
    assert used.labels == [
        [c for c, p, t in zip(BIGEARTHNET_19_LABELS, row, thresholds, strict=True) if p >= t]
        for row in used.probabilities
    ]
    assert np.all(predict(predictor, folders, threshold=0.5, show_progress=False).thresholds == 0.5)

    # A thresholds file: classes it names get its value, the others --threshold.
    given = tmp_path / "mine.json"
    given.write_text(json.dumps({"Urban fabric": 0.9}))
    mine = predict(predictor, folders, thresholds_file=given, threshold=0.2, show_progress=False)
    assert mine.thresholds[0] == 0.9 and np.all(mine.thresholds[1:] == 0.2)
    given.write_text(json.dumps({"Urban fabrics": 0.9}))
    with pytest.raises(UserError, match=r"unknown class 'Urban fabrics'"):
        predict(predictor, folders, thresholds_file=given, show_progress=False)

    # Thresholds chosen for other weights are refused, not silently applied.
    stored["model_sha256"] = "0" * 64
    path.write_text(json.dumps(stored))
    with pytest.raises(UserError, match="chosen for other weights"):
        predict(predictor, folders, thresholds_file="stored", show_progress=False)


def test_command_line(synthetic_v1, v1_setup, tmp_path, capsys):
    folder, base, _, _ = v1_setup
    names = read_split_csv(synthetic_v1 / "test.csv")
    folders = [str(path) for path in patch_folders(synthetic_v1, names)]
    out = tmp_path / "cli.json"
    main(["predict", *folders, "--model", str(base) + ".json", "--out", str(out), "--batch-size", "3"])
    document = json.loads(out.read_text())
    assert [entry["patch_name"] for entry in document] == names

    # A training out_dir means its newest complete checkpoint.
    main(
        [
            "predict",
            "--model",
            str(folder / "run"),
            "--archive",
            str(synthetic_v1),
            "--splits",
            str(synthetic_v1 / "test.csv"),
            "--out",
            str(tmp_path / "a.csv"),
        ]
    )
    _, rows = read_csv(tmp_path / "a.csv")
    assert list(rows) == names

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *folders, "--model", str(base), "--out", str(out)])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error == f"error: {out} already exists; pass --overwrite to replace it"
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(base), "--archive", str(synthetic_v1), "--splits", "official"])
    assert "holds none of the patches of the official v1 splits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "missing_patch"), "--model", str(base)])
    expected = (
        "missing_patch: no such patch folder; --skip-bad predicts the other patches and lists the bad ones"
    )
    assert capsys.readouterr().err.strip().endswith(expected)


def test_show_predicts_what_predict_predicts(synthetic_v1, v1_setup, tmp_path):
    """`show --model` shows, per patch, exactly the labels `predict` writes for it."""
    from bigearthnet_tf.quicklook import _folder_patches

    _, base, _, _ = v1_setup
    names = read_split_csv(synthetic_v1 / "test.csv")[:5]
    folders = patch_folders(synthetic_v1, names)
    result = predict(base, folders, show_progress=False, emit=False)
    shown = _folder_patches(folders, base, None)
    assert [patch.name for patch in shown] == names
    assert [list(patch.predicted) for patch in shown] == result.labels
    assert any(result.labels)  # some patch has a label, so the comparison is not of empty lists only
