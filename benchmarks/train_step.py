"""Images per second of the trainer's training step on the CPU: fed by the input pipeline, and from memory.

    python benchmarks/train_step.py [--models K-BranchCNN ResNet50 ...] [--batch-size 16] [--steps N]
                                    [--mixed-precision] [--jit-compile] [--effects]

Writes ``--records`` synthetic patches (band values drawn around the archive's per-band mean and std,
realistic 43- and 19-class labels) in the default format, sharded, into a temporary folder, encoded
with ``bigearthnet_tf.record_formats.DEFAULT.encode`` as ``bigearthnet prepare`` encodes them. Then, for
each model at its 2019 input (raw bands at native resolution, 120/60/20 px; the model selects, upsamples and
standardises in its first layers), it sets training up with the trainer's own functions
(``bigearthnet_tf.train``: ``make_strategy``, ``precision_policy``, ``build_model_and_optimizer``,
``training_batches``, ``make_train_step``) from a config holding the 2019 hyper-parameters, so the step
timed is the one ``train.py`` runs (sigmoid cross-entropy, Adam, ``tf.distribute`` default strategy,
``float(loss)`` after every step as the training loop does), and the batches come from the trainer's
pipeline (``training_batches``: ``make_dataset`` as ``train`` calls it). It times:

- (a) fed by the pipeline: ``--steps`` steps, each on the next batch of the pipeline (decoding runs in
  ``tf.data`` threads beside the step, on the same cores, as in training);
- (b) in memory: ``--steps`` steps on one batch already in memory as tensors (the same batch again);
- the pipeline alone: 64 batches taken from it without training, for its CPU time per image.

``shuffle_buffer_size`` is 256 by default (``--shuffle-buffer``), less than the 1,024 records of an epoch,
so that the pipeline runs in the steady state of real training: there the buffer (130,000 asked, capped at
~6,500 records by the 1 GiB budget) is far smaller than an epoch of 269,695 records, and every batch reads
``batch_size`` new records into it. A buffer holding the whole benchmark epoch would read all of it while
the first batch waits and hide the read cost. Refilling the buffer at each epoch start (every 64 steps
here, every ~17,000 in real training) is counted, so the figure errs on the high side.

The first step (tracing, XLA compilation) runs on the first batch, which also waited for the shuffle
buffer to fill; then ``--warmup`` - 1 untimed pipeline steps. ``--rounds`` (default 2) repeats the (a)
and (b) blocks in ABBA order (a drift in step time hits both alike) and pools them; (b) blocks start
with one untimed step. Printed per model: images/s of (a) and (b) (batch / median step time, which a
neighbour's burst on a shared machine moves less than the mean) and the pipeline cost 1 - (a)/(b) (target
< 10%); the process's CPU time per image (all threads) in (a), in (b) and for the pipeline alone, and the
CPU cost: pipeline CPU / (pipeline CPU + step CPU), the share of busy cores that decoding takes from the
step. On a shared machine wall time follows the neighbours' load; CPU time much less so.

``--effects`` instead times the in-memory step of each model under four settings, float32, mixed precision
(``mixed_bfloat16`` on the CPU, as the ``mixed_precision`` config key selects), XLA (``jit_compile``) and
both, and prints images/s relative to float32, CPU time per image and the first step (trace + compile).
``--mixed-precision`` / ``--jit-compile`` apply those options to the pipeline comparison.

VGG16/19 and ResNet152 take 4-20 s a step at batch 16 on 2 shared cores: the default run of all six
models takes ~6 minutes at a load average of 2, more on a busier machine; pick with ``--models``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

try:
    import bigearthnet_tf  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from rich.console import Console  # noqa: E402

from bigearthnet_tf import constants  # noqa: E402
from bigearthnet_tf.archive import Patch  # noqa: E402
from bigearthnet_tf.config import TRAIN, Config, config_from_dict  # noqa: E402
from bigearthnet_tf.record_formats import DEFAULT, LEGACY  # noqa: E402
from bigearthnet_tf.records import RecordWriter  # noqa: E402
from bigearthnet_tf.train import (  # noqa: E402
    StartingPoint,
    build_model_and_optimizer,
    make_strategy,
    make_train_step,
    plan_training,
    precision_policy,
    seed_everything,
    training_batches,
)

MODELS_2019 = ("K-BranchCNN", "VGG16", "VGG19", "ResNet50", "ResNet101", "ResNet152")
LABEL_TYPE = constants.BIGEARTHNET_19
LEARNING_RATE = 0.001  # the 2019 configs
MAX_VALUE = 20_000  # a little above the brightest reflectances in the archive
# Timed steps per mode and round by default: fewer for the slowest models.
DEFAULT_STEPS = {"VGG16": 2, "VGG19": 2, "ResNet152": 2}  # 4-20 s a step on 2 shared cores
DEFAULT_STEPS_OTHERS = 3
PIPELINE_COST_TARGET = 0.10
EFFECT_SETTINGS = (  # (label, mixed_precision, jit_compile)
    ("float32", False, False),
    ("bfloat16", True, False),
    ("XLA", False, True),
    ("bfloat16+XLA", True, True),
)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def synthetic_patch(rng: np.random.Generator, name: str) -> Patch:
    """A patch with bands around the archive's per-band mean and std and 1-4 random 43-class labels."""
    bands = {
        band.name: rng.normal(band.mean, band.std, size=(band.size, band.size))
        .clip(0, MAX_VALUE)
        .astype(np.uint16)
        for band in constants.S2_BANDS
    }
    picks = rng.choice(len(constants.ORIGINAL_LABELS), size=rng.integers(1, 5), replace=False)
    labels_43 = tuple(constants.ORIGINAL_LABELS[i] for i in sorted(picks))
    return Patch(name, bands, labels_43, constants.original_to_19(labels_43))


@dataclass(frozen=True)
class RecordSet:
    files: list[str]
    records: int
    default_record_bytes: float  # mean serialized size, default format
    legacy_record_bytes: float  # mean serialized size of the same patches in the 2019 schema


def write_records(folder: Path, records: int, shards: int, distinct: int = 256, seed: int = 0) -> RecordSet:
    """``records`` default-format records (``distinct`` different band sets, each record its own name)."""
    rng = np.random.default_rng(seed)
    patches = [
        synthetic_patch(rng, f"S2A_MSIL2A_20170613T101031_{i}_0") for i in range(min(distinct, records))
    ]
    files = [str(folder / f"train-{i:05d}-of-{shards:05d}.tfrecord") for i in range(shards)]
    writers = [RecordWriter(path) for path in files]
    total = 0
    try:
        for i in range(records):
            source = patches[i % len(patches)]
            patch = dataclasses.replace(source, name=f"S2A_MSIL2A_20170613T101031_{i}_{i // len(patches)}")
            record = DEFAULT.encode(patch)
            total += len(record)
            writers[i % shards].write(record)
    finally:
        for writer in writers:
            writer.close()
    legacy = sum(len(LEGACY.encode(patch)) for patch in patches) / len(patches)
    return RecordSet(files, records, total / records, legacy)


# --------------------------------------------------------------------------------------------------
# The trainer's step
# --------------------------------------------------------------------------------------------------


def training_config(
    model_name: str,
    files: list[str],
    batch_size: int,
    nb_epoch: int,
    out_dir: Path,
    *,
    mixed_precision: bool = False,
    jit_compile: bool = False,
    shuffle_buffer_size: int | None = None,
) -> Config:
    """A train config as a user writes it (2019 hyper-parameters), checked by the config loader."""
    raw = {
        "model_name": model_name,
        "label_type": LABEL_TYPE,
        "batch_size": batch_size,
        "nb_epoch": nb_epoch,
        "learning_rate": LEARNING_RATE,
        "out_dir": str(out_dir),
        "tr_tf_record_files": files,
        "mixed_precision": mixed_precision,
        "jit_compile": jit_compile,
    }
    if shuffle_buffer_size is not None:
        raw["shuffle_buffer_size"] = shuffle_buffer_size
    return config_from_dict(raw, TRAIN)


@dataclass
class Timing:
    """Steps timed in one mode, pooled over rounds."""

    batch_size: int
    step_seconds: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # process CPU time, all threads

    @property
    def images_per_second(self) -> float:
        """From the median step: a neighbour's burst on a shared machine moves it less than the mean."""
        return self.batch_size / statistics.median(self.step_seconds)

    @property
    def cpu_ms_per_image(self) -> float:
        return self.cpu_s / (len(self.step_seconds) * self.batch_size) * 1e3

    def add(self, run, batches, steps: int) -> None:
        cpu = time.process_time()
        for _ in range(steps):
            started = time.perf_counter()
            run(next(batches))
            self.step_seconds.append(time.perf_counter() - started)
        self.cpu_s += time.process_time() - cpu


@dataclass(frozen=True)
class ModelResult:
    model: str
    first_step_s: float  # trace (+ XLA compile) + the first step
    memory: Timing  # (b) the step on a batch in memory
    pipeline: Timing | None  # (a) the step fed by the pipeline
    pipeline_alone: Timing | None  # the pipeline iterated without training

    @property
    def cost(self) -> float:
        """1 - (a)/(b), in images/s of wall time."""
        return 1 - self.pipeline.images_per_second / self.memory.images_per_second

    @property
    def cpu_cost(self) -> float:
        """The share of the CPU that decoding takes beside the step: what it costs on busy cores."""
        alone = self.pipeline_alone.cpu_ms_per_image
        return alone / (alone + self.memory.cpu_ms_per_image)


def measure_model(
    model_name: str,
    records: RecordSet,
    batch_size: int,
    warmup: int,
    steps: int,
    *,
    mixed_precision: bool = False,
    jit_compile: bool = False,
    with_pipeline: bool = True,
    rounds: int = 1,
    shuffle_buffer_size: int = 256,
    pipeline_batches: int = 64,
) -> ModelResult:
    """Set training up as `train()` does and time its step fed by the pipeline and from memory."""
    batches_used = 1 + warmup + rounds * steps + (pipeline_batches if with_pipeline else 0) + 4
    nb_epoch = math.ceil(batches_used * batch_size / records.records) + 1
    with tempfile.TemporaryDirectory(prefix="ben-step-") as out_dir:
        config = training_config(
            model_name,
            records.files,
            batch_size,
            nb_epoch,
            Path(out_dir),
            mixed_precision=mixed_precision,
            jit_compile=jit_compile,
            shuffle_buffer_size=shuffle_buffer_size,
        )
        strategy = make_strategy(config.distribution)
        seed_everything(config.seed)
        plan = plan_training(config, strategy, Console(quiet=True))
        start = StartingPoint(None, 0, False, "from scratch")
        with precision_policy(config.mixed_precision) as policy:
            model, optimizer, _ = build_model_and_optimizer(config, start, plan, strategy, policy)
            step = make_train_step(model, optimizer, strategy, config)
            iteration = 0

            def run_step(batch) -> None:
                nonlocal iteration
                iteration += 1
                loss, _ = step(batch, tf.constant(iteration, tf.int64))
                float(loss)  # the training loop reads the loss after every step

            # The first batch also waits for the shuffle buffer to fill; it becomes the in-memory batch.
            pipeline = iter(training_batches(config, strategy, plan, 0))
            in_memory = next(pipeline)
            memory = itertools.repeat(in_memory)
            started = time.perf_counter()
            run_step(in_memory)
            first_step = time.perf_counter() - started
            for _ in range(warmup - 1):
                run_step(next(pipeline) if with_pipeline else in_memory)
            fed, alone, from_memory = Timing(batch_size), Timing(batch_size), Timing(batch_size)
            for round_ in range(rounds):
                # (a)(b), then (b)(a), ...: a drift in step time over the run hits both modes alike.
                for mode in ("ab" if round_ % 2 == 0 else "ba") if with_pipeline else "b":
                    if mode == "a":
                        fed.add(run_step, pipeline, steps)
                    else:
                        run_step(in_memory)  # untimed: lets the pipeline's prefetch buffer refill
                        from_memory.add(run_step, memory, steps)
            if with_pipeline:
                alone.add(lambda batch: None, pipeline, pipeline_batches)
    keras.backend.clear_session()
    gc.collect()
    return ModelResult(
        model_name,
        first_step,
        from_memory,
        fed if with_pipeline else None,
        alone if with_pipeline else None,
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _steps_for(model: str, steps: int | None) -> int:
    return steps if steps is not None else DEFAULT_STEPS.get(model, DEFAULT_STEPS_OTHERS)


def run_pipeline_comparison(args, records: RecordSet) -> None:
    options = [
        name for name, on in (("mixed_bfloat16", args.mixed_precision), ("XLA", args.jit_compile)) if on
    ]
    print(f"(a) fed by the pipeline vs (b) in memory; options: {', '.join(options) or 'float32, no XLA'}")
    print(
        f"  {'model':12s} {'steps':>5s} {'1st step':>8s} {'(a) img/s':>9s} {'(b) img/s':>9s} "
        f"{'cost':>6s} | {'CPU ms/img (a)':>14s} {'(b)':>6s} {'pipeline':>8s} {'CPU cost':>8s} | load",
        flush=True,
    )
    results = []
    for model in args.models:
        steps = _steps_for(model, args.steps)
        result = measure_model(
            model,
            records,
            args.batch_size,
            args.warmup,
            steps,
            mixed_precision=args.mixed_precision,
            jit_compile=args.jit_compile,
            rounds=args.rounds,
            shuffle_buffer_size=args.shuffle_buffer,
        )
        results.append(result)
        print(
            f"  {model:12s} {steps * args.rounds:5d} {result.first_step_s:7.1f}s "
            f"{result.pipeline.images_per_second:9.2f} {result.memory.images_per_second:9.2f} "
            f"{result.cost:6.1%} | {result.pipeline.cpu_ms_per_image:14.1f} "
            f"{result.memory.cpu_ms_per_image:6.1f} {result.pipeline_alone.cpu_ms_per_image:8.2f} "
            f"{result.cpu_cost:8.2%} | {os.getloadavg()[0]:4.1f}",
            flush=True,
        )
    worst_wall = max(results, key=lambda r: r.cost)
    worst_cpu = max(results, key=lambda r: r.cpu_cost)
    target = PIPELINE_COST_TARGET
    print(
        f"pipeline cost, wall: 1 - (a)/(b), highest {worst_wall.cost:.1%} ({worst_wall.model}): "
        f"{'meets' if worst_wall.cost < target else 'misses'} the < {target:.0%} target"
    )
    print(
        f"pipeline cost, CPU: decoding CPU / (decoding + step CPU), highest {worst_cpu.cpu_cost:.2%} "
        f"({worst_cpu.model}): {'meets' if worst_cpu.cpu_cost < target else 'misses'} the < {target:.0%} "
        "target (the figure to trust on a shared machine, where wall time follows the neighbours)"
    )


def run_effects(args, records: RecordSet) -> None:
    print("mixed precision (mixed_bfloat16 on the CPU) and XLA (jit_compile): the step in memory")
    print(
        f"  {'model':12s} {'setting':13s} {'img/s':>7s} {'x float32':>9s} {'CPU ms/img':>10s} "
        f"{'1st step':>8s}"
    )
    for model in args.models:
        steps = _steps_for(model, args.steps)
        base = None
        for label, mixed, jit in EFFECT_SETTINGS:
            result = measure_model(
                model,
                records,
                args.batch_size,
                args.warmup,
                steps,
                mixed_precision=mixed,
                jit_compile=jit,
                with_pipeline=False,
                rounds=args.rounds,
            )
            rate = result.memory.images_per_second
            base = base or rate
            print(
                f"  {model:12s} {label:13s} {rate:7.2f} {rate / base:8.2f}x "
                f"{result.memory.cpu_ms_per_image:10.1f} {result.first_step_s:7.1f}s  "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS_2019), metavar="NAME")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per mode and round (default {DEFAULT_STEPS_OTHERS}; VGG16/19, ResNet152: 2)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of (a) and (b) blocks, in ABBA order, pooled (default 2)",
    )
    parser.add_argument("--mixed-precision", action="store_true", help="mixed_bfloat16 on the CPU")
    parser.add_argument("--jit-compile", action="store_true", help="XLA-compile the step")
    parser.add_argument(
        "--effects", action="store_true", help="time float32 / bfloat16 / XLA / both, in memory"
    )
    parser.add_argument("--records", type=int, default=1024, help="default-format records written")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument(
        "--shuffle-buffer", type=int, default=256, help="shuffle_buffer_size (default 256, below --records)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step traces the function)")

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ben-step-records-") as folder:
        started = time.perf_counter()
        records = write_records(Path(folder), args.records, args.shards)
        print(
            f"wrote {records.records:,} default-format records ({records.default_record_bytes / 1e3:.0f} kB "
            f"each) in {args.shards} files in {time.perf_counter() - started:.1f} s"
        )
        print(
            f"CPU cores: {len(os.sched_getaffinity(0))}, TensorFlow {tf.__version__}, Keras "
            f"{keras.__version__}, batch {args.batch_size}, {args.warmup} warm-up step(s), "
            f"{args.rounds} round(s), shuffle_buffer_size {args.shuffle_buffer}; load average {load:.2f}",
            flush=True,
        )
        if args.effects:
            run_effects(args, records)
        else:
            run_pipeline_comparison(args, records)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
