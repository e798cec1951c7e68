"""The FastAPI application: API, health checks, ``/metrics`` and the web console."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from dicom_node import __version__
from dicom_node.admin.api import router as api_router
from dicom_node.admin.ask import router as ask_router
from dicom_node.admin.backend import AdminBackend, AdminError
from dicom_node.admin.console import router as console_router
from dicom_node.admin.limits import BodyLimitMiddleware, too_large_detail
from dicom_node.audit import AuditLog
from dicom_node.config import NodeSettings
from dicom_node.logs import get_logger

log = get_logger("admin")

DESCRIPTION = """\
Admin API of an OmniMRI Node: health, status, series, jobs, routing rules, destinations,
Prometheus metrics and the audit trail. Authenticate with `Authorization: Bearer <token>`
(tokens and their roles `viewer`/`admin` are listed under `admin.tokens` in config.yaml).
Changes need the `admin` role and are audited with the token id. Viewers never receive
patient names or IDs.
"""


def create_app(settings: NodeSettings, *, config_path: Path | None = None,
               audit: AuditLog | None = None,
               ready_check: Callable[[], tuple[bool, str]] | None = None,
               backend: AdminBackend | None = None) -> FastAPI:
    """Build the admin app for one node.

    Args:
        settings: The node configuration.
        config_path: The config file that ``PUT /api/v1/rules`` rewrites (``None``: in memory).
        audit: Audit log for admin actions; default from ``settings.audit.path``.
        ready_check: The runtime's readiness probe, ``() -> (ok, detail)``.
        backend: A ready-made backend (tests); the other arguments are then ignored.
    """
    app = FastAPI(title="OmniMRI Node admin API", version=__version__, description=DESCRIPTION,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.admin.max_body_bytes)
    app.state.backend = backend or AdminBackend(settings, config_path=config_path, audit=audit,
                                                ready_check=ready_check)

    @app.exception_handler(AdminError)
    async def _admin_error(request: Request, err: AdminError) -> JSONResponse:
        body: dict[str, object] = {"detail": str(err)}
        if err.problems:
            body["problems"] = err.problems
        if err.status >= 500:
            log.error("admin_request_failed", path=request.url.path, status=err.status)
        return JSONResponse(body, status_code=err.status)

    limit = settings.admin.max_body_bytes

    @app.exception_handler(413)
    async def _too_large(request: Request, err: Exception) -> JSONResponse:
        # A streamed body passed admin.max_body_bytes (BodyLimitMiddleware); "Connection:
        # close" makes the server drop the connection rather than drain the rest.
        log.warning("admin_request_refused", path=request.url.path, status=413,
                    detail=too_large_detail(limit))
        return JSONResponse({"detail": too_large_detail(limit)}, status_code=413,
                            headers={"Connection": "close"})

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse("/console")

    app.include_router(api_router)
    app.include_router(ask_router)
    app.include_router(console_router)
    return app
