"""Node processes sharing one database, with heartbeats (the ``nodes`` table, migration 3).

Each ``omnimri-node serve`` registers itself (:class:`NodeRegistry`, a node service) under its
:func:`~dicom_node.db.node_name` (``host:pid:token``), then writes ``heartbeat_at`` every
:data:`HEARTBEAT_S` seconds; a clean stop writes ``stopped_at``. :func:`list_nodes` (``omnimri-node
nodes``) shows which are alive (a heartbeat within :data:`ALIVE_WITHIN_S`) and what each holds:
the jobs leased to it. On SQLite there is one node, but the table works the same.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from dicom_node.config import NodeSettings
from dicom_node.db import DatabaseTarget, connect, db_errors, node_name
from dicom_node.logs import get_logger
from dicom_node.migrations import migrate

log = get_logger("nodes")

HEARTBEAT_S = 5.0
"""Seconds between two heartbeats of a node."""
ALIVE_WITHIN_S = 3 * HEARTBEAT_S
"""A node whose last heartbeat is older than this many seconds is shown as not alive."""


class NodeRegistry:
    """Registers this process in ``nodes`` and keeps its heartbeat (``start``/``stop``).

    Args:
        settings: The node configuration (database, AE title, port).
    """

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.name = node_name()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Write this node's row, then beat on a background thread."""
        conn = connect(self.settings.storage.database_path)
        try:
            migrate(conn)
            t = time.time()
            conn.execute(
                "INSERT INTO nodes (name, host, pid, ae_title, port, started_at, heartbeat_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
                (self.name, socket.gethostname(), os.getpid(), self.settings.node.ae_title,
                 self.settings.node.port, t, t))
        finally:
            conn.close()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="node-heartbeat", daemon=True)
        self._thread.start()
        log.info("node_registered", node=self.name)

    def _loop(self) -> None:
        conn: Any = None
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if conn is None:
                    conn = connect(self.settings.storage.database_path)
                conn.execute("UPDATE nodes SET heartbeat_at = ? WHERE name = ?",
                             (time.time(), self.name))
            except db_errors() as err:  # the database is away: try again at the next beat
                log.warning("node_heartbeat_failed", error=type(err).__name__)
                conn = None
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        """Stop beating and mark this node stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(HEARTBEAT_S + 5)
            self._thread = None
        try:
            conn = connect(self.settings.storage.database_path)
            try:
                conn.execute("UPDATE nodes SET stopped_at = ? WHERE name = ?",
                             (time.time(), self.name))
            finally:
                conn.close()
        except db_errors() as err:
            log.warning("node_stop_unrecorded", error=type(err).__name__)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def list_nodes(database: DatabaseTarget, now: float | None = None) -> list[dict[str, Any]]:
    """Every node that registered in ``database``, most recent heartbeat first.

    Keys: ``name``, ``host``, ``pid``, ``ae_title``, ``port``, ``alive`` (a heartbeat within
    :data:`ALIVE_WITHIN_S` and not stopped), ``started_at``, ``heartbeat_at``, ``stopped_at``
    (ISO 8601 UTC), ``jobs`` (ids of the active jobs leased to it).
    """
    now = time.time() if now is None else now
    conn = connect(database)
    try:
        migrate(conn)
        held: dict[str, list[str]] = {}
        for r in conn.execute("SELECT lease_owner, id FROM jobs WHERE lease_owner IS NOT NULL"
                              " AND state IN ('running', 'exporting', 'dispatching')"
                              " ORDER BY id"):
            held.setdefault(r[0], []).append(r[1])
        rows = conn.execute("SELECT * FROM nodes ORDER BY heartbeat_at DESC").fetchall()
    finally:
        conn.close()
    return [{
        "name": r["name"], "host": r["host"], "pid": int(r["pid"]), "ae_title": r["ae_title"],
        "port": r["port"],
        "alive": r["stopped_at"] is None and now - float(r["heartbeat_at"]) <= ALIVE_WITHIN_S,
        "started_at": _iso(r["started_at"]), "heartbeat_at": _iso(r["heartbeat_at"]),
        "stopped_at": _iso(r["stopped_at"]), "jobs": held.get(r["name"], []),
    } for r in rows]
