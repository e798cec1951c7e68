"""kill -9 of the node mid-series, restart, exactly-once completion, late instance → revision 2."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from omnimri_samples import synthetic_series, write_series
from tests.fixtures.dcmtk import dcmsend, popen_dcmtk
from tests.fixtures.node import NodeProcess, dataset_bytes

QUIET_S = 20.0
"""Long enough to restart the node and resend before the series is quiet: the timers resume
from the last instance received before the kill, and a restart took 5-10 s on the loaded
2-core machine (a 4 s quiet period completed the series with the instances before the kill)."""


def test_kill9_mid_series_then_restart_completes_once_and_late_instance_is_revision_2(
        node_factory: Callable[..., NodeProcess], tmp_path: Path, dcmtk: None) -> None:
    node = node_factory(completion={"quiet_seconds": QUIET_S, "poll_interval_s": 0.1})
    datasets = synthetic_series(201, 64, 64, seed=7)
    files = write_series(datasets, tmp_path / "series")
    by_uid = {d.SOPInstanceUID: f for d, f in zip(datasets, files, strict=True)}
    series_uid = datasets[0].SeriesInstanceUID
    first, late = files[:200], files[200]

    sender = popen_dcmtk("dcmsend", ["-aet", "DCMSEND", "-aec", "OMNIMRI", "-dn", "127.0.0.1",
                                     str(node.port), *map(str, first)])
    index = node.index()
    deadline = time.monotonic() + 60
    while index.count_instances() < 40:
        assert time.monotonic() < deadline, "node stored nothing"
        assert sender.poll() is None, "dcmsend ended before the kill"
        time.sleep(0.005)
    node.kill9()
    sender.communicate(timeout=60)

    node.restart()
    # Rows are written after the acknowledgement (by the materialiser); the start-up replay
    # indexes what was journaled, so only now does the index hold every acknowledged one.
    acknowledged = index.count_instances()
    assert 40 <= acknowledged < 200
    # Everything the index holds is complete on disk; partial receptions were purged.
    for inst in index.instances_of(series_uid):
        assert dataset_bytes(inst.path) == dataset_bytes(by_uid[inst.sop_instance_uid])
    assert list((node.spool / ".incoming").iterdir()) == []
    assert node.events("series_resumed") and node.events("series_resumed")[-1]["count"] == 1

    # The sender retries the whole series: already stored instances are duplicates.
    r = dcmsend(node.port, first, "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    [ev] = node.wait_for_event("series_complete", timeout_s=QUIET_S + 10, series_uid=series_uid)
    assert (ev["revision"], ev["instances"], ev["reason"]) == (1, 200, "quiet")
    done = node.events("association_released", calling_ae="DCMSEND")[-1]
    assert (done["duplicates"], done["stored"]) == (acknowledged, 200 - acknowledged)
    assert [e.revision for e in index.events(series_uid)] == [1]

    # A late instance after completion starts revision 2, holding the whole series.
    r = dcmsend(node.port, [late], "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    [note] = node.wait_for_event("late_instance_new_revision", series_uid=series_uid)
    assert note["revision"] == 2
    [ev2] = node.wait_for_event("series_complete", timeout_s=QUIET_S + 10, series_uid=series_uid,
                                revision=2)
    assert ev2["instances"] == 201
    assert len(index.load_series(series_uid, 1).instances) == 200
    r2 = index.load_series(series_uid, 2)
    assert len(r2.instances) == 201 and r2.instances[-1].sop_instance_uid == \
        datasets[200].SOPInstanceUID

    # Another restart completes nothing again.
    node.kill9()
    node.restart()
    time.sleep(0.5)
    assert [(e.revision, e.instance_count) for e in index.events(series_uid)] == [(1, 200),
                                                                                  (2, 201)]
    assert len(node.events("series_complete", series_uid=series_uid)) == 2


def test_kill9_after_acknowledgements_before_their_index_rows_recovers_from_the_journal(
        node_factory: Callable[..., NodeProcess], tmp_path: Path, dcmtk: None) -> None:
    """Acknowledged means durable even with no index row yet: the journal alone recovers it.

    The test holds SQLite's write lock on the node's database, so no index row can be written
    (the node's materialiser waits for the lock), while the association thread acknowledges:
    its path needs the journal flush only. kill -9 in that window, then a restart indexes
    every acknowledged instance from the journal, files byte for byte as sent. A duplicate
    sent in the window is recognised from the journaled-but-unindexed set.
    """
    from pynetdicom import _config

    from tests.fixtures.node import associate, file_context

    node = node_factory()
    datasets = synthetic_series(12, 64, 64, seed=13)
    files = write_series(datasets, tmp_path / "series")
    index = node.index()
    blocker = sqlite3.connect(node.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock: no row can be committed meanwhile
    try:
        assoc = associate(node.port, "OMNIMRI", "PYNETDICOM", [file_context(files[0])])
        assert assoc.is_established
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            statuses = [int(assoc.send_c_store(p).Status) for p in [*files, files[0]]]
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        assert statuses == [0x0000] * 13
        assert index.count_instances() == 0  # the window: acknowledged, not indexed
        [dup] = node.wait_for_event("duplicate_instance")
        assert dup["same_bytes"] is True
        node.kill9()
        assoc.abort()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert index.count_instances() == 0

    node.restart()
    assert index.count_instances() == 12
    [replayed] = node.events("journal_replayed")
    assert replayed["instances"] == 12
    by_uid = {d.SOPInstanceUID: f for d, f in zip(datasets, files, strict=True)}
    stored = index.instances_of(datasets[0].SeriesInstanceUID)
    assert sorted(i.sop_instance_uid for i in stored) == sorted(by_uid)
    for inst in stored:
        assert dataset_bytes(inst.path) == dataset_bytes(by_uid[inst.sop_instance_uid])
    assert list((node.spool / ".incoming").iterdir()) == []
    # A resend after the restart is a duplicate of the replayed instance.
    r = dcmsend(node.port, files[:3], "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    done = node.wait_for_event("association_released", calling_ae="DCMSEND")[-1]
    assert (done["duplicates"], done["stored"]) == (3, 0)


def test_rows_follow_the_acknowledgements_once_the_database_is_free_and_release_waits(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """No crash: while another process holds the write lock, instances are acknowledged and
    their rows wait; once it is free the rows follow, and the A-RELEASE-RP waits for them."""
    from pynetdicom import _config

    from tests.fixtures.node import associate, file_context

    node = node_factory()
    datasets = synthetic_series(8, 64, 64, seed=17)
    files = write_series(datasets, tmp_path / "series")
    index = node.index()
    blocker = sqlite3.connect(node.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    assoc = associate(node.port, "OMNIMRI", "PYNETDICOM", [file_context(files[0])])
    try:
        assert assoc.is_established
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            statuses = [int(assoc.send_c_store(p).Status) for p in files]
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        assert statuses == [0x0000] * 8
        assert index.count_instances() == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assoc.release()  # answered once the materialiser got the lock and wrote the rows
    assert index.count_instances() == 8
    [done] = node.wait_for_event("association_released", calling_ae="PYNETDICOM")
    assert (done["stored"], done["duplicates"], done["failed"]) == (8, 0, 0)
    assert {i.sop_instance_uid for i in index.instances_of(datasets[0].SeriesInstanceUID)} \
        == {d.SOPInstanceUID for d in datasets}
