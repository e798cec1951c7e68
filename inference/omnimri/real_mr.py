"""Real MR that no one here made, through the whole OmniMRI model: what comes out.

Three inputs ship inside installed packages: pydicom's ``MR_small.dcm`` (one 64x64 slice),
nibabel's ``tests/data/anatomical.nii`` (33x41x25, 2 mm, skull on) and the MNI152 template as a
1 mm DICOM series (:func:`omnimri_samples.brain_series`). :func:`describe` runs each through
ONNX Runtime and the task post-processing with every instruction and summarises the results,
so the model card's "Real MR sanity" section is measured, not written by hand
(``omnimri-node eval --real-mr``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ALL = ["segment brain tissues", "detect abnormalities", "suggest a diagnosis",
       "write the report", "reconstruct"]


def pydicom_mr_small() -> Any:
    """The file ``MR_small.dcm`` from pydicom as a :class:`inference.volume.Volume`."""
    from inference.volume import build_volume
    from omnimri_samples import iter_pydicom_mr_files

    path = next(p for p in iter_pydicom_mr_files() if p.name == "MR_small.dcm")
    return build_volume([path])


def nibabel_anatomical() -> Any:
    """The nibabel test volume ``anatomical.nii`` on an axial LPS ``[k, j, i]`` grid."""
    import nibabel as nib

    from inference.volume import SliceRef, Volume

    img: Any = nib.load(str(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"))
    data = np.asarray(img.get_fdata(), np.float32)  # [x, y, z]
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # [k=z, j=y, i=x]
    ras = np.asarray(img.affine, np.float64)
    kji_to_ijk = np.zeros((4, 4))
    kji_to_ijk[0, 2] = kji_to_ijk[1, 1] = kji_to_ijk[2, 0] = kji_to_ijk[3, 3] = 1.0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras @ kji_to_ijk
    return Volume(arr, affine, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.4")
                                for k in range(arr.shape[0])])


def mni_brain_series(folder: Path) -> Any:
    """The MNI152 template written as a 1 mm DICOM series into ``folder``, read back."""
    from inference.volume import build_volume
    from omnimri_samples import brain_series, write_series

    return build_volume(write_series(brain_series(), folder))


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


def describe(package: Any) -> list[str]:
    """Run the three real inputs through ``package`` (all instructions); one line each."""
    from inference.omnimri.tasks import run_omnimri

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("pydicom MR_small.dcm", pydicom_mr_small),
                           ("nibabel anatomical.nii", nibabel_anatomical),
                           ("MNI152 template as 1 mm DICOM",
                            lambda: mni_brain_series(Path(tmp)))):
            vol = make()
            res = run_omnimri(package, vol, ALL)
            out.append(f"{name} {tuple(vol.shape)}: {summarise(res, vol.spacing)}")
    return out
