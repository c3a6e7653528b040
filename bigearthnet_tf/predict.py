"""`predict(...)`: apply a trained model straight to patch folders or an archive, and per-class thresholds.

Input: patch folders (v1 `<name>/<name>_<BAND>.tif`, or v2 `BigEarthNet-S2/<product>/<patch_id>/`, the
same file names), or an archive root with optional split lists. The model's own metadata decides
what is read: its input keys (`bands_10m`, `bands_20m`, `bands_60m`, `bands_s1`), the band order of each
(stored with the checkpoint and checked against this library's), its class names, and its
normalisation statistics (held by its first layers). Sentinel-1 bands are read only when the model's
modality needs them (S1, MM): a v1 patch is paired through the S1 folders' JSON (`--s1-root`), a v2
patch through `metadata.parquet` of its archive.

Speed: patches are read in a thread pool (GeoTIFF reads are system calls that release the GIL) a few
batches ahead of the model, batches have one fixed shape (the last is padded) so the model function is
traced once, and only the bands the model reads are stacked.

Output, chosen by the extension of `out` (no `out`: CSV on standard output):

- CSV: `patch_name`, one column per class (named by its class name) with the probability at 8
  decimals, then `predicted`: the class names at or above their threshold, joined by `;`;
- JSON: a list of `{"patch_name": ..., "probabilities": {class: p}, "labels": [class, ...]}`.

Files are written atomically and an existing file is never replaced without `overwrite`.

Thresholds: a class is predicted when its probability is >= its threshold. Per-class thresholds can be
chosen on validation records (`tune_thresholds`, each maximising that class's F1) and are stored
beside the checkpoint as `<base>.thresholds.json` (a new file, so the checkpoint's checksums are
untouched; it records the SHA-256 of the weights it was chosen for and is refused for other weights).
Precedence: a `thresholds_file` (class -> threshold; classes it leaves out take `threshold`), else an
explicit `threshold` for every class, else the stored thresholds (for an exported `.keras` model: those
in its metadata file, carried over from the checkpoint), else 0.5.

`model` may also be an exported `.keras` file (opened in Keras safe mode): one that ends in the sigmoid
layer `probabilities` (`bigearthnet export --format keras`) is used as is, another is taken to output
logits.
"""

from __future__ import annotations

import collections
import csv
import datetime
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigearthnet_tf.archive import (
    V1_S1_FOLDER,
    V2_METADATA,
    V2_S1_FOLDER,
    V2_S2_FOLDER,
    Archive,
    BadPatchError,
    check_patch_name,
    open_archive,
    read_s1_bands,
    read_s2_bands,
    read_split_lists,
)
from bigearthnet_tf.constants import DEFAULT_THRESHOLD
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import open_atomically, write_text_atomically
from bigearthnet_tf.inference import collect_predictions, logits_function, sigmoid
from bigearthnet_tf.predictor import (
    S1_INPUT,
    Predictor,
    keras_export_metadata,
    keras_metadata_path,
    load_predictor,
    modality_of,
)
from bigearthnet_tf.thresholds import (
    THRESHOLDS_FORMAT,
    THRESHOLDS_FORMAT_VERSION,
    choose_thresholds,
    read_thresholds_file,
    stored_thresholds,
)

__all__ = [
    "PREDICTED_COLUMN",
    "Predictor",
    "PredictionResult",
    "PatchReader",
    "load_predictor",
    "keras_metadata_path",
    "keras_export_metadata",
    "predict",
    "tune_thresholds",
    "resolve_thresholds",
    "predicted_labels",
]

DEFAULT_BATCH_SIZE = 64
PREFETCH_BATCHES = 2  # batches read ahead while the model runs on the current one
PROBABILITY_DECIMALS = 8  # as evaluate's predictions.csv
PATCH_NAME_COLUMN = "patch_name"
PREDICTED_COLUMN = "predicted"
SPLIT_COLUMN = "split"
LABEL_SEPARATOR = ";"
OUTPUT_FORMATS = (".csv", ".json")
_UINT16 = np.dtype(np.uint16)


# --------------------------------------------------------------------------------------------------
# The model and what it means
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Reading patches
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PatchLocation:
    """Where one patch's bands are: its S2 folder and, when needed, the archive that pairs its S1 twin."""

    name: str
    folder: str
    archive: Archive | None  # for the S1 pairing (and, in archive mode, for reading the whole patch)
    split: str | None = None  # the split list that named it (archive mode with splits)


class PatchReader:
    """Reads the model inputs of one patch: `{input key: array (side, side, channels)}` in band order.

    S2 bands stay uint16 (as in the records) until a batch is assembled; S1 bands are float32.
    """

    def __init__(self, band_order: Mapping[str, Sequence[str]], *, archive_mode: bool) -> None:
        self.band_order = {key: tuple(bands) for key, bands in band_order.items()}
        self.archive_mode = archive_mode
        self._s2_keys = [key for key in self.band_order if key != S1_INPUT]
        self._needs_s1 = S1_INPUT in self.band_order

    def read(self, location: _PatchLocation) -> dict[str, np.ndarray]:
        """The stacked input arrays of a patch; BadPatchError naming the patch and file if unreadable."""
        if self.archive_mode:
            patch = location.archive.read_patch(location.name)  # type: ignore[union-attr]
            s2_bands, s1_bands = patch.bands, patch.s1_bands
        else:
            wanted = {band for key in self._s2_keys for band in self.band_order[key]}
            s2_bands = read_s2_bands(location.folder, location.name, wanted)
            s1_bands = _read_s1_twin(location) if self._needs_s1 else None
        arrays = {}
        for key, bands in self.band_order.items():
            source = s1_bands if key == S1_INPUT else s2_bands
            arrays[key] = np.stack([source[band] for band in bands], axis=-1)  # type: ignore[index]
        return arrays


def _read_s1_twin(location: _PatchLocation) -> dict[str, np.ndarray]:
    archive = location.archive
    assert archive is not None and archive.s1_dir is not None
    s1_name = archive.s1_name(location.name)  # BadPatchError when no S1 patch is paired
    return read_s1_bands(archive.s1_folder(s1_name), location.name, s1_name)


def check_archive_root(root: str | os.PathLike[str]) -> None:
    """UserError unless `root` is a folder (what layout it holds is checked when it is opened)."""
    if not Path(root).is_dir():
        raise UserError(f"--archive {root}: no such folder")


def check_patch_folders(folders: Sequence[str | os.PathLike[str]], skip_bad: bool = False) -> None:
    """UserError naming the first argument that is not a patch folder, and what it is instead: a folder
    of patch folders (then: use --archive), or (unless `skip_bad`, which skips those later) a file,
    nothing, or a folder without band files."""
    for entry in folders:
        folder = Path(entry)
        name = folder.name or folder.resolve().name
        if folder.is_dir() and not (folder / f"{name}_B02.tif").exists():
            inner = _patch_folders_below(folder)
            if inner:
                raise UserError(
                    f"{folder} is not a patch folder: it holds {inner:,} patch folders; to predict them "
                    f"all, use --archive {folder}"
                )
        if skip_bad:
            continue
        if not folder.exists():
            raise BadPatchError(name, str(folder), "no such patch folder")
        if not folder.is_dir():
            raise BadPatchError(name, str(folder), "a file, not a patch folder (<patch>/<patch>_B02.tif ...)")


def _patch_folders_below(folder: Path, limit: int = 3) -> int:
    """How many patch folders lie up to `limit` levels below `folder` (an archive root or product)."""
    count = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_dir():
                continue
            if os.path.exists(os.path.join(entry.path, f"{entry.name}_B02.tif")):
                count += 1
            elif limit > 1:
                count += _patch_folders_below(Path(entry.path), limit - 1)
    return count


def locate_folders(
    folders: Sequence[str | os.PathLike[str]], *, s1_root: str | os.PathLike[str] | None, needs_s1: bool
) -> list[_PatchLocation]:
    """Patch folders -> locations; the folder's name is the patch name. A v2 folder inside an archive
    (`BigEarthNet-S2/<product>/<patch_id>` beside `metadata.parquet`) is paired with S1 through it."""
    if needs_s1 and s1_root is None:
        raise UserError(
            "the model reads Sentinel-1 bands (bands_s1); give the Sentinel-1 root with --s1-root"
        )
    archives: dict[tuple[int, str], Archive] = {}
    locations: list[_PatchLocation] = []
    seen: dict[str, str] = {}
    for entry in folders:
        folder = Path(entry)
        name = folder.name or folder.resolve().name
        check_patch_name(name)
        if name in seen:
            raise UserError(f"patch {name} is given twice: {seen[name]} and {folder}")
        seen[name] = str(folder)
        archive = None
        if needs_s1:
            top = folder.parent.parent
            v2 = folder.parent.parent.name == V2_S2_FOLDER and (top.parent / V2_METADATA).is_file()
            version, root = (2, str(top.parent)) if v2 else (1, str(folder.parent))
            archive = archives.get((version, root))
            if archive is None:
                archive = open_archive(root, version=version, s1_root=s1_root)
                archives[(version, root)] = archive
        locations.append(_PatchLocation(name, str(folder), archive))
    return locations


def locate_archive(
    root: str | os.PathLike[str],
    *,
    split_files: Sequence[str | os.PathLike[str]] | None,
    official: bool,
    s1_root: str | os.PathLike[str] | None,
    needs_s1: bool,
    split: str | None = None,
) -> list[_PatchLocation]:
    """The patches of an archive: those of the split lists (in list order, each once, with the name of
    the first split naming it; only split `split` when given), the official splits, or (neither)
    every patch folder on disk in name order."""
    archive = open_archive(root)
    if needs_s1:
        if s1_root is None:  # the S1 folder often lies beside the S2 one
            s1_folder = V1_S1_FOLDER if archive.version == 1 else V2_S1_FOLDER
            candidates = [Path(archive.root), Path(archive.root).parent]
            s1_root = next((c for c in candidates if (c / s1_folder).is_dir()), None)
            if s1_root is None:
                raise UserError(
                    "the model reads Sentinel-1 bands (bands_s1) and no Sentinel-1 folder lies beside "
                    f"{archive.root}; give it with --s1-root"
                )
        archive = open_archive(root, version=archive.version, s1_root=s1_root)
    if official:
        splits = archive.present_official_splits()
    elif split_files:
        splits = read_split_lists(split_files)
    else:
        splits = {None: archive.patch_names()}
    if split is not None:
        if split not in splits:
            known = ", ".join(str(name) for name in splits if name is not None) or "none (no --splits)"
            raise UserError(f"--split {split!r}: no such split; the splits given are {known}")
        splits = {split: splits[split]}
    pairs = [(name, split_of) for split_of, names in splits.items() for name in names]
    if official and archive.version == 1 and not pairs:
        raise UserError(f"{root} holds none of the patches of the official v1 splits")
    first_split = dict(reversed(pairs))  # a patch in two lists is predicted once, under its first split
    if not first_split:
        raise UserError(f"no patches to predict in {root}")
    return [
        _PatchLocation(name, archive.patch_folder(name), archive, first_split[name])
        for name in dict.fromkeys(n for n, _ in pairs)
    ]


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    names: list[str]
    inputs: dict[str, np.ndarray]  # (batch_size, ...) float32; rows past len(names) are padding
    attempted: int  # patches read for this batch, skipped ones included (for the progress bar)


def _batches(
    reader: PatchReader,
    locations: Sequence[_PatchLocation],
    batch_size: int,
    workers: int,
    skip_bad: bool,
    skipped: list[tuple[str, str]],
) -> Iterator[_Batch]:
    """Fixed-shape float32 batches, read by `workers` threads `PREFETCH_BATCHES` batches ahead."""
    chunks = (locations[start : start + batch_size] for start in range(0, len(locations), batch_size))
    pending: collections.deque[tuple[Sequence[_PatchLocation], list[Future]]] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict-read")

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append((chunk, [pool.submit(reader.read, location) for location in chunk]))

    try:
        for _ in range(PREFETCH_BATCHES + 1):
            submit_next()
        while pending:
            chunk, futures = pending.popleft()
            submit_next()
            names, arrays = [], []
            for location, future in zip(chunk, futures, strict=True):
                try:
                    arrays.append(future.result())
                except BadPatchError as error:
                    if not skip_bad:
                        raise
                    skipped.append((location.name, str(error)))
                    continue
                names.append(location.name)
            if names:
                yield _Batch(names, _stack(reader.band_order, arrays, batch_size), len(chunk))
            else:
                yield _Batch([], {}, len(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stack(
    band_order: Mapping[str, Sequence[str]], arrays: list[dict[str, np.ndarray]], batch_size: int
) -> dict[str, np.ndarray]:
    """One float32 array per input key, padded with zeros to `batch_size` rows."""
    batch = {}
    for key in band_order:
        first = arrays[0][key]
        stacked = np.zeros((batch_size, *first.shape), dtype=np.float32)
        for row, patch in enumerate(arrays):
            stacked[row] = patch[key]
        batch[key] = stacked
    return batch


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionResult:
    """What `predict` computed, and where it wrote it (None: standard output)."""

    names: list[str]
    probabilities: np.ndarray  # (patches, classes) float64
    class_names: tuple[str, ...]
    thresholds: np.ndarray  # (classes,)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (patch name, reason)
    out: Path | None = None
    splits: list[str] | None = None  # per patch, the split that named it (archive mode with splits)

    @property
    def labels(self) -> list[list[str]]:
        """The predicted class names of each patch, in class order."""
        return predicted_labels(self.probabilities, self.thresholds, self.class_names)


def predict(
    model: str | os.PathLike[str] | Predictor,
    patch_folders: Sequence[str | os.PathLike[str]] = (),
    *,
    archive: str | os.PathLike[str] | None = None,
    split_files: Sequence[str | os.PathLike[str]] | None = None,
    official_splits: bool = False,
    split: str | None = None,
    s1_root: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    threshold: float | None = None,
    thresholds_file: str | os.PathLike[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    skip_bad: bool = False,
    show_progress: bool = True,
    console=None,
    emit: bool = True,
) -> PredictionResult:
    """Apply `model` to patch folders, or to the patches of `archive`, and write CSV or JSON.

    Args:
        model: a checkpoint base name (or any of its files, or a training out_dir), an exported
            `.keras` file, or a loaded `Predictor`.
        patch_folders: S2 patch folders (v1 or v2 layout); the folder name is the patch name.
        archive: instead of folders, an archive root (v1 or v2).
        split_files: with `archive`, split lists (CSV) naming the patches; `official_splits` for the
            official ones; neither: every patch folder of the archive. The output then has a `split`
            column; `split` keeps only the patches of the split of that name.
        s1_root: the Sentinel-1 root, for models that read S1 (for an archive: found beside it).
        out: `.csv` or `.json` file; None writes CSV to standard output.
        overwrite: replace an existing `out`.
        threshold, thresholds_file: see the module docstring.
        batch_size: patches per model call.
        workers: reading threads (default: 2 per core, at most 16).
        skip_bad: leave unreadable patches out (listed in the result and on the terminal) instead of
            stopping at the first with a one-line error naming it.
        show_progress: show the progress bar and summary (on standard error).
        emit: without `out`, write the CSV to standard output (False: only return the result).

    Raises:
        BadPatchError: a patch cannot be read and `skip_bad` is False; nothing is written.
        UserError: bad arguments, an existing `out` without `overwrite`, a model that cannot be loaded.
    """
    from rich.console import Console

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if bool(patch_folders) == (archive is not None):
        raise UserError("give either patch folders or --archive ROOT (not both, not neither)")
    if archive is None and (split_files or official_splits or split):
        raise UserError(
            "--splits and --split name patches of an archive; give the archive with --archive ROOT"
        )
    out_path = _check_out(out, overwrite)
    # Cheap checks of every path first: a mistake is reported before the model is loaded.
    if archive is not None:
        check_archive_root(archive)
    else:
        check_patch_folders(patch_folders, skip_bad)
    console = console or Console(stderr=True, quiet=not show_progress, highlight=False)

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    thresholds = resolve_thresholds(
        predictor, threshold=threshold, thresholds_file=thresholds_file, console=console
    )
    if archive is not None:
        locations = locate_archive(
            archive,
            split_files=split_files,
            official=official_splits,
            s1_root=s1_root,
            needs_s1=predictor.needs_s1,
            split=split,
        )
    else:
        locations = locate_folders(patch_folders, s1_root=s1_root, needs_s1=predictor.needs_s1)
    reader = PatchReader(predictor.band_order, archive_mode=archive is not None)
    workers = workers or min(16, 2 * (os.cpu_count() or 1))

    console.print(
        f"predicting {len(locations):,} patches with {predictor.meta.get('model_name')} "
        f"({predictor.meta.get('label_type')}, {predictor.meta.get('modality')}) from {predictor.source}",
        markup=False,
        soft_wrap=True,
    )
    apply = logits_function(predictor.model)
    names: list[str] = []
    outputs: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    split_of = {location.name: location.split for location in locations}
    with _progress(console, len(locations)) as advance:
        for batch in _batches(reader, locations, batch_size, workers, skip_bad, skipped):
            if batch.names:
                values = apply(batch.inputs).numpy()[: len(batch.names)]
                outputs.append(values)
                names.extend(batch.names)
            advance(batch.attempted)
    if not names:
        raise UserError(f"none of the {len(locations):,} patches could be read")
    values = np.concatenate(outputs)
    probabilities = sigmoid(values)

    splits = [split_of[name] for name in names] if any(split_of.values()) else None
    result = PredictionResult(
        names, probabilities, predictor.class_names, thresholds, skipped, out_path, splits
    )
    if out_path is None:
        if emit:
            _write_predictions(result, sys.stdout, ".csv")
    else:
        with open_atomically(out_path) as stream:
            _write_predictions(result, stream, out_path.suffix)
    for _, reason in skipped:
        console.print(f"skipped {reason}", markup=False, highlight=False, soft_wrap=True)
    if skipped:
        console.print(f"skipped {len(skipped):,} unreadable patches", markup=False)
    if out_path is not None:
        console.print(f"predictions for {len(names):,} patches: {out_path}", markup=False)
    return result


def predicted_labels(
    probabilities: np.ndarray, thresholds: np.ndarray | float, class_names: Sequence[str]
) -> list[list[str]]:
    """Per row, the class names whose probability is >= their threshold, in class order."""
    chosen = np.asarray(probabilities) >= np.asarray(thresholds)
    return [[class_names[i] for i in np.flatnonzero(row)] for row in chosen]


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _check_out(out: str | os.PathLike[str] | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {path}: unknown output format {path.suffix!r}; expected a .csv or .json file")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; expected a .csv or .json file")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the folder of --out {path}: {error.strerror}") from None
    return path


def _write_predictions(result: PredictionResult, stream: io.TextIOBase, suffix: str) -> None:
    number = f"{{:.{PROBABILITY_DECIMALS}f}}"
    labels = result.labels
    splits = result.splits
    if suffix.lower() == ".json":
        rows = []
        for index, (name, row, patch_labels) in enumerate(
            zip(result.names, result.probabilities, labels, strict=True)
        ):
            entry: dict[str, Any] = {PATCH_NAME_COLUMN: name}
            if splits is not None:
                entry[SPLIT_COLUMN] = splits[index]
            entry["probabilities"] = {
                class_name: round(float(p), PROBABILITY_DECIMALS)
                for class_name, p in zip(result.class_names, row, strict=True)
            }
            entry["labels"] = patch_labels
            rows.append(entry)
        json.dump(rows, stream, indent=1, allow_nan=False)
        stream.write("\n")
        return
    writer = csv.writer(stream, lineterminator="\n")
    split_header = [SPLIT_COLUMN] if splits is not None else []
    writer.writerow([PATCH_NAME_COLUMN, *split_header, *result.class_names, PREDICTED_COLUMN])
    for index, (name, row, patch_labels) in enumerate(
        zip(result.names, result.probabilities, labels, strict=True)
    ):
        split_cell = [splits[index]] if splits is not None else []
        writer.writerow(
            [name, *split_cell, *(number.format(p) for p in row), LABEL_SEPARATOR.join(patch_labels)]
        )


class _progress:
    """A rich progress bar over patches; yields a function that advances it by n."""

    def __init__(self, console, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("predicting"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task("predicting", total=total, rate="")

    def __enter__(self) -> Callable[[int], None]:
        self._bar.__enter__()

        def advance(count: int) -> None:
            self._bar.advance(self._task, count)
            speed = self._bar.tasks[0].speed
            if speed:
                self._bar.update(self._task, rate=f"{speed:,.0f} patches/s")

        return advance

    def __exit__(self, *exc_info: object) -> None:
        self._bar.__exit__(*exc_info)


# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------


def tune_thresholds(
    model: str | os.PathLike[str] | Predictor,
    validation_files: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    default: float = DEFAULT_THRESHOLD,
    console=None,
) -> Path:
    """Choose per-class thresholds on validation TFRecords and store them beside the checkpoint.

    Writes `<base>.thresholds.json` (atomically; an earlier one is replaced) and returns its path.
    """
    from rich.console import Console

    from bigearthnet_tf.input_pipeline import make_dataset

    console = console or Console(stderr=True, highlight=False)
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    label_type = predictor.meta["label_type"]
    dataset = make_dataset(
        list(map(str, validation_files)),
        label_type,
        batch_size,
        modality=predictor.meta.get("modality") or modality_of(predictor.input_keys),
    )
    predictions = collect_predictions(predictor.model, dataset)
    if predictions.labels is None:
        raise UserError("the validation files hold no labels to choose thresholds on")
    values = predictions.logits
    probabilities = sigmoid(values)
    choice = choose_thresholds(predictions.labels, probabilities, predictor.class_names, default=default)
    path = predictor.thresholds_file
    document = {
        "format": THRESHOLDS_FORMAT,
        "format_version": THRESHOLDS_FORMAT_VERSION,
        "method": "per class, the threshold maximising F1 on the validation records",
        "model": predictor.source.name,
        "model_sha256": predictor.model_sha256,
        "label_type": label_type,
        "class_names": list(predictor.class_names),
        "thresholds": choice.thresholds,
        "validation": {
            "files": [str(Path(name).resolve()) for name in validation_files],
            "patches": len(probabilities),
            "f1": choice.f1,
            f"f1_at_{default:g}": choice.f1_at_default,
            "classes_without_positives": list(choice.without_positives),
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    replaced = path.exists()
    write_text_atomically(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    mean_default = float(np.mean(list(choice.f1_at_default.values())))
    mean_tuned = float(np.mean(list(choice.f1.values())))
    message = (
        f"per-class thresholds chosen on {len(probabilities):,} validation patches: mean per-class F1 "
        f"{mean_default:.4f} at {default:g} -> {mean_tuned:.4f}"
    )
    if choice.without_positives:
        count = len(choice.without_positives)
        message += f"; {count} class{'es' if count > 1 else ''} without positives keep {default:g}"
    console.print(f"{message}\n{'replaced' if replaced else 'written'}: {path}", markup=False, soft_wrap=True)
    return path


def resolve_thresholds(
    predictor: Predictor,
    *,
    threshold: float | None = None,
    thresholds_file: str | os.PathLike[str] | None = None,
    console=None,
) -> np.ndarray:
    """The threshold of each class, by the precedence of the module docstring."""
    if threshold is not None and not (isinstance(threshold, int | float) and 0 < threshold <= 1):
        raise UserError(f"--threshold must be in (0, 1], got {threshold!r}")
    base = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    per_class: dict[str, float] = {}
    if thresholds_file is not None:
        per_class = read_thresholds_file(thresholds_file, predictor.class_names)
    elif threshold is None and predictor.thresholds_file.is_file():
        per_class = stored_thresholds(predictor.source, predictor.model_sha256, predictor.class_names)
        if console is not None:
            console.print(
                f"using the per-class thresholds stored in {predictor.thresholds_file}", markup=False
            )
    elif threshold is None and predictor.meta.get("thresholds"):
        # An exported `.keras` model: the thresholds its metadata file carries from the checkpoint.
        per_class = {str(name): float(value) for name, value in predictor.meta["thresholds"].items()}
        unknown = sorted(set(per_class) - set(predictor.class_names))
        if unknown:
            raise UserError(
                f"model {predictor.source}: its metadata has thresholds for unknown classes {unknown}"
            )
        if console is not None:
            console.print(
                f"using the per-class thresholds in the metadata of {predictor.source}", markup=False
            )
    return np.array([per_class.get(name, base) for name in predictor.class_names], dtype=np.float64)
