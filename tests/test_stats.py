"""Band statistics: exact against NumPy and exact rationals, streaming = one-shot, file format, CLI."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from helpers import write_records

from bigearthnet_tf import constants
from bigearthnet_tf.archive import Patch
from bigearthnet_tf.cli import main
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.record_formats import LEGACY
from bigearthnet_tf.stats import (
    FILE_FORMAT,
    BandStatistic,
    BandStatistics,
    Moments,
    compute_band_statistics,
    default_statistics,
    load_statistics,
    merge_all,
    save_statistics,
)

S2_SIZES = {band.name: band.size for band in constants.S2_BANDS}


def uniform_patches(
    count: int,
    seed: int,
    *,
    s2_low: int = 0,
    s2_high: int = 10_000,
    s1: tuple[tuple[float, float], tuple[float, float]] | None = ((-12.0, 4.0), (-19.0, 5.0)),
) -> list[Patch]:
    """Seeded patches: S2 uniform integers in [s2_low, s2_high), S1 normal (mean, std) for VV and VH.

    Each band gets its own offset, so a band mixed up with another one changes the result.
    """
    rng = np.random.default_rng(seed)
    patches = []
    for index in range(count):
        bands = {
            name: rng.integers(s2_low + 7 * i, s2_high + 7 * i, (size, size)).astype(np.uint16)
            for i, (name, size) in enumerate(S2_SIZES.items())
        }
        s1_bands = None
        if s1 is not None:
            s1_bands = {
                name: rng.normal(mean, std, (120, 120)).astype(np.float32)
                for name, (mean, std) in zip(constants.S1_BAND_NAMES, s1, strict=True)
            }
        patches.append(
            Patch(
                name=f"S2_patch_{index}",
                bands=bands,
                labels_43=("Pastures",),
                labels_19=("Pastures",),
                s1_name=f"S1_patch_{index}" if s1 is not None else None,
                s1_bands=s1_bands,
            )
        )
    return patches


def pixels(patches: list[Patch], band: str) -> np.ndarray:
    """All pixels of one band, concatenated, as float64."""
    if band in constants.S1_BAND_NAMES:
        return np.concatenate([patch.s1_bands[band].ravel() for patch in patches]).astype(np.float64)
    return np.concatenate([patch.bands[band].ravel() for patch in patches]).astype(np.float64)


@pytest.fixture(scope="module")
def mm_set(tmp_path_factory):
    """Nine multimodal patches in three default-format files of uneven sizes (4, 3, 2)."""
    folder = tmp_path_factory.mktemp("stats_mm")
    patches = uniform_patches(9, seed=3)
    for name, part in (("a", patches[:4]), ("b", patches[4:7]), ("c", patches[7:])):
        write_records(folder / f"train-{name}.tfrecord", part)
    return folder, patches


# --- exactness -----------------------------------------------------------------------------------


def test_matches_numpy_on_every_band_at_native_resolution(mm_set):
    folder, patches = mm_set
    stats = compute_band_statistics(str(folder / "*.tfrecord"), "MM", batch_size=4, show_progress=False)
    assert list(stats.bands) == [*constants.S2_BAND_NAMES, "VV", "VH"]
    assert stats.records == 9
    assert len(stats.source) == 3
    for name, band in stats.bands.items():
        values = pixels(patches, name)
        size = S2_SIZES.get(name, 120)
        assert band.pixels == 9 * size * size, name
        assert band.mean == pytest.approx(values.mean(), rel=1e-13, abs=0), name
        assert band.std == pytest.approx(values.std(), rel=1e-12, abs=0), name


def test_legacy_records_give_the_same_statistics(tmp_path, mm_set):
    _, patches = mm_set
    default = write_records(tmp_path / "default.tfrecord", patches[:3])
    legacy = write_records(tmp_path / "legacy.tfrecord", patches[:3], LEGACY.encode)
    from_default = compute_band_statistics(default, "MM", show_progress=False)
    from_legacy = compute_band_statistics(legacy, "MM", show_progress=False)
    assert from_legacy.as_mapping() == from_default.as_mapping()


def test_streaming_merge_equals_one_shot_for_uneven_batches(mm_set):
    folder, _ = mm_set
    rng = np.random.default_rng(0)
    values = rng.normal(1000.0, 30.0, (1009, 3))
    one_shot = Moments.of(values)
    cuts = [0, 1, 2, 5, 38, 39, 500, 1009]  # parts of 1, 1, 3, 33, 1, 461 and 509 rows
    merged = merge_all(Moments.of(values[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    assert merged.count == one_shot.count == 1009
    np.testing.assert_allclose(merged.mean, one_shot.mean, rtol=1e-14, atol=0)
    np.testing.assert_allclose(merged.m2, one_shot.m2, rtol=1e-12, atol=0)
    np.testing.assert_allclose(merged.std, values.std(axis=0), rtol=1e-12, atol=0)
    # Merging with nothing changes nothing.
    assert Moments.empty(3).merge(one_shot) is one_shot and one_shot.merge(Moments.empty(3)) is one_shot

    # Through the pipeline: batches of 1, 2 (uneven last batch), 4 and all records.
    results = [
        compute_band_statistics(folder, "MM", batch_size=size, show_progress=False).as_mapping()
        for size in (1, 2, 4, 64)
    ]
    for result in results[:-1]:
        for name, (mean, std) in result.items():
            assert mean == pytest.approx(results[-1][name][0], rel=1e-13, abs=0)
            assert std == pytest.approx(results[-1][name][1], rel=1e-12, abs=0)


def test_large_offset_loses_no_digits(tmp_path):
    """Values on a large offset: S2 near 60,000 +- a few units, VV at 60,000 + N(0, 0.05) in float32."""
    patches = uniform_patches(10, seed=11, s2_low=60_000, s2_high=60_004, s1=((60_000.0, 0.05), (-20.0, 1.0)))
    path = write_records(tmp_path / "offset.tfrecord", patches)
    stats = compute_band_statistics(path, "MM", batch_size=3, show_progress=False)

    # S2: integers, so the exact population variance is a rational number.
    for name in constants.S2_BAND_NAMES:
        values = [int(v) for v in pixels(patches, name)]
        n = len(values)
        exact_mean = Fraction(sum(values), n)
        exact_variance = Fraction(sum(v * v for v in values), n) - exact_mean**2
        assert stats.bands[name].mean == pytest.approx(float(exact_mean), rel=1e-15, abs=0), name
        assert stats.bands[name].std == pytest.approx(math.sqrt(exact_variance), rel=1e-12, abs=0), name

    # VV: variance ~2.5e-3 under a squared mean of 3.6e9; the naive E[x^2] - E[x]^2 loses ~4 of its digits.
    values = pixels(patches, "VV")
    mean = math.fsum(values) / len(values)
    reference_variance = math.fsum((values - mean) ** 2) / len(values)
    naive_variance = np.sum(values * values) / len(values) - (np.sum(values) / len(values)) ** 2
    assert abs(naive_variance - reference_variance) / reference_variance > 1e-6  # the data are hard
    assert stats.bands["VV"].std ** 2 == pytest.approx(reference_variance, rel=1e-12, abs=0)
    assert stats.bands["VV"].mean == pytest.approx(mean, rel=1e-15, abs=0)


def test_vv_and_vh_are_not_swapped(tmp_path):
    patches = uniform_patches(2, seed=5, s1=((-5.0, 1.0), (-25.0, 3.0)))
    path = write_records(tmp_path / "s1.tfrecord", patches)
    stats = compute_band_statistics(path, "S1", show_progress=False)
    assert list(stats.bands) == ["VV", "VH"]
    for name in ("VV", "VH"):
        values = pixels(patches, name)
        assert stats.bands[name].mean == pytest.approx(values.mean(), rel=1e-13)
        assert stats.bands[name].std == pytest.approx(values.std(), rel=1e-12)
    assert stats.bands["VV"].mean == pytest.approx(-5.0, abs=0.05)
    assert stats.bands["VH"].mean == pytest.approx(-25.0, abs=0.1)
    assert stats.bands["VH"].std == pytest.approx(3.0, abs=0.05)


def test_modality_selects_bands_and_none_takes_what_the_files_hold(tmp_path, mm_set):
    folder, _ = mm_set
    s2_only = write_records(tmp_path / "s2.tfrecord", uniform_patches(2, seed=1, s1=None))
    assert list(compute_band_statistics(folder, show_progress=False).bands) == list(constants.S2_BAND_NAMES)
    assert list(compute_band_statistics(folder, None, show_progress=False).bands)[-2:] == ["VV", "VH"]
    assert list(compute_band_statistics(s2_only, None, show_progress=False).bands) == list(
        constants.S2_BAND_NAMES
    )
    with pytest.raises(UserError, match="modality 'S1' needs bands_s1"):
        compute_band_statistics(s2_only, "S1", show_progress=False)
    with pytest.raises(UserError, match="unknown modality 'S3'"):
        compute_band_statistics(s2_only, "S3", show_progress=False)


def test_constant_band_and_empty_input_are_user_errors(tmp_path):
    patches = uniform_patches(2, seed=0, s1=None)
    for patch in patches:
        patch.bands["B09"][:] = 1234
        patch.bands["B01"][:] = 99
    path = write_records(tmp_path / "constant.tfrecord", patches)
    with pytest.raises(UserError, match=r"band\(s\) B01, B09 have the same value .* \(std 0\)"):
        compute_band_statistics(path, "S2", show_progress=False)
    empty = write_records(tmp_path / "empty.tfrecord", [])
    with pytest.raises(UserError, match="no readable records"):
        compute_band_statistics(empty, "S2", show_progress=False)
    with pytest.raises(UserError, match="does not exist"):
        compute_band_statistics(tmp_path / "missing.tfrecord", "S2", show_progress=False)


# --- statistics files ----------------------------------------------------------------------------


def example_statistics() -> BandStatistics:
    bands = {
        "B02": BandStatistic(mean=429.9430203, std=572.41639287, pixels=14_400),
        "B01": BandStatistic(mean=0.1 + 0.2, std=1 / 3, pixels=400),
        "VV": BandStatistic(mean=-12.619993741972035, std=5.115911777546365, pixels=14_400),
    }
    return BandStatistics(bands=bands, records=1, source=("train-00000-of-00001.tfrecord",))


def test_file_round_trip_is_bit_exact_and_atomic(tmp_path):
    stats = example_statistics()
    path = save_statistics(stats, tmp_path / "sub" / "stats.json")
    document = json.loads(path.read_text())
    assert document["format"] == FILE_FORMAT and document["version"] == 1
    assert document["records"] == 1 and document["source"] == ["train-00000-of-00001.tfrecord"]
    assert document["bands"]["B01"] == {"mean": 0.1 + 0.2, "std": 1 / 3, "pixels": 400}
    loaded = load_statistics(path)
    assert list(loaded) == ["B01", "B02", "VV"]  # band order, whatever the file's order
    assert loaded == stats.as_mapping()  # floats compare equal bit for bit
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]  # no temporary left
    with pytest.raises(UserError, match="is a folder"):
        save_statistics(stats, path.parent, overwrite=True)

    with pytest.raises(UserError, match=r"stats\.json exists; pass overwrite=True"):
        save_statistics(stats, path)
    other = BandStatistics({"B03": BandStatistic(1.0, 2.0, 3)}, records=1, source=())
    save_statistics(other, path, overwrite=True)
    assert load_statistics(path) == {"B03": (1.0, 2.0)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]


def test_loaded_statistics_are_what_models_take(tmp_path):
    from bigearthnet_tf.models import resolve_statistics

    path = save_statistics(example_statistics(), tmp_path / "stats.json")
    resolved = resolve_statistics(load_statistics(path))
    assert resolved["B01"] == (0.1 + 0.2, 1 / 3)
    assert resolved["B03"] == default_statistics("S2")["B03"]


def test_default_statistics_are_the_given_ones():
    assert list(default_statistics("S2")) == list(constants.S2_BAND_NAMES)
    assert default_statistics("S1") == {band.name: (band.mean, band.std) for band in constants.S1_BANDS}
    assert default_statistics("MM")["B8A"] == (2266.46036911, 1356.13789355)
    with pytest.raises(UserError, match="unknown modality 'RGB'"):
        default_statistics("RGB")


def valid_document() -> dict:
    return {
        "format": FILE_FORMAT,
        "version": 1,
        "source": ["a.tfrecord"],
        "records": 3,
        "bands": {"B02": {"mean": 400.0, "std": 500.0, "pixels": 43_200}, "VH": {"mean": -19.0, "std": 5.0}},
    }


def _with(change):
    def build() -> dict:
        document = valid_document()
        change(document)
        return document

    return build


MALFORMED = {
    "not an object": (lambda: [1, 2], r"expected a JSON object \{...\}, got an array"),
    "wrong format": (_with(lambda d: d.update(format="other")), r"key 'format' is 'other'"),
    "no format": (_with(lambda d: d.pop("format")), r"key 'format' is None"),
    "future version": (_with(lambda d: d.update(version=2)), r"key 'version' is 2"),
    "version as text": (_with(lambda d: d.update(version="1")), r"key 'version' is '1'"),
    "unknown top-level key": (_with(lambda d: d.update(comment="x")), r"unknown key\(s\) 'comment'"),
    "no bands": (_with(lambda d: d.pop("bands")), r"missing key\(s\) 'bands'"),
    "empty bands": (_with(lambda d: d.update(bands={})), r"key 'bands' must be a non-empty object"),
    "bad records": (_with(lambda d: d.update(records=-1)), r"key 'records' must be a count"),
    "bad source": (_with(lambda d: d.update(source="a.tfrecord")), r"key 'source' must be a list"),
    "unknown band": (_with(lambda d: d["bands"].update(B13={"mean": 1, "std": 1})), r"unknown band 'B13'"),
    "band not an object": (_with(lambda d: d["bands"].update(B02=[1, 2])), r"bands\.B02 must be an object"),
    "missing std": (_with(lambda d: d["bands"]["B02"].pop("std")), r"bands\.B02: missing key\(s\) 'std'"),
    "misspelt key": (
        _with(lambda d: d["bands"]["VH"].update(stdev=5)),
        r"bands\.VH: unknown key\(s\) 'stdev'",
    ),
    "zero std": (_with(lambda d: d["bands"]["B02"].update(std=0)), r"bands\.B02\.std must be finite and > 0"),
    "negative std": (
        _with(lambda d: d["bands"]["VH"].update(std=-5.0)),
        r"bands\.VH\.std must be finite and > 0",
    ),
    "NaN std": (_with(lambda d: d["bands"]["B02"].update(std=math.nan)), r"bands\.B02\.std must be finite"),
    "infinite std": (
        _with(lambda d: d["bands"]["B02"].update(std=math.inf)),
        r"bands\.B02\.std must be finite",
    ),
    "infinite mean": (
        _with(lambda d: d["bands"]["B02"].update(mean=-math.inf)),
        r"bands\.B02\.mean must be finite",
    ),
    "text mean": (
        _with(lambda d: d["bands"]["B02"].update(mean="400")),
        r"bands\.B02\.mean must be a number",
    ),
    "boolean std": (_with(lambda d: d["bands"]["B02"].update(std=True)), r"bands\.B02\.std must be a number"),
    "bad pixels": (
        _with(lambda d: d["bands"]["B02"].update(pixels=0)),
        r"bands\.B02\.pixels must be a count",
    ),
}


def test_valid_document_loads(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(valid_document()))
    assert load_statistics(path) == {"B02": (400.0, 500.0), "VH": (-19.0, 5.0)}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_a_user_error_naming_file_and_key(tmp_path, case):
    build, message = MALFORMED[case]
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(build()))  # NaN and Infinity are written as JSON's extension literals
    with pytest.raises(UserError, match=message) as raised:
        load_statistics(path)
    assert str(path) in str(raised.value)


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"missing\.json does not exist"):
        load_statistics(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "bigearthnet-tf-statistics",\n "version": 1,,}')
    with pytest.raises(UserError, match=r"broken\.json: not valid JSON: .* \(line 2, column 15\)"):
        load_statistics(broken)
    with pytest.raises(UserError, match="is a folder"):
        load_statistics(tmp_path)


# --- command line --------------------------------------------------------------------------------


def test_cli_writes_file_prints_table_and_refuses_to_overwrite(tmp_path, mm_set, capsys):
    folder, patches = mm_set
    out = tmp_path / "stats.json"
    main(["stats", str(folder / "train-[ab].tfrecord"), str(folder / "train-c.tfrecord"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["band", "pixels", "mean", "std", "(ddof=0)"]
    vh_row = next(line for line in printed.splitlines() if line.startswith("VH "))
    assert vh_row.split()[1] == f"{9 * 14_400:,}"
    assert float(vh_row.split()[2]) == pytest.approx(pixels(patches, "VH").mean(), abs=1e-6)
    assert "9 records in 3 file(s)" in printed
    loaded = load_statistics(out)
    assert list(loaded) == [*constants.S2_BAND_NAMES, "VV", "VH"]  # default: every modality present
    assert loaded["B05"][1] == pytest.approx(pixels(patches, "B05").std(), rel=1e-12)

    with pytest.raises(SystemExit) as exited:
        main(["stats", str(folder), "--out", str(out)])
    assert exited.value.code == 1
    assert "stats.json exists; pass --overwrite" in capsys.readouterr().err

    main(["stats", str(folder), "--out", str(out), "--modality", "S1", "--overwrite"])
    assert list(load_statistics(out)) == ["VV", "VH"]
