"""Raw DICOM Upper Layer PDUs for the fuzz tests (built by hand, so they can be broken)."""

from __future__ import annotations

import struct

VERIFICATION = "1.2.840.10008.1.1"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length (``length`` overrides), body."""
    return struct.pack(">BxL", pdu_type, len(body) if length is None else length) + body


def associate_rq_body(called: str = "OMNIMRI", calling: str = "FUZZ",
                      contexts: list[tuple[int, str, list[str]]] | None = None,
                      max_pdu: int = 16384) -> bytes:
    """The body of an A-ASSOCIATE-RQ (PS3.8 §9.3.2)."""
    contexts = contexts or [(1, VERIFICATION, [IMPLICIT_LE])]
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
    body += b"\0" * 32 + _item(0x10, APP_CONTEXT.encode())
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode())
                                                          for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">L", max_pdu)))
    return body


def associate_rq(**kw: object) -> bytes:
    """A whole A-ASSOCIATE-RQ PDU."""
    return pdu(0x01, associate_rq_body(**kw))  # type: ignore[arg-type]


def element(elem: int, value: bytes) -> bytes:
    """A group 0000 command element (Implicit VR LE)."""
    return struct.pack("<HHL", 0, elem, len(value)) + value


def command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set with its group length."""
    body = b"".join(element(e, v) for e, v in elements)
    return element(0x0000, struct.pack("<L", len(body))) + body


def ui(uid: str | bytes) -> bytes:
    """A UI value padded to even length."""
    raw = uid.encode("latin-1") if isinstance(uid, str) else uid
    return raw + (b"\0" if len(raw) % 2 else b"")


def us(value: int) -> bytes:
    """An US value."""
    return struct.pack("<H", value)


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set."""
    return command([(0x0002, ui(VERIFICATION)), (0x0100, us(0x0030)), (0x0110, us(message_id)),
                    (0x0800, us(0x0101))])


def c_store_rq(sop_class: str | bytes, sop_instance: str | bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (a data set follows)."""
    return command([(0x0002, ui(sop_class)), (0x0100, us(0x0001)), (0x0110, us(message_id)),
                    (0x0700, us(0)), (0x0800, us(0x0000)), (0x1000, ui(sop_instance))])


def p_data(context_id: int, value: bytes, *, is_command: bool, last: bool = True) -> bytes:
    """A P-DATA-TF PDU with one PDV."""
    control = (0x01 if is_command else 0) | (0x02 if last else 0)
    return pdu(0x04, struct.pack(">LBB", len(value) + 2, context_id, control) + value)


RELEASE_RQ = pdu(0x05, b"\0\0\0\0")
ABORT = pdu(0x07, b"\0\0\0\0")
