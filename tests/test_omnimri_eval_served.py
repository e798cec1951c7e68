"""Evaluation and calibration run the served path: a node job and ``eval`` agree on a case.

The held-out case is written as a DICOM MR series and run through the node's ``omnimri``
pipeline code (``dicom_node/pipelines/omnimri.py``: ``load_model`` -> ``build_volume`` ->
``run_model`` -> ``_to_results``), and through ``eval``'s :class:`ServedModel` on the case's
:class:`Volume`; the two ``Results`` must match (segments, detections, diagnosis, report).
Uses the shipped package ``models/omnimri-tiny`` (skipped where it is not checked out).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.pipelines import omnimri as pipe
from inference.omnimri import evaluate as E
from inference.omnimri.tasks import TaskSettings
from inference.volume import build_volume
from omnimri_samples import make_mr_series, write_series

PACKAGE = Path(__file__).resolve().parents[1] / "models" / "omnimri-tiny"
pytestmark = pytest.mark.skipif(not (PACKAGE / "model.yaml").is_file(),
                                reason="models/omnimri-tiny is not in this checkout")


@pytest.fixture(scope="module")
def served() -> Iterator[E.ServedModel]:
    model = E.ServedModel.load(PACKAGE, threads=1)
    yield model
    model.close()


def test_eval_and_a_node_job_agree_on_the_same_case(served: E.ServedModel,
                                                    tmp_path: Path) -> None:
    case = E.heldout_case(10, seed=1)  # small-vessel PD case: v3.2.0 detects 3 (1 true)
    vol = E.case_volume(case)
    ours = served.run(vol, E.ALL_INSTRUCTIONS)

    # The same case as a DICOM series, through the node's pipeline code.
    paths = write_series(make_mr_series(vol.array, vol.affine, description="PD AXIAL"),
                         tmp_path / "series")
    models = tmp_path / "models"
    shutil.copytree(PACKAGE, models / "omnimri-tiny")
    settings = NodeSettings.model_validate({"models": {
        "path": str(models), "engine_order": ["onnxruntime"], "intra_op_threads": 1}})
    cfg = PipelineConfig(kind="omnimri", model="omnimri-tiny",
                         instructions=list(E.ALL_INSTRUCTIONS))
    package, engine = pipe.load_model(cfg, settings)
    node_vol = build_volume(paths)
    np.testing.assert_array_equal(node_vol.array, vol.array)  # 12-bit image stored exactly
    np.testing.assert_allclose(node_vol.affine, vol.affine, atol=1e-6)
    raw = pipe.run_model(package, node_vol, engine, list(cfg.instructions))
    node = pipe._to_results(package, raw, node_vol, list(cfg.instructions))

    assert [s.label.label for s in node.segments] == [s.label.label for s in ours.segments]
    for sa, sb in zip(node.segments, ours.segments, strict=True):
        differ = int((sa.mask != sb.mask).sum())
        assert differ <= max(2, sa.mask.size // 100_000), (sa.label.label, differ)
    assert len(ours.detections) > 0
    assert len(node.detections) == len(ours.detections)
    for a, b in zip(node.detections, ours.detections, strict=True):
        assert a.finding == b.finding and a.side == b.side and a.location == b.location
        np.testing.assert_allclose(a.centroid_lps_mm, b.centroid_lps_mm, atol=0.05)
        assert abs(a.volume_ml - b.volume_ml) <= 1e-3 + 0.01 * b.volume_ml
    assert node.diagnosis is not None and ours.diagnosis is not None
    assert node.diagnosis.code == ours.diagnosis.code
    for k, v in ours.diagnosis.probabilities.items():
        assert abs(node.diagnosis.probabilities[k] - v) <= 1e-3
    assert node.report == ours.report

    # Scoring reads those Results: the eval's case score is the node job's.
    s_node, s_ours = E.score_case(case, node), E.score_case(case, ours)
    assert (s_node.hits, s_node.false_positives) == (s_ours.hits, s_ours.false_positives)
    assert s_ours.report and s_ours.lesions > 0


def test_calibration_reposts_cached_probabilities_like_a_fresh_run(
        served: E.ServedModel) -> None:
    """A setting applied to the cached engine run gives what a job with that setting gives."""
    from inference.omnimri import calibrate as C

    case = C.validation_case(2)  # a mass case
    vol = E.case_volume(case)
    raw = C.cached_raw(served, vol, C.CAL_INSTRUCTIONS)
    for st in (TaskSettings(lesion_threshold=0.3, min_lesion_mm3=16.0),
               TaskSettings(lesion_threshold=0.8, min_lesion_mm3=128.0,
                            diagnosis_detection_weight=0.5, diagnosis_top_mm=10.0)):
        cached = served.results(raw, vol, C.CAL_INSTRUCTIONS, st)
        fresh = replace(served, settings=st).run(vol, C.CAL_INSTRUCTIONS)
        assert [d.bbox_index for d in cached.detections] == [d.bbox_index
                                                             for d in fresh.detections]
        assert cached.diagnosis == fresh.diagnosis
        for sa, sb in zip(cached.segments, fresh.segments, strict=True):
            np.testing.assert_array_equal(sa.mask, sb.mask)


def test_eval_prints_per_contrast_tables_and_targets(served: E.ServedModel) -> None:
    rep = E.evaluate(served, 1, seed=3, recon_cases=1, baselines=True)
    text = "\n".join(rep.lines())
    assert set(rep.by_contrast) == {E.heldout_case(0, 3).contrast}
    assert "targets (issue #11):" in text and "model vs baselines" in text
    for name in ("dice_csf", "normal_called_normal_worst_contrast", "recon_psnr_gain_db",
                 "tissue_gain_over_gmm_worst"):
        assert name in rep.metrics and ("PASS" in text or "MISS" in text)
    assert rep.metrics["cases"] == 1 and rep.seeds == [3]
    both = E.merge_reports([rep, rep])
    assert both.metrics["cases"] == 2
    assert rep.baselines["all"]["gmm_dice_white_matter"] > 0.3  # the mixture does find WM


def test_training_layout_is_the_same_case_with_lesions_elsewhere(served: E.ServedModel) -> None:
    """``--layout training``: same seed, anatomy and contrast; lesion centres in other cells."""
    held, train = E.heldout_case(1, 5), E.heldout_case(1, 5, "training")  # small-vessel cases
    assert held.contrast == train.contrast and held.diagnosis == train.diagnosis == 1
    np.testing.assert_array_equal(held.tissue, train.tissue)
    assert held.lesions and train.lesions
    assert not np.array_equal(held.lesion, train.lesion)
    with pytest.raises(ValueError, match="unknown layout"):
        E.heldout_case(1, 5, "random")
    rep = E.evaluate(served, 1, seed=5, recon_cases=0, layout="training")
    assert rep.layout == "training" and "a diagnostic" in "\n".join(rep.lines())
    with pytest.raises(ValueError, match="different lesion layouts"):
        E.merge_reports([rep, E.evaluate(served, 1, seed=5, recon_cases=0)])


def test_calibration_breaks_ties_towards_fewer_false_positives_then_higher_thresholds() -> None:
    """Equal CSI: fewer false positives win, then the higher threshold, then the larger size."""
    from inference.omnimri.calibrate import detection_key

    def row(thr: float, mn: float, csi: float, fp: float) -> dict[str, float]:
        return {"threshold": thr, "min_lesion_mm3": mn, "csi": csi, "fp_per_volume": fp}

    grid = [row(0.7, 128, 10 / 18, 0.17), row(0.8, 64, 10 / 18, 0.17),
            row(0.8, 128, 10 / 18, 0.17), row(0.5, 128, 10 / 18, 0.08), row(0.9, 128, 0.5, 0.0)]
    assert max(grid, key=detection_key) == grid[3]  # same CSI, fewer false positives
    del grid[3]
    assert max(grid, key=detection_key) == grid[2]  # then the higher threshold, larger size
