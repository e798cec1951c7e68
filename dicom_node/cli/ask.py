"""``omnimri-node ask SERIES_UID "QUESTION"``: a question about a stored series.

Answered from the series' structured findings (see :mod:`dicom_node.admin.ask`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dicom_node.cli.common import ConfigOption, JsonOption, load_or_exit
from dicom_node.config import DEFAULT_CONFIG_PATH


def register(app: typer.Typer) -> None:
    """Add ``ask`` to ``app``."""

    @app.command("ask")
    def ask(
        series_uid: Annotated[str, typer.Argument(help="Series Instance UID (stored here).")],
        question: Annotated[str, typer.Argument(help="The question, in words, e.g. 'how many "
                                                     "white matter lesions are there?'")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        pipeline: Annotated[str | None, typer.Option(
            help="Model pipeline whose package answers; default the first configured.")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Answer a question about a series: lesions, diagnosis, tissue volumes.

        Lesions: presence, count, side, lobe, size. Runs the model once per series revision,
        then reuses the findings. Exit 1 when refused, 2 on a bad request.
        """
        from dicom_node.admin.ask import ask_series
        from dicom_node.admin.backend.errors import AdminError
        from dicom_node.logs import configure_logging

        settings = load_or_exit(config)
        configure_logging("warning", fmt="console")
        try:
            out = ask_series(settings, series_uid, question, token_id="cli", pipeline=pipeline)
        except AdminError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            typer.echo(json.dumps(out, indent=2, default=str))
        else:
            typer.echo(out["answer"])
        if out["refused"]:
            raise typer.Exit(1)
