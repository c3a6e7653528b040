"""Training: checkpoint naming, exact resume after SIGTERM or a crash, fine_tune, NaN stop, options,
mirrored replicas, and the 2019-style config through train.py and eval.py for both label types.

Tiny model (K-BranchCNN-Tiny), 40 training patches in two files, batch 8: 5 iterations per epoch.
Resume tolerance: the resumed run must reproduce the uninterrupted run's weights to atol 1e-6 (on the
CPU they come out bit-identical; the tolerance only leaves room for float reassociation).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bigearthnet_tf import checkpoints
from bigearthnet_tf.archive import Patch
from bigearthnet_tf.cli import main
from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.constants import ORIGINAL_LABELS, S2_BANDS, original_to_19
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.records import RecordWriter, encode_default
from bigearthnet_tf.train import TrainingDiverged, TrainingInterrupted, train

REPOSITORY = Path(__file__).resolve().parents[1]
MODEL = "K-BranchCNN-Tiny"
BATCH = 8
TRAIN_PATCHES = 40  # two files of 20
ITERATIONS = 10  # 40 x 2 epochs / 8
RESUME_ATOL = 1e-6
# 43-class indices the synthetic patches draw from; brightness depends on them so there is signal.
CLASSES_USED = (11, 17, 22, 23, 39)


def make_patches(count: int, seed: int) -> list[Patch]:
    rng = np.random.default_rng(seed)
    patches = []
    for index in range(count):
        present = sorted(rng.choice(CLASSES_USED, size=rng.integers(1, 3), replace=False))
        labels_43 = tuple(ORIGINAL_LABELS[i] for i in present)
        shift = sum(CLASSES_USED.index(i) + 1 for i in present) / 4.0
        bands = {
            band.name: np.clip(
                rng.normal(band.mean + shift * band.std, band.std / 4, (band.size,) * 2), 0, 60000
            ).astype(np.uint16)
            for band in S2_BANDS
        }
        patches.append(Patch(f"S2A_TEST_{seed}_{index}", bands, labels_43, original_to_19(labels_43)))
    return patches


def write_records(path: Path, patches: list[Patch]) -> None:
    with RecordWriter(path) as writer:
        for patch in patches:
            writer.write(encode_default(patch))


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


def test_crash_then_resume_skips_a_half_written_checkpoint(data, tmp_path, uninterrupted):
    reference_dir, _, _ = uninterrupted

    class Crash(Exception):
        pass

    def crash_at_8(iteration: int, loss: float) -> None:
        if iteration == 8:
            raise Crash

    with pytest.raises(Crash):
        train(make_config(data, tmp_path), on_iteration=crash_at_8)
    models = tmp_path / "models"
    assert [n for n, _ in checkpoints.list_checkpoints(models)] == [6]
    # A checkpoint killed while being written: weights there, metadata (the completion marker) not.
    (models / "iteration-9.weights.h5").write_bytes(b"partial")
    assert checkpoints.latest_complete_checkpoint(models) == models / "iteration-6"

    losses: dict[int, float] = {}
    train(
        make_config(data, tmp_path, resume="auto"), on_iteration=lambda n, loss: losses.__setitem__(n, loss)
    )
    assert min(losses) == 7
    assert_same_weights(final_weights(tmp_path), final_weights(reference_dir))


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


def test_recipe_options_and_early_stopping(data, tmp_path):
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
        learning_rate=1e-9,  # nothing improves: the second validation stops the run
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


def test_2019_config_through_cli_train_and_evaluate_bigearthnet_19(data, tmp_path, capsys):
    out_dir = tmp_path / "run"
    path = tmp_path / "ResNet-Tiny-BigEarthNet-19.json"
    values = config_values(
        data,
        out_dir,
        model_name="ResNet-Tiny",
        nb_epoch=1,
        model_file=str(out_dir / "models" / "iteration-5"),
    )
    path.write_text(json.dumps(values))
    main(["train", str(path)])
    main(["evaluate", str(path)])
    result = json.loads((out_dir / "eval_result.json").read_text())
    assert result["num_samples"] == 12 and "macro_average_precision" in result
    header = (out_dir / "predictions.csv").read_text().splitlines()[0]
    assert "Marine waters" in header and "true:Marine waters" in header
    assert "Per class" in capsys.readouterr().out


def test_2019_config_through_train_py_and_eval_py_original_labels(data, tmp_path):
    out_dir = tmp_path / "run"
    path = tmp_path / "VGG-Tiny-original.json"
    values = config_values(
        data,
        out_dir,
        model_name="VGG-Tiny",
        label_type="original",
        nb_epoch=1,
        model_file=str(out_dir / "models" / "iteration-5"),
    )
    path.write_text(json.dumps(values))
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for script in ("train.py", "eval.py"):
        finished = subprocess.run(
            [sys.executable, str(REPOSITORY / script), str(path)],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert checkpoints.read_metadata(out_dir / "models" / "iteration-5")["label_type"] == "original"
    result = json.loads((out_dir / "eval_result.json").read_text())
    assert "macro_f1_score_class42" in result and result["num_samples"] == 12
    assert (out_dir / "per_class_metrics.png").stat().st_size > 0


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
for distribution in ("none", "mirrored"):
    changes = {"distribution": distribution, "out_dir": values["out_dir"] + distribution}
    config = config_from_dict({**values, **changes}, "train")
    seen = []
    train(config, on_iteration=lambda n, loss: seen.append(loss))
    losses[distribution] = seen
print("LOSSES " + json.dumps(losses))
"""


def test_mirrored_over_two_cpu_devices_matches_one_device(data, tmp_path):
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
