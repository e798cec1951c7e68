"""Series in the admin API: list, show, thumbnail, rerun, reroute (``/api/v1/series``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dicom_node.admin.auth import Principal
from dicom_node.admin.backend.errors import AdminError
from dicom_node.admin.backend.jobs import JobsAdmin
from dicom_node.admin.backend.parts import NodeParts
from dicom_node.admin.thumbnails import MAX_SIZE_PX, ThumbnailCache, ThumbnailError

if TYPE_CHECKING:
    from dicom_node.series import Series

PRIORITIES = ("urgent", "normal", "low")
"""The job priorities a rerun may ask for."""


class SeriesAdmin:
    """The series index as the admin API shows it, and the actions on one series.

    Args:
        parts: The shared node parts (the index is ``parts.index``).
        jobs: The jobs resource (a series is shown with its jobs).
    """

    def __init__(self, parts: NodeParts, jobs: JobsAdmin) -> None:
        self.parts = parts
        self.jobs = jobs
        self.thumbnails = ThumbnailCache()

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently active series (index rows; no patient data is indexed)."""
        rows: list[dict[str, Any]] = self.parts.index.list_series(limit=limit)
        return rows

    def _row(self, series_uid: str) -> dict[str, Any]:
        """The index row of a series, or :class:`AdminError` 404."""
        row: dict[str, Any] | None = self.parts.index.get_series(series_uid)
        if row is None:
            raise AdminError(404, f"no series {series_uid}")
        return row

    def get(self, series_uid: str) -> dict[str, Any]:
        """One series with its completion events and its jobs.

        Raises:
            AdminError: 404 when the series is unknown.
        """
        row = self._row(series_uid)
        row["jobs"] = [j.summary() for j in self.jobs.of_series(series_uid)]
        return row

    def latest(self, series_uid: str) -> Series:
        """The latest complete revision of a series.

        Raises:
            AdminError: 404 unknown series; 409 when no revision is complete yet.
        """
        row = self._row(series_uid)
        events = row.get("events") or []
        if not events:
            raise AdminError(409, f"series {series_uid} is still receiving (no complete revision)")
        revision = max(int(e["revision"]) for e in events)
        return self.parts.index.load_series(series_uid, revision)

    def thumbnail(self, series_uid: str, size: int = MAX_SIZE_PX) -> bytes:
        """A PNG of the middle slice of the series (latest instances, any revision).

        ``size`` is the longest side in pixels, clamped to 32..1024.

        Raises:
            AdminError: 404 unknown series; 422 when no pixel data can be shown.
        """
        row = self._row(series_uid)
        instances = self.parts.index.instances_of(series_uid)
        size = max(32, min(int(size), 1024))
        try:
            return self.thumbnails.get(
                instances, (series_uid, int(row["instance_count"]), size))
        except ThumbnailError as err:
            raise AdminError(422, str(err)) from None

    def rerun(self, who: Principal, series_uid: str, pipeline: str,
              destinations: list[str] | None = None, priority: str = "normal") -> dict[str, Any]:
        """Run ``pipeline`` again on the latest complete revision of a series.

        A new job is enqueued; if one for that revision and pipeline exists and is finished,
        it is re-run (same output UIDs, so the PACS replaces rather than duplicates).

        Raises:
            AdminError: 404 unknown series/pipeline/destination; 409 when the job is active.
        """
        from dicom_node.jobs import JobError, NewJob

        settings = self.parts.settings
        if pipeline not in settings.pipelines:
            raise AdminError(404, f"no pipeline {pipeline!r} (pipelines: "
                                  f"{', '.join(sorted(settings.pipelines)) or 'none'})")
        dests = destinations if destinations is not None else self._default_destinations(pipeline)
        for d in dests:
            if d != "sender" and d not in settings.destinations:
                raise AdminError(404, f"no destination {d!r}")
        if priority not in PRIORITIES:
            raise AdminError(422, "priority must be urgent, normal or low")
        series = self.latest(series_uid)
        queue = self.parts.queue
        job_id, created = queue.enqueue(NewJob(
            series=series, pipeline=pipeline, destinations=tuple(dests),
            rule=f"admin:{who.token_id}", priority=priority,  # type: ignore[arg-type]
        ))
        if not created:
            try:
                queue.retry(job_id, rerun=True)
            except JobError as err:
                self.parts.record(who, "series_rerun", series_uid, status="refused",
                                  pipeline=pipeline, job_id=job_id)
                raise AdminError(409, str(err)) from None
        self.parts.record(who, "series_rerun", series_uid, pipeline=pipeline, job_id=job_id,
                          destinations=dests, new_job=created)
        job: dict[str, Any] = queue.get(job_id).summary()
        return job

    def reroute(self, who: Principal, series_uid: str) -> dict[str, Any]:
        """Make the failed completion events of a series pending again; returns the series.

        The router retries them at its next poll.

        Raises:
            AdminError: 404 unknown series; 409 when it has no failed completion.
        """
        self._row(series_uid)
        n = self.parts.index.retry_failed(series_uid)
        if not n:
            self.parts.record(who, "series_reroute", series_uid, status="refused")
            raise AdminError(409, f"series {series_uid} has no completion in the failed state")
        self.parts.record(who, "series_reroute", series_uid, events=n)
        return self.get(series_uid)

    def _default_destinations(self, pipeline: str) -> list[str]:
        """The destinations of the first rule that runs ``pipeline`` (none: ``[]``)."""
        for rule in self.parts.settings.rules:
            if pipeline in rule.pipelines and rule.destinations:
                return list(rule.destinations)
        return []
