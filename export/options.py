"""What the exporters are asked to write: output kinds and their options, defined once.

``dicom_node.config`` embeds these models in its schema (``pipelines.<name>.outputs`` holds
:data:`OutputKind` values, ``pipelines.<name>.seg`` is a :class:`SegOptions`), and the
pipeline passes them on unchanged in an :class:`ExportOptions`; nothing copies them field by
field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OutputKind = Literal["seg", "sr", "sc", "pr", "ko"]
"""A derived object kind: SEG, Comprehensive 3D SR, Secondary Capture, GSPS, KOS."""
ALL_OUTPUTS: tuple[OutputKind, ...] = ("seg", "sr", "sc", "pr", "ko")
"""Every output kind, in dependency order (SEG before SR, SC before KO)."""

DEFAULT_SERIES_NUMBERS: dict[OutputKind, int] = {
    "seg": 9001, "sr": 9002, "sc": 9003, "pr": 9004, "ko": 9005,
}
"""Series numbers of the derived series (high, so they sort after the acquired series)."""


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SegOptions(_Options):
    """How the Segmentation exporter writes its object."""

    segmentation_type: Literal["auto", "labelmap", "binary", "fractional"] = "auto"
    """``auto``: BINARY (every PACS takes it), or pseudo-binary FRACTIONAL (0/255) when a 1-bit
    frame is not a whole number of bytes (Rows x Columns not a multiple of 8; OHIF mis-decodes
    those, see :func:`export.seg.resolve_type`); ``binary`` always BINARY; ``labelmap`` where
    the PACS accepts Label Map SEG; ``fractional`` the probabilities (8 bits, 255 = 1.0)."""
    omit_empty_frames: bool = False
    """Leave out frames with no segment pixels (off by default: OHIF misplaces segments)."""
    compression: Literal["none", "jpegls", "jpeg2000"] = "none"
    """Lossless compression of the SEG pixel data."""


class ExportOptions(_Options):
    """Which outputs to write and how (one job)."""

    outputs: tuple[OutputKind, ...] = ALL_OUTPUTS
    """Output kinds to write; order does not matter (dependencies are resolved)."""
    seg: SegOptions = Field(default_factory=SegOptions)
    """Options of the Segmentation exporter."""
    node_name: str = "OMNIMRI"
    """The node's name (AE title); goes into Contributing Equipment and Device Serial Number."""
    node_version: str = ""
    """The node software version."""
    series_numbers: dict[OutputKind, int] = Field(
        default_factory=lambda: dict(DEFAULT_SERIES_NUMBERS)
    )
    """Series Number per output kind; a kind not named gets its
    :data:`DEFAULT_SERIES_NUMBERS` entry."""
    max_key_slices: int = Field(default=3, ge=1)
    """How many key slices the SC/GSPS/KOS outputs pick at most."""
    institution_name: str | None = None
    """Institution Name written on the derived objects (optional)."""

    def series_number(self, kind: OutputKind) -> int:
        """Series Number of output ``kind``."""
        return self.series_numbers.get(kind, DEFAULT_SERIES_NUMBERS[kind])
