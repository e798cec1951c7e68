"""A full series run through ``serve`` shows up in /metrics and in the audit trail."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from omnimri_samples import synthetic_series, write_series
from tests.fixtures.net import free_port, wait_for_port
from tests.fixtures.node import NodeProcess, store_files
from tests.fixtures.wait import wait_until

TOKEN = "observability-token-0123456789"


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_series_run_metrics_and_audit(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    admin_port = free_port()
    node = node_factory(
        node={"allowed_callers": [{"ae_title": "PYNETDICOM", "host": "127.0.0.1"}]},
        admin={"enabled": True, "host": "127.0.0.1", "port": admin_port,
               "tokens": [{"id": "ops", "token": TOKEN, "role": "viewer"}]},
        pipelines={"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        destinations={"archive": {"kind": "folder", "path": "var/results"}},
        rules=[{"name": "all", "when": "true", "pipelines": ["preview"],
                "destinations": ["archive"]}],
    )
    wait_for_port(admin_port, timeout_s=20)
    files = write_series(synthetic_series(5, rows=32, cols=32, seed=3), tmp_path / "s")
    assert store_files(node.port, files) == [0] * 5
    # An unknown caller is rejected (and audited).
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="OMNIMRI")
    assert assoc.is_rejected

    auth = {"Authorization": f"Bearer {TOKEN}"}

    def dispatched() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", headers=auth, timeout=5).text
        done = re.search(r'^omnimri_stage_duration_seconds_count\{stage="dispatch"\} (\S+)$',
                         text, re.M)
        return text if done and float(done.group(1)) >= 1 else None

    text = wait_until(dispatched, 30, interval_s=0.2, message="the preview job was not dispatched")
    assert _metric(text, "omnimri_instances_received_total") == 5
    assert _metric(text, "omnimri_associations_total", '{result="accepted"}') >= 1
    assert _metric(text, "omnimri_associations_total", '{result="rejected"}') == 1
    assert _metric(text, "omnimri_series_completed_total", '{reason="quiet"}') == 1
    # One sample per stage the preview job went through; it runs no model, so no inference.
    for stage in ("completion_wait", "volume", "export", "dispatch"):
        assert _metric(text, "omnimri_stage_duration_seconds_count", f'{{stage="{stage}"}}') == 1
    assert _metric(text, "omnimri_stage_duration_seconds_count", '{stage="inference"}') == 0

    audit = [json.loads(line) for line in (node.root / "var" / "audit.jsonl").read_text()
             .splitlines()]
    kinds = {a["event"] for a in audit}
    assert {"association_accepted", "association_rejected", "series_received",
            "rule_decision", "output_produced", "delivery"} <= kinds, kinds
    rejected = [a for a in audit if a["event"] == "association_rejected"]
    assert rejected[0]["calling_ae"] == "STRANGER"
    received = [a for a in audit if a["event"] == "series_received"]
    assert received[0]["instances"] == 5
    assert "OMNIMRI^PHANTOM" not in json.dumps(audit)
