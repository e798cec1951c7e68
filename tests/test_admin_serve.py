"""``omnimri-node serve`` with ``admin.enabled``: the admin API runs beside the listener."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from omnimri_samples import synthetic_series, write_series
from tests.fixtures.net import free_port, wait_for_port
from tests.fixtures.node import NodeProcess, store_files

TOKEN = "serve-admin-token-0123456789"


def test_serve_runs_the_admin_api_with_the_node(
    node_factory: Callable[..., NodeProcess], tmp_path: Any
) -> None:
    admin_port = free_port()
    node = node_factory(
        admin={"enabled": True, "host": "127.0.0.1", "port": admin_port,
               "tokens": [{"id": "ops", "token": TOKEN, "role": "admin"}]},
        pipelines={"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        destinations={"archive": {"kind": "folder", "path": "var/results"}},
    )
    wait_for_port(admin_port, timeout_s=20)
    base = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ready = httpx.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["listener"] == f"listening on port {node.port}"

    files = write_series(synthetic_series(4, rows=48, cols=48, seed=7), tmp_path / "s")
    assert store_files(node.port, files) == [0, 0, 0, 0]
    deadline = time.monotonic() + 20
    while True:
        rows = httpx.get(f"{base}/api/v1/series", headers=auth, timeout=5).json()
        if rows and rows[0]["state"] == "complete":
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    assert rows[0]["instance_count"] == 4 and rows[0]["calling_ae"] == "PYNETDICOM"
    png = httpx.get(f"{base}/api/v1/series/{rows[0]['series_instance_uid']}/thumbnail.png",
                    headers=auth, timeout=10)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    status = httpx.get(f"{base}/api/v1/status", headers=auth, timeout=5).json()
    assert status["dicom_port"] == node.port
    assert httpx.get(f"{base}/console/login", timeout=5).status_code == 200

    # No rules yet: the series made no job. Apply a rule through the API: the running router
    # uses it for the next series, and config.yaml now holds it.
    assert httpx.get(f"{base}/api/v1/jobs", headers=auth, timeout=5).json() == []
    draft = ('- name: mr-preview\n  when: \'Modality == "MR"\'\n  pipelines: [preview]\n'
             '  destinations: [archive]\n')
    r = httpx.put(f"{base}/api/v1/rules", headers=auth, json={"yaml": draft}, timeout=10)
    assert r.status_code == 200 and r.json()["persisted"], r.text
    assert "mr-preview" in node.config.read_text()
    files2 = write_series(synthetic_series(4, rows=48, cols=48, seed=8), tmp_path / "s2")
    assert store_files(node.port, files2) == [0, 0, 0, 0]
    deadline = time.monotonic() + 30
    while True:
        jobs = httpx.get(f"{base}/api/v1/jobs", headers=auth, timeout=5).json()
        if jobs and jobs[0]["state"] == "done":
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)
    assert jobs[0]["rule"] == "mr-preview" and len(jobs) == 1
    audit = [line for line in (node.root / "var" / "audit.jsonl").read_text().splitlines()
             if '"admin_action"' in line]
    assert len(audit) == 1 and '"token_id":"ops"' in audit[0]
