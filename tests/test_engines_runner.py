"""Pre-processing, sliding windows, inverse mapping and post-processing, through real ONNX Runtime.

An identity graph (returns its input) must give back the source volume on the source grid,
whatever reorientation, resampling, padding and window overlap the package asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from inference.engines import create_engine
from inference.package import InputSpec, ModelPackage, NormalisationSpec
from inference.postprocess import connected_components, to_source_grid
from inference.preprocess import (
    grid_transform,
    normalise,
    prepare,
    reorientation,
    sliding_windows,
    to_model_grid,
)
from inference.runner import run_model
from inference.volume import SliceRef, Volume
from tests.fixtures.tiny_model import identity_package


def _sagittal_affine(spacing: tuple[float, float, float] = (1.5, 1.0, 1.2)) -> np.ndarray:
    """Sagittal stack: slices to the patient's right (-L), rows down (-S), columns anterior (-P).

    Every axis differs from axial LPS order and direction.
    """
    aff = np.eye(4)
    aff[:3, 0] = [-spacing[0], 0, 0]
    aff[:3, 1] = [0, 0, -spacing[1]]
    aff[:3, 2] = [0, -spacing[2], 0]
    aff[:3, 3] = [40.0, 60.0, 70.0]
    return aff


def _blob_image(
    shape: tuple[int, int, int], seed: int = 0, smooth: float = 2.0
) -> npt.NDArray[np.float32]:
    """A smooth positive image with a bright off-centre blob (no exact zeros, no denormals)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), smooth).astype(np.float32) * 100 + 10
    k, j, i = np.indices(shape)
    img[(k - shape[0] // 3) ** 2 + (j - shape[1] // 4) ** 2 + (i - shape[2] // 2) ** 2 < 9] += 500
    return img


def _volume(array: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(array=array.astype(np.float32), affine=affine,
                  slices=[SliceRef(f"1.2.{k}", "1.2.840.10008.5.1.4.1.1.4") for k in
                          range(array.shape[0])])


def _identity(tmp_path: Path, name: str = "id", **overrides: Any) -> ModelPackage:
    return identity_package(tmp_path / name, **overrides)


def test_reorientation_to_lps_axial() -> None:
    axes, flips = reorientation(_sagittal_affine())
    t = grid_transform((10, 12, 14), _sagittal_affine(), InputSpec(name="x", patch_size=(4, 4, 4)))
    assert (axes, flips) == ((1, 2, 0), (True, True, True))
    assert t.reoriented_shape == (12, 14, 10)
    dirs = t.model_affine[:3, :3]
    # slices to +S, rows to +P, columns to +L
    assert dirs[2, 0] > 0 and dirs[1, 1] > 0 and dirs[0, 2] > 0
    assert np.count_nonzero(np.round(dirs, 9)) == 3
    # the same physical point before and after
    src = np.array([3, 5, 7, 1.0])
    r_index = [12 - 1 - 5, 14 - 1 - 7, 10 - 1 - 3]
    np.testing.assert_allclose(t.model_affine @ [*r_index, 1], _sagittal_affine() @ src)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"patch_size": [8, 8, 8], "overlap": 0.0},
        {"patch_size": [32, 32, 32]},  # larger than the volume: padded
        {"layout": "NCHW", "context_slices": 1, "patch_size": [8, 8]},
        {"orientation": "native", "overlap": 0.75, "batch_size": 1},
    ],
    ids=["overlap", "no-overlap", "padded", "2.5d", "native"],
)
def test_identity_model_returns_the_source(tmp_path: Path, overrides: dict[str, Any]) -> None:
    arr = _blob_image((11, 13, 17))
    vol = _volume(arr, _sagittal_affine())
    pkg = _identity(tmp_path, **overrides)
    raw = run_model(pkg, vol, create_engine("onnxruntime", pkg, intra_op_threads=1))
    np.testing.assert_allclose(raw.image["recon"], arr, rtol=1e-5, atol=1e-3)
    assert raw.segmentation["mask"].label_map.shape == arr.shape
    assert raw.segmentation["mask"].probabilities.shape == (2, *arr.shape)
    np.testing.assert_array_equal(raw.segmentation["mask"].mask(1), arr > 0)
    assert raw.windows >= 1 and set(raw.timings_s) >= {"preprocess", "inference", "postprocess"}


def test_identity_with_resampling_keeps_alignment(tmp_path: Path) -> None:
    arr = _blob_image((24, 26, 30), seed=2, smooth=4.0)
    vol = _volume(arr, _sagittal_affine((1.0, 1.0, 1.0)))
    pkg = _identity(tmp_path, spacing_mm=[2.0, 2.0, 2.0],
                    normalisation={"kind": "zscore", "mask": "none"})
    raw = run_model(pkg, vol, create_engine("onnxruntime", pkg), ["reconstruct"])
    assert list(raw.image) == ["recon"] and not raw.segmentation
    assert raw.transform is not None and raw.transform.model_shape == (13, 15, 12)
    out = raw.image["recon"]
    assert out.shape == arr.shape
    # denormalised back to source units, and the blob lands where it was (centre of mass)
    assert abs(float(out.mean()) - float(arr.mean())) < 0.02 * float(arr.mean())
    from scipy import ndimage

    bright_in = ndimage.center_of_mass(arr > 300)
    bright_out = ndimage.center_of_mass(out > 200)
    np.testing.assert_allclose(bright_out, bright_in, atol=0.75)
    # 2x down + up sampling acts like a ~1-voxel blur: compare with that, and make sure a
    # one-voxel shift along any axis would match worse (i.e. the grids are aligned)
    ref = ndimage.gaussian_filter(arr, 1.0)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    aligned = corr(ref, out)
    assert aligned > 0.98
    for axis in range(3):
        for shift in (-1, 1):
            assert corr(ref, np.roll(out, shift, axis=axis)) < aligned - 0.01


def test_model_grid_round_trip_exact_without_resampling() -> None:
    rng = np.random.default_rng(0)
    arr = rng.random((6, 7, 8)).astype(np.float32)
    spec = InputSpec(name="x", patch_size=(4, 4, 4))
    t = grid_transform(arr.shape, _sagittal_affine(), spec)
    np.testing.assert_array_equal(to_source_grid(to_model_grid(arr, t), t), arr)
    stacked = np.stack([to_model_grid(arr, t), 2 * to_model_grid(arr, t)])
    np.testing.assert_array_equal(to_source_grid(stacked, t)[1], 2 * arr)


@pytest.mark.parametrize("affine", ["sagittal", "axial"])
def test_separable_inverse_mapping_equals_affine_transform(affine: str) -> None:
    """The separable linear path of ``to_source_grid`` is scipy's ``affine_transform`` (float32)."""
    from scipy import ndimage

    from inference.postprocess import argmax_channels, label_map

    rng = np.random.default_rng(3)
    shape = (23, 31, 17)
    aff = _sagittal_affine() if affine == "sagittal" else np.diag([0.9, 1.1, 1.7, 1.0])
    spec = InputSpec(name="x", patch_size=(4, 4, 4), spacing_mm=(2.0, 1.5, 3.0))
    t = grid_transform(shape, aff, spec)
    assert t.resampled
    model = rng.random((3, *t.model_shape)).astype(np.float32)
    got = to_source_grid(model, t)
    inv = 1.0 / np.asarray(t.scale)
    inverse_axes = tuple(int(a) for a in np.argsort(t.axes))
    for c in range(3):
        ref = ndimage.affine_transform(
            model[c].astype(np.float64), matrix=inv, offset=0.5 * inv - 0.5,
            output_shape=t.reoriented_shape, order=1, mode="nearest", prefilter=False)
        ref = np.flip(ref, tuple(a for a, f in enumerate(t.flips) if f)) if any(t.flips) else ref
        np.testing.assert_allclose(got[c], np.transpose(ref, inverse_axes), atol=1e-6)
    assert got.shape == (3, *shape) and got.dtype == np.float32
    np.testing.assert_array_equal(argmax_channels(got), np.argmax(got, axis=0))
    ties = np.zeros((3, 4, 5, 6), np.float32)
    ties[2, 0] = 1.0
    np.testing.assert_array_equal(argmax_channels(ties), np.argmax(ties, axis=0))
    np.testing.assert_array_equal(label_map(got, "softmax", [1, 2]),
                                  np.where(np.argmax(got, axis=0) > 0, np.argmax(got, axis=0), 0))


@pytest.mark.parametrize(("affine", "spacing"), [
    ("sagittal", (2.0, 1.5, 3.0)),   # down-sampling on every axis (low-pass everywhere)
    ("axial", (2.0, 0.8, 1.1)),      # one axis up-sampled (no low-pass on it), one barely
    ("brain", (2.0, 2.0, 2.0)),      # the e2e brain's 1 mm -> 2 mm, 189 -> 94 slices
])
def test_model_grid_equals_gaussian_then_affine_transform(
        affine: str, spacing: tuple[float, float, float]) -> None:
    """``to_model_grid``'s per-axis GEMMs equal scipy's low-pass + ``affine_transform`` path."""
    from scipy import ndimage

    if affine == "brain":
        shape, aff = (47, 64, 60), np.diag([1.0, 1.0, 1.0, 1.0])
    else:
        shape = (23, 31, 17)
        aff = _sagittal_affine() if affine == "sagittal" else np.diag([0.9, 1.1, 1.7, 1.0])
    arr = _blob_image(shape, seed=5, smooth=1.0)
    spec = InputSpec(name="x", patch_size=(4, 4, 4), spacing_mm=spacing)
    t = grid_transform(shape, aff, spec)
    assert t.resampled
    r = np.transpose(arr, t.axes)
    r = np.flip(r, tuple(a for a, f in enumerate(t.flips) if f)) if any(t.flips) else r
    sigma = [max(0.0, (s - 1.0) / 2.0) for s in t.scale]
    r = np.ascontiguousarray(r, dtype=np.float64)
    if any(s > 0.1 for s in sigma):
        r = ndimage.gaussian_filter(r, sigma=sigma, mode="nearest")
    scale = np.asarray(t.scale)
    ref = ndimage.affine_transform(r, matrix=scale, offset=0.5 * scale - 0.5,
                                   output_shape=t.model_shape, order=1, mode="nearest",
                                   prefilter=False)
    got = to_model_grid(arr, t)
    assert got.shape == t.model_shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * float(np.abs(ref).max()))
    # order 0 keeps scipy's path
    assert to_model_grid(arr, t, order=0).shape == t.model_shape


def test_normalisation_kinds() -> None:
    rng = np.random.default_rng(1)
    arr = (rng.random((5, 6, 7)) * 100).astype(np.float32)
    arr[0] = 0
    z, rec = normalise(arr, NormalisationSpec(kind="zscore", mask="nonzero"))
    fg = arr != 0
    assert abs(float(z[fg].mean())) < 1e-4 and abs(float(z[fg].std()) - 1) < 1e-4
    np.testing.assert_allclose(rec.invert(z), arr, atol=1e-3)
    p, _ = normalise(arr, NormalisationSpec(kind="percentile", low=1, high=99, mask="none"))
    # clipped below only: values above the high percentile keep their contrast
    assert float(p.min()) == 0.0 and 1.0 < float(p.max()) < 1.05
    m, _ = normalise(arr, NormalisationSpec(kind="minmax", mask="none"))
    assert float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0)


def test_windows_cover_every_voxel() -> None:
    spec = InputSpec(name="x", patch_size=(8, 8, 8), overlap=0.5)
    shape = (20, 9, 8)
    wins = sliding_windows(shape, spec)
    cover = np.zeros(shape, dtype=int)
    for w in wins:
        cover[w.slices] += 1
    assert cover.min() >= 1
    assert sorted({w.starts[0] for w in wins}) == [0, 4, 8, 12]
    spec2 = InputSpec(name="x", layout="NCHW", context_slices=2, patch_size=(8, 8))
    assert len(sliding_windows((3, 8, 8), spec2)) == 3


def test_prepare_records_spacing() -> None:
    arr = np.ones((10, 20, 30), dtype=np.float32)
    spec = InputSpec(name="x", spacing_mm=(3.0, 0.5, 2.0), patch_size=(4, 4, 4),
                     orientation="native", normalisation=NormalisationSpec(kind="none"))
    aff = np.diag([1.5, 1.0, 1.0, 1.0])
    prepared = prepare(arr, aff, spec)
    assert prepared.array.shape == (5, 40, 15)
    np.testing.assert_allclose(prepared.transform.model_spacing, (3.0, 0.5, 2.0))


def test_connected_components_geometry() -> None:
    mask = np.zeros((10, 12, 14), dtype=bool)
    mask[2:5, 3:6, 4:7] = True  # 27 voxels
    mask[7, 9, 10:13] = True  # 3 voxels in a row along i
    aff = np.eye(4)
    aff[:3, :3] = np.diag([2.0, 0.5, 1.0])
    aff[:3, 3] = [10.0, -5.0, 3.0]
    prob = np.where(mask, 0.8, 0.0).astype(np.float32)
    comps = connected_components(mask, aff, label_value=2, probability=prob, connectivity=6)
    assert [c.voxels for c in comps] == [27, 3]
    big, line = comps
    assert big.centroid_index == (3.0, 4.0, 5.0)
    assert big.centroid_lps_mm == pytest.approx((16.0, -3.0, 8.0))
    assert big.bbox_index == (2, 3, 4, 5, 6, 7)
    assert big.volume_ml == pytest.approx(27 * 2.0 * 0.5 * 1.0 / 1000)
    # in-plane extent centre to centre: sqrt((2*0.5)^2 + (2*1.0)^2), plus one pixel (1 mm)
    assert big.diameter_mm == pytest.approx(np.hypot(1.0, 2.0) + 1.0)
    assert line.diameter_mm == pytest.approx(2.0 + 1.0)
    assert big.probability == pytest.approx(0.8) and big.label_value == 2
    kept = connected_components(mask, aff, min_volume_mm3=5.0)
    assert [c.voxels for c in kept] == [27]
    kept = connected_components(mask, aff, min_diameter_mm=3.1)
    assert [c.voxels for c in kept] == [27]
    # 26-connectivity joins diagonal neighbours that 6-connectivity keeps apart
    diag = np.zeros((3, 3, 3), dtype=bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert len(connected_components(diag, np.eye(4), connectivity=6)) == 2
    assert len(connected_components(diag, np.eye(4), connectivity=26)) == 1


def test_bounding_box_and_components_of_a_cropped_label() -> None:
    """Components are labelled inside the mask's bounding box only; results are unchanged."""
    from inference.postprocess import bounding_box

    mask = np.zeros((9, 10, 11), dtype=bool)
    assert bounding_box(mask) is None
    assert connected_components(mask, np.eye(4)) == []
    mask[6:8, 1:3, 9] = True
    mask[2, 5, 2:4] = True
    assert bounding_box(mask) == (slice(2, 8), slice(1, 6), slice(2, 10))
    prob = np.zeros(mask.shape, dtype=np.float32)
    prob[6:8, 1:3, 9] = 0.25
    prob[2, 5, 2:4] = 0.75
    comps = connected_components(mask, np.eye(4), probability=prob, connectivity=6)
    assert [(c.bbox_index, c.probability, c.voxels) for c in comps] == [
        ((6, 1, 9, 8, 3, 10), 0.25, 4), ((2, 5, 2, 3, 6, 4), 0.75, 2)]
    assert comps[1].centroid_index == (2.0, 5.0, 2.5)


def test_tiny_model_end_to_end(tiny_package: ModelPackage) -> None:
    arr = _blob_image((14, 18, 20), seed=4)
    vol = _volume(arr, _sagittal_affine((2.0, 2.0, 2.0)))
    engine = create_engine("onnxruntime", tiny_package)
    raw = run_model(tiny_package, vol, engine)
    seg = raw.segmentation["tissues"]
    assert seg.probabilities.shape == (3, *arr.shape)
    np.testing.assert_allclose(seg.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert set(np.unique(seg.label_map)) <= {0, 1, 2}
    assert set(seg.components) == {1, 2}
    for value, comps in seg.components.items():
        assert sum(c.voxels for c in comps) == int((seg.label_map == value).sum())
    probs = raw.classification["diagnosis"].probabilities
    assert set(probs) == {"normal", "abnormal"} and sum(probs.values()) == pytest.approx(1.0)
    assert raw.text == {"report": "no acute abnormality"}
    assert raw.engine == "onnxruntime" and "decode" in raw.timings_s
    # the same run through TorchScript agrees
    raw_t = run_model(tiny_package, vol, create_engine("torch", tiny_package),
                      ["segment brain tissues"])
    assert list(raw_t.segmentation) == ["tissues"] and not raw_t.classification
    np.testing.assert_allclose(raw_t.segmentation["tissues"].probabilities, seg.probabilities,
                               atol=1e-4)


def test_engine_without_declared_output(tmp_path: Path, tiny_package: ModelPackage) -> None:
    pkg = _identity(tmp_path)
    vol = _volume(_blob_image((8, 8, 8)), np.eye(4))
    with pytest.raises(ValueError, match=r"graph lacks outputs \['recon', 'mask'\]"):
        run_model(pkg, vol, create_engine("onnxruntime", tiny_package))


def test_dicom_series_to_aligned_detection(tmp_path: Path) -> None:
    """Oblique DICOM series → Volume → resampled identity model → component at the right LPS."""
    from inference.volume import build_volume
    from omnimri_samples import make_mr_series, write_series
    from tests.test_volume import oblique_affine

    arr = -np.ones((16, 20, 22), dtype=np.float32)
    arr[5:11, 6:12, 8:14] = 1.0  # a 6x6x6 voxel cube
    aff = oblique_affine(spacing=(1.0, 1.0, 1.0), angles=(10.0, 20.0, -30.0))
    paths = write_series(make_mr_series(arr, aff), tmp_path / "dcm")
    headers: list[Any] = []  # the pipeline's exporters get the headers build_volume read
    vol = build_volume(list(reversed(paths)), headers=headers)
    np.testing.assert_allclose(vol.array, arr, atol=1e-3)
    assert [h.filename for h in headers] == [str(p) for p in reversed(paths)]
    assert all("PixelData" not in h for h in headers)
    assert {h.SOPInstanceUID for h in headers} == {r.sop_instance_uid for r in vol.slices}
    pkg = _identity(tmp_path, spacing_mm=[2.0, 2.0, 2.0])
    raw = run_model(pkg, vol, create_engine("onnxruntime", pkg), ["segment"])
    seg = raw.segmentation["mask"]
    assert seg.label_map.shape == vol.shape
    (comp,) = seg.components[1]
    want_lps = aff @ [7.5, 8.5, 10.5, 1.0]
    np.testing.assert_allclose(comp.centroid_lps_mm, want_lps[:3], atol=0.05)
    assert 0.15 < comp.volume_ml <= 0.216  # 6 mm cube (0.216 ml), corners rounded by 2 mm grid
