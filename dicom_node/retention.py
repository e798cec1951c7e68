"""Spool retention: delete series whose work is finished ``storage.retention_days`` ago.

A series is *expired* when all of these hold:

* it is complete (no revision receiving) and every completion event was routed;
* every job of it, all revisions, is ``done`` or ``cancelled``. A ``failed`` job keeps its
  input for ``omnimri-node jobs retry``; ``queued`` and running jobs obviously keep it. A series
  that no rule matched (no job at all) counts as done once its latest revision completed;
* its latest completion (the series' own, or its last job's ``finished_at``) is older than the
  retention period.

For each expired series, in one write transaction that re-checks the conditions (so an instance
arriving meanwhile wins): its spooled files and the stored outputs of its jobs
(``<spool>/results/<job_id>/``) are deleted, then its ``instances``, ``series_events`` and
``series`` rows. A crash (or a file that cannot be deleted) in between leaves rows to purge at
the next run, never orphan files. Then emptied study/series folders are removed. Job rows stay
(``jobs list`` history).
Each purge is logged and audited (``retention_purged``) with UIDs and counts only.

The :class:`RetentionService` runs this at start and every ``min(3600, retention / 10)``
seconds; ``omnimri-node series purge --older-than-days N`` runs it once by hand.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.config import NodeSettings
from dicom_node.db import lock_rows
from dicom_node.index import SeriesIndex
from dicom_node.jobs import results_dir
from dicom_node.logs import get_logger

log = get_logger("retention")

DAY_S = 86_400.0
"""Seconds per day."""
MAX_INTERVAL_S = 3600.0
"""Longest time between two retention runs, seconds."""
FINAL_JOB_STATES = ("done", "cancelled")
"""Job states that release a series' input (``failed`` does not: ``jobs retry`` needs it)."""

_FINAL_SQL = ", ".join(f"'{s}'" for s in FINAL_JOB_STATES)


@dataclass(frozen=True, slots=True)
class ExpiredSeries:
    """A series whose spooled input may be deleted."""

    series_instance_uid: str
    study_instance_uid: str
    revision: int
    """Latest revision (complete)."""
    instances: int
    """Indexed instances (all revisions)."""
    done_at: float
    """Latest completion: the series' or its last job's ``finished_at``, UTC epoch seconds."""
    job_ids: tuple[str, ...]
    """Its jobs (all revisions; each ``done`` or ``cancelled``)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain fields for JSON output (``done_at`` as ISO 8601 UTC, ``job_ids`` as a list)."""
        d = asdict(self)
        d["done_at"] = datetime.fromtimestamp(self.done_at, UTC).isoformat(timespec="seconds")
        d["job_ids"] = list(self.job_ids)
        return d


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What one retention run did (or, with ``dry_run``, would do)."""

    series: tuple[ExpiredSeries, ...]
    """Series purged (dry run: expired)."""
    files_deleted: int
    """Spooled instance files deleted (0 for a dry run)."""
    results_deleted: int
    """Job result folders deleted (0 for a dry run)."""
    skipped: int
    """Expired when listed, but no longer when purged (e.g. a new instance arrived)."""
    dry_run: bool
    failed: int = 0
    """Expired series left in place because a file could not be deleted (logged; retried at
    the next run)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain fields for JSON output."""
        return {"dry_run": self.dry_run, "series_purged": len(self.series),
                "instances": sum(s.instances for s in self.series),
                "files_deleted": self.files_deleted, "results_deleted": self.results_deleted,
                "skipped": self.skipped, "failed": self.failed,
                "series": [s.as_dict() for s in self.series]}


def _expired_query(one: bool) -> str:
    """Expired series (parameters: cutoff epoch seconds twice, then the series UID if ``one``).

    Written for both back ends (no SQLite two-argument ``MAX``, no alias in ``WHERE``).
    """
    jobs_done = ("COALESCE((SELECT MAX(COALESCE(j.finished_at, j.updated_at)) FROM jobs j"
                 " WHERE j.series_uid = s.series_instance_uid), 0)")
    return (
        "SELECT * FROM (SELECT s.series_instance_uid, s.study_instance_uid, s.revision,"
        " s.instance_count, CASE WHEN COALESCE(s.completed_at, 0) >= " + jobs_done
        + " THEN COALESCE(s.completed_at, 0) ELSE " + jobs_done + " END AS done_at"
        " FROM series s WHERE s.state = 'complete' AND s.completed_at <= ?"
        " AND EXISTS (SELECT 1 FROM series_events e"
        "  WHERE e.series_instance_uid = s.series_instance_uid AND e.revision = s.revision)"
        " AND NOT EXISTS (SELECT 1 FROM series_events e"
        "  WHERE e.series_instance_uid = s.series_instance_uid AND e.routed_at IS NULL)"
        " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_instance_uid"
        f"  AND j.state NOT IN ({_FINAL_SQL}))"
        + (" AND s.series_instance_uid = ?" if one else "")
        + ") x WHERE done_at <= ? ORDER BY done_at"
    )


def _job_ids(conn: Any, series_uid: str) -> tuple[str, ...]:
    return tuple(r[0] for r in conn.execute(
        "SELECT id FROM jobs WHERE series_uid = ? ORDER BY created_at, id", (series_uid,)))


def expired_series(index: SeriesIndex, older_than_s: float, now: float | None = None
                   ) -> list[ExpiredSeries]:
    """Series whose work finished more than ``older_than_s`` seconds before ``now``.

    Args:
        index: The node's series index (its database also holds the jobs).
        older_than_s: Retention period, seconds (``>= 0``).
        now: UTC epoch seconds; default the current time.

    Returns:
        Expired series, longest finished first.
    """
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    now = time.time() if now is None else now
    c = index.conn
    cutoff = now - older_than_s
    rows = c.execute(_expired_query(one=False), (cutoff, cutoff)).fetchall()
    return [ExpiredSeries(r[0], r[1], int(r[2]), int(r[3]), float(r[4]), _job_ids(c, r[0]))
            for r in rows]


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def purge_expired(settings: NodeSettings, index: SeriesIndex, older_than_days: float, *,
                  now: float | None = None, dry_run: bool = False) -> PurgeResult:
    """Delete the spooled files, index rows and job results of expired series.

    Args:
        settings: The node configuration (spool folder, results folder).
        index: The node's series index.
        older_than_days: Retention period, days (``storage.retention_days`` or the CLI's).
        now: UTC epoch seconds to measure from (tests pass a clock); default the current time.
        dry_run: Only list what would be purged.

    Returns:
        What was purged.
    """
    from dicom_node.audit import get_audit
    from dicom_node.worker import remove_results  # the worker owns the results folder layout

    older_than_s = older_than_days * DAY_S
    now = time.time() if now is None else now
    candidates = expired_series(index, older_than_s, now)
    if dry_run:
        return PurgeResult(tuple(candidates), 0, 0, 0, True)
    spool_root = settings.storage.path.resolve()
    c = index.conn
    cutoff = now - older_than_s
    purged: list[ExpiredSeries] = []
    files = results = skipped = failed = 0
    for cand in candidates:
        uid = cand.series_instance_uid
        folders: set[Path] = set()
        c.execute("BEGIN IMMEDIATE")
        try:
            # Re-check under the write lock (PostgreSQL: the series row's lock, so a node
            # indexing a new instance, or another node's retention, waits or is waited for):
            # a new instance or a retried job keeps the series.
            c.execute("SELECT 1 FROM series WHERE series_instance_uid = ?" + lock_rows(c),
                      (uid,)).fetchall()
            row = c.execute(_expired_query(one=True), (cutoff, uid, cutoff)).fetchone()
            if row is None:
                c.execute("ROLLBACK")
                skipped += 1
                continue
            n_files = 0
            for inst in index.instances_of(uid):
                if not _inside(inst.path, spool_root):
                    log.warning("retention_path_outside_spool", series_uid=uid,
                                sop_instance_uid=inst.sop_instance_uid)
                    continue
                try:
                    inst.path.unlink()
                    n_files += 1
                except FileNotFoundError:
                    pass  # deleted by a run that crashed before its commit
                folders.add(inst.path.parent)
            n_results = 0
            for job_id in _job_ids(c, uid):
                if (results_dir(settings) / job_id).is_dir():
                    remove_results(settings, job_id)
                    n_results += 1
            n_rows = index.purge_series(uid, conn=c)
        except OSError as err:
            # Rows stay (a later run tries again); files already deleted are skipped then.
            c.execute("ROLLBACK")
            failed += 1
            log.error("retention_series_failed", series_uid=uid, error=type(err).__name__,
                      detail=str(err.strerror or ""))
            continue
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        _remove_empty(folders, spool_root)
        done = ExpiredSeries(uid, str(row[1]), int(row[2]), n_rows, float(row[4]),
                             cand.job_ids)
        purged.append(done)
        files += n_files
        results += n_results
        log.info("retention_purged", series_uid=uid, study_uid=done.study_instance_uid,
                 instances=n_rows, files=n_files, job_results=n_results,
                 jobs=len(done.job_ids), older_than_days=older_than_days)
        try:
            get_audit().retention_purged(
                study_uid=done.study_instance_uid, series_uid=uid, instances=n_rows,
                revision=done.revision, files=n_files, job_ids=list(done.job_ids),
                job_results=n_results, older_than_days=older_than_days)
        except OSError as err:
            log.error("audit_write_failed", audit_event="retention_purged",
                      error=type(err).__name__)
    return PurgeResult(tuple(purged), files, results, skipped, False, failed)


def _remove_empty(folders: set[Path], root: Path) -> None:
    """Remove emptied series folders and then their study folders (never ``root``)."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        for d in (folder, folder.parent):
            if d.resolve() == root or not _inside(d, root):
                break
            try:
                d.rmdir()
            except OSError:
                break  # not empty (other series, or a new instance), or gone


def interval_s(retention_days: float) -> float:
    """Seconds between retention runs: a tenth of the period, at most one hour."""
    return max(1.0, min(MAX_INTERVAL_S, retention_days * DAY_S / 10))


class RetentionService:
    """Purges expired series in the background (a node service: ``start()``/``stop()``).

    Args:
        settings: The node configuration; ``storage.retention_days`` must be set.
        index: The node's series index.

    Raises:
        ValueError: ``storage.retention_days`` is not set.
    """

    def __init__(self, settings: NodeSettings, index: SeriesIndex) -> None:
        days = settings.storage.retention_days
        if days is None:
            raise ValueError("storage.retention_days is not set: nothing to retain")
        if days < 0:
            raise ValueError(f"storage.retention_days must be >= 0, got {days}")
        self.settings = settings
        self.index = index
        self.retention_days = float(days)
        self.interval_s = interval_s(self.retention_days)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        """Completed runs (for tests and metrics)."""

    def start(self) -> None:
        """Run once now (in the background), then every :attr:`interval_s` seconds."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()
        log.info("retention_started", retention_days=self.retention_days,
                 interval_s=self.interval_s)

    def stop(self) -> None:
        """Stop the thread (a run in progress finishes its current series first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def run_once(self, now: float | None = None) -> PurgeResult:
        """One retention run (what the thread does each interval)."""
        result = purge_expired(self.settings, self.index, self.retention_days, now=now)
        self.runs += 1
        if result.series or result.skipped or result.failed:
            log.info("retention_run", series_purged=len(result.series),
                     files_deleted=result.files_deleted,
                     results_deleted=result.results_deleted, skipped=result.skipped,
                     failed=result.failed)
        return result

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # noqa: BLE001 - keep the service alive; try next interval
                    log.exception("retention_run_failed")
                if self._stop.wait(self.interval_s):
                    break
        finally:
            self.index.close()
