"""`export_model(...)`: a checkpoint as a self-describing model for serving and sharing.

Every format holds the same network: it takes the raw band values at native resolution (the input dict
of `models`: `bands_10m` (120,120,4), `bands_20m` (60,60,6), `bands_60m` (20,20,2), `bands_s1`
(120,120,2), float32, channels last, batch first, only the keys the model reads) and returns
**probabilities** (the model's logits through a sigmoid), shape (batch, classes). Band selection,
upsampling and standardisation with the training statistics are inside, so a consumer needs no code
of ours, only the band order and the class names, which travel with the model:

- `saved_model` (a folder): signature `serving_default` (also `serve`) with named inputs `bands_10m`,
  ... and output `probabilities`; signature `metadata` (no inputs) returns `metadata_json` (the metadata
  JSON, scalar string), `class_names` and `input_keys` (string vectors); the same JSON is the file
  `assets.extra/bigearthnet_metadata.json`, readable without TensorFlow.
- `onnx` (`.onnx`): inputs `bands_10m`, ... with the free batch dimension `batch`, output
  `probabilities`; `metadata_props` hold `bigearthnet_metadata` (the metadata JSON) and, for quick
  reading, `class_names`, `band_order`, `input_keys` (JSON), `model_name`, `label_type`, `modality`,
  `outputs`.
- `keras` (`.keras`): the checkpoint's model wrapped, same inputs, last layer `probabilities` (a
  sigmoid), with the metadata JSON inside the file (zip entry `bigearthnet_tf/metadata.json`), so the
  model and its metadata are one file.

The metadata JSON (`EXPORT_FORMAT`, version 1) holds: `outputs` ("probabilities"), `output_name`,
`model_name`, `label_type`, `modality`, `num_classes`, `class_names` (in output order), `input_keys`,
`inputs` (key -> shape with `null` batch, dtype, bands), `band_order` (key -> band names in channel
order), `input_values` (what the raw values are), `statistics` (band -> [mean, std] the model applies),
`thresholds` (class -> threshold stored with the checkpoint, or null) and `default_threshold`,
`source` (checkpoint name, iteration, weights SHA-256), `versions`, `created`.

Loading, with no code of ours:

    tf.saved_model.load(path).signatures["serving_default"](bands_10m=..., ...)["probabilities"]
    onnxruntime.InferenceSession(path).run(["probabilities"], {"bands_10m": ..., ...})

The `.keras` file holds our custom layers (band standardisation, bicubic upsampling), registered
serialisable in `bigearthnet_tf.models`: import that module first, then
`keras.saving.load_model(path, safe_mode=True)`.

ONNX export converts the TensorFlow graph with `tf2onnx` (through Keras' `model.export(format="onnx")`);
install it with `pip install "bigearthnet-tf[export]"`. Outputs are written atomically and an
existing one is replaced only with `overwrite`.
"""

from __future__ import annotations

import datetime
import errno
import functools
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigearthnet_tf.checkpoints import (
    KERAS_METADATA_ENTRY,
    PROBABILITIES_LAYER,
    keras_metadata_path,
    library_versions,
)
from bigearthnet_tf.constants import DEFAULT_THRESHOLD
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import (
    check_free_space,
    new_temporary_folder,
    publish_folder,
    remove_stale_temporaries,
    replace_atomically,
)
from bigearthnet_tf.locks import output_lock
from bigearthnet_tf.predictor import Predictor, load_predictor
from bigearthnet_tf.thresholds import stored_thresholds

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "METADATA_ASSET",
    "ExportResult",
    "export_model",
    "export_metadata",
    "probability_model",
]

EXPORT_FORMAT = "bigearthnet-tf-export"
EXPORT_FORMAT_VERSION = 1
FORMATS = ("saved_model", "onnx", "keras")
SUFFIXES = {"onnx": ".onnx", "keras": ".keras"}
METADATA_ASSET = "assets.extra/bigearthnet_metadata.json"  # TF Serving's folder for extra files
METADATA_ENDPOINT = "metadata"
SERVING_ENDPOINT = "serve"
ONNX_METADATA_KEY = "bigearthnet_metadata"
ONNX_BATCH_DIMENSION = "batch"
INPUT_VALUES = (
    "raw band values at native resolution, as stored in the BigEarthNet GeoTIFFs, as float32: "
    "Sentinel-2 L2A digital numbers (reflectance x 10000), Sentinel-1 VV/VH backscatter in dB"
)


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it says about itself."""

    path: Path
    format: str
    metadata: dict[str, Any]
    metadata_file: Path | None  # the assets.extra file (saved_model); None: inside the file (onnx, keras)


def export_model(
    model: str | os.PathLike[str] | Predictor,
    format: str,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> ExportResult:
    """Export a checkpoint (or `.keras` file) as `format` to `out`; see the module docstring.

    Raises:
        UserError: unknown format, wrong extension, an existing `out` without `overwrite`, a missing
            ONNX converter, or a model that cannot be loaded.
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    expected_suffix = SUFFIXES.get(format)
    if expected_suffix and out.suffix != expected_suffix:
        raise UserError(f"--out {out}: a {format} export is one file ending in {expected_suffix}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if format == "saved_model" and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; a SavedModel is a folder")
    if format != "saved_model" and out.is_dir():
        raise UserError(f"--out {out} is a folder; a {format} export is one file")
    if format == "onnx":
        _check_onnx_converter()
    out.parent.mkdir(parents=True, exist_ok=True)

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    metadata = export_metadata(predictor)
    wrapped = probability_model(predictor)
    with output_lock(out.parent, f"export-{out.name}", f"export {out}"):
        remove_stale_temporaries(out.parent, out.name)  # what a killed export of this output left
        weight_bytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in wrapped.weights)
        check_free_space(out.parent, 2 * weight_bytes + (1 << 20), out)
        try:
            if format == "saved_model":
                metadata_file = _export_saved_model(wrapped, metadata, out)
            elif format == "onnx":
                _export_onnx(wrapped, metadata, out)
                metadata_file = None
            else:
                _export_keras(wrapped, metadata, out)
                metadata_file = None
        except Exception as error:
            # Writers deep inside Keras and TensorFlow lose the file name; the one line names it.
            full = "No space left on device" in str(error)
            if (
                isinstance(error, OSError)
                and error.filename is None
                or full
                and not isinstance(error, OSError)
            ):
                raise OSError(
                    errno.ENOSPC if full else error.errno, _first_line(error), os.fspath(out)
                ) from None
            raise
    return ExportResult(out, format, metadata, metadata_file)


def _first_line(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error).strip()
    if "No space left on device" in text:
        return "No space left on device"
    return text.splitlines()[0] if text else type(error).__name__


def probability_model(predictor: Predictor):
    """The model with a sigmoid layer named `probabilities` after its logits."""
    import keras

    model = predictor.model
    inputs = {
        tensor.name: keras.Input(shape=tuple(tensor.shape[1:]), dtype="float32", name=tensor.name)
        for tensor in model.inputs
    }
    probabilities = keras.layers.Activation("sigmoid", dtype="float32", name=PROBABILITIES_LAYER)(
        model(inputs)
    )
    name = f"{predictor.meta.model_name or model.name}-probabilities"
    return keras.Model(inputs, probabilities, name=_keras_name(name))


def export_metadata(predictor: Predictor) -> dict[str, Any]:
    """The metadata every export carries (module docstring)."""

    meta = predictor.meta
    thresholds = stored_thresholds(predictor.source, predictor.model_sha256, predictor.class_names)
    inputs = {}
    for tensor in predictor.model.inputs:
        key = tensor.name
        inputs[key] = {
            "shape": [None, *(int(size) for size in tensor.shape[1:])],
            "dtype": "float32",
            "bands": list(predictor.band_order[key]),
        }
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "outputs": "probabilities",
        "output_name": PROBABILITIES_LAYER,
        "model_name": meta.model_name,
        "label_type": meta.label_type,
        "modality": meta.modality,
        "num_classes": len(predictor.class_names),
        "class_names": list(predictor.class_names),
        "input_keys": list(predictor.input_keys),
        "inputs": inputs,
        "band_order": {key: list(bands) for key, bands in predictor.band_order.items()},
        "input_values": INPUT_VALUES,
        "statistics": _statistics(predictor),
        "thresholds": thresholds,
        "default_threshold": DEFAULT_THRESHOLD,
        "source": {
            "model": predictor.source.name,
            "iteration": meta.iteration,
            "weights_sha256": meta.weights_sha256 or predictor.model_sha256,
        },
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def _export_saved_model(wrapped, metadata: dict[str, Any], out: Path) -> Path:
    import keras
    import tensorflow as tf

    text = json.dumps(metadata, indent=2, allow_nan=False)
    archive = keras.export.ExportArchive()
    archive.track(wrapped)
    specs = {
        tensor.name: tf.TensorSpec((None, *tensor.shape[1:]), tf.float32, name=tensor.name)
        for tensor in wrapped.inputs
    }

    def serve(inputs):
        return {PROBABILITIES_LAYER: wrapped(inputs, training=False)}

    # The first endpoint also becomes `serving_default`.
    archive.add_endpoint(SERVING_ENDPOINT, serve, input_signature=[specs])

    @tf.function(input_signature=[])
    def metadata_fn():
        return {
            "metadata_json": tf.constant(text),
            "class_names": tf.constant(metadata["class_names"]),
            "input_keys": tf.constant(metadata["input_keys"]),
        }

    archive.add_endpoint(METADATA_ENDPOINT, metadata_fn)
    temporary = new_temporary_folder(out)
    try:
        archive.write_out(str(temporary), verbose=False)
        asset = temporary / METADATA_ASSET
        asset.parent.mkdir(parents=True, exist_ok=True)
        asset.write_text(text + "\n", encoding="utf-8")
        _make_tree_readable(temporary)
        publish_folder(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out / METADATA_ASSET


def _check_onnx_converter() -> None:
    try:
        import onnx  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"ONNX export needs the packages tf2onnx and onnx ({error}); "
            'install them with: pip install "bigearthnet-tf[export]"'
        ) from None


def _export_onnx(wrapped, metadata: dict[str, Any], out: Path) -> None:
    import onnx
    import tensorflow as tf

    _register_erfc_conversion()

    def write(temporary: str) -> None:
        specs = [
            {
                tensor.name: tf.TensorSpec((None, *tensor.shape[1:]), tf.float32, name=tensor.name)
                for tensor in wrapped.inputs
            }
        ]
        with warnings.catch_warnings():
            # Keras' numpy-2 patch of tf2onnx probes `np.object`, which warns on numpy 2.
            warnings.simplefilter("ignore", FutureWarning)
            wrapped.export(temporary, format="onnx", verbose=False, input_signature=specs)
        graph_model = onnx.load(temporary)
        _name_onnx_output(graph_model, PROBABILITIES_LAYER)
        _name_onnx_batch_dimension(graph_model)
        properties = {
            ONNX_METADATA_KEY: json.dumps(metadata, allow_nan=False),
            "class_names": json.dumps(metadata["class_names"]),
            "band_order": json.dumps(metadata["band_order"]),
            "input_keys": json.dumps(metadata["input_keys"]),
            "model_name": str(metadata["model_name"]),
            "label_type": str(metadata["label_type"]),
            "modality": str(metadata["modality"]),
            "outputs": metadata["outputs"],
        }
        del graph_model.metadata_props[:]
        for key, value in properties.items():
            graph_model.metadata_props.add(key=key, value=value)
        graph_model.doc_string = (
            f"{metadata['model_name']} ({metadata['label_type']}, {metadata['modality']}): raw bands in, "
            f"class probabilities out; class names and band order in metadata_props[{ONNX_METADATA_KEY!r}]"
        )
        onnx.checker.check_model(graph_model)
        onnx.save(graph_model, temporary)

    replace_atomically(out, write, suffix=".onnx")


@functools.cache
def _register_erfc_conversion() -> None:
    """Teach tf2onnx TensorFlow's `Erfc` (in the exact GELU of the ViT models) as `1 - Erf(x)`.

    ONNX has `Erf` (opset 9) but no `Erfc`, and tf2onnx 1.17 converts no `Erfc`.
    """
    import numpy as np
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class _Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
            node.type = "Erf"
            ctx.insert_new_node_on_output("Sub", node.output[0], inputs=[one.output[0], node.output[0]])


def _name_onnx_output(graph_model, name: str) -> None:
    """Rename the single graph output (tf2onnx calls it `Identity:0` or so) to `name`."""
    graph = graph_model.graph
    if len(graph.output) != 1:
        raise AssertionError(f"expected one ONNX output, got {[o.name for o in graph.output]}")
    old = graph.output[0].name
    if old == name:
        return
    for node in graph.node:
        for index, value in enumerate(node.output):
            if value == old:
                node.output[index] = name
        for index, value in enumerate(node.input):
            if value == old:
                node.input[index] = name
    graph.output[0].name = name


def _name_onnx_batch_dimension(graph_model) -> None:
    """Call the free first dimension of every input and output `batch` (tf2onnx writes `unk__12`)."""
    for value in (*graph_model.graph.input, *graph_model.graph.output):
        dimension = value.type.tensor_type.shape.dim[0]
        if not dimension.HasField("dim_value"):
            dimension.dim_param = ONNX_BATCH_DIMENSION


def _export_keras(wrapped, metadata: dict[str, Any], out: Path) -> None:
    """The model and its metadata in one `.keras` file (a zip: Keras ignores our entry), written under
    a temporary name and renamed into place, so a kill leaves the old file or the new one."""
    import zipfile

    def write(temporary: str) -> None:
        wrapped.save(temporary)
        with zipfile.ZipFile(temporary, "a") as archive:
            archive.writestr(KERAS_METADATA_ENTRY, json.dumps(metadata, indent=2, allow_nan=False) + "\n")

    replace_atomically(out, write, suffix=".keras")
    # A 0.1-style sidecar beside the file described the model just replaced: it goes.
    keras_metadata_path(out).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _statistics(predictor: Predictor) -> dict[str, list[float]]:
    from bigearthnet_tf.models import model_statistics

    return {band: [float(v) for v in value] for band, value in model_statistics(predictor.model).items()}


def _keras_name(name: str) -> str:
    """A Keras model name: letters, digits, `_`, `-` and `.` only."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def _make_tree_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the tree the permissions of a plain mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, directories, _ in os.walk(folder):
        for directory in directories:
            os.chmod(os.path.join(root, directory), 0o777 & ~umask)
