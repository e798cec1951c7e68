"""The admin HTTP API (``/api/v1``), health checks and ``/metrics``.

Every route but ``/healthz`` and ``/readyz`` needs a bearer token; routes that change
something need the ``admin`` role and are written to the audit log with the token's id.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dicom_node import metrics
from dicom_node.admin.auth import Admin, Viewer
from dicom_node.admin.backend import AdminBackend, scrub_for

router = APIRouter()


def backend(request: Request) -> AdminBackend:
    """The :class:`AdminBackend` of the app handling ``request``."""
    b: AdminBackend = request.app.state.backend
    return b


class RulesDraftBody(BaseModel):
    """A draft rule list: YAML text (``yaml``) or a list of rule mappings (``rules``)."""

    yaml: str | None = Field(default=None, description="The rules as YAML text (a list).")
    rules: list[dict[str, Any]] | None = Field(default=None, description="The rules as a list.")

    def draft(self) -> Any:
        """The draft in the form :meth:`~dicom_node.admin.backend.RulesAdmin.parse_draft` takes."""
        return self.yaml if self.yaml is not None else (self.rules or [])


class RulesTestBody(RulesDraftBody):
    """A draft plus what to test it against: a stored series or an uploaded DICOM file."""

    series_uid: str | None = Field(default=None, description="Series Instance UID in the index.")
    dicom_base64: str | None = Field(default=None,
                                     description="One DICOM Part 10 file, base64-encoded.")


class RerunBody(BaseModel):
    """Which pipeline to run again, and where to send the results."""

    pipeline: str
    destinations: list[str] | None = Field(
        default=None, description="Destination names; default those of the rules using it.")
    priority: str = "normal"


# -- health ---------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"], summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    """Always ``{"status": "ok"}`` while the process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: database, spool and listener",
            responses={503: {"description": "Not ready; `checks` says why."}})
def readyz(request: Request) -> JSONResponse:
    """200 when the node can take work, else 503 with the failing checks."""
    ok, checks = backend(request).health.readiness()
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition)",
            response_class=Response)
def prometheus(who: Viewer) -> Response:
    """The node's Prometheus metrics; scrape with ``authorization: {credentials: <token>}``."""
    body, ctype = metrics.render()
    return Response(content=body, media_type=ctype)


# -- status ---------------------------------------------------------------------------------


@router.get("/api/v1/status", tags=["node"], summary="Node status")
def node_status(request: Request, who: Viewer) -> dict[str, Any]:
    """AE title, ports, associations (active and counted by result), queue depth, spool disk."""
    return backend(request).health.status()


@router.get("/api/v1/whoami", tags=["node"], summary="The calling token's id and role")
def whoami(who: Viewer) -> dict[str, str]:
    """Which token the caller presented (its id and role; never the secret)."""
    return {"token_id": who.token_id, "role": who.role}


# -- series ---------------------------------------------------------------------------------


@router.get("/api/v1/series", tags=["series"], summary="List series")
def list_series(request: Request, who: Viewer,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """The most recently active series (UIDs, modality, counts, state, sender)."""
    rows: list[dict[str, Any]] = scrub_for(who, backend(request).series.recent(limit))
    return rows


@router.get("/api/v1/series/{series_uid}", tags=["series"], summary="Show a series")
def show_series(request: Request, who: Viewer, series_uid: str) -> dict[str, Any]:
    """One series with its completion events and jobs."""
    row: dict[str, Any] = scrub_for(who, backend(request).series.get(series_uid))
    return row


@router.get("/api/v1/series/{series_uid}/thumbnail.png", tags=["series"],
            summary="PNG preview (middle slice)", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def series_thumbnail(request: Request, who: Viewer, series_uid: str,
                     size: Annotated[int, Query(ge=32, le=1024)] = 256) -> Response:
    """The middle slice, windowed 1st-99th percentile, at most ``size`` pixels a side."""
    png = backend(request).series.thumbnail(series_uid, size)
    return Response(content=png, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=60"})


@router.post("/api/v1/series/{series_uid}/rerun", tags=["series"],
             summary="Run a pipeline again on a series (admin)")
def rerun_series(request: Request, who: Admin, series_uid: str,
                 body: RerunBody) -> dict[str, Any]:
    """Enqueue (or re-run) the job for the latest complete revision; returns the job."""
    return backend(request).series.rerun(who, series_uid, body.pipeline,
                                         body.destinations, body.priority)


@router.post("/api/v1/series/{series_uid}/reroute", tags=["series"],
             summary="Route a failed series again (admin)")
def reroute_series(request: Request, who: Admin, series_uid: str) -> dict[str, Any]:
    """Make its completions in the failed state pending again; the router retries them."""
    return backend(request).series.reroute(who, series_uid)


# -- jobs -----------------------------------------------------------------------------------


@router.get("/api/v1/jobs", tags=["jobs"], summary="List jobs")
def list_jobs(request: Request, who: Viewer, state: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
    """Jobs newest first; ``state`` filters (queued, running, ..., failed, cancelled)."""
    return backend(request).jobs.recent(state, limit)


@router.get("/api/v1/jobs/{job_id}", tags=["jobs"], summary="Show a job")
def show_job(request: Request, who: Viewer, job_id: str) -> dict[str, Any]:
    """One job with its outputs (SOP Instance UIDs) and deliveries per destination."""
    return backend(request).jobs.get(job_id)


@router.post("/api/v1/jobs/{job_id}/retry", tags=["jobs"], summary="Retry a job (admin)")
def retry_job(request: Request, who: Admin, job_id: str, rerun: bool = False) -> dict[str, Any]:
    """Queue a failed or cancelled job again; ``rerun=true`` also re-runs a done job."""
    return backend(request).jobs.retry(who, job_id, rerun)


@router.post("/api/v1/jobs/{job_id}/cancel", tags=["jobs"], summary="Cancel a job (admin)")
def cancel_job(request: Request, who: Admin, job_id: str) -> dict[str, Any]:
    """Cancel a job that has not finished."""
    return backend(request).jobs.cancel(who, job_id)


# -- rules ----------------------------------------------------------------------------------


@router.get("/api/v1/rules", tags=["rules"], summary="The rules in force")
def current_rules(request: Request, who: Viewer) -> dict[str, Any]:
    """The rules as a list and as YAML, with the pipeline and destination names available."""
    return backend(request).rules.current()


@router.post("/api/v1/rules/validate", tags=["rules"], summary="Validate a draft",
             responses={422: {"description": "Invalid: `problems` lists key paths and reasons"}})
def validate_rules(request: Request, who: Viewer, body: RulesDraftBody) -> dict[str, Any]:
    """Schema, references and condition syntax of a draft; 422 with problems when invalid."""
    parsed = backend(request).rules.parse_draft(body.draft())
    return {"valid": True, "rules": [r.name for r in parsed.rules]}


@router.post("/api/v1/rules/test", tags=["rules"],
             summary="Test a draft against a stored series or an uploaded DICOM file")
def test_rules(request: Request, who: Viewer, body: RulesTestBody) -> dict[str, Any]:
    """The same explanation as ``omnimri-node rules explain`` (``decision`` and ``text``)."""
    return backend(request).rules.test(who, body.draft(), series_uid=body.series_uid,
                                       dicom_base64=body.dicom_base64)


@router.put("/api/v1/rules", tags=["rules"], summary="Apply a draft (admin)")
def apply_rules(request: Request, who: Admin, body: RulesDraftBody) -> dict[str, Any]:
    """Validate, write to config.yaml (previous file kept as ``.bak``), reload the router."""
    return backend(request).rules.apply(who, body.draft())


# -- destinations ---------------------------------------------------------------------------


@router.get("/api/v1/destinations", tags=["destinations"], summary="List destinations")
def list_destinations(request: Request, who: Viewer) -> list[dict[str, Any]]:
    """Configured destinations (kind and target; never passwords or tokens)."""
    return backend(request).destinations.configured()


@router.post("/api/v1/destinations/{name}/test", tags=["destinations"],
             summary="Test a destination (admin)")
def test_destination(request: Request, who: Admin, name: str) -> dict[str, Any]:
    """C-ECHO a DICOM peer, call an HTTP destination, or check a folder is writable."""
    return backend(request).destinations.test(who, name)


# -- audit ----------------------------------------------------------------------------------


@router.get("/api/v1/audit", tags=["audit"], summary="Recent audit records (admin)")
def audit_tail(request: Request, who: Admin, event: str | None = None,
               limit: Annotated[int, Query(ge=1, le=5000)] = 100) -> list[dict[str, Any]]:
    """The last ``limit`` lines of the audit trail, optionally of one event kind."""
    return backend(request).audit_trail.tail(limit, event)
