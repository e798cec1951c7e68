"""Conventional baselines the model must beat (issue #11), scored exactly like the model.

* **Tissue**: a 3-class Gaussian mixture (scikit-learn ``GaussianMixture``) of the intensities
  inside the *ground-truth* brain mask; each component is named CSF, GM or WM by the one-to-one
  assignment that best overlaps the ground truth (Hungarian). Both choices flatter the
  baseline: it gets a perfect brain extraction and an oracle labelling of its clusters.
* **Lesions**: a robust z-score inside the same brain mask, ``(x - median) / (1.4826 MAD)``,
  thresholded at z > 3 (hyperintense), components smaller than the model's smallest lesion
  (``TaskSettings.min_lesion_mm3``) dropped; every component is one WMH detection.

:func:`baseline_results` returns a :class:`inference.results.Results` with the model's segment
names, so :func:`inference.omnimri.evaluate.score_case` scores it unchanged
(``omnimri-node eval --baselines`` prints both side by side).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from inference import results as R
from inference.omnimri import synthetic as syn
from inference.omnimri.tasks import LESION_SEGMENTS, TISSUE_SEGMENTS, TaskSettings
from inference.postprocess import connected_components
from inference.volume import Volume

Z_THRESHOLD = 3.0
"""Robust z-score above which a brain voxel is a lesion."""
GMM_SAMPLES = 200_000
"""Most brain voxels the Gaussian mixture is fitted on (a fixed random subset; all are
labelled)."""


def gmm_tissue(image: npt.NDArray[np.floating], brain: npt.NDArray[np.bool_],
               truth: npt.NDArray[np.uint8] | None = None, seed: int = 0
               ) -> npt.NDArray[np.uint8]:
    """CSF/GM/WM labels (1/2/3, 0 outside ``brain``) from a 3-class Gaussian mixture.

    Args:
        image: ``[K, J, I]`` intensities (any units).
        brain: Brain mask; only its voxels are fitted and labelled.
        truth: Ground-truth labels (1 CSF, 2 GM, 3 WM) to name the components by best overlap;
            without it, components are named by ascending mean (CSF < GM < WM, T1-like).
        seed: Seed of the subsample and the mixture's initialisation.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.mixture import GaussianMixture

    out = np.zeros(brain.shape, np.uint8)
    x = np.asarray(image, np.float64)[brain].reshape(-1, 1)
    if len(x) < 3:
        return out
    rng = np.random.default_rng(seed)
    fit = x if len(x) <= GMM_SAMPLES else x[rng.choice(len(x), GMM_SAMPLES, replace=False)]
    gmm = GaussianMixture(3, random_state=seed).fit(fit)
    comp = gmm.predict(x)
    if truth is not None:
        t = np.asarray(truth)[brain]
        overlap = np.array([[np.sum((comp == c) & (t == k)) for k in (1, 2, 3)]
                            for c in range(3)])
        rows, cols = linear_sum_assignment(-overlap)
        name = {int(r): int(c) + 1 for r, c in zip(rows, cols, strict=True)}
    else:
        order = np.argsort(gmm.means_.ravel())
        name = {int(c): n + 1 for n, c in enumerate(order)}
    out[brain] = np.vectorize(name.__getitem__, otypes=[np.uint8])(comp)
    return out


def robust_z(image: npt.NDArray[np.floating], brain: npt.NDArray[np.bool_]
             ) -> npt.NDArray[np.float32]:
    """``(x - median) / (1.4826 MAD)`` over the brain voxels (0 outside the brain)."""
    x = np.asarray(image, np.float32)
    v = x[brain]
    out = np.zeros(x.shape, np.float32)
    if v.size == 0:
        return out
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * 1.4826
    out[brain] = (v - med) / max(mad, 1e-6)
    return out


def baseline_results(case: syn.Case, volume: Volume, settings: TaskSettings | None = None,
                     z_threshold: float = Z_THRESHOLD) -> R.Results:
    """Gaussian-mixture tissues and z-threshold lesions of one case as ``Results``.

    Args:
        case: The synthetic case (its ground-truth brain mask and tissue labels are used).
        volume: Its volume (the image the model sees, on the case grid).
        settings: The model's post-processing settings (smallest lesion, mm³).
        z_threshold: Robust z above which a brain voxel is a lesion.
    """
    from inference.omnimri.evaluate import truth_masks

    settings = settings or TaskSettings()
    gt = truth_masks(case)
    brain = gt["brain"]
    truth = np.zeros(brain.shape, np.uint8)
    truth[gt["csf"]], truth[gt["gm"]], truth[gt["wm"]] = 1, 2, 3
    labels = gmm_tissue(volume.array, brain, truth)
    res = R.Results(model=R.ModelInfo("baseline: GMM + robust z", "0"))
    masks = [brain, labels == 1, labels == 2, labels == 3]
    for n, ((name, cat, typ, rgb), m) in enumerate(zip(TISSUE_SEGMENTS, masks, strict=True)):
        res.segments.append(R.SegmentMask(R.SegmentLabel(n + 1, name, cat, typ, rgb), m))
    lesion = robust_z(volume.array, brain) > z_threshold
    name, cat, typ, rgb = LESION_SEGMENTS[0]
    number = len(TISSUE_SEGMENTS) + 1
    res.segments.append(R.SegmentMask(R.SegmentLabel(number, name, cat, typ, rgb,
                                                     "pathological"), lesion))
    for n, c in enumerate(connected_components(lesion, volume.affine,
                                               min_volume_mm3=settings.min_lesion_mm3), start=1):
        res.detections.append(R.Detection(
            finding=R.WM_HYPERINTENSITY, segment_number=number, centroid_index=c.centroid_index,
            centroid_lps_mm=c.centroid_lps_mm, bbox_index=c.bbox_index,
            diameter_mm=c.diameter_mm, volume_ml=c.volume_ml, probability=1.0,
            tracking_id=f"z-{n}"))
    return res
