"""Schema migrations (dicom_node.migrations) on both back ends: numbered, recorded, in place."""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_node.config import parse_config
from dicom_node.db import connect, table_columns
from dicom_node.index import SeriesIndex
from dicom_node.jobs import JobQueue
from dicom_node.migrations import LATEST, MIGRATIONS, applied, migrate
from tests.fixtures import legacy_schema as legacy
from tests.fixtures.legacy_schema import make_legacy_db


def test_versions_are_numbered_from_one() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1))
    assert LATEST >= 3


def test_previous_schema_gains_the_new_column_and_keeps_its_rows(db_target: str | Path) -> None:
    """A database at migration 2 (the schema before ``nodes``) is upgraded at open."""
    conn = connect(db_target)
    assert migrate(conn, upto=2) == [1, 2]
    assert "completed_by" not in table_columns(conn, "series_events")
    assert not table_columns(conn, "nodes")
    conn.execute("INSERT INTO series (series_instance_uid, study_instance_uid, state,"
                 " instance_count, first_received_at, last_received_at, completed_at)"
                 " VALUES ('1.2.3', '1.2', 'complete', 1, 1.5, 1.5, 2.5)")
    conn.execute("INSERT INTO series_events (series_instance_uid, revision, completed_at,"
                 " reason, instance_count) VALUES ('1.2.3', 1, 2.5, 'quiet', 1)")
    conn.close()

    index = SeriesIndex(db_target)
    assert "completed_by" in table_columns(index.conn, "series_events")
    assert {"name", "heartbeat_at"} <= table_columns(index.conn, "nodes")
    assert applied(index.conn) == list(range(1, LATEST + 1))
    [event] = index.pending_events()
    assert (event.series_instance_uid, event.revision, event.reason) == ("1.2.3", 1, "quiet")
    assert event.completed_at.timestamp() == 2.5  # DOUBLE PRECISION on PostgreSQL, not REAL
    assert migrate(index.conn) == []  # recorded: nothing applied twice


def test_nodes_opening_together_apply_each_migration_once(db_target: str | Path) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            c = connect(db_target)
            results.append(migrate(c))
            c.close()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v for r in results for v in r) == list(range(1, LATEST + 1))
    c = connect(db_target)
    n = c.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0]
    assert int(n) == LATEST


def test_database_made_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    """SQLite made by the release before migrations: tables without the later columns."""
    db = tmp_path / "node.db"
    make_legacy_db(db, legacy.SERIES_EVENTS, legacy.EVENT_ROW, legacy.JOBS, legacy.JOB_ROW)
    settings = parse_config({"storage": {"path": "spool", "database": str(db)}}, tmp_path)
    queue = JobQueue(settings)
    assert {"dispatch_failing_since", "dispatch_attempts", "waiting_for"} <= table_columns(
        queue.conn, "jobs")
    assert queue.get("abcdef").dispatch_attempts == 0
    index = SeriesIndex(db)
    assert {"failed_at", "failure", "completed_by"} <= table_columns(index.conn, "series_events")
    assert [e.series_instance_uid for e in index.pending_events()] == ["1.2.3"]
    assert applied(index.conn) == list(range(1, LATEST + 1))
