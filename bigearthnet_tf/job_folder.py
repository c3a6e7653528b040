"""A long job's work folder: what it has finished, kept so that a rerun with the same arguments resumes.

`job.json` holds the job's fingerprint (a digest of everything that decides its output). A JSON-lines
journal, synced line by line, records each finished file with its size; a line torn by a kill is
ignored. A rerun with the same fingerprint keeps the files whose journal entry it can vouch for (the
file exists with the recorded size) and removes the rest; a folder of a job with other arguments is
refused unless the caller discards it (`--overwrite`).

`prepare` keeps two such folders: the spool of the stream phase and the work folder of the writing phase.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigearthnet_tf import __version__
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.files import append_synced_line, write_text_atomically
from bigearthnet_tf.jsonfiles import json_digest

JOB_FILE = "job.json"


def fingerprint(arguments: dict[str, Any]) -> str:
    """The one fingerprint of a job: a digest of `arguments` (JSON values) and this program's version."""
    return json_digest({**arguments, "created_by": __version__})


class JobFolder:
    """The work folder `path` of the job with `fingerprint`; journal entries are keyed by `entry[key]`."""

    def __init__(self, path: Path, fingerprint: str, journal_name: str = "journal.jsonl", key: str = "file"):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.journal_path = self.path / journal_name
        self.key = key

    def recorded_fingerprint(self) -> str | None:
        """The fingerprint of the job that made the folder; None if there is none (yet)."""
        try:
            recorded = json.loads((self.path / JOB_FILE).read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None
        return recorded if isinstance(recorded, str) else None

    def resumable(self) -> bool:
        """The folder was made by this same job."""
        return self.recorded_fingerprint() == self.fingerprint

    def refuse_other_job(self, overwrite: bool) -> None:
        """Raise UserError if the folder holds another job's unfinished work and `overwrite` is off."""
        recorded = self.recorded_fingerprint()
        if recorded is not None and recorded != self.fingerprint and not overwrite:
            raise UserError(
                f"{self.path} holds an unfinished preparation with other arguments; rerun that "
                "command to finish it, or pass --overwrite to discard it"
            )

    def begin(self) -> None:
        """A fresh, empty folder for this job (whatever was there is removed)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        # Written first: a folder without it holds nothing of value (a leftover of ours).
        write_text_atomically(self.path / JOB_FILE, json.dumps({"fingerprint": self.fingerprint}) + "\n")

    def journal(self) -> dict[str, dict[str, Any]]:
        """The journal's entries by key, in journal order (a later entry for a key replaces an earlier)."""
        try:
            lines = self.journal_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return {}
        entries: dict[str, dict[str, Any]] = {}
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            entries[entry[self.key]] = entry
        return entries

    def record(self, entry: dict[str, Any]) -> None:
        """Journal a finished file (synced before this returns)."""
        append_synced_line(self.journal_path, entry)

    @staticmethod
    def vouched(
        entries: dict[str, dict[str, Any]], path_of: Callable[[str], Path]
    ) -> dict[str, dict[str, Any]]:
        """The entries whose file (at `path_of(key)`) exists with the size the journal recorded."""
        kept = {}
        for name, entry in entries.items():
            path = path_of(name)
            if path.exists() and path.stat().st_size == entry["bytes"]:
                kept[name] = entry
        return kept

    def remove_files(self, unwanted: Callable[[str], bool]) -> None:
        """Delete the folder's files whose name `unwanted` picks (what the journal does not vouch for)."""
        for entry in os.scandir(self.path):
            if unwanted(entry.name):
                os.unlink(entry.path)
