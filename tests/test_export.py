"""Export: a SavedModel reloaded by TensorFlow alone (in a fresh process without bigearthnet_tf), an ONNX
model run by onnxruntime and a safe-mode `.keras` file all return the Keras model's probabilities
(within 1e-4) from raw bands, and carry class names and band order; refusals; the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bigearthnet_tf import checkpoints
from bigearthnet_tf.cli import main
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.export import METADATA_ASSET, export_model
from bigearthnet_tf.inference import sigmoid
from bigearthnet_tf.models import INPUTS
from bigearthnet_tf.predict import predict
from bigearthnet_tf.predictor import load_predictor
from bigearthnet_tf.thresholds import thresholds_path

EXPORT_ATOL = 1e-4
SAMPLES = 5


def save_model(folder, model_name: str, modality: str, label_type: str, classes: int):
    import keras

    from bigearthnet_tf.models import build_model

    keras.utils.set_random_seed(4)
    model = build_model(model_name, classes, modality)
    return checkpoints.save_checkpoint(
        folder / "models" / "iteration-2",
        model,
        model_name=model_name,
        label_type=label_type,
        modality=modality,
        iteration=2,
    )


def raw_inputs(keys, seed: int = 0) -> dict[str, np.ndarray]:
    """Raw band values in the ranges of the archive (S2 digital numbers, S1 dB)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for key in keys:
        side, bands = INPUTS[key].size, INPUTS[key].bands
        low, high = (-30.0, 5.0) if key == "bands_s1" else (0.0, 6000.0)
        inputs[key] = rng.uniform(low, high, (SAMPLES, side, side, len(bands))).astype(np.float32)
    return inputs


@pytest.fixture(scope="module")
def s2(tmp_path_factory):
    """An S2 checkpoint with stored thresholds, test inputs and the Keras model's probabilities."""
    folder = tmp_path_factory.mktemp("export_s2")
    base = save_model(folder, "K-BranchCNN-Tiny", "S2", "BigEarthNet-19", 19)
    predictor = load_predictor(base)
    thresholds = {name: 0.3 + 0.01 * index for index, name in enumerate(BIGEARTHNET_19_LABELS)}
    thresholds_path(base).write_text(
        json.dumps(
            {
                "format": "bigearthnet-tf-thresholds",
                "model_sha256": predictor.model_sha256,
                "thresholds": thresholds,
            }
        )
    )
    inputs = raw_inputs(predictor.input_keys)
    expected = sigmoid(np.asarray(predictor.model(inputs, training=False)))
    return folder, base, inputs, expected, thresholds


def check_metadata(metadata: dict, class_names, keys) -> None:
    assert metadata["format"] == "bigearthnet-tf-export" and metadata["outputs"] == "probabilities"
    assert metadata["class_names"] == list(class_names)
    assert metadata["input_keys"] == list(keys)
    assert metadata["band_order"] == {key: list(INPUTS[key].bands) for key in keys}
    for key in keys:
        side, bands = INPUTS[key].size, INPUTS[key].bands
        assert metadata["inputs"][key] == {
            "shape": [None, side, side, len(bands)],
            "dtype": "float32",
            "bands": list(bands),
        }


SAVED_MODEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    path, inputs_file, out_file = sys.argv[1:]
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    with np.load(inputs_file) as data:
        inputs = {key: tf.constant(data[key]) for key in data.files}
    probabilities = serve(**inputs)["probabilities"].numpy()
    metadata = {key: value.numpy() for key, value in loaded.signatures["metadata"]().items()}
    np.savez(out_file, probabilities=probabilities)
    print(json.dumps({
        "bigearthnet_tf_imported": any(name.startswith("bigearthnet_tf") for name in sys.modules),
        "keras_imported": "keras" in sys.modules,
        "inputs": sorted(serve.structured_input_signature[1]),
        "outputs": sorted(serve.structured_outputs),
        "metadata_json": metadata["metadata_json"].decode(),
        "class_names": [name.decode() for name in metadata["class_names"]],
    }))
    """
)


@pytest.mark.slow
def test_saved_model_reloads_with_tensorflow_alone(s2, tmp_path):
    _, base, inputs, expected, thresholds = s2
    out = tmp_path / "saved"
    result = export_model(base, "saved_model", out)
    assert result.metadata_file == out / METADATA_ASSET
    np.savez(tmp_path / "inputs.npz", **inputs)
    # A fresh interpreter that never imports our package (run from tmp_path, outside the repository).
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            SAVED_MODEL_SCRIPT,
            str(out),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "o.npz"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert not report["bigearthnet_tf_imported"]
    assert report["inputs"] == ["bands_10m", "bands_20m", "bands_60m"]
    assert report["outputs"] == ["probabilities"]
    probabilities = np.load(tmp_path / "o.npz")["probabilities"]
    difference = float(np.abs(probabilities - expected).max())
    print(f"SavedModel vs Keras: max |diff| = {difference:.2e}")
    assert difference <= EXPORT_ATOL

    metadata = json.loads(report["metadata_json"])
    check_metadata(metadata, BIGEARTHNET_19_LABELS, ("bands_10m", "bands_20m", "bands_60m"))
    assert report["class_names"] == list(BIGEARTHNET_19_LABELS)
    assert metadata["thresholds"] == pytest.approx(thresholds)
    assert metadata["source"]["iteration"] == 2 and metadata["model_name"] == "K-BranchCNN-Tiny"
    assert json.loads((out / METADATA_ASSET).read_text()) == metadata

    # Replacing needs --overwrite and leaves no temporary folders.
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export_model(base, "saved_model", out)
    export_model(base, "saved_model", out, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("model_name", "modality", "label_type"),
    [("K-BranchCNN-Tiny", "S2", "BigEarthNet-19"), ("ViT-S8-Tiny", "MM", "original")],
)
def test_onnx_runs_in_onnxruntime(s2, tmp_path, model_name, modality, label_type):
    import onnx
    import onnxruntime

    if model_name == "K-BranchCNN-Tiny":
        _, base, inputs, expected, _ = s2
    else:  # the ViT's exact GELU needs our Erfc conversion; MM adds bands_s1
        base = save_model(tmp_path, model_name, modality, label_type, len(ORIGINAL_LABELS))
        predictor = load_predictor(base)
        inputs = raw_inputs(predictor.input_keys, seed=1)
        expected = sigmoid(np.asarray(predictor.model(inputs, training=False)))
    class_names = BIGEARTHNET_19_LABELS if label_type == "BigEarthNet-19" else ORIGINAL_LABELS
    out = tmp_path / "model.onnx"
    export_model(base, "onnx", out)

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    assert all(i.shape[0] == "batch" for i in session.get_inputs())
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("probabilities", ["batch", len(class_names)])
    ]
    probabilities = session.run(["probabilities"], inputs)[0]
    difference = float(np.abs(probabilities - expected).max())
    print(f"ONNX ({model_name}, {modality}) vs Keras: max |diff| = {difference:.2e}")
    assert difference <= EXPORT_ATOL

    properties = session.get_modelmeta().custom_metadata_map
    assert json.loads(properties["class_names"]) == list(class_names)
    assert json.loads(properties["band_order"]) == {key: list(INPUTS[key].bands) for key in inputs}
    assert properties["modality"] == modality and properties["outputs"] == "probabilities"
    check_metadata(json.loads(properties["bigearthnet_metadata"]), class_names, tuple(inputs))
    onnx.checker.check_model(onnx.load(str(out)))


def test_keras_file_loads_in_safe_mode_and_predicts(s2, synthetic_v1, tmp_path):
    import keras

    import bigearthnet_tf.models  # noqa: F401  (registers the custom layers; documented requirement)

    _, base, inputs, expected, thresholds = s2
    out = tmp_path / "model.keras"
    result = export_model(base, "keras", out)
    loaded = keras.saving.load_model(out, safe_mode=True, compile=False)
    difference = float(np.abs(np.asarray(loaded(inputs)) - expected).max())
    print(f".keras vs Keras: max |diff| = {difference:.2e}")
    assert difference <= EXPORT_ATOL
    assert loaded.layers[-1].name == "probabilities"
    # The metadata travels inside the one file (no sidecar to get out of step with it).
    import zipfile

    with zipfile.ZipFile(out) as archive:
        embedded = json.loads(archive.read("bigearthnet_tf/metadata.json"))
    assert result.metadata_file is None and not (tmp_path / "model.metadata.json").exists()
    check_metadata(embedded, BIGEARTHNET_19_LABELS, ("bands_10m", "bands_20m", "bands_60m"))

    # predict takes the exported file (no second sigmoid) and gives the checkpoint's probabilities.
    folders = sorted((synthetic_v1 / "BigEarthNet-v1.0").iterdir())[:4]
    from_export = predict(out, folders, thresholds_file="stored", show_progress=False)
    from_checkpoint = predict(base, folders, thresholds_file="stored", show_progress=False)
    np.testing.assert_allclose(from_export.probabilities, from_checkpoint.probabilities, atol=1e-6)
    # Asked for, both use the checkpoint's stored thresholds; the exported model carries them in its
    # metadata. Unasked, both use 0.5.
    assert (predict(out, folders, show_progress=False).thresholds == 0.5).all()
    expected_thresholds = [thresholds[c] for c in BIGEARTHNET_19_LABELS]
    np.testing.assert_allclose(from_checkpoint.thresholds, expected_thresholds)
    np.testing.assert_allclose(from_export.thresholds, expected_thresholds)
    assert from_export.labels == from_checkpoint.labels

    # Exporting the exported file again keeps one sigmoid.
    again = export_model(out, "keras", tmp_path / "again.keras")
    reloaded = keras.saving.load_model(again.path, safe_mode=True, compile=False)
    np.testing.assert_allclose(np.asarray(reloaded(inputs)), expected, atol=EXPORT_ATOL)


def test_thresholds_in_an_exported_model_follow_the_thresholds_rule(s2, tmp_path):
    """An exported file whose metadata was edited to hold a threshold outside (0, 1] is refused when
    loaded, naming the file and the class (the rule of thresholds files, thresholds.checked_thresholds)."""
    import zipfile

    from bigearthnet_tf.checkpoints import KERAS_METADATA_ENTRY

    _, base, _, _, _ = s2
    out = export_model(base, "keras", tmp_path / "model.keras").path
    edited = tmp_path / "edited.keras"
    with zipfile.ZipFile(out) as source, zipfile.ZipFile(edited, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == KERAS_METADATA_ENTRY:
                document = json.loads(data)
                document["thresholds"]["Pastures"] = 1.5
                data = json.dumps(document).encode()
            target.writestr(item, data)
    message = r"edited\.keras: metadata thresholds: class 'Pastures': threshold must be in \(0, 1\], got 1\.5"
    with pytest.raises(UserError, match=message):
        load_predictor(edited)


def test_refusals_and_command_line(s2, tmp_path, capsys):
    _, base, _, _, _ = s2
    with pytest.raises(UserError, match="unknown export format 'tflite'"):
        export_model(base, "tflite", tmp_path / "m")
    with pytest.raises(UserError, match=r"one file ending in \.onnx"):
        export_model(base, "onnx", tmp_path / "m.keras")
    with pytest.raises(UserError, match="iteration-9.json not found"):
        export_model(base.with_name("iteration-9"), "keras", tmp_path / "m.keras")

    out = tmp_path / "cli.keras"
    main(["export", "--model", str(base), "--format", "keras", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"keras model written to {out}" in printed and out.is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(base), "--format", "keras", "--out", str(out)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {out} already exists; pass --overwrite to replace it"


@pytest.mark.parametrize(
    ("export_format", "swap"), [("keras", None), ("saved_model", "atomic"), ("saved_model", "two renames")]
)
@pytest.mark.slow
def test_a_killed_export_leaves_the_old_export_whole_and_is_cleaned_up(
    s2, tmp_path, monkeypatch, export_format, swap
):
    """A kill at the rename that publishes an export leaves the earlier export complete (or, where a
    folder cannot be swapped atomically, the next export puts it back); leftovers are removed."""
    import os

    from bigearthnet_tf import files

    _, base, _, _, _ = s2
    out = tmp_path / ("m.keras" if export_format == "keras" else "m_saved_model")
    export_model(base, export_format, out)

    def snapshot():
        return sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())

    before = snapshot()
    real_replace = os.replace

    def killed_rename(source, target, *args, **kwargs):
        if os.fspath(target) == os.fspath(out):
            raise KeyboardInterrupt  # as SIGINT at the rename
        return real_replace(source, target, *args, **kwargs)

    def killed_exchange(first, second):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(files.os, "replace", killed_rename)
        patched.setattr(files, "exchange", killed_exchange if swap == "atomic" else lambda *_: False)
        with pytest.raises(KeyboardInterrupt):
            export_model(base, export_format, out, overwrite=True)
    if swap == "two renames":  # killed between its renames: the old export was moved aside
        assert not out.exists() and list(tmp_path.glob(f".{out.name}.tmp-old-*"))
        files.remove_stale_temporaries(tmp_path, out.name)  # what the next export does first
    assert snapshot() == before  # the old export, whole; nothing half-written beside it
    stale = tmp_path / f".{out.name}.tmp-killed"
    stale.mkdir()
    (stale / "half").write_bytes(b"x")
    export_model(base, export_format, out, overwrite=True)
    assert not stale.exists()
