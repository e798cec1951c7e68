"""A pipeline written in words, end to end: PACS → node → SR with the generated report → PACS.

An admin writes the pipeline's instruction as free text in ``config.yaml`` ("look for
white-matter lesions and write a short report"); the shipped package's language model maps it
to the canonical tasks when the configuration is loaded (``check-config`` prints the same), and
the job runs only those tasks. Real processes: Debian's Orthanc as the PACS, ``omnimri-node
serve`` on ONNX Runtime. The SR that comes back holds the generated Finding and Impression
text, and nothing the instruction did not ask for (measurement groups of lesions only, no
tissue volumes).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.config import parse_config
from inference.package import ModelPackage, SegmentationOutput
from tests.fixtures.orthanc import ORTHANC_BIN, OrthancServer
from tests.fixtures.wait import wait_until
from tests.test_e2e import (
    DEADLINE_S,
    PIPELINE,
    REPO,
    fetch,
    shipped_sections,
    source_series,
    study_instances,
    wait_for_job,
)

PACKAGE = REPO / "models" / "omnimri-tiny"
INSTRUCTION = "look for white-matter lesions and write a short report"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not (PACKAGE / "1" / "language").is_dir(),
                       reason="the shipped package has no language model in this checkout"),
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if not ORTHANC_BIN.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BIN})")
    server = OrthancServer(tmp_path_factory.mktemp("pacs-free-text"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def text_items(ds: Dataset) -> dict[str, list[str]]:
    """TEXT content items of an SR by concept code value (every level of the tree)."""
    out: dict[str, list[str]] = {}

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                code = str(item.ConceptNameCodeSequence[0].CodeValue)
                out.setdefault(code, []).append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def test_free_text_pipeline_runs_end_to_end_and_the_report_reaches_the_pacs(
        pacs: OrthancServer, node_factory: Any, tmp_path: Path) -> None:
    sections = shipped_sections()
    pipeline = dict(sections["pipelines"][PIPELINE])
    pipeline.update(instructions=[INSTRUCTION], outputs=["sr"])
    sections["pipelines"] = {PIPELINE: pipeline}
    models = tmp_path / "models"
    shutil.copytree(PACKAGE, models / "omnimri-tiny")
    sections["models"]["path"] = str(models)

    # What check-config does: the words become the canonical tasks, or the config is refused.
    pacs_destination = {"kind": "dimse", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                        "port": pacs.dicom_port, "timeout_s": 30}
    settings = parse_config({**sections, "storage": {"path": str(tmp_path / "spool")},
                             "destinations": {"pacs": pacs_destination}}, base=tmp_path)
    assert settings.pipelines[PIPELINE].instructions == ["detect abnormalities",
                                                          "write the report"]

    node = node_factory(
        completion={"quiet_seconds": 2.0, "poll_interval_s": 0.5},
        jobs={"workers": 1, "poll_interval_s": 0.5, "max_attempts": 1},
        destinations={"pacs": pacs_destination},
        **sections,
    )
    source = source_series()
    for ds in source:
        pacs.upload(ds)
    study_uid = str(source[0].StudyInstanceUID)
    source_uids = {str(ds.SOPInstanceUID) for ds in source}
    pacs.set_node(node.ae_title, node.port)
    pacs.send_study(study_uid)
    wait_for_job(node, DEADLINE_S)

    def sr_in_pacs() -> list[dict[str, Any]] | None:
        outputs = [i for i in study_instances(pacs, study_uid)
                   if i["MainDicomTags"]["SOPInstanceUID"] not in source_uids]
        return outputs or None

    outputs = wait_until(sr_in_pacs, DEADLINE_S, message="no output reached the PACS")
    assert [i["SeriesTags"]["Modality"] for i in outputs] == ["SR"]
    sr = fetch(pacs, outputs[0]["ID"])
    assert isinstance(sr, pydicom.Dataset) and sr.StudyInstanceUID == study_uid
    texts = text_items(sr)
    [finding] = texts["121071"]  # DCM Finding: the generated findings, in sentences
    [impression] = texts["121073"]  # DCM Impression
    assert finding.strip() and impression.strip()
    assert finding[0].isupper() and impression[0].isupper()
    # Only what was asked for: measurement groups of the lesion classes, none of the tissues.
    spec = ModelPackage.load(PACKAGE).spec
    labels = {o.name: {lab.label for lab in o.labels} for o in spec.outputs
              if isinstance(o, SegmentationOutput)}
    tracked = set(texts.get("112039", []))  # DCM Tracking Identifier
    assert tracked and tracked <= labels["lesion"], tracked
    assert not tracked & labels["tissue"]
    [finished] = node.events("job finished")
    assert finished["outputs"] == 1
