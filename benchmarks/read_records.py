"""Reading prepared patches back for training: ours against LMDB + safetensors, in one run.

The reBEN authors convert BigEarthNet v2 with rico-hdl into an LMDB database in which every patch
is one safetensors blob (one tensor per band, native dtype: uint16 for Sentinel-2, float32 for
Sentinel-1; S1 and S2 patches under their own names), and read it back with ConfigILM's LMDB reader.
This script writes the same synthetic v2 patches (S2 and S1) both ways into a temporary folder,
ours with `record_formats.DEFAULT.encode` as `bigearthnet prepare` writes them, theirs with `lmdb`
and `safetensors` in rico-hdl's layout, and then reads both into exactly the same batches: a dict
of float32 arrays (`bands_10m` (64, 120, 120, 4), `bands_20m` (64, 60, 60, 6), `bands_60m`
(64, 20, 20, 2), and `bands_s1` (64, 120, 120, 2) for S1+S2) and float32 multi-hot labels.

Readers, each for S2 and for S1+S2:

- ``lmdb+safetensors``: one `txn.get` per patch (two for S1+S2), `safetensors.numpy.load`, the bands
  stacked per group as float32, the patches stacked into the batch: what a ConfigILM-style reader does
  (without its interpolation to 120 px, which ours leaves to the model too).
- ``ours``: `make_dataset` as training calls it (the BatchReader route).
- ``ours, TensorFlow route``: `make_dataset(..., skip_corrupt=True)`, which reads with
  `TFRecordDataset` + `tf.io.parse_example`: the route every read took before the BatchReader.
- ``ours, native dtype``: `make_dataset(..., native_dtype=True)` as the trainer reads: the same
  values, S2 as uint16 (S1 float32), converted to float32 by the model inside its step. Not the same
  batches on the host, so it is printed beside the comparison, not in it.

Each round reads every reader once (warm page cache, ``--warmup`` batches untimed); the figures are
the median of ``--rounds`` rounds. CPU time is user + system time per sample: of the calling thread
for the LMDB reader (it runs there alone, so nothing else of the process is charged to it), of all
threads of the process for ours (tf.data's threads); "samples per CPU-second" is its inverse. This
machine is shared, so wall-clock rates move with the neighbours while CPU per sample moves less.

    pip install lmdb safetensors   # or: pip install -e ".[bench]"
    python benchmarks/read_records.py [--patches 2000] [--batches 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import lmdb
    import safetensors.numpy
except ImportError:
    sys.exit("this benchmark needs lmdb and safetensors: pip install lmdb safetensors")

from bigearthnet_tf import constants  # noqa: E402
from bigearthnet_tf.archive import Patch  # noqa: E402
from bigearthnet_tf.input_pipeline import make_dataset  # noqa: E402
from bigearthnet_tf.layout import INPUTS, Modality, modality_inputs  # noqa: E402
from bigearthnet_tf.record_formats import DEFAULT  # noqa: E402
from bigearthnet_tf.records import RecordWriter  # noqa: E402

LABEL_TYPE = constants.BIGEARTHNET_19
MAX_VALUE = 20_000
TARGET_RATIO = 2.0  # samples per CPU-second against the LMDB reader
TARGET_S2_CPU_US = 150


def synthetic_patch(rng: np.random.Generator, index: int) -> Patch:
    """A v2 patch: S2 bands around the archive's mean and std, S1 in dB, 1-4 of the 19 labels."""
    bands = {
        band.name: rng.normal(band.mean, band.std, (band.size, band.size))
        .clip(0, MAX_VALUE)
        .astype(np.uint16)
        for band in constants.S2_BANDS
    }
    s1 = {
        band.name: rng.normal(band.mean, band.std, (constants.PATCH_SIZE, constants.PATCH_SIZE)).astype(
            np.float32
        )
        for band in constants.S1_BANDS
    }
    labels = constants.BIGEARTHNET_19_LABELS
    picks = rng.choice(len(labels), size=rng.integers(1, 5), replace=False)
    return Patch(
        f"S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_{index % 100}_{index // 100}",
        bands,
        None,
        tuple(labels[i] for i in sorted(picks)),
        f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{index % 100}_{index // 100}",
        s1,
    )


def write_both(folder: Path, patches: list[Patch], shards: int) -> tuple[dict[Modality, list[str]], str]:
    """Our records (an S2 set and an S1+S2 set, sharded) and one LMDB database of both sensors."""
    sets: dict[Modality, list[str]] = {}
    for modality in (Modality.S2, Modality.MM):
        files = [str(folder / f"{modality.value}-{i:05d}-of-{shards:05d}.tfrecord") for i in range(shards)]
        writers = [RecordWriter(path) for path in files]
        for i, patch in enumerate(patches):
            if modality is Modality.S2:
                patch = Patch(patch.name, patch.bands, None, patch.labels_19)
            writers[i % shards].write(DEFAULT.encode(patch))
        for writer in writers:
            writer.close()
        sets[modality] = files
    database = str(folder / "lmdb")
    env = lmdb.open(database, map_size=len(patches) * 400_000 + (64 << 20), subdir=True)
    with env.begin(write=True) as txn:
        for patch in patches:
            txn.put(patch.name.encode(), safetensors.numpy.save(patch.bands))
            txn.put(patch.s1_name.encode(), safetensors.numpy.save(patch.s1_bands))
    env.close()
    return sets, database


def lmdb_batches(
    database: str, patches: list[Patch], modality: Modality, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Batches from the LMDB database, endlessly, in patch order."""
    env = lmdb.open(database, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
    groups = {key: INPUTS[key].bands for key in modality_inputs(modality)}
    classes = {name: i for i, name in enumerate(constants.BIGEARTHNET_19_LABELS)}
    keys = [(p.name.encode(), p.s1_name.encode(), [classes[n] for n in p.labels_19]) for p in patches]
    with env.begin() as txn:
        position = 0
        while True:
            samples, labels = [], np.zeros((batch_size, len(classes)), np.float32)
            for row in range(batch_size):
                s2_key, s1_key, label_indices = keys[position % len(keys)]
                position += 1
                bands = safetensors.numpy.load(txn.get(s2_key))
                if modality is Modality.MM:
                    bands.update(safetensors.numpy.load(txn.get(s1_key)))
                samples.append(
                    {
                        key: np.stack([bands[b] for b in names], -1).astype(np.float32)
                        for key, names in groups.items()
                    }
                )
                labels[row, label_indices] = 1
            yield {key: np.stack([s[key] for s in samples]) for key in groups}, labels


def ours(
    files: list[str], modality: Modality, batch_size: int, tensorflow_route: bool, native_dtype: bool = False
) -> Iterator:
    dataset = make_dataset(
        files, LABEL_TYPE, batch_size, modality=modality, epochs=None, skip_corrupt=tensorflow_route,
        native_dtype=native_dtype,
    )  # fmt: skip
    return iter(dataset)


def measure(
    batches: Iterator, batch_size: int, warmup: int, count: int, clock: Callable[[], float]
) -> tuple[float, float]:
    """(CPU-us per sample by `clock`, samples per wall second)."""
    for _ in range(warmup):
        next(batches)
    wall, cpu = time.perf_counter(), clock()
    for _ in range(count):
        _, labels = next(batches)
        assert labels.shape[0] == batch_size
    wall, cpu = time.perf_counter() - wall, clock() - cpu
    return cpu / (count * batch_size) * 1e6, count * batch_size / wall


def check_same_batches(sets, database, patches, batch_size) -> None:
    """Both readers give the same first batch (our records are in the shards' interleaved order)."""
    for modality in (Modality.S2, Modality.MM):
        inputs, labels = next(ours(sets[modality], modality, batch_size, False))
        theirs = {patch.name: patch for patch in patches}
        names = make_dataset(sets[modality], LABEL_TYPE, batch_size, modality=modality, with_names=True)
        order = [theirs[n.decode()] for n in next(iter(names))[0]["patch_name"].numpy()]
        reference, reference_labels = next(lmdb_batches(database, order, modality, batch_size))
        for key, values in reference.items():
            np.testing.assert_array_equal(inputs[key].numpy(), values)
        np.testing.assert_array_equal(labels.numpy(), reference_labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per reading")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per reading")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    patches = [synthetic_patch(rng, i) for i in range(args.patches)]
    with tempfile.TemporaryDirectory(prefix="ben-read-bench-") as folder:
        sets, database = write_both(Path(folder), patches, args.shards)
        check_same_batches(sets, database, patches, args.batch_size)
        print(
            f"{args.patches} synthetic v2 patches (S2 + S1), batches of {args.batch_size} float32, "
            f"{args.rounds} rounds of {args.batches} batches; both readers give identical batches; "
            f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}"
        )
        readers: dict[str, Callable[[Modality], Iterator]] = {
            "lmdb+safetensors": lambda m: lmdb_batches(database, patches, m, args.batch_size),
            "ours": lambda m: ours(sets[m], m, args.batch_size, False),
            "ours, TensorFlow route": lambda m: ours(sets[m], m, args.batch_size, True),
            "ours, native dtype": lambda m: ours(sets[m], m, args.batch_size, False, True),
        }
        for modality, label in ((Modality.S2, "S2"), (Modality.MM, "S1+S2")):
            rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
            for _ in range(args.rounds):
                for name, make in readers.items():
                    # The LMDB reader runs in this thread alone: its own CPU time leaves out any other
                    # thread of the process. Ours runs in tf.data's threads: all of them count.
                    clock = time.thread_time if name == "lmdb+safetensors" else time.process_time
                    batches = make(modality)
                    rounds[name].append(measure(batches, args.batch_size, args.warmup, args.batches, clock))
                    del batches
                    # A finished tf.data iterator's threads may still fill its prefetch buffer: let them
                    # end before the next reader's CPU time starts counting.
                    gc.collect()
                    time.sleep(1)
            cpu = {name: statistics.median(r[0] for r in rounds[name]) for name in readers}
            rate = {name: statistics.median(r[1] for r in rounds[name]) for name in readers}
            print(f"\n{label}:")
            for name in readers:
                print(
                    f"  {name:24s} {cpu[name]:6.0f} CPU-us/sample  {1e6 / cpu[name]:7.0f} samples/CPU-s  "
                    f"{rate[name]:7.0f} samples/s"
                )
            for name in ("ours", "ours, TensorFlow route"):
                ratio = cpu["lmdb+safetensors"] / cpu[name]
                verdict = "met" if ratio >= TARGET_RATIO else "missed"
                wanted = f"target >= {TARGET_RATIO:g}x: {verdict}"
                print(f"  {name}: {ratio:.2f}x the LMDB reader's samples per CPU-second ({wanted})")
            if modality is Modality.S2:
                verdict = "met" if cpu["ours"] <= TARGET_S2_CPU_US else "missed"
                limit = f"target <= {TARGET_S2_CPU_US}: {verdict}"
                print(f"  ours: {cpu['ours']:.0f} CPU-us per S2 sample ({limit})")


if __name__ == "__main__":
    main()
