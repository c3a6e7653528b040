"""Samples per second delivered to the model: our input pipeline against a 2019-style one.

Writes the same synthetic patches twice into a temporary folder: in the default format (raw uint16 bytes
per resolution group, sharded) and in the 2019 schema (one int64 list per band, one file). Then, in one
run, times:

- ``2019-style``: the 2019 recipe on the 2019 file: ``parse_single_example`` per record, stack the 10 m
  bands (B04, B03, B02, B08), bicubic-upsample the 20 m bands to 120 x 120, standardise with the band
  statistics, then batch. Parallel map (AUTOTUNE) and prefetch, so it gets every chance.
- ``ours, 2019 file``: ``make_dataset`` on the same 2019 file (batched parse of int64 lists).
- ``ours, default``: ``make_dataset`` on the default format: the supported path.

Our pipelines deliver raw native-resolution bands (the model's first layers upsample and standardise
on the accelerator, see docs/ARCHITECTURE.md); the 2019 pipeline delivers the finished 120x120x10 image.
Each pipeline repeats its files, gets ``--warmup`` batches untimed (thread pools, autotuning, page
cache), then ``--batches`` timed batches.

    python benchmarks/input_pipeline.py [--records 2000] [--batch-size 500] [--batches 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigearthnet_tf import constants  # noqa: E402
from bigearthnet_tf.input_pipeline import make_dataset  # noqa: E402

LABEL_TYPE = constants.BIGEARTHNET_19
MAX_VALUE = 20_000  # a little above the brightest reflectances in the archive


def synthetic_patch(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Bands drawn around the archive's per-band mean and std (so int64 varints have realistic sizes)."""
    bands = {
        band.name: rng.normal(band.mean, band.std, size=(band.size, band.size))
        .clip(0, MAX_VALUE)
        .astype(np.uint16)
        for band in constants.S2_BANDS
    }
    labels = (rng.random(len(constants.BIGEARTHNET_19_LABELS)) < 0.15).astype(np.int64)
    return bands, labels


def _feature(values: bytes | list[int]) -> tf.train.Feature:
    if isinstance(values, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[values]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def encode(name: str, bands: dict[str, np.ndarray], labels: np.ndarray) -> tuple[bytes, bytes]:
    """The patch as (default-format record, 2019-schema record), built with tf.train.Example."""
    common = {
        "patch_name": _feature(name.encode()),
        f"{LABEL_TYPE}_labels_multi_hot": _feature(labels.tolist()),
    }
    default = dict(common, format_version=_feature([1]))
    for key, names in (
        ("bands_10m", constants.BANDS_10M),
        ("bands_20m", constants.BANDS_20M),
        ("bands_60m", constants.BANDS_60M),
    ):
        default[key] = _feature(np.stack([bands[n] for n in names], axis=-1).astype("<u2").tobytes())
    legacy = dict(common, **{name: _feature(values.ravel().tolist()) for name, values in bands.items()})
    return (
        tf.train.Example(features=tf.train.Features(feature=default)).SerializeToString(),
        tf.train.Example(features=tf.train.Features(feature=legacy)).SerializeToString(),
    )


def write_sets(folder: Path, records: int, distinct: int, shards: int, seed: int) -> tuple[list[str], str]:
    """``records`` records (``distinct`` different patches, cycled) in both formats."""
    rng = np.random.default_rng(seed)
    encoded = [encode(f"patch_{i}", *synthetic_patch(rng)) for i in range(distinct)]
    default_files = [str(folder / f"train-{i:05d}-of-{shards:05d}.tfrecord") for i in range(shards)]
    writers = [tf.io.TFRecordWriter(path) for path in default_files]
    legacy_file = str(folder / "train.tfrecord")
    with tf.io.TFRecordWriter(legacy_file) as legacy_writer:
        for i in range(records):
            default_record, legacy_record = encoded[i % distinct]
            writers[i % shards].write(default_record)
            legacy_writer.write(legacy_record)
    for writer in writers:
        writer.close()
    return default_files, legacy_file


def pipeline_2019(path: str, batch_size: int) -> tf.data.Dataset:
    """The 2019 recipe: per-record int64 parsing, stacking, bicubic upsampling, standardising."""
    spec = {
        band.name: tf.io.FixedLenFeature([band.size * band.size], tf.int64) for band in constants.S2_BANDS
    }
    spec[f"{LABEL_TYPE}_labels_multi_hot"] = tf.io.FixedLenFeature(
        [len(constants.BIGEARTHNET_19_LABELS)], tf.int64
    )
    size = constants.PATCH_SIZE

    def standardised(features, name: str, side: int) -> tf.Tensor:
        band = constants.BANDS_BY_NAME[name]
        values = tf.reshape(tf.cast(features[name], tf.float32), [side, side])
        return (values - band.mean) / band.std

    def parse(serialized):
        features = tf.io.parse_single_example(serialized, spec)
        bands_10m = tf.stack(
            [standardised(features, name, size) for name in ("B04", "B03", "B02", "B08")], -1
        )
        bands_20m = tf.stack([standardised(features, name, size // 2) for name in constants.BANDS_20M], -1)
        upsampled = tf.image.resize(bands_20m, [size, size], method="bicubic")
        image = tf.concat([bands_10m, upsampled], axis=-1)
        return image, tf.cast(features[f"{LABEL_TYPE}_labels_multi_hot"], tf.float32)

    dataset = tf.data.TFRecordDataset(path).repeat()
    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def measure(dataset: tf.data.Dataset, batch_size: int, warmup: int, batches: int) -> tuple[float, float]:
    """(samples/s of wall time, CPU microseconds per sample over all threads of this process).

    The CPU figure is the one to compare on a shared machine, where wall time depends on the neighbours.
    """
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = batches * batch_size
    return samples / wall, cpu / samples * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="records per format")
    parser.add_argument("--distinct", type=int, default=500, help="different patches among them (cycled)")
    parser.add_argument("--shards", type=int, default=8, help="default-format files")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches")
    parser.add_argument("--batches", type=int, default=16, help="timed batches")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ben-input-bench-") as folder:
        start = time.perf_counter()
        default_files, legacy_file = write_sets(
            Path(folder), args.records, args.distinct, args.shards, args.seed
        )
        default_mb = sum(os.path.getsize(p) for p in default_files) / 2**20
        legacy_mb = os.path.getsize(legacy_file) / 2**20
        print(
            f"wrote {args.records} records per format ({args.distinct} distinct patches) in "
            f"{time.perf_counter() - start:.1f} s: default {default_mb:.0f} MiB in {args.shards} files, "
            f"2019 schema {legacy_mb:.0f} MiB in 1 file"
        )
        print(
            f"CPU cores: {os.cpu_count()}, TensorFlow {tf.__version__}, batch {args.batch_size}, "
            f"{args.warmup} warm-up + {args.batches} timed batches"
        )
        pipelines = {
            "2019-style (parse_single_example, bicubic, standardise)": pipeline_2019(
                legacy_file, args.batch_size
            ),
            "ours, 2019 file (batched parse_example)": make_dataset(
                legacy_file, LABEL_TYPE, args.batch_size, epochs=None
            ),
            "ours, default format": make_dataset(default_files, LABEL_TYPE, args.batch_size, epochs=None),
        }
        results = {}
        for name, dataset in pipelines.items():
            results[name] = measure(dataset, args.batch_size, args.warmup, args.batches)
            rate, cpu_us = results[name]
            print(f"  {name:56s} {rate:7.0f} samples/s  {cpu_us:6.0f} CPU-us/sample", flush=True)
        base_rate, base_cpu = next(iter(results.values()))
        for name, (rate, cpu_us) in list(results.items())[1:]:
            print(
                f"  {name}: {rate / base_rate:.1f}x the samples/s, {base_cpu / cpu_us:.1f}x less CPU "
                "than 2019-style"
            )


if __name__ == "__main__":
    main()
