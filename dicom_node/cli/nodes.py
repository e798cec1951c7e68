"""``omnimri-node nodes``: the node processes sharing this node's database, alive or not."""

from __future__ import annotations

from typing import Annotated

import typer

from dicom_node.cli.common import ConfigOption, JsonOption, load_or_exit, print_table
from dicom_node.config import DEFAULT_CONFIG_PATH

COLUMNS = ("name", "alive", "ae_title", "port", "heartbeat_at", "started_at", "jobs")
"""Columns of the ``nodes`` table."""


def register(app: typer.Typer) -> None:
    """Add the ``nodes`` command to ``app``."""

    @app.command("nodes")
    def nodes(
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        as_json: JsonOption = False,
        alive: Annotated[bool, typer.Option("--alive", help="Only nodes alive now.")] = False,
    ) -> None:
        """Which node processes share the database, which are alive, what jobs each holds."""
        from dicom_node.nodes import list_nodes

        settings = load_or_exit(config)
        rows = list_nodes(settings.storage.database_path)
        if alive:
            rows = [r for r in rows if r["alive"]]
        if not as_json:
            rows = [{**r, "jobs": ",".join(r["jobs"])} for r in rows]
        print_table(rows, COLUMNS, as_json)
