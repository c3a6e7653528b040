"""`bigearthnet import reben`: reBEN's pretrained BigEarthNet v2.0 models (timm, PyTorch) as our checkpoints.

reBEN publishes its models on the Hugging Face hub under `BIFOLD-BigEarthNetv2-0/<timm name>-<s1|s2|all>-
<v0.1.1|v0.2.0>` (MIT licence). Each is a folder with `config.json` (ConfigILM: `timm_model_name`,
`channels`, `classes`, `image_size`, ...) and `model.safetensors` (keys `model.vision_encoder.<timm key>`).
The weights version decides the channel order and is known only from the repository name, so a folder
whose name does not carry it needs `version`.

SOURCE may be such a folder, a folder of the hub cache (`models--BIFOLD-BigEarthNetv2-0--<name>`, or one
of its `snapshots/<revision>`), or `hf://BIFOLD-BigEarthNetv2-0/<name>`, which is downloaded through
`huggingface_hub` (the `hub` extra) only because the user named it.

The import builds the registered reBEN model of the weights' family (`models.reben`) with the
architecture read from the tensors' shapes, fills every weight by its timm name, reorders the head's
rows from reBEN's alphabetical class order to ours, and writes a normal checkpoint (label type
BigEarthNet-19) whose metadata carries the architecture and band order (`model_options`), reBEN's
statistics, and the source (repository, timm name, version, licence, SHA-256 of both files). Anything
that does not fit (not a reBEN folder, an unknown architecture, a channel count that contradicts the
name or the weights, a missing, extra or mis-shaped tensor, a truncated file) is one line naming the
file and the problem, and nothing is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from bigearthnet_tf import checkpoints
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, PATCH_SIZE
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.jsonfiles import read_json_object
from bigearthnet_tf.layout import Modality
from bigearthnet_tf.tensor_files import FLOAT_DTYPES, SafetensorsFile

HUB_ORGANISATION = "BIFOLD-BigEarthNetv2-0"
LICENCE = "MIT"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KEY_PREFIX = "model.vision_encoder."
HF_SCHEME = "hf://"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # the hub's repository ids
CONFIG_MAX_BYTES = 1 << 20
LABEL_TYPE = "BigEarthNet-19"
REPORT_LIMIT = 6  # tensor names listed per problem kind

# `<timm name>-<s1|s2|all>-<version>`: the hub's repository names (and our fixtures', prefixed `tiny-`).
_REPOSITORY_NAME = re.compile(r"^(?P<timm>.+)-(?P<modality>s1|s2|all)-(?P<version>v\d+\.\d+\.\d+)$")
_HUB_CACHE_FOLDER = re.compile(r"^models--(?P<organisation>[^/]+?)--(?P<name>[^/]+)$")


@dataclass(frozen=True)
class ImportedReBEN:
    """What `import_reben` wrote and from what."""

    base: Path
    repository: str
    timm_model_name: str
    version: str
    modality: Modality


def import_reben(
    source: str | os.PathLike[str],
    out_base: str | os.PathLike[str],
    *,
    version: str | None = None,
    overwrite: bool = False,
) -> ImportedReBEN:
    """Import the reBEN model at `source` (folder, hub cache folder or `hf://ORG/NAME`) as checkpoint
    `out_base`; an existing checkpoint is replaced only with `overwrite`."""
    with checkpoints.new_checkpoint(out_base, overwrite):
        return _import_reben(source, Path(out_base), version)


def _import_reben(source: str | os.PathLike[str], out_base: Path, version: str | None) -> ImportedReBEN:
    from bigearthnet_tf.models import build_model, timm_nets
    from bigearthnet_tf.models.reben import (
        NETWORK_LAYER,
        REBEN_BAND_ORDERS,
        REBEN_MODALITY_TOKENS,
        REBEN_MODELS,
        REBEN_STATISTICS,
        REBEN_VERSIONS,
    )

    folder, repository = locate(source)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(
            f"{folder} is not a reBEN model folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"(missing: {', '.join(f.name for f in (config_file, weights_file) if not f.is_file())})"
        )
    config = read_json_object(config_file, "reBEN model config", UserError, max_bytes=CONFIG_MAX_BYTES)
    timm_name = config.get("timm_model_name")
    if not isinstance(timm_name, str) or not timm_name:
        raise UserError(f"{config_file}: no timm_model_name; not a reBEN (ConfigILM) model config")
    for key, expected in (("classes", len(BIGEARTHNET_19_LABELS)), ("image_size", PATCH_SIZE)):
        if config.get(key, expected) != expected:
            raise UserError(f"{config_file}: {key} is {config[key]!r}; reBEN models have {expected}")
    try:
        family = timm_nets.family_of(timm_name)
    except timm_nets.ArchitectureError as error:
        raise UserError(f"{config_file}: {error}") from None

    name_parts = _REPOSITORY_NAME.match(repository.rsplit("/", 1)[-1])
    if name_parts and not name_parts["timm"].endswith(timm_name):
        raise UserError(
            f"{config_file}: timm_model_name {timm_name!r} contradicts the repository name {repository!r}"
        )
    named_version = name_parts["version"] if name_parts else None
    if version is not None and named_version is not None and version != named_version:
        raise UserError(f"--version {version} contradicts the repository name {repository!r}")
    version = version or named_version
    if version is None:
        raise UserError(
            f"{folder}: the weights version (it decides the band order) is known only from the repository "
            f"name <timm name>-<s1|s2|all>-<version>; pass --version ({' or '.join(REBEN_VERSIONS)})"
        )
    if version not in REBEN_VERSIONS:
        raise UserError(
            f"{repository}: unknown reBEN version {version!r}; known: {', '.join(REBEN_VERSIONS)}"
        )

    channels = config.get("channels")
    modalities = {len(orders): modality for modality, orders in REBEN_BAND_ORDERS[version].items()}
    if isinstance(channels, bool) or channels not in modalities:
        accepted = ", ".join(map(str, sorted(modalities)))
        raise UserError(f"{config_file}: channels {channels!r}; reBEN models take {accepted}")
    modality = modalities[channels]
    if name_parts and REBEN_MODALITY_TOKENS[name_parts["modality"]] != modality:
        named = len(REBEN_BAND_ORDERS[version][REBEN_MODALITY_TOKENS[name_parts["modality"]]])
        raise UserError(
            f"{config_file}: channels {channels} contradict the repository name {repository!r} "
            f"({name_parts['modality']}: {named} channels)"
        )

    stored, tensors, foreign = _read_weights(weights_file)
    with stored:  # every shape is checked against the architecture before a tensor is read
        shapes = {key: stored.tensors[name].shape for key, name in tensors.items()}
        try:
            architecture = timm_nets.architecture_from_tensors(family, shapes, PATCH_SIZE)
        except timm_nets.ArchitectureError as error:
            raise UserError(f"{weights_file}: not a {timm_name} state dict: {error}") from None
        model_name = next(name for name, kind in REBEN_MODELS.items() if kind == family)
        model = build_model(
            model_name,
            len(BIGEARTHNET_19_LABELS),
            modality,
            REBEN_STATISTICS,
            architecture=timm_nets.architecture_to_dict(architecture),
            band_order=version,
        )
        network = model.get_layer(NETWORK_LAYER)
        targets = timm_nets.timm_tensor_names(network)
        _fill(targets, stored, tensors, foreign, weights_file, timm_nets.HEAD_LAYERS[family], channels)

    source_meta = {
        "kind": "reben",
        "repository": repository,
        "timm_model_name": timm_name,
        "version": version,
        "licence": LICENCE,
        "folder": str(folder),
        "files": {path.name: checkpoints.file_sha256(path) for path in (config_file, weights_file)},
    }
    checkpoints.save_checkpoint(
        out_base,
        model,
        model_name=model_name,
        label_type=LABEL_TYPE,
        modality=modality,
        iteration=0,
        source=source_meta,
    )
    return ImportedReBEN(out_base, repository, timm_name, version, modality)


def locate(source: str | os.PathLike[str]) -> tuple[Path, str]:
    """The folder holding the model files, and the repository name (`ORG/NAME`, or the folder's name)."""
    text = os.fspath(source)
    if text.startswith(HF_SCHEME):
        repository = text[len(HF_SCHEME) :]
        if not _HUB_ID.fullmatch(repository) or ".." in repository:
            raise UserError(f"{text} is not a model id: hf://ORGANISATION/NAME (letters, digits, - _ .)")
        return _download(repository), repository
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"reBEN model {path} does not exist (a folder, a hub cache folder, or hf://ORG/NAME)")
    if not path.is_dir():
        raise UserError(
            f"reBEN model {path} is a file; give the folder holding {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    cached = _HUB_CACHE_FOLDER.match(path.name)
    if cached:  # the cache folder itself: its main revision, or its only one
        return _cached_snapshot(path), f"{cached['organisation']}/{cached['name']}"
    cached = _HUB_CACHE_FOLDER.match(path.parent.parent.name) if path.parent.name == "snapshots" else None
    if cached:
        return path, f"{cached['organisation']}/{cached['name']}"
    return path, path.resolve().name


def _cached_snapshot(cache_folder: Path) -> Path:
    snapshots = cache_folder / "snapshots"
    main = cache_folder / "refs" / "main"
    if main.is_file():
        revision = main.read_text(encoding="utf-8").strip()
        if (snapshots / revision).is_dir():
            return snapshots / revision
    found = sorted(snapshots.iterdir()) if snapshots.is_dir() else []
    if len(found) != 1:
        raise UserError(
            f"hub cache folder {cache_folder}: expected one snapshot (or refs/main), found {len(found)}"
        )
    return found[0]


def _download(repository: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"{HF_SCHEME}{repository} needs the huggingface_hub package (pip install 'bigearthnet-tf[hub]'); "
            "or download the model folder and pass its path"
        ) from None
    try:
        return Path(snapshot_download(repository, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as error:  # the hub client raises many kinds: offline, not found, refused
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{HF_SCHEME}{repository}: download failed: {first_line}") from None


def _read_weights(weights_file: Path) -> tuple[SafetensorsFile, dict[str, str], list[str]]:
    """The weights file (header checked, nothing read yet), timm key -> stored key for the tensors
    under the reBEN prefix, and the keys that are not under it."""
    from bigearthnet_tf.models.timm_nets import SKIPPED_TENSORS

    stored = SafetensorsFile(weights_file)
    tensors, foreign = {}, []
    for key in stored.tensors:
        if not key.startswith(KEY_PREFIX):
            foreign.append(key)
        elif not SKIPPED_TENSORS.search(key):
            tensors[key[len(KEY_PREFIX) :]] = key
    return stored, tensors, foreign


def _fill(
    targets, stored: SafetensorsFile, tensors, foreign, weights_file: Path, head: str, channels: int
) -> None:
    """Assign every tensor to its Keras weight, the head's rows in our class order; or refuse with a
    report of the missing, extra and mis-shaped tensors, having assigned nothing. Shapes and dtypes
    are compared from the header first; only then are the tensors read (float32, finite)."""
    from bigearthnet_tf.models.timm_nets import keras_shape, keras_value

    alphabetical = sorted(BIGEARTHNET_19_LABELS)
    ours_in_theirs = [alphabetical.index(name) for name in BIGEARTHNET_19_LABELS]
    mismatched = []
    for key, (variable, layout) in targets.items():
        if key not in tensors:
            continue
        entry = stored.tensors[tensors[key]]
        if entry.dtype not in FLOAT_DTYPES:
            mismatched.append(f"{key} is {entry.dtype}")
        elif tuple(keras_shape(entry.shape, layout)) != tuple(variable.shape):
            mismatched.append(f"{key} {entry.shape}")
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets)) + [f"{key} (not under {KEY_PREFIX})" for key in foreign]
    if missing or extra or mismatched:
        problems = [
            f"{label} {_truncated(items)}"
            for label, items in (("missing:", missing), ("unexpected:", extra), ("wrong shape:", mismatched))
            if items
        ]
        hint = f" (the network takes {channels} input channels)" if mismatched else ""
        raise UserError(f"{weights_file}: the weights do not fit the network{hint}; " + "; ".join(problems))
    values = {}
    for key, (_, layout) in targets.items():
        tensor = stored.array(tensors[key])
        if key in (f"{head}.weight", f"{head}.bias") and tensor.shape[:1] == (len(alphabetical),):
            tensor = tensor[ours_in_theirs]
        values[key] = keras_value(tensor, layout)
    for key, (variable, _) in targets.items():
        variable.assign(values[key])


def _truncated(items: list[str]) -> str:
    shown = ", ".join(items[:REPORT_LIMIT])
    return f"{shown}, ... and {len(items) - REPORT_LIMIT} more" if len(items) > REPORT_LIMIT else shown
