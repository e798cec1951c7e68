"""The node's receive path: its own DICOM Upper Layer for C-ECHO / C-STORE (TCP and TLS).

- :mod:`dicom_node.fastscp.upper_layer` — PDUs (bounded reads with deadlines) and DIMSE
  command sets.
- :mod:`dicom_node.fastscp.policy` — who may associate, context negotiation, counters.
- :mod:`dicom_node.fastscp.header` — the header of a received data set.
- :mod:`dicom_node.fastscp.journal` — the append-only receive journal and its replay.
- :mod:`dicom_node.fastscp.receiver` — :class:`Listener` (the one intake) and
  :func:`make_listener`.
"""

from dicom_node.fastscp.header import read_header_bytes, scan_header
from dicom_node.fastscp.receiver import FastListener, Listener, make_listener

__all__ = ["FastListener", "Listener", "make_listener", "read_header_bytes", "scan_header"]
