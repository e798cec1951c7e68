"""Append-only audit trail: one JSON object per line, fsync'd before :meth:`AuditLog.write` returns.

A security officer asks *who sent what and where it went*. Each line answers one such question
with UIDs, AE titles, hosts, counts, statuses and admin token ids; never patient data. A field
named like a patient attribute (see :data:`dicom_node.logs.PHI_KEYS`) is refused: it is dropped
from the line and counted in :attr:`AuditLog.dropped_fields`.

Line layout::

    {"ts": "2026-11-29T19:02:03.123456+00:00", "event": "delivery", "seq": 17,
     "job_id": 4, "destination": "pacs", "status": "ok", "sop_instance_uids": 5}

Calling API (what the listener, tracker, rules, worker and admin API call)::

    audit = AuditLog(settings.audit.path)          # or AuditLog.from_settings(settings)
    audit.association_accepted(calling_ae="CT1", called_ae="OMNIMRI", host="10.0.0.5")
    audit.write("series_received", series_uid=..., instances=120)

``AuditLog(None)`` is a no-op log (audit disabled by ``audit.path: null``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dicom_node.logs import PHI_KEYS, get_logger

if TYPE_CHECKING:
    from dicom_node.config import NodeSettings

log = get_logger("audit")

EVENTS: Final = frozenset(
    {
        "association_accepted",
        "association_rejected",
        "series_received",
        "rule_decision",
        "output_produced",
        "delivery",
        "admin_action",
        "retention_purged",
    }
)
"""The event names the audit trail knows; any other name is refused with ``ValueError``."""

_EXTRA_PHI_WORDS: Final = ("patient", "birth", "accession", "physician", "ssn")
"""Further fragments that mark a field name as patient data (``patient_sex``, ``PatientAge``)."""


def is_phi_field(name: str) -> bool:
    """Whether a field name looks like patient data and must never reach the audit file."""
    low = name.lower()
    if low in PHI_KEYS:
        return True
    compact = low.replace("_", "")
    return any(word in compact for word in _EXTRA_PHI_WORDS)


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not is_phi_field(str(k))}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


class AuditLog:
    """Thread-safe, append-only JSON-lines audit file.

    Args:
        path: The file (its folder is created); ``None`` disables auditing (every write is a
            no-op that returns ``None``).
        fsync: fsync each line before returning (default on; turn off only in benchmarks).
    """

    def __init__(self, path: Path | str | None, *, fsync: bool = True) -> None:
        self.path: Path | None = Path(path) if path is not None else None
        self._fsync = fsync
        self._lock = threading.Lock()
        self._seq = 0
        self.dropped_fields = 0
        """How many fields were refused because their name looked like patient data."""
        self.lines_written = 0
        """How many lines this object appended."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> AuditLog:
        """The audit log configured by ``settings.audit.path``."""
        return cls(settings.audit.path)

    @property
    def enabled(self) -> bool:
        """Whether lines are written at all."""
        return self.path is not None

    def write(self, event: str, **fields: Any) -> dict[str, Any] | None:
        """Append one event line and fsync it.

        Args:
            event: One of :data:`EVENTS`.
            **fields: UIDs, AE titles, hosts, counts, statuses, token ids. Fields named like
                patient data are dropped (and counted), never written.

        Returns:
            The record written, or ``None`` when auditing is disabled.

        Raises:
            ValueError: ``event`` is not one of :data:`EVENTS`.
            OSError: The file cannot be written (the caller decides whether that is fatal).
        """
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}; expected one of {sorted(EVENTS)}")
        if self.path is None:
            return None
        clean: dict[str, Any] = {}
        refused: list[str] = []
        for key, value in fields.items():
            if key in ("ts", "event", "seq"):
                raise ValueError(f"audit field name {key!r} is reserved")
            if is_phi_field(key):
                refused.append(key)
                continue
            clean[key] = _jsonable(value)
        with self._lock:
            self._seq += 1
            record = {
                "ts": dt.datetime.now(dt.UTC).isoformat(),
                "event": event,
                "seq": self._seq,
                **clean,
            }
            line = json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("utf-8"))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self.lines_written += 1
            if refused:
                self.dropped_fields += len(refused)
        if refused:
            # Field names only; the values never leave this function.
            log.warning("audit_fields_refused", audit_event=event, fields=sorted(refused))
        return record

    # Convenience wrappers: one per event, so call sites read like the audit question.

    def association_accepted(self, *, calling_ae: str, called_ae: str, host: str,
                             port: int | None = None, tls: bool = False,
                             **extra: Any) -> dict[str, Any] | None:
        """An association was accepted (calling/called AE title, peer host, TLS or not)."""
        return self.write("association_accepted", calling_ae=calling_ae, called_ae=called_ae,
                          host=host, port=port, tls=tls, **extra)

    def association_rejected(self, *, calling_ae: str, called_ae: str, host: str,
                             reason: str, **extra: Any) -> dict[str, Any] | None:
        """An association was rejected, with the reason (``unknown_caller``, ``busy``...)."""
        return self.write("association_rejected", calling_ae=calling_ae, called_ae=called_ae,
                          host=host, reason=reason, **extra)

    def series_received(self, *, study_uid: str, series_uid: str, instances: int,
                        calling_ae: str | None = None, **extra: Any) -> dict[str, Any] | None:
        """A series was completed by the tracker (UIDs and instance count)."""
        return self.write("series_received", study_uid=study_uid, series_uid=series_uid,
                          instances=instances, calling_ae=calling_ae, **extra)

    def rule_decision(self, *, series_uid: str, matched: list[str], pipelines: list[str],
                      destinations: list[str], **extra: Any) -> dict[str, Any] | None:
        """The rules decided what to do with a series (matched rule names, pipelines, targets)."""
        return self.write("rule_decision", series_uid=series_uid, matched=matched,
                          pipelines=pipelines, destinations=destinations, **extra)

    def output_produced(self, *, job_id: int | str, series_uid: str, kind: str,
                        sop_instance_uid: str, **extra: Any) -> dict[str, Any] | None:
        """A pipeline wrote a derived object (kind ``seg``/``sr``/..., its SOP Instance UID)."""
        return self.write("output_produced", job_id=job_id, series_uid=series_uid, kind=kind,
                          sop_instance_uid=sop_instance_uid, **extra)

    def delivery(self, *, job_id: int | str, destination: str, status: str,
                 instances: int = 0, **extra: Any) -> dict[str, Any] | None:
        """Results were (or failed to be) delivered to a destination."""
        return self.write("delivery", job_id=job_id, destination=destination, status=status,
                          instances=instances, **extra)

    def admin_action(self, *, token_id: str, action: str, target: str | None = None,
                     status: str = "ok", **extra: Any) -> dict[str, Any] | None:
        """An admin API call changed something (token id, action, target, outcome)."""
        return self.write("admin_action", token_id=token_id, action=action, target=target,
                          status=status, **extra)

    def retention_purged(self, *, study_uid: str, series_uid: str, instances: int,
                         **extra: Any) -> dict[str, Any] | None:
        """Retention deleted a series' spooled files and index rows (UIDs and counts)."""
        return self.write("retention_purged", study_uid=study_uid, series_uid=series_uid,
                          instances=instances, **extra)


def read_audit(path: Path | str, *, event: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records of an audit file in order, optionally only one event kind.

    A torn last line (power cut during a write) is skipped.
    """
    p = Path(path)
    if not p.exists():
        return
    with p.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event is None or rec.get("event") == event:
                yield rec


_DISABLED = AuditLog(None)
_default: AuditLog = _DISABLED
_default_lock = threading.Lock()


def configure_audit(path: Path | str | None) -> AuditLog:
    """Set the process-wide audit log returned by :func:`get_audit` (called once at start)."""
    global _default
    with _default_lock:
        _default = AuditLog(path) if path is not None else _DISABLED
        return _default


def get_audit() -> AuditLog:
    """The process-wide audit log (a disabled no-op log until :func:`configure_audit`)."""
    return _default
