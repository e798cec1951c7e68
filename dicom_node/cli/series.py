"""``omnimri-node series list``, ``series show UID`` and ``series purge --older-than-days N``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dicom_node.cli.common import ConfigOption, JsonOption, load_or_exit, print_table
from dicom_node.config import DEFAULT_CONFIG_PATH

LIST_COLUMNS = ("series_instance_uid", "modality", "series_description", "instance_count",
                "state", "revision", "last_received_at", "study_instance_uid")
"""Columns of the ``series list`` table."""


def register(app: typer.Typer) -> None:
    """Add the ``series`` group to ``app``."""
    group = typer.Typer(help="Received series and their completion state.",
                        no_args_is_help=True)
    app.add_typer(group, name="series")

    @group.command("list")
    def list_series(
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        as_json: JsonOption = False,
        limit: Annotated[int, typer.Option("--limit", help="Most recent N series.")] = 100,
    ) -> None:
        """What has arrived: UIDs, modality, description, instances, state, revision."""
        from dicom_node.index import SeriesIndex

        settings = load_or_exit(config)
        rows = SeriesIndex(settings.storage.database_path).list_series(limit)
        print_table(rows, LIST_COLUMNS, as_json)

    @group.command("show")
    def show_series(
        uid: Annotated[str, typer.Argument(help="Series Instance UID.")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
    ) -> None:
        """One series: its state, completion events (revisions) and instances, as JSON."""
        from dicom_node.index import SeriesIndex

        settings = load_or_exit(config)
        index = SeriesIndex(settings.storage.database_path)
        info = index.get_series(uid)
        if info is None:
            typer.echo(f"no series {uid}", err=True)
            raise typer.Exit(1)
        info["instances"] = [
            {"sop_instance_uid": i.sop_instance_uid, "instance_number": i.instance_number,
             "path": str(i.path), "size_bytes": i.size_bytes,
             "transfer_syntax_uid": i.transfer_syntax_uid,
             "received_at": i.received_at.isoformat()}
            for i in index.instances_of(uid)
        ]
        typer.echo(json.dumps(info, indent=2))

    @group.command("purge")
    def purge_series(
        older_than_days: Annotated[float, typer.Option(
            "--older-than-days", min=0,
            help="Purge series whose jobs all finished (done/cancelled) more than N days ago.")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Only list what would be purged.")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Delete the spooled files, index rows and job results of finished series (retention).

        Series still receiving, with unrouted completions, or with a queued, running or failed
        job are kept. Each purge is audited (``retention_purged``).
        """
        from dicom_node.audit import configure_audit
        from dicom_node.index import SeriesIndex
        from dicom_node.retention import purge_expired

        settings = load_or_exit(config)
        configure_audit(settings.audit.path)
        index = SeriesIndex(settings.storage.database_path)
        result = purge_expired(settings, index, older_than_days, dry_run=dry_run)
        index.close()
        if as_json:
            typer.echo(json.dumps(result.as_dict(), indent=2))
            return
        rows = [s.as_dict() for s in result.series]
        print_table(rows, ("series_instance_uid", "instances", "done_at", "study_instance_uid"),
                    False)
        verb = "would purge" if dry_run else "purged"
        typer.echo(f"{verb} {len(rows)} series, {sum(r['instances'] for r in rows)} instances"
                   + ("" if dry_run else f", {result.files_deleted} files,"
                      f" {result.results_deleted} job result folders"))
