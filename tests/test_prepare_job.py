"""The plan and job folder of `prepare` (`prepare_job.py`): units, outputs in the way, resume, joining
the parts of a split written as one file. No patch is read here; the files are stand-ins."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.prepare_job import (
    Plan,
    join_parts,
    manifest,
    pending_units,
    refuse_stale_outputs,
    start_or_resume,
)
from bigearthnet_tf.prepare_request import PrepareRequest

ARCHIVE = SimpleNamespace(
    version=1, s2_dir="/data/BigEarthNet-v1.0", s1_file=None, s1_dir=None, has_s1=False,
    label_types=("original", "BigEarthNet-19"),
)  # fmt: skip
SPLITS = {"train": [f"P_{i}_{i}" for i in range(5)], "test": []}


def _plan(tmp_path, record_format="default", shard_size=2, splits=SPLITS, **options) -> Plan:
    request = PrepareRequest.checked(
        "/data/BigEarthNet-v1.0", tmp_path / "out", record_format=record_format,
        shard_size=shard_size, workers=1, **options,
    )  # fmt: skip
    request.out.mkdir(exist_ok=True)
    return Plan(request, ARCHIVE, splits)


def test_units_cut_each_list_in_order_and_an_empty_split_gets_one_empty_shard(tmp_path):
    plan = _plan(tmp_path)
    assert [(unit.file_name, unit.names) for unit in plan.units] == [
        ("train-00000-of-00003.tfrecord", ("P_0_0", "P_1_1")),
        ("train-00001-of-00003.tfrecord", ("P_2_2", "P_3_3")),
        ("train-00002-of-00003.tfrecord", ("P_4_4",)),
        ("test-00000-of-00001.tfrecord", ()),
    ]
    pending, resumed = pending_units(plan, {"train-00000-of-00003.tfrecord": {}})
    assert [len(unit.names) for unit in pending] == [2, 1, 0] and resumed == 2  # largest first
    # The fingerprint is the request's over these splits: other lists, another job.
    assert (
        plan.folder.fingerprint != _plan(tmp_path, splits={"train": SPLITS["train"][:4]}).folder.fingerprint
    )


def test_outputs_in_the_way_are_refused_unless_overwritten(tmp_path):
    plan = _plan(tmp_path)
    (plan.out / "train-00000-of-00007.tfrecord").touch()  # another shard count would mix with ours
    with pytest.raises(UserError, match=r"train-00000-of-00007.tfrecord exists; pass --overwrite"):
        refuse_stale_outputs(plan)
    with pytest.raises(UserError, match="exists"):
        start_or_resume(plan, print)
    overwriting = _plan(tmp_path, overwrite=True)
    assert start_or_resume(overwriting, print) == ({}, {"train": 0, "test": 0})
    assert not (plan.out / "train-00000-of-00007.tfrecord").exists()


def test_a_rerun_keeps_what_the_journal_vouches_for(tmp_path):
    plan = _plan(tmp_path)
    start_or_resume(plan, print)
    (plan.out / "train-00000-of-00003.tfrecord").write_bytes(b"x" * 10)
    plan.folder.record({"file": "train-00000-of-00003.tfrecord", "bytes": 10, "patches": 2, "skipped": []})
    (plan.out / "train-00001-of-00003.tfrecord").write_bytes(b"x" * 3)  # recorded as 10: cut short
    plan.folder.record({"file": "train-00001-of-00003.tfrecord", "bytes": 10, "patches": 2, "skipped": []})
    (plan.work_dir / "train-00002-of-00003.tfrecord.4242.tmp").write_bytes(b"half")  # a killed worker's
    said = []
    done, _ = start_or_resume(_plan(tmp_path), said.append)
    assert list(done) == ["train-00000-of-00003.tfrecord"]
    assert not (plan.work_dir / "train-00002-of-00003.tfrecord.4242.tmp").exists()
    assert said == [f"resuming an unfinished run in {plan.out}: 1 finished file(s) kept"]
    with pytest.raises(UserError, match="unfinished preparation with other arguments"):
        start_or_resume(_plan(tmp_path, shard_size=3), print)


def test_parts_are_joined_in_list_order_as_they_come(tmp_path):
    plan = _plan(tmp_path, record_format="legacy", shard_size=None, splits={"train": ["a"] * 600})
    assert [unit.file_name for unit in plan.units] == [
        "train.part-00000",
        "train.part-00001",
        "train.part-00002",
    ]
    done, appended = start_or_resume(plan, print)
    finished = dict(done)

    def finish(index: int, data: bytes) -> None:
        name = f"train.part-{index:05d}"
        (plan.work_dir / name).write_bytes(data)
        finished[name] = {
            "file": name,
            "bytes": len(data),
            "patches": 1,
            "skipped": [[f"p{index}", "f", "r"]],
        }
        join_parts(plan, "train", finished, appended)

    finish(1, b"BB")  # waits for part 0
    assert appended == {"train": 0} and not (plan.out / "train.tfrecord").exists()
    finish(0, b"A")
    assert appended == {"train": 2} and not (plan.work_dir / "train.part-00001").exists()
    finish(2, b"CCC")
    assert (plan.out / "train.tfrecord").read_bytes() == b"ABBCCC"
    entry = finished["train.tfrecord"]
    assert entry["patches"] == 3 and [item[0] for item in entry["skipped"]] == ["p0", "p1", "p2"]
    described = manifest(plan, {"train": 3}, {"train": 3})
    assert described["format"] == "legacy" and described["shard_size"] is None
    assert described["splits"] == {"train": {"files": ["train.tfrecord"], "patches": 3, "skipped": 3}}
    assert json.loads(json.dumps(described))["label_types"] == ["original", "BigEarthNet-19"]
