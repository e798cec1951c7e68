"""The fast receiver (``node.receiver: fast``): a Storage SCP on its own DICOM Upper Layer.

One thread per association does everything for an instance, with no hand-over between threads
on the hot path: it reads the PDUs from the socket, collects the data set fragments in memory
(a data set above :data:`SPILL_BYTES` goes to a file and the classic fsync + rename path),
checks the header (the same checks and statuses as :class:`~dicom_node.listener.Listener`),
commits its index row, appends the instance to the receive journal
(:mod:`dicom_node.fastscp.journal`), and answers 0x0000 only once the journal record is
flushed (one ``fdatasync``, shared by concurrent associations: group commit). A background
materialiser then writes the spool file (``<study>/<series>/<sop>.dcm``, same name and content
as the pynetdicom listener's) and completes series whose expected count is reached; an
association's A-RELEASE-RP is sent only once its instances are in the spool, so a sender that
released sees every file in place. After kill -9 or power loss, the journal is replayed at
start (before the index is reconciled), so nothing acknowledged is lost.

Association policy (allow-list, called AE, association limit, TLS-required) and the
presentation-context negotiation (every storage SOP class and Verification, with the sender's
first proposed transfer syntax) are the pynetdicom listener's own code. TLS associations are
served by the pynetdicom listener (with TLS enabled, :meth:`FastListener.start` defers to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from dicom_node import listener as base
from dicom_node import metrics, status
from dicom_node.audit import get_audit
from dicom_node.config import NodeSettings
from dicom_node.fastscp import upper_layer as ul
from dicom_node.fastscp.journal import Journal, read_segment, remove_segments, syncfs
from dicom_node.index import InstanceRecord, SeriesIndex
from dicom_node.logs import get_logger
from dicom_node.series_tracker import SeriesTracker, expected_count, log_completion
from dicom_node.spool import (
    _LONG_VRS,
    GroupCommit,
    InstanceHeader,
    InstanceRejected,
    Spool,
    _int_or_none,
    _skip_encapsulated,
    read_header,
    read_header_from,
)

log = get_logger("listener")

VERIFICATION = "1.2.840.10008.1.1"


_TAGS_STR = {0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid",
             0x0020000D: "study_instance_uid", 0x0020000E: "series_instance_uid",
             0x00080060: "modality", 0x0008103E: "series_description"}
_TAGS_IS = {0x00200013: "instance_number", 0x00280008: "number_of_frames",
            0x00200105: "number_of_temporal_positions"}
_NUMBER_OF_SLICES = 0x00540081
_PIXEL_DATA = 0x7FE00010
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_IMPLICIT_HEAD = struct.Struct("<HHL")
_LONG = struct.Struct("<L")


def scan_header(dataset: bytes | bytearray | memoryview, transfer_syntax: str
                ) -> InstanceHeader | None:
    """The header fields of an Implicit/Explicit VR Little Endian data set, in one pass.

    Walks the top-level elements with :mod:`struct` (no pydicom objects), taking the
    :data:`~dicom_node.spool.HEADER_TAGS` and checking that every element ends inside the
    data (encapsulated pixel data included). ``None`` whenever anything is unusual (another
    transfer syntax, tags out of order, an undefined-length sequence, multi-valued or
    non-ASCII values, ...): the caller then uses pydicom (:func:`read_header_bytes`).

    Raises:
        InstanceRejected: ``CANNOT_UNDERSTAND`` when an element runs past the end.
    """
    if transfer_syntax == _EXPLICIT_LE:
        explicit = True
    elif transfer_syntax == _IMPLICIT_LE:
        explicit = False
    else:
        return None
    size = len(dataset)
    pos = 0
    last_tag = -1
    found: dict[str, Any] = {}
    while pos < size:
        if pos + 8 > size:
            return None
        if explicit:
            group, elem, vr, short = _EXPLICIT_HEAD.unpack_from(dataset, pos)
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    return None
                (length,) = _LONG.unpack_from(dataset, pos + 8)
                hlen = 12
            elif b"A" <= vr[:1] <= b"Z" and b"A" <= vr[1:] <= b"Z":
                length, hlen = short, 8
            else:
                return None
        else:
            group, elem, length = _IMPLICIT_HEAD.unpack_from(dataset, pos)
            hlen = 8
        tag = (group << 16) | elem
        if tag <= last_tag or group < 0x0008:
            return None
        last_tag = tag
        start = pos + hlen
        if length == 0xFFFFFFFF:
            if tag != _PIXEL_DATA:
                return None  # an undefined-length sequence: pydicom walks it
            end = _skip_encapsulated(BytesIO(bytes(dataset)), start, size, "<")
            if end is None:
                return None
            pos = end
            continue
        end = start + length
        if end > size:
            raise InstanceRejected(status.CANNOT_UNDERSTAND,
                                   "truncated: an element runs past the end of the data")
        if tag in _TAGS_STR or tag in _TAGS_IS:
            raw = bytes(dataset[start:end])
            if b"\\" in raw or any(b > 0x7E for b in raw):
                return None
            text = raw.decode("ascii").rstrip(" \0")
            if text != text.lstrip():
                return None
            if tag in _TAGS_STR:
                found[_TAGS_STR[tag]] = text
            else:
                found[_TAGS_IS[tag]] = _int_or_none(text)
        elif tag == _NUMBER_OF_SLICES:
            if length != 2:
                return None
            found["number_of_slices"] = int(struct.unpack_from("<H", dataset, start)[0])
        pos = end
    missing = [k for k, name in (("SOPClassUID", "sop_class_uid"),
                                 ("SOPInstanceUID", "sop_instance_uid"),
                                 ("StudyInstanceUID", "study_instance_uid"),
                                 ("SeriesInstanceUID", "series_instance_uid"))
               if not found.get(name)]
    if missing:
        raise InstanceRejected(status.MISSING_UIDS, "missing " + ", ".join(missing))
    return InstanceHeader(
        transfer_syntax_uid=transfer_syntax,
        number_of_frames=found.pop("number_of_frames", None) or 1,
        **found,
    )


def read_header_bytes(part10: bytes | bytearray) -> InstanceHeader:
    """:func:`dicom_node.spool.read_header` for a Part 10 file held in memory.

    Raises:
        InstanceRejected: ``CANNOT_UNDERSTAND`` (not DICOM, truncated) or ``MISSING_UIDS``.
    """
    return read_header_from(BytesIO(part10), len(part10))


@dataclass(slots=True)
class _Pending:
    """An acknowledged instance not yet in the spool."""

    seq: int
    rec: InstanceRecord
    data: bytes
    old_path: Path | None = None
    write: bool = True


@dataclass(slots=True)
class _Assoc:
    """One association's state (``reserve()`` marks it ``_omnimri_reserved``)."""

    stats: base.AssociationStats
    contexts: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """Accepted context id → (abstract syntax, transfer syntax)."""
    last_seq: int = 0
    _omnimri_reserved: bool = False


SPILL_BYTES = 64 * 1024**2
"""A data set larger than this is received into a file in ``.incoming`` (not in memory) and
stored like the pynetdicom listener does (fsync + rename + folder fsync), without the journal:
for such sizes the transfer dominates and memory stays bounded."""


class _Received:
    """One C-STORE data set while it arrives: in memory, spilled to a file past SPILL_BYTES.

    Args:
        meta: The Part 10 preamble and file meta written before the data set.
        incoming: The spool's ``.incoming`` folder (for a spilled data set).
        limit: ``node.max_instance_bytes``: past it the bytes are dropped (answer 0xA700).
    """

    def __init__(self, meta: bytes, incoming: Path, limit: int) -> None:
        self.meta = meta
        self.incoming = incoming
        self.limit = limit
        self.chunks: list[bytes] = [meta]
        self.size = len(meta)
        self.over_limit = False
        self.path: Path | None = None
        self._file: Any = None

    def add(self, value: memoryview) -> None:
        """Append a data fragment."""
        self.size += len(value)
        if self.over_limit:
            return
        if self.size > self.limit:
            self.over_limit = True
            self.discard()
            self.chunks = []
            return
        if self._file is None and self.path is None and self.size > SPILL_BYTES:
            fd, name = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=self.incoming)
            self._file = os.fdopen(fd, "wb")
            self.path = Path(name)
            for c in self.chunks:
                self._file.write(c)
            self.chunks = []
        if self._file is not None:
            self._file.write(value)
        else:
            self.chunks.append(bytes(value))

    def join(self) -> bytes:
        """The whole Part 10 file (in-memory case)."""
        return b"".join(self.chunks)

    def finish(self) -> None:
        """Close the spill file (its bytes are then all in it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Remove the spill file unless it was moved into the spool."""
        self.finish()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def same_dataset(self, other_part10: bytes) -> bool:
        """Whether another Part 10 file (in memory) holds the same data set."""
        mine = self.join() if self.path is None else self.path.read_bytes()
        return _dataset_of(other_part10) == _dataset_of(mine)

    def same_file(self, path: Path, size: int) -> bool:
        """Whether a stored Part 10 file holds the same data set."""
        if abs(size - self.size) > 65536:
            return False  # the data sets differ in length (file metas are short)
        try:
            if self.path is not None:
                return _dataset_of(path.read_bytes()) == _dataset_of(self.path.read_bytes())
            return _dataset_of(path.read_bytes()) == _dataset_of(self.join())
        except OSError:
            return False


def _record_header(rec: InstanceRecord) -> dict[str, Any]:
    d = dataclasses.asdict(rec)
    d.pop("path")
    return d


class FastListener(base.Listener):
    """The node's Storage SCP on its own DICOM Upper Layer (see the module docstring).

    Same constructor, attributes and life cycle as :class:`~dicom_node.listener.Listener`.
    """

    def __init__(self, settings: NodeSettings, index: SeriesIndex, spool: Spool,
                 tracker: SeriesTracker | None = None) -> None:
        self.journal = Journal(Path(spool.root) / ".journal", fsync=settings.storage.fsync)
        self._dedupe_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._mat_cond = threading.Condition()
        self._mat_queue: list[_Pending | list[str]] = []
        self._outstanding: set[int] = set()
        """Journal sequence numbers appended but not yet in the spool."""
        self._top_seq = 0
        self._keep_segments = False
        self._mat_stop = False
        self._mat_thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._assoc_threads: set[threading.Thread] = set()
        self._serving_fast = False
        self._rx_idx = SeriesIndex(index.db_path)
        self._rx_local = threading.local()
        super().__init__(settings, index, spool, tracker)
        self.journal_committer: GroupCommit[_Pending, bool] = GroupCommit(
            self._commit_journal, settings.storage.group_commit_ms / 1000.0,
            lambda: self._active)
        self._negotiable = self._supported_contexts()

    # -- start-up: replay what a crash left in the journal --------------------------------

    def recover(self) -> None:
        """Replay the journal into the spool and index, then reconcile the index."""
        self._replay_journal()
        super().recover()

    def _replay_journal(self) -> None:
        segs = self.journal.pending_segments()
        if not segs:
            remove_segments(self.journal.all_segments())  # spare ones of a previous run
            return
        written = skipped = 0
        recs: list[InstanceRecord] = []
        series: dict[str, None] = {}
        for seg in segs:
            for header, data in read_segment(seg):
                rec = InstanceRecord(path=self.spool.path_for(
                    header["study_instance_uid"], header["series_instance_uid"],
                    header["sop_instance_uid"]), **{**header, "replaced": False})
                existing = self.index.lookup_instance(rec.sop_instance_uid)
                if existing is not None and existing[1] != rec.size_bytes:
                    skipped += 1  # the index holds other bytes under this UID: keep them
                    continue
                self._write_file(rec.path, data)
                if existing is None:
                    # Its row went with a power cut (rows are committed before the record
                    # is appended, so after kill -9 it is there): index it again.
                    recs.append(rec)
                series[rec.series_instance_uid] = None
                written += 1
        if recs:
            self.index.record(recs, use_expected_count=False)
        if self.settings.storage.fsync:
            syncfs(self.spool.root)
        remove_segments(self.journal.all_segments())
        if series and self.settings.completion.use_expected_count:
            done = self.index.complete_expected(list(series))
            self._announce(done)
        log.warning("journal_replayed", segments=len(segs), instances=written, skipped=skipped,
                    detail="acknowledged instances of a previous run moved into the spool")

    def _announce(self, events: list[Any]) -> None:
        if not events:
            return
        if self.tracker is not None:
            self.tracker.completed(events)
        else:
            for ev in events:
                log_completion(ev)

    def _write_file(self, final: Path, data: bytes) -> None:
        """Write a spool file via ``.incoming`` + rename (not flushed: the journal covers it)."""
        tmp = self.spool.incoming / f"mat-{threading.get_ident()}-{final.name}"
        with open(tmp, "wb") as f:
            f.write(data)
        self.spool.install(tmp, final, sync_first=False)

    # -- life cycle ----------------------------------------------------------------------------

    def _supported_contexts(self) -> list[Any]:
        return list(self.ae.supported_contexts)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._sock is not None:
            return int(self._sock.getsockname()[1])
        return super().port

    def start(self) -> None:
        """Bind and serve (TLS enabled: the pynetdicom listener serves instead)."""
        node = self.settings.node
        if node.tls.enabled or node.tls.required:
            log.info("fast_receiver_inactive", reason="TLS is served by the pynetdicom listener")
            self._start_materialiser()
            super().start()
            return
        if not node.allowed_callers:
            log.warning("allow_list_empty", detail="every calling AE and host is accepted")
        family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((node.host, node.port))
        sock.listen(64)
        self.journal.prepare()
        self._sock = sock
        self._serving_fast = True
        self._start_materialiser()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="fastscp-accept",
                                               daemon=True)
        self._accept_thread.start()
        log.info("listening", ae_title=node.ae_title, aliases=node.aliases, host=node.host,
                 port=self.port, max_associations=node.max_associations,
                 max_pdu_bytes=node.max_pdu_bytes, receiver="fast", tls=False)

    def _start_materialiser(self) -> None:
        self._mat_thread = threading.Thread(target=self._materialise_loop,
                                            name="fastscp-materialise", daemon=True)
        self._mat_thread.start()

    def stop(self) -> None:
        """Stop accepting, let open associations end (briefly), drain the journal."""
        if self._serving_fast and self._sock is not None:
            self._serving_fast = False
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            if self._accept_thread is not None:
                self._accept_thread.join(5)
            deadline = time.monotonic() + 5
            for t in list(self._assoc_threads):
                t.join(max(0.0, deadline - time.monotonic()))
            with self._conns_lock:
                for c in self._conns:
                    with contextlib.suppress(OSError):
                        c.shutdown(socket.SHUT_RDWR)
            for t in list(self._assoc_threads):
                t.join(2)
            self._sock = None
            log.info("listener_stopped")
        else:
            super().stop()
        with self._mat_cond:
            self._mat_stop = True
            self._mat_cond.notify_all()
        if self._mat_thread is not None:
            self._mat_thread.join(60)
        with self._mat_cond:
            drained = not self._mat_queue and not self._outstanding and not self._keep_segments
        self.journal.close(self.spool.root, all_materialised=drained)

    def _accept_loop(self) -> None:
        assert self._sock is not None  # noqa: S101
        while self._serving_fast:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                                 name="fastscp-assoc")
            self._assoc_threads.add(t)
            t.start()

    # -- one association -------------------------------------------------------------------------

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        assoc: _Assoc | None = None
        try:
            assoc = self._associate(conn, addr)
            if assoc is not None:
                self._run(conn, assoc)
        except Exception:  # noqa: BLE001 - one association must never stop the node
            log.exception("association_failed", peer_host=str(addr[0]))
        finally:
            if assoc is not None:
                self._free(assoc)
            with self._conns_lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()
            self._assoc_threads.discard(threading.current_thread())

    def _free(self, assoc: _Assoc) -> None:
        with self._active_lock:
            if assoc._omnimri_reserved:
                assoc._omnimri_reserved = False
                self._active -= 1

    def _max_body(self) -> int:
        mx = self.settings.node.max_pdu_bytes
        return (mx if mx else 2**31) + 64 * 1024

    def _associate(self, conn: socket.socket, addr: Any) -> _Assoc | None:
        node = self.settings.node
        conn.settimeout(node.acse_timeout_s)
        try:
            pdu_type, body = ul.read_pdu(conn, 1024 * 1024)
        except (ul.PeerClosed, TimeoutError, OSError, ul.UpperLayerError):
            return None  # a probe or an idle connection: nothing to log
        if pdu_type != ul.A_ASSOCIATE_RQ_TYPE:
            conn.sendall(ul.a_abort())
            return None
        try:
            rq = ul.decode_associate_rq(body)
        except ul.UpperLayerError as err:
            log.warning("association_protocol_error", peer_host=str(addr[0]), reason=str(err))
            conn.sendall(ul.a_abort(0x02, 0x00))
            return None
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        host, port = str(addr[0]), int(addr[1])
        assoc = _Assoc(base.AssociationStats(
            assoc_id=f"{self._prefix}-{next(self._ids)}", calling_ae=calling, called_ae=called,
            peer_host=host, peer_port=port))
        verdict = self.reserve(assoc, calling, called, host)
        if verdict is not None:
            (result, source, reason), why = verdict
            log.warning("association_rejected", calling_ae=calling, called_ae=called,
                        peer_host=host, reason=why, result=result, source=source,
                        diagnostic=reason)
            metrics.record_association("rejected")
            get_audit().association_rejected(calling_ae=calling, called_ae=called, host=host,
                                             reason=why)
            conn.sendall(ul.encode_associate_rj(result, source, reason))
            return None
        base._in_node_negotiation.active = True
        try:
            results, _ = base._negotiate_contexts_in_requestor_order(
                rq.presentation_context_definition_list, self._negotiable)
        finally:
            base._in_node_negotiation.active = False
        for cx in results:
            if cx.result == 0x00 and cx.transfer_syntax:
                assoc.contexts[int(cx.context_id)] = (str(cx.abstract_syntax),
                                                      str(cx.transfer_syntax[0]))
        conn.sendall(ul.encode_associate_ac(rq, results, node.max_pdu_bytes))
        log.info("association_accepted", assoc_id=assoc.stats.assoc_id, calling_ae=calling,
                 called_ae=called, peer_host=host, peer_port=port, contexts=len(assoc.contexts),
                 receiver="fast")
        metrics.record_association("accepted")
        metrics.association_started()
        assoc.stats.counted = True
        get_audit().association_accepted(calling_ae=calling, called_ae=called, host=host,
                                          port=port, tls=False)
        return assoc

    def _run(self, conn: socket.socket, assoc: _Assoc) -> None:
        """P-DATA until A-RELEASE or A-ABORT."""
        node = self.settings.node
        conn.settimeout(node.network_timeout_s)
        max_body = self._max_body()
        command = bytearray()
        command_cx: int | None = None
        cmd: dict[int, bytes] | None = None
        rx: _Received | None = None
        how = "association_aborted"
        try:
            while True:
                pdu_type, body = ul.read_pdu(conn, max_body)
                if pdu_type == ul.P_DATA_TF_TYPE:
                    for cx_id, is_cmd, last, value in ul.iter_pdvs(body):
                        if cx_id not in assoc.contexts:
                            raise ul.UpperLayerError("PDV on a context that was not accepted")
                        if is_cmd:
                            if cmd is not None:
                                raise ul.UpperLayerError("command while a data set is pending")
                            command += value
                            command_cx = cx_id
                            if not last:
                                continue
                            cmd = ul.decode_command(command)
                            command = bytearray()
                            if ul.command_us(cmd, 0x0800) == ul.NO_DATASET:
                                self._dispatch(conn, assoc, cx_id, cmd, None)
                                cmd = None
                            else:
                                rx = self._received(assoc, cx_id, cmd)
                        else:
                            if cmd is None or rx is None or cx_id != command_cx:
                                raise ul.UpperLayerError("data set fragment without a command")
                            rx.add(value)
                            if last:
                                try:
                                    self._dispatch(conn, assoc, cx_id, cmd, rx)
                                finally:
                                    rx.discard()
                                cmd, rx = None, None
                elif pdu_type == ul.A_RELEASE_RQ_TYPE:
                    self._wait_materialised(assoc.last_seq)
                    conn.sendall(ul.A_RELEASE_RP)
                    how = "association_released"
                    return
                elif pdu_type == ul.A_ABORT_TYPE:
                    return
                else:
                    raise ul.UpperLayerError(f"unexpected PDU type 0x{pdu_type:02X}")
        except ul.UpperLayerError as err:
            log.warning("association_protocol_error", assoc_id=assoc.stats.assoc_id,
                        peer_host=assoc.stats.peer_host, reason=str(err))
            with contextlib.suppress(OSError):
                conn.sendall(ul.a_abort(0x02, 0x00))
        except TimeoutError:
            log.warning("association_timeout", assoc_id=assoc.stats.assoc_id,
                        peer_host=assoc.stats.peer_host, timeout_s=node.network_timeout_s)
            with contextlib.suppress(OSError):
                conn.sendall(ul.a_abort(0x02, 0x00))
        except (ul.PeerClosed, OSError):
            pass
        finally:
            if rx is not None:
                rx.discard()
            self._log_end(assoc, how)

    def _log_end(self, assoc: _Assoc, how: str) -> None:
        st = assoc.stats
        if st.counted:
            st.counted = False
            metrics.association_ended()
            if how != "association_released":
                metrics.record_association("aborted")
        dt = time.perf_counter() - st.started
        log.info(how, assoc_id=st.assoc_id, calling_ae=st.calling_ae, called_ae=st.called_ae,
                 peer_host=st.peer_host, stored=st.stored, duplicates=st.duplicates,
                 failed=st.failed, bytes=st.bytes, duration_s=round(dt, 3),
                 store_ms_avg=round(1000 * st.store_s / max(1, st.stored + st.duplicates), 3),
                 header_ms_avg=round(1000 * st.header_s / max(1, st.stored), 3),
                 commit_ms_avg=round(1000 * st.commit_s / max(1, st.stored), 3),
                 instances_per_s=round((st.stored + st.duplicates) / dt, 1) if dt > 0 else None,
                 receiver="fast")

    def _dispatch(self, conn: socket.socket, assoc: _Assoc, cx_id: int, cmd: dict[int, bytes],
                  rx: _Received | None) -> None:
        field = ul.command_us(cmd, 0x0100)
        msg_id = ul.command_us(cmd, 0x0110)
        sop_class = ul.command_ui(cmd, 0x0002)
        st = assoc.stats
        if field == ul.C_ECHO_RQ and rx is None:
            log.info("c_echo", assoc_id=st.assoc_id, calling_ae=st.calling_ae,
                     peer_host=st.peer_host)
            rsp = ul.encode_response(ul.C_ECHO_RSP, msg_id, sop_class or VERIFICATION, None,
                                     status.SUCCESS)
        elif field == ul.C_STORE_RQ and rx is not None:
            sop_instance = ul.command_ui(cmd, 0x1000)
            code = self._on_fast_store(assoc, cx_id, sop_class, sop_instance, rx)
            rsp = ul.encode_response(ul.C_STORE_RSP, msg_id, sop_class, sop_instance, code)
        else:
            raise ul.UpperLayerError(f"unsupported DIMSE command 0x{field:04X}")
        conn.sendall(ul.p_data_tf(cx_id, rsp))

    # -- C-STORE ----------------------------------------------------------------------------------

    def _on_fast_store(self, assoc: _Assoc, cx_id: int, sop_class: str, sop_instance: str,
                       rx: _Received) -> int:
        t0 = time.perf_counter()
        st = assoc.stats
        try:
            code = self._fast_store(assoc, cx_id, sop_class, sop_instance, rx)
        except InstanceRejected as rej:
            code = rej.status
            st.failed += 1
            log.warning("instance_refused", assoc_id=st.assoc_id, calling_ae=st.calling_ae,
                        peer_host=st.peer_host, status=f"0x{rej.status:04X}",
                        status_name=status.status_name(rej.status), reason=rej.reason,
                        sop_instance_uid=sop_instance)
        except Exception:  # noqa: BLE001 - answer a status, keep serving
            code = status.PROCESSING_FAILURE
            st.failed += 1
            log.exception("instance_store_failed", assoc_id=st.assoc_id,
                          sop_instance_uid=sop_instance)
        st.store_s += time.perf_counter() - t0
        return code

    def _received(self, assoc: _Assoc, cx_id: int, cmd: dict[int, bytes]) -> _Received:
        """Where the data set of a C-STORE-RQ goes while it arrives."""
        _, ts = assoc.contexts[cx_id]
        meta = ul.file_meta(ul.command_ui(cmd, 0x0002), ul.command_ui(cmd, 0x1000), ts)
        return _Received(meta, self.spool.incoming, self.settings.node.max_instance_bytes)

    def _fast_store(self, assoc: _Assoc, cx_id: int, sop_class: str, sop_instance: str,
                    rx: _Received) -> int:
        cfg = self.settings
        st = assoc.stats
        context_class, ts = assoc.contexts[cx_id]
        size = rx.size
        if rx.over_limit or size > cfg.node.max_instance_bytes:
            raise InstanceRejected(status.OUT_OF_RESOURCES,
                                   f"instance of {size} bytes exceeds node.max_instance_bytes")
        if not self.spool.has_room(cfg.storage.min_free_bytes, cfg.storage.min_free_percent,
                                   size):
            raise InstanceRejected(status.OUT_OF_RESOURCES, "spool disk below its watermark")
        t0 = time.perf_counter()
        if rx.path is not None:
            rx.finish()
            header = read_header(rx.path)
            part10 = b""
        else:
            part10 = rx.join()
            header = (scan_header(memoryview(part10)[len(rx.meta):], ts)
                      or read_header_bytes(part10))
        st.header_s += time.perf_counter() - t0
        if header.sop_class_uid != context_class or header.sop_class_uid != sop_class:
            raise InstanceRejected(status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                   "data set SOP Class UID differs from the presentation context")
        if header.sop_instance_uid != sop_instance:
            raise InstanceRejected(status.SOP_INSTANCE_MISMATCH,
                                   "data set SOP Instance UID differs from the request")
        final = self.spool.path_for(header.study_instance_uid, header.series_instance_uid,
                                    header.sop_instance_uid)
        uid = header.sop_instance_uid
        t1 = time.perf_counter()
        with self._dedupe_lock:
            replaced = False
            old_path: Path | None = None
            pend = self._pending.get(uid)
            existing = self.index.lookup_instance(uid)
            same: bool | None = None
            if pend is not None:
                same = rx.same_dataset(pend.data)
            elif existing is not None and existing[0].exists():
                same = rx.same_file(existing[0], existing[1])
            if same is not None:
                if same:
                    st.duplicates += 1
                    log.info("duplicate_instance", assoc_id=st.assoc_id, same_bytes=True,
                             sop_instance_uid=uid)
                    return status.SUCCESS
                if cfg.storage.duplicate_policy == "keep_first":
                    st.duplicates += 1
                    log.warning("duplicate_instance", assoc_id=st.assoc_id, same_bytes=False,
                                policy="keep_first", sop_instance_uid=uid)
                    return status.SUCCESS
                replaced = True
                prev = pend.rec.path if pend is not None else (
                    existing[0] if existing is not None else None)
                old_path = prev if prev is not None and prev != final else None
            elif existing is not None:
                replaced = True  # indexed, but its file is gone: store it again
            rec = InstanceRecord(
                sop_instance_uid=uid, sop_class_uid=header.sop_class_uid,
                series_instance_uid=header.series_instance_uid,
                study_instance_uid=header.study_instance_uid, path=final,
                transfer_syntax_uid=ts, size_bytes=size, received_at=time.time(),
                replaced=replaced, modality=header.modality,
                series_description=header.series_description,
                instance_number=header.instance_number,
                number_of_frames=header.number_of_frames,
                expected_count=expected_count(header), calling_ae=st.calling_ae,
                called_ae=st.called_ae, peer_host=st.peer_host)
            if rx.path is not None:  # a large instance: the classic durable path, no journal
                code = self._store_spilled(st, rx.path, rec, old_path)
                rx.path = None  # moved into the spool
                return code
            item = _Pending(0, rec, part10, old_path)
            self._pending[uid] = item
        try:
            is_new = self.journal_committer.submit(item)
        except BaseException:
            with self._dedupe_lock:
                if self._pending.get(uid) is item:
                    del self._pending[uid]
            raise
        st.commit_s += time.perf_counter() - t1
        assoc.last_seq = max(assoc.last_seq, item.seq)
        if replaced:
            log.warning("duplicate_instance", assoc_id=st.assoc_id, same_bytes=False,
                        policy="replace", sop_instance_uid=uid)
        if is_new or replaced:
            st.stored += 1
            metrics.record_instance(size)
        else:
            st.duplicates += 1
            log.info("duplicate_instance", assoc_id=st.assoc_id, same_bytes=True,
                     sop_instance_uid=uid)
        st.bytes += size
        return status.SUCCESS

    def _store_spilled(self, st: base.AssociationStats, tmp: Path, rec: InstanceRecord,
                       old_path: Path | None) -> int:
        """Store a large instance as the pynetdicom listener does (fsync, rename, index).

        Called with the dedupe lock held. Its file is in place before the acknowledgement,
        so nothing is journaled and nothing waits for the materialiser.
        """
        dirs = self.spool.install(tmp, rec.path, sync_first=rec.replaced)
        is_new = self.committer.submit((rec, dirs, None if rec.replaced else rec.path))
        if rec.replaced:
            log.warning("duplicate_instance", assoc_id=st.assoc_id, same_bytes=False,
                        policy="replace", sop_instance_uid=rec.sop_instance_uid)
            if old_path is not None:
                with contextlib.suppress(OSError):
                    old_path.unlink()
        if is_new or rec.replaced:
            st.stored += 1
            metrics.record_instance(rec.size_bytes)
        else:
            st.duplicates += 1
            log.info("duplicate_instance", assoc_id=st.assoc_id, same_bytes=True,
                     sop_instance_uid=rec.sop_instance_uid)
        st.bytes += rec.size_bytes
        return status.SUCCESS

    def _commit_journal(self, items: list[_Pending]) -> list[bool]:
        """Group commit: index the batch, append it to the journal, flush the journal once.

        The rows are committed first without a flush of their own (``synchronous=NORMAL`` on
        the receiver's connections), then the records are appended and ``fdatasync``'d: one
        device flush per batch. After kill -9 every journal record has its row (rows come
        first); after a power cut, rows lost with the SQLite WAL are re-inserted from the
        journal at start (:meth:`_replay_journal`), and rows whose records never reached the
        journal are dropped by :meth:`~dicom_node.index.SeriesIndex.reconcile` (never
        acknowledged).
        """
        out = self._rx_index().record([i.rec for i in items], use_expected_count=False,
                                      flushed_upto=self._flushed_upto)
        try:
            for i, new in zip(items, out.new, strict=True):
                i.write = new or i.rec.replaced
                if not i.write:
                    continue  # a concurrent duplicate: the first one's bytes are kept
                i.seq = self.journal.append(_record_header(i.rec), i.data)
                with self._mat_cond:
                    self._outstanding.add(i.seq)
                    self._top_seq = max(self._top_seq, i.seq)
            self.journal.sync()
        except BaseException:
            self.index.forget([i.rec.sop_instance_uid for i, new in
                               zip(items, out.new, strict=True) if new])
            with self._mat_cond:
                for i in items:
                    self._outstanding.discard(i.seq)
                self._keep_segments = True  # the next start sorts the records out
                self._mat_cond.notify_all()
            raise
        if out.max_rowid is not None:
            self._flushed_upto = out.max_rowid
        for series_uid, revision in out.new_revisions:
            log.info("late_instance_new_revision", series_uid=series_uid, revision=revision)
        with self._mat_cond:
            self._mat_queue.extend(items)
            if out.due_expected and self.settings.completion.use_expected_count:
                self._mat_queue.append(out.due_expected)
            self._mat_cond.notify_all()
        return out.new

    def _rx_index(self) -> SeriesIndex:
        """The receiver's own index handle: its connections commit without a flush."""
        conn = self._rx_idx.conn
        if not getattr(self._rx_local, "normal", False):
            conn.execute("PRAGMA synchronous=NORMAL")
            self._rx_local.normal = True
        return self._rx_idx

    # -- materialiser ------------------------------------------------------------------------------

    def _materialise_loop(self) -> None:
        while True:
            with self._mat_cond:
                while not self._mat_queue and not self._mat_stop:
                    self._mat_cond.wait()
                if not self._mat_queue:
                    return
                batch, self._mat_queue = self._mat_queue, []
            done: list[int] = []
            for item in batch:
                try:
                    if isinstance(item, list):
                        self._announce(self.index.complete_expected(item))
                        continue
                    if item.seq:
                        done.append(item.seq)
                    if item.write:
                        self._write_file(item.rec.path, item.data)
                        if item.old_path is not None:
                            with contextlib.suppress(OSError):
                                item.old_path.unlink()
                    with self._dedupe_lock:
                        if self._pending.get(item.rec.sop_instance_uid) is item:
                            del self._pending[item.rec.sop_instance_uid]
                except Exception:  # noqa: BLE001 - the journal still holds it; replayed at start
                    self._keep_segments = True
                    log.exception("materialise_failed",
                                  sop_instance_uid=getattr(getattr(item, "rec", None),
                                                           "sop_instance_uid", ""))
            with self._mat_cond:
                self._outstanding.difference_update(done)
                safe = self._materialised_upto()
                self._mat_cond.notify_all()
            if not self._keep_segments:
                try:
                    self.journal.release_upto(safe, self.spool.root)
                except OSError:
                    log.exception("journal_release_failed")

    def _materialised_upto(self) -> int:
        """Every journal record up to this sequence number is in the spool (hold the cond)."""
        return min(self._outstanding) - 1 if self._outstanding else self._top_seq

    def _wait_materialised(self, seq: int, timeout_s: float = 60.0) -> None:
        with self._mat_cond:
            self._mat_cond.wait_for(lambda: self._materialised_upto() >= seq,
                                    timeout=timeout_s)


def _dataset_of(part10: bytes) -> bytes:
    """The data set bytes of a Part 10 file (after its file meta group)."""
    if part10[128:132] != b"DICM":
        return part10
    (length,) = struct.unpack("<L", part10[140:144])
    return part10[144 + length:]


def make_listener(settings: NodeSettings, index: SeriesIndex, spool: Spool,
                  tracker: SeriesTracker | None = None) -> base.Listener:
    """The listener ``node.receiver`` selects: ``fast`` (this module) or ``pynetdicom``."""
    if getattr(settings.node, "receiver", "pynetdicom") == "fast":
        return FastListener(settings, index, spool, tracker)
    return base.Listener(settings, index, spool, tracker)


__all__ = ["FastListener", "make_listener", "read_header_bytes"]

