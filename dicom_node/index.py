"""The index of received instances, series and series-completion events.

Three tables live in the node database (``storage.database_path``: SQLite or PostgreSQL,
opened with :func:`dicom_node.db.connect`; the schema is :mod:`dicom_node.migrations`):

``instances``
    One row per SOP Instance UID: where the file is, its UIDs, size, transfer syntax, arrival
    (``rowid`` order: SQLite's implicit rowid, an identity column on PostgreSQL), the
    association it came on, and ``revision``: the first revision of its series that holds it.
``series``
    One row per Series Instance UID: ``revision`` (the revision now receiving, or the last one
    completed), ``state`` (``receiving`` | ``complete``), counts and times.
``series_events``
    One durable row per completed revision (``UNIQUE(series_instance_uid, revision)``, so a
    revision completes exactly once, also across nodes sharing one PostgreSQL database);
    ``completed_by`` names the node process that completed it; ``routed_at`` is NULL until the
    router consumed it. ``failed_at``/``failure``: the router could not route it (the reason,
    without patient values); such an event is not retried, so it never holds up the ones after
    it, until :meth:`SeriesIndex.retry_failed` clears it.

Times are stored as UNIX epoch seconds (REAL / DOUBLE PRECISION, UTC) and returned as aware
``datetime``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dicom_node.db import DatabaseTarget, connect, db_errors, is_postgres, lock_rows, node_name
from dicom_node.migrations import migrate
from dicom_node.series import Series, StoredInstance

CompletionReason = Literal["quiet", "expected_count"]

RECONCILE_WITHOUT_WATERMARK = 1000
"""Newest rows :meth:`SeriesIndex.reconcile` checks when no ``flushed_upto`` was recorded."""


_SERIES_COLUMNS = (
    "s.*, (SELECT e.failure FROM series_events e WHERE e.series_instance_uid ="
    " s.series_instance_uid AND e.revision = s.revision AND s.state = 'complete'"
    " AND e.routed_at IS NULL AND e.failed_at IS NOT NULL) AS failure")
"""Columns of a series row plus ``failure``: why its current revision could not be routed."""


def _dt(epoch: float | None) -> datetime:
    return datetime.fromtimestamp(epoch or 0.0, tz=UTC)


@dataclass(frozen=True, slots=True)
class CompletionEvent:
    """A durable "series revision complete" row of ``series_events``."""

    event_id: int
    series_instance_uid: str
    revision: int
    completed_at: datetime
    reason: str
    """``quiet`` or ``expected_count``."""
    instance_count: int = 0
    """Instances in this revision."""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the listener tells the index about one durable instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: Path
    transfer_syntax_uid: str
    size_bytes: int
    received_at: float
    """UNIX epoch seconds."""
    replaced: bool = False
    """The bytes replace those of an instance already indexed (``duplicate_policy: replace``)."""
    modality: str = ""
    series_description: str = ""
    instance_number: int | None = None
    number_of_frames: int = 1
    expected_count: int | None = None
    """Instances the whole series is expected to have, when the header says so."""
    calling_ae: str = ""
    called_ae: str = ""
    peer_host: str = ""


@dataclass(slots=True)
class RecordOutcome:
    """What :meth:`SeriesIndex.record` did with a batch."""

    new: list[bool] = field(default_factory=list)
    """Per record: a new row (``False``: the SOP Instance UID was already indexed)."""
    new_revisions: list[tuple[str, int]] = field(default_factory=list)
    """(series UID, revision) started by a late instance after completion."""
    completed: list[CompletionEvent] = field(default_factory=list)
    """Revisions completed at once because their expected instance count was reached."""
    due_expected: list[str] = field(default_factory=list)
    """With ``use_expected_count=False``: series whose expected count is now reached (the
    caller completes them with :meth:`SeriesIndex.complete_expected` once the batch is
    durable)."""
    max_rowid: int | None = None
    """Largest ``instances.rowid`` inserted by the batch (``None``: no new row)."""


class SeriesIndex:
    """Access to the ``instances``, ``series`` and ``series_events`` tables.

    Safe to share between threads: each thread gets its own database connection.

    Args:
        db_path: The node database (``storage.database_path``); created if missing.
    """

    def __init__(self, db_path: DatabaseTarget) -> None:
        self.db_path: DatabaseTarget = db_path if is_postgres(db_path) else Path(db_path)
        self._local = threading.local()
        migrate(self.conn)

    @property
    def conn(self) -> Any:
        """The calling thread's connection to the node database (:func:`dicom_node.db.connect`)."""
        conn: Any = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.db_path)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def _write(self, conn: Any = None) -> Iterator[Any]:
        """A write transaction (``BEGIN IMMEDIATE``; on PostgreSQL ``BEGIN``), or the caller's."""
        if conn is not None:
            yield conn
            return
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT (disk full): never leave the connection inside a
            # transaction, or every later write on it fails too.
            if c.in_transaction:
                with contextlib.suppress(*db_errors()):
                    c.execute("ROLLBACK")
            raise

    # -- the listener's side ---------------------------------------------------------------

    def lookup_instance(self, sop_instance_uid: str) -> tuple[Path, int] | None:
        """Path and size of an indexed instance, or ``None``."""
        row = self.conn.execute(
            "SELECT path, size_bytes FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        ).fetchone()
        return None if row is None else (Path(row["path"]), int(row["size_bytes"]))

    def record(self, batch: Sequence[InstanceRecord], *, use_expected_count: bool = True,
               flushed_upto: int | None = None) -> RecordOutcome:
        """Index instances in one transaction (the group commit).

        New instances of a complete series start its next revision.

        Args:
            batch: The instances.
            use_expected_count: Complete series whose expected instance count is now reached
                in the same transaction; ``False`` only reports them (``due_expected``).
            flushed_upto: The caller indexes a batch while its files are still being
                fsync'd: every ``instances.rowid`` up to this one is known durable on disk
                (see :meth:`reconcile`).
        """
        out = RecordOutcome()
        out.new = [False] * len(batch)
        touched: dict[str, None] = {}
        # Series rows are locked in UID order, so two nodes indexing batches that share
        # series cannot deadlock (PostgreSQL); arrival order within a series is kept.
        order = sorted(range(len(batch)), key=lambda i: batch[i].series_instance_uid)
        with self._write() as c:
            for i in order:
                rec = batch[i]
                rowid, late = self._record_one(c, rec)
                out.new[i] = rowid is not None
                if rowid is not None:
                    out.max_rowid = max(out.max_rowid or 0, rowid)
                if late is not None:
                    out.new_revisions.append((rec.series_instance_uid, late))
                touched[rec.series_instance_uid] = None
            if flushed_upto is not None:
                self._set_meta(c, "flushed_upto", flushed_upto)
            for uid in touched:
                row = c.execute(
                    "SELECT state, instance_count, expected_count FROM series"
                    " WHERE series_instance_uid = ?", (uid,)).fetchone()
                if (row["state"] == "receiving" and row["expected_count"]
                        and row["instance_count"] == row["expected_count"]):
                    if not use_expected_count:
                        out.due_expected.append(uid)
                        continue
                    ev = self._complete(c, uid, "expected_count", time.time(),
                                        expected=True)
                    if ev is not None:
                        out.completed.append(ev)
        return out

    def complete_expected(self, series_uids: Sequence[str]) -> list[CompletionEvent]:
        """Complete series whose expected instance count is reached (see :meth:`record`)."""
        events = []
        with self._write() as c:
            for uid in series_uids:
                row = c.execute(
                    "SELECT state, instance_count, expected_count FROM series"
                    " WHERE series_instance_uid = ?", (uid,)).fetchone()
                if (row is not None and row["state"] == "receiving" and row["expected_count"]
                        and row["instance_count"] == row["expected_count"]):
                    ev = self._complete(c, uid, "expected_count", time.time(),
                                        expected=True)
                    if ev is not None:
                        events.append(ev)
        return events

    def reconcile(self, is_intact: Callable[[Path, int, str], bool], *,
                  under: Path | None = None) -> list[str]:
        """Drop index rows of the last batch whose files did not survive a crash.

        A batch is indexed while its files are fsync'd (concurrently, to share the flush);
        it is acknowledged only when both are done. After a crash, rows above the recorded
        ``flushed_upto`` may describe files that never reached the disk: those rows (never
        acknowledged) are deleted and their series' counts fixed.

        Args:
            is_intact: ``(path, size_bytes, sop_instance_uid) -> bool``.
            under: Check only rows whose file lies in this folder (this node's spool). With
                several nodes on one PostgreSQL database the other nodes' newest rows are
                theirs to check: pass it there (``docs/database.md``).

        Returns:
            SOP Instance UIDs of the rows removed.
        """
        c = self.conn
        row = c.execute("SELECT value FROM index_meta WHERE key = 'flushed_upto'").fetchone()
        if row is not None and row[0] is not None:
            upto = int(row[0])
        else:  # no watermark yet: a new database, or one from before it; check the newest
            top = c.execute("SELECT MAX(rowid) FROM instances").fetchone()[0] or 0
            upto = max(0, int(top) - RECONCILE_WITHOUT_WATERMARK)
        suspects = c.execute(
            "SELECT rowid, sop_instance_uid, series_instance_uid, path, size_bytes"
            " FROM instances WHERE rowid > ?", (upto,)).fetchall()
        if under is not None:
            root = Path(under)
            suspects = [r for r in suspects if Path(r["path"]).is_relative_to(root)]
        removed: list[str] = []
        with self._write() as w:
            for r in suspects:
                if is_intact(Path(r["path"]), int(r["size_bytes"]), r["sop_instance_uid"]):
                    continue
                removed.append(r["sop_instance_uid"])
                w.execute("DELETE FROM instances WHERE rowid = ?", (r["rowid"],))
                self._fix_series(w, r["series_instance_uid"])
            top = w.execute("SELECT MAX(rowid) FROM instances").fetchone()[0]
            self._set_meta(w, "flushed_upto", top or 0)
        return removed

    @staticmethod
    def _set_meta(c: Any, key: str, value: int) -> None:
        c.execute("INSERT INTO index_meta (key, value) VALUES (?, ?)"
                  " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, str(value)))

    def forget(self, sop_instance_uids: Sequence[str]) -> None:
        """Delete instance rows (whose files could not be made durable) and fix their series."""
        with self._write() as w:
            for uid in sop_instance_uids:
                r = w.execute("SELECT series_instance_uid FROM instances"
                              " WHERE sop_instance_uid = ?", (uid,)).fetchone()
                if r is not None:
                    w.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,))
                    self._fix_series(w, r[0])

    @staticmethod
    def _fix_series(c: Any, series_uid: str) -> None:
        n, rev = c.execute("SELECT COUNT(*), MAX(revision) FROM instances"
                           " WHERE series_instance_uid = ?", (series_uid,)).fetchone()
        if not n:
            c.execute("DELETE FROM series WHERE series_instance_uid = ?", (series_uid,))
            return
        done = c.execute("SELECT MAX(revision) FROM series_events WHERE series_instance_uid = ?",
                         (series_uid,)).fetchone()[0]
        if done is not None and done >= rev:
            # The removed row had started a new revision: the series is complete as before.
            c.execute("UPDATE series SET instance_count = ?, revision = ?, state = 'complete'"
                      " WHERE series_instance_uid = ?", (n, done, series_uid))
        else:
            c.execute("UPDATE series SET instance_count = ? WHERE series_instance_uid = ?",
                      (n, series_uid))

    def _record_one(self, c: Any, rec: InstanceRecord) -> tuple[int | None, int | None]:
        """Index one instance; returns (its new ``rowid`` or ``None``, late revision or ``None``).

        The series row is locked first (PostgreSQL ``FOR UPDATE``; SQLite's writer lock covers
        it), so instances of one series indexed by several nodes at once are serialised: one
        of them creates the series, a duplicate SOP Instance UID is stored once.
        """
        exists = c.execute(
            "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)
        ).fetchone() is not None
        if exists and not rec.replaced:
            return None, None
        lock = lock_rows(c)
        srow = c.execute(
            "SELECT revision, state, expected_count FROM series WHERE series_instance_uid = ?"
            + lock, (rec.series_instance_uid,),
        ).fetchone()
        created = False
        if srow is None:
            created = bool(c.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality,"
                " series_description, revision, state, instance_count, expected_count,"
                " first_received_at, last_received_at, calling_ae, called_ae, peer_host)"
                " VALUES (?, ?, ?, ?, 1, 'receiving', 0, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (series_instance_uid) DO NOTHING RETURNING revision",
                (rec.series_instance_uid, rec.study_instance_uid, rec.modality,
                 rec.series_description, rec.expected_count, rec.received_at, rec.received_at,
                 rec.calling_ae, rec.called_ae, rec.peer_host),
            ).fetchall())
            if not created:  # another node created it meanwhile (PostgreSQL)
                srow = c.execute(
                    "SELECT revision, state, expected_count FROM series"
                    " WHERE series_instance_uid = ?" + lock, (rec.series_instance_uid,),
                ).fetchone()
        if lock and not exists and c.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                (rec.sop_instance_uid,)).fetchone() is not None:
            return None, None  # another node indexed it while we waited for the lock
        late: int | None = None
        if created or srow is None:
            revision = 1
        else:
            revision = int(srow["revision"])
            if srow["state"] == "complete":
                revision += 1
                late = revision
            expected = srow["expected_count"]
            if rec.expected_count is not None and expected != rec.expected_count:
                # Headers disagree on the expected count: do not trust it (quiet period only).
                expected = rec.expected_count if expected is None else -1
            c.execute(
                "UPDATE series SET revision = ?, state = 'receiving', last_received_at = ?,"
                " expected_count = ?, calling_ae = ?, called_ae = ?, peer_host = ?,"
                " modality = CASE WHEN modality = '' THEN ? ELSE modality END,"
                " series_description = CASE WHEN series_description = '' THEN ?"
                " ELSE series_description END"
                " WHERE series_instance_uid = ?",
                (revision, rec.received_at, expected, rec.calling_ae, rec.called_ae,
                 rec.peer_host, rec.modality, rec.series_description, rec.series_instance_uid),
            )
        values = (rec.series_instance_uid, rec.study_instance_uid, rec.sop_class_uid,
                  rec.transfer_syntax_uid, str(rec.path), rec.size_bytes, rec.received_at,
                  revision, rec.instance_number, rec.number_of_frames, rec.calling_ae,
                  rec.called_ae, rec.peer_host)
        if exists:
            c.execute(
                "UPDATE instances SET series_instance_uid = ?, study_instance_uid = ?,"
                " sop_class_uid = ?, transfer_syntax_uid = ?, path = ?, size_bytes = ?,"
                " received_at = ?, revision = ?, instance_number = ?, number_of_frames = ?,"
                " calling_ae = ?, called_ae = ?, peer_host = ? WHERE sop_instance_uid = ?",
                (*values, rec.sop_instance_uid),
            )
            return None, late
        row = c.execute(
            "INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid,"
            " sop_class_uid, transfer_syntax_uid, path, size_bytes, received_at, revision,"
            " instance_number, number_of_frames, calling_ae, called_ae, peer_host)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING rowid",
            (rec.sop_instance_uid, *values),
        ).fetchall()
        c.execute(
            "UPDATE series SET instance_count = instance_count + 1 WHERE series_instance_uid = ?",
            (rec.series_instance_uid,),
        )
        return int(row[0][0]), late

    # -- the tracker's side ----------------------------------------------------------------

    def _complete(self, c: Any, series_uid: str, reason: str, now: float, *,
                  quiet_before: float | None = None, expected: bool = False
                  ) -> CompletionEvent | None:
        """Complete the receiving revision of a series, once across all nodes.

        One conditional ``UPDATE`` (still receiving; still quiet, or the expected count still
        reached) decides who completes: on PostgreSQL a second node's update waits for the
        first one's row lock, then matches nothing. The ``series_events`` row
        (``UNIQUE (series, revision)``) is written in the same transaction.
        """
        cond = ""
        args: list[Any] = [now, series_uid]
        if quiet_before is not None:
            cond += " AND last_received_at <= ?"
            args.append(quiet_before)
        if expected:
            cond += " AND instance_count = expected_count"
        won = c.execute(
            "UPDATE series SET state = 'complete', completed_at = ?"
            " WHERE series_instance_uid = ? AND state = 'receiving'" + cond
            + " RETURNING revision, instance_count", args).fetchall()
        if not won:
            return None  # not receiving any more (another node completed it), or not due
        revision, count = int(won[0][0]), int(won[0][1])
        ev = c.execute(
            "INSERT INTO series_events (series_instance_uid, revision, completed_at,"
            " reason, instance_count, completed_by) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (series_instance_uid, revision) DO NOTHING RETURNING id",
            (series_uid, revision, now, reason, count, node_name()),
        ).fetchall()
        if not ev:
            return None  # this revision already completed (cannot happen, but never twice)
        return CompletionEvent(int(ev[0][0]), series_uid, revision, _dt(now), reason, count)

    def complete_quiet(self, quiet_s: float, now: float | None = None) -> list[CompletionEvent]:
        """Complete every receiving series whose last instance is ``quiet_s`` seconds old.

        Each completion is one ``series_events`` row written in the same transaction that
        marks the series complete, so a revision completes exactly once, even across restarts
        and across nodes sharing a PostgreSQL database.
        """
        now = time.time() if now is None else now
        due = [r[0] for r in self.conn.execute(
            "SELECT series_instance_uid FROM series WHERE state = 'receiving'"
            " AND last_received_at <= ?", (now - quiet_s,))]
        events: list[CompletionEvent] = []
        for uid in due:
            with self._write() as c:
                ev = self._complete(c, uid, "quiet", now, quiet_before=now - quiet_s)
            if ev is not None:
                events.append(ev)
        return events

    def next_quiet_deadline(self, quiet_s: float) -> float | None:
        """Epoch seconds at which the next receiving series becomes quiet, or ``None``."""
        row = self.conn.execute(
            "SELECT MIN(last_received_at) FROM series WHERE state = 'receiving'").fetchone()
        return None if row is None or row[0] is None else float(row[0]) + quiet_s

    def receiving_series(self) -> list[tuple[str, int, float]]:
        """(series UID, revision, last received epoch seconds) of series not yet complete."""
        return [(r[0], int(r[1]), float(r[2])) for r in self.conn.execute(
            "SELECT series_instance_uid, revision, last_received_at FROM series"
            " WHERE state = 'receiving' ORDER BY last_received_at")]

    # -- the router's side -----------------------------------------------------------------

    def pending_events(self) -> list[CompletionEvent]:
        """Completion events not yet routed (``routed_at`` NULL) nor failed, oldest first."""
        return [self._event(r) for r in self.conn.execute(
            "SELECT * FROM series_events WHERE routed_at IS NULL AND failed_at IS NULL"
            " ORDER BY id")]

    def mark_failed(self, event_id: int, reason: str,
                    conn: Any = None) -> None:
        """Put a completion event in the failed state: not routed, not retried, visible.

        Args:
            event_id: ``CompletionEvent.event_id``.
            reason: Why (an exception type and a message without patient values).
            conn: The caller's open transaction, or ``None`` to commit on its own.
        """
        with self._write(conn) as c:
            c.execute("UPDATE series_events SET failed_at = ?, failure = ?"
                      " WHERE id = ? AND routed_at IS NULL", (time.time(), reason, event_id))

    def failed_events(self) -> list[tuple[CompletionEvent, str]]:
        """Completion events the router gave up on, with their reasons, oldest first."""
        return [(self._event(r), r["failure"] or "") for r in self.conn.execute(
            "SELECT * FROM series_events WHERE routed_at IS NULL AND failed_at IS NOT NULL"
            " ORDER BY id")]

    def retry_failed(self, series_uid: str | None = None) -> int:
        """Make failed completion events pending again (all, or one series'); returns how many."""
        with self._write() as c:
            if series_uid is None:
                cur = c.execute("UPDATE series_events SET failed_at = NULL, failure = NULL"
                                " WHERE routed_at IS NULL AND failed_at IS NOT NULL")
            else:
                cur = c.execute("UPDATE series_events SET failed_at = NULL, failure = NULL"
                                " WHERE routed_at IS NULL AND failed_at IS NOT NULL"
                                " AND series_instance_uid = ?", (series_uid,))
            return int(cur.rowcount)

    def events(self, series_uid: str | None = None) -> list[CompletionEvent]:
        """All completion events (of one series when given), oldest first."""
        if series_uid is None:
            rows = self.conn.execute("SELECT * FROM series_events ORDER BY id")
        else:
            rows = self.conn.execute(
                "SELECT * FROM series_events WHERE series_instance_uid = ? ORDER BY id",
                (series_uid,))
        return [self._event(r) for r in rows]

    @staticmethod
    def _event(r: Any) -> CompletionEvent:
        return CompletionEvent(int(r["id"]), r["series_instance_uid"], int(r["revision"]),
                               _dt(r["completed_at"]), r["reason"], int(r["instance_count"]))

    def mark_routed(self, event_id: int, conn: Any = None) -> bool:
        """Mark a completion event consumed.

        Args:
            event_id: ``CompletionEvent.event_id``.
            conn: A connection to the same database with a transaction the caller opened and
                will commit (so routing and marking are atomic); ``None`` commits on its own.

        Returns:
            ``False`` when it was already routed (by another node sharing the database).
        """
        with self._write(conn) as c:
            cur = c.execute("UPDATE series_events SET routed_at = ? WHERE id = ?"
                            " AND routed_at IS NULL", (time.time(), event_id))
            return bool(cur.rowcount == 1)

    def load_series(self, series_uid: str, revision: int) -> Series:
        """A completed revision of a series, instances in arrival order.

        Raises:
            KeyError: No such series, or that revision is not complete.
        """
        c = self.conn
        srow = c.execute("SELECT * FROM series WHERE series_instance_uid = ?",
                         (series_uid,)).fetchone()
        ev = c.execute("SELECT * FROM series_events WHERE series_instance_uid = ? AND revision = ?",
                       (series_uid, revision)).fetchone()
        if srow is None or ev is None:
            raise KeyError(f"no completed revision {revision} of series {series_uid}")
        rows = c.execute(
            "SELECT * FROM instances WHERE series_instance_uid = ? AND revision <= ?"
            " ORDER BY rowid", (series_uid, revision)).fetchall()
        instances = tuple(self._instance(r) for r in rows)
        last = instances[-1] if instances else None
        return Series(
            series_instance_uid=series_uid,
            study_instance_uid=srow["study_instance_uid"],
            revision=revision,
            instances=instances,
            completed_at=_dt(ev["completed_at"]),
            modality=srow["modality"],
            series_description=srow["series_description"],
            calling_ae=last.calling_ae if last else srow["calling_ae"],
            called_ae=last.called_ae if last else srow["called_ae"],
            peer_host=last.peer_host if last else srow["peer_host"],
            completion_reason=ev["reason"],
        )

    @staticmethod
    def _instance(r: Any) -> StoredInstance:
        return StoredInstance(
            sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"],
            series_instance_uid=r["series_instance_uid"],
            study_instance_uid=r["study_instance_uid"],
            path=Path(r["path"]),
            transfer_syntax_uid=r["transfer_syntax_uid"],
            size_bytes=int(r["size_bytes"]),
            received_at=_dt(r["received_at"]),
            instance_number=r["instance_number"],
            number_of_frames=int(r["number_of_frames"]),
            calling_ae=r["calling_ae"],
            called_ae=r["called_ae"],
            peer_host=r["peer_host"],
        )

    def series_in_study(self, study_uid: str) -> list[Series]:
        """The latest complete revision of each series of a study (series without one skipped)."""
        out: list[Series] = []
        for r in self.conn.execute(
            "SELECT series_instance_uid, MAX(revision) AS rev FROM series_events"
            " WHERE series_instance_uid IN"
            " (SELECT series_instance_uid FROM series WHERE study_instance_uid = ?)"
            " GROUP BY series_instance_uid ORDER BY MIN(id)", (study_uid,)).fetchall():
            out.append(self.load_series(r["series_instance_uid"], int(r["rev"])))
        return out

    # -- people and scripts ----------------------------------------------------------------

    def list_series(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently active series as plain dicts (for ``series list`` and the API).

        Keys: ``series_instance_uid``, ``study_instance_uid``, ``modality``,
        ``series_description``, ``instance_count``, ``expected_count``, ``state``
        (``receiving`` | ``complete`` | ``failed``: the router could not route its current
        revision), ``failure`` (the reason, or ``None``), ``revision``, ``first_received_at``,
        ``last_received_at``, ``completed_at`` (ISO 8601 UTC or ``None``), ``calling_ae``,
        ``called_ae``, ``peer_host``.
        """
        rows = self.conn.execute(
            f"SELECT {_SERIES_COLUMNS} FROM series s"
            " ORDER BY last_received_at DESC LIMIT ?", (limit,)).fetchall()
        return [self._series_dict(r) for r in rows]

    def get_series(self, series_uid: str) -> dict[str, Any] | None:
        """One series as in :meth:`list_series`, plus ``events`` (its completion events)."""
        r = self.conn.execute(f"SELECT {_SERIES_COLUMNS} FROM series s"
                              " WHERE series_instance_uid = ?", (series_uid,)).fetchone()
        if r is None:
            return None
        d = self._series_dict(r)
        d["events"] = [
            {"event_id": int(e["id"]), "revision": int(e["revision"]),
             "completed_at": _dt(e["completed_at"]).isoformat(), "reason": e["reason"],
             "instance_count": int(e["instance_count"]),
             "routed_at": None if e["routed_at"] is None else _dt(e["routed_at"]).isoformat(),
             "failed_at": None if e["failed_at"] is None else _dt(e["failed_at"]).isoformat(),
             "failure": e["failure"]}
            for e in self.conn.execute(
                "SELECT * FROM series_events WHERE series_instance_uid = ? ORDER BY id",
                (series_uid,))
        ]
        return d

    @staticmethod
    def _series_dict(r: Any) -> dict[str, Any]:
        def iso(v: float | None) -> str | None:
            return None if v is None else _dt(v).isoformat()

        return {
            "series_instance_uid": r["series_instance_uid"],
            "study_instance_uid": r["study_instance_uid"],
            "modality": r["modality"],
            "series_description": r["series_description"],
            "instance_count": int(r["instance_count"]),
            "expected_count": r["expected_count"],
            "state": "failed" if r["failure"] is not None else r["state"],
            "failure": r["failure"],
            "revision": int(r["revision"]),
            "first_received_at": iso(r["first_received_at"]),
            "last_received_at": iso(r["last_received_at"]),
            "completed_at": iso(r["completed_at"]),
            "calling_ae": r["calling_ae"],
            "called_ae": r["called_ae"],
            "peer_host": r["peer_host"],
        }

    def instances_of(self, series_uid: str) -> list[StoredInstance]:
        """Every indexed instance of a series (all revisions), in arrival order."""
        return [self._instance(r) for r in self.conn.execute(
            "SELECT * FROM instances WHERE series_instance_uid = ? ORDER BY rowid",
            (series_uid,))]

    def count_instances(self) -> int:
        """Number of indexed instances."""
        return int(self.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    # -- retention ---------------------------------------------------------------------------

    def purge_series(self, series_uid: str, conn: Any = None) -> int:
        """Delete every row of a series: its instances, completion events and series row.

        The files are the caller's (:mod:`dicom_node.retention` deletes them in the same
        transaction, before the commit, so a crash leaves rows to purge again, never orphans).

        Args:
            series_uid: Series Instance UID.
            conn: A transaction the caller opened on this thread's :attr:`conn` and will
                commit; ``None`` commits on its own.

        Returns:
            Instance rows deleted.
        """
        with self._write(conn) as c:
            n = c.execute("DELETE FROM instances WHERE series_instance_uid = ?",
                          (series_uid,)).rowcount
            c.execute("DELETE FROM series_events WHERE series_instance_uid = ?", (series_uid,))
            c.execute("DELETE FROM series WHERE series_instance_uid = ?", (series_uid,))
        return int(n)

