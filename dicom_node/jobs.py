"""The durable job queue: one job per (series revision, pipeline), in the node database.

A job moves ``queued → running → exporting → dispatching → done``; a failed attempt goes back
to ``queued`` with an exponential backoff (``jobs.backoff_initial_s`` doubling per attempt, at
most ``jobs.backoff_max_s``) until ``jobs.max_attempts`` is spent, then to ``failed`` (the dead
letter, ``omnimri-node jobs retry ID`` brings it back). ``cancelled`` is set by an operator.

A failed *delivery* (destination down, outputs not acknowledged) is counted apart: the job
retries with the same capped backoff for ``jobs.dispatch_retry_for_s`` (default 4 h) from its
first failed delivery, whatever ``max_attempts`` says, and records the destinations it waits
for (``waiting_for``); the worker pool probes those (C-ECHO / HTTP check) every
``jobs.probe_interval_s`` and retries the waiting jobs at once when one answers
(:meth:`JobQueue.resume_waiting`). Only after the window is the job failed.

Crash safety
------------
* A worker *claims* a job with a lease (owner + expiry). The owner names the process
  (``host:pid:token``), so after a ``kill -9`` the restarted node (or, every
  :data:`ORPHAN_CHECK_S`, a sibling node process on the same host) sees that the owner is gone
  and takes the job again at once; a lease that simply expires (a node on another host died)
  is taken again too. On PostgreSQL the claim is ``SELECT … FOR UPDATE SKIP LOCKED``: nodes
  sharing the database never claim one job twice.
* The outputs of a job are written to ``<spool>/results/<job_id>/`` (fsync'd) and listed in
  ``job_outputs`` *before* the job enters ``dispatching``: a restart dispatches the stored files
  and does not run the pipeline again.
* Each (job, output SOP Instance UID, destination) that a destination acknowledged is recorded
  in ``deliveries``; a restart sends only what is not recorded. Output UIDs are derived from
  the job id, so the one instance that may be sent twice (sent, then killed before the record)
  replaces itself at the PACS rather than duplicating.

Enqueueing is idempotent: the ``UNIQUE (series_key, pipeline)`` constraint turns a second
enqueue of the same work into a no-op, so routing a completion event twice is harmless.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dicom_node.config import JobsConfig, NodeSettings
from dicom_node.db import _PROCESS_TOKEN, connect, for_update, node_name
from dicom_node.logs import get_logger
from dicom_node.migrations import migrate
from dicom_node.series import Series, StoredInstance

log = get_logger(__name__)

JobState = Literal["queued", "running", "exporting", "dispatching", "done", "failed", "cancelled"]
"""States of a job."""

STATES: tuple[JobState, ...] = (
    "queued", "running", "exporting", "dispatching", "done", "failed", "cancelled",
)
ACTIVE_STATES: tuple[JobState, ...] = ("running", "exporting", "dispatching")
"""States in which a worker holds the job's lease."""
TERMINAL_STATES: tuple[JobState, ...] = ("done", "failed", "cancelled")

Priority = Literal["urgent", "normal", "low"]
PRIORITY_RANK: dict[str, int] = {"urgent": 0, "normal": 1, "low": 2}
"""Claim order: lower rank first, then older jobs first."""

LEASE_S = 120.0
"""How long a claim holds before another worker may take the job, seconds (renewed by
:meth:`JobQueue.renew` while the job runs). Default 120."""
ORPHAN_CHECK_S = 5.0
"""How often an idle queue looks for jobs leased to a dead process on this host, seconds
(nodes sharing one database: a sibling killed with -9 loses its jobs within this time)."""

class JobError(Exception):
    """A job operation was refused (unknown id, wrong state); the message says why."""


class LeaseLost(JobError):
    """The worker no longer holds the job (cancelled by an operator or taken by another)."""


@dataclass(frozen=True, slots=True)
class Job:
    """One row of the queue."""

    id: str
    series_key: str
    series_uid: str
    study_uid: str
    revision: int
    pipeline: str
    destinations: tuple[str, ...]
    rule: str
    priority: Priority
    state: JobState
    attempts: int
    created_at: float
    """UTC epoch seconds."""
    updated_at: float
    started_at: float | None
    finished_at: float | None
    next_attempt_at: float
    lease_owner: str | None
    lease_expires_at: float | None
    last_error: str | None
    event_id: str | None
    series_json: str = field(repr=False)
    dispatch_failing_since: float | None = None
    """UTC epoch seconds of the first failed delivery since the last success (``None``: none)."""
    dispatch_attempts: int = 0
    """Attempts whose delivery failed (not counted against ``jobs.max_attempts``)."""
    waiting_for: tuple[str, ...] = ()
    """Destinations the last attempt could not deliver to (probed while the job waits)."""

    @property
    def series(self) -> Series:
        """The series revision this job reads (a snapshot taken when it was enqueued)."""
        return series_from_json(self.series_json)

    def summary(self) -> dict[str, Any]:
        """Plain fields for tables and JSON output (timestamps as ISO 8601 UTC)."""
        return {
            "id": self.id,
            "state": self.state,
            "priority": self.priority,
            "pipeline": self.pipeline,
            "destinations": ",".join(self.destinations),
            "rule": self.rule,
            "series": self.series_key,
            "study": self.study_uid,
            "attempts": self.attempts,
            "created": _iso(self.created_at),
            "updated": _iso(self.updated_at),
            "started": _iso(self.started_at),
            "finished": _iso(self.finished_at),
            "next_attempt": _iso(self.next_attempt_at) if self.state == "queued" else None,
            "last_error": self.last_error,
            "waiting_for": ",".join(self.waiting_for),
            "dispatch_failing_since": _iso(self.dispatch_failing_since),
        }


@dataclass(frozen=True, slots=True)
class JobOutput:
    """An output instance of a job, stored durably before dispatch."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path


@dataclass(frozen=True, slots=True)
class NewJob:
    """What the router asks to enqueue."""

    series: Series
    pipeline: str
    destinations: tuple[str, ...]
    rule: str = ""
    priority: Priority = "normal"
    event_id: str | None = None


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def job_id_for(series_key: str, pipeline: str) -> str:
    """Deterministic job id of (series revision key, pipeline): 20 hex digits.

    The same work always gets the same id, so output UIDs derived from it are stable.
    """
    return hashlib.sha256(f"{series_key}\x00{pipeline}".encode()).hexdigest()[:20]


def series_to_json(series: Series) -> str:
    """Serialise a :class:`Series` (paths, UIDs, association details) for the job row."""

    def inst(i: StoredInstance) -> dict[str, Any]:
        return {
            "sop_instance_uid": i.sop_instance_uid,
            "sop_class_uid": i.sop_class_uid,
            "series_instance_uid": i.series_instance_uid,
            "study_instance_uid": i.study_instance_uid,
            "path": str(i.path),
            "transfer_syntax_uid": i.transfer_syntax_uid,
            "size_bytes": i.size_bytes,
            "received_at": i.received_at.isoformat(),
            "instance_number": i.instance_number,
            "number_of_frames": i.number_of_frames,
            "calling_ae": i.calling_ae,
            "called_ae": i.called_ae,
            "peer_host": i.peer_host,
        }

    return json.dumps(
        {
            "series_instance_uid": series.series_instance_uid,
            "study_instance_uid": series.study_instance_uid,
            "revision": series.revision,
            "instances": [inst(i) for i in series.instances],
            "completed_at": series.completed_at.isoformat(),
            "modality": series.modality,
            "series_description": series.series_description,
            "calling_ae": series.calling_ae,
            "called_ae": series.called_ae,
            "peer_host": series.peer_host,
            "completion_reason": series.completion_reason,
            "extra": dict(series.extra),
        }
    )


def series_from_json(text: str) -> Series:
    """Inverse of :func:`series_to_json`."""
    d = json.loads(text)
    instances = tuple(
        StoredInstance(
            **{
                **i,
                "path": Path(i["path"]),
                "received_at": datetime.fromisoformat(i["received_at"]),
            }
        )
        for i in d.pop("instances")
    )
    d["completed_at"] = datetime.fromisoformat(d["completed_at"])
    return Series(instances=instances, **d)


def worker_identity() -> str:
    """Lease owner name of this process: ``host:pid:token`` (:func:`dicom_node.db.node_name`)."""
    return node_name()


def _owner_alive(owner: str) -> bool:
    """Whether the process named by a lease owner may still be running (same host only)."""
    try:
        host, pid_s, token = owner.split(":", 2)
        pid = int(pid_s)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True  # another machine: only the lease expiry can tell
    if pid == os.getpid():
        return token == _PROCESS_TOKEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def backoff_s(attempts: int, cfg: JobsConfig) -> float:
    """Delay before the next attempt after ``attempts`` failed ones, seconds.

    ``backoff_initial_s * 2**(attempts - 1)``, capped at ``backoff_max_s``.
    """
    exp = max(attempts - 1, 0)
    return float(min(cfg.backoff_initial_s * (2.0 ** min(exp, 60)), cfg.backoff_max_s))


def results_dir(settings: NodeSettings) -> Path:
    """Folder under the spool where job outputs are kept until delivered: ``<spool>/results``."""
    return settings.storage.path / "results"


class JobQueue:
    """The job queue over the node database (thread-safe: one connection per call site lock).

    Args:
        settings: The node configuration (database path, ``jobs`` section, spool).
        conn: An open connection to reuse (tests); by default one is opened on
            ``settings.storage.database_path``.
    """

    def __init__(self, settings: NodeSettings, conn: Any = None) -> None:
        import threading

        self.settings = settings
        self.cfg = settings.jobs
        self._conn = conn or connect(settings.storage.database_path)
        self._lock = threading.RLock()
        self.owner = worker_identity()
        self._next_orphan_check = time.monotonic() + ORPHAN_CHECK_S
        with self._lock:
            migrate(self._conn)

    @property
    def conn(self) -> Any:
        """The underlying connection (explicit transactions on both back ends)."""
        return self._conn

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) on the queue's connection.

        On PostgreSQL ``BEGIN``; rows are locked where the statements say so.
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- enqueue ----------------------------------------------------------------------------

    def enqueue(self, new: NewJob, conn: Any = None) -> tuple[str, bool]:
        """Add a job unless the same (series revision, pipeline) is already queued or done.

        Args:
            new: What to run.
            conn: A connection with an open transaction to join (the router enqueues and marks
                the completion event routed atomically); default: its own transaction.

        Returns:
            ``(job_id, created)``; ``created`` is ``False`` when the job already existed.
        """
        if conn is None:
            with self.transaction() as c:
                return self.enqueue(new, c)
        s = new.series
        jid = job_id_for(s.key, new.pipeline)
        now = time.time()
        cur = conn.execute(
            "INSERT INTO jobs (id, series_key, series_uid, study_uid, revision, pipeline,"
            " destinations, rule, priority, state, attempts, created_at, updated_at,"
            " next_attempt_at, event_id, series_json)"
            " VALUES (?,?,?,?,?,?,?,?,?,'queued',0,?,?,?,?,?)"
            " ON CONFLICT (series_key, pipeline) DO NOTHING",
            (
                jid, s.key, s.series_instance_uid, s.study_instance_uid, s.revision,
                new.pipeline, json.dumps(list(new.destinations)), new.rule,
                PRIORITY_RANK[new.priority], now, now, now, new.event_id, series_to_json(s),
            ),
        )
        created = cur.rowcount == 1
        if created:
            log.info(
                "job queued", job_id=jid, series_key=s.key, pipeline=new.pipeline,
                destinations=list(new.destinations), priority=new.priority, rule=new.rule,
            )
        return jid, created

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job ``job_id`` (a unique prefix of at least 6 characters is accepted).

        Raises:
            JobError: No such job, or the prefix is ambiguous.
        """
        with self._lock:
            if len(job_id) >= 6:
                like = job_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = self._conn.execute(
                    "SELECT * FROM jobs WHERE id = ? OR id LIKE ? ESCAPE '\\'",
                    (job_id, like + "%")).fetchall()
            else:
                rows = self._conn.execute("SELECT * FROM jobs WHERE id = ?",
                                          (job_id,)).fetchall()
        exact = [r for r in rows if r["id"] == job_id]
        if exact:
            return _row_to_job(exact[0])
        if not rows:
            raise JobError(f"no job {job_id!r}")
        if len(rows) > 1:
            raise JobError(f"job id prefix {job_id!r} is ambiguous ({len(rows)} jobs)")
        return _row_to_job(rows[0])

    def list_jobs(self, state: str | None = None, limit: int = 200) -> list[Job]:
        """Jobs, newest first, optionally of one state."""
        if state is not None and state not in STATES:
            raise JobError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        q = "SELECT * FROM jobs"
        args: list[Any] = []
        if state:
            q += " WHERE state = ?"
            args.append(state)
        q += " ORDER BY created_at DESC, id LIMIT ?"
        args.append(limit)
        with self._lock:
            return [_row_to_job(r) for r in self._conn.execute(q, args).fetchall()]

    def of_series(self, series_uid: str) -> list[Job]:
        """The jobs of one series (every pipeline and revision), oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE series_uid = ? ORDER BY created_at, id",
                (series_uid,)).fetchall()
        return [_row_to_job(r) for r in rows]

    def ping(self) -> None:
        """One round trip to the database; raises what the driver raises if it is down."""
        with self._lock:
            self._conn.execute("SELECT 1").fetchone()

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        with self._lock:
            rows = self._conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def outputs(self, job_id: str) -> list[JobOutput]:
        """Stored outputs of a job (empty until the job has passed ``exporting``)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sop_instance_uid, sop_class_uid, path FROM job_outputs WHERE job_id = ?"
                " ORDER BY sop_instance_uid",
                (job_id,),
            ).fetchall()
        return [JobOutput(r[0], r[1], Path(r[2])) for r in rows]

    def delivered(self, job_id: str, destination: str) -> set[str]:
        """SOP Instance UIDs of the job's outputs that ``destination`` acknowledged."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sop_instance_uid FROM deliveries WHERE job_id = ? AND destination = ?",
                (job_id, destination),
            ).fetchall()
        return {r[0] for r in rows}

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """All delivery records of a job (for ``jobs show``)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sop_instance_uid, destination, delivered_at, detail FROM deliveries"
                " WHERE job_id = ? ORDER BY destination, sop_instance_uid",
                (job_id,),
            ).fetchall()
        return [
            {"sop_instance_uid": r[0], "destination": r[1], "delivered_at": _iso(r[2]),
             "detail": r[3]}
            for r in rows
        ]

    # -- claiming ---------------------------------------------------------------------------

    def recover_orphans(self) -> int:
        """Release jobs whose lease owner process is gone (after a crash or ``kill -9``).

        Called by the worker pool at start; returns how many jobs were released.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, lease_owner FROM jobs"
                " WHERE state IN (?,?,?) AND lease_owner IS NOT NULL",
                ACTIVE_STATES,
            ).fetchall()
        dead = [r["id"] for r in rows if not _owner_alive(r["lease_owner"])]
        if dead:
            with self.transaction() as c:
                c.executemany(
                    "UPDATE jobs SET lease_expires_at = 0 WHERE id = ?", [(d,) for d in dead]
                )
            log.warning("jobs of a dead worker released", count=len(dead), job_ids=dead)
        return len(dead)

    def claim(self, owner: str | None = None, now: float | None = None) -> Job | None:
        """Take the most urgent, then oldest, due job and lease it to ``owner``.

        Due: ``queued`` with ``next_attempt_at`` passed, or an active state whose lease has
        expired (its worker died). A job with stored outputs resumes in ``dispatching``; others
        start in ``running``. Each claim counts as an attempt. A job whose attempts are spent
        when its lease expired is moved to ``failed`` instead.

        Returns:
            The claimed job, or ``None`` when nothing is due.
        """
        owner = owner or self.owner
        due_sql = (
            "SELECT * FROM jobs WHERE (state = 'queued' AND next_attempt_at <= ?)"
            " OR (state IN (?,?,?) AND coalesce(lease_expires_at, 0) <= ?)"
            " ORDER BY priority, created_at, id LIMIT 1"
        )
        while True:
            t = time.time() if now is None else now
            # A read first: an idle poll takes no write lock and costs no fsync.
            with self._lock:
                idle = self._conn.execute(due_sql, (t, *ACTIVE_STATES, t)).fetchone() is None
            if idle and now is None and time.monotonic() >= self._next_orphan_check:
                # Another node process on this host may have died (kill -9) holding a lease:
                # take its jobs now rather than when the lease expires (other hosts: expiry).
                self._next_orphan_check = time.monotonic() + ORPHAN_CHECK_S
                idle = self.recover_orphans() == 0
            if idle:
                return None
            with self.transaction() as c:
                # PostgreSQL: the row is locked for this claim; other nodes skip it.
                row = c.execute(due_sql + for_update(c), (t, *ACTIVE_STATES, t)).fetchone()
                if row is None:
                    return None
                job = _row_to_job(row)
                if (job.state in ACTIVE_STATES
                        and job.attempts - job.dispatch_attempts >= self.cfg.max_attempts):
                    c.execute(
                        "UPDATE jobs SET state='failed', finished_at=?, updated_at=?,"
                        " lease_owner=NULL, lease_expires_at=NULL,"
                        " last_error=coalesce(last_error, 'worker lost ' || ? || ' times')"
                        " WHERE id=?",
                        (t, t, str(job.attempts), job.id),
                    )
                    log.error("job failed: attempts spent", job_id=job.id, attempts=job.attempts)
                    continue
                has_outputs = job.state == "dispatching" or c.execute(
                    "SELECT 1 FROM job_outputs WHERE job_id = ? LIMIT 1", (job.id,)
                ).fetchone() is not None
                new_state: JobState = "dispatching" if has_outputs else "running"
                c.execute(
                    "UPDATE jobs SET state=?, attempts=attempts+1, lease_owner=?,"
                    " lease_expires_at=?, started_at=coalesce(started_at, ?), updated_at=?"
                    " WHERE id=?",
                    (new_state, owner, t + LEASE_S, t, t, job.id),
                )
                claimed = _row_to_job(
                    c.execute("SELECT * FROM jobs WHERE id=?", (job.id,)).fetchone()
                )
            if job.state in ACTIVE_STATES:
                log.warning(
                    "job taken again after its worker was lost", job_id=job.id,
                    previous_state=job.state, attempt=claimed.attempts,
                )
            else:
                log.info("job claimed", job_id=job.id, state=new_state, attempt=claimed.attempts)
            return claimed

    def _owned_update(self, c: Any, job_id: str, owner: str, sets: str,
                      args: Sequence[Any]) -> None:
        cur = c.execute(
            f"UPDATE jobs SET {sets} WHERE id = ? AND lease_owner = ? AND state IN (?,?,?)",
            (*args, job_id, owner, *ACTIVE_STATES),
        )
        if cur.rowcount != 1:
            raise LeaseLost(f"job {job_id} is no longer held by this worker")

    def renew(self, job_id: str, owner: str | None = None) -> None:
        """Extend the lease of a running job by :data:`LEASE_S` seconds.

        Raises:
            LeaseLost: The job was cancelled or taken by another worker.
        """
        t = time.time()
        with self.transaction() as c:
            self._owned_update(c, job_id, owner or self.owner,
                               "lease_expires_at = ?, updated_at = ?", (t + LEASE_S, t))

    def set_state(self, job_id: str, state: JobState, owner: str | None = None) -> None:
        """Move a held job to another active state (``exporting``, ``dispatching``)."""
        if state not in ACTIVE_STATES:
            raise JobError(f"set_state only moves between {ACTIVE_STATES}")
        t = time.time()
        with self.transaction() as c:
            self._owned_update(c, job_id, owner or self.owner,
                               "state = ?, updated_at = ?, lease_expires_at = ?",
                               (state, t, t + LEASE_S))

    def store_outputs(self, job_id: str, outputs: Sequence[JobOutput],
                      owner: str | None = None) -> None:
        """Record the job's durable output files and move it to ``dispatching`` (one commit).

        The files must already be fsync'd under :func:`results_dir`.
        """
        t = time.time()
        with self.transaction() as c:
            self._owned_update(c, job_id, owner or self.owner,
                               "state = 'dispatching', updated_at = ?, lease_expires_at = ?",
                               (t, t + LEASE_S))
            c.execute("DELETE FROM job_outputs WHERE job_id = ?", (job_id,))
            c.executemany(
                "INSERT INTO job_outputs (job_id, sop_instance_uid, sop_class_uid, path)"
                " VALUES (?,?,?,?)",
                [(job_id, o.sop_instance_uid, o.sop_class_uid, str(o.path)) for o in outputs],
            )

    def forget_outputs(self, job_id: str) -> None:
        """Drop the output list of a job whose files vanished, so its pipeline runs again."""
        with self.transaction() as c:
            c.execute("DELETE FROM job_outputs WHERE job_id = ?", (job_id,))
        log.warning("job outputs forgotten; the pipeline runs again", job_id=job_id)

    def record_deliveries(self, job_id: str, destination: str,
                          sop_instance_uids: Sequence[str], detail: str = "") -> None:
        """Record that ``destination`` acknowledged these output instances (idempotent)."""
        if not sop_instance_uids:
            return
        t = time.time()
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO deliveries (job_id, sop_instance_uid, destination,"
                " delivered_at, detail) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                [(job_id, u, destination, t, detail) for u in sop_instance_uids],
            )

    def complete(self, job_id: str, owner: str | None = None) -> None:
        """Mark a held job ``done``."""
        t = time.time()
        with self.transaction() as c:
            self._owned_update(
                c, job_id, owner or self.owner,
                "state='done', finished_at=?, updated_at=?, lease_owner=NULL,"
                " lease_expires_at=NULL, last_error=NULL, waiting_for=NULL",
                (t, t),
            )
        log.info("job done", job_id=job_id)

    def fail(self, job_id: str, error: str, owner: str | None = None,
             permanent: bool = False, undelivered: Sequence[str] | None = None,
             now: float | None = None) -> JobState:
        """Record a failed attempt: back to ``queued`` after a backoff, or ``failed``.

        Args:
            job_id: The held job.
            error: One-line reason (no patient data).
            owner: Lease owner; default this process.
            permanent: Skip the remaining attempts (e.g. an unknown pipeline).
            undelivered: The attempt failed at delivery, to these destinations: the job
                retries for ``jobs.dispatch_retry_for_s`` from its first failed delivery
                (``max_attempts`` does not apply) and waits for them (see
                :meth:`resume_waiting`).
            now: UTC epoch seconds (tests); default the clock.

        Returns:
            The new state, ``queued`` or ``failed``.
        """
        t = time.time() if now is None else now
        owner = owner or self.owner
        if undelivered is not None and not permanent:
            return self._fail_delivery(job_id, error, owner, tuple(undelivered), t)
        with self.transaction() as c:
            row = c.execute("SELECT attempts, dispatch_attempts FROM jobs WHERE id = ?",
                            (job_id,)).fetchone()
            if row is None:
                raise JobError(f"no job {job_id!r}")
            attempts = int(row[0]) - int(row[1] or 0)
            if permanent or attempts >= self.cfg.max_attempts:
                self._owned_update(
                    c, job_id, owner,
                    "state='failed', finished_at=?, updated_at=?, last_error=?,"
                    " lease_owner=NULL, lease_expires_at=NULL",
                    (t, t, error[:2000]),
                )
                state: JobState = "failed"
                delay = 0.0
            else:
                delay = backoff_s(attempts, self.cfg)
                self._owned_update(
                    c, job_id, owner,
                    "state='queued', next_attempt_at=?, updated_at=?, last_error=?,"
                    " lease_owner=NULL, lease_expires_at=NULL",
                    (t + delay, t, error[:2000]),
                )
                state = "queued"
        if state == "failed":
            log.error("job failed (dead letter)", job_id=job_id, attempts=attempts, error=error)
        else:
            log.warning("job attempt failed, will retry", job_id=job_id, attempts=attempts,
                        retry_in_s=round(delay, 3), error=error)
        return state

    def _fail_delivery(self, job_id: str, error: str, owner: str,
                       undelivered: tuple[str, ...], t: float) -> JobState:
        window = self.cfg.dispatch_retry_for_s
        with self.transaction() as c:
            row = c.execute("SELECT dispatch_failing_since, dispatch_attempts FROM jobs"
                            " WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobError(f"no job {job_id!r}")
            since = t if row[0] is None else float(row[0])
            tries = int(row[1] or 0) + 1
            failing_s = t - since
            if failing_s >= window:
                error = (f"{error} (not delivered for {failing_s:.0f} s,"
                         f" jobs.dispatch_retry_for_s = {window:g})")
                self._owned_update(
                    c, job_id, owner,
                    "state='failed', finished_at=?, updated_at=?, last_error=?,"
                    " lease_owner=NULL, lease_expires_at=NULL, dispatch_failing_since=?,"
                    " dispatch_attempts=?, waiting_for=?",
                    (t, t, error[:2000], since, tries, json.dumps(list(undelivered))),
                )
                state: JobState = "failed"
                delay = 0.0
            else:
                # Capped exponential backoff; the last retry falls at the window's end.
                delay = min(backoff_s(tries, self.cfg), since + window - t)
                self._owned_update(
                    c, job_id, owner,
                    "state='queued', next_attempt_at=?, updated_at=?, last_error=?,"
                    " lease_owner=NULL, lease_expires_at=NULL, dispatch_failing_since=?,"
                    " dispatch_attempts=?, waiting_for=?",
                    (t + delay, t, error[:2000], since, tries, json.dumps(list(undelivered))),
                )
                state = "queued"
        if state == "failed":
            log.error("job failed (dead letter)", job_id=job_id, delivery_attempts=tries,
                      failing_s=round(failing_s, 1), error=error)
        else:
            log.warning("job delivery failed, will retry", job_id=job_id,
                        delivery_attempts=tries, retry_in_s=round(delay, 3),
                        failing_s=round(failing_s, 1), waiting_for=list(undelivered),
                        error=error)
        return state

    def waiting_destinations(self, now: float | None = None) -> dict[str, list[str]]:
        """Destinations that queued jobs wait for (not due yet) → those jobs' ids."""
        t = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, waiting_for FROM jobs WHERE state = 'queued'"
                " AND waiting_for IS NOT NULL AND next_attempt_at > ?", (t,)).fetchall()
        out: dict[str, list[str]] = {}
        for r in rows:
            for name in json.loads(r["waiting_for"]):
                out.setdefault(str(name), []).append(r["id"])
        return out

    def resume_waiting(self, destination: str, now: float | None = None) -> int:
        """Make the queued jobs waiting for ``destination`` due now; returns how many."""
        t = time.time() if now is None else now
        ids = self.waiting_destinations(t).get(destination, [])
        if not ids:
            return 0
        with self.transaction() as c:
            n = 0
            for jid in ids:
                n += c.execute("UPDATE jobs SET next_attempt_at = ?, updated_at = ?"
                               " WHERE id = ? AND state = 'queued' AND next_attempt_at > ?",
                               (t, t, jid, t)).rowcount
        return n

    # -- operator actions -------------------------------------------------------------------

    def retry(self, job_id: str, rerun: bool = False) -> Job:
        """Queue a ``failed``, ``cancelled`` (or, with ``rerun``, ``done``) job again now.

        Attempts restart at zero. Outputs already stored and deliveries already recorded are
        kept, so only what is missing is done again; ``rerun`` drops both, so the pipeline runs
        again and every output is sent again (same UIDs: the PACS replaces them).

        Raises:
            JobError: Unknown job, or a state that cannot be retried.
        """
        job = self.get(job_id)
        allowed = ("failed", "cancelled", "done") if rerun else ("failed", "cancelled")
        if job.state not in allowed:
            raise JobError(
                f"job {job.id} is {job.state}; retry works on {' or '.join(allowed)} jobs"
                + ("" if rerun else " (use --rerun for a done job)")
            )
        t = time.time()
        with self.transaction() as c:
            if rerun:
                c.execute("DELETE FROM job_outputs WHERE job_id = ?", (job.id,))
                c.execute("DELETE FROM deliveries WHERE job_id = ?", (job.id,))
            c.execute(
                "UPDATE jobs SET state='queued', attempts=0, next_attempt_at=?, updated_at=?,"
                " finished_at=NULL, lease_owner=NULL, lease_expires_at=NULL,"
                " dispatch_failing_since=NULL, dispatch_attempts=0, waiting_for=NULL"
                " WHERE id=?",
                (t, t, job.id),
            )
        log.info("job queued again by operator", job_id=job.id, rerun=rerun)
        return self.get(job.id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job that is not finished; a worker holding it stops at its next step.

        Raises:
            JobError: Unknown job, or already ``done``/``failed``/``cancelled``.
        """
        job = self.get(job_id)
        if job.state in TERMINAL_STATES:
            raise JobError(f"job {job.id} is already {job.state}")
        t = time.time()
        with self.transaction() as c:
            c.execute(
                "UPDATE jobs SET state='cancelled', finished_at=?, updated_at=?,"
                " lease_owner=NULL, lease_expires_at=NULL WHERE id=?",
                (t, t, job.id),
            )
        log.info("job cancelled by operator", job_id=job.id, previous_state=job.state)
        return self.get(job.id)


def _row_to_job(row: Any) -> Job:
    rank_to_name = {v: k for k, v in PRIORITY_RANK.items()}
    return Job(
        id=row["id"],
        series_key=row["series_key"],
        series_uid=row["series_uid"],
        study_uid=row["study_uid"],
        revision=int(row["revision"]),
        pipeline=row["pipeline"],
        destinations=tuple(json.loads(row["destinations"])),
        rule=row["rule"],
        priority=rank_to_name.get(int(row["priority"]), "normal"),  # type: ignore[arg-type]
        state=row["state"],
        attempts=int(row["attempts"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        next_attempt_at=float(row["next_attempt_at"]),
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        last_error=row["last_error"],
        event_id=row["event_id"],
        series_json=row["series_json"],
        dispatch_failing_since=row["dispatch_failing_since"],
        dispatch_attempts=int(row["dispatch_attempts"] or 0),
        waiting_for=tuple(json.loads(row["waiting_for"])) if row["waiting_for"] else (),
    )
