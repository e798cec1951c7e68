"""``omnimri-node ask`` and ``POST /api/v1/series/{uid}/ask`` on a stored series.

A real index with a stored brain series (the MNI152 template, 2 mm, 24 slices), the shipped
package's vision model and text encoder on ONNX Runtime, the real audit file.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dicom_node.admin import create_app
from dicom_node.admin.ask import ask_series
from dicom_node.admin.backend.errors import AdminError
from dicom_node.audit import read_audit
from dicom_node.config import NodeSettings, load_config
from dicom_node.index import InstanceRecord, SeriesIndex
from inference.omnimri.language.facts import SeriesFacts
from omnimri_samples import brain_series, write_series

REPO = Path(__file__).resolve().parents[1]
VIEWER = "viewer-token-0123456789"
PATIENT_NAME = "OMNIMRI^PHANTOM"


def _index(settings: NodeSettings) -> str:
    datasets = brain_series(resolution_mm=2, slices=24)  # patient OMNIMRI^PHANTOM
    files = write_series(datasets, settings.storage.path / "incoming")
    index = SeriesIndex(settings.storage.database_path)
    index.record([
        InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID), path=p,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            size_bytes=p.stat().st_size, received_at=time.time() - 60, modality="MR",
            series_description="T1", instance_number=int(ds.InstanceNumber),
            calling_ae="SCANNER1", called_ae="OMNIMRI", peer_host="127.0.0.1",
        ) for ds, p in zip(datasets, files, strict=True)])
    assert index.complete_quiet(10.0)
    index.close()
    return str(datasets[0].SeriesInstanceUID)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeSettings, Path, str]]:
    from inference.package import ModelPackage

    if "language" not in ModelPackage.load(REPO / "models" / "omnimri-tiny").spec.extra:
        pytest.skip("models/omnimri-tiny has no extra.language: run 'omnimri-node train "
                    "language'")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"path": "spool", "fsync": False}, "audit": {"path": "audit.jsonl"},
        "models": {"path": str(REPO / "models")},
        "admin": {"enabled": True, "tokens": [{"id": "ward", "token": VIEWER,
                                               "role": "viewer"}]},
        "pipelines": {"brain": {"model": "omnimri-tiny",
                                "instructions": ["look for lesions and write a report"]}},
    }))
    settings = load_config(cfg)
    settings.storage.path.mkdir(parents=True)
    yield settings, cfg, _index(settings)


def _asks(settings: NodeSettings) -> list[dict[str, Any]]:
    assert settings.audit.path is not None
    return [r for r in read_audit(settings.audit.path, event="admin_action")
            if r.get("action") == "ask"]


def test_ask_runs_once_then_reuses_the_findings(node: tuple[NodeSettings, Path, str]) -> None:
    settings, _, uid = node
    first = ask_series(settings, uid, "How many lesions are there?", token_id="t1")
    assert (first["question_type"], first["refused"], first["from_cache"]) == (
        "count", False, False)
    cached = list((settings.storage.path.parent / "language").glob(f"{uid}.r*.json"))
    assert len(cached) == 1
    facts = SeriesFacts.from_dict(json.loads(cached[0].read_text()))
    assert first["value"] == len(facts.lesions)
    assert set(facts.tissue_ml) == {"brain", "csf", "grey matter", "white matter"}
    vol = ask_series(settings, uid, "what is the total brain volume?", token_id="t1")
    assert vol["from_cache"] and vol["question_type"] == "volume"
    assert vol["value"] == round(facts.tissue_ml["brain"])
    assert f"{round(facts.tissue_ml['brain'])} ml" in vol["answer"]
    refused = ask_series(settings, uid, "what is the patient's name?", token_id="t1")
    assert refused["refused"] and refused["value"] is None
    with pytest.raises(AdminError) as err:
        ask_series(settings, "1.2.3.4", "is there a mass?", token_id="t1")
    assert err.value.status == 404
    lines = _asks(settings)
    assert [(r["question_type"], r["refused"], r["token_id"]) for r in lines] == [
        ("count", False, "t1"), ("volume", False, "t1"), ("refuse", True, "t1"),
        ("presence", False, "t1")][:len(lines)]
    text = Path(str(settings.audit.path)).read_text()
    assert "question" not in json.dumps([{k: v for k, v in r.items() if k != "question_type"}
                                         for r in lines])
    assert PATIENT_NAME not in text and "patient's name" not in text


def test_ask_over_http_for_viewers(node: tuple[NodeSettings, Path, str]) -> None:
    settings, cfg, uid = node
    app = create_app(settings, config_path=cfg)
    with TestClient(app) as client:
        path = f"/api/v1/series/{uid}/ask"
        assert client.post(path, json={"question": "is there a mass?"}).status_code == 401
        r = client.post(path, json={"question": "is there a mass?"},
                        headers={"Authorization": f"Bearer {VIEWER}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["question_type"] == "presence" and isinstance(body["value"], bool)
        r = client.post("/api/v1/series/9.9.9/ask", json={"question": "is there a mass?"},
                        headers={"Authorization": f"Bearer {VIEWER}"})
        assert r.status_code == 404
        assert "/api/v1/series/{series_uid}/ask" in client.get("/openapi.json").json()["paths"]
    app.state.backend.close()
    assert _asks(settings)[0]["token_id"] == "ward"


def test_ask_command(node: tuple[NodeSettings, Path, str]) -> None:
    from dicom_node.cli import app

    _, cfg, uid = node
    runner = CliRunner()
    r = runner.invoke(app, ["ask", uid, "which side is the largest lesion on?", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith(".")
    r = runner.invoke(app, ["ask", uid, "segment the liver", "-c", str(cfg), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["refused"] is True


def test_the_served_report_is_natural_and_agrees_with_the_findings(
        node: tuple[NodeSettings, Path, str]) -> None:
    from inference.omnimri.language.facts import verify_text
    from inference.omnimri.tasks import run_omnimri
    from inference.package import ModelPackage
    from inference.volume import build_volume

    settings, _, uid = node
    assert settings.pipelines["brain"].instructions == ["detect abnormalities",
                                                        "write the report"]
    index = SeriesIndex(settings.storage.database_path)
    volume = build_volume([i.path for i in index.instances_of(uid)])
    index.close()
    folder = settings.storage.path.parent / "omnimri-tiny"
    shutil.copytree(REPO / "models" / "omnimri-tiny", folder)
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec["extra"]["language"]["reports"] = "natural"
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    package = ModelPackage.load(folder)
    res = run_omnimri(package, volume, ["segment brain tissues", "detect abnormalities",
                                        "write the report"])
    assert res.report is not None
    text = f"{res.report.findings} {res.report.impression}"
    assert text[0].isupper() and " ml" in res.report.findings and ":" not in text[:12]
    assert verify_text(text, SeriesFacts.from_results(res, volume.affine)) == [], text
