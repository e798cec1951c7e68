"""``omnimri-node check-config``."""

from __future__ import annotations

import json

import typer

from dicom_node.cli.common import ConfigOption, load_or_exit
from dicom_node.config import DEFAULT_CONFIG_PATH, env_overrides


def register(app: typer.Typer) -> None:
    """Add ``check-config`` to ``app``."""

    @app.command("check-config")
    def check_config(
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        show: bool = typer.Option(False, "--show", help="Print the effective configuration."),
    ) -> None:
        """Validate the configuration; exit 2 with each key path and reason if it is invalid."""
        settings = load_or_exit(config)
        overrides = sorted(env_overrides())
        typer.echo(
            f"{config}: valid ({len(settings.rules)} rules, {len(settings.pipelines)} pipelines, "
            f"{len(settings.destinations)} destinations"
            + (f"; environment overrides: {', '.join(overrides)}" if overrides else "")
            + ")"
        )
        if show:
            typer.echo(json.dumps(settings.model_dump(mode="json"), indent=2))
