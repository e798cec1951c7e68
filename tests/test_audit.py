"""The append-only audit trail: JSON lines, thread-safe, no patient data."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from dicom_node.audit import (
    EVENTS,
    AuditLog,
    configure_audit,
    get_audit,
    is_phi_field,
    read_audit,
)


def test_write_appends_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    audit = AuditLog(path)
    audit.association_accepted(calling_ae="CT1", called_ae="OMNIMRI", host="10.0.0.5")
    audit.delivery(job_id=3, destination="pacs", status="ok", instances=5)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["event"] == "association_accepted"
    assert first["calling_ae"] == "CT1" and first["host"] == "10.0.0.5"
    assert second["event"] == "delivery" and second["instances"] == 5
    assert second["seq"] == first["seq"] + 1
    assert first["ts"].endswith("+00:00")


def test_reopening_appends_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).write("admin_action", token_id="ops", action="retry")
    AuditLog(path).write("admin_action", token_id="ops", action="cancel")
    assert [r["action"] for r in read_audit(path)] == ["retry", "cancel"]


def test_patient_fields_are_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    rec = audit.write(
        "series_received",
        series_uid="1.2.3",
        PatientName="Doe^Jane",
        patient_id="12345",
        PatientBirthDate="19700101",
        AccessionNumber="A1",
        extra={"PatientID": "nested", "rows": 3},
        instances=10,
    )
    assert rec is not None
    text = path.read_text()
    for secret in ("Doe^Jane", "12345", "19700101", "A1", "nested"):
        assert secret not in text
    assert audit.dropped_fields == 4
    line = json.loads(text)
    assert line["series_uid"] == "1.2.3" and line["instances"] == 10
    assert line["extra"] == {"rows": 3}


@pytest.mark.parametrize(
    ("name", "phi"),
    [("PatientName", True), ("patient_sex", True), ("PatientAge", True), ("birth_date", True),
     ("ReferringPhysicianName", True), ("series_uid", False), ("calling_ae", False),
     ("token_id", False), ("host", False)],
)
def test_is_phi_field(name: str, phi: bool) -> None:
    assert is_phi_field(name) is phi


def test_unknown_event_and_reserved_field_are_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="unknown audit event"):
        audit.write("something_else", x=1)
    with pytest.raises(ValueError, match="reserved"):
        audit.write("delivery", ts="now")
    assert not (tmp_path / "a.jsonl").exists()


def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    audit = AuditLog(None)
    assert not audit.enabled
    assert audit.write("delivery", job_id=1, destination="pacs", status="ok") is None
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, fsync=False)
    payload = "x" * 2000

    def work(n: int) -> None:
        for i in range(50):
            audit.write("output_produced", job_id=n, series_uid=str(i), kind="seg",
                        sop_instance_uid=payload)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = list(read_audit(path))
    assert len(records) == 400
    assert sorted(r["seq"] for r in records) == list(range(1, 401))
    assert all(r["sop_instance_uid"] == payload for r in records)


def test_read_audit_skips_a_torn_last_line_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.write("delivery", job_id=1, destination="pacs", status="ok")
    audit.write("admin_action", token_id="ops", action="apply_rules")
    with path.open("a") as fh:
        fh.write('{"ts": "2026-01-01", "event": "deliv')
    assert len(list(read_audit(path))) == 2
    assert [r["action"] for r in read_audit(path, event="admin_action")] == ["apply_rules"]


def test_every_event_has_a_wrapper() -> None:
    for event in EVENTS:
        assert callable(getattr(AuditLog, event))


def test_process_wide_log(tmp_path: Path) -> None:
    try:
        audit = configure_audit(tmp_path / "g.jsonl")
        assert get_audit() is audit
        get_audit().rule_decision(series_uid="1.2", matched=["mr-brain"], pipelines=["brain"],
                                  destinations=["pacs"])
        (rec,) = read_audit(tmp_path / "g.jsonl")
        assert rec["matched"] == ["mr-brain"]
    finally:
        configure_audit(None)
    assert not get_audit().enabled
