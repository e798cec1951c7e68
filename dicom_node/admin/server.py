"""Serve the admin app with uvicorn in a background thread (a service of the node runtime)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from dicom_node.admin.app import create_app
from dicom_node.admin.backend import AdminBackend
from dicom_node.audit import AuditLog
from dicom_node.config import NodeSettings
from dicom_node.logs import get_logger

log = get_logger("admin")

START_TIMEOUT_S = 15.0
"""How long :meth:`AdminServer.start` waits for the port to be bound, seconds."""


class AdminServer:
    """The admin HTTP API and console on ``settings.admin.host:port``.

    Usage (what ``omnimri-node serve`` does when ``admin.enabled``)::

        server = AdminServer(settings, config_path=Path("config.yaml"))
        server.start()      # returns once the port is bound
        ...
        server.stop()

    Args:
        settings: The node configuration (``admin`` section: host, port, tokens).
        config_path: The config file that applying rules rewrites.
        audit: Audit log for admin actions; default from ``settings.audit.path``.
        ready_check: The runtime's readiness probe, ``() -> (ok, detail)``.
        host: Override of ``settings.admin.host``.
        port: Override of ``settings.admin.port``.
    """

    name = "admin"

    def __init__(self, settings: NodeSettings, *, config_path: Path | None = None,
                 audit: AuditLog | None = None,
                 ready_check: Callable[[], tuple[bool, str]] | None = None,
                 host: str | None = None, port: int | None = None) -> None:
        self.settings = settings
        self.host = host or settings.admin.host
        self.port = port or settings.admin.port
        self.app = create_app(settings, config_path=config_path, audit=audit,
                              ready_check=ready_check)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> AdminBackend:
        """The app's :class:`~dicom_node.admin.backend.AdminBackend` (e.g. to add rules hooks)."""
        b: AdminBackend = self.app.state.backend
        return b

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. ``http://127.0.0.1:8080``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Start serving in a daemon thread; returns once the socket is bound.

        Raises:
            RuntimeError: The server did not start within :data:`START_TIMEOUT_S` (port in use).
        """
        if self._thread is not None:
            return
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("admin_api_not_on_loopback", host=self.host,
                        hint="put it behind TLS (a reverse proxy) on a trusted network")
        if not self.settings.admin.tokens:
            log.warning("admin_api_without_tokens", hint="every call but health is refused")
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                access_log=False, lifespan="off", server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, args=(self._server,),
                                        name="admin-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"admin API did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        log.info("admin_api_started", url=self.url)

    def _serve(self, server: uvicorn.Server) -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind (port in use, bad address)
            log.error("admin_api_bind_failed", host=self.host, port=self.port)

    def stop(self) -> None:
        """Stop serving and wait for the thread (at most a few seconds)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        self.backend.close()

    def __enter__(self) -> AdminServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
