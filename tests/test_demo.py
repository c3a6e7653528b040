"""The demo end to end: synthesise, add real patches, prepare, train, evaluate, report."""

from __future__ import annotations

import csv
import json

import pytest

from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS
from bigearthnet_tf.demo import run_demo
from bigearthnet_tf.errors import UserError


def test_tiny_demo_writes_every_output(tmp_path):
    result = run_demo(tmp_path / "demo", patches=40, nb_epoch=1, batch_size=8)

    assert {p.name for p in result.out.iterdir()} >= {"archive", "records", "run", "config.json"}
    saved = json.loads(result.config.read_text())
    assert saved["model_name"] == "ResNet-Tiny" and saved["label_type"] == "BigEarthNet-19"

    # The six real example patches joined the training split of the synthetic archive.
    train_names = (result.archive / "train.csv").read_text().split()
    assert "S2B_MSIL2A_20170924T93020_69_24" in train_names
    manifest = json.loads((result.records / "dataset.json").read_text())
    assert manifest["splits"]["train"]["patches"] == len(train_names)

    metrics = json.loads((result.run / "eval_result.json").read_text())
    assert metrics == result.metrics
    for key in ("micro_f1_score", "macro_average_precision", "micro_average_precision", "hamming_loss"):
        assert 0.0 <= metrics[key] <= 1.0

    test_names = (result.archive / "test.csv").read_text().split()
    with (result.evaluation / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["patch_name"] for row in rows] == test_names
    assert list(rows[0])[1 : 1 + len(BIGEARTHNET_19_LABELS)] == list(BIGEARTHNET_19_LABELS)
    assert (result.evaluation / "per_class_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_a_folder_with_content(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        run_demo(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    """The README's demo as shipped: micro F1 >= 0.85 on the synthetic test split."""
    result = run_demo(tmp_path / "demo")
    assert result.metrics["micro_f1_score"] >= 0.85


@pytest.mark.slow
def test_an_interrupted_demo_continues(tmp_path, monkeypatch, capsys):
    """Killed during evaluation, the demo run again with the same --out keeps the finished stages
    (the archive and records are not rewritten, training has nothing left to do) and evaluates."""
    from bigearthnet_tf import demo as demo_module

    out = tmp_path / "demo"
    settings = {"patches": 40, "nb_epoch": 1, "batch_size": 8}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(demo_module, "evaluate", killed)
        with pytest.raises(KeyboardInterrupt):
            run_demo(out, **settings)
    state = json.loads((out / "demo.json").read_text())
    assert state["done"] == ["archive", "records", "train"]
    archive_stamp = (out / "archive" / "train.csv").stat().st_mtime_ns
    records_stamp = (out / "records" / "dataset.json").stat().st_mtime_ns
    capsys.readouterr()

    result = run_demo(out, **settings)
    captured = capsys.readouterr()
    printed = " ".join((captured.err + captured.out).split())
    assert "continuing the demo in" in printed and "done: archive, records, train" in printed
    assert "nothing to do" in " ".join(printed.split())
    assert (out / "archive" / "train.csv").stat().st_mtime_ns == archive_stamp
    assert (out / "records" / "dataset.json").stat().st_mtime_ns == records_stamp
    assert json.loads((out / "demo.json").read_text())["done"] == ["archive", "records", "train", "evaluate"]
    assert (result.evaluation / "eval_result.json").is_file()

    with pytest.raises(UserError, match="holds a demo made with other settings"):
        run_demo(out, patches=41, nb_epoch=1, batch_size=8)
