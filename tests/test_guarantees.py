"""What bigearthnet-tf guarantees (README, "What bigearthnet-tf guarantees"), tried as a hostile tester
would: files that are not what they claim, metadata that contradicts itself, the operating system
refusing, and two runs on one output. Each test names the principle of issue 10 it checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import cli, cli_error

from bigearthnet_tf.archive import BadPatchError, open_archive
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.prepare_splits import read_split_csv
from bigearthnet_tf.tiff import MAX_BAND_FILE_BYTES, read_band


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of hanging: a read that blocks (a FIFO without writer) is interrupted."""

    def interrupt(*_):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def patch_archive(example_paths, tmp_path) -> tuple[Path, list[str]]:
    """A writable v1 archive of the six real example patches."""
    root = tmp_path / "BigEarthNet-v1.0"
    shutil.copytree(example_paths.s2, root)
    names = sorted(path.name for path in root.iterdir() if path.is_dir())
    return root, names


# --- 2. only what the archive really holds is read, and reading is bounded ---------------------------


@pytest.mark.parametrize("file_kind", ["band", "labels"])
def test_a_fifo_is_refused_at_once_not_waited_on(patch_archive, file_kind):
    root, names = patch_archive
    name = names[0]
    target = root / name / (f"{name}_B02.tif" if file_kind == "band" else f"{name}_labels_metadata.json")
    target.unlink()
    os.mkfifo(target)
    with no_hang(), pytest.raises(BadPatchError) as caught:
        open_archive(root, version=1).read_patch(name)
    assert caught.value.file == target.name and "not a regular file" in caught.value.reason


def test_a_huge_band_file_is_refused_before_it_is_read(patch_archive):
    root, names = patch_archive
    band = root / names[0] / f"{names[0]}_B03.tif"
    with open(band, "r+b") as handle:  # sparse: claims 17 MB without using the disk
        handle.truncate(MAX_BAND_FILE_BYTES + 1)
    with pytest.raises(BadPatchError) as caught:
        open_archive(root, version=1).read_patch(names[0])
    assert f"{MAX_BAND_FILE_BYTES + 1:,} bytes, more than the {MAX_BAND_FILE_BYTES:,}" in caught.value.reason


def test_a_split_list_that_is_a_folder_or_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "train.csv")
    with no_hang(), pytest.raises(UserError, match=r"train.csv cannot be read: not a regular file"):
        read_split_csv(tmp_path / "train.csv")


# --- 7. files that real users produce are read -----------------------------------------------------


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd"])
def test_bands_resaved_compressed_are_read_exactly(patch_archive, compression):
    root, names = patch_archive
    name = names[1]
    original = open_archive(root, version=1).read_patch(name)
    for band in ("B02", "B05", "B09"):
        path = root / name / f"{name}_{band}.tif"
        tifffile.imwrite(path, original.bands[band], compression=compression)
        np.testing.assert_array_equal(
            read_band(path, original.bands[band].shape, "uint16"), original.bands[band]
        )
    reread = open_archive(root, version=1).read_patch(name)
    for band, values in original.bands.items():
        np.testing.assert_array_equal(reread.bands[band], values, err_msg=band)


# --- 1. metadata that contradicts itself is an error, never a silent choice -------------------------


def small_archive(tmp_path, version: int, with_s1: bool = False) -> Path:
    from bigearthnet_tf.synth import write_synthetic_archive

    return write_synthetic_archive(
        tmp_path / f"v{version}", patches=12, seed=3, version=version, with_s1=with_s1
    )


def test_a_patch_in_two_split_lists(tmp_path, capsys):
    root = small_archive(tmp_path, 1)
    shared = (root / "train.csv").read_text().split()[0]
    with open(root / "val.csv", "a") as stream:
        stream.write(f"{shared}\r\n")
    argv = ["prepare", "-r", root, "-o", tmp_path / "out", "--splits", root / "train.csv", root / "val.csv"]
    code, error = cli_error(capsys, *argv)
    assert code == 1 and f"patch {shared}: " in error
    assert f"listed in split train ({root / 'train.csv'}) and again in split val" in error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tfrecord"))
    cli(*argv, "--skip-bad")
    skipped = (tmp_path / "out" / "skipped.csv").read_text()
    assert skipped.count(shared) == 2 and "listed in several splits: train, val" in skipped
    from bigearthnet_tf.input_pipeline import list_files

    names = []
    for path in list_files([str(tmp_path / "out")]):
        names += [n.decode() for n in _record_names(path)]
    assert shared not in names


def _record_names(path):
    import tensorflow as tf

    for raw in tf.data.TFRecordDataset(path):
        example = tf.train.Example.FromString(raw.numpy())
        yield example.features.feature["patch_name"].bytes_list.value[0]


def _rewrite_parquet(root: Path, change) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "metadata.parquet").to_pylist()
    rows = change(rows)
    pq.write_table(pa.Table.from_pylist(rows), root / "metadata.parquet")


def test_a_repeated_patch_id_in_the_v2_parquet(tmp_path, capsys):
    root = small_archive(tmp_path, 2)
    twin = {}

    def repeat(rows):
        twin.update(rows[0], row=len(rows))
        other = dict(rows[0], labels=["Marine waters"], split="test")
        return [*rows, other]

    _rewrite_parquet(root, repeat)
    code, error = cli_error(capsys, "prepare", "-r", root, "-o", tmp_path / "out", "--splits", "official")
    assert code == 1 and f"patch {twin['patch_id']}" in error and "again in split test" in error
    expected = f"listed twice in the metadata: metadata.parquet row 0 and metadata.parquet row {twin['row']}"
    with pytest.raises(BadPatchError, match=expected):
        open_archive(root).read_labels(twin["patch_id"])


def test_a_null_labels_cell_is_refused_and_an_empty_list_means_no_labels(tmp_path):
    root = small_archive(tmp_path, 2)
    ids = {}

    def blank(rows):
        ids["null"], ids["empty"] = rows[0]["patch_id"], rows[1]["patch_id"]
        rows[0]["labels"], rows[1]["labels"] = None, []
        return rows

    _rewrite_parquet(root, blank)
    archive = open_archive(root)
    with pytest.raises(BadPatchError, match=r"labels cell is null \(an empty list \[\] means no labels\)"):
        archive.read_labels(ids["null"])
    assert archive.read_labels(ids["empty"]) == (None, ())


def test_two_sentinel_1_patches_claiming_one_sentinel_2_patch(tmp_path):
    from bigearthnet_tf.archive import V1_S1_FOLDER, s1_pairs_v1

    root = small_archive(tmp_path, 1, with_s1=True)
    s1_folders = sorted(path for path in (root / V1_S1_FOLDER).iterdir() if path.is_dir())
    first, second = s1_folders[:2]
    claimed = json.loads((first / f"{first.name}_labels_metadata.json").read_text())["corresponding_s2_patch"]
    metadata_file = second / f"{second.name}_labels_metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["corresponding_s2_patch"] = claimed
    metadata_file.write_text(json.dumps(metadata))
    s1_pairs_v1.cache_clear()
    archive = open_archive(root, s1_root=root)
    with pytest.raises(
        BadPatchError, match=f"claimed by several Sentinel-1 patches: {first.name} and {second.name}"
    ):
        archive.s1_name(claimed)


# --- 3. the operating system's refusals are user errors ---------------------------------------------


@pytest.mark.slow
def test_a_full_disk_while_publishing_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    """ENOSPC injected at the rename that publishes an evaluation's files: exit 1, one line naming
    the path and the reason, no temporary folder left, and a rerun (with space again) succeeds."""
    import errno

    from bigearthnet_tf import files
    from bigearthnet_tf.synth import write_synthetic_archive

    root = write_synthetic_archive(tmp_path / "archive", patches=24, seed=2)
    records = tmp_path / "records"
    cli("prepare", "-r", root, "-o", records, "--splits", root / "train.csv", root / "test.csv")
    config = tmp_path / "c.json"
    out_dir = tmp_path / "run"
    config.write_text(json.dumps({
        "model_name": "K-BranchCNN-Tiny", "label_type": "BigEarthNet-19", "batch_size": 8, "nb_epoch": 1,
        "learning_rate": 1e-3, "out_dir": str(out_dir), "tr_tf_record_files": str(records / "train-*"),
        "test_tf_record_files": str(records / "test-*"), "model_file": str(out_dir),
    }))  # fmt: skip
    cli("train", config)
    real_replace = os.replace

    def full_disk(source, target, *args, **kwargs):
        if Path(target).parent.name == "eval":  # the rename that publishes the set
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(target))
        return real_replace(source, target, *args, **kwargs)

    capsys.readouterr()
    with monkeypatch.context() as patched:
        patched.setattr(files.os, "replace", full_disk)
        code, error = cli_error(capsys, "evaluate", config)
    assert code == 1 and error.count("\n") == 1
    results = out_dir / "eval" / "iteration-2-test"  # the run folder's newest checkpoint on the test split
    assert error.strip() == f"error: {results}: No space left on device"
    assert not list((out_dir / "eval").glob(".*")) and not results.exists()
    cli("evaluate", config)
    assert (results / "eval_result.json").is_file()


def test_an_output_path_that_is_a_file(tmp_path, capsys, patch_archive):
    root, _ = patch_archive
    blocker = tmp_path / "out"
    blocker.write_text("mine")
    code, error = cli_error(capsys, "prepare", "-r", root, "-o", blocker / "records", "--splits", "official")
    errors = [line for line in error.splitlines() if line.startswith("error:")]
    assert code == 1 and errors == [f"error: {blocker / 'records'}: Not a directory"]
    assert blocker.read_text() == "mine"


def test_error_lines_are_short_whatever_the_bad_value(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"x" * 5_000_000: 1, "batch_size": 1, "out_dir": "o"}))
    code, error = cli_error(capsys, "train", config)
    assert code == 2 and len(error) < 1_200 and "unknown key 'xxxx" in error


# --- 4. two runs on one output never corrupt each other ---------------------------------------------


HOLD_LOCK = """
import sys, time
from bigearthnet_tf.locks import output_lock
with output_lock(sys.argv[1], sys.argv[2], "test"):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_by_another_process(folder: Path, kind: str):
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder), kind], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_second_prepare_refuses_while_the_first_runs_and_not_after_it_was_killed(
    patch_archive, tmp_path, capsys
):
    root, _ = patch_archive
    out = tmp_path / "out"
    argv = ("prepare", "-r", root, "-o", out, "--splits", "official")
    with lock_held_by_another_process(out, "prepare") as holder:
        code, error = cli_error(capsys, *argv)
        assert code == 1
        assert (
            f"output folder {out} is being written by another bigearthnet prepare (process {holder.pid})"
            in error
        )
        assert not list(out.glob("*.tfrecord"))
    cli(*argv)  # killed holder (SIGKILL): the kernel released its lock
    assert list(out.glob("train-*.tfrecord"))
    assert not list(out.glob(".bigearthnet-*"))  # the lock file goes with its holder's release


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_train_and_evaluate_refuse_a_busy_out_dir(tmp_path, capsys, kind):
    config = tmp_path / "c.json"
    out_dir = tmp_path / "run"
    config.write_text(json.dumps({
        "model_name": "K-BranchCNN-Tiny", "label_type": "BigEarthNet-19", "batch_size": 8, "nb_epoch": 1,
        "learning_rate": 1e-3, "out_dir": str(out_dir), "tr_tf_record_files": str(config),
        "test_tf_record_files": str(config), "model_file": str(config),
    }))  # fmt: skip
    from bigearthnet_tf.config import load_config
    from bigearthnet_tf.evaluate import evaluate
    from bigearthnet_tf.train import train

    with lock_held_by_another_process(out_dir, kind):
        with pytest.raises(
            UserError, match=f"out_dir {out_dir} is being written by another bigearthnet {kind}"
        ):
            (train if kind == "train" else evaluate)(load_config(config, kind))


# --- 6. every record is checked before it is trusted ------------------------------------------------


@pytest.mark.slow
def test_a_record_with_valid_checksums_but_a_wrong_payload(tmp_path, capsys):
    """A band of the wrong byte length, written with correct framing and checksums (as another tool
    could): training, evaluation and stats stop with one line naming the file and the patch."""
    import tensorflow as tf

    from bigearthnet_tf.synth import write_synthetic_archive

    root = write_synthetic_archive(tmp_path / "archive", patches=24, seed=4)
    records = tmp_path / "records"
    cli("prepare", "-r", root, "-o", records, "--splits", root / "train.csv", root / "test.csv")
    damaged = records / "test-00000-of-00001.tfrecord"
    examples = [tf.train.Example.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(str(damaged))]
    victim = examples[2]
    patch = victim.features.feature["patch_name"].bytes_list.value[0].decode()
    band = victim.features.feature["bands_20m"].bytes_list
    band.value[0] = band.value[0][:-2]  # one pixel short; the TFRecord writer computes fresh checksums
    with tf.io.TFRecordWriter(str(damaged)) as writer:
        for example in examples:
            writer.write(example.SerializeToString())
    expected = (
        f"error: {damaged}: the record of patch {patch} has valid checksums but its bands_20m holds "
        f"{6 * 60 * 60 * 2 - 2} bytes, expected {6 * 60 * 60 * 2}"
    )
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "model_name": "K-BranchCNN-Tiny", "label_type": "BigEarthNet-19", "batch_size": 4, "nb_epoch": 1,
        "learning_rate": 1e-3, "out_dir": str(tmp_path / "run"), "tr_tf_record_files": str(damaged),
        "test_tf_record_files": str(damaged), "model_file": str(tmp_path / "run"),
    }))  # fmt: skip
    for argv in (("train", config), ("stats", damaged, "--out", tmp_path / "stats.json")):
        code, error = cli_error(capsys, *argv)
        lines = [line for line in error.splitlines() if line.startswith("error:")]
        assert code == 1 and len(lines) == 1 and lines[0].startswith(expected), argv
        assert "Traceback" not in error
    cli("train", config, "--set", f"tr_tf_record_files={records / 'train-00000-of-00001.tfrecord'}")
    code, error = cli_error(capsys, "evaluate", config)
    assert code == 1 and [line for line in error.splitlines() if line.startswith("error:")][0].startswith(
        expected
    )


# --- 8. promises hold at the edges ------------------------------------------------------------------


@pytest.mark.parametrize("epochs", [1, 2])
@pytest.mark.slow
def test_resume_with_only_the_last_partial_batch_left_is_bit_identical(tmp_path, epochs):
    """22 training records in batches of 4 per epoch: iterations 1..6 per epoch, the 6th holding two
    records. A run resumed from the checkpoint just before the last (partial) batch ends with exactly
    the weights of the uninterrupted run."""
    from bigearthnet_tf import checkpoints
    from bigearthnet_tf.config import load_config
    from bigearthnet_tf.synth import write_synthetic_archive
    from bigearthnet_tf.train import train

    root = write_synthetic_archive(tmp_path / "archive", patches=36, seed=6)
    records = tmp_path / "records"
    cli("prepare", "-r", root, "-o", records, "--splits", root / "train.csv", root / "val.csv")
    train_records = len((root / "train.csv").read_text().split())
    assert train_records % 4 != 0
    total = -(-epochs * train_records // 4)  # the last batch partial

    def run(out_dir: Path):
        config = tmp_path / f"{out_dir.name}.json"
        config.write_text(json.dumps({
            "model_name": "K-BranchCNN-Tiny", "label_type": "BigEarthNet-19", "batch_size": 4,
            "nb_epoch": epochs,
            "learning_rate": 1e-3, "out_dir": str(out_dir), "tr_tf_record_files": str(records / "train-*"),
            "save_checkpoint_per_iteration": 1, "shuffle_buffer_size": 50, "resume": "auto",
            "val_tf_record_files": str(records / "val-*"), "augmentation": True,
        }))  # fmt: skip
        return train(load_config(config))

    reference = run(tmp_path / "reference")
    assert reference.iterations == total
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", resumed_dir)
    final = checkpoints.checkpoint_base(resumed_dir / "models", total)
    for path in checkpoints.checkpoint_files(final).values():
        path.unlink(missing_ok=True)  # as if killed before the last iteration's checkpoint
    assert checkpoints.latest_complete_checkpoint(resumed_dir / "models").name == f"iteration-{total - 1}"
    resumed = run(resumed_dir)
    assert resumed.iterations == total
    expected = checkpoints.load_checkpoint(reference.final_checkpoint).model.get_weights()
    got = checkpoints.load_checkpoint(resumed.final_checkpoint).model.get_weights()
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_refused_file_never_leaves_a_worker_waiting(patch_archive, tmp_path, capsys):
    root, names = patch_archive
    band = root / names[3] / f"{names[3]}_B11.tif"
    band.unlink()
    os.mkfifo(band)
    with no_hang(60):
        code, error = cli_error(
            capsys, "prepare", "-r", root, "-o", tmp_path / "out", "--splits", "official", "--workers", "2"
        )
    assert code == 1 and f"patch {names[3]}: {band.name}: cannot read: not a regular file" in error


@pytest.mark.parametrize("command", ["stats", "predict", "config"])
def test_permission_denied_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch, command, patch_archive):
    """The write that a command's output ends with is refused (as a read-only folder would refuse it
    for a user other than root): exit 1, one line with the path and the reason, nothing left behind."""
    import errno

    from bigearthnet_tf import files

    root, names = patch_archive
    records = tmp_path / "records"
    cli("prepare", "-r", root, "-o", records, "--splits", "official")
    capsys.readouterr()
    target = tmp_path / "outputs" / {"stats": "stats.json", "predict": "p.csv", "config": "run"}[command]
    real_replace = os.replace

    def refuse(source, destination, *args, **kwargs):
        if os.fspath(destination).startswith(os.fspath(tmp_path / "outputs")):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(destination))
        return real_replace(source, destination, *args, **kwargs)

    if command == "stats":
        argv = ("stats", records, "--out", target)
    elif command == "predict":
        from bigearthnet_tf import checkpoints
        from bigearthnet_tf.models import build_model

        base = checkpoints.save_checkpoint(
            tmp_path / "m" / "best", build_model("K-BranchCNN-Tiny", 19), model_name="K-BranchCNN-Tiny",
            label_type="BigEarthNet-19", modality="S2", iteration=1,
        )  # fmt: skip
        argv = ("predict", root / names[0], "--model", base, "--out", target)
    else:
        config = tmp_path / "c.json"
        config.write_text(json.dumps({
            "model_name": "K-BranchCNN-Tiny", "label_type": "BigEarthNet-19", "batch_size": 2, "nb_epoch": 1,
            "learning_rate": 1e-3, "out_dir": str(target), "tr_tf_record_files": str(records / "train-*"),
        }))  # fmt: skip
        argv = ("train", config)
        target = target / "config.json"
    real_link = os.link

    def refuse_link(source, destination, *args, **kwargs):
        if os.fspath(destination).startswith(os.fspath(tmp_path / "outputs")):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(destination))
        return real_link(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(files.os, "replace", refuse)
    monkeypatch.setattr(os, "link", refuse_link)  # how stats publishes without replacing
    code, error = cli_error(capsys, *argv)
    lines = [line for line in error.splitlines() if line.startswith("error:")]
    assert code == 1 and lines == [f"error: {target}: Permission denied"]
    assert not [path for path in (tmp_path / "outputs").rglob("*") if path.is_file() and ".tmp" in path.name]


def test_a_2019_schema_record_with_a_band_of_the_wrong_length(tmp_path, capsys):
    """The 2019 schema stores each band as an int64 list: one value short is one line naming the key."""
    import tensorflow as tf

    from bigearthnet_tf.synth import write_synthetic_archive

    root = write_synthetic_archive(tmp_path / "archive", patches=12, seed=5)
    records = tmp_path / "records"
    cli("prepare", "-r", root, "-o", records, "--splits", root / "train.csv", "--format", "legacy")
    path = records / "train.tfrecord"
    examples = [tf.train.Example.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(str(path))]
    examples[1].features.feature["B01"].int64_list.value.pop()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in examples:
            writer.write(example.SerializeToString())
    code, error = cli_error(capsys, "stats", path, "--out", tmp_path / "stats.json")
    lines = [line for line in error.splitlines() if line.startswith("error:")]
    assert code == 1 and lines == [
        "error: a record holds 399 int64 values under B01, expected 400: a file of these records is damaged "
        "or of another schema; prepare it again"
    ]


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs: a real full disk (needs root; skipped where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk_for_every_writer_of_weights(small_disk, tmp_path, capsys):
    """import reben and export on a file system without room: one line naming the file, exit 1,
    nothing left behind, and an earlier output kept (HDF5 would crash the process instead)."""
    import keras

    from bigearthnet_tf import checkpoints, cli
    from bigearthnet_tf.models import build_model

    reben = Path(__file__).parent / "data" / "reben" / "tiny-resnet50-all-v0.2.0"
    for argv, target in (
        (["import", "reben", str(reben), "--out", str(small_disk / "r50")], small_disk / "r50.weights.h5"),
    ):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 1 and error.startswith(f"error: {target}: No space left on device")
        assert not [p for p in small_disk.iterdir() if not p.name.startswith(".bigearthnet-")]
    keras.utils.set_random_seed(0)
    model = build_model("K-BranchCNN-Tiny", 19)
    base = tmp_path / "ck" / "best"
    checkpoints.save_checkpoint(
        base, model, model_name="K-BranchCNN-Tiny", label_type="BigEarthNet-19", modality="S2", iteration=1
    )
    for export_format, name in (("keras", "m.keras"), ("saved_model", "m_saved_model")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["export", "--model", str(base), "--format", export_format, "--out", str(small_disk / name)])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 1 and error.startswith(f"error: {small_disk / name}: No space left on device")
        assert not [p for p in small_disk.iterdir() if not p.name.startswith(".bigearthnet-")]
    # With room, the same commands work.
    cli.main(["export", "--model", str(base), "--format", "keras", "--out", str(tmp_path / "m.keras")])
    assert (tmp_path / "m.keras").is_file()
