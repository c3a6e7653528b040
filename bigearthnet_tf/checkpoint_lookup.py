"""Where checkpoints are and whether they are complete, without Keras: names, files, lookup, verification.

A checkpoint is a base name (`out_dir/models/iteration-600`) whose files add extensions to it; its
metadata file is written last and lists the size and SHA-256 of the others, so a checkpoint is
complete only when they match (`is_complete`). `resolve_checkpoint` is what `model_file`, `--model`
and `export --model` accept. Saving and loading models is `checkpoints.py`, which builds on this.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.jsonfiles import read_json_object
from bigearthnet_tf.model_meta import ModelMeta

FORMAT = "bigearthnet-tf-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".weights.h5"  # Keras requires this ending for save_weights / load_weights
STATE_SUFFIX = ".state.npz"
METADATA_SUFFIX = ".json"
KERAS_SUFFIX = ".keras"
TF1_INDEX_SUFFIX = ".index"  # what a 2019 tf.train.Saver checkpoint has beside its .data and .meta
MODELS_DIR = "models"
ITERATION_PREFIX = "iteration-"
BEST_NAME = "best"
LISTED_CHECKPOINTS = 8  # names listed when a checkpoint is not found
_ITERATION_PATTERN = re.compile(r"iteration-(\d+)$")
_HASH_CHUNK = 1 << 20
_FILE_SUFFIXES = {"weights": WEIGHTS_SUFFIX, "state": STATE_SUFFIX}


def models_dir(out_dir: str | os.PathLike[str]) -> Path:
    """`out_dir/models`, where training writes its checkpoints."""
    return Path(out_dir) / MODELS_DIR


def checkpoint_base(directory: str | os.PathLike[str], iteration: int) -> Path:
    """The base name `directory/iteration-<N>`."""
    return Path(directory) / f"{ITERATION_PREFIX}{iteration}"


def iteration_of(base: str | os.PathLike[str]) -> int | None:
    """N when the base name ends in `iteration-<N>` (the 2019 rule for resuming), else None."""
    match = _ITERATION_PATTERN.search(Path(base).name)
    return int(match.group(1)) if match else None


def checkpoint_files(base: str | os.PathLike[str]) -> dict[str, Path]:
    """Role -> path of the files of a checkpoint base name."""
    base = Path(base)
    return {
        "weights": base.with_name(base.name + WEIGHTS_SUFFIX),
        "state": base.with_name(base.name + STATE_SUFFIX),
        "metadata": base.with_name(base.name + METADATA_SUFFIX),
    }


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint base name (or `.keras` file) that `path` means; what `model_file`, `predict
    --model` and `export --model` accept.

    Accepted: a base name (`out/models/iteration-600`, `out/models/best`, a 2019 TF1 base), any file of
    a checkpoint (`iteration-600.json`, `.weights.h5`, `.state.npz`), an exported `.keras` file, or a
    training `out_dir` or its `models` folder (then `best` when complete, else the newest complete
    `iteration-<N>`). Anything else is a UserError that lists the checkpoints that do exist there.
    """
    path = Path(path)
    if path.suffix == KERAS_SUFFIX:
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        return path
    if path.is_dir():
        folder = models_dir(path) if models_dir(path).is_dir() else path
        best = folder / BEST_NAME
        if is_complete(best):
            return best
        latest = latest_complete_checkpoint(folder)
        if latest is None:
            raise UserError(
                f"{path} holds no complete checkpoint (best or iteration-<N>){checkpoint_listing(folder)}"
            )
        return latest
    for suffix in (WEIGHTS_SUFFIX, STATE_SUFFIX, METADATA_SUFFIX, TF1_INDEX_SUFFIX):
        if path.name.endswith(suffix):
            path = path.with_name(path.name[: -len(suffix)])
            break
    files = checkpoint_files(path)
    if files["metadata"].exists() or path.with_name(path.name + TF1_INDEX_SUFFIX).exists():
        return path
    raise UserError(
        f"no checkpoint {path}: {files['metadata'].name} not found{checkpoint_listing(path.parent)}"
    )


def checkpoint_listing(folder: Path) -> str:
    """`; checkpoints in <folder>: best, iteration-3, ...` (or that there are none), for messages."""
    if not folder.is_dir():
        return f"; {folder} does not exist"
    names = sorted(
        path.name[: -len(METADATA_SUFFIX)]
        for path in folder.glob(f"*{METADATA_SUFFIX}")
        if not path.name.startswith(".") and checkpoint_files(path.with_suffix(""))["weights"].exists()
    )
    names += sorted(path.name for path in folder.glob(f"*{KERAS_SUFFIX}"))
    if not names:
        return f"; {folder} holds no checkpoints"
    shown = ", ".join(names[:LISTED_CHECKPOINTS]) + (", ..." if len(names) > LISTED_CHECKPOINTS else "")
    return f"; checkpoints in {folder}: {shown}"


def read_metadata(base: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """The metadata file of a complete checkpoint, as JSON; a missing, foreign or damaged one raises
    UserError (its meaning is checked by `ModelMeta.from_checkpoint`).

    With `verify`, the size and SHA-256 of each listed file must match.
    """
    return read_checkpoint(Path(base), verify)[0]


def read_checkpoint(base: Path, verify: bool) -> tuple[dict[str, Any], ModelMeta]:
    path = checkpoint_files(base)["metadata"]
    if not path.is_file():
        if base.with_name(base.name + TF1_INDEX_SUFFIX).is_file():
            raise UserError(
                f"checkpoint {base} is a 2019 TensorFlow 1 checkpoint ({base.name}{TF1_INDEX_SUFFIX}); "
                f"convert it once: bigearthnet import tf1 {base} --model NAME --label-type TYPE "
                "--out NEW_BASE"
            )
        raise UserError(
            f"checkpoint {base}: {path.name} not found (the checkpoint does not exist or was not "
            "completely written)"
        )
    metadata = read_json_object(path, f"checkpoint {base}: metadata file")
    if metadata.get("format") != FORMAT:
        raise UserError(f"checkpoint {base}: {path.name} is not bigearthnet-tf checkpoint metadata")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {base}: format version {metadata.get('format_version')!r}; this version of "
            f"bigearthnet-tf reads {FORMAT_VERSION}"
        )
    _check_files_entry(base, metadata)
    meta = ModelMeta.from_checkpoint(f"checkpoint {base}", metadata)
    if verify:
        located = checkpoint_files(base)
        for role, described in metadata["files"].items():
            problem = _check_file(located[role], described)
            if problem:
                raise UserError(
                    f"checkpoint {base}: {role} file {problem}; the checkpoint is incomplete or damaged"
                )
    return metadata, meta


def _check_files_entry(base: Path, metadata: Mapping[str, Any]) -> None:
    """Refuse a `files` entry of the wrong shape with one line.

    Files are always found by the base name plus the role's suffix (the recorded name is informational),
    so metadata can never point the loader elsewhere, and a checkpoint renamed as a whole still loads.
    """
    files = metadata.get("files")
    if not isinstance(files, dict):
        raise UserError(f"checkpoint {base}: metadata key 'files' is missing or malformed")
    if "weights" not in files:
        raise UserError(f"checkpoint {base}: metadata key 'files.weights' is missing or malformed")
    for role, described in files.items():
        if (
            role not in _FILE_SUFFIXES
            or not isinstance(described, dict)
            or not isinstance(described.get("bytes"), int)
            or not isinstance(described.get("sha256"), str)
        ):
            raise UserError(f"checkpoint {base}: metadata key 'files.{role}' is missing or malformed")


def is_complete(base: str | os.PathLike[str]) -> bool:
    """True when the checkpoint has its metadata and every file matches its size and checksum."""
    try:
        read_metadata(base, verify=True)
    except UserError:
        return False
    return True


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(iteration, base) of every `iteration-<N>` base name with a metadata file, by iteration."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob(f"{ITERATION_PREFIX}*{METADATA_SUFFIX}"):
        base = path.with_name(path.name[: -len(METADATA_SUFFIX)])
        iteration = iteration_of(base)
        if iteration is not None:
            found.append((iteration, base))
    return sorted(found)


def latest_complete_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The `iteration-<N>` base name with the highest N that is complete (verified); None if none is.

    A half-written checkpoint (no metadata, or files whose size or checksum differ) is skipped.
    """
    for _, base in reversed(list_checkpoints(directory)):
        if is_complete(base):
            return base
    return None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _check_file(path: Path, described: Mapping[str, Any]) -> str | None:
    """None when `path` matches its description, else what is wrong."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != described.get("bytes"):
        return f"{path.name} has {size} bytes, expected {described.get('bytes')}"
    if file_sha256(path) != described.get("sha256"):
        return f"{path.name} does not match its SHA-256"
    return None
