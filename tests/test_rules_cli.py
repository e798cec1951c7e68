"""``omnimri-node rules check|explain`` on real config files and real DICOM files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from omnimri_samples import synthetic_series, write_series

CONFIG = """\
storage:
  path: {spool}
  database: {db}
pipelines:
  brain: {{kind: preview, model: null}}
  knee: {{kind: preview, model: null}}
  preview: {{kind: preview, model: null}}
rules:
  - name: drop-localizers
    when: 'SeriesDescription matches "(?i)loc(alizer)?"'
    action: discard
  - name: brain
    when: 'CalledAE == "OMNI_BRAIN" and Modality == "MR" and SliceThickness <= 3'
    pipelines: [brain]
    destinations: [sender]
  - name: knee
    when: '{knee_when}'
    pipelines: [knee]
  - name: brain-study
    when: 'CalledAE == "OMNI_BRAIN"'
    trigger: study
    required_series: ['SeriesDescription contains "flair"', 'SeriesDescription contains "t1"']
    pipelines: [brain]
  - name: everything-else
    when: 'true'
    fallback: true
    pipelines: [preview]
"""

runner = CliRunner()


def _config(tmp_path: Path, knee_when: str = 'CalledAE == "OMNI_KNEE"') -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(
        CONFIG.format(spool=tmp_path / "spool", db=tmp_path / "node.db", knee_when=knee_when),
        encoding="utf-8",
    )
    return p


@pytest.fixture(scope="module")
def flair_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("flair")
    return write_series(synthetic_series(3, rows=8, cols=8, description="AX FLAIR"), folder)


def test_check_valid(tmp_path: Path) -> None:
    res = runner.invoke(app, ["rules", "check", "--config", str(_config(tmp_path))])
    assert res.exit_code == 0, res.output
    assert "valid, 5 rule(s)" in res.output
    assert "brain-study [study trigger, 2 required series]" in res.output


def test_check_invalid_shows_key_path_and_caret(tmp_path: Path) -> None:
    cfg = _config(tmp_path, knee_when='CalledAE == "OMNI_KNEE" and BodyPart == "KNEE"')
    res = runner.invoke(app, ["rules", "check", "--config", str(cfg)])
    assert res.exit_code == 2
    lines = res.output.splitlines()
    i = next(n for n, line in enumerate(lines) if "rules.2.when: column 29" in line)
    assert "unknown attribute 'BodyPart'" in lines[i]
    assert lines[i + 1].strip() == 'CalledAE == "OMNI_KNEE" and BodyPart == "KNEE"'
    assert lines[i + 2].index("^") - lines[i + 1].index("C") == 28


def test_check_json_invalid(tmp_path: Path) -> None:
    cfg = _config(tmp_path, knee_when="CalledAE ==")
    res = runner.invoke(app, ["rules", "check", "--config", str(cfg), "--json"])
    assert res.exit_code == 2
    out = json.loads(res.stdout)
    assert out["valid"] is False
    assert any(p.strip().startswith("rules.2.when: column 12") for p in out["problems"])


def test_explain_path(tmp_path: Path, flair_files: list[Path]) -> None:
    cfg = _config(tmp_path)
    res = runner.invoke(
        app,
        [
            "rules",
            "explain",
            str(flair_files[0]),
            "--config",
            str(cfg),
            "--called-ae",
            "OMNI_BRAIN",
        ],
    )
    assert res.exit_code == 0, res.output
    uid = pydicom.dcmread(flair_files[0]).SeriesInstanceUID
    assert f"series {uid}" in res.output
    assert "result: fired: brain, brain-study" in res.output
    assert "rule 1 'brain': FIRED: pipelines brain -> sender, priority normal" in res.output
    assert '[true ] CalledAE == "OMNI_BRAIN"  (CalledAE = "OMNI_BRAIN"' in res.output
    assert "[false] SeriesDescription matches" in res.output
    assert "rule 4 'everything-else' [fallback]: skipped: fallback: another rule matched" in (
        res.output
    )
    # the single file is the whole "study": flair is there, t1 is missing
    assert "study trigger 'brain-study': waiting" in res.output
    assert 'missing SeriesDescription contains "t1"' in res.output


def test_explain_folder_json_without_called_ae(tmp_path: Path, flair_files: list[Path]) -> None:
    cfg = _config(tmp_path)
    res = runner.invoke(
        app, ["rules", "explain", str(flair_files[0].parent), "--config", str(cfg), "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["fired"] == ["everything-else"] and out["discarded"] is False
    brain = out["rules"][1]
    called = brain["trace"]["children"][0]
    assert called["attribute"] == "CalledAE" and called["values"] is None
    assert called["reason"] == "CalledAE is missing"
    thickness = brain["trace"]["children"][2]
    assert thickness["result"] is True and thickness["values"]


def test_explain_unknown_target(tmp_path: Path) -> None:
    res = runner.invoke(app, ["rules", "explain", "1.2.3.4.5", "--config", str(_config(tmp_path))])
    assert res.exit_code == 1
    assert "cannot explain 1.2.3.4.5" in res.output


def test_explain_stored_series_uid(tmp_path: Path) -> None:
    index_mod = pytest.importorskip("dicom_node.index", reason="the series index is not there")
    cfg = _config(tmp_path)
    files = write_series(
        synthetic_series(4, rows=8, cols=8, description="LOCALIZER"), tmp_path / "spool" / "a"
    )
    index = index_mod.SeriesIndex(tmp_path / "node.db")
    records = []
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        records.append(
            index_mod.InstanceRecord(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                study_instance_uid=ds.StudyInstanceUID,
                path=p,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                size_bytes=p.stat().st_size,
                received_at=time.time(),
                modality="MR",
                expected_count=len(files),
                calling_ae="SCANNER",
                called_ae="OMNI_BRAIN",
                peer_host="127.0.0.1",
            )
        )
    outcome = index.record(records)
    index.close()
    assert outcome.completed, "the index did not complete the series"
    uid = records[0].series_instance_uid
    res = runner.invoke(app, ["rules", "explain", uid, "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["series_instance_uid"] == uid and out["discarded"] is True
    assert out["fired"] == []
    assert out["rules"][0]["fired"] and out["rules"][0]["action"] == "discard"
    assert out["rules"][1]["trace"]["children"][0]["values"] == ["OMNI_BRAIN"]
    res = runner.invoke(app, ["rules", "explain", uid, "--config", str(cfg), "--revision", "7"])
    assert res.exit_code == 1 and "no completed revision 7" in res.output


def test_check_prints_warnings(tmp_path: Path) -> None:
    res = runner.invoke(app, ["rules", "check", "--config", str(_config(tmp_path))])
    assert res.exit_code == 0
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: rules.2: no destinations: results stay on the node",
        "warning: rules.3: no destinations: results stay on the node",
        "warning: rules.4: no destinations: results stay on the node",
    ]
