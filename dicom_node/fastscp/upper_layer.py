"""The DICOM Upper Layer (PS3.8) and the few DIMSE commands (PS3.7) the node's receiver speaks.

Association PDUs are decoded and encoded with pynetdicom's own PDU classes
(:mod:`pynetdicom.pdu`); what runs once per instance is done here with :mod:`struct`:

- reading one PDU from a blocking socket (6-byte header, then the body with ``recv_into``),
- splitting a P-DATA-TF into its presentation data values (PDVs),
- decoding a command set (group 0000, always Implicit VR Little Endian) and encoding the
  C-ECHO-RSP / C-STORE-RSP command sets,
- encoding the Part 10 file meta information the node writes before a received data set.
"""

from __future__ import annotations

import functools
import re
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pynetdicom
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

# PDU types (PS3.8 Table 9-11).
A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_AC_TYPE = 0x02
A_ASSOCIATE_RJ_TYPE = 0x03
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_RELEASE_RP_TYPE = 0x06
A_ABORT_TYPE = 0x07

# DIMSE command fields (PS3.7 Annex E).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATASET = 0x0101
"""CommandDataSetType: no data set follows the command."""

A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
"""The A-RELEASE-RP PDU (it has no variable fields)."""

_UID_BYTES = re.compile(rb"[0-9]+(?:\.[0-9]+)*")
"""Digits and dots, no empty component (what :func:`is_valid_uid` accepts within 64 bytes)."""
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")


class UpperLayerError(Exception):
    """The peer broke the protocol (the association is aborted)."""


class PeerClosed(Exception):
    """The peer closed the TCP connection."""


ASSOCIATE_RQ_MAX_BYTES = 64 * 1024
"""Largest A-ASSOCIATE-RQ body accepted, bytes (PS3.8 sets no limit; real ones are < 16 KiB:
a few hundred presentation contexts). A larger claim is refused before anything is read."""

_FIXED_BODY = {A_RELEASE_RQ_TYPE: 4, A_RELEASE_RP_TYPE: 4, A_ABORT_TYPE: 4}
"""PDU types whose body is always 4 bytes."""


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """Fill ``view`` from ``sock`` by the monotonic ``deadline``.

    Raises:
        PeerClosed: the connection ended first.
        TimeoutError: the deadline passed.
    """
    got, n = 0, len(view)
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("PDU not received within its deadline")
        sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise PeerClosed("connection closed by the peer")
        got += k


def recv_exact(sock: socket.socket, n: int, timeout_s: float = 60.0) -> bytearray:
    """Read exactly ``n`` bytes from ``sock`` within ``timeout_s`` seconds (in all).

    Raises:
        PeerClosed: the connection ended first.
        TimeoutError: the time passed.
    """
    buf = bytearray(n)
    with memoryview(buf) as view:
        _recv_into(sock, view, time.monotonic() + timeout_s)
    return buf


class PduReader:
    """Reads PDUs from one socket into one reused buffer, checking each claimed length first.

    Nothing is allocated for a PDU until its header has been checked: an A-ASSOCIATE-RQ may
    claim at most :data:`ASSOCIATE_RQ_MAX_BYTES`, release/abort PDUs exactly 4 bytes, a
    P-DATA-TF at most ``max_pdata`` bytes (the maximum PDU length the node negotiated plus
    the 6-byte header of the PDU, PS3.8 §9.3.1); an unknown PDU type is refused. The buffer
    grows to the largest accepted PDU, so an association holds at most one PDU's worth
    (``max_pdata`` bytes) of receive buffer.

    Args:
        sock: A connected blocking socket (plain or TLS).
        max_pdata: Largest P-DATA-TF body accepted, bytes.
    """

    def __init__(self, sock: socket.socket, max_pdata: int) -> None:
        self.sock = sock
        self.max_pdata = max_pdata
        self._head = bytearray(6)
        self._buf = bytearray(0)

    def limit(self, pdu_type: int) -> int:
        """Largest body accepted for ``pdu_type``, bytes (``-1``: not a PDU type we take)."""
        if pdu_type == P_DATA_TF_TYPE:
            return self.max_pdata
        if pdu_type == A_ASSOCIATE_RQ_TYPE:
            return ASSOCIATE_RQ_MAX_BYTES
        return _FIXED_BODY.get(pdu_type, -1)

    def read(self, idle_s: float, pdu_s: float, until: float | None = None
             ) -> tuple[int, memoryview]:
        """The next PDU: ``(type, body)``; ``body`` is valid until the next call.

        Args:
            idle_s: Longest wait for the first byte of the PDU, seconds (the idle timer, or
                the ARTIM timer before the association).
            pdu_s: Longest the rest of the PDU may take once its first byte came, seconds.
            until: A monotonic deadline for the whole PDU as well (the ARTIM timer).

        Raises:
            UpperLayerError: unknown PDU type or a length over its limit (nothing allocated).
            PeerClosed: the connection ended.
            TimeoutError: a timer expired.
        """
        head = memoryview(self._head)
        self.sock.settimeout(idle_s)
        k = self.sock.recv_into(head, 6)
        if not k:
            raise PeerClosed("connection closed by the peer")
        deadline = time.monotonic() + pdu_s
        if until is not None:
            deadline = min(deadline, until)
        if k < 6:
            _recv_into(self.sock, head[k:], deadline)
        pdu_type, length = _PDU_HEADER.unpack(self._head)
        limit = self.limit(pdu_type)
        if limit < 0:
            raise UpperLayerError(f"unknown PDU type 0x{pdu_type:02X}")
        if length > limit or (pdu_type in _FIXED_BODY and length != limit):
            raise UpperLayerError(f"PDU type 0x{pdu_type:02X} claims {length} bytes; "
                                  f"at most {limit} are accepted")
        if len(self._buf) < length:
            self._buf = bytearray(max(length, min(2 * len(self._buf), limit)))
        body = memoryview(self._buf)[:length]
        _recv_into(self.sock, body, deadline)
        return pdu_type, body


def read_pdu(sock: socket.socket, max_body: int, timeout_s: float = 60.0
             ) -> tuple[int, bytearray]:
    """One PDU: ``(type, body)`` (the body is what follows the 6-byte header).

    Args:
        sock: A blocking socket.
        max_body: Largest body accepted, bytes; a larger PDU is a protocol error.
        timeout_s: Longest the whole PDU may take, seconds.
    """
    deadline = time.monotonic() + timeout_s
    head = bytearray(6)
    with memoryview(head) as view:
        _recv_into(sock, view, deadline)
    pdu_type, length = _PDU_HEADER.unpack(head)
    if length > max_body:
        raise UpperLayerError(f"PDU of {length} bytes exceeds the {max_body} bytes accepted")
    body = bytearray(length)
    with memoryview(body) as view:
        _recv_into(sock, view, deadline)
    return pdu_type, body


def iter_pdvs(body: bytes | bytearray | memoryview) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """The PDVs of a P-DATA-TF body: ``(context id, is command, is last fragment, value)``."""
    view = memoryview(body)
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            raise UpperLayerError("P-DATA-TF: truncated PDV item")
        length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise UpperLayerError("P-DATA-TF: PDV length out of range")
        yield context_id, bool(control & 0x01), bool(control & 0x02), view[pos + 6:pos + 4 + length]
        pos += 4 + length


def decode_command(data: bytes | bytearray) -> dict[int, bytes]:
    """Element number → raw value of a command set (group 0000, Implicit VR LE)."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        group, elem, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise UpperLayerError("command set: not a group 0000 element or runs past its end")
        out[elem] = bytes(data[pos:pos + length])
        pos += length
    if pos != end:
        raise UpperLayerError("command set: trailing bytes")
    return out


def command_us(cmd: dict[int, bytes], elem: int) -> int:
    """An US value of a decoded command set (``UpperLayerError`` if missing)."""
    raw = cmd.get(elem)
    if raw is None or len(raw) != 2:
        raise UpperLayerError(f"command set: (0000,{elem:04X}) missing")
    return int(struct.unpack("<H", raw)[0])


def command_ui(cmd: dict[int, bytes], elem: int) -> str:
    """A UI value of a decoded command set (``""`` if missing)."""
    return cmd.get(elem, b"").rstrip(b"\0 ").decode("ascii", "replace")


def command_uid_raw(cmd: dict[int, bytes], elem: int) -> bytes:
    """A UI value of a decoded command set as sent, without its padding (``b""`` if missing)."""
    return cmd.get(elem, b"").rstrip(b"\0 ")


def is_valid_uid(raw: bytes) -> bool:
    """Whether ``raw`` is a usable UID (PS3.5 §9.1).

    1-64 characters, digits and dots, no empty component. (Leading zeros in a component,
    which some legacy modalities write, are tolerated.)
    """
    return 0 < len(raw) <= 64 and _UID_BYTES.fullmatch(raw) is not None


def _ui(elem: int, uid: str | bytes) -> bytes:
    raw = uid if isinstance(uid, bytes) else uid.encode("ascii", "replace")
    if len(raw) % 2:
        raw += b"\0"
    return _ELEMENT.pack(0, elem, len(raw)) + raw


def _us(elem: int, value: int) -> bytes:
    return _ELEMENT.pack(0, elem, 2) + struct.pack("<H", value)


def encode_response(command_field: int, message_id: int, sop_class: str | bytes,
                    sop_instance: str | bytes | None, status: int) -> bytes:
    """A C-ECHO-RSP / C-STORE-RSP command set (Implicit VR LE, with its group length).

    UIDs given as ``bytes`` are echoed as the request carried them (even when they are not
    valid UIDs), so the sender can match the response.
    """
    body = _ui(0x0002, sop_class) + _us(0x0100, command_field) + _us(0x0120, message_id) \
        + _us(0x0800, NO_DATASET) + _us(0x0900, status)
    if sop_instance is not None:
        body += _ui(0x1000, sop_instance)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding ``command`` as one last command fragment."""
    pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return _PDU_HEADER.pack(P_DATA_TF_TYPE, len(pdv)) + pdv


def a_abort(source: int = 0x02, reason: int = 0x00) -> bytes:
    """An A-ABORT PDU (source 0: service-user, 2: service-provider)."""
    return b"\x07\x00\x00\x00\x00\x04\x00\x00" + bytes([source, reason])


def decode_associate_rq(body: bytes | bytearray | memoryview) -> A_ASSOCIATE:
    """The A-ASSOCIATE primitive of an A-ASSOCIATE-RQ PDU body (pynetdicom's decoder)."""
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(_PDU_HEADER.pack(A_ASSOCIATE_RQ_TYPE, len(body)) + bytes(body))
        return pdu.to_primitive()
    except Exception as err:  # noqa: BLE001 - any decoding failure is a protocol error
        raise UpperLayerError(f"A-ASSOCIATE-RQ undecodable: {type(err).__name__}") from None


def encode_associate_ac(rq: A_ASSOCIATE, results: list[Any], max_pdu: int) -> bytes:
    """An A-ASSOCIATE-AC answering ``rq`` with the negotiated presentation contexts."""
    ac = A_ASSOCIATE()
    ac.application_context_name = rq.application_context_name
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.presentation_context_definition_results_list = results
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = pynetdicom.PYNETDICOM_IMPLEMENTATION_UID
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION
    ac.user_information = [ml, ic, iv]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    return bytes(pdu.encode())


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ with (result, source, reason), PS3.8 Table 9-21."""
    rj = A_ASSOCIATE()
    rj.result = result
    rj.result_source = source
    rj.diagnostic = reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(rj)
    return bytes(pdu.encode())


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxL", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group (Explicit VR LE) of a received instance.

    The same elements pynetdicom writes for a received data set: Media Storage SOP Class and
    Instance UIDs from the C-STORE request, the negotiated transfer syntax, and pynetdicom's
    implementation class UID and version name. (The parts that do not change from one
    instance to the next are encoded once and cached.)
    """
    head = _meta_head(sop_class)
    tail = _meta_tail(transfer_syntax)
    inst = _meta_element(0x0003, b"UI", _even(sop_instance.encode("ascii", "replace"), b"\0"))
    body_len = len(head) + len(inst) + len(tail)
    return b"".join((_PREAMBLE, _meta_element(0x0000, b"UL", struct.pack("<L", body_len)),
                     head, inst, tail))


_PREAMBLE = b"\0" * 128 + b"DICM"


@functools.lru_cache(maxsize=256)
def _meta_head(sop_class: str) -> bytes:
    """File meta version and Media Storage SOP Class UID."""
    return (_meta_element(0x0001, b"OB", b"\x00\x01")
            + _meta_element(0x0002, b"UI", _even(sop_class.encode("ascii", "replace"), b"\0")))


@functools.lru_cache(maxsize=64)
def _meta_tail(transfer_syntax: str) -> bytes:
    """Transfer syntax, implementation class UID and version name."""
    return (_meta_element(0x0010, b"UI", _even(transfer_syntax.encode("ascii"), b"\0"))
            + _meta_element(0x0012, b"UI", _even(
                pynetdicom.PYNETDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\0"))
            + _meta_element(0x0013, b"SH", _even(
                pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")))
