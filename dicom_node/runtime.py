"""The running node: the listener, the series tracker and any services added to them.

Other parts of the node (router, worker pool, dispatcher, admin API) plug in with
:meth:`Node.add_service`: anything with ``start()`` and ``stop()``. Services start after the
index and tracker are up (in the order added) and stop in reverse order, before the tracker;
the listener starts last and stops first, so nothing is received that cannot be handled.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Protocol

from dicom_node.config import NodeSettings
from dicom_node.fastscp import make_listener
from dicom_node.index import SeriesIndex
from dicom_node.jobs import JobQueue
from dicom_node.logs import get_logger
from dicom_node.router import Router
from dicom_node.series_tracker import SeriesTracker
from dicom_node.spool import Spool
from dicom_node.worker import WorkerPool

log = get_logger("runtime")


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
    """

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.spool = Spool(settings.storage.path, fsync=settings.storage.fsync)
        self.index = SeriesIndex(settings.storage.database_path)
        self.tracker = SeriesTracker(self.index, settings.completion)
        self.listener = make_listener(settings, self.index, self.spool, self.tracker)
        # Jobs (H3): the worker pool and the router that feeds it (stopped before the tracker).
        self.jobs = JobQueue(settings)
        self.workers = WorkerPool(settings, self.jobs)
        self.router = Router(settings, self.jobs, self.index, on_enqueued=self.workers.wake)
        self.tracker.add_listener(lambda _event: self.router.wake())
        self._services: list[Service] = [self.workers, self.router]
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
                 database=str(self.settings.storage.database_path),
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
        self.index.close()
        self._running = False
        log.info("node_stopped")

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
