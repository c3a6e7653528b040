"""`predict(...)`: apply a trained model straight to patch folders or an archive, and per-class thresholds.

Input: patch folders (v1 `<name>/<name>_<BAND>.tif`, or v2 `BigEarthNet-S2/<product>/<patch_id>/`, the
same file names), or an archive root with optional split lists. The model's own metadata decides
what is read: its input keys (`bands_10m`, `bands_20m`, `bands_60m`, `bands_s1`), the band order of each
(stored with the checkpoint and checked against this library's), its class names, and its
normalisation statistics (held by its first layers). Sentinel-1 bands are read only when the model's
modality needs them (S1, MM): a v1 patch is paired through the S1 folders' JSON (`--s1-root`), a v2
patch through `metadata.parquet` of its archive.

Speed: patches are read in a thread pool (GeoTIFF reads are system calls that release the GIL) a few
batches ahead of the model, batches have one fixed shape (the last is padded) so the model function is
traced once, and only the bands the model reads are stacked.

Output, chosen by the extension of `out` (no `out`: CSV on standard output):

- CSV: `patch_name`, one column per class (named by its class name) with the probability at 8
  decimals, then `predicted`: the class names at or above their threshold, joined by `;`;
- JSON: a list of `{"patch_name": ..., "probabilities": {class: p}, "labels": [class, ...]}`.

Files are written atomically and an existing file is never replaced without `overwrite`.

Thresholds: a class is predicted when its probability is >= its threshold. Per-class thresholds can be
chosen on validation records (`tune_thresholds`, each maximising that class's F1) and are stored
beside the checkpoint as `<base>.thresholds.json` (a new file, so the checkpoint's checksums are
untouched; it records the SHA-256 of the weights it was chosen for and is refused for other weights).
They are applied only when asked for (`thresholds_file="stored"`); otherwise `threshold` (0.5) holds
for every class, as in every command (`thresholds` module docstring).

`model` may also be an exported `.keras` file (opened in Keras safe mode): one that ends in the sigmoid
layer `probabilities` (`bigearthnet export --format keras`) is used as is, another is taken to output
logits.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigearthnet_tf.console import progress_bar, status_console
from bigearthnet_tf.constants import DEFAULT_THRESHOLD
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import open_atomically, write_text_atomically
from bigearthnet_tf.inference import collect_predictions, logits_over_patches, sigmoid
from bigearthnet_tf.input_pipeline import make_dataset
from bigearthnet_tf.patch_source import (
    DEFAULT_BATCH_SIZE,
    ArchiveFileSource,
    PatchReader,
    check_archive_root,
    check_patch_folders,
    default_read_threads,
    patch_locations,
)
from bigearthnet_tf.predictor import Predictor, load_predictor, resolve_thresholds
from bigearthnet_tf.thresholds import (
    MIN_POSITIVES,
    STORED,
    THRESHOLDS_FORMAT,
    THRESHOLDS_FORMAT_VERSION,
    choose_thresholds,
    predicted_labels,
)

__all__ = ["PREDICTED_COLUMN", "PredictionResult", "predict", "tune_thresholds"]

PROBABILITY_DECIMALS = 8  # as evaluate's predictions.csv
PATCH_NAME_COLUMN = "patch_name"
PREDICTED_COLUMN = "predicted"
SPLIT_COLUMN = "split"
LABEL_SEPARATOR = ";"
OUTPUT_FORMATS = (".csv", ".json")


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionResult:
    """What `predict` computed, and where it wrote it (None: standard output)."""

    names: list[str]
    probabilities: np.ndarray  # (patches, classes) float64
    class_names: tuple[str, ...]
    thresholds: np.ndarray  # (classes,)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (patch name, reason)
    out: Path | None = None
    splits: list[str] | None = None  # per patch, the split that named it (archive mode with splits)

    @property
    def labels(self) -> list[list[str]]:
        """The predicted class names of each patch, in class order."""
        return predicted_labels(self.probabilities, self.thresholds, self.class_names)


def predict(
    model: str | os.PathLike[str] | Predictor,
    patch_folders: Sequence[str | os.PathLike[str]] = (),
    *,
    archive: str | os.PathLike[str] | None = None,
    split_files: Sequence[str | os.PathLike[str]] | None = None,
    official_splits: bool = False,
    split: str | None = None,
    s1_root: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    threshold: float | None = None,
    thresholds_file: str | os.PathLike[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    skip_bad: bool = False,
    show_progress: bool = True,
    console=None,
    emit: bool = True,
) -> PredictionResult:
    """Apply `model` to patch folders, or to the patches of `archive`, and write CSV or JSON.

    Args:
        model: a checkpoint base name (or any of its files, or a training out_dir), an exported
            `.keras` file, or a loaded `Predictor`.
        patch_folders: S2 patch folders (v1 or v2 layout); the folder name is the patch name.
        archive: instead of folders, an archive root (v1 or v2).
        split_files: with `archive`, split lists (CSV) naming the patches; `official_splits` for the
            official ones; neither: every patch folder of the archive. The output then has a `split`
            column; `split` keeps only the patches of the split of that name.
        s1_root: the Sentinel-1 root, for models that read S1 (for an archive: found beside it).
        out: `.csv` or `.json` file; None writes CSV to standard output.
        overwrite: replace an existing `out`.
        threshold, thresholds_file: see the module docstring.
        batch_size: patches per model call.
        workers: reading threads (default: 2 per core, at most 16).
        skip_bad: leave unreadable patches out (listed in the result and on the terminal) instead of
            stopping at the first with a one-line error naming it.
        show_progress: show the progress bar and summary (on standard error).
        emit: without `out`, write the CSV to standard output (False: only return the result).

    Raises:
        BadPatchError: a patch cannot be read and `skip_bad` is False; nothing is written.
        UserError: bad arguments, an existing `out` without `overwrite`, a model that cannot be loaded.
    """
    _check_arguments(
        batch_size, workers, patch_folders, archive, bool(split_files or official_splits or split)
    )
    out_path = _check_out(out, overwrite)
    # Cheap checks of every path first: a mistake is reported before the model is loaded.
    if archive is not None:
        check_archive_root(archive)
    else:
        check_patch_folders(patch_folders, skip_bad)
    console = console or status_console(show_progress)

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    thresholds = resolve_thresholds(
        predictor, threshold=threshold, thresholds_file=thresholds_file, console=console
    )
    locations = patch_locations(
        patch_folders, archive, split_files, official_splits, split, s1_root, predictor.needs_s1
    )
    reader = PatchReader(predictor.band_order, archive_mode=archive is not None)
    workers = workers or default_read_threads()

    from_file = isinstance(locations, ArchiveFileSource)
    if from_file:  # in one pass over the file, in its order; put back in list order at the end
        split_of = dict(locations.wanted or {})
        total = len(split_of) or None  # None: every patch of the file, counted as it is read
    else:
        split_of = {location.name: location.split for location in locations}
        total = len(locations)
    console.print(
        f"predicting {f'{total:,} patches' if total else 'every patch'}"
        f"{f' of {archive}, read in one pass,' if from_file else ''} with {predictor.meta.model_name} "
        f"({predictor.meta.label_type}, {predictor.meta.modality}) from {predictor.source}",
        markup=False,
        soft_wrap=True,
    )
    with progress_bar(console, "patches") as bar:
        task = bar.add_task("predicting", total=total)
        names, values, skipped = logits_over_patches(
            predictor.model,
            reader,
            locations,
            batch_size=batch_size,
            workers=workers,
            skip_bad=skip_bad,
            advance=lambda count: bar.advance(task, count),
        )
    if not names:
        raise UserError(
            f"none of the {total:,} patches could be read" if total else f"no patches in {archive}"
        )
    if from_file and split_of:  # list order, as from a folder
        place = {name: index for index, name in enumerate(split_of)}
        order = sorted(range(len(names)), key=lambda index: place[names[index]])
        names, values = [names[index] for index in order], values[order]
    probabilities = sigmoid(values)

    splits = [split_of.get(name) for name in names] if any(split_of.values()) else None
    result = PredictionResult(
        names, probabilities, predictor.class_names, thresholds, skipped, out_path, splits
    )
    _emit(result, emit, console)
    return result


def _check_arguments(
    batch_size: int, workers: int | None, patch_folders: Sequence, archive: object, names_a_split: bool
) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if bool(patch_folders) == (archive is not None):
        raise UserError("give either patch folders or --archive ROOT (not both, not neither)")
    if archive is None and names_a_split:
        raise UserError(
            "--splits and --split name patches of an archive; give the archive with --archive ROOT"
        )


def _emit(result: PredictionResult, emit: bool, console) -> None:
    """Write the predictions (to `result.out`, atomically, or to standard output) and say what was skipped."""
    if result.out is None:
        if emit:
            _write_predictions(result, sys.stdout, ".csv")
    else:
        with open_atomically(result.out) as stream:
            _write_predictions(result, stream, result.out.suffix)
    for _, reason in result.skipped:
        console.print(f"skipped {reason}", markup=False, highlight=False, soft_wrap=True)
    if result.skipped:
        console.print(f"skipped {len(result.skipped):,} unreadable patches", markup=False)
    if result.out is not None:
        console.print(f"predictions for {len(result.names):,} patches: {result.out}", markup=False)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _check_out(out: str | os.PathLike[str] | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {path}: unknown output format {path.suffix!r}; expected a .csv or .json file")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; expected a .csv or .json file")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the folder of --out {path}: {error.strerror}") from None
    return path


def _write_predictions(result: PredictionResult, stream: io.TextIOBase, suffix: str) -> None:
    number = f"{{:.{PROBABILITY_DECIMALS}f}}"
    labels = result.labels
    splits = result.splits
    if suffix.lower() == ".json":
        rows = []
        for index, (name, row, patch_labels) in enumerate(
            zip(result.names, result.probabilities, labels, strict=True)
        ):
            entry: dict[str, Any] = {PATCH_NAME_COLUMN: name}
            if splits is not None:
                entry[SPLIT_COLUMN] = splits[index]
            entry["probabilities"] = {
                class_name: round(float(p), PROBABILITY_DECIMALS)
                for class_name, p in zip(result.class_names, row, strict=True)
            }
            entry["labels"] = patch_labels
            rows.append(entry)
        json.dump(rows, stream, indent=1, allow_nan=False)
        stream.write("\n")
        return
    writer = csv.writer(stream, lineterminator="\n")
    split_header = [SPLIT_COLUMN] if splits is not None else []
    writer.writerow([PATCH_NAME_COLUMN, *split_header, *result.class_names, PREDICTED_COLUMN])
    for index, (name, row, patch_labels) in enumerate(
        zip(result.names, result.probabilities, labels, strict=True)
    ):
        split_cell = [splits[index]] if splits is not None else []
        writer.writerow(
            [name, *split_cell, *(number.format(p) for p in row), LABEL_SEPARATOR.join(patch_labels)]
        )


# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------


def tune_thresholds(
    model: str | os.PathLike[str] | Predictor,
    validation_files: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    default: float = DEFAULT_THRESHOLD,
    console=None,
) -> Path:
    """Choose per-class thresholds on validation TFRecords and store them beside the checkpoint.

    Writes `<base>.thresholds.json` (atomically; an earlier one is replaced) and returns its path.
    """

    console = console or status_console()
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    label_type = predictor.meta.label_type
    dataset = make_dataset(
        list(map(str, validation_files)),
        label_type,
        batch_size,
        modality=predictor.meta.modality,
    )
    predictions = collect_predictions(predictor.model, dataset)
    if predictions.labels is None:
        raise UserError("the validation files hold no labels to choose thresholds on")
    values = predictions.logits
    probabilities = sigmoid(values)
    choice = choose_thresholds(predictions.labels, probabilities, predictor.class_names, default=default)
    path = predictor.thresholds_file
    document = {
        "format": THRESHOLDS_FORMAT,
        "format_version": THRESHOLDS_FORMAT_VERSION,
        "method": "per class, the threshold maximising F1 on the validation records",
        "model": predictor.source.name,
        "model_sha256": predictor.model_sha256,
        "label_type": label_type,
        "class_names": list(predictor.class_names),
        "thresholds": choice.thresholds,
        "validation": {
            "files": [str(Path(name).resolve()) for name in validation_files],
            "patches": len(probabilities),
            "f1": choice.f1,
            f"f1_at_{default:g}": choice.f1_at_default,
            "min_positives": MIN_POSITIVES,
            "classes_kept_at_default": choice.too_few_positives,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    replaced = path.exists()
    write_text_atomically(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    mean_default = float(np.mean(list(choice.f1_at_default.values())))
    mean_tuned = float(np.mean(list(choice.f1.values())))
    message = (
        f"per-class thresholds chosen on {len(probabilities):,} validation patches: mean per-class F1 "
        f"{mean_default:.4f} at {default:g} -> {mean_tuned:.4f}"
    )
    if choice.too_few_positives:
        few = ", ".join(f"{name} ({count})" for name, count in choice.too_few_positives.items())
        message += f"; classes with fewer than {MIN_POSITIVES} positives keep {default:g}: {few}"
    message += f"\napply them with --thresholds {STORED} (predict, map)"
    message += f' or "thresholds": "{STORED}" (evaluate)'
    console.print(f"{message}\n{'replaced' if replaced else 'written'}: {path}", markup=False, soft_wrap=True)
    return path
