"""``omnimri-node jobs list|show|retry|cancel``: the durable job queue, for operators."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from dicom_node.cli.common import ConfigOption, JsonOption, load_or_exit, print_table
from dicom_node.config import DEFAULT_CONFIG_PATH, NodeSettings

LIST_COLUMNS = ("id", "state", "priority", "pipeline", "destinations", "attempts", "created",
                "updated", "next_attempt", "series", "last_error")
"""Columns of the ``jobs list`` table."""

EXIT_NOT_FOUND = 1
"""Exit code when the job does not exist or the action is refused."""


def _queue(settings: NodeSettings) -> Any:
    from dicom_node.jobs import JobQueue

    return JobQueue(settings)


def _short(rows: list[dict[str, Any]], as_json: bool) -> list[dict[str, Any]]:
    if as_json:
        return rows
    for r in rows:
        err = r.get("last_error") or ""
        r["last_error"] = err if len(err) <= 60 else err[:57] + "..."
    return rows


def register(app: typer.Typer) -> None:
    """Add the ``jobs`` group to ``app``."""
    group = typer.Typer(help="The job queue: list, show, retry and cancel jobs.",
                        no_args_is_help=True)
    app.add_typer(group, name="jobs")

    @group.command("list")
    def list_jobs(
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        state: Annotated[str | None, typer.Option(
            "--state", help="Only jobs in this state: queued, running, exporting, dispatching,"
                            " done, failed, cancelled.")] = None,
        limit: Annotated[int, typer.Option("--limit", help="Most recent N jobs.")] = 200,
        as_json: JsonOption = False,
    ) -> None:
        """Jobs, newest first: state, priority, pipeline, destinations, attempts, last error."""
        from dicom_node.jobs import JobError

        settings = load_or_exit(config)
        try:
            jobs = _queue(settings).list_jobs(state=state, limit=limit)
        except JobError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(2) from None
        print_table(_short([j.summary() for j in jobs], as_json), LIST_COLUMNS, as_json)

    @group.command("show")
    def show_job(
        job_id: Annotated[str, typer.Argument(help="Job id (or a unique prefix, 6+ chars).")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
    ) -> None:
        """One job as JSON: its fields, stored outputs and deliveries per destination."""
        from dicom_node.jobs import JobError

        settings = load_or_exit(config)
        queue = _queue(settings)
        try:
            job = queue.get(job_id)
        except JobError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(EXIT_NOT_FOUND) from None
        info = job.summary()
        info["destinations"] = list(job.destinations)
        info["instances"] = len(job.series.instances)
        info["outputs"] = [
            {"sop_instance_uid": o.sop_instance_uid, "sop_class_uid": o.sop_class_uid,
             "path": str(o.path)} for o in queue.outputs(job.id)
        ]
        info["deliveries"] = queue.deliveries(job.id)
        typer.echo(json.dumps(info, indent=2))

    @group.command("retry")
    def retry_job(
        job_id: Annotated[str, typer.Argument(help="Job id (or a unique prefix).")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        rerun: Annotated[bool, typer.Option(
            "--rerun", help="Run the pipeline again and resend everything (also for done"
                            " jobs); the PACS replaces the earlier objects (same UIDs).")] = False,
    ) -> None:
        """Queue a failed or cancelled job again now (attempts start from zero)."""
        from dicom_node.jobs import JobError

        settings = load_or_exit(config)
        try:
            job = _queue(settings).retry(job_id, rerun=rerun)
        except JobError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(EXIT_NOT_FOUND) from None
        typer.echo(f"job {job.id} queued again" + (" (full re-run)" if rerun else ""))

    @group.command("cancel")
    def cancel_job(
        job_id: Annotated[str, typer.Argument(help="Job id (or a unique prefix).")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
    ) -> None:
        """Cancel a job that has not finished (a running one stops at its next step)."""
        from dicom_node.jobs import JobError

        settings = load_or_exit(config)
        try:
            job = _queue(settings).cancel(job_id)
        except JobError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(EXIT_NOT_FOUND) from None
        typer.echo(f"job {job.id} cancelled")
