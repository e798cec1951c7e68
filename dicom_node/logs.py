"""Structured logging (structlog) with a guard against patient data.

Log events carry UIDs, counts and timings; never names, IDs or birth dates. :func:`scrub_phi`
is a structlog processor that drops any event key named like a patient attribute, so a careless
``log.info("x", PatientName=...)`` still leaks nothing, and passes the free text of ``error`` and
``exception`` (tracebacks) through :func:`scrub_text`.

Text the node does not write itself goes through the same guard: :func:`configure_logging`
routes the standard library's logging (pydicom, pynetdicom, ...) and :mod:`warnings` (pydicom's
"Invalid value for VR UI: '...'" carries the raw value, which in a corrupted data set may be a
patient's name) into structlog as ``library_log`` events with the message scrubbed, repeats of
one message summarised (``repeats``), and uncaught exceptions in threads logged the same way.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
import warnings
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

PHI_KEYS = frozenset(
    k.lower()
    for k in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientMotherBirthName",
        "ReferringPhysicianName",
        "AccessionNumber",
        "patient_name",
        "patient_id",
        "birth_date",
        "dataset",
    )
)
"""Event keys that are removed from every log event (compared case-insensitively)."""


TEXT_KEYS = frozenset({"error", "exception"})
"""Event keys whose free text (exception messages, tracebacks) :func:`scrub_text` cleans."""

_QUOTES = re.compile(r"""['"]""")
_OPENS = re.compile(r"(?:^|[^A-Za-z0-9])b?$")
"""What precedes an opening quote: no word character, or a lone ``b`` (a bytes repr); a quote
after a word character is an apostrophe."""
_PERSON_NAME = re.compile(r"[^\s'\"=:,;()\[\]<>]*\^[^\s'\",;()\[\]<>]*")
_DATE = re.compile(r"(?<![\d.])(?:19|20)\d\d-?(?:0[1-9]|1[0-2])-?(?:0[1-9]|[12]\d|3[01])(?![\d.])")
VALUE = "<value>"
"""What :func:`scrub_text` puts where a value was."""


def scrub_text(text: str) -> str:
    """Free text without what could be a patient value, line by line.

    Everything from a line's first opening quote to the last quote of that kind (``'...'``,
    ``"..."``, ``b'...'``: how libraries quote values; an apostrophe inside a word does not
    open one) and, past a lone opening quote, the rest of the line; person names
    (``DOE^JANE``: a caret) and dates (``19700101``, ``1970-01-01``; not inside a UID) →
    ``<value>``. Tag numbers, VRs, UIDs, paths outside quotes and counts stay.

    >>> scrub_text("Invalid value for VR UI: 'DOE^JANE19700101' in (0020,000D)")
    'Invalid value for VR UI: <value> in (0020,000D)'
    >>> scrub_text("born 19700101, name DOE^JANE")
    'born <value>, name <value>'
    """
    if not text:
        return text
    out = []
    for line in text.splitlines():
        # An opening quote follows no letter or digit (``sender's`` is an apostrophe).
        opening = next((m.start() for m in _QUOTES.finditer(line)
                        if _OPENS.search(line, 0, m.start())), None)
        if opening is not None:
            close = line.rfind(line[opening], opening + 1)
            line = line[:opening] + VALUE + ("" if close < 0 else line[close + 1:])
        line = _PERSON_NAME.sub(VALUE, line)
        out.append(_DATE.sub(VALUE, line))
    return "\n".join(out)


def scrub_phi(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: drop keys that would carry patient data, scrub free text."""
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = "<removed>"
        elif key in TEXT_KEYS and isinstance(event_dict[key], str):
            event_dict[key] = scrub_text(event_dict[key])
    return event_dict


REPEAT_EVERY = 1000
"""A library message seen again is logged once per this many repeats (with ``repeats``)."""


class _Repeats:
    """Counts scrubbed library messages so a flood of one warning becomes a few lines."""

    def __init__(self, limit: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}
        self._limit = limit

    def count(self, source: str, message: str) -> int:
        """How many times (this one included) ``message`` came from ``source``."""
        key = (source, message)
        with self._lock:
            if key not in self._seen and len(self._seen) >= self._limit:
                self._seen.clear()
            n = self._seen.get(key, 0) + 1
            self._seen[key] = n
            return n


_REPEATS = _Repeats()


def _emit_library(source: str, level: str, message: str, **fields: Any) -> None:
    text = scrub_text(message)
    n = _REPEATS.count(source, text)
    if n != 1 and n % REPEAT_EVERY:
        return
    if n != 1:
        fields["repeats"] = n
    logger = structlog.get_logger(component=source)
    getattr(logger, level)("library_log", message=text, **fields)


class LibraryLogHandler(logging.Handler):
    """A standard-library logging handler that writes through structlog, text scrubbed."""

    def emit(self, record: logging.LogRecord) -> None:
        """Log ``record`` as a ``library_log`` event (message scrubbed, repeats summarised)."""
        try:
            level = record.levelname.lower()
            if level not in ("debug", "info", "warning", "error", "critical"):
                level = "warning"
            fields: dict[str, Any] = {"library": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exception"] = "".join(traceback.format_exception(*record.exc_info))
            _emit_library(record.name.split(".")[0], level, record.getMessage(), **fields)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning``: a ``library_log`` event instead of raw text on stderr."""
    module = filename.rsplit("/", 1)[-1]
    _emit_library(f"warnings:{category.__name__}", "warning", str(message),
                  category=category.__name__, where=f"{module}:{lineno}")


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """Uncaught exception in a thread: one scrubbed ``thread_crashed`` line."""
    if args.exc_type is SystemExit:
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                              args.exc_traceback))
    structlog.get_logger(component="threading").error(
        "thread_crashed", thread=getattr(args.thread, "name", None),
        error=args.exc_type.__name__, exception=text)


def _excepthook(exc_type: type[BaseException], exc: BaseException,
                tb: TracebackType | None) -> None:
    """Uncaught exception in the main thread: one scrubbed line (then the process ends)."""
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    structlog.get_logger(component="main").critical("uncaught_exception",
                                                    error=exc_type.__name__, exception=text)


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog and the standard library's logging once, for the whole process.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``json`` (one JSON object per line) or ``console`` (for people).
        stream: Where to write; default ``sys.stderr``.
    """
    out = stream if stream is not None else sys.stderr
    lvl = getattr(logging, level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub_phi,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library (pynetdicom logs every PDU at INFO/DEBUG:
    # kept quiet, the node writes its own association lines): one handler on the root logger
    # bridges WARNING and above into structlog, scrubbed.
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, LibraryLogHandler)
              or getattr(h, "stream", None) in (out, sys.stderr, sys.stdout)]:
        root.removeHandler(h)
    root.addHandler(LibraryLogHandler(level=logging.WARNING))
    root.setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    warnings.showwarning = _show_warning
    threading.excepthook = _thread_excepthook
    sys.excepthook = _excepthook


def get_logger(name: str) -> Any:
    """A structlog logger bound with ``component=name``."""
    return structlog.get_logger(component=name)
