"""Sample MR series made on this machine: for tests, benchmarks, evaluation and the demo.

A leaf package: the node's production modules never import it (``tests/test_import_rules.py``
checks; ``omnimri-node demo`` and the real-MR evaluation import it inside the command). Nothing
here downloads anything. The brain comes from nilearn's MNI152 2009 template, which
ships inside the nilearn wheel; geometry is written exactly, so tests can check volumes,
affines and segment alignment against known values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from export.uids import UID_PREFIX  # the node's one UID root (sample series use it too)

__all__ = ["UID_PREFIX", "PatientInfo", "brain_series", "brain_volume", "iter_pydicom_mr_files",
           "make_mr_series", "mni_brain", "ras_image_to_axial_lps", "synthetic_series",
           "write_series"]


@dataclass(frozen=True)
class PatientInfo:
    """Synthetic patient and study identity for sample series (not a real person)."""

    patient_name: str = "OMNIMRI^PHANTOM"
    patient_id: str = "OMNI-0001"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    accession_number: str = "ACC0001"
    study_description: str = "MRI BRAIN"
    study_id: str = "1"
    referring_physician_name: str = ""


def mni_brain(resolution_mm: int = 1) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """The MNI152 2009 T1 template as an axial ``[slice, row, col]`` volume in LPS.

    Returns:
        ``(array, affine)``: array float32 in the template's units (0-255 range), and the 4x4
        affine mapping ``(k, j, i, 1)`` to LPS millimetres (see :mod:`inference.volume`).
    """
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=resolution_mm)
    return ras_image_to_axial_lps(np.asarray(img.get_fdata(), dtype=np.float32), img.affine)


def ras_image_to_axial_lps(
    data_xyz: npt.NDArray[np.float32], ras_affine: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """Turn a NIfTI-style ``[x, y, z]`` RAS volume into an axial ``[k, j, i]`` LPS volume.

    Only axis-aligned RAS affines (as in the MNI templates) are supported: columns run to the
    patient's left, rows to posterior, slices from inferior to superior.
    """
    vox = np.abs(np.diag(ras_affine)[:3])
    if not np.allclose(ras_affine[:3, :3], np.diag(np.diag(ras_affine)[:3])) or np.any(
        np.diag(ras_affine)[:3] <= 0
    ):
        raise ValueError("only axis-aligned RAS+ affines are supported")
    nx, ny, _ = data_xyz.shape
    # image[k, r, c] = data[nx-1-c, ny-1-r, k]
    arr = np.ascontiguousarray(np.transpose(data_xyz[::-1, ::-1, :], (2, 1, 0)))
    ras0 = ras_affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    origin_lps = np.array([-ras0[0], -ras0[1], ras0[2]])
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, vox[2]]  # slice axis: +S
    affine[:3, 1] = [0, vox[1], 0]  # row axis: +P
    affine[:3, 2] = [vox[0], 0, 0]  # column axis: +L
    affine[:3, 3] = origin_lps
    return arr.astype(np.float32), affine


def _to_uint16(array: npt.NDArray[np.floating], max_value: float = 4095.0) -> tuple[
    npt.NDArray[np.uint16], float, float
]:
    lo = float(array.min()) if array.size else 0.0
    hi = float(array.max()) if array.size else 1.0
    if lo >= 0 and hi <= max_value and np.allclose(array, np.round(array)):
        return array.astype(np.uint16), 1.0, 0.0
    slope = float(f"{(hi - lo) / max_value:.8g}") if hi > lo else 1.0
    lo = float(f"{lo:.8g}")
    stored = np.clip(np.round((array - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def _base_dataset(
    patient: PatientInfo, study_uid: str, series_uid: str, for_uid: str, series_number: int,
    description: str, when: datetime,
) -> Dataset:
    ds = Dataset()
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.patient_birth_date
    ds.PatientSex = patient.patient_sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.AccessionNumber = patient.accession_number
    ds.ReferringPhysicianName = patient.referring_physician_name
    ds.StudyID = patient.study_id
    ds.StudyDescription = patient.study_description
    ds.Modality = "MR"
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "OmniMRI Node samples"
    ds.BodyPartExamined = "BRAIN"
    return ds


def _geometry(affine: npt.NDArray[np.float64]) -> tuple[list[float], list[float], float]:
    row_sp = float(np.linalg.norm(affine[:3, 1]))
    col_sp = float(np.linalg.norm(affine[:3, 2]))
    slice_sp = float(np.linalg.norm(affine[:3, 0]))
    row_dir = affine[:3, 2] / col_sp  # direction along a row = column index increasing
    col_dir = affine[:3, 1] / row_sp  # direction down a column = row index increasing
    iop = [round(float(v), 8) for v in (*row_dir, *col_dir)]
    return iop, [row_sp, col_sp], slice_sp


def make_mr_series(
    array: npt.NDArray[np.floating],
    affine: npt.NDArray[np.float64],
    *,
    patient: PatientInfo | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    description: str = "T1 AXIAL",
    enhanced: bool = False,
    when: datetime | None = None,
) -> list[Dataset]:
    """Build an MR series from a ``[k, j, i]`` volume and its LPS affine.

    Args:
        array: Image, ``[slice, row, column]``; stored as uint16 with a rescale if needed.
        affine: 4x4, ``(k, j, i, 1)`` to LPS millimetres (may be oblique).
        patient: Synthetic identity; default :class:`PatientInfo`.
        study_uid: Study Instance UID; generated if ``None``.
        series_uid: Series Instance UID; generated if ``None``.
        series_number: Series Number.
        description: Series Description.
        enhanced: One Enhanced MR multi-frame instance instead of one instance per slice.
        when: Study date/time; default now.

    Returns:
        Datasets with file meta (Explicit VR Little Endian), ready for ``save_as`` or C-STORE.
    """
    patient = patient or PatientInfo()
    when = when or datetime.now()
    study_uid = study_uid or generate_uid(prefix=UID_PREFIX)
    series_uid = series_uid or generate_uid(prefix=UID_PREFIX)
    for_uid = generate_uid(prefix=UID_PREFIX)
    stored, slope, intercept = _to_uint16(np.asarray(array, dtype=np.float64))
    nk, nr, nc = stored.shape
    iop, pixel_spacing, slice_sp = _geometry(affine)
    base = _base_dataset(patient, study_uid, series_uid, for_uid, series_number, description, when)

    def pixel_module(ds: Dataset) -> None:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nr
        ds.Columns = nc
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0

    def position(k: int) -> list[float]:
        p = affine @ np.array([k, 0, 0, 1.0])
        return [round(float(v), 6) for v in p[:3]]

    out: list[Dataset] = []
    if not enhanced:
        for k in range(nk):
            ds = Dataset()
            ds.update(base)
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = generate_uid(prefix=UID_PREFIX)
            ds.InstanceNumber = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.SliceThickness = slice_sp
            ds.SpacingBetweenSlices = slice_sp
            ds.RepetitionTime = 2000.0
            ds.EchoTime = 3.0
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 3.0
            ds.ImagePositionPatient = position(k)
            ds.ImageOrientationPatient = iop
            ds.PixelSpacing = pixel_spacing
            ds.SliceLocation = float(np.dot(position(k), np.cross(iop[:3], iop[3:])))
            ds.AcquisitionNumber = 1
            ds.ContentDate = ds.StudyDate
            ds.ContentTime = ds.StudyTime
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
            ds.RescaleType = "US"
            pixel_module(ds)
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            _add_meta(ds)
            out.append(ds)
        return out

    ds = Dataset()
    ds.update(base)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=UID_PREFIX)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionContrast = "T1"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.ImageComments = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = 3.0
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImagingFrequency = 127.7
    ds.MRAcquisitionType = "3D"
    ds.NumberOfFrames = nk
    pixel_module(ds)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = pixel_spacing
    pm.SliceThickness = slice_sp
    pm.SpacingBetweenSlices = slice_sp
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = iop
    shared.PlaneOrientationSequence = Sequence([po])
    pvt = Dataset()
    pvt.RescaleSlope = slope
    pvt.RescaleIntercept = intercept
    pvt.RescaleType = "US"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    dim_uid = generate_uid(prefix=UID_PREFIX)
    dio = Dataset()
    dio.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([dio])
    dii = Dataset()
    dii.DimensionOrganizationUID = dim_uid
    dii.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    dii.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionIndexSequence = Sequence([dii])
    per_frame = []
    for k in range(nk):
        fg = Dataset()
        fc = Dataset()
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        fc.DimensionIndexValues = [k + 1]
        fg.FrameContentSequence = Sequence([fc])
        pp = Dataset()
        pp.ImagePositionPatient = position(k)
        fg.PlanePositionSequence = Sequence([pp])
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    _add_meta(ds)
    return [ds]


def _add_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def brain_volume(
    resolution_mm: int = 1, slices: int | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """The MNI152 brain scaled to 0-1000, optionally its ``slices`` central axial slices.

    Returns:
        ``(array, affine)`` as :func:`mni_brain`; the affine's origin follows the cropping, so
        positions in LPS millimetres are unchanged.
    """
    arr, aff = mni_brain(resolution_mm)
    arr = np.round(arr / max(float(arr.max()), 1e-6) * 1000.0).astype(np.float32)
    if slices is not None and slices < arr.shape[0]:
        start = (arr.shape[0] - slices) // 2
        arr = arr[start : start + slices]
        aff = aff.copy()
        aff[:3, 3] = (aff @ np.array([start, 0, 0, 1.0]))[:3]
    return arr, aff


def brain_series(
    *, resolution_mm: int = 1, slices: int | None = None, enhanced: bool = False, **kwargs: object
) -> list[Dataset]:
    """A brain MR series from the MNI152 template (``slices`` central slices if given)."""
    arr, aff = brain_volume(resolution_mm, slices)
    return make_mr_series(arr, aff, enhanced=enhanced, **kwargs)  # type: ignore[arg-type]


def synthetic_series(
    n_slices: int, rows: int = 256, cols: int = 256, *, seed: int = 0, **kwargs: object
) -> list[Dataset]:
    """A quick non-anatomical MR series of any size (for ingest benchmarks and load tests)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 4095, size=(n_slices, rows, cols), dtype=np.uint16)
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, 1.0]
    affine[:3, 1] = [0, 1.0, 0]
    affine[:3, 2] = [1.0, 0, 0]
    return make_mr_series(arr, affine, **kwargs)  # type: ignore[arg-type]


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Save datasets as ``<folder>/<n>.dcm``; returns the paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        p = folder / f"{n:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def iter_pydicom_mr_files() -> Iterator[Path]:
    """Pydicom's shipped MR test files (no download): ``MR_small*.dcm`` and friends."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    yield from sorted(folder.glob("MR_small*.dcm"))
