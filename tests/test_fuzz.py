"""Fuzzing the readers of untrusted input: GeoTIFF bands, label JSON, v2 parquet, split lists, patch names.

Each reader gets inputs that hypothesis generates or mutates from real files, and must either give the
right answer or raise the documented error (`TiffError`, `BadPatchError`, `UserError`) with a message
naming the file, patch, column or value at fault: never another exception type, never a hang, and never a
file touched outside the archive. Runs are bounded and derandomized so CI is reproducible;
BIGEARTHNET_FUZZ_SCALE=20 runs twenty times as many examples for a deeper search on a quiet machine.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigearthnet_tf import archive as archive_module
from bigearthnet_tf.archive import (
    V1_METADATA_SUFFIX,
    V2_COLUMNS,
    V2_METADATA,
    V2_SNOW_CLOUD_METADATA,
    BadPatchError,
    Patch,
    check_patch_name,
    official_v2_splits,
    open_archive,
    s1_pairs_v1,
    snow_cloud_v2,
    v2_product,
    v2_s1_product,
)
from bigearthnet_tf.config import EVALUATE, KEY_NAMES, TRAIN, load_config, save_config
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS, ORIGINAL_LABELS, S2_BAND_NAMES
from bigearthnet_tf.errors import ConfigError, UserError
from bigearthnet_tf.prepare_splits import read_split_csv
from bigearthnet_tf.tiff import TiffError, read_band, write_geotiff

_SCALE = float(os.environ.get("BIGEARTHNET_FUZZ_SCALE", "1"))

# Reading one band takes about 10 us (fast path) to a few ms (tifffile); a second means a hang or a
# pathological allocation even on a loaded CI machine.
CALL_TIME_LIMIT_S = 1.0
# A call still running this long is interrupted, so a real hang fails the test instead of stalling CI.
_ALARM_S = 10 * CALL_TIME_LIMIT_S

ONE = "S2A_MSIL2A_20170613T101031_87_48"
ONE_JSON = ONE + V1_METADATA_SUFFIX
S1_ONE = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"
S1_ONE_JSON = S1_ONE + V1_METADATA_SUFFIX
V2_ID = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_87_48"
V2_S1 = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"


def _fuzz(examples: int):
    """Hypothesis settings for a bounded, reproducible run of about `examples` inputs."""
    return settings(
        max_examples=max(1, round(examples * _SCALE)),
        deadline=None,  # the per-call time bound below is the real limit; CI load makes deadlines flaky
        derandomize=True,
        database=None,  # nothing written into the checkout; derandomize makes failures reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code under test hides it."""


@contextlib.contextmanager
def _time_bound(what: str) -> Iterator[None]:
    """Fail if the block takes CALL_TIME_LIMIT_S or longer; interrupt it if it runs on for _ALARM_S."""

    def interrupt(signum, frame):
        raise _Hang(f"{what} still running after {_ALARM_S} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, _ALARM_S)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        elapsed = time.perf_counter() - start
        assert elapsed < CALL_TIME_LIMIT_S, f"{what} took {elapsed:.2f} s (limit {CALL_TIME_LIMIT_S} s)"


def _outcome(call: Callable[[], object], what: str, expected: type[Exception] = UserError):
    """(value, None) or (None, error) for an error of the `expected` type; anything else propagates."""
    with _time_bound(what):
        try:
            return call(), None
        except expected as error:
            assert str(error).strip(), f"{what} raised {type(error).__name__} with an empty message"
            return None, error


# --------------------------------------------------------------------------------------------
# Files touched by the package: audit events for open/scandir/listdir, plus os.stat (no audit event)

_PACKAGE_DIR = os.path.dirname(archive_module.__file__) + os.sep
_HYPOTHESIS_DIR = os.path.dirname(hypothesis.__file__) + os.sep
_touched: list[str] | None = None
_audit_installed = False


def _called_from_package() -> bool:
    # Only what our code asks for counts, not hypothesis' tracer, which stats the source of each
    # function it sees run (and so runs inside our calls).
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_PACKAGE_DIR):
            return True
        if filename.startswith(_HYPOTHESIS_DIR):
            return False
        frame = frame.f_back
    return False


def _record(path: object) -> None:
    if _touched is not None and isinstance(path, str | bytes | os.PathLike) and _called_from_package():
        _touched.append(os.fsdecode(path))


def _audit(event: str, args: tuple) -> None:
    if _touched is not None and event in ("open", "os.scandir", "os.listdir"):
        _record(args[0])


@contextlib.contextmanager
def _paths_touched() -> Iterator[list[str]]:
    """Collect the paths the package opens, lists or stats inside the block."""
    global _touched, _audit_installed
    if not _audit_installed:
        sys.addaudithook(_audit)  # cannot be removed; it does nothing outside this block
        _audit_installed = True
    real_stat = os.stat

    def recording_stat(path, *args, **kwargs):
        _record(path)
        return real_stat(path, *args, **kwargs)

    _touched = paths = []
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "stat", recording_stat)
            yield paths
    finally:
        _touched = None


def _assert_inside(paths: list[str], root: Path, what: str) -> None:
    top = os.path.normpath(os.path.abspath(root))
    for path in paths:
        # '..' resolved lexically, as the OS does in these folders (they hold no symbolic links).
        absolute = os.path.normpath(os.path.abspath(path))
        assert os.path.commonpath([absolute, top]) == top, f"{what} touched {path!r}, outside {top}"


# --------------------------------------------------------------------------------------------
# Hostile patch names (shared by the CSV, parquet and read_patch tests)

_NAME_PIECES = st.sampled_from(
    [
        "..",
        ".",
        "/",
        "\\",
        "\0",
        "/etc/passwd",
        "C:\\Windows",
        "~",
        " ",
        "\t",
        "%2e%2e%2f",
        "\u2215",  # division slash, looks like '/'
        "\uff0e\uff0e",  # full-width dots
        "\u00e9",
        "\U0001f30d",
        ONE,
        "_",
    ]
)
HOSTILE_NAMES = st.one_of(
    st.lists(_NAME_PIECES | st.text(max_size=6), max_size=6).map("".join),
    st.text(max_size=30),
    st.sampled_from(
        ["..", ".", "", "/", "../" + ONE, "/" + ONE, ONE + "/..", "\\\\server\\share", " " + ONE]
    ),
    st.integers(200, 5000).map(lambda length: "S2A_" + "x" * length + "_1_1"),  # past NAME_MAX (255)
)


def _expected_name_error(name: object) -> str | None:
    """The message fragment of the UserError check_patch_name must raise for `name`, or None if valid."""
    try:
        check_patch_name(name)
    except UserError:
        return f"invalid patch name {name!r}"
    return None


# --------------------------------------------------------------------------------------------
# Archives the tests write into (one per test, so no test sees another's damage)


def _v1_patch(root: Path, example_paths) -> Path:
    folder = root / "BigEarthNet-v1.0"
    shutil.copytree(example_paths.s2 / ONE, folder / ONE)
    return folder


def _constant_band(path: Path, value: float) -> None:
    array = np.full((120, 120), value, np.float32)
    write_geotiff(path, array, ulx=404400, uly=5342400, pixel_size=10, epsg=32633)


@pytest.fixture(scope="module")
def v1_root(tmp_path_factory, example_paths) -> Path:
    """A v1 archive of one real patch, read-only for the tests that use it."""
    return _v1_patch(tmp_path_factory.mktemp("fuzz_v1"), example_paths)


@pytest.fixture(scope="module")
def v1_json_root(tmp_path_factory, example_paths) -> Path:
    """A v1 archive of one real patch whose label JSON the test rewrites."""
    return _v1_patch(tmp_path_factory.mktemp("fuzz_v1_json"), example_paths)


@pytest.fixture(scope="module")
def v1_band_root(tmp_path_factory, example_paths) -> Path:
    """A v1 archive of one real patch whose band files the test damages."""
    return _v1_patch(tmp_path_factory.mktemp("fuzz_v1_band"), example_paths)


@pytest.fixture(scope="module")
def v1_s1_roots(tmp_path_factory, example_paths) -> tuple[Path, Path]:
    """(S2 root, S1 root) of a v1 archive with one S1 patch whose JSON the test rewrites."""
    top = tmp_path_factory.mktemp("fuzz_v1_s1")
    s2_root = _v1_patch(top, example_paths)
    s1_root = top / "BigEarthNet-S1-v1.0"
    (s1_root / S1_ONE).mkdir(parents=True)
    _constant_band(s1_root / S1_ONE / f"{S1_ONE}_VV.tif", -7.25)
    _constant_band(s1_root / S1_ONE / f"{S1_ONE}_VH.tif", -21.5)
    return s2_root, s1_root


_VALID_V2_ROWS = {
    "patch_id": [V2_ID, "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_1"],
    "labels": [["Pastures", "Arable land"], ["Coniferous forest"]],
    "split": ["train", "test"],
    "country": ["Austria", "Finland"],
    "s1_name": [V2_S1, "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_1_1"],
    "s2v1_name": ["x", "y"],
    "contains_seasonal_snow": [False, False],
    "contains_cloud_or_shadow": [False, True],
}


def _v2_layout(top: Path, example_paths) -> Path:
    folder = top / "BigEarthNet-S2" / v2_product(V2_ID) / V2_ID
    folder.mkdir(parents=True)
    for band in S2_BAND_NAMES:
        shutil.copy(example_paths.s2 / ONE / f"{ONE}_{band}.tif", folder / f"{V2_ID}_{band}.tif")
    s1_folder = top / "BigEarthNet-S1" / v2_s1_product(V2_S1) / V2_S1
    s1_folder.mkdir(parents=True)
    _constant_band(s1_folder / f"{V2_S1}_VV.tif", -3.5)
    _constant_band(s1_folder / f"{V2_S1}_VH.tif", -30.0)
    pq.write_table(pa.table(_VALID_V2_ROWS), top / V2_METADATA)
    return top


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory, example_paths) -> Path:
    """A v2 archive of one real patch (renamed V2_ID) with its S1 twin; the tests write the parquet files."""
    return _v2_layout(tmp_path_factory.mktemp("fuzz_v2"), example_paths)


@pytest.fixture(scope="module")
def v2_garbage_root(tmp_path_factory, example_paths) -> Path:
    return _v2_layout(tmp_path_factory.mktemp("fuzz_v2_garbage"), example_paths)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_scratch")


# --------------------------------------------------------------------------------------------
# GeoTIFF bands


class _TiffSource:
    """A real band file and where its directory entries lie, for targeted corruption."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.data = path.read_bytes()
        assert self.data[:4] == b"II*\0"
        (self.ifd_offset,) = struct.unpack_from("<I", self.data, 4)
        (count,) = struct.unpack_from("<H", self.data, self.ifd_offset)
        self.next_ifd_at = self.ifd_offset + 2 + 12 * count  # the next-directory pointer
        self.entries = {}  # tag -> byte offset of its 12-byte entry
        for at in range(self.ifd_offset + 2, self.next_ifd_at, 12):
            self.entries[struct.unpack_from("<H", self.data, at)[0]] = at
        reference = tifffile.imread(path)
        self.shape: tuple[int, int] = reference.shape
        self.dtype: np.dtype = reference.dtype

    def __repr__(self) -> str:  # hypothesis prints the source of a failing example, not its bytes
        return f"<{self.name}>"


@pytest.fixture(scope="module")
def tiff_sources(example_paths) -> list[_TiffSource]:
    """A 20x20 one-strip uint16 band, a 120x120 four-strip uint16 band, an eight-strip float32 S1 band."""
    s2 = example_paths.s2 / ONE
    s1 = next(iter(sorted(example_paths.s1.iterdir())))
    paths = [s2 / f"{ONE}_B01.tif", s2 / f"{ONE}_B02.tif", s1 / f"{s1.name}_VH.tif"]
    return [_TiffSource(path) for path in paths]


_U16_EDGES = (0, 1, 2, 3, 4, 5, 12, 16, 32, 255, 256, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
_U32_EDGES = (0, 1, 2, 4, 8, 20, 120, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF)
_U16 = st.sampled_from(_U16_EDGES) | st.integers(0, 0xFFFF)
_U32 = st.sampled_from(_U32_EDGES) | st.integers(0, 0xFFFFFFFF)


def _pack(tiff: bytearray, at: int, code: str, *values: int) -> None:
    """struct.pack_into, skipped where an earlier mutation cut the file short."""
    if at + struct.calcsize("<" + code) <= len(tiff):
        struct.pack_into("<" + code, tiff, at, *values)


def _entry(tiff: bytearray, at: int, tag: int, field_type: int, count: int, value: int) -> None:
    _pack(tiff, at, "HHII", tag, field_type, count, value)


def _flip_bytes(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    # Half the time aim at the header and directory, where a flipped byte changes the structure.
    end = len(tiff) if data.draw(st.booleans()) else min(len(tiff), source.next_ifd_at + 4)
    if end == 0:
        return tiff
    for _ in range(data.draw(st.integers(1, 8))):
        tiff[data.draw(st.integers(0, end - 1))] ^= data.draw(st.integers(1, 255))
    return tiff


def _truncate(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    return tiff[: data.draw(st.integers(0, max(0, len(tiff) - 1)))]


def _splice(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    at = data.draw(st.integers(0, len(tiff)))
    removed = data.draw(st.integers(0, 16))
    return tiff[:at] + data.draw(st.binary(max_size=16)) + tiff[at + removed :]


def _corrupt_entry_field(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    at = source.entries[data.draw(st.sampled_from(sorted(source.entries)))]
    field = data.draw(st.sampled_from(["tag", "type", "count", "value"]))
    if field in ("tag", "type"):
        _pack(tiff, at + (0 if field == "tag" else 2), "H", data.draw(_U16))
    else:
        _pack(tiff, at + (4 if field == "count" else 8), "I", data.draw(_U32))
    return tiff


def _huge_dimensions(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    for tag in data.draw(st.sampled_from([(256,), (257,), (256, 257)])):
        _entry(tiff, source.entries[tag], tag, 4, 1, data.draw(_U32))
    return tiff


def _zero_strips(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    for tag in data.draw(st.sampled_from([(273,), (279,), (273, 279)])):
        _pack(tiff, source.entries[tag] + 4, "I", 0)
    return tiff


def _strip_past_end(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    at = source.entries[273]
    _, _, count, value = struct.unpack_from("<HHII", source.data, at)  # where the real file has them
    position = at + 8 if count == 1 else value + 4 * data.draw(st.integers(0, count - 1))
    beyond = data.draw(st.sampled_from([len(tiff), len(tiff) - 1, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF))
    _pack(tiff, position, "I", beyond)
    return tiff


def _directory_loop(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    # The next-directory pointer back to this directory, into the middle of it, or anywhere.
    targets = st.sampled_from([source.ifd_offset, 8, 4, 0, source.next_ifd_at]) | st.integers(0, len(tiff))
    _pack(tiff, source.next_ifd_at, "I", data.draw(targets | _U32))
    return tiff


def _first_directory(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    _pack(tiff, 4, "I", data.draw(st.integers(0, len(tiff) + 8) | _U32))
    return tiff


def _entry_count(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    _pack(tiff, source.ifd_offset, "H", data.draw(_U16))
    return tiff


def _force_tifffile(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    """Make the fast path hand the file to tifffile: compression, tiles, bit depth, BigTIFF or pages."""
    how = data.draw(st.sampled_from(["compression", "tiles", "bits", "bigtiff", "pages"]))
    if how == "compression":
        codes = st.sampled_from([2, 5, 7, 8, 32773, 32946, 34712, 50000, 0xFFFF])
        _entry(tiff, source.entries[259], 259, 3, 1, data.draw(codes))
    elif how == "tiles":
        # Strip arrays relabelled as tile arrays, with or without a tile size.
        _pack(tiff, source.entries[273], "H", 324)
        _pack(tiff, source.entries[279], "H", 325)
        if data.draw(st.booleans()):
            _entry(tiff, source.entries[278], 322, 3, 1, data.draw(st.sampled_from([16, 128, 0])))
    elif how == "bits":
        _entry(tiff, source.entries[258], 258, 3, 1, data.draw(st.sampled_from([1, 8, 12, 24, 64, 0])))
    elif how == "bigtiff":
        _pack(tiff, 2, "H", 43)
    else:
        _pack(tiff, source.next_ifd_at, "I", source.ifd_offset)
    return tiff


def _byte_order(data, tiff: bytearray, source: _TiffSource) -> bytearray:
    tiff[:2] = data.draw(st.sampled_from([b"MM", b"IM", b"\0\0"]))
    return tiff


_TIFF_MUTATIONS = [
    _flip_bytes,
    _truncate,
    _splice,
    _corrupt_entry_field,
    _huge_dimensions,
    _zero_strips,
    _strip_past_end,
    _directory_loop,
    _first_directory,
    _entry_count,
    _force_tifffile,
    _byte_order,
]


def _check_read_band(path: Path, content: bytes, shape: tuple[int, int], dtype: np.dtype) -> None:
    """read_band on `content` gives the array tifffile sees, or a TiffError, within the time bound."""
    path.write_bytes(content)
    array, error = _outcome(
        lambda: read_band(path, shape, dtype), f"read_band({len(content)} bytes)", TiffError
    )
    if error is not None:
        assert error.reason == str(error) and error.reason.strip()
        return
    assert array.shape == shape and array.dtype == dtype
    try:
        reference = tifffile.imread(path)
    except Exception:  # tifffile is only the oracle here; a file it refuses proves nothing either way
        return
    if reference.shape == shape and reference.dtype.newbyteorder("=") == dtype:
        np.testing.assert_array_equal(array, reference)


@_fuzz(examples=400)
@given(data=st.data())
def test_mutated_geotiffs_read_correctly_or_raise_tiff_error(tiff_sources, scratch, data):
    source = data.draw(st.sampled_from(tiff_sources), label="source")
    tiff = bytearray(source.data)
    for mutation in data.draw(st.lists(st.sampled_from(_TIFF_MUTATIONS), min_size=1, max_size=3)):
        tiff = mutation(data, tiff, source)
    _check_read_band(scratch / "band.tif", bytes(tiff), source.shape, source.dtype)


_TIFF_HEADERS = st.sampled_from([b"", b"II*\0", b"MM\0*", b"II+\0\x08\0\0\0", b"II*\0\x08\0\0\0", b"MM\0+"])


@_fuzz(examples=150)
@given(
    header=_TIFF_HEADERS,
    body=st.binary(max_size=512),
    shape=st.sampled_from([(20, 20), (120, 120), (0, 0), (1, 1)]),
    dtype=st.sampled_from([np.uint16, np.float32]),
)
def test_random_bytes_raise_tiff_error(scratch, header, body, shape, dtype):
    _check_read_band(scratch / "random.tif", header + body, shape, np.dtype(dtype))


@_fuzz(examples=60)
@given(data=st.data())
def test_damaged_band_in_a_patch_is_a_bad_patch_naming_the_file(tiff_sources, v1_band_root, data):
    root = v1_band_root
    sources = {
        band: next(item for item in tiff_sources if item.name.endswith(f"_{band}.tif"))
        for band in ("B01", "B02")
    }
    for band, source in sources.items():  # undo the previous example's damage
        (root / ONE / f"{ONE}_{band}.tif").write_bytes(source.data)
    band = data.draw(st.sampled_from(sorted(sources)), label="band")
    source = sources[band]
    tiff = bytearray(source.data)
    for mutation in data.draw(st.lists(st.sampled_from(_TIFF_MUTATIONS), min_size=1, max_size=2)):
        tiff = mutation(data, tiff, source)
    (root / ONE / f"{ONE}_{band}.tif").write_bytes(bytes(tiff))
    patch, error = _outcome(lambda: open_archive(root, version=1).read_patch(ONE), "read_patch")
    if error is None:
        assert patch.bands[band].shape == source.shape and patch.bands[band].dtype == np.uint16
    else:
        assert isinstance(error, BadPatchError), error
        assert (error.patch, error.file) == (ONE, f"{ONE}_{band}.tif")
        assert str(error).startswith(f"patch {ONE}: {ONE}_{band}.tif: ")


# --------------------------------------------------------------------------------------------
# v1 label JSON (Sentinel-2) and pairing JSON (Sentinel-1)

_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
_LABEL_ITEMS = st.sampled_from(ORIGINAL_LABELS) | st.sampled_from(BIGEARTHNET_19_LABELS) | JSON_VALUES
_METADATA_EXTRAS = st.dictionaries(st.sampled_from(["coordinates", "projection", "tile_source"]), JSON_VALUES)
LABEL_DOCUMENTS = st.one_of(
    st.builds(
        lambda extras, labels: {**extras, "labels": labels},
        _METADATA_EXTRAS,
        st.lists(_LABEL_ITEMS, max_size=5) | JSON_VALUES,
    ),
    st.builds(
        lambda extras, labels: {**extras, "labels": labels},
        _METADATA_EXTRAS,
        st.lists(st.sampled_from(ORIGINAL_LABELS), max_size=5),
    ),
    JSON_VALUES,
)
_ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])


@st.composite
def _encoded(draw, documents) -> tuple[object, bytes]:
    document = draw(documents)
    text = json.dumps(document, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    return document, text.encode(draw(_ENCODINGS))


@st.composite
def _damaged(draw, documents) -> bytes:
    """Bytes that are no valid document: cut, spliced, nested too deep, numbers too long, or noise."""
    _, raw = draw(_encoded(documents))
    kind = draw(st.sampled_from(["cut", "splice", "deep", "digits", "noise"]))
    if kind == "cut":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if kind == "splice":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at + draw(st.integers(0, 4)) :]
    if kind == "deep":
        depth = draw(st.sampled_from([999, 1000, 5000, 100_000]) | st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return b'{"labels": ' + opener * depth + b"1" + closer * depth + b"}"
    if kind == "digits":
        # Python refuses to convert integers past 4300 digits (a ValueError, not a JSONDecodeError).
        return b'{"labels": [' + b"7" * draw(st.integers(4000, 20_000)) + b"]}"
    return draw(st.binary(max_size=200))


def _expected_43(document: object) -> tuple[str, ...] | None:
    """The labels read_patch must return for this document, or None if it must refuse it."""
    labels = document.get("labels") if isinstance(document, dict) else None
    if isinstance(labels, list) and all(isinstance(item, str) and item in ORIGINAL_LABELS for item in labels):
        return tuple(labels)
    return None


def _check_label_json(root: Path, raw: bytes) -> Patch | None:
    (root / ONE / ONE_JSON).write_bytes(raw)
    patch, error = _outcome(lambda: open_archive(root, version=1).read_patch(ONE), "read_patch")
    if error is not None:
        assert isinstance(error, BadPatchError), f"{type(error).__name__}: {error}"
        assert (error.patch, error.file) == (ONE, ONE_JSON), str(error)
        assert str(error) == f"patch {ONE}: {ONE_JSON}: {error.reason}"
        return None
    assert patch.name == ONE and all(label in ORIGINAL_LABELS for label in patch.labels_43)
    return patch


@_fuzz(examples=150)
@given(document_and_raw=_encoded(LABEL_DOCUMENTS))
def test_label_json_documents_read_or_are_bad_patches(v1_json_root, document_and_raw):
    document, raw = document_and_raw
    patch = _check_label_json(v1_json_root, raw)
    expected = _expected_43(document)
    if expected is None:
        assert patch is None, f"accepted {document!r}"
    else:
        assert patch is not None and patch.labels_43 == expected


@_fuzz(examples=150)
@given(raw=_damaged(LABEL_DOCUMENTS))
def test_malformed_label_json_is_a_bad_patch(v1_json_root, raw):
    _check_label_json(v1_json_root, raw)


_S1_DOCUMENTS = st.one_of(
    st.builds(
        lambda extras, s2_name: {**extras, "corresponding_s2_patch": s2_name},
        _METADATA_EXTRAS,
        st.sampled_from([ONE, "", "S2B_MSIL2A_20180204T94161_57_38"]) | JSON_VALUES,
    ),
    JSON_VALUES,
)


def _check_s1_json(roots: tuple[Path, Path], raw: bytes, document: object = None, known: bool = False):
    s2_root, s1_root = roots
    (s1_root / S1_ONE / S1_ONE_JSON).write_bytes(raw)
    s1_pairs_v1.cache_clear()  # the pairing is cached per S1 folder; this folder changed
    patch, error = _outcome(lambda: open_archive(s2_root, s1_root=s1_root).read_patch(ONE), "read_patch")
    s2_name = document.get("corresponding_s2_patch") if isinstance(document, dict) else None
    if patch is not None:
        assert patch.s1_name == S1_ONE and np.all(patch.s1_bands["VV"] == np.float32(-7.25))
        assert not known or s2_name == ONE
    elif isinstance(error, BadPatchError):
        # The S1 JSON is valid but pairs its patch with another S2 patch.
        assert str(error) == f"patch {ONE}: {s1_root}: no Sentinel-1 patch is paired with this patch"
        assert not known or (isinstance(s2_name, str) and s2_name and s2_name != ONE)
    else:
        # The pairing scan covers the whole S1 folder, so a broken S1 JSON is named by its own patch.
        assert str(error).startswith(f"Sentinel-1 patch {S1_ONE}: {S1_ONE_JSON}: "), str(error)
        assert not known or not (isinstance(s2_name, str) and s2_name)


@_fuzz(examples=100)
@given(document_and_raw=_encoded(_S1_DOCUMENTS))
def test_s1_json_documents_pair_or_raise_clean_errors(v1_s1_roots, document_and_raw):
    document, raw = document_and_raw
    _check_s1_json(v1_s1_roots, raw, document, known=True)


@_fuzz(examples=100)
@given(raw=_damaged(_S1_DOCUMENTS))
def test_malformed_s1_json_raises_a_clean_error(v1_s1_roots, raw):
    _check_s1_json(v1_s1_roots, raw)


# --------------------------------------------------------------------------------------------
# v2 parquet metadata

_TEXT_COLUMNS = ("patch_id", "split", "country", "s1_name", "s2v1_name")
_FLAG_COLUMNS = ("contains_seasonal_snow", "contains_cloud_or_shadow")
# Arrow types each column may have: the canonical one, its large and dictionary-encoded forms, and
# the null type of an all-empty column. Anything else is refused where the column is read.
_ACCEPTED_TYPES = {
    **{column: ("string", "large_string", "dictionary", "null") for column in _TEXT_COLUMNS},
    "labels": ("list_string", "large_list_string", "null"),
    **{column: ("bool", "null") for column in _FLAG_COLUMNS},
}
_CANONICAL_TYPES = {
    **{column: "string" for column in _TEXT_COLUMNS},
    "labels": "list_string",
    **{column: "bool" for column in _FLAG_COLUMNS},
}
_WRONG_TYPES = ("int64", "float64", "binary", "list_int64", "string", "bool", "list_string")

_VALUES_BY_TYPE = {
    "int64": st.integers(-(2**63), 2**63 - 1),
    "float64": st.floats(),
    "binary": st.binary(max_size=8),
    "list_int64": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    "bool": st.booleans(),
    "null": st.none(),
}
_ARROW_TYPES = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "dictionary": pa.string(),  # encoded after building
    "int64": pa.int64(),
    "float64": pa.float64(),
    "binary": pa.binary(),
    "list_int64": pa.list_(pa.int64()),
    "list_string": pa.list_(pa.string()),
    "large_list_string": pa.large_list(pa.large_string()),
    "bool": pa.bool_(),
    "null": pa.null(),
}
_SPLITS = st.sampled_from(["train", "validation", "val", "test", "Train", "", "training"]) | st.text(
    max_size=8
)
_S1_NAMES = st.sampled_from([V2_S1, "", "S1A_x", "S1B_IW_GRDH_1SDV_20170613T165043_33UUP_1_1", "../" + V2_S1])
_TEXT_VALUES = {
    "patch_id": st.sampled_from([V2_ID, V2_ID, "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_1_1"])
    | HOSTILE_NAMES,
    "split": _SPLITS,
    "s1_name": _S1_NAMES | HOSTILE_NAMES,
    "country": st.text(max_size=8),
    "s2v1_name": st.text(max_size=8),
}
_LABEL_LISTS = st.lists(
    st.sampled_from(BIGEARTHNET_19_LABELS)
    | st.sampled_from(["Volcanoes", "Pastures ", "Peatbogs"])
    | st.none(),
    max_size=4,
)


def _values(column: str, type_name: str):
    if type_name in ("string", "large_string", "dictionary"):
        base = _TEXT_VALUES.get(column, st.text(max_size=8))
    elif type_name in ("list_string", "large_list_string"):
        base = _LABEL_LISTS if column == "labels" else st.lists(st.text(max_size=8), max_size=3)
    else:
        base = _VALUES_BY_TYPE[type_name]
    return st.none() | base | base | base  # about one value in four is null


@dataclass(frozen=True)
class _ParquetFile:
    """What a test wrote: per present column, its type name and values."""

    path: Path
    columns: dict[str, tuple[str, list]]

    def rows(self) -> list[dict]:
        count = len(next(iter(self.columns.values()))[1]) if self.columns else 0
        return [{name: values[index] for name, (_, values) in self.columns.items()} for index in range(count)]

    def problem_columns(self, needed: tuple[str, ...]) -> list[str]:
        """The missing read columns and the read columns of a refused type, in the reader's order."""
        missing = [column for column in needed if column not in self.columns]
        if missing:
            return missing
        return [column for column in needed if self.columns[column][0] not in _ACCEPTED_TYPES[column]]


@st.composite
def _parquet_columns(draw) -> dict[str, tuple[str, list]]:
    rows = draw(st.integers(0, 4))
    columns = {}
    for column in V2_COLUMNS:
        variant = draw(st.sampled_from(["canonical"] * 6 + ["accepted", "wrong", "missing"]))
        if variant == "missing":
            continue
        if variant == "canonical":
            type_name = _CANONICAL_TYPES[column]
        elif variant == "accepted":
            type_name = draw(st.sampled_from(_ACCEPTED_TYPES[column]))
        else:
            type_name = draw(st.sampled_from([t for t in _WRONG_TYPES if t not in _ACCEPTED_TYPES[column]]))
        columns[column] = (
            type_name,
            draw(st.lists(_values(column, type_name), min_size=rows, max_size=rows)),
        )
    return columns


def _write_parquet(path: Path, columns: dict[str, tuple[str, list]]) -> _ParquetFile:
    arrays = {}
    for column, (type_name, values) in columns.items():
        array = pa.array(values, type=_ARROW_TYPES[type_name])
        arrays[column] = array.dictionary_encode() if type_name == "dictionary" else array
    pq.write_table(pa.table(arrays) if arrays else pa.table({}), path)
    return _ParquetFile(path, columns)


def _split_outcome(files: list[_ParquetFile], include: bool, flagged_path: Path):
    """('ok', splits) or ('error', path, fragments: any one must be in the message)."""
    needed = ("patch_id", "split", *_FLAG_COLUMNS)
    for file in files:
        problems = file.problem_columns(needed)
        if problems:
            return "error", file.path, [repr(column) for column in problems]
    if include and len(files) == 1:
        return "error", flagged_path, ["is missing"]
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for index, file in enumerate(files):
        if index == 1 and not include:
            break
        for row in file.rows():
            if (row["contains_seasonal_snow"] or row["contains_cloud_or_shadow"]) and not include:
                continue
            split = "validation" if row["split"] == "val" else row["split"]
            name_error = _expected_name_error(row["patch_id"])
            if name_error or split not in splits:
                return "error", file.path, [name_error or f"split {split!r}"]
            splits[split].append(row["patch_id"])
    return "ok", splits


def _snow_cloud_outcome(files: list[_ParquetFile]):
    needed = ("patch_id", *_FLAG_COLUMNS)
    for file in files:
        problems = file.problem_columns(needed)
        if problems:
            return "error", file.path, [repr(column) for column in problems]
    names = set()
    for index, file in enumerate(files):
        for row in file.rows():
            if index == 1 or row["contains_seasonal_snow"] or row["contains_cloud_or_shadow"]:
                names.add(row["patch_id"])
    return "ok", frozenset(names)


def _read_patch_outcome(files: list[_ParquetFile], root: Path):
    """What read_patch(V2_ID) with S1 gives: ('ok', labels), ('bad', files, reason pattern) or an error."""
    for file in files:
        problems = file.problem_columns(("patch_id", "labels", "s1_name"))
        if problems:
            return "error", file.path, [repr(column) for column in problems]
    rows = [row for file in files for row in file.rows() if row["patch_id"] == V2_ID]
    if not rows:
        return "bad", V2_METADATA, "patch is not listed in the archive's metadata"
    if len(rows) > 1:  # a patch listed twice contradicts itself: refused, whatever the rows say
        return "bad", V2_METADATA, "listed twice in the metadata"
    row = rows[0]
    if row["labels"] is None:  # null is no answer; an empty list means no labels
        return "bad", V2_METADATA, re.escape("its labels cell is null (an empty list [] means no labels)")
    labels = row["labels"]
    unknown = [label for label in labels if label not in BIGEARTHNET_19_LABELS]
    if unknown:
        return "bad", V2_METADATA, re.escape(f"unknown label {unknown[0]!r}")
    s1_name = row["s1_name"]
    if not s1_name:
        return "bad", V2_METADATA, "no Sentinel-1 patch is paired with this patch"
    try:
        v2_s1_product(check_patch_name(s1_name))
    except UserError:
        return "bad", V2_METADATA, re.escape(f"invalid Sentinel-1 patch name {s1_name!r}")
    if s1_name != V2_S1:
        folder = root / "BigEarthNet-S1" / v2_s1_product(s1_name) / s1_name
        # Which the OS reports first, a missing folder or a path past its limits, depends on lengths.
        return (
            "bad",
            (str(folder), f"{s1_name}_VV.tif"),
            "no such patch folder|cannot read: File name too long",
        )
    return "ok", tuple(label for label in BIGEARTHNET_19_LABELS if label in labels)


def _assert_matches(value, error, expected, what: str) -> None:
    if expected[0] == "ok":
        assert error is None, f"{what}: expected success, got {type(error).__name__}: {error}"
        assert value == expected[1], what
    elif expected[0] == "bad":
        assert isinstance(error, BadPatchError), f"{what}: expected a bad patch {expected}, got {error!r}"
        files = expected[1] if isinstance(expected[1], tuple) else (expected[1],)
        assert error.patch == V2_ID and error.file in files, str(error)
        assert re.match(expected[2], error.reason), f"{error.reason!r} does not start with {expected[2]!r}"
    else:
        _, path, fragments = expected
        assert error is not None and not isinstance(error, BadPatchError), f"{what}: expected {expected}"
        message = str(error)
        assert str(path) in message and any(fragment in message for fragment in fragments), (
            f"{what}: {message!r} does not name {path} and one of {fragments}"
        )


@_fuzz(examples=200)
@given(main=_parquet_columns(), flagged=st.none() | _parquet_columns())
def test_v2_parquet_metadata_reads_or_names_the_file_and_column(v2_root, main, flagged):
    flagged_path = v2_root / V2_SNOW_CLOUD_METADATA
    flagged_path.unlink(missing_ok=True)
    files = [_write_parquet(v2_root / V2_METADATA, main)]
    if flagged is not None:
        files.append(_write_parquet(flagged_path, flagged))
    archive_module._v2_metadata.cache_clear()  # cached per root; the files just changed

    for include in (False, True):
        value, error = _outcome(
            functools.partial(official_v2_splits, v2_root, include_snow_cloud=include), "splits"
        )
        expected = _split_outcome(files, include, flagged_path)
        _assert_matches(value, error, expected, f"official_v2_splits(include_snow_cloud={include})")
    value, error = _outcome(lambda: snow_cloud_v2(v2_root), "snow_cloud_v2")
    _assert_matches(value, error, _snow_cloud_outcome(files), "snow_cloud_v2")

    archive = open_archive(v2_root, s1_root=v2_root)
    with _paths_touched() as touched:
        patch, error = _outcome(lambda: archive.read_patch(V2_ID), "read_patch")
        expected = _read_patch_outcome(files, v2_root)
        _assert_matches(None if patch is None else patch.labels_19, error, expected, "read_patch")
        if expected[0] != "error":
            # Every name the metadata lists is refused with its value named, or read inside the archive.
            names = [row["patch_id"] for file in files for row in file.rows()]
            for name in [name for name in names if isinstance(name, str)][:3]:
                _check_read_by_name(archive, name)
    _assert_inside(touched, v2_root, "reading patches named by the parquet files")


def _check_read_by_name(archive, name: str) -> None:
    """read_patch(name) reads the one real patch, or refuses the name by value, or is a bad patch."""
    patch, error = _outcome(lambda: archive.read_patch(name), f"read_patch({name!r})")
    if error is None:
        assert patch.name == name == (ONE if archive.version == 1 else V2_ID)
        return
    name_error = _expected_name_error(name)
    product, *rest = name.rsplit("_", 2)
    if name_error is not None:
        assert not isinstance(error, BadPatchError) and name_error in str(error), str(error)
    elif archive.version == 2 and (len(rest) != 2 or not product):
        assert f"invalid v2 patch_id {name!r}" in str(error), str(error)
    else:
        assert isinstance(error, BadPatchError) and error.patch == name, str(error)


@pytest.fixture(scope="module")
def valid_parquet_bytes(scratch) -> bytes:
    path = scratch / "valid.parquet"
    pq.write_table(pa.table(_VALID_V2_ROWS), path)
    return path.read_bytes()


@_fuzz(examples=150)
@given(data=st.data())
def test_damaged_parquet_files_raise_user_errors_naming_them(v2_garbage_root, valid_parquet_bytes, data):
    content = bytearray(valid_parquet_bytes)
    kind = data.draw(st.sampled_from(["cut", "flip", "noise", "empty"]), label="kind")
    if kind == "cut":
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            content[data.draw(st.integers(0, len(content) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "noise":
        content = bytearray(data.draw(st.binary(max_size=300)))
        if data.draw(st.booleans()):
            content = b"PAR1" + content + b"PAR1"
    else:
        content = bytearray()
    damaged = data.draw(st.sampled_from([V2_METADATA, V2_SNOW_CLOUD_METADATA]), label="file")
    for file_name in (V2_METADATA, V2_SNOW_CLOUD_METADATA):
        (v2_garbage_root / file_name).write_bytes(
            bytes(content) if file_name == damaged else valid_parquet_bytes
        )
    archive_module._v2_metadata.cache_clear()
    path = str(v2_garbage_root / damaged)

    for what, call in (
        ("official_v2_splits", lambda: official_v2_splits(v2_garbage_root, include_snow_cloud=True)),
        ("snow_cloud_v2", lambda: snow_cloud_v2(v2_garbage_root)),
    ):
        value, error = _outcome(call, what)
        assert error is None or path in str(error), f"{what}: {error} does not name {path}"
    archive = open_archive(v2_garbage_root, s1_root=v2_garbage_root)
    patch, error = _outcome(lambda: archive.read_patch(V2_ID), "read_patch")
    if error is not None and not isinstance(error, BadPatchError):
        assert path in str(error), str(error)


# --------------------------------------------------------------------------------------------
# Patch names given to read_patch, and split CSV files


@_fuzz(examples=200)
@given(name=HOSTILE_NAMES)
def test_patch_names_never_lead_outside_the_archive(v1_root, v2_root, name):
    v1 = open_archive(v1_root, version=1)
    with _paths_touched() as touched:
        _check_read_by_name(v1, name)
        missing, error = _outcome(lambda: v1.missing_patches([name]), "missing_patches")
        name_error = _expected_name_error(name)
        if name_error is None:
            assert missing == ([] if name == ONE else [name])
        else:
            assert name_error in str(error)
    _assert_inside(touched, v1_root, f"read_patch({name!r})")

    v2 = open_archive(v2_root, version=2)
    with _paths_touched() as touched:
        patch, error = _outcome(lambda: v2.patch_folder(name), "patch_folder")
        if error is None:
            _assert_inside([patch], v2_root / "BigEarthNet-S2", f"patch_folder({name!r})")
    _assert_inside(touched, v2_root, f"patch_folder({name!r})")


_SEPARATORS = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\u2028"])
_CSV_LINES = st.lists(
    st.tuples(
        st.sampled_from([ONE, "S2B_MSIL2A_20180204T94161_57_38", "S2A_a_1_1"]) | HOSTILE_NAMES,
        st.sampled_from(["", ",train", ",", ", extra,fields"]),
    ),
    max_size=6,
)


def _expected_split_list(text: str, path: Path) -> tuple[str, list[str] | list[str]]:
    """('ok', names) or ('error', fragments all expected in the message)."""
    names: list[str] = []
    first: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split(",", 1)[0].strip()
        if not name:
            continue
        name_error = _expected_name_error(name)
        if name_error:
            return "error", [str(path), f"line {number}", name_error]
        if name in first:
            return "error", [
                str(path),
                f"line {number}",
                f"patch {name} is listed twice",
                f"line {first[name]}",
            ]
        first[name] = number
        names.append(name)
    if not names:  # an empty list would silently select nothing
        return "error", [str(path), "lists no patches"]
    return "ok", names


def _check_split_csv(path: Path, raw: bytes) -> None:
    path.write_bytes(bz2.compress(raw) if path.suffix == ".bz2" else raw)
    names, error = _outcome(lambda: read_split_csv(path), "read_split_csv")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        assert error is not None and f"split file {path} is not UTF-8 text" in str(error), str(error)
        return
    expected = _expected_split_list(text, path)
    if expected[0] == "ok":
        assert error is None and names == expected[1], f"{error}; expected {expected[1]}"
    else:
        assert error is not None and all(fragment in str(error) for fragment in expected[1]), (
            f"{error!r} lacks one of {expected[1]}"
        )


@_fuzz(examples=150)
@given(
    lines=_CSV_LINES,
    separator=_SEPARATORS,
    bom=st.booleans(),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]),
    compressed=st.booleans(),
)
def test_split_csv_names_are_listed_or_refused_by_value(scratch, lines, separator, bom, encoding, compressed):
    text = ("\ufeff" if bom else "") + separator.join(name + rest for name, rest in lines)
    raw = text.encode(encoding, errors="replace")
    _check_split_csv(scratch / ("list.csv.bz2" if compressed else "list.csv"), raw)


@_fuzz(examples=100)
@given(raw=st.binary(max_size=300), compressed=st.booleans())
def test_split_csv_of_random_bytes(scratch, raw, compressed):
    _check_split_csv(scratch / ("noise.csv.bz2" if compressed else "noise.csv"), raw)


@_fuzz(examples=60)
@given(raw=st.binary(max_size=300), cut=st.integers(0, 100))
def test_damaged_bz2_split_csv_names_the_file(scratch, raw, cut):
    path = scratch / "damaged.csv.bz2"
    compressed = bz2.compress(raw)
    path.write_bytes(compressed[:cut] if cut < len(compressed) else raw)
    names, error = _outcome(lambda: read_split_csv(path), "read_split_csv")
    assert error is None or str(path) in str(error), str(error)
    assert error is not None or all(_expected_name_error(name) is None for name in names)


# --------------------------------------------------------------------------------------------
# The config loader: per-key values, whole documents, statistics files

_CONFIG_BASE = {
    "model_name": "K-BranchCNN-Tiny",
    "label_type": "BigEarthNet-19",
    "batch_size": 4,
    "nb_epoch": 1,
    "learning_rate": 0.001,
    "out_dir": "out",
    "tr_tf_record_files": "train.tfrecord",
    "val_tf_record_files": ["val.tfrecord"],
    "test_tf_record_files": "records",
    "model_file": "checkpoint",
    "statistics_file": "statistics.json",
}
_DELETE = "<delete the key>"
_PATH_PIECES = st.sampled_from(
    ["~", "/", "..", "*", "?", "[", "]", "\0", "\ud800", "\n", " ", "train.tfrecord", "records", "checkpoint"]
)
CONFIG_VALUES = st.one_of(
    JSON_VALUES,
    st.integers(-(2**80), 2**80) | st.sampled_from([0, 1, -1, 2**31, 2**63, 10**20, 0.5, 1.0, 1e-300, 1e308]),
    st.sampled_from(
        ["", " ", "adam", "adamw", "cosine", "auto", "never", "S1", "MM", "original", "BigEarthNet-19"]
        + ["K-BranchCNN", "ResNet-Tiny", "os:system", "bigearthnet_tf.cli", "../x.py", "*.tfrecord"]
    ),
    st.lists(_PATH_PIECES | st.text(max_size=4), max_size=5).map("".join),
    st.lists(st.lists(_PATH_PIECES, max_size=3).map("".join), max_size=3),
)


def _statistics_file(bands: object, **keys: object) -> dict:
    return {"format": "bigearthnet-tf-statistics", "version": 1, **keys, "bands": bands}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """A folder with the files the base config names; the loader is warmed up (TensorFlow, registry)."""
    folder = tmp_path_factory.mktemp("fuzz_config")
    for name in ("train.tfrecord", "val.tfrecord", "checkpoint.json"):
        (folder / name).write_bytes(b"")
    (folder / "records").mkdir()
    (folder / "records" / "test-00000-of-00001.tfrecord").write_bytes(b"")
    (folder / "statistics.json").write_text(json.dumps(_statistics_file({"B02": {"mean": 1e3, "std": 5e2}})))
    (folder / "config.json").write_text(json.dumps(_CONFIG_BASE))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        load_config(folder / "config.json")
    return folder


def _load(config_dir: Path, raw: bytes, purpose: str):
    """(Config or None, ConfigError or None) for `raw` as the config file, loaded from `config_dir`."""
    path = config_dir / "config.json"
    path.write_bytes(raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(config_dir)  # relative paths and globs look here, not in the checkout
        config, error = _outcome(lambda: load_config(path, purpose), "load_config", ConfigError)
        if config is None:
            return None, error
        # Documented: the saved config loads back unchanged.
        saved = config_dir / "saved" / "config.json"
        saved.unlink(missing_ok=True)
        save_config(config, saved)
        again, again_error = _outcome(lambda: load_config(saved, purpose), "load_config(saved)", ConfigError)
        assert again_error is None, again_error
        assert again.to_dict() == config.to_dict()
    return config, None


@_fuzz(examples=150)
@given(
    changes=st.dictionaries(
        st.sampled_from(KEY_NAMES) | st.text(max_size=12),
        CONFIG_VALUES | st.just(_DELETE),
        min_size=1,
        max_size=3,
    ),
    purpose=st.sampled_from([TRAIN, EVALUATE]),
)
def test_config_values_load_or_raise_config_errors_naming_the_key(config_dir, changes, purpose):
    document = {**_CONFIG_BASE}
    for key, value in changes.items():
        if value == _DELETE:
            document.pop(key, None)
        else:
            document[key] = value
    config, error = _load(config_dir, json.dumps(document).encode(), purpose)
    path = str(config_dir / "config.json")
    if config is not None:
        assert config.given_keys <= set(KEY_NAMES)
        assert type(config.batch_size) is int and config.batch_size >= 1
        assert config.learning_rate is None or (
            math.isfinite(config.learning_rate) and config.learning_rate > 0
        )
        assert 0 < config.threshold <= 1
        return
    message = str(error)
    if path in message and "is not a JSON number" in message:  # NaN, Infinity: named by value
        assert re.search(r"(NaN|Infinity) is not a JSON number", message), message
    elif path in message:  # the one key changed (or an unknown one) is named, with the file
        assert any(repr(key) in message or key in message for key in changes), message
    else:  # a statistics file the change points to is named instead
        assert "statistics_file" in changes and str(config_dir) in message, message


_CONFIG_DOCUMENTS = st.one_of(
    st.builds(
        lambda extra: {**_CONFIG_BASE, **extra}, st.dictionaries(st.sampled_from(KEY_NAMES), JSON_VALUES)
    ),
    JSON_VALUES,
)


@st.composite
def _config_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["encoded", "damaged", "duplicate", "constant", "not utf-8"]))
    if kind == "encoded":
        return draw(_encoded(_CONFIG_DOCUMENTS))[1]
    if kind == "damaged":
        return draw(_damaged(_CONFIG_DOCUMENTS))
    if kind == "duplicate":
        key = draw(st.sampled_from(KEY_NAMES))
        return json.dumps(_CONFIG_BASE)[:-1].encode() + f', "{key}": 1, "{key}": 2}}'.encode()
    if kind == "constant":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return json.dumps(_CONFIG_BASE)[:-1].encode() + f', "learning_rate": {constant}}}'.encode()
    return (
        json.dumps(_CONFIG_BASE)
        .encode()
        .replace(b"out", draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])))
    )


@_fuzz(examples=100)
@given(raw=_config_bytes(), purpose=st.sampled_from([TRAIN, EVALUATE]))
def test_config_documents_load_or_raise_config_errors_naming_the_file(config_dir, raw, purpose):
    config, error = _load(config_dir, raw, purpose)
    if error is not None:
        assert str(config_dir / "config.json") in str(error) or str(config_dir) in str(error), str(error)


_BAND_NAMES = ("B01", "B02", "B8A", "B12", "VV", "VH")
_NUMBERS = st.floats() | st.integers(-(2**80), 2**80) | st.sampled_from([0, -1.0, 1e-308, 1e308])
_BAND_ENTRIES = st.one_of(
    st.fixed_dictionaries(
        {"mean": _NUMBERS, "std": _NUMBERS},
        optional={"pixels": st.integers(-2, 2**40) | JSON_VALUES, "median": JSON_VALUES},
    ),
    st.fixed_dictionaries({}, optional={"mean": JSON_VALUES, "std": JSON_VALUES}),
    st.lists(_NUMBERS, max_size=3),
    JSON_VALUES,
)
_BAND_TABLES = st.dictionaries(st.sampled_from(_BAND_NAMES) | st.text(max_size=4), _BAND_ENTRIES, max_size=4)
_STATISTICS_DOCUMENTS = st.one_of(
    st.builds(
        _statistics_file,
        _BAND_TABLES,
        records=st.integers(-1, 10**6) | JSON_VALUES,
        source=st.lists(st.text(max_size=6), max_size=2) | JSON_VALUES,
    ),
    st.builds(
        lambda base, changes: {**base, **changes},
        st.builds(_statistics_file, _BAND_TABLES),
        st.dictionaries(st.sampled_from(["format", "version", "bands", "extra"]), JSON_VALUES, max_size=2),
    ),
    JSON_VALUES,
)


@_fuzz(examples=100)
@given(raw=_encoded(_STATISTICS_DOCUMENTS).map(lambda pair: pair[1]) | _damaged(_STATISTICS_DOCUMENTS))
def test_statistics_files_load_or_raise_config_errors_naming_them(config_dir, raw):
    statistics_path = config_dir / "fuzzed-statistics.json"
    statistics_path.write_bytes(raw)
    document = json.dumps({**_CONFIG_BASE, "statistics_file": statistics_path.name}).encode()
    config, error = _load(config_dir, document, TRAIN)
    if error is not None:
        assert str(statistics_path) in str(error), str(error)
        return
    assert config.statistics and all(
        math.isfinite(mean) and math.isfinite(std) and std > 0 for mean, std in config.statistics.values()
    )


# --------------------------------------------------------------------------------------------
# Regressions: inputs the fuzzers above found, once each, so a returning bug fails by name


def test_tiff_tag_without_values_is_a_tiff_error(tiff_sources, scratch):
    source = tiff_sources[0]
    tiff = bytearray(source.data)
    _pack(tiff, source.entries[256] + 4, "I", 0)  # ImageWidth with a count of 0: was an IndexError
    (scratch / "no_width.tif").write_bytes(bytes(tiff))
    with pytest.raises(TiffError):
        read_band(scratch / "no_width.tif", source.shape, source.dtype)


def test_strip_inside_the_header_is_refused(tiff_sources, scratch):
    source = tiff_sources[0]
    tiff = bytearray(source.data)
    _pack(tiff, source.entries[273] + 8, "I", 0)  # was read as pixels: the header's own bytes
    (scratch / "strip_at_0.tif").write_bytes(bytes(tiff))
    with pytest.raises(
        TiffError, match=r"^malformed TIFF: strip 0 starts at byte 0, inside the file header$"
    ):
        read_band(scratch / "strip_at_0.tif", source.shape, source.dtype)


def test_declared_gigapixels_are_refused_before_decoding(tiff_sources, scratch):
    source = tiff_sources[2]
    tiff = bytearray(source.data)
    _pack(tiff, source.ifd_offset, "H", 12)  # a short directory hands the file to tifffile
    _entry(tiff, source.entries[257], 257, 4, 1, 4_000_000)
    path = scratch / "tall.tif"
    path.write_bytes(bytes(tiff))
    start = time.perf_counter()
    with pytest.raises(TiffError, match=r"^raster is 4000000x120 pixels, expected 120x120$"):
        read_band(path, (120, 120), np.float32)
    # tifffile used to allocate and fill the 1.9 GB raster first: 9 s for this 30 KB file.
    assert time.perf_counter() - start < CALL_TIME_LIMIT_S / 2


_PAST_PARSER_LIMITS = {
    "deep": b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # was a RecursionError
    "digits": b'{"labels": [' + b"7" * 5000 + b"]}",  # was a ValueError of int(), not a JSON error
}


@pytest.mark.parametrize("raw", _PAST_PARSER_LIMITS.values(), ids=_PAST_PARSER_LIMITS.keys())
def test_json_past_the_parser_limits_is_malformed(v1_json_root, v1_s1_roots, raw):
    (v1_json_root / ONE / ONE_JSON).write_bytes(raw)
    with pytest.raises(BadPatchError, match=rf"^patch {ONE}: {ONE_JSON}: malformed JSON: "):
        open_archive(v1_json_root, version=1).read_patch(ONE)
    s2_root, s1_root = v1_s1_roots
    (s1_root / S1_ONE / S1_ONE_JSON).write_bytes(raw)
    s1_pairs_v1.cache_clear()
    with pytest.raises(UserError, match=rf"^Sentinel-1 patch {S1_ONE}: {S1_ONE_JSON}: unreadable metadata"):
        open_archive(s2_root, s1_root=s1_root).read_patch(ONE)


@pytest.fixture
def fresh_v2(tmp_path, example_paths) -> Path:
    return _v2_layout(tmp_path, example_paths)


def test_parquet_text_that_is_not_utf8_names_the_file(fresh_v2):
    path = fresh_v2 / V2_METADATA
    # Parquet readers do not check UTF-8: this was a UnicodeDecodeError from deep inside pyarrow.
    path.write_bytes(path.read_bytes().replace(V2_ID.encode(), b"\xd3" + V2_ID.encode()[1:]))
    with pytest.raises(UserError, match=rf"^{path} cannot be read as parquet: .*UTF8"):
        official_v2_splits(fresh_v2)


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        # Strings were truthy: every patch silently counted as snowy and left out of the splits.
        ("contains_seasonal_snow", ["false", "false"], "holds string, expected true/false flags"),
        ("split", [1, 2], "holds int64, expected text"),
        ("patch_id", [1, 2], "holds int64, expected text"),
    ],
)
def test_parquet_column_of_another_type_is_named(fresh_v2, column, values, message):
    path = fresh_v2 / V2_METADATA
    pq.write_table(pa.table({**_VALID_V2_ROWS, column: values}), path)
    with pytest.raises(UserError, match=rf"^{path}: column '{column}' {message}$"):
        official_v2_splits(fresh_v2)


@pytest.mark.parametrize("patch_id", [None, "../../etc_1_1", "S2A x_1_1 "])
def test_parquet_patch_ids_are_checked_like_split_csv_names(fresh_v2, patch_id):
    path = fresh_v2 / V2_METADATA
    pq.write_table(pa.table({**_VALID_V2_ROWS, "patch_id": [patch_id, V2_ID]}), path)
    # Were returned as split members (None included), to fail later wherever they were used.
    with pytest.raises(UserError, match=rf"^{re.escape(f'{path}: invalid patch name {patch_id!r}')}"):
        official_v2_splits(fresh_v2)


def test_metadata_files_of_different_arrow_types_read_together(fresh_v2):
    flagged = {
        **_VALID_V2_ROWS,
        "patch_id": pa.array(["S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_2_2"] * 2).dictionary_encode(),
        "labels": pa.array([["Pastures"], []], pa.large_list(pa.large_string())),
        "s1_name": pa.array([None, None], pa.large_string()),
    }
    pq.write_table(pa.table(flagged), fresh_v2 / V2_SNOW_CLOUD_METADATA)
    # Joining the two files' label columns was an ArrowTypeError.
    patch = open_archive(fresh_v2, s1_root=fresh_v2).read_patch(V2_ID)
    assert patch.labels_19 == ("Arable land", "Pastures") and patch.s1_name == V2_S1
    pq.write_table(pa.table(flagged).slice(0, 0), fresh_v2 / V2_SNOW_CLOUD_METADATA)
    archive_module._v2_metadata.cache_clear()
    assert open_archive(fresh_v2).read_patch(V2_ID).labels_19 == ("Arable land", "Pastures")


def test_v2_names_with_a_dot_dot_product_stay_in_their_folders(fresh_v2):
    s1_folder = fresh_v2 / "BigEarthNet-S1"
    archive = open_archive(fresh_v2, s1_root=s1_folder)
    # '..__' passed as a name and led from BigEarthNet-S2/ to its parent.
    with pytest.raises(UserError, match=r"^invalid v2 patch_id '\.\.__'"):
        archive.patch_folder("..__")
    rows = {**_VALID_V2_ROWS, "s1_name": ["..___", V2_S1]}
    pq.write_table(pa.table(rows), fresh_v2 / V2_METADATA)
    archive_module._v2_metadata.cache_clear()
    # ... and this Sentinel-1 name led out of the S1 root given, to <S1 root>/../..___.
    with pytest.raises(BadPatchError, match=r": metadata.parquet: invalid Sentinel-1 patch name '\.\.___'$"):
        archive.read_patch(V2_ID)


_CONFIG_CRASHES = {
    # Found by the fuzzers above; each raised the error named instead of a ConfigError.
    "digits-ValueError": '{"seed": ' + "1" * 5000 + "}",
    "float-OverflowError": json.dumps({**_CONFIG_BASE, "learning_rate": 10**400}),
    "tilde-nul-ValueError": json.dumps({**_CONFIG_BASE, "out_dir": "~\0"}),
    "tilde-surrogate-UnicodeEncodeError": json.dumps({**_CONFIG_BASE, "tr_tf_record_files": "~\ud800"}),
}


@pytest.mark.parametrize("text", _CONFIG_CRASHES.values(), ids=_CONFIG_CRASHES.keys())
def test_config_values_that_crashed_the_loader(config_dir, text):
    config, error = _load(config_dir, text.encode(), TRAIN)
    assert error is not None and str(config_dir / "config.json") in str(error)


def test_saved_config_without_validation_files_loads_back(config_dir):
    # The unset list was saved as [], which the loader refused: no run without validation files could
    # be repeated from its saved config.
    document = {**_CONFIG_BASE, "val_tf_record_files": None}
    config, error = _load(config_dir, json.dumps(document).encode(), TRAIN)
    assert error is None and config.val_tf_record_files == ()


def test_empty_record_folder_message_names_the_key(config_dir):
    # Named the folder only, not the key whose value led there.
    (config_dir / "empty").mkdir(exist_ok=True)
    document = {**_CONFIG_BASE, "val_tf_record_files": ["empty"]}
    config, error = _load(config_dir, json.dumps(document).encode(), TRAIN)
    assert "holds no *.tfrecord files" in str(error)
    assert "val_tf_record_files" in str(error), str(error)


_DEEP_ARRAY = "[" * 10**5 + "]" * 10**5
_STATISTICS_REGRESSIONS = {
    # Crashes the fuzzer found in stats.load_statistics (config.py calls it for statistics_file).
    "mean-OverflowError": json.dumps(_statistics_file({"B02": {"mean": 10**400, "std": 1.0}})),
    "digits-ValueError": '{"format": "bigearthnet-tf-statistics", "version": ' + "1" * 5000 + "}",
    "nested-RecursionError": '{"format": "bigearthnet-tf-statistics", "bands": ' + _DEEP_ARRAY + "}",
}


@pytest.mark.parametrize("text", _STATISTICS_REGRESSIONS.values(), ids=_STATISTICS_REGRESSIONS.keys())
def test_statistics_file_crash_regressions(config_dir, text):
    (config_dir / "fuzzed-statistics.json").write_text(text)
    document = json.dumps({**_CONFIG_BASE, "statistics_file": "fuzzed-statistics.json"})
    config, error = _load(config_dir, document.encode(), TRAIN)
    assert str(config_dir / "fuzzed-statistics.json") in str(error)
