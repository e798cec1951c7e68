"""``omnimri-node destinations list`` and ``destinations test NAME``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from dicom_node.cli.common import ConfigOption, JsonOption, load_or_exit, print_table
from dicom_node.config import (
    DEFAULT_CONFIG_PATH,
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    OrthancDestination,
)

EXIT_FAILED = 1
"""Exit code of ``destinations test`` when the destination did not answer."""
EXIT_UNKNOWN = 2
"""Exit code when no destination of that name is configured."""


def describe(name: str, cfg: Any) -> dict[str, Any]:
    """One row of ``destinations list``: name, kind and where it points."""
    if isinstance(cfg, DimseDestination):
        target = f"{cfg.ae_title}@{cfg.host}:{cfg.port}" + (" (TLS)" if cfg.tls else "")
    elif isinstance(cfg, DicomwebDestination | OrthancDestination):
        target = cfg.url
    elif isinstance(cfg, FolderDestination):
        target = str(cfg.path)
    else:
        target = "?"
    return {"name": name, "kind": cfg.kind, "target": target}


def register(app: typer.Typer) -> None:
    """Add the ``destinations`` group to ``app``."""
    group = typer.Typer(help="Where results are sent: list and test destinations.",
                        no_args_is_help=True)
    app.add_typer(group, name="destinations")

    @group.command("list")
    def list_destinations(
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        as_json: JsonOption = False,
    ) -> None:
        """Configured destinations: name, kind and target (AE@host:port, URL or folder)."""
        settings = load_or_exit(config)
        rows = [describe(n, d) for n, d in sorted(settings.destinations.items())]
        print_table(rows, ("name", "kind", "target"), as_json)

    @group.command("test")
    def test_destination(
        name: Annotated[str, typer.Argument(help="Destination name from the configuration.")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
    ) -> None:
        """Check a destination answers: C-ECHO, an HTTP request, or a folder write probe.

        Exit code 0 when it answers, 1 when not, 2 when no such destination is configured.
        """
        from dicom_node.destinations import DestinationError, destination_for

        settings = load_or_exit(config)
        if name not in settings.destinations:
            known = ", ".join(sorted(settings.destinations)) or "none"
            typer.echo(f"no destination {name!r} is configured (known: {known})", err=True)
            raise typer.Exit(EXIT_UNKNOWN)
        try:
            answer = destination_for(name, settings).test()
        except DestinationError as err:
            typer.echo(f"FAILED {name}: {err}")
            raise typer.Exit(EXIT_FAILED) from None
        typer.echo(f"OK {name}: {answer}")
