"""Helpers shared by the test files: the command line in this process, seeded patches with a learnable
signal, and record files. (A plain module beside the tests: conftest.py holds fixtures, and pytest
advises against importing it.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bigearthnet_tf.archive import Patch
from bigearthnet_tf.cli import main
from bigearthnet_tf.constants import ORIGINAL_LABELS, S2_BANDS, original_to_19
from bigearthnet_tf.record_formats import DEFAULT
from bigearthnet_tf.records import RecordWriter

# 43-class indices the learnable patches draw from; brightness depends on them so there is signal.
CLASSES_USED = (11, 17, 22, 23, 39)


def cli(*args: object) -> None:
    """`bigearthnet ARGS...` in this process (paths and numbers given as they are)."""
    main([str(arg) for arg in args])


def cli_error(capsys, *args: object) -> tuple[int, str]:
    """Run a command that must fail: its exit code and what it printed to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(*args)
    return stop.value.code, capsys.readouterr().err


def write_json(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values, indent=2))
    return path


def make_patches(count: int, seed: int, with_s1: bool = False) -> list[Patch]:
    """Seeded S2 patches (and S1 twins) whose brightness follows their labels, so a model can learn."""
    rng = np.random.default_rng(seed)
    patches = []
    for index in range(count):
        present = sorted(rng.choice(CLASSES_USED, size=rng.integers(1, 3), replace=False))
        labels_43 = tuple(ORIGINAL_LABELS[i] for i in present)
        shift = sum(CLASSES_USED.index(i) + 1 for i in present) / 4.0
        bands = {
            band.name: np.clip(
                rng.normal(band.mean + shift * band.std, band.std / 4, (band.size,) * 2), 0, 60000
            ).astype(np.uint16)
            for band in S2_BANDS
        }
        s1_bands = None
        if with_s1:  # VV around -12 dB and VH around -19 dB, both brighter with the same classes
            s1_bands = {
                name: rng.normal(level + shift, 2.0, (120, 120)).astype(np.float32)
                for name, level in (("VV", -12.6), ("VH", -19.3))
            }
        patches.append(
            Patch(
                f"S2A_TEST_{seed}_{index}",
                bands,
                labels_43,
                original_to_19(labels_43),
                s1_name=f"S1A_TEST_{seed}_{index}" if with_s1 else None,
                s1_bands=s1_bands,
            )
        )
    return patches


def write_records(path: Path, patches: list[Patch], encode=DEFAULT.encode) -> Path:
    """A record file of `patches` (our default format unless `encode` says otherwise)."""
    with RecordWriter(path) as writer:
        for patch in patches:
            writer.write(encode(patch))
    return path
