"""Conventional baselines (inference/omnimri/baselines.py): what they find, scored as the model."""

from __future__ import annotations

import numpy as np

from inference.omnimri import baselines as B


def _phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three nested tissue shells (CSF 1 / GM 2 / WM 3) in a brain mask, noise, a bright blob."""
    rng = np.random.default_rng(seed)
    g = np.indices((40, 48, 44), dtype=np.float64)
    r = np.sqrt(((g[0] - 20) / 18) ** 2 + ((g[1] - 24) / 22) ** 2 + ((g[2] - 22) / 20) ** 2)
    truth = np.zeros(r.shape, np.uint8)
    truth[r < 1.0], truth[r < 0.85], truth[r < 0.6] = 1, 2, 3
    means = np.array([0.0, 300.0, 600.0, 800.0])  # T1-like
    img = means[truth] + rng.normal(0, 30, r.shape)
    blob = ((g[0] - 20) ** 2 + (g[1] - 24) ** 2 + (g[2] - 22) ** 2) <= 9
    img[blob] = 1600.0
    return img.astype(np.float32), truth, blob


def test_gaussian_mixture_finds_the_three_tissues() -> None:
    img, truth, _ = _phantom()
    brain = truth > 0
    for named in (B.gmm_tissue(img, brain, truth), B.gmm_tissue(img, brain)):
        for k in (1, 2, 3):
            a, b = named == k, truth == k
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9, k
        assert (named[~brain] == 0).all()


def test_robust_z_threshold_finds_the_bright_blob_only() -> None:
    img, truth, blob = _phantom(1)
    z = B.robust_z(img, truth > 0)
    found = z > B.Z_THRESHOLD
    assert found[blob].all()
    assert found.sum() - blob.sum() < 0.001 * (truth > 0).sum()
    assert (z[truth == 0] == 0).all()


def test_baseline_results_are_scored_like_the_model() -> None:
    from inference.omnimri import evaluate as E

    case = E.heldout_case(1, seed=4)  # a small-vessel case
    vol = E.case_volume(case)
    res = B.baseline_results(case, vol)
    names = [s.label.label for s in res.segments]
    assert names == ["Brain", "CSF", "Grey matter", "White matter", "WM hyperintensity"]
    sc = E.score_case(case, res)
    assert sc.dice["brain"] == 1.0  # the ground-truth brain mask (flatters the baseline)
    assert sc.dice["wm"] > 0.3 and sc.probabilities is None and not sc.has_report
    assert sc.detections == len(res.detections)
