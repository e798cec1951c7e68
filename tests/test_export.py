"""Exporters: every object valid (dciodvfy), read back by highdicom, equal to what went in.

Runs on real anatomy (MNI152 at 2 mm, 12 slices) with hand-made Results (grey/white matter from
nilearn's templates, a lesion sphere), for a classic axial series, an oblique series, an
Enhanced MR (multi-frame) source and a single-slice series.

dciodvfy warnings accepted: none are expected. One error is accepted, and only in one place:
an SR whose Referenced Segment points into a LABELMAP SEG (1.2.840.10008.5.1.4.1.1.66.7) gets
"Shall not be present for Referenced SOP Class that is not segmentation - <ReferencedSegmentNumber>"
from dciodvfy 20260927, whose condition knows only Segmentation Storage (66.4) as a segmentation;
highdicom (``ReferencedSegment.from_segmentation`` accepts 66.7) and the Label Map supplement
reference label map segments by number. The same SR over a BINARY SEG is checked error-free.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from export import ExportContext, ExportError, ExportOptions, SegOptions, build_outputs
from export.common import key_slices
from export.sc import ALPHA, display_scale
from export.seg import build_seg, segment_numbering, union_segments
from export.sr import LOBE_CODES, segment_volume_groups
from export.text import detection_label, sentence_case
from inference import results as r
from tests.fixtures import pixelmed
from tests.test_export_data import (
    SourceSeries,
    brain,
    dciodvfy,
    make_context,
    oblique_series,
    write_and_read,
)

LABELMAP_UID = "1.2.840.10008.5.1.4.1.1.66.7"
LABELMAP_REF_GAP = (
    "Error - Shall not be present for Referenced SOP Class that is not segmentation"
    " - attribute <ReferencedSegmentNumber>"
)


def _references_labelmap(ds: Dataset) -> bool:
    return ds.Modality == "SR" and any(
        i.ReferencedSOPClassUID == LABELMAP_UID
        for st in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    )


def _errors(ds: Dataset, folder: Path, name: str) -> list[str]:
    errors, _warnings = dciodvfy(ds, folder, name)
    if _references_labelmap(ds):
        errors = [e for e in errors if e != LABELMAP_REF_GAP]
    return errors
BINARY_SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"

CASES = ["axial", "axial-nonoverlap", "oblique", "enhanced", "single"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def sources(folder: Path) -> dict[str, SourceSeries]:
    axial = write_and_read(brain(12), folder / "axial")
    return {
        "axial": axial,
        "axial-nonoverlap": axial,
        "oblique": write_and_read(oblique_series(10), folder / "oblique"),
        "enhanced": write_and_read(brain(12, enhanced=True), folder / "enhanced"),
        "single": write_and_read(brain(1), folder / "single"),
    }


@pytest.fixture(scope="module")
def exported(
    sources: dict[str, SourceSeries],
) -> dict[str, tuple[ExportContext, dict[str, list[Dataset]]]]:
    out = {}
    for case in CASES:
        # auto writes BINARY; the non-overlapping case asks for LABELMAP, which it can encode
        options = (ExportOptions(seg=SegOptions(segmentation_type="labelmap"))
                   if case == "axial-nonoverlap" else None)
        ctx = make_context(sources[case], job_id=f"job-{case}",
                           overlap=case != "axial-nonoverlap", options=options)
        out[case] = (ctx, build_outputs(ctx))
    return out


def _roundtrip(ds: Dataset, folder: Path, name: str) -> Path:
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("case", CASES)
def test_every_output_passes_dciodvfy(case: str, exported: dict, folder: Path) -> None:
    _, outputs = exported[case]
    assert set(outputs) == {"seg", "sr", "sc", "pr", "ko"}
    for kind, datasets in outputs.items():
        assert datasets, f"{kind} is empty"
        for n, ds in enumerate(datasets):
            errors = _errors(ds, folder, f"{case}-{kind}-{n}")
            assert errors == [], f"{case} {kind}[{n}]: {errors}"
    if case == "axial":  # BINARY SEG: the SR must be clean without any exception
        assert not _references_labelmap(outputs["sr"][0])
        assert dciodvfy(outputs["sr"][0], folder, "sr-binary")[0] == []


@pytest.mark.parametrize("case", CASES)
def test_common_marking_study_and_series(case: str, exported: dict, sources: dict) -> None:
    ctx, outputs = exported[case]
    src = sources[case][0][0]
    series = set()
    for kind, datasets in outputs.items():
        for ds in datasets:
            assert ds.StudyInstanceUID == src.StudyInstanceUID
            assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
            assert ds.ContentQualification == "RESEARCH"
            assert "AI" in ds.SeriesDescription and "NOT FOR DIAGNOSIS" in ds.SeriesDescription
            assert len(ds.SeriesDescription) <= 64
            equipment = ds.ContributingEquipmentSequence
            assert any(
                e.get("ManufacturerModelName") == ctx.results.model.name
                and e.get("DeviceSerialNumber") == ctx.options.node_name
                for e in equipment
            ), kind
        uids_of_kind = {ds.SeriesInstanceUID for ds in datasets}
        assert len(uids_of_kind) == 1, kind
        series |= uids_of_kind
    assert len(series) == 5 and src.SeriesInstanceUID not in series


def _expected_stack(ctx: ExportContext) -> np.ndarray:
    segs = sorted(ctx.results.segments, key=lambda s: s.label.number)
    return np.stack([s.mask for s in segs], axis=-1)


@pytest.mark.parametrize("case", CASES)
def test_seg_reads_back_voxel_for_voxel(case: str, exported: dict, folder: Path) -> None:
    ctx, outputs = exported[case]
    seg = hd.seg.segread(_roundtrip(outputs["seg"][0], folder, f"{case}-seg-read"))
    overlap = case != "axial-nonoverlap"
    assert seg.SOPClassUID == (BINARY_SEG_UID if overlap else LABELMAP_UID)
    src0 = ctx.sources[0]
    assert seg.FrameOfReferenceUID == src0.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src0.SeriesInstanceUID
    numbering = segment_numbering(ctx.results.segments)
    mf = ctx.multiframe_source
    if mf is None:
        got = seg.get_pixels_by_source_instance(
            [ref.sop_instance_uid for ref in ctx.volume.slices],
            segment_numbers=sorted(numbering.values()),
        )
    else:
        got = seg.get_pixels_by_source_frame(
            mf.SOPInstanceUID,
            source_frame_numbers=[ref.frame_number for ref in ctx.volume.slices],
            segment_numbers=sorted(numbering.values()),
        )
    expected = _expected_stack(ctx)
    assert got.shape == expected.shape
    assert np.array_equal(got.astype(bool), expected)
    # segment identity: codes, algorithm, colour
    for s in ctx.results.segments:
        desc = seg.get_segment_description(numbering[s.label.number])
        assert desc.segmented_property_category.value == s.label.category.value
        assert desc.segmented_property_type.value == s.label.type.value
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = desc.algorithm_identification
        assert algo is not None
        assert algo[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert algo[0].AlgorithmName == ctx.results.model.name


@pytest.mark.parametrize(
    "options",
    [
        SegOptions(compression="jpegls"),
        SegOptions(compression="jpeg2000"),
        SegOptions(omit_empty_frames=True),
        SegOptions(segmentation_type="binary", compression="jpegls"),
    ],
    ids=["jpegls", "jpeg2000", "omit-empty", "binary-jpegls"],
)
def test_seg_options_keep_masks(
    options: SegOptions, sources: dict, folder: Path
) -> None:
    ctx = make_context(
        sources["axial"], overlap=False, options=ExportOptions(outputs=("seg",), seg=options)
    )
    ds = build_seg(ctx)[0]
    errors, _ = dciodvfy(ds, folder, "seg-opt")
    assert errors == []
    seg = hd.seg.segread(folder / "seg-opt.dcm")
    if options.compression != "none":
        assert seg.file_meta.TransferSyntaxUID.is_compressed
    got = seg.get_pixels_by_source_instance(
        [ref.sop_instance_uid for ref in ctx.volume.slices],
        assert_missing_frames_are_empty=options.omit_empty_frames,
    )
    assert np.array_equal(got.astype(bool), _expected_stack(ctx))


def test_seg_fractional_keeps_probabilities(sources: dict, folder: Path) -> None:
    ctx = make_context(
        sources["axial"],
        options=ExportOptions(
            outputs=("seg",), seg=SegOptions(segmentation_type="fractional")
        ),
    )
    rng = np.random.default_rng(0)
    for s in ctx.results.segments:
        s.probability = (s.mask * rng.uniform(0.5, 1.0, s.mask.shape)).astype(np.float32)
    ds = build_seg(ctx)[0]
    assert dciodvfy(ds, folder, "seg-frac")[0] == []
    seg = hd.seg.segread(folder / "seg-frac.dcm")
    got = seg.get_pixels_by_source_instance(
        [ref.sop_instance_uid for ref in ctx.volume.slices], dtype=np.float32
    )
    want = np.stack([np.asarray(s.probability) for s in ctx.results.segments], axis=-1)
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_forced_labelmap_refuses_overlap(sources: dict) -> None:
    ctx = make_context(
        sources["axial"],
        options=ExportOptions(seg=SegOptions(segmentation_type="labelmap")),
    )
    with pytest.raises(ExportError, match="overlap"):
        build_seg(ctx)


@pytest.mark.parametrize("case", ["axial", "enhanced", "single"])
def test_sr_values_equal_measurements(case: str, exported: dict, folder: Path) -> None:
    ctx, outputs = exported[case]
    sr = hd.sr.srread(_roundtrip(outputs["sr"][0], folder, f"{case}-sr-read"))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "PARTIAL", "UNVERIFIED", "PRELIMINARY",
    )
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    spacing = ctx.volume.spacing
    # segment volumes: TID 1411 groups referencing the SEG, outside Imaging Measurements
    assert content.get_volumetric_roi_measurement_groups() == []
    by_id = {g.tracking_identifier: g for g in segment_volume_groups(sr)}
    seg_uid = outputs["seg"][0].SOPInstanceUID
    for s in ctx.results.segments:
        g = by_id[s.label.label]
        (vol,) = g.get_measurements(name=codes.SCT.Volume)
        assert vol.value == pytest.approx(s.volume_ml(spacing), abs=1e-3)
        assert vol.unit.value == "ml"
        assert g.reference_type.value == "121191"  # Referenced Segment
        ref = g.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg_uid
        assert ref.referenced_segment_numbers == [
            segment_numbering(ctx.results.segments)[s.label.number]
        ]
    # detections: TID 1410 with a 2D rectangle on the centre slice's source image
    det = ctx.results.detections[0]
    (planar,) = content.get_planar_roi_measurement_groups()
    assert planar.tracking_identifier == det.tracking_id and planar.tracking_uid
    assert planar.reference_type.value == "111030"  # Image Region (SCOORD)
    region = planar.roi
    assert isinstance(region, hd.sr.ImageRegion) and region.graphic_type.value == "POLYLINE"
    outline = np.asarray(region.value).reshape(-1, 2)
    assert len(outline) == 5 and np.array_equal(outline[0], outline[-1])  # closed rectangle
    k = int(round(det.centroid_index[0]))
    src, frame = ctx.source_of_slice(k)
    (selected,) = region.ContentSequence
    assert selected.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    if frame is not None:
        assert selected.ReferencedSOPSequence[0].ReferencedFrameNumber == frame
    cols, rows = np.asarray(region.value).reshape(-1, 2).T
    # the ellipse holds the centroid (column, row; pixel centres at +0.5)
    assert cols.min() < det.centroid_index[2] + 0.5 < cols.max()
    assert rows.min() < det.centroid_index[1] + 0.5 < rows.max()
    (diam,) = planar.get_measurements(name=codes.SCT.Diameter)
    assert diam.value == pytest.approx(det.diameter_mm, abs=0.01)
    (site,) = planar.finding_sites
    assert site.value == codes.SCT.Brain or site.value.value in {
        c.value for c in LOBE_CODES.values()
    }
    assert site.laterality == codes.SCT.Right
    # qualitative evaluations: suggestion (+ probability), findings, impression
    root = sr.ContentSequence
    (qual,) = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    items = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.ValueType): i for i in qual.ContentSequence
    }
    dx = items[("121071", "CODE")]
    assert dx.ConceptCodeSequence[0].CodeValue == ctx.results.diagnosis.code.value
    prob = dx.ContentSequence[0]
    assert float(prob.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.72)
    assert items[("121071", "TEXT")].TextValue == sentence_case(ctx.results.report.findings)
    assert items[("121073", "TEXT")].TextValue == sentence_case(ctx.results.report.impression)
    # evidence: the SEG and every source instance
    evidence = {
        inst.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert seg_uid in evidence
    assert {ref.sop_instance_uid for ref in ctx.volume.slices} <= evidence


@pytest.mark.parametrize("case", ["axial", "oblique", "enhanced", "single"])
def test_sc_shows_overlay_colours(case: str, exported: dict) -> None:
    ctx, outputs = exported[case]
    scs = outputs["sc"]
    card = scs[0]
    assert card.BurnedInAnnotation == "YES"
    top = card.pixel_array[5:60, 5:-5]
    assert (top[..., 0] > 200).mean() > 0.8 and (top[..., 1] < 80).mean() > 0.5  # red banner
    ks = key_slices(ctx)
    assert len(scs) == 1 + len(ks)
    f = display_scale(*ctx.volume.shape[1:])
    lesion = next(s for s in ctx.results.segments if s.label.task == "pathological")
    grey = next(s for s in ctx.results.segments if s.label.label == "Grey matter")
    any_mask = np.any([s.mask for s in ctx.results.segments], axis=0)
    for k, sc in zip(ks, scs[1:], strict=True):
        assert sc.BurnedInAnnotation == "YES"
        src, frame = ctx.source_of_slice(k)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        px = sc.pixel_array.astype(int)
        centre = px[f // 2 :: f, f // 2 :: f][: ctx.volume.shape[1], : ctx.volume.shape[2]]
        inner = ndimage.binary_erosion(lesion.mask[k])
        if inner.any():  # lesion red dominates
            rgb = centre[inner]
            assert (rgb[:, 0] - rgb[:, 2] >= ALPHA * 255 - 2).all()
        # leave out the band where the detection circle and its label are drawn
        free = np.ones(ctx.volume.shape[1:], dtype=bool)
        for det in ctx.results.detections:
            k0, j0, _, k1, j1, _ = det.bbox_index
            if k0 <= k < k1:
                free[max(0, j0 - 2 - 30 // f) : j1 + 3] = False
        gm_only = (
            ndimage.binary_erosion(grey.mask[k])
            & ~ndimage.binary_dilation(lesion.mask[k], iterations=4)
            & free
        )
        assert gm_only.any()
        rgb = centre[gm_only]
        assert (rgb[:, 2] - rgb[:, 0] >= ALPHA * 255 - 2).all()  # blue over grey
        outside = ~ndimage.binary_dilation(any_mask[k], iterations=6)
        outside &= free
        rgb = centre[outside]
        assert (rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all()


def test_pr_circles_each_detection(exported: dict) -> None:
    ctx, outputs = exported["axial"]
    pr = outputs["pr"][0]
    det = ctx.results.detections[0]
    k0, _, _, k1, _, _ = det.bbox_index
    lesion = next(s for s in ctx.results.segments if s.label.task == "pathological")
    lesion_uids = {
        ctx.source_of_slice(k)[0].SOPInstanceUID for k in range(k0, k1) if lesion.mask[k].any()
    }
    annotated = {}
    for ann in pr.GraphicAnnotationSequence:
        uid = ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        annotated[uid] = ann
    assert set(annotated) == lesion_uids
    kc = int(round(det.centroid_index[0]))
    ann = annotated[ctx.source_of_slice(kc)[0].SOPInstanceUID]
    obj = ann.GraphicObjectSequence[0]
    assert obj.GraphicType == "ELLIPSE" and obj.GraphicAnnotationUnits == "PIXEL"
    pts = np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2)
    centre = pts.mean(axis=0)  # (column, row)
    assert np.allclose(centre, (det.centroid_index[2] + 0.5, det.centroid_index[1] + 0.5), atol=1)
    assert ann.TextObjectSequence[0].UnformattedTextValue == f"AI {detection_label(det, 1)}"
    # one VOI window, explained by one value (not one value per character)
    (voi,) = pr.SoftcopyVOILUTSequence
    assert voi["WindowCenterWidthExplanation"].VM == 1
    assert voi.WindowCenterWidthExplanation == "AI display window"
    # the presentation state applies to the whole source series
    refs = {
        i.ReferencedSOPInstanceUID
        for s in pr.ReferencedSeriesSequence
        for i in s.ReferencedImageSequence
    }
    assert refs == {ref.sop_instance_uid for ref in ctx.volume.slices}


def test_pr_detection_at_the_image_edge(sources: dict, folder: Path) -> None:
    ctx = make_context(sources["axial"], options=ExportOptions(outputs=("pr",)))
    det = ctx.results.detections[0]
    lesion = next(s for s in ctx.results.segments if s.label.task == "pathological")
    k = int(round(det.centroid_index[0]))
    lesion.mask[:] = False
    lesion.mask[k, 0:3, 0:3] = True  # top-left corner
    det.bbox_index = (k, 0, 0, k + 1, 3, 3)
    pr = build_outputs(ctx)["pr"][0]
    assert _errors(pr, folder, "pr-edge") == []
    pts = np.asarray(pr.GraphicAnnotationSequence[0].GraphicObjectSequence[0].GraphicData)
    assert pts.min() >= 0


@pytest.mark.parametrize("case", ["axial", "enhanced"])
def test_ko_points_at_key_slices(case: str, exported: dict) -> None:
    ctx, outputs = exported[case]
    ko = hd.ko.KeyObjectSelectionDocument.from_dataset(outputs["ko"][0])
    title = ko.ContentSequence and ko.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113009", "DCM")
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in ko.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    keys = {ctx.source_of_slice(k)[0].SOPInstanceUID for k in key_slices(ctx)}
    assert keys <= referenced
    assert outputs["sc"][0].SOPInstanceUID in referenced


def test_key_slices_start_with_the_lesion(exported: dict) -> None:
    ctx, _ = exported["axial"]
    det = ctx.results.detections[0]
    assert key_slices(ctx)[0] == int(round(det.centroid_index[0]))


def _all_uids(outputs: dict[str, list[Dataset]]) -> list[tuple[str, str, str]]:
    return [
        (kind, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for kind, datasets in outputs.items()
        for ds in datasets
    ]


def test_uids_are_deterministic_per_job(sources: dict) -> None:
    a = build_outputs(make_context(sources["single"], job_id="job-A"))
    b = build_outputs(make_context(sources["single"], job_id="job-A"))
    c = build_outputs(make_context(sources["single"], job_id="job-B"))
    assert _all_uids(a) == _all_uids(b)
    sop_a = {u[2] for u in _all_uids(a)}
    assert len(sop_a) == len(_all_uids(a))  # unique within a job
    assert sop_a.isdisjoint({u[2] for u in _all_uids(c)})
    # tracking UIDs in the SR too
    def tracking(ds: Dataset) -> list[str]:
        content = hd.sr.Comprehensive3DSR.from_dataset(ds).content
        assert isinstance(content, hd.sr.MeasurementReport)
        groups = [*content.get_planar_roi_measurement_groups(), *segment_volume_groups(ds)]
        assert groups
        return [str(g.tracking_uid) for g in groups]

    assert tracking(a["sr"][0]) == tracking(b["sr"][0])


def test_outputs_selection(sources: dict) -> None:
    ctx = make_context(sources["single"], options=ExportOptions(outputs=("sr", "ko")))
    out = build_outputs(ctx)
    assert set(out) == {"sr", "ko"}
    # without a SEG the SR still reports the volumes (not referencing a SEG)
    sr = out["sr"][0]
    evidence = [
        i.ReferencedSOPClassUID
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    ]
    assert BINARY_SEG_UID not in evidence and LABELMAP_UID not in evidence


def test_results_without_segments(sources: dict, folder: Path) -> None:
    ctx = make_context(sources["single"], lesion=False)
    ctx.results.segments.clear()
    out = build_outputs(ctx)
    assert out["seg"] == []
    assert len(out["sr"]) == 1 and dciodvfy(out["sr"][0], folder, "sr-dx-only")[0] == []
    assert len(out["pr"]) == 1 and dciodvfy(out["pr"][0], folder, "pr-none")[0] == []
    assert "no detection" in out["pr"][0].GraphicAnnotationSequence[0].TextObjectSequence[
        0
    ].UnformattedTextValue


def test_bad_input_is_refused_with_a_reason(sources: dict) -> None:
    datasets, vol = sources["axial"]
    model = r.ModelInfo(name="m", version="1")
    label = r.SegmentLabel(1, "Brain", r.ANATOMICAL_STRUCTURE, r.BRAIN)
    wrong = r.Results(model=model, segments=[r.SegmentMask(label, np.zeros((2, 2, 2), bool))])
    with pytest.raises(ExportError, match="mask shape"):
        ExportContext(job_id="j", results=wrong, volume=vol, sources=datasets)
    with pytest.raises(ExportError, match="not given"):
        ExportContext(job_id="j", results=r.Results(model=model), volume=vol, sources=datasets[1:])
    with pytest.raises(ExportError, match="job id"):
        ExportContext(job_id="", results=r.Results(model=model), volume=vol, sources=datasets)


def _ohif_measurement_groups(sr: Dataset) -> list[Dataset]:
    """The Measurement Groups OHIF 3.13's SR extension turns into measurements: those in the
    first Imaging Measurements (126010) container of an Imaging Measurement Report."""
    if sr.ConceptNameCodeSequence[0].CodeValue != "126000":
        return []
    containers = [i for i in sr.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    if not containers:
        return []
    return [g for g in containers[0].ContentSequence
            if g.ConceptNameCodeSequence[0].CodeValue == "125007"]


def _assert_ohif_safe(sr: Dataset, sources: set[str]) -> int:
    """Every group OHIF walks has what it dereferences: a tracking UID, a tracking id and a
    top-level 2D SCOORD selected from one source image (no NUM-only group); returns how many."""
    groups = _ohif_measurement_groups(sr)
    for g in groups:
        kids = g.ContentSequence
        names = {k.ConceptNameCodeSequence[0].CodeValue for k in kids}
        assert {"112040", "112039"} <= names
        scoords = [k for k in kids if k.ValueType in ("SCOORD", "SCOORD3D")]
        assert scoords and scoords[0].ValueType == "SCOORD"
        assert scoords[0].GraphicType in ("POINT", "MULTIPOINT", "POLYLINE", "CIRCLE", "ELLIPSE")
        (image,) = scoords[0].ContentSequence
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sources
        # what OHIF's adapters hydrate: the first NUM INFERRED FROM a SCOORD on the same image
        num = next(k for k in kids if k.ValueType == "NUM")
        (inferred,) = num.ContentSequence
        assert inferred.RelationshipType == "INFERRED FROM" and inferred.ValueType == "SCOORD"
        assert inferred.GraphicData == scoords[0].GraphicData
    return len(groups)


@pytest.mark.parametrize("case", CASES)
def test_sr_gives_ohif_coordinates_for_every_group(case: str, exported: dict) -> None:
    ctx, outputs = exported[case]
    sources = {ref.sop_instance_uid for ref in ctx.volume.slices}
    assert _assert_ohif_safe(outputs["sr"][0], sources) == len(ctx.results.detections)


def test_sr_without_detections_has_no_group_for_ohif(sources: dict) -> None:
    ctx = make_context(sources["axial"], lesion=False)
    sr = build_outputs(ctx)["sr"][0]
    assert _ohif_measurement_groups(sr) == []
    assert len(segment_volume_groups(sr)) == len(ctx.results.segments)
    hd.sr.Comprehensive3DSR.from_dataset(sr)  # still a valid TID 1500 for highdicom


def test_sr_finding_site_names_the_lobe(sources: dict) -> None:
    ctx = make_context(sources["axial"], options=ExportOptions(outputs=("sr",)))
    det = ctx.results.detections[0]
    det.location, det.side = "frontal lobe", "left"
    sr = hd.sr.Comprehensive3DSR.from_dataset(build_outputs(ctx)["sr"][0])
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    (site,) = content.get_planar_roi_measurement_groups()[0].finding_sites
    assert site.value == codes.SCT.FrontalLobe and site.laterality == codes.SCT.Left


@pytest.mark.slow
def test_every_sr_passes_pixelmed_template_validation(
    exported: dict, sources: dict, tmp_path: Path
) -> None:
    why = pixelmed.available()
    if why:
        pytest.skip(why)
    srs = {f"{case}": exported[case][1]["sr"][0] for case in CASES}
    no_seg = make_context(sources["single"], options=ExportOptions(outputs=("sr",)))
    srs["no-seg"] = build_outputs(no_seg)["sr"][0]
    no_det = make_context(sources["axial"], lesion=False, options=ExportOptions(outputs=("sr",)))
    srs["no-detection"] = build_outputs(no_det)["sr"][0]
    dx_only = make_context(sources["single"], lesion=False)
    dx_only.results.segments.clear()
    srs["diagnosis-only"] = build_outputs(dx_only)["sr"][0]
    errors = pixelmed.validate_sr(srs, tmp_path)
    assert errors == {name: [] for name in srs}, errors


def test_seg_leaves_out_union_segments_and_shows_colours(sources: dict, folder: Path) -> None:
    ctx = make_context(sources["axial"], options=ExportOptions(outputs=("seg", "sr", "sc")))
    res = ctx.results
    grey, white = res.segments[0], res.segments[1]
    # the model's achromatic tissue colours and a Brain union (as OmniMRI writes them)
    grey.label = replace(grey.label, color_rgb=(150, 150, 150))
    white.label = replace(white.label, color_rgb=(240, 240, 240))
    brain_label = r.SegmentLabel(
        9, "Brain", r.ANATOMICAL_STRUCTURE, r.BRAIN, (230, 200, 170), "anatomical")
    res.segments.append(r.SegmentMask(brain_label, grey.mask | white.mask))
    assert union_segments(res.segments) == {9}
    out = build_outputs(ctx)
    seg = hd.seg.Segmentation.from_dataset(out["seg"][0])
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert "Brain" not in labels and len(labels) == 3
    for n in seg.segment_numbers:
        value = [int(v) for v in seg.get_segment_description(n).RecommendedDisplayCIELabValue]
        rgb = np.asarray(hd.color.CIELabColor.from_dicom_value(value).to_rgb(), dtype=int)
        assert np.ptp(rgb) >= 60, (seg.get_segment_description(n).segment_label, rgb)
    # the Brain volume is still reported, without a SEG reference
    sr = out["sr"][0]
    qual = next(i for i in sr.ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    groups = [g for g in qual.ContentSequence if g.ValueType == "CONTAINER"]
    brain_group = next(
        g for g in groups
        if any(k.get("TextValue") == "Brain" for k in g.ContentSequence)
    )
    assert not any(k.ConceptNameCodeSequence[0].CodeValue == "121191"
                   for k in brain_group.ContentSequence)
    assert len(segment_volume_groups(sr)) == 3
    assert _errors(out["seg"][0], folder, "seg-union") == []
    assert _errors(sr, folder, "sr-union") == []


def test_key_slice_label_stays_inside_the_image(sources: dict) -> None:
    ctx = make_context(sources["axial"], options=ExportOptions(outputs=("sc",)))
    det = ctx.results.detections[0]
    lesion = next(s for s in ctx.results.segments if s.label.task == "pathological")
    k = int(round(det.centroid_index[0]))
    rows, cols = ctx.volume.shape[1:]
    lesion.mask[:] = False
    lesion.mask[k, 0:3, cols - 3 : cols] = True  # top-right corner
    det.bbox_index = (k, 0, cols - 3, k + 1, 3, cols)
    from PIL import Image, ImageDraw

    from export.sc import _font, label_position

    f = display_scale(rows, cols)
    draw = ImageDraw.Draw(Image.new("RGB", (cols * f, rows * f)))
    font = _font(min(22, max(12, 4 * f)))
    text = detection_label(det, 1)
    box = ((cols - 3) * f - 2 * f, -2 * f, cols * f + 2 * f, 3 * f + 2 * f)
    x, y = label_position(draw, text, font, box, (cols * f, rows * f))
    left, top, right, bottom = draw.textbbox((x, y), text, font=font, stroke_width=2)
    assert left >= 0 and right <= cols * f and top >= 0 and bottom <= rows * f
    img = build_outputs(ctx)["sc"][1].pixel_array
    red = (img[..., 0] > 200) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red[: rows * f, : cols * f].sum() > 50  # circle and label drawn in the image


def test_seg_leaves_out_empty_segments_the_sr_keeps_their_volume(
    sources: dict, folder: Path
) -> None:
    ctx = make_context(sources["axial"], options=ExportOptions(outputs=("seg", "sr")))
    empty = r.SegmentLabel(7, "Oedema", r.MORPHOLOGICALLY_ABNORMAL, r.LESION, (255, 0, 0),
                           "pathological")
    ctx.results.segments.append(r.SegmentMask(empty, np.zeros(ctx.volume.shape, bool)))
    out = build_outputs(ctx)
    seg_ds = out["seg"][0]
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels == ["Grey matter", "White matter", "Lesion"]  # no all-zero frames of Oedema
    assert int(seg_ds.NumberOfFrames) == 3 * ctx.volume.shape[0]
    sr = out["sr"][0]
    referenced = segment_volume_groups(sr)
    assert [g.referenced_segment.referenced_segment_numbers for g in referenced] == [
        [1], [2], [3]]
    qual = next(i for i in sr.ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    oedema = next(g for g in qual.ContentSequence if g.ValueType == "CONTAINER"
                  and any(k.get("TextValue") == "Oedema" for k in g.ContentSequence))
    volumes = [k for k in oedema.ContentSequence if k.ValueType == "NUM"]
    assert [float(v.MeasuredValueSequence[0].NumericValue) for v in volumes] == [0.0]
    assert not any(k.ConceptNameCodeSequence[0].CodeValue == "121191"
                   for k in oedema.ContentSequence)
    assert _errors(sr, folder, "sr-empty-segment") == []
    # all segments empty: no SEG at all
    for s in ctx.results.segments:
        s.mask[:] = False
    ctx.results.detections.clear()
    assert build_outputs(ctx)["seg"] == []


def test_value_lengths_come_from_the_dictionary() -> None:
    from export.limits import fit, max_length

    assert max_length("Manufacturer") == 64 and max_length("StationName") == 16
    assert max_length("ImageComments") == 10240 and max_length("TrackingID") is None
    assert fit("StationName", "A" * 20) == "A" * 16 and fit("LO", "x" * 70) == "x" * 64
    with pytest.raises(KeyError):
        max_length("NoSuchKeyword")
