"""The node's parts every admin resource shares: settings, database handles and the audit log.

One :class:`NodeParts` per :class:`~dicom_node.admin.backend.AdminBackend`; the resources
(health, series, jobs, rules, destinations, audit trail) read the settings in force through it,
so that rules applied by one resource are seen by all.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.admin.auth import Principal
from dicom_node.audit import AuditLog
from dicom_node.config import NodeSettings
from dicom_node.logs import get_logger

if TYPE_CHECKING:
    from dicom_node.index import SeriesIndex
    from dicom_node.jobs import JobQueue

log = get_logger("admin")


class NodeParts:
    """Settings in force, the lazily opened series index and job queue, and the audit log.

    Args:
        settings: The loaded configuration (replaced when rules are applied).
        config_path: The ``config.yaml`` that applying rules rewrites; ``None`` keeps applied
            rules in memory only.
        audit: Where admin actions are recorded; default ``AuditLog(settings.audit.path)``.
    """

    def __init__(self, settings: NodeSettings, *, config_path: Path | None = None,
                 audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.audit = audit if audit is not None else AuditLog(settings.audit.path)
        self.lock = threading.RLock()
        self._index: SeriesIndex | None = None
        self._queue: JobQueue | None = None

    @property
    def index(self) -> SeriesIndex:
        """The :class:`~dicom_node.index.SeriesIndex` over the node database (opened once)."""
        with self.lock:
            if self._index is None:
                from dicom_node.index import SeriesIndex

                self._index = SeriesIndex(self.settings.storage.database_path)
            return self._index

    @property
    def queue(self) -> JobQueue:
        """The :class:`~dicom_node.jobs.JobQueue` over the node database (opened once)."""
        with self.lock:
            if self._queue is None:
                from dicom_node.jobs import JobQueue

                self._queue = JobQueue(self.settings)
            return self._queue

    def close(self) -> None:
        """Close the database connections opened here (they reopen on next use)."""
        with self.lock:
            if self._queue is not None:
                self._queue.close()
                self._queue = None
            if self._index is not None:
                self._index.close()
                self._index = None

    def record(self, who: Principal, action: str, target: str | None, status: str = "ok",
               **extra: Any) -> None:
        """Write one admin action to the audit log with the caller's token id and role.

        A failing audit write is logged, not raised: the action itself already happened.
        """
        try:
            self.audit.admin_action(token_id=who.token_id, action=action, target=target,
                                    status=status, role=who.role, **extra)
        except OSError as err:
            log.error("audit_write_failed", action=action, error=str(err))
