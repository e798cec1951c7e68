"""Options and helpers every CLI command shares."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from dicom_node.config import ConfigError, NodeSettings, load_config

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="The node's config.yaml (env OMNIMRI__<SECTION>__<KEY> overrides it).",
        envvar="OMNIMRI_CONFIG",
    ),
]
"""``--config PATH``, default ``./config.yaml``."""

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
"""``--json``: machine-readable output instead of a table."""

EXIT_CONFIG = 2
"""Exit code for an invalid configuration (nothing is started)."""


def load_or_exit(path: Path) -> NodeSettings:
    """Load the configuration, or print each key path and reason and exit with code 2."""
    try:
        return load_config(path)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """Print ``rows`` as a plain-text table for people, or as a JSON list for scripts."""
    if as_json:
        json.dump(list(rows), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    if not rows:
        typer.echo("(none)")
        return
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
