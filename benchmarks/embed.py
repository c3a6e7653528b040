"""`bigearthnet embed` patches/s beside `bigearthnet predict` on the same model and patch folders.

    python benchmarks/embed.py [--patches 600] [--model SSL4EO-ResNet|reBEN-ResNet|ResNet50] [--batch 64]

Copies the six real example patches of bigearthnet-common into `--patches` folders, builds the model with
random weights (the speed does not depend on them) and saves it as a checkpoint, then times `embed` and
`predict` over the folders (a warm-up pass first, so both timings exclude tracing). Both read the folders
with the same threads and call the same network; `embed` stops at the pooled features, so it should be
as fast or slightly faster. Prints patches/s and CPU-ms per patch of each.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def copies_of_examples(out: Path, count: int) -> list[Path]:
    from bigearthnet_tf.examples import example_archive

    examples = example_archive(out / "examples")
    sources = sorted(p for p in examples.s2.iterdir() if p.is_dir())
    folders = []
    for index in range(count):
        source = sources[index % len(sources)]
        name = f"{source.name[: source.name.rindex('_', 0, source.name.rindex('_'))]}_{index}_{index}"
        target = out / "patches" / name
        target.mkdir(parents=True)
        for file in source.iterdir():  # bands and labels, renamed to the new patch name
            os.link(file, target / file.name.replace(source.name, name))
        folders.append(target)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=600)
    parser.add_argument("--model", default="SSL4EO-ResNet")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    from bigearthnet_tf import checkpoints
    from bigearthnet_tf.embed import embed
    from bigearthnet_tf.models import build_model
    from bigearthnet_tf.predict import predict

    work = Path(tempfile.mkdtemp())
    try:
        folders = copies_of_examples(work, args.patches)
        model = build_model(args.model, 19, "S2")
        base = work / "model"
        checkpoints.save_checkpoint(
            base, model, model_name=args.model, label_type="BigEarthNet-19", modality="S2", iteration=0
        )
        print(f"{args.model}, {args.patches} patch folders, batch {args.batch}, load {os.getloadavg()[0]:.1f}")
        for label, run in (
            ("embed", lambda: embed(base, folders, batch_size=args.batch)),
            ("predict", lambda: predict(base, folders, batch_size=args.batch, show_progress=False, emit=False)),
        ):
            run()  # warm-up: tracing, page cache
            started, cpu = time.perf_counter(), cpu_seconds()
            run()
            wall, used = time.perf_counter() - started, cpu_seconds() - cpu
            print(f"{label:8s} {args.patches / wall:8,.0f} patches/s  {1000 * used / args.patches:6.2f} CPU-ms/patch")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
