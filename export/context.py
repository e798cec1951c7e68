"""What the exporters get: the results, the volume they lie on, the source headers, the options.

``dicom_node`` builds an :class:`ExportContext` per job and calls :func:`export.build_outputs`.
The options are :class:`export.options.ExportOptions`, the same models the node's configuration
embeds. Of ``inference`` this module imports only the result types; the grid the results lie
on is described by :class:`ResultGrid` (``inference.volume.Volume`` is one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Protocol

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from export.derived import DerivedSeries, Equipment, series_description
from export.options import ExportOptions, OutputKind
from inference.results import Results


class SliceSource(Protocol):
    """Where one slice of the grid comes from (``inference.volume.SliceRef`` is one)."""

    @property
    def sop_instance_uid(self) -> str:
        """SOP Instance UID of the source image."""
        ...

    @property
    def frame_number(self) -> int | None:
        """1-based frame of a multi-frame source; ``None`` for a single-frame one."""
        ...


class ResultGrid(Protocol):
    """The image grid the results lie on, as the exporters read it.

    ``inference.volume.Volume`` is one; export depends on these four members only.
    """

    @property
    def array(self) -> npt.NDArray[np.float32]:
        """Image values ``[slice, row, column]`` (for the burned-in key slices)."""
        ...

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        ...

    @property
    def slices(self) -> Sequence[SliceSource]:
        """The source of each slice, in slice order."""
        ...

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing ``(slice, row, column)``, mm."""
        ...


class ExportError(ValueError):
    """Results and source series do not fit together; the message says why (no patient data)."""


@dataclass(slots=True)
class ExportContext:
    """Everything one export needs.

    Attributes:
        job_id: The job's id; all UIDs derive from it (see :mod:`export.uids`).
        results: What the pipeline produced, masks on ``volume``'s grid.
        volume: The volume the results lie on; ``volume.slices`` name the source frames.
        sources: Source image headers in arrival order (pixel data needed only for ``sc``).
        options: Which outputs and how.
        created: Series and content date/time of the outputs (local time); default: now,
            fixed when the context is made, so every output of the job states the same time.
    """

    job_id: str
    results: Results
    volume: ResultGrid
    sources: list[Dataset]
    options: ExportOptions = field(default_factory=ExportOptions)
    created: datetime | None = None
    _by_uid: dict[str, Dataset] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.created is None:
            self.created = datetime.now()
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
        """Series and content date/time written on the outputs."""
        return self.created or datetime.now()

    @property
    def node_version(self) -> str:
        """The node software version: the options', else the one the results name."""
        return self.options.node_version or self.results.model.node_version

    def equipment(self) -> Equipment:
        """The model on this node: General and Contributing Equipment of every output."""
        model = self.results.model
        versions = [model.version or "unknown"]
        if self.node_version:
            versions.append(f"node {self.node_version}")
        return Equipment(
            manufacturer=model.manufacturer,
            model_name=model.name,
            software_versions=tuple(versions),
            node_name=self.options.node_name,
            institution_name=self.options.institution_name,
            contribution=f"AI analysis, research use only ({model.name})",
        )

    def derived(self, kind: OutputKind) -> DerivedSeries:
        """The derived series of output ``kind`` (UIDs, number, description, equipment)."""
        return DerivedSeries(
            job_id=self.job_id,
            kind=kind,
            number=self.options.series_number(kind),
            description=series_description(kind, self.results.model),
            equipment=self.equipment(),
            created=self.content_datetime,
        )

    def wants(self, kind: OutputKind) -> bool:
        """Whether output ``kind`` is requested."""
        return kind in self.options.outputs


Built = Mapping[OutputKind, Sequence[Dataset]]
"""The outputs built so far in a job, by kind (what a later exporter may refer to)."""

NOTHING_BUILT: Built = MappingProxyType({})
"""No outputs built yet: the default of an exporter called on its own."""


class Exporter(Protocol):
    """Builds the objects of one output kind: ``exporter(ctx, built) -> datasets``.

    ``built`` holds the outputs of the kinds before it (:data:`export.options.ALL_OUTPUTS`
    order): the SR refers to the SEG's segments, the KOS to the summary SC. An empty list means
    there is nothing to show (e.g. a SEG without segments).
    """

    def __call__(self, ctx: ExportContext, built: Built, /) -> list[Dataset]:
        """The datasets of this kind for ``ctx`` (file meta set, ready to save or send).

        Raises:
            ExportError: The results do not fit the source series (the message says why).
        """
        ...
