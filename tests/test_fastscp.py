"""The node's receive path (its own Upper Layer): codec, journal, replay, node.

The listener suite (tests/test_listener*.py) covers the node's behaviour through real senders;
these tests cover the parts of the receive path itself.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom.dsutils import decode

from dicom_node import status
from dicom_node.config import NodeSettings, parse_config
from dicom_node.fastscp import Listener as FastListener
from dicom_node.fastscp import read_header_bytes
from dicom_node.fastscp import upper_layer as ul
from dicom_node.fastscp.journal import Journal, read_segment
from dicom_node.fastscp.receiver import scan_header
from dicom_node.index import SeriesIndex
from dicom_node.spool import InstanceRejected, Spool, read_header
from omnimri_samples import iter_pydicom_mr_files, synthetic_series, write_series
from tests.fixtures.dcmtk import dcmsend, echoscu
from tests.fixtures.net import free_port
from tests.fixtures.node import NodeProcess, associate, dataset_bytes, store_files

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_response_command_set_decodes_with_pydicom() -> None:
    raw = ul.encode_response(ul.C_STORE_RSP, 7, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.45",
                             status.OUT_OF_RESOURCES)
    ds = decode(BytesIO(raw), True, True)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xA700)
    assert ds.AffectedSOPInstanceUID == "1.2.3.45" and ds.CommandDataSetType == 0x0101
    assert ds.CommandGroupLength == len(raw) - 12
    cmd = ul.decode_command(raw)
    assert ul.command_us(cmd, 0x0120) == 7 and ul.command_ui(cmd, 0x1000) == "1.2.3.45"


def test_pdu_framing_and_bad_pdvs() -> None:
    pdu = ul.p_data_tf(3, b"\x01\x02")
    pdu_type, length = struct.unpack(">BxL", pdu[:6])
    assert (pdu_type, length) == (ul.P_DATA_TF_TYPE, len(pdu) - 6)
    [(cx, is_cmd, last, value)] = list(ul.iter_pdvs(pdu[6:]))
    assert (cx, is_cmd, last, bytes(value)) == (3, True, True, b"\x01\x02")
    with pytest.raises(ul.UpperLayerError, match="PDV length"):
        list(ul.iter_pdvs(pdu[6:-1]))
    with pytest.raises(ul.UpperLayerError, match="group 0000"):
        ul.decode_command(b"\x08\x00\x16\x00\x02\x00\x00\x00MR")


def test_file_meta_and_header_match_the_spool_reader(tmp_path: Path) -> None:
    synthetic = write_series(synthetic_series(2, 16, 16, seed=5), tmp_path / "syn")
    fast = 0
    for i, path in enumerate([*iter_pydicom_mr_files(), *synthetic]):
        meta = read_file_meta_info(path)
        ts = str(meta.TransferSyntaxUID)
        dataset = dataset_bytes(path)
        part10 = ul.file_meta(str(meta.MediaStorageSOPClassUID),
                              str(meta.MediaStorageSOPInstanceUID), ts) + dataset
        copy = tmp_path / f"{i}.dcm"
        copy.write_bytes(part10)
        assert read_file_meta_info(copy).TransferSyntaxUID == meta.TransferSyntaxUID
        expected = read_header(copy)
        assert read_header_bytes(part10) == expected
        scanned = scan_header(dataset, ts)
        assert scanned is None or scanned == expected, path.name
        fast += scanned is not None
        for cut in (7, len(dataset) // 2):
            with pytest.raises(InstanceRejected) as err:
                read_header_bytes(part10[:-cut])
            assert err.value.status == status.CANNOT_UNDERSTAND
            if scanned is None:  # a syntax the struct walk leaves to pydicom (rejected above)
                assert scan_header(dataset[:-cut], ts) is None, path.name
                continue
            with pytest.raises(InstanceRejected, match="^truncated: an element runs past the "
                                                       "end of the data$") as cut_err:
                scan_header(dataset[:-cut], ts)
            assert cut_err.value.status == status.CANNOT_UNDERSTAND, path.name
    assert fast >= len(synthetic) + 1  # the struct walk serves the common syntaxes


def test_journal_records_round_trip_and_a_torn_tail_is_dropped(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", segment_bytes=2000)
    j.prepare(1)
    seqs = [j.append({"n": i}, bytes([i]) * 1200) for i in range(3)]
    j.sync()
    assert seqs == [1, 2, 3]
    segs = j.pending_segments()
    assert len(segs) == 3  # a 1200-byte record fills a 2000-byte segment
    assert all(p.stat().st_size == 2000 for p in segs)  # preallocated, written in place
    assert [h["n"] for s in segs for h, _ in read_segment(s)] == [0, 1, 2]
    # Records 0 and 1 are in the spool: their segments are recycled, record 3 reuses one.
    assert j.release_upto(2, tmp_path) == 2
    assert [h["n"] for s in j.pending_segments() for h, _ in read_segment(s)] == [2]
    assert j.append({"n": 3}, b"x" * 1200) == 4
    j.sync()
    got = [(h["n"], d[:1]) for s in j.pending_segments() for h, d in read_segment(s)]
    assert got == [(2, b"\x02"), (3, b"x")]  # oldest generation first, no stale record
    last = j.pending_segments()[-1]
    raw = bytearray(last.read_bytes())
    raw[600] ^= 0xFF  # a flipped bit (or a torn write) fails the CRC
    last.write_bytes(bytes(raw))
    assert list(read_segment(last)) == []
    j.close(tmp_path, all_materialised=False)
    assert len(j.pending_segments()) == 2


def _settings(root: Path) -> NodeSettings:
    return parse_config({"node": {"ae_title": "OMNIMRI", "host": "127.0.0.1",
                                  "port": free_port()},
                         "storage": {"path": str(root / "spool"), "min_free_bytes": 0,
                                     "min_free_percent": 0}}, base=root)


def test_replay_restores_acknowledged_instances_whose_files_were_lost(tmp_path: Path) -> None:
    """Power loss after the ack: the journal was flushed, the spool files were not."""
    settings = _settings(tmp_path)
    spool = Spool(settings.storage.path)
    index = SeriesIndex(settings.storage.database_path)
    files = write_series(synthetic_series(5, 32, 32, seed=3), tmp_path / "in")
    rx = FastListener(settings, index, spool)
    rx.start()
    try:
        assert store_files(rx.port, files) == [status.SUCCESS] * 5
        stored = index.instances_of(str(pydicom.dcmread(files[0]).SeriesInstanceUID))
        assert len(stored) == 5 and all(i.path.exists() for i in stored)
        # The crash: no clean stop (the journal keeps its open segment); files not durable.
        for inst in stored:
            inst.path.unlink()
        rx._serving = False
        for sock, _ in rx._servers:
            sock.close()
        again = FastListener(settings, index, spool)  # start-up replays the journal
        by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
        assert index.count_instances() == 5
        for inst in stored:
            assert dataset_bytes(inst.path) == dataset_bytes(by_uid[inst.sop_instance_uid])
        assert again.journal.pending_segments() == []
    finally:
        rx._serving = False
        index.close()


def test_fast_node_serves_dcmtk_and_survives_protocol_garbage(
        node_factory: Callable[..., NodeProcess], tmp_path: Path, dcmtk: None) -> None:
    node = node_factory()
    assert node.wait_for_event("listening")[0]["tls"] is False
    assert echoscu(node.port, "OMNIMRI").returncode == 0
    # Garbage instead of an A-ASSOCIATE-RQ, and a P-DATA-TF before any association.
    for junk in (b"GET / HTTP/1.1\r\n\r\n", ul.p_data_tf(1, b"\0" * 8)):
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
            s.sendall(junk)
            s.settimeout(10)
            try:
                reply = s.recv(64)
            except ConnectionResetError:  # closed with our junk unread: a reset
                reply = b""
            assert reply[:1] in (b"", bytes([ul.A_ABORT_TYPE]))
    files = write_series(synthetic_series(30, 64, 64, seed=11), tmp_path / "s")
    r = dcmsend(node.port, files, "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    index = node.index()
    assert index.count_instances() == 30
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    for inst, f in zip(sorted(index.instances_of(series_uid), key=lambda i: i.path.name),
                       sorted(files, key=lambda p: str(pydicom.dcmread(p).SOPInstanceUID)
                              + ".dcm"), strict=True):
        assert dataset_bytes(inst.path) == dataset_bytes(f)
    [done] = node.wait_for_event("association_released", calling_ae="DCMSEND")
    assert (done["stored"], done["duplicates"], done["tls"]) == (30, 0, False)
    # An unsupported abstract syntax is refused in negotiation, the others still work.
    assoc = associate(node.port, contexts=[("1.2.840.10008.5.1.4.1.2.2.1",
                                            "1.2.840.10008.1.2")])
    assert not assoc.is_established or not assoc.accepted_contexts
    if assoc.is_established:
        assoc.release()
    assert store_files(node.port, [TEST_FILES / "MR_small.dcm"]) == [status.SUCCESS]
    node.stop()
    assert list((node.spool / ".journal").iterdir()) == []  # all materialised at a clean stop


def test_large_instances_are_spilled_to_disk_and_stored_durably(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.fastscp import receiver

    monkeypatch.setattr(receiver, "SPILL_BYTES", 20_000)
    settings = _settings(tmp_path)
    spool = Spool(settings.storage.path)
    index = SeriesIndex(settings.storage.database_path)
    big = write_series(synthetic_series(3, 128, 128, seed=9), tmp_path / "big")  # ~33 kB each
    small = TEST_FILES / "MR_small.dcm"  # ~10 kB: in memory, journaled
    rx = FastListener(settings, index, spool)
    rx.start()
    try:
        assert store_files(rx.port, [*big, small, big[0]]) == [status.SUCCESS] * 5
        for f in [*big, small]:
            found = index.lookup_instance(str(pydicom.dcmread(f).SOPInstanceUID))
            assert found is not None and dataset_bytes(found[0]) == dataset_bytes(f)
        assert index.count_instances() == 4
        assert list(spool.incoming.iterdir()) == []
        records = [h["sop_instance_uid"] for s in rx.journal.pending_segments()
                   for h, _ in read_segment(s)]
        assert records == [str(pydicom.dcmread(small).SOPInstanceUID)]  # big ones bypass it
    finally:
        rx.stop()
        index.close()
    assert list((spool.root / ".journal").iterdir()) == []


def test_idle_association_times_out_and_the_removed_receiver_setting_is_refused(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_factory(node={"network_timeout_s": 3})
    idle = associate(node.port)
    assert idle.is_established
    [ev] = node.wait_for_event("association_timeout", timeout_s=15)
    assert ev["timeout_s"] == 3
    node.wait_for_event("association_aborted", timeout_s=10)
    idle.release()  # (already aborted by the node)
    # The node goes on serving. The same 3 s idle timer applies to the storing association:
    # on a loaded machine its sender may pause that long, which the node then logs as one
    # more timeout; only such an explained failure is retried.
    for attempt in range(3):
        if store_files(node.port, [TEST_FILES / "MR_small.dcm"]) == [status.SUCCESS]:
            break
        node.wait_for_event("association_timeout", timeout_s=15, count=attempt + 2)
    else:
        raise AssertionError("the node stored nothing after an idle association timed out")
    # There is one receive path: the removed pynetdicom receiver is refused with a reason.
    from dicom_node.config import ConfigError

    with pytest.raises(ConfigError, match="node.receiver 'pynetdicom' was removed"):
        parse_config({"node": {"receiver": "pynetdicom"}}, tmp_path)
    assert parse_config({"node": {"receiver": "fast"}}, tmp_path).node.receiver == "fast"


def _raw_associate(port: int, sop_class: str, ts: str) -> socket.socket:
    """A raw-socket association proposing one context (id 1), built with pynetdicom's PDUs."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title = "RAWSCU"
    rq.called_ae_title = "OMNIMRI"
    cx = build_context(sop_class, [ts])
    cx.context_id = 1
    rq.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    rq.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(pdu.encode())
    pdu_type, body = ul.read_pdu(s, 1 << 20)
    assert pdu_type == ul.A_ASSOCIATE_AC_TYPE
    return s


def test_abort_in_the_middle_of_a_data_set_leaves_nothing(
        node_factory: Callable[..., NodeProcess]) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    node = node_factory()
    f = TEST_FILES / "MR_small.dcm"
    sop_class, ts = str(read_file_meta_info(f).MediaStorageSOPClassUID), "1.2.840.10008.1.2.1"
    s = _raw_associate(node.port, sop_class, ts)
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = "1.2.3.4.5"
    raw = encode(cmd, True, True)
    assert raw is not None
    s.sendall(ul.p_data_tf(1, raw))
    half = dataset_bytes(f)[:2000]
    pdv = struct.pack(">LBB", len(half) + 2, 1, 0x00) + half  # data, not the last fragment
    s.sendall(struct.pack(">BxL", ul.P_DATA_TF_TYPE, len(pdv)) + pdv)
    s.sendall(ul.a_abort(0x00, 0x00))
    s.close()
    node.wait_for_event("association_aborted", calling_ae="RAWSCU")
    assert node.index().count_instances() == 0
    assert list((node.spool / ".incoming").iterdir()) == []
    assert store_files(node.port, [f]) == [status.SUCCESS]


def _validated_scan_agrees(dataset: bytes, ts: str) -> bool:
    """``scan_header(validated=True)`` answers only what validate() + scan_header() would."""
    from dicom_node.validate import validate

    try:
        fast = scan_header(dataset, ts, validated=True)
    except InstanceRejected as err:
        assert err.status == status.MISSING_UIDS
        assert validate(dataset, ts) is None
        with pytest.raises(InstanceRejected) as slow:
            scan_header(dataset, ts)
        assert slow.value.status == status.MISSING_UIDS
        return True
    if fast is None:
        return False
    assert validate(dataset, ts) is None, "the one-walk path accepted what validate refuses"
    assert scan_header(dataset, ts) == fast
    return True


def test_validated_scan_stands_in_for_validate_only_where_validate_accepts(
        tmp_path: Path) -> None:
    import random

    synthetic = write_series(synthetic_series(2, 16, 16, seed=6), tmp_path / "syn")
    seeds: list[tuple[bytes, str]] = []
    for path in [*iter_pydicom_mr_files(), *synthetic]:
        ts = str(read_file_meta_info(path).TransferSyntaxUID)
        seeds.append((dataset_bytes(path), ts))
    for path in synthetic:  # the node's common case takes the one-walk path
        data = dataset_bytes(path)
        assert scan_header(data, str(read_file_meta_info(path).TransferSyntaxUID),
                           validated=True) is not None
    rng = random.Random(13)
    fast = 0
    for data, ts in seeds:
        fast += _validated_scan_agrees(data, ts)
        for _ in range(150):
            buf = bytearray(data[:4096])  # the header part, where mutations matter
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(buf))
                if rng.random() < 0.7:
                    buf[pos] = rng.randrange(256)
                else:
                    del buf[pos:pos + rng.randint(1, 12)]
            tail = data[4096:] if rng.random() < 0.5 else b""
            cut = bytes(buf) + tail
            fast += _validated_scan_agrees(cut, ts)
            for ts2 in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
                _validated_scan_agrees(cut, ts2)
    assert fast >= len(synthetic)
    # What validate() refuses below the top level or by VR size must never pass the one walk.
    for bad in (_explicit_le(sq=struct.pack("<4sL", b"\xfe\xff\x00\xe0", 100)),
                _explicit_le(rows=b"\x00\x01\x00")):
        ts = "1.2.840.10008.1.2.1"
        assert validate_of(bad, ts) is not None
        assert scan_header(bad, ts, validated=True) is None
        assert _validated_scan_agrees(bad, ts) is False
    good = _explicit_le()
    assert validate_of(good, "1.2.840.10008.1.2.1") is None
    assert scan_header(good, "1.2.840.10008.1.2.1", validated=True) is not None


def validate_of(data: bytes, ts: str) -> object:
    from dicom_node.validate import validate

    return validate(data, ts)


def _explicit_le(*, sq: bytes | None = None, rows: bytes = b"\x00\x01") -> bytes:
    """A minimal Explicit VR LE data set; ``sq``: the content of a defined-length sequence."""
    def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"SQ", b"OB", b"OW", b"UN"):
            return struct.pack("<HH2sxxL", group, elem, vr, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    out = [el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.4\0"),
           el(0x0008, 0x0018, b"UI", b"1.2.3.4"), el(0x0008, 0x0060, b"CS", b"MR")]
    if sq is not None:
        out.append(el(0x0008, 0x1140, b"SQ", sq))
    out += [el(0x0020, 0x000D, b"UI", b"1.2.3.5\0"), el(0x0020, 0x000E, b"UI", b"1.2.3.6\0"),
            el(0x0028, 0x0010, b"US", rows)]
    return b"".join(out)
