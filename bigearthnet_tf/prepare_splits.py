"""Which patches each split holds: split lists (read here) or the official splits (each archive
version's own, `Archive.official_splits`), checked. Every split rule lives in this module.

A patch named by two lists, snow/cloud exclusions, listed patches absent from the archive and splits
left empty are decided here, before anything is written; with `skip_bad` what is left out is
returned as `SkippedPatch` rows for `skipped.csv`.
"""

from __future__ import annotations

import bz2
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bigearthnet_tf.archive import Archive, BadPatchError, check_patch_name
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import read_input_file

MAX_SPLIT_FILE_BYTES = 256 << 20  # the official v1 train list is about 9 MB
# The validation split is `val` in v1 file names and `validation` in the v2 parquet.
SPLIT_ALIASES: Mapping[str, str] = {"val": "validation", "validation": "val"}


@dataclass(frozen=True)
class SkippedPatch:
    """A patch left out with `skip_bad`: which one, which file, what is wrong."""

    split: str
    patch: str
    file: str
    reason: str


def _missing_folders(archive: Archive, splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per split, the names without a patch folder, in order. The archive is asked once for all
    splits: for the v1 official lists that is one listing of its folder, not one per split."""
    missing = set(archive.missing_patches([name for names in splits.values() for name in names]))
    return {split: [name for name in names if name in missing] for split, names in splits.items()}


def _without_contradictions(
    splits: dict[str, list[str]], sources: Mapping[str, str], skip_bad: bool
) -> tuple[dict[str, list[str]], list[SkippedPatch]]:
    """The splits without the patches that several lists (or one list twice) name: which split a
    patch belongs to would be a silent choice. BadPatchError naming both places, or with `skip_bad`
    every occurrence left out and reported."""
    places: dict[str, list[str]] = {}
    for split, names in splits.items():
        for name in names:
            places.setdefault(name, []).append(split)
    repeated = {name: found for name, found in places.items() if len(found) > 1}
    if not repeated:
        return splits, []
    if not skip_bad:
        name, (first, second, *_) = next(iter(repeated.items()))
        raise BadPatchError(
            name, sources[second], f"listed in split {first} ({sources[first]}) and again in split {second}"
        )
    kept = {split: [name for name in names if name not in repeated] for split, names in splits.items()}
    skipped = [
        SkippedPatch(split, name, sources[split], f"listed in several splits: {', '.join(found)}")
        for name, found in repeated.items()
        for split in dict.fromkeys(found)
    ]
    return kept, skipped


def resolve_splits(
    archive: Archive,
    split_files: Sequence[str | os.PathLike] | None,
    official_splits: bool,
    exclude_snow_cloud: bool,
    include_snow_cloud: bool,
    skip_bad: bool,
    say: Callable[[str], None],
    missing_of: Callable[[dict[str, list[str]]], dict[str, list[str]]] | None = None,
) -> tuple[dict[str, list[str]], list[SkippedPatch]]:
    """Split name -> patch names in list order, and the listed patches that have no folder (skip_bad).

    `missing_of(splits)` gives per split the names that are not in the archive (default: those
    without a folder; for an archive file, those its stream did not hold)."""
    missing_of = missing_of or (lambda splits: _missing_folders(archive, splits))
    if include_snow_cloud and not (archive.snow_cloud_optional and official_splits):
        raise UserError(
            "--include-snow-cloud applies to the official v2 splits only (the v1 lists and user CSVs "
            "are taken as given; use --exclude-snow-cloud to drop flagged patches from CSVs)"
        )
    if official_splits and split_files:
        raise UserError("give either split files or the official splits, not both")
    if official_splits:
        if exclude_snow_cloud:
            raise UserError(
                "--exclude-snow-cloud applies to split CSVs; the official splits already leave out snow/cloud"
            )
        splits = archive.official_splits(include_snow_cloud=include_snow_cloud)
        listed = sum(len(names) for names in splits.values())
        missing = {name for names in missing_of(splits).values() for name in names}
        if len(missing) == listed:
            raise UserError(
                f"none of the {listed:,} patches of the official v{archive.version} splits is in "
                f"{archive.s2_dir}; is this the right archive root?"
            )
        if missing:
            # A partial archive (the example patches, a download in progress) is a normal use of the
            # official lists, so their absent patches are not errors: report the count and go on.
            splits = {split: [n for n in names if n not in missing] for split, names in splits.items()}
            say(
                f"official v{archive.version} splits: {listed - len(missing):,} of {listed:,} listed patches "
                f"are in {archive.s2_dir}; using those"
            )
        splits, skipped = _without_contradictions(
            splits, dict.fromkeys(splits, archive.official_source), skip_bad
        )
        return _without_empty_splits(splits, say), skipped

    if not split_files:
        raise UserError("no split files given; pass CSV files (-n train.csv val.csv test.csv) or --official")
    splits: dict[str, list[str]] = {}
    sources: dict[str, Path] = {}
    for split_file in split_files:
        path = Path(split_file)
        split = split_name(path)
        for other in (split, SPLIT_ALIASES.get(split)):
            if other in sources:
                raise UserError(f"{path} and {sources[other]} both name split {split!r}")
        sources[split] = path
        splits[split] = read_split_csv(path)
    splits, skipped = _without_contradictions(
        splits, {split: str(path) for split, path in sources.items()}, skip_bad
    )
    if exclude_snow_cloud:
        flagged = archive.snow_cloud()
        for split, names in splits.items():
            kept = [name for name in names if name not in flagged]
            if len(kept) != len(names):
                say(f"{split}: left out {len(names) - len(kept):,} snow/cloud/shadow patches")
            splits[split] = kept

    for split, missing in missing_of(splits).items():
        if not missing:
            continue
        if not skip_bad:
            raise BadPatchError(
                missing[0],
                archive.patch_folder(missing[0]),
                f"listed in {sources[split]} but no such patch folder",
            )
        gone = set(missing)
        splits[split] = [name for name in splits[split] if name not in gone]
        skipped.extend(
            SkippedPatch(
                split,
                name,
                archive.patch_folder(name),
                f"listed in {sources[split]} but no such patch folder",
            )
            for name in missing
        )
    return _without_empty_splits(splits, say), skipped


def _without_empty_splits(splits: dict[str, list[str]], say: Callable[[str], None]) -> dict[str, list[str]]:
    """The splits that have patches left: an empty split gets no file (an empty record file would
    only make training or evaluation fail later); what was left out is said."""
    empty = [split for split, names in splits.items() if not names]
    for split in empty:
        say(f"split {split}: none of its patches is left to prepare; no {split} files are written")
    if len(empty) == len(splits):
        raise UserError("no patches left to prepare in any split")
    return {split: names for split, names in splits.items() if names}


# --- split lists ---------------------------------------------------------------------------------


def read_split_lists(paths: Iterable[str | os.PathLike]) -> dict[str, list[str]]:
    """Split name -> patch names of split list files (files naming the same split are joined)."""
    splits: dict[str, list[str]] = {}
    for path in paths:
        splits.setdefault(split_name(path), []).extend(read_split_csv(path))
    return splits


def split_name(path: str | os.PathLike) -> str:
    """The split a list file names: its base name without extension (`train.csv` -> `train`)."""
    base = Path(path).name
    if base.endswith(".bz2"):
        base = base[: -len(".bz2")]
    return Path(base).stem


def find_split(name: str, available: Iterable[str]) -> str:
    """The member of `available` called `name`, treating `val` and `validation` as one split."""
    available = list(available)
    if name in available:
        return name
    alias = SPLIT_ALIASES.get(name)
    if alias in available:
        return alias
    raise UserError(f"no split {name!r}; available: {', '.join(available) or 'none'}")


def read_split_csv(path: str | os.PathLike) -> list[str]:
    """Patch names of a split list: one per line (first comma field), CRLF and blank lines tolerated."""
    path = Path(path)
    try:
        raw = read_input_file(path, MAX_SPLIT_FILE_BYTES)
        raw = bz2.decompress(raw) if path.suffix == ".bz2" else raw
    except FileNotFoundError:
        raise UserError(f"split file {path} does not exist") from None
    except OSError as error:
        raise UserError(f"split file {path} cannot be read: {error.strerror or error}") from None
    except ValueError as error:
        raise UserError(f"split file {path} cannot be read: {error}") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM appears when the list was saved by a spreadsheet
    except UnicodeDecodeError as error:
        raise UserError(f"split file {path} is not UTF-8 text: {error}") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split(",", 1)[0].strip()
        if not name:
            continue
        try:
            check_patch_name(name)
        except UserError as error:
            raise UserError(f"{path}: line {number}: {error}") from None
        if name in first_line:
            raise UserError(
                f"{path}: line {number}: patch {name} is listed twice (first on line {first_line[name]})"
            )
        first_line[name] = number
        names.append(name)
    if not names:
        raise UserError(f"split file {path} lists no patches (one patch name per line)")
    return names
