"""`--test-run N`: a few batches of training and evaluation, to check a config before a long run.

Like Lightning's `fast_dev_run`: the config is used as given (model, data, every key) except that
`out_dir` is a new temporary folder, training stops after N iterations, validation and evaluation read
at most N batches, and nothing is kept. It reports that every stage worked and how long an iteration
took once the step function was traced, so the length of the real run can be estimated.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bigearthnet_tf.config import EVALUATE, Config, config_from_dict
from bigearthnet_tf.console import plain_console
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.evaluate import evaluate
from bigearthnet_tf.train import train


def test_run(config: Config, batches: int, *, console: Console | None = None) -> dict[str, float]:
    """Train (purpose train) and evaluate on `batches` batches in a temporary folder; return timings."""
    if batches < 1:
        raise UserError(f"--test-run needs a number of batches >= 1, got {batches}")
    console = console or plain_console()
    work = Path(tempfile.mkdtemp(prefix="bigearthnet-test-run-"))
    timings: dict[str, float] = {}
    try:
        trial = dataclasses.replace(config, out_dir=work / "run", max_batches=batches, resume="never")
        if config.purpose == EVALUATE:
            evaluation = trial
        else:
            iteration_ends: list[float] = []
            started = time.perf_counter()
            result = train(trial, on_iteration=lambda *_: iteration_ends.append(time.perf_counter()))
            timings["train_seconds"] = time.perf_counter() - started
            if len(iteration_ends) > 1:  # the first iteration includes tracing the step function
                timings["seconds_per_iteration"] = (iteration_ends[-1] - iteration_ends[0]) / (
                    len(iteration_ends) - 1
                )
            if not config.test_tf_record_files:
                return _report(console, config, batches, timings, work)
            model_file = result.best_checkpoint or result.final_checkpoint
            # Loaded again for evaluation, so the test files are resolved and checked as eval.py would.
            raw = {**config.to_dict(), "model_file": str(model_file), "out_dir": str(work / "run")}
            evaluation = dataclasses.replace(
                config_from_dict(raw, EVALUATE, source=config.source), max_batches=batches
            )

        started = time.perf_counter()
        evaluate(evaluation, console=console)
        timings["evaluate_seconds"] = time.perf_counter() - started
        return _report(console, config, batches, timings, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(console: Console, config: Config, batches: int, timings: dict[str, float], work: Path) -> dict:
    parts = [f"test run OK ({batches} batch{'es' if batches > 1 else ''} of {config.batch_size})"]
    if "seconds_per_iteration" in timings:
        parts.append(f"{timings['seconds_per_iteration']:.2f} s per training iteration after the first")
    if "train_seconds" in timings:
        parts.append(f"training {timings['train_seconds']:.1f} s")
    if "evaluate_seconds" in timings:
        parts.append(f"evaluation {timings['evaluate_seconds']:.1f} s")
    console.print("; ".join(parts) + f"; nothing kept ({work} removed)", markup=False)
    return timings
