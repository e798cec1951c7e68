"""The fast receive path (``node.receiver: fast``).

The node's own DICOM Upper Layer for C-ECHO / C-STORE, with a group-committed receive journal
for durability.

- :mod:`dicom_node.fastscp.upper_layer` — PDUs and DIMSE command sets.
- :mod:`dicom_node.fastscp.journal` — the append-only receive journal and its replay.
- :mod:`dicom_node.fastscp.receiver` — :class:`FastListener` and :func:`make_listener`.
"""

from dicom_node.fastscp.receiver import FastListener, make_listener, read_header_bytes

__all__ = ["FastListener", "make_listener", "read_header_bytes"]
