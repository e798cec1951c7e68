"""The admin HTTP API over a real index, job queue, rules engine and audit file."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from starlette import testclient

from dicom_node.admin import AdminServer, create_app
from dicom_node.audit import read_audit
from dicom_node.config import NodeSettings, load_config
from dicom_node.index import InstanceRecord, SeriesIndex
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.net import free_port, wait_for_port

VIEWER = "viewer-token-0123456789"
ADMIN = "admin-token-0123456789ab"
PATIENT_NAME = "OMNIMRI^PHANTOM"
PATIENT_ID = "OMNI-0001"


def _config(tmp_path: Path, dead_port: int) -> dict[str, Any]:
    return {
        "node": {"ae_title": "OMNIMRI", "port": free_port()},
        "storage": {"path": "spool", "fsync": False},
        "audit": {"path": "audit.jsonl"},
        "admin": {"enabled": True, "tokens": [
            {"id": "ward-viewer", "token": VIEWER, "role": "viewer"},
            {"id": "ops", "token": ADMIN, "role": "admin"},
        ]},
        "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        "destinations": {
            "archive": {"kind": "folder", "path": "results"},
            "pacs": {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                     "port": dead_port, "timeout_s": 3},
            "web": {"kind": "dicomweb", "url": "http://127.0.0.1:9/dicom-web",
                    "username": "u", "password": "s3cret-password"},
        },
        "rules": [{"name": "mr-preview", "when": 'Modality == "MR"', "pipelines": ["preview"],
                   "destinations": ["archive"]}],
    }


@dataclass
class Env:
    settings: NodeSettings
    config_path: Path
    client: TestClient
    series_uid: str
    files: list[Path]
    tmp: Path

    def get(self, path: str, token: str | None = VIEWER, **kw: Any) -> testclient.httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.get(path, headers=headers, **kw)

    def send(self, method: str, path: str, token: str | None = ADMIN,
             **kw: Any) -> testclient.httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.request(method, path, headers=headers, **kw)

    def audit(self, event: str = "admin_action") -> list[dict[str, Any]]:
        assert self.settings.audit.path is not None
        return list(read_audit(self.settings.audit.path, event=event))


def _index_series(settings: NodeSettings, n: int = 6, datasets: list[Any] | None = None
                  ) -> tuple[str, list[Path]]:
    datasets = datasets or synthetic_series(n, rows=64, cols=64, seed=3)
    folder = settings.storage.path / "incoming"
    files = write_series(datasets, folder)
    index = SeriesIndex(settings.storage.database_path)
    now = time.time()
    index.record([
        InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID), path=p,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            size_bytes=p.stat().st_size, received_at=now - 60, modality="MR",
            series_description=str(ds.SeriesDescription),
            instance_number=int(ds.InstanceNumber), calling_ae="SCANNER1",
            called_ae="OMNIMRI", peer_host="127.0.0.1",
        ) for ds, p in zip(datasets, files, strict=True)
    ])
    assert index.complete_quiet(10.0)
    index.close()
    return str(datasets[0].SeriesInstanceUID), files


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, free_port())))
    settings = load_config(cfg)
    settings.storage.path.mkdir(parents=True)
    uid, files = _index_series(settings)
    app = create_app(settings, config_path=cfg)
    with TestClient(app) as client:
        yield Env(settings, cfg, client, uid, files, tmp_path)
    app.state.backend.close()


# ---- health and authentication ----------------------------------------------------------


def test_health_needs_no_token(env: Env) -> None:
    assert env.get("/healthz", token=None).json() == {"status": "ok"}
    r = env.get("/readyz", token=None)
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "spool": "ok"}


def test_readiness_reports_the_failing_check(tmp_path: Path) -> None:
    settings = load_config(_write_cfg(tmp_path))
    app = create_app(settings, ready_check=lambda: (False, "listener not started"))
    with TestClient(app) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["spool"].startswith("not a writable folder")
    assert r.json()["checks"]["listener"] == "listener not started"
    app.state.backend.close()


def _write_cfg(tmp_path: Path, **over: Any) -> Path:
    data = _config(tmp_path, free_port())
    data.update(over)
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/series", "/api/v1/jobs",
                                  "/api/v1/rules", "/api/v1/destinations", "/metrics"])
def test_reads_need_a_known_token(env: Env, path: str) -> None:
    assert env.get(path, token=None).status_code == 401
    r = env.get(path, token="x" * 20)
    assert r.status_code == 401 and r.json()["detail"] == "unknown token"
    assert env.get(path, token=VIEWER).status_code == 200


def test_viewer_cannot_change_anything(env: Env) -> None:
    calls = [("POST", f"/api/v1/series/{env.series_uid}/rerun", {"pipeline": "preview"}),
             ("POST", "/api/v1/jobs/abc/retry", None), ("POST", "/api/v1/jobs/abc/cancel", None),
             ("PUT", "/api/v1/rules", {"yaml": "[]"}),
             ("POST", "/api/v1/destinations/archive/test", None)]
    for method, path, body in calls:
        r = env.send(method, path, token=VIEWER, json=body)
        assert r.status_code == 403, (path, r.text)
    assert env.audit() == []


def test_cookie_authenticates_reads_only(env: Env) -> None:
    env.client.cookies.set("omnimri_token", ADMIN)
    try:
        assert env.client.get("/api/v1/whoami").json() == {"token_id": "ops", "role": "admin"}
        r = env.client.post(f"/api/v1/series/{env.series_uid}/rerun", json={"pipeline": "preview"})
        assert r.status_code == 401
    finally:
        env.client.cookies.clear()


def test_no_tokens_configured_refuses_everything_but_health(tmp_path: Path) -> None:
    data = _config(tmp_path, free_port())
    data["admin"]["tokens"] = []
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    app = create_app(load_config(p))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/api/v1/status", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 401 and "no admin tokens" in r.json()["detail"]
    app.state.backend.close()


# ---- status, series ---------------------------------------------------------------------


def test_status(env: Env) -> None:
    st = env.get("/api/v1/status").json()
    assert st["ae_title"] == "OMNIMRI"
    assert st["queue"]["depth"] == 0
    assert st["disk"]["free_bytes"] > 0
    assert set(st["associations"]) >= {"active", "accepted", "rejected"}


def test_series_list_show_and_thumbnail(env: Env) -> None:
    rows = env.get("/api/v1/series").json()
    assert [r["series_instance_uid"] for r in rows] == [env.series_uid]
    assert rows[0]["instance_count"] == 6 and rows[0]["state"] == "complete"
    one = env.get(f"/api/v1/series/{env.series_uid}").json()
    assert one["events"][0]["reason"] == "quiet" and one["jobs"] == []
    assert env.get("/api/v1/series/1.2.3.4").status_code == 404
    r = env.get(f"/api/v1/series/{env.series_uid}/thumbnail.png?size=48")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(__import__("io").BytesIO(r.content))
    assert max(img.size) == 48 and img.mode == "L"
    assert np.asarray(img).std() > 5  # a picture, not a blank square


def test_rerun_enqueues_a_job_and_audits_it(env: Env) -> None:
    r = env.send("POST", f"/api/v1/series/{env.series_uid}/rerun", json={"pipeline": "preview"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "queued" and job["pipeline"] == "preview"
    assert job["destinations"] == "archive" and job["rule"] == "admin:ops"
    again = env.send("POST", f"/api/v1/series/{env.series_uid}/rerun",
                     json={"pipeline": "preview"})
    assert again.status_code == 409
    bad = env.send("POST", f"/api/v1/series/{env.series_uid}/rerun", json={"pipeline": "nope"})
    assert bad.status_code == 404 and "no pipeline" in bad.json()["detail"]
    acts = env.audit()
    assert [(a["action"], a["status"], a["token_id"]) for a in acts] == [
        ("series_rerun", "ok", "ops"), ("series_rerun", "refused", "ops")]
    assert acts[0]["job_id"] == job["id"] and acts[0]["target"] == env.series_uid
    assert env.get(f"/api/v1/series/{env.series_uid}").json()["jobs"][0]["id"] == job["id"]
    assert env.get("/api/v1/status").json()["queue"]["depth"] == 1


def test_jobs_list_show_cancel_retry(env: Env) -> None:
    job = env.send("POST", f"/api/v1/series/{env.series_uid}/rerun",
                   json={"pipeline": "preview"}).json()
    jid = job["id"]
    assert [j["id"] for j in env.get("/api/v1/jobs?state=queued").json()] == [jid]
    assert env.get("/api/v1/jobs?state=bogus").status_code == 422
    shown = env.get(f"/api/v1/jobs/{jid}").json()
    assert shown["instances"] == 6 and shown["outputs"] == [] and shown["deliveries"] == []
    assert env.send("POST", f"/api/v1/jobs/{jid}/retry").status_code == 409  # queued
    r = env.send("POST", f"/api/v1/jobs/{jid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert env.send("POST", f"/api/v1/jobs/{jid}/cancel").status_code == 409
    r = env.send("POST", f"/api/v1/jobs/{jid}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued"
    assert env.send("POST", "/api/v1/jobs/nope/cancel").status_code == 404
    actions = [(a["action"], a["status"]) for a in env.audit()]
    assert actions == [("series_rerun", "ok"), ("job_retry", "refused"), ("job_cancel", "ok"),
                       ("job_cancel", "refused"), ("job_retry", "ok")]


# ---- rules ------------------------------------------------------------------------------


def test_current_rules(env: Env) -> None:
    cur = env.get("/api/v1/rules").json()
    assert cur["rules"][0]["name"] == "mr-preview"
    assert yaml.safe_load(cur["yaml"])[0]["when"] == 'Modality == "MR"'
    assert cur["pipelines"] == ["preview"]


def test_validate_reports_key_paths(env: Env) -> None:
    ok = env.send("POST", "/api/v1/rules/validate", token=VIEWER,
                  json={"yaml": "- name: a\n  when: 'Modality == \"MR\"'\n  pipelines: [preview]"})
    assert ok.status_code == 200 and ok.json() == {"valid": True, "rules": ["a"]}
    syntax = env.send("POST", "/api/v1/rules/validate", token=VIEWER, json={"rules": [
        {"name": "a", "when": "Modality ==", "pipelines": ["preview"]}]})
    assert syntax.status_code == 422
    assert syntax.json()["problems"][0]["key"].startswith("rules.0")
    ref = env.send("POST", "/api/v1/rules/validate", token=VIEWER, json={"rules": [
        {"name": "a", "pipelines": ["missing"]}]})
    assert ref.status_code == 422
    assert ref.json()["problems"] == [{"key": "rules.0.pipelines",
                                       "reason": "unknown pipeline 'missing'"}]
    not_yaml = env.send("POST", "/api/v1/rules/validate", token=VIEWER, json={"yaml": "- [a"})
    assert not_yaml.status_code == 422 and "not valid YAML" in not_yaml.json()["detail"]


DRAFT = """
- name: by-patient
  when: 'PatientID matches "^OMNI-" and Modality == "MR"'
  pipelines: [preview]
  destinations: [archive]
- name: ct-only
  when: 'Modality == "CT"'
  pipelines: [preview]
"""


def test_rule_test_against_stored_series_matches_rules_explain(env: Env) -> None:
    from dicom_node.index import SeriesIndex
    from dicom_node.rules import RuleSet, attributes_for_series

    r = env.send("POST", "/api/v1/rules/test", token=ADMIN,
                 json={"yaml": DRAFT, "series_uid": env.series_uid})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["decision"]["fired"] == ["by-patient"]
    assert [x["matched"] for x in out["decision"]["rules"]] == [True, False]
    # The same explanation as `rules explain SERIES_UID` computes.
    index = SeriesIndex(env.settings.storage.database_path)
    series = index.load_series(env.series_uid, 1)
    rules = env.client.app.state.backend.rules.parse_draft(DRAFT).rules  # type: ignore[attr-defined]
    expected = RuleSet(rules).evaluate(attributes_for_series(series))
    index.close()
    assert out["text"] == expected.to_text()
    assert PATIENT_ID in out["text"]  # the admin sees the values the rule read


def test_rule_test_hides_patient_values_from_viewers(env: Env) -> None:
    r = env.send("POST", "/api/v1/rules/test", token=VIEWER,
                 json={"yaml": DRAFT, "series_uid": env.series_uid})
    assert r.status_code == 200, r.text
    body = r.text
    assert PATIENT_ID not in body and PATIENT_NAME not in body
    assert r.json()["decision"]["fired"] == ["by-patient"]
    assert "<hidden>" in r.json()["text"]


def test_rule_test_against_uploaded_file(env: Env) -> None:
    b64 = base64.b64encode(env.files[0].read_bytes()).decode()
    r = env.send("POST", "/api/v1/rules/test", token=VIEWER,
                 json={"yaml": DRAFT, "dicom_base64": b64})
    assert r.status_code == 200, r.text
    assert r.json()["decision"]["fired"] == ["by-patient"]
    assert r.json()["decision"]["source"] == "uploaded file"
    junk = env.send("POST", "/api/v1/rules/test", token=VIEWER,
                    json={"yaml": DRAFT, "dicom_base64": base64.b64encode(b"nope").decode()})
    assert junk.status_code == 422 and "not readable DICOM" in junk.json()["detail"]
    both = env.send("POST", "/api/v1/rules/test", token=VIEWER, json={"yaml": DRAFT})
    assert both.status_code == 422


def test_apply_rules_rewrites_config_and_notifies(env: Env) -> None:
    seen: list[list[str]] = []
    env.client.app.state.backend.rules_hooks.append(  # type: ignore[attr-defined]
        lambda s: seen.append([r.name for r in s.rules]))
    bad = env.send("PUT", "/api/v1/rules", json={"yaml": "- name: x\n  pipelines: [nope]"})
    assert bad.status_code == 422
    before = env.config_path.read_text()
    r = env.send("PUT", "/api/v1/rules", json={"yaml": DRAFT})
    assert r.status_code == 200, r.text
    assert r.json()["applied"] == ["by-patient", "ct-only"] and r.json()["persisted"]
    reloaded = load_config(env.config_path)
    assert [x.name for x in reloaded.rules] == ["by-patient", "ct-only"]
    assert reloaded.destinations["web"].password == "s3cret-password"  # type: ignore[union-attr]
    assert env.config_path.with_name("config.yaml.bak").read_text() == before
    assert seen == [["by-patient", "ct-only"]]
    assert [x["name"] for x in env.get("/api/v1/rules").json()["rules"]] == [
        "by-patient", "ct-only"]
    acts = [(a["action"], a["status"]) for a in env.audit()]
    assert acts == [("rules_apply", "invalid"), ("rules_apply", "ok")]


# ---- destinations -----------------------------------------------------------------------


def test_destinations_never_show_secrets(env: Env) -> None:
    r = env.get("/api/v1/destinations")
    assert "s3cret-password" not in r.text
    by_name = {d["name"]: d for d in r.json()}
    assert by_name["web"]["auth"] == "basic"
    assert by_name["pacs"]["target"].startswith("PACS@127.0.0.1:")


def test_destination_tests(env: Env) -> None:
    ok = env.send("POST", "/api/v1/destinations/archive/test").json()
    assert ok["ok"] is True and "writable" in ok["detail"]
    dead = env.send("POST", "/api/v1/destinations/pacs/test").json()
    assert dead["ok"] is False and "pacs" in dead["detail"]
    assert env.send("POST", "/api/v1/destinations/nope/test").status_code == 404
    assert [(a["target"], a["status"]) for a in env.audit()] == [
        ("archive", "ok"), ("pacs", "failed")]


@pytest.mark.skipif(not Path("/usr/bin/storescp").exists(), reason="Debian dcmtk not installed")
def test_destination_test_c_echo_to_dcmtk(env: Env) -> None:
    port = env.settings.destinations["pacs"].port  # type: ignore[union-attr]
    proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout_s=5)
        res = env.send("POST", "/api/v1/destinations/pacs/test").json()
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    assert res["ok"] is True, res
    assert res["detail"].startswith("C-ECHO to PACS@127.0.0.1")


# ---- metrics, OpenAPI, audit, PHI sweep -------------------------------------------------


def test_metrics_endpoint(env: Env) -> None:
    r = env.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "omnimri_stage_duration_seconds_bucket" in r.text
    assert "omnimri_spool_disk_bytes" in r.text


def test_openapi_spec_lists_every_route(env: Env) -> None:
    spec = env.get("/openapi.json", token=None).json()
    paths = set(spec["paths"])
    assert {"/healthz", "/readyz", "/metrics", "/api/v1/status", "/api/v1/series",
            "/api/v1/series/{series_uid}/rerun", "/api/v1/series/{series_uid}/reroute",
            "/api/v1/jobs/{job_id}/retry",
            "/api/v1/jobs/{job_id}/cancel", "/api/v1/rules", "/api/v1/rules/validate",
            "/api/v1/rules/test", "/api/v1/destinations/{name}/test"} <= paths
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_audit_endpoint_is_admin_only(env: Env) -> None:
    env.send("POST", "/api/v1/destinations/archive/test")
    assert env.get("/api/v1/audit", token=VIEWER).status_code == 403
    recs = env.get("/api/v1/audit?event=admin_action", token=ADMIN).json()
    assert recs[-1]["action"] == "destination_test"


def test_viewer_never_receives_patient_names_or_ids(env: Env) -> None:
    env.send("POST", f"/api/v1/series/{env.series_uid}/rerun", json={"pipeline": "preview"})
    jid = env.get("/api/v1/jobs").json()[0]["id"]
    paths = ["/api/v1/status", "/api/v1/series", f"/api/v1/series/{env.series_uid}",
             "/api/v1/jobs", f"/api/v1/jobs/{jid}", "/api/v1/rules", "/api/v1/destinations",
             "/metrics", "/console", "/console/series", f"/console/series/{env.series_uid}",
             "/console/rules", "/console/destinations"]
    env.client.cookies.set("omnimri_token", VIEWER)
    try:
        for p in paths:
            r = env.get(p)
            assert r.status_code == 200, p
            for secret in (PATIENT_NAME, PATIENT_ID, "PHANTOM"):
                assert secret not in r.text, (p, secret)
    finally:
        env.client.cookies.clear()


# ---- the server in a thread -------------------------------------------------------------


def test_admin_server_serves_on_its_port_and_stops(tmp_path: Path) -> None:
    settings = load_config(_write_cfg(tmp_path))
    port = free_port()
    server = AdminServer(settings, host="127.0.0.1", port=port)
    server.start()
    try:
        r = httpx.get(f"{server.url}/api/v1/whoami",
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
        assert r.json()["role"] == "admin"
        assert json.loads(httpx.get(f"{server.url}/healthz", timeout=5).text)["status"] == "ok"
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_admin_server_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    settings = load_config(_write_cfg(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        server = AdminServer(settings, host="127.0.0.1", port=s.getsockname()[1])
        with pytest.raises(RuntimeError, match="admin API did not start"):
            server.start()


# ---- request-body limits (issue #17 item 7) ---------------------------------------------

LIMIT = 1024 * 1024


def _limited_server(tmp_path: Path) -> AdminServer:
    cfg = _config(tmp_path, free_port())
    cfg["admin"]["max_body_bytes"] = LIMIT
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    settings = load_config(path)
    server = AdminServer(settings, host="127.0.0.1", port=free_port())
    server.start()
    return server


def _read_response(sock: Any, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_declared_body_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    """A 200 MB Content-Length from a viewer token: 413 at once, nothing read."""
    import socket

    server = _limited_server(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            t0 = time.monotonic()
            s.sendall(b"POST /api/v1/rules/test HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer " + VIEWER.encode() + b"\r\n"
                      b"Content-Type: application/json\r\n"
                      b"Content-Length: 200000000\r\n\r\n" + b"{" * 1000)
            head = _read_response(s, 10)
            elapsed = time.monotonic() - t0
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        assert b"admin.max_body_bytes" in head or b"close" in head.lower()
        assert elapsed < 5
        # Under the limit the same endpoint still answers (422: not a valid draft).
        r = httpx.post(f"{server.url}/api/v1/rules/test", json={"yaml": "x" * 1000},
                       headers={"Authorization": f"Bearer {VIEWER}"}, timeout=10)
        assert r.status_code in (200, 422), r.text
    finally:
        server.stop()


def test_streamed_body_over_the_limit_is_cut_off(tmp_path: Path) -> None:
    """A chunked body without a length: 413 once it passes the limit; the rest is not read."""
    import socket

    server = _limited_server(tmp_path)
    sent = 0
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"POST /api/v1/rules/test HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer " + VIEWER.encode() + b"\r\n"
                      b"Content-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"a" * 65536
            try:
                while sent < 200 * LIMIT:  # up to 200 MiB, unless the server stops us
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
            except OSError:  # the server answered and closed the connection
                pass
            head = _read_response(s, 10)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        assert sent < 20 * LIMIT, sent  # cut off near the limit, not after 200 MiB
    finally:
        server.stop()


def test_max_body_bytes_is_configurable_and_documented() -> None:
    from dicom_node.config import AdminConfig

    assert AdminConfig().max_body_bytes == 8 * 1024**2
    shipped = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    assert shipped["admin"]["max_body_bytes"] == AdminConfig().max_body_bytes


def test_failed_series_shows_and_reroutes(env: Env) -> None:
    """A completion the router could not route: state failed with its reason; an admin
    makes it pending again (viewers cannot); the console shows the failure."""
    index = SeriesIndex(env.settings.storage.database_path)
    [event] = index.events(env.series_uid)
    index.mark_failed(event.event_id, "NotImplementedError: Unknown Value Representation")
    shown = env.get(f"/api/v1/series/{env.series_uid}").json()
    assert shown["state"] == "failed" and shown["failure"].startswith("NotImplementedError")
    assert [s["state"] for s in env.get("/api/v1/series").json()] == ["failed"]
    env.client.cookies.set("omnimri_token", ADMIN)
    page = env.client.get(f"/console/series/{env.series_uid}")
    env.client.cookies.clear()
    assert page.status_code == 200 and "NotImplementedError" in page.text
    assert env.send("POST", f"/api/v1/series/{env.series_uid}/reroute",
                    token=VIEWER).status_code == 403
    r = env.send("POST", f"/api/v1/series/{env.series_uid}/reroute")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "complete" and r.json()["failure"] is None
    assert [e.event_id for e in index.pending_events()] == [event.event_id]
    again = env.send("POST", f"/api/v1/series/{env.series_uid}/reroute")
    assert again.status_code == 409
    assert env.send("POST", "/api/v1/series/9.9.9/reroute").status_code == 404
    actions = [a for a in env.audit() if a["action"] == "series_reroute"]
    assert [a["status"] for a in actions] == ["ok", "refused"]
