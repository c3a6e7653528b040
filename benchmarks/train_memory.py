"""Peak memory of training against the shuffle buffer asked for: 1,000 records vs the 2019 value of 130,000.

    python benchmarks/train_memory.py [--records 8000] [--buffers 0 1000 10000 130000] [--iterations 50]

Writes ``--records`` default-format records (synthetic patches encoded as ``bigearthnet prepare`` encodes
them, ~160 kB each, 16 shards) into a temporary folder. Then, for each ``shuffle_buffer_size`` in
``--buffers``, a fresh Python process runs ``bigearthnet_tf.train.train`` on a config as a user writes it
(``ResNet-Tiny``, BigEarthNet-19, batch 32, learning rate 0.001, the 2019 defaults otherwise) and stops
it after ``--iterations`` iterations. The first batch already needs the shuffle buffer full, so the
buffer's memory is all there from iteration 1. Each process reports its RSS before training (after
importing TensorFlow) and its RSS high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so one
setting never inherits another's memory.

Printed per setting: the buffer the input pipeline actually holds (``effective_shuffle_buffer``: the one
asked for, capped by the 1 GiB budget of serialized records, and never more than the epoch's records), the
peak RSS and its growth over the process before training, and what the 2019 design held for the same
``shuffle_buffer_size``: that many serialized 2019-schema records (buffer x record size; 130,000 x ~160 kB
is ~20 GB on the full archive).

``--records`` defaults to 8,000 so that one epoch is more than the 1 GiB budget holds and the cap shows:
with fewer records a buffer of 130,000 holds the whole epoch (it cannot hold more).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCHMARKS = Path(__file__).resolve().parent
MODEL = "ResNet-Tiny"
BATCH_SIZE = 32
LEARNING_RATE = 0.001
BUFFER_2019 = 130_000
MIB = 2**20


class _Stop(Exception):
    """Raised from the per-iteration hook to end a run after the iterations measured."""


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(settings: dict) -> None:
    """Train in this process for the setting given; print one JSON line with the memory figures."""
    try:
        import bigearthnet_tf  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(BENCHMARKS.parent))
    import tensorflow as tf  # noqa: F401  (imported before the baseline is taken)
    from rich.console import Console

    from bigearthnet_tf.config import TRAIN, config_from_dict
    from bigearthnet_tf.input_pipeline import detect_format, effective_shuffle_buffer, list_files
    from bigearthnet_tf.train import train

    files = list_files(settings["records_dir"])
    record_bytes = detect_format(files, "BigEarthNet-19", "S2").record_bytes
    with tempfile.TemporaryDirectory(prefix="ben-memory-run-") as out_dir:
        config = config_from_dict(
            {
                "model_name": MODEL,
                "label_type": "BigEarthNet-19",
                "batch_size": BATCH_SIZE,
                "nb_epoch": 1,
                "learning_rate": LEARNING_RATE,
                "out_dir": out_dir,
                "tr_tf_record_files": files,
                "shuffle_buffer_size": settings["buffer"],
            },
            TRAIN,
        )
        iterations = settings["iterations"]
        rss = []

        def on_iteration(iteration: int, loss: float) -> None:
            rss.append(_rss_bytes())
            if iteration >= iterations:
                raise _Stop

        baseline = _rss_bytes()
        started = time.perf_counter()
        try:
            train(config, on_iteration=on_iteration, console=Console(quiet=True))
        except _Stop:
            pass
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    held = effective_shuffle_buffer(settings["buffer"], record_bytes, config_shuffle_memory_mb())
    print(
        json.dumps(
            {
                "buffer": settings["buffer"],
                "held": min(held, settings["records"]) if held else 0,
                "record_bytes": record_bytes,
                "baseline": baseline,
                "peak": peak,
                "after_first_iteration": rss[0] if rss else None,
                "iterations": len(rss),
                "seconds": seconds,
            }
        )
    )


def config_shuffle_memory_mb() -> float:
    """The budget `train` runs with (make_dataset's default; no config key changes it)."""
    from bigearthnet_tf.input_pipeline import DEFAULT_SHUFFLE_MEMORY_MB

    return DEFAULT_SHUFFLE_MEMORY_MB


def run_setting(records_dir: Path, records: int, buffer: int, iterations: int) -> dict:
    settings = {
        "records_dir": str(records_dir),
        "records": records,
        "buffer": buffer,
        "iterations": iterations,
    }
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(settings)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"the run with shuffle_buffer_size {buffer} failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=8000, help="default-format records written")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument(
        "--buffers", type=int, nargs="+", default=[0, 1000, 10_000, BUFFER_2019], help="shuffle_buffer_size"
    )
    parser.add_argument("--iterations", type=int, default=50, help="training iterations per setting")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(BENCHMARKS))
    from train_step import write_records  # the same synthetic records as the step benchmark

    with tempfile.TemporaryDirectory(prefix="ben-memory-records-") as folder:
        started = time.perf_counter()
        records = write_records(Path(folder), args.records, args.shards)
        size_mib = records.default_record_bytes * records.records / MIB
        print(
            f"wrote {records.records:,} default-format records ({records.default_record_bytes / 1e3:.0f} kB "
            f"each, {size_mib:,.0f} MiB) in {args.shards} files in {time.perf_counter() - started:.1f} s; "
            f"the same patches in the 2019 schema: {records.legacy_record_bytes / 1e3:.0f} kB each"
        )
        print(
            f"{MODEL}, batch {BATCH_SIZE}, {args.iterations} iterations per setting, one fresh process each; "
            f"CPU cores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"  {'shuffle_buffer_size':>19s} {'held':>6s} {'held MiB':>8s} {'peak RSS MiB':>12s} "
            f"{'growth MiB':>10s} {'time':>6s} | {'2019 design held':>16s}",
            flush=True,
        )
        results = []
        for buffer in args.buffers:
            result = run_setting(Path(folder), records.records, buffer, args.iterations)
            results.append(result)
            held_mib = result["held"] * result["record_bytes"] / MIB
            growth = (result["peak"] - result["baseline"]) / MIB
            legacy = buffer * records.legacy_record_bytes
            print(
                f"  {buffer:19,d} {result['held']:6,d} {held_mib:8,.0f} {result['peak'] / MIB:12,.0f} "
                f"{growth:10,.0f} {result['seconds']:5.0f}s | {legacy / 1e9:13,.2f} GB",
                flush=True,
            )
    shuffled = [r for r in results if r["buffer"]] or results
    small = min(shuffled, key=lambda r: r["buffer"])
    large = max(shuffled, key=lambda r: r["buffer"])
    extra = (large["peak"] - small["peak"]) / MIB
    legacy_extra = (large["buffer"] - small["buffer"]) * records.legacy_record_bytes / MIB
    print(
        f"shuffle_buffer_size {small['buffer']:,} -> {large['buffer']:,} "
        f"({large['buffer'] / max(small['buffer'], 1):,.0f}x): peak RSS {small['peak'] / MIB:,.0f} -> "
        f"{large['peak'] / MIB:,.0f} MiB (+{extra:,.0f} MiB, bounded by the 1 GiB budget); the 2019 design "
        f"held +{legacy_extra:,.0f} MiB more"
    )


if __name__ == "__main__":
    main()
