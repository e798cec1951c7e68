"""Synthetic brain MR cases built around the MNI152 2009 template shipped with nilearn.

Every case is made on the model grid (2 mm isotropic, axial ``[slice, row, col]`` in LPS, the
same orientation as :func:`omnimri_samples.mni_brain`) from the ICBM152 2009a T1 template and
its grey/white-matter maps (nilearn wheel, no download):

* random affine (rotation, scale, translation) and smooth elastic deformation;
* contrast: T1-like (template intensities), T2-like and FLAIR-like (tissue maps with the T1
  texture added), tissue means jittered per case;
* synthetic lesions: small white-matter hyperintensities (WMH, 4-12 mm) or one larger mass
  (16-40 mm) with surrounding oedema, each with a ground-truth mask and instance id;
* a diagnosis label (``normal`` / ``small_vessel`` / ``mass``) and a templated report written
  from the ground truth;
* acquisition effects: multiplicative bias field, resolution loss (thick slices or in-plane
  blur), Rician noise and a global intensity scale;
* reconstruction pairs: Cartesian 4x undersampling of each slice's k-space (zero-filled).

Training and held-out cases use different seeds *and* disjoint lesion layouts: lesion centres
are drawn from alternating 16 mm cells (parity 0 for training, 1 for held-out).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

SPACING_MM = 2.0
"""Isotropic voxel size of the model grid, millimetres."""

TISSUE_CLASSES = ("background", "csf", "grey_matter", "white_matter")
LESION_CLASSES = ("none", "wm_hyperintensity", "mass", "edema")
DIAGNOSES = ("normal", "small_vessel", "mass")
CONTRASTS = ("T1", "T2", "FLAIR")

# Tissue means per contrast: background, CSF, GM, WM, WMH, mass core, oedema (T1 scale 0-1).
_MEANS: dict[str, tuple[float, ...]] = {
    "T1": (0.0, 0.39, 0.65, 0.84, 0.58, 0.42, 0.66),
    "T2": (0.0, 1.00, 0.62, 0.45, 0.86, 0.80, 0.76),
    "FLAIR": (0.0, 0.16, 0.62, 0.46, 0.97, 0.78, 0.88),
}

Array = npt.NDArray[np.float32]


@dataclass
class Lesion:
    """One ground-truth lesion instance."""

    kind: str
    """``wm_hyperintensity`` or ``mass``."""
    instance: int
    """1-based instance id in :attr:`Case.instances`."""
    centre_index: tuple[float, float, float]
    """Centre, array indices ``(k, j, i)`` on the 2 mm grid."""
    diameter_mm: float
    """Largest in-plane extent of the mask, millimetres."""
    side: str
    """``left`` / ``right`` (patient side) or ``midline``."""
    lobe: str
    """Coarse lobe from MNI coordinates (see :func:`lobe_of`)."""


@dataclass
class Case:
    """One synthetic case on the 2 mm model grid."""

    image: Array
    """MR image ``[k, j, i]``, arbitrary units (non-negative)."""
    tissue: npt.NDArray[np.uint8]
    """Tissue labels (index into :data:`TISSUE_CLASSES`)."""
    lesion: npt.NDArray[np.uint8]
    """Lesion labels (index into :data:`LESION_CLASSES`)."""
    instances: npt.NDArray[np.int16]
    """Lesion instance ids (0 = none); oedema is not an instance."""
    lesions: list[Lesion]
    diagnosis: int
    """Index into :data:`DIAGNOSES`."""
    contrast: str
    report: str
    affine: npt.NDArray[np.float64]
    """``(k, j, i, 1)`` to LPS millimetres (template space, the deformation is not in it)."""
    meta: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- template


def _ras_to_axial_lps(
    data_xyz: npt.NDArray[np.floating], ras_affine: npt.NDArray[np.float64]
) -> tuple[Array, npt.NDArray[np.float64]]:
    """NIfTI ``[x, y, z]`` RAS+ volume to axial ``[k, j, i]`` LPS (as omnimri_samples)."""
    vox = np.abs(np.diag(ras_affine)[:3])
    nx, ny, _ = data_xyz.shape
    arr = np.ascontiguousarray(np.transpose(data_xyz[::-1, ::-1, :], (2, 1, 0)))
    ras0 = ras_affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, vox[2]]
    affine[:3, 1] = [0, vox[1], 0]
    affine[:3, 2] = [vox[0], 0, 0]
    affine[:3, 3] = [-ras0[0], -ras0[1], ras0[2]]
    return arr.astype(np.float32), affine


@dataclass(frozen=True)
class Template:
    """The MNI152 2009 template on the 2 mm axial LPS grid."""

    t1: Array
    probs: Array
    """``[4, k, j, i]`` probabilities of background, CSF, GM, WM."""
    affine: npt.NDArray[np.float64]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load (once) the nilearn MNI152 template and tissue maps at 2 mm."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=2)
    t1, affine = _ras_to_axial_lps(np.asarray(t1_img.get_fdata()), t1_img.affine)
    def load(fn: str) -> Array:
        img = getattr(datasets, fn)(resolution=2)
        return _ras_to_axial_lps(np.asarray(img.get_fdata()), t1_img.affine)[0]

    gm = load("load_mni152_gm_template")
    wm = load("load_mni152_wm_template")
    mask = load("load_mni152_brain_mask")
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    csf = np.clip(mask - gm - wm, 0, 1)
    probs = np.stack([1.0 - mask, csf, gm, wm]).astype(np.float32)
    t1 = np.clip(t1, 0, None) * (mask > 0)
    return Template(t1=t1.astype(np.float32), probs=probs, affine=affine)


# --------------------------------------------------------------------------- anatomy words


def mni_of_index(kji: npt.ArrayLike, affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Array indices ``(k, j, i)`` to MNI RAS millimetres (LPS with x and y negated)."""
    p = np.asarray(kji, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]
    return p * np.array([-1.0, -1.0, 1.0])


def side_of_lps_x(x_lps_mm: float, midline_mm: float = 0.0, tolerance_mm: float = 3.0) -> str:
    """Patient side from the LPS x coordinate: +x is the patient's left."""
    if x_lps_mm > midline_mm + tolerance_mm:
        return "left"
    if x_lps_mm < midline_mm - tolerance_mm:
        return "right"
    return "midline"


def lobe_of(mni_ras_mm: npt.ArrayLike) -> str:
    """Coarse lobe of a point in MNI space (a hand-made atlas from MNI coordinates).

    Boxes, in MNI RAS millimetres: cerebellum below z = -25 behind y = -45; occipital behind
    y = -70; parietal behind y = -25 above z = 15 (and behind y = -45 above z = -25); temporal
    below z = 5 (and |x| > 25 or in front of y = -45); frontal otherwise.
    """
    x, y, z = (float(v) for v in np.asarray(mni_ras_mm, dtype=np.float64))
    if z < -25 and y < -45:
        return "cerebellum"
    if y < -70:
        return "occipital"
    if (y < -25 and z > 15) or (y < -45 and z > -25):
        return "parietal"
    if z < 5 and (abs(x) > 25 or y > -45) and y < 20:
        return "temporal"
    return "frontal"


# --------------------------------------------------------------------------- deformation


def _random_warp(
    rng: np.random.Generator, shape: tuple[int, int, int], strength: float = 1.0
) -> npt.NDArray[np.float32]:
    """Sampling coordinates ``[3, k, j, i]`` for a random affine + elastic deformation."""
    ang = np.deg2rad(rng.uniform(-10, 10, 3) * strength)
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = np.diag(rng.uniform(0.9, 1.1, 3) ** strength)
    mat = rx @ ry @ rz @ scale
    shift = rng.uniform(-3, 3, 3) * strength  # voxels (6 mm)
    centre = (np.array(shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (mat @ (grid - centre[:, None])) + centre[:, None] + shift[:, None]
    coords = coords.reshape(3, *shape)
    # Elastic: coarse random displacements (voxels), smoothly upsampled.
    coarse = rng.normal(0, 1.2 * strength, (3, 6, 7, 6)).astype(np.float32)
    m0, m1, m2 = (_spline_zoom_matrix(c, s) for c, s in zip(coarse.shape[1:], shape, strict=True))
    for d in range(3):
        coords[d] += np.einsum("ai,bj,ck,ijk->abc", m0, m1, m2, coarse[d].astype(np.float64),
                               optimize=True).astype(np.float32)
    return coords.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _spline_zoom_matrix(n_in: int, n_out: int) -> npt.NDArray[np.float64]:
    """``[n_out, n_in]`` matrix of 1-D cubic-spline zoom (``ndimage.zoom(order=3)``).

    The 3-D zoom of a small displacement grid is separable, so three of these matrices give
    the same field as ``ndimage.zoom`` (to ~1e-7) about 50x faster.
    """
    out: npt.NDArray[np.float64] = ndimage.zoom(np.eye(n_in), [n_out / n_in, 1], order=3)
    return out


def _warp(vol: Array, coords: npt.NDArray[np.float32], order: int = 1) -> Array:
    return ndimage.map_coordinates(vol, coords, order=order, mode="constant", cval=0.0).astype(
        np.float32
    )


# --------------------------------------------------------------------------- lesions


def _blob(
    rng: np.random.Generator, shape: tuple[int, int, int], centre: npt.NDArray[np.float64],
    diameter_vox: float,
) -> npt.NDArray[np.float32]:
    """A soft, irregular ellipsoid (values 0-1) of about ``diameter_vox`` voxels."""
    radii = diameter_vox / 2.0 * rng.uniform(0.75, 1.15, 3)
    r = int(math.ceil(radii.max() * 1.4)) + 2
    lo = np.maximum(np.floor(centre).astype(int) - r, 0)
    hi = np.minimum(np.floor(centre).astype(int) + r + 1, np.array(shape))
    out = np.zeros(shape, np.float32)
    if np.any(hi <= lo):
        return out
    g = np.indices(tuple(hi - lo), dtype=np.float32)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    d = (g.reshape(3, -1) + lo[:, None] - centre[:, None]).astype(np.float64)
    d = (rot @ d) / radii[:, None]
    rad = np.sqrt((d**2).sum(0)).reshape(g.shape[1:])
    wobble = ndimage.gaussian_filter(rng.normal(0, 1, rad.shape), 1.5) * 0.5
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = np.clip(1.5 - (rad + wobble) * 1.5 + 0.5, 0,
                                                              1)
    return out


def _layout_ok(kji: npt.NDArray[np.int_], parity: int) -> bool:
    cell = (np.asarray(kji) // 8).sum()
    return int(cell) % 2 == parity


def _pick_centres(
    rng: np.random.Generator, candidates: npt.NDArray[np.int_], n: int, parity: int,
    min_dist_vox: float,
) -> list[npt.NDArray[np.int_]]:
    chosen: list[npt.NDArray[np.int_]] = []
    for _ in range(200):
        if len(chosen) >= n or len(candidates) == 0:
            break
        c = candidates[rng.integers(len(candidates))]
        if not _layout_ok(c, parity):
            continue
        if any(np.linalg.norm(c - o) < min_dist_vox for o in chosen):
            continue
        chosen.append(c)
    return chosen


def _extent_mm(mask: npt.NDArray[np.bool_]) -> float:
    """Largest in-plane (row/col) extent over slices, centre-to-centre plus one voxel, mm.

    The same measure as :func:`inference.postprocess.connected_components` (Feret diameter).
    """
    from scipy.spatial.distance import pdist

    best = 0.0
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        pts = np.argwhere(mask[k]).astype(np.float64)
        if len(pts) > 1:
            best = max(best, float(pdist(pts).max()))
    return (best + 1.0) * SPACING_MM


# --------------------------------------------------------------------------- reports


def count_bucket(n: int) -> str:
    """Count words used in reports: ``none``, ``single``, ``few`` (2-4), ``multiple`` (5+)."""
    if n <= 0:
        return "none"
    if n == 1:
        return "single"
    if n <= 4:
        return "few"
    return "multiple"


def size_bucket_mm(d: float) -> int:
    """Size stated in reports: rounded to the nearest 5 mm (5-100 mm)."""
    return int(min(100, max(5, 5 * round(d / 5.0))))


def write_report(facts: dict[str, str]) -> tuple[str, str]:
    """Templated findings and impression from facts.

    ``facts`` keys: ``kind`` (normal / small_vessel / mass), ``count`` (bucket), ``side``,
    ``lobe``, ``size`` (mm, as text).
    """
    kind = facts.get("kind", "normal")
    if kind == "normal":
        return ("no focal lesion is seen . grey and white matter are unremarkable .",
                "normal study .")
    side, lobe, size = facts["side"], facts["lobe"], facts["size"]
    if kind == "mass" and facts.get("count", "single") not in ("single", "none"):
        return (
            f"{facts['count']} mass lesions . the largest is in the {side} {lobe} lobe measuring "
            f"{size} mm with surrounding oedema .",
            "intracranial mass . further evaluation is recommended .",
        )
    if kind == "mass":
        return (
            f"a mass is seen in the {side} {lobe} lobe measuring {size} mm with surrounding "
            "oedema .",
            "intracranial mass . further evaluation is recommended .",
        )
    count = facts["count"]
    noun = "lesion" if count == "single" else "lesions"
    return (
        f"{count} white matter {noun} . the largest is in the {side} {lobe} lobe measuring "
        f"{size} mm .",
        "findings are consistent with small vessel disease .",
    )


def facts_from_lesions(diagnosis: str, lesions: list[Lesion]) -> dict[str, str]:
    """Report facts (presence, count bucket, side, lobe, largest size) from lesions."""
    if diagnosis == "normal" or not lesions:
        return {"kind": "normal", "count": "none", "side": "none", "lobe": "none", "size": "0"}
    want = "mass" if diagnosis == "mass" else "wm_hyperintensity"
    main = [x for x in lesions if x.kind == want] or lesions
    big = max(main, key=lambda x: x.diameter_mm)
    return {
        "kind": diagnosis,
        "count": count_bucket(len(main)),
        "side": big.side,
        "lobe": big.lobe,
        "size": str(size_bucket_mm(big.diameter_mm)),
    }


# --------------------------------------------------------------------------- the generator


def make_case(
    seed: int, *, heldout: bool = False, diagnosis: int | None = None, contrast: str | None = None,
    augment: float = 1.0,
) -> Case:
    """Generate one synthetic case.

    Args:
        seed: Random seed (the same seed gives the same case).
        heldout: Use the held-out lesion layout (parity-1 cells) instead of the training one.
        diagnosis: Force a class (index into :data:`DIAGNOSES`); random if ``None``.
        contrast: Force ``T1`` / ``T2`` / ``FLAIR``; random if ``None``.
        augment: Strength of deformation and acquisition effects (0 = the plain template).
    """
    rng = np.random.default_rng(seed)
    tpl = load_template()
    shape = tpl.t1.shape
    if augment > 0:
        coords = _random_warp(rng, shape, augment)
        t1 = _warp(tpl.t1, coords)
        probs = np.stack([_warp(p, coords) for p in tpl.probs[1:]])
        probs = np.concatenate([np.clip(1 - probs.sum(0, keepdims=True), 0, 1), probs])
    else:
        coords = np.indices(shape, dtype=np.float32)
        t1 = tpl.t1.copy()
        probs = tpl.probs.copy()
    tissue = np.argmax(probs, axis=0).astype(np.uint8)
    diag = int(rng.integers(3)) if diagnosis is None else int(diagnosis)
    contrast = contrast or str(rng.choice(CONTRASTS))
    parity = 1 if heldout else 0

    lesion = np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.int16)
    soft = {1: np.zeros(shape, np.float32), 2: np.zeros(shape, np.float32),
            3: np.zeros(shape, np.float32)}
    lesions: list[Lesion] = []
    mni_z_ok = mni_of_index(np.indices(shape).reshape(3, -1).T, tpl.affine)[:, 2].reshape(shape)
    if diag == 1:
        cand = np.argwhere((probs[3] > 0.9) & (mni_z_ok > -20))
        n = int(rng.choice([1, 2, 3, 4, 5, 6, 8], p=[0.2, 0.15, 0.15, 0.15, 0.15, 0.1, 0.1]))
        for c in _pick_centres(rng, cand, n, parity, 6.0):
            d_vox = rng.uniform(4.0, 12.0) / SPACING_MM
            b = _blob(rng, shape, c.astype(np.float64), d_vox)
            b *= (probs[3] + probs[2] > 0.5)
            soft[1] = np.maximum(soft[1], b)
    elif diag == 2:
        cand = np.argwhere((probs[3] + probs[2] > 0.9) & (mni_z_ok > -10))
        for c in _pick_centres(rng, cand, 1, parity, 0.0):
            d_vox = rng.uniform(16.0, 40.0) / SPACING_MM
            core = _blob(rng, shape, c.astype(np.float64), d_vox)
            brain = 1.0 - probs[0]
            core *= brain
            oed = _blob(rng, shape, c.astype(np.float64), d_vox + rng.uniform(8, 20) / SPACING_MM)
            oed = np.clip(oed * brain * (probs[3] + 0.3 * probs[2]) - core, 0, 1)
            soft[2] = np.maximum(soft[2], core)
            soft[3] = np.maximum(soft[3], oed)
    lesion[soft[3] > 0.5] = 3
    lesion[soft[1] > 0.5] = 1
    lesion[soft[2] > 0.5] = 2
    core_mask = (lesion == 1) | (lesion == 2)
    labels, n_inst = ndimage.label(core_mask)
    for inst in range(1, n_inst + 1):
        m = labels == inst
        if m.sum() < 2:  # too small to count as an instance: drop
            lesion[m] = 0
            continue
        idx = len(lesions) + 1
        instances[m] = idx
        cen = np.argwhere(m).mean(0)
        # Side and lobe are anatomical: taken where the centre came from in the template.
        src = np.array([ndimage.map_coordinates(coords[d], cen[:, None], order=1)[0]
                        for d in range(3)])
        mni = mni_of_index(src, tpl.affine)
        kind = "mass" if lesion[m].max() == 2 else "wm_hyperintensity"
        centre = (float(cen[0]), float(cen[1]), float(cen[2]))
        lesions.append(Lesion(kind=kind, instance=idx, centre_index=centre,
                              diameter_mm=_extent_mm(m), side=side_of_lps_x(float(-mni[0])),
                              lobe=lobe_of(mni)))
    if diag != 0 and not lesions:
        diag = 0  # no room for the lesion: a normal case

    # Image formation.
    means = np.array(_MEANS[contrast]) * rng.uniform(0.9, 1.1, 7) * np.r_[0, np.ones(6)]
    tissue_mix = np.tensordot(means[:4], probs, axes=1).astype(np.float32)
    if contrast == "T1":
        img = t1.copy()
    else:
        base_t1 = np.tensordot(np.array(_MEANS["T1"][:4]), probs, axes=1)
        img = tissue_mix + 0.6 * (t1 - base_t1).astype(np.float32)
    for cls, mean_idx in ((3, 6), (1, 4), (2, 5)):
        a = soft[cls]
        if cls == 2:
            tex = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0).astype(np.float32)
            target = means[mean_idx] * (1 + 0.25 * tex)
        else:
            target = np.float32(means[mean_idx])
        img = img * (1 - a) + a * target
    img = np.clip(img, 0, None).astype(np.float32)
    if augment > 0:
        # Resolution change.
        mode = rng.integers(3)
        if mode == 1:
            img = ndimage.gaussian_filter(img, (rng.uniform(0.5, 1.5) * augment, 0, 0))
        elif mode == 2:
            s = rng.uniform(0.3, 0.9) * augment
            img = ndimage.gaussian_filter(img, (0, s, s))
        # Bias field: smooth multiplicative, about +-20 %.
        g = np.indices(shape, dtype=np.float32) / np.array(shape, np.float32)[:, None, None, None]
        field_ = sum(rng.normal(0, 0.12 * augment) * (g[d] - 0.5) for d in range(3))
        field_ = field_ + rng.normal(0, 0.1 * augment) * (g[0] - 0.5) * (g[2] - 0.5) * 4
        img = img * np.exp(field_).astype(np.float32)
        # Rician noise.
        sigma = rng.uniform(0.005, 0.04) * augment
        re = img + rng.normal(0, sigma, shape)
        im = rng.normal(0, sigma, shape)
        img = np.sqrt(re**2 + im**2).astype(np.float32)
        img *= np.float32(rng.uniform(0.3, 3.0) * 1000.0)
    else:
        img *= np.float32(1000.0)
    dname = DIAGNOSES[diag]
    findings, impression = write_report(facts_from_lesions(dname, lesions))
    return Case(
        image=img.astype(np.float32), tissue=tissue, lesion=lesion, instances=instances,
        lesions=lesions, diagnosis=diag, contrast=contrast,
        report=f"findings : {findings} impression : {impression}", affine=tpl.affine.copy(),
    )


# --------------------------------------------------------------------------- k-space


def undersampling_mask(
    n_lines: int, acceleration: int = 4, centre_fraction: float = 0.08, seed: int = 0
) -> npt.NDArray[np.bool_]:
    """A 1-D Cartesian phase-encode mask: fully sampled centre plus random lines.

    The mask keeps ``n_lines / acceleration`` lines in all (fastMRI-style random mask).
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(n_lines, bool)
    n_centre = max(2, int(round(n_lines * centre_fraction)))
    c0 = n_lines // 2 - n_centre // 2
    mask[c0 : c0 + n_centre] = True
    total = n_lines // acceleration
    rest = np.flatnonzero(~mask)
    extra = max(0, total - n_centre)
    mask[rng.choice(rest, size=extra, replace=False)] = True
    return mask


def zero_filled(
    image: npt.NDArray[np.floating], acceleration: int = 4, seed: int = 0
) -> Array:
    """Simulate Cartesian undersampling along the row (phase-encode) axis of each slice.

    Args:
        image: ``[..., rows, cols]`` magnitude images.
        acceleration: Undersampling factor (4 keeps a quarter of the lines).
        seed: Seed of the random line pattern.

    Returns:
        Zero-filled magnitude reconstruction, same shape.
    """
    rows = image.shape[-2]
    mask = undersampling_mask(rows, acceleration, seed=seed)
    k = np.fft.fftshift(np.fft.fft2(image, axes=(-2, -1)), axes=(-2, -1))
    k = k * mask[:, None]
    out = np.abs(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), axes=(-2, -1)))
    return out.astype(np.float32)


def normalise(image: npt.NDArray[np.floating], lo_pct: float = 0.5,
              hi_pct: float = 99.5) -> Array:
    """Percentile normalisation used by the model: ``(x - p_lo) / (p_hi - p_lo)`` in [0, 1].

    Clipped to [0, 1], statistics over all voxels (``model.yaml``: kind percentile, mask none).
    """
    lo, hi = np.percentile(image, [lo_pct, hi_pct])
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
