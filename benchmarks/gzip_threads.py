"""How fast a `.tar.gz` inflates on one core and on several, and what that means for `prepare`.

    python benchmarks/gzip_threads.py [--patches 3000] [--threads 1 2] [--own-cpu-us 600] [--dir DIR]

Builds the scaled v1 archive of `benchmarks/prepare.py` (renamed copies of the six real example
patches), packs it as a `.tar` and gzips it at level 1 with isal (as that benchmark does), then, with a
warm page cache, times reading the whole decompressed stream through `tarstream.ArchiveStream`, what
`prepare -r FILE.tar.gz` reads with:

- one isal thread (`--inflate-threads 1`);
- rapidgzip (parallel decompression of one gzip stream) on each `--threads` count, with our checks
  of a cut file and of the inflate ratio (`prepare`'s default: all usable cores).

It prints the decompressed MB/s, the same in patches/s, and the CPU per patch. Then, on paper, the
`prepare` throughput of a 16- and a 64-core machine (on this 2-core one, `prepare` itself is measured:
see benchmarks/README.md): one isal thread caps it whatever the core count;
with the parallel inflater, cores go to inflating and to our own per-patch work (`--own-cpu-us`:
everything but inflating, measured by `benchmarks/prepare.py` as the `.tar` route's CPU per patch),
split to balance the two, up to what the one-core tar header walk allows (`--parser-us`). The
projection assumes the per-thread rate measured at the largest thread count here holds; rapidgzip's
own figures show near-linear scaling to tens of cores, which this 2-core machine cannot confirm.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare import build_archive, pack  # noqa: E402  (the sibling benchmark's archive builder)

from bigearthnet_tf.examples import example_archive  # noqa: E402
from bigearthnet_tf.tarstream import ArchiveStream  # noqa: E402

CHUNK = 4 << 20


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_all(stream) -> int:
    buffer = bytearray(CHUNK)
    total = 0
    while count := stream.readinto(buffer):
        total += count
    return total


def time_stream(path: Path, threads: int) -> tuple[int, float, float]:
    """(decompressed bytes, wall seconds, CPU seconds) of `ArchiveStream` inflating on `threads`."""
    started, cpu = time.perf_counter(), _cpu()
    stream = ArchiveStream(path, inflate_threads=threads)
    try:
        assert stream.parallel == (threads > 1), "rapidgzip is not importable"
        total = _read_all(stream)
    finally:
        stream.close()
    return total, time.perf_counter() - started, _cpu() - cpu


def projection(
    cores: int, inflate_per_thread: float, single_stream: float, own_us: float, parser_us: float
) -> tuple[float, float]:
    """Patches/s of `prepare` on `cores` cores: with one isal thread, and with the cores split between
    the parallel inflater (`inflate_per_thread` patches/s each) and our own work; neither faster
    than the tar header walk, one sequential pass on one core."""
    own_rate = 1e6 / own_us  # patches/s one core does of everything but inflating
    walk = 1e6 / parser_us
    one_thread = min(single_stream, (cores - 1) * own_rate, walk)
    # k cores inflate, the rest work: best k balances k * inflate == (cores - k) * own.
    best = max(min(k * inflate_per_thread, (cores - k) * own_rate) for k in range(1, cores))
    return one_thread, min(best, walk)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=3000, help="patches in the scaled archive")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="rapidgzip thread counts")
    parser.add_argument("--own-cpu-us", type=float, default=600.0, help="our CPU per patch but inflating")
    parser.add_argument("--parser-us", type=float, default=140.0, help="the tar header walk's CPU per patch")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if min(args.threads) < 2:
        parser.error("--threads: rapidgzip runs on 2 or more (1 is the isal thread, always measured)")
    from isal import igzip

    base = Path(tempfile.mkdtemp(prefix="bigearthnet-gzip-", dir=args.dir))
    try:
        build_archive(base, args.patches, example_archive(base / "examples").s2)
        tar = base / "archive.tar"
        pack(base / "archive", "BigEarthNet-v1.0", tar)
        gz = base / "archive.tar.gz"
        with open(tar, "rb") as source, igzip.open(gz, "wb", compresslevel=1) as target:
            shutil.copyfileobj(source, target, CHUNK)
        for path in (tar, gz):  # warm: the disk is not what is measured here
            with open(path, "rb") as stream:
                while stream.read(CHUNK):
                    pass
        size, packed = tar.stat().st_size, gz.stat().st_size
        print(
            f"{args.patches:,} patches: .tar {size / 1e6:,.0f} MB, .tar.gz (isal -1) {packed / 1e6:,.0f} MB; "
            f"{os.cpu_count()} cores here"
        )
        results = {"isal, 1 thread": time_stream(gz, 1)}
        for threads in args.threads:
            results[f"rapidgzip, {threads} threads"] = time_stream(gz, threads)
        rates = {}
        for name, (total, wall, cpu) in results.items():
            assert total == size, f"{name} inflated {total} bytes, the tar has {size}"
            rates[name] = args.patches / wall
            print(
                f"  {name}: {total / wall / 1e6:,.0f} MB/s = {rates[name]:,.0f} patches/s; "
                f"{cpu / args.patches * 1e6:,.0f} CPU-us/patch"
            )
        most = max(args.threads)
        per_thread = rates[f"rapidgzip, {most} threads"] / most
        single = rates["isal, 1 thread"]
        print(
            f"on paper, prepare from one .tar.gz, with {args.own_cpu_us:,.0f} CPU-us/patch of our own work "
            f"and {args.parser_us:,.0f} of the header walk:"
        )
        for cores in (16, 64):  # on 2 cores the split into whole cores is too coarse: measure there
            one_thread, parallel = projection(cores, per_thread, single, args.own_cpu_us, args.parser_us)
            print(
                f"  {cores} cores: one isal thread {one_thread:,.0f} patches/s; "
                f"parallel inflate {parallel:,.0f} patches/s ({parallel / one_thread:.1f}x)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
