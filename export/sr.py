"""Comprehensive 3D SR, TID 1500 Measurement Report, with highdicom.

Content tree::

    Imaging Measurement Report (126000, DCM)            TID 1500, PRELIMINARY / UNVERIFIED
    ├─ observer: device = the model on this node
    ├─ procedure reported: Brain MRI (24590-2, LN)
    ├─ Image Library: every source instance
    ├─ Imaging Measurements
    │   ├─ per segment: Measurement Group (TID 1411) → Referenced Segment (the SEG segment),
    │   │   Volume (118565006, SCT) in ml; tracking id + UID (same UID as the SEG segment)
    │   └─ per detection: Measurement Group (TID 1411) → SCOORD3D POINT at the centroid,
    │       Diameter (81827009, SCT) mm, Volume ml, Probability (122157, DCM); tracking id + UID
    └─ Qualitative Evaluations (C0034375, UMLS)
        ├─ CODE Finding (121071, DCM) = the diagnostic suggestion
        │   └─ HAS PROPERTIES NUM Probability (122157, DCM), no units (0..1)
        ├─ TEXT Finding (121071, DCM) = generated findings
        └─ TEXT Impression (121073, DCM) = generated impression
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import structlog
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from export import uids
from export.common import (
    contributing_equipment,
    finish,
    key_slices,
    series_description,
    to_coded,
)
from export.context import ExportContext
from export.seg import segment_numbering
from inference.results import BRAIN

log = structlog.get_logger(__name__)

MILLILITER = PydicomCode("ml", "UCUM", "milliliter")
NO_UNITS = codes.UCUM.NoUnits
QUALITATIVE_EVALUATIONS = PydicomCode("C0034375", "UMLS", "Qualitative Evaluations")
BRAIN_MRI = codes.LN.BrainMRI
"""Procedure reported: Brain MRI (24590-2, LN)."""


def _observation_context(ctx: ExportContext) -> hd.sr.ObservationContext:
    model = ctx.results.model
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.derived_uid(f"{model.name}:{model.version}", "device", ctx.options.node_name),
        name=model.name[:64],
        manufacturer_name=model.manufacturer[:64],
        model_name=f"{model.name} {model.version}".strip()[:64],
        serial_number=ctx.options.node_name[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _algorithm(ctx: ExportContext) -> hd.sr.AlgorithmIdentification:
    model = ctx.results.model
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64], version=(model.version or "unknown")[:64],
        family=to_coded(model.algorithm_family),
    )


def _referenced_segment(
    seg: Dataset, seg_number: int, source_series_uid: str
) -> hd.sr.ReferencedSegment:
    """Reference to one SEG segment, with its source named by series (TID 1411 row 8 option).

    Naming the source series rather than every source image keeps the SR small and fast for
    long series (the SEG itself references each source frame). Built directly rather than with
    ``ReferencedSegment.from_segmentation``, which in highdicom 0.28 fails on LABELMAP SEGs (no
    per-frame Segment Identification there).
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=seg_number,
        source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
    )


def _library(ctx: ExportContext) -> list[Dataset] | None:
    """Image Library entries: the images the content points at (detections) and key slices.

    highdicom's Image Library reads per-instance geometry, so classic series only.
    """
    if ctx.multiframe_source is not None:
        return None
    n = ctx.volume.shape[0]
    slices = [min(max(round(d.centroid_index[0]), 0), n - 1) for d in ctx.results.detections]
    slices += key_slices(ctx)
    chosen: dict[str, Dataset] = {}
    for k in slices:
        src, _ = ctx.source_of_slice(int(k))
        chosen.setdefault(str(src.SOPInstanceUID), src)
    return list(chosen.values()) or None


def _segment_groups(
    ctx: ExportContext, seg: Dataset | None
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
]:
    """Volume per segment; referencing the SEG segment (TID 1411), or TID 1501 without a SEG."""
    numbering = segment_numbering(ctx.results.segments)
    spacing = ctx.volume.spacing
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for s in sorted(ctx.results.segments, key=lambda m: m.label.number):
        lab = s.label
        tracking = hd.sr.TrackingIdentifier(
            uid=uids.derived_uid(ctx.job_id, "segment", lab.number),
            identifier=f"{lab.label}"[:64],
        )
        volume = [
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=round(s.volume_ml(spacing), 3), unit=MILLILITER
            )
        ]
        if seg is None:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=to_coded(lab.type),
                    finding_category=to_coded(lab.category),
                    algorithm_id=_algorithm(ctx),
                    measurements=volume,
                )
            )
            continue
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=_referenced_segment(
                    seg, numbering[lab.number], str(ctx.sources[0].SeriesInstanceUID)
                ),
                finding_type=to_coded(lab.type),
                finding_category=to_coded(lab.category),
                algorithm_id=_algorithm(ctx),
                measurements=volume,
            )
        )
    return groups


def _detection_groups(
    ctx: ExportContext,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    groups = []
    n_slices = ctx.volume.shape[0]
    for n, det in enumerate(ctx.results.detections, start=1):
        k = min(max(round(det.centroid_index[0]), 0), n_slices - 1)
        src, frame = ctx.source_of_slice(k)
        source_image = hd.sr.SourceImageForSegmentation.from_source_image(
            src, referenced_frame_numbers=[frame] if frame is not None else None
        )
        sites = None
        if det.side in ("left", "right"):
            side = codes.SCT.Left if det.side == "left" else codes.SCT.Right
            sites = [hd.sr.FindingSite(anatomic_location=to_coded(BRAIN), laterality=side)]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.derived_uid(ctx.job_id, "detection", n),
                    identifier=(det.tracking_id or f"lesion-{n}")[:64],
                ),
                referenced_volume_surface=hd.sr.VolumeSurface(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=np.array([det.centroid_lps_mm], dtype=np.float64),
                    frame_of_reference_uid=str(src.FrameOfReferenceUID),
                    source_images=[source_image],
                ),
                finding_type=to_coded(det.finding),
                algorithm_id=_algorithm(ctx),
                finding_sites=sites,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Diameter, value=round(det.diameter_mm, 2),
                        unit=codes.UCUM.Millimeter,
                    ),
                    hd.sr.Measurement(
                        name=codes.SCT.Volume, value=round(det.volume_ml, 3), unit=MILLILITER
                    ),
                    hd.sr.Measurement(
                        name=codes.DCM.Probability, value=round(det.probability, 4), unit=NO_UNITS
                    ),
                ],
            )
        )
    return groups


def _qualitative_evaluations(ctx: ExportContext) -> hd.sr.ContainerContentItem | None:
    res = ctx.results
    if res.diagnosis is None and res.report is None:
        return None
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = []
    if res.diagnosis is not None:
        dx = hd.sr.CodeContentItem(
            name=codes.DCM.Finding,
            value=to_coded(res.diagnosis.code),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        dx.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.NumContentItem(
                    name=codes.DCM.Probability,
                    value=round(res.diagnosis.probability, 4),
                    unit=NO_UNITS,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
                )
            ]
        )
        items.append(dx)
    if res.report is not None:
        for name, text in (
            (codes.DCM.Finding, res.report.findings),
            (codes.DCM.Impression, res.report.impression),
        ):
            if text:
                items.append(
                    hd.sr.TextContentItem(
                        name=name, value=text,
                        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                    )
                )
    if not items:
        return None
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(ctx: ExportContext, seg: Dataset | None) -> list[Dataset]:
    """The TID 1500 Comprehensive 3D SR of ``ctx.results`` (empty if nothing to report).

    Args:
        ctx: The export context.
        seg: The SEG written for the same results (from :func:`export.seg.build_seg`), or
            ``None`` if no SEG is written: segment volumes are then reported without a
            reference to the segment (TID 1501 groups).
    """
    res = ctx.results
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    evidence: list[Dataset] = []
    if res.segments:
        if seg is not None:
            evidence.append(seg)
        groups.extend(_segment_groups(ctx, seg))
    groups.extend(_detection_groups(ctx))
    if not groups and res.diagnosis is not None:
        # TID 1500 needs at least one measurement group: a TID 1501 group with the suggestion.
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.derived_uid(ctx.job_id, "diagnosis"), identifier="diagnosis"
                ),
                algorithm_id=_algorithm(ctx),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=codes.DCM.Finding, value=to_coded(res.diagnosis.code)
                    )
                ],
            )
        )
    if not groups:
        log.info("sr skipped: nothing measured", job_id=ctx.job_id)
        return []
    sources = ctx.slice_sources()
    evidence.extend(sources)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(ctx),
        procedure_reported=BRAIN_MRI,
        imaging_measurements=groups,
        referenced_images=_library(ctx),
    )
    qualitative = _qualitative_evaluations(ctx)
    if qualitative is not None:
        report[0].ContentSequence.append(qualitative)
    model = res.model
    when = ctx.content_datetime
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids.series_uid(ctx.job_id, "sr"),
        series_number=ctx.options.series_numbers.get("sr", 9002),
        sop_instance_uid=uids.instance_uid(ctx.job_id, "sr"),
        instance_number=1,
        manufacturer=model.manufacturer[:64],
        is_complete=False,
        is_final=False,  # PreliminaryFlag PRELIMINARY; with PARTIAL and UNVERIFIED
        is_verified=False,
        institution_name=ctx.options.institution_name,
        contributing_equipment=contributing_equipment(ctx),
        series_description=series_description("sr", model),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    finish(sr, ctx, image=False)
    log.info(
        "sr built", job_id=ctx.job_id, groups=len(groups), evidence=len(evidence),
    )
    return [sr]
