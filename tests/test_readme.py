"""The README is a contract: its Python blocks and its data commands run as written, so a README that
no longer tells the truth fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bigearthnet_tf.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _commands(prefixes: tuple[str, ...]) -> list[list[str]]:
    """The `bigearthnet ...` lines of the shell blocks that start with one of `prefixes` (comments cut)."""
    found = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(prefixes) and "$" not in line:
                found.append(shlex.split(line)[1:])
    return found


@pytest.fixture
def demo_checkpoint(tmp_path, monkeypatch):
    """A checkpoint where the README's snippet loads one (`bigearthnet demo --out demo` writes it)."""
    import keras

    from bigearthnet_tf import checkpoints
    from bigearthnet_tf.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("K-BranchCNN-Tiny", 19)
    base = tmp_path / "demo" / "run" / "models" / "best"
    checkpoints.save_checkpoint(
        base, model, model_name="K-BranchCNN-Tiny", label_type="BigEarthNet-19", modality="S2", iteration=1
    )
    monkeypatch.chdir(tmp_path)
    return base


def test_the_python_blocks_run_as_written(demo_checkpoint):
    blocks = _blocks("python")
    assert blocks, "the README has Python blocks"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    probabilities = namespace["probabilities"]
    assert probabilities.shape == (1, 19) and ((0 < probabilities) & (probabilities < 1)).all()


@pytest.mark.slow
def test_the_data_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """`synth`, `examples`, `models` and `config keys` as the README gives them."""
    monkeypatch.chdir(tmp_path)
    commands = _commands(
        ("bigearthnet synth", "bigearthnet examples", "bigearthnet models", "bigearthnet config keys")
    )
    commands = [argv for argv in commands if "--parameters" not in argv]  # builds every model: slow
    assert {argv[0] for argv in commands} >= {"synth", "examples", "models", "config"}
    for argv in commands:
        main(argv)
    assert (tmp_path / "synth" / "train.csv").is_file() and (
        tmp_path / "synth2" / "metadata.parquet"
    ).is_file()
    assert "ResNet50" in capsys.readouterr().out
