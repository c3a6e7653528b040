"""Benchmark of `bigearthnet prepare` against a naive converter written the way the 2019 script worked.

    python benchmarks/prepare.py [--patches 3000] [--workers N] [--naive-patches 600] [--dir DIR]

Builds a scaled v1 archive from renamed copies of the six real example patches of bigearthnet-common
(real bytes, one folder and 13 files per patch, split 60/20/20 into train/val/test CSVs), reads every
file once so the page cache is warm, then times on the same archive:

- `prepare(..., record_format="default")` with all cores,
- `prepare(..., record_format="legacy")` with all cores,
- the naive converter: one process, one `tifffile.imread` per band, every band turned into a
  `tf.train.Int64List` through TensorFlow's proto API, one `tf.io.TFRecordWriter.write` per record
  (2019 prep_splits.py with rasterio swapped for tifffile). It is timed on the first
  `--naive-patches` patches of the same lists, as its rate does not depend on the count.

Prints patches/s for each and the ratios to the naive converter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import bigearthnet_tf  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS, S2_BAND_NAMES, original_to_19
from bigearthnet_tf.examples import example_archive

SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))
METADATA_SUFFIX = "_labels_metadata.json"


def build_archive(target: Path, patches: int, examples: Path) -> dict[str, Path]:
    """Copy the example patches, renamed, into `target/archive`; write split CSVs; return them."""
    sources = sorted(path.name for path in examples.iterdir() if path.is_dir())
    archive = target / "archive"
    archive.mkdir(parents=True)
    names = []
    for index in range(patches):
        source = sources[index % len(sources)]
        # Same form as real names (<mission>_MSIL2A_<date>T<time>_<col>_<row>); col/row made unique.
        stem = source.rsplit("_", 2)[0]
        name = f"{stem}_{1000 + index // 100}_{index % 100}"
        folder = archive / name
        folder.mkdir()
        for file in (examples / source).iterdir():
            shutil.copyfile(file, folder / file.name.replace(source, name))
        names.append(name)
    lists = {}
    start = 0
    for position, (split, fraction) in enumerate(SPLIT_FRACTIONS):
        end = patches if position == len(SPLIT_FRACTIONS) - 1 else start + round(patches * fraction)
        lists[split] = target / f"{split}.csv"
        lists[split].write_text("".join(f"{name}\r\n" for name in names[start:end]))
        start = end
    return lists


def warm_page_cache(archive: Path) -> int:
    """Read every file once; returns the bytes read."""
    total = 0
    for folder in os.scandir(archive):
        for file in os.scandir(folder.path):
            with open(file.path, "rb") as handle:
                total += len(handle.read())
    return total


def naive_convert(archive: Path, lists: dict[str, Path], out: Path, limit: int) -> int:
    """The 2019 way: sequential, one raster call per band, int64 features via TensorFlow's proto API."""
    import numpy as np
    import tensorflow as tf
    import tifffile

    out.mkdir(parents=True)
    per_split = {split: max(1, round(limit * fraction)) for split, fraction in SPLIT_FRACTIONS}
    converted = 0
    for split, csv_path in lists.items():
        names = [line.strip() for line in csv_path.read_text().splitlines() if line.strip()][
            : per_split[split]
        ]
        with tf.io.TFRecordWriter(str(out / f"{split}.tfrecord")) as writer:
            for name in names:
                folder = archive / name
                bands = {band: tifffile.imread(folder / f"{name}_{band}.tif") for band in S2_BAND_NAMES}
                with open(folder / f"{name}{METADATA_SUFFIX}") as handle:
                    labels = json.load(handle)["labels"]
                labels_19 = original_to_19(labels)
                multi_hot_43 = np.zeros(len(ORIGINAL_LABELS), dtype=int)
                for label in labels:
                    multi_hot_43[ORIGINAL_LABELS.index(label)] = 1
                multi_hot_19 = np.zeros(len(BIGEARTHNET_19_LABELS), dtype=int)
                for label in labels_19:
                    multi_hot_19[BIGEARTHNET_19_LABELS.index(label)] = 1
                feature = {
                    band: tf.train.Feature(int64_list=tf.train.Int64List(value=np.ravel(bands[band])))
                    for band in S2_BAND_NAMES
                }
                feature["original_labels"] = tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[label.encode() for label in labels])
                )
                feature["original_labels_multi_hot"] = tf.train.Feature(
                    int64_list=tf.train.Int64List(value=multi_hot_43)
                )
                feature["BigEarthNet-19_labels"] = tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[label.encode() for label in labels_19])
                )
                feature["BigEarthNet-19_labels_multi_hot"] = tf.train.Feature(
                    int64_list=tf.train.Int64List(value=multi_hot_19)
                )
                feature["patch_name"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()]))
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
                converted += 1
    return converted


def time_prepare(
    archive: Path, lists: dict[str, Path], out: Path, record_format: str, workers: int
) -> tuple[float, int]:
    from bigearthnet_tf.prepare import prepare

    started = time.perf_counter()
    summary = prepare(
        root=archive,
        out=out,
        split_files=list(lists.values()),
        record_format=record_format,
        workers=workers,
        show_progress=False,
    )
    return time.perf_counter() - started, summary.total_patches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--patches", type=int, default=3000, help="patches in the scaled archive (default 3000)"
    )
    parser.add_argument("--workers", type=int, default=None, help="workers for prepare (default: all cores)")
    parser.add_argument(
        "--naive-patches", type=int, default=600, help="patches the naive converter converts (default 600)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)

    workers = args.workers or len(os.sched_getaffinity(0))
    base = Path(tempfile.mkdtemp(prefix="bigearthnet-bench-", dir=args.dir))
    try:
        examples = example_archive(base / "examples").s2
        started = time.perf_counter()
        lists = build_archive(base, args.patches, examples)
        archive = base / "archive"
        print(
            f"scaled archive: {args.patches:,} patches in {archive} ({time.perf_counter() - started:.1f} s)"
        )
        print(f"page cache warmed: {warm_page_cache(archive) / 1e6:,.0f} MB read; {workers} worker(s)")

        rates = {}
        for record_format in ("default", "legacy"):
            seconds, count = time_prepare(
                archive, lists, base / f"out-{record_format}", record_format, workers
            )
            assert count == args.patches, (count, args.patches)
            rates[record_format] = count / seconds
            size = sum(f.stat().st_size for f in (base / f"out-{record_format}").glob("*.tfrecord"))
            rate = rates[record_format]
            print(
                f"{record_format:>8} format: {count:,} patches in {seconds:.2f} s = {rate:,.0f} patches/s"
                f" ({size / count / 1e3:.0f} kB per patch)"
            )

        naive_count = min(args.naive_patches, args.patches)
        started = time.perf_counter()
        converted = naive_convert(archive, lists, base / "out-naive", naive_count)
        seconds = time.perf_counter() - started
        rates["naive"] = converted / seconds
        print(
            f"   naive 2019-style: {converted:,} patches in {seconds:.2f} s = {rates['naive']:,.1f} patches/s"
        )
        print(
            f"ratios: default / naive = {rates['default'] / rates['naive']:.1f}x (target >= 25x), "
            f"legacy / naive = {rates['legacy'] / rates['naive']:.1f}x (target >= 10x); "
            f"default {'meets' if rates['default'] >= 1500 else 'misses'} 1,500 patches/s"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
