"""``omnimri-node jobs …`` and ``omnimri-node destinations …`` (typer's runner, real Orthanc)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import load_config
from dicom_node.jobs import JobQueue, NewJob
from tests.fixtures.net import free_port
from tests.fixtures.orthanc import OrthancServer
from tests.test_jobs_queue import make_series

runner = CliRunner()


def write_config(tmp: Path, orthanc: OrthancServer | None = None) -> Path:
    port = orthanc.dicom_port if orthanc else free_port()
    data: dict[str, Any] = {
        "storage": {"path": "spool"},
        "pipelines": {"preview": {"kind": "preview", "model": None}},
        "destinations": {
            "pacs": {"kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port,
                     "timeout_s": 3},
            "down": {"kind": "dimse", "ae_title": "X", "host": "127.0.0.1",
                     "port": free_port(), "timeout_s": 2},
            "archive": {"kind": "folder", "path": "out"},
        },
    }
    if orthanc:
        data["destinations"]["rest"] = {"kind": "orthanc", "url": orthanc.url}
        data["destinations"]["web"] = {"kind": "dicomweb", "url": orthanc.dicomweb_url}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_jobs_list_show_retry_cancel(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    queue = JobQueue(load_config(cfg))
    a = queue.enqueue(NewJob(make_series("1.2.9.1"), "preview", ("archive",), priority="urgent"))[0]
    b = queue.enqueue(NewJob(make_series("1.2.9.2"), "preview", ("pacs",)))[0]
    queue.claim()  # a (urgent) is running
    queue.fail(a, "PACS refused: 0xA700", permanent=True)

    r = invoke("jobs", "list", "-c", str(cfg))
    assert r.exit_code == 0 and a in r.stdout and b in r.stdout and "failed" in r.stdout
    r = invoke("jobs", "list", "-c", str(cfg), "--state", "failed", "--json")
    rows = json.loads(r.stdout)
    assert [x["id"] for x in rows] == [a] and rows[0]["last_error"] == "PACS refused: 0xA700"
    assert invoke("jobs", "list", "-c", str(cfg), "--state", "bogus").exit_code == 2

    r = invoke("jobs", "show", a[:8], "-c", str(cfg))
    info = json.loads(r.stdout)
    assert info["id"] == a and info["destinations"] == ["archive"] and info["outputs"] == []
    assert invoke("jobs", "show", "0000000000", "-c", str(cfg)).exit_code == 1

    r = invoke("jobs", "retry", a, "-c", str(cfg))
    assert r.exit_code == 0 and "queued again" in r.stdout
    assert queue.get(a).state == "queued" and queue.get(a).attempts == 0
    r = invoke("jobs", "retry", b, "-c", str(cfg))
    assert r.exit_code == 1 and "retry works on" in r.stderr

    assert invoke("jobs", "cancel", b, "-c", str(cfg)).exit_code == 0
    assert queue.get(b).state == "cancelled"
    r = invoke("jobs", "cancel", b, "-c", str(cfg))
    assert r.exit_code == 1 and "already cancelled" in r.stderr


def test_destinations_list_and_test(tmp_path: Path, orthanc: OrthancServer) -> None:
    cfg = write_config(tmp_path, orthanc)
    r = invoke("destinations", "list", "-c", str(cfg), "--json")
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["pacs"] == {"name": "pacs", "kind": "dimse",
                            "target": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"}
    assert rows["rest"]["target"] == orthanc.url and rows["archive"]["kind"] == "folder"
    for name, words in (("pacs", "C-ECHO"), ("rest", "Orthanc"), ("web", "QIDO-RS"),
                        ("archive", "writable")):
        r = invoke("destinations", "test", name, "-c", str(cfg))
        assert r.exit_code == 0, r.stdout
        assert r.stdout.startswith(f"OK {name}:") and words in r.stdout
    r = invoke("destinations", "test", "down", "-c", str(cfg))
    assert r.exit_code == 1 and r.stdout.startswith("FAILED down:")
    r = invoke("destinations", "test", "nope", "-c", str(cfg))
    assert r.exit_code == 2 and "known: archive, down, pacs, rest, web" in r.stderr


@pytest.mark.parametrize("state", ["queued", "done"])
def test_jobs_list_empty_state(tmp_path: Path, state: str) -> None:
    r = invoke("jobs", "list", "-c", str(write_config(tmp_path)), "--state", state)
    assert r.exit_code == 0 and "(none)" in r.stdout
