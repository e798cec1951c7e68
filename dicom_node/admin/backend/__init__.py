"""What the admin API does, independent of HTTP: one object over the node's parts.

:class:`AdminBackend` composes one resource per reason to change, over shared
:class:`~dicom_node.admin.backend.parts.NodeParts` (settings in force, series index, job
queue, audit log):

========================  ================================================  =================
attribute                 does                                              module
========================  ================================================  =================
``health``                readiness, node status                            :mod:`.health`
``series``                list, show, thumbnail, rerun, reroute             :mod:`.series`
``jobs``                  list, show, retry, cancel                         :mod:`.jobs`
``rules``                 show, validate, test and apply a draft            :mod:`.rules`
``destinations``          list (no secrets), test                           :mod:`.destinations`
``audit_trail``           the last audit records                            :mod:`.trail`
========================  ================================================  =================

Every change a resource makes is written to the audit log with the caller's token id. Errors
are :class:`AdminError` with an HTTP status and a precise message; what viewers may see is
decided in :mod:`.privacy`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node import metrics
from dicom_node.admin.backend.destinations import DestinationsAdmin
from dicom_node.admin.backend.errors import AdminError
from dicom_node.admin.backend.health import Health, ReadyCheck
from dicom_node.admin.backend.jobs import JobsAdmin
from dicom_node.admin.backend.parts import NodeParts
from dicom_node.admin.backend.privacy import HIDDEN, scrub_for
from dicom_node.admin.backend.rules import RulesAdmin, RulesDraft, RulesHook
from dicom_node.admin.backend.series import SeriesAdmin
from dicom_node.admin.backend.trail import AuditTrail
from dicom_node.audit import AuditLog
from dicom_node.config import NodeSettings

if TYPE_CHECKING:
    from dicom_node.index import SeriesIndex
    from dicom_node.jobs import JobQueue

__all__ = [
    "HIDDEN", "AdminBackend", "AdminError", "AuditTrail", "DestinationsAdmin", "Health",
    "JobsAdmin", "NodeParts", "ReadyCheck", "RulesAdmin", "RulesDraft", "RulesHook",
    "SeriesAdmin", "scrub_for",
]


class AdminBackend:
    """The admin API's view of one node: the resources over one set of node parts.

    Args:
        settings: The loaded configuration (its ``rules`` are replaced by ``rules.apply``).
        config_path: The ``config.yaml`` that ``rules.apply`` rewrites; ``None`` keeps
            applied rules in memory only.
        audit: Where admin actions are recorded; default ``AuditLog(settings.audit.path)``.
        ready_check: Extra readiness probe (the runtime's "listener is serving"); returns
            ``(ok, detail)``.
    """

    def __init__(self, settings: NodeSettings, *, config_path: Path | None = None,
                 audit: AuditLog | None = None,
                 ready_check: ReadyCheck | None = None) -> None:
        self.parts = NodeParts(settings, config_path=config_path, audit=audit)
        self.health = Health(self.parts, ready_check)
        self.jobs = JobsAdmin(self.parts)
        self.series = SeriesAdmin(self.parts, self.jobs)
        self.rules = RulesAdmin(self.parts, self.series)
        self.destinations = DestinationsAdmin(self.parts)
        self.audit_trail = AuditTrail(self.parts)
        metrics.bind_node(settings)

    @property
    def settings(self) -> NodeSettings:
        """The settings in force (replaced when rules are applied)."""
        return self.parts.settings

    @property
    def config_path(self) -> Path | None:
        """The config file applied rules are written to (``None``: in memory only)."""
        return self.parts.config_path

    @property
    def audit(self) -> AuditLog:
        """Where admin actions are recorded."""
        return self.parts.audit

    @property
    def index(self) -> SeriesIndex:
        """The series index over the node database."""
        return self.parts.index

    @property
    def queue(self) -> JobQueue:
        """The job queue over the node database."""
        return self.parts.queue

    @property
    def rules_hooks(self) -> list[RulesHook]:
        """Called with the new settings after rules were applied (append to subscribe)."""
        return self.rules.hooks

    def close(self) -> None:
        """Close the database connections this backend opened."""
        self.parts.close()
