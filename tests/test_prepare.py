"""prepare.py: real patches through both formats, bad input, overwrite, resume after a kill, determinism.

Archives are copies of the six real example patches in `tmp_path`, broken one file at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tifffile

from bigearthnet_tf import prepare as prepare_module
from bigearthnet_tf import prepare_job
from bigearthnet_tf.archive import BadPatchError, official_v1_splits, open_archive, snow_cloud_v1
from bigearthnet_tf.cli import main as cli_main
from bigearthnet_tf.constants import (
    BANDS_10M,
    BANDS_20M,
    BANDS_60M,
    BIGEARTHNET_19_LABELS,
    ORIGINAL_LABELS,
    S2_BAND_NAMES,
    original_to_19,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.prepare import MANIFEST_NAME, SKIPPED_REPORT_NAME, WORK_DIR_NAME, prepare
from bigearthnet_tf.record_formats import LegacyFormat

REPO = Path(__file__).resolve().parents[1]
METADATA_SUFFIX = "_labels_metadata.json"


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_names(example_paths) -> list[str]:
    return sorted(path.name for path in example_paths.s2.iterdir() if path.is_dir())


@pytest.fixture
def archive(tmp_path, example_paths, example_names) -> Path:
    """A writable copy of the six real patches, with train.csv (4, CRLF) and val.csv (2)."""
    root = tmp_path / "archive"
    shutil.copytree(example_paths.s2, root)
    write_csv(tmp_path / "train.csv", example_names[:4])
    write_csv(tmp_path / "val.csv", example_names[4:])
    return root


def write_csv(path: Path, names: list[str]) -> Path:
    path.write_bytes("".join(f"{name}\r\n" for name in names).encode())
    return path


def split_files(archive: Path) -> list[Path]:
    return [archive.parent / "train.csv", archive.parent / "val.csv"]


def run(archive: Path, out: Path, **options) -> prepare_module.PrepareSummary:
    options.setdefault("workers", 1)
    options.setdefault("split_files", split_files(archive))
    return prepare(root=archive, out=out, show_progress=False, **options)


def tfrecord_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tfrecord")) if folder.exists() else []


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def geotiff(folder: Path, name: str, band: str) -> np.ndarray:
    return tifffile.imread(folder / name / f"{name}_{band}.tif")


def json_labels(folder: Path, name: str) -> list[str]:
    return json.loads((folder / name / f"{name}{METADATA_SUFFIX}").read_text())["labels"]


def read_default(files: list[Path]) -> list[dict]:
    """Records of default-format files as numpy, parsed by TensorFlow."""
    spec = {
        "format_version": tf.io.FixedLenFeature([1], tf.int64),
        "patch_name": tf.io.FixedLenFeature([], tf.string),
        "bands_10m": tf.io.FixedLenFeature([], tf.string),
        "bands_20m": tf.io.FixedLenFeature([], tf.string),
        "bands_60m": tf.io.FixedLenFeature([], tf.string),
        "original_labels": tf.io.VarLenFeature(tf.string),
        "original_labels_multi_hot": tf.io.FixedLenFeature([43], tf.int64),
        "BigEarthNet-19_labels": tf.io.VarLenFeature(tf.string),
        "BigEarthNet-19_labels_multi_hot": tf.io.FixedLenFeature([19], tf.int64),
    }
    records = []
    for serialized in tf.data.TFRecordDataset([str(f) for f in files]):
        parsed = tf.io.parse_single_example(serialized, spec)
        record = {
            "name": parsed["patch_name"].numpy().decode(),
            "format_version": int(parsed["format_version"][0]),
        }
        for key, bands, size in (
            ("bands_10m", BANDS_10M, 120),
            ("bands_20m", BANDS_20M, 60),
            ("bands_60m", BANDS_60M, 20),
        ):
            pixels = tf.reshape(tf.io.decode_raw(parsed[key], tf.uint16), (size, size, len(bands))).numpy()
            record.update({band: pixels[..., channel] for channel, band in enumerate(bands)})
        record.update(_labels(parsed))
        records.append(record)
    return records


def read_legacy(files: list[Path]) -> list[dict]:
    """Records of legacy files as numpy, parsed by TensorFlow with the 2019 feature spec."""
    sizes = {
        name: 14_400 if name in BANDS_10M else 3_600 if name in BANDS_20M else 400 for name in S2_BAND_NAMES
    }
    spec = {name: tf.io.FixedLenFeature([size], tf.int64) for name, size in sizes.items()}
    spec.update(
        {
            "patch_name": tf.io.FixedLenFeature([], tf.string),
            "original_labels": tf.io.VarLenFeature(tf.string),
            "original_labels_multi_hot": tf.io.FixedLenFeature([43], tf.int64),
            "BigEarthNet-19_labels": tf.io.VarLenFeature(tf.string),
            "BigEarthNet-19_labels_multi_hot": tf.io.FixedLenFeature([19], tf.int64),
        }
    )
    records = []
    for serialized in tf.data.TFRecordDataset([str(f) for f in files]):
        parsed = tf.io.parse_single_example(serialized, spec)
        record = {"name": parsed["patch_name"].numpy().decode()}
        for name, size in sizes.items():
            side = int(round(size**0.5))
            record[name] = parsed[name].numpy().reshape(side, side)
        record.update(_labels(parsed))
        records.append(record)
    return records


def _labels(parsed) -> dict:
    return {
        "labels_43": [v.decode() for v in tf.sparse.to_dense(parsed["original_labels"]).numpy()],
        "labels_19": [v.decode() for v in tf.sparse.to_dense(parsed["BigEarthNet-19_labels"]).numpy()],
        "multi_hot_43": parsed["original_labels_multi_hot"].numpy().tolist(),
        "multi_hot_19": parsed["BigEarthNet-19_labels_multi_hot"].numpy().tolist(),
    }


def assert_matches_archive(records: list[dict], archive: Path, names: list[str]) -> None:
    """Records are the patches `names` in this order, pixel-identical to their GeoTIFFs, right labels."""
    assert [record["name"] for record in records] == names
    for record in records:
        name = record["name"]
        for band in S2_BAND_NAMES:
            tiff = geotiff(archive, name, band)
            assert record[band].dtype.kind in "iu"
            np.testing.assert_array_equal(record[band], tiff, err_msg=f"{name} {band}")
        labels = json_labels(archive, name)
        assert record["labels_43"] == labels
        assert record["labels_19"] == list(original_to_19(labels))
        assert record["multi_hot_43"] == [int(label in labels) for label in ORIGINAL_LABELS]
        assert record["multi_hot_19"] == [
            int(label in original_to_19(labels)) for label in BIGEARTHNET_19_LABELS
        ]


def journaled_files(out: Path) -> list[str]:
    """Files an unfinished run has recorded as finished (its journal may end in a torn line)."""
    try:
        lines = (out / WORK_DIR_NAME / prepare_job.JOURNAL_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["file"] for line in lines if line.endswith("}")]


def run_cli_expecting_error(argv: list[str], capsys) -> str:
    """Run the command line, expect exit code 1, return its one-line error message."""
    with pytest.raises(SystemExit) as raised:
        cli_main(argv)
    assert raised.value.code == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err_lines) == 1
    return err_lines[0]


# --- round trip, layout, manifest ------------------------------------------------------------------


def test_default_format_round_trip_layout_and_manifest(archive, tmp_path, example_names):
    out = tmp_path / "out"
    summary = run(archive, out, shard_size=3)
    assert sorted(path.name for path in out.iterdir()) == [
        MANIFEST_NAME,
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
        "val-00000-of-00001.tfrecord",
    ]
    train = read_default([out / "train-00000-of-00002.tfrecord", out / "train-00001-of-00002.tfrecord"])
    assert len(read_default([out / "train-00000-of-00002.tfrecord"])) == 3
    assert_matches_archive(train, archive, example_names[:4])
    val = read_default([out / "val-00000-of-00001.tfrecord"])
    assert_matches_archive(val, archive, example_names[4:])
    assert {record["format_version"] for record in train + val} == {1}

    assert summary.patches == {"train": 4, "val": 2}
    assert summary.skipped == ()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest == {
        "format": "default",
        "format_version": 1,
        "archive_version": 1,
        "modalities": ["S2"],
        "bands": {"bands_10m": list(BANDS_10M), "bands_20m": list(BANDS_20M), "bands_60m": list(BANDS_60M)},
        "shapes": {"bands_10m": [120, 120, 4], "bands_20m": [60, 60, 6], "bands_60m": [20, 20, 2]},
        "label_types": ["original", "BigEarthNet-19"],
        "labels": {"original": list(ORIGINAL_LABELS), "BigEarthNet-19": list(BIGEARTHNET_19_LABELS)},
        "shard_size": 3,
        "splits": {
            "train": {
                "files": ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"],
                "patches": 4,
                "skipped": 0,
            },
            "val": {"files": ["val-00000-of-00001.tfrecord"], "patches": 2, "skipped": 0},
        },
        "patches": 6,
        "skipped": 0,
        "skipped_report": None,
        "created_by": manifest["created_by"],
    }
    assert manifest["created_by"].startswith("bigearthnet-tf ")


def test_legacy_format_round_trip_through_the_2019_flags(archive, tmp_path, example_names, capsys):
    out = tmp_path / "out"
    cli_main(["prepare", "-r", str(archive), "-o", str(out), "-n", *map(str, split_files(archive))])
    assert not (out / "train.tfrecord").exists()  # the default format unless asked
    cli_main(
        [
            "prepare",
            "--root_folder",
            str(archive),
            "--out_folder",
            str(tmp_path / "legacy"),
            "--format",
            "legacy",
        ]
        + ["--splits", *map(str, split_files(archive))]
    )
    legacy = tmp_path / "legacy"
    assert sorted(path.name for path in legacy.iterdir()) == [MANIFEST_NAME, "train.tfrecord", "val.tfrecord"]
    assert_matches_archive(read_legacy([legacy / "train.tfrecord"]), archive, example_names[:4])
    assert_matches_archive(read_legacy([legacy / "val.tfrecord"]), archive, example_names[4:])
    manifest = json.loads((legacy / MANIFEST_NAME).read_text())
    assert manifest["format"] == "legacy" and manifest["format_version"] is None
    assert manifest["bands"] == {name: [name] for name in S2_BAND_NAMES}
    assert manifest["splits"]["train"] == {"files": ["train.tfrecord"], "patches": 4, "skipped": 0}
    summary_text = capsys.readouterr().out
    assert "train: 4 patches in 1 file" in summary_text and "skipped: 0" in summary_text


def test_sentinel1_bands_in_both_formats(archive, tmp_path, example_paths, example_names):
    pairs = {name: open_archive(archive, s1_root=example_paths.s1).s1_name(name) for name in example_names}
    for record_format in ("default", "legacy"):
        out = tmp_path / record_format
        run(archive, out, record_format=record_format, s1_root=example_paths.s1)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert manifest["modalities"] == ["S2", "S1"]
        for serialized in tf.data.TFRecordDataset([str(f) for f in tfrecord_files(out)]):
            features = tf.train.Example.FromString(serialized.numpy()).features.feature
            name = features["patch_name"].bytes_list.value[0].decode()
            s1_name = features["patch_name_s1"].bytes_list.value[0].decode()
            assert s1_name == pairs[name]
            vv = tifffile.imread(example_paths.s1 / s1_name / f"{s1_name}_VV.tif")
            vh = tifffile.imread(example_paths.s1 / s1_name / f"{s1_name}_VH.tif")
            if record_format == "default":
                raw = features["bands_s1"].bytes_list.value[0]
                bands_s1 = np.frombuffer(raw, dtype="<f4").reshape(120, 120, 2)
                np.testing.assert_array_equal(bands_s1[..., 0], vv)
                np.testing.assert_array_equal(bands_s1[..., 1], vh)
            else:
                assert features["patch_name_s2"].bytes_list.value[0].decode() == name
                np.testing.assert_array_equal(np.array(features["VV"].float_list.value).reshape(120, 120), vv)
                np.testing.assert_array_equal(np.array(features["VH"].float_list.value).reshape(120, 120), vh)


# --- determinism and parallelism -------------------------------------------------------------------


def test_output_is_deterministic_and_independent_of_workers(archive, tmp_path, monkeypatch):
    one = run(archive, tmp_path / "one", shard_size=1, workers=1)
    two = run(archive, tmp_path / "two", shard_size=1, workers=2)
    run(archive, tmp_path / "again", shard_size=1, workers=2)
    assert one.files == two.files and len(one.files["train"]) == 4
    assert (
        folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "again")
    )

    # Legacy: parts of 2 patches written by two workers, concatenated in list order.
    run(archive, tmp_path / "legacy-one", record_format="legacy", workers=1)
    monkeypatch.setattr(LegacyFormat, "part_size", 1)
    run(archive, tmp_path / "legacy-parts", record_format="legacy", workers=2)
    assert folder_bytes(tmp_path / "legacy-one") == folder_bytes(tmp_path / "legacy-parts")


# --- bad input -------------------------------------------------------------------------------------


def break_missing_band(folder: Path, name: str) -> tuple[str, str]:
    (folder / f"{name}_B03.tif").unlink()
    return f"{name}_B03.tif", "missing band file"


def break_wrong_size(folder: Path, name: str) -> tuple[str, str]:
    shutil.copyfile(folder / f"{name}_B05.tif", folder / f"{name}_B02.tif")  # a real 60x60 GeoTIFF
    return f"{name}_B02.tif", "60x60"


def break_truncated(folder: Path, name: str) -> tuple[str, str]:
    path = folder / f"{name}_B04.tif"
    path.write_bytes(path.read_bytes()[:5000])
    return f"{name}_B04.tif", "truncated file"


def break_not_a_tiff(folder: Path, name: str) -> tuple[str, str]:
    (folder / f"{name}_B11.tif").write_bytes(b"<html>404 Not Found</html>")
    return f"{name}_B11.tif", "not a TIFF"


def break_json(folder: Path, name: str) -> tuple[str, str]:
    (folder / f"{name}{METADATA_SUFFIX}").write_text('{"labels": ["Pastures",')
    return f"{name}{METADATA_SUFFIX}", "malformed JSON"


def break_label(folder: Path, name: str) -> tuple[str, str]:
    path = folder / f"{name}{METADATA_SUFFIX}"
    metadata = json.loads(path.read_text())
    metadata["labels"] = ["Pastures", "Lava fields"]
    path.write_text(json.dumps(metadata))
    return f"{name}{METADATA_SUFFIX}", "unknown label 'Lava fields'"


BREAKERS = [break_missing_band, break_wrong_size, break_truncated, break_not_a_tiff, break_json, break_label]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_bad_patch_stops_with_one_line_and_leaves_no_records(
    breaker, archive, tmp_path, example_names, capsys
):
    # The last train patch is broken; the shards before it are complete when it fails.
    name = example_names[3]
    file_name, reason = breaker(archive / name, name)
    out = tmp_path / "out"
    argv = ["prepare", "-r", str(archive), "-o", str(out), "-n", *map(str, split_files(archive))]
    message = run_cli_expecting_error([*argv, "--shard-size", "1", "--workers", "1"], capsys)
    assert message.startswith(f"error: patch {name}: {file_name}: ")
    assert reason in message
    assert tfrecord_files(out) == []
    assert not (out / WORK_DIR_NAME).exists() and not (out / MANIFEST_NAME).exists()


def test_bad_patch_with_parallel_workers(archive, tmp_path, example_names, capsys):
    name = example_names[1]
    break_missing_band(archive / name, name)
    out = tmp_path / "out"
    argv = ["prepare", "-r", str(archive), "-o", str(out), "-n", *map(str, split_files(archive))]
    for record_format in ("default", "legacy"):
        message = run_cli_expecting_error([*argv, "--workers", "2", "--format", record_format], capsys)
        assert message == (
            f"error: patch {name}: {name}_B03.tif: missing band file; --skip-bad writes the other patches "
            "and lists the bad ones"
        )
        assert tfrecord_files(out) == []


def test_listed_patch_without_folder(archive, tmp_path, example_names, capsys):
    write_csv(archive.parent / "val.csv", [example_names[4], "S2A_MSIL2A_20170613T101031_99_99"])
    out = tmp_path / "out"
    argv = ["prepare", "-r", str(archive), "-o", str(out), "-n", *map(str, split_files(archive))]
    message = run_cli_expecting_error(argv, capsys)
    missing = archive / "S2A_MSIL2A_20170613T101031_99_99"
    assert message == (
        f"error: patch S2A_MSIL2A_20170613T101031_99_99: {missing}: "
        f"listed in {archive.parent / 'val.csv'} but no such patch folder; --skip-bad writes the other "
        "patches and lists the bad ones"
    )
    assert tfrecord_files(out) == []


def test_skip_bad_writes_the_rest_and_a_report(archive, tmp_path, example_names, capsys):
    broken = {example_names[0]: break_missing_band, example_names[4]: break_label}
    for name, breaker in broken.items():
        breaker(archive / name, name)
    ghost = "S2B_MSIL2A_20170924T93020_99_99"  # the known hour bug in its name, and no folder
    write_csv(archive.parent / "train.csv", [*example_names[:4], ghost])
    expected = {}
    reader = open_archive(archive)
    for name in broken:
        with pytest.raises(BadPatchError) as raised:
            reader.read_patch(name)
        expected[name] = raised.value

    out = tmp_path / "out"
    cli_main(
        ["prepare", "-r", str(archive), "-o", str(out), "-n", *map(str, split_files(archive)), "--skip-bad"]
    )
    train = read_default(sorted(out.glob("train-*.tfrecord")))
    assert_matches_archive(train, archive, example_names[1:4])
    assert_matches_archive(read_default(sorted(out.glob("val-*.tfrecord"))), archive, example_names[5:])
    report = (out / SKIPPED_REPORT_NAME).read_text().splitlines()
    bad_0, bad_4 = expected[example_names[0]], expected[example_names[4]]
    assert report == [
        "split,patch,file,reason",
        f"train,{ghost},{archive / ghost},listed in {archive.parent / 'train.csv'} but no such patch folder",
        f"train,{bad_0.patch},{bad_0.file},{bad_0.reason}",
        f'val,{bad_4.patch},{bad_4.file},"{bad_4.reason}"'
        if "," in bad_4.reason
        else f"val,{bad_4.patch},{bad_4.file},{bad_4.reason}",
    ]
    assert bad_0.file == f"{example_names[0]}_B03.tif"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["splits"]["train"]["patches"] == 3 and manifest["splits"]["train"]["skipped"] == 2
    assert manifest["splits"]["val"]["patches"] == 1 and manifest["splits"]["val"]["skipped"] == 1
    assert manifest["skipped"] == 3 and manifest["skipped_report"] == SKIPPED_REPORT_NAME
    assert "skipped: 3" in capsys.readouterr().out


# --- overwrite -------------------------------------------------------------------------------------


def test_existing_outputs_are_not_overwritten(archive, tmp_path, capsys):
    out = tmp_path / "out"
    run(archive, out, shard_size=1)
    before = folder_bytes(out)
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    argv = ["prepare", "-r", str(archive), "-o", str(out), "-n", *map(str, split_files(archive))]
    message = run_cli_expecting_error([*argv, "--shard-size", "1"], capsys)
    assert message.startswith(f"error: {out / MANIFEST_NAME} exists") and "--overwrite" in message
    # A different shard count would also mix with the existing shards.
    message = run_cli_expecting_error([*argv, "--shard-size", "3"], capsys)
    assert "--overwrite" in message
    assert folder_bytes(out) == before
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps

    summary = run(archive, out, shard_size=3, overwrite=True)
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted([MANIFEST_NAME, *summary.files["train"], *summary.files["val"]])
    assert "train-00003-of-00004.tfrecord" not in names  # stale shards of the old layout are gone


# --- resume after an interruption ------------------------------------------------------------------


class SimulatedKill(BaseException):
    """Stands for SIGKILL: no handler of ours may catch it."""


def test_restart_after_a_simulated_crash_keeps_finished_shards(archive, tmp_path, monkeypatch, example_names):
    reference = tmp_path / "reference"
    run(archive, reference, shard_size=1)

    out = tmp_path / "out"
    real_read = prepare_module.Archive.read_patch_files
    calls = []

    def dying_read(self, name):
        calls.append(name)
        if len(calls) == 4:
            raise SimulatedKill
        return real_read(self, name)

    monkeypatch.setattr(prepare_module.Archive, "read_patch_files", dying_read)
    with pytest.raises(SimulatedKill):
        run(archive, out, shard_size=1)
    monkeypatch.setattr(prepare_module.Archive, "read_patch_files", real_read)

    finished = {path.name: path.stat().st_ino for path in out.glob("*.tfrecord")}
    assert sorted(finished) == [f"train-0000{i}-of-00004.tfrecord" for i in range(3)]
    assert not (out / MANIFEST_NAME).exists()
    leftover = out / WORK_DIR_NAME / "train-00003-of-00004.tfrecord.12345.tmp"  # as a kill leaves it
    leftover.write_bytes(b"half a record")

    summary = run(archive, out, shard_size=1)
    assert summary.resumed_patches == 3
    assert {name: (out / name).stat().st_ino for name in finished} == finished  # kept, not rewritten
    assert not (out / WORK_DIR_NAME).exists()
    assert folder_bytes(out) == folder_bytes(reference)


# A read that never returns, as on a hung network disk: the band file stays a regular file (a FIFO
# is refused at once, by design), and every process of the run, workers included, blocks on it.
_BLOCKING_READS = """
import os, time
from bigearthnet_tf import files
_read = files.read_input_file
def read_input_file(path, max_bytes):
    if os.fspath(path).endswith(os.environ["BIGEARTHNET_TEST_BLOCKED_FILE"]):
        while True:
            time.sleep(1)
    return _read(path, max_bytes)
files.read_input_file = read_input_file
"""
_PREPARE = (
    "import sys, json; from bigearthnet_tf.prepare import prepare; "
    "root, out, splits = json.loads(sys.argv[1]); "
    "prepare(root=root, out=out, split_files=splits, shard_size=1, workers=2, show_progress=False)"
)


def start_blocked_prepare(archive: Path, out: Path, tmp_path: Path, blocked_file: str) -> subprocess.Popen:
    """`prepare` in a new process group whose reads of `blocked_file` never return."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(_BLOCKING_READS)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "BIGEARTHNET_TEST_BLOCKED_FILE": blocked_file,
    }
    args = [str(archive), str(out), [str(p) for p in split_files(archive)]]
    return subprocess.Popen(
        [sys.executable, "-c", _PREPARE, json.dumps(args)],
        cwd=REPO,
        env=environment,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_blocked_shard(process: subprocess.Popen, out: Path, train_shards: set[str]) -> Path:
    """Wait until the train shards are journaled and the blocked val shard's temporary file exists."""
    deadline = time.monotonic() + 120
    while True:
        blocked = list((out / WORK_DIR_NAME).glob("val-00000*.tmp")) if (out / WORK_DIR_NAME).exists() else []
        if train_shards <= set(journaled_files(out)) and blocked:
            return blocked[0]
        assert process.poll() is None, "prepare ended although a patch cannot be read"
        assert time.monotonic() < deadline, "prepare did not reach the blocked patch"
        time.sleep(0.05)


def wait_until_group_gone(group: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {group} outlived SIGKILL")


def test_restart_after_sigkill(archive, tmp_path, example_names):
    """A real SIGKILL of the whole process group while a worker is blocked reading a patch."""
    blocked = example_names[4]  # the first val patch: all train shards finish before it
    out = tmp_path / "out"
    process = start_blocked_prepare(archive, out, tmp_path, f"{blocked}_B08.tif")
    train_shards = {f"train-0000{i}-of-00004.tfrecord" for i in range(4)}
    try:
        wait_for_blocked_shard(process, out, train_shards)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        wait_until_group_gone(process.pid)  # forked workers hold the output lock until they are gone
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert not (out / MANIFEST_NAME).exists()
    assert list((out / WORK_DIR_NAME).glob("*.tmp"))  # the blocked shard's temporary file
    finished = {name: (out / name).stat().st_ino for name in journaled_files(out)}
    assert train_shards <= set(finished)

    summary = run(archive, out, shard_size=1, workers=2)
    assert summary.resumed_patches == len(finished)
    assert {name: (out / name).stat().st_ino for name in finished} == finished
    assert not (out / WORK_DIR_NAME).exists()
    reference = tmp_path / "reference"
    run(archive, reference, shard_size=1)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_killed_worker_fails_the_run_and_keeps_finished_shards(archive, tmp_path, example_names):
    """A worker killed mid-run (as the out-of-memory killer would) ends the run with a clear error."""
    blocked = example_names[4]
    out = tmp_path / "out"
    process = start_blocked_prepare(archive, out, tmp_path, f"{blocked}_B08.tif")
    try:
        temporary = wait_for_blocked_shard(process, out, {"train-00000-of-00004.tfrecord"})
        worker = int(temporary.name.rsplit(".", 2)[-2])
        os.kill(worker, signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    assert "worker process died unexpectedly" in stderr and "run the same command again" in stderr
    with pytest.raises(ProcessLookupError):  # no worker outlives the run
        os.killpg(process.pid, 0)
    # The first worker finished train shards 0 and 2 before it took the blocked val shard.
    finished = {name: (out / name).stat().st_ino for name in journaled_files(out)}
    assert {"train-00000-of-00004.tfrecord", "train-00002-of-00004.tfrecord"} <= set(finished)
    assert "val-00000-of-00002.tfrecord" not in finished
    assert not list((out / WORK_DIR_NAME).glob("*.tmp"))

    summary = run(archive, out, shard_size=1, workers=2)
    assert summary.resumed_patches == len(finished)
    assert {name: (out / name).stat().st_ino for name in finished} == finished
    reference = tmp_path / "reference"
    run(archive, reference, shard_size=1)
    assert folder_bytes(out) == folder_bytes(reference)


def test_legacy_restart_keeps_finished_parts(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(LegacyFormat, "part_size", 1)
    reference = tmp_path / "reference"
    run(archive, reference, record_format="legacy")
    out = tmp_path / "out"
    real_read = prepare_module.Archive.read_patch_files
    calls = []

    def dying_read(self, name):
        calls.append(name)
        if len(calls) == 3:
            raise SimulatedKill
        return real_read(self, name)

    monkeypatch.setattr(prepare_module.Archive, "read_patch_files", dying_read)
    with pytest.raises(SimulatedKill):
        run(archive, out, record_format="legacy")
    monkeypatch.setattr(prepare_module.Archive, "read_patch_files", real_read)
    assert tfrecord_files(out) == []  # no split is complete yet
    # The two finished parts were appended to the split's partial file and deleted.
    assert list((out / WORK_DIR_NAME).glob("train.part-*")) == []
    partial = out / WORK_DIR_NAME / "train.tfrecord.partial"
    assert partial.stat().st_size == sum(len(record) + 16 for record in reference_records(reference, 2))
    with open(partial, "ab") as handle:  # as if killed between an append and its journal line
        handle.write(b"bytes of a part whose append was not recorded")

    summary = run(archive, out, record_format="legacy")
    assert summary.resumed_patches == 2
    assert folder_bytes(out) == folder_bytes(reference)


def reference_records(folder: Path, count: int) -> list[bytes]:
    """The first `count` serialized records of a prepared legacy train split."""
    return [r.numpy() for r in tf.data.TFRecordDataset(str(folder / "train.tfrecord")).take(count)]


def test_restart_with_other_arguments_is_refused(archive, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(
        prepare_module.Archive, "read_patch_files", lambda self, name: (_ for _ in ()).throw(SimulatedKill)
    )
    with pytest.raises(SimulatedKill):
        run(archive, out, shard_size=1)
    monkeypatch.undo()
    with pytest.raises(UserError, match="unfinished preparation with other arguments"):
        run(archive, out, shard_size=2)
    run(archive, out, shard_size=2, overwrite=True)
    assert sorted(path.name for path in out.glob("*.tfrecord")) == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
        "val-00000-of-00001.tfrecord",
    ]


# --- split lists -----------------------------------------------------------------------------------


def test_official_splits_on_a_partial_archive(archive, tmp_path, example_names, capsys):
    out = tmp_path / "out"
    cli_main(["prepare", "-r", str(archive), "-o", str(out), "--splits", "official", "--workers", "1"])
    present = set(example_names)
    expected = {split: [n for n in names if n in present] for split, names in official_v1_splits().items()}
    listed = sum(len(names) for names in official_v1_splits().values())
    kept = sum(len(names) for names in expected.values())
    assert 0 < kept < len(example_names)  # one example patch is on the snow/cloud lists
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    # A split the partial archive leaves empty gets no file and no manifest entry, and is named.
    empty = [split for split, names in expected.items() if not names]
    assert empty == ["val"]
    assert {split: info["patches"] for split, info in manifest["splits"].items()} == {
        split: len(names) for split, names in expected.items() if names
    }
    for split, names in expected.items():
        assert [r["name"] for r in read_default(sorted(out.glob(f"{split}-*.tfrecord")))] == names
    printed = capsys.readouterr().err
    assert f"official v1 splits: {kept:,} of {listed:,} listed patches" in printed
    assert "split val: none of its patches is left to prepare; no val files are written" in printed
    assert not list(out.glob("val*"))


def test_official_splits_need_at_least_one_listed_patch(tmp_path, example_paths, example_names):
    root = tmp_path / "archive"
    flagged = [name for name in example_names if name in snow_cloud_v1()]
    assert flagged
    root.mkdir()
    shutil.copytree(example_paths.s2 / flagged[0], root / flagged[0])
    with pytest.raises(UserError, match="none of the 519,284 patches of the official v1 splits"):
        prepare(root=root, out=tmp_path / "out", official_splits=True, workers=1, show_progress=False)


def test_exclude_snow_cloud_drops_flagged_patches(archive, tmp_path, example_names):
    write_csv(archive.parent / "train.csv", example_names)
    flagged = snow_cloud_v1()
    summary = run(
        archive, tmp_path / "out", split_files=[archive.parent / "train.csv"], exclude_snow_cloud=True
    )
    kept = [name for name in example_names if name not in flagged]
    assert len(kept) < len(example_names)
    assert [r["name"] for r in read_default(sorted((tmp_path / "out").glob("train-*.tfrecord")))] == kept
    assert summary.patches == {"train": len(kept)}


def test_val_and_validation_name_the_same_split(archive, tmp_path, example_names):
    validation = write_csv(tmp_path / "validation.csv", example_names[4:])
    with pytest.raises(UserError, match="both name split"):
        run(archive, tmp_path / "out", split_files=[*split_files(archive), validation])
    summary = run(archive, tmp_path / "out2", split_files=[archive.parent / "train.csv", validation])
    assert summary.files["validation"] == ("validation-00000-of-00001.tfrecord",)


# --- v2 (reBEN) with Sentinel-1 ----------------------------------------------------------------------


def test_v2_official_splits_with_sentinel1(synthetic_v2, tmp_path):
    from bigearthnet_tf.archive import official_v2_splits

    expected = official_v2_splits(synthetic_v2)
    reader = open_archive(synthetic_v2, s1_root=synthetic_v2)
    for record_format in ("default", "legacy"):
        out = tmp_path / record_format
        summary = prepare(
            root=synthetic_v2,
            out=out,
            official_splits=True,
            record_format=record_format,
            s1_root=synthetic_v2,
            workers=1,
            show_progress=False,
        )
        assert summary.patches == {split: len(names) for split, names in expected.items()}
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert manifest["archive_version"] == 2 and manifest["label_types"] == ["BigEarthNet-19"]
        assert list(manifest["labels"]) == ["BigEarthNet-19"] and manifest["modalities"] == ["S2", "S1"]
        files = [out / name for name in summary.files["validation"]]
        names = []
        for serialized in tf.data.TFRecordDataset([str(f) for f in files]):
            features = tf.train.Example.FromString(serialized.numpy()).features.feature
            name = features["patch_name"].bytes_list.value[0].decode()
            names.append(name)
            assert "original_labels" not in features and "original_labels_multi_hot" not in features
            patch = reader.read_patch(name)
            labels_19 = [v.decode() for v in features["BigEarthNet-19_labels"].bytes_list.value]
            assert tuple(labels_19) == patch.labels_19
            assert features["patch_name_s1"].bytes_list.value[0].decode() == patch.s1_name
            if record_format == "legacy":
                np.testing.assert_array_equal(
                    np.array(features["VH"].float_list.value, dtype=np.float32).reshape(120, 120),
                    patch.s1_bands["VH"],
                )
                np.testing.assert_array_equal(
                    np.array(features["B8A"].int64_list.value).reshape(60, 60), patch.bands["B8A"]
                )
            else:
                raw = features["bands_20m"].bytes_list.value[0]
                bands_20m = np.frombuffer(raw, dtype="<u2").reshape(60, 60, 6)
                np.testing.assert_array_equal(bands_20m[..., BANDS_20M.index("B8A")], patch.bands["B8A"])
        assert names == expected["validation"]


def test_a_run_refused_before_finishing_anything_leaves_nothing(synthetic_v2, tmp_path):
    """Bad v2 metadata found by the workers: no work folder stays to refuse the corrected run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "v2"
    shutil.copytree(synthetic_v2, root)
    table = pq.read_table(root / "metadata.parquet")
    good = table
    table = table.set_column(table.schema.get_field_index("labels"), "labels", pa.array([[1]] * len(table)))
    pq.write_table(table, root / "metadata.parquet")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="metadata.parquet: column 'labels' holds list<element: int64>"):
        prepare(root, out, official_splits=True, workers=1, show_progress=False)
    assert not any(out.iterdir())
    pq.write_table(good, root / "metadata.parquet")
    summary = prepare(root, out, official_splits=True, workers=1, shard_size=7, show_progress=False)
    assert summary.total_patches > 0


def test_an_empty_split_list_is_named(synthetic_v1, tmp_path):
    empty = tmp_path / "test.csv"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match=f"split file {empty} lists no patches"):
        prepare(synthetic_v1, tmp_path / "out", [empty], workers=1, show_progress=False)
