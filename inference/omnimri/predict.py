"""Slice-by-slice OmniMRI inference on the model grid (PyTorch or ONNX), used by evaluation.

The node's engines run the same loop over ``model.onnx`` (2.5D stacks of ``2*c+1`` slices,
square in-plane patches, softmax over the class channels, tiles averaged). This module is the
reference implementation on the 2 mm model grid, so that evaluation of the PyTorch checkpoint
and of the exported ONNX model share one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

Batch = npt.NDArray[np.float32]
RunFn = Callable[[Batch], dict[str, npt.NDArray[np.float32]]]
"""Maps slice stacks ``[N, C, P, P]`` to raw head outputs (``tissue``, ``lesion``, ...)."""


@dataclass
class GridOutputs:
    """Head outputs on the model grid ``[k, j, i]``."""

    tissue: npt.NDArray[np.float32]
    """``[4, k, j, i]`` probabilities (background, CSF, GM, WM)."""
    lesion: npt.NDArray[np.float32]
    """``[4, k, j, i]`` probabilities (none, WMH, mass, oedema)."""
    recon: npt.NDArray[np.float32] | None
    """Reconstructed image ``[k, j, i]`` (normalised units), if asked for."""
    slice_diagnosis: npt.NDArray[np.float32]
    """``[k, 3]`` per-slice diagnosis probabilities."""


def tile_starts(n: int, patch: int, overlap: float = 0.25) -> list[int]:
    """Start offsets covering ``n`` pixels with ``patch``-wide tiles (negative = padding)."""
    if n <= patch:
        return [-((patch - n) // 2)]
    step = max(1, int(patch * (1 - overlap)))
    starts = list(range(0, n - patch + 1, step))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


def _softmax(x: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    out: npt.NDArray[np.float32] = (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    return out


def predict_grid(
    run: RunFn, image: npt.NDArray[np.float32], *, context: int = 1, patch: int = 128,
    batch: int = 16, recon_input: npt.NDArray[np.float32] | None = None,
) -> GridOutputs:
    """Run the model over every slice (and tile) of a normalised volume.

    Args:
        run: The network (see :data:`RunFn`).
        image: Normalised volume ``[k, j, i]`` on the 2 mm model grid.
        context: Neighbour slices per side.
        patch: In-plane patch size, pixels.
        batch: Stacks per call.
        recon_input: Optional zero-filled volume to reconstruct (same shape).
    """
    nk, nj, ni = image.shape
    tissue = np.zeros((4, nk, nj, ni), np.float32)
    lesion = np.zeros((4, nk, nj, ni), np.float32)
    recon = np.zeros((nk, nj, ni), np.float32) if recon_input is not None else None
    weight = np.zeros((nj, ni), np.float32)
    diag = np.zeros((nk, 3), np.float32)
    tiles = [(a, b) for a in tile_starts(nj, patch) for b in tile_starts(ni, patch)]
    for a, b in tiles:
        weight[max(a, 0) : a + patch, max(b, 0) : b + patch] += 1.0
    jobs = [(k, a, b) for k in range(nk) for a, b in tiles]

    def stack(vol: npt.NDArray[np.float32], k: int, a: int, b: int) -> Batch:
        idx = np.clip(np.arange(k - context, k + context + 1), 0, nk - 1)
        out = np.zeros((len(idx), patch, patch), np.float32)
        ja, ia = max(a, 0), max(b, 0)
        jb, ib = min(a + patch, nj), min(b + patch, ni)
        out[:, ja - a : jb - a, ia - b : ib - b] = vol[idx, ja:jb, ia:ib]
        return out

    for s in range(0, len(jobs), batch):
        chunk = jobs[s : s + batch]
        x = np.stack([stack(image, k, a, b) for k, a, b in chunk])
        out = run(x)
        pt = _softmax(out["tissue"], 1)
        pl = _softmax(out["lesion"], 1)
        pd = _softmax(out["diagnosis"], 1)
        rec = None
        if recon_input is not None and recon is not None:
            rec = run(np.stack([stack(recon_input, k, a, b) for k, a, b in chunk]))["recon"]
        for n, (k, a, b) in enumerate(chunk):
            ja, ia = max(a, 0), max(b, 0)
            jb, ib = min(a + patch, nj), min(b + patch, ni)
            sl = (slice(ja - a, jb - a), slice(ia - b, ib - b))
            tissue[:, k, ja:jb, ia:ib] += pt[n][:, sl[0], sl[1]]
            lesion[:, k, ja:jb, ia:ib] += pl[n][:, sl[0], sl[1]]
            if rec is not None and recon is not None:
                recon[k, ja:jb, ia:ib] += rec[n, 0][sl[0], sl[1]]
            diag[k] += pd[n] / len(tiles)
    tissue /= weight
    lesion /= weight
    if recon is not None:
        recon /= weight
    return GridOutputs(tissue=tissue, lesion=lesion, recon=recon, slice_diagnosis=diag)


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


def torch_runner(checkpoint: Path) -> tuple[RunFn, object]:
    """A :data:`RunFn` over a training checkpoint; also returns the loaded modules."""
    import torch

    from inference.omnimri.train import load_stage

    mods, _ = load_stage(checkpoint.parent, checkpoint.stem)
    mods.vision.eval()

    def run(x: Batch) -> dict[str, npt.NDArray[np.float32]]:
        with torch.no_grad():
            out = mods.vision(torch.from_numpy(x))
        return {k: v.numpy() for k, v in out.items() if k != "embedding"}

    return run, mods


def onnx_runner(model_onnx: Path, threads: int = 2) -> RunFn:
    """A :data:`RunFn` over an exported ``model.onnx`` (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_onnx), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def run(x: Batch) -> dict[str, npt.NDArray[np.float32]]:
        res = sess.run(None, {sess.get_inputs()[0].name: x})
        return dict(zip(names, res, strict=True))

    return run
