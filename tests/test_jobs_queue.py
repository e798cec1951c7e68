"""The durable job queue: priority order, leases, backoff, dead letter, retry/cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_node.config import NodeSettings, parse_config
from dicom_node.jobs import (
    JobError,
    JobOutput,
    JobQueue,
    LeaseLost,
    NewJob,
    backoff_s,
    job_id_for,
    series_from_json,
    series_to_json,
)
from dicom_node.series import Series, StoredInstance
from tests.fixtures import legacy_schema as legacy
from tests.fixtures.legacy_schema import make_legacy_db


def make_series(uid: str, revision: int = 1, n: int = 2, calling_ae: str = "SCANNER") -> Series:
    now = datetime.now(UTC)
    insts = tuple(
        StoredInstance(
            sop_instance_uid=f"{uid}.{k}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            series_instance_uid=uid, study_instance_uid="1.2.3", path=Path(f"/x/{uid}/{k}.dcm"),
            transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=100, received_at=now,
            instance_number=k, calling_ae=calling_ae, called_ae="OMNIMRI", peer_host="127.0.0.1",
        )
        for k in range(n)
    )
    return Series(uid, "1.2.3", revision, insts, now, modality="MR", calling_ae=calling_ae,
                  called_ae="OMNIMRI", peer_host="127.0.0.1")


@pytest.fixture
def settings(tmp_path: Path, db_target: str | Path) -> NodeSettings:
    """Settings on each back end (``db_target``: SQLite file, PostgreSQL database)."""
    return parse_config(
        {
            "storage": {"path": "spool", "fsync": False, "database": str(db_target)},
            "jobs": {"max_attempts": 3, "backoff_initial_s": 1, "backoff_max_s": 3},
            "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        },
        tmp_path,
    )


@pytest.fixture
def queue(settings: NodeSettings) -> JobQueue:
    q = JobQueue(settings)
    yield q
    q.close()


def test_series_snapshot_roundtrip() -> None:
    s = make_series("1.2.3.4", revision=3)
    assert series_from_json(series_to_json(s)) == s


def test_enqueue_is_idempotent(queue: JobQueue) -> None:
    s = make_series("1.2.3.4")
    jid, created = queue.enqueue(NewJob(s, "preview", ("pacs",)))
    jid2, created2 = queue.enqueue(NewJob(s, "preview", ("other",)))
    assert created and not created2 and jid == jid2 == job_id_for(s.key, "preview")
    assert len(queue.list_jobs()) == 1
    # A new revision of the same series is new work.
    _, created3 = queue.enqueue(NewJob(make_series("1.2.3.4", revision=2), "preview", ("pacs",)))
    assert created3 and len(queue.list_jobs()) == 2


def test_jobs_of_one_series_oldest_first_and_ping(queue: JobQueue) -> None:
    first = queue.enqueue(NewJob(make_series("1.2.3.4"), "preview", ()))[0]
    queue.enqueue(NewJob(make_series("1.2.3.5"), "preview", ()))
    second = queue.enqueue(NewJob(make_series("1.2.3.4", revision=2), "brain", ()))[0]
    assert [j.id for j in queue.of_series("1.2.3.4")] == [first, second]
    assert queue.of_series("9.9") == []
    queue.ping()
    queue.close()
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises on a closed connection
        queue.ping()


def test_claim_by_priority_then_age(queue: JobQueue) -> None:
    low = queue.enqueue(NewJob(make_series("1.1"), "preview", (), priority="low"))[0]
    normal1 = queue.enqueue(NewJob(make_series("1.2"), "preview", ()))[0]
    urgent = queue.enqueue(NewJob(make_series("1.3"), "preview", (), priority="urgent"))[0]
    normal2 = queue.enqueue(NewJob(make_series("1.4"), "preview", ()))[0]
    order = []
    while (job := queue.claim()) is not None:
        assert job.state == "running" and job.attempts == 1
        order.append(job.id)
    assert order == [urgent, normal1, normal2, low]


def test_expired_lease_is_claimed_again(queue: JobQueue) -> None:
    jid = queue.enqueue(NewJob(make_series("2.1"), "preview", ()))[0]
    job = queue.claim(owner="otherhost:1:aa")
    assert job is not None and job.id == jid
    assert queue.claim(owner="otherhost:2:bb") is None  # lease held
    # Another host's lease only ends by expiry.
    later = time.time() + 10_000
    again = queue.claim(owner="otherhost:2:bb", now=later)
    assert again is not None and again.id == jid and again.attempts == 2
    # The first worker lost the job: its updates are refused.
    with pytest.raises(LeaseLost):
        queue.complete(jid, owner="otherhost:1:aa")
    queue.complete(jid, owner="otherhost:2:bb")
    assert queue.get(jid).state == "done"


def test_dead_process_lease_released_at_start(settings: NodeSettings, queue: JobQueue) -> None:
    jid = queue.enqueue(NewJob(make_series("3.1"), "preview", ()))[0]
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_owner = f"{os.uname().nodename}:{int(proc.stdout)}:deadbeef"
    assert queue.claim(owner=dead_owner) is not None
    assert queue.claim() is None
    assert queue.recover_orphans() == 1
    job = queue.claim()
    assert job is not None and job.id == jid and job.attempts == 2


def test_outputs_resume_in_dispatching(queue: JobQueue, tmp_path: Path) -> None:
    jid = queue.enqueue(NewJob(make_series("4.1"), "preview", ("pacs",)))[0]
    assert queue.claim() is not None
    queue.set_state(jid, "exporting")
    queue.store_outputs(jid, [JobOutput("9.9.1", "1.2.840.10008.5.1.4.1.1.7", tmp_path / "a")])
    assert queue.get(jid).state == "dispatching"
    queue.record_deliveries(jid, "pacs", ["9.9.1"])
    queue.record_deliveries(jid, "pacs", ["9.9.1"])  # idempotent
    assert queue.delivered(jid, "pacs") == {"9.9.1"}
    # The worker dies: the job is taken again straight into dispatching.
    job = queue.claim(now=time.time() + 10_000, owner="h:1:x")
    assert job is not None and job.state == "dispatching"
    assert [o.sop_instance_uid for o in queue.outputs(jid)] == ["9.9.1"]


def test_backoff_then_dead_letter(queue: JobQueue, settings: NodeSettings) -> None:
    assert [backoff_s(a, settings.jobs) for a in (1, 2, 3, 4, 10)] == [1, 2, 3, 3, 3]
    jid = queue.enqueue(NewJob(make_series("5.1"), "preview", ()))[0]
    t0 = time.time()
    assert queue.claim(now=t0) is not None
    assert queue.fail(jid, "PACS refused") == "queued"
    job = queue.get(jid)
    assert job.last_error == "PACS refused" and job.next_attempt_at >= t0 + 1
    assert queue.claim(now=t0 + 0.5) is None  # not due yet
    assert queue.claim(now=job.next_attempt_at + 0.01) is not None
    assert queue.fail(jid, "again") == "queued"
    assert queue.get(jid).next_attempt_at >= time.time() + 1.5  # doubled
    assert queue.claim(now=time.time() + 100) is not None
    assert queue.fail(jid, "third") == "failed"  # max_attempts 3: dead letter
    job = queue.get(jid)
    assert job.state == "failed" and job.attempts == 3 and job.finished_at is not None
    assert queue.claim(now=time.time() + 10_000) is None


def test_retry_and_cancel(queue: JobQueue, tmp_path: Path) -> None:
    jid = queue.enqueue(NewJob(make_series("6.1"), "preview", ("pacs",)))[0]
    with pytest.raises(JobError, match="retry works on"):
        queue.retry(jid)
    queue.claim()
    queue.fail(jid, "bad pipeline", permanent=True)
    assert queue.get(jid).state == "failed"
    job = queue.retry(jid[:8])  # unique prefix
    assert job.state == "queued" and job.attempts == 0
    # Cancelling a running job makes the worker lose it.
    assert queue.claim() is not None
    queue.cancel(jid)
    with pytest.raises(LeaseLost):
        queue.set_state(jid, "exporting")
    assert queue.get(jid).state == "cancelled"
    with pytest.raises(JobError, match="already cancelled"):
        queue.cancel(jid)
    assert queue.claim() is None
    # A done job runs again only with rerun, which forgets outputs and deliveries.
    queue.retry(jid)
    queue.claim()
    queue.store_outputs(jid, [JobOutput("9.1", "1.2", tmp_path / "x")])
    queue.record_deliveries(jid, "pacs", ["9.1"])
    queue.complete(jid)
    with pytest.raises(JobError):
        queue.retry(jid)
    queue.retry(jid, rerun=True)
    assert queue.outputs(jid) == [] and queue.delivered(jid, "pacs") == set()
    with pytest.raises(JobError, match="no job"):
        queue.get("ffffffffffff")
    with pytest.raises(JobError, match="unknown state"):
        queue.list_jobs(state="weird")


def _outage_settings(tmp_path: Path) -> NodeSettings:
    return parse_config({
        "storage": {"path": "spool", "fsync": False},
        "jobs": {"max_attempts": 5, "backoff_initial_s": 5, "backoff_max_s": 900,
                 "dispatch_retry_for_s": 14400},
        "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
    }, tmp_path)


def test_two_hour_outage_on_a_simulated_clock(tmp_path: Path) -> None:
    """Issue #17 item 8: a 2-hour PACS outage, the shipped defaults, a simulated clock.

    The job keeps retrying (capped backoff, max_attempts does not apply to deliveries) and is
    made due at once when the PACS answers again; it is never dead-lettered.
    """
    queue = JobQueue(_outage_settings(tmp_path))
    jid = queue.enqueue(NewJob(make_series("8.1"), "preview", ("pacs",)))[0]
    t0 = t = float(int(time.time()) + 10)
    delays = []
    while t < t0 + 7200:
        assert queue.claim(now=t) is not None
        assert queue.fail(jid, "destination pacs: association rejected",
                          undelivered=["pacs"], now=t) == "queued"
        job = queue.get(jid)
        delays.append(job.next_attempt_at - t)
        assert job.waiting_for == ("pacs",) and job.dispatch_failing_since == t0
        t = job.next_attempt_at
    assert delays[:4] == [5, 10, 20, 40] and max(delays) == 900  # capped
    assert len(delays) == 15  # attempts in 2 h: 8 doubling, then one per 15 min
    # The PACS answers again at 2 h, mid-backoff: the probe makes the job due now.
    back = t0 + 7200
    assert queue.get(jid).next_attempt_at > back
    assert queue.waiting_destinations(now=back) == {"pacs": [jid]}
    assert queue.resume_waiting("pacs", now=back) == 1
    claimed = queue.claim(now=back)
    assert claimed is not None and claimed.id == jid and claimed.state == "running"
    queue.complete(jid)
    done = queue.get(jid)
    assert done.state == "done" and done.waiting_for == ()


def test_outage_longer_than_the_window_dead_letters(tmp_path: Path) -> None:
    queue = JobQueue(_outage_settings(tmp_path))
    jid = queue.enqueue(NewJob(make_series("8.2"), "preview", ("pacs",)))[0]
    t0 = t = float(int(time.time()) + 10)
    states = []
    while True:
        assert queue.claim(now=t) is not None
        states.append(queue.fail(jid, "down", undelivered=["pacs"], now=t))
        if states[-1] == "failed":
            break
        t = queue.get(jid).next_attempt_at
    assert t == t0 + 14400  # the last retry falls on the window's end, then dead letter
    job = queue.get(jid)
    assert job.state == "failed" and "jobs.dispatch_retry_for_s" in (job.last_error or "")
    assert states.count("queued") == len(states) - 1
    # An operator retry starts a fresh window.
    queue.retry(jid)
    fresh = queue.get(jid)
    assert fresh.dispatch_failing_since is None and fresh.dispatch_attempts == 0


def test_pipeline_failures_still_use_max_attempts(tmp_path: Path) -> None:
    queue = JobQueue(_outage_settings(tmp_path))
    jid = queue.enqueue(NewJob(make_series("8.3"), "preview", ("pacs",)))[0]
    t = time.time() + 10
    for _ in range(3):  # three failed deliveries do not use up the pipeline's attempts
        assert queue.claim(now=t) is not None
        queue.fail(jid, "down", undelivered=["pacs"], now=t)
        t = queue.get(jid).next_attempt_at
    for k in range(5):
        assert queue.claim(now=t) is not None
        state = queue.fail(jid, "pipeline crashed", now=t)
        assert state == ("failed" if k == 4 else "queued")
        t = queue.get(jid).next_attempt_at


def test_old_jobs_table_gains_the_dispatch_columns(tmp_path: Path) -> None:
    settings = _outage_settings(tmp_path)
    db = Path(settings.storage.database_path)
    make_legacy_db(db, legacy.JOBS)
    queue = JobQueue(settings)
    jid = queue.enqueue(NewJob(make_series("8.4"), "preview", ("pacs",)))[0]
    assert queue.get(jid).dispatch_attempts == 0
    JobQueue(settings).close()  # idempotent
