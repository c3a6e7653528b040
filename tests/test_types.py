"""The type checker passes over the package (configuration in pyproject.toml: strict for the modules it
names, the not-yet-clean modules listed there). Part of the suite, so `.ci/run` type-checks every submission."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 12 s of one core; the full run (.ci/run) has it
def test_mypy_passes_over_the_package():
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir=/dev/null"],  # no cache left in the clone
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout
