"""`bigearthnet map` on a synthetic full-size Sentinel-2 product: windows/s, where the time goes, the
ratio to the model alone, and peak memory against the scene's size.

Writes, once, into `--work` (default: a temporary folder) a 10980 x 10980 L2A product made of the six
real example patches repeated (every band at its native resolution) as a folder of tiled, deflate
GeoTIFFs and, with `--jp2`, as a `.SAFE` product with lossless JP2 bands (slow to write). Then times:

- throughput: `map` over `--rows` window rows of the GeoTIFF route (and the JP2 route) with `--model`
  (default ResNet50, randomly initialised: speed does not depend on the weights), reporting windows/s,
  the seconds spent reading and decoding (in the reader thread), assembling windows and in the model;
- the model alone: the same windows, already in memory as model inputs, through the same traced
  function in batches of the same size: map's windows/s over this is the ratio (target >= 0.8 on a
  2-core machine, GeoTIFF route: reading must hide behind inference);
- reading alone: the windows/s the reader delivers, what an accelerator could be fed at;
- memory: `map` with a small model over a quarter of the scene, then the whole scene, each in a fresh
  process; their peak RSS (target: the whole scene at most 10 % above the quarter).

    python benchmarks/map.py [--rows 6] [--model ResNet50] [--jp2] [--work /tmp/map-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS  # noqa: E402

SIDE = 10980  # pixels of a Sentinel-2 tile at 10 m


def make_product(work: Path, jp2: bool, rows: int) -> dict[str, Path]:
    from bigearthnet_tf.constants import BANDS_BY_NAME
    from bigearthnet_tf.examples import example_archive
    from bigearthnet_tf.synth_scene import mosaic_bands, write_scene

    # The whole tile (memory), and its first `rows` window rows at full width (throughput).
    scenes = {
        "whole": work / "T32UQD_folder",
        "geotiff": work / f"T32UQD_{rows}_rows",
        "jp2": work / f"S2A_{rows}_rows.SAFE",
    }
    if all(scenes[name].exists() for name in ("whole", "geotiff", *(["jp2"] if jp2 else []))):
        return scenes
    examples = example_archive(work / "examples")
    folders = sorted(path for path in examples.s2.iterdir() if path.is_dir())
    small, _ = mosaic_bands([folders[:3], folders[3:]])
    bands = {}
    for band, values in small.items():
        side = SIDE * 10 // BANDS_BY_NAME[band].resolution_m
        reps = (-(-side // values.shape[0]), -(-side // values.shape[1]))
        bands[band] = np.tile(values, reps)[:side, :side]
    started = time.perf_counter()
    write_scene(bands, scenes["whole"], "folder")
    print(f"wrote the GeoTIFF product in {time.perf_counter() - started:.0f} s", flush=True)
    top = {band: values[: rows * values.shape[0] * 120 // SIDE] for band, values in bands.items()}
    write_scene(top, scenes["geotiff"], "folder")
    if jp2:
        started = time.perf_counter()
        write_scene(top, scenes["jp2"], "safe", offset=-1000)
        print(f"wrote {rows} rows of the product as JP2 in {time.perf_counter() - started:.0f} s", flush=True)
    return scenes


def checkpoint(work: Path, model_name: str) -> Path:
    import keras

    from bigearthnet_tf import checkpoints
    from bigearthnet_tf.models import build_model

    base = work / "models" / model_name
    if not (base.parent / f"{base.name}.json").exists():
        keras.utils.set_random_seed(0)
        model = build_model(model_name, len(BIGEARTHNET_19_LABELS))
        checkpoints.save_checkpoint(
            base, model, model_name=model_name, label_type="BigEarthNet-19", modality="S2", iteration=0
        )
    return base


def throughput(scene_path: Path, model: Path, rows: int, out: Path, batch_size: int) -> dict:
    from bigearthnet_tf.inference import logits_function
    from bigearthnet_tf.mapping import MapOptions, _window_inputs, map_scenes
    from bigearthnet_tf.predictor import load_predictor
    from bigearthnet_tf.scenes import open_scene

    predictor = load_predictor(model)
    options = MapOptions(batch_size=batch_size, overwrite=True)
    apply = logits_function(predictor.model)
    scene = open_scene(scene_path)
    _, columns = scene.windows(120)
    bands = sorted({b for bands in predictor.band_order.values() for b in bands})
    # Reading alone, and the windows in memory for the model alone.
    started = time.perf_counter()
    held = []
    for row in range(rows):
        strip = scene.read_strip(bands, row * 120, (0, columns * 120))
        held.append(_window_inputs(strip, None, predictor.band_order, columns, 120)[0])
    read_seconds = time.perf_counter() - started
    scene.close()
    first = {key: value[:batch_size] for key, value in held[0].items()}
    apply(first).numpy()  # traced outside the timing, as map traces once per model
    started = time.perf_counter()
    for inputs in held:
        for start in range(0, columns, batch_size):
            apply({key: value[start : start + batch_size] for key, value in inputs.items()}).numpy()
    model_seconds = time.perf_counter() - started
    del held
    started = time.perf_counter()
    result = map_scenes([scene_path], predictor, out, options, show_progress=False)[0]
    map_seconds = time.perf_counter() - started
    windows = rows * columns
    assert result.windows == windows, (result.windows, windows)
    return {
        "windows": windows,
        "map_windows_per_s": windows / map_seconds,
        "model_alone_windows_per_s": windows / model_seconds,
        "reading_alone_windows_per_s": windows / read_seconds,
        "ratio": (windows / map_seconds) / (windows / model_seconds),
        "map_seconds": result.seconds,
    }


def memory_child(scene_path: str, model: str, out: str, quarter: bool) -> None:
    from bigearthnet_tf.mapping import MapOptions, map_scenes

    options = MapOptions(overwrite=True)
    if quarter:
        from rasterio.warp import transform_bounds

        from bigearthnet_tf.scenes import open_scene

        scene = open_scene(scene_path)
        left, top = scene.transform @ (0, 0)
        half = SIDE * 10 / 2
        options = MapOptions(
            overwrite=True,
            bbox=transform_bounds(scene.crs, "EPSG:4326", left + 10, top - half, left + half, top - 10),
        )
        scene.close()
    result = map_scenes([scene_path], model, out, options, show_progress=False)[0]
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child started by a big parent
    # would report the parent's peak.
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    print(json.dumps({"windows": result.windows, "peak_rss_mib": peak, "seconds": result.seconds}))


def memory(scene_path: Path, model: Path, work: Path) -> dict:
    figures = {}
    for part in ("quarter", "whole"):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(scene_path),
                str(model),
                str(work / f"mem-{part}"),
                part,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        figures[part] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["growth"] = figures["whole"]["peak_rss_mib"] / figures["quarter"]["peak_rss_mib"] - 1
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6, help="window rows timed (91 windows each)")
    parser.add_argument("--model", default="ResNet50")
    parser.add_argument("--memory-model", default="K-BranchCNN-Tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--jp2", action="store_true", help="also write and time the .SAFE product with JP2 bands"
    )
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        scene, model, out, part = args.memory_child
        memory_child(scene, model, out, part == "quarter")
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="map-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    scenes = make_product(work, args.jp2, args.rows)
    model = checkpoint(work, args.model)
    routes = ["geotiff", "jp2"] if args.jp2 else ["geotiff"]
    for route in routes:
        figures = throughput(scenes[route], model, args.rows, work / f"maps-{route}", args.batch_size)
        seconds = figures["map_seconds"]
        print(
            f"{route}: {args.model}, {figures['windows']:,} windows: map {figures['map_windows_per_s']:.1f} windows/s, "
            f"model alone {figures['model_alone_windows_per_s']:.1f}, ratio {figures['ratio']:.2f} (target >= 0.8); "
            f"reading alone {figures['reading_alone_windows_per_s']:.0f} windows/s; in map: reading "
            f"{seconds['read']:.1f} s (overlapped), assembling {seconds['assemble']:.1f} s, model {seconds['model']:.1f} s, "
            f"total {seconds['total']:.1f} s",
            flush=True,
        )
    small = checkpoint(work, args.memory_model)
    figures = memory(scenes["whole"], small, work)
    print(
        f"memory ({args.memory_model}, GeoTIFF route): quarter scene {figures['quarter']['windows']:,} windows, peak "
        f"{figures['quarter']['peak_rss_mib']:.0f} MiB; whole scene {figures['whole']['windows']:,} windows, peak "
        f"{figures['whole']['peak_rss_mib']:.0f} MiB ({figures['growth'] * 100:+.1f} %, target <= +10 %); whole scene "
        f"in {figures['whole']['seconds']['total']:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
