"""The receive path under a hostile or broken network, through real sockets (issue #17).

- every length a peer claims is checked before anything is allocated (node RSS stays flat
  under hostile connections, C-ECHO keeps answering);
- every phase has a time limit (garbage, half headers, slow and idle senders are closed
  within the configured timers, and their slots are released);
- command-set UIDs that are not valid UIDs get a failure status, the association goes on.

:class:`RawAssociation` is a minimal C-STORE / C-ECHO SCU on a bare socket (also used by
``benchmarks/soak.py``): it sends exactly the bytes it is told to.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info

from dicom_node import status
from dicom_node.config import load_config
from dicom_node.fastscp import upper_layer as ul
from tests.fixtures.node import NodeProcess, dataset_bytes, store_files

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MR = TEST_FILES / "MR_small.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _ui(elem: int, raw: bytes) -> bytes:
    if len(raw) % 2:
        raw += b"\0"
    return struct.pack("<HHL", 0, elem, len(raw)) + raw


def _us(elem: int, value: int) -> bytes:
    return struct.pack("<HHL", 0, elem, 2) + struct.pack("<H", value)


def command(field: int, msg_id: int, sop_class: bytes, sop_instance: bytes | None,
            has_dataset: bool) -> bytes:
    """A DIMSE request command set (Implicit VR LE) with the UIDs exactly as given."""
    body = _ui(0x0002, sop_class) + _us(0x0100, field) + _us(0x0110, msg_id)
    if field == ul.C_STORE_RQ:
        body += _us(0x0700, 0)
    body += _us(0x0800, 0x0000 if has_dataset else ul.NO_DATASET)
    if sop_instance is not None:
        body += _ui(0x1000, sop_instance)
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def associate_rq(contexts: list[tuple[str, str]], calling: str = "RAWSCU",
                 called: str = "OMNIMRI", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU (pynetdicom's encoder) proposing ``contexts`` (ids 1, 3, ...)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title = calling
    rq.called_ae_title = called
    cxs = []
    for k, (sop_class, ts) in enumerate(contexts):
        cx = build_context(sop_class, [ts])
        cx.context_id = 2 * k + 1
        cxs.append(cx)
    rq.presentation_context_definition_list = cxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    rq.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return bytes(pdu.encode())


class RawAssociation:
    """A bare-socket SCU: one association, C-ECHO and C-STORE of raw data set bytes.

    Args:
        port: The node's port.
        contexts: (SOP class, transfer syntax) to propose; Verification is added as id 1.
    """

    def __init__(self, port: int, contexts: list[tuple[str, str]], calling: str = "RAWSCU",
                 timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout_s = timeout_s
        proposed = [("1.2.840.10008.1.1", "1.2.840.10008.1.2"), *contexts]
        self.sock.sendall(associate_rq(proposed, calling))
        pdu_type, _ = ul.read_pdu(self.sock, 1 << 20, timeout_s)
        if pdu_type != ul.A_ASSOCIATE_AC_TYPE:
            raise ConnectionError(f"association not accepted (PDU type {pdu_type})")
        self.context_of = {sc: 2 * k + 3 for k, (sc, _) in enumerate(contexts)}
        self.msg_id = 0

    def _response(self) -> int:
        """Read PDUs up to a last command fragment; its Status."""
        data = bytearray()
        while True:
            pdu_type, body = ul.read_pdu(self.sock, 1 << 24, self.timeout_s)
            if pdu_type != ul.P_DATA_TF_TYPE:
                raise ConnectionError(f"PDU type 0x{pdu_type:02X} instead of a response")
            for _, is_cmd, last, value in ul.iter_pdvs(body):
                if is_cmd:
                    data += value
                    if last:
                        return ul.command_us(ul.decode_command(data), 0x0900)

    def echo(self) -> int:
        """C-ECHO; its status."""
        self.msg_id += 1
        cmd = command(ul.C_ECHO_RQ, self.msg_id, b"1.2.840.10008.1.1", None, False)
        self.sock.sendall(ul.p_data_tf(1, cmd))
        return self._response()

    def send_store(self, sop_class: str, sop_instance: bytes, dataset: bytes,
                   fragment: int = 16000, pause_s: float = 0.0) -> None:
        """Send a C-STORE-RQ and its data set (fragments of ``fragment`` bytes)."""
        self.msg_id += 1
        cx = self.context_of[sop_class]
        cmd = command(ul.C_STORE_RQ, self.msg_id, sop_class.encode(), sop_instance, True)
        self.sock.sendall(ul.p_data_tf(cx, cmd))
        for pos in range(0, len(dataset), fragment):
            part = dataset[pos:pos + fragment]
            last = pos + fragment >= len(dataset)
            pdv = struct.pack(">LBB", len(part) + 2, cx, 0x02 if last else 0x00) + part
            self.sock.sendall(struct.pack(">BxL", ul.P_DATA_TF_TYPE, len(pdv)) + pdv)
            if pause_s and not last:
                time.sleep(pause_s)

    def store(self, sop_class: str, sop_instance: bytes, dataset: bytes, **kw: float) -> int:
        """C-STORE; its status."""
        self.send_store(sop_class, sop_instance, dataset, **kw)  # type: ignore[arg-type]
        return self._response()

    def release(self) -> None:
        """A-RELEASE-RQ, wait for the RP, close."""
        try:
            self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            ul.read_pdu(self.sock, 64, self.timeout_s)
        finally:
            self.sock.close()

    def abort(self) -> None:
        """A-ABORT and close."""
        try:
            self.sock.sendall(ul.a_abort(0x00, 0x00))
        finally:
            self.sock.close()


def mr_context() -> tuple[str, str]:
    return str(read_file_meta_info(MR).MediaStorageSOPClassUID), EXPLICIT_LE


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def closed_within(sock: socket.socket, limit_s: float) -> float | None:
    """Seconds until the node closes ``sock`` (A-ABORT or FIN/RST), ``None`` past ``limit_s``."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - t0
            if data[:1] == bytes([ul.A_ABORT_TYPE]):
                # the abort may come before the close: wait for the close as well
                continue
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - t0
    except TimeoutError:
        return None


def artim_of(node: NodeProcess) -> float:
    """The node's ARTIM timer (``node.acse_timeout_s``, seconds): what closes an idle socket.

    "Closed at once" means well before it: the node closed the socket for what was sent, not
    because the timer ran out (a bound that holds however loaded the machine is).
    """
    return load_config(node.config).node.acse_timeout_s


def echo_s(port: int) -> float:
    """Seconds for one association with a C-ECHO (connect, echo, release)."""
    t0 = time.monotonic()
    a = RawAssociation(port, [], timeout_s=10)
    assert a.echo() == status.SUCCESS
    a.release()
    return time.monotonic() - t0


def test_hostile_length_claims_allocate_nothing_and_echo_keeps_answering(
        node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(node={"max_associations": 16})
    assert node.proc is not None
    pid = node.proc.pid
    echo_s(node.port)  # warm up (imports, first association)
    artim_s = artim_of(node)
    before = rss_mib(pid)
    claims = [
        b"\x01\x00\xff\xff\xff\xff",  # A-ASSOCIATE-RQ of 4 GiB
        b"\x04\x00\xff\xff\xff\xff",  # P-DATA-TF of 4 GiB before any association
        b"\x01\x00\x00\x10\x00\x01",  # A-ASSOCIATE-RQ of 256 MiB + 1
        b"\x07\x00\x00\x00\x10\x00",  # A-ABORT claiming 4 KiB (always 4 bytes)
        b"\x09\x00\x00\x01\x00\x00",  # no such PDU type
    ]
    socks = []
    for k in range(10):
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        s.sendall(claims[k % len(claims)])
        socks.append(s)
    try:
        for s in socks:
            dt = closed_within(s, 5)
            assert dt is not None and dt < artim_s / 2, "a hostile claim was not closed at once"
        assert echo_s(node.port) < artim_s / 2  # served while they are open
        # And inside an association: a P-DATA-TF claiming more than the negotiated maximum.
        a = RawAssociation(node.port, [mr_context()])
        a.sock.sendall(b"\x04\x00\xff\xff\xff\xff")
        assert closed_within(a.sock, 5) is not None
        a.sock.close()
        grown = rss_mib(pid) - before
        assert grown < 100, f"node RSS grew by {grown:.0f} MiB under hostile claims"
    finally:
        for s in socks:
            s.close()
    errors = node.wait_for_event("association_protocol_error", count=11)
    assert any("claims 4294967295 bytes" in e["reason"] for e in errors)
    assert store_files(node.port, [MR]) == [status.SUCCESS]


def test_garbage_half_headers_slow_and_idle_peers_are_closed_and_free_their_slots(
        node_factory: Callable[..., NodeProcess]) -> None:
    limit = 1.5
    node = node_factory(node={"max_associations": 4, "acse_timeout_s": limit,
                              "network_timeout_s": limit, "dimse_timeout_s": limit})
    socks: list[tuple[str, socket.socket]] = []
    for k in range(1, 8):  # 1-7 garbage bytes: a header that never completes
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        s.sendall(b"\x01\x00\x00\x00\x00\x10\x00"[:k] if k < 6 else b"\x01" + bytes(k - 1))
        socks.append((f"{k} bytes", s))
    idle = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    socks.append(("nothing sent", idle))
    t0 = time.monotonic()
    for what, s in socks:
        dt = closed_within(s, limit + 3)
        assert dt is not None, f"{what}: not closed within the ARTIM timer"
        s.close()
    assert time.monotonic() - t0 < limit + 3

    # A slow sender: a valid A-ASSOCIATE-RQ, one byte every 0.3 s (each read is quick, the
    # whole request is not): ARTIM counts the whole request.
    rq = associate_rq([mr_context()])
    slow = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    stop = threading.Event()

    def trickle() -> None:
        for b in rq:
            if stop.wait(0.3):
                return
            try:
                slow.sendall(bytes([b]))
            except OSError:
                return

    th = threading.Thread(target=trickle, daemon=True)
    th.start()
    dt = closed_within(slow, limit + 3)
    stop.set()
    assert dt is not None and dt < limit + 1.5, "slow A-ASSOCIATE-RQ not closed by ARTIM"
    slow.close()

    # Established, then: an idle association; a PDU whose body never completes; a data set
    # that stops halfway. Each is aborted within its timer and leaves nothing behind.
    assocs = [RawAssociation(node.port, [mr_context()]) for _ in range(3)]
    assocs[1].sock.sendall(b"\x04\x00\x00\x00\x10\x00" + b"\0" * 100)
    sc, _ = mr_context()
    uid = str(pydicom.dcmread(MR, stop_before_pixels=True).SOPInstanceUID).encode()
    data = dataset_bytes(MR)
    cmd = command(ul.C_STORE_RQ, 1, sc.encode(), uid, True)
    assocs[2].sock.sendall(ul.p_data_tf(3, cmd))
    half = data[:3000]
    assocs[2].sock.sendall(struct.pack(">BxLLBB", ul.P_DATA_TF_TYPE, len(half) + 6,
                                       len(half) + 2, 3, 0x00) + half)
    for a in assocs:
        assert closed_within(a.sock, limit + 3) is not None
        a.sock.close()
    # (6 and 7 bytes make a whole header claiming an empty A-ASSOCIATE-RQ: a protocol error)
    node.wait_for_event("association_timeout", count=len(socks) - 2 + 1 + 3)
    node.wait_for_event("association_protocol_error", count=2)
    # All four slots can be had again; nothing partial is left.
    again = [RawAssociation(node.port, [mr_context()]) for _ in range(4)]
    try:
        assert [a.echo() for a in again] == [status.SUCCESS] * 4
    finally:
        for a in again:
            a.release()
    assert list((node.spool / ".incoming").iterdir()) == []
    assert node.index().count_instances() == 0


@pytest.mark.parametrize("bad", [
    b"1.2." + b"3" * 70,  # over 64 characters
    b"1.2.3\t4",  # a tab
    b"1.2\\3.4",  # a backslash (a second value)
    "1.2.3.é".encode(),  # non-ASCII
    b"",  # empty
])
def test_invalid_command_uid_gets_a_failure_status_and_the_association_goes_on(
        node_factory: Callable[..., NodeProcess], bad: bytes) -> None:
    node = node_factory()
    sc, _ = mr_context()
    a = RawAssociation(node.port, [mr_context()], timeout_s=10)
    try:
        t0 = time.monotonic()
        assert a.store(sc, bad, dataset_bytes(MR)) == status.INVALID_COMMAND_UID
        assert time.monotonic() - t0 < 5
        assert a.echo() == status.SUCCESS  # the association goes on
        uid = str(pydicom.dcmread(MR, stop_before_pixels=True).SOPInstanceUID).encode()
        assert a.store(sc, uid, dataset_bytes(MR)) == status.SUCCESS
    finally:
        a.release()
    [ev] = node.wait_for_event("instance_refused")
    assert ev["status"] == "0xC003" and "not a valid UID" in ev["reason"]
    assert node.index().count_instances() == 1
    assert not node.events("association_protocol_error")


def test_malformed_data_sets_are_refused_at_the_door(
        node_factory: Callable[..., NodeProcess]) -> None:
    """Invalid VRs and native pixel data of undefined length get 0xC000, never 0x0000."""
    node = node_factory()
    sc, _ = mr_context()
    good = dataset_bytes(MR)
    pixel = good.find(b"\xe0\x7f\x10\x00OW\x00\x00")
    assert good[:6] == b"\x08\x00\x08\x00CS" and pixel > 0
    cases = {
        "invalid VR": b"\x08\x00\x08\x00ZZ" + good[6:],
        "native pixel data, undefined length, no delimiter":
            good[:pixel + 8] + b"\xff\xff\xff\xff" + good[pixel + 12:],
    }
    a = RawAssociation(node.port, [mr_context()], timeout_s=10)
    try:
        for k, (what, data) in enumerate(cases.items()):
            assert a.store(sc, f"1.2.826.0.1.9.{k}".encode(), data) == \
                status.CANNOT_UNDERSTAND, what
        assert a.echo() == status.SUCCESS
    finally:
        a.release()
    refused = node.wait_for_event("instance_refused", count=len(cases))
    assert {e["status"] for e in refused} == {"0xC000"}
    assert node.index().count_instances() == 0


def test_connections_beyond_the_limit_are_closed_at_once(
        node_factory: Callable[..., NodeProcess]) -> None:
    """Unassociated connections hold no slot, but they are bounded: 2 x max_associations + 16."""
    node = node_factory(node={"max_associations": 1, "acse_timeout_s": 30})
    limit = 2 * 1 + 16
    held = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(limit)]
    try:
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        dt = closed_within(extra, artim_of(node) / 2)
        assert dt is not None, "a connection beyond the limit was kept"
        extra.close()
        assert closed_within(held[0], 0.2) is None  # the others wait for their ARTIM timer
    finally:
        for s in held:
            s.close()
    node.wait_for_event("connection_refused")
    time.sleep(0.5)
    assert echo_s(node.port) < artim_of(node) / 2  # once they are gone, serving as before
