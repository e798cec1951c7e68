"""Issue #17 item 3 through a real node: one series that cannot be routed does not stop routing.

A series is received, then (before its quiet period ends) its stored files are corrupted so that
reading their headers raises (VR ``ZZ`` on SliceThickness: what validation at the door now
refuses, but what bit rot or a case the door misses would leave in the spool). The series goes
to the failed state with its reason (``series show``, the admin API, the metric); a good series
sent after it gets its job at once, and again after a restart, with no "routing failed" loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from omnimri_samples import synthetic_series, write_series
from tests.fixtures.node import NodeProcess, store_files
from tests.fixtures.wait import wait_until

ADMIN = "admin-token-0123456789ab"


def _sections(admin_port: int) -> dict[str, Any]:
    return {
        "completion": {"quiet_seconds": 6.0, "poll_interval_s": 0.1},
        "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        "destinations": {"archive": {"kind": "folder", "path": "var/results-out"}},
        "rules": [{"name": "all-mr", "when": "SliceThickness > 0", "pipelines": ["preview"],
                   "destinations": ["archive"]}],
        "admin": {"enabled": True, "port": admin_port,
                  "tokens": [{"id": "ops", "token": ADMIN, "role": "admin"}]},
        "storage": {"fsync": False},
    }


def _series(tmp: Path, k: int) -> tuple[str, list[Path]]:
    ds = synthetic_series(3, 16, 16, seed=100 + k, series_number=k, description=f"S{k}")
    return str(ds[0].SeriesInstanceUID), write_series(ds, tmp / f"s{k}")


def _poison(path: Path) -> bool:
    data = path.read_bytes()
    tag = b"\x18\x00\x50\x00DS"
    if data.count(tag) != 1:
        return False
    path.write_bytes(data.replace(tag, b"\x18\x00\x50\x00ZZ"))
    return True


def _wait(pred: Any, timeout_s: float, what: str) -> Any:
    return wait_until(pred, timeout_s, interval_s=0.1, message=what)


def _jobs_for(node: NodeProcess, series_uid: str) -> list[Any]:
    from dicom_node.config import load_config
    from dicom_node.jobs import JobQueue

    queue = JobQueue(load_config(node.config))
    try:
        return [j for j in queue.list_jobs() if j.series_uid == series_uid]
    finally:
        queue.close()


def _series_show(node: NodeProcess, uid: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", "from dicom_node.cli import main; main()",
                          "series", "show", uid, "--config", str(node.config)],
                         capture_output=True, text=True, timeout=60, cwd=node.root, check=True)
    return dict(json.loads(out.stdout))


@pytest.mark.slow
def test_a_poisoned_series_fails_visibly_and_the_next_gets_its_job(
        node_factory: Any, tmp_path: Path) -> None:
    from tests.fixtures.net import free_port

    admin_port = free_port()
    node: NodeProcess = node_factory(start=False, **_sections(admin_port))
    node.start(timeout_s=90)  # a loaded machine can take more than the default 30 s
    bad, bad_files = _series(tmp_path, 1)
    assert store_files(node.port, bad_files) == [0, 0, 0]
    index = node.index()
    stored = _wait(lambda: (lambda rows: rows if len(rows) == 3
                            and all(i.path.exists() for i in rows) else None)(
        index.instances_of(bad)), 4.0, "bad series stored")
    assert all(_poison(i.path) for i in stored), "could not poison the stored files in time"
    good, good_files = _series(tmp_path, 2)
    assert store_files(node.port, good_files) == [0, 0, 0]
    # The good series gets its job although the bad one completed first.
    _wait(lambda: _jobs_for(node, good), 30, "a job for the good series")
    info = _wait(lambda: (lambda s: s if s and s["state"] == "failed" else None)(
        index.get_series(bad)), 10, "the bad series failed")
    assert info["failure"].startswith("NotImplementedError"), info["failure"]
    assert _jobs_for(node, bad) == []
    shown = _series_show(node, bad)
    assert shown["state"] == "failed" and shown["events"][0]["failure"] == info["failure"]
    r = httpx.get(f"http://127.0.0.1:{admin_port}/api/v1/series/{bad}",
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "failed"
    metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics",
                        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).text
    assert "omnimri_series_routing_failed 1.0" in metrics
    assert 'omnimri_stage_failures_total{stage="routing"} 1.0' in metrics
    # Across a restart: not retried in a loop, the next series is routed at once.
    node.stop()
    node.start(timeout_s=90)
    later, later_files = _series(tmp_path, 3)
    assert store_files(node.port, later_files) == [0, 0, 0]
    _wait(lambda: _jobs_for(node, later), 30, "a job for the series after the restart")
    assert len(node.events("completion event cannot be routed; marked failed")) == 1
    assert not node.events("routing failed; retrying at the next poll")
    assert node.index().get_series(bad)["state"] == "failed"
