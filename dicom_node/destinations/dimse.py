"""``dimse`` destination: C-STORE SCU with pynetdicom, one association per batch.

Negotiation: for every SOP class in the batch the node proposes the stored transfer syntax on
its own presentation context and, on a second context, Explicit and Implicit VR Little Endian.
An instance goes in its stored syntax when the peer accepted it; only when the peer refused a
compressed stored syntax is the instance decompressed (transcoded) to the accepted
uncompressed one. A file sent in its stored syntax goes as its bytes (pynetdicom's chunked
send: the data set after the file meta, never decoded or encoded again). Each instance's
C-STORE status is checked: success (0x0000) and the warning statuses (0xB000, 0xB006, 0xB007:
stored with coercion) count as delivered.

:meth:`DimseStore.send_stream` sends items as they become available (the worker hands each
output over as soon as it is durable in the spool) over one association negotiated up front.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import DimseDestination
from dicom_node.destinations import (
    DeliveryResult,
    DestinationError,
    Item,
    item_uid,
    load_item,
    negotiation_key,
)
from dicom_node.logs import get_logger
from dicom_node.tls import TLSConfigError, client_tls_args

log = get_logger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""Fallback syntaxes proposed for every SOP class."""
MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (DICOM PS3.8)."""
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
"""C-STORE warnings that still mean the instance was stored."""

# A path given to send_c_store is sent as its bytes (no dcmread, no re-encoding); only done
# when the accepted context has the file's own transfer syntax (see DimseStore._store_one).
_config.STORE_SEND_CHUNKED_DATASET = True



class DimseStore:
    """C-STORE to a DICOM peer.

    Args:
        name: Destination name (logs, delivery records).
        cfg: Peer AE title, host, port, timeout and TLS settings.
        calling_ae: AE title the node calls with.
    """

    def __init__(self, name: str, cfg: DimseDestination, calling_ae: str) -> None:
        self.name = name
        self.cfg = cfg
        self.calling_ae = calling_ae

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.cfg.timeout_s
        ae.dimse_timeout = self.cfg.timeout_s
        ae.network_timeout = self.cfg.timeout_s
        ae.connection_timeout = self.cfg.timeout_s
        return ae

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """``tls_args`` for the association: the node's one client TLS policy (``dicom_node.tls``).

        Raises:
            DestinationError: A TLS file is missing or unusable (the message names the key).
        """
        try:
            return client_tls_args(self.cfg)
        except TLSConfigError as err:
            raise DestinationError(f"destination {self.name}: {err}") from None

    def _associate(self, ae: AE) -> Association:
        assoc = ae.associate(
            self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title, tls_args=self._tls_args()
        )
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            raise DestinationError(
                f"destination {self.name}: association with {self.cfg.ae_title}@"
                f"{self.cfg.host}:{self.cfg.port} {why}"
            )
        return assoc

    def test(self) -> str:
        """C-ECHO the peer.

        Raises:
            DestinationError: No association, or a non-success C-ECHO status.
        """
        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc = self._associate(ae)
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        code = int(status.Status) if status and "Status" in status else None
        if code != 0x0000:
            raise DestinationError(
                f"destination {self.name}: C-ECHO answered "
                + (f"0x{code:04X}" if code is not None else "nothing (timeout or abort)")
            )
        return f"C-ECHO to {self.cfg.ae_title}@{self.cfg.host}:{self.cfg.port} succeeded"

    def send(self, items: Sequence[Item]) -> list[DeliveryResult]:
        """C-STORE ``items`` over one association; one result per item, in order.

        Raises:
            DestinationError: The association could not be established.
        """
        if not items:
            return []
        return self.send_stream(items, [negotiation_key(i) for i in items])

    def send_stream(self, items: Iterable[Item], classes: Iterable[tuple[str, str]],
                    on_result: Callable[[DeliveryResult], None] | None = None
                    ) -> list[DeliveryResult]:
        """C-STORE ``items`` as the iterable yields them, over one association.

        The association is opened at once, proposing contexts for ``classes`` (``(SOP Class
        UID, stored Transfer Syntax UID)`` of every item that will come, see
        :func:`negotiation_key`); each item is sent when the iterable hands it over (the
        iterable may block until the next one exists). Items after a lost association are
        answered ``association lost`` (the iterable is still consumed). ``on_result`` gets
        each instance's result as soon as its C-STORE is answered.

        Returns:
            One result per item, in order.

        Raises:
            DestinationError: The association could not be established (nothing was sent).
        """
        ae = self._ae()
        wanted: list[tuple[str, tuple[UID, ...]]] = []
        for sop_class, ts in classes:
            stored = UID(ts)
            if stored not in UNCOMPRESSED and (sop_class, (stored,)) not in wanted:
                wanted.append((sop_class, (stored,)))
            if (sop_class, UNCOMPRESSED) not in wanted:
                wanted.append((sop_class, UNCOMPRESSED))
        if not wanted:
            return []
        if len(wanted) > MAX_CONTEXTS:
            raise DestinationError(
                f"destination {self.name}: batch needs {len(wanted)} presentation contexts"
                f" (at most {MAX_CONTEXTS}); send smaller batches"
            )
        for sop_class, syntaxes in wanted:
            ae.add_requested_context(sop_class, list(syntaxes))
        assoc = self._associate(ae)
        results: list[DeliveryResult] = []
        pending = iter(items)
        try:
            for item in pending:
                results.append(self._store_one(assoc, item))
                if on_result is not None:
                    on_result(results[-1])
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        for item in pending:
            results.append(DeliveryResult(item_uid(item), False, "association lost"))
        bad = [r for r in results if not r.ok]
        log.info("dimse batch sent", destination=self.name, sent=len(results) - len(bad),
                 failed=len(bad), first_failure=bad[0].detail if bad else None)
        return results

    def _context_for(self, assoc: Association, sop_class: str, stored: UID
                     ) -> PresentationContext | None:
        accepted = [
            cx for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.as_scu is not False
        ]
        for cx in accepted:
            if cx.transfer_syntax[0] == stored:
                return cx
        for cx in accepted:
            if cx.transfer_syntax[0] in UNCOMPRESSED:
                return cx
        return None

    def _store_one(self, assoc: Association, item: Item) -> DeliveryResult:
        if isinstance(item, Path):
            meta = read_file_meta_info(item)
            uid = str(meta.MediaStorageSOPInstanceUID)
            sop_class, stored = str(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)
            cx = self._context_for(assoc, sop_class, stored)
            if cx is None:
                return DeliveryResult(uid, False, f"peer accepts no context for {sop_class}")
            if UID(cx.transfer_syntax[0]) == stored and _config.STORE_SEND_CHUNKED_DATASET:
                return self._status(uid, assoc.send_c_store(item))  # the file's bytes
        ds = load_item(item)
        uid = str(ds.SOPInstanceUID)
        stored = UID(ds.file_meta.TransferSyntaxUID)
        cx = self._context_for(assoc, str(ds.SOPClassUID), stored)
        if cx is None:
            return DeliveryResult(uid, False, f"peer accepts no context for {ds.SOPClassUID}")
        target = UID(cx.transfer_syntax[0])
        if target != stored and stored.is_compressed:
            try:
                # Keep the SOP Instance UID: pydicom would make a new one by default.
                ds.decompress(generate_instance_uid=False)  # -> Explicit VR Little Endian
            except Exception as exc:  # noqa: BLE001 - decoder errors vary by plugin
                return DeliveryResult(uid, False, f"cannot transcode from {stored.name}: {exc}")
            log.info("instance transcoded for peer", destination=self.name,
                     sop_instance_uid=uid, stored=stored.name, sent=target.name)
        # pynetdicom picks the exact-syntax context, else converts between uncompressed ones.
        return self._status(uid, assoc.send_c_store(ds))

    @staticmethod
    def _status(uid: str, status: pydicom.Dataset | None) -> DeliveryResult:
        """The delivery result of one C-STORE response (``None``/empty: no answer)."""
        if not status or "Status" not in status:
            return DeliveryResult(uid, False, "no C-STORE response (timeout or abort)")
        code = int(status.Status)
        if code == 0x0000 or code in WARNING_STATUSES:
            return DeliveryResult(uid, True, f"0x{code:04X}")
        comment = str(status.get("ErrorComment", "")).strip()
        return DeliveryResult(uid, False, f"0x{code:04X}" + (f" {comment}" if comment else ""))

