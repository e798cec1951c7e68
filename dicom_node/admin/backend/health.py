"""Readiness and node status for the admin API (``/readyz``, ``/api/v1/status``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from dicom_node import metrics
from dicom_node.admin.backend.parts import NodeParts

ReadyCheck = Callable[[], tuple[bool, str]]
"""The runtime's extra readiness probe (the listener is serving): ``() -> (ok, detail)``."""

ACTIVE_STATES = ("queued", "running", "exporting", "dispatching")
"""Job states counted in the queue depth."""


class Health:
    """Whether the node can take work, and what it is doing.

    Args:
        parts: The shared node parts.
        ready_check: Extra readiness probe, or ``None``.
    """

    def __init__(self, parts: NodeParts, ready_check: ReadyCheck | None = None) -> None:
        self.parts = parts
        self.ready_check = ready_check
        self.started_at = time.time()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Whether the node can take work: database, spool folder, and the runtime's probe."""
        checks: dict[str, str] = {}
        ok = True
        try:
            self.parts.queue.ping()
            checks["database"] = "ok"
        except Exception as err:  # any database/OS failure means not ready
            ok, checks["database"] = False, f"unavailable: {type(err).__name__}"
        spool = self.parts.settings.storage.path
        if spool.is_dir() and os.access(spool, os.W_OK):
            checks["spool"] = "ok"
        else:
            ok, checks["spool"] = False, f"not a writable folder: {spool}"
        if self.ready_check is not None:
            rok, detail = self.ready_check()
            ok = ok and rok
            checks["listener"] = detail
        return ok, checks

    def status(self) -> dict[str, Any]:
        """Node status: AE title and ports, associations, queue depth by state, spool disk.

        ``uptime_s`` is in seconds; the disk figures are in bytes.
        """
        settings = self.parts.settings
        node = settings.node
        usage = metrics.spool_disk_usage(settings.storage.path) or {}
        counts: dict[str, int] = dict(self.parts.queue.counts())
        return {
            "ae_title": node.ae_title,
            "aliases": list(node.aliases),
            "dicom_port": node.port,
            "tls": {"enabled": node.tls.enabled, "port": node.tls.port,
                    "required": node.tls.required, "verify_client": node.tls.verify_client},
            "uptime_s": round(time.time() - self.started_at, 1),
            "associations": {
                "active": int(metrics.sample("omnimri_associations_active")),
                **{r: int(metrics.sample("omnimri_associations_total", {"result": r}))
                   for r in metrics.ASSOCIATION_RESULTS},
            },
            "instances_received": int(metrics.sample("omnimri_instances_received_total")),
            "queue": {
                "by_state": counts,
                "depth": sum(counts.get(s, 0) for s in ACTIVE_STATES),
            },
            "disk": {
                "spool": str(settings.storage.path),
                "total_bytes": usage.get("total"),
                "free_bytes": usage.get("free"),
                "used_bytes": usage.get("used"),
                "min_free_bytes": settings.storage.min_free_bytes,
            },
        }
