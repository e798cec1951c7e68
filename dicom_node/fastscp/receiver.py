"""The node's Storage SCP: its own DICOM Upper Layer, one thread per association.

This is the node's one receive path (plain TCP and DICOM TLS alike). One thread per association
does everything for an instance, with no hand-over between threads on the hot path: it reads
the PDUs from the socket (:class:`~dicom_node.fastscp.upper_layer.PduReader`: every claimed
length checked before anything is allocated, every phase under a deadline), collects the data
set fragments in memory (a data set above :data:`SPILL_BYTES` goes to a file and the classic
fsync + rename path), checks it (:meth:`Listener._store`: the one intake — admission was done
at association time by :class:`~dicom_node.fastscp.policy.CallerPolicy`), appends the
instance with its index fields to the receive journal (:mod:`dicom_node.fastscp.journal`), and
answers 0x0000 only once the journal record is flushed (one ``fdatasync``, shared by
concurrent associations: group commit). A background materialiser then writes the spool file
(``<study>/<series>/<sop>.dcm``) and the index rows (one transaction per pass; until then the
dedupe set of journaled UIDs answers duplicates) and completes series whose expected count is
reached; an association's A-RELEASE-RP is sent once its instances are in the spool and the
index (or after :data:`RELEASE_WAIT_S`), so a sender that released sees every file in place.
After kill -9 or power loss, the journal is replayed at start (files written, missing rows
inserted, before the index is reconciled), so nothing acknowledged is lost.

Association states (PS3.8 §9.2, the parts an acceptor that never requests uses)::

    Sta2  connection open, waiting for A-ASSOCIATE-RQ   ARTIM: node.acse_timeout_s (in all)
    Sta6  established: P-DATA / A-RELEASE-RQ / A-ABORT  idle: node.network_timeout_s per PDU
                                                        + node.dimse_timeout_s for its bytes
    Sta13 closing: A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT sent, then the socket is closed

Any other PDU, a length over its limit or a malformed PDU → A-ABORT (service-provider) and one
``association_protocol_error`` line; a timer expiry → A-ABORT and one ``association_timeout``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import socket
import sqlite3
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node import metrics, status
from dicom_node.audit import get_audit
from dicom_node.config import NodeSettings
from dicom_node.db import is_postgres
from dicom_node.fastscp import upper_layer as ul
from dicom_node.fastscp.header import read_header_bytes, scan_header
from dicom_node.fastscp.journal import Journal, read_segment, remove_segments, syncfs
from dicom_node.fastscp.policy import (
    REJECT_PLAIN_WHEN_TLS_REQUIRED,
    VERIFICATION,
    AssociationStats,
    CallerPolicy,
    negotiate_contexts,
    supported_contexts,
)
from dicom_node.index import InstanceRecord, RecordOutcome, SeriesIndex
from dicom_node.logs import get_logger
from dicom_node.series_tracker import SeriesTracker, expected_count, log_completion
from dicom_node.spool import GroupCommit, InstanceRejected, Spool, read_header
from dicom_node.tls import TLSConfigError, server_context
from dicom_node.validate import validate

log = get_logger("listener")

SPILL_BYTES = 4 * 1024**2
"""A data set larger than this is received into a file in ``.incoming`` (not in memory) and
stored with a file fsync + rename + folder fsync, without the journal: for such sizes the
transfer dominates, and an association's memory stays below ~2 × this (the fragments and their
joined copy) plus one PDU."""

MAX_PDU_CAP = 16 * 1024**2
"""Maximum PDU length offered when ``node.max_pdu_bytes`` is 0 ("unlimited"), bytes: the node
never offers an unbounded PDU, so a P-DATA-TF is always checked against a finite limit."""

PENDING_BYTES_MAX = 256 * 1024**2
"""Acknowledged bytes waiting for the materialiser above which new commits wait for it
(back-pressure: bounds the memory the materialiser's queue may hold), bytes."""

RELEASE_WAIT_S = 10.0
"""Longest an A-RELEASE-RQ waits for the association's instances to reach the spool (they are
durable in the journal already; only a failing spool disk makes this wait), seconds."""

MATERIALISE_BATCH_S = 0.002
"""Pause of the materialiser once woken, so that one pass writes several instances (not
taken while an A-RELEASE-RQ waits for it), seconds."""

MATERIALISE_RETRY_S = 1.0
"""Pause before retrying spool writes that failed (disk full), seconds."""

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or a quota) is full: OS errors and SQLite's."""
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL
    if isinstance(err, sqlite3.OperationalError):
        text = str(err).lower()
        return "full" in text or "disk i/o" in text
    return False


@dataclass(slots=True)
class _Pending:
    """An acknowledged instance (durable in the journal) not yet in the spool and index."""

    seq: int
    rec: InstanceRecord
    data: bytes
    old_path: Path | None = None
    in_spool: bool = False
    """Its spool file is written (its index row may still be missing)."""
    failures: int = 0
    fsync_s: float = 0.0
    """The journal flush of its batch, seconds."""


@dataclass(slots=True)
class _Assoc:
    """One association's state."""

    stats: AssociationStats
    tls: bool = False
    contexts: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """Accepted context id → (abstract syntax, transfer syntax)."""
    last_seq: int = 0
    reserved: bool = False
    """Counted in :attr:`Listener._active` (released exactly once)."""
    command: bytearray = dataclasses.field(default_factory=bytearray)
    """Command fragments received so far."""
    command_cx: int | None = None
    cmd: dict[int, bytes] | None = None
    """The C-STORE-RQ whose data set is arriving."""
    rx: _Received | None = None
    """Its data set."""


class _Received:
    """One C-STORE data set while it arrives: in memory, spilled to a file past SPILL_BYTES.

    Args:
        meta: The Part 10 preamble and file meta written before the data set.
        incoming: The spool's ``.incoming`` folder (for a spilled data set).
        limit: ``node.max_instance_bytes``: past it the bytes are dropped (answer 0xA700).
        refusal: Already refused (status, reason): the bytes are counted and dropped.
    """

    def __init__(self, meta: bytes, incoming: Path, limit: int,
                 refusal: tuple[int, str] | None = None) -> None:
        self.meta = meta
        self.incoming = incoming
        self.limit = limit
        self.chunks: list[bytes] = [meta]
        self.size = len(meta)
        self.over_limit = False
        self.refusal = refusal
        self.path: Path | None = None
        self._file: Any = None
        if refusal is not None:
            self.chunks = []

    def add(self, value: memoryview) -> None:
        """Append a data fragment (never raises for a full disk: it becomes a refusal)."""
        self.size += len(value)
        if self.over_limit or self.refusal is not None:
            return
        if self.size > self.limit:
            self.over_limit = True
            self.discard()
            self.chunks = []
            return
        try:
            if self._file is None and self.path is None and self.size > SPILL_BYTES:
                fd, name = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=self.incoming)
                self.path = Path(name)
                self._file = os.fdopen(fd, "wb")
                for c in self.chunks:
                    self._file.write(c)
                self.chunks = []
            if self._file is not None:
                self._file.write(value)
            else:
                self.chunks.append(bytes(value))
        except OSError as err:
            self.refusal = (status.OUT_OF_RESOURCES if disk_full(err)
                            else status.PROCESSING_FAILURE,
                            f"receiving into .incoming failed: {err.strerror or err}")
            self.discard()
            self.chunks = []

    def join(self) -> bytes:
        """The whole Part 10 file (in-memory case)."""
        return b"".join(self.chunks)

    def finish(self) -> None:
        """Close the spill file (its bytes are then all in it)."""
        if self._file is not None:
            f, self._file = self._file, None
            with contextlib.suppress(OSError):
                f.close()

    def discard(self) -> None:
        """Remove the spill file unless it was moved into the spool."""
        self.finish()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            self.path = None

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


ROOM_CHECK_S = 0.1
"""Longest a free-space reading (``statvfs``) is reused for the watermark check, seconds."""

ROOM_CHECK_BYTES = 16 * 1024**2
"""Bytes admitted since the last reading after which the free space is read again."""


class _RoomCheck:
    """:meth:`Spool.has_room <dicom_node.spool.Spool.has_room>` with a reused reading.

    One ``statvfs`` per :data:`ROOM_CHECK_S` or per :data:`ROOM_CHECK_BYTES` admitted
    (whichever comes first), instead of one per instance; between readings the bytes
    admitted since are subtracted from the free space read, so the estimate errs low.
    Only a *yes* is answered from a reused reading: before a refusal the free space is read
    again, so an instance is never refused on a reading taken before space was freed.
    Bytes acknowledged but not yet in the spool (``unwritten``: the materialiser's queue) are
    counted as used at each reading: the space is promised to them.
    """

    def __init__(self, spool: Spool, unwritten: Callable[[], int] = lambda: 0) -> None:
        self.spool = spool
        self._unwritten = unwritten
        self._lock = threading.Lock()
        self._at = -1.0
        self._free = 0
        self._pct = 0.0
        self._since = 0

    def has_room(self, min_free_bytes: int, min_free_percent: float, incoming_bytes: int
                 ) -> bool:
        """Whether storing ``incoming_bytes`` more keeps the disk above its watermark."""
        with self._lock:
            now = time.monotonic()
            fresh = (now - self._at > ROOM_CHECK_S
                     or self._since + incoming_bytes > ROOM_CHECK_BYTES)
            if fresh:
                self._read(now)
            ok = self._fits(min_free_bytes, min_free_percent, incoming_bytes)
            if not ok and not fresh:
                self._read(now)
                ok = self._fits(min_free_bytes, min_free_percent, incoming_bytes)
            if ok:
                self._since += incoming_bytes
            return ok

    def _read(self, now: float) -> None:
        self._free, self._pct = self.spool.free_space()
        self._at, self._since = now, max(0, self._unwritten())

    def _fits(self, min_free_bytes: int, min_free_percent: float, incoming_bytes: int
              ) -> bool:
        free = self._free - self._since - incoming_bytes
        total = self._free * 100.0 / self._pct if self._pct > 0 else 0.0
        return (free >= min_free_bytes
                and (100.0 * free / total if total else 0.0) >= min_free_percent)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(InstanceRecord) if f.name != "path")


def _record_header(rec: InstanceRecord) -> dict[str, Any]:
    """The index fields of a journal record (every field but the path; flat values)."""
    return {name: getattr(rec, name) for name in _RECORD_FIELDS}


_CommitItem = tuple[InstanceRecord, set[Path], Path | None]
"""(index record, folders to fsync, file to fsync or ``None`` if already fsync'd)."""


class Listener:
    """The node's Storage SCP (C-ECHO, C-STORE of every storage SOP class; TCP and TLS).

    Args:
        settings: The node configuration.
        index: The series index (instances are recorded there).
        spool: The spool folder.
        tracker: Told about expected-count completions (optional).
    """

    def __init__(self, settings: NodeSettings, index: SeriesIndex, spool: Spool,
                 tracker: SeriesTracker | None = None) -> None:
        self.settings = settings
        self.index = index
        self.spool = spool
        self.tracker = tracker
        self.policy = CallerPolicy(settings)
        self.tls_required = settings.node.tls.required
        """Refuse associations that do not run over TLS (``node.tls.required``)."""
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:6]
        self._active = 0
        self._active_lock = threading.Lock()
        self.journal = Journal(Path(spool.root) / ".journal", fsync=settings.storage.fsync)
        self._room = _RoomCheck(spool, lambda: self._pending_bytes)
        self._dedupe_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._mat_cond = threading.Condition()
        self._mat_queue: list[_Pending] = []
        self._outstanding: set[int] = set()
        """Journal sequence numbers appended but not yet in the spool."""
        self._top_seq = 0
        self._release_waiters = 0
        """Associations waiting in A-RELEASE for their instances to reach the spool."""
        self._mat_stop = False
        self._mat_thread: threading.Thread | None = None
        self._servers: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._accept_threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._assoc_threads: set[threading.Thread] = set()
        self._serving = False
        self._rx_idx = SeriesIndex(index.db_path)
        self._index_folders = [] if is_postgres(index.db_path) else [Path(index.db_path).parent]
        """Folders synced with the spool before journal segments are recycled (SQLite)."""
        self._rx_local = threading.local()
        self._db_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-commit")
        self._flushed_upto: int | None = None
        window = settings.storage.group_commit_ms / 1000.0
        self.committer: GroupCommit[_CommitItem, bool] = GroupCommit(
            self._commit_files, window, lambda: self._active)
        self.journal_committer: GroupCommit[_Pending, bool] = GroupCommit(
            self._commit_journal, window, lambda: self._active)
        self._negotiable = supported_contexts()
        mx = settings.node.max_pdu_bytes
        self.max_pdu = mx if 0 < mx <= MAX_PDU_CAP else MAX_PDU_CAP
        """Maximum PDU length offered in the A-ASSOCIATE-AC, bytes."""
        self.max_connections = 2 * settings.node.max_associations + 16
        """Open connections (associated or not) beyond which new ones are closed at once."""
        self.recover()

    # -- start-up: replay what a crash left in the journal --------------------------------

    def recover(self) -> None:
        """Replay the journal into the spool and index, then drop unacknowledged rows."""
        self._replay_journal()
        removed = self.index.reconcile(self.spool.is_intact)
        if removed:
            log.warning("unacknowledged_instances_dropped", count=len(removed),
                        sop_instance_uids=removed[:20],
                        detail="indexed but not on disk after a crash; senders retry them")

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
                replaced = bool(header.get("replaced"))
                rec = InstanceRecord(path=self.spool.path_for(
                    header["study_instance_uid"], header["series_instance_uid"],
                    header["sop_instance_uid"]), **{**header, "replaced": replaced})
                existing = self.index.lookup_instance(rec.sop_instance_uid)
                if existing is not None and (
                        (existing[1] == rec.size_bytes and _file_holds(existing[0], data))
                        if replaced else existing[1] != rec.size_bytes):
                    # Not replaced: the index holds other bytes under this UID (a later
                    # replacement): keep them. Replaced: the replacement is in place.
                    skipped += 1
                    continue
                self._write_file(rec.path, data)
                if existing is None or replaced:
                    # Acknowledged, but its row had not been written yet (rows are written
                    # by the materialiser after the acknowledgement, kill -9 in between) or
                    # went with a power cut: index it now.
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
        """Write a spool file via ``.incoming`` + rename (not flushed: the journal covers it).

        Nothing is left in ``.incoming`` when the write fails (disk full).
        """
        tmp = self.spool.incoming / f"mat-{threading.get_ident()}-{final.name}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            self.spool.install(tmp, final, sync_first=False)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    # -- admission ---------------------------------------------------------------------------

    def reserve(self, assoc: _Assoc, calling: str, called: str, host: str
                ) -> tuple[tuple[int, int, int], str] | None:
        """Apply the policy; on acceptance count the association until it ends."""
        with self._active_lock:
            verdict = self.policy.check(calling, called, host, self._active + 1)
            if verdict is None:
                self._active += 1
                assoc.reserved = True
        return verdict

    def _free(self, assoc: _Assoc) -> None:
        with self._active_lock:
            if assoc.reserved:
                assoc.reserved = False
                self._active -= 1

    @property
    def active_associations(self) -> int:
        """Associations holding a slot now."""
        return self._active

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port of ``node.port`` (useful when configured as 0)."""
        if self._servers:
            return int(self._servers[0][0].getsockname()[1])
        return self.settings.node.port

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port (``None`` without TLS): ``node.tls.port``, or :attr:`port`."""
        if not self.settings.node.tls.enabled:
            return None
        for sock, ctx in self._servers:
            if ctx is not None:
                return int(sock.getsockname()[1])
        return self.settings.node.tls.port or self.port

    def _bind(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        return sock

    def start(self) -> None:
        """Bind ``node.port`` (and ``node.tls.port``) and serve in background threads."""
        node = self.settings.node
        if node.tls.required and not node.tls.enabled:
            raise TLSConfigError("node.tls.required: needs node.tls.enabled")
        tls_ctx = server_context(node.tls) if node.tls.enabled else None
        if not node.allowed_callers:
            log.warning("allow_list_empty", detail="every calling AE and host is accepted")
        separate_tls = tls_ctx is not None and node.tls.port is not None
        self._servers.append((self._bind(node.host, node.port),
                              None if separate_tls else tls_ctx))
        if separate_tls:
            assert node.tls.port is not None  # noqa: S101
            self._servers.append((self._bind(node.host, node.tls.port), tls_ctx))
        self.journal.prepare()
        self._serving = True
        self._mat_thread = threading.Thread(target=self._materialise_loop,
                                            name="rx-materialise", daemon=True)
        self._mat_thread.start()
        for sock, ctx in self._servers:
            t = threading.Thread(target=self._accept_loop, args=(sock, ctx), daemon=True,
                                 name="rx-accept")
            self._accept_threads.append(t)
            t.start()
        log.info("listening", ae_title=node.ae_title, aliases=node.aliases, host=node.host,
                 port=self.port, max_associations=node.max_associations,
                 max_pdu_bytes=self.max_pdu, tls=node.tls.enabled, tls_port=self.tls_port,
                 tls_required=node.tls.required, verify_client=node.tls.verify_client,
                 acse_timeout_s=node.acse_timeout_s, network_timeout_s=node.network_timeout_s,
                 dimse_timeout_s=node.dimse_timeout_s)

    def stop(self) -> None:
        """Stop accepting, let open associations end (briefly), drain the journal."""
        if self._serving:
            self._serving = False
            for sock, _ in self._servers:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            for t in self._accept_threads:
                t.join(5)
            deadline = time.monotonic() + 5
            for t in list(self._assoc_threads):
                t.join(max(0.0, deadline - time.monotonic()))
            with self._conns_lock:
                for c in self._conns:
                    with contextlib.suppress(OSError):
                        c.shutdown(socket.SHUT_RDWR)
            for t in list(self._assoc_threads):
                t.join(2)
            self._servers = []
            log.info("listener_stopped")
        with self._mat_cond:
            self._mat_stop = True
            self._mat_cond.notify_all()
        if self._mat_thread is not None:
            self._mat_thread.join(60)
        with self._mat_cond:
            drained = not self._mat_queue and not self._outstanding
        self.journal.close(self.spool.root, all_materialised=drained)
        self._db_pool.shutdown(wait=False)

    def _accept_loop(self, server: socket.socket, tls_ctx: ssl.SSLContext | None) -> None:
        refused, last_log = 0, 0.0
        while self._serving:
            try:
                conn, addr = server.accept()
            except OSError:
                return
            if len(self._assoc_threads) >= self.max_connections:
                # Connections that have not associated yet hold no slot; this bounds them
                # (threads, buffers) until their ARTIM timer closes them.
                refused += 1
                with contextlib.suppress(OSError):
                    conn.close()
                if time.monotonic() - last_log > 1.0:
                    log.warning("connection_refused", reason="too many open connections",
                                limit=self.max_connections, refused=refused,
                                peer_host=str(addr[0]))
                    refused, last_log = 0, time.monotonic()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn, addr, tls_ctx), daemon=True,
                                 name="rx-assoc")
            self._assoc_threads.add(t)
            t.start()

    # -- one association -------------------------------------------------------------------------

    def _serve(self, conn: socket.socket, addr: Any, tls_ctx: ssl.SSLContext | None) -> None:
        node = self.settings.node
        host = str(addr[0])
        deadline = time.monotonic() + node.acse_timeout_s  # ARTIM: until the A-ASSOCIATE-RQ
        assoc: _Assoc | None = None
        sock = conn
        with self._conns_lock:
            self._conns.add(conn)
        try:
            if tls_ctx is not None:
                conn.settimeout(node.acse_timeout_s)
                # The socket timeout bounds each read of the handshake; this bounds all of it.
                artim = threading.Timer(node.acse_timeout_s, _shut, (conn,))
                artim.start()
                try:
                    sock = tls_ctx.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError, TimeoutError) as err:
                    log.info("tls_handshake_failed", peer_host=host,
                             reason=type(err).__name__)
                    return
                finally:
                    artim.cancel()
                with self._conns_lock:
                    self._conns.discard(conn)
                    self._conns.add(sock)
            reader = ul.PduReader(sock, self.max_pdu + 6)
            assoc = self._associate(sock, reader, addr, deadline, tls=tls_ctx is not None)
            if assoc is not None:
                self._run(sock, reader, assoc)
        except Exception:  # noqa: BLE001 - one association must never stop the node
            log.exception("association_failed", peer_host=host)
        finally:
            if assoc is not None:
                self._free(assoc)
            with self._conns_lock:
                self._conns.discard(conn)
                self._conns.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()
            self._assoc_threads.discard(threading.current_thread())

    def _abort(self, sock: socket.socket, event: str, **fields: Any) -> None:
        """Send an A-ABORT (service-provider) and write its one log line."""
        log.warning(event, **fields)
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(ul.a_abort(0x02, 0x00))

    def _associate(self, sock: socket.socket, reader: ul.PduReader, addr: Any,
                   deadline: float, *, tls: bool) -> _Assoc | None:
        node = self.settings.node
        host, port = str(addr[0]), int(addr[1])
        try:
            left = max(0.001, deadline - time.monotonic())
            pdu_type, body = reader.read(left, left, until=deadline)
        except ul.UpperLayerError as err:
            self._abort(sock, "association_protocol_error", peer_host=host, reason=str(err),
                        phase="association request")
            return None
        except TimeoutError:
            self._abort(sock, "association_timeout", peer_host=host,
                        timeout_s=node.acse_timeout_s, phase="association request")
            return None
        except (ul.PeerClosed, OSError):
            return None  # a probe (port check) or a peer that gave up: nothing to log
        if pdu_type != ul.A_ASSOCIATE_RQ_TYPE:
            self._abort(sock, "association_protocol_error", peer_host=host,
                        reason=f"PDU type 0x{pdu_type:02X} before an A-ASSOCIATE-RQ",
                        phase="association request")
            return None
        try:
            rq = ul.decode_associate_rq(body)
        except ul.UpperLayerError as err:
            self._abort(sock, "association_protocol_error", peer_host=host, reason=str(err),
                        phase="association request")
            return None
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        assoc = _Assoc(AssociationStats(
            assoc_id=f"{self._prefix}-{next(self._ids)}", calling_ae=calling, called_ae=called,
            peer_host=host, peer_port=port), tls=tls)
        verdict = None
        if self.tls_required and not tls:
            verdict = REJECT_PLAIN_WHEN_TLS_REQUIRED, "TLS required: plain association refused"
        if verdict is None:
            verdict = self.reserve(assoc, calling, called, host)
        if verdict is not None:
            (result, source, reason), why = verdict
            log.warning("association_rejected", calling_ae=calling, called_ae=called,
                        peer_host=host, reason=why, result=result, source=source,
                        diagnostic=reason)
            metrics.record_association("rejected")
            get_audit().association_rejected(calling_ae=calling, called_ae=called, host=host,
                                             reason=why)
            with contextlib.suppress(OSError):
                sock.sendall(ul.encode_associate_rj(result, source, reason))
            return None
        results = negotiate_contexts(rq.presentation_context_definition_list, self._negotiable)
        for cx in results:
            if cx.result == 0x00 and cx.transfer_syntax:
                assoc.contexts[int(cx.context_id or 0)] = (str(cx.abstract_syntax),
                                                      str(cx.transfer_syntax[0]))
        sock.sendall(ul.encode_associate_ac(rq, results, self.max_pdu))
        log.info("association_accepted", assoc_id=assoc.stats.assoc_id, calling_ae=calling,
                 called_ae=called, peer_host=host, peer_port=port, contexts=len(assoc.contexts),
                 tls=tls)
        metrics.record_association("accepted")
        metrics.association_started()
        assoc.stats.counted = True
        get_audit().association_accepted(calling_ae=calling, called_ae=called, host=host,
                                          port=port, tls=tls)
        return assoc

    def _run(self, sock: socket.socket, reader: ul.PduReader, assoc: _Assoc) -> None:
        """Sta6: one PDU at a time through :data:`STA6_ACTIONS` until the association ends.

        Any PDU type the table lacks, and any :class:`~.upper_layer.UpperLayerError` an
        action raises, is a protocol error (A-ABORT); a timer expiry is an A-ABORT too.
        """
        node = self.settings.node
        idle_s, pdu_s = node.network_timeout_s, node.dimse_timeout_s
        how: str | None = None
        st = assoc.stats
        cpu0 = time.thread_time()
        try:
            while how is None:
                pdu_type, body = reader.read(idle_s, pdu_s)
                action = STA6_ACTIONS.get(pdu_type)
                if action is None:
                    raise ul.UpperLayerError(f"unexpected PDU type 0x{pdu_type:02X}")
                how = action(self, sock, assoc, body)
        except ul.UpperLayerError as err:
            self._abort(sock, "association_protocol_error", assoc_id=st.assoc_id,
                        peer_host=st.peer_host, reason=str(err))
        except TimeoutError:
            self._abort(sock, "association_timeout", assoc_id=st.assoc_id,
                        peer_host=st.peer_host, timeout_s=idle_s, pdu_timeout_s=pdu_s,
                        requests=st.requests, responses=st.responses,
                        since_last_response_s=round(time.monotonic() - st.last_response, 3)
                        if st.last_response else None,
                        pending_data_set=assoc.rx is not None)
        except (ul.PeerClosed, OSError):
            pass
        finally:
            if assoc.rx is not None:
                assoc.rx.discard()
                assoc.rx = None
            st.cpu_s = time.thread_time() - cpu0
            self._log_end(assoc, how or "association_aborted")

    # -- Sta6 actions (see STA6_ACTIONS): each returns the ending log event, or None ----------

    def _on_p_data(self, sock: socket.socket, assoc: _Assoc, body: memoryview) -> str | None:
        """P-DATA-TF: collect command and data fragments; answer each complete message."""
        for cx_id, is_cmd, last, value in ul.iter_pdvs(body):
            if cx_id not in assoc.contexts:
                raise ul.UpperLayerError("PDV on a context that was not accepted")
            if is_cmd:
                if assoc.cmd is not None:
                    raise ul.UpperLayerError("command while a data set is pending")
                if len(assoc.command) + len(value) > ul.ASSOCIATE_RQ_MAX_BYTES:
                    raise ul.UpperLayerError("command set over 64 KiB")
                assoc.command += value
                assoc.command_cx = cx_id
                if not last:
                    continue
                cmd = ul.decode_command(assoc.command)
                assoc.command = bytearray()
                if ul.command_us(cmd, 0x0800) == ul.NO_DATASET:
                    self._dispatch(sock, assoc, cx_id, cmd, None)
                else:
                    assoc.cmd = cmd
                    assoc.rx = self._received(assoc, cx_id, cmd)
                continue
            rx, request = assoc.rx, assoc.cmd
            if request is None or rx is None or cx_id != assoc.command_cx:
                raise ul.UpperLayerError("data set fragment without a command")
            rx.add(value)
            if last:
                assoc.cmd, assoc.rx = None, None
                try:
                    self._dispatch(sock, assoc, cx_id, request, rx)
                finally:
                    rx.discard()
        return None

    def _on_release_rq(self, sock: socket.socket, assoc: _Assoc, body: memoryview) -> str:
        """A-RELEASE-RQ: once the association's instances are in the spool, A-RELEASE-RP."""
        if assoc.cmd is not None:
            raise ul.UpperLayerError("A-RELEASE-RQ while a data set is pending")
        self._wait_materialised(assoc.last_seq)
        sock.settimeout(self.settings.node.dimse_timeout_s)
        sock.sendall(ul.A_RELEASE_RP)
        return "association_released"

    def _on_abort(self, sock: socket.socket, assoc: _Assoc, body: memoryview) -> str:
        """A-ABORT from the peer: close (a pending reception is dropped)."""
        return "association_aborted"

    def _log_end(self, assoc: _Assoc, how: str) -> None:
        st = assoc.stats
        if st.counted:
            st.counted = False
            metrics.association_ended()
            if how != "association_released":
                metrics.record_association("aborted")
        dt = time.perf_counter() - st.started
        n = max(1, st.stored)
        log.info(how, assoc_id=st.assoc_id, calling_ae=st.calling_ae, called_ae=st.called_ae,
                 peer_host=st.peer_host, stored=st.stored, duplicates=st.duplicates,
                 failed=st.failed, bytes=st.bytes, duration_s=round(dt, 3), tls=assoc.tls,
                 store_ms_avg=round(1000 * st.store_s / max(1, st.stored + st.duplicates), 3),
                 header_ms_avg=round(1000 * st.header_s / n, 3),
                 fsync_ms_avg=round(1000 * st.fsync_s / n, 3),
                 commit_ms_avg=round(1000 * st.commit_s / n, 3),
                 cpu_ms_avg=round(1000 * st.cpu_s / max(1, st.stored + st.duplicates), 3),
                 instances_per_s=round((st.stored + st.duplicates) / dt, 1) if dt > 0 else None)

    def _dispatch(self, sock: socket.socket, assoc: _Assoc, cx_id: int, cmd: dict[int, bytes],
                  rx: _Received | None) -> None:
        field = ul.command_us(cmd, 0x0100)
        msg_id = ul.command_us(cmd, 0x0110)
        st = assoc.stats
        st.requests += 1
        if field == ul.C_ECHO_RQ and rx is None:
            log.info("c_echo", assoc_id=st.assoc_id, calling_ae=st.calling_ae,
                     peer_host=st.peer_host)
            sop_class = ul.command_uid_raw(cmd, 0x0002) or VERIFICATION.encode()
            rsp = ul.encode_response(ul.C_ECHO_RSP, msg_id, sop_class, None, status.SUCCESS)
        elif field == ul.C_STORE_RQ and rx is not None:
            raw_class = ul.command_uid_raw(cmd, 0x0002)
            raw_inst = ul.command_uid_raw(cmd, 0x1000)
            code = self._on_store(assoc, cx_id, raw_class.decode("ascii", "replace"),
                                  raw_inst.decode("ascii", "replace"), rx)
            rsp = ul.encode_response(ul.C_STORE_RSP, msg_id, raw_class, raw_inst, code)
        else:
            raise ul.UpperLayerError(f"unsupported DIMSE command 0x{field:04X}")
        sock.settimeout(self.settings.node.dimse_timeout_s)
        sock.sendall(ul.p_data_tf(cx_id, rsp))
        st.responses += 1
        st.last_response = time.monotonic()

    # -- C-STORE: the one intake --------------------------------------------------------------

    def _received(self, assoc: _Assoc, cx_id: int, cmd: dict[int, bytes]) -> _Received:
        """Where the data set of a C-STORE-RQ goes while it arrives.

        A request whose Affected SOP Class / Instance UID is not a valid UID is refused
        (0xC003) once its data set has arrived; its bytes are dropped as they come.
        """
        _, ts = assoc.contexts[cx_id]
        raw_class = ul.command_uid_raw(cmd, 0x0002)
        raw_inst = ul.command_uid_raw(cmd, 0x1000)
        refusal = None
        for name, raw in (("Affected SOP Instance UID", raw_inst),
                          ("Affected SOP Class UID", raw_class)):
            if not ul.is_valid_uid(raw):
                refusal = (status.INVALID_COMMAND_UID,
                           f"C-STORE-RQ {name} is not a valid UID ({len(raw)} bytes)")
                break
        meta = b"" if refusal else ul.file_meta(raw_class.decode("ascii"),
                                                raw_inst.decode("ascii"), ts)
        return _Received(meta, self.spool.incoming, self.settings.node.max_instance_bytes,
                         refusal)

    def _on_store(self, assoc: _Assoc, cx_id: int, sop_class: str, sop_instance: str,
                  rx: _Received) -> int:
        """Store one received data set; the status to answer (one log line per refusal)."""
        t0 = time.perf_counter()
        st = assoc.stats
        reason = ""
        try:
            code = self._store(assoc, cx_id, sop_class, sop_instance, rx)
        except InstanceRejected as rej:
            code, reason = rej.status, rej.reason
        except Exception as err:  # noqa: BLE001 - answer a status, keep serving
            if disk_full(err):
                code, reason = status.OUT_OF_RESOURCES, f"disk full: {type(err).__name__}"
            else:
                code = status.PROCESSING_FAILURE
                log.exception("instance_store_failed", assoc_id=st.assoc_id,
                              sop_instance_uid=sop_instance if ul.is_valid_uid(
                                  sop_instance.encode("ascii", "replace")) else "(invalid)")
        if code != status.SUCCESS:
            st.failed += 1
            if reason:
                log.warning("instance_refused", assoc_id=st.assoc_id, calling_ae=st.calling_ae,
                            peer_host=st.peer_host, status=f"0x{code:04X}",
                            status_name=status.status_name(code), reason=reason,
                            sop_instance_uid=sop_instance if ul.is_valid_uid(
                                sop_instance.encode("ascii", "replace")) else "(invalid)")
        st.store_s += time.perf_counter() - t0
        return code

    def _store(self, assoc: _Assoc, cx_id: int, sop_class: str, sop_instance: str,
               rx: _Received) -> int:
        cfg = self.settings
        st = assoc.stats
        if rx.refusal is not None:
            raise InstanceRejected(*rx.refusal)
        context_class, ts = assoc.contexts[cx_id]
        size = rx.size
        if rx.over_limit or size > cfg.node.max_instance_bytes:
            raise InstanceRejected(status.OUT_OF_RESOURCES,
                                   f"instance of {size} bytes exceeds node.max_instance_bytes")
        if not self._room.has_room(cfg.storage.min_free_bytes, cfg.storage.min_free_percent,
                                   size):
            raise InstanceRejected(status.OUT_OF_RESOURCES, "spool disk below its watermark")
        t0 = time.perf_counter()
        limit = cfg.node.max_instance_bytes
        if rx.path is not None:
            rx.finish()
            with open(rx.path, "rb") as f:
                rejection = validate(f, ts, offset=len(rx.meta), max_inflated_bytes=limit)
            part10 = b""
            if rejection is not None:
                raise InstanceRejected(rejection.status, rejection.reason)
            header = read_header(rx.path)
        else:
            part10 = rx.join()
            dataset = memoryview(part10)[len(rx.meta):]
            # One struct walk both validates and reads the header of a plain data set; any
            # other goes through validate() and the usual header read.
            found = scan_header(dataset, ts, validated=True)
            if found is None:
                rejection = validate(dataset, ts, max_inflated_bytes=limit)
                if rejection is not None:
                    raise InstanceRejected(rejection.status, rejection.reason)
                found = scan_header(dataset, ts) or read_header_bytes(part10)
            header = found
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
                try:
                    is_new = self._store_spilled(rx.path, rec)
                finally:
                    rx.path = None  # moved into the spool (or removed)
                if rec.replaced and old_path is not None:
                    with contextlib.suppress(OSError):
                        old_path.unlink()
            else:
                is_new = None
                item = _Pending(0, rec, part10, old_path)
                self._pending[uid] = item
        if is_new is None:
            try:
                is_new = self.journal_committer.submit(item)
            except BaseException:
                with self._dedupe_lock:
                    if self._pending.get(uid) is item:
                        if pend is not None and pend.seq:
                            self._pending[uid] = pend  # still unindexed: keep it findable
                        else:
                            del self._pending[uid]
                raise
            assoc.last_seq = max(assoc.last_seq, item.seq)
            st.fsync_s += item.fsync_s
        st.commit_s += time.perf_counter() - t1
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

    def _store_spilled(self, tmp: Path, rec: InstanceRecord) -> bool:
        """Store a large instance: fsync, rename, folder fsync, index ("new row?").

        Called with the dedupe lock held. Its file is in place before the acknowledgement, so
        nothing is journaled and nothing waits for the materialiser. On failure nothing of
        it stays (neither the file nor its row).
        """
        try:
            dirs = self.spool.install(tmp, rec.path, sync_first=rec.replaced)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            return self.committer.submit((rec, dirs, None if rec.replaced else rec.path))
        except BaseException:
            if not rec.replaced:
                with contextlib.suppress(OSError):
                    rec.path.unlink(missing_ok=True)
            raise

    def _commit_files(self, items: list[_CommitItem]) -> list[bool]:
        """Group commit of large instances: fsync their files and folders, index them.

        The fsyncs run concurrently with one SQLite transaction; the caller acknowledges
        only after both. ``flushed_upto`` (the rows of earlier batches, known durable) lets
        :meth:`~dicom_node.index.SeriesIndex.reconcile` check only the last batch's files.
        """
        dirs: set[Path] = set()
        files: list[Path] = []
        for _, d, f in items:
            dirs |= d
            if f is not None:
                files.append(f)
        db = self._db_pool.submit(self.index.record, [r for r, _, _ in items],
                                  use_expected_count=False, flushed_upto=self._flushed_upto)
        try:
            self.spool.sync(files, dirs)
        except BaseException:
            # Not durable: the rows must not outlive this failure.
            with contextlib.suppress(Exception):
                done: RecordOutcome = db.result()
                self.index.forget([r.sop_instance_uid for (r, _, _), new in
                                   zip(items, done.new, strict=True) if new])
            raise
        out: RecordOutcome = db.result()
        if out.max_rowid is not None:
            self._flushed_upto = out.max_rowid
        for series_uid, revision in out.new_revisions:
            log.info("late_instance_new_revision", series_uid=series_uid, revision=revision)
        if out.due_expected and self.settings.completion.use_expected_count:
            self._announce(self.index.complete_expected(out.due_expected))
        return out.new

    def _commit_journal(self, items: list[_Pending]) -> list[bool]:
        """Group commit: append the batch to the journal and flush it once.

        One ``fdatasync`` per batch, and nothing else, before the acknowledgements: the
        index rows are written afterwards by the materialiser, in one transaction per pass
        (:meth:`_index_materialised`). Until then the dedupe set (``_pending``) answers for
        these UIDs; after kill -9 the start-up replay indexes the records whose rows are
        missing (:meth:`_replay_journal`). A batch that fails (disk full) is rolled back:
        its records are cleared from the journal, so nothing of it outlives the failure.
        Returns "new instance?" per item (always ``True``: duplicates were answered before).
        """
        with self._mat_cond:  # back-pressure: bound what waits for the materialiser
            self._mat_cond.wait_for(lambda: self._pending_bytes < PENDING_BYTES_MAX
                                    or self._mat_stop, timeout=30)
        mark = self.journal.mark()
        try:
            for i in items:
                i.seq = self.journal.append(_record_header(i.rec), i.data)
            t = time.perf_counter()
            self.journal.sync()
            dt = time.perf_counter() - t
        except BaseException:
            with contextlib.suppress(Exception):
                self.journal.rollback(mark)
            for i in items:
                i.seq = 0
            raise
        with self._mat_cond:
            self._outstanding.update(i.seq for i in items)
            self._top_seq = max(self._top_seq, *(i.seq for i in items))
            self._pending_bytes += sum(len(i.data) for i in items)
            self._mat_queue.extend(items)
            self._mat_cond.notify_all()
        for i in items:
            i.fsync_s = dt
        return [True] * len(items)

    def _rx_index(self) -> SeriesIndex:
        """The receiver's own index handle: its connections commit without a flush."""
        conn = self._rx_idx.conn
        if not getattr(self._rx_local, "normal", False):
            conn.execute("PRAGMA synchronous=NORMAL")
            self._rx_local.normal = True
        return self._rx_idx

    # -- materialiser ------------------------------------------------------------------------------

    def _materialise_loop(self) -> None:
        """Write acknowledged instances into the spool and index; retry what fails.

        One pass: the spool file of each queued instance, then one index transaction for
        the instances written (:meth:`_index_materialised`); only then do they leave the
        dedupe set and count as materialised. An instance whose file or row fails (disk
        full, a locked database) stays outstanding, so the journal segments holding it (and
        every later one) are not recycled until it is done; it is retried every
        :data:`MATERIALISE_RETRY_S`. At stop, whatever still fails stays in the journal and
        is replayed at the next start.
        """
        retry: list[_Pending] = []
        while True:
            with self._mat_cond:
                if retry and not self._mat_queue and not self._mat_stop:
                    self._mat_cond.wait(MATERIALISE_RETRY_S)
                while not self._mat_queue and not self._mat_stop and not retry:
                    self._mat_cond.wait()
                if not self._mat_queue and not retry:
                    return
                if not retry and not self._mat_stop and not self._release_waiters:
                    # Let a few more acknowledgements queue up (one wake-up, one pass and one
                    # index transaction for several instances, less contention with the
                    # receiving threads).
                    self._mat_cond.release()
                    try:
                        time.sleep(MATERIALISE_BATCH_S)
                    finally:
                        self._mat_cond.acquire()
                batch, self._mat_queue = [*retry, *self._mat_queue], []
                stopping = self._mat_stop
            written: list[_Pending] = []
            for item in batch:
                if not item.in_spool:
                    try:
                        self._write_file(item.rec.path, item.data)
                    except Exception as err:  # noqa: BLE001 - kept in the journal, retried
                        self._materialise_failed(item, err)
                        continue
                    item.in_spool = True
                    if item.old_path is not None:
                        with contextlib.suppress(OSError):
                            item.old_path.unlink()
                written.append(item)
            indexed: list[_Pending] = []
            if written:
                try:
                    self._index_materialised(written)
                    indexed = written
                except Exception as err:  # noqa: BLE001 - kept in the journal, retried
                    for item in written:
                        self._materialise_failed(item, err)
            done_ids = {id(i) for i in indexed}
            retry = [i for i in batch if id(i) not in done_ids]
            for item in indexed:
                if item.failures:
                    log.info("materialise_recovered", sop_instance_uid=item.rec.sop_instance_uid,
                             attempts=item.failures + 1)
            with self._dedupe_lock:  # after the rows are committed: lookups find them now
                for item in indexed:
                    if self._pending.get(item.rec.sop_instance_uid) is item:
                        del self._pending[item.rec.sop_instance_uid]
            with self._mat_cond:
                self._outstanding.difference_update(i.seq for i in indexed)
                self._pending_bytes -= sum(len(i.data) for i in indexed)
                safe = self._materialised_upto()
                self._mat_cond.notify_all()
            try:
                self.journal.release_upto(safe, self.spool.root, *self._index_folders)
            except OSError:
                log.exception("journal_release_failed")
            if stopping and retry:
                log.warning("materialise_deferred", instances=len(retry),
                            detail="left in the journal; replayed at the next start")
                return

    def _materialise_failed(self, item: _Pending, err: Exception) -> None:
        item.failures += 1
        if item.failures == 1:
            log.warning("materialise_failed", sop_instance_uid=item.rec.sop_instance_uid,
                        reason=f"{type(err).__name__}: {err}", in_spool=item.in_spool,
                        detail="kept in the journal; retried")

    def _index_materialised(self, items: list[_Pending]) -> None:
        """Index instances whose spool files are written: one transaction (no flush).

        The receiver's connection commits with ``synchronous=NORMAL``; the index's file
        system is synced with the spool's before the journal records behind these rows are
        recycled (:meth:`~dicom_node.fastscp.journal.Journal.release_upto`), so a power cut
        loses no row the journal no longer holds. Series whose expected instance count is
        reached are completed in the same transaction (their files are all in the spool).
        """
        out = self._rx_index().record(
            [i.rec for i in items], use_expected_count=self.settings.completion
            .use_expected_count, flushed_upto=self._flushed_upto)
        if out.max_rowid is not None:
            self._flushed_upto = out.max_rowid
        for series_uid, revision in out.new_revisions:
            log.info("late_instance_new_revision", series_uid=series_uid, revision=revision)
        self._announce(out.completed)

    def _materialised_upto(self) -> int:
        """Every journal record up to this sequence number is in the spool (hold the cond)."""
        return min(self._outstanding) - 1 if self._outstanding else self._top_seq

    def _wait_materialised(self, seq: int, timeout_s: float = RELEASE_WAIT_S) -> None:
        with self._mat_cond:
            self._release_waiters += 1
            try:
                self._mat_cond.wait_for(lambda: self._materialised_upto() >= seq,
                                        timeout=timeout_s)
            finally:
                self._release_waiters -= 1


def _shut(sock: socket.socket) -> None:
    """Shut a socket down (ends a blocking read in another thread)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


STA6_ACTIONS: dict[int, Callable[[Listener, socket.socket, _Assoc, memoryview], str | None]] = {
    ul.P_DATA_TF_TYPE: Listener._on_p_data,
    ul.A_RELEASE_RQ_TYPE: Listener._on_release_rq,
    ul.A_ABORT_TYPE: Listener._on_abort,
}
"""Sta6 (established) of PS3.8's state machine: PDU type → action (in the style of pynetdicom's
``fsm.py``). Sta2 is :meth:`Listener._associate` (A-ASSOCIATE-RQ only, under ARTIM); every
PDU type missing here is a protocol error → A-ABORT (AA-1/AA-7)."""


def _file_holds(path: Path, data: bytes) -> bool:
    """Whether the file at ``path`` holds exactly ``data``."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _dataset_of(part10: bytes) -> bytes:
    """The data set bytes of a Part 10 file (after its file meta group)."""
    if part10[128:132] != b"DICM":
        return part10
    (length,) = struct.unpack("<L", part10[140:144])
    return part10[144 + length:]


FastListener = Listener
"""Former name of :class:`Listener` (when a second, pynetdicom-based receiver existed)."""


def make_listener(settings: NodeSettings, index: SeriesIndex, spool: Spool,
                  tracker: SeriesTracker | None = None) -> Listener:
    """The node's listener (there is one receive path)."""
    return Listener(settings, index, spool, tracker)


__all__ = ["FastListener", "Listener", "make_listener", "read_header_bytes", "scan_header"]
