"""End to end with real processes: ``omnimri-node serve`` + Debian's Orthanc as the PACS.

* A series sent to the node comes back to Orthanc as one preview SC.
* PACS outage: Orthanc is down while the jobs dispatch and comes back ~30 s later; every
  preview arrives exactly once.
* kill -9: the node is SIGKILLed while jobs run and while they dispatch, then restarted; every
  job finishes and Orthanc holds each preview exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.pipelines.preview import SERIES_DESCRIPTION, preview_uids
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.node import NodeProcess, store_files
from tests.fixtures.orthanc import OrthancServer
from tests.fixtures.wait import wait_until as shared_wait_until

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
OUTAGE_S = 30.0
"""How long the PACS stays down in the outage test, seconds (the issue asks for ~30 s)."""


def node_sections(orthanc: OrthancServer, destinations: list[str], **jobs: Any) -> dict[str, Any]:
    return {
        "jobs": {"workers": 2, "max_attempts": 30, "backoff_initial_s": 1, "backoff_max_s": 5,
                 "poll_interval_s": 0.1, **jobs},
        "destinations": {
            "pacs": {"kind": "dimse", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                     "port": orthanc.dicom_port, "timeout_s": 5},
            "pacs_rest": {"kind": "orthanc", "url": orthanc.url, "timeout_s": 5},
            "pacs_web": {"kind": "dicomweb", "url": orthanc.dicomweb_url, "timeout_s": 5},
        },
        "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        "rules": [{"name": "mr-preview", "when": 'Modality == "MR"', "pipelines": ["preview"],
                   "destinations": destinations}],
        "storage": {"fsync": True},
    }


def make_series(tmp: Path, count: int, slices: int = 6, size: int = 64) -> list[list[Path]]:
    study = None
    out = []
    for k in range(count):
        ds = synthetic_series(slices, size, size, seed=k, series_number=k + 1, study_uid=study,
                              description=f"T1 {k}")
        study = ds[0].StudyInstanceUID
        out.append(write_series(ds, tmp / f"series{k}"))
    return out


def jobs_of(node: NodeProcess) -> list[dict[str, Any]]:
    if not node.db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT id, state, attempts, last_error, series_uid FROM jobs")]
    except sqlite3.OperationalError:
        return []  # table not created yet
    finally:
        conn.close()


def deliveries_of(node: NodeProcess) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True, timeout=5)
    try:
        return [tuple(r) for r in conn.execute(
            "SELECT job_id, sop_instance_uid, destination FROM deliveries")]
    finally:
        conn.close()


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, step: float = 0.1) -> Any:
    return shared_wait_until(pred, timeout_s, interval_s=step, message=what)


def all_done(node: NodeProcess, n: int) -> bool:
    jobs = jobs_of(node)
    return len(jobs) == n and all(j["state"] == "done" for j in jobs)


def assert_previews_once(orthanc: OrthancServer, node: NodeProcess, n_series: int) -> None:
    jobs = jobs_of(node)
    assert len(jobs) == n_series and {j["state"] for j in jobs} == {"done"}, jobs
    expected = sorted(preview_uids(j["id"])[1] for j in jobs)
    found = orthanc.sop_uids(SOPClassUID=SC_CLASS)
    assert found == expected  # each output exactly once (sorted list keeps duplicates)
    for uid in expected:
        assert orthanc.instance_tags(uid)["SeriesDescription"] == SERIES_DESCRIPTION


@pytest.mark.slow
def test_series_to_preview_in_orthanc(orthanc: OrthancServer, node_factory: Any,
                                      tmp_path: Path) -> None:
    """Orthanc C-STOREs a series to the node; the preview goes back to the sender (resolved
    by its calling AE) and by REST and STOW-RS as well."""
    node = node_factory(**node_sections(orthanc, ["sender", "pacs_rest", "pacs_web"]))
    [files] = make_series(tmp_path, 1)
    for f in files:
        orthanc.upload(f)
    orthanc.set_node(node.ae_title, node.port)
    orthanc.send_study(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_until(lambda: all_done(node, 1), 30, "job done")
    assert_previews_once(orthanc, node, 1)
    assert orthanc.count_instances() == len(files) + 1  # the source series and one preview
    # Delivered once per destination kind (the same UID, so Orthanc holds one instance).
    assert sorted(d[2] for d in deliveries_of(node)) == ["pacs", "pacs_rest", "pacs_web"]
    # The audit trail says what was decided, produced and delivered (UIDs, no patient data).
    audit = [json.loads(line) for line in (node.root / "var" / "audit.jsonl").read_text()
             .splitlines()]
    [decision] = [a for a in audit if a["event"] == "rule_decision"]
    assert decision["matched"] == ["mr-preview"] and decision["pipelines"] == ["preview"]
    [produced] = [a for a in audit if a["event"] == "output_produced"]
    assert produced["kind"] == "sc"
    delivered = [a for a in audit if a["event"] == "delivery"]
    assert sorted(a["destination"] for a in delivered) == ["pacs", "pacs_rest", "pacs_web"]
    assert all(a["status"] == "ok" and a["sop_instance_uids"] == [produced["sop_instance_uid"]]
               for a in delivered)


@pytest.mark.slow
def test_pacs_outage_every_result_arrives_once(orthanc: OrthancServer, node_factory: Any,
                                               tmp_path: Path) -> None:
    n = 3
    node = node_factory(**node_sections(orthanc, ["pacs", "pacs_rest"]))
    series = make_series(tmp_path, n)
    orthanc.stop()
    down_at = time.monotonic()
    for files in series:
        assert store_files(node.port, files) == [0] * len(files)
    # Every job has tried to dispatch at least twice while the PACS is down.
    wait_until(lambda: len(jobs_of(node)) == n
               and all(j["attempts"] >= 2 and j["state"] != "done" for j in jobs_of(node)),
               OUTAGE_S, "failed dispatch attempts")
    errors = {j["last_error"] for j in jobs_of(node)}
    assert all("pacs" in e for e in errors), errors
    time.sleep(max(OUTAGE_S - (time.monotonic() - down_at), 0))
    orthanc.start()
    wait_until(lambda: all_done(node, n), 30, "all jobs done after the outage")
    assert_previews_once(orthanc, node, n)
    assert sorted(d[2] for d in deliveries_of(node)) == ["pacs"] * n + ["pacs_rest"] * n
    assert not node.events("job failed (dead letter)")


@pytest.mark.slow
def test_kill9_while_dispatching_and_running(orthanc: OrthancServer, node_factory: Any,
                                             tmp_path: Path) -> None:
    """kill -9 (1) while a job dispatches to a hung PACS (Orthanc SIGSTOPped: the C-STORE bytes
    sit in its socket buffer and may be stored when it wakes, after the node died without
    recording the delivery), (2) while a job runs its pipeline."""
    n = 4
    node = node_factory(**node_sections(orthanc, ["pacs", "pacs_rest"], workers=1))
    series = make_series(tmp_path, n, slices=24, size=256)
    orthanc.pause()
    try:
        for files in series:
            assert store_files(node.port, files) == [0] * len(files)

        def jobs_in(state: str) -> dict[str, str]:
            jobs = {j["id"]: j["state"] for j in jobs_of(node)}
            return jobs if state in jobs.values() else {}

        # (1) The first job hangs in dispatching (the PACS does not answer); the rest wait.
        at_kill = [wait_until(lambda: jobs_in("dispatching"), 30, "a job dispatching")]
        node.kill9()
        # (2) After restart the hung job times out (5 s), the worker takes the next: kill it
        # while its pipeline runs.
        node.restart()
        at_kill.append(wait_until(lambda: jobs_in("running"), 30, "a job running",
                                  step=0.002))
        node.kill9()
    finally:
        orthanc.resume()
    print("job states at each kill -9:", at_kill)
    assert "done" not in at_kill[0].values() and "done" not in at_kill[1].values()
    node.restart()
    wait_until(lambda: all_done(node, n), 60, "all jobs done after kill -9")
    assert_previews_once(orthanc, node, n)
    deliveries = deliveries_of(node)
    assert len(deliveries) == len(set(deliveries)) == 2 * n
    assert len(node.events("jobs of a dead worker released")) == 2


LONG_OUTAGE_S = 30.0
"""The scaled "2-hour" outage, seconds: half the retry window below (2 h of a 4 h window)."""


@pytest.mark.slow
def test_long_outage_scaled_every_result_arrives_once(orthanc: OrthancServer, node_factory: Any,
                                                      tmp_path: Path) -> None:
    """Issue #17 item 8 with shortened settings: a PACS outage of half the retry window
    (jobs.dispatch_retry_for_s 60 s, like 2 h of the default 4 h), max_attempts 2 (deliveries do
    not use it up), a backoff grown to 30 s by the time the PACS is back: the destination probe
    (every 1 s) retries at once, every preview arrives exactly once, nothing is dead-lettered."""
    n = 3
    node = node_factory(start=False, **node_sections(
        orthanc, ["pacs", "pacs_rest"], max_attempts=2, backoff_initial_s=2, backoff_max_s=30,
        dispatch_retry_for_s=60, probe_interval_s=1))
    node.start(timeout_s=90)  # a loaded machine can take more than the default 30 s
    series = make_series(tmp_path, n)
    orthanc.stop()
    down_at = time.monotonic()
    for files in series:
        assert store_files(node.port, files) == [0] * len(files)

    def delivery_attempts() -> list[int]:
        conn = sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return [int(r[0]) for r in conn.execute("SELECT dispatch_attempts FROM jobs")]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    wait_until(lambda: len(jobs_of(node)) == n and min(delivery_attempts() or [0]) >= 3,
               LONG_OUTAGE_S, "three failed deliveries per job while the PACS is down")
    time.sleep(max(LONG_OUTAGE_S - (time.monotonic() - down_at), 0))
    assert {j["state"] for j in jobs_of(node)} <= {"queued", "dispatching"}
    attempts_during = delivery_attempts()
    orthanc.start()
    back_at = time.monotonic()
    wait_until(lambda: all_done(node, n), 30, "all jobs done after the long outage")
    resumed_s = time.monotonic() - back_at
    print(f"outage {time.monotonic() - down_at - resumed_s:.0f} s (window 60 s); failed"
          f" deliveries per job {attempts_during}; all delivered {resumed_s:.1f} s after"
          " the PACS came back")
    assert resumed_s < 15  # the probe, not the 30 s backoff
    assert_previews_once(orthanc, node, n)
    assert sorted(d[2] for d in deliveries_of(node)) == ["pacs"] * n + ["pacs_rest"] * n
    assert not node.events("job failed (dead letter)")
    assert node.events("destination answers again; waiting jobs retried now")
