"""The receive path when the disk fills up, and journal segments after a failed spool write.

- Disk full at any point (journal, spool file, large-instance spill file, SQLite) → 0xA700 for
  that instance (or 0x0000 when it is durable in the journal already), never a dropped
  association; nothing partial left; every slot released; serving again once space returns.
  Tested on a real 30 MB tmpfs (skipped where it cannot be mounted).
- A spool write that fails is retried; journal segments are recycled again afterwards (the
  former ``_keep_segments`` latch kept them forever after one failure).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node import status
from dicom_node.config import parse_config
from dicom_node.fastscp import Listener
from dicom_node.fastscp.journal import read_segment as receiver_read_segment
from dicom_node.index import SeriesIndex
from dicom_node.spool import Spool
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.net import free_port
from tests.fixtures.node import NodeProcess, dataset_bytes, store_files
from tests.test_receiver_network import RawAssociation


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 30 MB tmpfs (root only): a real file system that runs out of space."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about ``leave_bytes`` free on ``disk``."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def _files_of(tmp: Path, n: int, size: int, seed: int) -> list[Path]:
    return write_series(synthetic_series(n, size, size, seed=seed), tmp / f"s{seed}")


def _settle(rx: Listener, timeout_s: float = 10.0) -> None:
    """Wait until nothing is outstanding and no journal segment is held back (or timeout)."""
    deadline = time.monotonic() + timeout_s
    while (rx._outstanding or rx.journal._closed) and time.monotonic() < deadline:
        time.sleep(0.05)


def _assert_stored(index: SeriesIndex, files: list[Path]) -> None:
    """Every file is indexed and its spool copy holds the same data set."""
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        found = index.lookup_instance(uid)
        assert found is not None and dataset_bytes(found[0]) == dataset_bytes(f)


def test_disk_full_answers_out_of_resources_leaves_nothing_and_recovers(
        small_disk: Path, node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_factory(node={"max_associations": 4},
                        storage={"path": str(small_disk / "spool"),
                                 "database": str(small_disk / "node.db"),
                                 "min_free_bytes": 0, "min_free_percent": 0})
    spool = small_disk / "spool"
    small = _files_of(tmp_path, 40, 128, seed=1)  # ~33 kB each
    [big] = _files_of(tmp_path, 1, 1600, seed=2)  # ~5 MB: received into .incoming
    assert store_files(node.port, small[:2]) == [status.SUCCESS] * 2

    # Nearly full: a few instances fit (journal space is preallocated), then 0xA700.
    filler = _fill(small_disk, 150_000)
    statuses = store_files(node.port, small[2:])
    assert set(statuses) <= {status.SUCCESS, status.OUT_OF_RESOURCES}, statuses
    assert status.OUT_OF_RESOURCES in statuses
    acked = [f for f, s in zip(small[2:], statuses, strict=True) if s == status.SUCCESS]
    # A large instance whose spill file hits ENOSPC while it arrives: 0xA700, file removed.
    with contextlib.suppress(OSError):
        filler.unlink()
    _fill(small_disk, 2_000_000)
    assert store_files(node.port, [big]) == [status.OUT_OF_RESOURCES]
    assert list((spool / ".incoming").iterdir()) == []
    refused = node.events("instance_refused")
    assert refused and all(e["status"] == "0xA700" for e in refused)
    # Every slot is free again, C-ECHO answers.
    assocs = [RawAssociation(node.port, []) for _ in range(4)]
    assert [a.echo() for a in assocs] == [status.SUCCESS] * 4
    for a in assocs:
        a.release()

    # Space returns: serving at once, and what was acknowledged reaches the spool.
    (small_disk / "filler").unlink()
    before = len(node.events("instance_refused"))
    statuses = store_files(node.port, [*small[2:], big])
    assert statuses == [status.SUCCESS] * (len(small) - 1), node.events("instance_refused")[before:]
    index = SeriesIndex(small_disk / "node.db")
    assert index.count_instances() == len(small) + 1
    deadline = time.monotonic() + 15
    for f in [*small[:2], *acked, big]:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        found = index.lookup_instance(uid)
        assert found is not None
        while not found[0].exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dataset_bytes(found[0]) == dataset_bytes(f)
    assert list((spool / ".incoming").iterdir()) == []
    assert node.proc is not None and node.proc.poll() is None


def _settings(tmp_path: Path) -> Any:
    return parse_config({"node": {"ae_title": "OMNIMRI", "host": "127.0.0.1",
                                  "port": free_port()},
                         "storage": {"path": str(tmp_path / "spool"), "min_free_bytes": 0,
                                     "min_free_percent": 0},
                         "audit": {"path": None}}, base=tmp_path)


def test_journal_or_index_full_answers_out_of_resources_and_is_rolled_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path)
    spool = Spool(settings.storage.path)
    index = SeriesIndex(settings.storage.database_path)
    rx = Listener(settings, index, spool)
    files = _files_of(tmp_path, 3, 64, seed=8)
    real_sync = rx.journal.sync
    calls = {"n": 0}

    def full_sync() -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second instance's flush: after its record was appended
            raise OSError(errno.ENOSPC, "No space left on device")
        real_sync()

    monkeypatch.setattr(rx.journal, "sync", full_sync)
    rx.start()
    try:
        assert store_files(rx.port, files) == [status.SUCCESS, status.OUT_OF_RESOURCES,
                                               status.SUCCESS]
        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        assert index.lookup_instance(uids[1]) is None  # its row was forgotten
        # A crash now: the replay must not bring back the refused instance.
        records = [h["sop_instance_uid"] for s in rx.journal.pending_segments()
                   for h, _ in receiver_read_segment(s)]
        assert uids[1] not in records and uids[0] in records and uids[2] in records
    finally:
        rx.stop()
        index.close()


def test_failed_spool_write_is_retried_and_segments_are_recycled_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path)
    from dicom_node.fastscp import receiver

    monkeypatch.setattr(receiver, "MATERIALISE_RETRY_S", 0.1)
    spool = Spool(settings.storage.path)
    index = SeriesIndex(settings.storage.database_path)
    rx = Listener(settings, index, spool)
    rx.journal.segment_bytes = 100_000  # ~3 instances a segment: segments rotate
    real_write = rx._write_file
    failures = {"left": 3}

    def flaky_write(final: Path, data: bytes) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(final, data)

    monkeypatch.setattr(rx, "_write_file", flaky_write)
    files = _files_of(tmp_path, 24, 128, seed=5)
    rx.start()
    try:
        assert store_files(rx.port, files) == [status.SUCCESS] * len(files)
        _settle(rx)
        assert failures["left"] == 0
        assert not rx._outstanding, "a failed write was never retried"
        assert not rx.journal._closed, "segments are no longer recycled after a failure"
        _assert_stored(index, files)
        assert len(list((spool.root / ".journal").iterdir())) <= 3
    finally:
        rx.stop()
        index.close()
    assert list((spool.root / ".journal").iterdir()) == []


def test_failed_index_rows_are_retried_without_rewriting_the_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full index (the rows are written after the acknowledgement) is retried; until then
    the instances stay outstanding, so the journal segments holding them are kept."""
    import sqlite3

    settings = _settings(tmp_path)
    from dicom_node.fastscp import receiver

    monkeypatch.setattr(receiver, "MATERIALISE_RETRY_S", 0.1)
    spool = Spool(settings.storage.path)
    index = SeriesIndex(settings.storage.database_path)
    rx = Listener(settings, index, spool)
    rx.journal.segment_bytes = 100_000  # ~3 instances a segment: segments rotate
    real_index = rx._index_materialised
    real_write = rx._write_file
    failures = {"left": 3}
    writes: list[Path] = []

    def full_index(items: list[Any]) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        real_index(items)

    def counted_write(final: Path, data: bytes) -> None:
        writes.append(final)
        real_write(final, data)

    monkeypatch.setattr(rx, "_index_materialised", full_index)
    monkeypatch.setattr(rx, "_write_file", counted_write)
    files = _files_of(tmp_path, 12, 128, seed=9)
    rx.start()
    try:
        assert store_files(rx.port, files) == [status.SUCCESS] * len(files)
        _settle(rx)
        assert failures["left"] == 0
        assert not rx._outstanding, "a failed index row was never retried"
        assert not rx.journal._closed, "segments are no longer recycled after a failure"
        assert len(writes) == len(set(writes)) == len(files)  # each file written once
        assert index.count_instances() == len(files)
        _assert_stored(index, files)
    finally:
        rx.stop()
        index.close()
    assert list((spool.root / ".journal").iterdir()) == []


def test_room_check_rereads_before_refusing(tmp_path: Path) -> None:
    """A reused free-space reading may say yes; a no is always checked against a fresh one."""
    from dicom_node.fastscp.receiver import _RoomCheck

    free = {"bytes": 100_000}

    class _Disk:
        def free_space(self) -> tuple[int, float]:
            return free["bytes"], 50.0

    room = _RoomCheck(_Disk())  # type: ignore[arg-type]
    assert room.has_room(0, 0, 60_000)
    free["bytes"] = 40_000  # the admitted instance was written
    assert not room.has_room(0, 0, 60_000)  # reused reading says no; a fresh one agrees
    free["bytes"] = 10_000_000  # space returns within the reuse interval
    assert room.has_room(0, 0, 60_000)
    free["bytes"] = 0
    assert room.has_room(0, 0, 60_000)  # a yes from the reused reading (errs low by design)


def test_room_check_counts_acknowledged_bytes_not_yet_written(tmp_path: Path) -> None:
    """Bytes acknowledged but still waiting for the materialiser take their space at once."""
    from dicom_node.fastscp.receiver import _RoomCheck

    unwritten = {"bytes": 0}

    class _Disk:
        def free_space(self) -> tuple[int, float]:
            return 100_000, 50.0  # the materialiser has written nothing yet

    room = _RoomCheck(_Disk(), lambda: unwritten["bytes"])  # type: ignore[arg-type]
    assert room.has_room(0, 0, 60_000)
    unwritten["bytes"] = 60_000  # the admitted instance is acknowledged, not yet written
    assert not room.has_room(0, 0, 60_000)  # a fresh reading alone would say yes
    unwritten["bytes"] = 0  # written: now the disk itself shows it (here: it does not)
    assert room.has_room(0, 0, 60_000)
