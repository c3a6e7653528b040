"""Sentinel backbones: TorchGeo `.pth` files read safely, parity with timm (committed fixtures written by
`tools/torchgeo_parity.py`), fine-tuning from a backbone (frozen or with its own rate), and `embed`."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import make_patches, write_records
from test_train import config_values

from bigearthnet_tf import checkpoints
from bigearthnet_tf.cli import main
from bigearthnet_tf.config import config_from_dict
from bigearthnet_tf.embed import embed
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.examples import example_archive
from bigearthnet_tf.predict import predict
from bigearthnet_tf.tensor_files import TorchStateDict
from bigearthnet_tf.torchgeo_import import import_torchgeo
from bigearthnet_tf.train import train

FIXTURES = Path(__file__).parent / "data" / "torchgeo"
S2_FILE = FIXTURES / "tiny-resnet18_sentinel2_all_moco.pth"
S1_FILE = FIXTURES / "tiny-resnet50_sentinel1_all_moco.pth"
S2_WEIGHTS = "ResNet18_Weights.SENTINEL2_ALL_MOCO"
S1_WEIGHTS = "ResNet50_Weights.SENTINEL1_ALL_MOCO"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def s2_backbone(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("backbone") / "ssl4eo-r18"
    import_torchgeo(S2_FILE, S2_WEIGHTS, base)
    return base


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return example_archive(tmp_path_factory.mktemp("examples"))


# --- reading .pth files ---------------------------------------------------------------------------


def test_state_dict_is_read_without_torch_with_its_shapes():
    with TorchStateDict(S2_FILE) as stored:
        shapes = stored.shapes()
        assert shapes["conv1.weight"] == (64, 13, 7, 7)  # timm's layout, 13 input channels
        assert not any(key.startswith("fc.") for key in shapes)  # TorchGeo's files carry no head
        kernel = stored.array("conv1.weight")
    assert kernel.dtype == np.float32 and np.isfinite(kernel).all() and kernel.std() > 0


def _zip_with_pickle(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    return path


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bigearthnet-pwned",))


def test_a_pickle_that_calls_a_function_is_refused_and_nothing_runs(tmp_path):
    hostile = _zip_with_pickle(tmp_path / "hostile.pth", pickle.dumps({"conv1.weight": _Hostile()}))
    marker = Path("/tmp/bigearthnet-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(UserError) as caught:
        import_torchgeo(hostile, S2_WEIGHTS, tmp_path / "out")
    assert "refused: the pickle asks for posix.system" in str(caught.value) or "os.system" in str(caught.value)
    assert str(hostile) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "storage size"])
def test_damaged_files_are_one_line_and_write_nothing(tmp_path, damage):
    data = S2_FILE.read_bytes()
    broken = tmp_path / "broken.pth"
    if damage == "truncated":
        broken.write_bytes(data[: len(data) // 2])
    elif damage == "not a zip":
        broken.write_bytes(b"\x80\x02this is an old-style pickle, not a zip")
    else:  # one storage shorter than its tensor claims
        with zipfile.ZipFile(S2_FILE) as source, zipfile.ZipFile(broken, "w") as target:
            for info in source.infolist():
                content = source.read(info)
                if "/data/" in info.filename and len(content) > 64:
                    content = content[:-4]
                target.writestr(info, content)
    with pytest.raises(UserError) as caught:
        import_torchgeo(broken, S2_WEIGHTS, tmp_path / "out")
    assert str(broken) in str(caught.value) and "\n" not in str(caught.value)
    assert not list(tmp_path.glob("out*"))


def test_weights_of_another_kind_and_bad_names_are_refused(tmp_path):
    with pytest.raises(UserError, match="the weights do not fit ResNet50_Weights.SENTINEL2_ALL_MOCO"):
        import_torchgeo(S1_FILE, "ResNet50_Weights.SENTINEL2_ALL_MOCO", tmp_path / "out")  # 2 vs 13 bands
    with pytest.raises(UserError, match="unknown --weights 'ResNet50_Weights.SENTINEL2_RGB'"):
        import_torchgeo(S2_FILE, "ResNet50_Weights.SENTINEL2_RGB", tmp_path / "out")
    renamed = tmp_path / "resnet18_sentinel2_all_moco-59bfdff9.pth"  # the published name, other bytes
    renamed.write_bytes(S2_FILE.read_bytes())
    with pytest.raises(UserError, match="does not start with 59bfdff9, as its name says"):
        import_torchgeo(renamed, S2_WEIGHTS, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_list_names_every_supported_weight(capsys):
    main(["import", "torchgeo", "--list"])
    listing = capsys.readouterr().out
    for name in (
        "ResNet50_Weights.SENTINEL2_ALL_MOCO",
        "ResNet50_Weights.SENTINEL1_ALL_MOCO",
        "ResNet18_Weights",
        "ResNet50_Weights.SENTINEL2_ALL_SOFTCON",
        "ResNet50_Weights.SENTINEL1_GRD_SOFTCON",
    ):
        assert name in listing
    assert "13 L1C bands (B10 zero)" in listing


# --- parity with timm -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "weights"),
    [
        (S2_FILE.stem, S2_WEIGHTS),
        (S1_FILE.stem, S1_WEIGHTS),
        ("tiny-vit_small_patch16_224_sentinel2_all_dino", "ViTSmall16_Weights.SENTINEL2_ALL_DINO"),
        ("tiny-B13_rn50_softcon", "ResNet50_Weights.SENTINEL2_ALL_SOFTCON"),  # standardised, B10 a raw zero
    ],
)
def test_features_equal_timms_network_and_whole_chain(tmp_path, examples, stem, weights):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from torchgeo_parity import channels_of, image, our_features

    reference = np.load(FIXTURES / f"{stem}.npz")
    base = tmp_path / stem
    import_torchgeo(FIXTURES / f"{stem}.pth", weights, base)
    ours = our_features(base, image(int(reference["image_seed"]), channels_of(weights)))
    np.testing.assert_allclose(ours, reference["image_features"], rtol=0, atol=TOLERANCE)
    assert reference["image_features"].std() > 0.1  # the reference depends on its input
    folders = sorted(p for p in examples.s2.iterdir() if p.is_dir())
    embedded = embed(base, folders, s1_root=examples.s1)
    order = [embedded.names.index(str(name)) for name in reference["patch_names"]]
    np.testing.assert_allclose(embedded.features[order], reference["patch_features"], rtol=0, atol=TOLERANCE)


# --- using a backbone -------------------------------------------------------------------------------


def test_embed_from_records_equals_embed_from_the_patch_folders(tmp_path, s2_backbone, examples):
    """Records prepared from the example patches give their folders' features, named and in order."""
    folders = sorted(p for p in examples.s2.iterdir() if p.is_dir())
    names = [folder.name for folder in folders]
    split = tmp_path / "all.csv"
    split.write_text("".join(f"{name}\n" for name in names))
    records = tmp_path / "records"
    main(["prepare", "-r", str(examples.s2), "-o", str(records), "--splits", str(split)])
    from_folders = embed(s2_backbone, folders)
    out = tmp_path / "f.parquet"
    main(["embed", "--records", str(records), "--model", str(s2_backbone), "--out", str(out)])
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    order = [from_folders.names.index(name) for name in table["patch_name"]]
    assert sorted(table["patch_name"]) == sorted(names)
    np.testing.assert_allclose(np.array(table["features"]), from_folders.features[order], rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="give one of"):
        embed(s2_backbone, folders, records=[records])


def test_a_backbone_is_not_a_classifier(s2_backbone, examples):
    folders = sorted(p for p in examples.s2.iterdir() if p.is_dir())
    with pytest.raises(UserError, match="is a backbone without a trained head"):
        predict(s2_backbone, folders, show_progress=False, emit=False)


def test_embed_writes_npy_with_names_or_parquet(tmp_path, s2_backbone, examples, capsys):
    import pyarrow.parquet as pq

    folders = [str(p) for p in sorted(examples.s2.iterdir()) if p.is_dir()]
    main(["embed", *folders, "--model", str(s2_backbone), "--out", str(tmp_path / "f.npy")])
    features = np.load(tmp_path / "f.npy")
    names = (tmp_path / "f.names.txt").read_text().split()
    assert features.shape == (6, 24) and names == [Path(f).name for f in folders]
    assert "6 embeddings of 24 features" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an existing output is kept
        main(["embed", *folders, "--model", str(s2_backbone), "--out", str(tmp_path / "f.npy")])
    main(["embed", *folders, "--model", str(s2_backbone), "--out", str(tmp_path / "f.parquet")])
    table = pq.read_table(tmp_path / "f.parquet").to_pydict()
    assert table["patch_name"] == names
    np.testing.assert_array_equal(np.array(table["features"], np.float32), features)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("records")
    write_records(folder / "train-00000-of-00001.tfrecord", make_patches(24, 1))
    write_records(folder / "val-00000-of-00001.tfrecord", make_patches(8, 3))
    return folder


def _fine_tune(records: Path, out_dir: Path, backbone: Path, **changes):
    settings = {
        "model_name": "SSL4EO-ResNet",
        "backbone_weights": str(backbone),
        "nb_epoch": 1,
        "tr_tf_record_files": [str(records / "train-*.tfrecord")],
        "val_tf_record_files": [str(records / "val-00000-of-00001.tfrecord")],
        "test_tf_record_files": ...,
        "training_size": ...,
        "test_size": ...,
        "save_checkpoint_per_iteration": None,
        "save_checkpoint_after_iteration": 0,
    }
    values = config_values(records, out_dir, **{**settings, **changes})
    return train(config_from_dict(values, "train"))


def _weights(base: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stem kernel, a batch-norm moving mean, head kernel) of a checkpoint."""
    model, _, _ = checkpoints.load_checkpoint(base)
    network = model.get_layer("network")
    return (
        network.get_layer("conv1").kernel.numpy(),
        network.get_layer("bn1").moving_mean.numpy(),
        network.get_layer("fc").kernel.numpy(),
    )


@pytest.mark.slow
def test_fine_tune_frozen_keeps_the_backbone_and_unfrozen_moves_it(tmp_path, records, s2_backbone):
    start = _weights(s2_backbone)
    frozen = _fine_tune(records, tmp_path / "frozen", s2_backbone, freeze_backbone=True)
    stem, moving_mean, head = _weights(tmp_path / "frozen" / "models" / f"iteration-{frozen.iterations}")
    np.testing.assert_array_equal(stem, start[0])
    np.testing.assert_array_equal(moving_mean, start[1])  # batch norm ran in inference mode
    assert head.shape == (24, 19) and np.abs(head).max() > 0  # the new head learned (it starts random)

    slow = _fine_tune(records, tmp_path / "slow", s2_backbone, backbone_learning_rate_scale=0.01)
    full = _fine_tune(records, tmp_path / "full", s2_backbone)
    slow_stem = _weights(tmp_path / "slow" / "models" / f"iteration-{slow.iterations}")[0]
    full_stem = _weights(tmp_path / "full" / "models" / f"iteration-{full.iterations}")[0]
    moved_slow, moved_full = np.abs(slow_stem - start[0]).max(), np.abs(full_stem - start[0]).max()
    assert 0 < moved_slow < moved_full / 20  # Adam steps scale with the rate: about 1/100 of the full move
    meta = checkpoints.read_metadata(tmp_path / "slow" / "models" / f"iteration-{slow.iterations}")
    assert meta["config"]["backbone_learning_rate_scale"] == 0.01
    assert meta["model_options"]["band_order"] == "ssl4eo-s2" and meta["model_options"]["image_size"] == 224


@pytest.mark.slow
def test_a_fine_tune_resumes_bit_identically_exports_and_maps(tmp_path, records, s2_backbone, examples):
    """From an imported backbone, with the backbone at a tenth of the head's rate: a run killed before
    its last checkpoint and resumed ends with the uninterrupted run's weights, bit for bit; the
    result exports to a safe-mode `.keras` file and `map` gives what `predict` gives on the patches."""
    import shutil

    import keras
    import rasterio

    from bigearthnet_tf.export import export_model
    from bigearthnet_tf.mapping import MapOptions, map_scenes
    from bigearthnet_tf.synth_scene import mosaic_bands, write_scene

    changes = {
        "backbone_learning_rate_scale": 0.1,
        "nb_epoch": 2,
        "save_checkpoint_per_iteration": 1,
        "resume": "auto",
        "augmentation": True,
    }
    reference = _fine_tune(records, tmp_path / "reference", s2_backbone, **changes)
    total = reference.iterations
    assert total == 6
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    models = tmp_path / "resumed" / "models"
    for path in checkpoints.checkpoint_files(checkpoints.checkpoint_base(models, total)).values():
        path.unlink(missing_ok=True)  # as if killed before the last checkpoint
    assert checkpoints.latest_complete_checkpoint(models).name == f"iteration-{total - 1}"
    resumed = _fine_tune(records, tmp_path / "resumed", s2_backbone, **changes)
    assert resumed.iterations == total
    expected = checkpoints.load_checkpoint(reference.final_checkpoint)
    got = checkpoints.load_checkpoint(resumed.final_checkpoint)
    for want, have in zip(expected.model.get_weights(), got.model.get_weights(), strict=True):
        np.testing.assert_array_equal(have, want)
    start = _weights(s2_backbone)[0]
    assert np.abs(_weights(resumed.final_checkpoint)[0] - start).max() > 0  # the backbone was trained

    folders = sorted(p for p in examples.s2.iterdir() if p.is_dir())
    predicted = predict(resumed.final_checkpoint, folders, show_progress=False, emit=False)
    exported = export_model(resumed.final_checkpoint, "keras", tmp_path / "model.keras").path
    assert keras.saving.load_model(exported, safe_mode=True, compile=False).layers[-1].name == "probabilities"
    from_export = predict(exported, folders, show_progress=False, emit=False)
    np.testing.assert_allclose(from_export.probabilities, predicted.probabilities, atol=1e-5)

    bands, _ = mosaic_bands([folders[:3], folders[3:]])
    scene = write_scene(bands, tmp_path / "scene.tif", "geotiff")
    options = MapOptions()
    mapped = map_scenes([scene], resumed.final_checkpoint, tmp_path / "maps", options, show_progress=False)[0]
    with rasterio.open(mapped.folder / "probabilities.tif") as dataset:
        probabilities = dataset.read()
    assert probabilities.shape == (19, 2, 3)
    np.testing.assert_allclose(
        probabilities.transpose(1, 2, 0).reshape(6, 19), predicted.probabilities, rtol=0, atol=1e-5
    )


@pytest.mark.slow
def test_a_full_size_resnet50_backbone_fine_tunes_frozen_and_unfrozen(tmp_path, records):
    """The published architecture (ResNet50, 13 bands at 224 px; seeded weights saved as an imported
    backbone is), on half the training records: the frozen probe keeps the backbone, both runs learn
    (validation loss falls)."""
    import keras

    from bigearthnet_tf.models import build_model

    keras.utils.set_random_seed(5)
    model = build_model("SSL4EO-ResNet", 19, "S2", None, band_order="ssl4eo-s2")
    assert model.count_params() > 23_000_000
    base = tmp_path / "r50"
    checkpoints.save_checkpoint(
        base, model, model_name="SSL4EO-ResNet", label_type="BigEarthNet-19", modality="S2", iteration=0,
        kind=checkpoints.KIND_BACKBONE,
    )  # fmt: skip
    start = _weights(base)
    for name, changes in (("frozen", {"freeze_backbone": True}), ("unfrozen", {})):
        result = _fine_tune(
            records, tmp_path / name, base, nb_epoch=2, learning_rate=1e-3, training_fraction=0.5, **changes
        )
        stem = _weights(tmp_path / name / "models" / f"iteration-{result.iterations}")[0]
        assert (np.abs(stem - start[0]).max() == 0) == (name == "frozen")
        losses = [entry["loss"] for entry in result.validations]
        assert losses[-1] < losses[0], (name, losses)


def test_backbone_of_another_model_or_modality_is_refused(tmp_path, records, s2_backbone):
    with pytest.raises(UserError, match="SSL4EO-ResNet") as caught:
        _fine_tune(records, tmp_path / "other", s2_backbone, model_name="ResNet-Tiny")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="modality"):
        _fine_tune(records, tmp_path / "s1", s2_backbone, modality="S1")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"training_fraction": 0}, "training_fraction"),
        ({"training_fraction": 1.5}, "training_fraction"),
        ({"freeze_backbone": True}, "key 'freeze_backbone' needs backbone_weights"),
        ({"backbone_learning_rate_scale": 0.1}, "key 'backbone_learning_rate_scale' needs backbone_weights"),
        ({"backbone_weights": "nowhere/backbone"}, "key 'backbone_weights': no checkpoint 'nowhere/backbone'"),
    ],
)
def test_backbone_and_fraction_keys_are_checked(tmp_path, records, changes, fragment):
    from bigearthnet_tf.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        config_from_dict(config_values(records, tmp_path, **changes), "train")


def test_vit_layer_decay_scales_each_block_and_the_embedding(tmp_path):
    from bigearthnet_tf.backbones import learning_rate_scales

    base = tmp_path / "vit"
    import_torchgeo(FIXTURES / "tiny-vit_small_patch16_224_sentinel2_all_dino.pth", "ViTSmall16_Weights.SENTINEL2_ALL_DINO", base)
    model, _, _ = checkpoints.load_checkpoint(base)
    scales = dict(zip((v.path for v in model.trainable_variables), learning_rate_scales(model, 0.5, 0.8), strict=True))
    assert scales["head/kernel"] == 1.0  # the new head learns at the full rate
    assert scales["norm/gamma"] == 0.5  # the final norm: the backbone rate, no decay
    assert scales["blocks.1.attn.qkv/kernel"] == pytest.approx(0.5 * 0.8)  # the last of 2 blocks
    assert scales["blocks.0.mlp.fc1/kernel"] == pytest.approx(0.5 * 0.8**2)
    assert scales["patch_embed.proj/kernel"] == pytest.approx(0.5 * 0.8**3)
    assert scales["embedding/pos_embed"] == pytest.approx(0.5 * 0.8**3)
