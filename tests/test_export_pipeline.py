"""The ``omnimri`` pipeline kind: package + engine + volume + run + results + exporters.

Runs the tests' tiny ONNX package (``tiny_package`` fixture: random weights, so its masks are
noise, but real ONNX Runtime inference on a real MNI brain series) through the registry, and
checks every output with dciodvfy and highdicom. The OmniMRI-family branch
(``extra.family: omnimri``) is covered by the OmniMRI package's own tests.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.pipelines import Pipeline, PipelineError, UnsupportedSeries, get_pipeline
from dicom_node.pipelines.omnimri import load_model
from dicom_node.series import Series, StoredInstance
from inference.package import ModelPackage
from omnimri_samples import write_series
from tests.test_export import _errors
from tests.test_export_data import brain


def _series(paths: list[Path]) -> Series:
    insts = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        insts.append(
            StoredInstance(
                ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID, ds.StudyInstanceUID,
                p, str(ds.file_meta.TransferSyntaxUID), p.stat().st_size, datetime.now(UTC),
            )
        )
    first = insts[0]
    return Series(first.series_instance_uid, first.study_instance_uid, 1, tuple(insts),
                  datetime.now(UTC), modality="MR")


@pytest.fixture(scope="module")
def setup(
    tiny_package: ModelPackage, tmp_path_factory: pytest.TempPathFactory
) -> tuple[NodeSettings, PipelineConfig, Series, Path]:
    root = tmp_path_factory.mktemp("omnimri-pipeline")
    models = root / "models"
    shutil.copytree(tiny_package.folder, models / "tiny")
    settings = NodeSettings(node={"ae_title": "OMNI_TEST"},
                            models={"path": str(models), "engine_order": ["onnxruntime"]})
    cfg = PipelineConfig(
        kind="omnimri", model="tiny",
        instructions=["segment brain tissues", "detect abnormalities", "suggest a diagnosis",
                      "write the report"],
    )
    series = _series(write_series(brain(8), root / "series"))
    return settings, cfg, series, root


def test_pipeline_writes_every_output_validly(setup: tuple) -> None:
    settings, cfg, series, root = setup
    pipeline = get_pipeline("brain-ai", cfg, settings)
    assert isinstance(pipeline, Pipeline)
    out = pipeline.run(series, "job-pipe-1")
    modalities = [ds.Modality for ds in out]
    assert modalities[0] == "SEG" and modalities[1] == "SR"
    assert {"SEG", "SR", "OT", "PR", "KO"} <= set(modalities)
    study = series.study_instance_uid
    for n, ds in enumerate(out):
        assert ds.StudyInstanceUID == study
        assert ds.ContentQualification == "RESEARCH"
        assert _errors(ds, root, f"pipe-{n}") == [], ds.Modality
    seg = hd.seg.Segmentation.from_dataset(out[0])
    # the tiny package's Grey matter and Lesion (random weights), each only if it has a voxel
    # (export.seg.seg_segments); the SR reports both volumes
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels and set(labels) <= {"Grey matter", "Lesion"}
    assert list(seg.segment_numbers) == list(range(1, len(labels) + 1))
    again = pipeline.run(series, "job-pipe-1")
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in out]


def test_model_is_loaded_once_per_process(setup: tuple) -> None:
    settings, cfg, _, _ = setup
    assert load_model(cfg, settings)[1] is load_model(cfg, settings)[1]


def test_missing_model_is_a_permanent_error(setup: tuple) -> None:
    settings, cfg, series, _ = setup
    bad = cfg.model_copy(update={"model": "no-such-model"})
    with pytest.raises(PipelineError, match="not found") as info:
        get_pipeline("x", bad, settings).run(series, "job-x")
    assert info.value.permanent


def test_non_image_series_is_unsupported(setup: tuple, tmp_path: Path) -> None:
    settings, cfg, series, _ = setup
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    inst = series.instances[0]
    bad_inst = StoredInstance(
        "1.2.3.4", inst.sop_class_uid, inst.series_instance_uid, inst.study_instance_uid,
        broken, inst.transfer_syntax_uid, 9, inst.received_at,
    )
    bad = Series(series.series_instance_uid, series.study_instance_uid, 2, (bad_inst,),
                 series.completed_at)
    with pytest.raises(UnsupportedSeries):
        get_pipeline("x", cfg, settings).run(bad, "job-y")
