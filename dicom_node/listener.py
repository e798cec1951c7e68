"""The DICOM listener: the node's Storage SCP, which acknowledges only durable instances.

There is one receive path, the node's own DICOM Upper Layer in :mod:`dicom_node.fastscp`
(plain TCP and DICOM TLS); pynetdicom is used only for its PDU classes there and as the node's
C-STORE SCU (unpatched). This module keeps the names other code imports.

- :class:`Listener` — :class:`dicom_node.fastscp.receiver.Listener`.
- :class:`CallerPolicy`, :class:`AssociationStats` — :mod:`dicom_node.fastscp.policy`.
"""

from __future__ import annotations

from dicom_node.fastscp.policy import (
    REJECT_PLAIN_WHEN_TLS_REQUIRED,
    AssociationStats,
    CallerPolicy,
)
from dicom_node.fastscp.receiver import Listener, make_listener

__all__ = ["REJECT_PLAIN_WHEN_TLS_REQUIRED", "AssociationStats", "CallerPolicy", "Listener",
           "make_listener"]
