"""Human-facing views of a metrics dict: a table on the terminal and a per-class bar chart PNG.

Both read the dict that `bigearthnet_tf.metrics.compute_metrics` returns (or a 2019
`eval_result.json`, whose values are strings and which lacks AP and support). Every number says
how it was averaged: macro (mean over classes), micro (counts pooled over all labels) or
sample-based (mean over samples), which is the ambiguity users complain about in papers.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from bigearthnet_tf.console import plain_console
from bigearthnet_tf.files import open_atomically
from bigearthnet_tf.metrics import ClassRow, per_class_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "—"
CONTEXT_WRAP = 110  # characters per line of the chart's checkpoint / data / thresholds line

# Rows of the summary grid: label, then the keys for the macro, micro and sample-based columns.
SUMMARY_GRID: tuple[tuple[str, str | None, str | None, str | None], ...] = (
    ("Average precision", "macro_average_precision", "micro_average_precision", None),
    ("F1", "macro_f1_score_class_avg", "micro_f1_score", "sample_f1_score"),
    ("F2", "macro_f2_score_class_avg", "micro_f2_score", "sample_f2_score"),
    ("F0.5", "macro_f0_5_score_class_avg", "micro_f0_5_score", "sample_f0_5_score"),
    ("Precision", "macro_precision_class_avg", "micro_precision", "sample_precision"),
    ("Recall", "macro_recall_class_avg", "micro_recall", "sample_recall"),
    ("Accuracy (Jaccard)", "macro_accuracy_class_avg", "micro_accuracy", "sample_accuracy"),
)
# Sample-based metrics without macro or micro versions; "lower is better" where marked.
SAMPLE_ONLY: tuple[tuple[str, str], ...] = (
    ("Hamming loss ↓", "hamming_loss"),
    ("Subset accuracy", "subset_accuracy"),
    ("One-error ↓", "one_error"),
    ("Coverage ↓", "coverage"),
    ("Ranking loss ↓", "ranking_loss"),
    ("Label ranking average precision", "label_ranking_avg_precision"),
    ("Label cardinality (true labels per sample)", "label_cardinality"),
)


def _value(metrics: Mapping[str, float | str], key: str | None) -> float | None:
    if key is None or key not in metrics:
        return None
    return float(metrics[key])


def _format(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _format_count(value: float | None) -> str:
    return MISSING if value is None else f"{round(value):,}"


def _has_no_positives(row: ClassRow) -> bool:
    return row.support is not None and row.support == 0


def summary_table(metrics: Mapping[str, float | str]) -> Table:
    """The headline metrics: one row per metric, one column per kind of averaging."""
    samples = _value(metrics, "num_samples")
    threshold = _value(metrics, "threshold")
    details = []
    if samples is not None:
        details.append(f"{round(samples):,} samples")
    if threshold is not None:
        details.append(f"threshold {threshold:g}")
    elif any(key.startswith("threshold_class") for key in metrics):
        details.append("per-class thresholds")
    title = "Summary" + (f" ({', '.join(details)})" if details else "")
    table = Table(title=title, title_justify="left", title_style="bold")
    table.add_column("Metric")
    table.add_column("Macro\n(mean over classes)", justify="right")
    table.add_column("Micro\n(pooled labels)", justify="right")
    table.add_column("Sample-based\n(mean over samples)", justify="right")
    for label, *keys in SUMMARY_GRID:
        values = [_value(metrics, key) for key in keys]
        cells = ["" if key is None else _format(value) for key, value in zip(keys, values, strict=True)]
        table.add_row(label, *cells)
    table.add_section()
    for label, key in SAMPLE_ONLY:
        table.add_row(label, "", "", _format(_value(metrics, key)))
    excluded = _value(metrics, "macro_average_precision_excluded_classes")
    if excluded:
        table.caption = f"Macro average precision leaves out {round(excluded)} class(es) with no positives."
        table.caption_justify = "left"
    return table


def class_table(metrics: Mapping[str, float | str], class_names: Sequence[str]) -> Table:
    """Per-class precision, recall, F1 and AP with class names (and support when known)."""
    rows = per_class_table(metrics, class_names)
    show_support = any(row.support is not None for row in rows)
    table = Table(title="Per class", title_justify="left", title_style="bold")
    table.add_column("#", justify="right", style="dim")
    table.add_column("Class", overflow="fold")
    if show_support:
        table.add_column("Support", justify="right")
    for header in ("Precision", "Recall", "F1", "AP"):
        table.add_column(header, justify="right")
    for row in rows:
        average_precision = None if _has_no_positives(row) else row.average_precision
        cells = [str(row.index), row.name]
        if show_support:
            cells.append(_format_count(row.support))
        cells += [_format(value) for value in (row.precision, row.recall, row.f1_score, average_precision)]
        table.add_row(*cells)
    table.add_section()
    macro = ["", "Macro average"]
    if show_support:
        macro.append("")
    macro += [
        _format(_value(metrics, key))
        for key in (
            "macro_precision_class_avg",
            "macro_recall_class_avg",
            "macro_f1_score_class_avg",
            "macro_average_precision",
        )
    ]
    table.add_row(*macro, style="bold")
    if any(_has_no_positives(row) for row in rows):
        table.caption = f"{MISSING} AP: no positives in the set; left out of the macro average."
        table.caption_justify = "left"
    return table


def print_metrics_table(
    metrics: Mapping[str, float | str],
    class_names: Sequence[str],
    console: Console | None = None,
) -> None:
    """Print the summary grid, then the per-class table, to `console` (stdout by default)."""
    console = console or plain_console()
    console.print(summary_table(metrics))
    console.print()
    console.print(class_table(metrics, class_names))


# --- chart ----------------------------------------------------------------------------------

CHART_WIDTH_IN = 11.0
CHART_ROW_IN = 0.36  # height per class: two bars and up to two lines of name
CHART_MARGIN_IN = 1.9  # title, legend and axis
CLASS_NAME_WRAP = 46  # characters per line of a class name on the axis
F1_COLOUR = "#4C72B0"
AP_COLOUR = "#DD8452"


def save_per_class_chart(
    metrics: Mapping[str, float | str],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str | None = None,
    context: str | None = None,
) -> Path:
    """Write a horizontal bar chart of per-class F1 and AP to `path` (PNG, atomically); return it.

    Classes run top to bottom in index order; dashed lines mark the macro averages, and the legend
    says which classes each average includes. A zero is drawn as a marker and its value, so it never
    looks like a missing bar. `context` (checkpoint, data, thresholds) is printed under the chart.
    """
    return save_figure_atomically(per_class_figure(metrics, class_names, title, context), Path(path))


def per_class_figure(
    metrics: Mapping[str, float | str],
    class_names: Sequence[str],
    title: str | None = None,
    context: str | None = None,
) -> Figure:
    """The per-class chart as a matplotlib Figure (not attached to pyplot, so nothing leaks)."""
    from matplotlib.figure import Figure  # lazily: matplotlib is slow to import

    rows = per_class_table(metrics, class_names)
    count = len(rows)
    figure = Figure(figsize=(CHART_WIDTH_IN, CHART_MARGIN_IN + CHART_ROW_IN * count), layout="constrained")
    figure.get_layout_engine().set(w_pad=0.15, h_pad=0.1)
    axes = figure.add_subplot()

    positions = list(range(count))
    has_ap = any(row.average_precision is not None for row in rows)
    bar_height = 0.38 if has_ap else 0.6
    offset = bar_height / 2 if has_ap else 0.0  # F1 above AP; centred when alone (2019 files)
    f1_values = [row.f1_score or 0.0 for row in rows]
    axes.barh([p - offset for p in positions], f1_values, height=bar_height, color=F1_COLOUR, label="F1")
    if has_ap:
        ap_values = [0.0 if _has_no_positives(row) else (row.average_precision or 0.0) for row in rows]
        axes.barh(
            [p + offset for p in positions],
            ap_values,
            height=bar_height,
            color=AP_COLOUR,
            label="Average precision",
        )
        for position, row in zip(positions, rows, strict=True):
            if _has_no_positives(row):
                axes.text(0.005, position + offset, "no positives", va="center", fontsize=7, color="0.4")
    # A zero value has no bar: mark it, so it reads as 0 rather than as missing.
    for position, row, value in zip(positions, rows, f1_values, strict=True):
        if value == 0.0:
            axes.plot(0.0, position - offset, marker="|", markersize=8, color=F1_COLOUR, clip_on=False)
            if not _has_no_positives(row):
                axes.text(0.012, position - offset, "F1 0", va="center", fontsize=7, color=F1_COLOUR)
    if has_ap:
        for position, row, value in zip(positions, rows, ap_values, strict=True):
            if value == 0.0 and not _has_no_positives(row):
                axes.plot(0.0, position + offset, marker="|", markersize=8, color=AP_COLOUR, clip_on=False)
                axes.text(0.012, position + offset, "AP 0", va="center", fontsize=7, color=AP_COLOUR)

    excluded = round(_value(metrics, "macro_average_precision_excluded_classes") or 0)
    included_ap = f"{count - excluded} classes with positives" if excluded else f"all {count} classes"
    for key, colour, label, included in (
        ("macro_f1_score_class_avg", F1_COLOUR, "macro F1", f"all {count} classes"),
        ("macro_average_precision", AP_COLOUR, "macro AP", included_ap),
    ):
        value = _value(metrics, key)
        if value is not None and (has_ap or key != "macro_average_precision"):
            axes.axvline(
                value, color=colour, linestyle="--", linewidth=1.2, label=f"{label} {value:.3f} ({included})"
            )

    tick_labels = [f"{textwrap.fill(row.name, CLASS_NAME_WRAP)}  {row.index}" for row in rows]
    axes.set_yticks(positions, tick_labels, fontsize=8)
    axes.set_ylim(count - 0.5, -0.5)  # class 0 at the top
    axes.set_xlim(0.0, 1.0)
    axes.set_xticks([i / 10 for i in range(11)])
    axes.tick_params(axis="x", labelsize=8, top=True, labeltop=True)
    axes.grid(axis="x", color="0.88", linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("right", "top"):
        axes.spines[side].set_visible(False)
    handles, labels = axes.get_legend_handles_labels()
    bars_first = sorted(range(len(labels)), key=lambda i: labels[i].startswith("macro"))
    figure.legend(
        [handles[i] for i in bars_first],
        [labels[i] for i in bars_first],
        loc="outside lower center",
        ncol=2,
        fontsize=9,
        frameon=False,
    )
    default_title = "Per-class F1 and average precision" if has_ap else "Per-class F1"
    heading = figure.suptitle(title or default_title, fontsize=12, fontweight="bold")
    subtitle = _chart_subtitle(metrics) + (f"\n{textwrap.fill(context, CONTEXT_WRAP)}" if context else "")
    axes.set_title(subtitle, fontsize=9, color="0.3", pad=22)
    # Centre the heading over the bars, like the subtitle, not over the whole figure.
    figure.draw_without_rendering()
    box = axes.get_position()
    heading.set_x((box.x0 + box.x1) / 2)
    return figure


def _chart_subtitle(metrics: Mapping[str, float | str]) -> str:
    parts = []
    for label, key in (
        ("macro AP", "macro_average_precision"),
        ("micro AP", "micro_average_precision"),
        ("macro F1", "macro_f1_score_class_avg"),
        ("micro F1", "micro_f1_score"),
    ):
        value = _value(metrics, key)
        if value is not None:
            parts.append(f"{label} {value:.3f}")
    samples = _value(metrics, "num_samples")
    if samples is not None:
        parts.append(f"{round(samples):,} samples")
    return "   ".join(parts)


def save_figure_atomically(figure: Figure, path: Path) -> Path:
    """Render to a temporary file beside `path`, then rename: readers never see half a PNG."""
    with open_atomically(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=150)
    return path
