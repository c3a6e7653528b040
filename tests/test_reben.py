"""reBEN (BigEarthNet v2.0) pretrained models: parity with timm, the checkpoint they become, every use of
it, and every refusal.

The fixtures in `tests/data/reben/` were written by timm itself (`tools/reben_parity.py generate`): the
published architectures with fewer blocks and channels, seeded random weights, in the hub layout, with
timm's logits on a seeded image and on the six real example patches preprocessed as reBEN does. No
PyTorch is needed here; `tools/reben_parity.py check` does the same comparison on full-size models.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import cli, cli_error

from bigearthnet_tf import checkpoints
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS
from bigearthnet_tf.export import export_model
from bigearthnet_tf.inference import sigmoid
from bigearthnet_tf.models import input_keys
from bigearthnet_tf.models.reben import REBEN_BAND_ORDERS, REBEN_STATISTICS
from bigearthnet_tf.reben_import import import_reben

REPOSITORY = Path(__file__).resolve().parents[1]
FIXTURES = REPOSITORY / "tests" / "data" / "reben"
FOLDERS = sorted(path.name for path in FIXTURES.iterdir() if (path / "reference.npz").is_file())
TOLERANCE = 1e-4
RESNET_ALL = "tiny-resnet50-all-v0.2.0"


def _load_tool():
    spec = importlib.util.spec_from_file_location("reben_parity", REPOSITORY / "tools" / "reben_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = _load_tool()


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The tiny ResNet50 S1+S2 v0.2.0 fixture imported once."""
    base = tmp_path_factory.mktemp("reben") / "resnet50-all" / "imported"
    import_reben(FIXTURES / RESNET_ALL, base)
    return base


def test_every_family_modality_and_version_has_a_fixture():
    assert FOLDERS == [
        "tiny-convnextv2_base-s2-v0.2.0",
        "tiny-mixer_b16_224-s2-v0.1.1",
        "tiny-mobilevit_s-all-v0.1.1",
        "tiny-mobilevit_s-s1-v0.2.0",
        "tiny-resnet18-s1-v0.1.1",
        "tiny-resnet50-all-v0.1.1",
        "tiny-resnet50-all-v0.2.0",
        "tiny-vit_base_patch8_224-all-v0.2.0",
    ]


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.slow
def test_logits_equal_timm_network_and_whole_chain(folder, example_paths, tmp_path, capsys):
    """Our network on timm's image, and `predict` on the real example patch folders (with their S1
    twins), against timm on the same image and on reBEN's own preprocessing of the same patches."""
    reference = np.load(FIXTURES / folder / "reference.npz")
    # The comparison can fail: the logits depend on the input (no layer of the fixture is degenerate).
    assert np.abs(reference["image_logits"][0] - reference["image_logits"][1]).max() > 0.01
    assert np.abs(reference["patch_logits"][0] - reference["patch_logits"][1]).max() > 0.01
    differences = parity.check_folder(FIXTURES / folder, example_paths, tmp_path)
    assert differences["network logits"] <= TOLERANCE
    assert differences["predict probabilities"] <= TOLERANCE
    assert f"imported as {tmp_path / folder}" in capsys.readouterr().out


def test_checkpoint_carries_classes_bands_statistics_and_source(imported):
    meta = checkpoints.read_metadata(imported)
    assert meta["model_name"] == "reBEN-ResNet" and meta["modality"] == "MM"
    assert meta["label_type"] == "BigEarthNet-19" and meta["class_names"] == list(BIGEARTHNET_19_LABELS)
    assert meta["input_keys"] == ["bands_10m", "bands_20m", "bands_s1"]
    assert meta["model_options"] == {
        "architecture": {
            "block": "bottleneck",
            "layers": [2, 1, 1, 1],
            "channels": [8, 12, 16, 24],
            "stem_width": 64,
        },
        "band_order": "v0.2.0",
    }
    assert meta["statistics"] == {
        band: list(REBEN_STATISTICS[band]) for band in REBEN_BAND_ORDERS["v0.2.0"]["MM"]
    }
    source = meta["source"]
    assert source["repository"] == RESNET_ALL and source["version"] == "v0.2.0"
    assert source["timm_model_name"] == "resnet50" and source["licence"] == "MIT"
    assert source["files"]["model.safetensors"] == checkpoints.file_sha256(
        FIXTURES / RESNET_ALL / "model.safetensors"
    )


def test_the_version_decides_the_band_order(tmp_path):
    """The v0.1.1 weights read with the v0.2.0 band order give other predictions: the order is live."""
    folder = tmp_path / "renamed"  # a folder name without the version, so --version is needed
    shutil.copytree(FIXTURES / "tiny-resnet50-all-v0.1.1", folder)
    with pytest.raises(Exception, match=r"pass --version \(v0.1.1 or v0.2.0\)"):
        import_reben(folder, tmp_path / "none")
    assert not list(tmp_path.glob("none*"))
    import_reben(folder, tmp_path / "wrong", version="v0.2.0")
    model = checkpoints.load_checkpoint(tmp_path / "wrong").model
    import_reben(folder, tmp_path / "right", version="v0.1.1")
    reference_model = checkpoints.load_checkpoint(tmp_path / "right").model
    rng = np.random.default_rng(0)
    inputs = {
        "bands_10m": rng.uniform(0, 3000, (2, 120, 120, 4)).astype("float32"),
        "bands_20m": rng.uniform(0, 3000, (2, 60, 60, 6)).astype("float32"),
        "bands_s1": rng.uniform(-25, 0, (2, 120, 120, 2)).astype("float32"),
    }
    wrong = keras.ops.convert_to_numpy(model(inputs))
    right = keras.ops.convert_to_numpy(reference_model(inputs))
    assert np.abs(wrong - right).max() > 0.01


def test_hub_cache_layout_names_the_repository(tmp_path):
    cache = tmp_path / "hub" / "models--BIFOLD-BigEarthNetv2-0--resnet50-all-v0.2.0"
    shutil.copytree(FIXTURES / RESNET_ALL, cache / "snapshots" / "0123abc")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abc")
    for source in (cache, cache / "snapshots" / "0123abc"):
        base = tmp_path / source.name / "imported"
        imported = import_reben(source, base)
        assert imported.repository == "BIFOLD-BigEarthNetv2-0/resnet50-all-v0.2.0"
        assert checkpoints.read_metadata(base)["source"]["repository"] == imported.repository


# --- works everywhere a trained model does ------------------------------------------------------------


@pytest.fixture(scope="module")
def v2_records(synthetic_v2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reben_v2") / "records"
    cli("prepare", "-r", synthetic_v2, "-o", out, "--splits", "official", "--s1-root", synthetic_v2)
    return out


def _config(path: Path, records: Path, out_dir: Path, model_file: Path, **changes) -> Path:
    values = {
        "model_name": "reBEN-ResNet",
        "label_type": "BigEarthNet-19",
        "modality": "MM",
        "batch_size": 8,
        "nb_epoch": 1,
        "learning_rate": 1e-4,
        "out_dir": str(out_dir),
        "tr_tf_record_files": str(records / "train-*.tfrecord"),
        "test_tf_record_files": str(records / "test-*.tfrecord"),
        "model_file": str(model_file),
        "shuffle_buffer_size": 10,
        **changes,
    }
    path.write_text(json.dumps(values))
    return path


def test_evaluate_on_v2_records_equals_predict_on_the_archive(imported, synthetic_v2, v2_records, tmp_path):
    """Records through our input pipeline and patch folders through `predict` give the same probabilities."""
    config = _config(tmp_path / "eval.json", v2_records, tmp_path / "eval", imported)
    cli("evaluate", config)
    evaluation = tmp_path / "eval" / "eval" / "imported-test"  # <checkpoint>-<data>
    result = json.loads((evaluation / "eval_result.json").read_text())
    assert 0.0 < result["micro_average_precision"] <= 1.0
    with open(evaluation / "predictions.csv", newline="") as stream:
        evaluated = list(csv.DictReader(stream))
    cli(
        "predict", "--archive", synthetic_v2, "--splits", "official", "--model", imported,
        "--out", tmp_path / "predicted.json",
    )  # fmt: skip
    predicted = {
        row["patch_name"]: row["probabilities"]
        for row in json.loads((tmp_path / "predicted.json").read_text())
    }
    assert evaluated and {row["patch_name"] for row in evaluated} <= set(predicted)
    for row in evaluated:
        for label in BIGEARTHNET_19_LABELS:
            assert float(row[label]) == pytest.approx(predicted[row["patch_name"]][label], abs=1e-6)


@pytest.mark.slow
def test_fine_tune_from_the_imported_checkpoint(imported, v2_records, tmp_path):
    config = _config(tmp_path / "tune.json", v2_records, tmp_path / "tuned", imported, fine_tune=True)
    cli("train", config)
    latest = checkpoints.latest_complete_checkpoint(tmp_path / "tuned" / "models")
    meta = checkpoints.read_metadata(latest)
    assert meta["model_name"] == "reBEN-ResNet"
    assert meta["model_options"] == checkpoints.read_metadata(imported)["model_options"]
    assert meta["statistics"] == checkpoints.read_metadata(imported)["statistics"]
    tuned = checkpoints.load_checkpoint(latest).model
    original = checkpoints.load_checkpoint(imported).model
    changed = [
        not np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(tuned.trainable_weights, original.trainable_weights, strict=True)
    ]
    assert any(changed)


@pytest.mark.parametrize(
    ("folder", "export_format"),
    [
        (RESNET_ALL, "keras"),
        ("tiny-vit_base_patch8_224-all-v0.2.0", "onnx"),
        ("tiny-convnextv2_base-s2-v0.2.0", "saved_model"),
    ],
)
@pytest.mark.slow
def test_export_returns_the_models_probabilities(folder, export_format, tmp_path):
    base = tmp_path / "imported"
    import_reben(FIXTURES / folder, base)
    model = checkpoints.load_checkpoint(base).model
    rng = np.random.default_rng(1)
    inputs = {
        "bands_10m": rng.uniform(0, 3000, (3, 120, 120, 4)).astype("float32"),
        "bands_20m": rng.uniform(0, 3000, (3, 60, 60, 6)).astype("float32"),
        "bands_s1": rng.uniform(-25, 0, (3, 120, 120, 2)).astype("float32"),
    }
    inputs = {key: inputs[key] for key in input_keys(model)}
    expected = sigmoid(keras.ops.convert_to_numpy(model(inputs)))
    out = tmp_path / f"model.{export_format}"
    export_model(base, export_format, out)
    if export_format == "keras":
        loaded = keras.saving.load_model(out, safe_mode=True)
        got = keras.ops.convert_to_numpy(loaded(inputs))
    elif export_format == "saved_model":
        import tensorflow as tf

        serve = tf.saved_model.load(str(out)).signatures["serving_default"]
        got = serve(**{key: tf.constant(value) for key, value in inputs.items()})["probabilities"].numpy()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        names = [item.name for item in session.get_inputs()]
        got = session.run(None, {name: inputs[name] for name in names})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


# --- refusals: one line naming the file, exit 1, no checkpoint left ------------------------------------


def _refused(capsys, tmp_path, source, *extra) -> str:
    out = tmp_path / "out" / "imported"
    code, error = cli_error(capsys, "import", "reben", source, "--out", out, *extra)
    assert code == 1 and error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return error


def _copy(tmp_path, name: str = RESNET_ALL, as_name: str | None = None) -> Path:
    folder = tmp_path / (as_name or name)
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_folder_that_is_not_a_reben_model(tmp_path, capsys):
    folder = tmp_path / "resnet50-all-v0.2.0"
    folder.mkdir()
    assert "is not a reBEN model folder: it needs config.json and model.safetensors" in _refused(
        capsys, tmp_path, folder
    )
    assert "does not exist" in _refused(capsys, tmp_path, tmp_path / "nowhere")
    folder = _copy(tmp_path)
    (folder / "config.json").write_text(json.dumps({"some": "thing"}))
    assert "config.json: no timm_model_name" in _refused(capsys, tmp_path, folder)
    (folder / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _refused(capsys, tmp_path, folder)


def test_an_unknown_timm_architecture(tmp_path, capsys):
    folder = _copy(tmp_path, as_name="mobilevitv2_100-all-v0.2.0")
    _edit_config(folder, timm_model_name="mobilevitv2_100")
    error = _refused(capsys, tmp_path, folder)
    assert "config.json: timm architecture 'mobilevitv2_100' is not supported" in error


def test_a_wrong_channel_count(tmp_path, capsys):
    folder = _copy(tmp_path)
    _edit_config(folder, channels=10)
    error = _refused(capsys, tmp_path, folder)
    assert "config.json: channels 10 contradict the repository name 'tiny-resnet50-all-v0.2.0'" in error
    _edit_config(folder, channels=7)
    assert "channels 7; reBEN models take 2, 10, 12" in _refused(capsys, tmp_path, folder)
    s2 = _copy(tmp_path, as_name="tiny-resnet50-s2-v0.2.0")  # 12-channel weights under an S2 name
    _edit_config(s2, channels=10)
    error = _refused(capsys, tmp_path, s2)
    assert (
        "model.safetensors: the weights do not fit the network (the network takes 10 input channels)" in error
    )
    assert "wrong shape: conv1.weight (64, 12, 7, 7)" in error


def test_a_truncated_or_foreign_weights_file(tmp_path, capsys):
    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "model.safetensors: truncated or not a safetensors file" in _refused(capsys, tmp_path, folder)
    weights.write_bytes(b"\x00" * 8)
    assert "model.safetensors: truncated or not a safetensors file" in _refused(capsys, tmp_path, folder)


def test_missing_extra_and_misshaped_tensors_are_reported(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.vision_encoder.layer2.0.bn1.weight"]
    tensors["model.vision_encoder.layer9.0.conv1.weight"] = np.zeros((1,), "float32")
    tensors["optimizer.state"] = np.zeros((1,), "float32")
    tensors["model.vision_encoder.fc.bias"] = np.zeros((18,), "float32")
    save_file(tensors, folder / "model.safetensors")
    error = _refused(capsys, tmp_path, folder)
    assert "missing: layer2.0.bn1.weight" in error
    assert "unexpected: layer9.0.conv1.weight, optimizer.state (not under model.vision_encoder.)" in error
    assert "wrong shape: fc.bias (18,)" in error


def test_version_contradictions_and_hub_ids(tmp_path, capsys, monkeypatch):
    error = _refused(capsys, tmp_path, FIXTURES / RESNET_ALL, "--version", "v0.1.1")
    assert "--version v0.1.1 contradicts the repository name 'tiny-resnet50-all-v0.2.0'" in error
    folder = _copy(tmp_path, as_name="resnet101-all-v0.2.0")
    assert "timm_model_name 'resnet50' contradicts the repository name" in _refused(capsys, tmp_path, folder)
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # not installed
    error = _refused(capsys, tmp_path, "hf://BIFOLD-BigEarthNetv2-0/resnet50-all-v0.2.0")
    assert "hf://BIFOLD-BigEarthNetv2-0/resnet50-all-v0.2.0 needs the huggingface_hub package" in error


def test_an_existing_checkpoint_is_kept_without_overwrite(imported, tmp_path, capsys):
    before = checkpoints.checkpoint_files(imported)["metadata"].read_bytes()
    code, error = cli_error(capsys, "import", "reben", FIXTURES / RESNET_ALL, "--out", imported)
    assert code == 1 and "exists; pass --overwrite" in error
    assert checkpoints.checkpoint_files(imported)["metadata"].read_bytes() == before


def _rewrite_weights(folder: Path, change) -> None:
    """Apply `change(name, array) -> (array, dtype name)` to every tensor and write the file back in
    the safetensors layout (by hand: bfloat16 is not a numpy dtype)."""
    import struct

    from bigearthnet_tf.tensor_files import SafetensorsFile

    weights = folder / "model.safetensors"
    with SafetensorsFile(weights) as stored:
        kept = {name: e for name, e in stored.tensors.items() if e.dtype not in ("F32", "F16", "BF16")}
        arrays = {name: stored.array(name) for name in stored.tensors if name not in kept}
        raw = {
            name: (np.zeros(e.shape), bytes(weights.read_bytes()[e.begin : e.end]))
            for name, e in kept.items()
        }
    header, blobs, offset = {}, [], 0
    for name in [*arrays, *raw]:
        if name in raw:
            array, data, dtype = raw[name][0], raw[name][1], kept[name].dtype
        else:
            array = arrays[name]
            data, dtype = change(name, array)
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def _bfloat16_bits(array: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(array, "<f4").view("<u4") >> 16).astype("<u2")


def test_bfloat16_and_float16_weights_import_exactly(tmp_path, capsys):
    """Every bfloat16 or float16 value is a float32 value: the import equals the float32 file's."""
    from bigearthnet_tf.checkpoints import load_checkpoint

    reference, bf16, f16 = (
        _copy(tmp_path, as_name=f"{kind}-resnet50-all-v0.2.0") for kind in ("a", "b", "c")
    )
    _rewrite_weights(
        reference, lambda n, a: ((_bfloat16_bits(a).astype("<u4") << 16).view("<f4").tobytes(), "F32")
    )
    _rewrite_weights(bf16, lambda n, a: (_bfloat16_bits(a).tobytes(), "BF16"))
    _rewrite_weights(f16, lambda n, a: (a.astype("<f2").tobytes(), "F16"))
    models = {}
    for folder in (reference, bf16, f16):
        cli("import", "reben", folder, "--out", tmp_path / "out" / folder.name)
        models[folder.name] = load_checkpoint(tmp_path / "out" / folder.name).model
    for first, second in zip(
        models["a-resnet50-all-v0.2.0"].weights, models["b-resnet50-all-v0.2.0"].weights, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    conv = next(w for w in models["c-resnet50-all-v0.2.0"].weights if "conv" in w.path)
    assert np.asarray(conv).dtype == np.float32 and np.any(np.asarray(conv) != 0)


def test_weights_with_nan_or_infinity_are_refused(tmp_path, capsys):
    folder = _copy(tmp_path)

    def poison(name, array):
        array = array.copy()
        if name.endswith("layer1.0.conv1.weight"):
            array.flat[3] = np.nan
        return array.astype("<f4").tobytes(), "F32"

    _rewrite_weights(folder, poison)
    error = _refused(capsys, tmp_path, folder)
    assert "tensor model.vision_encoder.layer1.0.conv1.weight holds 1 NaN or infinite values" in error


def test_a_header_that_claims_more_than_the_file_is_refused_before_reading(tmp_path, capsys):
    import resource
    import struct

    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    name = "model.vision_encoder.fc.weight"
    header[name]["shape"] = [19, 1 << 28]  # 20 GB claimed
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = _refused(capsys, tmp_path, folder)
    assert f"tensor {name}: F32 [19, 268435456] needs" in error
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024
    weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])  # a header longer than the file
    assert "a header of 1,099,511,627,776 bytes in a file of" in _refused(capsys, tmp_path, folder)


@pytest.mark.parametrize("model_id", ["hf://../../etc", "hf://org/../../x", "hf://org", "hf:///abs/path"])
def test_a_hub_id_that_is_not_one(tmp_path, capsys, monkeypatch, model_id):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    assert f"{model_id} is not a model id" in _refused(capsys, tmp_path, model_id)
