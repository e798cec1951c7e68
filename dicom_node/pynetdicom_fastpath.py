"""Event-driven reactors for pynetdicom: no 1 ms polling sleeps on the receive path.

pynetdicom 3's two per-association threads poll: the DUL reactor sleeps 1 ms whenever a loop
finds nothing to do, and the acceptor's reactor sleeps 1 ms before every look at the DIMSE
queue. Each C-STORE crosses both loops several times (request PDUs in, response primitive out),
so a single association cannot go much faster than a few hundred instances per second however
fast the disk is. :func:`install` replaces, for the whole process:

- ``DULServiceProvider.run_reactor``: when idle, ``select()`` on the association's socket and
  on a wake-up socket pair that ``send_pdu``/``kill_dul`` write to, instead of sleeping;
- ``Association._run_reactor`` (acceptors only): a blocking ``get`` on the DIMSE message queue
  (10 ms timeout for the release/abort/idle checks) instead of sleep-then-poll;
- ``AssociationSocket.recv``: ``recv_into`` a buffer of the PDU's size instead of 4 KiB reads;
- the per-association ``deepcopy`` of the supported contexts: a flat copy (0.2 s → ~5 ms with
  every storage SOP class × every transfer syntax).

Behaviour is otherwise pynetdicom's (the loop bodies are its own, in the same order); the
replacements are only for pynetdicom ``3.x`` and :func:`install` refuses other versions.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import select
import socket
import ssl
from typing import Any

import pynetdicom
from pynetdicom import association as pnd_association
from pynetdicom import dul as pnd_dul
from pynetdicom import transport as pnd_transport
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext

IDLE_WAIT_S = 0.05
"""Longest the DUL reactor blocks in ``select`` when idle (ARTIM/kill checks), seconds."""

ACCEPTOR_WAIT_S = 0.01
"""Longest the acceptor reactor waits for a DIMSE message before its other checks, seconds."""

_installed = False
_orig_send_pdu = pnd_dul.DULServiceProvider.send_pdu
_orig_kill_dul = pnd_dul.DULServiceProvider.kill_dul
_orig_assoc_reactor = pnd_association.Association._run_reactor


def _wake(dul: Any) -> None:
    w = getattr(dul, "_omni_wake", None)
    if w is not None:
        with contextlib.suppress(OSError):
            w.send(b"\0")


def _send_pdu(self: Any, primitive: Any) -> None:
    _orig_send_pdu(self, primitive)
    _wake(self)


def _kill_dul(self: Any) -> None:
    _orig_kill_dul(self)
    _wake(self)


def _wait_idle(dul: Any, wake_r: socket.socket) -> None:
    """Block until the peer sent data, a primitive is queued, or :data:`IDLE_WAIT_S`."""
    if not dul.to_provider_queue.empty():
        return
    fds: list[Any] = [wake_r]
    timeout = IDLE_WAIT_S
    assoc_sock = dul.socket
    raw = getattr(assoc_sock, "socket", None) if assoc_sock is not None else None
    if raw is not None and getattr(assoc_sock, "_is_connected", False):
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        fds.append(raw)
    else:
        timeout = 0.001  # not connected yet (requestor) or closing: poll briefly
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except (OSError, ValueError):
        return
    if wake_r in ready:
        with contextlib.suppress(OSError):
            while wake_r.recv(4096):
                pass


def _dul_run_reactor(self: Any) -> None:
    """The DUL reactor loop of pynetdicom, waiting on the socket instead of sleeping."""
    self._idle_timer.start()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    self._omni_wake = wake_w
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - same handling as pynetdicom's
                pnd_dul.LOGGER.error("Exception in DUL.run(), aborting association")
                pnd_dul.LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                _wait_idle(self, wake_r)
                continue
            self.state_machine.do_action(event)
    finally:
        self._omni_wake = None
        wake_r.close()
        wake_w.close()


def _acceptor_run_reactor(self: Any) -> None:
    """The acceptor reactor loop of pynetdicom, with a blocking wait on the DIMSE queue.

    Requestors keep pynetdicom's loop: their ``send_*`` calls take responses off the same
    queue from another thread, which a blocking wait here would race with.
    """
    if not self.is_acceptor:
        _orig_assoc_reactor(self)
        return
    LOGGER = pnd_association.LOGGER  # noqa: N806
    evt = pnd_association.evt
    self._is_paused = False
    msg_queue = self.dimse.msg_queue
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        try:
            context_id, msg = msg_queue.get(timeout=ACCEPTOR_WAIT_S)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, context_id)
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def _socket_recv(self: Any, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` (fewer only if the peer closed) with ``recv_into``."""
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    n = 0
    while n < nr_bytes:
        k = self.socket.recv_into(view[n:], nr_bytes - n)
        if not k:
            del view
            return buf[:n]
        n += k
    del view
    return buf


def _copy_contexts(obj: Any, memo: Any = None) -> Any:
    """A fast ``deepcopy`` of the server's supported contexts (done per association).

    A context's only mutable part is its transfer syntax list, so a shallow copy plus that
    list is a full copy; anything else goes to :func:`copy.deepcopy`.
    """
    if isinstance(obj, list) and all(isinstance(c, PresentationContext) for c in obj):
        out = []
        for cx in obj:
            new = copy.copy(cx)
            new._transfer_syntax = list(cx._transfer_syntax)
            out.append(new)
        return out
    return copy.deepcopy(obj, memo)


def install() -> bool:
    """Install the replacements (idempotent); ``False`` if this pynetdicom is not 3.x."""
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith("3."):
        return False
    pnd_dul.DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    pnd_dul.DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    pnd_dul.DULServiceProvider.kill_dul = _kill_dul  # type: ignore[method-assign]
    pnd_association.Association._run_reactor = (  # type: ignore[method-assign]
        _acceptor_run_reactor)
    pnd_transport.AssociationSocket.recv = _socket_recv  # type: ignore[method-assign]
    pnd_transport.deepcopy = _copy_contexts  # type: ignore[assignment]
    _installed = True
    return True
