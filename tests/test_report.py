"""The metrics table on a recorded rich console, and the per-class chart PNG and its atomic write."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS
from bigearthnet_tf.metrics import compute_metrics
from bigearthnet_tf.report import print_metrics_table, save_per_class_chart

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_metrics(class_names, samples: int = 400, seed: int = 0, absent_class: int | None = None):
    rng = np.random.default_rng(seed)
    classes = len(class_names)
    y_true = rng.random((samples, classes)) < rng.uniform(0.02, 0.4, classes)
    if absent_class is not None:
        y_true[:, absent_class] = False
    probabilities = np.clip(0.4 * y_true + 0.6 * rng.random((samples, classes)), 0.0, 1.0)
    return compute_metrics(y_true, probabilities, class_names=class_names)


def recorded_table(metrics, class_names) -> str:
    console = Console(record=True, width=160, force_terminal=False)
    print_metrics_table(metrics, class_names, console=console)
    return console.export_text()


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


# --- table ----------------------------------------------------------------------------------


def test_table_has_summary_then_every_class_by_name_with_values():
    metrics = make_metrics(BIGEARTHNET_19_LABELS)
    text = recorded_table(metrics, BIGEARTHNET_19_LABELS)
    assert text.index("Summary") < text.index("Per class")
    for label in ("Average precision", "Hamming loss", "Subset accuracy", "Macro", "Micro", "Sample-based"):
        assert label in text
    for key in ("macro_average_precision", "micro_average_precision", "micro_f1_score", "hamming_loss"):
        assert f"{metrics[key]:.4f}" in text, key
    assert "400 samples" in text
    per_class = text[text.index("Per class") :]
    for index, name in enumerate(BIGEARTHNET_19_LABELS):
        assert name.split(",")[0] in per_class, name  # long names may wrap after a comma
        row = next(line for line in per_class.splitlines() if f" {index} │ {name[:20]}" in line)
        assert f"{metrics[f'macro_f1_score_class{index}']:.4f}" in row
        assert f"{metrics[f'macro_average_precision_class{index}']:.4f}" in row
        assert f"{round(metrics[f'support_class{index}']):,}" in row


def test_table_marks_classes_without_positives():
    metrics = make_metrics(BIGEARTHNET_19_LABELS, absent_class=5)
    text = recorded_table(metrics, BIGEARTHNET_19_LABELS)
    row = next(line for line in text.splitlines() if "Complex cultivation patterns" in line)
    assert row.rstrip().rstrip("│").rstrip().endswith("—")
    assert "no positives in the set" in text
    assert "leaves out 1 class(es)" in text


def test_table_reads_a_2019_eval_result_json():
    # 2019 files hold strings, no AP, no support, and NaN where a class was never seen.
    legacy = {"micro_f1_score": "0.75", "macro_precision_class0": "0.5", "macro_accuracy_class0": "nan"}
    text = recorded_table(legacy, ["Urban fabric"])
    assert "0.7500" in text and "0.5000" in text and "Urban fabric" in text
    assert "Support" not in text


def test_default_console_prints_to_stdout(capsys):
    print_metrics_table(make_metrics(BIGEARTHNET_19_LABELS), BIGEARTHNET_19_LABELS)
    assert "Marine waters" in capsys.readouterr().out


# --- chart ----------------------------------------------------------------------------------


def test_chart_is_a_valid_png_of_sensible_size(tmp_path):
    path = save_per_class_chart(
        make_metrics(ORIGINAL_LABELS), ORIGINAL_LABELS, tmp_path / "charts" / "per_class.png"
    )
    assert path == tmp_path / "charts" / "per_class.png"
    width, height = png_size(path)
    assert 1000 <= width <= 2500 and 1500 <= height <= 4000  # tall enough for 43 rows of bars
    with Image.open(path) as image:
        image.verify()
    assert path.stat().st_size > 20_000
    assert [p.name for p in path.parent.iterdir()] == ["per_class.png"]  # no temporary left


def test_chart_height_follows_the_number_of_classes(tmp_path):
    small = save_per_class_chart(
        make_metrics(BIGEARTHNET_19_LABELS), BIGEARTHNET_19_LABELS, tmp_path / "19.png"
    )
    large = save_per_class_chart(make_metrics(ORIGINAL_LABELS), ORIGINAL_LABELS, tmp_path / "43.png")
    assert png_size(small)[0] == png_size(large)[0]
    assert png_size(small)[1] < png_size(large)[1]


def test_chart_replaces_an_existing_file(tmp_path):
    path = tmp_path / "per_class.png"
    path.write_bytes(b"old")
    save_per_class_chart(make_metrics(BIGEARTHNET_19_LABELS), BIGEARTHNET_19_LABELS, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_failed_write_leaves_the_existing_file_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "per_class.png"
    path.write_bytes(b"the previous chart")

    def write_half_then_fail(self, stream, **kwargs):
        stream.write(PNG_SIGNATURE + b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_per_class_chart(make_metrics(BIGEARTHNET_19_LABELS), BIGEARTHNET_19_LABELS, path)
    assert path.read_bytes() == b"the previous chart"
    assert [p.name for p in tmp_path.iterdir()] == ["per_class.png"]


def test_chart_with_a_class_without_positives_and_with_a_2019_dict(tmp_path):
    metrics = make_metrics(BIGEARTHNET_19_LABELS, absent_class=3)
    png_size(save_per_class_chart(metrics, BIGEARTHNET_19_LABELS, tmp_path / "absent.png"))
    legacy = {
        "macro_f1_score_class0": "0.8",
        "macro_f1_score_class1": "0.6",
        "macro_f1_score_class_avg": "0.7",
    }
    png_size(save_per_class_chart(legacy, ["a", "b"], tmp_path / "legacy.png"))


def test_chart_names_its_context_marks_zeros_and_says_what_each_macro_average_includes():
    """Three classes: one predicted well, one never predicted (F1 0, AP > 0), one without positives."""
    from bigearthnet_tf.report import per_class_figure

    names = ("Alpha", "Beta", "Gamma")
    truth = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    probabilities = np.array([[0.9, 0.4, 0.1], [0.8, 0.2, 0.2], [0.2, 0.45, 0.1], [0.7, 0.3, 0.3]])
    metrics = compute_metrics(truth, probabilities, class_names=names)
    assert metrics["macro_f1_score_class1"] == 0.0 and metrics["macro_average_precision_class1"] > 0
    figure = per_class_figure(metrics, names, "Tiny on three", context="runs/x/models/best on test.tfrecord")
    texts = [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]
    axes = figure.axes[0]
    assert any("runs/x/models/best on test.tfrecord" in text for text in [axes.get_title(), *texts])
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert any(label.startswith("macro F1") and label.endswith("(all 3 classes)") for label in labels)
    assert any(
        label.startswith("macro AP") and label.endswith("(2 classes with positives)") for label in labels
    )
    assert "F1 0" in texts and "no positives" in texts
