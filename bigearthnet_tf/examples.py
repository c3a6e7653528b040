"""The six real BigEarthNet v1 patches that `bigearthnet-common` ships, extracted to a folder.

The package holds them as two tar.bz2 resources (Sentinel-2 and the matching Sentinel-1 patches).
They are read with `importlib.resources` only: importing the package's modules would pull in
pydantic, fastcore and typer for nothing.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bigearthnet_tf.errors import UserError

__all__ = ["ExamplePaths", "example_archive", "default_cache_dir", "EXAMPLE_PACKAGE"]

EXAMPLE_PACKAGE = "bigearthnet_common"
# Resource name -> the folder it unpacks to (each tarball holds exactly one top-level folder).
_S2_TARBALL = "BigEarthNet-S2-Example.tar.bz2"
_S1_TARBALL = "BigEarthNet-S1-Example.tar.bz2"
S2_FOLDER = "BigEarthNet-S2-Example"
S1_FOLDER = "BigEarthNet-S1-Example"
_CACHE_VARIABLE = "BIGEARTHNET_TF_CACHE"


@dataclass(frozen=True)
class ExamplePaths:
    """Folders holding the six example patch folders: `s2` (v1 Sentinel-2) and `s1` (v1 Sentinel-1)."""

    s2: Path
    s1: Path


def default_cache_dir() -> Path:
    """$BIGEARTHNET_TF_CACHE, else $XDG_CACHE_HOME/bigearthnet-tf, else ~/.cache/bigearthnet-tf."""
    if os.environ.get(_CACHE_VARIABLE):
        return Path(os.environ[_CACHE_VARIABLE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bigearthnet-tf"


def example_archive(out: Path | None = None) -> ExamplePaths:
    """Extract the example patches into `out` (default: the user cache) once, and return their folders."""
    out = Path(out) if out is not None else default_cache_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the example folder {out}: {error.strerror}") from None
    for tarball, folder in ((_S2_TARBALL, S2_FOLDER), (_S1_TARBALL, S1_FOLDER)):
        _extract_once(tarball, out / folder)
    return ExamplePaths(s2=out / S2_FOLDER, s1=out / S1_FOLDER)


def _extract_once(tarball: str, target: Path) -> None:
    # The folder appears by one rename of a completely extracted copy, so its existence means it
    # is complete, and a run killed half-way leaves only a hidden temporary folder behind.
    if target.is_dir():
        return
    resource = importlib.resources.files(EXAMPLE_PACKAGE) / tarball
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with resource.open("rb") as stream, tarfile.open(fileobj=stream, mode="r:bz2") as archive:
            # The 'data' filter refuses absolute names, '..', links leaving the folder and devices.
            archive.extractall(staging, filter="data")
        extracted = staging / target.name
        if not extracted.is_dir():
            raise UserError(f"{tarball} of {EXAMPLE_PACKAGE} does not hold the folder {target.name}")
        try:
            extracted.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
