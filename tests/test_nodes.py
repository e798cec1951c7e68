"""The nodes table: registration, heartbeat, stop, and the jobs each node holds."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import parse_config
from dicom_node.db import node_name
from dicom_node.nodes import ALIVE_WITHIN_S, NodeRegistry, list_nodes


def test_register_list_and_stop(tmp_path: Path, db_target: str | Path) -> None:
    settings = parse_config({"storage": {"path": "spool", "database": str(db_target)},
                             "node": {"ae_title": "NODE_A", "port": 11199}}, tmp_path)
    registry = NodeRegistry(settings)
    registry.start()
    try:
        [row] = list_nodes(db_target)
        assert row["name"] == node_name() and row["alive"] and row["jobs"] == []
        assert (row["ae_title"], row["port"]) == ("NODE_A", 11199)
        assert not list_nodes(db_target, now=time.time() + ALIVE_WITHIN_S + 1)[0]["alive"]
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"storage:\n  path: spool\n  database: {db_target}\n")
        out = CliRunner().invoke(app, ["nodes", "--json", "-c", str(cfg)])
        assert out.exit_code == 0, out.output
        assert [n["name"] for n in json.loads(out.output)] == [node_name()]
    finally:
        registry.stop()
    [row] = list_nodes(db_target)
    assert not row["alive"] and row["stopped_at"] is not None


def test_scrape_time_metrics_read_either_back_end(tmp_path: Path, db_target: str | Path) -> None:
    from dicom_node import metrics
    from dicom_node.index import SeriesIndex

    settings = parse_config({"storage": {"path": "spool", "database": str(db_target)}},
                            tmp_path)
    index = SeriesIndex(settings.storage.database_path)
    assert metrics.job_counts(db_target) == {}
    assert metrics.routing_failed_count(db_target) == 0
    index.conn.execute("INSERT INTO series_events (series_instance_uid, revision, completed_at,"
                       " reason, failed_at, failure) VALUES ('1.2', 1, 1.0, 'quiet', 2.0, 'x')")
    assert metrics.routing_failed_count(db_target) == 1
    index.close()
