"""Prometheus metrics: counters, histograms and the scrape-time jobs/disk collector."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node import metrics
from dicom_node.config import parse_config


@pytest.fixture(autouse=True)
def _unbind() -> Iterator[None]:
    yield
    metrics.NODE_STATE.bind(None, None)


def test_instance_and_bytes_counters() -> None:
    n0 = metrics.sample("omnimri_instances_received_total")
    b0 = metrics.sample("omnimri_received_bytes_total")
    metrics.record_instance(1000)
    metrics.record_instance(24)
    assert metrics.sample("omnimri_instances_received_total") == n0 + 2
    assert metrics.sample("omnimri_received_bytes_total") == b0 + 1024


def test_associations_by_result_and_active_gauge() -> None:
    a0 = metrics.sample("omnimri_associations_total", {"result": "rejected"})
    metrics.record_association("rejected")
    metrics.record_association("not-a-result")  # ignored with a warning, never raises
    assert metrics.sample("omnimri_associations_total", {"result": "rejected"}) == a0 + 1
    assert metrics.sample("omnimri_associations_total", {"result": "not-a-result"}) == 0
    g0 = metrics.sample("omnimri_associations_active")
    metrics.association_started()
    assert metrics.sample("omnimri_associations_active") == g0 + 1
    metrics.association_ended()
    assert metrics.sample("omnimri_associations_active") == g0


def test_stage_histogram_and_timer() -> None:
    lbl = {"stage": "inference"}
    c0 = metrics.sample("omnimri_stage_duration_seconds_count", lbl)
    s0 = metrics.sample("omnimri_stage_duration_seconds_sum", lbl)
    metrics.observe_stage("inference", 1.5)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError), metrics.time_stage("inference"):
        raise RuntimeError("timed even when failing")
    outer_s = time.perf_counter() - t0  # the timed block lies inside this interval
    assert metrics.sample("omnimri_stage_duration_seconds_count", lbl) == c0 + 2
    assert 1.5 <= metrics.sample("omnimri_stage_duration_seconds_sum", lbl) - s0 <= 1.5 + outer_s
    le2 = metrics.sample("omnimri_stage_duration_seconds_bucket", {**lbl, "le": "2.5"})
    assert le2 >= 2
    metrics.observe_stage("nonsense", 1.0)
    assert metrics.sample("omnimri_stage_duration_seconds_count", {"stage": "nonsense"}) == 0


def test_collected_stages_give_one_sample_each() -> None:
    """A pipeline's parts of a stage (build + write) add up into one sample per stage."""
    lbl = {"stage": "export"}
    c0 = metrics.sample("omnimri_stage_duration_seconds_count", lbl)
    s0 = metrics.sample("omnimri_stage_duration_seconds_sum", lbl)
    with metrics.collect_stages() as acc:
        metrics.observe_stage("export", 0.25)
        metrics.observe_stage("export", 0.5)
        metrics.observe_stage("volume", 0.125)
    assert acc == {"export": 0.75, "volume": 0.125}
    assert metrics.sample("omnimri_stage_duration_seconds_count", lbl) == c0  # not yet
    metrics.observe_stages(acc)
    assert metrics.sample("omnimri_stage_duration_seconds_count", lbl) == c0 + 1
    assert metrics.sample("omnimri_stage_duration_seconds_sum", lbl) - s0 == pytest.approx(0.75)
    metrics.observe_stage("export", 1.0)  # outside the block: observed at once
    assert metrics.sample("omnimri_stage_duration_seconds_count", lbl) == c0 + 2


def test_series_and_dispatch_failures() -> None:
    s0 = metrics.sample("omnimri_series_completed_total", {"reason": "expected_count"})
    metrics.record_series_completed("expected_count")
    assert metrics.sample("omnimri_series_completed_total",
                          {"reason": "expected_count"}) == s0 + 1
    metrics.record_dispatch_failure("pacs")
    metrics.record_dispatch_failure("pacs")
    assert metrics.sample("omnimri_dispatch_failures_total", {"destination": "pacs"}) >= 2


def _settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return parse_config({"storage": {"path": "spool"}}, tmp_path)


def test_jobs_and_disk_read_on_scrape(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    metrics.bind_node(settings)
    # No database yet: no job samples, disk usage of the nearest existing parent.
    assert metrics.job_counts(settings.storage.database_path) == {}
    free = metrics.sample("omnimri_spool_disk_bytes", {"kind": "free"})
    assert free > 0
    conn = sqlite3.connect(settings.storage.database_path)
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, pipeline TEXT, state TEXT)")
    conn.executemany("INSERT INTO jobs (pipeline, state) VALUES (?, ?)",
                     [("brain", "queued"), ("brain", "queued"), ("brain", "done"),
                      ("preview", "failed")])
    conn.commit()
    conn.close()
    assert metrics.sample("omnimri_jobs", {"state": "queued", "pipeline": "brain"}) == 2
    assert metrics.sample("omnimri_jobs", {"state": "failed", "pipeline": "preview"}) == 1
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"omnimri_jobs", "omnimri_spool_disk_bytes", "omnimri_stage_duration_seconds",
            "omnimri_associations", "omnimri_instances_received"} <= names


def test_jobs_table_with_status_column_and_unbound(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT)")
    conn.execute("INSERT INTO jobs (status) VALUES ('running')")
    conn.commit()
    conn.close()
    assert metrics.job_counts(db) == {("running", ""): 1}
    assert metrics.job_counts(None) == {}
    assert metrics.spool_disk_usage(None) is None
    metrics.NODE_STATE.bind(None, None)
    assert metrics.sample("omnimri_jobs", {"state": "running", "pipeline": ""}) == 0
