"""GPU checks: ONNX Runtime CUDA/TensorRT providers, native TensorRT plans, torch on CUDA.

Marked ``gpu``; every test skips with the reason on a machine without an NVIDIA GPU (or without
the ``tensorrt`` package). Run them with ``tests/gpu/run_gpu_checks.sh`` on a GPU machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.engines import create_engine
from inference.engines.onnxruntime import OnnxRuntimeEngine, available_providers
from inference.package import ModelPackage
from inference.runner import run_model
from inference.volume import SliceRef, Volume
from tests.fixtures.tiny_model import TINY_PATCH


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _has_cuda(),
        reason="no CUDA device: run tests/gpu/run_gpu_checks.sh on an NVIDIA GPU machine",
    ),
]

FP32_ATOL = 1e-3
"""GPU vs CPU float32 tolerance (TF32/cuDNN algorithms differ slightly)."""

FP16_ATOL = 5e-2
"""FP16 plan vs CPU float32 tolerance."""


def _cuda() -> None:
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: run tests/gpu/run_gpu_checks.sh on an NVIDIA GPU machine")


def _trt() -> None:
    _cuda()
    from inference.engines.tensorrt import tensorrt_status

    status = tensorrt_status()
    if not status.startswith("ok"):
        pytest.skip(f"TensorRT {status}")


@pytest.fixture()
def pkg(tmp_path: Path, tiny_package: ModelPackage) -> ModelPackage:
    """A private copy (plans are written into the package folder)."""
    shutil.copytree(tiny_package.folder, tmp_path / "tiny")
    return ModelPackage.load(tmp_path / "tiny")


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, *TINY_PATCH)).astype(np.float32)


def _cpu(pkg: ModelPackage, x: np.ndarray) -> dict[str, np.ndarray]:
    return OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"]).run({"image": x})


def test_onnxruntime_cuda_provider_matches_cpu(pkg: ModelPackage) -> None:
    _cuda()
    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("this onnxruntime build has no CUDAExecutionProvider (onnxruntime-gpu)")
    eng = OnnxRuntimeEngine(
        pkg.onnx_path(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert eng.provider == "CUDAExecutionProvider", eng.fallback_reason
    x = _x(3)
    got, want = eng.run({"image": x}), _cpu(pkg, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=FP32_ATOL)


def test_onnxruntime_tensorrt_provider_caches_engines(pkg: ModelPackage) -> None:
    _cuda()
    if "TensorrtExecutionProvider" not in available_providers():
        pytest.skip("this onnxruntime build has no TensorrtExecutionProvider")
    eng = create_engine("onnxruntime", pkg)
    assert eng.provider == "TensorrtExecutionProvider"
    x = _x(2)
    got, want = eng.run({"image": x}), _cpu(pkg, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=FP32_ATOL)
    assert any(pkg.engine_cache_dir().iterdir()), "no ORT TensorRT engine/timing cache written"


def test_torch_cuda_matches_cpu(pkg: ModelPackage) -> None:
    _cuda()
    from inference.engines.torch import TorchEngine

    eng = TorchEngine.for_package(pkg, device="cuda")
    assert eng.provider.startswith("cuda")
    x = _x(2)
    got, want = eng.run({"image": x}), _cpu(pkg, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=FP32_ATOL)


def test_tensorrt_plan_build_run_and_key(pkg: ModelPackage) -> None:
    _trt()
    from inference.engines.tensorrt import TensorRTEngine, build_plan, gpu_key

    cc, version = gpu_key()
    plan = build_plan(pkg)
    assert plan == pkg.plan_path(cc, version) and plan.is_file()
    assert f"sm{cc.replace('.', '')}" in plan.name and f"trt{version}" in plan.name
    mtime = plan.stat().st_mtime_ns
    assert build_plan(pkg) == plan and plan.stat().st_mtime_ns == mtime  # reused, not rebuilt
    os.utime(pkg.onnx_path())  # a newer ONNX graph → rebuilt
    build_plan(pkg)
    assert plan.stat().st_mtime_ns > mtime
    eng = TensorRTEngine(plan)
    for n in (1, 2, 4):  # dynamic batch within the profile (max = 2 x batch_size)
        x = _x(n, seed=n)
        got, want = eng.run({"image": x}), _cpu(pkg, x)
        for k in want:
            assert got[k].shape == want[k].shape
            np.testing.assert_allclose(got[k], want[k], atol=FP32_ATOL)
    eng.close()


def test_tensorrt_fp16_plan_from_converted_graph(pkg: ModelPackage) -> None:
    _trt()
    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt is not installed")
    from inference.engines.tensorrt import TensorRTEngine, build_plan

    plan = build_plan(pkg, precision="fp16")
    assert plan.name.endswith(".fp16.plan")
    x = _x(2)
    got, want = TensorRTEngine(plan).run({"image": x}), _cpu(pkg, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=FP16_ATOL)


def test_run_model_with_tensorrt_matches_cpu(pkg: ModelPackage) -> None:
    _trt()
    rng = np.random.default_rng(3)
    arr = (rng.random((20, 24, 28)) * 100).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = [0, 0, 2.0], [0, 2.0, 0], [2.0, 0, 0]
    vol = Volume(array=arr, affine=aff, slices=[SliceRef(str(k), "x") for k in range(20)])
    trt_raw = run_model(pkg, vol, create_engine("tensorrt", pkg))
    cpu_raw = run_model(pkg, vol, OnnxRuntimeEngine(pkg.onnx_path(),
                                                    providers=["CPUExecutionProvider"]))
    np.testing.assert_allclose(trt_raw.segmentation["tissues"].probabilities,
                               cpu_raw.segmentation["tissues"].probabilities, atol=FP32_ATOL)
    assert trt_raw.text == cpu_raw.text


def _int8_variant(pkg: ModelPackage) -> ModelPackage:
    from inference.quantize import INT8_FILE, add_variant, quantize_onnx

    info = quantize_onnx(pkg.onnx_path(), pkg.file(INT8_FILE), [_x(1, s) for s in range(8)],
                         "image")
    add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=info,
                check={"passed": True, "note": "test only"}, make_default=True)
    return ModelPackage.load(pkg.folder)


def test_tensorrt_int8_plan_from_the_qdq_variant(pkg: ModelPackage) -> None:
    """The same QDQ file ONNX Runtime runs on CPU builds a strongly typed INT8 plan."""
    _trt()
    from inference.engines.tensorrt import TensorRTEngine, build_plan

    pkg = _int8_variant(pkg)
    plan = build_plan(pkg, variant="int8")
    assert plan.name.endswith(".int8.plan")
    x = _x(2)
    cpu_int8 = OnnxRuntimeEngine(pkg.model_path(variant="int8"),
                                 providers=["CPUExecutionProvider"]).run({"image": x})
    got = TensorRTEngine(plan).run({"image": x})
    scale = float(np.abs(cpu_int8["tissues"]).max())
    assert float(np.abs(got["tissues"] - cpu_int8["tissues"]).max()) < 0.05 * scale
    assert (got["tissues"].argmax(1) == cpu_int8["tissues"].argmax(1)).mean() > 0.95
    # the package's default variant (int8, accuracy-checked) gives the INT8 plan by default
    eng = create_engine("tensorrt", pkg)
    assert eng.provider.endswith(".int8.plan")


def test_tensorrt_fp8_plan_from_modelopt(pkg: ModelPackage) -> None:
    _trt()
    import torch

    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is not installed")
    if torch.cuda.get_device_capability(0) < (8, 9):
        pytest.skip("FP8 needs an Ada or Hopper GPU (sm89+)")
    import onnx

    from inference.engines.tensorrt import TensorRTEngine, build_plan
    from inference.quantize import FP8_FILE, add_variant

    out = pkg.file(FP8_FILE)
    from modelopt.onnx.quantization import quantize as mo_quantize

    mo_quantize(str(pkg.onnx_path()), quantize_mode="fp8",
                calibration_data={"image": np.concatenate([_x(1, s) for s in range(8)])},
                calibration_method="max", output_path=str(out))
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    add_variant(pkg.folder, "fp8", FP8_FILE, "fp8", quantisation={"tool": "modelopt"},
                check=None, make_default=False)
    pkg = ModelPackage.load(pkg.folder)
    plan = build_plan(pkg, variant="fp8")
    assert plan.name.endswith(".fp8.plan")
    x = _x(2)
    got, want = TensorRTEngine(plan).run({"image": x}), _cpu(pkg, x)
    assert (got["tissues"].argmax(1) == want["tissues"].argmax(1)).mean() > 0.9
