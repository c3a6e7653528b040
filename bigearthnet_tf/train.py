"""`train(config)`: the 2019 training contract on TensorFlow 2, resumable and distribution-ready.

What one call does, in order (each step is one function below):

1. `make_strategy`: the `tf.distribute` strategy named by `distribution` (one device by default).
2. `seed_everything`: Python, NumPy, TensorFlow and Keras from `seed` (42, as in 2019).
3. `plan_training`: count the training records; iterations = ceil(records x nb_epoch / batch_size)
   (with several replicas the last partial batch is dropped, so every replica gets a full share).
4. `find_starting_point`: `resume: auto` takes the newest complete checkpoint in `out_dir/models`;
   otherwise `fine_tune` restores `model_file`, and a name ending in `iteration-<N>` continues that
   run at N + 1 with its optimizer state, dropout RNG state and data position (the 2019 rule, now
   exact). A fresh run refuses an `out_dir` that already holds checkpoints, rather than mixing runs.
5. `build_model_and_optimizer`: the registry's model (logits) for the label type's classes and the
   modality, Adam (TF1's epsilon 1e-8, as in 2019) or AdamW, with the learning-rate schedule.
6. `training_batches`: the input pipeline per replica (`batch_size` is the global batch), skipping
   the batches a resumed run has already consumed.
7. `make_train_step`: a `tf.function` running `strategy.run` on each replica: sigmoid cross-entropy
   from logits averaged over classes and over the global batch, gradients all-reduced by the optimizer.
8. `TrainingLoop.run`: iterations count from 1 (after the first batch). After each: TensorBoard
   scalars (`out_dir/logs/training`), the progress bar, a stop on a non-finite loss (UserError naming
   the iteration; checkpoints on disk are left as they are), validation when an epoch ends (best
   checkpoint by validation macro AP, optional early stopping), a checkpoint when
   `N % save_checkpoint_per_iteration == 0 and N >= save_checkpoint_after_iteration`, and on SIGINT /
   SIGTERM a checkpoint followed by `TrainingInterrupted`. A final checkpoint closes the run.

Only the chief writes files (checkpoints, logs, the saved config); every worker computes the same
validation, so decisions such as early stopping agree across workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from rich.console import Console
from rich.progress import TextColumn, TimeElapsedColumn
from tensorflow.core.framework.summary_pb2 import SummaryMetadata

from bigearthnet_tf import checkpoints
from bigearthnet_tf.backbones import freeze_backbone, learning_rate_scales, load_backbone
from bigearthnet_tf.config import TRAIN, Config, save_config
from bigearthnet_tf.console import plain_console, progress_bar
from bigearthnet_tf.constants import class_names as label_names
from bigearthnet_tf.errors import ConfigError, UserError
from bigearthnet_tf.inference import collect_predictions, sigmoid, sigmoid_cross_entropy
from bigearthnet_tf.input_pipeline import (
    CorruptRecordCounter,
    corrupt_files_as_user_errors,
    count_records,
    make_dataset,
    subset_size,
)
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.metrics import compute_metrics
from bigearthnet_tf.model_meta import ModelMeta
from bigearthnet_tf.models import build_model, input_keys

ADAM_EPSILON = 1e-8  # tf.train.AdamOptimizer's default, which the 2019 models were trained with
LOGS_SUBDIR = ("logs", "training")
SELECTION_METRIC = "macro_average_precision"  # what the best checkpoint and early stopping watch
# Validation metrics also written to TensorBoard (all of them go into the best checkpoint's metadata).
LOGGED_VALIDATION_METRICS = (
    "macro_average_precision",
    "micro_average_precision",
    "macro_f1_score_class_avg",
    "micro_f1_score",
    "sample_f1_score",
    "loss",
)
SAMPLES_PER_SECOND_SMOOTHING = 0.1  # weight of the newest step in the moving average shown
AUGMENTATION_SEEDS_PER_ITERATION = 1024  # distinct augmentation seeds per iteration: one per replica


# What tensorboard's scalar summary op attaches: TensorBoard shows such tensors as scalar charts.
_SCALAR_METADATA = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))


class TrainingInterrupted(UserError):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint; exit code 128 + signal."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class TrainingDiverged(UserError):
    """The loss (or a gradient) became NaN or infinite."""


@dataclass(frozen=True)
class TrainingResult:
    """What a finished `train` call did."""

    iterations: int  # the last iteration done (counted from the start of the run, resumes included)
    final_checkpoint: Path | None  # None on non-chief workers
    best_checkpoint: Path | None  # by validation macro AP; None without validation files
    best_macro_average_precision: float | None
    stopped_early: bool
    validations: tuple[dict[str, float], ...] = ()  # (iteration, metrics...) of this call's validations


# --------------------------------------------------------------------------------------------------
# The one public entry point
# --------------------------------------------------------------------------------------------------


def train(
    config: Config,
    *,
    on_iteration: Callable[[int, float], None] | None = None,
    console: Console | None = None,
) -> TrainingResult:
    """Train `config.model_name` on `config.tr_tf_record_files` as described in the module docstring.

    `on_iteration(iteration, loss)` is called after every iteration (progress hooks, tests).
    """
    if config.purpose != TRAIN:
        raise ConfigError(
            f"{config.source or 'config'}: loaded to {config.purpose}; load it with purpose='train'"
        )
    strategy = make_strategy(config.distribution)
    chief = is_chief(strategy)
    console = console or plain_console(quiet=not chief)
    seed_everything(config.seed)
    # One training per out_dir (the chief writes; other workers of a cluster share its out_dir).
    lock = (
        output_lock(config.out_dir, "train", f"out_dir {config.out_dir}")
        if chief
        else contextlib.nullcontext()
    )
    with lock, precision_policy(config.mixed_precision) as policy, StopSignals() as stop:
        plan = plan_training(config, strategy, console)
        start = find_starting_point(config)
        model, optimizer, progress_state = build_model_and_optimizer(config, start, plan, strategy, policy)
        if chief:
            save_config(config)
            # A run killed while saving may have left temporary files; they are never read.
            checkpoints.remove_temporaries(checkpoints.models_dir(config.out_dir))
        console.print(
            f"training {config.model_name} ({config.label_type}, {config.modality}) on "
            f"{plan.epoch_records:,} patches x {config.nb_epoch} epochs = {plan.total_iterations:,} "
            f"iterations of {config.batch_size} on {plan.replicas} replica(s); {start.description}"
        )
        loop = TrainingLoop(
            config=config,
            plan=plan,
            strategy=strategy,
            model=model,
            optimizer=optimizer,
            chief=chief,
            console=console,
            stop=stop,
            on_iteration=on_iteration,
            progress_state=progress_state,
        )
        return loop.run(start.iteration)


# --------------------------------------------------------------------------------------------------
# Set-up, one concern each
# --------------------------------------------------------------------------------------------------


def make_strategy(distribution: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy for the config key `distribution`.

    `auto`: MirroredStrategy over all local GPUs when there are several, else the default (one device).
    `mirrored`: MirroredStrategy over the local GPUs, or over the logical CPU devices without GPUs.
    `multi_worker`: MultiWorkerMirroredStrategy configured by the standard `TF_CONFIG` variable.
    `none`: the default strategy.
    """
    if distribution == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if distribution == "mirrored":
        devices = gpus or [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if distribution == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy(gpus)
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the one worker that writes files: the `chief` task, else worker 0, else the only one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or task_type is None or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and not has_chief


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy, TensorFlow and Keras' generators (weights, dropout)."""
    keras.utils.set_random_seed(seed)


@contextlib.contextmanager
def precision_policy(mixed_precision: bool) -> Iterator[str]:
    """Set the Keras dtype policy for the run: bfloat16 on CPU, float16 (with loss scaling) on GPU.

    The previous global policy is restored afterwards, so one run never leaks into the next.
    """
    previous = keras.mixed_precision.global_policy()
    policy = "float32"
    if mixed_precision:
        policy = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current iteration.

    The first signal says so at once on standard error; a second of the same kind gets the previous
    behaviour (e.g. KeyboardInterrupt), so a user can still force an exit. A signal the process was
    started with ignored (`nohup`, `trap '' INT`) stays ignored. Outside the main thread (where
    Python allows no handlers) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: object) -> None:
        self.received = signal.Signals(number)
        signal.signal(number, self._previous[number])
        again = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
        # os.write: safe inside a signal handler, and not held back by the progress bar's buffering.
        os.write(
            2,
            f"\n{signal.Signals(number).name}: stopping after this iteration and writing a checkpoint; "
            f"{again} again to abort at once\n".encode(),
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                if signal.getsignal(number) is signal.SIG_IGN:
                    continue  # ignored by whoever started us: keep it that way
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


@dataclass(frozen=True)
class TrainingPlan:
    """How long the run is, from the training files and the strategy."""

    epoch_records: int
    total_iterations: int
    replicas: int
    drop_remainder: bool


def plan_training(config: Config, strategy: tf.distribute.Strategy, console: Console) -> TrainingPlan:
    """Count the training records and derive the number of iterations."""
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"key 'batch_size': {config.batch_size} is not divisible by the {replicas} replicas of "
            f"distribution {config.distribution!r} (it is the global batch)"
        )
    records = count_records(list(config.tr_tf_record_files), skip_corrupt=config.skip_corrupt_records)
    if records == 0:
        raise UserError("tr_tf_record_files hold no records")
    if config.training_size is not None and config.training_size != records:
        # 2019 used training_size only for the progress bar; the files are the truth.
        console.print(
            f"note: training_size is {config.training_size:,} but tr_tf_record_files hold {records:,} "
            "records; using the files' count"
        )
    if config.training_fraction < 1:
        total_records = records
        records = subset_size(total_records, config.training_fraction)
        console.print(
            f"training_fraction {config.training_fraction:g}: training on {records:,} of {total_records:,} "
            f"records (a subset drawn with seed {config.seed}, the same in every epoch)"
        )
    # Several replicas: drop the one partial batch at the very end, so no replica ever gets an empty
    # share (batch norm over zero samples would poison the moving statistics).
    drop_remainder = replicas > 1
    consumed = records * config.nb_epoch
    total = consumed // config.batch_size if drop_remainder else math.ceil(consumed / config.batch_size)
    if total == 0:
        raise UserError(
            f"batch_size {config.batch_size} exceeds the {consumed:,} records of all epochs: "
            "no iteration to run"
        )
    return TrainingPlan(records, total, replicas, drop_remainder)


@dataclass(frozen=True)
class StartingPoint:
    """Where a run starts: a checkpoint to restore (or none) and the iterations already done."""

    checkpoint: Path | None
    iteration: int
    restore_state: bool  # optimizer, RNG and data position too (continuing a run), not just weights
    description: str


def find_starting_point(config: Config) -> StartingPoint:
    """Apply `resume` and `fine_tune` (module docstring, step 4)."""
    directory = checkpoints.models_dir(config.out_dir)
    if config.resume == "auto":
        latest = checkpoints.latest_complete_checkpoint(directory)
        if latest is not None:
            iteration = checkpoints.iteration_of(latest) or 0
            return StartingPoint(
                latest, iteration, True, f"resuming after iteration {iteration} from {latest}"
            )
    elif not config.fine_tune:
        existing = checkpoints.list_checkpoints(directory)
        if existing:
            raise UserError(
                f"out_dir {config.out_dir} already holds checkpoints of a run (up to "
                f'iteration-{existing[-1][0]}); set "resume": "auto" to continue it, or choose '
                "another out_dir"
            )
    if config.fine_tune:
        base = Path(config.model_file)
        iteration = checkpoints.iteration_of(base)
        if iteration is not None:
            return StartingPoint(base, iteration, True, f"continuing after iteration {iteration} of {base}")
        return StartingPoint(base, 0, False, f"fine-tuning the weights of {base}")
    return StartingPoint(None, 0, False, "from scratch")


@dataclass
class ProgressState:
    """What model selection remembers across validations (and across resumes, via checkpoints)."""

    best_value: float | None = None
    best_iteration: int | None = None
    validations_since_best: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_" + SELECTION_METRIC: self.best_value,
            "best_iteration": self.best_iteration,
            "validations_since_best": self.validations_since_best,
        }

    @classmethod
    def from_metadata(cls, meta: ModelMeta | None) -> ProgressState:
        saved = (meta.training if meta is not None else None) or {}
        return cls(
            best_value=saved.get("best_" + SELECTION_METRIC),
            best_iteration=saved.get("best_iteration"),
            validations_since_best=int(saved.get("validations_since_best") or 0),
        )


def build_model_and_optimizer(
    config: Config,
    start: StartingPoint,
    plan: TrainingPlan,
    strategy: tf.distribute.Strategy,
    policy: str,
) -> tuple[keras.Model, keras.optimizers.Optimizer, ProgressState]:
    """The model (fresh or restored) and its optimizer, created under the strategy's scope."""
    num_classes = len(label_names(config.label_type))
    regularisation = {"dropout": config.dropout, "drop_path_rate": config.drop_path_rate}
    with strategy.scope():
        meta = None
        state = None
        if start.checkpoint is not None:
            model, state, meta = checkpoints.load_checkpoint(
                start.checkpoint,
                label_type=config.label_type,
                modality=config.modality,
                model_name=config.model_name,
                statistics=config.statistics,
                training_options=regularisation,
            )
            saved_kernel = getattr(model, "model_options", {}).get("upsampling")
            if config.upsampling is not None and config.upsampling != saved_kernel:
                raise UserError(
                    f"checkpoint {start.checkpoint} was trained with upsampling {saved_kernel!r} but the "
                    f"config asks for {config.upsampling!r}; a model must see the inputs it was trained on"
                )
        elif config.backbone_weights is not None:
            model = load_backbone(
                config.backbone_weights,
                num_classes,
                model_name=config.model_name,
                modality=config.modality,
                **regularisation,
            )
        else:
            model = build_model(
                config.model_name,
                num_classes,
                config.modality,
                config.statistics,
                upsampling=config.upsampling,
                **regularisation,
            )
        if config.freeze_backbone:
            freeze_backbone(model)
        scales = None
        if config.backbone_learning_rate_scale != 1.0 or config.layer_decay != 1.0:
            scales = learning_rate_scales(model, config.backbone_learning_rate_scale, config.layer_decay)
        optimizer = make_optimizer(
            config, plan.total_iterations, loss_scaling=policy == "mixed_float16", rate_scales=scales
        )
        optimizer.build(model.trainable_variables)
        if start.restore_state and state is not None:
            checkpoints.restore_training_state(
                model, optimizer, state, where=f"checkpoint {start.checkpoint}"
            )
    return model, optimizer, ProgressState.from_metadata(meta if start.restore_state else None)


@keras.saving.register_keras_serializable(package="bigearthnet_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then constant or cosine decay to 0 at `total_iterations`.

    `step` is the optimizer's count of updates done, so iteration N uses the rate at step N - 1.
    """

    def __init__(self, peak: float, warmup_iterations: int, total_iterations: int, cosine: bool) -> None:
        self.peak = float(peak)
        self.warmup_iterations = int(warmup_iterations)
        self.total_iterations = int(total_iterations)
        self.cosine = bool(cosine)

    def __call__(self, step):
        iteration = tf.cast(step, tf.float32) + 1.0
        factor = tf.constant(1.0)
        if self.warmup_iterations:
            factor = tf.minimum(1.0, iteration / float(self.warmup_iterations))
        if self.cosine:
            span = float(max(1, self.total_iterations - self.warmup_iterations))
            done = tf.clip_by_value((iteration - float(self.warmup_iterations)) / span, 0.0, 1.0)
            factor = factor * 0.5 * (1.0 + tf.cos(math.pi * done))
        return self.peak * factor

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "warmup_iterations": self.warmup_iterations,
            "total_iterations": self.total_iterations,
            "cosine": self.cosine,
        }


class _ScaledRates:
    """A learning-rate factor per trainable variable (`rate_scales`, in `model.trainable_variables`
    order), applied to the Adam step: how the backbone gets `backbone_learning_rate_scale` of the head's
    rate. AdamW's decoupled weight decay stays at the full rate for every variable."""

    rate_scales: list[float] | None = None

    def update_step(self, gradient, variable, learning_rate):
        if self.rate_scales is not None:
            scale = self.rate_scales[self._get_variable_index(variable)]
            if scale != 1.0:
                learning_rate = learning_rate * scale
        return super().update_step(gradient, variable, learning_rate)


class Adam(_ScaledRates, keras.optimizers.Adam):
    """keras.optimizers.Adam, with optional per-variable rate factors."""


class AdamW(_ScaledRates, keras.optimizers.AdamW):
    """keras.optimizers.AdamW, with optional per-variable rate factors."""


def make_optimizer(
    config: Config, total_iterations: int, loss_scaling: bool = False, rate_scales: list[float] | None = None
) -> keras.optimizers.Optimizer:
    """Adam with a constant rate (2019), or AdamW / warm-up / cosine when the config asks."""
    if config.lr_schedule == "constant" and config.warmup_iterations == 0:
        learning_rate: float | WarmupSchedule = config.learning_rate
    else:
        learning_rate = WarmupSchedule(
            config.learning_rate, config.warmup_iterations, total_iterations, config.lr_schedule == "cosine"
        )
    if config.optimizer == "adamw":
        optimizer: Adam | AdamW = AdamW(learning_rate, weight_decay=config.weight_decay, epsilon=ADAM_EPSILON)
    else:
        optimizer = Adam(learning_rate, epsilon=ADAM_EPSILON)
    optimizer.rate_scales = rate_scales
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


def training_batches(
    config: Config,
    strategy: tf.distribute.Strategy,
    plan: TrainingPlan,
    iterations_done: int,
    corrupt_counter: CorruptRecordCounter | None = None,
) -> tf.distribute.DistributedDataset:
    """The training batches of the rest of the run, one pipeline per worker, batch split per replica."""

    def dataset_for(context: tf.distribute.InputContext) -> tf.data.Dataset:
        # Each pipeline feeds several replicas one local batch each per iteration.
        batches_per_iteration = context.num_replicas_in_sync // context.num_input_pipelines
        return make_dataset(
            list(config.tr_tf_record_files),
            config.label_type,
            config.batch_size,
            modality=config.modality,
            shuffle_buffer=config.shuffle_buffer_size,
            epochs=config.nb_epoch,
            seed=config.seed,
            drop_remainder=plan.drop_remainder,
            skip_corrupt=config.skip_corrupt_records,
            corrupt_counter=corrupt_counter,
            input_context=context,
            skip_batches=iterations_done * batches_per_iteration,
            fraction=config.training_fraction,
            native_dtype=True,  # the model converts, on the accelerator where there is one
        )

    return strategy.distribute_datasets_from_function(dataset_for)


def augment(inputs: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Random horizontal flip and 90-degree rotation per sample, the same for every input of a sample.

    All inputs cover the same 1.2 km square at different resolutions, so one transform fits all.
    Stateless random ops seeded by (seed, iteration, replica) keep resumed runs identical.
    """
    batch = tf.shape(next(iter(inputs.values())))[0]
    flip = tf.random.stateless_uniform([batch], seed) < 0.5
    turns = tf.random.stateless_uniform([batch], seed + [0, 1], minval=0, maxval=4, dtype=tf.int32)
    picks = tf.stack([turns, tf.range(batch)], axis=1)
    augmented = {}
    for key, images in inputs.items():
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
        rotations = tf.stack([tf.image.rot90(images, k) for k in range(4)])
        augmented[key] = tf.gather_nd(rotations, picks)
    return augmented


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    config: Config,
    element_spec: Any = None,
) -> Callable[[Any, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """`step(batch, iteration) -> (loss, non_finite_gradients)`: one synchronous update on all replicas.

    With the batches' `element_spec` (batch dimension None unless batches are all full) the step is
    traced once for every batch shape. A resumed run whose first batch is the last, partial one then
    runs the very graph of an uninterrupted run, so its floating-point results are the same bit for bit
    (a graph traced for one static shape can pick other kernels, which round differently).
    """
    keys = input_keys(model)
    loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    seed = tf.constant(config.seed, tf.int64)

    def gradients(inputs, labels, global_count):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(inputs, training=True), tf.float32)
            per_example = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1
            )
            # Divide by the GLOBAL count: the optimizer sums gradients over replicas.
            loss = tf.reduce_sum(per_example) / global_count
            if model.losses:
                loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
            scaled = optimizer.scale_loss(loss) if loss_scaling else loss
        return loss, tape.gradient(scaled, model.trainable_variables)

    if config.jit_compile:
        # XLA compiles the forward and backward pass; the update stays outside, where the optimizer's
        # cross-replica all-reduce lives.
        gradients = tf.function(gradients, jit_compile=True)

    def replica_step(inputs, labels, iteration):
        context = tf.distribute.get_replica_context()
        inputs = {key: inputs[key] for key in keys}
        if config.augmentation:
            replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
            inputs = augment(inputs, tf.stack([seed, iteration * AUGMENTATION_SEEDS_PER_ITERATION + replica]))
        global_count = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(labels)[0], tf.float32)
        )
        loss, grads = gradients(inputs, labels, global_count)
        # With loss scaling, non-finite gradients are expected now and then; the optimizer skips them.
        finite = (
            tf.constant(True)
            if loss_scaling
            else tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        )
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, tf.cast(tf.logical_not(finite), tf.float32)

    signature = None if element_spec is None else [element_spec, tf.TensorSpec([], tf.int64)]

    @tf.function(reduce_retracing=True, input_signature=signature)
    def step(batch, iteration):
        inputs, labels = batch
        loss, non_finite = strategy.run(replica_step, args=(inputs, labels, iteration))
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, non_finite, axis=None),
        )

    return step


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingLoop:
    """Runs the iterations and does what each one may call for (module docstring, step 8)."""

    config: Config
    plan: TrainingPlan
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    chief: bool
    console: Console
    stop: StopSignals
    on_iteration: Callable[[int, float], None] | None
    progress_state: ProgressState
    saved_at: int | None = None
    last_checkpoint: Path | None = None
    validations: list[dict[str, float]] = field(default_factory=list)

    def run(self, iterations_done: int) -> TrainingResult:
        config = self.config
        directory = checkpoints.models_dir(config.out_dir)
        self.last_checkpoint = checkpoints.latest_complete_checkpoint(directory) if self.chief else None
        if iterations_done >= self.plan.total_iterations:
            self.console.print(f"nothing to do: iteration {iterations_done} reached the planned total")
            if (
                self.last_checkpoint is not None
                and checkpoints.iteration_of(self.last_checkpoint) == iterations_done
            ):
                self.saved_at = iterations_done  # the run's final checkpoint is already there
            return self._finish(iterations_done, stopped_early=False)
        corrupt = CorruptRecordCounter() if config.skip_corrupt_records else None
        batches = training_batches(config, self.strategy, self.plan, iterations_done, corrupt)
        step = make_train_step(self.model, self.optimizer, self.strategy, config, batches.element_spec)
        validation = self._validation_data()
        writer = self._summary_writer()
        iteration = iterations_done
        stopped_early = False
        with writer.as_default(), self._progress_bar(iterations_done) as (progress, task):
            meter = _Throughput(config.batch_size)
            with corrupt_files_as_user_errors():
                for batch in batches:
                    iteration += 1
                    loss, non_finite = step(batch, tf.constant(iteration, tf.int64))
                    loss = float(loss)
                    self._check_finite(iteration, loss, float(non_finite))
                    samples_per_second = meter.update()
                    self._log_iteration(iteration, loss, samples_per_second)
                    progress.update(
                        task,
                        completed=iteration,
                        loss=f"loss {loss:.4f}",
                        rate=f"{samples_per_second:7.1f} samples/s" if samples_per_second else "",
                    )
                    if self.on_iteration is not None:
                        self.on_iteration(iteration, loss)
                    if validation is not None and self._ends_epoch(iteration):
                        stopped_early = self._validate(iteration, validation, progress.console)
                    if checkpoints.should_save(
                        iteration,
                        config.save_checkpoint_per_iteration,
                        config.save_checkpoint_after_iteration,
                    ):
                        self._save(iteration, progress.console)
                    if stopped_early or iteration - iterations_done == config.max_batches:
                        break
                    if self.stop.received is not None:
                        self._interrupt(iteration, progress.console)
            if validation is not None and not self._validated_at(iteration):
                stopped_early = self._validate(iteration, validation, progress.console) or stopped_early
        if corrupt is not None and corrupt.result()["records"]:
            self.console.print(
                f"skipped {corrupt.result()['records']:,} unreadable training records (skip_corrupt_records)"
            )
        if stopped_early:
            self.console.print(
                f"early stopping after iteration {iteration}: no better validation {SELECTION_METRIC} in "
                f"{config.early_stopping_patience} validations"
            )
        return self._finish(iteration, stopped_early)

    # --- per-iteration concerns ----------------------------------------------------------------

    def _check_finite(self, iteration: int, loss: float, non_finite_gradients: float) -> None:
        if math.isfinite(loss) and non_finite_gradients == 0:
            return
        what = (
            f"the loss became {loss}" if not math.isfinite(loss) else "the gradients became NaN or infinite"
        )
        kept = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was written"
        )
        raise TrainingDiverged(
            f"{what} at iteration {iteration}; training stopped and {kept}; try a lower learning_rate "
            f"(now {self.config.learning_rate:g})"
        )

    def _log_iteration(self, iteration: int, loss: float, samples_per_second: float) -> None:
        write_scalar("loss", loss, step=iteration)
        write_scalar("learning_rate", float(_current_learning_rate(self.optimizer)), step=iteration)
        if samples_per_second:
            write_scalar("samples_per_second", samples_per_second, step=iteration)

    def _ends_epoch(self, iteration: int) -> bool:
        """True when this iteration's batch holds the last record of an epoch (batches span epochs)."""
        batch, records = self.config.batch_size, self.plan.epoch_records
        return (iteration * batch) // records > ((iteration - 1) * batch) // records

    def _validated_at(self, iteration: int) -> bool:
        return any(entry["iteration"] == iteration for entry in self.validations)

    def _save(self, iteration: int, console: Console, kind: str = checkpoints.KIND_ITERATION) -> Path | None:
        if self.saved_at == iteration and kind == checkpoints.KIND_ITERATION:
            return self.last_checkpoint
        if not self.chief:
            self.saved_at = iteration
            return None
        directory = checkpoints.models_dir(self.config.out_dir)
        base = (
            checkpoints.checkpoint_base(directory, iteration)
            if kind == checkpoints.KIND_ITERATION
            else directory / checkpoints.BEST_NAME
        )
        checkpoints.save_checkpoint(
            base,
            self.model,
            model_name=self.config.model_name,
            label_type=self.config.label_type,
            modality=self.config.modality,
            iteration=iteration,
            # The best checkpoint is for using the model, not for resuming: no optimizer state.
            optimizer=self.optimizer if kind == checkpoints.KIND_ITERATION else None,
            data_position=checkpoints.DataPosition(
                iteration, self.config.batch_size, self.plan.epoch_records
            ),
            config=self.config.to_dict(),
            validation=self.validations[-1] if self.validations and kind == checkpoints.KIND_BEST else None,
            kind=kind,
            training=self.progress_state.to_dict(),
        )
        tf.summary.flush()
        if kind == checkpoints.KIND_ITERATION:
            self.saved_at = iteration
            self.last_checkpoint = base
            console.print(f"checkpoint {base}")
        return base

    def _validate(self, iteration: int, validation: tf.data.Dataset, console: Console) -> bool:
        """Validate on the whole validation set; keep the best checkpoint; True to stop early."""
        metrics = validation_metrics(self.model, validation, self.config)
        self.validations.append({"iteration": iteration, **metrics})
        for key in LOGGED_VALIDATION_METRICS:
            write_scalar(f"validation/{key}", metrics[key], step=iteration)
        value = metrics[SELECTION_METRIC]
        state = self.progress_state
        improved = state.best_value is None or value > state.best_value
        console.print(
            f"validation at iteration {iteration}: macro AP {value:.4f}, micro AP "
            f"{metrics['micro_average_precision']:.4f}, micro F1 {metrics['micro_f1_score']:.4f}, "
            f"loss {metrics['loss']:.4f}" + (" (best so far)" if improved else "")
        )
        if improved:
            state.best_value, state.best_iteration, state.validations_since_best = value, iteration, 0
            self._save(iteration, console, kind=checkpoints.KIND_BEST)
        else:
            state.validations_since_best += 1
        patience = self.config.early_stopping_patience
        return patience is not None and state.validations_since_best >= patience

    def _interrupt(self, iteration: int, console: Console) -> None:
        received = self.stop.received
        base = self._save(iteration, console)
        tf.summary.flush()
        where = f"checkpoint {base} written" if base is not None else "the chief writes the checkpoint"
        raise TrainingInterrupted(
            f"training stopped by {received.name} after iteration {iteration}; {where}; run the same "
            'command with "resume": "auto" (or fine_tune from that checkpoint) to continue',
            int(received),
        )

    def _finish(self, iteration: int, stopped_early: bool) -> TrainingResult:
        final = self._save(iteration, self.console)
        directory = checkpoints.models_dir(self.config.out_dir)
        best = directory / checkpoints.BEST_NAME
        has_best = self.chief and checkpoints.checkpoint_files(best)["metadata"].exists()
        return TrainingResult(
            iterations=iteration,
            final_checkpoint=final,
            best_checkpoint=best if has_best else None,
            best_macro_average_precision=self.progress_state.best_value,
            stopped_early=stopped_early,
            validations=tuple(self.validations),
        )

    # --- resources -------------------------------------------------------------------------------

    def _validation_data(self) -> tf.data.Dataset | None:
        files = self.config.val_tf_record_files
        if not files:
            return None
        dataset = make_dataset(
            list(files),
            self.config.label_type,
            self.config.batch_size,
            modality=self.config.modality,
            skip_corrupt=self.config.skip_corrupt_records,
        )
        return dataset if self.config.max_batches is None else dataset.take(self.config.max_batches)

    def _summary_writer(self):
        if not self.chief:
            return tf.summary.create_noop_writer()
        return tf.summary.create_file_writer(str(Path(self.config.out_dir).joinpath(*LOGS_SUBDIR)))

    @contextlib.contextmanager
    def _progress_bar(self, iterations_done: int):
        progress = progress_bar(
            self.console,
            label="iteration {task.completed:>6.0f}/{task.total:.0f}",
            columns=[
                TextColumn("{task.fields[loss]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
            ],
            disable=not self.chief,
        )
        # Nothing is shown for the loss and the speed until there is a value to show.
        task = progress.add_task(
            "training", total=self.plan.total_iterations, completed=iterations_done, loss="", rate=""
        )
        with progress:
            yield progress, task


def validation_metrics(model: keras.Model, dataset: tf.data.Dataset, config: Config) -> dict[str, float]:
    """All metrics of `compute_metrics` over the whole validation set, plus its mean `loss`."""
    predictions = collect_predictions(model, dataset)
    probabilities = sigmoid(predictions.logits)
    metrics = compute_metrics(
        predictions.labels,
        probabilities,
        threshold=config.threshold,
        class_names=label_names(config.label_type),
    )
    metrics["loss"] = sigmoid_cross_entropy(predictions.labels, predictions.logits)
    return metrics


def write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar through the core `tf.summary.write` (the TensorBoard package is optional)."""
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=_SCALAR_METADATA)


class _Throughput:
    """Samples per second over the recent steps (an exponential moving average of step times).

    The first step is left out: it includes tracing the step function and filling the input buffers.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.last = time.perf_counter()
        self.steps = 0
        self.seconds_per_step: float | None = None

    def update(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        self.steps += 1
        if self.steps == 1:
            return 0.0
        if self.seconds_per_step is None:
            self.seconds_per_step = elapsed
        else:
            weight = SAMPLES_PER_SECOND_SMOOTHING
            self.seconds_per_step = (1 - weight) * self.seconds_per_step + weight * elapsed
        return self.batch_size / self.seconds_per_step if self.seconds_per_step > 0 else 0.0


def _current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(np.asarray(inner.learning_rate))
