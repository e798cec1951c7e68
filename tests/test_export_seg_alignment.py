"""SEG frames that every viewer decodes: ``auto`` never writes non-byte-aligned 1-bit frames.

DICOM packs 1-bit frames back to back (PS3.5 8.1.1): with Rows x Columns not a multiple of 8
(the MNI brain at 2 mm: 91 x 109, here 99 x 117) frame 2 onwards starts inside a byte. OHIF 3.13
splits such frames with dcmjs' ``AsyncDicomReader.readUncompressedBitFrame``, which numbers the
bits most-significant first while DICOM packs least-significant first: every frame whose start
is not byte aligned is drawn as a sawtooth along its edges (``_dcmjs_split`` reproduces it).
``auto`` therefore writes such a SEG as pseudo-binary FRACTIONAL (8 bits, 0 or 255 only, which
OHIF accepts), and stays BINARY when the frames are byte aligned.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from export import ExportContext, ExportOptions, SegOptions
from export.seg import build_seg, frames_byte_aligned
from omnimri_samples import brain_volume, make_mr_series
from tests.test_export_data import RES_MM, SourceSeries, dciodvfy, make_context, write_and_read

SLICES = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seg-align")


@pytest.fixture(scope="module")
def unaligned(folder: Path) -> SourceSeries:
    arr, aff = brain_volume(RES_MM, SLICES)
    return write_and_read(make_mr_series(arr, aff), folder / "unaligned")


@pytest.fixture(scope="module")
def aligned(folder: Path) -> tuple[SourceSeries, int]:
    """The same slab, its columns cropped at their end (the origin stays) until a frame is a
    whole number of bytes; returns the series and the columns kept."""
    arr, aff = brain_volume(RES_MM, SLICES)  # [k, j, i]: rows j, columns i
    keep = next(c for c in range(arr.shape[2], 0, -1) if (arr.shape[1] * c) % 8 == 0)
    return write_and_read(make_mr_series(arr[:, :, :keep], aff), folder / "aligned"), keep


def _masks(ctx: object) -> np.ndarray:
    segs = sorted(ctx.results.segments, key=lambda s: s.label.number)  # type: ignore[attr-defined]
    return np.stack([s.mask for s in segs], axis=-1)


def _read_back(ds: Dataset, folder: Path, name: str, ctx: object) -> np.ndarray:
    errors, _ = dciodvfy(ds, folder, name)
    assert errors == []
    seg = hd.seg.segread(folder / f"{name}.dcm")
    return seg.get_pixels_by_source_instance(
        [ref.sop_instance_uid for ref in ctx.volume.slices]  # type: ignore[attr-defined]
    )


def _dcmjs_split(ds: Dataset) -> np.ndarray:
    """Frames as OHIF 3.13 gets them: dcmjs' MSB-first bit split, then an LSB-first unpack."""
    rows, cols, nframes = int(ds.Rows), int(ds.Columns), int(ds.NumberOfFrames)
    n = rows * cols
    msb = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="big")
    out = np.zeros((nframes, rows, cols), dtype=np.uint8)
    for k in range(nframes):
        bits = np.pad(msb[k * n:(k + 1) * n], (0, (-n) % 8))
        frame = np.packbits(bits, bitorder="big")
        out[k] = np.unpackbits(frame, bitorder="little")[:n].reshape(rows, cols)
    return out


def test_auto_writes_unaligned_grid_as_pseudo_binary_fractional(
    unaligned: SourceSeries, folder: Path
) -> None:
    headers = unaligned[0]
    assert not frames_byte_aligned(int(headers[0].Rows), int(headers[0].Columns))
    ctx = make_context(unaligned, options=ExportOptions(outputs=("seg",)))
    ds = build_seg(ctx)[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage, as BINARY
    assert ds.SegmentationType == "FRACTIONAL" and ds.BitsAllocated == 8
    # OHIF opens a FRACTIONAL SEG only when every value is 0 or MaximumFractionalValue
    values = set(np.unique(ds.pixel_array).tolist())
    assert values <= {0, int(ds.MaximumFractionalValue)} and len(values) == 2
    got = _read_back(ds, folder, "auto-unaligned", ctx)
    assert np.array_equal(got > 0, _masks(ctx))


def test_auto_stays_binary_when_frames_are_byte_aligned(
    aligned: tuple[SourceSeries, int], unaligned: SourceSeries, folder: Path
) -> None:
    series, keep = aligned
    headers = series[0]
    assert frames_byte_aligned(int(headers[0].Rows), int(headers[0].Columns))
    # the unaligned slab's results, cropped like the images
    res = make_context(unaligned).results
    cropped = replace(res, detections=[], segments=[
        replace(s, mask=s.mask[:, :, :keep].copy()) for s in res.segments])
    ctx = ExportContext(job_id="job-aligned", results=cropped, volume=series[1],
                        sources=headers, options=ExportOptions(outputs=("seg",)))
    ds = build_seg(ctx)[0]
    assert ds.SegmentationType == "BINARY" and ds.BitsAllocated == 1
    assert np.array_equal(_dcmjs_split(ds), ds.pixel_array)  # aligned: OHIF's split is right
    assert np.array_equal(_read_back(ds, folder, "auto-aligned", ctx).astype(bool), _masks(ctx))


def test_forced_binary_on_unaligned_grid_is_what_ohif_misreads(
    unaligned: SourceSeries, folder: Path
) -> None:
    ctx = make_context(unaligned, options=ExportOptions(
        outputs=("seg",), seg=SegOptions(segmentation_type="binary")))
    ds = build_seg(ctx)[0]
    assert ds.SegmentationType == "BINARY"
    path = folder / "forced-binary.dcm"
    ds.save_as(path, enforce_file_format=True)
    truth = pydicom.dcmread(path).pixel_array  # pydicom reads unaligned frames right
    assert np.array_equal(
        _read_back(ds, folder, "forced-binary", ctx).astype(bool), _masks(ctx))
    split = _dcmjs_split(ds)
    assert np.array_equal(split[0], truth[0])  # frame 1 starts at byte 0
    wrong = [k for k in range(len(truth)) if not np.array_equal(split[k], truth[k])]
    assert wrong, "every frame decoded right: the OHIF reading this test models has changed"
