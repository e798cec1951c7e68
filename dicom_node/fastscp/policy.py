"""Who may associate, what is negotiated, and what an association counts.

- :class:`CallerPolicy`: the allow-list (calling AE title and host/CIDR), the called AE title
  (``node.ae_title`` or an alias) and ``node.max_associations``, answered with the matching
  A-ASSOCIATE-RJ (result, source, reason) of :mod:`dicom_node.status`.
- :func:`supported_contexts` / :func:`negotiate_contexts`: every storage SOP class and
  Verification, each accepted context getting the *sender's* first proposed transfer syntax
  (pynetdicom's :func:`pynetdicom.presentation.negotiate_as_acceptor` is called as a plain
  function and its result post-processed; nothing in pynetdicom is patched).
- :class:`AssociationStats`: the counters logged when an association ends.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicom_node import status
from dicom_node.config import NodeSettings

VERIFICATION = "1.2.840.10008.1.1"

REJECT_PLAIN_WHEN_TLS_REQUIRED = (status.REJECT_PERMANENT, status.SOURCE_SERVICE_USER, 0x01)
"""A-ASSOCIATE-RJ (rejected-permanent, service-user, no-reason-given) for a plain TCP
association while ``node.tls.required`` is on."""


@dataclass
class AssociationStats:
    """Counters of one association, logged when it ends (times in seconds)."""

    assoc_id: str
    calling_ae: str
    called_ae: str
    peer_host: str
    peer_port: int
    started: float = field(default_factory=time.perf_counter)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    requests: int = 0
    """DIMSE requests received (C-ECHO-RQ, C-STORE-RQ)."""
    responses: int = 0
    """DIMSE responses written to the socket."""
    last_response: float = 0.0
    """``time.monotonic()`` of the last response written (0: none yet)."""
    counted: bool = False
    """Counted in the open-associations gauge (so it is decremented exactly once)."""
    store_s: float = 0.0
    """Time spent storing instances (checks, durability, index), seconds."""
    header_s: float = 0.0
    """Of which: reading and checking the header, seconds."""
    fsync_s: float = 0.0
    """Of which: the journal ``fdatasync`` (or file + folder fsync of a large instance), s."""
    commit_s: float = 0.0
    """Of which: the group commit (journal append + flush; index rows for a large
    instance), seconds."""
    cpu_s: float = 0.0
    """CPU time of the association's thread (``time.thread_time``), seconds."""


class CallerPolicy:
    """Who may associate: the allow-list, the called AE titles and the association limit.

    Args:
        settings: The node configuration (``node`` section).
    """

    def __init__(self, settings: NodeSettings) -> None:
        node = settings.node
        self.called_titles = {node.ae_title.strip(), *(a.strip() for a in node.aliases)}
        self.check_called_ae = node.check_called_ae
        self.max_associations = node.max_associations
        self.allowed = [
            (c.ae_title, None if c.host is None else ipaddress.ip_network(c.host, strict=False))
            for c in node.allowed_callers
        ]

    def check(self, calling_ae: str, called_ae: str, host: str, active: int
              ) -> tuple[tuple[int, int, int], str] | None:
        """``None`` to accept, else the A-ASSOCIATE-RJ (result, source, reason) and why.

        Args:
            calling_ae: The peer's AE title.
            called_ae: The AE title the peer called.
            host: The peer's IP address.
            active: Open associations counting this one.
        """
        if self.allowed and not self._caller_allowed(calling_ae.strip(), host):
            return status.REJECT_UNKNOWN_CALLER, "calling AE/host not on the allow-list"
        if self.check_called_ae and called_ae.strip() not in self.called_titles:
            return status.REJECT_UNKNOWN_CALLED_AE, "called AE title is not ours"
        if active > self.max_associations:
            return status.REJECT_TOO_MANY_ASSOCIATIONS, "too many associations"
        return None

    def _caller_allowed(self, calling_ae: str, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        for ae_title, net in self.allowed:
            if ae_title is not None and ae_title != calling_ae:
                continue
            if net is not None and (addr is None or addr not in net):
                continue
            return True
        return False


def supported_contexts() -> list[PresentationContext]:
    """Verification and every standard storage SOP class, each with every transfer syntax."""
    out: list[PresentationContext] = []
    for uid in [VERIFICATION, *(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)]:
        cx = PresentationContext()
        cx.abstract_syntax = uid
        cx.transfer_syntax = list(ALL_TRANSFER_SYNTAXES)
        out.append(cx)
    return out


def negotiate_contexts(rq_contexts: list[Any], supported: list[PresentationContext]
                       ) -> list[PresentationContext]:
    """Negotiate the proposed contexts; each accepted one gets the sender's first syntax.

    pynetdicom alone picks in the acceptor's order, which would turn an Explicit VR Little
    Endian sender into an Implicit VR one.
    """
    result, _ = negotiate_as_acceptor(rq_contexts, supported, None)
    by_class = {str(cx.abstract_syntax): {str(t) for t in cx.transfer_syntax}
                for cx in supported}
    proposed = {cx.context_id: cx for cx in rq_contexts}
    for cx in result:
        rq = proposed.get(cx.context_id)
        if cx.result != 0x00 or rq is None:
            continue
        ok = by_class.get(str(cx.abstract_syntax), set())
        for ts in rq.transfer_syntax:
            if str(ts) in ok:
                cx.transfer_syntax = [ts]
                break
    return list(result)
