"""`bigearthnet inspect`: what prepared records or an archive hold, as a table and a PNG.

Per split: the number of patches, how often each class occurs (BigEarthNet-19 always; the 43 original
classes where the data have them: v1 archives and records prepared from them), and how many labels
a patch carries. Records are grouped into splits by the manifest (`dataset.json`) when there is one,
else by file name (`<split>-00000-of-00004.tfrecord`, `<split>.tfrecord`); only the label keys are
parsed. An archive is grouped by `--splits` (CSV lists or `official`), else all its patches form the
split `all`; its labels come from the patch JSON (v1) or the metadata parquet (v2).
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigearthnet_tf.archive import BadPatchError, detect_version, open_archive
from bigearthnet_tf.archive_file import open_archive_file, patches_in_file
from bigearthnet_tf.constants import (
    BIGEARTHNET_19,
    BIGEARTHNET_19_LABELS,
    LABEL_TYPES,
    ORIGINAL,
    ORIGINAL_LABELS,
    ORIGINAL_TO_19,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import label_key
from bigearthnet_tf.prepare_splits import resolve_splits
from bigearthnet_tf.record_formats import MANIFEST_NAME, read_manifest
from bigearthnet_tf.report import save_figure_atomically
from bigearthnet_tf.tarstream import is_archive_file

_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
PARSE_BATCH = 4096  # records whose label keys are parsed at a time
CHART_TOP_LABEL_COUNTS = 8  # labels-per-patch histogram: 1 ... 7 and "8+"
CLASS_NAME_WRAP = 40  # characters per line of a class name on the chart


@dataclass
class SplitSummary:
    """The label statistics of one split."""

    name: str
    patches: int = 0
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # label type -> per-class patch counts
    labels_per_patch: dict[int, int] = field(default_factory=dict)  # BigEarthNet-19 labels -> patches

    def add(self, multi_hot: dict[str, np.ndarray]) -> None:
        """Count a batch: label type -> (patches, classes) 0/1 array; BigEarthNet-19 must be there."""
        for label_type, values in multi_hot.items():
            self.counts[label_type] = self.counts.get(label_type, 0) + values.sum(axis=0).astype(np.int64)
        per_patch = multi_hot[BIGEARTHNET_19].sum(axis=1)
        for count, patches in zip(*np.unique(per_patch, return_counts=True), strict=True):
            self.labels_per_patch[int(count)] = self.labels_per_patch.get(int(count), 0) + int(patches)
        self.patches += len(per_patch)


def inspect(
    sources: Sequence[str | os.PathLike[str]],
    *,
    splits: Sequence[str | os.PathLike[str]] | None = None,
    official: bool = False,
    png: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> list[SplitSummary]:
    """Summaries of the records (files, globs, folders) or the one archive root in `sources`; the
    table is printed and, with `png`, the chart written."""
    if png is not None and Path(png).exists() and not overwrite:
        raise UserError(f"{png} already exists; pass --overwrite to replace it")
    if not reads_records(sources) and Path(sources[0]).is_dir():
        summaries = _archive_summaries(Path(sources[0]), splits, official)
    elif not reads_records(sources):
        summaries = _archive_file_summaries(Path(sources[0]), splits, official)
    else:
        if splits or official:
            raise UserError(
                "--splits applies to an archive; records are grouped by their manifest or file names"
            )
        summaries = _record_summaries(sources)
    print_summaries(summaries)
    if png is not None:
        save_summary_chart(summaries, Path(png), title=", ".join(str(source) for source in sources))
        print(f"chart: {png}")
    return summaries


# --- records ------------------------------------------------------------------------------------------


def _record_summaries(sources: Sequence[str | os.PathLike[str]]) -> list[SplitSummary]:
    import tensorflow as tf

    from bigearthnet_tf.input_pipeline import (
        corrupt_files_as_user_errors,
        detect_format,
        list_files,
        manifest_shortfalls,
    )

    files = list_files([str(source) for source in sources])
    for shortfall in manifest_shortfalls(files):
        print(f"note: the records hold {shortfall}")
    groups = _record_splits(files, [Path(source) for source in sources])
    summaries = []
    for split, paths in groups.items():
        label_types = detect_format(paths).label_types
        if BIGEARTHNET_19 not in label_types and ORIGINAL not in label_types:
            raise UserError(f"{paths[0]}: holds no labels (no {label_key(BIGEARTHNET_19)})")
        spec = {
            label_key(label_type): tf.io.FixedLenFeature([len(LABEL_TYPES[label_type])], tf.int64)
            for label_type in label_types
        }
        dataset = (
            tf.data.TFRecordDataset(paths)
            .batch(PARSE_BATCH)
            .map(lambda batch, spec=spec: tf.io.parse_example(batch, spec))
        )
        summary = SplitSummary(split)
        with corrupt_files_as_user_errors():
            for parsed in dataset:
                values = {label_type: parsed[label_key(label_type)].numpy() for label_type in label_types}
                if BIGEARTHNET_19 not in values:  # 2019 files of the 43 classes only: derive the 19
                    values[BIGEARTHNET_19] = to_19(values[ORIGINAL])
                summary.add(values)
        summaries.append(summary)
    return summaries


def _record_splits(files: list[str], sources: list[Path]) -> dict[str, list[str]]:
    """Split name -> its files: from the manifest of a folder given, else from the file names."""
    by_manifest: dict[str, str] = {}
    for source in sources:
        manifest = read_manifest(source) if source.is_dir() else None
        for split, names in manifest.splits.items() if manifest is not None else ():
            for name in names:
                by_manifest[str((source / name).resolve())] = split
    groups: dict[str, list[str]] = {}
    for path in files:
        split = by_manifest.get(str(Path(path).resolve())) or _SHARD.sub(
            "", Path(path).name.removesuffix(".tfrecord")
        )
        groups.setdefault(split, []).append(path)
    return groups


def to_19(original: np.ndarray) -> np.ndarray:
    """43-class multi-hot rows -> BigEarthNet-19 rows (a class is set when any of its sources is)."""
    out = np.zeros((len(original), len(BIGEARTHNET_19_LABELS)), dtype=np.int64)
    for index_43, index_19 in ORIGINAL_TO_19.items():
        out[:, index_19] |= original[:, index_43].astype(np.int64)
    return out


# --- archives -----------------------------------------------------------------------------------------


def _is_archive(path: Path) -> bool:
    if not path.is_dir() or any(path.glob("*.tfrecord")) or (path / MANIFEST_NAME).is_file():
        return False
    try:
        detect_version(path)
    except UserError:
        return False
    return True


def reads_records(sources: Sequence[str | os.PathLike[str]]) -> bool:
    """Whether `inspect` of `sources` reads TFRecords (with TensorFlow) rather than an archive."""
    return not (len(sources) == 1 and (_is_archive(Path(sources[0])) or _is_archive_file(Path(sources[0]))))


def _is_archive_file(path: Path) -> bool:
    return path.suffix != ".tfrecord" and is_archive_file(path)


def _archive_summaries(root: Path, split_files, official: bool) -> list[SplitSummary]:
    archive = open_archive(root)
    if official or split_files:  # the lists are checked as prepare checks them, with its messages
        groups, _ = resolve_splits(archive, split_files, official, False, False, False, print)
    else:
        groups = {"all": archive.patch_names()}
    return _label_summaries(groups, archive.read_labels)


def _archive_file_summaries(path: Path, split_files, official: bool) -> list[SplitSummary]:
    """`_archive_summaries` for a downloaded archive file: the lists are checked as prepare checks
    them, once the one pass over the file has said which patches it holds."""
    archive = open_archive_file(path)
    lists = official or split_files
    listed = None
    if lists:
        listed, _ = resolve_splits(
            archive,
            split_files,
            official,
            False,
            False,
            False,
            print,
            missing_of=lambda s: dict.fromkeys(s, []),
        )
    wanted = None if listed is None else {name for names in listed.values() for name in names}
    labels = {}
    for patch in patches_in_file(archive, wanted):
        if isinstance(patch, BadPatchError):
            raise patch
        labels[patch.name] = (patch.labels_43, patch.labels_19)
    if lists:
        groups, _ = resolve_splits(
            archive,
            split_files,
            official,
            False,
            False,
            False,
            print,
            missing_of=lambda s: {split: [n for n in names if n not in labels] for split, names in s.items()},
        )
    else:
        groups = {"all": sorted(labels)}
    return _label_summaries(groups, labels.__getitem__)


def _label_summaries(groups: dict[str, list[str]], labels_of) -> list[SplitSummary]:
    """Per split, the label statistics of its patches; `labels_of(name)` -> (43 labels or None, 19)."""
    summaries = []
    for split, names in groups.items():
        summary = SplitSummary(split)
        rows_43, rows_19 = [], []
        for name in names:
            labels_43, labels_19 = labels_of(name)
            rows_19.append([name in labels_19 for name in BIGEARTHNET_19_LABELS])
            if labels_43 is not None:
                rows_43.append([name in labels_43 for name in ORIGINAL_LABELS])
        if rows_19:
            values = {BIGEARTHNET_19: np.array(rows_19, dtype=np.int64)}
            if rows_43:
                values[ORIGINAL] = np.array(rows_43, dtype=np.int64)
            summary.add(values)
        summaries.append(summary)
    return summaries


# --- views --------------------------------------------------------------------------------------------


def print_summaries(summaries: Sequence[SplitSummary]) -> None:
    """Patches and labels per patch by split, then each class's patch count (and share) by split."""
    from rich.table import Table

    from bigearthnet_tf.console import plain_console

    console = plain_console()
    overview = Table(title="Patches per split", title_justify="left")
    overview.add_column("split")
    overview.add_column("patches", justify="right")
    overview.add_column("labels per patch (BigEarthNet-19): mean, min-max")
    for summary in summaries:
        counts = summary.labels_per_patch
        mean = sum(k * v for k, v in counts.items()) / max(summary.patches, 1)
        spread = f"{min(counts)}-{max(counts)}" if counts else "-"
        overview.add_row(summary.name, f"{summary.patches:,}", f"{mean:.2f}, {spread}")
    console.print(overview)
    for label_type, names in ((BIGEARTHNET_19, BIGEARTHNET_19_LABELS), (ORIGINAL, ORIGINAL_LABELS)):
        present = [summary for summary in summaries if label_type in summary.counts]
        if not present:
            continue
        table = Table(title=f"Patches per class, {label_type} ({len(names)} classes)", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("class")
        for summary in present:
            table.add_column(summary.name, justify="right")
        for index, name in enumerate(names):
            cells = []
            for summary in present:
                count = int(summary.counts[label_type][index])
                cells.append(f"{count:,} ({100 * count / max(summary.patches, 1):.1f}%)")
            table.add_row(str(index), name, *cells)
        console.print(table)


def save_summary_chart(summaries: Sequence[SplitSummary], path: Path, title: str) -> Path:
    """A PNG: BigEarthNet-19 class shares per split (grouped bars) and labels per patch per split."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 8), layout="constrained")
    classes, per_patch = figure.subplots(1, 2, width_ratios=(3, 1))
    height = 0.8 / max(len(summaries), 1)
    positions = np.arange(len(BIGEARTHNET_19_LABELS))
    for offset, summary in enumerate(summaries):
        shares = summary.counts[BIGEARTHNET_19] / max(summary.patches, 1)
        classes.barh(
            positions + offset * height, shares, height=height, label=f"{summary.name} ({summary.patches:,})"
        )
    wrapped = [textwrap.fill(name, CLASS_NAME_WRAP) for name in BIGEARTHNET_19_LABELS]
    classes.set_yticks(positions + height * (len(summaries) - 1) / 2, wrapped, fontsize=7)
    classes.invert_yaxis()
    classes.set_xlabel("share of the split's patches with the class")
    classes.legend(fontsize=8)
    labels = np.arange(1, CHART_TOP_LABEL_COUNTS + 1)
    for offset, summary in enumerate(summaries):
        counts = [summary.labels_per_patch.get(int(k), 0) for k in labels[:-1]]
        counts.append(sum(v for k, v in summary.labels_per_patch.items() if k >= CHART_TOP_LABEL_COUNTS))
        shares = np.array(counts) / max(summary.patches, 1)
        per_patch.bar(labels + offset * height, shares, width=height, label=summary.name)
    per_patch.set_xticks(
        labels + height * (len(summaries) - 1) / 2, [*map(str, labels[:-1]), f"{labels[-1]}+"]
    )
    per_patch.set_xlabel("labels per patch\n(BigEarthNet-19)")
    per_patch.set_ylabel("share of patches")
    figure.suptitle(f"BigEarthNet-19 labels in {title}", fontsize=11)
    return save_figure_atomically(figure, path)
