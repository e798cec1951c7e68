"""The product's headline test: PACS → node → OmniMRI → SEG, SR, SC, GSPS, KOS → PACS.

Real processes end to end: Debian's Orthanc is the PACS, ``omnimri-node serve`` runs the
shipped ``brain`` pipeline (``config.yaml``: kind ``omnimri``, model ``omnimri-tiny``, outputs
seg/sr/sc/pr/ko, rule ``mr-brain``) on ONNX Runtime, and sends the results back to Orthanc by
C-STORE. Orthanc is configured with the node as a DICOM modality (REST ``PUT /modalities``),
receives a brain MR series (MNI152 at 2 mm, a 40-slice slab, so the test stays fast on two
cores) by REST upload, and C-STOREs it to the node (``POST /modalities/node/store``). The
series carries NumberOfTemporalPositions × NumberOfSlices, so it completes with its last
instance (``expected_count``) instead of after the quiet period.

Everything is checked through Orthanc's REST API: one new series per kind (SEG, SR, OT, PR, KO)
in the source study; each object read back from ``/instances/{id}/file`` with highdicom and
pydicom and validated by ``dciodvfy`` (no ``Error`` line; the one accepted message is the
documented LABELMAP-reference gap of dciodvfy, ``docs/outputs.md``, only for an SR over a
LABELMAP SEG); the SR's segment volumes equal the SEG's voxel counts; the key-slice SCs are
tinted where the SEG's segments are on their source slice (and hardly anywhere else); GSPS and
KOS point at the source images; each output SOP Instance UID is in Orthanc
exactly once and delivered once.

The model is the shipped ``models/omnimri-tiny`` package when the checkout has it; otherwise
the tests' tiny ONNX package (``tests/fixtures/tiny_model.py``) is installed under the same
name, so the pipeline, node, exporters and PACS round trip are still tested.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from export.sr import segment_volume_groups
from inference.package import ModelPackage
from omnimri_samples import brain_series
from tests.fixtures.node import NodeProcess
from tests.fixtures.orthanc import ORTHANC_BIN, OrthancServer
from tests.fixtures.wait import wait_until
from tests.test_export import LABELMAP_REF_GAP, LABELMAP_UID
from tests.test_export_data import dciodvfy

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "config.yaml"
PIPELINE = "brain"
SLICES = 40
"""Slices of the 2 mm brain slab sent through the PACS."""
RESOLUTION_MM = 2
DEADLINE_S = 75.0
"""Longest wait for the results in Orthanc after the send, seconds."""
MODALITY_OF_KIND = {"seg": "SEG", "sr": "SR", "sc": "OT", "pr": "PR", "ko": "KO"}
SEG_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", LABELMAP_UID}

pytestmark = pytest.mark.timeout(180)


def labelmap_capable(server: OrthancServer) -> OrthancServer:
    """Let Orthanc store SOP classes its DCMTK does not know (before it starts).

    Debian's Orthanc 1.10 (DCMTK 3.6.7) refuses the presentation context of Label Map
    Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7). The shipped ``seg:
    segmentation_type: auto`` writes BINARY; a site that sets ``labelmap`` needs
    ``UnknownSopClassAccepted: true`` (docs/e2e.md, docs/viewers.md), as here.
    """
    cfg = json.loads(server.config_path.read_text(encoding="utf-8"))
    cfg["UnknownSopClassAccepted"] = True
    server.config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return server


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc as the PACS, accepting Label Map SEG (see :func:`labelmap_capable`)."""
    if not ORTHANC_BIN.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BIN})")
    server = labelmap_capable(OrthancServer(tmp_path_factory.mktemp("pacs")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def shipped_sections() -> dict[str, Any]:
    """The shipped ``config.yaml``'s pipeline ``brain``, its rules and model settings."""
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    return {"pipelines": {PIPELINE: cfg["pipelines"][PIPELINE]}, "rules": cfg["rules"],
            "models": cfg["models"]}


def models_folder(model: str, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> tuple[Path, str]:
    """The models folder holding ``model``, and which package it is (for the test's output).

    ``OMNIMRI_E2E_MODELS`` (a folder holding ``<model>/model.yaml``) overrides the choice, e.g.
    to run the test on a package freshly exported from a training checkpoint.
    """
    override = os.environ.get("OMNIMRI_E2E_MODELS")
    if override:
        assert (Path(override) / model / "model.yaml").is_file(), f"no {model} in {override}"
        return Path(override), f"{model} from {override}"
    if (REPO / "models" / model / "model.yaml").is_file():
        return REPO / "models", f"shipped {model}"
    tiny: ModelPackage = request.getfixturevalue("tiny_package")  # built only when needed
    folder = tmp_path / "models"
    shutil.copytree(tiny.folder, folder / model)
    return folder, "the tests' tiny package"


def source_series() -> list[Dataset]:
    """The brain slab, with the count that lets the node complete it at its last instance."""
    datasets = brain_series(resolution_mm=RESOLUTION_MM, slices=SLICES,
                            description="T1 3D BRAIN E2E")
    for ds in datasets:
        ds.NumberOfTemporalPositions = 1
        ds.NumberOfSlices = len(datasets)
    return datasets


def read_db(node: NodeProcess, sql: str) -> list[tuple[Any, ...]]:
    if not node.db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True, timeout=5)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    except sqlite3.OperationalError:
        return []  # tables not created yet
    finally:
        conn.close()


def wait_for_job(node: NodeProcess, timeout_s: float) -> str:
    """Poll the node's job table until its one job is done; returns its id.

    Raises:
        AssertionError: An attempt failed (the error and the node's log tail are shown).
        TimeoutError: Not done in ``timeout_s``.
    """
    def done() -> str | None:
        jobs = read_db(node, "SELECT id, state, attempts, last_error FROM jobs")
        if jobs and jobs[0][3]:
            raise AssertionError(f"job attempt failed: {jobs[0][3]}\n"
                                 + node.log_path.read_text(errors="replace")[-3000:])
        if jobs and jobs[0][1] == "done":
            assert len(jobs) == 1, jobs
            return str(jobs[0][0])
        return None

    return wait_until(done, timeout_s, message=lambda: "job not done: " + str(read_db(
        node, "SELECT id, state FROM jobs")) + "\n" + node.log_path.read_text(
            errors="replace")[-3000:])


def study_instances(orthanc: OrthancServer, study_uid: str) -> list[dict[str, Any]]:
    """Every instance of the study (``/tools/find``, expanded, with its series' tags)."""
    out = orthanc.post("/tools/find", {"Level": "Instance", "Expand": True,
                                       "Query": {"StudyInstanceUID": study_uid}})
    series_tags: dict[str, dict[str, Any]] = {}
    for inst in out:
        sid = inst["ParentSeries"]
        if sid not in series_tags:
            series_tags[sid] = orthanc.get(f"/series/{sid}")["MainDicomTags"]
        inst["SeriesTags"] = series_tags[sid]
    return list(out)


def fetch(orthanc: OrthancServer, orthanc_id: str) -> Dataset:
    """The stored file of an instance, as Orthanc serves it."""
    import httpx

    r = httpx.get(f"{orthanc.url}/instances/{orthanc_id}/file", timeout=30.0)
    r.raise_for_status()
    return pydicom.dcmread(BytesIO(r.content))


def validator_errors(ds: Dataset, folder: Path, name: str) -> list[str]:
    """dciodvfy errors; the documented LABELMAP-reference gap only for an SR over a LABELMAP."""
    errors, _warnings = dciodvfy(ds, folder, name)
    over_labelmap = ds.Modality == "SR" and any(
        i.ReferencedSOPClassUID == LABELMAP_UID
        for st in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence
    )
    return [e for e in errors if not (over_labelmap and e == LABELMAP_REF_GAP)]


def segment_masks(seg: hd.seg.Segmentation, source_uids: list[str]) -> np.ndarray:
    """Masks ``[source frame, row, column, segment]`` (segments in ``seg.segment_numbers``
    order), re-assembled on the source frames."""
    return np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids,
        segment_numbers=[int(n) for n in seg.segment_numbers],
        combine_segments=False, skip_overlap_checks=True,
    )) > 0


def segment_rgb(item: Dataset) -> np.ndarray:
    """sRGB (0-255) of a SEG segment's Recommended Display CIELab Value."""
    value = [int(v) for v in item.RecommendedDisplayCIELabValue]
    lab = hd.color.CIELabColor.from_dicom_value(value)
    return np.asarray(lab.to_rgb(), dtype=np.int16)


def overlay_fractions(sc: Dataset, masks: np.ndarray, chromatic: list[int],
                      source_uids: list[str]) -> tuple[float, float]:
    """How much of a key slice SC is tinted inside and outside the SEG.

    The key slice's source image (SourceImageSequence) is found among ``source_uids``; its
    image area (top left, up-scaled by :func:`export.sc.display_scale`) is sampled back to
    source pixels. Returns (tinted fraction of the pixels covered by a chromatic segment,
    tinted fraction of the pixels covered by no segment), both away from segment borders.
    Tinted: the channels differ (the greyscale rendering has R = G = B).
    """
    from export.sc import display_scale

    src = source_uids.index(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID))
    rows, cols = masks.shape[1:3]
    f = display_scale(rows, cols)
    image = np.asarray(sc.pixel_array, dtype=np.int16)[: rows * f : f, : cols * f : f]
    tinted = np.ptp(image, axis=-1) > 8
    here = masks[src]
    # Segment outlines are drawn opaque in the segment's colour (grey or white for some
    # tissues), so pixels on any segment's border are left out.
    border = np.zeros(here.shape[:2], dtype=bool)
    for k in range(here.shape[-1]):
        border |= here[..., k] & ~ndimage.binary_erosion(here[..., k])
        border |= ndimage.binary_dilation(here[..., k]) & ~here[..., k]
    covered = here[..., chromatic].any(axis=-1) & ~border
    empty = ~here.any(axis=-1) & ~border
    inside = float(tinted[covered].mean()) if covered.any() else 1.0
    outside = float(tinted[empty].mean()) if empty.any() else 0.0
    return inside, outside


@pytest.mark.slow
def test_pacs_to_node_to_pacs_every_output_kind(
    pacs: OrthancServer, node_factory: Any, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    orthanc = pacs
    sections = shipped_sections()
    pipeline = sections["pipelines"][PIPELINE]
    assert pipeline["kind"] == "omnimri" and pipeline["model"] == "omnimri-tiny"
    assert set(pipeline["outputs"]) == set(MODALITY_OF_KIND)
    models, which = models_folder(pipeline["model"], tmp_path, request)
    sections["models"]["path"] = str(models)
    node = node_factory(
        completion={"quiet_seconds": 2.0, "poll_interval_s": 0.5},
        jobs={"workers": 2, "poll_interval_s": 0.5, "max_attempts": 1},
        destinations={"pacs": {"kind": "dimse", "ae_title": orthanc.ae_title,
                               "host": "127.0.0.1", "port": orthanc.dicom_port,
                               "timeout_s": 30}},
        **sections,
    )

    # The PACS holds the series and knows the node as a modality; it sends by C-STORE.
    source = source_series()
    for ds in source:
        orthanc.upload(ds)
    study_uid = str(source[0].StudyInstanceUID)
    source_uids = [str(ds.SOPInstanceUID) for ds in source]
    orthanc.set_node(node.ae_title, node.port)
    assert orthanc.get("/modalities/node/configuration")["AET"] == node.ae_title
    orthanc.send_study(study_uid)
    sent_at = time.monotonic()

    job_id = wait_for_job(node, DEADLINE_S)
    [complete] = node.events("series_complete")
    assert complete["reason"] == "expected_count" and complete["instances"] == SLICES
    produced = read_db(node, "SELECT sop_instance_uid, sop_class_uid FROM job_outputs")
    delivered = read_db(node, "SELECT sop_instance_uid, destination FROM deliveries")
    out_uids = sorted(u for u, _ in produced)
    assert sorted(u for u, _ in delivered) == out_uids
    assert {d for _, d in delivered} == {"pacs"}

    # Wait (briefly) until Orthanc has indexed every output the node says it delivered.
    def indexed() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        found = study_instances(orthanc, study_uid)
        outputs = [i for i in found if i["MainDicomTags"]["SOPInstanceUID"] not in source_uids]
        return (found, outputs) if len(outputs) >= len(out_uids) else None

    found, outputs = wait_until(indexed, max(0.0, DEADLINE_S - (time.monotonic() - sent_at)),
                                message="Orthanc has not indexed every delivered output")
    latency_s = time.monotonic() - sent_at

    # Exactly once: each output SOP Instance UID once in Orthanc, nothing else added.
    in_pacs = Counter(i["MainDicomTags"]["SOPInstanceUID"] for i in outputs)
    assert sorted(in_pacs) == out_uids and set(in_pacs.values()) == {1}, in_pacs
    assert len(found) == len(source) + len(out_uids)

    # One new series per kind, each of one modality, in the source study.
    by_series: dict[str, list[dict[str, Any]]] = {}
    for inst in outputs:
        by_series.setdefault(inst["ParentSeries"], []).append(inst)
    modalities = sorted(insts[0]["SeriesTags"]["Modality"] for insts in by_series.values())
    assert modalities == sorted(MODALITY_OF_KIND.values()), modalities
    source_series_uid = str(source[0].SeriesInstanceUID)
    objects: dict[str, list[Dataset]] = {}
    for insts in by_series.values():
        modality = insts[0]["SeriesTags"]["Modality"]
        assert insts[0]["SeriesTags"]["SeriesInstanceUID"] != source_series_uid
        assert "NOT FOR DIAG" in insts[0]["SeriesTags"]["SeriesDescription"]
        objects[modality] = [fetch(orthanc, i["ID"]) for i in insts]

    # Every object: same study, research content, valid by dciodvfy.
    check_dir = tmp_path / "dciodvfy"
    check_dir.mkdir()
    for modality, datasets in objects.items():
        for n, ds in enumerate(datasets):
            assert ds.StudyInstanceUID == study_uid
            assert ds.Modality == modality
            assert ds.ContentQualification == "RESEARCH"
            assert validator_errors(ds, check_dir, f"{modality}-{n}") == [], modality

    # SEG: highdicom reads it; frames on the source images; segments from the model.
    [seg_ds] = objects["SEG"]
    assert seg_ds.SOPClassUID in SEG_CLASSES
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.get_source_image_uids()[0][1] == source_series_uid
    labels = ModelPackage.load(models / pipeline["model"]).spec.outputs
    n_labels = sum(len(o.labels or []) for o in labels if o.kind == "segmentation")
    assert 1 <= len(seg.segment_numbers) <= n_labels
    masks = segment_masks(seg, source_uids)
    voxels = {int(n): int(np.count_nonzero(masks[..., k]))
              for k, n in enumerate(seg.segment_numbers)}
    assert any(voxels.values())

    # SR (TID 1500): references the SEG; each segment's volume equals its voxels × voxel size.
    [sr_ds] = objects["SR"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    evidence = {i.ReferencedSOPInstanceUID
                for st in sr_ds.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert seg_ds.SOPInstanceUID in evidence and set(source_uids) <= evidence
    spacing = [float(v) for v in source[0].PixelSpacing] + [float(source[0].SliceThickness)]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    checked = 0
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    for group in segment_volume_groups(sr_ds):  # outside Imaging Measurements (export/sr.py)
        ref = group.referenced_segment
        if ref is None or ref.referenced_sop_instance_uid != seg_ds.SOPInstanceUID:
            continue
        [vol] = group.get_measurements(name=codes.SCT.Volume)
        numbers = ref.referenced_segment_numbers
        assert numbers is not None and len(numbers) == 1, "SR names no single SEG segment"
        number = int(numbers[0])
        assert vol.value == pytest.approx(voxels[number] * voxel_ml, abs=1e-3), number
        checked += 1
    assert checked == len(seg.segment_numbers)

    # SC: the summary card and true-colour key slices with the SEG burned in where it is.
    for ds in objects["OT"]:
        assert ds.BurnedInAnnotation == "YES" and ds.PhotometricInterpretation == "RGB"
    key_slices = [ds for ds in objects["OT"] if str(ds.ImageComments).startswith("AI key slice")]
    assert key_slices and len(key_slices) == len(objects["OT"]) - 1
    colours = {int(d.SegmentNumber): segment_rgb(d) for d in seg.SegmentSequence}
    chromatic = [k for k, n in enumerate(seg.segment_numbers) if np.ptp(colours[int(n)]) >= 50]
    for ds in key_slices:
        inside, outside = overlay_fractions(ds, masks, chromatic, source_uids)
        print(f"{ds.ImageComments}: tinted {inside:.3f} inside the SEG, {outside:.3f} outside")
        # Overlay exactly on the SEG (a shifted or flipped overlay fails this); outside it only
        # detection circles and their labels (many for the random-weight tiny package).
        assert inside >= 0.98 and outside <= 0.2, ds.ImageComments

    # GSPS over the source images; KOS pointing at images of this study.
    [pr] = objects["PR"]
    pr_refs = {i.ReferencedSOPInstanceUID for s in pr.ReferencedSeriesSequence
               for i in s.ReferencedImageSequence}
    assert pr_refs and pr_refs <= set(source_uids)
    [ko] = objects["KO"]
    ko_refs = {i.ReferencedSOPInstanceUID
               for st in ko.CurrentRequestedProcedureEvidenceSequence
               for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert ko_refs and ko_refs <= set(source_uids) | set(out_uids)

    # The audit trail names what was produced and delivered (UIDs only).
    audit = [json.loads(line) for line in
             (node.root / "var" / "audit.jsonl").read_text().splitlines()]
    assert sorted(a["sop_instance_uid"] for a in audit
                  if a["event"] == "output_produced" and a["job_id"] == job_id) == out_uids
    print(f"e2e: {len(out_uids)} outputs in Orthanc {latency_s:.1f} s after the send "
          f"(model: {which})")
