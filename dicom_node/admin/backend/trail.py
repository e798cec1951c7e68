"""The audit trail in the admin API (``/api/v1/audit``)."""

from __future__ import annotations

from collections import deque
from typing import Any

from dicom_node.admin.backend.parts import NodeParts
from dicom_node.audit import read_audit


class AuditTrail:
    """The last records of the node's audit log.

    Args:
        parts: The shared node parts (the log is ``parts.audit``).
    """

    def __init__(self, parts: NodeParts) -> None:
        self.parts = parts

    def tail(self, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` audit records (optionally of one event kind), newest last."""
        path = self.parts.audit.path
        if path is None:
            return []
        return list(deque(read_audit(path, event=event), maxlen=limit))
