"""One SQLite database (WAL) holds the instance index, series, completion events and jobs.

Each module that owns tables (``index``, ``jobs``) creates them itself through
:func:`connect`; this module only knows how to open the file safely.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for the lock before failing, milliseconds. Default 30 s."""


def connect(path: Path, *, check_same_thread: bool = False) -> sqlite3.Connection:
    """Open the node database with WAL, ``synchronous=FULL`` and a busy timeout.

    ``synchronous=FULL`` makes each commit durable on its own: a row the node acknowledged
    survives a power cut, not only a process crash.

    Args:
        path: The SQLite file; its folder is created if missing.
        check_same_thread: Passed to :func:`sqlite3.connect`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=check_same_thread,
        isolation_level=None,
    )
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def add_missing_columns(conn: sqlite3.Connection, table: str,
                        columns: tuple[tuple[str, str], ...]) -> None:
    """Add the ``(name, type)`` columns a database made by older code lacks.

    Idempotent; tolerates another process adding them at the same time.
    """
    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    for column, kind in columns:
        if column in have:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as err:  # another process added it meanwhile
            if "duplicate column" not in str(err):
                raise
