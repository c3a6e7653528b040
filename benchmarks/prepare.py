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

    python benchmarks/prepare.py --archive-files [--patches 12000] [--synthetic-v2 2000]

times preparation from the downloaded archive files instead: the scaled archive packed as `.tar`,
`.tar.gz` (gzip -1) and `.tar.zst` (zstd -3), each prepared with a cold page cache, and the extracted
folders cold and warm; beside them, what the disk gives (the `.tar` read alone, cold) and what
Python's `tarfile` and `zlib` manage on one core, and each route's limit on this machine, measured in
the same run, with the ratio of prepare's rate to it: a cold sequential read of the `.tar`, one-thread
isal inflate of the `.tar.gz`, one-thread `zstd -d` of the `.tar.zst`, a cold read of the folders'
files with 32 reads in flight (targets: .tar >= 4,000, .tar.gz >= 2,200, .tar.zst >= 2,800, folders
cold >= 1,400 and warm >= 5,000 patches/s; >= 0.8 of each limit). The page cache is dropped through
`/proc/sys/vm/drop_caches` where this runs as root; elsewhere it says so and the "cold" figures are
warm ones. Then a synthetic v2 archive with Sentinel-1, packed as two `.tar.zst` files beside its
metadata, is prepared with the official splits, and its shards are compared with those prepared
from its folders (they must be the same bytes).
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

OUR_CPU_TARGET_US = 250  # issue 22: CPU per patch of everything but inflating
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


def cpu_seconds() -> float:
    """User and system CPU time of this process and its finished children (the workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def drop_page_cache() -> bool:
    """Empty the page cache (root only); False where that is not possible."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def pack(folder: Path, arcname: str, target: Path, names: list[str] | None = None) -> None:
    """`folder` as an uncompressed tar (GNU format, as GNU tar writes), members under `arcname`."""
    import tarfile

    with tarfile.open(target, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(folder, arcname=arcname, recursive=names is None)
        for name in names or ():
            tar.add(folder / name, arcname=f"{arcname}/{name}")


def compress(tar: Path) -> dict[str, Path]:
    """The .tar.gz (gzip -1) and .tar.zst (zstd -3) of `tar`, written by the libraries prepare reads with."""
    import zstandard
    from isal import igzip

    gz, zst = tar.with_name(tar.name + ".gz"), tar.with_name(tar.name + ".zst")
    with open(tar, "rb") as source, igzip.open(gz, "wb", compresslevel=1) as target:
        shutil.copyfileobj(source, target, 4 << 20)
    # zstd -3 with a 128 kB window: consecutive patches in the tar are copies of one another (~175 kB
    # apart); a larger window finds the copies and shrinks the file 100-fold, which would make it
    # cheaper to read than real data.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=17)
    with open(tar, "rb") as source, open(zst, "wb") as target:
        zstandard.ZstdCompressor(compression_params=params).copy_stream(source, target)
    return {".tar.gz": gz, ".tar.zst": zst}


def baselines(tar: Path, gz: Path, patches: int, cold: bool) -> None:
    """What the disk and Python's own modules manage, for comparison."""
    import tarfile
    import zlib

    drop_page_cache() if cold else None
    started = time.perf_counter()
    with open(tar, "rb") as handle:
        while handle.read(4 << 20):
            pass
    rate = patches / (time.perf_counter() - started)
    print(f"  .tar read alone{' (cold)' if cold else ''}: {rate:,.0f} patches/s")
    started = time.perf_counter()
    with tarfile.open(tar, "r|") as stream:
        for member in stream:
            if member.isfile():
                stream.extractfile(member).read()
    rate = patches / (time.perf_counter() - started)
    print(f"  Python tarfile streaming the .tar (warm), one core: {rate:,.0f} patches/s")
    started = time.perf_counter()
    inflate = zlib.decompressobj(31)
    with open(gz, "rb") as handle:
        while chunk := handle.read(4 << 20):
            inflate.decompress(chunk)
    rate = patches / (time.perf_counter() - started)
    print(f"  Python zlib inflating the .tar.gz (warm), one core: {rate:,.0f} patches/s")


def route_limits(archive: Path, files: dict[str, Path], patches: int, cold: bool) -> dict[str, float]:
    """Patches/s of the one step of each route that prepare cannot go faster than, on this machine:
    a cold sequential read of the .tar, one-thread isal inflate of the .tar.gz (warm), one-thread
    `zstd -d` of the .tar.zst (warm), and a cold read of the folders' files with 32 reads in flight."""
    import subprocess

    from isal import isal_zlib

    def timed(step) -> float:
        started = time.perf_counter()
        step()
        return patches / (time.perf_counter() - started)

    def read_tar() -> None:
        with open(files[".tar"], "rb") as handle:
            while handle.read(4 << 20):
                pass

    def inflate() -> None:
        stream = isal_zlib.decompressobj(31)
        with open(files[".tar.gz"], "rb") as handle:
            while chunk := handle.read(4 << 20):
                stream.decompress(chunk)

    def unzstd() -> None:
        subprocess.run(
            ["zstd", "-d", "-q", "-c", "-T1", str(files[".tar.zst"])], stdout=subprocess.DEVNULL, check=True
        )

    def read_folders() -> None:
        # `cat` in 32 processes at once, in the order prepare reads the files (patch names sorted, as
        # the split lists are; a directory's own order is a hash order, scattered over the disk).
        # Python threads reading the files managed less than prepare itself (the GIL per file).
        folders = sorted(entry.path for entry in os.scandir(archive))
        paths = [
            entry.path for folder in folders for entry in sorted(os.scandir(folder), key=lambda e: e.name)
        ]
        listing = "\0".join(paths).encode()
        subprocess.run(
            ["xargs", "-0", "-P", "32", "-n", "64", "cat"],
            input=listing,
            stdout=subprocess.DEVNULL,
            check=True,
        )

    limits = {}
    drop_page_cache() if cold else None
    limits[".tar"] = timed(read_tar)
    for suffix in (".tar.gz", ".tar.zst"):  # inflating is timed warm: the disk is the .tar's limit
        with open(files[suffix], "rb") as handle:
            while handle.read(4 << 20):
                pass
    limits[".tar.gz"] = timed(inflate)
    limits[".tar.zst"] = timed(unzstd) if shutil.which("zstd") else float("nan")
    drop_page_cache() if cold else None
    limits["folders cold"] = timed(read_folders)
    for label, rate in limits.items():
        print(f"  limit of {label}: {rate:,.0f} patches/s")
    return limits


def write_lists(target: Path, names: list[str]) -> dict[str, Path]:
    """Split CSVs (60/20/20) of `names`, in the order given, in folder `target`."""
    target.mkdir(exist_ok=True)
    lists, start = {}, 0
    for position, (split, fraction) in enumerate(SPLIT_FRACTIONS):
        end = len(names) if position == len(SPLIT_FRACTIONS) - 1 else start + round(len(names) * fraction)
        lists[split] = target / f"{split}.csv"
        lists[split].write_text("".join(f"{name}\r\n" for name in names[start:end]))
        start = end
    return lists


def archive_files(base: Path, patches: int, workers: int, synthetic: int) -> None:
    import random

    from bigearthnet_tf.prepare import prepare

    examples = example_archive(base / "examples").s2
    build_archive(base, patches, examples)
    archive = base / "archive"
    # The lists follow the archive's order (names sorted, as tar wrote them), so each shard's
    # patches stream past together; lists in a random order are timed at the end.
    names = sorted(entry.name for entry in os.scandir(archive))
    lists = write_lists(base / "lists", names)
    tar = base / "BigEarthNet-S2-v1.0.tar"
    pack(archive, "BigEarthNet-v1.0", tar)
    files = {".tar": tar, **compress(tar)}
    sizes = ", ".join(f"{suffix} {path.stat().st_size / 1e9:.2f} GB" for suffix, path in files.items())
    print(f"scaled archive: {patches:,} patches; {sizes}; load average {os.getloadavg()[0]:.1f}")
    cold = drop_page_cache()
    print(
        "page cache: dropped before each cold run"
        if cold
        else "page cache: cannot drop it (not root); 'cold' runs are warm"
    )
    baselines(tar, files[".tar.gz"], patches, cold)
    print("limits of each route on this machine (the ratio target is >= 0.8 of each):")
    limits = route_limits(archive, files, patches, cold)

    def run(label: str, root: Path, target: float | None, drop: bool = True) -> float:
        # `lists` as it is when called: the archive's order, then a random one.
        out = base / f"out{label.replace(' ', '-')}"
        if drop:
            drop_page_cache()
        cpu = cpu_seconds()
        started = time.perf_counter()
        summary = prepare(root, out, split_files=list(lists.values()), workers=workers, show_progress=False)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds() - cpu
        assert summary.total_patches == patches, summary.total_patches
        rate = patches / seconds
        stages = ", ".join(f"{stage} {value:.1f} s" for stage, value in summary.stage_seconds.items())
        verdict = (
            "" if target is None else f" (target >= {target:,.0f}: {'met' if rate >= target else 'missed'})"
        )
        # Ours: all but inflating, whose CPU is taken as its time in the reader process (one thread
        # inflating, busy the whole time).
        ours = (cpu - summary.stage_seconds.get("decompress", 0.0)) / patches * 1e6
        print(
            f"  prepare from {label}: {rate:,.0f} patches/s{verdict}; "
            f"{cpu / patches * 1e6:,.0f} CPU-us/patch, ours (all but inflating) {ours:,.0f} "
            f"(target <= {OUR_CPU_TARGET_US}: {'met' if ours <= OUR_CPU_TARGET_US else 'missed'}); {stages}"
        )
        shutil.rmtree(out)
        return rate

    print(f"prepare, {workers} workers, default format:")
    rates = {
        ".tar": run(".tar, cold", tar, 4000),
        ".tar.gz": run(".tar.gz, cold", files[".tar.gz"], 2200),
        ".tar.zst": run(".tar.zst, cold", files[".tar.zst"], 2800),
        "folders cold": run("extracted folders, cold", archive, 1400),
    }
    warm_page_cache(archive)
    rates["folders warm"] = run("extracted folders, warm", archive, 5000, drop=False)
    print(
        "ratios to each route's limit (target >= 0.8): "
        + ", ".join(f"{label} {rates[label] / limit:.2f}" for label, limit in limits.items())
    )
    random.Random(0).shuffle(names)
    lists = write_lists(base / "shuffled", names)
    rates[".tar, random lists"] = run(".tar, cold, lists in a random order", tar, None)
    rates[".tar.zst, random lists"] = run(".tar.zst, cold, lists in a random order", files[".tar.zst"], None)
    print(
        "ratios to the extracted folders, cold: "
        + ", ".join(f"{label} {rate / rates['folders cold']:.2f}x" for label, rate in rates.items())
    )
    synthetic_v2(base, synthetic, workers)


def synthetic_v2(base: Path, patches: int, workers: int) -> None:
    """A synthetic v2 archive with S1 packed as two .tar.zst files: same shards as from its folders."""
    import filecmp

    from bigearthnet_tf.prepare import prepare
    from bigearthnet_tf.synth import write_synthetic_archive

    root = write_synthetic_archive(base / "v2", patches=patches, version=2, with_s1=True)
    packed = base / "v2-files"
    packed.mkdir()
    for name in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        shutil.copyfile(root / name, packed / name)
    for folder in ("BigEarthNet-S2", "BigEarthNet-S1"):
        pack(root / folder, folder, base / f"{folder}.tar")
        compress(base / f"{folder}.tar")
        (base / f"{folder}.tar.zst").rename(packed / f"{folder}.tar.zst")
    options = {"official_splits": True, "workers": workers, "show_progress": False}
    from_folders = prepare(root, base / "v2-out-folders", s1_root=root, **options)
    drop_page_cache()
    started = time.perf_counter()
    from_files = prepare(
        packed / "BigEarthNet-S2.tar.zst",
        base / "v2-out-files",
        s1_root=packed / "BigEarthNet-S1.tar.zst",
        **options,
    )
    seconds = time.perf_counter() - started
    same = all(
        filecmp.cmp(base / "v2-out-folders" / name, base / "v2-out-files" / name, shallow=False)
        for names in from_folders.files.values()
        for name in names
    )
    print(
        f"synthetic v2 with S1, two .tar.zst files: {from_files.total_patches:,} patches in {seconds:.1f} s "
        f"= {from_files.total_patches / seconds:,.0f} patches/s; shards "
        f"{'identical to' if same else 'DIFFER from'} those from the folders"
    )
    assert same and from_files.total_patches == from_folders.total_patches


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
    parser.add_argument(
        "--archive-files", action="store_true", help="time preparing from .tar/.tar.gz/.tar.zst"
    )
    parser.add_argument(
        "--synthetic-v2", type=int, default=2000, help="patches of the synthetic v2 archive (--archive-files)"
    )
    args = parser.parse_args(argv)

    workers = args.workers or len(os.sched_getaffinity(0))
    base = Path(tempfile.mkdtemp(prefix="bigearthnet-bench-", dir=args.dir))
    if args.archive_files:
        try:
            archive_files(base, args.patches if args.patches != 3000 else 12_000, workers, args.synthetic_v2)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
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
