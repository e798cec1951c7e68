"""DICOM status codes and association-rejection reasons the listener answers with.

Values follow PS3.4 Annex B (Storage Service Class) and PS3.8 §9.3.4 (A-ASSOCIATE-RJ). The
``0xC0xx`` values are the Storage SCP's "Cannot understand" range; the node uses a few distinct
codes in it so that a sender's log tells *why* an instance was refused.
"""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0x0000
"""The instance is durable (fsync'd and indexed), or it is a duplicate of one that is."""

OUT_OF_RESOURCES: Final = 0xA700
"""Refused: the spool disk is below its watermark, or the instance is larger than
``node.max_instance_bytes``. Nothing of the instance is kept."""

DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
"""Refused: the data set's SOP Class UID differs from the request's / presentation context's."""

CANNOT_UNDERSTAND: Final = 0xC000
"""Refused: the data set cannot be decoded (not DICOM, or truncated)."""

MISSING_UIDS: Final = 0xC001
"""Refused: the data set lacks a Study, Series or SOP Instance UID (or one is empty)."""

SOP_INSTANCE_MISMATCH: Final = 0xC002
"""Refused: the data set's SOP Instance UID differs from the request's Affected SOP Instance UID."""

INVALID_COMMAND_UID: Final = 0xC003
"""Refused: the C-STORE request's Affected SOP Instance or Class UID is not a valid UID
(empty, over 64 characters, or other than digits and dots); the association goes on."""

PROCESSING_FAILURE: Final = 0x0110
"""Refused: an unexpected error while storing (logged with its traceback); nothing is kept."""

STORE_FAILURES: Final = frozenset(
    {
        OUT_OF_RESOURCES,
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
        CANNOT_UNDERSTAND,
        MISSING_UIDS,
        SOP_INSTANCE_MISMATCH,
        INVALID_COMMAND_UID,
        PROCESSING_FAILURE,
    }
)
"""Every failure status the node's C-STORE SCP can answer with."""

# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 Table 9-21.
REJECT_PERMANENT: Final = 0x01
"""A-ASSOCIATE-RJ result: rejected-permanent (do not retry unchanged)."""
REJECT_TRANSIENT: Final = 0x02
"""A-ASSOCIATE-RJ result: rejected-transient (retry later)."""
SOURCE_SERVICE_USER: Final = 0x01
"""A-ASSOCIATE-RJ source: DICOM UL service-user."""
SOURCE_PROVIDER_PRESENTATION: Final = 0x03
"""A-ASSOCIATE-RJ source: DICOM UL service-provider (presentation related function)."""
REASON_CALLING_AE_NOT_RECOGNIZED: Final = 0x03
"""A-ASSOCIATE-RJ reason (service-user): calling AE title not recognised (or host not allowed)."""
REASON_CALLED_AE_NOT_RECOGNIZED: Final = 0x07
"""A-ASSOCIATE-RJ reason (service-user): called AE title not recognised."""
REASON_LOCAL_LIMIT_EXCEEDED: Final = 0x02
"""A-ASSOCIATE-RJ reason (provider, presentation): local limit exceeded (max associations)."""

REJECT_UNKNOWN_CALLER: Final = (REJECT_PERMANENT, SOURCE_SERVICE_USER,
                                REASON_CALLING_AE_NOT_RECOGNIZED)
"""(result, source, reason) for a caller not on the allow-list."""
REJECT_UNKNOWN_CALLED_AE: Final = (REJECT_PERMANENT, SOURCE_SERVICE_USER,
                                   REASON_CALLED_AE_NOT_RECOGNIZED)
"""(result, source, reason) for a called AE title that is neither ours nor an alias."""
REJECT_TOO_MANY_ASSOCIATIONS: Final = (REJECT_TRANSIENT, SOURCE_PROVIDER_PRESENTATION,
                                       REASON_LOCAL_LIMIT_EXCEEDED)
"""(result, source, reason) when ``node.max_associations`` are already open."""


def status_name(status: int) -> str:
    """Short name of a status, for log lines (``0xA700`` → ``out_of_resources``)."""
    names = {
        SUCCESS: "success",
        OUT_OF_RESOURCES: "out_of_resources",
        DATASET_DOES_NOT_MATCH_SOP_CLASS: "dataset_does_not_match_sop_class",
        CANNOT_UNDERSTAND: "cannot_understand",
        MISSING_UIDS: "missing_uids",
        SOP_INSTANCE_MISMATCH: "sop_instance_mismatch",
        INVALID_COMMAND_UID: "invalid_command_uid",
        PROCESSING_FAILURE: "processing_failure",
    }
    return names.get(status, f"0x{status:04X}")
