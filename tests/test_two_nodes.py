"""Two ``omnimri-node serve`` processes on one PostgreSQL behave as one node (issue #14).

Real processes, a real PostgreSQL (tests/fixtures/postgres.py) and Debian's Orthanc as the
PACS. Each node has its own spool folder here (both on this machine's disk, so every path the
database holds is readable by both): the fast receiver keeps its journal and partial
receptions in ``<spool>/.journal`` and ``<spool>/incoming``, which are per process, so two
nodes must not share one spool folder until those move to a per-node place (see
``docs/database.md``). What is shared, and tested, is all the state in the database:

* a series whose instances arrive at both nodes (two associations) completes once, with all
  its instances, and gives one job;
* the node holding a job is killed with -9 while it dispatches; the other node takes the job
  (the dead owner is noticed within ``ORPHAN_CHECK_S``) and finishes it;
* Orthanc holds every output exactly once, and each (output, destination) is delivered once;
* both processes are listed in ``nodes`` (``omnimri-node nodes``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicom_node.db import connect
from dicom_node.nodes import list_nodes
from dicom_node.pipelines.preview import preview_uids
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.node import NodeProcess, store_files
from tests.fixtures.orthanc import OrthancServer
from tests.fixtures.wait import wait_until

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
QUIET_S = 4.0
"""Quiet period, seconds: longer than the gap between the two nodes' parts of a series."""


def sections(orthanc: OrthancServer, url: str) -> dict[str, Any]:
    return {
        "storage": {"database": url, "fsync": True},
        "completion": {"quiet_seconds": QUIET_S, "poll_interval_s": 0.1},
        "jobs": {"workers": 1, "max_attempts": 30, "backoff_initial_s": 1, "backoff_max_s": 3,
                 "poll_interval_s": 0.1},
        "destinations": {
            "pacs": {"kind": "dimse", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                     "port": orthanc.dicom_port, "timeout_s": 5},
            "pacs_rest": {"kind": "orthanc", "url": orthanc.url, "timeout_s": 5},
        },
        "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        "rules": [{"name": "mr-preview", "when": 'Modality == "MR"', "pipelines": ["preview"],
                   "destinations": ["pacs", "pacs_rest"]}],
    }


def query(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    conn = connect(url)
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def series_files(tmp: Path, k: int, slices: int = 6) -> list[Path]:
    ds = synthetic_series(slices, 64, 64, seed=k, series_number=k + 1, description=f"T1 {k}")
    return write_series(ds, tmp / f"series{k}")


@pytest.fixture
def two_nodes(node_factory: Callable[..., NodeProcess], orthanc: OrthancServer,
              postgres_url: str) -> tuple[NodeProcess, NodeProcess, str]:
    a = node_factory(name="a", **sections(orthanc, postgres_url))
    b = node_factory(name="b", **sections(orthanc, postgres_url))
    return a, b, postgres_url


@pytest.mark.slow
def test_split_series_completes_once_and_kill9_is_finished_by_the_other(
        two_nodes: tuple[NodeProcess, NodeProcess, str], orthanc: OrthancServer,
        tmp_path: Path) -> None:
    a, b, url = two_nodes
    # -- a series split across the two nodes ------------------------------------------------
    files = series_files(tmp_path, 0)
    assert store_files(a.port, files[:3]) == [0, 0, 0]
    assert store_files(b.port, files[3:]) == [0, 0, 0]
    assert store_files(b.port, files[:1]) == [0]  # a duplicate at the other node: stored once

    def one_job_done() -> list[Any]:
        rows = query(url, "SELECT id, state FROM jobs")
        return rows if len(rows) == 1 and rows[0][1] == "done" else []

    [(job_id, _)] = wait_until(one_job_done, 60, interval_s=0.2,
                               message="the split series' job done")
    events = query(url, "SELECT revision, instance_count, completed_by FROM series_events")
    assert len(events) == 1, events
    revision, count, completed_by = events[0]
    assert (revision, count) == (1, 6)
    pids = {a.proc.pid, b.proc.pid}  # type: ignore[union-attr]
    assert int(str(completed_by).split(":")[1]) in pids
    assert int(query(url, "SELECT COUNT(*) FROM instances")[0][0]) == 6
    assert orthanc.sop_uids(SOPClassUID=SC_CLASS) == [preview_uids(job_id)[1]]

    # -- kill -9 of the node holding a job while it dispatches to a hung PACS -------------------
    more = [series_files(tmp_path, k) for k in (1, 2)]
    orthanc.pause()
    try:
        assert store_files(a.port, more[0]) == [0] * len(more[0])
        assert store_files(b.port, more[1]) == [0] * len(more[1])

        def dispatching() -> list[Any]:
            return query(url, "SELECT id, lease_owner FROM jobs WHERE state = 'dispatching'")

        [(held, owner)] = wait_until(dispatching, 60, interval_s=0.05,
                                     message="a job dispatching")[:1]
        victim, survivor = (a, b) if int(owner.split(":")[1]) == a.proc.pid else (b, a)  # type: ignore[union-attr]
        victim.kill9()
        killed_at = time.monotonic()
    finally:
        orthanc.resume()

    def all_done() -> list[Any]:
        rows = query(url, "SELECT id, state, lease_owner FROM jobs")
        return rows if len(rows) == 3 and {r[1] for r in rows} == {"done"} else []

    jobs = wait_until(all_done, 90, interval_s=0.2, message="all jobs done after kill -9")
    print(f"job {held} of the killed node finished by the other after "
          f"{time.monotonic() - killed_at:.1f} s")
    assert survivor.events("jobs of a dead worker released")
    [after] = query(url, "SELECT attempts FROM jobs WHERE id = ?", (held,))
    assert int(after[0]) >= 2  # claimed again by the survivor
    # -- every output exactly once ---------------------------------------------------------------
    expected = sorted(preview_uids(j[0])[1] for j in jobs)
    assert orthanc.sop_uids(SOPClassUID=SC_CLASS) == expected
    deliveries = [tuple(r) for r in query(
        url, "SELECT job_id, sop_instance_uid, destination FROM deliveries")]
    assert len(deliveries) == len(set(deliveries)) == 2 * 3
    assert int(query(url, "SELECT COUNT(*) FROM series_events")[0][0]) == 3
    # -- omnimri-node nodes: both registered; the survivor alive, the victim never stopped -------
    nodes = {int(n["pid"]): n for n in list_nodes(url)}
    assert set(nodes) == pids
    assert nodes[survivor.proc.pid]["alive"]  # type: ignore[union-attr]
    assert nodes[victim.proc.pid]["stopped_at"] is None  # type: ignore[union-attr]
