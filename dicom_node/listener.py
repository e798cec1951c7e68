"""The DICOM listener: a pynetdicom Storage SCP that acknowledges only durable instances.

- C-ECHO, and C-STORE for every standard storage SOP class (Enhanced MR included), with every
  transfer syntax pynetdicom knows accepted as proposed; data sets are stored as received
  (never decoded or transcoded: only a few header tags are read).
- Associations are checked against ``node.allowed_callers`` (calling AE title and host/CIDR),
  the called AE title (``node.ae_title`` or an alias) and ``node.max_associations``, and
  rejected with the matching A-ASSOCIATE-RJ reason (see :mod:`dicom_node.status`).
- Each received data set goes to ``<spool>/.incoming`` (pynetdicom writes it there in
  chunks), is checked, fsync'd, renamed to its UID-derived name, and indexed; concurrent
  associations share folder fsyncs and the SQLite commit (:class:`~dicom_node.spool.GroupCommit`).
  Only then is 0x0000 answered. Any refusal answers a failure status, removes the partial file
  and writes one log line; the association goes on.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

import pynetdicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pnd_config
from pynetdicom import acse as pnd_acse
from pynetdicom import dimse_messages as pnd_dimse_messages
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationServer

from dicom_node import metrics, pynetdicom_fastpath, status
from dicom_node.audit import get_audit
from dicom_node.config import NodeSettings
from dicom_node.index import InstanceRecord, RecordOutcome, SeriesIndex
from dicom_node.logs import get_logger
from dicom_node.series_tracker import SeriesTracker, expected_count
from dicom_node.spool import GroupCommit, InstanceRejected, Spool, read_header, same_bytes
from dicom_node.tls import TLSConfigError, server_context

log = get_logger("listener")


_CommitItem = tuple[InstanceRecord, set[Path], Path | None]
"""(index record, folders to fsync, file to fsync or ``None`` if already fsync'd)."""


@dataclass
class AssociationStats:
    """Counters of one association, logged when it ends."""

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
    counted: bool = False
    """Counted in the open-associations gauge (so it is decremented exactly once)."""
    store_s: float = 0.0
    header_s: float = 0.0
    """Of which: reading and checking the header, seconds."""
    fsync_s: float = 0.0
    """Of which: fsync and rename of the file, seconds."""
    commit_s: float = 0.0
    """Of which: waiting for the group commit (folder fsync + SQLite), seconds."""
    """Time spent in the C-STORE handler (checks, fsync, index), seconds."""


def _called_ae(assoc: Any) -> str:
    prim = getattr(assoc.requestor, "primitive", None)
    if prim is not None:
        return str(prim.called_ae_title).strip()
    return str(assoc.acceptor.ae_title).strip()


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
        """``None`` to accept, else the A-ASSOCIATE-RJ (result, source, reason) and why."""
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


REJECT_PLAIN_WHEN_TLS_REQUIRED = (status.REJECT_PERMANENT, status.SOURCE_SERVICE_USER, 0x01)
"""A-ASSOCIATE-RJ (rejected-permanent, service-user, no-reason-given) for a plain TCP
association while ``node.tls.required`` is on."""


def _is_tls(assoc: Any) -> bool:
    """Whether the association runs over a TLS socket."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return isinstance(sock, ssl.SSLSocket)


_original_negotiate = pnd_acse.ACSE._negotiate_as_acceptor
_original_negotiate_contexts = pnd_acse.negotiate_as_acceptor
_in_node_negotiation = threading.local()


def _negotiate_contexts_in_requestor_order(rq_contexts: Any, ac_contexts: Any,
                                           roles: Any = None) -> Any:
    """Negotiate contexts; each gets the *requestor's* first proposed syntax we support.

    pynetdicom alone picks in the acceptor's order, which would turn an Explicit VR Little
    Endian sender into an Implicit VR one.
    """
    result, ac_roles = _original_negotiate_contexts(rq_contexts, ac_contexts, roles)
    if not getattr(_in_node_negotiation, "active", False):
        return result, ac_roles
    supported = {str(cx.abstract_syntax): {str(t) for t in cx.transfer_syntax}
                 for cx in ac_contexts}
    proposed = {cx.context_id: cx for cx in rq_contexts}
    for cx in result:
        rq = proposed.get(cx.context_id)
        if cx.result != 0x00 or rq is None:
            continue
        ok = supported.get(str(cx.abstract_syntax), set())
        for ts in rq.transfer_syntax:
            if str(ts) in ok:
                cx.transfer_syntax = [ts]
                break
    return result, ac_roles


pnd_acse.negotiate_as_acceptor = _negotiate_contexts_in_requestor_order


def _negotiate_with_policy(self: pnd_acse.ACSE) -> None:
    """Pynetdicom's acceptor negotiation, preceded by the node's :class:`CallerPolicy`."""
    listener: Listener | None = getattr(self.assoc.ae, "_omnimri_listener", None)
    if listener is None:
        _original_negotiate(self)
        return
    rq = self.requestor.primitive
    assert rq is not None  # noqa: S101 - set by the DUL before negotiation
    calling = str(rq.calling_ae_title).strip()
    called = str(rq.called_ae_title).strip()
    host = str(self.assoc.requestor.address)
    verdict = None
    if listener.tls_required and not _is_tls(self.assoc):
        verdict = REJECT_PLAIN_WHEN_TLS_REQUIRED, "TLS required: plain association refused"
    if verdict is None:
        verdict = listener.reserve(self.assoc, calling, called, host)
    if verdict is None:
        _in_node_negotiation.active = True
        try:
            _original_negotiate(self)
        finally:
            _in_node_negotiation.active = False
        return
    (result, source, reason), why = verdict
    log.warning("association_rejected", calling_ae=calling, called_ae=called, peer_host=host,
                reason=why, result=result, source=source, diagnostic=reason)
    metrics.record_association("rejected")
    get_audit().association_rejected(calling_ae=calling, called_ae=called, host=host, reason=why)
    self.requestor.ae_title = calling
    self.send_reject(result, source, reason)
    evt.trigger(self.assoc, evt.EVT_REJECTED, {})
    self.assoc.kill()


pnd_acse.ACSE._negotiate_as_acceptor = _negotiate_with_policy  # type: ignore[method-assign]


class Listener:
    """The node's Storage SCP.

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
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:6]
        self._server: AssociationServer | None = None
        self._tls_server: AssociationServer | None = None
        self.tls_required = settings.node.tls.required
        """Refuse associations that do not run over TLS (``node.tls.required``)."""
        self._active = 0
        self._active_lock = threading.Lock()
        self.committer: GroupCommit[_CommitItem, bool] = GroupCommit(
            self._commit, settings.storage.group_commit_ms / 1000.0, lambda: self._active)
        self.ae = self._make_ae()
        self._db_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-commit")
        self._flushed_upto: int | None = None
        self.recover()

    def recover(self) -> None:
        """Drop index rows whose files a crash took (never acknowledged); see ``reconcile``."""
        removed = self.index.reconcile(self.spool.is_intact)
        if removed:
            log.warning("unacknowledged_instances_dropped", count=len(removed),
                        sop_instance_uids=removed[:20],
                        detail="indexed but not on disk after a crash; senders retry them")

    def reserve(self, assoc: Any, calling: str, called: str, host: str
                ) -> tuple[tuple[int, int, int], str] | None:
        """Apply the policy; on acceptance count the association until its connection closes.

        Counting here (not pynetdicom's ``active_associations``, which also counts bare TCP
        probes still being torn down) makes ``max_associations`` exact.
        """
        with self._active_lock:
            verdict = self.policy.check(calling, called, host, self._active + 1)
            if verdict is None:
                self._active += 1
                assoc._omnimri_reserved = True
        return verdict

    def _on_close(self, event: Any) -> None:
        """Free the association's slot (once: at release/abort, or when the socket closes)."""
        with self._active_lock:
            if getattr(event.assoc, "_omnimri_reserved", False):
                event.assoc._omnimri_reserved = False
                self._active -= 1

    # -- set-up ----------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        # The policy counts associations exactly itself; pynetdicom's limit (which also counts
        # threads of connections still closing) is only a backstop against runaway threads.
        ae.maximum_associations = 2 * node.max_associations + 16
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae._omnimri_listener = self  # type: ignore[attr-defined]
        return ae

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        if self._server is None:
            return self.settings.node.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads."""
        node = self.settings.node
        # Received data sets are written in chunks straight into the spool's .incoming folder.
        pnd_config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's per-PDU/DIMSE log handlers format every message; the node logs its own.
        pnd_config.LOG_HANDLER_LEVEL = "none"
        # No 1 ms polling sleeps on the receive path (see dicom_node.pynetdicom_fastpath).
        fastpath = pynetdicom_fastpath.install()
        pnd_dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]
            NamedTemporaryFile, dir=str(self.spool.incoming), prefix="rx-")
        if not node.allowed_callers:
            log.warning("allow_list_empty", detail="every calling AE and host is accepted")
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        # DICOM TLS: on node.port itself, or on a separate node.tls.port next to plain TCP.
        if node.tls.required and not node.tls.enabled:
            raise TLSConfigError("node.tls.required: needs node.tls.enabled")
        tls_ctx = server_context(node.tls) if node.tls.enabled else None
        tls_port = node.tls.port if node.tls.enabled else None
        self._server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=handlers,
            ssl_context=tls_ctx if tls_port is None else None)
        if tls_port is not None:
            self._tls_server = self.ae.start_server(
                (node.host, tls_port), block=False, evt_handlers=handlers, ssl_context=tls_ctx)
        log.info("listening", ae_title=node.ae_title, aliases=node.aliases, host=node.host,
                 port=self.port, max_associations=node.max_associations,
                 max_pdu_bytes=node.max_pdu_bytes, pynetdicom=pynetdicom.__version__,
                 fastpath=fastpath,
                 tls=node.tls.enabled, tls_port=self.tls_port, tls_required=node.tls.required,
                 verify_client=node.tls.verify_client)

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port (``None`` without TLS).

        The separate ``node.tls.port``, or :attr:`port` when the main port speaks TLS.
        """
        if not self.settings.node.tls.enabled:
            return None
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        return self.settings.node.tls.port or self.port

    def stop(self) -> None:
        """Stop accepting, let running handlers finish, and close the server."""
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("listener_stopped")

    # -- events ----------------------------------------------------------------------------

    def _stats(self, event: Any) -> AssociationStats:
        st: AssociationStats | None = getattr(event.assoc, "_omnimri_stats", None)
        if st is None:
            req = event.assoc.requestor
            st = AssociationStats(
                assoc_id=f"{self._prefix}-{next(self._ids)}",
                calling_ae=str(req.ae_title).strip(),
                called_ae=_called_ae(event.assoc),
                peer_host=str(req.address),
                peer_port=int(req.port),
            )
            event.assoc._omnimri_stats = st
        return st

    def _on_established(self, event: Any) -> None:
        st = self._stats(event)
        log.info("association_accepted", assoc_id=st.assoc_id, calling_ae=st.calling_ae,
                 called_ae=st.called_ae, peer_host=st.peer_host, peer_port=st.peer_port,
                 contexts=len(event.assoc.accepted_contexts))
        metrics.record_association("accepted")
        metrics.association_started()
        st.counted = True
        get_audit().association_accepted(calling_ae=st.calling_ae, called_ae=st.called_ae,
                                          host=st.peer_host, port=st.peer_port,
                                          tls=_is_tls(event.assoc))

    def _on_end(self, event: Any) -> None:
        self._on_close(event)
        st = self._stats(event)
        if st.counted:
            st.counted = False
            metrics.association_ended()
            if event.event is not evt.EVT_RELEASED:
                metrics.record_association("aborted")
        dt = time.perf_counter() - st.started
        log.info("association_released" if event.event is evt.EVT_RELEASED
                 else "association_aborted",
                 assoc_id=st.assoc_id, calling_ae=st.calling_ae, called_ae=st.called_ae,
                 peer_host=st.peer_host, stored=st.stored, duplicates=st.duplicates,
                 failed=st.failed, bytes=st.bytes, duration_s=round(dt, 3),
                 store_ms_avg=round(1000 * st.store_s / max(1, st.stored + st.duplicates), 3),
                 header_ms_avg=round(1000 * st.header_s / max(1, st.stored), 3),
                 fsync_ms_avg=round(1000 * st.fsync_s / max(1, st.stored), 3),
                 commit_ms_avg=round(1000 * st.commit_s / max(1, st.stored), 3),
                 instances_per_s=round((st.stored + st.duplicates) / dt, 1) if dt > 0 else None)

    def _on_echo(self, event: Any) -> int:
        st = self._stats(event)
        log.info("c_echo", assoc_id=st.assoc_id, calling_ae=st.calling_ae, peer_host=st.peer_host)
        return status.SUCCESS

    def _on_store(self, event: Any) -> int:
        t0 = time.perf_counter()
        st = self._stats(event)
        tmp = Path(event.dataset_path)
        try:
            code = self._store(event, st, tmp)
        except InstanceRejected as rej:
            code = rej.status
            st.failed += 1
            log.warning("instance_refused", assoc_id=st.assoc_id, calling_ae=st.calling_ae,
                        peer_host=st.peer_host, status=f"0x{rej.status:04X}",
                        status_name=status.status_name(rej.status), reason=rej.reason,
                        sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""))
        except Exception:  # noqa: BLE001 - answer a status, keep serving
            code = status.PROCESSING_FAILURE
            st.failed += 1
            log.exception("instance_store_failed", assoc_id=st.assoc_id,
                          sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""))
        if code != status.SUCCESS:
            with contextlib.suppress(OSError):
                tmp.unlink()
        st.store_s += time.perf_counter() - t0
        return code

    def _store(self, event: Any, st: AssociationStats, tmp: Path) -> int:
        cfg = self.settings
        size = tmp.stat().st_size
        if size > cfg.node.max_instance_bytes:
            raise InstanceRejected(status.OUT_OF_RESOURCES,
                                   f"instance of {size} bytes exceeds node.max_instance_bytes")
        if not self.spool.has_room(cfg.storage.min_free_bytes, cfg.storage.min_free_percent):
            raise InstanceRejected(status.OUT_OF_RESOURCES, "spool disk below its watermark")
        t0 = time.perf_counter()
        header = read_header(tmp)
        st.header_s += time.perf_counter() - t0
        req = event.request
        context_class = str(event.context.abstract_syntax)
        if header.sop_class_uid != context_class or header.sop_class_uid != str(
                req.AffectedSOPClassUID):
            raise InstanceRejected(status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                   "data set SOP Class UID differs from the presentation context")
        if header.sop_instance_uid != str(req.AffectedSOPInstanceUID):
            raise InstanceRejected(status.SOP_INSTANCE_MISMATCH,
                                   "data set SOP Instance UID differs from the request")
        final = self.spool.path_for(header.study_instance_uid, header.series_instance_uid,
                                    header.sop_instance_uid)
        existing = self.index.lookup_instance(header.sop_instance_uid)
        replaced = False
        old_path: Path | None = None
        if existing is not None and existing[0].exists():
            if existing[1] == size and same_bytes(existing[0], tmp):
                tmp.unlink()
                st.duplicates += 1
                log.info("duplicate_instance", assoc_id=st.assoc_id, same_bytes=True,
                         sop_instance_uid=header.sop_instance_uid)
                return status.SUCCESS
            if cfg.storage.duplicate_policy == "keep_first":
                tmp.unlink()
                st.duplicates += 1
                log.warning("duplicate_instance", assoc_id=st.assoc_id, same_bytes=False,
                            policy="keep_first", sop_instance_uid=header.sop_instance_uid)
                return status.SUCCESS
            replaced = True
            old_path = existing[0] if existing[0] != final else None
        elif existing is not None:
            replaced = True  # indexed, but its file is gone: store it again
        t1 = time.perf_counter()
        # A new instance is renamed at once and fsync'd together with its folder in the group
        # commit; a replacement is fsync'd before it takes the acknowledged file's place.
        dirs = self.spool.install(tmp, final, sync_first=replaced)
        t2 = time.perf_counter()
        st.fsync_s += t2 - t1
        rec = InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            series_instance_uid=header.series_instance_uid,
            study_instance_uid=header.study_instance_uid,
            path=final,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            size_bytes=size,
            received_at=time.time(),
            replaced=replaced,
            modality=header.modality,
            series_description=header.series_description,
            instance_number=header.instance_number,
            number_of_frames=header.number_of_frames,
            expected_count=expected_count(header),
            calling_ae=st.calling_ae,
            called_ae=st.called_ae,
            peer_host=st.peer_host,
        )
        is_new = self.committer.submit((rec, dirs, None if replaced else final))
        st.commit_s += time.perf_counter() - t2
        if replaced:
            log.warning("duplicate_instance", assoc_id=st.assoc_id, same_bytes=False,
                        policy="replace", sop_instance_uid=header.sop_instance_uid)
            if old_path is not None:
                with contextlib.suppress(OSError):
                    old_path.unlink()
        if is_new or replaced:
            st.stored += 1
            metrics.record_instance(size)
        else:
            st.duplicates += 1
            log.info("duplicate_instance", assoc_id=st.assoc_id, same_bytes=True,
                     sop_instance_uid=header.sop_instance_uid)
        st.bytes += size
        return status.SUCCESS

    def _commit(self, items: list[_CommitItem]) -> list[bool]:
        """Group commit: make a batch durable and indexed; returns "new row" per item.

        The new files and their folders are fsync'd (each folder once, all concurrently)
        while one SQLite transaction indexes the batch, so the two flushes overlap; the
        caller acknowledges only after both. The transaction records ``flushed_upto`` (the
        rows of the previous batches, whose files are known durable) so that after a crash
        :meth:`~dicom_node.index.SeriesIndex.reconcile` checks only the last batch's files.
        Series completed by their expected count are completed after the flush.
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
            # Not durable: the rows must not outlive this failure (a retry would look like a
            # duplicate of an instance that never reached the disk).
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
            out.completed = self.index.complete_expected(out.due_expected)
        if out.completed:
            if self.tracker is not None:
                self.tracker.completed(out.completed)
            else:
                from dicom_node.series_tracker import log_completion

                for ev in out.completed:
                    log_completion(ev)
        return out.new

