"""The stream phase's scheduler (`prepare_stream.SpoolStream`) with fake workers, in milliseconds.

Members are made by hand, each band file in a block of a fake ring, and fed as the tar parser would;
workers are threads running a fake `encode` that writes a spool file of known bytes. The tests follow
the scheduling itself: shards handed over whole and in list order, in parts when the ring runs short,
back-pressure on the parser, spilling, faults, and a resume from a journalled spool folder.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from bigearthnet_tf.prepare_request import PrepareRequest
from bigearthnet_tf.prepare_stream import (
    SpoolStream,
    StreamJob,
    _InProcess,
    open_spool,
    spool_folder,
)
from bigearthnet_tf.tarstream import REGULAR, ArchiveFileError, HeldBlocks, Member

SUFFIXES = ("B02.tif", "B03.tif")  # two files a patch keep the bookkeeping readable
FILE_BYTES = 8


class FakeWorkers:
    """`encode` for the scheduler: records each batch, writes a spool file of FILE_BYTES per patch."""

    def __init__(self, spool_dir, delay: float = 0.0) -> None:
        self.spool_dir = spool_dir
        self.delay = delay
        self.batches: list[tuple[int, list[str], bool]] = []
        self.lock = threading.Lock()

    def encode(self, task: int, batch: list[tuple], whole: bool):
        time.sleep(self.delay)
        names = [name for name, _, _ in batch]
        with self.lock:
            self.batches.append((task, names, whole))
        spool = f"spool-{task:07d}.tfrecord"
        (self.spool_dir / spool).write_bytes(b"r" * FILE_BYTES * len(names))
        entries = [[name, i * FILE_BYTES, FILE_BYTES, None] for i, name in enumerate(names)]
        return spool, entries, 0.0, 0.0


def _names(count: int) -> list[str]:
    return [f"S2A_MSIL2A_20170613T101031_{i}_{i}" for i in range(count)]


def _job(tmp_path, names: list[str], shard: int, workers: int = 2, skip_bad: bool = True):
    request = PrepareRequest.checked(
        tmp_path / "BigEarthNet-v1.0.tar.gz",
        tmp_path / "out",
        workers=workers,
        shard_size=shard,
        skip_bad=skip_bad,
    )
    request.spool_dir.mkdir(parents=True, exist_ok=True)
    archive = SimpleNamespace(file_suffixes=SUFFIXES, s1_file=None)
    units = {name: (i // shard, i % shard) for i, name in enumerate(names)}
    return StreamJob(request, archive, units, context=None)


def _stream(job, blocks: int, executor, workers: FakeWorkers, done=None):
    ring = HeldBlocks(SimpleNamespace(maps=[bytearray(FILE_BYTES * 4) for _ in range(blocks)]))
    ring.free_queue = queue.Queue()  # the blocks handed back to the reader
    return SpoolStream(
        job, done or {}, ring, blocks, executor, say=lambda message: None, progress=lambda kind, n: None,
        encode=workers.encode,
    )  # fmt: skip


def _member(stream: SpoolStream, name: str, suffix: str, block: int, slot: int = 0) -> Member:
    path = f"BigEarthNet-v1.0/{name}/{name}_{suffix}"
    member = Member(path, REGULAR, FILE_BYTES, ((block, slot * FILE_BYTES, FILE_BYTES),), 512 * block)
    member.key = stream.wants(path)
    return member


def _feed(stream: SpoolStream, files: list[tuple[str, str]], *, retire_each: bool = True) -> None:
    """Feed the files as the parser would, one block each; the parser is past a block once the next
    one is parsed (retire_each), and `after_block` runs after every block."""
    for block, (name, suffix) in enumerate(files):
        stream.on_member(_member(stream, name, suffix, block % stream.blocks))
        if retire_each:
            stream.ring.retire(block % stream.blocks)
        stream.after_block(block % stream.blocks)


def test_whole_shards_go_to_one_worker_in_list_order(tmp_path):
    names = _names(6)
    job = _job(tmp_path, names, shard=3)
    workers = FakeWorkers(job.spool_dir)
    with ThreadPoolExecutor(2) as executor:
        stream = _stream(job, 64, executor, workers)
        # The archive's order is not the list's: shard 1's patches come first, backwards.
        order = [names[5], names[4], names[3], names[2], names[0], names[1]]
        _feed(stream, [(name, suffix) for name in order for suffix in SUFFIXES])
        stream.drain()
    batches = sorted(workers.batches)
    assert [(names_, whole) for _, names_, whole in batches] == [(names[3:], True), (names[:3], True)]
    index = stream.result(None)
    assert set(index.records) == set(names) and not index.bad
    assert index.records[names[4]] == ("spool-0000001.tfrecord", FILE_BYTES, FILE_BYTES)
    journal = [json.loads(line) for line in (job.spool_dir / "spool.jsonl").read_text().splitlines()]
    assert [entry["bytes"] for entry in journal] == [3 * FILE_BYTES, 3 * FILE_BYTES]
    assert stream.ring.refs == [0] * 64  # every hold released


def test_a_short_ring_hands_shards_over_in_parts(tmp_path):
    """Patches of one shard spread over more blocks than the ring has: groups go out before their
    shard is complete (not whole), and every block comes back to the reader."""
    names = _names(8)
    job = _job(tmp_path, names, shard=8, workers=1)
    workers = FakeWorkers(job.spool_dir)
    stream = _stream(job, 6, _InProcess(), workers)
    _feed(stream, [(name, suffix) for name in names for suffix in SUFFIXES])
    stream.drain()
    assert len(workers.batches) > 1 and not any(whole for _, _, whole in workers.batches)
    handed = [name for _, batch, _ in workers.batches for name in batch]
    assert sorted(handed) == sorted(names)
    for _, batch, _ in workers.batches:  # each part in list order
        assert batch == sorted(batch, key=names.index)
    assert set(stream.result(None).records) == set(names)
    assert stream.ring.refs == [0] * 6 and stream.ring.free_queue.qsize() == 2 * len(names)


def test_back_pressure_holds_the_parser(tmp_path):
    """However fast the archive comes, at most one batch waits beside each worker's once a block is done."""
    names = _names(12)
    job = _job(tmp_path, names, shard=1, workers=2)
    workers = FakeWorkers(job.spool_dir, delay=0.003)
    in_flight = []
    with ThreadPoolExecutor(2) as executor:
        stream = _stream(job, 64, executor, workers)
        for name in names:
            for suffix in SUFFIXES:
                stream.on_member(_member(stream, name, suffix, names.index(name)))
            stream.after_block(names.index(name))
            in_flight.append(len(stream.futures))
        stream.drain()
    assert max(in_flight) <= job.workers
    assert max(in_flight) >= 1  # batches really were in flight while the parser went on
    assert sorted(name for _, batch, _ in workers.batches for name in batch) == sorted(names)


def test_files_of_incomplete_patches_are_spilled_before_their_block_is_refilled(tmp_path):
    names = _names(2)
    job = _job(tmp_path, names, shard=2, workers=1)
    workers = FakeWorkers(job.spool_dir)
    stream = _stream(job, 8, _InProcess(), workers)
    stream.ring.ring.maps[0][:FILE_BYTES] = b"B02-of-0"
    stream.on_member(_member(stream, names[0], "B02.tif", 0))
    stream.ring.retire(0)  # the parser is past block 0 while the patch still lacks B03
    stream.after_block(0)
    ref = stream.pending[names[0]][f"{names[0]}_B02.tif"]
    assert ref[0] == "f" and open(ref[1], "rb").read()[ref[2] : ref[2] + ref[3]] == b"B02-of-0"
    assert stream.ring.free_queue.get_nowait() == 0  # block 0 goes back to the reader at once
    _feed(stream, [(names[0], "B03.tif"), (names[1], "B02.tif"), (names[1], "B03.tif")])
    stream.drain()
    stream.spill.close()
    assert not (job.spool_dir / "spill.bin").exists()
    assert set(stream.result(None).records) == set(names)


def test_faults_incomplete_patches_and_second_copies(tmp_path):
    names = _names(3)
    job = _job(tmp_path, names, shard=3, workers=1)
    workers = FakeWorkers(job.spool_dir)
    stream = _stream(job, 16, _InProcess(), workers)
    _feed(stream, [(names[0], "B02.tif"), (names[0], "B03.tif"), (names[1], "B02.tif")])
    link = _member(stream, names[2], "B02.tif", 3)
    link.kind = "link"
    stream.on_member(link)
    stream.on_member(_member(stream, names[0], "B02.tif", 4))  # a second copy after it was complete
    stream.drain()
    index = stream.result(None)
    assert index.bad[names[1]] == (f"{names[1]}_B03.tif", "missing band file")
    assert index.bad[names[2]][1] == f"is a link in {job.s2_path}, not a file"
    assert "twice" in index.bad[names[0]][1] and names[0] not in index.records
    # Without skip_bad a second copy stops the job, naming the member.
    strict = _job(tmp_path / "strict", names, shard=3, workers=1, skip_bad=False)
    stream = _stream(strict, 16, _InProcess(), FakeWorkers(strict.spool_dir))
    stream.on_member(_member(stream, names[0], "B02.tif", 0))
    with pytest.raises(ArchiveFileError, match=f"member .*{names[0]}_B02.tif.*twice"):
        stream.on_member(_member(stream, names[0], "B02.tif", 1))


def test_resume_keeps_what_the_journal_vouches_for(tmp_path):
    """A spool folder after a kill: one journalled spool intact, one cut short, a torn journal line
    and an unjournalled spool file. The rerun keeps the first, redoes the rest, numbers after them."""
    names = _names(6)
    job = _job(tmp_path, names, shard=3, workers=1)
    folder = spool_folder(
        job.request, SimpleNamespace(version=1, s2_dir=job.s2_path, s1_file=None, s1_dir=None), {}
    )
    assert open_spool(folder, overwrite=False, say=print) == {}  # a fresh folder, fingerprinted
    spool_dir = folder.path
    (spool_dir / "spool-0000001.tfrecord").write_bytes(b"r" * 3 * FILE_BYTES)
    (spool_dir / "spool-0000002.tfrecord").write_bytes(b"r" * FILE_BYTES)  # journalled at 3 records
    (spool_dir / "spool-0000003.tfrecord").write_bytes(b"r")  # never journalled
    entries = [
        {"spool": "spool-0000001.tfrecord", "bytes": 3 * FILE_BYTES,
         "patches": [[name, i * FILE_BYTES, FILE_BYTES, None] for i, name in enumerate(names[:3])]},
        {"spool": "spool-0000002.tfrecord", "bytes": 3 * FILE_BYTES,
         "patches": [[name, i * FILE_BYTES, FILE_BYTES, None] for i, name in enumerate(names[3:])]},
    ]  # fmt: skip
    (spool_dir / "spool.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"spool": "spo')
    said = []
    done = open_spool(folder, overwrite=False, say=said.append)
    assert done == {
        name: ("spool-0000001.tfrecord", i * FILE_BYTES, FILE_BYTES) for i, name in enumerate(names[:3])
    }
    assert sorted(path.name for path in spool_dir.glob("spool-*")) == ["spool-0000001.tfrecord"]
    assert said == ["resuming: 3 patches were encoded by an earlier run"]

    workers = FakeWorkers(spool_dir)
    stream = _stream(job, 16, _InProcess(), workers, done=done)
    _feed(stream, [(name, suffix) for name in names for suffix in SUFFIXES])
    stream.drain()
    # Only the patches not done are encoded, numbered after the kept spool; after a resume no spool
    # file is taken for a whole shard.
    assert workers.batches == [(2, names[3:], False)]
    index = stream.result(None)
    assert index.resumed == 3 and set(index.records) == set(names)
    # Another job's spool folder is refused, and discarded with overwrite.
    other = spool_folder(
        job.request, SimpleNamespace(version=2, s2_dir=job.s2_path, s1_file=None, s1_dir=None), {}
    )
    with pytest.raises(Exception, match="unfinished preparation with other arguments"):
        open_spool(other, overwrite=False, say=print)
    assert open_spool(other, overwrite=True, say=print) == {}
    assert list(spool_dir.glob("spool-*")) == []
