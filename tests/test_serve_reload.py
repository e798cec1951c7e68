"""A running node reloads config.yaml on change and on SIGHUP; a bad file is refused."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import yaml

from omnimri_samples import synthetic_series, write_series
from tests.fixtures.node import store_files
from tests.fixtures.wait import wait_until


def _rules(path: Path, rules: list[dict[str, Any]]) -> None:
    data = yaml.safe_load(path.read_text())
    data["rules"] = rules
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_reload_on_change_and_sighup_and_refusal(node_factory: Any, tmp_path: Path) -> None:
    out = tmp_path / "results"
    node = node_factory(
        destinations={"out": {"kind": "folder", "path": str(out)}},
        pipelines={"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        rules=[{"name": "ct-only", "when": 'Modality == "CT"', "pipelines": ["preview"],
                "destinations": ["out"]}],
    )
    # A file change with a new rule is applied without a restart.
    _rules(node.config, [{"name": "mr", "when": 'Modality == "MR"', "pipelines": ["preview"],
                          "destinations": ["out"]}])
    ev = node.wait_for_event("config_applied", timeout_s=20)[-1]
    assert ev["rules"] == 1 and ev["needs_restart"] == []
    files = write_series(synthetic_series(3, 32, 32), tmp_path / "series")
    store_files(node.port, files)
    done = wait_until(lambda: list(out.rglob("*.dcm")), 30, message="no preview output")
    assert len(done) == 1, "the reloaded MR rule routed the series to the preview pipeline"

    # An invalid file is refused with its key path; the node keeps running on the old rules.
    good = node.config.read_text()
    node.config.write_text(good.replace("pipelines:\n", "pipelines:\n  x: 1\n", 1))
    refused = node.wait_for_event("config_reload_refused", timeout_s=20)[-1]
    assert "pipelines.x" in json.dumps(refused)
    assert node.proc is not None and node.proc.poll() is None

    # The good file again (without its rule) is applied; then SIGHUP re-reads the file too.
    node.config.write_text(good)
    _rules(node.config, [])
    node.wait_for_event("config_applied", timeout_s=20, count=2)
    before = len(node.events("config_reload_unchanged"))
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for_event("config_reload_unchanged", timeout_s=20, count=before + 1)
    assert node.proc.poll() is None
