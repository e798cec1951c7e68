"""The router: completion events from the real series index × rules → jobs, atomically."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node import metrics
from dicom_node.config import NodeSettings, parse_config
from dicom_node.index import InstanceRecord, SeriesIndex
from dicom_node.jobs import JobQueue
from dicom_node.router import Router, failure_reason, resolve_sender
from omnimri_samples import synthetic_series, write_series
from tests.fixtures import legacy_schema as legacy
from tests.fixtures.legacy_schema import make_legacy_db
from tests.fixtures.wait import wait_until

STUDY = "1.2.826.0.1.3680043.10.1526.777"


def base_config(rules: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "storage": {"path": "spool", "fsync": False},
        "pipelines": {
            "preview": {"kind": "preview", "model": None, "outputs": ["sc"]},
            "other": {"kind": "preview", "model": None, "outputs": ["sc"]},
        },
        "destinations": {
            "pacs": {"kind": "dimse", "ae_title": "PACS", "host": "10.0.0.1", "port": 104},
            "scanner": {"kind": "dimse", "ae_title": "SCANNER1", "host": "127.0.0.1",
                        "port": 11113},
            "archive": {"kind": "folder", "path": "results"},
        },
        "rules": rules,
    }
    cfg.update(extra)
    return cfg


class Env:
    def __init__(self, tmp: Path, db: str | Path, rules: list[dict[str, Any]]) -> None:
        """A router over ``db`` (``db_target``: each back end), spool and files in ``tmp``."""
        self.tmp = tmp
        cfg = base_config(rules)
        cfg["storage"]["database"] = str(db)
        self.settings: NodeSettings = parse_config(cfg, tmp)
        self.index = SeriesIndex(self.settings.storage.database_path)
        self.queue = JobQueue(self.settings)
        self.wakes = 0
        self.router = Router(self.settings, self.queue, self.index, on_enqueued=self._woke)
        self.n = 0

    def _woke(self) -> None:
        self.wakes += 1

    def receive(self, description: str, *, calling_ae: str = "SCANNER1", called_ae: str = "OMNIMRI",
                slices: int = 2, later_s: float = 0.0, **tags: Any) -> str:
        """Store a small series, index it and complete it; returns its Series Instance UID."""
        self.n += 1
        datasets = synthetic_series(slices, 16, 16, seed=self.n, study_uid=STUDY,
                                    series_number=self.n, description=description)
        for ds in datasets:
            for k, v in tags.items():
                setattr(ds, k, v)
        paths = write_series(datasets, self.tmp / f"s{self.n}")
        now = time.time() + later_s
        self.index.record([
            InstanceRecord(ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID,
                           ds.StudyInstanceUID, p, ds.file_meta.TransferSyntaxUID,
                           p.stat().st_size, now, modality=ds.Modality,
                           series_description=description, instance_number=k + 1,
                           calling_ae=calling_ae, called_ae=called_ae, peer_host="127.0.0.1")
            for k, (ds, p) in enumerate(zip(datasets, paths, strict=True))
        ], use_expected_count=False)
        events = self.index.complete_quiet(0.0, now=now + 1)
        assert len(events) == 1
        return str(datasets[0].SeriesInstanceUID)

    def jobs(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        return sorted((j.series_uid, j.pipeline, j.destinations, j.priority)
                      for j in self.queue.list_jobs())


def test_series_rule_enqueues_once_and_marks_routed(tmp_path: Path, db_target: str | Path) -> None:
    env = Env(tmp_path, db_target, [{"name": "mr", "when": 'Modality == "MR"',
                          "pipelines": ["preview", "other"], "destinations": ["pacs"]}])
    uid = env.receive("T1 AXIAL")
    assert env.router.route_pending() == 2
    assert env.jobs() == [(uid, "other", ("pacs",), "normal"),
                          (uid, "preview", ("pacs",), "normal")]
    assert env.index.pending_events() == [] and env.wakes == 1
    # Routing the same event again (a crash before the caller noticed) adds nothing.
    [event] = env.index.events(uid)
    assert env.router.route_event(event) == 0
    assert len(env.queue.list_jobs()) == 2
    job = env.queue.list_jobs()[0]
    assert job.series.series_instance_uid == uid and len(job.series.instances) == 2
    assert job.rule == "mr" and job.event_id == str(event.event_id)


def test_discard_and_non_matching(tmp_path: Path, db_target: str | Path) -> None:
    env = Env(tmp_path, db_target, [
        {"name": "no-localizers", "when": 'SeriesDescription contains "loc"', "action": "discard"},
        {"name": "thin", "when": "SliceThickness < 2", "pipelines": ["preview"],
         "destinations": ["archive"]},
    ])
    env.receive("LOCALIZER", SliceThickness=1.0)
    env.receive("T2 thick", SliceThickness=5.0)
    thin = env.receive("T1 thin", SliceThickness=1.0)
    assert env.router.route_pending() == 1
    assert env.jobs() == [(thin, "preview", ("archive",), "normal")]
    assert env.index.pending_events() == []


def test_sender_is_resolved_by_calling_ae(tmp_path: Path, db_target: str | Path, caplog: Any
                                          ) -> None:
    env = Env(tmp_path, db_target, [{"name": "back", "when": "true", "pipelines": ["preview"],
                          "destinations": ["sender", "archive"]}])
    known = env.receive("A", calling_ae="SCANNER1")
    unknown = env.receive("B", calling_ae="MYSTERY")
    assert env.router.route_pending() == 2
    assert env.jobs() == sorted([(known, "preview", ("scanner", "archive"), "normal"),
                                 (unknown, "preview", ("archive",), "normal")])
    series = env.index.load_series(known, 1)
    assert resolve_sender(series, env.settings) == "scanner"


def test_two_rules_one_pipeline_merge(tmp_path: Path, db_target: str | Path) -> None:
    env = Env(tmp_path, db_target, [
        {"name": "a", "when": 'Modality == "MR"', "pipelines": ["preview"],
         "destinations": ["pacs"], "priority": "low"},
        {"name": "b", "when": 'CalledAE == "OMNI_BRAIN"', "pipelines": ["preview"],
         "destinations": ["archive"], "priority": "urgent"},
    ])
    uid = env.receive("T1", called_ae="OMNI_BRAIN")
    other = env.receive("T1", called_ae="OMNIMRI")
    env.router.route_pending()
    assert env.jobs() == sorted([(uid, "preview", ("pacs", "archive"), "urgent"),
                                 (other, "preview", ("pacs",), "low")])


def test_study_trigger_waits_for_required_series(tmp_path: Path, db_target: str | Path) -> None:
    env = Env(tmp_path, db_target, [{
        "name": "brain-study", "when": 'Modality == "MR"', "trigger": "study",
        "required_series": ['SeriesDescription matches "(?i)^t1"',
                            'SeriesDescription contains "flair"'],
        "pipelines": ["preview"], "destinations": ["pacs"],
    }])
    t1 = env.receive("T1 MPRAGE")
    assert env.router.route_pending() == 0  # FLAIR missing
    assert env.index.pending_events() == []
    env.receive("DWI")
    assert env.router.route_pending() == 0
    flair = env.receive("AX FLAIR")
    assert env.router.route_pending() == 2
    assert env.jobs() == sorted([(t1, "preview", ("pacs",), "normal"),
                                 (flair, "preview", ("pacs",), "normal")])


def test_study_rule_gives_up_after_its_timeout(tmp_path: Path, db_target: str | Path) -> None:
    env = Env(tmp_path, db_target, [{
        "name": "brain-study", "when": 'Modality == "MR"', "trigger": "study",
        "required_series": ['SeriesDescription contains "t1"',
                            'SeriesDescription contains "flair"'],
        "study_timeout_s": 60, "pipelines": ["preview"], "destinations": ["pacs"],
    }])
    env.receive("T1 MPRAGE")
    assert env.router.route_pending() == 0
    env.receive("AX FLAIR", later_s=120)  # two minutes later: the rule gave up
    assert env.router.route_pending() == 0
    assert env.queue.list_jobs() == [] and env.index.pending_events() == []


def test_enqueue_and_routed_mark_are_one_transaction(tmp_path: Path, db_target: str | Path,
                                                     monkeypatch: Any) -> None:
    env = Env(tmp_path, db_target, [{"name": "mr", "when": "true",
                                     "pipelines": ["preview", "other"],
                                     "destinations": ["pacs"]}])
    env.receive("T1")
    real = env.queue.enqueue
    calls = {"n": 0}

    def crash_on_second(job: Any, conn: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash mid-routing")
        return real(job, conn)

    monkeypatch.setattr(env.queue, "enqueue", crash_on_second)
    assert env.router.route_pending() == 0  # the event failed, no job half-written
    assert env.queue.list_jobs() == [] and env.index.pending_events() == []
    [(event, reason)] = env.index.failed_events()
    assert reason == "RuntimeError: simulated crash mid-routing"
    monkeypatch.setattr(env.queue, "enqueue", real)
    assert env.index.retry_failed() == 1
    assert env.router.route_pending() == 2 and env.index.pending_events() == []
    assert env.index.failed_events() == []


def test_database_error_leaves_the_event_pending(tmp_path: Path, db_target: str | Path,
                                                 monkeypatch: Any) -> None:
    """Database trouble is not the event's fault: it stays pending for the next poll."""
    env = Env(tmp_path, db_target, [{"name": "mr", "when": "true", "pipelines": ["preview"],
                          "destinations": ["pacs"]}])
    env.receive("T1")
    real = env.queue.enqueue

    def locked(job: Any, conn: Any = None) -> Any:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(env.queue, "enqueue", locked)
    with pytest.raises(sqlite3.OperationalError):
        env.router.route_pending()
    assert len(env.index.pending_events()) == 1 and env.index.failed_events() == []
    monkeypatch.setattr(env.queue, "enqueue", real)
    assert env.router.route_pending() == 1


def _poison(path: Path) -> None:
    """Give SliceThickness the VR ``ZZ`` in a stored file (same size: pydicom then raises)."""
    data = path.read_bytes()
    tag = b"\x18\x00\x50\x00DS"
    assert data.count(tag) == 1
    path.write_bytes(data.replace(tag, b"\x18\x00\x50\x00ZZ"))


def test_a_poisoned_series_fails_visibly_and_the_next_is_routed(
        tmp_path: Path, db_target: str | Path) -> None:
    """Issue #17 item 3: VR ZZ made the router raise on every poll and route nothing more."""
    rules = [{"name": "all", "when": "SliceThickness > 0", "pipelines": ["preview"],
              "destinations": ["archive"]}]
    env = Env(tmp_path, db_target, rules)
    bad = env.receive("POISON")
    for p in (tmp_path / f"s{env.n}").glob("*.dcm"):
        _poison(p)
    good = env.receive("GOOD")
    before = metrics.sample("omnimri_stage_failures_total", {"stage": "routing"})
    assert env.router.route_pending() == 1
    assert env.jobs() == [(good, "preview", ("archive",), "normal")]
    info = env.index.get_series(bad)
    assert info is not None and info["state"] == "failed"
    assert info["failure"].startswith("NotImplementedError")
    assert info["events"][0]["failure"] == info["failure"]
    assert info["events"][0]["failed_at"] and info["events"][0]["routed_at"] is None
    assert env.index.get_series(good)["state"] == "complete"  # type: ignore[index]
    assert [s["state"] for s in env.index.list_series() if s["series_instance_uid"] == bad] == [
        "failed"]
    assert metrics.sample("omnimri_stage_failures_total", {"stage": "routing"}) == before + 1
    assert metrics.routing_failed_count(env.settings.storage.database_path) == 1
    # Across a restart (a new router on the same database): not retried, nothing blocks.
    again = Router(env.settings, JobQueue(env.settings), SeriesIndex(
        env.settings.storage.database_path))
    later = env.receive("LATER")
    assert again.route_pending() == 1
    assert {j[0] for j in env.jobs()} == {good, later}
    # A rules reload retries failed events once (here: fails again, still visible).
    again.apply_settings(env.settings)
    assert again.route_pending() == 0
    assert env.index.get_series(bad)["state"] == "failed"  # type: ignore[index]


def test_failure_reason_has_no_patient_values() -> None:
    exc = ValueError("Invalid value for VR UI: 'DOE^JANE19700101' in element")
    reason = failure_reason(exc)
    assert "DOE" not in reason and "1970" not in reason and reason.startswith("ValueError")


def test_old_database_gains_the_failure_columns(tmp_path: Path) -> None:
    """A database made before the failed state: the columns are added, rows kept."""
    db = tmp_path / "old.db"
    make_legacy_db(db, legacy.SERIES_EVENTS, legacy.EVENT_ROW)
    index = SeriesIndex(db)
    assert [e.series_instance_uid for e in index.pending_events()] == ["1.2.3"]
    SeriesIndex(db)  # idempotent
    cols = {r[1] for r in index.conn.execute("PRAGMA table_info(series_events)")}
    assert {"failed_at", "failure"} <= cols


def test_router_service_routes_in_background(tmp_path: Path, db_target: str | Path) -> None:
    # The condition reads SeriesDescription from the stored files (the rules' attribute sampler
    # opens them with pydicom; the index is not consulted), so the job exists only if they are
    # real DICOM of that series.
    env = Env(tmp_path, db_target, [{"name": "mr", "when": 'SeriesDescription == "T1"',
                          "pipelines": ["preview"], "destinations": ["archive"]}])
    env.router.start()
    try:
        uid = env.receive("T1")
        jobs = wait_until(env.queue.list_jobs, 10, interval_s=0.05,
                          message="the router thread enqueued no job")
    finally:
        env.router.stop()
    assert [(j.series_uid, j.rule) for j in jobs] == [(uid, "mr")]
    ds = pydicom.dcmread(jobs[0].series.instances[0].path, stop_before_pixels=True)
    assert (ds.SeriesInstanceUID, ds.SeriesDescription) == (uid, "T1")
