"""`evaluate(config)`: the 2019 eval.py contract, over the whole test set, with per-patch predictions.

Steps: restore `model_file` (a checkpoint base name, verified, rebuilt through the registry; or an
exported `.keras` file opened in safe mode); run it over every record of `test_tf_record_files`,
keeping every probability (metrics are computed once over the whole set, never averaged per batch);
then write into `out_dir`:

- `eval_result.json`: every metric of `metrics.compute_metrics` under its 2019 name, plus micro and
  macro average precision; JSON numbers only, never NaN (zero-denominator cases are defined there);
- `predictions.csv`: `patch_name`, one column per class (named by the class name) with the sigmoid
  probability at 8 decimals, then `true:<class name>` columns with 0/1, one row per patch in file order;
- `per_class_metrics.png`: per-class F1 and AP;
- `eval_config.json`: the resolved evaluation config (`config.json` stays the training run's);

and print the metrics table. Outputs are derived data: each run regenerates them (atomically, so an
interrupted run leaves the previous files intact), and says so when it replaces earlier ones.

The class names, label type, modality and bands come from the checkpoint; keys set in the config
(`label_type`, `modality`, `model_name`) must agree with it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from bigearthnet_tf import checkpoints
from bigearthnet_tf.config import Config, make_readable, save_config, write_text_atomically
from bigearthnet_tf.errors import UserError

EVAL_RESULT_NAME = "eval_result.json"
PREDICTIONS_NAME = "predictions.csv"
CHART_NAME = "per_class_metrics.png"
PROBABILITY_DECIMALS = 8
TRUE_PREFIX = "true:"
PATCH_NAME_COLUMN = "patch_name"


@dataclass(frozen=True)
class Predictions:
    """Model outputs over a whole set, in the order of the files' records."""

    names: list[str] | None  # patch names, when the dataset had them
    logits: np.ndarray  # (samples, classes) float32
    labels: np.ndarray | None  # (samples, classes) float32 multi-hot, when the dataset had labels

    @property
    def probabilities(self) -> np.ndarray:
        return sigmoid(self.logits)


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` computed and where it wrote it."""

    metrics: dict[str, float]
    class_names: tuple[str, ...]
    num_samples: int
    eval_result: Path
    predictions: Path
    chart: Path


def evaluate(config: Config, *, console: Console | None = None) -> EvaluationResult:
    """Evaluate `config.model_file` on `config.test_tf_record_files` (module docstring)."""
    from bigearthnet_tf.input_pipeline import CorruptRecordCounter, count_records, make_dataset
    from bigearthnet_tf.metrics import compute_metrics
    from bigearthnet_tf.report import print_metrics_table, save_per_class_chart

    console = console or Console()
    model, _, meta = restore_model(config)
    class_names = tuple(meta["class_names"])
    label_type = meta["label_type"]
    modality = meta.get("modality") or config.modality

    files = list(config.test_tf_record_files)
    records = count_records(files, skip_corrupt=config.skip_corrupt_records)
    if records == 0:
        raise UserError("test_tf_record_files hold no records")
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
    console.print(
        f"evaluating {meta['model_name']} ({label_type}, {modality}) from {config.model_file} "
        f"on {records:,} patches"
    )
    with _progress_bar(console, math.ceil(records / config.batch_size)) as advance:
        predictions = collect_predictions(model, dataset, on_batch=advance)
    skipped = counter.result()
    if skipped["records"]:
        console.print(
            f"skipped {skipped['records']:,} unreadable records (skip_corrupt_records); the metrics cover "
            f"the {len(predictions.logits):,} records read"
        )

    metrics = compute_metrics(
        predictions.labels, predictions.probabilities, threshold=config.threshold, class_names=class_names
    )
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [out_dir / name for name in (EVAL_RESULT_NAME, PREDICTIONS_NAME, CHART_NAME)]
    replaced = [path.name for path in outputs if path.exists()]
    eval_result = write_eval_result(metrics, outputs[0])
    predictions_csv = write_predictions_csv(predictions, class_names, outputs[1])
    chart = save_per_class_chart(
        metrics, class_names, outputs[2], title=f"{meta['model_name']} on {label_type}"
    )
    save_config(config)

    print_metrics_table(metrics, class_names, console=console)
    if replaced:
        console.print(f"replaced the earlier {', '.join(replaced)} in {out_dir}")
    console.print(f"results: {eval_result}\npredictions: {predictions_csv}\nchart: {chart}")
    return EvaluationResult(
        metrics, class_names, len(predictions.logits), eval_result, predictions_csv, chart
    )


def restore_model(config: Config) -> checkpoints.LoadedCheckpoint:
    """Load `model_file`; keys the config sets explicitly must agree with the checkpoint."""
    if not config.model_file:
        raise UserError("model_file is not set; evaluation needs a checkpoint")
    return checkpoints.load_checkpoint(
        config.model_file,
        label_type=config.label_type if config.given("label_type") else None,
        modality=config.modality if config.given("modality") else None,
        model_name=config.model_name if config.given("model_name") else None,
        statistics=config.statistics,
    )


def collect_predictions(model, dataset, on_batch: Callable[[], None] | None = None) -> Predictions:
    """Logits (and labels, patch names) of `model` over every batch of `dataset`.

    The dataset yields `(inputs, labels)` or `inputs` alone; `inputs["patch_name"]`, when present, is
    taken out before the model sees the inputs. Only the inputs the model reads are fed to it.
    """
    import tensorflow as tf

    from bigearthnet_tf.input_pipeline import corrupt_files_as_user_errors
    from bigearthnet_tf.models import input_keys

    keys = input_keys(model)

    @tf.function(reduce_retracing=True)
    def logits_of(inputs):
        return tf.cast(model({key: inputs[key] for key in keys}, training=False), tf.float32)

    names: list[str] = []
    logits: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    has_names = has_labels = False
    with corrupt_files_as_user_errors():
        for element in dataset:
            inputs, batch_labels = element if isinstance(element, tuple) else (element, None)
            inputs = dict(inputs)
            patch_names = inputs.pop("patch_name", None)
            logits.append(logits_of(inputs).numpy())
            if batch_labels is not None:
                has_labels = True
                labels.append(np.asarray(batch_labels, dtype=np.float32))
            if patch_names is not None:
                has_names = True
                names.extend(name.decode("utf-8") for name in patch_names.numpy())
            if on_batch is not None:
                on_batch()
    if not logits:
        raise UserError("the evaluation files yielded no records")
    return Predictions(
        names=names if has_names else None,
        logits=np.concatenate(logits),
        labels=np.concatenate(labels) if has_labels else None,
    )


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow warnings for large negative logits."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def sigmoid_cross_entropy(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean sigmoid cross-entropy over samples and classes: the training loss, over a whole set."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    # max(x, 0) - x z + log(1 + exp(-|x|)): the stable form TensorFlow uses.
    losses = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    return float(losses.mean())


def write_eval_result(metrics: dict[str, float], path: str | os.PathLike[str]) -> Path:
    """`eval_result.json`: the metrics as JSON numbers (NaN/inf are refused, never written)."""
    clean: dict[str, Any] = {}
    for key, value in metrics.items():
        number = float(value)
        if not math.isfinite(number):
            raise AssertionError(f"metric {key} is {number}; metrics must define every case")
        clean[key] = number
    return write_text_atomically(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


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
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(header)
            number = f"{{:.{PROBABILITY_DECIMALS}f}}"
            for index in range(samples):
                row = [names[index], *(number.format(p) for p in probabilities[index])]
                if predictions.labels is not None:
                    row += [str(int(v)) for v in predictions.labels[index]]
                writer.writerow(row)
            stream.flush()
            os.fsync(stream.fileno())
        make_readable(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def _progress_bar(console: Console, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar over the evaluation batches; yields a function that advances it by one batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "evaluating", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        task = bar.add_task("evaluating", total=total)
        yield lambda: bar.advance(task)
