"""Model names -> builders, and the one explicit route by which users add their own models.

Built-in models register themselves with `@register_model(NAME)` when `bigearthnet_tf.models` is
imported. User models come in through two routes that a *user or administrator* sets up, never a
config file:

1. Entry points in the group `bigearthnet_tf.models` of an installed distribution, e.g. in its
   `pyproject.toml`::

       [project.entry-points."bigearthnet_tf.models"]
       MyNet = "my_package.nets:build_my_net"

   The entry point's name is the model name; its object is loaded only when that model is built.
   An entry point may also name a module that defines a 2019-style `dnn_model`.

2. The environment variable `BIGEARTHNET_TF_MODEL_PLUGINS`: a list of `.py` files or importable module
   names separated by `os.pathsep` (":" on Linux), or `load_model_plugin(path_or_module)` in code. A
   plugin either decorates builders with `@register_model(NAME)`, or (the 2019 habit) defines
   `dnn_model(nb_class)`; it is then registered under the file's stem / module's last name, or under
   its `MODEL_NAME` attribute when it has one.

A builder is called as `builder(num_classes, modality=..., statistics=...)` when its signature takes
`modality` (or `**kwargs`), otherwise as `builder(num_classes)`. It returns a Keras model (or layer).
Keyword options that change what the trained network computes (`NETWORK_OPTIONS`, e.g. the
`upsampling` kernel) are resolved against the builder's defaults and kept on the model as
`model.model_options`; checkpoints record them and rebuild the model with them.
When that model reads our raw-band input dict (its inputs are named `bands_10m`, ...), it is used as is;
otherwise it is treated as a single-image network and wrapped: the raw bands of the modality are
selected, upsampled and standardised into one 120x120 image (S2: B04, B03, B02, B08, B05, B06, B07,
B8A, B11, B12, as the 2019 `img`) which is fed to it. Its output must be logits of shape
(batch, num_classes).

Safety (issue 5): `model_name` in a config is only ever a key into this registry. It never reaches
`importlib`; the only code imported is what the environment variable or installed entry points name.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType

import keras

from bigearthnet_tf.errors import ConfigError, UserError
from bigearthnet_tf.layout import Modality, parse_modality
from bigearthnet_tf.model_catalogue import BUILTIN_MODELS, BUILTIN_ORIGIN, ENTRY_POINT_GROUP, PLUGIN_ENV
from bigearthnet_tf.models.preprocessing import (
    INPUTS,
    Statistics,
    raw_inputs,
    resolve_statistics,
    stacked_image,
    stacked_input_keys,
)
from bigearthnet_tf.models.tf1_naming import TF1Naming

LEGACY_BUILDER_NAME = "dnn_model"  # what the 2019 train.py called in each models/<name>.py

ModelBuilder = Callable[..., keras.layers.Layer]

# Builder options that define the network a checkpoint's weights belong to (regularisation such as
# `dropout` does not): their resolved values travel in checkpoint metadata.
NETWORK_OPTIONS: tuple[str, ...] = ("upsampling", "architecture", "band_order", "image_size")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, where it came from, and how to build it."""

    name: str
    origin: str  # "bigearthnet_tf", "plugin <file or module>", "entry point <name> = <value>"
    builder: ModelBuilder | None = None  # None until an entry point is loaded
    entry_point: importlib.metadata.EntryPoint | None = None
    description: str = ""
    tf1: TF1Naming | None = None  # how its weights were named in 2019, for models with TF1 checkpoints


_registry: dict[str, ModelSpec] = {}
_loaded_plugins: dict[str, tuple[str, ...]] = {}  # plugin key -> names it registered
_origins: list[str] = []  # origin of registrations happening now (a plugin being imported)
_entry_points_scanned = False


def register_model(
    name: str, *, description: str = "", tf1: TF1Naming | None = None
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering `builder(num_classes, modality="S2", statistics=None)` under `name`;
    `tf1`: how the 2019 code named its weights, when 2019 checkpoints of it exist. A built-in's
    description is its `model_catalogue` entry's."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        origin = _origins[-1] if _origins else BUILTIN_ORIGIN
        text = description or (BUILTIN_MODELS.get(name, "") if origin == BUILTIN_ORIGIN else "")
        _add(ModelSpec(name=name, origin=origin, builder=builder, description=text, tf1=tf1))
        return builder

    return decorator


def model_names() -> tuple[str, ...]:
    """Every registered model name: built-ins in definition order, then plug-ins."""
    _discover()
    return tuple(_registry)


def get_model_spec(name: str) -> ModelSpec:
    """The registered model `name`; an unknown name raises ConfigError listing the known ones."""
    _discover()
    if not isinstance(name, str) or name not in _registry:
        close = difflib.get_close_matches(str(name), _registry, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown model_name {name!r}{hint}; known models: {', '.join(_registry)} (a model of your own: "
            f"name its .py file in ${PLUGIN_ENV})"
        )
    return _registry[name]


def build_model(
    name: str,
    num_classes: int,
    modality: Modality | str = Modality.S2,
    statistics: Statistics | None = None,
    **options: float,
) -> keras.Model:
    """Build the registered model `name` with a fresh initialisation; it outputs logits (batch, num_classes).

    `modality` is "S2", "S1" or "MM"; `statistics` maps band names to (mean, std) and overrides the
    BigEarthNet v1 / 2021 S1 defaults for the bands it names (e.g. statistics computed on v2).
    `options` (e.g. `dropout`, `drop_path_rate`) go to builders that take them; None means the
    builder's default, and an option the builder does not take is a ConfigError.
    """
    spec = get_model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    modality = parse_modality(modality)  # where the caller's string enters: an enum from here on
    resolved = resolve_statistics(statistics)
    builder = _load_builder(spec)
    parameters = _parameters(builder)
    options = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(options) - set(parameters or {}))
    if unknown and not _takes_var_keywords(builder):
        raise ConfigError(
            f"model {name!r} takes no option {', '.join(unknown)} (set it only for models that do)"
        )
    if parameters is not None and ("modality" in parameters or _takes_var_keywords(builder)):
        keywords = {"modality": modality, **options}
        if "statistics" in parameters or _takes_var_keywords(builder):
            keywords["statistics"] = resolved
        result = builder(num_classes, **keywords)
    else:
        result = builder(num_classes)  # the 2019 dnn_model(nb_class) habit
    model = _raw_band_model(result, spec, num_classes, modality, resolved)
    model.model_options = MappingProxyType(
        {
            key: options[key] if key in options else parameters[key].default
            for key in NETWORK_OPTIONS
            if key in (parameters or {})
            and (key in options or parameters[key].default is not inspect.Parameter.empty)
        }
    )
    return model


def model_option_names(name: str) -> frozenset[str]:
    """The keyword options the builder of model `name` takes (its entry point is loaded if needed)."""
    return frozenset(_parameters(_load_builder(get_model_spec(name))) or ())


def load_model_plugin(source: str | os.PathLike) -> tuple[str, ...]:
    """Import a model plug-in (a `.py` file or an importable module name); return the names it added.

    Loading the same plug-in again is a no-op that returns the same names.
    """
    text = os.fspath(source)
    is_file = isinstance(source, os.PathLike) or text.endswith(".py") or os.sep in text
    key = str(Path(text).expanduser().resolve()) if is_file else text
    if key in _loaded_plugins:
        return _loaded_plugins[key]
    origin = f"plugin {key}"
    if origin in _origins:  # the plug-in asked the registry for names while being imported
        return ()
    before = set(_registry)
    _origins.append(origin)
    try:
        module = _import_file(Path(text).expanduser(), key) if is_file else _import_module(text)
        added = tuple(name for name in _registry if name not in before)
        if not added:
            added = (_register_legacy_module(module, origin, text),)
    except BaseException:
        for name in set(_registry) - before:  # leave no half-registered plug-in behind
            del _registry[name]
        raise
    finally:
        _origins.pop()
    _loaded_plugins[key] = added
    return added


def refresh_model_plugins() -> None:
    """Scan entry points again and load any new entries of $BIGEARTHNET_TF_MODEL_PLUGINS."""
    global _entry_points_scanned
    _entry_points_scanned = False
    _discover()


def _add(spec: ModelSpec) -> None:
    if not isinstance(spec.name, str) or not spec.name.strip() or "/" in spec.name:
        raise UserError(f"{spec.origin}: invalid model name {spec.name!r} (a non-empty string without '/')")
    existing = _registry.get(spec.name)
    if existing is not None and existing.origin == spec.origin:
        if existing.builder is None:  # an entry point's module registering its own builder on load
            _registry[spec.name] = dataclasses.replace(spec, entry_point=existing.entry_point)
        if existing.builder in (None, spec.builder):
            return
    if existing is not None:
        raise UserError(f"{spec.origin}: model name {spec.name!r} is already registered by {existing.origin}")
    _registry[spec.name] = spec


def _discover() -> None:
    """Load plug-ins named in the environment (each once) and note installed entry points."""
    global _entry_points_scanned
    for entry in os.environ.get(PLUGIN_ENV, "").split(os.pathsep):
        if entry.strip():
            load_model_plugin(entry.strip())
    if _entry_points_scanned:
        return
    _entry_points_scanned = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point {entry_point.name} = {entry_point.value}"
        existing = _registry.get(entry_point.name)
        if existing is not None and existing.origin == origin:
            continue
        _add(ModelSpec(name=entry_point.name, origin=origin, entry_point=entry_point))


def _load_builder(spec: ModelSpec) -> ModelBuilder:
    if spec.builder is not None:
        return spec.builder
    _origins.append(spec.origin)  # registrations made while importing belong to the entry point
    try:
        target = spec.entry_point.load()
    except Exception as error:
        raise UserError(f"{spec.origin}: cannot load it: {type(error).__name__}: {error}") from error
    finally:
        _origins.pop()
    if isinstance(target, ModuleType):
        target = getattr(target, LEGACY_BUILDER_NAME, None)
    if not callable(target):
        raise UserError(f"{spec.origin}: does not name a callable model builder")
    _registry[spec.name] = dataclasses.replace(spec, builder=target)
    return target


def _import_file(path: Path, key: str) -> ModuleType:
    if not path.is_file():
        raise UserError(f"model plugin {path}: no such file")
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"bigearthnet_tf_model_plugin_{stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"model plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so dataclasses and pickling inside the plug-in work
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise UserError(f"model plugin {path}: import failed: {type(error).__name__}: {error}") from error
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise UserError(f"model plugin {name}: import failed: {type(error).__name__}: {error}") from error


def _register_legacy_module(module: ModuleType, origin: str, source: str) -> str:
    builder = getattr(module, LEGACY_BUILDER_NAME, None)
    if not callable(builder):
        raise UserError(
            f"model plugin {source}: registers no model; define {LEGACY_BUILDER_NAME}(nb_class) "
            "or decorate a builder with @register_model(NAME)"
        )
    default_name = Path(source).stem if source.endswith(".py") else source.rsplit(".", 1)[-1]
    name = getattr(module, "MODEL_NAME", None) or default_name
    _add(ModelSpec(name=name, origin=origin, builder=builder))
    return name


def _parameters(builder: Callable) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(builder).parameters)
    except (TypeError, ValueError):  # some C callables have no signature
        return None


def _takes_var_keywords(builder: Callable) -> bool:
    parameters = _parameters(builder) or {}
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _reads_raw_bands(model: keras.layers.Layer) -> bool:
    try:
        names = [tensor.name for tensor in model.inputs]
    except (AttributeError, ValueError):  # a Sequential without an Input has no inputs yet
        return False
    return bool(names) and all(name in INPUTS for name in names)


def _raw_band_model(
    result: object, spec: ModelSpec, num_classes: int, modality: Modality, statistics: Statistics
) -> keras.Model:
    """`result` as a model taking the raw-band dict; single-image networks get the preprocessing layers."""
    if not isinstance(result, keras.layers.Layer):
        raise UserError(
            f"model {spec.name!r} ({spec.origin}): the builder returned {type(result).__name__}, "
            "expected a keras.Model"
        )
    if isinstance(result, keras.Model) and _reads_raw_bands(result):
        model = result
    else:
        inputs = raw_inputs(stacked_input_keys(modality))
        image = stacked_image(inputs, modality, statistics)
        try:
            logits = result(image)
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UserError(
                f"model {spec.name!r} ({spec.origin}) does not accept the {modality} input image of "
                f"shape {tuple(image.shape)}: {type(error).__name__}: {first_line}"
            ) from error
        model = keras.Model(inputs, logits, name=spec.name)
    shapes = [tuple(output.shape) for output in model.outputs]
    if shapes != [(None, num_classes)]:
        raise UserError(
            f"model {spec.name!r} ({spec.origin}) outputs shape {shapes}; expected one output of "
            f"shape (batch, {num_classes}) holding logits"
        )
    return model
