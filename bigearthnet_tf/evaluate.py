"""`evaluate(config)`: the 2019 eval.py contract, over the whole test set, with per-patch predictions.

Steps: restore `model_file` (a checkpoint base name, verified, rebuilt through the registry; or an
exported `.keras` file opened in safe mode); run it over every record of `test_tf_record_files`,
keeping every probability (metrics are computed once over the whole set, never averaged per batch);
then write one folder per evaluation, `out_dir/eval/<checkpoint>-<data>/` (e.g. `eval/best-test/`):

- `eval_result.json`: every metric of `metrics.compute_metrics` under its 2019 name, plus micro and
  macro average precision; JSON numbers only, never NaN (zero-denominator cases are defined there);
- `predictions.csv`: `patch_name`, one column per class (named by the class name) with the sigmoid
  probability at 8 decimals, then `true:<class name>` columns with 0/1, one row per patch in file order;
- `per_class_metrics.png`: per-class F1 and AP, naming the checkpoint, the data and the thresholds;
- `thresholds.json`: the threshold of each class and where it came from;
- `eval_config.json`: the resolved evaluation config that made these results;

and print the metrics table. The folder is written under a temporary name and renamed into place as a
whole, so a kill leaves the complete earlier results or the complete new ones. An existing folder of
the same name is never replaced without `overwrite`: the new results go to `<name>-2`, `-3`, ...
`out_dir/eval_result.json`, the 2019 file, is also written: the newest evaluation's metrics.

Thresholds: the config's `threshold` for every class, or per class with `"thresholds": "stored"` (those
`predict --choose-thresholds` stored beside the checkpoint, refused for other weights) or a JSON file.

The class names, label type, modality and bands come from the checkpoint; keys set in the config
(`label_type`, `modality`, `model_name`) must agree with it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from bigearthnet_tf import checkpoints
from bigearthnet_tf.config import STORED_THRESHOLDS, Config, save_config
from bigearthnet_tf.console import plain_console, progress_bar
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import (
    new_temporary_folder,
    open_atomically,
    publish_folder,
    remove_stale_temporaries,
    write_text_atomically,
)
from bigearthnet_tf.inference import Predictions, collect_predictions
from bigearthnet_tf.input_pipeline import (
    CorruptRecordCounter,
    count_records,
    make_dataset,
    manifest_shortfalls,
)
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.metrics import compute_metrics, write_eval_result
from bigearthnet_tf.model_meta import ModelMeta
from bigearthnet_tf.report import print_metrics_table, save_per_class_chart
from bigearthnet_tf.thresholds import read_thresholds_file, stored_thresholds, thresholds_path

EVAL_RESULT_NAME = "eval_result.json"
PREDICTIONS_NAME = "predictions.csv"
THRESHOLDS_NAME = "thresholds.json"
SAVED_EVAL_CONFIG = "eval_config.json"
EVAL_DIR = "eval"  # out_dir/eval/<checkpoint>-<data>/: one folder per evaluation
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
CHART_NAME = "per_class_metrics.png"
PROBABILITY_DECIMALS = 8
TRUE_PREFIX = "true:"
PATCH_NAME_COLUMN = "patch_name"


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` computed and where it wrote it."""

    metrics: dict[str, float]
    class_names: tuple[str, ...]
    num_samples: int
    eval_result: Path
    predictions: Path
    chart: Path


def evaluate(config: Config, *, console: Console | None = None, overwrite: bool = False) -> EvaluationResult:
    """Evaluate `config.model_file` on `config.test_tf_record_files` (module docstring)."""
    # One evaluation per out_dir at a time: two would race for the same results folder.
    with output_lock(config.out_dir, "evaluate", f"out_dir {config.out_dir}"):
        return _evaluate(config, console=console, overwrite=overwrite)


def _evaluate(config: Config, *, console: Console | None, overwrite: bool) -> EvaluationResult:

    console = console or plain_console()
    model, _, meta = restore_model(config)
    class_names, label_type, modality = meta.class_names, meta.label_type, meta.modality
    thresholds = evaluation_thresholds(config, meta, class_names)

    files = list(config.test_tf_record_files)
    records = count_records(files, skip_corrupt=config.skip_corrupt_records)
    if records == 0:
        raise UserError("test_tf_record_files hold no records")
    for shortfall in manifest_shortfalls(files):
        console.print(f"note: test_tf_record_files hold {shortfall}", markup=False)
    if config.test_size is not None and config.test_size != records:
        # 2019 used test_size only for the progress bar and read the files to their end; so do we.
        console.print(
            f"note: test_size is {config.test_size:,} but the test files hold {records:,} records; "
            "all are evaluated"
        )
    counter = CorruptRecordCounter()
    dataset = make_dataset(
        files,
        label_type,
        config.batch_size,
        modality=modality,
        with_names=True,
        skip_corrupt=config.skip_corrupt_records,
        corrupt_counter=counter,
    )
    batches = math.ceil(records / config.batch_size)
    if config.max_batches is not None:
        dataset, batches = dataset.take(config.max_batches), min(batches, config.max_batches)
    console.print(
        f"evaluating {meta.model_name} ({label_type}, {modality}) from {config.model_file} "
        f"on {records:,} patches"
    )
    with _progress_bar(console, batches) as advance:
        predictions = collect_predictions(model, dataset, on_batch=advance)
    skipped = counter.result()
    if skipped["records"]:
        console.print(
            f"skipped {skipped['records']:,} unreadable records (skip_corrupt_records); the metrics cover "
            f"the {len(predictions.logits):,} records read"
        )

    metrics = compute_metrics(
        predictions.labels, predictions.probabilities, threshold=thresholds.values, class_names=class_names
    )
    folder, kept = publish_results(config, overwrite, metrics, predictions, class_names, thresholds, meta)
    # The 2019 file: the newest evaluation's metrics, for scripts that read <out_dir>/eval_result.json.
    write_eval_result(metrics, Path(config.out_dir) / EVAL_RESULT_NAME)

    print_metrics_table(metrics, class_names, console=console)
    console.print(f"thresholds: {thresholds.description}", markup=False)
    if kept is not None:
        console.print(f"earlier results of this checkpoint and data are kept in {kept}", markup=False)
    console.print(f"results: {folder}", markup=False)
    return EvaluationResult(
        metrics,
        class_names,
        len(predictions.logits),
        folder / EVAL_RESULT_NAME,
        folder / PREDICTIONS_NAME,
        folder / CHART_NAME,
    )


@dataclass(frozen=True)
class Thresholds:
    """The threshold of each class in an evaluation, and where they came from."""

    values: float | np.ndarray  # one for every class, or (classes,)
    description: str  # for the report, e.g. "0.5 for every class"
    source: str  # "threshold", "stored <file>", or "file <path>"


def evaluation_thresholds(config: Config, meta: ModelMeta, class_names: Sequence[str]) -> Thresholds:
    """The config's `threshold` for every class, or per-class thresholds (`thresholds`: "stored" beside
    the checkpoint by `predict --choose-thresholds`, or a JSON file); classes they omit keep `threshold`."""

    base = float(config.threshold)
    if config.thresholds is None:
        return Thresholds(base, f"{base:g} for every class", "threshold")
    if config.thresholds == STORED_THRESHOLDS:
        model_file = Path(config.model_file)
        sha256 = meta.weights_sha256 or checkpoints.file_sha256(model_file)
        per_class = stored_thresholds(model_file, sha256, class_names)
        if per_class is None:
            raise UserError(
                f'"thresholds": "stored" but no thresholds are stored beside {model_file}; choose them with '
                f"bigearthnet predict --model {model_file} --choose-thresholds VALIDATION_RECORDS"
            )
        where = thresholds_path(model_file)
        source = f"stored {where}"
    else:
        where = Path(config.thresholds)
        per_class = read_thresholds_file(where, class_names)
        source = f"file {where}"
    values = np.array([per_class.get(name, base) for name in class_names], dtype=np.float64)
    omitted = len(class_names) - sum(name in per_class for name in class_names)
    note = f"; {omitted} classes without one use {base:g}" if omitted else ""
    return Thresholds(values, f"per class, from {where}{note}", source)


def results_folder_name(config: Config) -> str:
    """`<checkpoint>-<data>`: e.g. `best-test` for `models/best` on `test-00000-of-00004.tfrecord`..."""
    checkpoint = Path(config.model_file).name.removesuffix(".keras")
    stems = sorted(
        {_SHARD.sub("", Path(name).name.removesuffix(".tfrecord")) for name in config.test_tf_record_files}
    )
    data = stems[0] if len(stems) == 1 else f"{stems[0]}+{len(stems) - 1}"
    return _UNSAFE.sub("_", f"{checkpoint}-{data}")


def publish_results(
    config: Config,
    overwrite: bool,
    metrics: Mapping[str, float],
    predictions: Predictions,
    class_names: Sequence[str],
    thresholds: Thresholds,
    meta: Mapping[str, Any],
) -> tuple[Path, Path | None]:
    """Write one evaluation's files into `out_dir/eval/<checkpoint>-<data>[-n]/` as a set; return the
    folder and, when an earlier evaluation of the same name was kept, its folder.

    Without `overwrite` an existing folder is never touched: the new results get the next free `-n`.
    """

    parent = Path(config.out_dir) / EVAL_DIR
    remove_stale_temporaries(parent)
    name = results_folder_name(config)
    target, kept = parent / name, None
    if target.exists() and not overwrite:
        kept = target
        index = 2
        while (parent / f"{name}-{index}").exists():
            index += 1
        target = parent / f"{name}-{index}"
    temporary = new_temporary_folder(target)
    try:
        write_eval_result(metrics, temporary / EVAL_RESULT_NAME)
        write_predictions_csv(predictions, class_names, temporary / PREDICTIONS_NAME)
        data = ", ".join(Path(name).name for name in config.test_tf_record_files[:3])
        more = len(config.test_tf_record_files) - 3
        data += f" and {more} more" if more > 0 else ""
        save_per_class_chart(
            metrics,
            class_names,
            temporary / CHART_NAME,
            title=f"{meta.model_name} on {meta.label_type}",
            context=f"{config.model_file} on {data} ({len(predictions.logits):,} patches); "
            f"thresholds: {thresholds.description}",
        )
        thresholds_document = {
            "source": thresholds.source,
            "thresholds": dict(
                zip(
                    class_names, map(float, np.broadcast_to(thresholds.values, len(class_names))), strict=True
                )
            ),
        }
        write_text_atomically(temporary / THRESHOLDS_NAME, json.dumps(thresholds_document, indent=2) + "\n")
        save_config(config, temporary / SAVED_EVAL_CONFIG)
        publish_folder(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target, kept


def restore_model(config: Config) -> checkpoints.LoadedCheckpoint:
    """Load `model_file`; keys the config sets explicitly must agree with the checkpoint."""
    if not config.model_file:
        raise UserError("model_file is not set; evaluation needs a checkpoint")
    loaded = checkpoints.load_checkpoint(
        config.model_file,
        label_type=config.label_type if config.given("label_type") else None,
        modality=config.modality if config.given("modality") else None,
        model_name=config.model_name if config.given("model_name") else None,
        statistics=config.statistics,
    )
    if loaded.meta.kind == checkpoints.KIND_BACKBONE:
        raise UserError(
            f"model_file {config.model_file} is a backbone without a trained head: fine-tune it first "
            '("backbone_weights" in a training config)'
        )
    return loaded


def write_predictions_csv(
    predictions: Predictions, class_names: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """`predictions.csv`: patch_name, a probability column per class, then `true:<class>` 0/1 columns."""
    path = Path(path)
    probabilities = predictions.probabilities
    samples = len(probabilities)
    names = predictions.names if predictions.names is not None else [str(i) for i in range(samples)]
    header = [PATCH_NAME_COLUMN, *class_names]
    if predictions.labels is not None:
        header += [TRUE_PREFIX + name for name in class_names]
    with open_atomically(path) as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        number = f"{{:.{PROBABILITY_DECIMALS}f}}"
        for index in range(samples):
            row = [names[index], *(number.format(p) for p in probabilities[index])]
            if predictions.labels is not None:
                row += [str(int(v)) for v in predictions.labels[index]]
            writer.writerow(row)
    return path


@contextlib.contextmanager
def _progress_bar(console: Console, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar over the evaluation batches; yields a function that advances it by one batch."""
    with progress_bar(console, "batches") as bar:
        task = bar.add_task("evaluating", total=total)
        yield lambda: bar.advance(task)
