"""Comprehensive 3D SR, TID 1500 Measurement Report, with highdicom, written for viewers.

Content tree::

    Imaging Measurement Report (126000, DCM)            TID 1500, PRELIMINARY / UNVERIFIED
    ├─ observer: device = the model on this node
    ├─ procedure reported: MRI unspecified body region (25056-3, LN; CID 100)
    ├─ Image Library: the detections' key source images and the key slices
    ├─ Imaging Measurements                     (only detections: every group has coordinates)
    │   └─ per detection: TID 1410 planar ROI, SCOORD closed POLYLINE (rectangle, 5 points)
    │       around the detection on its centre slice (SELECTED FROM that source image),
    │       Diameter (81827009, SCT) mm INFERRED FROM the same SCOORD, Volume ml,
    │       Probability (122157, DCM) %, finding site lobe + laterality; tracking id + UID
    └─ Qualitative Evaluations (C0034375, UMLS)
        ├─ CODE Finding (121071, DCM) = the diagnostic suggestion
        │   └─ HAS PROPERTIES NUM Probability (122157, DCM), no units (0..1)
        ├─ TEXT Finding (121071, DCM) = generated findings, in sentences
        ├─ TEXT Impression (121073, DCM) = generated impression, in sentences
        └─ per segment: TID 1411 group → Referenced Segment (the SEG segment), Volume ml;
            segments not in the SEG (a union such as Brain) as TID 1501 groups, no reference

Why the segment volumes are not in Imaging Measurements: OHIF (3.13, ``cornerstone-dicom-sr``)
turns every Measurement Group there into a measurement and dereferences its first coordinate;
a group with a number and a segment reference but no coordinates throws (``reading
'ReferencedSOPSequence'``) and leaves the SR viewport black. OHIF reads only that container, so
the volumes sit in the Qualitative Evaluations container (TID 1500 is extensible; pixelmed's
DicomSRValidator: "not in template" warnings, no error), where :func:`segment_volume_groups`
and text renderings find them. The Derived Imaging Measurements container (row 10) would fit
better but makes pixelmed 20220618 fail internally (its TID 1420 needs a CID 7465 it lacks).
The 2D SCOORD on a referenced source image is what OHIF draws (a SCOORD3D point is not drawn,
and pixelmed refuses TID 1410 and 1411 groups mixed in one container, so there is no 3D
duplicate); the first NUM (Diameter) is OHIF's label and the first finding site its location.
A rectangle rather than an ellipse: OHIF's adapters hydrate a closed 5-point POLYLINE on Image
Region (111030, DCM) into its RectangleROI tool, so the detections are listed in its
Measurements panel (an ELLIPSE is drawn but not hydrated without a Cornerstone tracking id).
"""

from __future__ import annotations

import copy

import highdicom as hd
import structlog
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from export import uids
from export.common import detection_box, finish, key_slices, to_coded
from export.context import NOTHING_BUILT, Built, ExportContext
from export.limits import fit
from export.seg import numbering_in
from export.text import sentence_case
from inference.results import BRAIN, Detection

log = structlog.get_logger(__name__)

MILLILITER = PydicomCode("ml", "UCUM", "milliliter")
NO_UNITS = codes.UCUM.NoUnits
PERCENT = codes.UCUM.Percent
QUALITATIVE_EVALUATIONS = PydicomCode("C0034375", "UMLS", "Qualitative Evaluations")
PROCEDURE = codes.LN.MRIUnspecifiedBodyRegion
"""Procedure reported (TID 1500 row 4, CID 100): MRI unspecified body region (25056-3, LN).

CID 100 has no brain MRI code in the template version validators check against (Brain MRI,
24590-2 LN, is refused by pixelmed's DicomSRValidator); the anatomy is in the finding sites."""

LOBE_CODES: dict[str, PydicomCode] = {
    "frontal": codes.SCT.FrontalLobe,
    "parietal": codes.SCT.ParietalLobe,
    "temporal": codes.SCT.TemporalLobe,
    "occipital": codes.SCT.OccipitalLobe,
    "cerebellum": codes.SCT.Cerebellum,
}
"""Finding site codes (SNOMED CT) of the lobes the results name."""


def _observation_context(ctx: ExportContext) -> hd.sr.ObservationContext:
    model = ctx.results.model
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.derived_uid(f"{model.name}:{model.version}", "device", ctx.options.node_name),
        name=fit("LO", model.name),
        manufacturer_name=fit("LO", model.manufacturer),
        model_name=fit("LO", f"{model.name} {model.version}".strip()),
        serial_number=fit("LO", ctx.options.node_name),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _algorithm(ctx: ExportContext) -> hd.sr.AlgorithmIdentification:
    model = ctx.results.model
    return hd.sr.AlgorithmIdentification(
        name=fit("AlgorithmName", model.name),
        version=fit("AlgorithmVersion", model.version or "unknown"),
        family=to_coded(model.algorithm_family),
    )


def _referenced_segment(
    seg: Dataset, seg_number: int, source_series_uid: str
) -> hd.sr.ReferencedSegment:
    """Reference to one SEG segment, with its source named by series (TID 1411 row 12 option).

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


def _centre_slice(ctx: ExportContext, det: Detection) -> int:
    n = ctx.volume.shape[0]
    return int(min(max(round(det.centroid_index[0]), 0), n - 1))


def _library(ctx: ExportContext) -> list[Dataset] | None:
    """Image Library entries: the images the content points at (detections) and key slices.

    highdicom's Image Library reads per-instance geometry, so classic series only.
    """
    if ctx.multiframe_source is not None:
        return None
    slices = [_centre_slice(ctx, d) for d in ctx.results.detections]
    slices += key_slices(ctx)
    chosen: dict[str, Dataset] = {}
    for k in slices:
        src, _ = ctx.source_of_slice(int(k))
        chosen.setdefault(str(src.SOPInstanceUID), src)
    return list(chosen.values()) or None


VolumeGroup = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def _segment_groups(ctx: ExportContext, seg: Dataset | None) -> list[VolumeGroup]:
    """Volume per segment, referencing its SEG segment (TID 1411).

    TID 1501 without a reference when there is no SEG, or for a segment the SEG leaves out
    (see :func:`export.seg.seg_segments`).
    """
    numbering = numbering_in(seg, ctx) if seg is not None else {}
    spacing = ctx.volume.spacing
    groups: list[VolumeGroup] = []
    for s in sorted(ctx.results.segments, key=lambda m: m.label.number):
        lab = s.label
        tracking = hd.sr.TrackingIdentifier(
            uid=uids.derived_uid(ctx.job_id, "segment", lab.number),
            identifier=fit("TrackingID", lab.label),
        )
        volume = [
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=round(s.volume_ml(spacing), 3), unit=MILLILITER
            )
        ]
        if seg is None or lab.number not in numbering:
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


def finding_sites(det: Detection) -> list[hd.sr.FindingSite]:
    """Finding site of a detection: its lobe (else Brain) with its side.

    Laterality Left or Right, or the topographical modifier Midline.
    """
    lobe = det.location.strip().removesuffix(" lobe").split(" ")[0] if det.location else ""
    site = LOBE_CODES.get(lobe, to_coded(BRAIN))
    laterality = None
    modifier = None
    if det.side in ("left", "right"):
        laterality = codes.SCT.Left if det.side == "left" else codes.SCT.Right
    elif det.side == "midline":
        modifier = codes.SCT.Midline
    return [
        hd.sr.FindingSite(
            anatomic_location=site, laterality=laterality, topographical_modifier=modifier
        )
    ]


def _detection_groups(
    ctx: ExportContext,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Per detection a planar ROI (TID 1410).

    A closed POLYLINE rectangle (5 points) around the detection on its centre slice, the
    diameter (INFERRED FROM that rectangle), volume, probability (%), finding site.
    """
    by_number = {s.label.number: s for s in ctx.results.segments}
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for n, det in enumerate(ctx.results.detections, start=1):
        k = _centre_slice(ctx, det)
        src, frame = ctx.source_of_slice(k)
        seg = by_number.get(det.segment_number)
        outline = detection_box(det, k, seg.mask if seg is not None else None,
                                ctx.volume.shape[1:])
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=hd.sr.SourceImageForRegion.from_source_image(
                src, referenced_frame_numbers=[frame] if frame is not None else None
            ),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.derived_uid(ctx.job_id, "detection", n),
                identifier=fit("TrackingID", det.tracking_id or f"lesion-{n}"),
            ),
            referenced_region=region,
            finding_type=to_coded(det.finding),
            algorithm_id=_algorithm(ctx),
            finding_sites=finding_sites(det),
            measurements=[
                hd.sr.Measurement(
                    name=codes.SCT.Diameter, value=round(det.diameter_mm, 2),
                    unit=codes.UCUM.Millimeter,
                ),
                hd.sr.Measurement(
                    name=codes.SCT.Volume, value=round(det.volume_ml, 3), unit=MILLILITER
                ),
                hd.sr.Measurement(
                    name=codes.DCM.Probability, value=round(100.0 * det.probability, 2),
                    unit=PERCENT,
                ),
            ],
        )
        _infer_diameter_from(group, region)
        groups.append(group)
    return groups


def _infer_diameter_from(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, region: hd.sr.ImageRegion
) -> None:
    """Give the group's Diameter NUM an INFERRED FROM copy of the image region (TID 300).

    That is the layout OHIF's measurement adapters read back ("hydrate") into editable
    measurements of its Measurements panel; the region at the group's top level (TID 1410
    row 5) is what OHIF's SR viewport draws.
    """
    (container,) = group
    inferred = copy.deepcopy(region)
    inferred.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    for item in container.ContentSequence:
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == (
            codes.SCT.Diameter.value
        ):
            item.ContentSequence = hd.sr.ContentSequence([inferred])
            return


def _qualitative_evaluations(
    ctx: ExportContext, volume_groups: list[VolumeGroup]
) -> hd.sr.ContainerContentItem | None:
    """The Qualitative Evaluations container.

    Suggestion, findings, impression, then the segment volume groups (see the module docstring
    for why they are here).
    """
    res = ctx.results
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
                        name=name, value=sentence_case(text),
                        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                    )
                )
    for group in volume_groups:
        items.extend(group)  # type: ignore[arg-type]  # a Template is a list of items
    if not items:
        return None
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def segment_volume_groups(
    sr: Dataset,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The per-segment volume groups (TID 1411 with a Referenced Segment) of an SR written here.

    They sit in the Qualitative Evaluations container (see the module docstring), which
    ``MeasurementReport.get_volumetric_roi_measurement_groups`` does not search.
    """
    out = []
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if name.CodeValue != QUALITATIVE_EVALUATIONS.value:
            continue
        for group in item.get("ContentSequence", []):
            kids = group.get("ContentSequence", [])
            if group.ValueType == "CONTAINER" and any(
                k.ConceptNameCodeSequence[0].CodeValue == "121191" for k in kids
            ):
                out.append(
                    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations.from_sequence(
                        [group]
                    )
                )
    return out


def build_sr(ctx: ExportContext, built: Built = NOTHING_BUILT, /) -> list[Dataset]:
    """The TID 1500 Comprehensive 3D SR of ``ctx.results`` (empty if nothing to report).

    An :class:`~export.context.Exporter`.

    Args:
        ctx: The export context.
        built: The outputs built before; the SEG of the same results (``built["seg"]``, from
            :func:`export.seg.build_seg`) is referenced. Without a SEG, segment volumes are
            reported without a reference to the segment (TID 1501 groups).
    """
    segs = built.get("seg", ())
    seg = segs[0] if segs else None
    res = ctx.results
    evidence: list[Dataset] = []
    volume_groups: list[VolumeGroup] = []
    if res.segments:
        if seg is not None:
            evidence.append(seg)
        volume_groups = _segment_groups(ctx, seg)
    detections = _detection_groups(ctx)
    if not detections and not volume_groups and res.diagnosis is None:
        log.info("sr skipped: nothing measured", job_id=ctx.job_id)
        return []
    sources = ctx.slice_sources()
    evidence.extend(sources)
    # highdicom's MeasurementReport needs one Imaging Measurements group; without detections
    # a placeholder is built and the container removed (TID 1500 then has rows 10 and 12).
    placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.derived_uid(ctx.job_id, "placeholder"), identifier="placeholder"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(ctx),
        procedure_reported=PROCEDURE,
        imaging_measurements=detections or [placeholder],
        referenced_images=_library(ctx),
    )
    root = report[0]
    if not detections:
        root.ContentSequence = hd.sr.ContentSequence(
            [i for i in root.ContentSequence
             if i.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value],
            is_root=False, is_sr=True,
        )
    qualitative = _qualitative_evaluations(ctx, volume_groups)
    if qualitative is not None:
        root.ContentSequence.append(qualitative)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        is_complete=False,
        is_final=False,  # PreliminaryFlag PRELIMINARY; with PARTIAL and UNVERIFIED
        is_verified=False,
        **ctx.derived("sr").attributes(),
    )
    finish(sr, ctx.sources[0], image=False)
    log.info(
        "sr built", job_id=ctx.job_id, detections=len(res.detections),
        volumes=len(volume_groups), evidence=len(evidence),
    )
    return [sr]
