"""Structured logging (structlog) with a guard against patient data.

Log events carry UIDs, counts and timings; never names, IDs or birth dates. :func:`scrub_phi`
is a structlog processor that drops any event key named like a patient attribute, so a careless
``log.info("x", PatientName=...)`` still leaks nothing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

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


def scrub_phi(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: drop keys that would carry patient data."""
    for key in [k for k in event_dict if k.lower() in PHI_KEYS]:
        event_dict[key] = "<removed>"
    return event_dict


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
            scrub_phi,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs every PDU at INFO/DEBUG through the standard library: keep it quiet,
    # the node writes its own association lines.
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    """A structlog logger bound with ``component=name``."""
    return structlog.get_logger(component=name)
