"""A job's work folder (`job_folder.JobFolder`): fingerprint, journal, what it vouches for."""

from __future__ import annotations

import json

import pytest

from bigearthnet_tf import __version__
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.job_folder import JOB_FILE, JobFolder, fingerprint
from bigearthnet_tf.jsonfiles import json_digest


def test_fingerprint_covers_the_arguments_and_the_version():
    assert fingerprint({"a": 1}) == json_digest({"a": 1, "created_by": __version__})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_a_fresh_folder_then_a_resume(tmp_path):
    folder = JobFolder(tmp_path / "work", "f1")
    assert folder.recorded_fingerprint() is None and not folder.resumable()
    folder.refuse_other_job(overwrite=False)  # nothing there: nothing to refuse
    folder.begin()
    assert json.loads((folder.path / JOB_FILE).read_text()) == {"fingerprint": "f1"}
    (folder.path / "a.bin").write_bytes(b"12345")
    (folder.path / "b.bin").write_bytes(b"12")  # journalled at 3 bytes: cut short by a power loss
    folder.record({"file": "a.bin", "bytes": 5})
    folder.record({"file": "b.bin", "bytes": 3})
    folder.record({"file": "c.bin", "bytes": 1})  # recorded, but its file is gone
    with open(folder.journal_path, "a") as journal:
        journal.write('{"file": "d.b')  # torn by a kill
    again = JobFolder(tmp_path / "work", "f1")
    assert again.resumable()
    entries = again.journal()
    assert list(entries) == ["a.bin", "b.bin", "c.bin"]
    kept = again.vouched(entries, lambda name: again.path / name)
    assert kept == {"a.bin": {"file": "a.bin", "bytes": 5}}
    again.remove_files(lambda name: name.endswith(".bin") and name not in kept)
    assert sorted(path.name for path in again.path.iterdir()) == ["a.bin", JOB_FILE, "journal.jsonl"]


def test_another_jobs_folder_is_refused_unless_overwritten(tmp_path):
    JobFolder(tmp_path / "work", "mine").begin()
    (tmp_path / "work" / "kept.bin").write_bytes(b"x")
    other = JobFolder(tmp_path / "work", "other")
    with pytest.raises(UserError, match=r"work holds an unfinished preparation with other arguments"):
        other.refuse_other_job(overwrite=False)
    other.refuse_other_job(overwrite=True)
    other.begin()
    assert sorted(path.name for path in other.path.iterdir()) == [JOB_FILE]
    assert other.resumable()


def test_journal_keyed_by_another_field(tmp_path):
    folder = JobFolder(tmp_path, "f", journal_name="spool.jsonl", key="spool")
    folder.record({"spool": "s1", "bytes": 1})
    folder.record({"spool": "s1", "bytes": 2})  # a later entry replaces an earlier one
    assert folder.journal() == {"s1": {"spool": "s1", "bytes": 2}}
