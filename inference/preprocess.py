"""Pre-processing driven by a package's ``input`` spec: reorient, resample, normalise, patch.

Every step records what it did in a :class:`GridTransform` / :class:`Normalisation`, so that
:mod:`inference.postprocess` can map model outputs back onto the source grid exactly.

Grid conventions follow :mod:`inference.volume`: arrays are ``[k, j, i]`` and an affine maps
``(k, j, i, 1)`` to LPS millimetres.

Resampling uses a cell-centred mapping (``align_corners=False``): model index ``m`` samples the
reoriented array at ``r = (m + 0.5) * scale - 0.5`` per axis, ``scale = target / source``
spacing, so both grids cover the same field of view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from inference.package import InputSpec, NormalisationSpec

Array = npt.NDArray[np.float32]

_LPS_AXIAL_AXES = (2, 1, 0)
"""For array axes ``(k, j, i)`` in axial LPS order: the LPS axis each must run along
(k → S = z, j → P = y, i → L = x), each in the positive direction."""


@dataclass(frozen=True, slots=True)
class GridTransform:
    """How the source array became the model-grid array (and how to go back).

    Attributes:
        source_shape: ``(K, J, I)`` of the source volume.
        source_affine: Its 4x4 affine.
        axes: ``reoriented = source.transpose(axes)`` (then ``flips`` applied).
        flips: Per reoriented axis, whether it was reversed.
        reoriented_shape: Shape after reorientation.
        scale: Per reoriented axis, model spacing / reoriented spacing (1 = no resampling).
        model_shape: Shape of the model-grid array.
        model_affine: 4x4 affine of the model grid (LPS mm).
    """

    source_shape: tuple[int, int, int]
    source_affine: npt.NDArray[np.float64]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    reoriented_shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    model_shape: tuple[int, int, int]
    model_affine: npt.NDArray[np.float64]

    @property
    def resampled(self) -> bool:
        """Whether the model grid differs from the reoriented grid in spacing."""
        return any(abs(s - 1.0) > 1e-9 for s in self.scale) or (
            self.model_shape != self.reoriented_shape
        )

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        """Model-grid spacing in mm, ``(slice, row, column)``."""
        n = np.linalg.norm(self.model_affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))


@dataclass(frozen=True, slots=True)
class Normalisation:
    """``normalised = (x - offset) / scale``; :meth:`invert` undoes it."""

    offset: float
    scale: float

    def invert(self, x: Array) -> Array:
        """Back to source intensity units."""
        return (x * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32)


@dataclass(slots=True)
class PreparedImage:
    """The model-grid image and the records needed to invert the preparation."""

    array: Array
    """``[D, H, W]`` on the model grid, normalised, float32."""
    transform: GridTransform
    normalisation: Normalisation


Axes3 = tuple[int, int, int]
Flips3 = tuple[bool, bool, bool]


def reorientation(affine: npt.NDArray[np.float64]) -> tuple[Axes3, Flips3]:
    """Axis permutation and flips that bring an array into axial LPS index order.

    Each array axis is matched to the LPS axis its direction is closest to (oblique volumes are
    permuted to the nearest orthogonal order, not resampled).

    Returns:
        ``(axes, flips)``: ``arr.transpose(axes)``, then reverse the axes where ``flips``.
    """
    dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    # assign array axes to LPS axes greedily by the largest |cosine|, no axis used twice
    cost = np.abs(dirs)  # [lps_axis, array_axis]
    assign: dict[int, int] = {}
    for _ in range(3):
        free = [(cost[ax, a], ax, a) for ax in range(3) for a in range(3)
                if ax not in assign and a not in assign.values()]
        _, lps, arr_axis = max(free)
        assign[lps] = arr_axis
    axes = tuple(assign[lps] for lps in _LPS_AXIAL_AXES)
    flips = tuple(bool(dirs[lps, assign[lps]] < 0) for lps in _LPS_AXIAL_AXES)
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def _reoriented_affine(
    affine: npt.NDArray[np.float64], shape: tuple[int, int, int],
    axes: tuple[int, int, int], flips: tuple[bool, bool, bool],
) -> npt.NDArray[np.float64]:
    # new index n_a maps to old index o_{axes[a]} = flips[a] ? (shape[axes[a]] - 1 - n_a) : n_a
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for a in range(3):
        src = axes[a]
        if flips[a]:
            m[src, a] = -1.0
            m[src, 3] = shape[src] - 1
        else:
            m[src, a] = 1.0
    return np.asarray(affine @ m, dtype=np.float64)


def apply_reorientation(
    array: npt.NDArray[np.floating], axes: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> npt.NDArray[np.floating]:
    """``array.transpose(axes)`` with the flipped axes reversed (a view when possible)."""
    out = np.transpose(array, axes)
    for a, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=a)
    return out


def grid_transform(
    shape: tuple[int, int, int], affine: npt.NDArray[np.float64], spec: InputSpec
) -> GridTransform:
    """The reorientation + resampling that ``spec`` asks for, for a volume of ``shape``."""
    if spec.orientation == "LPS-axial":
        axes, flips = reorientation(affine)
    else:
        axes, flips = (0, 1, 2), (False, False, False)
    r_shape = (shape[axes[0]], shape[axes[1]], shape[axes[2]])
    r_affine = _reoriented_affine(affine, shape, axes, flips)
    r_spacing = np.linalg.norm(r_affine[:3, :3], axis=0)
    if spec.spacing_mm is None:
        scale = (1.0, 1.0, 1.0)
        m_shape = r_shape
    else:
        target = np.asarray(spec.spacing_mm, dtype=np.float64)
        m_shape_l = [
            max(1, round(n * s / t)) for n, s, t in zip(r_shape, r_spacing, target, strict=True)
        ]
        m_shape = (m_shape_l[0], m_shape_l[1], m_shape_l[2])
        # keep the field of view: scale = reoriented extent / model extent, per axis
        sc = [r / m for r, m in zip(r_shape, m_shape, strict=True)]
        scale = (sc[0], sc[1], sc[2])
    # model index m -> reoriented index (m + 0.5) * scale - 0.5
    m2r = np.eye(4)
    for a in range(3):
        m2r[a, a] = scale[a]
        m2r[a, 3] = 0.5 * scale[a] - 0.5
    return GridTransform(
        source_shape=shape, source_affine=np.asarray(affine, dtype=np.float64),
        axes=axes, flips=flips, reoriented_shape=r_shape, scale=scale, model_shape=m_shape,
        model_affine=np.asarray(r_affine @ m2r, dtype=np.float64),
    )


def _low_pass_sigmas(t: GridTransform) -> list[float] | None:
    """Per reoriented axis, the Gaussian low-pass sigma (voxels) before down-sampling.

    ``(scale - 1) / 2`` per axis; ``None`` when no axis needs one (every sigma <= 0.1).
    """
    sigma = [max(0.0, (s - 1.0) / 2.0) for s in t.scale]
    return sigma if any(s > 0.1 for s in sigma) else None


def _axis_operator(n_in: int, n_out: int, scale: float, sigma: float | None
                   ) -> npt.NDArray[np.float64]:
    """``[n_out, n_in]`` matrix of one axis of :func:`to_model_grid`'s linear resampling.

    The Gaussian low-pass (``mode="nearest"``, scipy's kernel and truncation: the operator is
    :func:`scipy.ndimage.gaussian_filter1d` applied to the identity) followed by cell-centred
    linear sampling at ``x = (m + 0.5) * scale - 0.5``, clamped to ``[0, n_in - 1]`` (what
    ``affine_transform(order=1, mode="nearest")`` does inside the grid).
    """
    x = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0, n_in - 1)
    i0 = np.minimum(np.floor(x).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = x - i0
    rows = np.arange(n_out)
    op = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(op, (rows, i0), 1.0 - w)
    np.add.at(op, (rows, i1), w)
    if sigma is not None and sigma > 1e-15:  # scipy skips axes with sigma <= 1e-15
        op = op @ ndimage.gaussian_filter1d(np.eye(n_in), sigma, axis=0, mode="nearest")
    return op


def _separable_model_grid(array: npt.NDArray[np.floating], t: GridTransform) -> Array:
    """:func:`to_model_grid`'s linear path as three matrix products, one per source axis.

    Low-pass + linear sampling is separable and linear, so each axis is one dense
    ``[n_out, n_in]`` operator (:func:`_axis_operator`, flips folded in by reversing its
    columns) applied as a single float32 GEMM over the whole volume: the last axis first (no
    copy), then the slice axis (no copy), then the row axis (one copy of the already reduced
    array); the result is transposed into model axis order at the end. Same values as the
    ``gaussian_filter`` + ``affine_transform`` path within float32 rounding (relative ~3e-7).
    """
    a = np.ascontiguousarray(array, dtype=np.float32)
    sigma = _low_pass_sigmas(t)
    ops: dict[int, Array] = {}
    for m in range(3):  # model axis m comes from source axis t.axes[m]
        src = t.axes[m]
        op = _axis_operator(a.shape[src], t.model_shape[m], t.scale[m],
                            None if sigma is None else sigma[m])
        if t.flips[m]:
            op = op[:, ::-1]
        ops[src] = np.ascontiguousarray(op, dtype=np.float32)
    k, j, i = a.shape
    b = (a.reshape(-1, i) @ ops[2].T).reshape(k, j, -1)  # [K, J, I']
    k2 = ops[0].shape[0]
    b = (ops[0] @ b.reshape(k, -1)).reshape(k2, j, -1)  # [K', J, I']
    i2 = b.shape[2]
    bt = np.ascontiguousarray(b.transpose(1, 0, 2)).reshape(j, -1)  # [J, K' * I']
    c = (ops[1] @ bt).reshape(-1, k2, i2).transpose(1, 0, 2)  # [K', J', I'] view
    return np.ascontiguousarray(np.transpose(c, t.axes), dtype=np.float32)


def to_model_grid(array: npt.NDArray[np.floating], t: GridTransform, order: int = 1) -> Array:
    """Reorient and resample a source-grid ``[K, J, I]`` array onto the model grid.

    Down-sampling is preceded by a Gaussian low-pass (sigma = (scale - 1) / 2 voxels) so small
    structures are averaged rather than aliased. ``order=1`` (what :func:`prepare` uses) is
    computed as three per-axis matrix products (:func:`_separable_model_grid`; ~0.05 s instead
    of ~0.4 s CPU for a 189 x 256 x 256 volume); other orders filter and resample with
    :mod:`scipy.ndimage`.
    """
    if t.resampled and order == 1:
        return _separable_model_grid(array, t)
    r = np.ascontiguousarray(apply_reorientation(array, t.axes, t.flips), dtype=np.float32)
    if not t.resampled:
        return r
    sigma = _low_pass_sigmas(t)
    if sigma is not None:
        r = ndimage.gaussian_filter(r, sigma=sigma, mode="nearest")
    scale = np.asarray(t.scale)
    out = ndimage.affine_transform(
        r, matrix=scale, offset=0.5 * scale - 0.5, output_shape=t.model_shape,
        order=order, mode="nearest", prefilter=order > 1,
    )
    return np.asarray(out, dtype=np.float32)


def normalise(array: Array, spec: NormalisationSpec) -> tuple[Array, Normalisation]:
    """Normalise intensities as ``spec`` says; returns the array and the record to undo it.

    ``percentile`` maps the low/high percentiles to 0/1 and clips only below 0 (values above
    the high percentile keep their contrast). Training calls this same function
    (:func:`inference.omnimri.synthetic.normalise`).
    """
    if spec.kind == "none":
        return array, Normalisation(0.0, 1.0)
    values = array[array != 0] if spec.mask == "nonzero" else array.ravel()
    if values.size == 0:
        values = array.ravel()
    if spec.kind == "zscore":
        offset, scale = float(values.mean()), float(values.std())
    elif spec.kind == "percentile":
        lo, hi = np.percentile(values, [spec.low, spec.high])
        offset, scale = float(lo), float(hi - lo)
    else:  # minmax
        offset, scale = float(values.min()), float(values.max() - values.min())
    if not math.isfinite(scale) or scale <= 1e-12:
        scale = 1.0
    out = (array - np.float32(offset)) / np.float32(scale)
    if spec.kind == "percentile":
        # Below the low percentile is noise floor: clipped to 0. Above the high one nothing is
        # clipped: a lesion brighter than the brightest tissue stays brighter (values > 1).
        np.maximum(out, 0.0, out=out)
    return out.astype(np.float32, copy=False), Normalisation(offset, scale)


def prepare(array: Array, affine: npt.NDArray[np.float64], spec: InputSpec) -> PreparedImage:
    """Reorient, resample and normalise a source volume for a model.

    Args:
        array: Source ``[K, J, I]`` float32 (rescale applied).
        affine: Its 4x4 LPS affine (mm).
        spec: The package's input spec.
    """
    shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
    t = grid_transform(shape, affine, spec)
    on_grid = to_model_grid(array, t, order=1)
    normed, norm = normalise(on_grid, spec.normalisation)
    return PreparedImage(array=normed, transform=t, normalisation=norm)


# -------------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True)
class Window:
    """One patch: ``starts`` on the (padded) model grid; ``size`` is the patch size.

    For ``NCHW`` windows ``starts[0]`` is the centre slice and ``size[0]`` is 1.
    """

    starts: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index into the padded model-grid array."""
        s, z = self.starts, self.size
        return (slice(s[0], s[0] + z[0]), slice(s[1], s[1] + z[1]), slice(s[2], s[2] + z[2]))


def _starts(dim: int, patch: int, overlap: float) -> list[int]:
    if dim <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = math.ceil((dim - patch) / step) + 1
    return sorted({round(x) for x in np.linspace(0, dim - patch, n)})


def padded_shape(shape: tuple[int, int, int], spec: InputSpec) -> tuple[int, int, int]:
    """The model-grid shape padded (at the end) to at least one patch per axis."""
    patch = _patch3(spec)
    return (max(shape[0], patch[0]), max(shape[1], patch[1]), max(shape[2], patch[2]))


def _patch3(spec: InputSpec) -> tuple[int, int, int]:
    p = spec.patch_size
    return (p[0], p[1], p[2]) if spec.layout == "NCDHW" else (1, p[0], p[1])


def sliding_windows(shape: tuple[int, int, int], spec: InputSpec) -> list[Window]:
    """Patches covering a model-grid array of ``shape`` with the spec's overlap.

    ``NCDHW``: 3-D patches. ``NCHW``: every slice, in-plane patches (the slice's neighbours are
    added as channels by :func:`extract_batch`).
    """
    patch = _patch3(spec)
    pshape = padded_shape(shape, spec)
    ov = spec.overlap
    ks = list(range(pshape[0])) if spec.layout == "NCHW" else _starts(pshape[0], patch[0], ov)
    js = _starts(pshape[1], patch[1], ov)
    is_ = _starts(pshape[2], patch[2], ov)
    return [Window((k, j, i), patch) for k in ks for j in js for i in is_]


def pad_to_patch(array: Array, spec: InputSpec) -> Array:
    """Pad ``array`` at the end of each axis with zeros up to one patch (no copy if not needed)."""
    target = padded_shape((array.shape[0], array.shape[1], array.shape[2]), spec)
    if target == array.shape:
        return array
    pad = [(0, t - s) for t, s in zip(target, array.shape, strict=True)]
    return np.pad(array, pad, mode="constant", constant_values=0.0)


@dataclass(frozen=True)
class WindowedImage:
    """A source volume as the engine sees it: prepared, padded to a patch, and its windows."""

    prepared: PreparedImage
    padded: Array
    """:func:`pad_to_patch` of ``prepared.array``."""
    windows: list[Window]
    """:func:`sliding_windows` of the model grid."""


def windowed(array: Array, affine: npt.NDArray[np.float64], spec: InputSpec) -> WindowedImage:
    """:func:`prepare`, :func:`pad_to_patch` and :func:`sliding_windows` of a source volume.

    The one sequence that turns a ``[K, J, I]`` volume (affine in LPS mm) into engine windows,
    shared by the runner, the INT8 calibration and the embedding head's training features.
    """
    prepared = prepare(array, affine, spec)
    return WindowedImage(prepared, pad_to_patch(prepared.array, spec),
                         sliding_windows(prepared.transform.model_shape, spec))


def extract_batch(padded: Array, windows: list[Window], spec: InputSpec) -> npt.NDArray[np.generic]:
    """Stack patches into the network's input tensor (``NCDHW`` or ``NCHW``), in ``spec.dtype``."""
    if spec.layout == "NCDHW":
        batch = np.stack([padded[w.slices] for w in windows])[:, None]
    else:
        c = spec.context_slices
        nk = padded.shape[0]
        items = []
        for w in windows:
            k = w.starts[0]
            ks = np.clip(np.arange(k - c, k + c + 1), 0, nk - 1)
            items.append(padded[ks, w.slices[1], w.slices[2]])
        batch = np.stack(items)
    return np.ascontiguousarray(batch, dtype=np.dtype(spec.dtype))


def batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """``windows`` in groups of at most ``batch_size``."""
    for s in range(0, len(windows), batch_size):
        yield windows[s : s + batch_size]


def gaussian_importance(size: tuple[int, int, int], sigma_scale: float = 0.125) -> Array:
    """Window weights that favour patch centres (nnU-Net style), min clipped to 1e-3 of max."""
    axes = []
    for n in size:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sig = max(n * sigma_scale, 1e-6)
        axes.append(np.exp(-0.5 * (x / sig) ** 2) if n > 1 else np.ones(1))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    return np.maximum(w, 1e-3).astype(np.float32)
