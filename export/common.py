"""What every derived object shares: research marking, equipment, descriptions, key slices.

* ContentQualification (0018,9004) = ``RESEARCH`` on every object.
* Contributing Equipment Sequence naming the model, its version and the node (IHE AI Results).
* Series descriptions that say at a glance: AI output, which kind, not for diagnostic use.
* Patient and study modules copied from the source (highdicom copies the core attributes; a few
  optional ones are added here).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import numpy.typing as npt
from highdicom import AlgorithmIdentificationSequence, ContributingEquipment
from highdicom.color import CIELabColor
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from export.context import ExportContext, OutputKind
from inference.results import Code, ModelInfo

RESEARCH = "RESEARCH"
"""ContentQualification value written on every derived object."""

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
NOT_FOR_DIAGNOSTIC_SHORT = "NOT FOR DIAGNOSIS"

_KIND_WORDS: dict[str, str] = {
    "seg": "SEG",
    "sr": "MEASUREMENTS",
    "sc": "KEY IMAGES",
    "pr": "ANNOTATIONS",
    "ko": "KEY OBJECTS",
}

_COPIED_PATIENT_STUDY = (
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "IssuerOfPatientID",
    "StudyDescription",
    "BodyPartExamined",
)
"""Optional patient/study attributes highdicom does not copy; copied from the source if set."""


def to_coded(code: Code) -> CodedConcept:
    """An :class:`inference.results.Code` as a highdicom ``CodedConcept``."""
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def series_description(kind: OutputKind, model: ModelInfo) -> str:
    """Series Description for output ``kind``: ``AI <KIND> <model> <version> - NOT FOR DIAG...``.

    Always at most 64 characters (LO); the model part is shortened first.
    """
    head = f"AI {_KIND_WORDS[kind]}"
    tail = f"RESEARCH - {NOT_FOR_DIAGNOSTIC_SHORT}"
    room = 64 - len(head) - len(tail) - 2
    model_part = f"{model.name} {model.version}".strip()[: max(room, 0)].strip()
    return " ".join(p for p in (head, model_part, tail) if p)[:64]



def algorithm_identification(model: ModelInfo) -> AlgorithmIdentificationSequence:
    """Algorithm Identification: model name, version and family (AI, 123110 DCM)."""
    return AlgorithmIdentificationSequence(
        name=model.name[:64],
        family=to_coded(model.algorithm_family),
        version=(model.version or "unknown")[:64],
    )


def contributing_equipment(ctx: ExportContext) -> list[ContributingEquipment]:
    """Contributing Equipment: the model (processing equipment) run on this node."""
    model = ctx.results.model
    versions = [model.version or "unknown"]
    node_version = ctx.options.node_version or model.node_version
    if node_version:
        versions.append(f"node {node_version}")
    return [
        ContributingEquipment(
            manufacturer=model.manufacturer[:64],
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=model.name[:64],
            software_versions=versions,
            device_serial_number=ctx.options.node_name[:64],
            station_name=ctx.options.node_name[:16],
            institution_name=ctx.options.institution_name,
            contribution_datetime=ctx.content_datetime,
            contribution_description=f"AI analysis, research use only ({model.name})"[:64],
        )
    ]


def software_versions(ctx: ExportContext) -> tuple[str]:
    """Software Versions (0018,1020): model version, plus the node version if known.

    A list at run time (pydicom wants lists for multi-valued elements); typed as highdicom's
    parameter hint.
    """
    model = ctx.results.model
    node_version = ctx.options.node_version or model.node_version
    values = [model.version or "unknown"]
    if node_version:
        values.append(f"node {node_version}")
    return cast("tuple[str]", values)


def lab_color(rgb: tuple[int, int, int]) -> CIELabColor:
    """Recommended display colour as CIELab, from 0-255 sRGB."""
    r, g, b = (min(max(int(v), 0), 255) for v in rgb)
    return CIELabColor.from_rgb(r, g, b)


def finish(ds: Dataset, ctx: ExportContext, *, image: bool = True) -> Dataset:
    """Apply what all outputs share after highdicom built ``ds``; returns ``ds``.

    Sets ContentQualification RESEARCH and copies optional patient/study attributes
    (Body Part Examined only for ``image`` IODs, whose General Series module has it).
    """
    ds.ContentQualification = RESEARCH
    src = ctx.sources[0]
    for kw in _COPIED_PATIENT_STUDY:
        if kw == "BodyPartExamined" and not image:
            continue
        if kw not in ds and kw in src and src[kw].value not in (None, ""):
            setattr(ds, kw, src[kw].value)
    return ds


def key_slices(ctx: ExportContext) -> list[int]:
    """Slices worth showing, most important first (at most ``options.max_key_slices``).

    Order: the centre slice of each detection, largest first; then the slices with the most
    pathological, then the most segmented voxels, at least ``n / (2 * max)`` slices apart; with
    no segments at all, the middle slice.
    """
    n = ctx.volume.shape[0]
    limit = max(1, ctx.options.max_key_slices)
    chosen: list[int] = []
    for det in sorted(ctx.results.detections, key=lambda d: -d.volume_ml):
        k = int(np.clip(round(det.centroid_index[0]), 0, n - 1))
        if k not in chosen:
            chosen.append(k)
        if len(chosen) >= limit:
            return chosen
    min_gap = max(1, n // (2 * limit))
    for task in ("pathological", None):
        masks = [
            s.mask for s in ctx.results.segments if task is None or s.label.task == task
        ]
        if not masks:
            continue
        counts = np.zeros(n, dtype=np.int64)
        for m in masks:
            counts += m.reshape(n, -1).sum(axis=1)
        for k in np.argsort(-counts, kind="stable"):
            if counts[k] == 0 or len(chosen) >= limit:
                break
            if all(abs(int(k) - c) >= min_gap for c in chosen):
                chosen.append(int(k))
    if not chosen:
        chosen.append(n // 2)
    return chosen


def display_window(array: npt.NDArray[np.float32]) -> tuple[float, float]:
    """``(low, high)`` display window: 0.5th and 99.5th percentiles (of every 2nd voxel in-plane).

    Used for the burned-in key slices and the GSPS VOI window, so both look alike.
    """
    sample = array[:, ::2, ::2] if array.ndim == 3 else array
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))
