"""Post-processing driven by a package's output spec: back onto the source grid, labels, components.

* :func:`to_source_grid` inverts :func:`inference.preprocess.to_model_grid` (resampling with the
  inverse cell-centred mapping, then the exact inverse permutation/flips).
* :func:`source_plane_means`: the per-slice in-plane mean of :func:`to_source_grid`'s output,
  computed without building it (three small contractions instead of a full-size map).
* :func:`activate`, :func:`label_map`: softmax/sigmoid, argmax/threshold. Labels are always
  made from probabilities *on the source grid* (interpolated first, then argmax/threshold), so
  segment edges follow the source voxels, not the model grid's.
* :func:`connected_components`: components of a mask with their centroid (index and LPS mm),
  bounding box, diameter (mm) and volume (ml).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from inference.preprocess import GridTransform

Array = npt.NDArray[np.float32]


def _axis_lerp(
    n_in: int, n_out: int, inv_scale: float, flip: bool
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Linear-interpolation taps along one axis for the cell-centred mapping.

    Output index ``o`` samples input coordinate ``x = (o + 0.5) * inv_scale - 0.5``, clamped
    to ``[0, n_in - 1]`` (``mode="nearest"`` of :func:`scipy.ndimage.affine_transform`).
    Returns ``(i0, i1, w)`` with ``value = a[i0] + w * (a[i1] - a[i0])``; ``flip`` reverses the
    output order (the inverse of a reorientation flip).
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * inv_scale - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    i0 = np.minimum(np.floor(x).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (x - i0).astype(np.float32)
    if flip:
        return i0[::-1].copy(), i1[::-1].copy(), w[::-1].copy()
    return i0, i1, w


def _lerp_axis(
    a: Array, axis: int,
    taps: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]],
    out: Array | None = None,
) -> Array:
    """Resample ``a`` along ``axis`` with :func:`_axis_lerp` taps (float32), into ``out``."""
    i0, i1, w = taps
    lo = np.take(a, i0, axis=axis, out=out)
    hi = np.take(a, i1, axis=axis)
    shape = [1] * a.ndim
    shape[axis] = len(w)
    hi -= lo
    hi *= w.reshape(shape)
    lo += hi
    return lo


def _separable_linear(arr: Array, t: GridTransform, out: Array) -> None:
    """Write the linear resampling of one ``[D, H, W]`` model-grid channel into ``out``.

    The model grid and the reoriented source grid differ only by per-axis scaling, so linear
    interpolation factorises into three 1-D passes. The small model-grid channel is first put
    back into source axis order (inverse permutation), the flips are folded into the taps, and
    the last pass writes straight into ``out``. Equals ``affine_transform(order=1,
    mode="nearest")`` up to float32 rounding (measured ≤ 2e-7 absolute on probabilities).
    """
    inv = 1.0 / np.asarray(t.scale, dtype=np.float64)
    inverse_axes = [int(x) for x in np.argsort(t.axes)]
    a = np.ascontiguousarray(np.transpose(arr, inverse_axes))
    # Last axis first, while the array is smallest (a gather along contiguous rows); the
    # largest pass, along the slowest axis, then copies whole planes straight into ``out``.
    for s in (2, 1):
        r = inverse_axes[s]
        taps = _axis_lerp(t.model_shape[r], t.reoriented_shape[r], float(inv[r]), t.flips[r])
        a = _lerp_axis(a, s, taps)
    r = inverse_axes[0]
    i0, i1, w = _axis_lerp(t.model_shape[r], t.reoriented_shape[r], float(inv[r]), t.flips[r])
    tmp = np.empty(a.shape[1:], dtype=np.float32)
    for k in range(len(w)):  # plane by plane: stays in cache
        np.subtract(a[i1[k]], a[i0[k]], out=tmp)
        tmp *= w[k]
        np.add(a[i0[k]], tmp, out=out[k])


MAX_RESAMPLE_THREADS = 4
"""Most threads :func:`to_source_grid` maps channels on (memory-bound: more do not help)."""


def _cpu_threads() -> int:
    """CPUs this process may run on, at most :data:`MAX_RESAMPLE_THREADS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_RESAMPLE_THREADS))


def to_source_grid(
    array: npt.NDArray[np.floating], t: GridTransform, order: int = 1
) -> Array:
    """Map a model-grid array ``[..., D, H, W]`` back onto the source grid ``[..., K, J, I]``.

    ``order`` is the spline order (1 = linear, 0 = nearest for label maps). The model grid is
    the source grid reoriented (permutation + flips) and scaled per axis (see
    :class:`inference.preprocess.GridTransform`), so linear mapping is done separably, one 1-D
    pass per axis in float32, straight into one preallocated output (leading axes, e.g.
    channels, on up to :data:`MAX_RESAMPLE_THREADS` threads: the engine is idle by then, and
    each channel's passes release the GIL); other orders use
    :func:`scipy.ndimage.affine_transform`.
    """
    arr = np.asarray(array, dtype=np.float32)
    if tuple(arr.shape[-3:]) != t.model_shape or arr.ndim < 3:
        raise ValueError(f"array shape {arr.shape} is not the model grid {t.model_shape}")
    lead = arr.shape[:-3]
    flat = arr.reshape((-1, *t.model_shape))
    out = np.empty((flat.shape[0], *t.source_shape), dtype=np.float32)
    inverse_axes = tuple(int(a) for a in np.argsort(t.axes))
    if t.resampled and order == 1:
        n = flat.shape[0]
        workers = min(n, _cpu_threads())
        if workers > 1:  # channels are independent; NumPy releases the GIL in each pass
            with ThreadPoolExecutor(workers, thread_name_prefix="to-source-grid") as pool:
                list(pool.map(lambda c: _separable_linear(flat[c], t, out[c]), range(n)))
        else:
            for c in range(n):
                _separable_linear(flat[c], t, out[c])
        return out.reshape((*lead, *t.source_shape))
    for c in range(flat.shape[0]):
        ch = flat[c]
        if t.resampled:
            inv = 1.0 / np.asarray(t.scale)
            ch = np.asarray(
                ndimage.affine_transform(
                    ch, matrix=inv, offset=0.5 * inv - 0.5, output_shape=t.reoriented_shape,
                    order=order, mode="nearest", prefilter=order > 1,
                ),
                dtype=np.float32,
            )
        for a, f in enumerate(t.flips):
            if f:
                ch = np.flip(ch, axis=a)
        np.copyto(out[c], np.transpose(ch, inverse_axes))
    return out.reshape((*lead, *t.source_shape))


class SourceGridStream:
    """:func:`to_source_grid` of one ``[C, D, H, W]`` output, slab by slab, on a background thread.

    For outputs whose model slices become final one after another while the engine still runs
    (2.5-D ``NCHW`` windows go slice by slice): :meth:`add` hands over a slab of finished model
    slices (activated probabilities); a single worker thread maps it in-plane and then writes
    every source slice whose two interpolation taps are both finished (only the model slices a
    source slice still needs stay in memory, in-plane mapped). :meth:`result` waits for
    the worker and returns ``[C, K, J, I]``, equal (bit for bit) to ``to_source_grid(probs, t)``:
    the same taps and float32 operations, applied to slabs instead of whole channels (each is
    per model slice in-plane, per source slice along the slice axis).

    Only for :meth:`supported` transforms: resampled, with the source's slice axis being the
    model's (``t.axes[0] == 0``; any flips, in-plane transposition). Others map at the end.

    Args:
        t: The grid transform.
        channels: ``C``.
    """

    def __init__(self, t: GridTransform, channels: int) -> None:
        if not self.supported(t):
            raise ValueError("transform cannot be mapped slab by slab (see supported())")
        self._t = t
        inv = 1.0 / np.asarray(t.scale, dtype=np.float64)
        self._inverse_axes = [int(x) for x in np.argsort(t.axes)]  # [0, ...]
        self._taps = {
            s: _axis_lerp(t.model_shape[r], t.reoriented_shape[r], float(inv[r]), t.flips[r])
            for s, r in ((2, self._inverse_axes[2]), (1, self._inverse_axes[1]))
        }
        self._i0, self._i1, self._w = _axis_lerp(t.model_shape[0], t.reoriented_shape[0],
                                                 float(inv[0]), t.flips[0])
        self._need = np.maximum(self._i0, self._i1)  # source slice k waits for this model slice
        self._written = np.zeros(len(self._w), dtype=np.bool_)
        self.model_probabilities: Array = np.empty((channels, *t.model_shape), np.float32)
        """The activated model-grid slabs handed to :meth:`add`, assembled."""
        self._planes: dict[int, Array] = {}
        """Model slice → its ``[C, J, I]`` in-plane mapping, kept while a source slice needs it."""
        self._out = np.empty((channels, *t.source_shape), np.float32)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="source-grid-stream")
        self._jobs: list[Future[None]] = []
        self._done = 0  # model slices [0, _done) handed over

    @staticmethod
    def supported(t: GridTransform) -> bool:
        """Whether ``t`` can be mapped slab by slab (resampled, slice axis kept)."""
        return t.resampled and t.axes[0] == 0

    def add(self, probabilities: Array, start: int) -> None:
        """Hand over model slices ``[start, start + len)`` (``[C, d, H, W]``, final values).

        Slabs must come in order, without gaps.
        """
        if start != self._done:
            raise ValueError(f"slab starts at model slice {start}; expected {self._done}")
        stop = start + probabilities.shape[1]
        self._done = stop
        self._jobs.append(self._pool.submit(self._map, probabilities, start, stop))

    def _map(self, probs: Array, start: int, stop: int) -> None:
        self.model_probabilities[:, start:stop] = probs
        n = probs.shape[0]
        slab = np.empty((n, stop - start, *self._out.shape[2:]), dtype=np.float32)
        for c in range(n):
            a = np.transpose(probs[c], self._inverse_axes)
            for s in (2, 1):
                a = _lerp_axis(a, s, self._taps[s])
            slab[c] = a
        for m in range(start, stop):
            self._planes[m] = slab[:, m - start]
        ready = np.flatnonzero(~self._written & (self._need < stop))
        tmp = np.empty(self._out.shape[2:], dtype=np.float32)
        for k in ready:  # the same plane-by-plane lerp as _separable_linear
            lo, hi = self._planes[int(self._i0[k])], self._planes[int(self._i1[k])]
            for c in range(n):
                np.subtract(hi[c], lo[c], out=tmp)
                tmp *= self._w[k]
                np.add(lo[c], tmp, out=self._out[c, k])
        self._written[ready] = True
        pending = ~self._written  # drop the planes no source slice still needs
        needed = set(self._i0[pending].tolist()) | set(self._i1[pending].tolist())
        for m in [m for m in self._planes if m not in needed]:
            del self._planes[m]

    def result(self) -> Array:
        """Wait for the worker; ``[C, K, J, I]`` float32 on the source grid.

        Raises:
            ValueError: Not every model slice was handed over.
        """
        try:
            for job in self._jobs:
                job.result()
        finally:
            self._pool.shutdown(wait=True)
        if self._done != self._t.model_shape[0] or not self._written.all():
            raise ValueError(f"{self._done} of {self._t.model_shape[0]} model slices mapped")
        return self._out

    def close(self) -> None:
        """Stop the worker without a result (the run failed)."""
        for job in self._jobs:
            job.cancel()
        self._pool.shutdown(wait=True)


def _tap_weights(n_in: int, n_out: int, inv_scale: float, flip: bool) -> npt.NDArray[np.float64]:
    """Mean over the output positions of :func:`_axis_lerp`'s interpolation, per input index."""
    i0, i1, w = _axis_lerp(n_in, n_out, inv_scale, flip)
    v = np.zeros(n_in, dtype=np.float64)
    np.add.at(v, i0, 1.0 - w.astype(np.float64))
    np.add.at(v, i1, w.astype(np.float64))
    out: npt.NDArray[np.float64] = v / max(n_out, 1)
    return out


def source_plane_means(array: npt.NDArray[np.floating], t: GridTransform) -> Array:
    """``to_source_grid(array, t).mean(axis=(-2, -1))`` without the full source-grid array.

    Linear mapping is separable, so the in-plane mean of the mapped array is the model-grid
    array contracted with the in-plane axes' mean interpolation weights, then mapped along the
    slice axis only. For ``[..., D, H, W]`` returns ``[..., K]`` (float32; equal to the full
    computation up to float32 rounding of the latter).
    """
    arr = np.asarray(array, dtype=np.float32)
    if tuple(arr.shape[-3:]) != t.model_shape or arr.ndim < 3:
        raise ValueError(f"array shape {arr.shape} is not the model grid {t.model_shape}")
    lead = arr.shape[:-3]
    flat = arr.reshape((-1, *t.model_shape))
    inverse_axes = [int(x) for x in np.argsort(t.axes)]
    inv = 1.0 / np.asarray(t.scale, dtype=np.float64)
    a = np.transpose(flat, [0, *(1 + r for r in inverse_axes)]).astype(np.float64)
    for s in (2, 1):  # contract source axes i, then j
        r = inverse_axes[s]
        v = _tap_weights(t.model_shape[r], t.reoriented_shape[r], float(inv[r]), t.flips[r])
        a = np.tensordot(a, v, axes=([1 + s], [0]))
    r = inverse_axes[0]
    i0, i1, w = _axis_lerp(t.model_shape[r], t.reoriented_shape[r], float(inv[r]), t.flips[r])
    out = a[:, i0] + w.astype(np.float64) * (a[:, i1] - a[:, i0])
    return out.astype(np.float32).reshape((*lead, t.source_shape[0]))


def activate(logits: Array, activation: str, axis: int = 0) -> Array:
    """``softmax`` over ``axis``, ``sigmoid`` elementwise, or ``none``; float32."""
    x = np.asarray(logits, dtype=np.float32)
    if activation == "softmax":
        e = x - x.max(axis=axis, keepdims=True)  # one new array, the rest in place
        np.exp(e, out=e)
        e /= e.sum(axis=axis, keepdims=True)
        return e
    if activation == "sigmoid":
        e = np.negative(x)
        np.exp(e, out=e)
        e += np.float32(1.0)
        np.reciprocal(e, out=e)
        return e
    return x


def argmax_channels(probabilities: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """``np.argmax(probabilities, axis=0)`` for ``[C, ...]`` with ``C <= 255``, as uint8.

    A running maximum over the channels (contiguous per-channel passes) instead of NumPy's
    strided reduction over the leading axis; ties go to the lower channel, as in ``np.argmax``.
    """
    p = np.asarray(probabilities)
    if p.shape[0] > 255:
        return np.argmax(p, axis=0).astype(np.uint8)
    best = p[0].copy()
    idx = np.zeros(p.shape[1:], dtype=np.uint8)
    win = np.empty(p.shape[1:], dtype=np.bool_)
    for c in range(1, p.shape[0]):
        np.greater(p[c], best, out=win)
        np.copyto(idx, np.uint8(c), where=win)  # ~2x a boolean-index assignment
        np.maximum(best, p[c], out=best)
    return idx


def label_map(
    probabilities: Array, activation: str, values: list[int], threshold: float = 0.5
) -> npt.NDArray[np.uint16]:
    """Per-voxel label value from channel probabilities ``[C, K, J, I]``.

    ``softmax``: the argmax channel (voxels whose argmax is an unlisted channel, e.g.
    background 0, get 0). ``sigmoid``: among the listed channels whose probability is at least
    ``threshold``, the most probable; 0 where none is.
    """
    out = np.zeros(probabilities.shape[1:], dtype=np.uint16)
    if activation == "softmax":
        am = argmax_channels(probabilities)
        lut = np.zeros(probabilities.shape[0], dtype=np.uint16)
        lut[[v for v in values if 0 <= v < len(lut)]] = [v for v in values if 0 <= v < len(lut)]
        np.take(lut, am, out=out)
        return out
    best = np.zeros(probabilities.shape[1:], dtype=np.float32)
    for v in values:
        p = probabilities[v]
        win = (p >= threshold) & (p > best)
        out[win] = v
        best[win] = p[win]
    return out


def bounding_box(mask: npt.NDArray[np.bool_]) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis, index units) holding every ``True`` of ``mask``.

    ``None`` when the mask is empty. Found from per-axis projections (``any``), so it costs a
    few passes over the mask, far less than labelling or ``argwhere`` on the whole grid.
    """
    m = np.asarray(mask, dtype=np.bool_)
    out: list[slice] = []
    for axis in range(m.ndim):
        others = tuple(a for a in range(m.ndim) if a != axis)
        hit = np.flatnonzero(m.any(axis=others))
        if hit.size == 0:
            return None
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
        if axis == 0:  # the other projections only need the occupied slab
            m = m[out[0]]
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Component:
    """One connected component of a mask on the source grid."""

    label_value: int
    """The label value (channel) it belongs to."""
    centroid_index: tuple[float, float, float]
    """Centroid as fractional indices ``(k, j, i)``."""
    centroid_lps_mm: tuple[float, float, float]
    """Centroid in patient LPS, millimetres."""
    bbox_index: tuple[int, int, int, int, int, int]
    """``(k0, j0, i0, k1, j1, i1)``, half-open, indices."""
    diameter_mm: float
    """Largest in-plane extent (over slices), centre-to-centre plus one pixel, mm."""
    volume_ml: float
    """Volume in millilitres."""
    voxels: int
    """Number of voxels."""
    probability: float
    """Mean probability over the component (1.0 when no probability map was given)."""


def _max_inplane_extent(points_mm: npt.NDArray[np.float64]) -> float:
    """Largest distance between 2-D points (convex hull + pairwise), mm."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    if len(points_mm) < 2:
        return 0.0
    pts = points_mm
    if len(pts) > 3:
        with contextlib.suppress(QhullError, ValueError):  # collinear points: keep all
            pts = pts[ConvexHull(pts).vertices]
    if len(pts) > 2000:  # degenerate hull failed on a huge line: use its end points
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        return float(np.linalg.norm(hi - lo))
    return float(pdist(pts).max())


def connected_components(
    mask: npt.NDArray[np.bool_],
    affine: npt.NDArray[np.float64],
    *,
    label_value: int = 1,
    probability: npt.NDArray[np.floating] | None = None,
    connectivity: int = 26,
    min_volume_mm3: float = 0.0,
    min_diameter_mm: float = 0.0,
) -> list[Component]:
    """Connected components of a ``[K, J, I]`` mask, largest first.

    Args:
        mask: Boolean mask on the source grid.
        affine: The grid's 4x4 LPS affine (mm).
        label_value: Recorded in each component.
        probability: Optional probability map (same shape) for the mean probability.
        connectivity: 6, 18 or 26 neighbours.
        min_volume_mm3: Smaller components are dropped.
        min_diameter_mm: Components with a smaller in-plane extent are dropped.
    """
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    structure = ndimage.generate_binary_structure(3, rank)
    box = bounding_box(mask)
    if box is None:
        return []
    # Label only the mask's bounding box (a lesion mask is a few voxels of a large grid).
    labels, n = ndimage.label(mask[box], structure=structure)
    if n == 0:
        return []
    offset = [b.start for b in box]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_mm3 = float(np.prod(spacing))
    out: list[Component] = []
    for idx, local in enumerate(ndimage.find_objects(labels), start=1):
        if local is None:
            continue
        comp = labels[local] == idx
        sl = tuple(slice(a.start + o, a.stop + o) for a, o in zip(local, offset, strict=True))
        nvox = int(comp.sum())
        volume_mm3 = nvox * voxel_mm3
        if volume_mm3 < min_volume_mm3:
            continue
        kji = np.argwhere(comp).astype(np.float64) + [s.start for s in sl]
        diameter = 0.0
        for k in np.unique(kji[:, 0]):
            pts = kji[kji[:, 0] == k][:, 1:] * spacing[1:]
            diameter = max(diameter, _max_inplane_extent(pts))
        diameter += float(max(spacing[1], spacing[2]))
        if diameter < min_diameter_mm:
            continue
        centroid = kji.mean(axis=0)
        lps = affine[:3, :3] @ centroid + affine[:3, 3]
        prob = 1.0 if probability is None else float(np.asarray(probability[sl])[comp].mean())
        out.append(Component(
            label_value=label_value,
            centroid_index=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
            centroid_lps_mm=(float(lps[0]), float(lps[1]), float(lps[2])),
            bbox_index=(sl[0].start, sl[1].start, sl[2].start, sl[0].stop, sl[1].stop, sl[2].stop),
            diameter_mm=diameter, volume_ml=volume_mm3 / 1000.0, voxels=nvox, probability=prob,
        ))
    out.sort(key=lambda c: -c.voxels)
    return out
