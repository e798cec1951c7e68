"""What the exporters get: the results, the volume they lie on, the source headers, the options.

``dicom_node`` builds an :class:`ExportContext` per job (from its pipeline config) and calls
:func:`export.build_outputs`. This module only imports inference result types; the option
dataclasses mirror ``dicom_node.config.SegOptions`` / ``PipelineConfig.outputs`` field for field
so the caller can pass ``SegExportOptions(**cfg.seg.model_dump())``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydicom.dataset import Dataset

from inference.results import Results
from inference.volume import Volume

OutputKind = Literal["seg", "sr", "sc", "pr", "ko"]
ALL_OUTPUTS: tuple[OutputKind, ...] = ("seg", "sr", "sc", "pr", "ko")

DEFAULT_SERIES_NUMBERS: dict[str, int] = {
    "seg": 9001, "sr": 9002, "sc": 9003, "pr": 9004, "ko": 9005,
}
"""Series numbers of the derived series (high, so they sort after the acquired series)."""


class ExportError(ValueError):
    """Results and source series do not fit together; the message says why (no patient data)."""


@dataclass(frozen=True, slots=True)
class SegExportOptions:
    """How the DICOM SEG is encoded (mirrors ``dicom_node.config.SegOptions``)."""

    segmentation_type: Literal["auto", "labelmap", "binary", "fractional"] = "auto"
    """``auto``: BINARY, or pseudo-binary FRACTIONAL when 1-bit frames are not byte aligned
    (see :func:`export.seg.resolve_type`); ``labelmap`` where the PACS accepts Label Map."""
    omit_empty_frames: bool = False
    """Leave out frames without segment pixels (off by default: OHIF misplaces segments)."""
    compression: Literal["none", "jpegls", "jpeg2000"] = "none"
    """Lossless compression of the SEG pixel data."""


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """Which outputs to write and how."""

    outputs: tuple[OutputKind, ...] = ALL_OUTPUTS
    """Output kinds to write; order does not matter (dependencies are resolved)."""
    seg: SegExportOptions = field(default_factory=SegExportOptions)
    node_name: str = "OMNIMRI"
    """The node's name (AE title); goes into Contributing Equipment and Device Serial Number."""
    node_version: str = ""
    """The node software version."""
    series_numbers: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SERIES_NUMBERS))
    """Series Number per output kind."""
    max_key_slices: int = 3
    """How many key slices the SC/GSPS/KOS outputs pick at most."""
    institution_name: str | None = None
    """Institution Name written on the derived objects (optional)."""


@dataclass(slots=True)
class ExportContext:
    """Everything one export needs.

    Attributes:
        job_id: The job's id; all UIDs derive from it (see :mod:`export.uids`).
        results: What the pipeline produced, masks on ``volume``'s grid.
        volume: The volume the results lie on; ``volume.slices`` name the source frames.
        sources: Source image headers in arrival order (pixel data needed only for ``sc``).
        options: Which outputs and how.
        created: Content date/time of the outputs; default: now.
    """

    job_id: str
    results: Results
    volume: Volume
    sources: list[Dataset]
    options: ExportOptions = field(default_factory=ExportOptions)
    created: datetime | None = None
    _by_uid: dict[str, Dataset] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ExportError("export needs a job id")
        if not self.sources:
            raise ExportError("export needs the source image headers; none were given")
        self._by_uid = {str(ds.SOPInstanceUID): ds for ds in self.sources}
        if not self.volume.slices:
            raise ExportError("volume has no slices")
        if len(self.volume.slices) != self.volume.shape[0]:
            raise ExportError(
                f"volume has {self.volume.shape[0]} slices but {len(self.volume.slices)} slice refs"
            )
        for k, ref in enumerate(self.volume.slices):
            ds = self._by_uid.get(ref.sop_instance_uid)
            if ds is None:
                raise ExportError(f"slice {k}: source instance {ref.sop_instance_uid} not given")
            nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
            if ref.frame_number is not None and not 1 <= ref.frame_number <= nframes:
                raise ExportError(
                    f"slice {k}: frame {ref.frame_number} outside 1..{nframes} of its source"
                )
        numbers = set()
        for seg in self.results.segments:
            if seg.mask.shape != self.volume.shape:
                raise ExportError(
                    f"segment {seg.label.number} mask shape {seg.mask.shape} differs from "
                    f"volume shape {self.volume.shape}"
                )
            if seg.label.number in numbers:
                raise ExportError(f"segment number {seg.label.number} used twice")
            numbers.add(seg.label.number)
        for det in self.results.detections:
            if det.segment_number not in numbers and numbers:
                raise ExportError(
                    f"detection refers to segment {det.segment_number}, which is not in results"
                )

    # -- source lookups -------------------------------------------------------------------

    @property
    def multiframe_source(self) -> Dataset | None:
        """The single multi-frame source instance, or ``None`` for a classic series."""
        uids = {ref.sop_instance_uid for ref in self.volume.slices}
        if len(uids) == 1 and self.volume.slices[0].frame_number is not None:
            return self._by_uid[next(iter(uids))]
        if any(ref.frame_number is not None for ref in self.volume.slices):
            raise ExportError("volumes built from several multi-frame instances are not supported")
        return None

    def source_of_slice(self, k: int) -> tuple[Dataset, int | None]:
        """Source instance and 1-based frame number (``None`` if single-frame) of slice ``k``."""
        ref = self.volume.slices[k]
        return self._by_uid[ref.sop_instance_uid], ref.frame_number

    def slice_sources(self) -> list[Dataset]:
        """Source instances of the volume, each once, in slice order."""
        seen: dict[str, Dataset] = {}
        for ref in self.volume.slices:
            seen.setdefault(ref.sop_instance_uid, self._by_uid[ref.sop_instance_uid])
        return list(seen.values())

    @property
    def content_datetime(self) -> datetime:
        """Content date/time written on the outputs."""
        return self.created or datetime.now()

    def wants(self, kind: OutputKind) -> bool:
        """Whether output ``kind`` is requested."""
        return kind in self.options.outputs
