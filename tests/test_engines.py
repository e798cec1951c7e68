"""Engines: ONNX Runtime (CPU) and PyTorch agree on the tiny package; selection and reasons.

TensorRT and CUDA paths cannot run on this CPU-only machine: here we check they refuse with a
clear reason; ``tests/gpu/`` runs them for real on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from inference.engines import (
    Engine,
    EngineUnavailable,
    create_engine,
    engine_availability,
    select_engine,
)
from inference.engines.onnxruntime import OnnxRuntimeEngine
from inference.engines.torch import TorchEngine
from inference.package import ModelPackage
from tests.fixtures.tiny_model import TINY_PATCH, make_tiny_net

ATOL = 1e-4
"""Largest allowed absolute difference between engines on float32 logits."""


def _batch(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, *TINY_PATCH)).astype(np.float32)


@pytest.fixture(scope="module")
def ort_engine(tiny_package: ModelPackage) -> OnnxRuntimeEngine:
    engine = create_engine("onnxruntime", tiny_package, intra_op_threads=1)
    assert isinstance(engine, OnnxRuntimeEngine)
    return engine


def test_engines_follow_protocol(tiny_package: ModelPackage, ort_engine: OnnxRuntimeEngine) -> None:
    torch_engine = create_engine("torch", tiny_package)
    for engine in (ort_engine, torch_engine):
        assert isinstance(engine, Engine)
        assert engine.input_names == ["image"]
        assert engine.output_names == ["tissues", "diagnosis"]
    assert ort_engine.provider == "CPUExecutionProvider"
    assert torch_engine.provider == "cpu"


@pytest.mark.parametrize("n", [1, 3])
def test_onnxruntime_and_torch_agree(
    tiny_package: ModelPackage, ort_engine: OnnxRuntimeEngine, n: int
) -> None:
    x = _batch(n, seed=n)
    a = ort_engine.run({"image": x})
    b = create_engine("torch", tiny_package).run({"image": x})
    eager = TorchEngine(make_tiny_net(), ["image"], ["tissues", "diagnosis"]).run({"image": x})
    assert a["tissues"].shape == (n, 3, *TINY_PATCH) and a["diagnosis"].shape == (n, 2)
    for name in ("tissues", "diagnosis"):
        assert a[name].dtype == np.float32
        np.testing.assert_allclose(a[name], b[name], atol=ATOL, err_msg=f"ORT/TorchScript {name}")
        np.testing.assert_allclose(a[name], eager[name], atol=ATOL, err_msg=f"ORT/eager {name}")
    assert float(np.abs(a["tissues"]).max()) > 1e-3  # not a degenerate all-zero net


def test_onnxruntime_shared_between_threads(ort_engine: OnnxRuntimeEngine) -> None:
    inputs = [_batch(2, seed=s) for s in range(4)]
    expected = [ort_engine.run({"image": x})["tissues"] for x in inputs]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        got[i] = ort_engine.run({"image": inputs[i]})["tissues"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(4):
        np.testing.assert_array_equal(got[i], expected[i])


def test_missing_input_is_named(ort_engine: OnnxRuntimeEngine) -> None:
    with pytest.raises(KeyError, match=r"missing inputs \['image'\]"):
        ort_engine.run({"img": _batch()})


def test_auto_selects_onnxruntime_and_logs_why_not_tensorrt(tiny_package: ModelPackage) -> None:
    with capture_logs() as logs:
        engine = select_engine(tiny_package, "auto")
    assert engine.name in ("onnxruntime", "tensorrt")
    chosen = [e for e in logs if e["event"] == "engine selected"]
    assert len(chosen) == 1 and chosen[0]["engine"] == engine.name
    if engine.name == "onnxruntime":  # CPU machine: TensorRT's reason is recorded
        reason = chosen[0]["not_used"]["tensorrt"]
        assert "tensorrt Python package is not installed" in reason or "no CUDA device" in reason


def test_preference_list_and_errors(tiny_package: ModelPackage) -> None:
    engine = select_engine(tiny_package, ["triton", "torch"])
    assert engine.name == "torch"
    with pytest.raises(EngineUnavailable, match="triton: no Triton server configured"):
        select_engine(tiny_package, ["triton"])
    with pytest.raises(EngineUnavailable, match="unknown engine 'tflite'"):
        select_engine(tiny_package, "tflite")


def test_tensorrt_refuses_with_reason_on_cpu(tiny_package: ModelPackage) -> None:
    from inference.engines.tensorrt import build_plan, tensorrt_status

    status = tensorrt_status()
    if status.startswith("ok"):
        pytest.skip(f"TensorRT is usable here ({status}); tests/gpu covers it")
    assert status.startswith("unavailable: ")
    with pytest.raises(EngineUnavailable, match="tensorrt|CUDA"):
        create_engine("tensorrt", tiny_package)
    with pytest.raises(EngineUnavailable, match="tensorrt|CUDA"):
        build_plan(tiny_package)


def test_package_without_torchscript_or_onnx(tmp_path: Path, tiny_package: ModelPackage) -> None:
    import shutil

    folder = tmp_path / "onnx-only"
    shutil.copytree(tiny_package.folder, folder)
    (folder / "1" / "model.pt").unlink()
    pkg = ModelPackage.load(folder)
    with pytest.raises(EngineUnavailable, match="has no TorchScript model.pt"):
        create_engine("torch", pkg)
    (folder / "1" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(EngineUnavailable, match="ONNX Runtime cannot load model.onnx"):
        create_engine("onnxruntime", pkg)


def test_availability_lists_every_engine() -> None:
    avail = engine_availability()
    assert set(avail) == {"onnxruntime", "tensorrt", "torch", "triton"}
    assert avail["onnxruntime"].startswith("ok: ")
    assert "CPUExecutionProvider" in avail["onnxruntime"]
    assert avail["torch"].startswith("ok: torch")


def test_shared_engine_is_one_warm_instance(tiny_package: ModelPackage) -> None:
    from inference.engines import close_shared_engines, shared_engine

    close_shared_engines()
    with capture_logs() as logs:
        a = shared_engine(tiny_package, ["onnxruntime"])
        b = shared_engine(tiny_package, ["onnxruntime"])
        c = shared_engine(tiny_package, ["torch"])
    assert a is b and c is not a and c.name == "torch"
    warmed = [e for e in logs if e["event"] == "engine warmed up"]
    assert [e["engine"] for e in warmed] == ["onnxruntime", "torch"]
    close_shared_engines()
    assert shared_engine(tiny_package, ["onnxruntime"], warm_up=False) is not a
    close_shared_engines()
