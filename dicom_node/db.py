"""The node database: one SQLite file (WAL, the embedded default) or one PostgreSQL database.

It holds the instance index, series, completion events, the job queue, outputs, delivery
records and leases. ``storage.database`` is a file path (SQLite) or a ``postgresql://`` URL
(psycopg 3, the ``postgres`` extra); several nodes with the same URL and the same shared spool
form one logical node (see ``docs/database.md``).

This module is the one connection layer both back ends go through:

* :func:`connect` opens either; a SQLite connection is a plain :class:`sqlite3.Connection`
  (unchanged: WAL, ``synchronous=FULL``, busy timeout), a PostgreSQL one is a
  :class:`PgConnection` with the same small API (``execute``, ``executemany``,
  ``executescript``, ``in_transaction``, rows readable by index and by column name).
* SQL is written once, in the dialect both understand (``INSERT … ON CONFLICT … DO NOTHING``,
  ``RETURNING``); :class:`PgConnection` only turns ``?`` into ``%s`` and
  ``BEGIN IMMEDIATE`` into ``BEGIN``; ``PRAGMA`` statements (SQLite tuning) are no-ops there.
* :func:`for_update` is ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and nothing on SQLite (whose
  ``BEGIN IMMEDIATE`` already serialises writers).
* :func:`migrate` (in :mod:`dicom_node.migrations`) brings either schema up to date at open.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for the lock before failing, milliseconds. Default 30 s."""

PG_CONNECT_TIMEOUT_S = 10
"""How long opening a PostgreSQL connection may take, seconds."""
PG_LOCK_TIMEOUT_MS = BUSY_TIMEOUT_MS
"""How long a PostgreSQL statement waits for a row lock before failing, milliseconds."""

Backend = Literal["sqlite", "postgresql"]
DatabaseTarget = Path | str
"""A SQLite file path or a ``postgresql://`` URL (``storage.database_path``)."""

PG_SCHEMES = ("postgresql://", "postgres://")


_PROCESS_TOKEN = uuid.uuid4().hex[:8]


def node_name() -> str:
    """Name of this process among the nodes sharing a database: ``host:pid:token``.

    Lease owner of the jobs it runs, ``completed_by`` of the revisions it completes, its row in
    ``nodes``. The token tells a reused pid apart.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_TOKEN}"


def db_errors() -> tuple[type[Exception], ...]:
    """Errors of the database itself (locked, disk full, connection lost), either back end.

    Use as ``except db_errors():``. psycopg is not imported for it: its errors are only
    included once a PostgreSQL connection imported it (so a SQLite node never loads it).
    """
    pg = sys.modules.get("psycopg")
    return (sqlite3.Error,) if pg is None else (sqlite3.Error, pg.Error)


def is_postgres(target: DatabaseTarget | None) -> bool:
    """Whether ``target`` is a PostgreSQL URL."""
    return isinstance(target, str) and target.startswith(PG_SCHEMES)


def backend_of(conn: Any) -> Backend:
    """``sqlite`` or ``postgresql``: the back end of an open connection."""
    return "postgresql" if isinstance(conn, PgConnection) else "sqlite"


def redact(target: DatabaseTarget | None) -> str:
    """``target`` for logs and status: a URL without its password."""
    if target is None:
        return ""
    if not is_postgres(target):
        return str(target)
    parts = urlsplit(str(target))
    if parts.password is None:
        return str(target)
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_postgres_url(url: str) -> str:
    """Validate a ``postgresql://`` URL (a host or socket and a database name).

    Raises:
        ValueError: The URL names no database, or cannot be parsed.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as err:
        raise ValueError(f"not a valid PostgreSQL URL ({err})") from None
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise ValueError("the PostgreSQL URL names no database "
                         "(postgresql://user:password@host:5432/DBNAME)")
    return url


def connect(target: DatabaseTarget, *, check_same_thread: bool = False) -> Any:
    """Open the node database: a SQLite file or a PostgreSQL URL.

    SQLite: WAL, ``synchronous=FULL`` (each commit durable on its own: a row the node
    acknowledged survives a power cut, not only a process crash), a 30 s busy timeout,
    foreign keys on; the file's folder is created if missing. PostgreSQL: autocommit outside
    explicit ``BEGIN`` … ``COMMIT``, a lock timeout of :data:`PG_LOCK_TIMEOUT_MS`.

    Args:
        target: The SQLite file, or a ``postgresql://`` URL.
        check_same_thread: Passed to :func:`sqlite3.connect`.

    Returns:
        A :class:`sqlite3.Connection` or a :class:`PgConnection` (the same small API).
    """
    if is_postgres(target):
        return PgConnection(str(target))
    path = Path(target)
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


def for_update(conn: Any) -> str:
    """`` FOR UPDATE SKIP LOCKED`` on PostgreSQL (claims), ``""`` on SQLite."""
    return " FOR UPDATE SKIP LOCKED" if isinstance(conn, PgConnection) else ""


def lock_rows(conn: Any) -> str:
    """`` FOR UPDATE`` on PostgreSQL (wait for the row lock), ``""`` on SQLite."""
    return " FOR UPDATE" if isinstance(conn, PgConnection) else ""


def table_columns(conn: Any, table: str) -> set[str]:
    """Column names of ``table`` (empty when it does not exist), either back end."""
    if isinstance(conn, PgConnection):
        return {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ?", (table,))}
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


# -- PostgreSQL ------------------------------------------------------------------------------

_TOKEN = re.compile(r"'(?:[^']|'')*'|\?|%")


@lru_cache(maxsize=512)
def pg_sql(sql: str) -> str | None:
    """The PostgreSQL form of one statement written for both back ends (``None``: skip it).

    ``?`` → ``%s`` (and a literal ``%`` → ``%%``) outside string literals; ``BEGIN IMMEDIATE``
    → ``BEGIN``; ``PRAGMA …`` (SQLite tuning) → ``None``.
    """
    head = sql.lstrip()[:16].upper()
    if head.startswith("PRAGMA"):
        return None
    if head.startswith("BEGIN"):
        return "BEGIN"
    if not has_placeholders(sql):
        return sql  # sent without parameters: psycopg leaves a literal % alone

    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok == "?":
            return "%s"
        if tok == "%":
            return "%%"
        return tok.replace("%", "%%")

    return _TOKEN.sub(sub, sql)


def has_placeholders(sql: str) -> bool:
    """Whether ``sql`` has a ``?`` placeholder outside string literals."""
    return any(m.group(0) == "?" for m in _TOKEN.finditer(sql))


class Row:
    """A result row readable by position and by column name (like :class:`sqlite3.Row`)."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return self._values[self._names[key.lower()]]
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> list[str]:
        """Column names, in order."""
        return list(self._names)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values, strict=False))!r})"


def _row_factory(cursor: Any) -> Any:
    desc = cursor.description or ()
    names = {d.name.lower(): i for i, d in enumerate(desc)}

    def make(values: Sequence[Any]) -> Row:
        return Row(names, values)

    return make


class _NoRows:
    """The cursor of a statement skipped on PostgreSQL (a SQLite ``PRAGMA``)."""

    rowcount = -1
    lastrowid = None

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


class PgConnection:
    r"""A psycopg 3 connection with the small sqlite3-like API the node's modules use.

    Autocommit, so ``BEGIN`` … ``COMMIT`` issued through :meth:`execute` delimit
    transactions exactly as on SQLite (``isolation_level=None``). READ COMMITTED; rows a
    transaction must own are locked with ``SELECT … FOR UPDATE`` (:func:`lock_rows`,
    :func:`for_update`), and exactly-once steps are conditional ``UPDATE``\\ s or
    ``INSERT … ON CONFLICT DO NOTHING`` whose row count decides.

    Args:
        url: ``postgresql://user:password@host:port/dbname``.
    """

    backend: Backend = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("storage.database is a PostgreSQL URL but psycopg is not "
                               "installed: pip install 'omnimri-node[postgres]'") from None

        self.url = url
        self._pq = psycopg.pq
        self._c = psycopg.connect(url, autocommit=True, row_factory=_row_factory,
                                  connect_timeout=PG_CONNECT_TIMEOUT_S)
        self._c.execute(f"SET lock_timeout = {int(PG_LOCK_TIMEOUT_MS)}")
        self._c.execute("SET client_min_messages = warning")

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (also one that failed and awaits ROLLBACK)."""
        status = self._c.info.transaction_status
        return bool(status != self._pq.TransactionStatus.IDLE)

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        """Run one statement (``?`` placeholders); returns the cursor."""
        stmt = pg_sql(sql)
        if stmt is None:
            return _NoRows()
        params = tuple(parameters) if has_placeholders(sql) else None
        return self._c.execute(stmt, params)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        """Run one statement once per parameter tuple."""
        stmt = pg_sql(sql)
        cur = self._c.cursor()
        if stmt is not None:
            cur.executemany(stmt, [tuple(p) for p in parameters])
        return cur

    def executescript(self, sql_script: str, /) -> None:
        """Run several statements without parameters."""
        self._c.execute(sql_script)

    def commit(self) -> None:
        """``COMMIT`` when a transaction is open."""
        if self.in_transaction:
            self._c.execute("COMMIT")

    def rollback(self) -> None:
        """``ROLLBACK`` when a transaction is open."""
        if self.in_transaction:
            self._c.execute("ROLLBACK")

    def close(self) -> None:
        """Close the connection."""
        self._c.close()
