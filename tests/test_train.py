"""Training: checkpoint naming, exact resume after SIGTERM or SIGKILL, fine_tune, NaN stop, options,
mirrored replicas, and 2019-style configs through train.py / eval.py (BigEarthNet-19) and the CLI (original).

Tiny model (K-BranchCNN-Tiny), 40 training patches in two files, batch 8: 5 iterations per epoch.
Resume tolerance: the resumed run must reproduce the uninterrupted run's weights to atol 1e-6 (on the
CPU they come out bit-identical; the tolerance only leaves room for float reassociation).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_patches, write_records

from bigearthnet_tf import checkpoints
from bigearthnet_tf.cli import main
from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.evaluate import evaluate
from bigearthnet_tf.train import TrainingDiverged, TrainingInterrupted, train

REPOSITORY = Path(__file__).resolve().parents[1]
MODEL = "K-BranchCNN-Tiny"
BATCH = 8
TRAIN_PATCHES = 40  # two files of 20
ITERATIONS = 10  # 40 x 2 epochs / 8
RESUME_ATOL = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("records")
    write_records(folder / "train-00000-of-00002.tfrecord", make_patches(20, 1))
    write_records(folder / "train-00001-of-00002.tfrecord", make_patches(20, 2))
    write_records(folder / "val-00000-of-00001.tfrecord", make_patches(16, 3))
    write_records(folder / "test-00000-of-00001.tfrecord", make_patches(12, 4))
    return folder


def config_values(data: Path, out_dir: Path, **changes) -> dict:
    """A 2019-style config (every 2019 key) for the test records."""
    values = {
        "model_name": MODEL,
        "label_type": "BigEarthNet-19",
        "batch_size": BATCH,
        "nb_epoch": 2,
        "learning_rate": 1e-3,
        "out_dir": str(out_dir),
        "save_checkpoint_after_iteration": 4,
        "save_checkpoint_per_iteration": 3,
        "tr_tf_record_files": [str(data / "train-*.tfrecord")],
        "val_tf_record_files": [str(data / "val-00000-of-00001.tfrecord")],
        "test_tf_record_files": [str(data / "test-00000-of-00001.tfrecord")],
        "fine_tune": False,
        "model_file": str(out_dir / "models" / f"iteration-{ITERATIONS}"),
        "shuffle_buffer_size": 100,
        "training_size": TRAIN_PATCHES,
        "test_size": 12,
    }
    values.update(changes)
    return {key: value for key, value in values.items() if value is not ...}


@pytest.fixture
def plain_model(monkeypatch) -> str:
    """A tiny model without batch norm or dropout, registered only for the test that asks for it."""
    import keras

    from bigearthnet_tf.models import register_model, registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))  # removed again afterwards

    @register_model("Plain-Test")
    def plain(num_classes, modality="S2", statistics=None):
        return keras.Sequential(
            [
                keras.layers.Conv2D(4, 5, strides=4, activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(num_classes),
            ]
        )

    return "Plain-Test"


def make_config(data: Path, out_dir: Path, **changes):
    return config_from_dict(config_values(data, out_dir, **changes), "train")


def final_weights(out_dir: Path, iteration: int = ITERATIONS) -> list[np.ndarray]:
    model, _, _ = checkpoints.load_checkpoint(out_dir / "models" / f"iteration-{iteration}")
    return [variable.numpy() for variable in model.weights]


def assert_same_weights(first: list[np.ndarray], second: list[np.ndarray]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=RESUME_ATOL)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """One uninterrupted run: the reference for the resume tests."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    losses: dict[int, float] = {}
    result = train(make_config(data, out_dir), on_iteration=lambda n, loss: losses.__setitem__(n, loss))
    return out_dir, result, losses


# --- what a run writes ---------------------------------------------------------------------------


def test_checkpoints_at_the_2019_iterations_plus_the_last(uninterrupted):
    out_dir, result, losses = uninterrupted
    # every 3 from 4 on: 6 and 9; plus the final 10.
    assert [n for n, _ in checkpoints.list_checkpoints(out_dir / "models")] == [6, 9, 10]
    assert result.iterations == ITERATIONS and sorted(losses) == list(range(1, ITERATIONS + 1))
    assert result.final_checkpoint == out_dir / "models" / "iteration-10"
    meta = checkpoints.read_metadata(result.final_checkpoint)
    assert meta["data_position"] == {
        "batches_consumed": 10,
        "epoch": 2,
        "batch_in_epoch": 0,
        "epoch_records": 40,
        "batch_size": 8,
    }
    assert meta["config"]["model_name"] == MODEL and meta["optimizer"]["class"] == "Adam"
    # Validation after each epoch (iterations 5 and 10), the best kept by macro AP.
    assert [entry["iteration"] for entry in result.validations] == [5, 10]
    best = checkpoints.read_metadata(out_dir / "models" / "best")
    assert (
        best["kind"] == "best"
        and best["iteration"]
        == result.validations[np.argmax([entry["macro_average_precision"] for entry in result.validations])][
            "iteration"
        ]
    )
    assert best["validation"]["macro_average_precision"] == pytest.approx(result.best_macro_average_precision)
    assert json.loads((out_dir / "config.json").read_text())["batch_size"] == BATCH
    assert list((out_dir / "logs" / "training").glob("events.out.tfevents.*"))


def test_tensorboard_scalars(uninterrupted):
    import tensorflow as tf

    out_dir, _, losses = uninterrupted
    tags: dict[str, list[int]] = {}
    for path in (out_dir / "logs" / "training").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
                if value.tag == "loss":
                    assert tf.make_ndarray(value.tensor) == pytest.approx(losses[event.step])
    assert tags["loss"] == list(range(1, ITERATIONS + 1))
    assert len(tags["learning_rate"]) == ITERATIONS
    assert tags["validation/macro_average_precision"] == [5, 10]


# --- resuming --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_auto_matches_the_uninterrupted_run(
    data, tmp_path, uninterrupted
):
    reference_dir, _, reference_losses = uninterrupted

    def terminate_at_5(iteration: int, loss: float) -> None:
        if iteration == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(
        TrainingInterrupted, match=r"stopped by SIGTERM after iteration 5; checkpoint .*iteration-5"
    ) as info:
        train(make_config(data, tmp_path), on_iteration=terminate_at_5)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert checkpoints.latest_complete_checkpoint(tmp_path / "models") == tmp_path / "models" / "iteration-5"

    losses: dict[int, float] = {}
    result = train(
        make_config(data, tmp_path, resume="auto"), on_iteration=lambda n, loss: losses.__setitem__(n, loss)
    )
    assert sorted(losses) == list(range(6, ITERATIONS + 1))  # continues at 6
    assert [losses[n] for n in losses] == pytest.approx([reference_losses[n] for n in losses], abs=1e-6)
    assert result.iterations == ITERATIONS
    assert_same_weights(final_weights(tmp_path), final_weights(reference_dir))


def test_sigint_asks_for_a_stop_and_a_second_one_interrupts():
    from bigearthnet_tf.train import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt, the loop stops after the step
        assert stop.received is signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is not swallowed
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_the_same_command_resumes(data, tmp_path, uninterrupted):
    reference_dir, _, _ = uninterrupted
    out_dir = tmp_path / "run"
    models = out_dir / "models"
    path = tmp_path / "config.json"
    values = config_values(
        data, out_dir, resume="auto", save_checkpoint_per_iteration=1, save_checkpoint_after_iteration=0
    )
    path.write_text(json.dumps(values))
    command = [sys.executable, str(REPOSITORY / "train.py"), str(path)]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "TF_CPP_MIN_LOG_LEVEL": "3"}

    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (models / "iteration-2.json").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "training never reached iteration 2"
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))  # then SIGKILL at a random moment: mid-step or mid-save
    process.kill()
    process.wait()
    process.stderr.close()
    killed_after = checkpoints.latest_complete_checkpoint(models)
    assert killed_after is not None and not (models / f"iteration-{ITERATIONS}.json").exists()
    # Make the wreckage worse: a newer checkpoint whose metadata never came, and a stray temporary.
    (models / "iteration-9.weights.h5").write_bytes(b"partial")
    (models / ".iteration-9.state.npz.x1y2.tmp.npz").write_bytes(b"partial")

    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming after iteration {checkpoints.iteration_of(killed_after)}" in " ".join(
        finished.stdout.split()
    )
    assert not list(models.glob(".*tmp*"))
    assert_same_weights(final_weights(out_dir), final_weights(reference_dir))

    # The same config through the 2019 eval.py (model_file names the final iteration).
    finished = subprocess.run(
        [sys.executable, str(REPOSITORY / "eval.py"), str(path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads((out_dir / "eval_result.json").read_text())["num_samples"] == 12


@pytest.mark.slow
def test_fine_tune_from_iteration_n_continues_the_run_2019_style(data, tmp_path, uninterrupted):
    reference_dir, _, _ = uninterrupted
    source = reference_dir / "models" / "iteration-6"
    losses: dict[int, float] = {}
    train(
        make_config(data, tmp_path, fine_tune=True, model_file=str(source)),
        on_iteration=lambda n, loss: losses.__setitem__(n, loss),
    )
    assert sorted(losses) == [7, 8, 9, 10]
    assert_same_weights(final_weights(tmp_path), final_weights(reference_dir))


@pytest.mark.slow
def test_fine_tune_from_weights_only_restarts_the_count(data, tmp_path, uninterrupted):
    reference_dir, _, _ = uninterrupted
    result = train(
        make_config(
            data, tmp_path, nb_epoch=1, fine_tune=True, model_file=str(reference_dir / "models" / "best")
        )
    )
    assert result.iterations == 5
    assert checkpoints.read_metadata(tmp_path / "models" / "iteration-5")["iteration"] == 5


def test_a_second_run_in_the_same_out_dir_is_refused_without_resume(data, uninterrupted):
    out_dir, _, _ = uninterrupted
    with pytest.raises(
        UserError, match=r'already holds checkpoints of a run \(up to iteration-10\); set "resume"'
    ):
        train(make_config(data, out_dir))


def test_resume_of_a_finished_run_does_nothing(data, uninterrupted):
    out_dir, _, _ = uninterrupted
    result = train(make_config(data, out_dir, resume="auto"))
    assert result.iterations == ITERATIONS


def test_resume_with_another_model_or_label_type_is_refused(data, uninterrupted):
    out_dir, _, _ = uninterrupted
    with pytest.raises(UserError, match=r"trained for label_type 'BigEarthNet-19'.*'original'"):
        train(make_config(data, out_dir, resume="auto", label_type="original"))
    with pytest.raises(UserError, match=r"holds model 'K-BranchCNN-Tiny' but the config names 'VGG-Tiny'"):
        train(make_config(data, out_dir, resume="auto", model_name="VGG-Tiny"))


@pytest.mark.slow
def test_corrupt_training_file_is_named_or_skipped(data, tmp_path, capsys):
    damaged = bytearray((data / "train-00001-of-00002.tfrecord").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside a record's payload: its checksum fails
    (tmp_path / "train-00001-of-00002.tfrecord").write_bytes(bytes(damaged))
    (tmp_path / "train-00000-of-00002.tfrecord").write_bytes(
        (data / "train-00000-of-00002.tfrecord").read_bytes()
    )
    changes = {
        "tr_tf_record_files": [str(tmp_path / "train-*.tfrecord")],
        "val_tf_record_files": ...,
        "nb_epoch": 1,
        "training_size": ...,
    }
    with pytest.raises(
        UserError, match=r"corrupt or truncated TFRecord file .*train-00001-of-00002\.tfrecord"
    ):
        train(make_config(data, tmp_path / "strict", **changes))
    result = train(make_config(data, tmp_path / "skip", skip_corrupt_records=True, **changes))
    assert result.iterations >= 3
    assert "unreadable training records" in " ".join(capsys.readouterr().out.split())


# --- stopping --------------------------------------------------------------------------------------


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(data, tmp_path):
    config = make_config(
        data, tmp_path, learning_rate=1e38, save_checkpoint_per_iteration=1, save_checkpoint_after_iteration=0
    )
    with pytest.raises(
        TrainingDiverged, match=r"became nan at iteration (\d+); .*last good checkpoint is .*iteration-"
    ) as info:
        train(config)
    stopped_at = int(info.value.args[0].split("at iteration ")[1].split(";")[0])
    assert [n for n, _ in checkpoints.list_checkpoints(tmp_path / "models")] == list(range(1, stopped_at))
    assert checkpoints.is_complete(tmp_path / "models" / f"iteration-{stopped_at - 1}")


def test_recipe_options_and_early_stopping(data, tmp_path, plain_model):
    config = make_config(
        data,
        tmp_path,
        nb_epoch=3,
        optimizer="adamw",
        weight_decay=0.05,
        lr_schedule="cosine",
        warmup_iterations=3,
        augmentation=True,
        early_stopping_patience=1,
        model_name=plain_model,  # no batch norm: with a negligible rate the outputs stay put,
        learning_rate=1e-12,  # so the second validation is no better and stops the run
        mixed_precision=True,  # bfloat16 on the CPU
        save_checkpoint_per_iteration=None,
    )
    result = train(config)
    assert result.stopped_early and result.iterations == 10
    meta = checkpoints.read_metadata(tmp_path / "models" / "iteration-10")
    assert meta["optimizer"]["class"] == "AdamW"
    assert meta["training"]["validations_since_best"] == 1
    import keras

    assert keras.mixed_precision.global_policy().name == "float32"  # the policy does not leak


@pytest.mark.slow
def test_training_fraction_trains_on_a_seeded_subset_stated_everywhere(data, tmp_path, capsys):
    """0.25 of the 40 records: 10 per epoch, 2 epochs of batch 8 = 3 iterations (not 10)."""
    result = train(make_config(data, tmp_path, training_fraction=0.25, save_checkpoint_per_iteration=None))
    assert result.iterations == 3
    assert "training on 10 of 40 records (a subset drawn with seed" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["training_fraction"] == 0.25
    assert checkpoints.read_metadata(tmp_path / "models" / "iteration-3")["config"]["training_fraction"] == 0.25


def test_augmentation_is_the_same_transform_for_every_input():
    import tensorflow as tf

    from bigearthnet_tf.train import augment

    # Coarse inputs are block means of the fine one; flips and 90-degree turns commute with block
    # means, so after one shared transform they must still be block means of the transformed fine input.
    fine = tf.constant(np.random.default_rng(0).integers(0, 100, (16, 120, 120, 1)), tf.float32)
    inputs = {
        "bands_10m": fine,
        "bands_20m": tf.nn.avg_pool2d(fine, 2, 2, "VALID"),
        "bands_60m": tf.nn.avg_pool2d(fine, 6, 6, "VALID"),
    }
    out = augment(inputs, tf.constant([42, 7], tf.int64))
    np.testing.assert_allclose(out["bands_20m"], tf.nn.avg_pool2d(out["bands_10m"], 2, 2, "VALID"), atol=1e-4)
    np.testing.assert_allclose(out["bands_60m"], tf.nn.avg_pool2d(out["bands_10m"], 6, 6, "VALID"), atol=1e-4)
    changed = [not np.array_equal(out["bands_10m"][i], fine[i]) for i in range(16)]
    assert 0 < sum(changed) < 16  # random per sample (identity has probability 1/8)
    again = augment(inputs, tf.constant([42, 7], tf.int64))
    np.testing.assert_array_equal(out["bands_10m"], again["bands_10m"])  # stateless: repeatable


# --- the 2019 command line, both label types ---------------------------------------------------------


@pytest.mark.slow
def test_2019_config_through_the_cli_with_original_labels(data, tmp_path, capsys):
    """Only 2019 keys; `bigearthnet train` / `evaluate` are what train.py and eval.py call."""
    out_dir = tmp_path / "run"
    path = tmp_path / "ResNet-Tiny-original.json"
    values = config_values(
        data,
        out_dir,
        model_name="ResNet-Tiny",
        label_type="original",
        nb_epoch=1,
        model_file=str(out_dir / "models" / "iteration-5"),
    )
    path.write_text(json.dumps(values))
    main(["train", str(path)])
    main(["evaluate", str(path)])
    assert checkpoints.read_metadata(out_dir / "models" / "iteration-5")["label_type"] == "original"
    result = json.loads((out_dir / "eval_result.json").read_text())
    assert result["num_samples"] == 12 and "macro_f1_score_class42" in result
    evaluation = out_dir / "eval" / "iteration-5-test"  # <checkpoint>-<data>
    header = (evaluation / "predictions.csv").read_text().splitlines()[0]
    assert "Sea and ocean" in header and "true:Sea and ocean" in header
    assert (evaluation / "per_class_metrics.png").stat().st_size > 0
    assert "Per class" in capsys.readouterr().out


@pytest.mark.slow
def test_multi_modal_training_and_evaluation(tmp_path):
    write_records(tmp_path / "train.tfrecord", make_patches(16, 21, with_s1=True))
    write_records(tmp_path / "test.tfrecord", make_patches(6, 22, with_s1=True))
    values = config_values(
        tmp_path,
        tmp_path / "run",
        modality="MM",
        nb_epoch=1,
        tr_tf_record_files=[str(tmp_path / "train.tfrecord")],
        val_tf_record_files=...,
        training_size=...,
        save_checkpoint_per_iteration=...,
    )
    result = train(config_from_dict(values, "train"))
    meta = checkpoints.read_metadata(result.final_checkpoint)
    assert meta["modality"] == "MM" and meta["input_keys"][-1] == "bands_s1"
    assert meta["band_order"]["bands_s1"] == ["VV", "VH"]
    evaluation = evaluate(
        config_from_dict(
            {
                "batch_size": 4,
                "out_dir": str(tmp_path / "run"),
                "test_tf_record_files": [str(tmp_path / "test.tfrecord")],
                "model_file": str(result.final_checkpoint),
            },
            "evaluate",
        )
    )
    assert evaluation.num_samples == 6
    with pytest.raises(UserError, match=r"trained on modality 'MM' but the config asks for 'S2'"):
        evaluate(
            config_from_dict(
                {
                    **values,
                    "modality": "S2",
                    "model_file": str(result.final_checkpoint),
                    "test_tf_record_files": [str(tmp_path / "test.tfrecord")],
                },
                "evaluate",
            )
        )


# --- distribution ------------------------------------------------------------------------------------

MIRRORED_SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.models import register_model
from bigearthnet_tf.train import train

@register_model("Plain-Test")  # no batch norm, no dropout: replicas must match one device exactly
def plain(num_classes, modality="S2", statistics=None):
    return keras.Sequential([
        keras.layers.Conv2D(4, 5, strides=4, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(num_classes),
    ])

values = json.loads(sys.argv[1])
losses = {}
for name, changes in (
    ("none", {"distribution": "none"}),
    ("mirrored", {"distribution": "mirrored"}),
    ("jit", {"distribution": "none", "jit_compile": True}),
):
    config = config_from_dict({**values, **changes, "out_dir": values["out_dir"] + name}, "train")
    seen = []
    train(config, on_iteration=lambda n, loss: seen.append(loss))
    losses[name] = seen
print("LOSSES " + json.dumps(losses))
"""


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_and_xla_match_one_device(data, tmp_path):
    values = config_values(
        data,
        tmp_path / "run-",
        model_name="Plain-Test",
        val_tf_record_files=...,
        save_checkpoint_per_iteration=None,
    )
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "TF_CPP_MIN_LOG_LEVEL": "3"}
    finished = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(values)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    line = next(line for line in finished.stdout.splitlines() if line.startswith("LOSSES "))
    losses = json.loads(line[len("LOSSES ") :])
    assert len(losses["none"]) == len(losses["mirrored"]) == ITERATIONS
    np.testing.assert_allclose(losses["mirrored"], losses["none"], rtol=1e-5, atol=1e-6)
    # XLA (jit_compile) fuses differently; the same training to float rounding.
    np.testing.assert_allclose(losses["jit"], losses["none"], rtol=1e-4, atol=1e-5)


WORKER_SCRIPT = r"""
import json, sys
import keras
from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.models import register_model
from bigearthnet_tf.train import train

@register_model("Plain-Test")
def plain(num_classes, modality="S2", statistics=None):
    return keras.Sequential([
        keras.layers.Conv2D(4, 5, strides=4, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(num_classes),
    ])

seen = []
train(config_from_dict(json.loads(sys.argv[1]), "train"), on_iteration=lambda n, loss: seen.append(loss))
print("LOSSES " + json.dumps(seen))
"""


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_multi_worker_with_two_processes_matches_one_device(data, tmp_path):
    """Two workers on 127.0.0.1 (TF_CONFIG), one file: records are sharded by record, so each
    global batch holds the same 8 records as on one device, and the losses agree."""
    values = config_values(
        data,
        tmp_path / "run-",
        model_name="Plain-Test",
        tr_tf_record_files=[str(data / "train-00000-of-00002.tfrecord")],
        shuffle_buffer_size=0,
        training_size=20,
        val_tf_record_files=...,
        save_checkpoint_per_iteration=None,
    )
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "TF_CPP_MIN_LOG_LEVEL": "3"}
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        worker_values = {**values, "distribution": "multi_worker", "out_dir": values["out_dir"] + "multi"}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER_SCRIPT, json.dumps(worker_values)],
                env={**environment, "TF_CONFIG": json.dumps(tf_config)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    single = subprocess.run(
        [
            sys.executable,
            "-c",
            WORKER_SCRIPT,
            json.dumps({**values, "out_dir": values["out_dir"] + "single"}),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(stdout: str) -> list[float]:
        return json.loads(next(line for line in stdout.splitlines() if line.startswith("LOSSES "))[7:])

    reference = losses(single.stdout)
    assert len(reference) == 5  # 20 records x 2 epochs / 8
    for stdout, _ in outputs:
        np.testing.assert_allclose(losses(stdout), reference, rtol=1e-5, atol=1e-6)
    # Only the chief (worker 0) wrote checkpoints and logs.
    assert [n for n, _ in checkpoints.list_checkpoints(Path(values["out_dir"] + "multi") / "models")] == [5]
