"""Series completion on the real SQLite index: quiet period, expected count, revisions, events."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from dicom_node.config import CompletionConfig
from dicom_node.db import connect, table_columns
from dicom_node.index import InstanceRecord, SeriesIndex
from dicom_node.series_tracker import SeriesTracker, expected_count
from dicom_node.spool import InstanceHeader
from tests.fixtures.wait import wait_until

STUDY = "1.2.826.0.1.3680043.10.1526.1"
SERIES = "1.2.826.0.1.3680043.10.1526.2"


def rec(n: int, *, series: str = SERIES, at: float, expected: int | None = None,
        sop_class: str = str(MRImageStorage)) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{n}", sop_class_uid=sop_class, series_instance_uid=series,
        study_instance_uid=STUDY, path=Path(f"/spool/{series}/{n}.dcm"),
        transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1000 + n, received_at=at,
        modality="MR", series_description="T1 AXIAL", instance_number=n,
        expected_count=expected, calling_ae="SCANNER", called_ae="OMNIMRI",
        peer_host="127.0.0.1")


@pytest.fixture
def index(db_target: str | Path) -> SeriesIndex:
    """An index on each back end (``db_target``: SQLite file, PostgreSQL database)."""
    return SeriesIndex(db_target)


def header(**kw: object) -> InstanceHeader:
    base: dict[str, object] = dict(sop_class_uid=str(MRImageStorage), sop_instance_uid="1.2",
                                   study_instance_uid="1.3", series_instance_uid="1.4",
                                   transfer_syntax_uid="1.2.840.10008.1.2.1")
    base.update(kw)
    return InstanceHeader(**base)  # type: ignore[arg-type]


def test_expected_count_is_conservative() -> None:
    assert expected_count(header()) is None
    assert expected_count(header(sop_class_uid=str(EnhancedMRImageStorage),
                                 number_of_frames=40)) == 1
    assert expected_count(header(sop_class_uid=str(EnhancedMRImageStorage),
                                 number_of_frames=1)) is None
    assert expected_count(header(number_of_temporal_positions=4, number_of_slices=30)) == 120
    assert expected_count(header(number_of_temporal_positions=4)) is None
    assert expected_count(header(number_of_temporal_positions=0, number_of_slices=30)) is None
    assert expected_count(header(number_of_temporal_positions=10**4,
                                 number_of_slices=10**4)) is None


def test_quiet_period_completes_exactly_once(index: SeriesIndex) -> None:
    t0 = 1_000_000.0
    out = index.record([rec(i, at=t0 + i * 0.1) for i in range(1, 6)])
    assert out.new == [True] * 5 and not out.completed
    assert index.complete_quiet(10.0, now=t0 + 5) == []  # last instance 4.5 s ago
    events = index.complete_quiet(10.0, now=t0 + 10.5)
    assert [(e.series_instance_uid, e.revision, e.reason, e.instance_count) for e in events] == [
        (SERIES, 1, "quiet", 5)]
    assert index.complete_quiet(10.0, now=t0 + 100) == []
    s = index.load_series(SERIES, 1)
    assert [i.instance_number for i in s.instances] == [1, 2, 3, 4, 5]
    assert s.completion_reason == "quiet" and s.modality == "MR"
    assert s.calling_ae == "SCANNER" and s.called_ae == "OMNIMRI" and s.peer_host == "127.0.0.1"
    row = index.list_series(10)[0]
    assert (row["state"], row["instance_count"], row["revision"]) == ("complete", 5, 1)


def test_duplicates_are_not_counted(index: SeriesIndex) -> None:
    index.record([rec(1, at=1.0), rec(2, at=1.1)])
    out = index.record([rec(1, at=1.2)])
    assert out.new == [False]
    assert index.list_series(1)[0]["instance_count"] == 2


def test_late_instance_starts_revision_with_whole_series(index: SeriesIndex) -> None:
    t0 = 2_000_000.0
    index.record([rec(i, at=t0) for i in range(1, 4)])
    [ev1] = index.complete_quiet(1.0, now=t0 + 2)
    out = index.record([rec(4, at=t0 + 5)])
    assert out.new_revisions == [(SERIES, 2)]
    assert index.list_series(1)[0]["state"] == "receiving"
    [ev2] = index.complete_quiet(1.0, now=t0 + 7)
    assert (ev1.revision, ev2.revision, ev2.instance_count) == (1, 2, 4)
    assert len(index.load_series(SERIES, 1).instances) == 3
    r2 = index.load_series(SERIES, 2)
    assert [i.instance_number for i in r2.instances] == [1, 2, 3, 4]
    with pytest.raises(KeyError):
        index.load_series(SERIES, 3)
    # series_in_study: latest complete revision
    [latest] = index.series_in_study(STUDY)
    assert latest.revision == 2 and len(latest.instances) == 4


def test_expected_count_completes_at_once(index: SeriesIndex) -> None:
    enh = "1.2.826.0.1.3680043.10.1526.3"
    out = index.record([rec(1, series=enh, at=time.time(), expected=1,
                            sop_class=str(EnhancedMRImageStorage))])
    assert [(e.series_instance_uid, e.reason) for e in out.completed] == [(enh, "expected_count")]
    # 2 x 3 instances expected: the 6th completes it.
    dyn = "1.2.826.0.1.3680043.10.1526.4"
    for i in range(1, 6):
        assert index.record([rec(i, series=dyn, at=time.time(), expected=6)]).completed == []
    assert len(index.record([rec(6, series=dyn, at=time.time(), expected=6)]).completed) == 1
    assert index.complete_quiet(0.001, now=time.time() + 1) == []  # nothing twice


def test_disagreeing_expected_counts_fall_back_to_quiet(index: SeriesIndex) -> None:
    index.record([rec(1, at=time.time(), expected=2)])
    out = index.record([rec(2, at=time.time(), expected=3)])
    assert out.completed == []
    assert index.list_series(1)[0]["expected_count"] == -1


def test_concurrent_trackers_complete_once(db_target: str | Path) -> None:
    db = db_target
    a, b = SeriesIndex(db), SeriesIndex(db)
    t0 = 3_000_000.0
    a.record([rec(i, series=f"{SERIES}.{k}", at=t0) for k in range(20) for i in range(2)])
    results: list[int] = []

    def run(ix: SeriesIndex) -> None:
        results.append(len(ix.complete_quiet(1.0, now=t0 + 5)))

    threads = [threading.Thread(target=run, args=(ix,)) for ix in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 20
    assert len(a.events()) == 20


def test_pending_events_and_mark_routed_in_callers_transaction(index: SeriesIndex) -> None:
    index.record([rec(1, at=10.0)])
    [ev] = index.complete_quiet(1.0, now=20.0)
    assert [e.event_id for e in index.pending_events()] == [ev.event_id]
    conn = connect(index.db_path)
    conn.execute("BEGIN IMMEDIATE")
    index.mark_routed(ev.event_id, conn=conn)
    conn.execute("ROLLBACK")  # the router's transaction failed: still pending
    assert [e.event_id for e in index.pending_events()] == [ev.event_id]
    conn.execute("BEGIN IMMEDIATE")
    index.mark_routed(ev.event_id, conn=conn)
    conn.execute("COMMIT")
    assert index.pending_events() == []
    cols = table_columns(conn, "series_events")
    assert {"id", "series_instance_uid", "revision", "completed_at", "reason",
            "routed_at"} <= cols


def test_tracker_thread_resumes_from_index(db_target: str | Path) -> None:
    db = db_target
    SeriesIndex(db).record([rec(i, at=time.time() - 0.5) for i in range(1, 4)])
    # A "restarted" tracker on a fresh connection completes the series it finds in the index.
    index = SeriesIndex(db)
    tracker = SeriesTracker(index, CompletionConfig(quiet_seconds=1.0, poll_interval_s=0.05))
    seen: list[int] = []
    tracker.add_listener(lambda ev: seen.append(ev.revision))
    tracker.start()
    try:
        wait_until(lambda: seen, 5, interval_s=0.02, message="no completion event")
    finally:
        tracker.stop()
    assert seen == [1]
    assert len(index.events(SERIES)) == 1


def test_reconcile_drops_rows_of_the_last_unflushed_batch(index: SeriesIndex,
                                                          tmp_path: Path) -> None:
    # Batch 1 is durable; batch 2 was indexed while its files were being fsync'd, then the
    # machine crashed: one of its files never reached the disk.
    out1 = index.record([rec(1, at=1.0), rec(2, at=1.0)], flushed_upto=0)
    index.record([rec(3, at=2.0), rec(4, at=2.0)], flushed_upto=out1.max_rowid)
    other = "1.2.826.0.1.3680043.10.1526.9"
    index.record([rec(1, series=other, at=2.0)])
    lost = {f"{SERIES}.4", f"{other}.1"}
    checked: list[str] = []

    def intact(path: Path, size: int, sop: str) -> bool:
        checked.append(sop)
        return sop not in lost

    assert sorted(index.reconcile(intact)) == sorted(lost)
    assert sorted(checked) == sorted([f"{SERIES}.3", f"{SERIES}.4", f"{other}.1"])
    [row] = index.list_series(10)
    assert row["series_instance_uid"] == SERIES and row["instance_count"] == 3
    assert index.reconcile(intact) == []  # the watermark moved: nothing left to check


def test_forget_undoes_a_late_revision(index: SeriesIndex) -> None:
    index.record([rec(1, at=1.0), rec(2, at=1.0)])
    index.complete_quiet(1.0, now=5.0)
    out = index.record([rec(3, at=6.0)])
    assert out.new_revisions == [(SERIES, 2)]
    index.forget([f"{SERIES}.3"])
    row = index.list_series(1)[0]
    assert (row["state"], row["revision"], row["instance_count"]) == ("complete", 1, 2)


def test_record_can_leave_expected_count_completion_to_the_caller(index: SeriesIndex) -> None:
    enh = "1.2.826.0.1.3680043.10.1526.7"
    out = index.record([rec(1, series=enh, at=time.time(), expected=1)],
                       use_expected_count=False)
    assert out.completed == [] and out.due_expected == [enh]
    [ev] = index.complete_expected(out.due_expected)
    assert ev.reason == "expected_count"
    assert index.complete_expected(out.due_expected) == []


def test_reconcile_under_a_spool_leaves_other_nodes_rows(index: SeriesIndex) -> None:
    """Nodes sharing a database: a restarting node checks only the rows of its own spool."""
    import dataclasses

    mine = rec(1, at=1.0)
    theirs = dataclasses.replace(rec(2, at=1.0), path=Path(f"/other-spool/{SERIES}/2.dcm"))
    index.record([mine, theirs], flushed_upto=0)
    checked: list[str] = []

    def nothing_intact(path: Path, size: int, sop: str) -> bool:
        checked.append(sop)
        return False

    assert index.reconcile(nothing_intact, under=Path("/spool")) == [mine.sop_instance_uid]
    assert checked == [mine.sop_instance_uid]
    assert [i.sop_instance_uid for i in index.instances_of(SERIES)] == [theirs.sop_instance_uid]
