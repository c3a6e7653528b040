"""End to end on synthetic archives in the exact v1 and v2 layouts, with Sentinel-1, through the command
line: prepare -> stats -> train -> evaluate, and what differs between v1 and v2 (split names, label
types, snow/cloud handling, S1 pairing), checked against the archive's own files (parquet, JSON, CSV).

v2: the `synthetic_v2` fixture (48 patches with S1), official splits from the parquet, default format,
`bigearthnet stats` on the training split, K-BranchCNN-Tiny (reads all 12 S2 bands and VV/VH) with
modality MM, BigEarthNet-19, in this process through `cli.main`.
v1: the `synthetic_v1_s1` fixture (24 patches with S1), the synthetic CSV lists with `val.csv` named
`validation.csv`, legacy format, ResNet-Tiny with modality S1 on the 43 original labels, through the
2019 root scripts `prep_splits.py` and `train.py` in subprocesses, then `bigearthnet evaluate`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.resources
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from helpers import cli, cli_error

from bigearthnet_tf import checkpoints
from bigearthnet_tf.archive import V1_METADATA_SUFFIX, V1_S1_FOLDER, V1_S2_FOLDER
from bigearthnet_tf.constants import (
    BIGEARTHNET_19_LABELS,
    ORIGINAL_LABELS,
    S1_BANDS,
    S2_BANDS,
)
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.input_pipeline import make_dataset
from bigearthnet_tf.stats import load_statistics
from bigearthnet_tf.synth import write_synthetic_archive

REPOSITORY = Path(__file__).resolve().parents[1]
BATCH = 8
SPLITS = ("train", "validation", "test")
V1_DEFAULTS = {band.name: (band.mean, band.std) for band in (*S2_BANDS, *S1_BANDS)}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STATISTICS_RTOL = 1e-9
PROBABILITY_ATOL = 1e-6  # predict vs evaluate; both CSVs hold 8 decimals


# --- helpers -----------------------------------------------------------------------------------------


def prepare(*args: object) -> None:
    """`bigearthnet prepare` in one worker process (the machines running the tests are shared)."""
    cli("prepare", *args, "--workers", 1)


def parquet_rows(root: Path) -> tuple[list[dict], list[dict]]:
    """The rows of metadata.parquet and of the snow/cloud/shadow parquet, in file order."""
    main_rows = pq.read_table(root / "metadata.parquet").to_pylist()
    flagged = pq.read_table(root / "metadata_for_patches_with_snow_cloud_or_shadow.parquet").to_pylist()
    return main_rows, flagged


def is_flagged(row: dict) -> bool:
    return bool(row["contains_seasonal_snow"] or row["contains_cloud_or_shadow"])


def ids_by_split(rows: list[dict]) -> dict[str, list[str]]:
    """patch_ids per split (`val` counted as `validation`), in parquet order."""
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for row in rows:
        splits["validation" if row["split"] == "val" else row["split"]].append(row["patch_id"])
    return splits


def record_features(files: list[Path], *keys: str) -> list[tuple[str, ...]]:
    """The given bytes features of every record, in file and record order (read with plain TensorFlow)."""
    import tensorflow as tf

    rows = []
    for path in files:
        for raw in tf.data.TFRecordDataset(str(path)):
            example = tf.train.Example.FromString(raw.numpy())
            rows.append(tuple(example.features.feature[key].bytes_list.value[0].decode() for key in keys))
    return rows


def record_names(files: list[Path]) -> list[str]:
    return [name for (name,) in record_features(files, "patch_name")]


def split_files(out: Path, split: str) -> list[Path]:
    manifest = json.loads((out / "dataset.json").read_text())
    return [out / name for name in manifest["splits"][split]["files"]]


def read_predictions(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def only_evaluation(out_dir: Path) -> Path:
    """The one evaluation folder `evaluate` wrote under `out_dir/eval/`."""
    folders = list((out_dir / "eval").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def band_mean(paths: list[Path]) -> float:
    """Mean of one band over whole rasters, from the GeoTIFF files themselves (float64)."""
    return float(np.mean(np.stack([tifffile.imread(path).astype(np.float64) for path in paths])))


def v1_s1_pairs(root: Path) -> dict[str, str]:
    """S2 name -> S1 folder name, from each S1 patch's `corresponding_s2_patch`."""
    pairs = {}
    for folder in sorted((root / V1_S1_FOLDER).iterdir()):
        metadata = json.loads((folder / f"{folder.name}{V1_METADATA_SUFFIX}").read_text())
        pairs[metadata["corresponding_s2_patch"]] = folder.name
    return pairs


def write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps(values, indent=2))
    return path


def config_2019(records: Path, out_dir: Path, train: str, val: str, test: str, **changes) -> dict:
    """Every 2019 key, for a tiny run of one epoch."""
    values = {
        "model_name": "K-BranchCNN-Tiny",
        "label_type": "BigEarthNet-19",
        "batch_size": BATCH,
        "nb_epoch": 1,
        "learning_rate": 1e-3,
        "out_dir": str(out_dir),
        "save_checkpoint_after_iteration": 0,
        "save_checkpoint_per_iteration": 1000,
        "tr_tf_record_files": [str(records / train)],
        "val_tf_record_files": [str(records / val)],
        "test_tf_record_files": [str(records / test)],
        "fine_tune": False,
        "model_file": str(out_dir / "models" / "best"),
        "shuffle_buffer_size": 100,
    }
    values.update(changes)
    return values


# --- v2 with S1: prepare (official splits), stats, train MM, evaluate ---------------------------------


@pytest.fixture(scope="module")
def v2_records(synthetic_v2, tmp_path_factory) -> Path:
    """The v2 fixture archive prepared with its official splits and S1, default format."""
    out = tmp_path_factory.mktemp("e2e_v2") / "records"
    prepare("-r", synthetic_v2, "-o", out, "--splits", "official", "--s1-root", synthetic_v2)
    return out


@pytest.mark.slow
def test_v2_with_s1_prepare_stats_train_mm_evaluate(synthetic_v2, v2_records, tmp_path, capsys):
    rows, flagged = parquet_rows(synthetic_v2)
    expected = ids_by_split([row for row in rows if not is_flagged(row)])
    by_id = {row["patch_id"]: row for row in rows}
    assert all(expected.values()) and flagged  # the fixture has every split and some snow/cloud patches

    # prepare: the parquet's splits, named train / validation / test, in parquet order, paired S1 names.
    manifest = json.loads((v2_records / "dataset.json").read_text())
    assert manifest["archive_version"] == 2 and manifest["format"] == "default"
    assert manifest["modalities"] == ["S2", "S1"] and manifest["label_types"] == ["BigEarthNet-19"]
    assert manifest["bands"]["bands_s1"] == ["VV", "VH"]
    assert {split: info["files"] for split, info in manifest["splits"].items()} == {
        split: [f"{split}-00000-of-00001.tfrecord"] for split in SPLITS
    }
    for split in SPLITS:
        assert manifest["splits"][split]["patches"] == len(expected[split])
        pairs = record_features(split_files(v2_records, split), "patch_name", "patch_name_s1")
        assert pairs == [(name, by_id[name]["s1_name"]) for name in expected[split]]

    # stats over the training split only: exact against the GeoTIFFs of the training patches.
    stats_file = tmp_path / "stats_v2.json"
    cli("stats", v2_records / "train-*.tfrecord", "--out", stats_file)
    document = json.loads(stats_file.read_text())
    assert document["records"] == len(expected["train"])
    statistics = load_statistics(stats_file)
    assert list(statistics) == [*(band.name for band in S2_BANDS), "VV", "VH"]
    s1_root = synthetic_v2 / "BigEarthNet-S1"
    s2_root = synthetic_v2 / "BigEarthNet-S2"
    train_ids = expected["train"]
    vv_files = [
        next(s1_root.glob(f"*/{by_id[n]['s1_name']}/{by_id[n]['s1_name']}_VV.tif")) for n in train_ids
    ]
    b01_files = [next(s2_root.glob(f"*/{n}/{n}_B01.tif")) for n in train_ids]
    assert statistics["VV"][0] == pytest.approx(band_mean(vv_files), rel=STATISTICS_RTOL)
    assert statistics["B01"][0] == pytest.approx(band_mean(b01_files), rel=STATISTICS_RTOL)

    # train (MM, the statistics file) and evaluate, through the command line.
    out_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "K-BranchCNN-Tiny-MM-v2.json",
        **config_2019(
            v2_records,
            out_dir,
            "train-*.tfrecord",
            "validation-*.tfrecord",
            "test-*.tfrecord",
            modality="MM",
            statistics_file=str(stats_file),
            training_size=len(expected["train"]),
            test_size=len(expected["test"]),
        ),
    )
    cli("train", config)
    cli("evaluate", config)
    report = capsys.readouterr().out
    assert "Per class" in report and "Marine waters" in report

    iterations = math.ceil(len(expected["train"]) / BATCH)
    for base in (out_dir / "models" / f"iteration-{iterations}", out_dir / "models" / "best"):
        meta = checkpoints.read_metadata(base)
        assert meta["modality"] == "MM" and meta["label_type"] == "BigEarthNet-19"
        assert meta["class_names"] == list(BIGEARTHNET_19_LABELS)
        assert meta["input_keys"] == ["bands_10m", "bands_20m", "bands_60m", "bands_s1"]
        assert meta["band_order"]["bands_s1"] == ["VV", "VH"]
        # Every band the model standardises carries the file's statistics, not the v1 defaults.
        assert set(meta["statistics"]) == set(statistics)
        for band, (mean, std) in meta["statistics"].items():
            assert (mean, std) == pytest.approx(statistics[band], rel=STATISTICS_RTOL)
            assert mean != pytest.approx(V1_DEFAULTS[band][0], rel=1e-6)

    result = json.loads((out_dir / "eval_result.json").read_text())
    assert result["num_samples"] == len(expected["test"])
    for key in ("micro_average_precision", "macro_average_precision", "micro_f1_score", "hamming_loss"):
        assert 0.0 <= result[key] <= 1.0
    assert "macro_f1_score_class18" in result and "macro_f1_score_class19" not in result
    evaluation = only_evaluation(out_dir)
    assert json.loads((evaluation / "eval_result.json").read_text()) == result
    header, predictions = read_predictions(evaluation / "predictions.csv")
    assert header == [
        "patch_name",
        *BIGEARTHNET_19_LABELS,
        *(f"true:{name}" for name in BIGEARTHNET_19_LABELS),
    ]
    assert [row["patch_name"] for row in predictions] == expected["test"]
    for row in predictions:  # the truth columns are the parquet's labels
        truth = {name for name in BIGEARTHNET_19_LABELS if row[f"true:{name}"] == "1"}
        assert truth == set(by_id[row["patch_name"]]["labels"])
        assert all(0.0 <= float(row[name]) <= 1.0 for name in BIGEARTHNET_19_LABELS)
    assert (evaluation / "per_class_metrics.png").read_bytes()[:8] == PNG_SIGNATURE

    # The model applied straight to the archive (S1 found beside it, paired through the parquet)
    # gives what evaluate gave on the prepared records.
    test_list = tmp_path / "test.csv"
    test_list.write_text("".join(f"{name}\n" for name in expected["test"]))
    applied = tmp_path / "applied.csv"
    cli(
        "predict",
        "--model",
        out_dir / "models" / "best",
        "--archive",
        synthetic_v2,
        "--splits",
        test_list,
        "--out",
        applied,
    )
    _, direct = read_predictions(applied)
    assert [row["patch_name"] for row in direct] == expected["test"]
    np.testing.assert_allclose(
        [[float(row[name]) for name in BIGEARTHNET_19_LABELS] for row in direct],
        [[float(row[name]) for name in BIGEARTHNET_19_LABELS] for row in predictions],
        rtol=0,
        atol=PROBABILITY_ATOL,
    )


# --- v1 with S1: prep_splits.py (CSV, legacy), stats, train.py (S1, original), evaluate -----------


def run_script(script: str, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(REPOSITORY / script), *map(str, args)],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_v1_with_s1_2019_scripts_legacy_records_s1_modality(synthetic_v1_s1, v2_records, tmp_path, capsys):
    csvs = tmp_path / "lists"
    csvs.mkdir()
    for source, target in (("train", "train"), ("val", "validation"), ("test", "test")):
        shutil.copyfile(synthetic_v1_s1 / f"{source}.csv", csvs / f"{target}.csv")
    expected = {split: (csvs / f"{split}.csv").read_text().split() for split in SPLITS}
    assert all(expected.values())
    pairs = v1_s1_pairs(synthetic_v1_s1)
    records = tmp_path / "records"

    run_script(
        "prep_splits.py",
        "-r",
        synthetic_v1_s1,
        "-o",
        records,
        "-n",
        *(csvs / f"{split}.csv" for split in SPLITS),
        "--s1-root",
        synthetic_v1_s1,
        "--format",
        "legacy",
        "--workers",
        1,
    )
    manifest = json.loads((records / "dataset.json").read_text())
    assert manifest["archive_version"] == 1 and manifest["format"] == "legacy"
    assert manifest["modalities"] == ["S2", "S1"]
    assert manifest["label_types"] == ["original", "BigEarthNet-19"]
    assert {split: info["files"] for split, info in manifest["splits"].items()} == {
        split: [f"{split}.tfrecord"] for split in SPLITS
    }
    for split in SPLITS:
        rows = record_features(
            [records / f"{split}.tfrecord"], "patch_name", "patch_name_s2", "patch_name_s1"
        )
        assert rows == [(name, name, pairs[name]) for name in expected[split]]

    stats_file = tmp_path / "stats_s1.json"
    cli("stats", records / "train.tfrecord", "--out", stats_file, "--modality", "S1")
    statistics = load_statistics(stats_file)
    assert list(statistics) == ["VV", "VH"]
    s1_root = synthetic_v1_s1 / V1_S1_FOLDER
    for band in ("VV", "VH"):
        files = [s1_root / pairs[n] / f"{pairs[n]}_{band}.tif" for n in expected["train"]]
        assert statistics[band][0] == pytest.approx(band_mean(files), rel=STATISTICS_RTOL)

    out_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "ResNet-Tiny-S1-original.json",
        **config_2019(
            records,
            out_dir,
            "train.tfrecord",
            "validation.tfrecord",
            "test.tfrecord",
            model_name="ResNet-Tiny",
            label_type="original",
            modality="S1",
            statistics_file=str(stats_file),
            training_size=len(expected["train"]),
            test_size=len(expected["test"]),
        ),
    )
    trained = run_script("train.py", config)
    assert "training ResNet-Tiny (original, S1)" in trained.stdout
    capsys.readouterr()
    cli("evaluate", config)  # what eval.py runs, in this process (one TensorFlow start-up less)
    assert "Per class" in capsys.readouterr().out

    meta = checkpoints.read_metadata(out_dir / "models" / "best")
    assert meta["modality"] == "S1" and meta["label_type"] == "original"
    assert meta["class_names"] == list(ORIGINAL_LABELS)
    assert meta["input_keys"] == ["bands_s1"] and meta["band_order"] == {"bands_s1": ["VV", "VH"]}
    assert set(meta["statistics"]) == {"VV", "VH"}
    for band in ("VV", "VH"):
        assert tuple(meta["statistics"][band]) == pytest.approx(statistics[band], rel=STATISTICS_RTOL)
        assert meta["statistics"][band][0] != pytest.approx(V1_DEFAULTS[band][0], rel=1e-6)

    result = json.loads((out_dir / "eval_result.json").read_text())
    assert result["num_samples"] == len(expected["test"]) and "macro_f1_score_class42" in result
    evaluation = only_evaluation(out_dir)
    header, predictions = read_predictions(evaluation / "predictions.csv")
    assert header[1:44] == list(ORIGINAL_LABELS) and header[44:] == [f"true:{n}" for n in ORIGINAL_LABELS]
    assert [row["patch_name"] for row in predictions] == expected["test"]
    s2_root = synthetic_v1_s1 / V1_S2_FOLDER
    for row in predictions:  # the truth columns are the patch JSON's 43-class labels
        labels = json.loads(
            (s2_root / row["patch_name"] / f"{row['patch_name']}{V1_METADATA_SUFFIX}").read_text()
        )
        assert {name for name in ORIGINAL_LABELS if row[f"true:{name}"] == "1"} == set(labels["labels"])
    assert (evaluation / "per_class_metrics.png").read_bytes()[:8] == PNG_SIGNATURE

    # The 43-class model cannot be evaluated on v2 records: one line naming the missing key, exit 1.
    v2_config = write_config(
        tmp_path / "on-v2.json",
        **{**json.loads(config.read_text()), "test_tf_record_files": [str(v2_records / "test-*.tfrecord")]},
    )
    code, err = cli_error(capsys, "evaluate", v2_config)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: label_type 'original' needs original_labels_multi_hot, which ")
    assert "test-00000-of-00001.tfrecord does not have" in err and "v2 has no 43-class labels" in err


# --- label_type original on v2 records -------------------------------------------------------------


@pytest.mark.parametrize("record_format", ["default", "legacy"])
def test_original_labels_on_v2_records_are_a_one_line_error(
    synthetic_v2, v2_records, record_format, tmp_path, capsys
):
    records = v2_records
    if record_format == "legacy":
        records = tmp_path / "legacy"
        prepare("-r", synthetic_v2, "-o", records, "--splits", "official", "--format", "legacy")
        assert json.loads((records / "dataset.json").read_text())["label_types"] == ["BigEarthNet-19"]
    pattern = "train.tfrecord" if record_format == "legacy" else "train-*.tfrecord"
    out_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "original.json",
        **config_2019(
            records, out_dir, pattern, pattern, pattern, label_type="original", val_tf_record_files=[]
        ),
    )
    code, err = cli_error(capsys, "train", config)
    assert code == 1 and err.count("\n") == 1
    train_file = records / (
        "train.tfrecord" if record_format == "legacy" else "train-00000-of-00001.tfrecord"
    )
    assert err.startswith(
        f"error: label_type 'original' needs original_labels_multi_hot, which {train_file} does not have"
    )
    assert "v2 has no 43-class labels" in err
    assert not (out_dir / "models").exists() or not any((out_dir / "models").iterdir())
    # The input pipeline refuses the same way (no zeros for the 43 classes).
    with pytest.raises(UserError, match="needs original_labels_multi_hot"):
        make_dataset([train_file], "original", BATCH)


# --- split names: val and validation ----------------------------------------------------------------


def test_val_and_validation_name_the_same_split(synthetic_v1, synthetic_v2, tmp_path, capsys):
    # v1 CSVs: the file's base name names the split and the output files.
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copyfile(synthetic_v1 / "val.csv", lists / "validation.csv")
    shutil.copyfile(synthetic_v1 / "val.csv", lists / "val.csv")
    val_names = (synthetic_v1 / "val.csv").read_text().split()
    for name in ("val", "validation"):
        out = tmp_path / f"v1-{name}"
        prepare("-r", synthetic_v1, "-o", out, "-n", lists / f"{name}.csv")
        assert sorted(os.listdir(out)) == ["dataset.json", f"{name}-00000-of-00001.tfrecord"]
        assert record_names(split_files(out, name)) == val_names
    # Both at once are the same split twice.
    code, err = cli_error(
        capsys,
        "prepare",
        "-r",
        synthetic_v1,
        "-o",
        tmp_path / "both",
        "-n",
        lists / "val.csv",
        lists / "validation.csv",
    )
    assert code == 1 and err.count("\n") == 1
    assert err == f"error: {lists / 'validation.csv'} and {lists / 'val.csv'} both name split 'validation'\n"
    assert not (tmp_path / "both").exists()

    # v2: official splits are named as in the parquet (validation); a CSV may still call it val.
    rows, _ = parquet_rows(synthetic_v2)
    validation = ids_by_split([row for row in rows if not is_flagged(row)])["validation"]
    (lists / "v2").mkdir()
    (lists / "v2" / "val.csv").write_text("".join(f"{name}\r\n" for name in validation))
    out = tmp_path / "v2-val"
    prepare("-r", synthetic_v2, "-o", out, "-n", lists / "v2" / "val.csv")
    assert sorted(os.listdir(out)) == ["dataset.json", "val-00000-of-00001.tfrecord"]
    assert record_names(split_files(out, "val")) == validation


# --- snow and cloud ---------------------------------------------------------------------------------


def prepared_counts(out: Path) -> dict[str, int]:
    manifest = json.loads((out / "dataset.json").read_text())
    return {split: info["patches"] for split, info in manifest["splits"].items()}


def test_v2_snow_cloud_left_out_by_default_and_included_on_request(
    synthetic_v2, v2_records, tmp_path, capsys
):
    rows, flagged = parquet_rows(synthetic_v2)
    assert flagged and all(is_flagged(row) for row in flagged)
    kept = ids_by_split([row for row in rows if not is_flagged(row)])
    everything = ids_by_split(rows + flagged)
    flagged_ids = {row["patch_id"] for row in flagged} | {row["patch_id"] for row in rows if is_flagged(row)}

    # Default (the module's v2 records): flagged patches left out.
    assert prepared_counts(v2_records) == {split: len(kept[split]) for split in SPLITS}
    included = tmp_path / "included"
    prepare("-r", synthetic_v2, "-o", included, "--splits", "official", "--include-snow-cloud")
    assert prepared_counts(included) == {split: len(everything[split]) for split in SPLITS}
    assert sum(prepared_counts(included).values()) == len(rows) + len(flagged)
    for split in SPLITS:
        names = record_names(split_files(included, split))
        assert names == everything[split]  # main parquet first, then the flagged one, each in file order
        assert set(names) - set(kept[split]) == flagged_ids & set(everything[split])

    # User CSVs are taken as given, unless --exclude-snow-cloud.
    listing = tmp_path / "train.csv"
    listing.write_text("".join(f"{name}\n" for name in everything["train"]))
    as_given = tmp_path / "as-given"
    prepare("-r", synthetic_v2, "-o", as_given, "-n", listing)
    assert record_names(split_files(as_given, "train")) == everything["train"]
    excluded = tmp_path / "excluded"
    prepare("-r", synthetic_v2, "-o", excluded, "-n", listing, "--exclude-snow-cloud")
    assert record_names(split_files(excluded, "train")) == [
        n for n in everything["train"] if n not in flagged_ids
    ]

    code, err = cli_error(
        capsys, "prepare", "-r", synthetic_v2, "-o", tmp_path / "x", "-n", listing, "--include-snow-cloud"
    )
    assert code == 1 and "--include-snow-cloud applies to the official v2 splits only" in err


def common_list(file_name: str) -> list[str]:
    """A list shipped by bigearthnet-common, read straight from the package's bz2 file."""
    resource = importlib.resources.files("bigearthnet_common") / file_name
    return bz2.decompress(resource.read_bytes()).decode("ascii").split()


def test_v1_snow_cloud_on_the_real_example_patches(example_paths, tmp_path, capsys):
    """One of the six real example patches has seasonal snow: the official v1 lists leave it out, a user
    CSV keeps it unless --exclude-snow-cloud."""
    names = sorted(path.name for path in example_paths.s2.iterdir())
    snowy = [name for name in names if name in set(common_list("patches_with_seasonal_snow.csv.bz2"))]
    assert snowy == ["S2B_MSIL2A_20180204T94161_57_38"]
    clear = [name for name in names if name not in snowy]
    listing = tmp_path / "mine.csv"
    listing.write_text("".join(f"{name}\r\n" for name in names))

    prepare("-r", example_paths.s2, "-o", tmp_path / "as-given", "-n", listing)
    assert record_names(split_files(tmp_path / "as-given", "mine")) == names
    prepare("-r", example_paths.s2, "-o", tmp_path / "excluded", "-n", listing, "--exclude-snow-cloud")
    assert record_names(split_files(tmp_path / "excluded", "mine")) == clear

    official = tmp_path / "official"
    prepare("-r", example_paths.s2, "-o", official, "--splits", "official", "--s1-root", example_paths.s1)
    assert "5 of 519,284 listed patches are in" in capsys.readouterr().err
    pairs = {}
    for folder in example_paths.s1.iterdir():
        metadata = json.loads((folder / f"{folder.name}{V1_METADATA_SUFFIX}").read_text())
        pairs[metadata["corresponding_s2_patch"]] = folder.name
    for split in ("train", "test"):  # none of the six is on the official val list: no val files
        listed = [name for name in common_list(f"{split}.csv.bz2") if name in set(names)]
        rows = record_features(split_files(official, split), "patch_name", "patch_name_s1")
        assert rows == [(name, pairs[name]) for name in listed]
    assert not [name for name in common_list("val.csv.bz2") if name in set(names)]
    assert prepared_counts(official) == {"train": 4, "test": 1}

    # v1 has nothing to include: the official lists already leave these patches out.
    code, err = cli_error(
        capsys,
        "prepare",
        "-r",
        example_paths.s2,
        "-o",
        tmp_path / "x",
        "--splits",
        "official",
        "--include-snow-cloud",
    )
    assert code == 1 and "--include-snow-cloud applies to the official v2 splits only" in err


# --- VV and VH are never swapped ----------------------------------------------------------------------


def constant_s1_archive(root: Path, version: int) -> dict[str, tuple[float, float]]:
    """A 4-patch archive whose S1 rasters are constants, different per band and per patch.

    Returns S2 name -> (VV, VH), paired the archive's own way (v1 JSON, v2 parquet s1_name).
    """
    write_synthetic_archive(root, patches=4, seed=9, version=version, with_s1=True)
    if version == 1:
        pairs = v1_s1_pairs(root)
        folders = {s2: root / V1_S1_FOLDER / s1 for s2, s1 in pairs.items()}
    else:
        rows = [*parquet_rows(root)[0], *parquet_rows(root)[1]]
        folders = {
            row["patch_id"]: next((root / "BigEarthNet-S1").glob(f"*/{row['s1_name']}")) for row in rows
        }
    values = {}
    for index, (s2_name, folder) in enumerate(sorted(folders.items())):
        values[s2_name] = (-4.5 - index, -17.25 - 2 * index)  # VV > VH, as in real backscatter
        for band, value in zip(("VV", "VH"), values[s2_name], strict=True):
            path = folder / f"{folder.name}_{band}.tif"
            assert tifffile.imread(path).shape == (120, 120)
            tifffile.imwrite(path, np.full((120, 120), value, np.float32))
    return values


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("record_format", ["default", "legacy"])
def test_vv_and_vh_never_swapped_from_archive_to_model_input(version, record_format, tmp_path):
    root = tmp_path / "archive"
    values = constant_s1_archive(root, version)
    listing = tmp_path / "test.csv"
    listing.write_text("".join(f"{name}\n" for name in values))
    out = tmp_path / "records"
    prepare("-r", root, "-o", out, "-n", listing, "--s1-root", root, "--format", record_format)
    for modality in ("S1", "MM"):
        dataset = make_dataset(
            split_files(out, "test"), "BigEarthNet-19", 4, modality=modality, with_names=True
        )
        seen = {}
        for inputs, _ in dataset:
            for name, s1 in zip(inputs["patch_name"].numpy(), inputs["bands_s1"].numpy(), strict=True):
                seen[name.decode()] = (np.unique(s1[..., 0]).tolist(), np.unique(s1[..., 1]).tolist())
        assert seen == {name: ([vv], [vh]) for name, (vv, vh) in values.items()}
