"""Deterministic UIDs for derived objects.

A job that is re-run must *replace* its earlier results in the PACS, not add duplicates, so every
UID the exporters write is a hash of ``(job id, output kind, index)`` rather than random:
same job, same UIDs.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

UID_PREFIX = "1.2.826.0.1.3680043.10.1526."
"""UID root for objects the node makes itself (same root as ``dicom_node.samples``)."""


def derived_uid(job_id: str, kind: str, index: int | str = 0) -> str:
    """A UID that depends only on its inputs.

    Args:
        job_id: The job that produced the object (any non-empty string).
        kind: What the UID names, e.g. ``"seg"``, ``"seg-series"``, ``"tracking"``.
        index: Instance index within the kind (0-based), or any extra distinguishing key.

    Returns:
        A valid DICOM UID (at most 64 characters) under :data:`UID_PREFIX`.

    Raises:
        ValueError: If ``job_id`` or ``kind`` is empty.
    """
    if not job_id or not kind:
        raise ValueError("derived_uid needs a non-empty job id and kind")
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=["omnimri", job_id, kind, str(index)]))


def series_uid(job_id: str, kind: str) -> str:
    """Series Instance UID of output ``kind`` (``seg``, ``sr``, ``sc``, ``pr``, ``ko``) of a job."""
    return derived_uid(job_id, f"{kind}-series")


def instance_uid(job_id: str, kind: str, index: int = 0) -> str:
    """SOP Instance UID of the ``index``-th (0-based) instance of output ``kind`` of a job."""
    return derived_uid(job_id, f"{kind}-instance", index)
