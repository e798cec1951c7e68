"""benchmarks/ort_profile.py: ORT profiler per node, MACs from the optimised graph, what INT8 runs.

A two-convolution 2-D graph, float and its QDQ variant (:func:`inference.quantize.quantize_onnx`):
the float graph runs float convolutions only; the QDQ one runs ``QLinearConv`` (ORT fused the
Q/DQ groups) with no float ``Conv`` left behind a ``DequantizeLinear``; every convolution's
multiply-accumulates come out as counted by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from inference.quantize import quantize_onnx

ROOT = Path(__file__).resolve().parents[1]
N, C, H = 2, 16, 32
"""Batch, channels of the first convolution's output (a multiple of the NCHWc block, which ORT
pads output channels to), square image side."""


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ort_profile", ROOT / "benchmarks" /
                                                  "ort_profile.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ort_profile"] = mod
    spec.loader.exec_module(mod)
    return mod


def _two_convs(path: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((C, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((32, C, 3, 3)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(
        nodes, "two_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, H, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, H, H])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ort_profile")
    fp32, int8 = tmp / "two.onnx", tmp / "two.int8.onnx"
    _two_convs(fp32)
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((1, 3, H, H)).astype(np.float32) for _ in range(4)]
    quantize_onnx(fp32, int8, calib, "x", op_types=("Conv",), method="minmax")
    return fp32, int8


def test_float_and_int8_graphs_profiled_per_node(graphs: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    mod = _script()
    x = np.random.default_rng(2).standard_normal((N, 3, H, H)).astype(np.float32)
    macs = {"conv1": N * C * H * H * 3 * 9, "conv2": N * 32 * H * H * C * 9}
    results = {}
    for label, path in zip(("fp32", "int8"), graphs, strict=True):
        prof, optimised = mod.profile(path, x, "x", threads=1, runs=3, tmp=tmp_path)
        summary = mod.graph_summary(path, optimised)
        results[label] = (prof, summary)
        assert prof["run_ms"] > 0
        convs = {n: v for n, v in prof["nodes"].items() if v["macs"]}
        assert sorted(v["macs"] for v in convs.values()) == sorted(macs.values()), convs
        assert all(v["ms"] > 0 for v in convs.values())
        table = mod.report(label, prof, summary, top=5, peak=100.0)
        assert table["mac_kernels_share"] > 0 and table["kernel_ms"] > 0
    fp32_sum, int8_sum = results["fp32"][1], results["int8"][1]
    assert fp32_sum["integer_nodes"] == 0 and fp32_sum["qdq_left"] == 0
    assert int8_sum["source"].get("QuantizeLinear", 0) >= 2  # QDQ source graph
    # ORT fused each DequantizeLinear -> Conv -> QuantizeLinear group into an integer kernel
    assert int8_sum["integer_nodes"] == 2, int8_sum["optimised"]
    assert int8_sum["float_conv_after_dq"] == 0
    assert any(k.endswith("QLinearConv") for k in int8_sum["optimised"])


def test_node_macs_from_shapes() -> None:
    mod = _script()
    assert mod.node_macs("Conv", [[1, 4, 8, 8], [6, 4, 3, 3]], [[1, 6, 8, 8]]) == 6 * 64 * 36
    assert mod.node_macs("com.microsoft:QLinearConv", [[1, 8, 8, 4], [6, 4, 3, 3]],
                         [[1, 8, 8, 6]]) == 6 * 64 * 36
    assert mod.node_macs("MatMul", [[2, 5, 7]], [[2, 5, 3]]) == 30 * 7
    assert mod.node_macs("Conv", [[1, 4, 8, 8]], [[1, 6, 8, 8]]) == 0  # weight unknown
    assert mod.node_macs("Relu", [[1, 4]], [[1, 4]]) == 0
