"""Synthetic head MR built around the MNI152 2009a template shipped with nilearn.

Domain randomisation from label maps, as SynthSeg does (Billot et al., Medical Image Analysis
2023). Every case is made on the model grid (2 mm isotropic, axial ``[slice, row, col]`` in LPS,
the same orientation as the node's volumes) from the symmetric ICBM152 2009a template
(``mni_icbm152_t1_tal_nlin_sym_09a``) and its grey/white-matter maps (nilearn wheel, no
download), padded 40 mm below the brain so the skull base and neck fit:

* anatomy: random affine plus smooth elastic deformation at three scales; enlarged ventricles
  and widened sulci (CSF grown into tissue) in some cases;
* a head around the brain, grown from the template brain mask: extra-cerebral CSF, skull
  (inner and outer tables of cortical bone, diploic marrow), temporal muscle, subcutaneous fat,
  skin, eyes and orbital fat, air sinuses, the neck (muscle and fat, vertebra, airway, spinal
  canal) and air. All of it is *background* for the tissue head: the brain is the brain;
* synthetic lesions: small white-matter hyperintensities (WMH, 4-12 mm) or one larger mass
  (16-40 mm) with surrounding oedema, each with a ground-truth mask and instance id;
* intensities: a mean per label (:data:`LABELS`) per case, every label independent (lesions
  included: a mass core is not CSF-like by construction), for T1-, T2-, FLAIR- and PD-like
  tables (jittered), an inverted T1 and fully random contrasts; the template's texture with a
  random sign and strength, and smooth per-label noise;
* acquisition: voxel size 2-6 mm along one axis and 2-3 mm in-plane (2-5 mm in the ``refine``
  stage; blur, then down- and up-sampling), partial field of view, multiplicative bias field,
  gamma, ghosting and motion, Rician noise and a global intensity scale;
* a diagnosis label (``normal`` / ``small_vessel`` / ``mass``) and a templated report written
  from the ground truth; reconstruction pairs: Cartesian 4x undersampling of each slice's
  k-space (zero-filled).

Training and held-out cases use different seeds. The stages up to ``finetune`` also use
disjoint lesion layouts (lesion centres from alternating 16 mm cells: parity 0 for training, 1
for held-out); the last stage, ``refine``, draws them anywhere, so that the model cannot
learn where lesions sit (it had: ``eval --layout training``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

SPACING_MM = 2.0
"""Isotropic voxel size of the model grid, millimetres."""

TISSUE_CLASSES = ("background", "csf", "grey_matter", "white_matter")
LESION_CLASSES = ("none", "wm_hyperintensity", "mass", "edema")
DIAGNOSES = ("normal", "small_vessel", "mass")
CONTRASTS = ("T1", "T2", "FLAIR", "PD")
"""Clinical-like contrasts (held-out evaluation cycles these)."""
TRAINING_CONTRASTS = (*CONTRASTS, "inverted", "random")
"""Every contrast the generator makes; training draws them with :data:`CONTRAST_WEIGHTS`."""
CONTRAST_WEIGHTS = (0.24, 0.18, 0.18, 0.1, 0.1, 0.2)

BELOW_BRAIN_PAD = 20
"""Slices (2 mm) added below the template grid, whose bottom is the brain's, for the neck."""

Array = npt.NDArray[np.float32]

Layout = Literal["training", "heldout", "anywhere"]
LAYOUTS: tuple[Layout, ...] = ("training", "heldout", "anywhere")
"""Lesion layouts of :func:`make_case` (where lesion centres may be drawn)."""
Neck = Literal["marble", "textured"]
NECKS: tuple[Neck, ...] = ("marble", "textured")
"""Neck and face soft-tissue models of :func:`make_case`."""


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
    """Generation parameters of the case (voxel size, gamma, noise, anatomy changes)."""
    hard_slices: npt.NDArray[np.int_] = field(default_factory=lambda: np.zeros(0, np.int_))
    """Slices through ventricles, deep grey matter or basal cisterns (hard negatives)."""


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
    """The MNI152 2009a template on the 2 mm axial LPS grid, padded below the brain."""

    t1: Array
    probs: Array
    """``[4, k, j, i]`` probabilities of background, CSF, GM, WM."""
    affine: npt.NDArray[np.float64]
    texture: Array
    """T1 minus the probability-weighted mean T1 of each class (the template's own texture)."""
    dist_out: Array
    """Distance outside the brain mask (``P(background) < 0.5``), mm; 0 inside."""
    dist_in: Array
    """Distance inside the brain mask to its surface, mm; 0 outside."""


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
    pad = ((BELOW_BRAIN_PAD, 0), (0, 0), (0, 0))
    probs = np.stack([np.pad(1.0 - mask, pad, constant_values=1.0)]
                     + [np.pad(p, pad) for p in (csf, gm, wm)]).astype(np.float32)
    t1 = np.pad(np.clip(t1, 0, None) * (mask > 0), pad).astype(np.float32)
    affine = affine.copy()
    affine[:3, 3] -= BELOW_BRAIN_PAD * affine[:3, 0]
    cls_mean = [float((t1 * p).sum() / max(float(p.sum()), 1e-6)) for p in probs]
    texture = (t1 - np.tensordot(np.array(cls_mean, np.float32), probs, axes=1)) * (
        probs[0] < 0.5)
    brain = probs[0] < 0.5
    dist_out = ndimage.distance_transform_edt(~brain, sampling=SPACING_MM).astype(np.float32)
    dist_in = ndimage.distance_transform_edt(brain, sampling=SPACING_MM).astype(np.float32)
    return Template(t1=t1, probs=probs, affine=affine, texture=texture.astype(np.float32),
                    dist_out=dist_out, dist_in=dist_in)


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
    # Elastic at three scales: random displacements (voxels) on coarse grids, upsampled.
    for grid_shape, sd in (((3, 4, 3), 2.0), ((6, 7, 6), 1.2), ((12, 14, 12), 0.35)):
        coarse = rng.normal(0, sd * strength, (3, *grid_shape))
        m0, m1, m2 = (_spline_zoom_matrix(c, s) for c, s in zip(grid_shape, shape, strict=True))
        for d in range(3):
            coords[d] += np.einsum("ai,bj,ck,ijk->abc", m0, m1, m2, coarse[d],
                                   optimize=True).astype(np.float32)
    return coords.astype(np.float32)


def _tilted(rng: np.random.Generator, coords: npt.NDArray[np.float32], tilt_deg: float
            ) -> npt.NDArray[np.float32]:
    """Sampling coordinates ``[3, k, j, i]`` rotated about the grid centre.

    Pitch (about the ``i`` = left-right axis) in ``[-tilt_deg, tilt_deg]`` degrees, roll
    (about ``j``) and yaw (about ``k``) in a third of that.
    """
    share = np.array([1.0, 1.0 / 3.0, 1.0 / 3.0])
    pitch, roll, yaw = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * tilt_deg * share)

    def rot(a: float, p: int, q: int) -> npt.NDArray[np.float64]:
        m = np.eye(3)
        m[p, p] = m[q, q] = np.cos(a)
        m[p, q], m[q, p] = -np.sin(a), np.sin(a)
        return m

    mat = rot(pitch, 0, 1) @ rot(roll, 0, 2) @ rot(yaw, 1, 2)
    centre = (np.array(coords.shape[1:], np.float64) - 1) / 2.0
    flat = coords.reshape(3, -1).astype(np.float64) - centre[:, None]
    out = (mat @ flat + centre[:, None]).reshape(coords.shape)
    return out.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _spline_zoom_matrix(n_in: int, n_out: int) -> npt.NDArray[np.float64]:
    """``[n_out, n_in]`` matrix of 1-D cubic-spline zoom (``ndimage.zoom(order=3)``).

    The 3-D zoom of a small displacement grid is separable, so three of these matrices give
    the same field as ``ndimage.zoom`` (to ~1e-7) about 50x faster.
    """
    out: npt.NDArray[np.float64] = ndimage.zoom(np.eye(n_in), [n_out / n_in, 1], order=3)
    return out


def _warp(vol: Array, coords: npt.NDArray[np.float32], order: int = 1,
          mode: str = "constant") -> Array:
    return ndimage.map_coordinates(vol, coords, order=order, mode=mode, cval=0.0).astype(
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


def _layout_ok(kji: npt.NDArray[np.int_], parity: int | None) -> bool:
    if parity is None:  # the "anywhere" layout
        return True
    cell = (np.asarray(kji) // 8).sum()
    return int(cell) % 2 == parity


def _pick_centres(
    rng: np.random.Generator, candidates: npt.NDArray[np.int_], n: int, parity: int | None,
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


# --------------------------------------------------------------------------- head and contrasts


LABELS = ("air", "csf", "grey_matter", "white_matter", "extracerebral_csf", "bone", "marrow",
          "fat", "muscle", "skin", "eye", "wm_hyperintensity", "mass", "edema")
"""Labels of the generative model (SynthSeg-style): each gets its own intensity per case.
Only ``csf``/``grey_matter``/``white_matter`` are brain (tissue head); the head tissues
(``extracerebral_csf`` .. ``eye``) and air are background/non-brain."""

_N_ANATOMY = 11
"""Labels 0-10 are anatomy (fractions per voxel); 11-13 are lesions blended on top."""

# Means (0-1 scale) for labels 0-10 per realistic contrast; lesions: (lo, hi) ranges.
_TABLES: dict[str, tuple[tuple[float, ...], tuple[tuple[float, float], ...]]] = {
    "T1": ((0.0, 0.18, 0.55, 0.78, 0.18, 0.05, 0.75, 0.95, 0.40, 0.50, 0.15),
           ((0.25, 0.50), (0.10, 0.95), (0.25, 0.55))),
    "T2": ((0.0, 1.00, 0.55, 0.40, 1.00, 0.04, 0.55, 0.75, 0.25, 0.45, 1.00),
           ((0.70, 1.00), (0.25, 1.00), (0.65, 0.95))),
    "FLAIR": ((0.0, 0.10, 0.60, 0.45, 0.10, 0.04, 0.55, 0.80, 0.30, 0.45, 0.10),
              ((0.80, 1.30), (0.25, 1.30), (0.75, 1.20))),
    "PD": ((0.0, 0.85, 0.75, 0.62, 0.85, 0.05, 0.65, 0.85, 0.45, 0.55, 0.85),
           ((0.82, 1.00), (0.35, 1.00), (0.78, 1.00))),
}

_EYES_MNI = ((32.0, 52.0, -36.0), (-32.0, 52.0, -36.0))
"""Eyeball centres, MNI RAS mm (outside the template brain by 17 mm); radius 12 mm."""
_SINUSES_MNI = (((28.0, 40.0, -62.0), (12.0, 14.0, 16.0)), ((-28.0, 40.0, -62.0),
                (12.0, 14.0, 16.0)), ((0.0, 50.0, -40.0), (8.0, 18.0, 16.0)))
"""Air sinuses (maxillary, ethmoid/nasal): centre and radii, MNI RAS mm."""


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int],
                  coarse: tuple[int, int, int] = (6, 7, 6)) -> Array:
    """A smooth random field (about unit standard deviation) upsampled from a coarse grid."""
    c = rng.normal(0, 1, coarse)
    m0, m1, m2 = (_spline_zoom_matrix(a, b) for a, b in zip(coarse, shape, strict=True))
    out: Array = np.einsum("ai,bj,ck,ijk->abc", m0, m1, m2, c, optimize=True).astype(np.float32)
    return out


def _ellipsoid(xyz: Array, centre: tuple[float, float, float],
               radii: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    """Voxels whose MNI position ``xyz`` ``[3, ...]`` is inside an ellipsoid (mm)."""
    r2 = sum(((xyz[d] - centre[d]) / radii[d]) ** 2 for d in range(3))
    out: npt.NDArray[np.bool_] = r2 <= 1.0
    return out


def _textured_soft_tissue(nrng: np.random.Generator, shape: tuple[int, int, int], low: int
                          ) -> tuple[npt.NDArray[np.bool_], ...]:
    """Fat planes, muscle, grey-matter-like and white-matter-like parts of neck and face.

    Returns four disjoint masks ``[low, j, i]`` (fat, muscle, GM-like, WM-like) covering every
    voxel. Fat lies in thin sheets (the band ``|n| < t`` around the zero set of a smooth field
    with ~11 mm features: fascial planes between muscles); the compartments between them take
    one of three soft-tissue classes from a coarser field, in random proportions. Real neck
    muscles, glands and the tongue have intensities and texture like grey and white matter on
    every contrast; the marble of fat and muscle alone taught the model that anything
    brain-like is brain (Colin27 with skull: the neck read as 0.4 l of brain).
    """
    n1 = _smooth_noise(nrng, shape, (20, 22, 20))[:low]
    n2 = _smooth_noise(nrng, shape, (16, 18, 16))[:low]
    fat = np.abs(n1) < nrng.uniform(0.15, 0.45)
    t1, t2 = np.sort(nrng.uniform(-0.8, 0.8, 2))
    rest = ~fat
    return fat, rest & (n2 < t1), rest & (n2 >= t1) & (n2 < t2), rest & (n2 >= t2)


def _head_fractions(rng: np.random.Generator, dist_mm: Array, xyz: Array, nonbrain: Array,
                    augment: float, extra_csf_mm: float,
                    neck_rng: np.random.Generator | None = None) -> Array:
    """Fractions ``[11, k, j, i]`` of every anatomy label in the non-brain part of each voxel.

    ``dist_mm`` is the distance outside the brain mask (mm, 0 inside), ``xyz`` the MNI position
    each voxel was warped from, ``nonbrain`` the non-brain fraction (1 - brain probability).
    Layers outward from the brain: extra-cerebral CSF, inner table (cortical bone), diploe
    (marrow), outer table, temporal muscle (laterally), subcutaneous fat, skin; then the neck
    (muscle/fat, vertebra, airway, spinal canal) and face (eyes, orbital fat, air sinuses).
    ``neck_rng``: draw the neck and face soft tissue with :func:`_textured_soft_tissue` from
    this stream (``None``: the fat/muscle marble of the stages before ``refine2``).
    """
    shape = dist_mm.shape
    a = augment
    u = (lambda lo, hi: float(rng.uniform(lo, hi))) if a > 0 else (lambda lo, hi: (lo + hi) / 2)
    d = dist_mm + (1.5 * a) * _smooth_noise(rng, shape)
    t_csf = u(1.0, 4.0) + extra_csf_mm
    b1 = t_csf
    b2 = b1 + u(1.0, 2.5)
    dip = u(1.5, 5.0) * (1 + 0.35 * a * _smooth_noise(rng, shape))
    b3 = b2 + np.clip(dip, 0.5, None)
    b4 = b3 + u(1.0, 2.5)
    x, z = xyz[0], xyz[2]
    temporal = np.clip((np.abs(x) - 45.0) / 15.0, 0, 1) * np.clip((35.0 - z) / 20.0, 0, 1)
    b5 = b4 + u(0.0, 9.0) * temporal
    b6 = b5 + u(2.0, 7.0)
    b7 = b6 + u(1.5, 3.0)

    def beyond(b: Array | float) -> Array:
        out: Array = np.clip((d - b) / SPACING_MM + 0.5, 0.0, 1.0).astype(np.float32)
        return out

    f1, f2, f3, f4, f5, f6, f7 = (beyond(b) for b in (b1, b2, b3, b4, b5, b6, b7))
    w = np.zeros((_N_ANATOMY, *shape), np.float32)
    w[4] = 1 - f1
    w[5] = (f1 - f2) + (f3 - f4)
    w[6] = f2 - f3
    w[8] = f4 - f5
    w[7] = f5 - f6
    w[9] = f6 - f7
    outside = f7
    # Neck, face and what replaces the layers there (outside the extra-cerebral CSF): all of it
    # lies below MNI z = 2 mm, so only the slices reaching that low are searched.
    low = int(np.flatnonzero((z < 2.0).any(axis=(1, 2))).max(initial=-1)) + 1
    xyz = xyz[:, :low]
    x, y, z = xyz[0], xyz[1], xyz[2]
    neck = (z < -30.0) & ((x / 55.0) ** 2 + ((y + 15.0) / 55.0) ** 2 <= 1.0)
    face = _ellipsoid(xyz, (0.0, 45.0, -40.0), (62.0, 50.0, 42.0)) & (y > 0)
    marble = _smooth_noise(rng, shape, (10, 12, 10))[:low] > u(-0.3, 0.8)
    w[0] = outside
    soft = (neck | face).astype(np.float32) * outside[:low]
    if neck_rng is None:
        w[7, :low] += soft * marble
        w[8, :low] += soft * ~marble
    else:
        for lab, part in zip((7, 8, 2, 3), _textured_soft_tissue(neck_rng, shape, low),
                             strict=True):
            w[lab, :low] += soft * part
    w[0, :low] -= soft
    out_csf = d[:low] > b1 + 1.0
    below = z < -60.0
    over: list[tuple[npt.NDArray[np.bool_], int]] = [
        (neck & below & ((x / 11.0) ** 2 + ((y + 15.0) / 11.0) ** 2 <= 1.0), 6),  # vertebra
        (neck & (z < -72.0) & ((x / 8.0) ** 2 + ((y + 40.0) / 8.0) ** 2 <= 1.0), 4),  # canal
        (neck & (z < -72.0) & ((x / 4.5) ** 2 + ((y + 40.0) / 4.5) ** 2 <= 1.0), 8),  # cord
        (neck & (z < -50.0) & ((x / 7.0) ** 2 + ((y - 12.0) / 9.0) ** 2 <= 1.0), 0),  # airway
    ]
    for c, r in _SINUSES_MNI:
        over.append((_ellipsoid(xyz, c, r) & out_csf, 0))
    for e in _EYES_MNI:
        back = (e[0] * 0.9, e[1] - 8.0, e[2])
        over.append((_ellipsoid(xyz, back, (16.0, 20.0, 14.0)) & out_csf, 7))  # orbital fat
        over.append((_ellipsoid(xyz, e, (12.0, 12.0, 12.0)) & out_csf, 10))
    for mask, lab in over:
        w[:, :low][:, mask] = 0.0
        w[lab, :low][mask] = 1.0
    w *= nonbrain[None]
    return w


def _draw_means(rng: np.random.Generator, contrast: str, augment: float) -> npt.NDArray[np.float64]:
    """Mean intensity of every label in :data:`LABELS` for one case (0-1 scale).

    Realistic contrasts jitter their table; ``inverted`` is the T1 table upside down;
    ``random`` draws every label uniformly. Lesion means are drawn independently of the
    anatomy (a mass is not CSF-like by construction) but kept visibly apart from grey and white
    matter (0.1 and 0.15 at least), as lesions are by definition.
    """
    if contrast == "random":
        anat = rng.uniform(0.0, 1.0, _N_ANATOMY)
        anat[0] = rng.uniform(0.0, 0.08)
        ranges: tuple[tuple[float, float], ...] = ((0.0, 1.2),) * 3
    elif contrast == "inverted":
        base = np.array(_TABLES["T1"][0])
        anat = np.where(np.arange(_N_ANATOMY) == 0, 0.0, 1.05 - base)
        anat = anat * (rng.uniform(0.85, 1.15, _N_ANATOMY) if augment > 0 else 1.0)
        ranges = ((0.0, 1.2),) * 3
    else:
        tab, ranges = _TABLES[contrast]
        anat = np.array(tab) * (rng.uniform(0.85, 1.15, _N_ANATOMY) ** augment)
    anat[4] = anat[1] * (rng.uniform(0.95, 1.05) if augment > 0 else 1.0)
    les = []
    for lo, hi in ranges:
        v = (lo + hi) / 2
        for _ in range(50):
            v = float(rng.uniform(lo, hi))
            if abs(v - anat[3]) >= 0.15 and abs(v - anat[2]) >= 0.10:
                break
        les.append(v)
    return np.concatenate([anat, les])


def _resample_axis(img: Array, axis: int, factor: float, offset: float) -> Array:
    """Down-sample ``img`` by ``factor`` along ``axis`` (linear) and back to its size."""
    n = img.shape[axis]
    pos = np.arange(offset, n - 1, factor)
    if len(pos) < 2:
        return img
    i0 = np.floor(pos).astype(int)
    t = (pos - i0).astype(np.float32)
    sh = [1, 1, 1]
    sh[axis] = -1
    low = (np.take(img, i0, axis) * (1 - t).reshape(sh)
           + np.take(img, np.minimum(i0 + 1, n - 1), axis) * t.reshape(sh))
    q = np.clip((np.arange(n) - offset) / factor, 0, len(pos) - 1)
    j0 = np.minimum(np.floor(q).astype(int), len(pos) - 2)
    s = (q - j0).astype(np.float32)
    out: Array = (np.take(low, j0, axis) * (1 - s).reshape(sh)
                  + np.take(low, j0 + 1, axis) * s.reshape(sh)).astype(np.float32)
    return out


def _acquire(rng: np.random.Generator, img: Array, augment: float,
             max_in_plane_mm: float = 3.0) -> tuple[Array, dict[str, float]]:
    """Acquisition effects on a 0-1 scale image: resolution, bias, gamma, ghosting, noise.

    ``max_in_plane_mm``: the coarsest in-plane voxel drawn (millimetres; from 2.0).
    """
    a = augment
    meta: dict[str, float] = {}
    shape = img.shape
    if rng.random() < 0.7:
        # Voxel size: one thick axis (slice thickness 2-6 mm; axial most often), the in-plane
        # axes 2 mm to ``max_in_plane_mm`` (finer than the 2 mm grid is the grid itself).
        thick = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
        spacing = [float(rng.uniform(2.0, max_in_plane_mm)) for _ in range(3)]
        spacing[thick] = float(rng.uniform(2.0, 2.0 + 4.0 * a))
        sig = [max(0.0, s / 2.355 / SPACING_MM) if s > 2.2 else 0.0 for s in spacing]
        if any(v > 0 for v in sig):
            img = ndimage.gaussian_filter(img, sig).astype(np.float32)
        for ax, s in enumerate(spacing):
            if s > 2.4:
                img = _resample_axis(img, ax, s / SPACING_MM, float(rng.uniform(0, s / 2)))
        meta.update({f"spacing_{n}_mm": s for n, s in zip("kji", spacing, strict=True)})
    g = np.indices(shape, dtype=np.float32) / np.array(shape, np.float32)[:, None, None, None]
    field_ = sum(rng.normal(0, 0.15 * a) * (g[d] - 0.5) for d in range(3))
    field_ = field_ + rng.normal(0, 0.15 * a) * (g[0] - 0.5) * (g[2] - 0.5) * 4
    field_ = field_ + 0.08 * a * _smooth_noise(rng, shape, (4, 4, 4))
    img = (img * np.exp(field_)).astype(np.float32)
    gamma = float(np.exp(rng.normal(0, 0.2 * a)))
    img = np.power(np.clip(img, 0, None), gamma).astype(np.float32)
    meta["gamma"] = gamma
    if rng.random() < 0.25 * a:  # ghosting along a phase-encode axis
        ax = int(rng.integers(1, 3))
        shift = shape[ax] // 2 if rng.random() < 0.5 else int(rng.integers(3, shape[ax] // 3))
        img = img + np.float32(rng.uniform(0.03, 0.12)) * np.roll(img, shift, axis=ax)
        meta["ghost_axis"] = ax
    if rng.random() < 0.2 * a:  # rigid motion between two halves of k-space: a blurred copy
        ax = int(rng.integers(0, 3))
        b = np.float32(rng.uniform(0.1, 0.35))
        img = (1 - b) * img + b * np.roll(img, int(rng.integers(1, 3)), axis=ax)
    sigma = rng.uniform(0.005, 0.05) * a
    re = img + rng.normal(0, sigma, shape)
    im = rng.normal(0, sigma, shape)
    img = np.sqrt(re**2 + im**2).astype(np.float32)
    meta["noise_sigma"] = float(sigma)
    return img, meta


def _field_of_view(rng: np.random.Generator, brain: npt.NDArray[np.bool_]
                   ) -> npt.NDArray[np.bool_] | None:
    """A partial field of view (``True`` = imaged) cutting into the brain, or ``None``.

    The cut removes up to a quarter of the brain's extent from one side (top, bottom, front,
    back or one side); at least 60 % of the brain stays.
    """
    idx = np.argwhere(brain)
    if len(idx) == 0:
        return None
    lo, hi = idx.min(0), idx.max(0)
    for _ in range(5):
        ax = int(rng.choice(3, p=[0.6, 0.25, 0.15]))
        cut = int(rng.uniform(0.05, 0.25) * (hi[ax] - lo[ax]))
        keep = np.ones(brain.shape, bool)
        sl: list[slice] = [slice(None)] * 3
        if rng.random() < 0.5:
            sl[ax] = slice(hi[ax] - cut + 1, None)
        else:
            sl[ax] = slice(0, lo[ax] + cut)
        keep[tuple(sl)] = False
        if (brain & keep).sum() >= 0.6 * brain.sum():
            return keep
    return None


# --------------------------------------------------------------------------- the generator


def make_case(
    seed: int, *, layout: Layout = "training", diagnosis: int | None = None,
    contrast: str | None = None, augment: float = 1.0, strip: float = 0.0,
    max_in_plane_mm: float = 3.0, neck: Neck = "marble", tilt_deg: float = 0.0,
    fat_sat: float = 0.0,
) -> Case:
    """Generate one synthetic case (SynthSeg-style domain randomisation from label maps).

    Args:
        seed: Random seed (the same seed gives the same case).
        layout: Where lesion centres may lie: ``training`` (parity-0 cells), ``heldout``
            (parity-1 cells) or ``anywhere`` (no cell constraint: the ``refine`` stage, so the
            model cannot learn lesion positions).
        diagnosis: Force a class (index into :data:`DIAGNOSES`); random if ``None``.
        contrast: Force one of :data:`TRAINING_CONTRASTS`; random if ``None`` (drawn with
            :data:`CONTRAST_WEIGHTS`).
        augment: Strength of deformation, anatomy and acquisition effects (0 = the plain
            template with a head of median layer thicknesses and the table intensities).
        strip: Probability that the case is brain-extracted like a skull-stripped scan (all
            non-brain signal zero outside the brain mask, dilated 0-4 mm). Drawn from its own
            random stream, so ``strip=0`` gives exactly the cases it gave before it existed.
        max_in_plane_mm: Coarsest in-plane voxel of the simulated acquisition (mm). The default
            3.0 gives exactly the cases of the stages before ``refine``.
        neck: Soft tissue of neck and face: ``marble`` (fat and muscle; the stages before
            ``refine2``, whose cases it leaves exactly as they were) or ``textured`` (fat
            planes between compartments of muscle-, grey- and white-matter-like intensity,
            drawn from their own random stream; :func:`_textured_soft_tissue`). Either way
            they are background for the tissue head.
        tilt_deg: Largest extra head tilt (degrees): pitch (nodding, about the left-right
            axis) drawn in ``[-tilt_deg, tilt_deg]``, roll and yaw in a third of that, on top
            of the warp's 10 degrees. Real heads lie tilted in the coil and many series are
            planned oblique (dipy's ``aniso_vox`` is tilted ~35 degrees); the node reorients to
            the nearest axes only, so the model sees such slices as they are. Drawn from its
            own random stream: ``0`` gives exactly the cases of the stages before ``refine3``.
        fat_sat: Probability that fat (subcutaneous, orbital, marrow) is suppressed to 0-0.12,
            as in fat-saturated and EPI series. Own random stream; ``0``: as before.
    """
    rng = np.random.default_rng(seed)
    tpl = load_template()
    shape = (int(tpl.t1.shape[0]), int(tpl.t1.shape[1]), int(tpl.t1.shape[2]))
    if augment > 0:
        coords = _random_warp(rng, shape, augment)
    else:
        coords = np.indices(shape, dtype=np.float32)
    if tilt_deg > 0:
        coords = _tilted(np.random.default_rng([seed, 13]), coords, tilt_deg)
    if augment > 0 or tilt_deg > 0:
        probs3 = np.stack([_warp(p, coords) for p in tpl.probs[1:]])
        tex = _warp(tpl.texture, coords)
        signed = _warp(tpl.dist_out - tpl.dist_in, coords, mode="nearest")
        dist_out, dist_in = np.maximum(signed, 0.0), np.maximum(-signed, 0.0)
    else:
        probs3 = tpl.probs[1:].copy()
        tex = tpl.texture.copy()
        dist_out, dist_in = tpl.dist_out.copy(), tpl.dist_in.copy()
    diag = int(rng.integers(3)) if diagnosis is None else int(diagnosis)
    if contrast is None:
        contrast = str(rng.choice(TRAINING_CONTRASTS, p=CONTRAST_WEIGHTS))
    if contrast not in TRAINING_CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; known: {', '.join(TRAINING_CONTRASTS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if neck not in NECKS:
        raise ValueError(f"unknown neck {neck!r}; known: {', '.join(NECKS)}")
    parity = {"training": 0, "heldout": 1, "anywhere": None}[layout]
    meta: dict[str, float] = {}

    # Anatomical variety: enlarged ventricles, widened sulci (CSF grown into tissue).
    extra_csf = 0.0
    if augment > 0 and rng.random() < 0.5:
        vent = (probs3[0] > 0.5) & (dist_in > 12.0)
        lab, n_lab = ndimage.label(vent)
        sizes = np.bincount(lab.ravel(), minlength=n_lab + 1)
        sizes[0] = 0
        vent = sizes[lab] >= 150  # the ventricles, not deep sulcal CSF
        n_it = int(rng.integers(1, 4))
        ball = ndimage.generate_binary_structure(3, 2)
        grown = ndimage.binary_dilation(vent, ball, iterations=n_it) & (dist_in > 8.0) & ~vent
        probs3[0][grown], probs3[1][grown], probs3[2][grown] = 1.0, 0.0, 0.0
        tex[grown] = 0.0
        meta["ventricle_dilation_mm"] = 2.0 * n_it
    if augment > 0 and rng.random() < 0.4:
        sulci = (probs3[0] > 0.5) & (dist_in <= 8.0)
        grow = ndimage.binary_dilation(sulci) & (probs3[1] > 0.5) & (dist_in <= 8.0)
        grow &= _smooth_noise(rng, shape, (10, 12, 10)) > 0
        probs3[0][grow], probs3[1][grow], probs3[2][grow] = 1.0, 0.0, 0.0
        tex[grow] = 0.0
        extra_csf = float(rng.uniform(0.0, 3.0))
        meta["atrophy"] = 1.0
    fov = _field_of_view(rng, probs3.sum(0) > 0.5) if (augment > 0
                                                         and rng.random() < 0.25) else None
    if fov is not None:
        probs3 *= fov[None]
        meta["partial_fov"] = 1.0
    probs = np.concatenate([np.clip(1 - probs3.sum(0, keepdims=True), 0, 1), probs3])
    tissue = np.argmax(probs, axis=0).astype(np.uint8)

    lesion = np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.int16)
    soft = {1: np.zeros(shape, np.float32), 2: np.zeros(shape, np.float32),
            3: np.zeros(shape, np.float32)}
    lesions: list[Lesion] = []
    # MNI z of each output voxel's grid position (the template affine is axial: z from k).
    z_k = (tpl.affine[2, 0] * np.arange(shape[0]) + tpl.affine[2, 3]).astype(np.float32)
    mni_z_ok = np.broadcast_to(z_k[:, None, None], shape)
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

    # Image formation: every label its own mean; partial volumes from the soft maps.
    means = _draw_means(rng, contrast, augment)
    if fat_sat > 0:
        frng = np.random.default_rng([seed, 14])
        if frng.random() < fat_sat:
            for label in ("fat", "marrow"):
                means[LABELS.index(label)] = frng.uniform(0.0, 0.12)
            meta["fat_suppressed"] = 1.0
    xyz = (np.tensordot(tpl.affine[:3, :3], coords, axes=(1, 0))
           + tpl.affine[:3, 3, None, None, None]).astype(np.float32) * np.array(
               [-1.0, -1.0, 1.0], np.float32)[:, None, None, None]
    w = _head_fractions(rng, dist_out, xyz, probs[0], augment, extra_csf,
                        np.random.default_rng([seed, 12]) if neck == "textured" else None)
    w[1:4] += probs[1:4]
    img = np.tensordot(means[:_N_ANATOMY].astype(np.float32), w, axes=1).astype(np.float32)
    # Texture: the template's own (sign and strength random per case: contrasts differ) plus
    # smooth noise with a per-label strength.
    sign = {"T1": 1.0, "random": float(rng.choice([-1.0, 1.0]))}.get(contrast, -1.0)
    gain = sign * (float(rng.uniform(0.3, 1.0)) if augment > 0 else 0.7)
    img += np.float32(gain) * tex * (probs[2] + probs[3])
    if augment > 0:
        noise = _smooth_noise(rng, shape, (24, 28, 24))
        std = rng.uniform(0.0, 0.06, _N_ANATOMY).astype(np.float32)
        img += noise * np.tensordot(std, w, axes=1)
    for cls, mean_idx in ((3, 13), (1, 11), (2, 12)):
        a = soft[cls]
        if cls == 2:
            tx = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0).astype(np.float32)
            target = means[mean_idx] * (1 + 0.25 * tx)
        else:
            target = np.float32(means[mean_idx])
        img = img * (1 - a) + a * target
    img = np.clip(img, 0, None).astype(np.float32)
    if augment > 0:
        img, acq = _acquire(rng, img, augment, max_in_plane_mm)
        meta.update(acq)
        if fov is not None:
            img *= fov
        img *= np.float32(rng.uniform(0.3, 3.0) * 1000.0)
    else:
        img *= np.float32(1000.0)
    if strip > 0:
        srng = np.random.default_rng([seed, 11])
        if srng.random() < strip:
            keep = probs[0] < 0.5
            n_dil = int(srng.integers(0, 3))
            if n_dil:
                keep = ndimage.binary_dilation(keep, iterations=n_dil)
            img *= keep
            meta["skull_stripped_dilation_mm"] = 2.0 * n_dil
    deep = (((probs[1] > 0.5) | (probs[2] > 0.5)) & (dist_in > 20.0)) | (
        (probs[1] > 0.5) & (mni_z_ok < -5.0) & (mni_z_ok > -45.0) & (dist_in > 6.0))
    dname = DIAGNOSES[diag]
    findings, impression = write_report(facts_from_lesions(dname, lesions))
    return Case(
        image=img.astype(np.float32), tissue=tissue, lesion=lesion, instances=instances,
        lesions=lesions, diagnosis=diag, contrast=contrast,
        report=f"findings : {findings} impression : {impression}", affine=tpl.affine.copy(),
        meta=meta, hard_slices=np.flatnonzero(deep.any(axis=(1, 2))),
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


def normalise(image: npt.NDArray[np.floating]) -> Array:
    """The model's input normalisation (the served function, the packaged spec).

    :func:`inference.preprocess.normalise` with :data:`inference.omnimri.config.NORMALISATION`,
    which ``model.yaml`` declares: the same code in training and serving.
    """
    from inference.omnimri.config import NORMALISATION
    from inference.package import NormalisationSpec
    from inference.preprocess import normalise as served

    out, _ = served(np.asarray(image, dtype=np.float32), NormalisationSpec(**NORMALISATION))
    return out
