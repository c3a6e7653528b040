"""The JSON config: 2019 keys with their meaning, defaults, path resolution, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bigearthnet_tf.cli import main
from bigearthnet_tf.config import (
    DEFAULT_SHUFFLE_BUFFER,
    KEY_NAMES,
    Config,
    load_config,
    read_statistics_file,
    save_config,
)
from bigearthnet_tf.errors import ConfigError

# Every key of the 2019 README, as the 2019 configs wrote them (paths changed to test files).
CONFIG_2019 = {
    "model_name": "ResNet50",
    "label_type": "BigEarthNet-19",
    "batch_size": 500,
    "nb_epoch": 100,
    "learning_rate": 1e-3,
    "out_dir": "runs/ResNet50",
    "save_checkpoint_after_iteration": 6000,
    "save_checkpoint_per_iteration": 600,
    "tr_tf_record_files": ["data/train.tfrecord"],
    "val_tf_record_files": ["data/val.tfrecord"],
    "test_tf_record_files": ["data/test.tfrecord"],
    "fine_tune": False,
    "model_file": "runs/ResNet50/models/iteration-53939",
    "shuffle_buffer_size": 130000,
    "training_size": 269695,
    "test_size": 125866,
}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with record files where the 2019 configs expect them."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.tfrecord", "val.tfrecord", "test.tfrecord", "more-1.tfrecord", "more-2.tfrecord"):
        (data / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(folder: Path, values: dict, name: str = "config.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


def with_changes(**changes) -> dict:
    values = {**CONFIG_2019, **changes}
    return {key: value for key, value in values.items() if value is not ...}


# --- the 2019 keys and their meaning -------------------------------------------------------------


def test_2019_config_loads_with_every_key(workdir):
    config = load_config(write_config(workdir, CONFIG_2019), purpose="train")
    assert isinstance(config, Config)
    assert config.model_name == "ResNet50" and config.label_type == "BigEarthNet-19"
    assert (config.batch_size, config.nb_epoch, config.learning_rate) == (500, 100, 1e-3)
    assert (config.save_checkpoint_after_iteration, config.save_checkpoint_per_iteration) == (6000, 600)
    assert config.tr_tf_record_files == (str(workdir / "data" / "train.tfrecord"),)
    assert config.val_tf_record_files == (str(workdir / "data" / "val.tfrecord"),)
    assert config.out_dir == workdir / "runs" / "ResNet50"  # relative to the working directory (2019)
    assert config.fine_tune is False and config.shuffle_buffer_size == 130000
    assert (config.training_size, config.test_size) == (269695, 125866)
    # New keys default to the 2019 behaviour.
    assert (config.modality, config.seed, config.distribution, config.resume) == ("S2", 42, "auto", "never")
    assert (config.mixed_precision, config.jit_compile, config.optimizer, config.lr_schedule) == (
        False,
        False,
        "adam",
        "constant",
    )


def test_config_is_frozen(workdir):
    config = load_config(write_config(workdir, CONFIG_2019), purpose="train")
    with pytest.raises(AttributeError):
        config.batch_size = 1  # type: ignore[misc]


def test_minimal_training_config_takes_defaults(workdir):
    minimal = {
        key: CONFIG_2019[key]
        for key in ("model_name", "label_type", "batch_size", "nb_epoch", "learning_rate", "out_dir")
    }
    minimal["tr_tf_record_files"] = "data/train.tfrecord"  # a single string is a one-file list
    config = load_config(write_config(workdir, minimal), purpose="train")
    assert config.save_checkpoint_after_iteration == 0
    assert config.save_checkpoint_per_iteration is None
    assert config.val_tf_record_files == () and config.model_file is None
    assert config.shuffle_buffer_size == DEFAULT_SHUFFLE_BUFFER
    assert config.given_keys == frozenset(minimal)


def test_evaluation_needs_only_its_keys(workdir):
    checkpoint = workdir / "runs" / "models" / "iteration-5"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.with_name("iteration-5.json").write_text("{}")
    values = {
        "batch_size": 10,
        "out_dir": "runs",
        "test_tf_record_files": ["data/test.tfrecord"],
        "model_file": "runs/models/iteration-5",
    }
    config = load_config(write_config(workdir, values), purpose="evaluate")
    assert config.model_name is None and config.label_type is None
    assert config.model_file == str(checkpoint)
    assert config.saved_config_path == workdir / "runs" / "eval_config.json"


def test_globs_folders_and_config_relative_paths(workdir, monkeypatch):
    configs = workdir / "configs"
    configs.mkdir()
    path = write_config(
        configs,
        with_changes(
            tr_tf_record_files=["../data/more-*.tfrecord", "../data/more-1.tfrecord"],
            val_tf_record_files=None,  # null: not given
        ),
    )
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing under the working directory: the config's folder is next
    config = load_config(path, purpose="train")
    data = workdir / "data"
    assert config.tr_tf_record_files == (str(data / "more-1.tfrecord"), str(data / "more-2.tfrecord"))
    assert config.out_dir == elsewhere / "runs" / "ResNet50"
    folder = load_config(
        write_config(configs, with_changes(tr_tf_record_files=str(data), val_tf_record_files=None)), "train"
    )
    assert len(folder.tr_tf_record_files) == 5


def test_empty_optional_file_list_is_not_given_and_round_trips(workdir):
    config = load_config(write_config(workdir, with_changes(val_tf_record_files=[])), purpose="train")
    assert config.val_tf_record_files == () and not config.given("val_tf_record_files")
    saved = save_config(config)
    assert json.loads(saved.read_text())["val_tf_record_files"] is None
    assert load_config(saved, purpose="train") == config


def test_saved_config_round_trips_and_keeps_a_different_earlier_one(workdir):
    config = load_config(write_config(workdir, CONFIG_2019), purpose="train")
    saved = save_config(config)
    assert saved == config.out_dir / "config.json"
    reloaded = load_config(saved, purpose="train")
    assert reloaded == config
    assert set(json.loads(saved.read_text())) == set(KEY_NAMES)
    save_config(config)  # same content: left alone
    assert not (config.out_dir / "config.1.json").exists()
    changed = load_config(write_config(workdir, with_changes(batch_size=250), "b.json"), purpose="train")
    save_config(changed)
    assert json.loads((config.out_dir / "config.1.json").read_text())["batch_size"] == 500
    assert json.loads(saved.read_text())["batch_size"] == 250
    assert oct(saved.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def statistics_document(bands: dict) -> str:
    """A statistics file as `bigearthnet stats` writes it."""
    return json.dumps({"format": "bigearthnet-tf-statistics", "version": 1, "bands": bands})


def test_statistics_file(workdir):
    (workdir / "stats.json").write_text(
        statistics_document(
            {"B02": {"mean": 400.0, "std": 500.0, "pixels": 14400}, "VV": {"mean": -12, "std": 5}}
        )
    )
    assert read_statistics_file(workdir / "stats.json") == {"B02": (400.0, 500.0), "VV": (-12.0, 5.0)}
    config = load_config(write_config(workdir, with_changes(statistics_file="stats.json")), purpose="train")
    assert config.statistics_file == workdir / "stats.json"
    assert dict(config.statistics) == {"B02": (400.0, 500.0), "VV": (-12.0, 5.0)}
    (workdir / "bad.json").write_text(statistics_document({"B02": {"mean": 400.0, "std": 0.0}}))
    with pytest.raises(
        ConfigError, match=r"statistics_file: .*bad\.json: bands\.B02\.std must be finite and > 0"
    ):
        load_config(write_config(workdir, with_changes(statistics_file="bad.json")), purpose="train")
    (workdir / "plain.json").write_text(json.dumps({"B02": [400.0, 500.0]}))
    with pytest.raises(ConfigError, match=r"plain\.json: not a statistics file"):
        read_statistics_file(workdir / "plain.json")


# --- errors: one line naming the key and the value, exit code 2 ----------------------------------

ERROR_CASES = [
    # (changes, purpose, pattern the message must match)
    ({"batch_size": True}, "train", r"key 'batch_size': expected an integer, not a boolean, got true"),
    ({"batch_size": 0}, "train", r"key 'batch_size': expected an integer >= 1, got 0"),
    ({"batch_size": 1.5}, "train", r"key 'batch_size': expected an integer, not a number, got 1.5"),
    ({"batch_size": "500"}, "train", r"key 'batch_size': expected an integer, not a string, got \"500\""),
    ({"learning_rate": 0}, "train", r"key 'learning_rate': expected a number > 0, got 0"),
    ({"learning_rate": "1e-3"}, "train", r"key 'learning_rate': expected a number, not a string"),
    (
        {"fine_tune": "false"},
        "train",
        r"key 'fine_tune': expected true or false, not a string, got \"false\"",
    ),
    ({"fine_tune": 0}, "train", r"key 'fine_tune': expected true or false, not a number, got 0"),
    ({"nb_epochs": 10}, "train", r"unknown key 'nb_epochs' \(did you mean 'nb_epoch'\?\)"),
    (
        {"pretrained_model_path": "x"},
        "train",
        r"unknown key 'pretrained_model_path' \(did you mean 'model_file'",
    ),
    (
        {"label_type": "BigEarthNet19"},
        "train",
        r"key 'label_type': unknown value \"BigEarthNet19\" \(did you mean",
    ),
    ({"modality": "S3"}, "train", r"key 'modality': unknown value \"S3\".*expected S2 \| S1 \| MM"),
    (
        {"model_name": "ResNet5"},
        "train",
        r"unknown model_name 'ResNet5' \(did you mean 'ResNet50'.*known models: .*VGG16",
    ),
    ({"model_name": ...}, "train", r"missing key 'model_name' \(required to train\)"),
    ({"tr_tf_record_files": ...}, "train", r"missing key 'tr_tf_record_files'"),
    ({"tr_tf_record_files": []}, "train", r"key 'tr_tf_record_files': expected at least one file, got \[\]"),
    ({"tr_tf_record_files": [1]}, "train", r"key 'tr_tf_record_files': expected a file name, glob or folder"),
    ({"tr_tf_record_files": ["data/nope-*.tfrecord"]}, "train", r"key 'tr_tf_record_files': no file matches"),
    (
        {"val_tf_record_files": ["data/missing.tfrecord"]},
        "train",
        r"'val_tf_record_files': no such file or folder",
    ),
    (
        {"test_tf_record_files": ...},
        "evaluate",
        r"missing key 'test_tf_record_files' \(required to evaluate\)",
    ),
    (
        {"model_file": "runs/none/iteration-1"},
        "evaluate",
        r"key 'model_file': no checkpoint 'runs/none/iteration-1'",
    ),
    (
        {"fine_tune": True, "model_file": None},
        "train",
        r"missing key 'model_file' \(required when fine_tune is true\)",
    ),
    ({"resume": "yes"}, "train", r"key 'resume': unknown value \"yes\"; expected never \| auto"),
    ({"distribution": "horovod"}, "train", r"key 'distribution': unknown value \"horovod\""),
    ({"threshold": 1.5}, "train", r"key 'threshold': expected a number > 0 and <= 1, got 1.5"),
    ({"weight_decay": 0.01}, "train", r"key 'weight_decay': 0.01 needs \"optimizer\": \"adamw\""),
    ({"statistics_file": "nope.json"}, "train", r"key 'statistics_file': no such file: 'nope.json'"),
    (
        {"early_stopping_patience": 3, "val_tf_record_files": ...},
        "train",
        r"'early_stopping_patience': 3 needs val",
    ),
    # Found by fuzzing: each was a crash, now a clean error.
    ({"learning_rate": 10**400}, "train", r"key 'learning_rate': expected a finite number, got 1000"),
    ({"batch_size": 2**70}, "train", r"key 'batch_size': expected an integer of at most 9223372036854775807"),
    ({"seed": 2**40}, "train", r"key 'seed': expected an integer >= 0 and <= 4294967295, got 1099511627776"),
    ({"out_dir": "~\0"}, "train", r"key 'out_dir': expected a path without NUL or unencodable characters"),
    ({"tr_tf_record_files": "~\ud800"}, "train", r"key 'tr_tf_record_files': expected a path without NUL"),
    ({"model_file": "a\0b"}, "evaluate", r"key 'model_file': expected a path without NUL"),
    ({"val_tf_record_files": ["."]}, "train", r"key 'val_tf_record_files': folder .* holds no \*\.tfrecord"),
]


@pytest.mark.parametrize(("changes", "purpose", "pattern"), ERROR_CASES)
def test_config_errors_name_key_and_value(workdir, changes, purpose, pattern):
    path = write_config(workdir, with_changes(**changes))
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_config(path, purpose=purpose)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{not json", r"not valid JSON: .*line 1, column 2"),
        ("[1, 2]", r"expected a JSON object \{\.\.\.\}, got an array"),
        ('{"learning_rate": NaN}', r"NaN is not a JSON number"),
        ('{"batch_size": 1, "batch_size": 2}', r"key 'batch_size' appears twice"),
        (b"\xff\xfe\x00garbage", r"is not a UTF-8 text \(JSON\) file"),
        ('{"seed": ' + "1" * 5000 + "}", r"not valid JSON: a number has too many digits"),
    ],
)
def test_unreadable_files_name_the_file(workdir, content, pattern):
    path = workdir / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_config(path, purpose="train")
    assert str(path) in str(caught.value)


def test_missing_config_file(workdir):
    with pytest.raises(ConfigError, match=r"config file .*nope\.json does not exist"):
        load_config(workdir / "nope.json", purpose="train")


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"batch_size": True}, "key 'batch_size'"),
        ({"bach_size": 5}, "unknown key 'bach_size' (did you mean 'batch_size'?)"),
        ({"model_name": "VGG61"}, "unknown model_name 'VGG61'"),
    ],
)
def test_cli_prints_one_line_and_exits_2(workdir, capsys, command, changes, expected):
    path = write_config(workdir, with_changes(**changes, model_file="runs/none/iteration-1"))
    if command == "evaluate":
        (workdir / "runs" / "none").mkdir(parents=True)
        (workdir / "runs" / "none" / "iteration-1.json").write_text("{}")
    with pytest.raises(SystemExit) as exited:
        main([command, str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_and_non_json_config(workdir, capsys):
    for path, expected in ((workdir / "absent.json", "does not exist"), (workdir / "data", "is a folder")):
        with pytest.raises(SystemExit) as exited:
            main(["train", str(path)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and str(path) in err and err.count("\n") == 1


# --- the example configs ---------------------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parents[1]
# model -> (batch_size, save_checkpoint_after_iteration, save_checkpoint_per_iteration), BIGEARTHNET.md 4.
HYPER_PARAMETERS_2019 = {
    "ResNet50": (500, 6000, 600),
    "ResNet101": (500, 6000, 600),
    "ResNet152": (256, 6000, 600),
    "VGG16": (1000, 3000, 300),
    "VGG19": (1000, 3000, 300),
    "K-BranchCNN": (1000, 3000, 300),
}


@pytest.mark.parametrize("model", sorted(HYPER_PARAMETERS_2019))
@pytest.mark.parametrize("label_type", ["original", "BigEarthNet-19"])
def test_example_configs_have_the_2019_hyper_parameters(tmp_path, monkeypatch, model, label_type):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split in ("train", "val", "test"):
        (prepared / f"{split}-00000-of-00001.tfrecord").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # the example paths are relative to the working directory, as in 2019
    config = load_config(REPOSITORY / "configs" / f"{model}-{label_type}.json", purpose="train")
    batch, after, per = HYPER_PARAMETERS_2019[model]
    expected_rate = 1e-4 if model.startswith("VGG") and label_type == "original" else 1e-3
    assert (config.model_name, config.label_type) == (model, label_type)
    assert (config.batch_size, config.save_checkpoint_after_iteration) == (batch, after)
    assert config.save_checkpoint_per_iteration == per
    assert (config.learning_rate, config.nb_epoch, config.shuffle_buffer_size) == (expected_rate, 100, 130000)
    assert (config.training_size, config.test_size) == (269695, 125866)
    # model_file names the final checkpoint of the full run: ceil(269,695 x 100 / batch).
    assert config.model_file.endswith(f"iteration-{-(-269695 * 100 // batch)}")
    assert len(list((REPOSITORY / "configs").glob("*.json"))) == 12


@pytest.mark.parametrize("model", ["ResNet50", "ConvNeXt-Tiny", "ViT-S8"])
def test_v2_recipe_configs_load_with_the_modern_recipe(tmp_path, monkeypatch, model):
    """configs/v2: the published v2 reference recipe (AdamW, lr 1e-3 for ResNet50, batch 512, warm-up
    then cosine) on S1+S2, for a registered model each."""
    prepared = tmp_path / "prepared-v2"
    prepared.mkdir()
    for split in ("train", "validation", "test"):
        (prepared / f"{split}-00000-of-00001.tfrecord").write_bytes(b"")
    statistics = {band: {"mean": 1.0, "std": 2.0} for band in ("B02", "VV")}
    (prepared / "statistics.json").write_text(
        json.dumps({"format": "bigearthnet-tf-statistics", "version": 1, "bands": statistics})
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(REPOSITORY / "configs" / "v2" / f"{model}-BigEarthNet-19-MM.json", purpose="train")
    assert (config.model_name, config.label_type, config.modality) == (model, "BigEarthNet-19", "MM")
    assert (config.optimizer, config.lr_schedule, config.batch_size) == ("adamw", "cosine", 512)
    assert config.warmup_iterations > 0 and config.weight_decay > 0 and config.augmentation
    assert (config.training_size, config.test_size) == (237871, 119825)
    assert config.statistics["VV"] == (1.0, 2.0)
    if model == "ResNet50":
        assert config.learning_rate == 1e-3
