"""The command line as a researcher uses it: overrides, resume, test runs, config listing, help, version,
quiet start-up, Ctrl-C, and model paths given in any of their forms. Everything goes through `cli.main`
or, where the process itself matters (start-up output, signals), a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, cli_error

from bigearthnet_tf import __version__, checkpoints
from bigearthnet_tf.cli import build_parser
from bigearthnet_tf.config import KEY_DOCS, KEY_NAMES

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def records(synthetic_v1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "records"
    split_lists = [synthetic_v1 / f"{split}.csv" for split in ("train", "val", "test")]
    cli("prepare", "-r", synthetic_v1, "-o", out, "--splits", *split_lists)
    return out


def write_config(path: Path, records: Path, out_dir: Path, **changes) -> Path:
    values = {
        "model_name": "K-BranchCNN-Tiny",
        "label_type": "BigEarthNet-19",
        "batch_size": 4,
        "nb_epoch": 1,
        "learning_rate": 1e-3,
        "out_dir": str(out_dir),
        "tr_tf_record_files": str(records / "train-*.tfrecord"),
        "val_tf_record_files": str(records / "val-*.tfrecord"),
        "test_tf_record_files": str(records / "test-*.tfrecord"),
        "model_file": str(out_dir / "models" / "best"),
        "shuffle_buffer_size": 10,
        **changes,
    }
    path.write_text(json.dumps(values))
    return path


# --- overrides, resume, test runs -------------------------------------------------------------------


@pytest.mark.slow
def test_set_overrides_are_typed_checked_and_saved(records, tmp_path, capsys):
    config = write_config(tmp_path / "c.json", records, tmp_path / "run")
    cli("train", config, "--set", "batch_size=8", "--set", "model_name=ResNet-Tiny", "--set", "seed=7")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["batch_size"], saved["model_name"], saved["seed"]) == (8, "ResNet-Tiny", 7)
    assert checkpoints.read_metadata(tmp_path / "run" / "models" / "best")["model_name"] == "ResNet-Tiny"

    code, error = cli_error(capsys, "train", config, "--set", "batch_size=eight")
    assert code == 2 and "key 'batch_size': expected an integer" in error and "eight" in error
    code, error = cli_error(capsys, "train", config, "--set", "nb_epochs=3")
    assert code == 2 and error.strip() == "error: --set: unknown key 'nb_epochs' (did you mean 'nb_epoch'?)"
    code, error = cli_error(capsys, "train", config, "--set", "batch_size")
    assert code == 2 and "expected KEY=VALUE" in error
    code, error = cli_error(capsys, "train", config, "--set", "learning_rate=NaN")
    assert code == 2 and "key 'learning_rate'" in error


@pytest.mark.slow
def test_resume_flag_equals_resume_auto(records, tmp_path, capsys):
    config = write_config(tmp_path / "c.json", records, tmp_path / "run", save_checkpoint_per_iteration=2)
    cli("train", config, "--set", "nb_epoch=1")
    capsys.readouterr()
    code, error = cli_error(capsys, "train", config, "--set", "nb_epoch=2")
    assert code == 1 and "already holds checkpoints" in error
    cli("train", config, "--set", "nb_epoch=2", "--resume")
    assert "resuming after iteration" in " ".join(capsys.readouterr().out.split())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resume"] == "auto"


@pytest.mark.slow  # also run by the full suite; the fast tier keeps a quicker test of the same module
def test_test_run_trains_and_evaluates_a_few_batches_and_keeps_nothing(
    records, tmp_path, capsys, monkeypatch
):
    from bigearthnet_tf import train as train_module

    config = write_config(tmp_path / "c.json", records, tmp_path / "run")
    iterations = []
    original = train_module.TrainingLoop.run

    def counting(self, done):
        result = original(self, done)
        iterations.append(result.iterations)
        return result

    monkeypatch.setattr(train_module.TrainingLoop, "run", counting)
    cli("train", config, "--test-run", "2")
    printed = " ".join(capsys.readouterr().out.split())
    assert iterations == [2]
    assert "test run OK (2 batches of 4)" in printed and "s per training iteration after the first" in printed
    assert "evaluation" in printed and "evaluating" in printed
    assert not (tmp_path / "run").exists()  # the real out_dir is never touched
    tmp_root = Path(printed.split("nothing kept (")[1].split(" removed")[0])
    assert not tmp_root.exists()


@pytest.mark.slow
def test_evaluate_test_run_needs_a_checkpoint(records, tmp_path, capsys):
    config = write_config(tmp_path / "c.json", records, tmp_path / "run")
    cli("train", config)
    capsys.readouterr()
    cli("evaluate", config, "--test-run", "1")
    printed = " ".join(capsys.readouterr().out.split())
    assert "test run OK (1 batch of 4)" in printed and "evaluation" in printed
    assert not (tmp_path / "run" / "eval").exists()


# --- config keys and show ---------------------------------------------------------------------------


def test_config_keys_lists_every_key_with_type_default_and_meaning(capsys):
    cli("config", "keys")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "2019", "meaning"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert set(listed) == set(KEY_NAMES) and len(lines) == len(KEY_NAMES) + 1
    for doc in KEY_DOCS:
        assert doc.meaning in listed[doc.key] and doc.type in listed[doc.key]
        assert (" yes " in listed[doc.key]) == doc.from_2019, doc.key
    assert sum(doc.from_2019 for doc in KEY_DOCS) == 17  # the keys of the 2019 README


def test_config_show_prints_the_resolved_config(records, tmp_path, capsys):
    config = write_config(tmp_path / "c.json", records, tmp_path / "run")
    cli("config", "show", config, "--set", "batch_size=16")
    shown = json.loads(capsys.readouterr().out)
    assert shown["batch_size"] == 16 and shown["seed"] == 42 and shown["model_name"] == "K-BranchCNN-Tiny"
    assert shown["tr_tf_record_files"] == [str(records / "train-00000-of-00001.tfrecord")]  # expanded
    code, error = cli_error(capsys, "config", "show")
    assert code == 1 and "needs a CONFIG file" in error


# --- model paths in every form ------------------------------------------------------------------------


@pytest.mark.slow
def test_model_file_and_predict_model_take_the_same_forms(records, synthetic_v1, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.json", records, run, save_checkpoint_per_iteration=3)
    cli("train", config)
    capsys.readouterr()
    best = run / "models" / "best"
    for form in (best, run / "models" / "best.weights.h5", run, run / "models"):
        cli("evaluate", config, "--set", f"model_file={form}", "--overwrite")
        assert f"from {best}" in " ".join(capsys.readouterr().out.split()), form
    names = (synthetic_v1 / "test.csv").read_text().split()[:2]
    folders = [synthetic_v1 / "BigEarthNet-v1.0" / name for name in names]
    for form in (best, run, run / "models" / "best.json"):
        cli("predict", *folders, "--model", form, "--out", tmp_path / "p.csv", "--overwrite")
        assert f"from {best}" in " ".join(capsys.readouterr().err.split())

    code, error = cli_error(capsys, "predict", *folders, "--model", run / "models" / "iteration-999")
    assert code == 1 and "no checkpoint" in error and "checkpoints in" in error and "best" in error
    code, error = cli_error(
        capsys, "evaluate", config, "--set", f"model_file={run / 'models' / 'iteration-999'}"
    )
    assert code == 2 and "key 'model_file'" in error and "best" in error and "iteration-3" in error


def test_predict_recognises_an_archive_root_and_checks_paths_first(synthetic_v1, tmp_path, capsys):
    missing_model = tmp_path / "no-model"  # never loaded: the path mistake is reported first
    code, error = cli_error(capsys, "predict", synthetic_v1 / "BigEarthNet-v1.0", "--model", missing_model)
    count = sum(1 for entry in (synthetic_v1 / "BigEarthNet-v1.0").iterdir() if entry.is_dir())
    assert code == 1
    assert (
        f"is not a patch folder: it holds {count:,} patch folders; to predict them all, use --archive"
        in error
    )
    code, error = cli_error(capsys, "predict", tmp_path / "nothing_here", "--model", missing_model)
    assert code == 1 and "no such patch folder" in error


# --- help, version, splits spelling -----------------------------------------------------------------


def test_every_command_has_a_description_defaults_and_an_example(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    checked = 0
    for name, sub in subcommands.items():
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        for command in nested[0].choices.values() if nested else [sub]:
            text = command.format_help()
            assert command.description and "example: bigearthnet" in text, name
            checked += 1
    assert checked == 18  # 13 commands (map and embed included), import's 3 sources, inspect and show
    assert "(default: 64)" in subcommands["predict"].format_help()
    assert "--splits CSV|official" in subcommands["prepare"].format_help().replace("[", "").replace("]", "")
    with pytest.raises(SystemExit) as stop:
        cli("--version")
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"bigearthnet-tf {__version__}"


def test_splits_official_and_files_do_not_mix(synthetic_v1, tmp_path, capsys):
    code, error = cli_error(
        capsys,
        "prepare",
        "-r",
        synthetic_v1,
        "-o",
        tmp_path / "o",
        "--splits",
        "official",
        synthetic_v1 / "test.csv",
    )
    assert code == 1 and "either split CSV files or `official`" in error
    code, error = cli_error(capsys, "prepare", "-r", synthetic_v1, "-o", tmp_path / "o")
    assert code == 1 and "--splits official" in error


# --- the process: quiet start-up, Ctrl-C ------------------------------------------------------------


def run_command(*args: object, **kwargs) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TF_CPP")}
    return subprocess.run(
        [sys.executable, "-m", "bigearthnet_tf.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        **kwargs,
    )


@pytest.mark.slow
def test_no_tensorflow_start_up_noise(records, tmp_path):
    finished = run_command("models", "K-BranchCNN-Tiny", "--parameters")
    assert finished.returncode == 0, finished.stderr
    for noise in ("absl::InitializeLog", "oneDNN", "cuInit", "cuda drivers", "I0000"):
        assert noise not in finished.stderr + finished.stdout, noise
    assert "K-BranchCNN-Tiny" in finished.stdout


@pytest.mark.slow
def test_training_output_has_no_placeholder_values(records, tmp_path):
    config = write_config(tmp_path / "c.json", records, tmp_path / "run")
    finished = run_command("train", config)
    assert finished.returncode == 0, finished.stderr
    output = finished.stdout + finished.stderr
    assert "nan" not in output.lower() and " 0.0 samples/s" not in output
    assert "retracing" not in output


def _start_training(config: Path, **popen) -> subprocess.Popen:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TF_CPP")}
    return subprocess.Popen(
        [sys.executable, "-m", "bigearthnet_tf.cli", "train", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        **popen,
    )


def _wait_for_training(config: Path) -> None:
    out_dir = Path(json.loads(config.read_text())["out_dir"])
    deadline = time.monotonic() + 240
    while not (out_dir / "logs").exists():
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    time.sleep(1.0)


def _sigint_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then installs its KeyboardInterrupt handler


@pytest.mark.slow
def test_first_ctrl_c_says_what_happens(records, tmp_path):
    config = write_config(tmp_path / "c.json", records, tmp_path / "run", nb_epoch=200)
    # Started as from a shell, whatever disposition this test process inherited or was left with.
    process = _start_training(config, preexec_fn=_sigint_as_at_a_terminal)
    _wait_for_training(config)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-3000:]
    assert (
        "SIGINT: stopping after this iteration and writing a checkpoint; Ctrl-C again to abort at once"
        in stderr
    )


@pytest.mark.slow
def test_sigint_ignored_at_start_stays_ignored(records, tmp_path):
    config = write_config(tmp_path / "c.json", records, tmp_path / "run", nb_epoch=3)

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    process = _start_training(config, preexec_fn=ignore_sigint)
    _wait_for_training(config)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr  # trained to the end
    assert "stopping after this iteration" not in stderr


# --- look rather than read ----------------------------------------------------------------------------


def _reference_counts(synthetic_v1, split: str):
    """Per-class patch counts of a split, from the archive's own label JSON files."""
    from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS, original_to_19

    counts_43, counts_19, per_patch = [0] * 43, [0] * 19, {}
    for name in (synthetic_v1 / f"{split}.csv").read_text().split():
        labels = json.loads(
            (synthetic_v1 / "BigEarthNet-v1.0" / name / f"{name}_labels_metadata.json").read_text()
        )
        for label in labels["labels"]:
            counts_43[ORIGINAL_LABELS.index(label)] += 1
        labels_19 = original_to_19(labels["labels"])
        for label in labels_19:
            counts_19[BIGEARTHNET_19_LABELS.index(label)] += 1
        per_patch[len(labels_19)] = per_patch.get(len(labels_19), 0) + 1
    return counts_43, counts_19, per_patch


def test_inspect_records_and_archive_agree_with_the_label_files(synthetic_v1, records, tmp_path, capsys):
    from bigearthnet_tf.inspect_data import inspect

    by_records = {summary.name: summary for summary in inspect([records], png=tmp_path / "labels.png")}
    printed = capsys.readouterr().out
    assert set(by_records) == {"train", "val", "test"}
    assert "Patches per class, BigEarthNet-19" in printed and "Patches per class, original (43" in printed
    assert (tmp_path / "labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    split_lists = [synthetic_v1 / f"{split}.csv" for split in ("train", "val", "test")]
    by_archive = {summary.name: summary for summary in inspect([synthetic_v1], splits=split_lists)}
    for split in ("train", "val", "test"):
        counts_43, counts_19, per_patch = _reference_counts(synthetic_v1, split)
        for summary in (by_records[split], by_archive[split]):
            assert summary.counts["original"].tolist() == counts_43
            assert summary.counts["BigEarthNet-19"].tolist() == counts_19
            assert summary.labels_per_patch == per_patch
            assert summary.patches == sum(per_patch.values())
    code, error = cli_error(capsys, "inspect", records, "--png", tmp_path / "labels.png")
    assert code == 1 and "already exists; pass --overwrite" in error


def test_show_writes_quick_looks_with_labels(example_paths, records, tmp_path, capsys):
    from bigearthnet_tf.quicklook import FALSE_COLOUR, TRUE_COLOUR, composite

    folders = sorted(path for path in example_paths.s2.iterdir() if path.is_dir())[:2]
    cli("show", *folders, "--out", tmp_path / "looks")
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "looks" / f"{folder.name}.png") for folder in folders]
    assert all(Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written)
    cli("show", records / "test-00000-of-00001.tfrecord", "--out", tmp_path / "records", "--limit", "3")
    assert len(capsys.readouterr().out.split()) == 3
    # The composite stretches the three bands together between their 2nd and 98th percentile.
    bands = {
        band: np.arange(14400, dtype=np.uint16).reshape(120, 120) * (i + 1)
        for i, band in enumerate(("B02", "B03", "B04", "B08"))
    }
    image = composite(bands, TRUE_COLOUR)
    stack = np.stack([bands[b] for b in TRUE_COLOUR], -1).astype(float)
    low, high = np.percentile(stack, (2, 98))
    np.testing.assert_allclose(image, np.clip((stack - low) / (high - low), 0, 1))
    assert composite(bands, FALSE_COLOUR).shape == (120, 120, 3)


@pytest.mark.slow  # also run by the full suite; the fast tier keeps a quicker test of the same module
def test_tensorboard_reads_the_training_logs(records, tmp_path):
    """The README's `tensorboard --logdir out_dir/logs`: TensorBoard's own reader finds the scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path / "c.json", records, tmp_path / "run")
    cli("train", config)
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "training"))
    events.Reload()
    tags = events.Tags()["tensors"]
    assert {"loss", "learning_rate", "validation/macro_average_precision"} <= set(tags)
    from tensorboard.util.tensor_util import make_ndarray

    losses = [float(make_ndarray(event.tensor_proto)) for event in events.Tensors("loss")]
    assert len(losses) == events.Tensors("loss")[-1].step and all(np.isfinite(losses))


def test_errors_name_the_next_step(records, synthetic_v1, tmp_path, capsys):
    config = write_config(
        tmp_path / "c.json", records, tmp_path / "run", tr_tf_record_files="nowhere/*.tfrecord"
    )
    code, error = cli_error(capsys, "train", config)
    assert code == 2 and "make records with: bigearthnet prepare -r ARCHIVE -o FOLDER --splits" in error
    config = write_config(tmp_path / "c.json", records, tmp_path / "run", statistics_file="stats.json")
    code, error = cli_error(capsys, "train", config)
    assert code == 2 and "compute it with: bigearthnet stats TRAINING_RECORDS --out FILE" in error
    code, error = cli_error(
        capsys, "train", config, "--set", "model_name=MyNet", "--set", "statistics_file=null"
    )
    assert code == 2 and "a model of your own: name its .py file in $BIGEARTHNET_TF_MODEL_PLUGINS" in error
    names = (synthetic_v1 / "test.csv").read_text().split()[:1]
    code, error = cli_error(capsys, "predict", tmp_path / "missing" / names[0], "--model", tmp_path / "run")
    assert code == 1 and error.strip().endswith(
        "--skip-bad predicts the other patches and lists the bad ones"
    )


def test_inspect_checks_split_lists_as_prepare_does(synthetic_v1, tmp_path, capsys):
    """Official lists on an archive that holds none of them, a list naming an absent patch: the same
    one-line refusal from inspect as from prepare, never a table of zeros."""
    for command in (["inspect", synthetic_v1], ["prepare", "-r", synthetic_v1, "-o", tmp_path / "out"]):
        code, error = cli_error(capsys, *command, "--splits", "official")
        assert code == 1 and "none of the" in error and "patches of the official v1 splits is in" in error
    absent = tmp_path / "test.csv"
    absent.write_text("S2A_MSIL2A_20170613T101031_0_0\n")
    messages = []
    for command in (["inspect", synthetic_v1], ["prepare", "-r", synthetic_v1, "-o", tmp_path / "out"]):
        code, error = cli_error(capsys, *command, "--splits", absent)
        assert code == 1
        messages.append(error)
    core = messages[0].split(" (", 1)[0].strip()  # prepare adds the --skip-bad hint, which inspect has not
    assert "but no such patch folder" in core and messages[1].startswith(core)


@pytest.fixture(scope="module")
def packed_examples(example_paths, tmp_path_factory):
    """The six example patches as a downloaded archive file, and a small checkpoint."""
    import io
    import tarfile

    import keras
    import zstandard

    from bigearthnet_tf import checkpoints
    from bigearthnet_tf.models import build_model

    base = tmp_path_factory.mktemp("packed")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(example_paths.s2, arcname="BigEarthNet-v1.0")
    packed = base / "BigEarthNet-S2-v1.0.tar.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(buffer.getvalue()))
    keras.utils.set_random_seed(2)
    model = build_model("K-BranchCNN-Tiny", 19)
    checkpoint = base / "models" / "best"
    checkpoints.save_checkpoint(
        checkpoint,
        model,
        model_name="K-BranchCNN-Tiny",
        label_type="BigEarthNet-19",
        modality="S2",
        iteration=1,
    )
    return packed, checkpoint


@pytest.mark.slow
def test_predict_inspect_and_show_take_the_downloaded_archive_file(
    packed_examples, example_paths, tmp_path, capsys
):
    """What prepare takes, every command takes: the same predictions (in list order, with splits),
    the same label summary, and quick looks, from the .tar.zst as from the extracted folder."""
    from bigearthnet_tf.inspect_data import inspect

    packed, model = packed_examples
    names = sorted(path.name for path in example_paths.s2.iterdir())
    (tmp_path / "train.csv").write_text("\n".join(reversed(names[:4])) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(names[4:]) + "\n")
    lists = [tmp_path / "train.csv", tmp_path / "test.csv"]
    for extra, suffix in (
        ([], "all"),
        (["--splits", *lists], "lists"),
        (["--splits", *lists, "--split", "test"], "test"),
    ):
        for source, tag in ((example_paths.s2, "folder"), (packed, "file")):
            cli(
                "predict",
                "--model",
                model,
                "--archive",
                source,
                *extra,
                "--out",
                tmp_path / f"{tag}-{suffix}.csv",
            )
        assert (tmp_path / f"folder-{suffix}.csv").read_text() == (
            tmp_path / f"file-{suffix}.csv"
        ).read_text()
    lines = (tmp_path / "file-lists.csv").read_text().splitlines()[1:]
    assert [line.split(",", 1)[0] for line in lines] == [*reversed(names[:4]), *names[4:]]
    from_folder = inspect([example_paths.s2], splits=lists)
    from_file = inspect([packed], splits=lists)
    for a, b in zip(from_folder, from_file, strict=True):
        assert a.name == b.name and a.patches == b.patches and a.labels_per_patch == b.labels_per_patch
        assert all((a.counts[key] == b.counts[key]).all() for key in a.counts)
    capsys.readouterr()
    cli("show", packed, "--out", tmp_path / "looks", "--limit", "2", "--model", model)
    assert len(list((tmp_path / "looks").glob("*.png"))) == 2
    (tmp_path / "absent.csv").write_text("S2A_MSIL2A_20170613T101031_0_0\n")
    code, error = cli_error(
        capsys, "predict", "--model", model, "--archive", packed, "--splits", tmp_path / "absent.csv"
    )
    assert code == 1 and "listed but not in the archive file" in error
