"""Volume builder: geometry, ordering, rescale, Enhanced MR, compressed syntaxes, stacks, errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from inference.volume import VolumeError, build_volume, build_volumes, split_stacks
from omnimri_samples import UID_PREFIX, iter_pydicom_mr_files, make_mr_series, write_series


def _rotation(ax: float, ay: float, az: float) -> npt.NDArray[np.float64]:
    from scipy.spatial.transform import Rotation

    return np.asarray(Rotation.from_euler("xyz", [ax, ay, az], degrees=True).as_matrix())


def oblique_affine(
    spacing: tuple[float, float, float] = (2.5, 0.9, 1.1),
    angles: tuple[float, float, float] = (20.0, -15.0, 35.0),
    origin: tuple[float, float, float] = (-50.0, 30.0, 12.5),
) -> npt.NDArray[np.float64]:
    """An oblique ``(k, j, i)`` affine whose slice axis runs along row × column (DICOM normal)."""
    r = _rotation(*angles)
    row_dir, col_dir = r[:, 0], r[:, 1]  # along a row (i), down a column (j)
    normal = np.cross(row_dir, col_dir)
    aff = np.eye(4)
    aff[:3, 0] = normal * spacing[0]
    aff[:3, 1] = col_dir * spacing[1]
    aff[:3, 2] = row_dir * spacing[2]
    aff[:3, 3] = origin
    return aff


def axial_affine(spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)) -> npt.NDArray[np.float64]:
    aff = np.eye(4)
    aff[:3, 0] = [0, 0, spacing[0]]
    aff[:3, 1] = [0, spacing[1], 0]
    aff[:3, 2] = [spacing[2], 0, 0]
    aff[:3, 3] = [-10.0, -20.0, 5.0]
    return aff


@pytest.fixture(scope="module")
def image() -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(7)
    return rng.integers(0, 4000, size=(9, 20, 24)).astype(np.float32)


def _write(datasets: list[Dataset], folder: Path) -> list[Path]:
    return write_series(datasets, folder)


def test_oblique_shuffled_geometry_exact(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    aff = oblique_affine()
    paths = _write(make_mr_series(image, aff), tmp_path)
    random.Random(3).shuffle(paths)
    vol = build_volume(paths)
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_allclose(vol.affine, aff, atol=2e-5)
    np.testing.assert_allclose(vol.spacing, (2.5, 0.9, 1.1), atol=1e-5)
    assert vol.metadata["orientation"] == "oblique"
    # slice k references the instance whose position is affine @ (k, 0, 0)
    for k in (0, 4, 8):
        ds = pydicom.dcmread(
            next(p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                 == vol.slices[k].sop_instance_uid),
            stop_before_pixels=True,
        )
        np.testing.assert_allclose(ds.ImagePositionPatient, (aff @ [k, 0, 0, 1])[:3], atol=1e-5)
        assert vol.slices[k].frame_number is None


def test_order_ignores_instance_number(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    datasets = make_mr_series(image, axial_affine())
    for ds in datasets:  # scramble InstanceNumber: position must win
        ds.InstanceNumber = random.Random(ds.InstanceNumber).randint(1, 10_000)
    vol = build_volume(_write(datasets, tmp_path))
    np.testing.assert_array_equal(vol.array, image)
    assert vol.metadata["orientation"] == "axial"


def test_rescale_applied(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.random((4, 8, 8)) * 3.7 - 1.2).astype(np.float32)
    datasets = make_mr_series(arr, axial_affine())
    slope = float(datasets[0].RescaleSlope)
    assert slope != 1.0 and float(datasets[0].RescaleIntercept) != 0.0
    vol = build_volume(_write(datasets, tmp_path))
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, arr, atol=slope * 0.51 + 1e-6)


def test_enhanced_mr(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    aff = oblique_affine(angles=(-5.0, 30.0, 80.0))
    paths = _write(make_mr_series(image, aff, enhanced=True), tmp_path)
    vol = build_volume(paths)
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_allclose(vol.affine, aff, atol=2e-5)
    assert [s.frame_number for s in vol.slices] == list(range(1, 10))
    assert len({s.sop_instance_uid for s in vol.slices}) == 1


def test_enhanced_frames_out_of_order(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    """Frames stored in reverse order are still placed by position; frame numbers follow."""
    aff = axial_affine()
    (ds,) = make_mr_series(image[::-1].copy(), aff, enhanced=True)
    n = image.shape[0]
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):  # frame f shows slice n-1-f
        fg.PlanePositionSequence[0].ImagePositionPatient = [
            float(v) for v in (aff @ [n - 1 - f, 0, 0, 1])[:3]
        ]
    vol = build_volume(_write([ds], tmp_path))
    np.testing.assert_array_equal(vol.array, image)
    assert [s.frame_number for s in vol.slices] == list(range(n, 0, -1))


def test_pydicom_compressed_files_agree() -> None:
    files = {p.name: p for p in iter_pydicom_mr_files()}
    ref = build_volume([files["MR_small.dcm"]])
    tested = 0
    for name in (
        "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
    ):
        if name in files:
            vol = build_volume([files[name]])
            np.testing.assert_array_equal(vol.array, ref.array, err_msg=name)
            np.testing.assert_allclose(vol.affine, ref.affine)
            tested += 1
    assert tested >= 3


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless], ids=["rle", "jpegls"])
def test_own_compressed_series(
    tmp_path: Path, image: npt.NDArray[np.float32], syntax: str
) -> None:
    datasets = make_mr_series(image, oblique_affine())
    for ds in datasets:
        ds.compress(syntax)
    paths = _write(datasets, tmp_path)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    vol = build_volume(paths)
    np.testing.assert_array_equal(vol.array, image)


# ---------------------------------------------------------------------------- stacks


def _two_echo_series(image: npt.NDArray[np.float32]) -> list[Dataset]:
    series_uid = generate_uid(prefix=UID_PREFIX)
    e1 = make_mr_series(image, axial_affine(), series_uid=series_uid)
    e2 = make_mr_series(image + 7, axial_affine(), series_uid=series_uid)
    for echo, datasets in ((1, e1), (2, e2)):
        for ds in datasets:
            ds.EchoNumbers = echo
            ds.FrameOfReferenceUID = e1[0].FrameOfReferenceUID
    return e1 + e2


def test_two_echoes_rejected_or_split(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    paths = _write(_two_echo_series(image), tmp_path)
    with pytest.raises(VolumeError, match=r"2 stacks: echo=1 \(9 frames\), echo=2 \(9 frames\)"):
        build_volume(paths)
    assert split_stacks(paths) == {"echo=1": 9, "echo=2": 9}
    vol2 = build_volume(paths, stack="echo=2")
    np.testing.assert_array_equal(vol2.array, image + 7)
    vols = build_volumes(paths)
    assert sorted(vols) == ["echo=1", "echo=2"]
    np.testing.assert_array_equal(vols["echo=1"].array, image)
    with pytest.raises(VolumeError, match="no stack 'echo=3'"):
        build_volume(paths, stack="echo=3")


def test_enhanced_two_stack_ids(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    (ds,) = make_mr_series(image[:8], axial_affine(), enhanced=True)
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        fg.FrameContentSequence[0].StackID = "1" if f < 4 else "2"
    paths = _write([ds], tmp_path)
    assert split_stacks(paths) == {"stack=1": 4, "stack=2": 4}
    vol = build_volume(paths, stack="stack=2")
    np.testing.assert_array_equal(vol.array, image[4:8])
    assert [s.frame_number for s in vol.slices] == [5, 6, 7, 8]


# ---------------------------------------------------------------------------- failures


def test_duplicate_positions(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    datasets = make_mr_series(image, axial_affine())
    dup = pydicom.dcmread(write_series([datasets[3]], tmp_path / "d")[0])
    dup.SOPInstanceUID = generate_uid(prefix=UID_PREFIX)
    dup.file_meta.MediaStorageSOPInstanceUID = dup.SOPInstanceUID
    with pytest.raises(VolumeError, match="1 duplicate slice position"):
        build_volume(_write([*datasets, dup], tmp_path / "s"))


def test_missing_slice(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    datasets = make_mr_series(image, axial_affine())
    del datasets[4]
    with pytest.raises(VolumeError, match=r"about 1 missing slice\(s\): gap 6.000 mm"):
        build_volume(_write(datasets, tmp_path))


def test_non_uniform_spacing(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    datasets = make_mr_series(image, axial_affine())
    ipp = list(datasets[5].ImagePositionPatient)
    datasets[5].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.7]
    with pytest.raises(VolumeError, match="non-uniform spacing"):
        build_volume(_write(datasets, tmp_path))


def test_mixed_orientations(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    datasets = make_mr_series(image, axial_affine())
    datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(VolumeError, match=r"mixed orientations \(2 different"):
        build_volume(_write(datasets, tmp_path))


def test_gantry_tilt(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    aff = axial_affine()
    aff[:3, 0] = [0, 3.0 * np.tan(np.radians(10)), 3.0]  # sheared stack: 10° tilt
    with pytest.raises(VolumeError, match="gantry tilt"):
        build_volume(_write(make_mr_series(image, aff), tmp_path))


def test_non_orthogonal_cosines(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    datasets = make_mr_series(image, axial_affine())
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0.0995037, 0.9950372, 0]
    with pytest.raises(VolumeError, match="not orthogonal"):
        build_volume(_write(datasets, tmp_path))


def test_mixed_sizes(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    series_uid = generate_uid(prefix=UID_PREFIX)
    big = make_mr_series(image, axial_affine(), series_uid=series_uid)
    small = make_mr_series(image[:, :10, :10], axial_affine(), series_uid=series_uid)
    msg = r"mixed image sizes \(rows, columns\) \[\(10, 10\), \(20, 24\)\]"
    with pytest.raises(VolumeError, match=msg):
        build_volume(_write([*big[:5], *small[5:]], tmp_path))


def test_mixed_pixel_spacing(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    datasets = make_mr_series(image, axial_affine())
    datasets[1].PixelSpacing = [1.2, 1.2]
    with pytest.raises(VolumeError, match="mixed pixel spacings"):
        build_volume(_write(datasets, tmp_path))


def test_two_series(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    a = make_mr_series(image[:3], axial_affine())
    b = make_mr_series(image[:3], axial_affine())
    with pytest.raises(VolumeError, match="files belong to 2 series"):
        build_volume(_write(a + b, tmp_path))


def test_not_dicom_and_not_image(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(VolumeError, match="junk.dcm: cannot read as DICOM"):
        build_volume([junk])
    with pytest.raises(VolumeError, match="no files given"):
        build_volume([])
    ds = make_mr_series(image[:1], axial_affine())[0]
    del ds.ImagePositionPatient
    with pytest.raises(VolumeError, match="no ImagePositionPatient"):
        build_volume(_write([ds], tmp_path / "nopos"))
    sr = make_mr_series(image[:1], axial_affine())[0]
    del sr.Rows
    with pytest.raises(VolumeError, match="no Rows; not an image"):
        build_volume(_write([sr], tmp_path / "norows"))


def test_single_slice_uses_thickness(tmp_path: Path, image: npt.NDArray[np.float32]) -> None:
    vol = build_volume(_write(make_mr_series(image[:1], axial_affine((4.0, 1.0, 1.0))), tmp_path))
    assert vol.shape == (1, 20, 24)
    assert vol.spacing[0] == pytest.approx(4.0)


def test_enhanced_rescale_at_top_level(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arr = (rng.random((3, 8, 8)) * 5.0 + 1.0).astype(np.float32)
    (ds,) = make_mr_series(arr, axial_affine(), enhanced=True)
    shared = ds.SharedFunctionalGroupsSequence[0]
    pvt = shared.PixelValueTransformationSequence[0]
    ds.RescaleSlope, ds.RescaleIntercept = pvt.RescaleSlope, pvt.RescaleIntercept
    del shared.PixelValueTransformationSequence
    vol = build_volume(_write([ds], tmp_path))
    np.testing.assert_allclose(vol.array, arr, atol=float(ds.RescaleSlope) * 0.51 + 1e-6)


# ------------------------------------------------------------- Enhanced MR, shared groups only


def _emri_small() -> Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm")
    if path is None:
        pytest.skip("pydicom-data (emri_small.dcm) is not installed")
    return pydicom.dcmread(path)


def _shared_geometry(ds: Dataset, iop: list[float], spacing: list[float], step: float,
                     first: list[float]) -> None:
    from pydicom.sequence import Sequence

    shared = Dataset()
    po, pm, pp = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = iop
    pm.PixelSpacing, pm.SliceThickness = spacing, step
    pp.ImagePositionPatient = first
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlanePositionSequence = Sequence([pp])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])


def test_pydicom_emri_small_without_any_geometry_is_refused_precisely(tmp_path: Path) -> None:
    """pydicom-data's emri_small.dcm has no functional groups and no top-level geometry."""
    ds = _emri_small()
    assert "SharedFunctionalGroupsSequence" not in ds and "ImageOrientationPatient" not in ds
    p = tmp_path / "emri.dcm"
    ds.save_as(p)
    with pytest.raises(VolumeError, match=r"frame 1 of 10: no ImageOrientationPatient, "
                                          r"ImagePositionPatient, PixelSpacing in the per-frame "
                                          r"or shared functional groups"):
        build_volume([p])


def test_enhanced_mr_geometry_only_in_shared_groups(tmp_path: Path) -> None:
    """Orientation, pixel spacing, thickness and the first position only in the shared groups
    (no per-frame groups): frames are placed along the normal at the slice thickness."""
    ds = _emri_small()
    iop = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal
    _shared_geometry(ds, iop, [0.9, 0.8], 1.2, [10.0, -20.0, 30.0])
    p = tmp_path / "emri.dcm"
    ds.save_as(p)
    vol = build_volume([p])
    assert vol.shape == (10, 64, 64) and vol.metadata["orientation"] == "sagittal"
    np.testing.assert_array_equal(vol.array, ds.pixel_array.astype(np.float32))
    np.testing.assert_allclose(vol.spacing, (1.2, 0.9, 0.8))
    np.testing.assert_allclose(vol.affine[:3, 3], [10.0, -20.0, 30.0])
    np.testing.assert_allclose(vol.affine[:3, 0], [-1.2, 0.0, 0.0], atol=1e-9)  # row x column
    assert [s.frame_number for s in vol.slices] == list(range(1, 11))


def test_enhanced_mr_per_frame_groups_win_over_shared(tmp_path: Path) -> None:
    from pydicom.sequence import Sequence

    ds = _emri_small()
    iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # axial
    _shared_geometry(ds, iop, [0.9, 0.8], 1.2, [0.0, 0.0, 0.0])
    frames = []
    for f in range(10):  # per-frame positions 2 mm apart, pixel spacing 0.5 mm per frame
        fg, pp, pm = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = [5.0, 6.0, 2.0 * (9 - f)]
        pm.PixelSpacing = [0.5, 0.5]
        fg.PlanePositionSequence = Sequence([pp])
        fg.PixelMeasuresSequence = Sequence([pm])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    p = tmp_path / "emri.dcm"
    ds.save_as(p)
    vol = build_volume([p])
    np.testing.assert_allclose(vol.spacing, (2.0, 0.5, 0.5))
    np.testing.assert_allclose(vol.affine[:3, 3], [5.0, 6.0, 0.0])
    assert [s.frame_number for s in vol.slices] == list(range(10, 0, -1))  # sorted by position
    np.testing.assert_array_equal(vol.array, ds.pixel_array[::-1].astype(np.float32))
