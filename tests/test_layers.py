"""The floors of the house (docs/ARCHITECTURE.md): what each module may import.

Each check imports modules in a fresh interpreter and looks at what got loaded, so it sees imports at
any depth, not only the ones written in the module itself.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bigearthnet_tf"

HEAVY = ("tensorflow", "keras", "matplotlib", "jax", "torch")

# Commands: modules that a command-line verb calls. None imports another (pieces two commands
# share live a floor below); `demo` and `trial` run commands in sequence, which is their purpose.
COMMANDS = (
    "prepare",
    "train",
    "evaluate",
    "predict",
    "export",
    "stats",
    "inspect_data",
    "quicklook",
    "tf1_import",
    "reben_import",
    "torchgeo_import",
    "mapping",
    "embed",
)
RUN_COMMANDS = {"demo": {"prepare", "train", "evaluate"}, "trial": {"train", "evaluate"}}


def _loaded_after_import(modules: list[str]) -> list[str]:
    code = (
        "import json, sys\n"
        f"for name in {modules!r}: __import__('bigearthnet_tf.' + name)\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_preparation_and_layout_never_load_tensorflow():
    assert _loaded_after_import(list(WITHOUT_TENSORFLOW)) == []


def test_commands_that_need_no_tensorflow_do_not_load_it(tmp_path):
    """--help, --version, config keys/show, models (no --parameters), examples, synth and inspect of an
    archive answer without TensorFlow, hence in well under a second (it takes seconds to import)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "model_name": "ResNet50", "label_type": "BigEarthNet-19", "batch_size": 8, "nb_epoch": 1,
        "learning_rate": 1e-3, "out_dir": str(tmp_path / "out"), "tr_tf_record_files": str(config),
        "save_checkpoint_per_iteration": 10, "save_checkpoint_after_iteration": 0,
    }))  # fmt: skip
    commands = [
        ["--help"], ["--version"], ["config", "keys"], ["config", "show", str(config)], ["models"],
        ["models", "--json", "ResNet50", "SSL4EO-ResNet"], ["examples", "--out", str(tmp_path / "ex")],
        ["synth", "--out", str(tmp_path / "archive"), "--patches", "4"],
        ["inspect", str(tmp_path / "archive" / "BigEarthNet-v1.0")],
    ]  # fmt: skip
    code = (
        "import json, sys\n"
        "from bigearthnet_tf.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert not stop.code, (argv, stop.code)\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.slow  # also run by the full suite; the fast tier keeps a quicker test of the same module
def test_the_check_sees_tensorflow_when_it_is_loaded():
    assert "tensorflow" in _loaded_after_import(["input_pipeline"])


# The floors of docs/ARCHITECTURE.md ("The house"): a module imports only from its floor and below.
FLOORS = {
    1: (
        "constants",
        "errors",
        "layout",
        "files",
        "jsonfiles",
        "locks",
        "console",
        "quiet",
        "model_catalogue",
        "job_folder",
    ),
    2: (
        "tiff",
        "archive",
        "examples",
        "synth",
        "records",
        "record_formats",
        "tarstream",
        "archive_file",
        "prepare_request",
        "prepare_stream",
        "prepare_splits",
        "prepare_job",
        "prepare_workers",
        "patch_source",
        "tensor_files",
        "scenes",
        "synth_scene",
    ),
    3: ("models",),
    4: (
        "model_meta",
        "stats",
        "thresholds",
        "metrics",
        "checkpoint_lookup",
        "checkpoints",
        "config",
        "input_pipeline",
        "batch_reader",
        "inference",
        "predictor",
        "report",
        "backbones",
    ),
    5: (*(command for command in COMMANDS if command != "stats"),),
    6: ("cli", *RUN_COMMANDS),
}
FLOOR_OF = {module: floor for floor, modules in FLOORS.items() for module in modules}

# The layout of the data and data preparation (floors 1 and 2): worker processes import these and
# must start in milliseconds, and `prepare` forks workers only while TensorFlow is not loaded. The
# meaning of a model, thresholds, metrics, the config, `prepare` and the command line stay numpy-only
# too, so that the command line starts fast.
WITHOUT_TENSORFLOW = (
    *FLOORS[1],
    *FLOORS[2],
    "model_meta",
    "thresholds",
    "metrics",
    "checkpoint_lookup",
    "config",
    "prepare",
    "cli",
)


def test_every_module_has_a_floor():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(FLOOR_OF) - {"models"}
    assert (PACKAGE / "models" / "__init__.py").is_file()


@pytest.mark.parametrize("module", sorted(set(FLOOR_OF) - {"models"}))
def test_no_module_imports_from_a_floor_above_its_own(module):
    above = {found for found in _package_imports(module) if FLOOR_OF[found] > FLOOR_OF[module]}
    assert above == set()


def test_models_import_only_from_the_floors_below():
    for path in (PACKAGE / "models").glob("*.py"):
        found = _package_imports(f"models/{path.stem}") - {"models"}
        assert {module for module in found if FLOOR_OF[module] > FLOOR_OF["models"]} == set(), path


def test_no_import_circle():
    """No module reaches itself through package imports, counting those inside functions and those
    for type annotations only (a circle held open by `TYPE_CHECKING` is a circle a reader walks)."""
    graph = {
        module: _package_imports(module, annotations=True) - {module} for module in set(FLOOR_OF) - {"models"}
    }
    graph["models"] = set().union(
        *(
            _package_imports(f"models/{path.stem}", annotations=True)
            for path in (PACKAGE / "models").glob("*.py")
        )
    ) - {"models"}
    circles = []

    def walk(module: str, path: list[str]) -> None:
        for found in sorted(graph[module]):
            if found == path[0]:
                circles.append(" -> ".join([*path, found]))
            elif found not in path and found > path[0]:  # each circle once, from its least module
                walk(found, [*path, found])

    for module in sorted(graph):
        walk(module, [module])
    assert circles == []


def _package_imports(module: str, annotations: bool = False) -> set[str]:
    """The package modules that `module` imports anywhere in its code (also inside functions), but
    not for type annotations only (`if TYPE_CHECKING:`) unless `annotations`."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    annotations_only = (
        set()
        if annotations
        else {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
    )
    found = set()
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bigearthnet_tf."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "bigearthnet_tf":
            found.update(alias.name for alias in node.names if alias.name != "__version__")
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.split(".")[1] for alias in node.names if alias.name.startswith("bigearthnet_tf.")
            )
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_imports_another(command):
    assert _package_imports(command) & set(COMMANDS) - {command} == set()


@pytest.mark.parametrize(("runner", "runs"), sorted(RUN_COMMANDS.items()))
def test_runners_import_only_the_commands_they_run(runner, runs):
    assert _package_imports(runner) & set(COMMANDS) == runs


def test_the_config_resolves_model_file_without_the_model_loader():
    """`model_file` is resolved by `checkpoint_lookup` (no Keras); `checkpoints` builds and loads models."""
    assert "checkpoints" not in _package_imports("config")
    assert "checkpoint_lookup" in _package_imports("config")
