"""GPU check: the language models (text encoder, report-decoder step) on TensorRT vs ORT CPU.

Marked ``gpu``; skips with the reason on a machine without an NVIDIA GPU or the ``tensorrt``
package. ``tests/gpu/run_gpu_checks.sh`` runs it and prints the numbers
(:mod:`tests.gpu.language_trt_check`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.package import ModelPackage
from tests.gpu.language_trt_check import ENCODER_ATOL, PACKAGE, compare
from tests.gpu.test_gpu_engines import _has_cuda, _trt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _has_cuda(),
        reason="no CUDA device: run tests/gpu/run_gpu_checks.sh on an NVIDIA GPU machine",
    ),
]


def test_language_on_tensorrt_matches_ort_cpu(tmp_path: Path) -> None:
    _trt()
    if "language" not in ModelPackage.load(PACKAGE).spec.extra:
        pytest.skip(f"{PACKAGE} has no extra.language: run 'omnimri-node train language'")
    r = compare(PACKAGE, work=tmp_path)
    assert r.encoder_provider.endswith(".fp32.plan") and "text_encoder.sm" in r.encoder_provider
    assert "report_decoder.sm" in r.decoder_provider
    assert r.encoder_max_abs_diff <= ENCODER_ATOL
    assert r.reports_same == r.reports
    plans = sorted(p.name for p in (tmp_path / "language").glob("*.plan"))
    assert len(plans) == 2, plans  # cached next to the ONNX files, keyed by GPU and TensorRT
    from inference.omnimri.language.trt import TensorRTSession, encoder_dims

    onnx = tmp_path / "language" / "text_encoder.onnx"
    plan = next((tmp_path / "language").glob("text_encoder.*.plan"))
    mtime = plan.stat().st_mtime_ns
    sess = TensorRTSession.for_onnx(onnx, encoder_dims(64))  # reused, not rebuilt
    assert plan.stat().st_mtime_ns == mtime and sess.provider.endswith(plan.name)
    sess.close()


def test_decoder_plan_refuses_a_cache_beyond_its_profile(tmp_path: Path) -> None:
    _trt()
    import shutil

    import numpy as np

    from inference.omnimri.language.reportgen import ReportDecoder
    from inference.omnimri.language.trt import decoder_dims

    pkg = ModelPackage.load(PACKAGE)
    if "language" not in pkg.spec.extra:
        pytest.skip(f"{PACKAGE} has no extra.language: run 'omnimri-node train language'")
    shutil.copytree(pkg.version_folder() / "language", tmp_path / "language")
    dec = ReportDecoder(tmp_path / "language", engine="tensorrt")
    assert dec.sess.name == "tensorrt"
    too_long = decoder_dims()["P"].max + 1
    past = np.zeros((*dec.empty_past.shape[:4], too_long, dec.empty_past.shape[5]), np.float32)
    with pytest.raises(ValueError, match="outside the TensorRT profile"):
        dec.step([5], too_long, past)
