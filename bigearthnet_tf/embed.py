"""`bigearthnet embed`: a model's pooled backbone features for patches, for training other heads,
clustering or similarity search.

Any model of ours works: the features are the input of its classifier (`backbones.feature_model`: the
last Dense layer, in the model itself or in the timm network nested in it, as in reBEN and SSL4EO),
so for a ResNet they are the 2048 globally pooled channels, for a ViT the class token after the final
norm. Patches come as for `predict` (folders, an archive folder or file, S1 twins for S1 models), or
from prepared TFRecord files (`records`: files, globs or folders, with patch names, read in order).

Output, chosen by the suffix of `--out`:
- `.npy`: a float32 array (patches, features), and beside it `<name>.names.txt`, one patch name per
  line in the array's row order (written first: an array never lacks its names);
- `.parquet`: columns `patch_name` and `features` (a list of float32 per patch).
Both are written atomically; an existing output is replaced only with `--overwrite`.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import replace_atomically, write_text_atomically

SUFFIXES = (".npy", ".parquet")
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class Embeddings:
    names: list[str]
    features: np.ndarray  # (patches, features) float32
    seconds: float  # reading and the model, not loading it

    @property
    def per_second(self) -> float:
        return len(self.names) / self.seconds if self.seconds > 0 else float("inf")


def embed(
    model: str | os.PathLike[str],
    patch_folders: Sequence[str | os.PathLike[str]] = (),
    *,
    archive: str | os.PathLike[str] | None = None,
    records: Sequence[str | os.PathLike[str]] = (),
    s1_root: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    console=None,
) -> Embeddings:
    """The pooled features of `model` for patch folders, the patches of `archive` or the TFRecord files
    `records`; written to `out`."""
    from bigearthnet_tf.backbones import feature_model
    from bigearthnet_tf.console import status_console
    from bigearthnet_tf.inference import logits_over_patches
    from bigearthnet_tf.patch_source import (
        PatchReader,
        check_archive_root,
        check_patch_folders,
        default_read_threads,
        patch_locations,
    )
    from bigearthnet_tf.predictor import load_predictor

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if sum((bool(patch_folders), archive is not None, bool(records))) != 1:
        raise UserError("give one of: patch folders, --archive ROOT, --records FILE...")
    out_path = _check_out(out, overwrite)
    if archive is not None:
        check_archive_root(archive)
    elif patch_folders:
        check_patch_folders(patch_folders)
    console = console or status_console(True)
    predictor = load_predictor(model, allow_backbone=True)
    features_of = feature_model(predictor.model)
    started = time.perf_counter()
    if records:
        names, features = _over_records(features_of, records, predictor.meta.modality, batch_size)
    else:
        locations = patch_locations(patch_folders, archive, None, False, None, s1_root, predictor.needs_s1)
        reader = PatchReader(predictor.band_order, archive_mode=archive is not None)
        names, features, _ = logits_over_patches(
            features_of, reader, locations, batch_size=batch_size, workers=workers or default_read_threads()
        )
    seconds = time.perf_counter() - started
    if not names:
        raise UserError(f"no patches in {archive}" if archive is not None else "no patches could be read")
    result = Embeddings(names, features.astype(np.float32), seconds)
    if out_path is not None:
        _write(result, out_path)
        console.print(
            f"{len(names):,} embeddings of {features.shape[1]} features ({result.per_second:,.0f} patches/s): "
            f"{out_path}",
            markup=False,
            soft_wrap=True,
        )
    return result


def _over_records(features_of, records, modality, batch_size: int) -> tuple[list[str], np.ndarray]:
    from bigearthnet_tf.inference import collect_predictions
    from bigearthnet_tf.input_pipeline import make_dataset

    dataset = make_dataset(list(records), None, batch_size, modality=modality, with_names=True)
    collected = collect_predictions(features_of, dataset)
    return collected.names or [], collected.logits


def _check_out(out, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.suffix not in SUFFIXES:
        raise UserError(f"--out {path}: expected a {' or '.join(SUFFIXES)} file")
    targets = [path, names_path(path)] if path.suffix == ".npy" else [path]
    existing = [str(target) for target in targets if target.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it")
    return path


def names_path(npy_path: Path) -> Path:
    return npy_path.with_name(npy_path.stem + ".names.txt")


def _write(result: Embeddings, path: Path) -> None:
    if path.suffix == ".npy":
        write_text_atomically(names_path(path), "".join(f"{name}\n" for name in result.names))
        replace_atomically(path, lambda temporary: np.save(temporary, result.features), suffix=".npy")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "patch_name": result.names,
            "features": pa.FixedSizeListArray.from_arrays(
                pa.array(result.features.reshape(-1), pa.float32()), result.features.shape[1]
            ),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    replace_atomically(path, lambda temporary: Path(temporary).write_bytes(buffer.getvalue()))
