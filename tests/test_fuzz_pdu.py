"""Fuzzing the node's PDU decoder (dicom_node.fastscp.upper_layer) through its public functions.

Properties: for any bytes a peer may send, the decoders answer a value or their documented
``UpperLayerError`` (``PeerClosed`` / ``TimeoutError`` for the socket reader), and the reader
never allocates more than the limit of the PDU type before the body has arrived.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_node.fastscp.upper_layer import (
    ASSOCIATE_RQ_MAX_BYTES,
    P_DATA_TF_TYPE,
    PduReader,
    PeerClosed,
    UpperLayerError,
    command_ui,
    command_uid_raw,
    command_us,
    decode_associate_rq,
    decode_command,
    is_valid_uid,
    iter_pdvs,
)
from tests.fuzz_support import associate_rq_body

MAX_PDATA = 16384 + 6
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read_all(data: bytes) -> list[tuple[int, int]]:
    """Feed ``data`` to a PduReader over a socketpair; the PDUs read until it stops."""
    a, b = socket.socketpair()
    try:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        reader = PduReader(a, MAX_PDATA)
        out = []
        while True:
            try:
                pdu_type, body = reader.read(idle_s=0.5, pdu_s=0.5)
            except (UpperLayerError, PeerClosed, TimeoutError):
                break
            assert reader.limit(pdu_type) >= len(body)
            out.append((pdu_type, len(body)))
        assert len(reader._buf) <= max(MAX_PDATA, ASSOCIATE_RQ_MAX_BYTES)
        return out
    finally:
        a.close()
        b.close()


_PDU = st.builds(
    lambda t, n, body: struct.pack(">BxL", t, n) + body,
    st.sampled_from([0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0xFF]),
    st.one_of(st.integers(0, 64), st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, MAX_PDATA,
                                                    MAX_PDATA + 1, ASSOCIATE_RQ_MAX_BYTES + 1])),
    st.binary(max_size=96),
)


@FUZZ
@given(data=st.binary(max_size=512))
def test_reader_on_random_bytes(data: bytes) -> None:
    _read_all(data)


@FUZZ
@given(pdus=st.lists(_PDU, max_size=6))
def test_reader_on_pdu_headers_with_hostile_lengths(pdus: list[bytes]) -> None:
    _read_all(b"".join(pdus))


def test_reader_refuses_a_4gb_claim_without_allocating() -> None:
    got = _read_all(struct.pack(">BxL", P_DATA_TF_TYPE, 0xFFFFFFFF) + b"x" * 100)
    assert got == []


@FUZZ
@given(body=st.binary(max_size=256))
def test_pdvs(body: bytes) -> None:
    try:
        for context_id, _is_cmd, _last, value in iter_pdvs(body):
            assert 0 <= context_id <= 255 and len(value) <= len(body)
    except UpperLayerError:
        pass


_ELEMENTS = st.lists(st.tuples(st.sampled_from([0x0000, 0x0002, 0x0008]),
                               st.integers(0, 0xFFFF), st.binary(max_size=70),
                               st.integers(-3, 3)), max_size=8)


@FUZZ
@given(elements=_ELEMENTS, tail=st.binary(max_size=9))
def test_command_sets(elements: list[tuple[int, int, bytes, int]], tail: bytes) -> None:
    data = b"".join(struct.pack("<HHL", g, e, max(len(v) + d, 0)) + v
                    for g, e, v, d in elements) + tail
    try:
        cmd = decode_command(data)
    except UpperLayerError:
        return
    for elem in (0x0002, 0x0100, 0x0110, 0x1000):
        command_ui(cmd, elem)
        is_valid_uid(command_uid_raw(cmd, elem))
        with contextlib.suppress(UpperLayerError):
            command_us(cmd, elem)


RQ = associate_rq_body()


def test_valid_associate_rq_decodes() -> None:
    assert decode_associate_rq(RQ).called_ae_title == "OMNIMRI"


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(RQ) - 1), st.integers(1, 255)), max_size=6),
       cut=st.integers(0, len(RQ)), junk=st.binary(max_size=12))
def test_mutated_associate_rq(flips: list[tuple[int, int]], cut: int, junk: bytes) -> None:
    body = bytearray(RQ)
    for where, mask in flips:
        body[where] ^= mask
    for data in (bytes(body), bytes(body[:cut]), bytes(body[:cut]) + junk):
        with contextlib.suppress(UpperLayerError):
            decode_associate_rq(data)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_associate_rq(data: bytes) -> None:
    with contextlib.suppress(UpperLayerError):
        decode_associate_rq(data)
