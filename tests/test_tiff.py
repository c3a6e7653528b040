"""The fast GeoTIFF reader against tifffile, its fallback and its errors; the GeoTIFF writer."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tifffile

from bigearthnet_tf import tiff
from bigearthnet_tf.tiff import TiffError, encode_geotiff, read_band, write_geotiff


def _real_tiffs(example_paths):
    return sorted(example_paths.s2.glob("*/*.tif")) + sorted(example_paths.s1.glob("*/*.tif"))


@pytest.fixture
def no_fallback(monkeypatch):
    """Make any use of tifffile by read_band fail, to prove the fast path did the work."""

    def refuse(path):
        raise AssertionError(f"fell back to tifffile for {path}")

    monkeypatch.setattr(tiff, "_read_with_tifffile", refuse)


@pytest.fixture
def fallback_calls(monkeypatch):
    """Record the bytes read_band hands to tifffile (the file is read once, then decoded from memory)."""
    calls = []
    original = tiff._read_with_tifffile

    def spy(source):
        calls.append(source.getvalue())
        return original(source)

    monkeypatch.setattr(tiff, "_read_with_tifffile", spy)
    return calls


def test_fast_reader_equals_tifffile_on_every_real_example_file(example_paths, no_fallback):
    files = _real_tiffs(example_paths)
    assert len(files) == 6 * 12 + 6 * 2
    for path in files:
        expected = tifffile.imread(path)
        assert expected.dtype in (np.uint16, np.float32)
        array = read_band(path, expected.shape, expected.dtype)
        assert array.dtype == expected.dtype and array.shape == expected.shape
        np.testing.assert_array_equal(array, expected, err_msg=str(path))


def test_real_sentinel1_files_have_several_strips_and_read_equal(example_paths, no_fallback):
    path = sorted(example_paths.s1.glob("*/*_VH.tif"))[0]
    with tifffile.TiffFile(path) as handle:
        assert len(handle.pages[0].dataoffsets) == 8
    np.testing.assert_array_equal(read_band(path, (120, 120), np.float32), tifffile.imread(path))


def test_returned_arrays_are_writable(example_paths):
    path = sorted(example_paths.s2.glob("*/*_B02.tif"))[0]
    array = read_band(path, (120, 120), "uint16")
    array[0, 0] = 7  # consumers may normalise in place
    assert array[0, 0] == 7


def test_big_endian_file_reads_on_the_fast_path(tmp_path, no_fallback):
    values = np.arange(60 * 60, dtype=np.uint16).reshape(60, 60)
    path = tmp_path / "big_endian.tif"
    tifffile.imwrite(path, values, byteorder=">", rowsperstrip=7, photometric="minisblack")
    array = read_band(path, (60, 60), np.uint16)
    assert array.dtype == np.dtype("uint16")
    np.testing.assert_array_equal(array, values)


def test_strips_out_of_order_in_the_file_are_reassembled(tmp_path, no_fallback):
    values = np.arange(120 * 120, dtype=np.uint16).reshape(120, 120)
    data = bytearray(encode_geotiff(values, ulx=0, uly=0, pixel_size=10, epsg=32633))
    with tifffile.TiffFile(_write(tmp_path / "a.tif", data)) as handle:
        offsets_tag = handle.pages[0].tags[273]
        first_strip = handle.pages[0].dataoffsets[0]
        first_count = handle.pages[0].databytecounts[0]
    # Move strip 0 to the end of the file and point its offset there.
    data += data[first_strip : first_strip + first_count]
    struct.pack_into("<I", data, offsets_tag.valueoffset, len(data) - first_count)
    path = _write(tmp_path / "moved.tif", data)
    np.testing.assert_array_equal(read_band(path, (120, 120), np.uint16), values)


# The directory walk is remembered per kind of file; a file that matches an earlier one in size
# and header but not in a byte the walk read must be walked (and judged) again.
def _strip_tags(data):
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as handle:
        page = handle.pages[0]
        return page.tags[273].valueoffset, page.tags[279].valueoffset, list(page.dataoffsets)


def test_a_file_with_the_layout_of_an_earlier_one_gives_its_own_pixels(no_fallback):
    first = np.arange(120 * 120, dtype=np.uint16).reshape(120, 120)
    second = first[::-1].copy()
    data = [encode_geotiff(values, ulx=0, uly=0, pixel_size=10, epsg=32633) for values in (first, second)]
    assert len(data[0]) == len(data[1]) and data[0][:8] == data[1][:8]
    for _ in range(2):
        np.testing.assert_array_equal(tiff.decode_band(data[0], (120, 120), np.uint16), first)
        np.testing.assert_array_equal(tiff.decode_band(data[1], (120, 120), np.uint16), second)


def test_a_strip_table_unlike_the_remembered_one_is_read_again(no_fallback):
    values = np.arange(120 * 120, dtype=np.uint16).reshape(120, 120)
    good = encode_geotiff(values, ulx=0, uly=0, pixel_size=10, epsg=32633)
    offsets_at, counts_at, offsets = _strip_tags(good)
    np.testing.assert_array_equal(tiff.decode_band(good, (120, 120), np.uint16), values)
    # Same size and header: strips 0 and 1 swapped in the table (and in the file) read back in order.
    swapped = bytearray(good)
    strip = offsets[1] - offsets[0]
    swapped[offsets[0] : offsets[0] + strip], swapped[offsets[1] : offsets[1] + strip] = (
        good[offsets[1] : offsets[1] + strip],
        good[offsets[0] : offsets[0] + strip],
    )
    struct.pack_into("<II", swapped, offsets_at, offsets[1], offsets[0])
    np.testing.assert_array_equal(tiff.decode_band(swapped, (120, 120), np.uint16), values)
    # A byte count too small for its strip is refused, though all else matches the file before.
    short = bytearray(good)
    struct.pack_into("<I", short, counts_at, 100)
    with pytest.raises(TiffError, match="strip 0 holds 100 bytes"):
        tiff.decode_band(short, (120, 120), np.uint16)
    np.testing.assert_array_equal(tiff.decode_band(good, (120, 120), np.uint16), values)


def test_a_directory_entry_unlike_the_remembered_one_is_judged_again(example_paths, no_fallback):
    data = sorted(example_paths.s2.glob("*/*_B02.tif"))[0].read_bytes()
    expected = tiff.decode_band(data, (120, 120), np.uint16)
    (ifd,) = struct.unpack_from("<I", data, 4)
    wider = bytearray(data)
    struct.pack_into("<H", wider, ifd + 2 + 8, 121)  # the first entry, ImageWidth, holds 121
    with pytest.raises(TiffError, match="raster is 120x121 pixels, expected 120x120"):
        tiff.decode_band(wider, (120, 120), np.uint16)
    with pytest.raises(TiffError, match="raster is 120x120 pixels, expected 60x60"):
        tiff.decode_band(data, (60, 60), np.uint16)
    np.testing.assert_array_equal(tiff.decode_band(data, (120, 120), np.uint16), expected)


def _write(path, data):
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "options",
    [
        {"compression": "zlib"},
        {"tile": (32, 32)},
        {"bigtiff": True},
    ],
    ids=["deflate", "tiled", "bigtiff"],
)
def test_other_tiffs_fall_back_to_tifffile(tmp_path, fallback_calls, options):
    values = np.random.default_rng(3).integers(0, 10_000, (64, 64)).astype(np.uint16)
    path = tmp_path / "other.tif"
    tifffile.imwrite(path, values, photometric="minisblack", **options)
    np.testing.assert_array_equal(read_band(path, (64, 64), np.uint16), values)
    assert fallback_calls == [path.read_bytes()]


def test_fallback_still_checks_size_and_type(tmp_path):
    path = tmp_path / "deflate.tif"
    tifffile.imwrite(path, np.zeros((60, 60), np.uint16), compression="zlib", photometric="minisblack")
    with pytest.raises(TiffError, match=r"^raster is 60x60 pixels, expected 120x120$"):
        read_band(path, (120, 120), np.uint16)
    with pytest.raises(TiffError, match=r"^pixel type is uint16, expected float32$"):
        read_band(path, (60, 60), np.float32)


def test_wrong_size_is_reported(example_paths):
    path = sorted(example_paths.s2.glob("*/*_B05.tif"))[0]
    with pytest.raises(TiffError) as caught:
        read_band(path, (120, 120), np.uint16)
    assert caught.value.reason == "raster is 60x60 pixels, expected 120x120"


def test_wrong_pixel_type_is_reported(example_paths):
    path = sorted(example_paths.s1.glob("*/*_VV.tif"))[0]
    with pytest.raises(TiffError, match=r"^pixel type is float32, expected uint16$"):
        read_band(path, (120, 120), np.uint16)


def test_truncated_file_is_reported(example_paths, tmp_path):
    source = sorted(example_paths.s2.glob("*/*_B02.tif"))[0]
    data = source.read_bytes()
    assert len(data) == 29192
    path = _write(tmp_path / "cut.tif", data[:20000])
    with pytest.raises(
        TiffError, match=r"^truncated file: strip 2 ends at byte 24872, file has 20000 bytes$"
    ):
        read_band(path, (120, 120), np.uint16)


def test_file_cut_inside_its_header_is_reported(example_paths, tmp_path):
    data = sorted(example_paths.s2.glob("*/*_B02.tif"))[0].read_bytes()
    path = _write(tmp_path / "stub.tif", data[:100])
    with pytest.raises(TiffError, match=r"^truncated file: image directory ends past byte 100$"):
        read_band(path, (120, 120), np.uint16)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"labels": []}', "not a TIFF file (starts with b'{\"la')"),
        (b"II*", "not a TIFF file (only 3 bytes)"),
        (b"", "not a TIFF file (only 0 bytes)"),
        (b"II\x2b\x00\x08\x00\x00\x00", None),  # BigTIFF header without a body: tifffile's verdict
        (b"MM\x00\x07\x00\x00\x00\x08", "not a TIFF file (version number 7, expected 42)"),
    ],
    ids=["json", "three-bytes", "empty", "bigtiff-stub", "bad-version"],
)
def test_not_a_tiff_is_reported(tmp_path, content, reason):
    path = _write(tmp_path / "band.tif", content)
    with pytest.raises(TiffError) as caught:
        read_band(path, (20, 20), np.uint16)
    if reason is None:
        assert caught.value.reason.startswith("unreadable TIFF: ")
    else:
        assert caught.value.reason == reason


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_band(tmp_path / "absent.tif", (20, 20), np.uint16)


def test_tiff_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(TiffError("truncated file")))
    assert isinstance(error, ValueError) and error.reason == "truncated file"


def test_writer_reproduces_the_real_files_byte_for_byte(example_paths):
    # The same pixels and georeference give the exact bytes GDAL wrote for the archive.
    for path in _real_tiffs(example_paths):
        with tifffile.TiffFile(path) as handle:
            page = handle.pages[0]
            pixels = page.asarray()
            scale = page.tags[33550].value
            tiepoint = page.tags[33922].value
            keys = page.tags[34735].value
        epsg = keys[keys.index(3072) + 3]
        encoded = encode_geotiff(pixels, ulx=tiepoint[3], uly=tiepoint[4], pixel_size=scale[0], epsg=epsg)
        assert encoded == path.read_bytes(), path


def test_written_geotiff_reads_back_with_its_georeference(tmp_path):
    values = np.linspace(-25, 3, 120 * 120, dtype=np.float32).reshape(120, 120)
    path = tmp_path / "vv.tif"
    write_geotiff(path, values, ulx=668400, uly=6954420, pixel_size=10, epsg=32735)
    with tifffile.TiffFile(path) as handle:
        geo = handle.geotiff_metadata
        np.testing.assert_array_equal(handle.asarray(), values)
        assert handle.pages[0].compression == 1
        assert "Software" not in handle.pages[0].tags and "DateTime" not in handle.pages[0].tags
    assert geo["ModelTiepoint"] == [0.0, 0.0, 0.0, 668400.0, 6954420.0, 0.0]
    assert geo["ModelPixelScale"] == [10.0, 10.0, 0.0]
    assert int(geo["ProjectedCSTypeGeoKey"]) == 32735
    assert geo["GTCitationGeoKey"] == "WGS 84 / UTM zone 35S"
    np.testing.assert_array_equal(read_band(path, (120, 120), np.float32), values)


def test_writer_is_deterministic():
    values = np.random.default_rng(0).integers(0, 4000, (60, 60)).astype(np.uint16)
    first = encode_geotiff(values, ulx=1.5, uly=2.5, pixel_size=20, epsg=32601)
    assert first == encode_geotiff(values.copy(), ulx=1.5, uly=2.5, pixel_size=20, epsg=32601)


@pytest.mark.parametrize(
    ("array", "epsg", "message"),
    [
        (np.zeros((2, 2, 2), np.uint16), 32633, "must be 2-D"),
        (np.zeros((2, 2), np.int32), 32633, "only uint16 and float32"),
        (np.zeros((2, 2), np.uint16), 4326, "only WGS 84 / UTM EPSG codes"),
    ],
)
def test_writer_rejects_what_it_cannot_write(array, epsg, message):
    with pytest.raises(ValueError, match=message):
        encode_geotiff(array, ulx=0, uly=0, pixel_size=10, epsg=epsg)
