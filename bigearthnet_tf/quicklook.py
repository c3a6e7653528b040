"""`bigearthnet show`: a true-colour and a false-colour quick-look PNG per patch, with its labels.

Sources are S2 patch folders (v1 `<name>/<name>_B02.tif ...`, or v2 folders inside an archive, whose
labels come from its metadata parquet) or prepared records (the first `limit` patches). True colour is
B04, B03, B02; false colour (vegetation red) is B08, B04, B03. Each image is stretched between the 2nd
and 98th percentile of its three bands together, so that colours stay comparable within it. With a
model, the predicted labels (at its thresholds) are shown beside the reference labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigearthnet_tf.archive import V2_METADATA, V2_S2_FOLDER, BadPatchError, open_archive, read_s2_bands
from bigearthnet_tf.archive_file import open_archive_file, patches_in_file
from bigearthnet_tf.constants import BANDS_10M, BIGEARTHNET_19, BIGEARTHNET_19_LABELS
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.inference import logits_function, logits_over_patches, sigmoid
from bigearthnet_tf.patch_source import (
    DEFAULT_BATCH_SIZE,
    PatchReader,
    check_patch_folders,
    default_read_threads,
    locate_folders,
)
from bigearthnet_tf.predictor import load_predictor, resolve_thresholds
from bigearthnet_tf.report import save_figure_atomically
from bigearthnet_tf.tarstream import is_archive_file
from bigearthnet_tf.thresholds import predicted_labels

TRUE_COLOUR = ("B04", "B03", "B02")
FALSE_COLOUR = ("B08", "B04", "B03")
STRETCH_PERCENTILES = (2.0, 98.0)
LABELS_FILE_SUFFIX = "_labels_metadata.json"


@dataclass(frozen=True)
class QuickLookPatch:
    """What one quick-look shows: the 10 m bands (120x120, by name), and labels when known."""

    name: str
    bands_10m: dict[str, np.ndarray]
    labels: tuple[str, ...] | None  # BigEarthNet-19 reference labels; None when not known
    predicted: tuple[str, ...] | None = None


def show(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    s1_root: str | os.PathLike[str] | None = None,
    limit: int = 16,
    overwrite: bool = False,
) -> list[Path]:
    """Write `<out>/<patch>.png` for each patch of `sources`; return the paths."""
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    paths = [Path(source) for source in sources]
    from_records = all(
        path.suffix == ".tfrecord" or (path.is_dir() and any(path.glob("*.tfrecord"))) for path in paths
    )
    if len(paths) == 1 and paths[0].suffix != ".tfrecord" and is_archive_file(paths[0]):
        patches = _archive_file_patches(paths[0], limit, model, s1_root)
    elif from_records:
        patches = _record_patches(paths, limit, model)
    else:
        patches = _folder_patches(paths, model, s1_root)
    out = Path(out)
    targets = [out / f"{patch.name}.png" for patch in patches]
    existing = [target for target in targets if target.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for patch, target in zip(patches, targets, strict=True):
        save_quicklook(patch, target)
        print(f"{target}")
    return targets


def _folder_patches(folders: Sequence[Path], model, s1_root) -> list[QuickLookPatch]:
    check_patch_folders(folders)
    predicted = _predicted_for_folders(folders, model, s1_root) if model is not None else {}
    patches = []
    for folder in folders:
        name = folder.name or folder.resolve().name
        bands = read_s2_bands(str(folder), name, BANDS_10M)
        patches.append(QuickLookPatch(name, bands, _folder_labels(folder, name), predicted.get(name)))
    return patches


def _archive_file_patches(path: Path, limit: int, model, s1_root) -> list[QuickLookPatch]:
    """The first `limit` readable patches of a downloaded archive file, with its labels."""
    predictor = load_predictor(model) if model is not None else None
    archive = open_archive_file(path, None, s1_root if predictor is not None and predictor.needs_s1 else None)
    if predictor is not None and predictor.needs_s1 and archive.s1_dir is None:
        raise UserError(
            "the model reads Sentinel-1 bands; give the extracted Sentinel-1 folder with --s1-root"
        )
    read = []
    stream = patches_in_file(archive)
    try:
        for patch in stream:
            if not isinstance(patch, BadPatchError):
                read.append(patch)
            if len(read) == limit:
                break
    finally:
        stream.close()
    if not read:
        raise UserError(f"no readable patches in {path}")
    predicted: list = [None] * len(read)
    if predictor is not None:
        reader = PatchReader(predictor.band_order, archive_mode=True)
        inputs = {
            key: np.stack([reader.arrays(p.bands, p.s1_bands)[key] for p in read]).astype(np.float32)
            for key in predictor.band_order
        }
        probabilities = sigmoid(logits_function(predictor.model)(inputs).numpy())
        labels = predicted_labels(probabilities, resolve_thresholds(predictor), predictor.class_names)
        predicted = [tuple(row) for row in labels]
    return [
        QuickLookPatch(p.name, {band: p.bands[band] for band in BANDS_10M}, p.labels_19, guess)
        for p, guess in zip(read, predicted, strict=True)
    ]


def _folder_labels(folder: Path, name: str) -> tuple[str, ...] | None:
    """The BigEarthNet-19 labels of a patch folder: its v1 JSON, or its v2 archive's parquet."""
    if (folder / f"{name}{LABELS_FILE_SUFFIX}").is_file():
        return open_archive(folder.parent, version=1).read_labels(name)[1]
    top = folder.parent.parent
    if top.name == V2_S2_FOLDER and (top.parent / V2_METADATA).is_file():
        try:
            return open_archive(top.parent, version=2).read_labels(name)[1]
        except BadPatchError:
            return None
    return None


def _predicted_for_folders(folders, model, s1_root) -> dict[str, tuple[str, ...]]:
    predictor = load_predictor(model)
    locations = locate_folders(folders, s1_root=s1_root, needs_s1=predictor.needs_s1)
    reader = PatchReader(predictor.band_order, archive_mode=False)
    names, logits, _ = logits_over_patches(
        predictor.model, reader, locations, batch_size=DEFAULT_BATCH_SIZE, workers=default_read_threads()
    )
    labels = predicted_labels(sigmoid(logits), resolve_thresholds(predictor), predictor.class_names)
    return {name: tuple(row) for name, row in zip(names, labels, strict=True)}


def _record_patches(paths: Sequence[Path], limit: int, model) -> list[QuickLookPatch]:
    from bigearthnet_tf.input_pipeline import detect_format, list_files, make_dataset

    files = list_files([str(path) for path in paths])
    label_type = BIGEARTHNET_19 if BIGEARTHNET_19 in detect_format(files).label_types else None
    dataset = make_dataset(files, label_type, limit, modality="S2", with_names=True, shuffle_buffer=0)
    element = next(iter(dataset.take(1)), None)
    if element is None:
        raise UserError(f"no records in {', '.join(files)}")
    inputs, labels = element if isinstance(element, tuple) else (element, None)
    names = [name.decode("utf-8") for name in inputs["patch_name"].numpy()]
    bands_10m = inputs["bands_10m"].numpy()
    predicted = _predicted_for_inputs(model, files, len(names)) if model is not None else None
    patches = []
    for index, name in enumerate(names):
        bands = {band: bands_10m[index, ..., channel] for channel, band in enumerate(BANDS_10M)}
        reference = None
        if labels is not None:
            row = labels.numpy()[index]
            reference = tuple(
                label for label, value in zip(BIGEARTHNET_19_LABELS, row, strict=True) if value > 0
            )
        patches.append(QuickLookPatch(name, bands, reference, predicted[index] if predicted else None))
    return patches


def _predicted_for_inputs(model, files: list[str], count: int) -> list[tuple[str, ...]]:
    """The model's labels for the first `count` records, read with the inputs the model needs."""
    from bigearthnet_tf.input_pipeline import make_dataset

    predictor = load_predictor(model)
    modality = predictor.meta.modality
    dataset = make_dataset(files, None, count, modality=modality, shuffle_buffer=0)
    inputs = next(iter(dataset.take(1)))
    probabilities = sigmoid(logits_function(predictor.model)(inputs).numpy())
    thresholds = resolve_thresholds(predictor)
    return [tuple(labels) for labels in predicted_labels(probabilities, thresholds, predictor.class_names)]


def composite(bands: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """An RGB image in [0, 1] of three bands, stretched between the 2nd and 98th percentile."""
    stack = np.stack([np.asarray(bands[name], dtype=np.float64) for name in names], axis=-1)
    low, high = np.percentile(stack, STRETCH_PERCENTILES)
    if high <= low:
        return np.zeros_like(stack)
    return np.clip((stack - low) / (high - low), 0.0, 1.0)


def save_quicklook(patch: QuickLookPatch, path: Path) -> Path:
    """The two composites side by side, the patch name above and the labels below."""
    import textwrap

    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.2), layout="constrained")
    for axes, names, title in zip(
        figure.subplots(1, 2),
        (TRUE_COLOUR, FALSE_COLOUR),
        ("true colour (B04, B03, B02)", "false colour (B08, B04, B03)"),
        strict=True,
    ):
        axes.imshow(composite(patch.bands_10m, names), interpolation="nearest")
        axes.set_title(title, fontsize=9)
        axes.set_axis_off()
    known = "none" if patch.labels == () else "not known"
    lines = [f"labels: {'; '.join(patch.labels) if patch.labels else known}"]
    if patch.predicted is not None:
        lines.append(f"predicted: {'; '.join(patch.predicted) or 'none'}")
    figure.suptitle(patch.name, fontsize=11, fontweight="bold")
    figure.supxlabel("\n".join(textwrap.fill(line, 110) for line in lines), fontsize=8)
    return save_figure_atomically(figure, path)
