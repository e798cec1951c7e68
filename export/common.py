"""What every derived object shares: research marking, equipment, descriptions, key slices.

* ContentQualification (0018,9004) = ``RESEARCH`` on every object (:func:`finish`).
* UIDs, series number and description, equipment and dates: :mod:`export.derived`.
* Patient and study modules copied from the source (highdicom copies the core attributes; a few
  optional ones are added here).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from highdicom import AlgorithmIdentificationSequence
from highdicom.color import CIELabColor
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from export.context import ExportContext
from export.limits import fit
from inference.results import Code, Detection, ModelInfo, SegmentLabel

RESEARCH = "RESEARCH"
"""ContentQualification value written on every derived object."""

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"

_COPIED_PATIENT_STUDY = (
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "IssuerOfPatientID",
    "StudyDescription",
    "BodyPartExamined",
)
"""Optional patient/study attributes highdicom does not copy; copied from the source if set."""


def to_coded(code: Code) -> CodedConcept:
    """An :class:`inference.results.Code` as a highdicom ``CodedConcept``."""
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def algorithm_identification(model: ModelInfo) -> AlgorithmIdentificationSequence:
    """Algorithm Identification: model name, version and family (AI, 123110 DCM)."""
    return AlgorithmIdentificationSequence(
        name=fit("AlgorithmName", model.name),
        family=to_coded(model.algorithm_family),
        version=fit("AlgorithmVersion", model.version or "unknown"),
    )


def lab_color(rgb: tuple[int, int, int]) -> CIELabColor:
    """Recommended display colour as CIELab, from 0-255 sRGB."""
    r, g, b = (min(max(int(v), 0), 255) for v in rgb)
    return CIELabColor.from_rgb(r, g, b)


def finish(ds: Dataset, source: Dataset, *, image: bool = True) -> Dataset:
    """Apply what all derived objects share after highdicom built ``ds``; returns ``ds``.

    Sets ContentQualification RESEARCH (the research marking of every object the node writes)
    and copies optional patient/study attributes from the ``source`` image header (Body Part
    Examined only for ``image`` IODs, whose General Series module has it).
    """
    ds.ContentQualification = RESEARCH
    for kw in _COPIED_PATIENT_STUDY:
        if kw == "BodyPartExamined" and not image:
            continue
        if kw not in ds and kw in source and source[kw].value not in (None, ""):
            setattr(ds, kw, source[kw].value)
    return ds


def patient_orientation(ds: Dataset, frame: int | None = None) -> tuple[str, str]:
    """Patient Orientation (row direction, column direction letters) of a source image.

    From Image Orientation (Patient), or the shared functional groups of a multi-frame image;
    ``("L", "P")`` (axial) when the image states none. ``frame`` is accepted for multi-frame
    sources whose frames share one orientation.
    """
    iop = None
    if "ImageOrientationPatient" in ds:
        iop = ds.ImageOrientationPatient
    elif "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "PlaneOrientationSequence" in shared:
            iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    if iop is None or len(iop) != 6:
        return ("L", "P")
    vals = [float(v) for v in iop]
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def letter(v: list[float]) -> str:
        axis = int(np.argmax(np.abs(v)))
        return letters[axis][0 if v[axis] > 0 else 1]

    return (letter(vals[:3]), letter(vals[3:]))


def key_slices(ctx: ExportContext) -> list[int]:
    """Slices worth showing, most important first (at most ``options.max_key_slices``).

    Order: the centre slice of each detection, largest first; then the slices with the most
    pathological, then the most segmented voxels, at least ``n / (2 * max)`` slices apart; with
    no segments at all, the middle slice.
    """
    n = ctx.volume.shape[0]
    limit = max(1, ctx.options.max_key_slices)
    chosen: list[int] = []
    for det in sorted(ctx.results.detections, key=lambda d: -d.volume_ml):
        k = int(np.clip(round(det.centroid_index[0]), 0, n - 1))
        if k not in chosen:
            chosen.append(k)
        if len(chosen) >= limit:
            return chosen
    min_gap = max(1, n // (2 * limit))
    for task in ("pathological", None):
        masks = [
            s.mask for s in ctx.results.segments if task is None or s.label.task == task
        ]
        if not masks:
            continue
        counts = np.zeros(n, dtype=np.int64)
        for m in masks:
            counts += [np.count_nonzero(plane) for plane in m]  # per slice, no int64 copy
        for k in np.argsort(-counts, kind="stable"):
            if counts[k] == 0 or len(chosen) >= limit:
                break
            if all(abs(int(k) - c) >= min_gap for c in chosen):
                chosen.append(int(k))
    if not chosen:
        chosen.append(n // 2)
    return chosen


def display_window(array: npt.NDArray[np.float32]) -> tuple[float, float]:
    """``(low, high)`` display window: 0.5th and 99.5th percentiles (of every 2nd voxel in-plane).

    Used for the burned-in key slices and the GSPS VOI window, so both look alike.
    """
    sample = array[:, ::2, ::2] if array.ndim == 3 else array
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def detection_ellipse(
    det: Detection, k: int, mask: npt.NDArray[np.bool_] | None, shape: tuple[int, int],
    pad: float = 1.5,
) -> npt.NDArray[np.float64]:
    """Axis-aligned ellipse around detection ``det`` on slice ``k``, in PIXEL coordinates.

    Four ``(column, row)`` points, the end points of the major then minor axis (DICOM SCOORD /
    GSPS ELLIPSE; (0, 0) is the top left corner of the top left pixel), around the in-plane
    extent of the detection's segment ``mask`` inside its bounding box on that slice (the
    bounding box if ``mask`` is ``None`` or empty there), ``pad`` pixels wider, kept inside the
    ``(rows, columns)`` image.
    """
    rows, cols = shape
    _, j0, i0, _, j1, i1 = det.bbox_index
    bj0, bi0, bj1, bi1 = float(j0), float(i0), float(j1), float(i1)
    if mask is not None:
        sub = mask[k, j0:j1, i0:i1]
        if sub.any():
            jj, ii = np.nonzero(sub)
            bj0, bj1 = j0 + float(jj.min()), j0 + float(jj.max()) + 1.0
            bi0, bi1 = i0 + float(ii.min()), i0 + float(ii.max()) + 1.0
    bj0, bj1 = max(bj0 - pad, 0.0), min(bj1 + pad, float(rows))
    bi0, bi1 = max(bi0 - pad, 0.0), min(bi1 + pad, float(cols))
    cj, ci = (bj0 + bj1) / 2.0, (bi0 + bi1) / 2.0
    horizontal = [[bi0, cj], [bi1, cj]]
    vertical = [[ci, bj0], [ci, bj1]]
    major_first = horizontal + vertical if bi1 - bi0 >= bj1 - bj0 else vertical + horizontal
    return np.array(major_first, dtype=np.float64)


DISPLAY_RGB: dict[str, tuple[int, int, int]] = {
    "32060008": (70, 130, 240),    # Cerebrospinal fluid: blue
    "389080004": (190, 90, 215),   # Gray matter: violet
    "389079006": (60, 180, 120),   # White matter: green
    "12738006": (230, 180, 120),   # Brain: sand (a union; not drawn in the SEG)
}
"""Display colours of tissues whose model colour may be achromatic (sRGB, by SNOMED CT code)."""

LESION_RGB = (255, 40, 40)
"""Fallback colour of a pathological segment with an achromatic model colour: salient red."""
TISSUE_RGB = (80, 170, 200)
"""Fallback colour of an anatomical segment with an achromatic model colour."""


def display_rgb(label: SegmentLabel) -> tuple[int, int, int]:
    """The colour a segment is shown in (SEG Recommended Display CIELab, SC overlays, legends).

    The model's colour, unless it is achromatic (grey, white or black: channels within 40 of
    each other), which on an MR image reads as image intensity, not as an overlay: then the
    tissue's colour from :data:`DISPLAY_RGB`, else :data:`LESION_RGB` for pathological and
    :data:`TISSUE_RGB` for anatomical segments.
    """
    rgb = tuple(min(max(int(v), 0), 255) for v in label.color_rgb)
    if max(rgb) - min(rgb) >= 40:
        return rgb  # type: ignore[return-value]
    if label.type.value in DISPLAY_RGB:
        return DISPLAY_RGB[label.type.value]
    return LESION_RGB if label.task == "pathological" else TISSUE_RGB


def detection_box(
    det: Detection, k: int, mask: npt.NDArray[np.bool_] | None, shape: tuple[int, int],
    pad: float = 1.5,
) -> npt.NDArray[np.float64]:
    """Closed rectangle around detection ``det`` on slice ``k``: five ``(column, row)`` points.

    The same extent as :func:`detection_ellipse` (PIXEL coordinates, top left corner of the
    top left pixel at (0, 0)), clockwise from the top left corner back to it.
    """
    e = detection_ellipse(det, k, mask, shape, pad)
    c0, c1 = float(e[:, 0].min()), float(e[:, 0].max())
    r0, r1 = float(e[:, 1].min()), float(e[:, 1].max())
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)
