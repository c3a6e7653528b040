"""`bigearthnet demo`: the whole workflow on embedded data, in a few minutes on a laptop CPU.

It writes a seeded synthetic v1 archive in the real layout, adds the six real example patches of
`bigearthnet-common` to its training split, prepares TFRecords, trains a small ResNet and evaluates it
on the synthetic test split, through the same library functions as `prepare`, `train.py` and
`eval.py`. Everything lands in one new folder, with the config files so each step can be re-run by
hand.

An interrupted demo continues: `demo.json` in the folder records its settings and the stages done,
so running the demo again with the same `--out` skips the finished stages, redoes a stage cut short
(preparation and training resume from what they had written), and refuses a folder that holds
something other than a demo, or a demo made with other settings.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.constants import BIGEARTHNET_19
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.evaluate import evaluate
from bigearthnet_tf.files import write_text_atomically
from bigearthnet_tf.jsonfiles import read_json_object
from bigearthnet_tf.prepare import prepare
from bigearthnet_tf.synth import add_example_patches, write_synthetic_archive
from bigearthnet_tf.train import train

# Sized so that the demo learns (micro F1 0.94 on the synthetic test split, measured) within about
# three and a half minutes on two busy CPU cores.
DEMO_PATCHES = 900
DEMO_SEED = 0
DEMO_MODEL = "ResNet-Tiny"
DEMO_EPOCHS = 12
DEMO_BATCH_SIZE = 32
DEMO_LEARNING_RATE = 3e-3


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put things, and the headline metrics."""

    out: Path
    archive: Path
    records: Path
    run: Path
    config: Path
    metrics: dict
    evaluation: Path  # the evaluation's results folder (eval_result.json, predictions.csv, the chart)


def default_demo_folder(parent: Path | None = None) -> Path:
    """A new folder name under `parent` (default: the working directory) that does not exist yet."""
    parent = Path.cwd() if parent is None else parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = parent / f"bigearthnet-demo-{stamp}"
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = parent / f"bigearthnet-demo-{stamp}-{suffix}"
    return candidate


def demo_config(out: Path, records: Path, *, model_name: str, nb_epoch: int, batch_size: int) -> dict:
    """The 2019-style training/evaluation config the demo writes and runs."""
    run = out / "run"
    return {
        "model_name": model_name,
        "label_type": BIGEARTHNET_19,
        "modality": "S2",
        "batch_size": batch_size,
        "nb_epoch": nb_epoch,
        "learning_rate": DEMO_LEARNING_RATE,
        "out_dir": str(run),
        "save_checkpoint_after_iteration": 0,
        "save_checkpoint_per_iteration": 100,
        "tr_tf_record_files": [str(records / "train-*.tfrecord")],
        "val_tf_record_files": [str(records / "val-*.tfrecord")],
        "test_tf_record_files": [str(records / "test-*.tfrecord")],
        "fine_tune": False,
        "shuffle_buffer_size": 2000,
        "seed": 42,
        "resume": "auto",  # running the demo again continues an interrupted training
    }


STATE_FILE = "demo.json"


def _start_or_continue(out: Path, settings: dict, console) -> dict:
    """The demo's state in `out`: new for an empty or absent folder; read back to continue one."""

    state_file = out / STATE_FILE
    if out.exists() and any(out.iterdir()):
        if not state_file.is_file():
            raise UserError(f"demo folder {out} already exists and is not empty; name a new one with --out")
        state = read_json_object(state_file, "demo state file")
        if state.get("settings") != settings or not isinstance(state.get("done"), list):
            raise UserError(
                f"demo folder {out} holds a demo made with other settings ({state_file}); name a new one "
                "with --out"
            )
        console.print(f"continuing the demo in {out} (done: {', '.join(state['done']) or 'nothing yet'})")
        return state
    out.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "done": []}
    write_text_atomically(state_file, json.dumps(state, indent=2) + "\n")
    return state


def _done(out: Path, state: dict, stage: str) -> None:
    if stage not in state["done"]:
        state["done"].append(stage)
        write_text_atomically(out / STATE_FILE, json.dumps(state, indent=2) + "\n")


def run_demo(
    out: Path | None = None,
    *,
    patches: int = DEMO_PATCHES,
    seed: int = DEMO_SEED,
    model_name: str = DEMO_MODEL,
    nb_epoch: int = DEMO_EPOCHS,
    batch_size: int = DEMO_BATCH_SIZE,
) -> DemoResult:
    """Synthesise, prepare, train and evaluate; print where everything went and the metrics."""
    from bigearthnet_tf.console import plain_console

    console = plain_console(stderr=True)
    out = default_demo_folder() if out is None else Path(out)
    settings = {
        "patches": patches,
        "seed": seed,
        "model_name": model_name,
        "nb_epoch": nb_epoch,
        "batch_size": batch_size,
    }
    state = _start_or_continue(out, settings, console)
    started = time.perf_counter()

    console.rule(f"1/4 synthetic archive ({patches} patches) + 6 real example patches")
    archive = out / "archive"
    if "archive" not in state["done"]:
        shutil.rmtree(archive, ignore_errors=True)  # a cut-short archive is rewritten: it is seeded
        archive = write_synthetic_archive(archive, patches=patches, seed=seed, version=1)
        added = add_example_patches(archive)
        console.print(f"archive: {archive} (real patches added to the training split: {len(added)})")
        _done(out, state, "archive")
    else:
        console.print(f"archive: {archive} (done before)")

    console.rule("2/4 prepare TFRecords")
    records = out / "records"
    if "records" not in state["done"]:
        prepare(
            root=archive,
            out=records,
            split_files=[archive / "train.csv", archive / "val.csv", archive / "test.csv"],
        )
        _done(out, state, "records")
    else:
        console.print(f"records: {records} (done before)")

    console.rule(f"3/4 train {model_name}")
    raw = demo_config(out, records, model_name=model_name, nb_epoch=nb_epoch, batch_size=batch_size)
    config_path = out / "config.json"
    config_path.write_text(json.dumps(raw, indent=2) + "\n")
    config = config_from_dict(raw, purpose="train", source=config_path)
    trained = train(config)  # "resume": "auto": a cut-short training continues from its checkpoint
    _done(out, state, "train")

    console.rule("4/4 evaluate on the synthetic test split")
    # The best validation checkpoint, as a paper would report; the final one when there is none.
    chosen = trained.best_checkpoint or trained.final_checkpoint
    raw_eval = {**raw, "model_file": str(chosen)}
    eval_config_path = out / "eval_config.json"
    eval_config_path.write_text(json.dumps(raw_eval, indent=2) + "\n")
    evaluation = evaluate(
        config_from_dict(raw_eval, purpose="evaluate", source=eval_config_path), overwrite=True
    )
    _done(out, state, "evaluate")
    metrics = evaluation.metrics

    run = Path(config.out_dir)
    console.rule(f"done in {time.perf_counter() - started:.0f} s")
    for label, path in (
        ("synthetic archive", archive),
        ("TFRecords", records),
        ("checkpoints", run / "models"),
        ("TensorBoard logs", run / "logs"),
        ("evaluated checkpoint", chosen),
        ("metrics", evaluation.eval_result),
        ("predictions", evaluation.predictions),
        ("per-class chart", evaluation.chart),
        ("configs (re-run with train.py / eval.py)", config_path),
    ):
        # Plain print: paths are never wrapped, whatever the terminal's width.
        print(f"  {label + ':':<44}{path}", file=sys.stderr)
    console.print(
        f"  micro F1 {metrics['micro_f1_score']:.3f} · macro AP {metrics['macro_average_precision']:.3f}"
        f" · micro AP {metrics['micro_average_precision']:.3f}"
    )
    return DemoResult(out, archive, records, run, config_path, metrics, evaluation.eval_result.parent)
