"""storage.database as a PostgreSQL URL: validation, redaction, the SQL translation."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, parse_config
from dicom_node.db import pg_sql, redact


def test_url_is_kept_and_a_path_is_resolved(tmp_path: Path) -> None:
    url = "postgresql://omnimri:secret@db.example:5432/omnimri"
    s = parse_config({"storage": {"database": url}}, tmp_path)
    assert s.storage.database_path == url
    s = parse_config({"storage": {"database": "var/x.db"}}, tmp_path)
    assert s.storage.database_path == (tmp_path / "var" / "x.db").resolve()


@pytest.mark.parametrize(("value", "message"), [
    ("postgresql://db.example:5432", "names no database"),
    ("postgresql://db.example:notaport/x", "not a valid PostgreSQL URL"),
    ("mysql://db.example/x", "unsupported URL scheme"),
])
def test_bad_urls_are_refused_with_the_reason(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"storage": {"database": value}}, tmp_path)


def test_password_never_shown() -> None:
    assert redact("postgresql://u:secret@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact("postgresql://u@h/d") == "postgresql://u@h/d"
    assert redact(Path("/var/node.db")) == "/var/node.db"


def test_sql_translation() -> None:
    assert pg_sql("BEGIN IMMEDIATE") == "BEGIN"
    assert pg_sql("PRAGMA synchronous=NORMAL") is None
    assert pg_sql("SELECT * FROM t WHERE a = ? AND b LIKE ? || '%'") == (
        "SELECT * FROM t WHERE a = %s AND b LIKE %s || '%%'")
    assert pg_sql("SELECT '?' , 5 % 2") == "SELECT '?' , 5 % 2"  # no placeholder: unchanged
