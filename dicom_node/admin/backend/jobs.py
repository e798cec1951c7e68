"""Jobs in the admin API: list, show, retry, cancel (``/api/v1/jobs``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dicom_node.admin.auth import Principal
from dicom_node.admin.backend.errors import AdminError
from dicom_node.admin.backend.parts import NodeParts

if TYPE_CHECKING:
    from dicom_node.jobs import Job


class JobsAdmin:
    """The job queue as the admin API shows and changes it.

    Args:
        parts: The shared node parts (the queue is ``parts.queue``).
    """

    def __init__(self, parts: NodeParts) -> None:
        self.parts = parts

    def recent(self, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally in one state.

        Raises:
            AdminError: 422 for a state that does not exist.
        """
        from dicom_node.jobs import STATES

        if state is not None and state not in STATES:
            raise AdminError(422, f"unknown state {state!r}; one of {', '.join(STATES)}")
        return [j.summary() for j in self.parts.queue.list_jobs(state=state, limit=limit)]

    def get(self, job_id: str) -> dict[str, Any]:
        """One job with its stored outputs and deliveries.

        Raises:
            AdminError: 404 for an unknown job.
        """
        from dicom_node.jobs import JobError

        queue = self.parts.queue
        try:
            job = queue.get(job_id)
        except (JobError, KeyError):
            raise AdminError(404, f"no job {job_id}") from None
        out: dict[str, Any] = job.summary()
        out["outputs"] = [{"sop_instance_uid": o.sop_instance_uid,
                           "sop_class_uid": o.sop_class_uid} for o in queue.outputs(job_id)]
        out["deliveries"] = queue.deliveries(job_id)
        out["instances"] = len(job.series.instances)
        return out

    def of_series(self, series_uid: str) -> list[Job]:
        """The jobs of one series, oldest first."""
        return self.parts.queue.of_series(series_uid)

    def retry(self, who: Principal, job_id: str, rerun: bool = False) -> dict[str, Any]:
        """Queue a failed/cancelled (or, with ``rerun``, done) job again."""
        return self._act(who, "job_retry", job_id,
                         lambda: self.parts.queue.retry(job_id, rerun=rerun), rerun=rerun)

    def cancel(self, who: Principal, job_id: str) -> dict[str, Any]:
        """Cancel a job that has not finished."""
        return self._act(who, "job_cancel", job_id, lambda: self.parts.queue.cancel(job_id))

    def _act(self, who: Principal, action: str, job_id: str, fn: Callable[[], Job],
             **extra: Any) -> dict[str, Any]:
        """Run one state change on a job: 404 first, 409 when the queue refuses; audited."""
        from dicom_node.jobs import JobError

        self.get(job_id)  # 404 first
        try:
            job = fn()
        except JobError as err:
            self.parts.record(who, action, job_id, status="refused", **extra)
            raise AdminError(409, str(err)) from None
        self.parts.record(who, action, job_id, **extra)
        summary: dict[str, Any] = job.summary()
        return summary
