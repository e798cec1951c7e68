"""The nouns the listener and the series tracker hand to the rest of the node.

``StoredInstance`` is made by the listener once an instance is durable; ``Series`` is made by
the series tracker when a series (one *revision* of it) is complete, and is immutable after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One received, durably stored and indexed DICOM instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: Path
    """Absolute path of the stored file (DICOM Part 10, as received)."""
    transfer_syntax_uid: str
    size_bytes: int
    received_at: datetime
    """UTC time the instance was acknowledged."""
    instance_number: int | None = None
    number_of_frames: int = 1
    calling_ae: str = ""
    called_ae: str = ""
    peer_host: str = ""


@dataclass(frozen=True, slots=True)
class Series:
    """A complete revision of a series: the unit that rules route and pipelines read.

    A late instance after completion starts revision ``n + 1`` holding the whole series.
    """

    series_instance_uid: str
    study_instance_uid: str
    revision: int
    instances: tuple[StoredInstance, ...]
    completed_at: datetime
    modality: str = ""
    series_description: str = ""
    calling_ae: str = ""
    """Calling AE of the association that delivered the last instance."""
    called_ae: str = ""
    """Called AE (the node's AE title or one of its aliases) the sender used."""
    peer_host: str = ""
    """Address of the sender."""
    completion_reason: str = "quiet"
    """``quiet`` (no instance for the quiet period) or ``expected_count`` (all arrived)."""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable identifier of this revision: ``<SeriesInstanceUID>#r<revision>``."""
        return f"{self.series_instance_uid}#r{self.revision}"

    @property
    def paths(self) -> list[Path]:
        """Stored files of the series, in arrival order."""
        return [i.path for i in self.instances]
