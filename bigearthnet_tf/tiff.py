"""Single-band GeoTIFFs: a fast reader for the files BigEarthNet ships, and a deterministic writer.

Preparing an archive reads 13 small files per patch, so the per-file cost decides the throughput.
`tifffile.imread` spends about 200 us per file on generality we do not need. BigEarthNet's rasters
are all classic TIFFs with one IFD, no compression, pixel data in strips, one sample per pixel,
uint16 (Sentinel-2) or float32 (Sentinel-1). For exactly that case `read_band` reads the file with
one system call, parses the IFD with `struct` and views the pixel bytes with `np.frombuffer`
(about 8 us per file). The walk is remembered per kind of file: a file of the same size whose
header, directory and strip tables hold the same bytes has the same layout, which a comparison of
those bytes confirms in about 2 us (BigEarthNet's files of one band differ only there in pixels and
georeferencing values). Every other TIFF (compressed, tiled, BigTIFF, multi-page, other sample
formats) goes through `tifffile`, so valid files are never rejected just because they are unusual.

The writer lays files out exactly as GDAL wrote the archive's (same tags, strips of about 8 KiB),
so synthetic archives exercise the same reading path as real ones.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bigearthnet_tf.files import read_input_file

__all__ = ["TiffError", "read_band", "write_geotiff", "encode_geotiff", "utm_epsg", "rows_per_strip"]

# TIFF tag ids the fast path looks at.
_IMAGE_WIDTH = 256
_IMAGE_LENGTH = 257
_BITS_PER_SAMPLE = 258
_COMPRESSION = 259
_STRIP_OFFSETS = 273
_SAMPLES_PER_PIXEL = 277
_ROWS_PER_STRIP = 278
_STRIP_BYTE_COUNTS = 279
_TILE_WIDTH = 322
_TILE_OFFSETS = 324
_SAMPLE_FORMAT = 339

_CLASSIC_MAGIC = 42
_BIGTIFF_MAGIC = 43
_NO_COMPRESSION = 1
_HEADER_BYTES = 8  # byte order, version number, offset of the first directory

# TIFF field type -> (struct code, bytes per value), for the integer types these tags may use.
_FIELD_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4)}

# (BitsPerSample, SampleFormat) -> numpy type code; SampleFormat 1 = unsigned int, 3 = IEEE float.
_PIXEL_TYPES = {(16, 1): "u2", (32, 3): "f4"}

# GeoTIFF tags (GeoTIFF 1.0 specification).
MODEL_PIXEL_SCALE = 33550
MODEL_TIEPOINT = 33922
GEO_KEY_DIRECTORY = 34735
GEO_ASCII_PARAMS = 34737

# GDAL's default strip size: strips of about 8 KiB, which is what the real archive's files use.
_STRIP_BYTES = 8192


# A band of 120x120 float32 is 57.6 KB uncompressed; generous room for tags and odd layouts, yet a
# file claiming or holding more is refused before it is read.
MAX_BAND_FILE_BYTES = 16 << 20


class TiffError(ValueError):
    """A raster that cannot be used: not a TIFF, truncated, or not the expected size or type."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self):
        # Keeps the error intact when it crosses a process boundary (prepare runs workers).
        return (type(self), (self.reason,))


class _Unsupported(Exception):
    """A valid TIFF outside the fast path's case; tifffile reads it instead."""


def read_band(path: str | os.PathLike, shape: Sequence[int], dtype: np.dtype | type | str) -> np.ndarray:
    """Read a single-band TIFF as a 2-D array; raise TiffError unless it has this shape and dtype."""
    return decode_band(_read_file(path), shape, dtype)


def decode_band(data, shape: Sequence[int], dtype: np.dtype | type | str) -> np.ndarray:
    """`read_band` for the bytes of a TIFF file already in memory (a bytes-like object)."""
    expected_shape = (int(shape[0]), int(shape[1]))
    expected_dtype = np.dtype(dtype)
    key = (len(data), bytes(data[:_HEADER_BYTES]), expected_shape, expected_dtype)
    layout = _LAYOUTS.get(key)
    if layout is None or not layout.holds(data):
        try:
            layout = _simple_layout(data, expected_shape, expected_dtype)
        except _Unsupported:
            return _decode_with_tifffile(data, expected_shape, expected_dtype)
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout.pixels(data)


def _decode_with_tifffile(data, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    _check_declared_raster(io.BytesIO(data), shape, dtype)
    array = _read_with_tifffile(io.BytesIO(data))
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.shape != shape:
        raise TiffError(f"raster is {_size(array.shape)} pixels, expected {_size(shape)}")
    if array.dtype != dtype:
        raise TiffError(f"pixel type is {array.dtype}, expected {dtype}")
    return array


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def _read_file(path: str | os.PathLike) -> bytearray:
    # One open, one fstat, one readv into a buffer of the exact size: about 6 us for a 30 KB file.
    # Only regular files, and at most MAX_BAND_FILE_BYTES: memory stays bounded whatever a file holds.
    return read_input_file(path, MAX_BAND_FILE_BYTES)


@dataclass(frozen=True)
class _Layout:
    """Where a simple TIFF's pixels are, and the bytes that said so.

    `evidence` holds every byte the directory walk read (header, directory, strip arrays), merged
    into spans: a file of the same size with the same bytes there walks to the same layout, with
    the same checks passed, so `holds` stands in for the walk.
    """

    evidence: tuple[tuple[int, bytes], ...]  # (offset, bytes)
    dtype: np.dtype  # as stored, byte order included
    shape: tuple[int, int]
    strips: tuple[tuple[int, int], ...]  # (offset, byte count) of each strip's pixel rows
    contiguous: bool

    def holds(self, data) -> bool:
        # bytes() first: a memoryview (an archive file's mapped blocks) compares item by item
        return all(
            bytes(data[start : start + len(expected)]) == expected for start, expected in self.evidence
        )

    def pixels(self, data) -> np.ndarray:
        if self.contiguous:
            count = self.shape[0] * self.shape[1]
            array = np.frombuffer(data, dtype=self.dtype, count=count, offset=self.strips[0][0])
        else:
            view = memoryview(data)
            joined = bytearray().join(view[start : start + needed] for start, needed in self.strips)
            array = np.frombuffer(joined, dtype=self.dtype)
        if not self.dtype.isnative:
            array = array.astype(self.dtype.newbyteorder("="))
        return array.reshape(self.shape)


# A directory is walked once per kind of file: BigEarthNet's files of one band differ only in their
# pixels and georeferencing values, which the fast path never reads. Keyed by (size, header, shape, dtype).
_LAYOUTS: dict[tuple, _Layout] = {}
_MAX_LAYOUTS = 64


def _simple_layout(data, shape: tuple[int, int], dtype: np.dtype) -> _Layout:
    """The layout of an uncompressed, stripped, single-sample classic TIFF of this shape and dtype;
    TiffError if it is broken or not of them, _Unsupported for any other kind of TIFF."""
    size = len(data)
    if size < 8:
        raise TiffError(f"not a TIFF file (only {size} bytes)")
    head = bytes(data[:2])
    if head == b"II":
        order = "<"
    elif head == b"MM":
        order = ">"
    else:
        raise TiffError(f"not a TIFF file (starts with {bytes(data[:4])!r})")
    magic, ifd_offset = struct.unpack_from(order + "HI", data, 2)
    if magic == _BIGTIFF_MAGIC:
        raise _Unsupported
    if magic != _CLASSIC_MAGIC:
        raise TiffError(f"not a TIFF file (version number {magic}, expected 42)")
    if ifd_offset + 2 > size:
        raise TiffError(f"truncated file: image directory at byte {ifd_offset}, file has {size} bytes")
    (entry_count,) = struct.unpack_from(order + "H", data, ifd_offset)
    entries_end = ifd_offset + 2 + 12 * entry_count
    if entries_end + 4 > size:
        raise TiffError(f"truncated file: image directory ends past byte {size}")
    (next_ifd,) = struct.unpack_from(order + "I", data, entries_end)
    if next_ifd != 0:
        raise _Unsupported  # several pages: let tifffile decide what the first series is
    read = [(0, _HEADER_BYTES), (ifd_offset, entries_end + 4)]  # (start, end) of every byte read

    tags: dict[int, tuple[int, ...]] = {}
    # Each entry's value field is read as one unsigned 32-bit number: a single SHORT or LONG (all
    # but the strip arrays in practice) is then decoded with integer arithmetic, no more unpacking.
    fields = _entry_struct(order, entry_count).unpack_from(data, ifd_offset + 2)
    little = order == "<"
    field_iter = iter(fields)
    for tag, field_type, count, value in zip(field_iter, field_iter, field_iter, field_iter, strict=True):
        if tag not in _WANTED_TAGS:
            continue
        if count == 1 and field_type == 3:
            tags[tag] = ((value & 0xFFFF) if little else (value >> 16),)
        elif count == 1 and field_type == 4:
            tags[tag] = (value,)
        elif count == 0:
            raise _Unsupported  # a tag without values is malformed; tifffile decides what it means
        else:
            tags[tag] = _tag_values(data, order, field_type, count, value, read)

    if _TILE_WIDTH in tags or _TILE_OFFSETS in tags:
        raise _Unsupported
    if tags.get(_COMPRESSION, (_NO_COMPRESSION,))[0] != _NO_COMPRESSION:
        raise _Unsupported
    if tags.get(_SAMPLES_PER_PIXEL, (1,))[0] != 1:
        raise _Unsupported
    bits = tags.get(_BITS_PER_SAMPLE, (1,))
    sample_format = tags.get(_SAMPLE_FORMAT, (1,))
    type_code = _PIXEL_TYPES.get((bits[0], sample_format[0]))
    if type_code is None or _IMAGE_WIDTH not in tags or _IMAGE_LENGTH not in tags:
        raise _Unsupported
    if _STRIP_OFFSETS not in tags or _STRIP_BYTE_COUNTS not in tags:
        raise TiffError("malformed TIFF: no strip offsets or byte counts")

    width = tags[_IMAGE_WIDTH][0]
    height = tags[_IMAGE_LENGTH][0]
    if (height, width) != shape:
        raise TiffError(f"raster is {height}x{width} pixels, expected {_size(shape)}")
    file_dtype = np.dtype(order + type_code)
    if file_dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise TiffError(f"pixel type is {file_dtype.newbyteorder('=')}, expected {dtype}")

    offsets = tags[_STRIP_OFFSETS]
    counts = tags[_STRIP_BYTE_COUNTS]
    rows_per_strip = min(tags.get(_ROWS_PER_STRIP, (height,))[0], height) or height
    strip_count = -(-height // rows_per_strip)
    if len(offsets) != strip_count or len(counts) != strip_count:
        raise TiffError(
            f"malformed TIFF: {len(offsets)} strip offsets and {len(counts)} byte counts, "
            f"expected {strip_count} strips of {rows_per_strip} rows"
        )
    row_bytes = width * file_dtype.itemsize
    strips = []
    contiguous = True
    position = offsets[0]
    for index in range(strip_count):
        rows = min(rows_per_strip, height - index * rows_per_strip)
        needed = rows * row_bytes
        start = offsets[index]
        if counts[index] < needed:
            raise TiffError(f"malformed TIFF: strip {index} holds {counts[index]} bytes, expected {needed}")
        if start < _HEADER_BYTES:  # 0 marks a missing strip to other readers, who fill it with zeros
            raise TiffError(f"malformed TIFF: strip {index} starts at byte {start}, inside the file header")
        if start + needed > size:
            raise TiffError(
                f"truncated file: strip {index} ends at byte {start + needed}, file has {size} bytes"
            )
        contiguous = contiguous and start == position
        position = start + needed
        strips.append((start, needed))
    return _Layout(_evidence(data, read), file_dtype, (height, width), tuple(strips), contiguous)


def _evidence(data, read: list[tuple[int, int]]) -> tuple[tuple[int, bytes], ...]:
    """The bytes of `data` in the (start, end) ranges `read`, overlapping and touching ones merged
    (a GDAL file's header, directory and strip arrays are one span)."""
    merged: list[list[int]] = []
    for start, end in sorted(read):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((start, bytes(data[start:end])) for start, end in merged)


_WANTED_TAGS = frozenset(
    {
        _IMAGE_WIDTH,
        _IMAGE_LENGTH,
        _BITS_PER_SAMPLE,
        _COMPRESSION,
        _STRIP_OFFSETS,
        _SAMPLES_PER_PIXEL,
        _ROWS_PER_STRIP,
        _STRIP_BYTE_COUNTS,
        _TILE_WIDTH,
        _TILE_OFFSETS,
        _SAMPLE_FORMAT,
    }
)


def _tag_values(
    data, order: str, field_type: int, count: int, value: int, read: list[tuple[int, int]]
) -> tuple[int, ...]:
    """The integer values of one IFD entry: inline when they fit in 4 bytes, else at offset `value`
    (whose range is added to `read`)."""
    try:
        code, width = _FIELD_TYPES[field_type]
    except KeyError:
        raise _Unsupported from None
    if count * width <= 4:
        return struct.unpack_from(f"{order}{count}{code}", struct.pack(order + "I", value))
    if value + count * width > len(data):
        raise TiffError(f"truncated file: tag values at byte {value} run past byte {len(data)}")
    read.append((value, value + count * width))
    return struct.unpack_from(f"{order}{count}{code}", data, value)


@functools.lru_cache(maxsize=64)
def _entry_struct(order: str, entry_count: int) -> struct.Struct:
    return struct.Struct(order + "HHII" * entry_count)


def _check_declared_raster(source: io.BytesIO, shape: tuple[int, int], dtype: np.dtype) -> None:
    """Raise TiffError unless the first image's header declares this shape and type.

    Checked before tifffile decodes anything: a damaged header may declare gigapixels, which tifffile
    would allocate and fill (seconds, or all memory) only for the size check to refuse them.
    """
    import tifffile

    try:
        with tifffile.TiffFile(source) as handle:
            series = handle.series[0]
            declared_shape, declared_dtype = tuple(series.shape), np.dtype(series.dtype)
    except Exception as error:  # tifffile raises many types for damaged files
        raise TiffError(f"unreadable TIFF: {error}") from error
    if declared_shape != shape:
        raise TiffError(f"raster is {_size(declared_shape)} pixels, expected {_size(shape)}")
    if declared_dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise TiffError(f"pixel type is {declared_dtype.newbyteorder('=')}, expected {dtype}")


def _read_with_tifffile(source: io.BytesIO) -> np.ndarray:
    import tifffile  # imported here: the fast path never needs it

    try:
        source.seek(0)
        return tifffile.imread(source)
    except Exception as error:  # tifffile raises many types for damaged files
        if "imagecodecs" in str(error):  # a compression tifffile decodes only with imagecodecs
            raise TiffError(f"compressed ({error}); install the codecs: pip install imagecodecs") from error
        raise TiffError(f"unreadable TIFF: {error}") from error


def utm_epsg(zone: int, north: bool = True) -> int:
    """The EPSG code of WGS 84 / UTM zone `zone` (32601-32660 north, 32701-32760 south)."""
    if not 1 <= zone <= 60:
        raise ValueError(f"UTM zone must be 1-60, got {zone}")
    return (32600 if north else 32700) + zone


def rows_per_strip(width: int, dtype: np.dtype | type | str) -> int:
    """Rows per strip the way GDAL chooses them (strips of about 8 KiB), as in the real archive."""
    return max(1, _STRIP_BYTES // (width * np.dtype(dtype).itemsize))


def write_geotiff(
    path: str | os.PathLike, array: np.ndarray, *, ulx: float, uly: float, pixel_size: float, epsg: int
) -> None:
    """Write a 2-D uint16 or float32 array as an uncompressed UTM GeoTIFF; same input, same bytes."""
    with open(path, "wb") as file:
        file.write(encode_geotiff(array, ulx=ulx, uly=uly, pixel_size=pixel_size, epsg=epsg))


def encode_geotiff(array: np.ndarray, *, ulx: float, uly: float, pixel_size: float, epsg: int) -> bytes:
    """The bytes of a GeoTIFF laid out as GDAL writes BigEarthNet's files (same tags, strips of ~8 KiB)."""
    # Encoded here rather than with tifffile.imwrite, which costs about 1.2 ms per file and would
    # make a 600-patch synthetic archive (7,200 files) take ten seconds; tests check that tifffile
    # reads these files back with the same pixels and GeoTIFF keys.
    if array.ndim != 2:
        raise ValueError(f"a GeoTIFF band must be 2-D, got shape {array.shape}")
    kind = np.dtype(array.dtype).newbyteorder("<")
    formats = {np.dtype("<u2"): 1, np.dtype("<f4"): 3}
    if kind not in formats:
        raise ValueError(f"only uint16 and float32 bands are written, got {array.dtype}")
    zone = epsg % 100
    if epsg // 100 not in (326, 327) or not 1 <= zone <= 60:
        raise ValueError(f"only WGS 84 / UTM EPSG codes (32601-32660, 32701-32760) are supported, got {epsg}")
    height, width = array.shape
    hemisphere = "N" if epsg // 100 == 326 else "S"
    projected_citation = f"WGS 84 / UTM zone {zone}{hemisphere}|"
    geographic_citation = "WGS 84|"
    # The same seven GeoKeys, in the same order, that the real BigEarthNet files carry.
    geo_keys = (
        (1, 1, 0, 7),  # directory version 1, revision 1.0, seven keys
        (1024, 0, 1, 1),  # GTModelType: projected
        (1025, 0, 1, 1),  # GTRasterType: pixel is area
        (1026, GEO_ASCII_PARAMS, len(projected_citation), 0),  # GTCitation
        (2049, GEO_ASCII_PARAMS, len(geographic_citation), len(projected_citation)),  # GeogCitation
        (2054, 0, 1, 9102),  # GeogAngularUnits: degree
        (3072, 0, 1, epsg),  # ProjectedCSType
        (3076, 0, 1, 9001),  # ProjLinearUnits: metre
    )
    key_values = [value for key in geo_keys for value in key]
    ascii_params = (projected_citation + geographic_citation).encode("ascii") + b"\0"

    rows = min(rows_per_strip(width, kind), height)
    row_bytes = width * kind.itemsize
    strip_rows = [min(rows, height - top) for top in range(0, height, rows)]
    strip_counts = [n * row_bytes for n in strip_rows]
    strip_count = len(strip_rows)

    short, long_, ascii_, double = 3, 4, 2, 12
    # (tag, type, values); sorted by tag as TIFF requires. Strip offsets are filled in below.
    entries: list[tuple[int, int, list]] = [
        (_IMAGE_WIDTH, short, [width]),
        (_IMAGE_LENGTH, short, [height]),
        (_BITS_PER_SAMPLE, short, [8 * kind.itemsize]),
        (_COMPRESSION, short, [_NO_COMPRESSION]),
        (262, short, [1]),  # PhotometricInterpretation: min-is-black
        (_STRIP_OFFSETS, long_, [0] * strip_count),
        (_SAMPLES_PER_PIXEL, short, [1]),
        (_ROWS_PER_STRIP, short, [rows]),
        (_STRIP_BYTE_COUNTS, long_, strip_counts),
        (284, short, [1]),  # PlanarConfiguration: contiguous
        (_SAMPLE_FORMAT, short, [formats[kind]]),
        (MODEL_PIXEL_SCALE, double, [float(pixel_size), float(pixel_size), 0.0]),
        (MODEL_TIEPOINT, double, [0.0, 0.0, 0.0, float(ulx), float(uly), 0.0]),
        (GEO_KEY_DIRECTORY, short, key_values),
        (GEO_ASCII_PARAMS, ascii_, ascii_params),
    ]
    codes = {short: "H", long_: "I", double: "d"}
    widths = {short: 2, long_: 4, double: 8, ascii_: 1}

    def packed(field_type: int, values) -> bytes:
        if field_type == ascii_:
            return bytes(values)
        return struct.pack(f"<{len(values)}{codes[field_type]}", *values)

    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    # Values too long for their entry follow the directory, word-aligned, then the pixel strips.
    # GDAL stores the strip byte counts before the strip offsets; doing the same makes our files
    # byte-identical to the archive's (tests check this on the real example patches).
    out_of_line = sorted(
        (entry for entry in entries if len(entry[2]) * widths[entry[1]] > 4),
        key=lambda entry: (entry[0] != _STRIP_BYTE_COUNTS, entry[0]),
    )
    placed: dict[int, int] = {}
    position = ifd_offset + ifd_size
    for tag, field_type, values in out_of_line:
        nbytes = len(values) * widths[field_type]
        placed[tag] = position
        position += nbytes + (nbytes & 1)
    strip_offsets = []
    for count in strip_counts:
        strip_offsets.append(position)
        position += count
    entries[5] = (_STRIP_OFFSETS, long_, strip_offsets)
    values_by_tag = {tag: (field_type, values) for tag, field_type, values in entries}

    directory = [struct.pack("<2sHI", b"II", _CLASSIC_MAGIC, ifd_offset), struct.pack("<H", len(entries))]
    for tag, field_type, values in entries:
        if tag in placed:
            directory.append(struct.pack("<HHII", tag, field_type, len(values), placed[tag]))
        else:
            directory.append(
                struct.pack("<HHI", tag, field_type, len(values)) + packed(field_type, values).ljust(4, b"\0")
            )
    directory.append(struct.pack("<I", 0))  # no further image directories
    for tag, _, _ in out_of_line:
        body = packed(*values_by_tag[tag])
        directory.append(body + b"\0" * (len(body) & 1))
    header = b"".join(directory)
    return header + np.ascontiguousarray(array, dtype=kind).tobytes()
