"""Real MR that no one here made, through the served OmniMRI path: what comes out.

The acceptance list: every normal adult brain MR found in installed or installable packages
(no network at run time), plus the MNI152 template as a DICOM series. Each runs exactly what a
node job runs (:class:`inference.volume.Volume` -> :func:`inference.preprocess.prepare` ->
engine -> post-processing -> :class:`inference.results.Results`, through
:func:`inference.omnimri.tasks.run_omnimri`) with every instruction, and one line per scan
gives the detections, the diagnosis, the brain volume (ml) and the tissue fractions, so the
model card's real-MR section is measured, not written by hand (``omnimri-node eval --real-mr``).

Sources (``SOURCES``; a missing optional package skips its scans, said so in the output):

* ``nibabel``: ``tests/data/anatomical.nii`` - T1, 2 mm, a skull-less *central crop* of a brain
  (33x41x25 voxels), not a whole brain;
* ``dipy``: ``data/files/aniso_vox.nii.gz`` - a whole head (skull on), T2-like, 4x4x5 mm;
* ``pydicom``: ``MR_small.dcm`` - one 64x64 slice (a crop), not a brain volume;
* the MNI152 2009a template (nilearn) written as a 1 mm DICOM series and read back by the
  node's volume builder - a whole, skull-stripped brain (the template brain is 1.88 l);
* Debian's ``mricron-data``: ``/usr/share/mricron/templates/ch2.nii.gz`` - "Colin27" (Holmes
  et al. 1998), one real adult's T1 **with scalp, skull, face and the top of the neck**
  (27 scans averaged, 1 mm, 181x217x181), and ``ch2better.nii.gz``, the same head at 0.5 mm;
  ``ch2bet.nii.gz`` is its brain extracted by FSL BET, against which the model's Brain segment
  is scored (Dice; BET's mask is a reference, not ground truth: it keeps some sulcal CSF);
* the same Colin27 head **pitched 20 degrees** on the same axial grid (resampled, linear; BET's
  mask pitched with it): a head tilted in the coil, whose slices stay oblique to the anatomy
  after the node's reorientation to the nearest axes (it does not rotate).

Looked at and left out: ``pydicom-data``'s ``emri_small.dcm`` (Enhanced MR, a 64x64 sagittal
crop of a head) carries no geometry at all, and the volume builder refuses it by name;
``dipy``'s ``S0_10slices.nii.gz`` declares 53 mm between its 10 slices (a broken header);
``dipy``'s ``t1_coronal_slice.npy`` is one headerless coronal T1 slice: on the model's axial
2.5D grid a single coronal plane is one voxel thick, so nothing is segmented (tried: brain
0 ml, no detection), and it tests nothing but the absence of a mass;
scikit-image's ``data.brain()`` is not in its wheel (fetched from the network on first use).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ALL = ["segment brain tissues", "detect abnormalities", "suggest a diagnosis",
       "write the report", "reconstruct"]

BRAIN_ML_RANGE = (1000.0, 1800.0)
"""Target brain volume of a whole adult brain, ml (issue #11)."""


def _nifti_volume(path: Path) -> Any:
    """A NIfTI file as a :class:`inference.volume.Volume` on its own ``[k, j, i]`` grid.

    NIfTI ``[x, y, z]`` with a RAS+ affine becomes ``[k=z, j=y, i=x]`` with the LPS affine
    (x and y negated); nothing is resampled.
    """
    import nibabel as nib

    from inference.volume import SliceRef, Volume

    img: Any = nib.load(str(path))
    data = np.asarray(img.get_fdata(), np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    ras = np.asarray(img.affine, np.float64)
    kji_to_ijk = np.zeros((4, 4))
    kji_to_ijk[0, 2] = kji_to_ijk[1, 1] = kji_to_ijk[2, 0] = kji_to_ijk[3, 3] = 1.0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras @ kji_to_ijk
    return Volume(arr, affine, [SliceRef(f"2.25.{k + 1}", "1.2.840.10008.5.1.4.1.1.4")
                                for k in range(arr.shape[0])])


def pydicom_mr_small() -> Any:
    """``MR_small.dcm`` from pydicom's own test files as a one-slice volume."""
    from pydicom.data import get_testdata_file

    from inference.volume import build_volume

    path = get_testdata_file("MR_small.dcm")
    if path is None:
        raise FileNotFoundError("pydicom test file MR_small.dcm not found")
    return build_volume([Path(str(path))])


def nibabel_anatomical() -> Any:
    """The nibabel test file ``tests/data/anatomical.nii`` (skull-less central crop, T1, 2 mm)."""
    import nibabel as nib

    return _nifti_volume(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii")


def dipy_aniso_vox() -> Any:
    """The dipy file ``data/files/aniso_vox.nii.gz``: a whole head, skull on, T2-like, 4x4x5 mm."""
    import dipy

    return _nifti_volume(Path(dipy.__file__).parent / "data" / "files" / "aniso_vox.nii.gz")


MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
"""Where Debian's ``mricron-data`` puts the Colin27 head (``apt-get install mricron-data``)."""


def colin27(name: str = "ch2.nii.gz") -> Any:
    """Colin27 from ``mricron-data`` (``ch2.nii.gz``: 1 mm with skull; ``ch2better``: 0.5 mm)."""
    return _nifti_volume(MRICRON_TEMPLATES / name)


def colin27_brain_mask() -> npt.NDArray[np.bool_]:
    """FSL BET's brain of Colin27 (``ch2bet.nii.gz``) on the ``ch2.nii.gz`` grid (1 mm)."""
    out: npt.NDArray[np.bool_] = colin27("ch2bet.nii.gz").array > 0
    return out


COLIN27_PITCH_DEG = 20.0
"""Pitch of the tilted Colin27 source (degrees, about the left-right axis)."""


def _pitched(array: npt.NDArray[np.floating], degrees: float, order: int) -> npt.NDArray[Any]:
    """``array`` ``[k, j, i]`` rotated by ``degrees`` in the k-j (sagittal) plane about its centre.

    The grid stays axial: the head, not the scanner, is tilted (a patient lying with the head
    tilted in the coil), so the node's reorientation to the nearest axes leaves the slices oblique
    to the anatomy, as in many clinical series.
    """
    from scipy import ndimage

    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    centre = (np.array(array.shape, np.float64) - 1) / 2.0
    out: npt.NDArray[Any] = ndimage.affine_transform(array, rot, offset=centre - rot @ centre,
                                                     order=order, mode="constant", cval=0.0)
    return out


def colin27_pitched() -> Any:
    """Colin27 (``ch2.nii.gz``, 1 mm, with skull), the head pitched on the same axial grid.

    By :data:`COLIN27_PITCH_DEG` (linear interpolation).
    """
    from inference.volume import Volume

    vol = colin27()
    arr = _pitched(vol.array, COLIN27_PITCH_DEG, 1).astype(np.float32)
    return Volume(arr, vol.affine, vol.slices, metadata=dict(vol.metadata))


def colin27_pitched_brain_mask() -> npt.NDArray[np.bool_]:
    """BET's brain of Colin27 pitched as :func:`colin27_pitched` (nearest neighbour)."""
    out: npt.NDArray[np.bool_] = _pitched(colin27_brain_mask().astype(np.uint8),
                                          COLIN27_PITCH_DEG, 0) > 0
    return out


def mni_brain_series(folder: Path) -> Any:
    """The MNI152 template written as a 1 mm DICOM series into ``folder``, read back."""
    from inference.volume import build_volume
    from omnimri_samples import brain_series, write_series

    return build_volume(write_series(brain_series(), folder))


@dataclass(frozen=True)
class Source:
    """One real scan of the acceptance list."""

    name: str
    whole_brain: bool
    """Whether the brain-volume target (:data:`BRAIN_ML_RANGE`) applies (not to crops)."""
    make: Callable[[Path], Any]
    """Builds the volume (``folder`` for scratch files)."""
    reference_brain: Callable[[], npt.NDArray[np.bool_]] | None = None
    """A reference brain mask on the volume's own grid (scored as Dice), if there is one."""


SOURCES: tuple[Source, ...] = (
    Source("nibabel anatomical.nii (T1, skull-less central crop)", False,
           lambda _: nibabel_anatomical()),
    Source("dipy aniso_vox.nii.gz (T2-like head, skull on, 4x4x5 mm)", True,
           lambda _: dipy_aniso_vox()),
    Source("pydicom MR_small.dcm (one 64x64 slice)", False, lambda _: pydicom_mr_small()),
    Source("MNI152 2009a template as 1 mm DICOM (skull-stripped)", True, mni_brain_series),
    Source("Colin27 ch2.nii.gz (T1 with skull, face, neck; 1 mm)", True,
           lambda _: colin27("ch2.nii.gz"), colin27_brain_mask),
    Source("Colin27 ch2better.nii.gz (T1 with skull; 0.5 mm)", True,
           lambda _: colin27("ch2better.nii.gz")),
    Source(f"Colin27 pitched {COLIN27_PITCH_DEG:.0f} degrees (ch2.nii.gz resampled; axial)", True,
           lambda _: colin27_pitched(), colin27_pitched_brain_mask),
)


@dataclass
class RealResult:
    """What the served model said about one real scan."""

    name: str
    shape: tuple[int, ...]
    whole_brain: bool
    brain_ml: float
    fractions: dict[str, float]
    """CSF / grey matter / white matter volume over brain volume."""
    detections: list[str]
    diagnosis: str
    probability: float
    findings: str
    brain_dice: float | None = None
    """Dice of the Brain segment against :attr:`Source.reference_brain` (``None``: none)."""

    @property
    def normal(self) -> bool:
        """No detection and diagnosis normal."""
        return not self.detections and self.diagnosis == "Normal"

    @property
    def brain_ok(self) -> bool | None:
        """Brain volume within :data:`BRAIN_ML_RANGE` (``None`` for crops)."""
        if not self.whole_brain:
            return None
        return BRAIN_ML_RANGE[0] <= self.brain_ml <= BRAIN_ML_RANGE[1]

    def line(self) -> str:
        """One line for the CLI and the model card."""
        fr = " ".join(f"{k} {v:.2f}" for k, v in self.fractions.items())
        dets = "; ".join(self.detections) or "none"
        target = {None: "no target (crop)", True: "PASS", False: "MISS"}[self.brain_ok]
        ref = "" if self.brain_dice is None else f" (Dice {self.brain_dice:.3f} vs BET)"
        return (f"{self.name} {self.shape}: normal {'PASS' if self.normal else 'MISS'}; "
                f"detections: {dets}; diagnosis: {self.diagnosis} (p = {self.probability:.2f}); "
                f"brain {self.brain_ml:.0f} ml [{target}]{ref}; fractions {fr}; "
                f"findings: \"{self.findings}\"")


def result_of(name: str, whole_brain: bool, res: Any, volume: Any,
              reference_brain: npt.NDArray[np.bool_] | None = None) -> RealResult:
    """Summarise :class:`inference.results.Results` of one scan.

    ``reference_brain``: a brain mask on the volume's grid to score the Brain segment against.
    """
    spacing = volume.spacing
    seg = {s.label.label: s.volume_ml(spacing) for s in res.segments}
    dice: float | None = None
    if reference_brain is not None:
        mine = next((s.mask.astype(bool) for s in res.segments if s.label.label == "Brain"),
                    np.zeros(reference_brain.shape, bool))
        total = int(mine.sum()) + int(reference_brain.sum())
        dice = 2.0 * float((mine & reference_brain).sum()) / total if total else 1.0
    brain = float(seg.get("Brain", 0.0))
    fr = {k: (float(seg.get(n, 0.0)) / brain if brain > 0 else 0.0)
          for k, n in (("CSF", "CSF"), ("GM", "Grey matter"), ("WM", "White matter"))}
    dets = [f"{'mass' if 'Mass' in d.finding.meaning else 'WMH'} {d.diameter_mm:.0f} mm "
            f"{d.side} {d.location} (p {d.probability:.2f})" for d in res.detections]
    dg = res.diagnosis
    return RealResult(name=name, shape=tuple(int(v) for v in volume.shape),
                      whole_brain=whole_brain, brain_ml=brain, fractions=fr, detections=dets,
                      diagnosis=dg.code.meaning if dg else "-",
                      probability=float(dg.probability) if dg else 0.0,
                      findings=res.report.findings if res.report else "", brain_dice=dice)


def summarise(res: Any, spacing: Any) -> str:
    """One line: segment volumes (ml), detections, diagnosis, findings."""
    seg = ", ".join(f"{s.label.label} {s.volume_ml(spacing):.1f} ml" for s in res.segments
                    if s.label.label in ("Brain", "CSF", "Grey matter", "White matter"))
    dets = "; ".join(f"{'mass' if 'Mass' in d.finding.meaning else 'WMH'} {d.diameter_mm:.0f} mm "
                     f"{d.side} {d.location}" for d in res.detections) or "none"
    dg = res.diagnosis
    diag = f"{dg.code.meaning} (p = {dg.probability:.2f})" if dg else "-"
    return (f"{seg}; detections: {dets}; diagnosis: {diag}; "
            f"findings: \"{res.report.findings if res.report else ''}\"")


def run_all(package: Any, sources: tuple[Source, ...] = SOURCES) -> list[RealResult | str]:
    """Run every source through ``package`` on the served path; a string for a skipped one."""
    from inference.omnimri.tasks import run_omnimri

    out: list[RealResult | str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, src in enumerate(sources):
            try:
                folder = Path(tmp) / str(n)
                folder.mkdir()
                vol = src.make(folder)
            except (ImportError, FileNotFoundError) as exc:
                out.append(f"{src.name}: skipped ({type(exc).__name__}: {exc})")
                continue
            res = run_omnimri(package, vol, ALL)
            ref = src.reference_brain() if src.reference_brain else None
            out.append(result_of(src.name, src.whole_brain, res, vol, ref))
    return out


def describe(package: Any) -> list[str]:
    """One line per real scan, then a tally against the targets."""
    results = run_all(package)
    lines = [r if isinstance(r, str) else r.line() for r in results]
    done = [r for r in results if isinstance(r, RealResult)]
    n_normal = sum(r.normal for r in done)
    whole = [r for r in done if r.whole_brain]
    n_brain = sum(bool(r.brain_ok) for r in whole)
    lines.append(f"real MR: {n_normal}/{len(done)} read as normal (no detection, diagnosis "
                 f"normal); brain volume in {BRAIN_ML_RANGE[0]:.0f}-{BRAIN_ML_RANGE[1]:.0f} ml "
                 f"for {n_brain}/{len(whole)} whole brains")
    return lines

