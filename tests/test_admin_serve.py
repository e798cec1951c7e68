"""``omnimri-node serve`` with ``admin.enabled``: the admin API runs beside the listener."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from dicom_node.samples import synthetic_series, write_series
from tests.fixtures.net import free_port, wait_for_port
from tests.fixtures.node import NodeProcess, store_files

TOKEN = "serve-admin-token-0123456789"


def test_serve_runs_the_admin_api_with_the_node(
    node_factory: Callable[..., NodeProcess], tmp_path: Any
) -> None:
    admin_port = free_port()
    node = node_factory(admin={"enabled": True, "host": "127.0.0.1", "port": admin_port,
                               "tokens": [{"id": "ops", "token": TOKEN, "role": "admin"}]})
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
