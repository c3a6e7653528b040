"""Checkpoints: names, the 2019 saving rule, round trips, refusals, and never picking a half-written one."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from bigearthnet_tf import checkpoints
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.models import build_model

MODEL = "K-BranchCNN-Tiny"  # has dropout, so RNG states are part of the state


def inputs(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "bands_10m": rng.uniform(0, 3000, (batch, 120, 120, 4)).astype("float32"),
        "bands_20m": rng.uniform(0, 3000, (batch, 60, 60, 6)).astype("float32"),
        "bands_60m": rng.uniform(0, 3000, (batch, 20, 20, 2)).astype("float32"),
    }


def trained_model_and_optimizer(label_type: str = "BigEarthNet-19", steps: int = 2):
    """A tiny model and Adam after a few real updates (so slots and RNG states are non-trivial)."""
    keras.utils.set_random_seed(3)
    classes = len(BIGEARTHNET_19_LABELS if label_type == "BigEarthNet-19" else ORIGINAL_LABELS)
    model = build_model(MODEL, classes)
    optimizer = keras.optimizers.Adam(1e-3)
    labels = np.zeros((2, classes), "float32")
    labels[:, 1] = 1
    for step in range(steps):
        with tf.GradientTape() as tape:
            logits = model(inputs(seed=step), training=True)
            loss = keras.ops.mean(keras.losses.binary_crossentropy(labels, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return model, optimizer


def save(base, model, optimizer=None, label_type="BigEarthNet-19", iteration=7, **kwargs):
    return checkpoints.save_checkpoint(
        base,
        model,
        model_name=MODEL,
        label_type=label_type,
        modality="S2",
        iteration=iteration,
        optimizer=optimizer,
        data_position=checkpoints.DataPosition(iteration, 8, 40),
        config={"batch_size": 8},
        **kwargs,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One complete checkpoint with optimizer state, and the model and optimizer that wrote it."""
    model, optimizer = trained_model_and_optimizer()
    base = save(tmp_path_factory.mktemp("ckpt") / "models" / "iteration-7", model, optimizer)
    return base, model, optimizer


# --- names and the 2019 rule ---------------------------------------------------------------------


def test_names():
    assert checkpoints.checkpoint_base("out/models", 600).as_posix() == "out/models/iteration-600"
    assert checkpoints.iteration_of("out/models/iteration-600") == 600
    assert checkpoints.iteration_of("runs/iteration-600/best") is None
    assert checkpoints.iteration_of("model-iteration-12") == 12  # 2019: the suffix decides
    files = checkpoints.checkpoint_files("m/iteration-3")
    assert {role: path.name for role, path in files.items()} == {
        "weights": "iteration-3.weights.h5",
        "state": "iteration-3.state.npz",
        "metadata": "iteration-3.json",
    }


@pytest.mark.parametrize(
    ("per", "after", "expected"),
    [
        (600, 6000, [6000, 6600, 7200]),  # the 2019 ResNet50 setting
        (300, 0, [300, 600, 900, 1200, 1500, 1800, 2100, 2400, 2700, 3000, 3300, 3600, 3900, 4200, 4500]),
        (300, 3100, [3300, 3600, 3900, 4200, 4500]),  # "after" need not be a multiple
        (None, 0, []),
    ],
)
def test_save_rule(per, after, expected):
    due = [n for n in range(1, 7201) if checkpoints.should_save(n, per, after)]
    assert due[: len(expected)] == expected
    if per == 300 and after == 0:
        assert len(due) == 24


def test_data_position():
    position = checkpoints.DataPosition(batches_consumed=7, batch_size=8, epoch_records=20)
    # 56 records consumed = 2 epochs of 20 + 16 records of the third.
    assert position.to_dict() == {
        "batches_consumed": 7,
        "epoch": 2,
        "batch_in_epoch": 2,
        "epoch_records": 20,
        "batch_size": 8,
    }


# --- round trip ----------------------------------------------------------------------------------


def test_metadata_carries_the_meaning(saved):
    base, model, _ = saved
    meta = checkpoints.read_metadata(base)
    assert meta["format"] == "bigearthnet-tf-checkpoint" and meta["kind"] == "iteration"
    assert meta["model_name"] == MODEL and meta["label_type"] == "BigEarthNet-19" and meta["modality"] == "S2"
    assert meta["class_names"] == list(BIGEARTHNET_19_LABELS) and meta["num_classes"] == 19
    assert meta["input_keys"] == ["bands_10m", "bands_20m", "bands_60m"]
    assert meta["band_order"]["bands_10m"] == ["B02", "B03", "B04", "B08"]
    assert meta["statistics"]["B04"] == pytest.approx([590.23569706, 675.88746967])
    assert meta["iteration"] == 7
    assert meta["data_position"]["batches_consumed"] == 7 and meta["data_position"]["epoch"] == 1
    assert meta["config"] == {"batch_size": 8}
    assert set(meta["versions"]) >= {"tensorflow", "keras", "numpy", "python", "bigearthnet_tf"}
    for role in ("weights", "state"):
        described = meta["files"][role]
        path = base.with_name(described["name"])
        assert path.stat().st_size == described["bytes"] and len(described["sha256"]) == 64
    assert not list(base.parent.glob(".*tmp*")), "no temporary files left behind"


def test_round_trip_gives_identical_outputs_and_state(saved):
    base, model, optimizer = saved
    restored, state, meta = checkpoints.load_checkpoint(base, label_type="BigEarthNet-19", modality="S2")
    sample = inputs(seed=9)
    np.testing.assert_array_equal(model(sample, training=False), restored(sample, training=False))
    for original, loaded in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())

    fresh = keras.optimizers.Adam(5e-4)  # a different rate: the config owns it
    checkpoints.restore_training_state(restored, fresh, state)
    assert int(fresh.iterations.numpy()) == 2
    assert float(fresh.learning_rate.numpy()) == pytest.approx(5e-4)
    saved_slots = [v.numpy() for v in optimizer.variables if v.name != "learning_rate"]
    loaded_slots = [v.numpy() for v in fresh.variables if v.name != "learning_rate"]
    for a, b in zip(saved_slots, loaded_slots, strict=True):
        np.testing.assert_array_equal(a, b)
    # Dropout RNG states come back too, so a resumed run draws the same masks.
    weights = {id(v) for v in model.weights}
    rng_model = [v.numpy() for v in model.variables if id(v) not in weights]
    weights = {id(v) for v in restored.weights}
    rng_restored = [v.numpy() for v in restored.variables if id(v) not in weights]
    assert rng_model and all(np.array_equal(a, b) for a, b in zip(rng_model, rng_restored, strict=True))


def test_state_for_another_model_is_refused(saved, tmp_path):
    base, _, _ = saved
    _, state, _ = checkpoints.load_checkpoint(base)
    other = build_model("VGG-Tiny", 19)
    with pytest.raises(UserError, match=r"optimizer state has \d+ variables but this run's has \d+"):
        checkpoints.restore_training_state(other, keras.optimizers.Adam(), state)


# --- refusals ------------------------------------------------------------------------------------


def test_wrong_label_type_modality_or_model_is_refused(saved):
    base, _, _ = saved
    with pytest.raises(
        UserError, match=r"trained for label_type 'BigEarthNet-19' \(19 classes\).*'original'"
    ):
        checkpoints.load_checkpoint(base, label_type="original")
    with pytest.raises(UserError, match=r"trained on modality 'S2' but the config asks for 'MM'"):
        checkpoints.load_checkpoint(base, modality="MM")
    with pytest.raises(UserError, match=r"holds model 'K-BranchCNN-Tiny' but the config names 'ResNet50'"):
        checkpoints.load_checkpoint(base, model_name="ResNet50")
    with pytest.raises(UserError, match=r"statistics differ from the statistics_file for B02"):
        checkpoints.load_checkpoint(base, statistics={"B02": (1.0, 2.0)})


def copy_checkpoint(base, target_dir):
    target_dir.mkdir(parents=True, exist_ok=True)
    for path in checkpoints.checkpoint_files(base).values():
        (target_dir / path.name).write_bytes(path.read_bytes())
    return target_dir / base.name


def edit_metadata(base, change):
    path = checkpoints.checkpoint_files(base)["metadata"]
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("statistic", "message"),
    [
        ([400.0, 0.0], r"statistics\.B02\.std must be finite and > 0, got 0\.0"),
        ([10**400, 2.0], r"statistics\.B02\.mean must be a finite number, got an integer of 401 digits"),
    ],
)
def test_statistics_that_could_not_standardise_are_refused_on_loading(saved, tmp_path, statistic, message):
    """The same rule as for statistics files and configs (stats.checked_statistics), naming the key."""
    base, _, _ = saved
    copy = copy_checkpoint(base, tmp_path)
    edit_metadata(copy, lambda meta: meta["statistics"].update(B02=statistic))
    with pytest.raises(UserError, match=rf"checkpoint .*iteration-7: {message}"):
        checkpoints.load_checkpoint(copy)


def test_reordered_classes_or_bands_are_refused(saved, tmp_path):
    base, _, _ = saved
    sorted_classes = copy_checkpoint(base, tmp_path / "a")
    edit_metadata(sorted_classes, lambda meta: meta["class_names"].sort())  # the alphabetical-order pitfall
    with pytest.raises(UserError, match="class names are not the BigEarthNet-19 classes in index order"):
        checkpoints.load_checkpoint(sorted_classes)
    swapped = copy_checkpoint(base, tmp_path / "b")
    edit_metadata(swapped, lambda meta: meta["band_order"]["bands_10m"].reverse())
    with pytest.raises(
        UserError, match=r"input 'bands_10m' has bands .* refusing to feed the model the wrong"
    ):
        checkpoints.load_checkpoint(swapped)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match=r"iteration-3\.json not found"):
        checkpoints.load_checkpoint(tmp_path / "iteration-3")
    (tmp_path / "iteration-6000.index").write_bytes(b"")  # what the 2019 tf.train.Saver wrote
    with pytest.raises(
        UserError,
        match=r"is a 2019 TensorFlow 1 checkpoint .*bigearthnet import tf1 .*iteration-6000 --model NAME",
    ):
        checkpoints.load_checkpoint(tmp_path / "iteration-6000")
    (tmp_path / "x.json").write_text('{"some": "json"}')
    with pytest.raises(UserError, match="not bigearthnet-tf checkpoint metadata"):
        checkpoints.load_checkpoint(tmp_path / "x")


# --- completeness --------------------------------------------------------------------------------


def test_half_written_checkpoints_are_never_picked(saved, tmp_path):
    base, model, optimizer = saved
    directory = tmp_path / "models"
    for iteration in (3, 6):
        save(checkpoints.checkpoint_base(directory, iteration), model, optimizer, iteration=iteration)
    assert checkpoints.latest_complete_checkpoint(directory) == directory / "iteration-6"

    # iteration-9: files written but the metadata (the completion marker) never came.
    nine = save(checkpoints.checkpoint_base(directory, 9), model, optimizer, iteration=9)
    checkpoints.checkpoint_files(nine)["metadata"].unlink()
    # iteration-12: complete metadata, but the weights file was cut short afterwards.
    twelve = save(checkpoints.checkpoint_base(directory, 12), model, optimizer, iteration=12)
    weights = checkpoints.checkpoint_files(twelve)["weights"]
    weights.write_bytes(weights.read_bytes()[:-100])
    # iteration-15: same size, one flipped byte in the state.
    fifteen = save(checkpoints.checkpoint_base(directory, 15), model, optimizer, iteration=15)
    state = checkpoints.checkpoint_files(fifteen)["state"]
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))

    assert not checkpoints.is_complete(nine) and not checkpoints.is_complete(twelve)
    assert not checkpoints.is_complete(fifteen)
    assert checkpoints.latest_complete_checkpoint(directory) == directory / "iteration-6"
    with pytest.raises(UserError, match=r"weights file iteration-12\.weights\.h5 has \d+ bytes, expected"):
        checkpoints.load_checkpoint(twelve)
    with pytest.raises(UserError, match=r"state file iteration-15\.state\.npz does not match its SHA-256"):
        checkpoints.load_checkpoint(fifteen)
    assert checkpoints.latest_complete_checkpoint(tmp_path / "absent") is None


def test_a_crash_while_saving_leaves_no_complete_checkpoint_and_no_temporaries(saved, tmp_path):
    _, model, optimizer = saved
    base = save(tmp_path / "iteration-4", model, optimizer, iteration=4)
    assert checkpoints.is_complete(base)

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash

    original = model.save_weights
    model.save_weights = crash
    try:
        with pytest.raises(Crash):
            save(base, model, optimizer, iteration=4)
    finally:
        model.save_weights = original
    assert not checkpoints.is_complete(base)  # the old marker went first: nothing claims completeness
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "iteration-4.state.npz",
        "iteration-4.weights.h5",
    ]


def test_best_checkpoint_without_state(saved, tmp_path):
    _, model, _ = saved
    base = save(tmp_path / "best", model, None, kind="best", validation={"macro_average_precision": 0.5})
    meta = checkpoints.read_metadata(base)
    assert meta["kind"] == "best" and meta["validation"] == {"macro_average_precision": 0.5}
    assert meta["optimizer"] is None and set(meta["files"]) == {"weights"}
    assert checkpoints.load_checkpoint(base).state is None
    assert checkpoints.list_checkpoints(tmp_path) == []  # `best` is not an iteration checkpoint


# --- exported .keras files: safe mode --------------------------------------------------------------


def test_keras_file_loads_in_safe_mode_and_unsafe_code_is_refused(saved, tmp_path):
    _, model, _ = saved
    path = tmp_path / "model.keras"
    model.save(path)
    restored, state, meta = checkpoints.load_checkpoint(path)
    assert state is None and meta.label_type == "BigEarthNet-19" and meta.num_classes == 19
    sample = inputs(seed=4)
    np.testing.assert_allclose(model(sample, training=False), restored(sample, training=False), atol=1e-6)

    image = keras.Input((4,))
    unsafe = keras.Model(image, keras.layers.Lambda(lambda x: x * 2)(image))
    unsafe.save(tmp_path / "unsafe.keras")
    with pytest.raises(UserError, match=r"unsafe\.keras: cannot be loaded in safe mode"):
        checkpoints.load_checkpoint(tmp_path / "unsafe.keras")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda meta: meta.update(class_names="Urban fabric"), "class_names"),
        (lambda meta: meta.update(num_classes=True), "num_classes"),
        (lambda meta: meta.update(num_classes=18), "num_classes"),
        (lambda meta: meta.pop("model_name"), "model_name"),
        (lambda meta: meta["statistics"].update(B02=["a", 1]), "statistics.B02"),
        (lambda meta: meta["band_order"].update(bands_10m="B02"), "band_order.bands_10m"),
        (lambda meta: meta.update(files=[]), "files"),
        (lambda meta: meta["files"].update(extra={"name": "x", "bytes": 1, "sha256": "0"}), "files.extra"),
        (lambda meta: meta["files"]["weights"].update(bytes="12"), "files.weights"),
    ],
)
def test_malformed_metadata_is_one_clear_error(saved, tmp_path, change, key):
    base, _, _ = saved
    copy = copy_checkpoint(base, tmp_path)
    edit_metadata(copy, change)
    with pytest.raises(UserError, match=rf"metadata key '{key}' is missing or malformed"):
        checkpoints.load_checkpoint(copy)
    assert not checkpoints.is_complete(copy)
    checkpoints.checkpoint_files(copy)["metadata"].write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"iteration-7\.json: not valid JSON: nested too deeply"):
        checkpoints.load_checkpoint(copy)


def test_files_are_found_by_base_name_so_a_renamed_checkpoint_loads(saved, tmp_path):
    base, model, _ = saved
    renamed = tmp_path / "resnet-ben19"
    for role, path in checkpoints.checkpoint_files(base).items():
        path_to = checkpoints.checkpoint_files(renamed)[role]
        path_to.write_bytes(path.read_bytes())
    # A name in the metadata pointing elsewhere is never followed.
    edit_metadata(renamed, lambda meta: meta["files"]["weights"].update(name="../../etc/passwd"))
    restored, _, _ = checkpoints.load_checkpoint(renamed)
    sample = inputs(seed=2)
    np.testing.assert_array_equal(model(sample, training=False), restored(sample, training=False))


# --- network options (the upsampling kernel) ------------------------------------------------------


def _save_resnet(base, **build_options):
    model = build_model("ResNet-Tiny", len(BIGEARTHNET_19_LABELS), **build_options)
    checkpoints.save_checkpoint(
        base, model, model_name="ResNet-Tiny", label_type="BigEarthNet-19", modality="S2", iteration=1
    )
    return model


def _resnet_inputs():
    return {key: value for key, value in inputs().items() if key != "bands_60m"}


@pytest.mark.parametrize("kernel", ["tf1_bicubic", "tf2_bicubic"])
def test_the_upsampling_kernel_travels_with_the_checkpoint(tmp_path, kernel):
    model = _save_resnet(tmp_path / "iteration-1", upsampling=kernel)
    meta = checkpoints.read_metadata(tmp_path / "iteration-1")
    assert meta["model_options"] == {"upsampling": kernel}
    loaded, _, _ = checkpoints.load_checkpoint(tmp_path / "iteration-1")
    assert loaded.get_layer("upsample_bands_20m").kernel == kernel
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(_resnet_inputs())),
        keras.ops.convert_to_numpy(model(_resnet_inputs())),
    )


def test_checkpoints_written_before_the_option_keep_the_tf2_kernel(tmp_path):
    """Checkpoints of the first release have no model_options: their models upsampled with TF2's kernel."""
    model = _save_resnet(tmp_path / "iteration-1", upsampling="tf2_bicubic")
    metadata_file = checkpoints.checkpoint_files(tmp_path / "iteration-1")["metadata"]
    meta = json.loads(metadata_file.read_text())
    del meta["model_options"], meta["source"]
    metadata_file.write_text(json.dumps(meta))
    loaded, _, _ = checkpoints.load_checkpoint(tmp_path / "iteration-1")
    assert loaded.get_layer("upsample_bands_20m").kernel == "tf2_bicubic"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(_resnet_inputs())),
        keras.ops.convert_to_numpy(model(_resnet_inputs())),
    )


def test_malformed_model_options_are_refused(tmp_path):
    _save_resnet(tmp_path / "iteration-1")
    metadata_file = checkpoints.checkpoint_files(tmp_path / "iteration-1")["metadata"]
    meta = json.loads(metadata_file.read_text())
    meta["model_options"] = ["tf1_bicubic"]
    metadata_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="metadata key 'model_options' is missing or malformed"):
        checkpoints.load_checkpoint(tmp_path / "iteration-1")
