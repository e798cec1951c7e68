"""The ``Volume``: a series as one 3-D array with its patient geometry.

Conventions (used by engines and exporters alike):

* ``array`` is indexed ``[slice, row, column]`` (``k, j, i``), float32, rescale applied.
* ``affine`` is 4x4 and maps homogeneous *array indices* ``(k, j, i, 1)`` to patient
  coordinates in millimetres, DICOM LPS. The position of voxel ``[k, j, i]`` is
  ``affine @ [k, j, i, 1]``.
* ``spacing`` is ``(slice, row, column)`` spacing in millimetres, i.e. the norms of the first
  three affine columns. Slice spacing is measured from positions, not SliceThickness.
* ``slices[k]`` names the source image of slice ``k`` (SOP Instance UID, and the 1-based frame
  number for multi-frame instances), so exporters can reference the exact source frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from pydicom.multival import MultiValue

_log = structlog.get_logger(__name__)


class VolumeError(ValueError):
    """The series cannot be turned into one consistent volume; the message says why."""


@dataclass(frozen=True, slots=True)
class SliceRef:
    """The source of one slice of a volume."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None
    """1-based frame number in a multi-frame instance; ``None`` for single-frame."""


@dataclass(slots=True)
class Volume:
    """A 3-D image on the source grid; see the module docstring for conventions."""

    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    slices: list[SliceRef]
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    modality: str = "MR"
    metadata: dict[str, str] = field(default_factory=dict)
    """A few header values engines may use (e.g. ``MRAcquisitionType``, contrast hints)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """``(slice, row, column)`` spacing in millimetres."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    def index_to_lps(self, kji: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map array indices ``(..., 3)`` in ``(k, j, i)`` order to LPS millimetres."""
        pts = np.asarray(kji, dtype=np.float64)
        return pts @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, lps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map LPS millimetres ``(..., 3)`` to fractional array indices ``(k, j, i)``."""
        pts = np.asarray(lps, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]


# --------------------------------------------------------------------------------------------
# Volume builder: from the files of one series to a Volume.
# --------------------------------------------------------------------------------------------

_ORIENTATION_TOL = 1e-4
"""Largest difference between direction cosines still counted as the same orientation."""

_ORTHOGONAL_TOL = 1e-3
"""Largest |row · column| of the direction cosines still counted as orthogonal."""

_DUPLICATE_TOL_MM = 1e-3
"""Slices closer than this along the normal (mm) are duplicates."""

_SPACING_REL_TOL = 0.01
"""Allowed relative deviation of one slice gap from the median gap (1 %)."""

_SPACING_ABS_TOL_MM = 0.005
"""Allowed absolute deviation of one slice gap from the median gap, in mm."""

_TILT_TOL_MM = 0.02
"""Allowed in-plane drift of slice positions off the normal line, in mm (plus 0.1 % of extent)."""

_METADATA_TAGS = (
    "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "SequenceName", "ProtocolName",
    "SeriesDescription", "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle",
    "MagneticFieldStrength", "ContrastBolusAgent", "BodyPartExamined", "Manufacturer",
    "ManufacturerModelName", "AcquisitionContrast", "PatientPosition",
)
"""Header values copied into :attr:`Volume.metadata` (never patient identity)."""


@dataclass(slots=True)
class _Frame:
    """Header facts of one 2-D frame, enough to place and decode it."""

    path: Path
    frame_index: int | None
    """0-based frame index in a multi-frame instance; ``None`` for single-frame."""
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    rows: int
    columns: int
    iop: npt.NDArray[np.float64]
    ipp: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    stack_key: tuple[tuple[str, str], ...]
    slice_thickness: float | None


def _fv(x: object) -> str:
    """A header value as a short stable text for stack keys."""
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, list | tuple | MultiValue):
        return "\\".join(_fv(v) for v in x)
    return str(x)


def _first(ds: Any, seq_name: str) -> Any:
    seq = getattr(ds, seq_name, None) if ds is not None else None
    return seq[0] if seq else None


def _lookup(groups: tuple[Any, ...], seq_name: str, attr: str) -> Any:
    """``attr`` from the first functional group (per-frame first, then shared) that has it."""
    for g in groups:
        item = _first(g, seq_name)
        if item is not None and attr in item:
            return getattr(item, attr)
    return None


def _frames_of(path: Path, ds: Any) -> list[_Frame]:
    """Header facts of every frame in one instance (``ds`` read without pixel data)."""
    where = f"{path.name} (SOP Instance UID {ds.get('SOPInstanceUID', '?')})"
    for tag in ("Rows", "Columns"):
        if tag not in ds:
            raise VolumeError(f"{where}: no {tag}; not an image")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"{where}: {ds.SamplesPerPixel} samples per pixel; only greyscale MR")
    common: dict[str, Any] = {
        "path": path,
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
    }
    out: list[_Frame] = []
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ("PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
            or n_frames > 1):
        return _enhanced_frames(ds, where, n_frames, common)
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if tag not in ds:
            raise VolumeError(f"{where}: no {tag}; cannot place the slice in patient space")
    image_type = list(ds.get("ImageType", []))
    key = (
        ("echo", _fv(ds.get("EchoNumbers"))),
        ("temporal", _fv(ds.get("TemporalPositionIdentifier"))),
        ("b", _fv(ds.get("DiffusionBValue"))),
        ("type", _fv(image_type[2] if len(image_type) > 2 else "")),
    )
    thick = ds.get("SpacingBetweenSlices", ds.get("SliceThickness"))
    out.append(_Frame(
        frame_index=None, iop=np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
        ipp=np.asarray(ds.ImagePositionPatient, dtype=np.float64),
        pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        stack_key=key, slice_thickness=float(thick) if thick not in (None, "") else None,
        **common,
    ))
    return out


def _enhanced_frames(ds: Any, where: str, n: int, common: dict[str, Any]) -> list[_Frame]:
    """Frames of a multi-frame instance (Enhanced MR, or legacy multi-frame).

    Each attribute comes from the frame's per-frame functional group first, then the shared
    functional groups, then the top level of the dataset (legacy multi-frame). Frames with no
    ImagePositionPatient anywhere but a first position (shared group or top level), an
    orientation and Spacing Between Slices (else Slice Thickness) are placed along the slice
    normal, ``position(f) = first + f * spacing * normal``.
    """
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if per_frame and len(per_frame) != n:
        raise VolumeError(
            f"{where}: NumberOfFrames {n} but {len(per_frame)} per-frame functional groups"
        )
    if not per_frame:
        per_frame = [None] * n

    def lookup(pf: Any, seq_name: str, attr: str) -> Any:
        v = _lookup((pf, shared), seq_name, attr)
        return ds.get(attr) if v is None else v

    out: list[_Frame] = []
    derived = False
    for f, pf in enumerate(per_frame):
        iop = lookup(pf, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = lookup(pf, "PixelMeasuresSequence", "PixelSpacing")
        ipp = _lookup((pf,), "PlanePositionSequence", "ImagePositionPatient")
        if ipp is None:
            first = lookup(None, "PlanePositionSequence", "ImagePositionPatient")
            step = lookup(pf, "PixelMeasuresSequence", "SpacingBetweenSlices")
            if step in (None, ""):
                step = lookup(pf, "PixelMeasuresSequence", "SliceThickness")
            if first is not None and iop is not None and step not in (None, "") and (
                    n == 1 or all(_lookup((g,), "PlanePositionSequence", "ImagePositionPatient")
                                  is None for g in per_frame)):
                o = np.asarray(iop, dtype=np.float64)
                normal = np.cross(o[:3], o[3:])
                ipp = np.asarray(first, dtype=np.float64) + f * float(step) * normal
                derived = True
        missing = [name for name, v in (("ImageOrientationPatient", iop),
                                        ("ImagePositionPatient", ipp), ("PixelSpacing", ps))
                   if v is None]
        if missing:
            raise VolumeError(
                f"{where} frame {f + 1} of {n}: no {', '.join(missing)} in the per-frame or "
                "shared functional groups or at the top level; cannot place the frame in "
                "patient space"
            )
        slope = lookup(pf, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = lookup(pf, "PixelValueTransformationSequence", "RescaleIntercept")
        thick = lookup(pf, "PixelMeasuresSequence", "SliceThickness")
        groups = (pf, shared)
        key = (
            ("stack", _fv(_lookup(groups, "FrameContentSequence", "StackID"))),
            ("temporal", _fv(_lookup(groups, "FrameContentSequence", "TemporalPositionIndex"))),
            ("echo", _fv(_lookup(groups, "MREchoSequence", "EffectiveEchoTime"))),
            ("b", _fv(_lookup(groups, "MRDiffusionSequence", "DiffusionBValue"))),
        )
        out.append(_Frame(
            frame_index=f, iop=np.asarray(iop, dtype=np.float64),
            ipp=np.asarray(ipp, dtype=np.float64),
            pixel_spacing=(float(ps[0]), float(ps[1])),
            slope=float(slope) if slope not in (None, "") else 1.0,
            intercept=float(icpt) if icpt not in (None, "") else 0.0,
            stack_key=key, slice_thickness=float(thick) if thick not in (None, "") else None,
            **common,
        ))
    if derived:
        _log.info("frame positions derived", frames=n,
                  reason="no per-frame ImagePositionPatient: first position + slice spacing")
    return out


def _read_headers(paths: Sequence[Path], keep: list[Any] | None = None
                  ) -> tuple[list[_Frame], dict[str, str], dict[str, str]]:
    """Every frame's header facts, the series-level UIDs, and :data:`_METADATA_TAGS` values.

    ``keep``: each file's header Dataset (no pixel data) is appended to it, in ``paths`` order.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not paths:
        raise VolumeError("no files given")
    frames: list[_Frame] = []
    uids: dict[str, str] = {}
    meta: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError) as err:
            raise VolumeError(f"{path.name}: cannot read as DICOM: {err}") from None
        frames.extend(_frames_of(path, ds))
        if keep is not None:
            keep.append(ds)
        if not uids:
            uids = {
                "study": str(ds.get("StudyInstanceUID", "")),
                "series": str(ds.get("SeriesInstanceUID", "")),
                "for": str(ds.get("FrameOfReferenceUID", "")),
                "modality": str(ds.get("Modality", "MR")),
            }
            for tag in _METADATA_TAGS:
                v = ds.get(tag)
                if v not in (None, ""):
                    meta[tag] = _fv(v)
    series = sorted({f.series_instance_uid for f in frames})
    if len(series) > 1:
        raise VolumeError(f"files belong to {len(series)} series: {', '.join(series)}")
    return frames, uids, meta


def _stack_label(key: tuple[tuple[str, str], ...], varying: set[str]) -> str:
    parts = [f"{k}={v}" for k, v in key if k in varying]
    return ",".join(parts) or "1"


def _group_stacks(frames: list[_Frame]) -> dict[str, list[_Frame]]:
    by_key: dict[tuple[tuple[str, str], ...], list[_Frame]] = {}
    for f in frames:
        by_key.setdefault(f.stack_key, []).append(f)
    names = [name for name, _ in frames[0].stack_key] if frames else []
    varying = {
        name for n, name in enumerate(names) if len({k[n][1] for k in by_key}) > 1
    }
    return {_stack_label(k, varying): v for k, v in sorted(by_key.items())}


def split_stacks(paths: Sequence[Path]) -> dict[str, int]:
    """The stacks of a series and their frame counts, reading headers only.

    A series may hold several stacks: multiple echoes (Echo Numbers / Effective Echo Time),
    temporal positions, diffusion b-values, Enhanced MR Stack IDs, or magnitude/phase images.

    Args:
        paths: The instance files of one series.

    Returns:
        Stack label (e.g. ``"echo=2"``, ``"1"`` when there is only one) → number of frames.
        Pass a label as ``stack=`` to :func:`build_volume`.
    """
    frames, _, _ = _read_headers(paths)
    return {label: len(fs) for label, fs in _group_stacks(frames).items()}


def _geometry(frames: list[_Frame], where: str) -> tuple[list[_Frame], npt.NDArray[np.float64]]:
    """Sort one stack's frames along the slice normal and compute the affine; or raise."""
    f0 = frames[0]
    sizes = sorted({(f.rows, f.columns) for f in frames})
    if len(sizes) > 1:
        raise VolumeError(f"{where}: mixed image sizes (rows, columns) {sizes}")
    iops = np.stack([f.iop for f in frames])
    if np.max(np.abs(iops - iops[0])) > _ORIENTATION_TOL:
        n_or = len({tuple(np.round(i, 3)) for i in iops})
        raise VolumeError(f"{where}: mixed orientations ({n_or} different ImageOrientationPatient)")
    spacings = sorted({f.pixel_spacing for f in frames})
    if len(spacings) > 1:
        raise VolumeError(f"{where}: mixed pixel spacings {spacings}")
    row_dir, col_dir = iops[0][:3], iops[0][3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        raise VolumeError(f"{where}: ImageOrientationPatient cosines are not unit vectors")
    if abs(float(row_dir @ col_dir)) > _ORTHOGONAL_TOL:
        raise VolumeError(f"{where}: ImageOrientationPatient row and column are not orthogonal")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    proj = np.array([f.ipp @ normal for f in frames])
    order = np.argsort(proj, kind="stable")
    frames = [frames[int(i)] for i in order]
    proj = proj[order]
    ipps = np.stack([f.ipp for f in frames])
    n = len(frames)
    if n > 1:
        gaps = np.diff(proj)
        dup = int(np.sum(gaps < _DUPLICATE_TOL_MM))
        if dup:
            k = int(np.argmax(gaps < _DUPLICATE_TOL_MM))
            raise VolumeError(
                f"{where}: {dup} duplicate slice position(s), e.g. {proj[k]:.3f} mm along the "
                "normal (several echoes/phases without distinguishing tags, or a repeated "
                "instance)"
            )
        med = float(np.median(gaps))
        bad = np.abs(gaps - med) > max(_SPACING_ABS_TOL_MM, _SPACING_REL_TOL * med)
        if np.any(bad):
            k = int(np.argmax(bad))
            missing = round(float(gaps[k]) / med) - 1
            why = f"about {missing} missing slice(s)" if missing >= 1 else "non-uniform spacing"
            raise VolumeError(
                f"{where}: {why}: gap {gaps[k]:.3f} mm between slices {k} and {k + 1} "
                f"(median gap {med:.3f} mm, {int(np.sum(bad))} irregular gap(s))"
            )
        rel = ipps - ipps[0]
        inplane = rel - np.outer(rel @ normal, normal)
        drift = float(np.max(np.linalg.norm(inplane, axis=1)))
        extent = float(proj[-1] - proj[0])
        if drift > _TILT_TOL_MM + 1e-3 * extent:
            angle = float(np.degrees(np.arctan2(np.linalg.norm(inplane[-1]), extent)))
            raise VolumeError(
                f"{where}: slice positions drift {drift:.3f} mm off the slice normal "
                f"(about {angle:.2f}°): gantry tilt or a non-orthogonal stack is not supported"
            )
        slice_sp = extent / (n - 1)
    else:
        slice_sp = f0.slice_thickness or 1.0
    row_sp, col_sp = f0.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_sp
    affine[:3, 1] = col_dir * row_sp
    affine[:3, 2] = row_dir * col_sp
    affine[:3, 3] = ipps[0]
    return frames, affine


def _orientation_name(affine: npt.NDArray[np.float64]) -> str:
    normal = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.99:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _decode_into(out: npt.NDArray[np.float32], frames: list[_Frame]) -> None:
    """Decode each frame straight into ``out[k]``, one file at a time, rescale applied."""
    from pydicom.pixels import iter_pixels, pixel_array

    by_path: dict[Path, list[tuple[int, _Frame]]] = {}
    for k, f in enumerate(frames):
        by_path.setdefault(f.path, []).append((k, f))
    for path, items in by_path.items():
        try:
            if items[0][1].frame_index is None:
                decoded = [pixel_array(path)]
                items_sorted = items
            else:
                items_sorted = sorted(items, key=lambda kf: kf[1].frame_index or 0)
                idx = [kf[1].frame_index or 0 for kf in items_sorted]
                decoded = iter_pixels(path, indices=idx)  # type: ignore[assignment]
            for (k, f), arr in zip(items_sorted, decoded, strict=True):
                if arr.shape != (f.rows, f.columns):
                    raise VolumeError(
                        f"{path.name}: decoded frame shape {arr.shape} != {(f.rows, f.columns)}"
                    )
                dst = out[k]
                np.copyto(dst, arr, casting="unsafe")
                if f.slope != 1.0:
                    dst *= np.float32(f.slope)
                if f.intercept != 0.0:
                    dst += np.float32(f.intercept)
        except VolumeError:
            raise
        except (NotImplementedError, RuntimeError, ValueError) as err:
            raise VolumeError(f"{path.name}: cannot decode pixel data: {err}") from None


def build_volumes(paths: Sequence[Path]) -> dict[str, Volume]:
    """One :class:`Volume` per stack of a series (see :func:`split_stacks` for the labels)."""
    frames, _, _ = _read_headers(paths)
    return {label: build_volume(paths, stack=label) for label in _group_stacks(frames)}


def build_volume(paths: Sequence[Path], *, stack: str | None = None,
                 headers: list[Any] | None = None) -> Volume:
    """Build the volume of one series from its instance files.

    Slices are ordered by ``ImagePositionPatient · normal`` (never InstanceNumber), slice
    spacing is measured from positions, and Rescale Slope/Intercept are applied (per frame for
    Enhanced MR). Headers are read first without pixel data; pixels are then decoded one file
    (one frame) at a time straight into a preallocated float32 array, so no Dataset's pixel
    data is held twice. Compressed transfer syntaxes are decoded by pydicom's plug-ins
    (pylibjpeg, pyjpegls, RLE).

    Args:
        paths: The instance files of one series (any order).
        stack: Which stack to build when the series holds several (a label from
            :func:`split_stacks`); ``None`` requires exactly one.
        headers: If given, every file's header (``pydicom.Dataset`` read without pixel data,
            in ``paths`` order) is appended to it: the job's exporters need them, and this
            saves reading the files' headers a second time (~0.1-0.3 s for 189 files).

    Returns:
        The volume on the source grid; ``metadata`` holds a few header values plus
        ``orientation`` (axial/sagittal/coronal/oblique) and ``stack``.

    Raises:
        VolumeError: Unreadable or non-image files, several series, several stacks without
            ``stack``, mixed sizes / orientations / pixel spacings, duplicate positions,
            missing slices or non-uniform spacing, gantry tilt or non-orthogonal geometry,
            undecodable pixel data. The message says which and why; it holds no patient data.
    """
    import time

    t0 = time.perf_counter()
    frames, uids, meta = _read_headers(paths, headers)
    stacks = _group_stacks(frames)
    if stack is None:
        if len(stacks) > 1:
            desc = ", ".join(f"{k} ({len(v)} frames)" for k, v in stacks.items())
            raise VolumeError(
                f"series {uids.get('series', '')} holds {len(stacks)} stacks: {desc}; "
                "build one with stack=<label> or all with build_volumes()"
            )
        stack = next(iter(stacks))
    elif stack not in stacks:
        raise VolumeError(f"no stack {stack!r} in this series; stacks are {sorted(stacks)}")
    where = f"series {uids.get('series', '')}" + (f" stack {stack}" if len(stacks) > 1 else "")
    sorted_frames, affine = _geometry(stacks[stack], where)
    f0 = sorted_frames[0]
    array = np.empty((len(sorted_frames), f0.rows, f0.columns), dtype=np.float32)
    _decode_into(array, sorted_frames)
    slices = [
        SliceRef(
            f.sop_instance_uid, f.sop_class_uid,
            None if f.frame_index is None else f.frame_index + 1,
        )
        for f in sorted_frames
    ]
    meta = dict(meta)
    meta["orientation"] = _orientation_name(affine)
    meta["stack"] = stack
    vol = Volume(
        array=array, affine=affine, slices=slices, study_instance_uid=uids.get("study", ""),
        series_instance_uid=uids.get("series", ""), frame_of_reference_uid=uids.get("for", ""),
        modality=uids.get("modality", "MR"), metadata=meta,
    )
    _log.info(
        "volume built", series_instance_uid=vol.series_instance_uid, shape=vol.shape,
        spacing_mm=[round(s, 4) for s in vol.spacing], orientation=meta["orientation"],
        stack=stack, stacks=len(stacks), seconds=round(time.perf_counter() - t0, 3),
    )
    return vol
