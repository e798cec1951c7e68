"""Numbered schema migrations of the node database, for SQLite and PostgreSQL.

Each migration is applied once, in order, at open (:func:`migrate`, called by
:class:`~dicom_node.index.SeriesIndex` and :class:`~dicom_node.jobs.JobQueue`), and recorded
in the table ``schema_migrations (version, name, applied_at)`` of the same database, in the
same transaction as its changes. Writers are serialised while migrating (SQLite
``BEGIN IMMEDIATE``; PostgreSQL a transaction-scoped advisory lock), so nodes starting
together on one PostgreSQL apply each step once.

1. ``baseline``: the tables of the first release (``CREATE TABLE IF NOT EXISTS``, so a
   database made before migrations existed keeps its tables and rows).
2. ``failure-and-delivery-columns``: ``series_events.failed_at/failure``,
   ``jobs.dispatch_failing_since/dispatch_attempts/waiting_for`` (added only where missing:
   the code before migrations ALTERed them in itself) and the ``jobs_by_series`` index.
3. ``nodes``: ``series_events.completed_by`` (the node that completed a revision) and the
   ``nodes`` table (one row per node process sharing the database, with its heartbeat).

Why not alembic: it would bring SQLAlchemy into the node's runtime for a handful of
``CREATE``/``ALTER`` statements; this table is what alembic's ``alembic_version`` is.
A new migration is appended to :data:`MIGRATIONS`; it is never edited once released.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_node.db import PgConnection, table_columns

_BASELINE = """
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    modality            TEXT NOT NULL DEFAULT '',
    series_description  TEXT NOT NULL DEFAULT '',
    revision            INTEGER NOT NULL DEFAULT 1,
    state               TEXT NOT NULL DEFAULT 'receiving',
    instance_count      INTEGER NOT NULL DEFAULT 0,
    expected_count      INTEGER,
    first_received_at   {REAL} NOT NULL,
    last_received_at    {REAL} NOT NULL,
    completed_at        {REAL},
    calling_ae          TEXT NOT NULL DEFAULT '',
    called_ae           TEXT NOT NULL DEFAULT '',
    peer_host           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_by_state ON series(state, last_received_at);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study_instance_uid);
CREATE TABLE IF NOT EXISTS instances (
    {ROWID}
    sop_instance_uid    TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path                TEXT NOT NULL,
    size_bytes          BIGINT NOT NULL,
    received_at         {REAL} NOT NULL,
    revision            INTEGER NOT NULL,
    instance_number     INTEGER,
    number_of_frames    INTEGER NOT NULL DEFAULT 1,
    calling_ae          TEXT NOT NULL DEFAULT '',
    called_ae           TEXT NOT NULL DEFAULT '',
    peer_host           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS series_events (
    id                  {ID},
    series_instance_uid TEXT NOT NULL,
    revision            INTEGER NOT NULL,
    completed_at        {REAL} NOT NULL,
    reason              TEXT NOT NULL,
    routed_at           {REAL},
    instance_count      INTEGER NOT NULL DEFAULT 0,
    UNIQUE (series_instance_uid, revision)
);
CREATE INDEX IF NOT EXISTS series_events_unrouted ON series_events(id) WHERE routed_at IS NULL;
CREATE TABLE IF NOT EXISTS index_meta (
    key   TEXT PRIMARY KEY,
    value {ANY}
);
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    series_key      TEXT NOT NULL,
    series_uid      TEXT NOT NULL,
    study_uid       TEXT NOT NULL,
    revision        INTEGER NOT NULL,
    pipeline        TEXT NOT NULL,
    destinations    TEXT NOT NULL,
    rule            TEXT NOT NULL DEFAULT '',
    priority        INTEGER NOT NULL DEFAULT 1,
    state           TEXT NOT NULL DEFAULT 'queued',
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      {REAL} NOT NULL,
    updated_at      {REAL} NOT NULL,
    started_at      {REAL},
    finished_at     {REAL},
    next_attempt_at {REAL} NOT NULL,
    lease_owner     TEXT,
    lease_expires_at {REAL},
    last_error      TEXT,
    event_id        TEXT,
    series_json     TEXT NOT NULL,
    UNIQUE (series_key, pipeline)
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (state, priority, created_at);
CREATE TABLE IF NOT EXISTS job_outputs (
    job_id            TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    sop_instance_uid  TEXT NOT NULL,
    sop_class_uid     TEXT NOT NULL,
    path              TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id            TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    sop_instance_uid  TEXT NOT NULL,
    destination       TEXT NOT NULL,
    delivered_at      {REAL} NOT NULL,
    detail            TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, sop_instance_uid, destination)
);
"""

_NODES = """
CREATE TABLE IF NOT EXISTS nodes (
    name          TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    ae_title      TEXT NOT NULL DEFAULT '',
    port          INTEGER,
    started_at    {REAL} NOT NULL,
    heartbeat_at  {REAL} NOT NULL,
    stopped_at    {REAL}
);
"""

_TYPES = {
    "sqlite": {"REAL": "REAL", "ID": "INTEGER PRIMARY KEY", "ROWID": "", "ANY": ""},
    # REAL is 4 bytes on PostgreSQL: epoch seconds need DOUBLE PRECISION. ``rowid`` is
    # SQLite's implicit arrival order; PostgreSQL gets it as an identity column.
    "postgresql": {"REAL": "DOUBLE PRECISION",
                   "ID": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                   "ROWID": "rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,",
                   "ANY": "TEXT"},
}


def _sql(conn: Any, template: str) -> str:
    kinds = _TYPES["postgresql" if isinstance(conn, PgConnection) else "sqlite"]
    return template.format(**kinds)


def _script(conn: Any, template: str) -> None:
    text = _sql(conn, template)
    for stmt in text.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _add_columns(conn: Any, table: str, columns: tuple[tuple[str, str], ...]) -> None:
    """``ALTER TABLE … ADD COLUMN`` for each ``(name, type)`` the table lacks."""
    have = table_columns(conn, table)
    for name, kind in columns:
        if name not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {_sql(conn, kind)}")


def _m1_baseline(conn: Any) -> None:
    _script(conn, _BASELINE)


def _m2_columns(conn: Any) -> None:
    _add_columns(conn, "series_events", (("failed_at", "{REAL}"), ("failure", "TEXT")))
    _add_columns(conn, "jobs", (("dispatch_failing_since", "{REAL}"),
                                ("dispatch_attempts", "INTEGER NOT NULL DEFAULT 0"),
                                ("waiting_for", "TEXT")))
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_by_series ON jobs (series_uid, state)")


def _m3_nodes(conn: Any) -> None:
    _add_columns(conn, "series_events", (("completed_by", "TEXT"),))
    _script(conn, _NODES)


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema step."""

    version: int
    name: str
    apply: Callable[[Any], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline", _m1_baseline),
    Migration(2, "failure-and-delivery-columns", _m2_columns),
    Migration(3, "nodes", _m3_nodes),
)
LATEST = MIGRATIONS[-1].version

_PG_LOCK_KEY = 0x4F4D4E49  # "OMNI": the advisory lock held while migrating


def applied(conn: Any) -> list[int]:
    """Versions recorded in ``schema_migrations`` (empty when the table does not exist)."""
    if not table_columns(conn, "schema_migrations"):
        return []
    return sorted(int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations"))


def migrate(conn: Any, upto: int | None = None) -> list[int]:
    """Apply the migrations not yet recorded in the database, up to ``upto`` (default all).

    Args:
        conn: An open connection (:func:`dicom_node.db.connect`), outside a transaction.
        upto: Last version to apply (tests build an older schema with it).

    Returns:
        The versions applied now (empty when the schema was already up to date).
    """
    last = LATEST if upto is None else upto
    have = applied(conn)
    if have and have[-1] >= last and set(range(1, last + 1)) <= set(have):
        return []  # the usual open: one read, no write lock
    pg = isinstance(conn, PgConnection)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if pg:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK_KEY,))
        conn.execute(_sql(conn, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                                " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                                " applied_at {REAL} NOT NULL)"))
        done = set(applied(conn))
        now: list[int] = []
        for m in MIGRATIONS:
            if m.version > last or m.version in done:
                continue
            m.apply(conn)
            conn.execute("INSERT INTO schema_migrations (version, name, applied_at)"
                         " VALUES (?, ?, ?)", (m.version, m.name, time.time()))
            now.append(m.version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return now
