"""What every registered model must do, as one helper a plug-in author can call on their own model
(in the spirit of keras-hub's `run_backbone_test`):

    from bigearthnet_tf.models.conformance import check_model
    check_model("MyNet")                      # every modality it builds for
    check_model("MyNet", modalities=("S2",))  # these, each required

For each modality the model builds for: it takes the raw-band inputs of `preprocessing.INPUTS` it
declares, returns float32 logits of shape (batch, num_classes), finite on real-valued raw bands; it
saves as a `.keras` file that loads back in safe mode (no code from the file runs) and gives the same
logits; it runs under the mixed-precision policy training uses on the CPU (finite logits, float32 or
half precision: training casts them);
and, with `xla=True`, its forward pass compiles with XLA (what Keras does by default on a GPU). A
failure raises `ConformanceError` naming the model, modality and check.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bigearthnet_tf.errors import ConfigError
from bigearthnet_tf.layout import MODALITIES

BATCH = 2
TOLERANCE = 1e-5


class ConformanceError(AssertionError):
    """A model that breaks one of the rules every model of the registry follows."""


def raw_bands(keys: Sequence[str], batch: int = BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible raw band values for each input key: reflectances around 1,000-3,000, S1 in dB."""
    from bigearthnet_tf.models.preprocessing import INPUTS

    rng = np.random.default_rng(seed)
    values = {}
    for key in keys:
        side, bands = INPUTS[key].size, INPUTS[key].bands
        if key == "bands_s1":
            values[key] = rng.normal(-15.0, 4.0, (batch, side, side, len(bands))).astype(np.float32)
        else:
            values[key] = rng.uniform(200.0, 4000.0, (batch, side, side, len(bands))).astype(np.float32)
    return values


def check_model(
    name: str,
    modalities: Sequence[str] | None = None,
    num_classes: int = 19,
    *,
    mixed_precision: bool = True,
    xla: bool = False,
    save_first_modality_only: bool = False,
    **options,
) -> tuple[str, ...]:
    """Run the checks on registered model `name`; return the modalities it passed for.

    `save_first_modality_only`: the `.keras` round trip and the mixed-precision build for the first
    modality only (the others differ in their input layers alone); for big networks, where each takes
    seconds."""
    import keras

    from bigearthnet_tf.models import build_model, input_keys

    asked = tuple(modalities) if modalities is not None else MODALITIES
    passed = []
    for modality in asked:
        where = f"model {name!r} ({modality})"
        try:
            model = build_model(name, num_classes, modality, **options)
        except ConfigError:
            if modalities is not None:
                raise
            continue  # a modality the model does not claim (e.g. weights that read S2 only)
        inputs = raw_bands(input_keys(model))
        logits = _logits(model, inputs, where)
        if not (save_first_modality_only and passed):
            _check_keras_round_trip(model, inputs, logits, where)
            if mixed_precision:
                _check_mixed_precision(name, num_classes, modality, inputs, where, options)
        if xla:
            _check_xla(model, inputs, logits, where)
        passed.append(modality)
        keras.backend.clear_session()
    if not passed:
        raise ConformanceError(f"model {name!r} builds for none of {', '.join(asked)}")
    return tuple(passed)


def _logits(model, inputs, where: str, dtypes: tuple[str, ...] = ("float32",)) -> np.ndarray:
    import keras

    output = model(inputs, training=False)
    dtype = keras.backend.standardize_dtype(output.dtype)
    if dtype not in dtypes:
        raise ConformanceError(f"{where}: logits are {dtype}, expected {' or '.join(dtypes)}")
    logits = keras.ops.convert_to_numpy(keras.ops.cast(output, "float32"))
    expected = (BATCH, model.output.shape[-1])
    if logits.shape != expected:
        raise ConformanceError(f"{where}: logits of shape {logits.shape}, expected {expected}")
    if not np.isfinite(logits).all():
        raise ConformanceError(f"{where}: logits are not finite on plausible raw bands")
    return logits


def _check_keras_round_trip(model, inputs, logits, where: str) -> None:
    import keras

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        try:
            loaded = keras.models.load_model(path, safe_mode=True)
        except Exception as error:  # what Keras raises for an unloadable file varies
            raise ConformanceError(f"{where}: its .keras file does not load in safe mode: {error}") from None
    again = keras.ops.convert_to_numpy(loaded(inputs, training=False))
    if not np.allclose(again, logits, rtol=0, atol=TOLERANCE):
        raise ConformanceError(f"{where}: the loaded .keras file gives other logits")


def _check_mixed_precision(name, num_classes, modality, inputs, where: str, options) -> None:
    import keras

    from bigearthnet_tf.models import build_model

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # what training uses on the CPU
    try:
        model = build_model(name, num_classes, modality, **options)
        # Training casts the logits to float32 before the loss; a half-precision head is allowed.
        _logits(model, inputs, f"{where} under mixed_bfloat16", ("float32", "bfloat16", "float16"))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _check_xla(model, inputs, logits, where: str) -> None:
    import tensorflow as tf

    compiled = tf.function(lambda batch: model(batch, training=False), jit_compile=True)
    try:
        again = compiled({key: tf.constant(value) for key, value in inputs.items()}).numpy()
    except tf.errors.OpError as error:
        raise ConformanceError(f"{where}: does not compile with XLA: {error.message.splitlines()[0]}") from None
    if not np.allclose(again, logits, rtol=1e-4, atol=1e-3):
        raise ConformanceError(f"{where}: XLA gives other logits")
