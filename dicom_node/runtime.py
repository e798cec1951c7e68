"""The running node, built in one place: :func:`build_node` (the composition root).

:class:`Node` holds the core — spool, index, series tracker, DICOM listener, job queue, worker
pool and router — and the process's engine cache. :func:`build_node` adds what the
configuration asks for: the completion observer (metrics + audit), the config reloader (with a
``config.yaml``), the retention service (``storage.retention_days``) and the admin API and
console (``admin.enabled``). :func:`run_node` configures logging, audit and metrics and serves
until SIGTERM/SIGINT; ``omnimri-node serve`` only parses its arguments and calls it.

Other parts plug in with :meth:`Node.add_service`: anything with ``start()`` and ``stop()``.
Services start after the index and tracker are up (in the order added) and stop in reverse
order, before the tracker; the listener starts last and stops first, so nothing is received
that cannot be handled. Engines close after the services (at shutdown) and when a reloaded
configuration no longer uses them.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from dicom_node.config import NodeSettings
from dicom_node.db import redact
from dicom_node.fastscp import make_listener
from dicom_node.index import CompletionEvent, SeriesIndex
from dicom_node.jobs import JobQueue
from dicom_node.logs import get_logger
from dicom_node.nodes import NodeRegistry
from dicom_node.router import Router
from dicom_node.series_tracker import SeriesTracker
from dicom_node.spool import Spool
from dicom_node.worker import WorkerPool
from inference.engines.cache import EngineCache, default_cache

if TYPE_CHECKING:
    from dicom_node.reload import ConfigReloader

log = get_logger("runtime")

RESTART_SECTIONS = ("node", "storage", "admin", "audit", "logging")
"""Settings a reload cannot change in a running node (the ``config_applied`` line names them)."""


class Service(Protocol):
    """A part of the node with a life cycle."""

    def start(self) -> None:
        """Start (return promptly; run in background threads)."""

    def stop(self) -> None:
        """Stop and release resources; called once, in reverse start order."""


class Node:
    """One OmniMRI node process.

    Args:
        settings: The validated configuration (:func:`dicom_node.config.load_config`).

    Attributes:
        index: The SQLite series index (``storage.database_path``).
        spool: The spool folder (``storage.path``).
        tracker: The series-completion tracker.
        listener: The DICOM listener.
        engines: The engine cache the model pipelines share (the process's
            :func:`~inference.engines.cache.default_cache`): pruned by :meth:`apply_settings`,
            closed by :meth:`stop`.
    """

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.engines: EngineCache = default_cache()
        self.spool = Spool(settings.storage.path, fsync=settings.storage.fsync)
        self.index = SeriesIndex(settings.storage.database_path)
        self.tracker = SeriesTracker(self.index, settings.completion)
        self.listener = make_listener(settings, self.index, self.spool, self.tracker)
        # Jobs (H3): the worker pool and the router that feeds it (stopped before the tracker).
        self.jobs = JobQueue(settings)
        self.workers = WorkerPool(settings, self.jobs)
        self.router = Router(settings, self.jobs, self.index, on_enqueued=self.workers.wake)
        self.tracker.add_listener(lambda _event: self.router.wake())
        # The nodes table: which node processes share the database (omnimri-node nodes).
        self._services: list[Service] = [NodeRegistry(settings), self.workers, self.router]
        self._started: list[Service] = []
        self._stop_requested = threading.Event()
        self._running = False

    def add_service(self, service: Service) -> None:
        """Add a service started after the tracker and before the listener."""
        if self._running:
            raise RuntimeError("add services before start()")
        self._services.append(service)

    def start(self) -> None:
        """Start everything (in the background)."""
        t0 = time.perf_counter()
        purged = self.spool.purge_incoming()
        if purged:
            log.info("incoming_purged", files=purged,
                     detail="partial receptions of a previous run (never acknowledged)")
        self.tracker.start()
        self._started.append(self.tracker)
        for svc in self._services:
            svc.start()
            self._started.append(svc)
        self.listener.start()
        self._started.append(self.listener)
        self._running = True
        log.info("node_started", ae_title=self.settings.node.ae_title,
                 port=self.listener.port, spool=str(self.spool.root),
                 database=redact(self.settings.storage.database_path),
                 quiet_seconds=self.settings.completion.quiet_seconds,
                 services=[type(s).__name__ for s in self._services],
                 startup_s=round(time.perf_counter() - t0, 3))

    def stop(self) -> None:
        """Stop everything, listener first."""
        while self._started:
            svc = self._started.pop()
            try:
                svc.stop()
            except Exception:  # noqa: BLE001 - stop the others anyway
                log.exception("service_stop_failed", service=type(svc).__name__)
        closed = self.engines.close()
        self.index.close()
        self._running = False
        log.info("node_stopped", engines_closed=closed)

    def apply_settings(self, new: NodeSettings) -> None:
        """Use a reloaded configuration: rules, pipelines, destinations and jobs at once.

        Engines the new configuration no longer uses are closed (one in use closes when its
        job ends). Listener, storage, admin, audit and logging settings need a restart; the
        ``config_applied`` log line names those that differ from the running ones.
        """
        from dicom_node.pipelines.models import engine_slots

        restart = [k for k in RESTART_SECTIONS if getattr(new, k) != getattr(self.settings, k)]
        self.router.apply_settings(new)
        self.workers.apply_settings(new)
        evicted = self.engines.retain(engine_slots(new))
        log.info("config_applied", rules=len(new.rules), pipelines=len(new.pipelines),
                 destinations=len(new.destinations), engines_closed=evicted,
                 needs_restart=restart)

    def observe_completion(self, event: CompletionEvent) -> None:
        """Count, time and audit one completed series (UIDs and counts only)."""
        from dicom_node import metrics
        from dicom_node.audit import get_audit

        metrics.record_series_completed(event.reason)
        info = self.index.get_series(event.series_instance_uid) or {}
        last = info.get("last_received_at")
        if last:
            wait = (event.completed_at - datetime.fromisoformat(last)).total_seconds()
            metrics.observe_stage("completion_wait", max(wait, 0.0))
        get_audit().series_received(
            study_uid=str(info.get("study_instance_uid", "")),
            series_uid=event.series_instance_uid,
            instances=event.instance_count,
            revision=event.revision,
            reason=event.reason,
        )

    def listener_ready(self) -> tuple[bool, str]:
        """Readiness of the DICOM listener (its port accepts TCP connections)."""
        host = self.settings.node.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        port = self.listener.port
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True, f"listening on port {port}"
        except OSError:
            return False, f"DICOM port {port} not accepting connections"

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (safe from signal handlers and threads)."""
        self._stop_requested.set()

    def serve_forever(self) -> None:
        """Start, block until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self._stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)


def config_reloader(node: Node, config_path: Path) -> ConfigReloader:
    """Reload ``config_path`` on SIGHUP or when it changes, into :meth:`Node.apply_settings`."""
    from dicom_node.reload import ConfigReloader

    return ConfigReloader(config_path, node.apply_settings, initial=node.settings)


def build_node(settings: NodeSettings, config_path: Path | None = None) -> Node:
    """The composition root: the node with every service its configuration asks for.

    Args:
        settings: The validated configuration.
        config_path: The ``config.yaml`` it came from: reloaded on change and SIGHUP, and the
            file the admin rule editor rewrites; ``None`` for neither.

    With ``storage.retention_days`` set, :class:`~dicom_node.retention.RetentionService` purges
    finished series; with ``admin.enabled`` the admin API and console
    (:class:`~dicom_node.admin.AdminServer`) run as a service, and rules applied through it take
    effect at once in the running router.
    """
    node = Node(settings)
    node.tracker.add_listener(node.observe_completion)
    if config_path is not None:
        node.add_service(config_reloader(node, config_path))
    if settings.storage.retention_days is not None:
        from dicom_node.retention import RetentionService

        node.add_service(RetentionService(settings, node.index))
    if settings.admin.enabled:
        from dicom_node.admin import AdminServer

        admin = AdminServer(settings, config_path=config_path, ready_check=node.listener_ready)
        admin.backend.rules_hooks.append(node.router.apply_settings)
        node.add_service(admin)
    return node


def run_node(settings: NodeSettings, config_path: Path | None = None) -> None:
    """Configure logging, audit and metrics, then run :func:`build_node` until SIGTERM/SIGINT."""
    from dicom_node import metrics
    from dicom_node.audit import configure_audit
    from dicom_node.logs import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    configure_audit(settings.audit.path)
    metrics.bind_node(settings)
    build_node(settings, config_path).serve_forever()
