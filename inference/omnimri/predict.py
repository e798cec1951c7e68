"""Case-level diagnosis from per-slice probabilities.

Model inference itself has one implementation, the node's: :func:`inference.runner.run_model`
(evaluation and calibration run it too, see :mod:`inference.omnimri.evaluate`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def volume_diagnosis(slice_probs: npt.NDArray[np.float32], top_k: int = 3
                     ) -> npt.NDArray[np.float64]:
    """Case-level probabilities (normal, small vessel, mass) from per-slice probabilities.

    A finding needs only a few slices: each abnormal class scores the mean of its ``top_k``
    highest slice probabilities; mass outranks small-vessel disease.
    """
    if slice_probs.shape[0] == 0:
        return np.array([1.0, 0.0, 0.0])
    k = min(top_k, slice_probs.shape[0])
    s1 = float(np.sort(slice_probs[:, 1])[-k:].mean())
    s2 = float(np.sort(slice_probs[:, 2])[-k:].mean())
    return np.array([(1 - s1) * (1 - s2), s1 * (1 - s2), s2])
