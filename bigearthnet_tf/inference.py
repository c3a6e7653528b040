"""Running a model over data: its logits as one traced function, over a whole dataset, and the numpy
sigmoid and loss over the results; and a model's logits over patches read straight from their files.
Shared by training (validation), evaluation and prediction.

`logits_function(model)` is traced once per model: its input signature fixes everything but the batch
size, so the last, smaller batch of a set and every later validation reuse the same graph (tracing a
new function per validation made TensorFlow warn about retracing, and cost time at each epoch).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.patch_source import (
    ArchiveFileSource,
    PatchLocation,
    PatchReader,
    archive_file_batches,
    batches,
)

_LOGITS_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def logits_function(model) -> Callable[[Mapping[str, Any]], Any]:
    """`model` as one traced function of its input dict (extra keys ignored), float32 logits out."""
    import tensorflow as tf

    from bigearthnet_tf.models import input_keys

    function = _LOGITS_FUNCTIONS.get(model)
    if function is None:
        keys = input_keys(model)
        signature = {
            tensor.name: tf.TensorSpec((None, *tensor.shape[1:]), tf.float32, name=tensor.name)
            for tensor in model.inputs
        }
        model_ref = weakref.ref(model)  # a strong reference in the value would keep the key alive

        @tf.function(input_signature=[signature])
        def traced(inputs):
            return tf.cast(model_ref()({key: inputs[key] for key in keys}, training=False), tf.float32)

        def function(inputs):
            return traced({key: tf.cast(inputs[key], tf.float32) for key in keys})

        _LOGITS_FUNCTIONS[model] = function
    return function


@dataclass(frozen=True)
class Predictions:
    """Model outputs over a whole set, in the order of the files' records."""

    names: list[str] | None  # patch names, when the dataset had them
    logits: np.ndarray  # (samples, classes) float32
    labels: np.ndarray | None  # (samples, classes) float32 multi-hot, when the dataset had labels

    @property
    def probabilities(self) -> np.ndarray:
        return sigmoid(self.logits)


def collect_predictions(model, dataset, on_batch: Callable[[], None] | None = None) -> Predictions:
    """Logits (and labels, patch names) of `model` over every batch of `dataset`.

    The dataset yields `(inputs, labels)` or `inputs` alone; `inputs["patch_name"]`, when present, is
    taken out before the model sees the inputs. Only the inputs the model reads are fed to it.
    """
    from bigearthnet_tf.input_pipeline import corrupt_files_as_user_errors

    logits_of = logits_function(model)

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
        raise UserError("the record files yielded no records")
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


def logits_over_patches(
    model,
    reader: PatchReader,
    locations: Sequence[PatchLocation] | ArchiveFileSource,
    *,
    batch_size: int,
    workers: int,
    skip_bad: bool = False,
    advance: Callable[[int], None] = lambda count: None,
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """The model's logits for patches read straight from their files (`patch_source`): patch
    folders, or the patches of an archive file (in the file's order).

    Returns the names of the patches read, their logits (patches, classes) and, with `skip_bad`, the
    (name, reason) of each patch left out; `advance(n)` is called as patches are done.
    """
    apply = logits_function(model)
    names: list[str] = []
    outputs: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    if isinstance(locations, ArchiveFileSource):
        source = archive_file_batches(reader, locations, batch_size, skip_bad, skipped)
    else:
        source = batches(reader, locations, batch_size, workers, skip_bad, skipped)
    for batch in source:
        if batch.names:
            outputs.append(apply(batch.inputs).numpy()[: len(batch.names)])
            names.extend(batch.names)
        advance(batch.attempted)
    logits = np.concatenate(outputs) if outputs else np.empty((0, 0), dtype=np.float32)
    return names, logits, skipped
