"""What an engine run produces, in a form the exporters turn into DICOM.

All masks lie on the *source grid* of the :class:`~inference.volume.Volume` they were computed
from (``[slice, row, column]``), so exporters can align them frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept, e.g. ``Code("12738006", "SCT", "Brain")``."""

    value: str
    scheme: str
    meaning: str


# Codes used by the reference model and the exporters (SNOMED CT and DICOM).
TISSUE = Code("85756007", "SCT", "Tissue")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
BRAIN = Code("12738006", "SCT", "Brain")
GREY_MATTER = Code("389080004", "SCT", "Gray matter")
WHITE_MATTER = Code("389079006", "SCT", "White matter")
CSF = Code("32060008", "SCT", "Cerebrospinal fluid")
LESION = Code("52988006", "SCT", "Lesion")
MASS = Code("4147007", "SCT", "Mass")
EDEMA = Code("79654002", "SCT", "Edema")
WM_HYPERINTENSITY = Code("276219001", "SCT", "Cerebral white matter hyperintensity")


@dataclass(frozen=True, slots=True)
class SegmentLabel:
    """What a segment is: its number, name, codes and display colour."""

    number: int
    """1-based segment number, unique within one result."""
    label: str
    """Short human name, e.g. ``"White matter"``."""
    category: Code
    """Segmented property category, e.g. :data:`TISSUE`."""
    type: Code
    """Segmented property type, e.g. :data:`WHITE_MATTER`."""
    color_rgb: tuple[int, int, int] = (255, 0, 0)
    """Recommended display colour, 0-255 sRGB."""
    task: str = "anatomical"
    """``anatomical`` or ``pathological``."""


@dataclass(slots=True)
class SegmentMask:
    """One segment: a boolean mask on the source grid, and optional probabilities."""

    label: SegmentLabel
    mask: npt.NDArray[np.bool_]
    """``[slice, row, column]`` boolean mask."""
    probability: npt.NDArray[np.float32] | None = None
    """Optional per-voxel probability in [0, 1], same shape as ``mask``."""

    def volume_ml(self, spacing_mm: tuple[float, float, float]) -> float:
        """Segment volume in millilitres for voxel spacing ``(slice, row, col)`` in mm."""
        voxel_mm3 = float(np.prod(spacing_mm))
        return float(np.count_nonzero(self.mask)) * voxel_mm3 / 1000.0


@dataclass(slots=True)
class Detection:
    """One detected abnormality (a connected component of a pathological segment)."""

    finding: Code
    """What it is, e.g. :data:`LESION` or :data:`MASS`."""
    segment_number: int
    """The segment (in the same ``Results``) it is a component of."""
    centroid_index: tuple[float, float, float]
    """Centroid as fractional array indices ``(k, j, i)``."""
    centroid_lps_mm: tuple[float, float, float]
    """Centroid in patient coordinates (LPS), millimetres."""
    bbox_index: tuple[int, int, int, int, int, int]
    """Bounding box ``(k0, j0, i0, k1, j1, i1)``, half-open, array indices."""
    diameter_mm: float
    """Largest in-plane extent, millimetres."""
    volume_ml: float
    """Component volume, millilitres."""
    probability: float
    """Detection confidence in [0, 1]."""
    side: str = ""
    """``left``, ``right`` or ``midline`` (patient's side)."""
    location: str = ""
    """Anatomical location in words (e.g. ``frontal lobe white matter``)."""
    tracking_id: str = ""
    """Human-readable tracking identifier (e.g. ``lesion-1``)."""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The model's diagnostic suggestion over a fixed set of classes."""

    code: Code
    """The most probable class."""
    probability: float
    """Its probability in [0, 1]."""
    probabilities: dict[str, float] = field(default_factory=dict)
    """Probability of every class, keyed by class name."""


@dataclass(frozen=True, slots=True)
class Report:
    """Generated free text, in the sections radiologists read."""

    findings: str
    impression: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Who made the results (fills the Contributing Equipment Sequence, IHE AI Results)."""

    name: str
    version: str
    manufacturer: str = "OmniMRI Node"
    algorithm_family: Code = Code("123110", "DCM", "Artificial Intelligence")
    node_version: str = ""


@dataclass(slots=True)
class Results:
    """Everything a pipeline produced for one series."""

    model: ModelInfo
    segments: list[SegmentMask] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    diagnosis: Diagnosis | None = None
    report: Report | None = None
    reconstruction: npt.NDArray[np.float32] | None = None
    """Optional reconstructed image on the source grid."""
    embedding: npt.NDArray[np.float32] | None = None
    """Optional image embedding of the whole series ``[D]`` (unit length; a package's
    ``embedding`` output, pooled over its windows): for report<->image retrieval."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """Stage timings in seconds (``preprocess``, ``inference``, ``postprocess``)."""
    instructions: list[str] = field(default_factory=list)
    """The task instructions that produced these results."""
