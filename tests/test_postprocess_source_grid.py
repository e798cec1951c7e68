"""Labels are made at the source resolution: probabilities are interpolated onto the source grid
before argmax/threshold, so segment edges follow the 1 mm source, not the 2 mm model grid.

An identity "model" (``tests/fixtures/tiny_model.identity_package``: its mask logits are the
input, ``[-x, x]``) runs on a 2 mm model grid over a 1 mm image of a smooth sphere; the label
map the runner returns must follow the sphere at 1 mm, clearly closer than labels made on the
model grid and mapped back (the staircase of 2 mm voxels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.engines import create_engine
from inference.postprocess import source_plane_means, to_source_grid
from inference.runner import run_model
from inference.volume import SliceRef, Volume
from tests.fixtures.tiny_model import identity_package


def _sphere(shape: tuple[int, int, int], radius_mm: float, spacing: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray]:
    c = (np.asarray(shape, np.float64) - 1) / 2
    g = np.indices(shape, dtype=np.float64)
    r = np.sqrt(sum(((g[a] - c[a]) * spacing) ** 2 for a in range(3)))
    return np.clip((radius_mm - r) / 2.0, -1.0, 1.0).astype(np.float32), r < radius_mm


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_labels_follow_the_source_grid_not_the_model_grid(tmp_path: Path) -> None:
    shape = (41, 43, 45)
    img, truth = _sphere(shape, 11.3)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    vol = Volume(array=img, affine=affine,
                 slices=[SliceRef(f"2.25.{k + 1}", "1.2.840.10008.5.1.4.1.1.4")
                         for k in range(shape[0])])
    pkg = identity_package(tmp_path / "id", spacing_mm=[2.0, 2.0, 2.0], patch_size=[16, 16, 16])
    raw = run_model(pkg, vol, create_engine("onnxruntime", pkg, intra_op_threads=1))
    seg = raw.segmentation["mask"]
    assert seg.transform is not None and seg.transform.model_shape != shape  # resampled
    fine = seg.mask(1)
    assert fine.shape == shape
    # The staircase: labels made on the model grid, then mapped back to the source grid.
    assert seg.model_probabilities is not None
    coarse_labels = (seg.model_probabilities[1] > seg.model_probabilities[0]).astype(np.float32)
    coarse = to_source_grid(coarse_labels, seg.transform, order=0) > 0.5
    d_fine, d_coarse = _dice(fine, truth), _dice(coarse, truth)
    wrong_fine, wrong_coarse = int((fine != truth).sum()), int((coarse != truth).sum())
    # measured: Dice 0.991 vs 0.943, 104 vs 696 wrong voxels
    assert d_fine > 0.98 and d_fine > d_coarse
    assert wrong_fine < 0.3 * wrong_coarse, (wrong_fine, wrong_coarse, d_fine, d_coarse)


@pytest.mark.parametrize("spacing", [(2.0, 1.5, 3.0), None])
def test_plane_means_equal_the_mean_of_the_full_source_grid_map(spacing: tuple | None) -> None:
    from inference.package import InputSpec
    from inference.preprocess import grid_transform

    rng = np.random.default_rng(5)
    aff = np.array([[0, 0, -1.2, 40], [0.9, 0, 0, -10], [0, -1.1, 0, 5], [0, 0, 0, 1.0]])
    t = grid_transform((23, 31, 17), aff, InputSpec(name="x", patch_size=(4, 4, 4),
                                                    spacing_mm=spacing))
    m = rng.random((3, *t.model_shape)).astype(np.float32)
    np.testing.assert_allclose(source_plane_means(m, t), to_source_grid(m, t).mean(axis=(2, 3)),
                               atol=1e-6)


def _blobs(shape: tuple[int, int, int]) -> np.ndarray:
    """Two bright blobs on a dark ramp: values in [-1, 1], so the identity model finds two."""
    g = np.indices(shape, dtype=np.float64)
    img = -0.6 + 0.2 * g[2] / shape[2]
    for centre, radius in (((0.3, 0.35, 0.4), 4.5), ((0.7, 0.6, 0.65), 3.5)):
        c = [f * (n - 1) for f, n in zip(centre, shape, strict=True)]
        r = np.sqrt(sum((g[a] - c[a]) ** 2 for a in range(3)))
        img = np.where(r < radius, 0.9 - 0.1 * r / radius, img)
    return img.astype(np.float32)


@pytest.mark.parametrize("affine", [
    "axial",                      # slice axis kept, no flips
    "flipped",                    # feet-first slices, rows and columns reversed
    "transposed",                 # rows/columns swapped in-plane, slices reversed
    "sagittal",                   # slice axis is not the model's: maps on first use instead
])
def test_mapping_during_inference_equals_mapping_on_first_use(
        tmp_path: Path, affine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_model(stream=...)`` maps slab by slab while the engine runs: same values, same
    labels and components (a case with two detections), bit for bit."""
    shape = (27, 30, 26)
    img = _blobs(shape)
    # affine columns: the LPS direction of array axes k, j, i (1 mm voxels)
    cols = {
        "axial": [(0, 0, 1), (0, 1, 0), (1, 0, 0)],        # k -> S, j -> P, i -> L
        "flipped": [(0, 0, -1), (0, -1, 0), (-1, 0, 0)],   # feet first, rows and columns reversed
        "transposed": [(0, 0, -1), (1, 0, 0), (0, 1, 0)],  # j -> L, i -> P
        "sagittal": [(1, 0, 0), (0, 0, -1), (0, -1, 0)],   # k -> L: slices are not axial
    }[affine]
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(cols, dtype=np.float64).T
    aff[:3, 3] = [10.0, -20.0, 30.0]
    vol = Volume(array=img, affine=aff,
                 slices=[SliceRef(f"2.25.{k + 1}", "1.2.840.10008.5.1.4.1.1.4")
                         for k in range(shape[0])])
    pkg = identity_package(tmp_path / "id", layout="NCHW", context_slices=1,
                           patch_size=[12, 12], overlap=0.5, batch_size=5,
                           spacing_mm=[2.0, 1.5, 2.5])
    eng = create_engine("onnxruntime", pkg, intra_op_threads=1)
    lazy = run_model(pkg, vol, eng, ["segment"], stream=()).segmentation["mask"]
    streamed = run_model(pkg, vol, eng, ["segment"], stream=["mask"]).segmentation["mask"]
    assert lazy.transform is not None
    can_stream = lazy.transform.axes[0] == 0
    assert can_stream == (affine != "sagittal")
    assert lazy._probabilities is None  # mapped on first use
    assert (streamed._probabilities is not None) == can_stream  # mapped during inference
    assert streamed.model_probabilities is not None and lazy.model_probabilities is not None
    np.testing.assert_array_equal(streamed.model_probabilities, lazy.model_probabilities)
    np.testing.assert_array_equal(streamed.probabilities, lazy.probabilities)
    np.testing.assert_array_equal(streamed.label_map, lazy.label_map)
    assert len(lazy.components[1]) == 2
    assert streamed.components == lazy.components
    # stream=None: nothing unless opted in; then the outputs a caller read in full after an
    # earlier run of this package
    from inference.runner import STREAM_ENV

    monkeypatch.delenv(STREAM_ENV, raising=False)
    assert run_model(pkg, vol, eng, ["segment"]).segmentation["mask"]._probabilities is None
    monkeypatch.setenv(STREAM_ENV, "1")
    again = run_model(pkg, vol, eng, ["segment"]).segmentation["mask"]
    assert (again._probabilities is not None) == can_stream
    np.testing.assert_array_equal(again.probabilities, lazy.probabilities)
