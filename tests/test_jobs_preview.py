"""The built-in ``preview`` pipeline: a real Secondary Capture, validated by dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.config import parse_config
from dicom_node.pipelines import PipelineError, UnsupportedSeries, get_pipeline
from dicom_node.pipelines.preview import (
    MAX_TILES,
    SERIES_DESCRIPTION,
    SERIES_NUMBER_OFFSET,
    montage,
    preview_uids,
)
from omnimri_samples import brain_series, iter_pydicom_mr_files, write_series
from tests.test_destinations import series_from_files

SETTINGS = parse_config({"pipelines": {"preview": {"kind": "preview", "model": None}}},
                        Path.cwd())


def run(paths: list[Path], job_id: str = "job-1") -> pydicom.Dataset:
    pipeline = get_pipeline("preview", SETTINGS.pipelines["preview"], SETTINGS)
    [sc] = pipeline.run(series_from_files(paths), job_id)
    return sc


def test_brain_preview_is_a_valid_sc_in_the_same_study(tmp_path: Path) -> None:
    datasets = brain_series(resolution_mm=2, slices=40)
    paths = write_series(datasets, tmp_path / "src")
    sc = run(paths)
    src = datasets[0]
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.PatientID == src.PatientID
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == preview_uids("job-1")
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.SeriesDescription == SERIES_DESCRIPTION
    assert sc.SeriesNumber == src.SeriesNumber + SERIES_NUMBER_OFFSET
    assert sc.ContentQualification == "RESEARCH"
    assert sc.BurnedInAnnotation == "NO"
    assert sc.PhotometricInterpretation == "MONOCHROME2" and sc.BitsAllocated == 8
    # 16 tiles of 40 slices in a 4 x 4 grid; the brain is visible (not a blank image).
    rows, cols = int(src.Rows), int(src.Columns)
    assert rows > cols  # axial MNI: anterior-posterior longer than left-right
    assert (sc.Rows, sc.Columns) == (4 * 256, 4 * round(cols * 256 / rows))
    arr = sc.pixel_array
    assert arr.max() == 255 and (arr > 0).mean() > 0.2
    # Re-running the job gives the same object (same UIDs, same pixels).
    again = run(paths)
    assert again.SOPInstanceUID == sc.SOPInstanceUID
    assert np.array_equal(again.pixel_array, arr)
    assert run(paths, "job-2").SOPInstanceUID != sc.SOPInstanceUID
    if shutil.which("dciodvfy"):
        out = tmp_path / "sc.dcm"
        sc.save_as(out, enforce_file_format=True)
        report = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True)
        errors = [ln for ln in report.stderr.splitlines() if ln.startswith("Error")]
        assert errors == [], report.stderr


def test_every_lossless_syntax_gives_the_same_preview() -> None:
    files = list(iter_pydicom_mr_files())
    assert len(files) >= 5
    reference = run([f for f in files if f.name == "MR_small.dcm"]).pixel_array
    for f in files:
        assert np.array_equal(run([f]).pixel_array, reference), f.name


def test_slices_are_ordered_along_the_normal(tmp_path: Path) -> None:
    datasets = brain_series(resolution_mm=2, slices=4)
    # Arrival order reversed: the montage must still go inferior to superior.
    paths = write_series(list(reversed(datasets)), tmp_path / "src")
    tiles = montage([ds.pixel_array.astype(np.float32) for ds in datasets])
    assert np.array_equal(run(paths).pixel_array, tiles)
    assert MAX_TILES == 16


def test_series_without_pixels_is_unsupported(tmp_path: Path) -> None:
    ds = pydicom.dcmread(next(iter_pydicom_mr_files()))
    del ds.PixelData
    path = tmp_path / "nopix.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedSeries, match="nothing to preview"):
        run([path])
    with pytest.raises(PipelineError, match="unknown kind"):
        cfg = SETTINGS.pipelines["preview"].model_copy()
        object.__setattr__(cfg, "kind", "nonsense")
        get_pipeline("x", cfg, SETTINGS)
