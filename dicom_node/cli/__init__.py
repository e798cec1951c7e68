"""``omnimri-node``: the node's command line (typer).

Each command group lives in its own module with a ``register(app)`` function, so the group's
owner changes one file.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="omnimri-node",
    help="OmniMRI Node: a DICOM worker node that reads MRI series with the OmniMRI models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """OmniMRI Node: a DICOM worker node that reads MRI series with the OmniMRI models."""


_GROUPS = (
    "config_cmd",  # check-config
    "serve",  # serve, echo
    "series",  # series list/show
    "rules",  # rules check/explain
    "jobs",  # jobs list/show/retry/cancel
    "nodes",  # nodes (processes sharing the database, heartbeats)
    "destinations",  # destinations list/test
    "engines",  # engines build/list/verify
    "train",  # train <stage>, eval
    "demo",  # demo
    "language",  # train language, train language-eval
    "ask",  # ask SERIES_UID "question"
)

for _name in _GROUPS:
    importlib.import_module(f"dicom_node.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()
