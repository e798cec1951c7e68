"""``omnimri-node demo``: real Orthanc + real node processes, a sample brain MR round trip."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dicom_node.audit import read_audit
from dicom_node.cli import app
from dicom_node.cli import demo as demo_mod

needs_orthanc = pytest.mark.skipif(demo_mod.find_orthanc() is None,
                                   reason="Orthanc not installed (apt-get install orthanc)")


@needs_orthanc
def test_demo_round_trip_through_orthanc(tmp_path: Path) -> None:
    d = demo_mod.Demo(tmp_path / "demo", pipeline="preview", slices=8)
    try:
        result = d.run(timeout_s=120, say=lambda *_: None)
        # The result is in Orthanc, in the sample's study, next to the MR series.
        assert [s["modality"] for s in result.result_series] == ["OT"]
        study = httpx.get(f"{result.orthanc_url}/studies/{result.orthanc_study_id}",
                          timeout=10).json()
        assert study["MainDicomTags"]["StudyInstanceUID"] == result.study_uid
        assert len(study["Series"]) == 2
        # The console/API of the running node shows the done job; metrics saw the stages.
        base = result.console_url.removesuffix("/console")
        auth = {"Authorization": f"Bearer {result.token}"}
        jobs = httpx.get(f"{base}/api/v1/jobs", headers=auth, timeout=10).json()
        assert [j["state"] for j in jobs] == ["done"]
        text = httpx.get(f"{base}/metrics", headers=auth, timeout=10).text
        assert 'omnimri_stage_duration_seconds_count{stage="dispatch"} 1.0' in text
        assert 'omnimri_jobs{pipeline="preview",state="done"} 1.0' in text
    finally:
        d.stop()
    events = [r["event"] for r in read_audit(tmp_path / "demo" / "var" / "audit.jsonl")]
    # The listener audits the association first; the series' routing comes after it.
    assert events[0] == "association_accepted"
    assert events.index("series_received") < events.index("rule_decision")
    assert {"output_produced", "delivery"} <= set(events)
    assert all(p.poll() is not None for p in d.procs) or d.procs == []


def test_demo_without_orthanc_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_mod, "find_orthanc", lambda: None)
    r = CliRunner().invoke(app, ["demo", "--exit"])
    assert r.exit_code == demo_mod.EXIT_NO_ORTHANC
    assert "Orthanc is not installed" in r.output


def test_demo_brain_needs_a_model_package(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["demo", "--pipeline", "brain", "--models", str(tmp_path)])
    assert r.exit_code == 2 and "no model package" in r.output
