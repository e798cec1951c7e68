"""Spool retention: finished series are purged after ``retention_days``; nothing else is.

Real node database (index + job queue), real spool files written by pydicom; the clock is a
``now=`` parameter, never a sleep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node import retention
from dicom_node.audit import configure_audit, read_audit
from dicom_node.cli import app
from dicom_node.config import NodeSettings, parse_config
from dicom_node.index import InstanceRecord, SeriesIndex
from dicom_node.jobs import JobQueue, NewJob, results_dir
from dicom_node.retention import RetentionService, expired_series, interval_s, purge_expired
from dicom_node.spool import Spool
from omnimri_samples import synthetic_series
from tests.fixtures.wait import wait_until

DAY = 86_400.0
STUDY = "1.2.826.0.1.3680043.10.1.1"


@pytest.fixture
def settings(tmp_path: Path, db_target: str | Path) -> NodeSettings:
    """Settings on each back end (``db_target``: SQLite file, PostgreSQL database)."""
    return parse_config(
        {"storage": {"path": "spool", "fsync": False, "retention_days": 7,
                     "database": str(db_target)},
         "audit": {"path": str(tmp_path / "audit.jsonl")},
         "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}}},
        tmp_path,
    )


class Node:
    """The parts retention works on: index, spool and job queue over one database."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.spool = Spool(settings.storage.path, fsync=False)
        self.index = SeriesIndex(settings.storage.database_path)
        self.jobs = JobQueue(settings)
        self._n = 0

    def receive(self, series_uid: str, n: int = 2) -> list[Path]:
        """Store ``n`` new instances of a series in the spool and index them."""
        paths = []
        for ds in synthetic_series(n, 8, 8, study_uid=STUDY, series_uid=series_uid):
            self._n += 1
            ds.SOPInstanceUID = f"{series_uid}.{self._n}"
            path = self.spool.path_for(STUDY, series_uid, ds.SOPInstanceUID)
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            self.index.record([InstanceRecord(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=series_uid, study_instance_uid=STUDY, path=path,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                size_bytes=path.stat().st_size, received_at=time.time(), modality="MR")])
            paths.append(path)
        return paths

    def complete(self, routed: bool = True) -> None:
        for ev in self.index.complete_quiet(0.0, now=time.time()):
            if routed:
                self.index.mark_routed(ev.event_id)

    def job(self, series_uid: str, state: str, pipeline: str = "preview") -> str:
        """Enqueue a job for the latest revision and bring it to ``state`` through the API."""
        rev = max(e.revision for e in self.index.events(series_uid))
        # A job left queued is "low", the others "urgent": claim() takes the one just made.
        jid, _ = self.jobs.enqueue(NewJob(self.index.load_series(series_uid, rev), pipeline,
                                          ("pacs",),
                                          priority="low" if state == "queued" else "urgent"))
        out = results_dir(self.settings) / jid
        out.mkdir(parents=True)
        (out / "output.dcm").write_bytes(b"x")
        if state == "queued":
            return jid
        if state == "cancelled":
            self.jobs.cancel(jid)
            return jid
        claimed = self.jobs.claim()
        assert claimed is not None and claimed.id == jid
        if state == "done":
            self.jobs.complete(jid)
        elif state == "failed":
            self.jobs.fail(jid, "boom", permanent=True)
        return jid


@pytest.fixture
def node(settings: NodeSettings) -> Iterator[Node]:
    n = Node(settings)
    configure_audit(settings.audit.path)
    yield n
    configure_audit(None)
    n.jobs.close()
    n.index.close()


def _rows(index: SeriesIndex, uid: str) -> tuple[int, int, int]:
    c = index.conn
    return tuple(int(c.execute(f"SELECT COUNT(*) FROM {t} WHERE series_instance_uid = ?",
                               (uid,)).fetchone()[0])
                 for t in ("series", "instances", "series_events"))  # type: ignore[return-value]


def _scenario(node: Node) -> dict[str, tuple[list[Path], list[str]]]:
    """One series per case; returns uid -> (spooled files, job ids)."""
    cases: dict[str, tuple[list[Path], list[str]]] = {}
    for uid, states in {"1.2.3.1": ["done"], "1.2.3.2": [], "1.2.3.3": ["cancelled"],
                        "1.2.3.4": ["failed"], "1.2.3.5": ["queued"],
                        "1.2.3.6": ["done", "running"]}.items():
        files = node.receive(uid)
        node.complete()
        jobs = [node.job(uid, s, pipeline=f"p{k}") for k, s in enumerate(states)]
        cases[uid] = (files, jobs)
    # Done, but revision 2 is being received.
    files = node.receive("1.2.3.7")
    node.complete()
    jobs = [node.job("1.2.3.7", "done")]
    files += node.receive("1.2.3.7", 1)
    cases["1.2.3.7"] = (files, jobs)
    # Complete, but the router has not seen the completion yet.
    cases["1.2.3.8"] = (node.receive("1.2.3.8"), [])
    node.complete(routed=False)
    return cases


PURGED = {"1.2.3.1", "1.2.3.2", "1.2.3.3"}


def test_purges_only_finished_series_past_the_cutoff(node: Node, settings: NodeSettings
                                                     ) -> None:
    cases = _scenario(node)
    # One day later nothing is old enough.
    assert expired_series(node.index, 7 * DAY, now=time.time() + DAY) == []
    assert purge_expired(settings, node.index, 7, now=time.time() + DAY).series == ()

    later = time.time() + 8 * DAY
    result = purge_expired(settings, node.index, 7, now=later)
    assert {s.series_instance_uid for s in result.series} == PURGED
    assert result.files_deleted == 6 and result.results_deleted == 2 and result.skipped == 0
    for uid, (files, jobs) in cases.items():
        folder = files[0].parent
        if uid in PURGED:
            assert _rows(node.index, uid) == (0, 0, 0)
            assert not any(f.exists() for f in files) and not folder.exists()
            assert not any((results_dir(settings) / j).exists() for j in jobs)
            assert all(node.jobs.get(j).state in ("done", "cancelled") for j in jobs)
        else:
            assert _rows(node.index, uid)[:2] == (1, len(files)), uid
            assert all(f.is_file() for f in files), uid
            assert all((results_dir(settings) / j).is_dir() for j in jobs), uid
    assert cases["1.2.3.4"][0][0].parent.parent.is_dir()  # the study folder: kept series
    audit = list(read_audit(str(settings.audit.path), event="retention_purged"))
    assert {a["series_uid"] for a in audit} == PURGED
    one = next(a for a in audit if a["series_uid"] == "1.2.3.1")
    assert one["instances"] == 2 and one["files"] == 2 and one["study_uid"] == STUDY
    assert one["job_ids"] == cases["1.2.3.1"][1]
    # Purging again finds nothing; the failed job's input is still there for `jobs retry`.
    assert purge_expired(settings, node.index, 7, now=later).series == ()
    node.jobs.retry(cases["1.2.3.4"][1][0])
    assert node.jobs.get(cases["1.2.3.4"][1][0]).state == "queued"


def test_latest_job_completion_counts_not_the_series(node: Node, settings: NodeSettings
                                                     ) -> None:
    node.receive("1.2.4.1")
    node.complete()
    jid = node.job("1.2.4.1", "done")
    # The job finished 5 days after the series completed: 7 days after completion is too soon.
    node.jobs.conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?",
                           (time.time() + 5 * DAY, jid))
    assert purge_expired(settings, node.index, 7, now=time.time() + 8 * DAY).series == ()
    assert len(purge_expired(settings, node.index, 7, now=time.time() + 13 * DAY).series) == 1


def test_dry_run_changes_nothing(node: Node, settings: NodeSettings) -> None:
    cases = _scenario(node)
    before = {uid: _rows(node.index, uid) for uid in cases}
    result = purge_expired(settings, node.index, 7, now=time.time() + 8 * DAY, dry_run=True)
    assert result.dry_run and {s.series_instance_uid for s in result.series} == PURGED
    assert result.files_deleted == 0
    assert {uid: _rows(node.index, uid) for uid in cases} == before
    assert all(f.is_file() for files, _ in cases.values() for f in files)
    assert all((results_dir(settings) / j).is_dir() for _, jobs in cases.values() for j in jobs)
    assert list(read_audit(str(settings.audit.path), event="retention_purged")) == []


def test_instance_arriving_after_listing_keeps_the_series(
        node: Node, settings: NodeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    files = node.receive("1.2.5.1")
    node.complete()
    node.job("1.2.5.1", "done")
    later = time.time() + 8 * DAY
    stale = expired_series(node.index, 7 * DAY, now=later)
    assert len(stale) == 1
    files += node.receive("1.2.5.1", 1)  # revision 2 starts between listing and purging
    monkeypatch.setattr(retention, "expired_series", lambda *a, **k: stale)
    result = purge_expired(settings, node.index, 7, now=later)
    assert result.series == () and result.skipped == 1
    assert all(f.is_file() for f in files) and _rows(node.index, "1.2.5.1")[1] == 3


def test_service_runs_at_start(node: Node, settings: NodeSettings) -> None:
    assert interval_s(7) == 3600 and interval_s(0.01) == pytest.approx(86.4)
    node.receive("1.2.6.1")
    node.complete()
    node.job("1.2.6.1", "done")
    # retention_days 0: finished work is purged at once.
    svc = RetentionService(settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"retention_days": 0})}), node.index)
    svc.start()
    try:
        wait_until(lambda: svc.runs >= 1, 10, interval_s=0.02, message="retention never ran")
    finally:
        svc.stop()
    assert svc.runs >= 1 and _rows(node.index, "1.2.6.1") == (0, 0, 0)
    with pytest.raises(ValueError, match="retention_days"):
        RetentionService(settings.model_copy(update={"storage": settings.storage.model_copy(
            update={"retention_days": None})}), node.index)


def test_cli_series_purge(node: Node, settings: NodeSettings, tmp_path: Path) -> None:
    cases = _scenario(node)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage:\n  path: spool\n  fsync: false\n"
                   f"  database: {settings.storage.database_path}\naudit:\n"
                   f"  path: {settings.audit.path}\n")
    runner = CliRunner()
    dry = runner.invoke(app, ["series", "purge", "--older-than-days", "0", "--dry-run",
                              "--json", "-c", str(cfg)])
    assert dry.exit_code == 0, dry.output
    out = json.loads(dry.output)
    assert out["dry_run"] and {s["series_instance_uid"] for s in out["series"]} == PURGED
    assert all(f.is_file() for files, _ in cases.values() for f in files)
    far = runner.invoke(app, ["series", "purge", "--older-than-days", "30", "-c", str(cfg)])
    assert far.exit_code == 0 and "purged 0 series" in far.output
    real = runner.invoke(app, ["series", "purge", "--older-than-days", "0", "-c", str(cfg)])
    assert real.exit_code == 0, real.output
    assert "purged 3 series, 6 instances, 6 files, 2 job result folders" in real.output
    assert all(_rows(node.index, uid) == (0, 0, 0) for uid in PURGED)
    bad = runner.invoke(app, ["series", "purge", "--older-than-days", "-1", "-c", str(cfg)])
    assert bad.exit_code == 2


def test_serve_adds_the_service_only_with_retention_days(
        settings: NodeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.runtime import Node as RealNode
    from dicom_node.runtime import run_node

    built: list[RealNode] = []
    monkeypatch.setattr(RealNode, "serve_forever", lambda self: built.append(self))
    try:
        for days, expected in ((7, 1), (None, 0)):
            s = settings.model_copy(update={"storage": settings.storage.model_copy(
                update={"retention_days": days})})
            run_node(s)
            services = built[-1]._services
            assert sum(isinstance(x, RetentionService) for x in services) == expected
            built[-1].index.close()
            built[-1].jobs.close()
    finally:
        configure_audit(None)


def test_file_that_cannot_be_deleted_keeps_the_rows_until_next_run(
        node: Node, settings: NodeSettings) -> None:
    files = node.receive("1.2.7.1", 3)
    node.complete()
    jid = node.job("1.2.7.1", "done")
    # The middle instance's path is now a non-empty folder: unlink() fails (even as root).
    files[1].unlink()
    files[1].mkdir()
    (files[1] / "blocker").write_bytes(b"x")
    later = time.time() + 8 * DAY
    result = purge_expired(settings, node.index, 7, now=later)
    assert result.series == () and result.failed == 1
    assert _rows(node.index, "1.2.7.1") == (1, 3, 1)  # rows kept: the next run tries again
    (files[1] / "blocker").unlink()
    files[1].rmdir()
    again = purge_expired(settings, node.index, 7, now=later)
    assert len(again.series) == 1 and again.failed == 0
    assert _rows(node.index, "1.2.7.1") == (0, 0, 0) and not files[0].parent.exists()
    assert not (results_dir(settings) / jid).exists()
