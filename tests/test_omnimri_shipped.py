"""The shipped reference model ``models/omnimri-tiny``: held-out quality and real-MR sanity.

CI does not retrain the model: it evaluates the committed ONNX package on a few held-out
synthetic cases (a seed range and lesion layout never used in training). The thresholds are
set somewhat below the values measured on the full 30-case evaluation (see MODEL_CARD.md) so a
regression fails, while a small-sample wobble does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.package import ModelPackage

PACKAGE = Path(__file__).resolve().parents[1] / "models" / "omnimri-tiny"
ALL = ["segment brain tissues", "detect abnormalities", "suggest a diagnosis",
       "write the report", "reconstruct"]

pytestmark = pytest.mark.skipif(not (PACKAGE / "model.yaml").is_file(),
                                reason="models/omnimri-tiny is not in this checkout")

# v3.5.0 (MODEL_CARD.md; the served int8 variant), held-out synthetic *heads* (the SynthSeg-style
# generator): CI checks 3 cases (seed 1: one normal T1, one small-vessel with 6 lesions, one
# mass; 7 lesions) against these floors. On those 3 cases v3.5.0 gives brain 0.948, CSF 0.670,
# GM 0.810, WM 0.795 (v3.4.0: 0.944 / 0.661 / 0.800 / 0.786), lesion Dice 0.080 and 1 of 7
# lesions found, no false positive (30 cases of seed 1: 0.47 per volume), +1.95 dB, and calls
# the normal T1 normal.
# Floors sit below the measured numbers with room for a CPU whose float summation order
# differs; the false-positive ceiling allows three components more than measured (a component
# at the threshold may flip); the real-MR tests below hold the no-mass requirement on real
# brains.
FLOORS = {
    "dice_brain": 0.90,  # 3 cases: 0.948 (seed 1, 30 cases: 0.942)
    "dice_csf": 0.58,  # 0.670 (0.582)
    "dice_grey_matter": 0.75,  # 0.810 (0.784)
    "dice_white_matter": 0.74,  # 0.795 (0.779)
    "recon_psnr_gain_db": 1.4,  # +1.95 dB (+1.60)
}
CEILINGS = {"report_contradictions": 0.0,  # 0 of 3 (0 of 30)
            "false_positives_per_volume": 1.0}  # 0.00 (30 cases: 0.47)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(PACKAGE)


def test_package_is_small_and_valid(package: ModelPackage) -> None:
    total = sum(p.stat().st_size for p in PACKAGE.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024
    assert set(package.spec.tasks) == set(ALL)
    assert (PACKAGE / "MODEL_CARD.md").is_file()
    card = (PACKAGE / "MODEL_CARD.md").read_text()
    assert "research use only" in card.lower() and "Fonov" in card


def test_shipped_model_on_heldout_cases() -> None:
    from inference.omnimri.evaluate import evaluate_package

    rep = evaluate_package(PACKAGE, n_cases=3, seed=1, recon_cases=1)
    m = rep.metrics
    for k, v in FLOORS.items():
        assert m[k] >= v, f"{k} = {m[k]:.3f} below {v}"
    for k, v in CEILINGS.items():
        assert m[k] <= v, f"{k} = {m[k]:.3f} above {v}"


def _check_results(res: object, shape: tuple[int, int, int]) -> None:
    from inference.results import Results

    assert isinstance(res, Results)
    assert res.segments and all(s.mask.shape == shape for s in res.segments)
    assert res.diagnosis is not None and 0.99 <= sum(res.diagnosis.probabilities.values()) <= 1.01
    assert res.report is not None and res.report.findings
    assert res.reconstruction is not None and res.reconstruction.shape == shape
    assert np.isfinite(res.reconstruction).all()


def test_pydicom_mr_small_runs_through_the_whole_model(package: ModelPackage) -> None:
    from inference.omnimri.real_mr import pydicom_mr_small
    from inference.omnimri.tasks import run_omnimri

    vol = pydicom_mr_small()
    _check_results(run_omnimri(package, vol, ALL), vol.shape)


def test_nibabel_anatomical_runs_through_the_whole_model(package: ModelPackage) -> None:
    from inference.omnimri.real_mr import nibabel_anatomical, summarise
    from inference.omnimri.tasks import run_omnimri

    vol = nibabel_anatomical()
    res = run_omnimri(package, vol, ALL)
    _check_results(res, vol.shape)
    assert "diagnosis:" in summarise(res, vol.spacing)


def test_mni_brain_dicom_series_gives_a_plausible_normal_brain(package: ModelPackage,
                                                               tmp_path: Path) -> None:
    from inference.omnimri.real_mr import mni_brain_series
    from inference.omnimri.tasks import run_omnimri

    vol = mni_brain_series(tmp_path)
    res = run_omnimri(package, vol, ALL[:4])
    seg = {s.label.label: s for s in res.segments}
    brain_ml = seg["Brain"].volume_ml(vol.spacing)
    # issue #11 target 1.0-1.8 l; v3.5.0: 1 787 ml, WM 0.29, "Normal" at p = 0.72 (the
    # template mask is ~1.88 l; v3.4.0: 1 772 ml, WM 0.27, p = 0.80; v3.3.0: 1 755 ml, WM 0.26,
    # p = 0.76; v3.2.0: 1 717 ml, WM 0.29, p = 0.55; v3.1.0: 1 569 ml, WM 0.26; v3.0.0:
    # 1 368 ml, WM 287 ml against ~640 ml)
    assert 1000 <= brain_ml <= 1800
    wm_ml = seg["White matter"].volume_ml(vol.spacing)
    assert 150 <= wm_ml <= 900
    assert not res.detections
    assert res.diagnosis is not None and res.diagnosis.code.meaning == "Normal"


def test_every_real_mr_source_is_read_as_normal(package: ModelPackage) -> None:
    """The principal target of issue #11: no false mass on real, normal brains."""
    from inference.omnimri.real_mr import SOURCES, RealResult, run_all

    results = run_all(package, tuple(s for s in SOURCES if not s.name.startswith("MNI")))
    done = [r for r in results if isinstance(r, RealResult)]
    assert done, results
    for r in done:
        assert r.normal, r.line()


def test_colin27_with_skull_is_a_normal_brain_close_to_bet(package: ModelPackage) -> None:
    """A real T1 with scalp, skull, face and neck (Debian's mricron-data): no mass, and a Brain
    segment that is the brain (FSL BET's mask as the reference), not the head.

    v3.5.0 (int8): no detection, "Normal" (p 0.50), 2 088 ml, Dice 0.895 against BET's 1 737 ml
    (v3.4.0: 2 163 ml, 0.879; v3.3.0: 2 307 ml, 0.852; the excess is the neck under the
    cerebellum, read as brain). The same head pitched 20 degrees on its axial grid: 1 977 ml,
    Dice 0.924 (v3.4.0: 2 011 ml, 0.916). The issue's target (1.0-1.8 l) is not met on these
    scans; the bounds hold the measured state so that a regression fails.
    """
    from inference.omnimri.real_mr import MRICRON_TEMPLATES, SOURCES, RealResult, run_all

    if not (MRICRON_TEMPLATES / "ch2.nii.gz").is_file():
        pytest.skip("Colin27 not installed (apt-get install mricron-data; make install-test)")
    srcs = tuple(s for s in SOURCES if s.name.startswith(("Colin27 ch2.nii", "Colin27 pitched")))
    results = run_all(package, srcs)
    assert len(results) == 2
    for r, dice in zip(results, (0.88, 0.91), strict=True):
        assert isinstance(r, RealResult), r
        assert r.normal, r.line()
        assert 1000 <= r.brain_ml <= 2200, r.line()
        assert r.brain_dice is not None and r.brain_dice >= dice, r.line()
