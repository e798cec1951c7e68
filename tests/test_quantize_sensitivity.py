"""Sensitivity-guided mixed precision (``quantize.node_sensitivity``, ``mixed_precision``).

A tiny two-conv graph built here: ``tissue = conv_good(image) + conv_fragile(image)``. The
fragile conv carries a large weight common to its three output channels (softmax ignores it)
next to small ones that decide the classes: per-channel int8 weights round the small ones
away and its uint8 output spans a wide range, so quantising it flips the class of many
voxels; quantising the good conv barely moves the probabilities.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.package import ModelPackage
from inference.quantize import (
    INT8_FILE,
    _preprocess,
    _quantize_static,
    _Reader,
    _run_windows,
    add_variant,
    mixed_precision,
    node_sensitivity,
    smallest_passing,
)

onnx = pytest.importorskip("onnx")

OPS = ("Conv",)


def _two_convs(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    good = rng.normal(0, 0.5, (3, 1, 3, 3)).astype(np.float32)
    fragile = rng.normal(0, 0.3, (3, 1, 3, 3)).astype(np.float32)
    fragile[:, 0, 1, 1] = 50.0  # common to the three classes: cancels in the softmax
    inits = [numpy_helper.from_array(good, "w_good"), numpy_helper.from_array(fragile, "w_frag"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b0")]
    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["image", "w_good", "b0"], ["a"], "conv_good", pads=pads),
             helper.make_node("Conv", ["image", "w_frag", "b0"], ["b"], "conv_fragile",
                              pads=pads),
             helper.make_node("Add", ["a", "b"], ["tissue"], "sum")]
    graph = helper.make_graph(
        nodes, "two_convs",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 12, 12])],
        [helper.make_tensor_value_info("tissue", TensorProto.FLOAT, ["N", 3, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _windows(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 1, 12, 12)).astype(np.float32) for _ in range(n)]


@pytest.fixture()
def graph(tmp_path: Path) -> Path:
    path = tmp_path / "two_convs.onnx"
    _two_convs(path)
    return path


@pytest.mark.parametrize("mode", ["alone", "all-but-one"])
def test_fragile_node_ranks_first(graph: Path, tmp_path: Path, mode: str) -> None:
    pre, cache = tmp_path / "pre.onnx", tmp_path / "calibration.json"
    _preprocess(graph, pre)
    _quantize_static(pre, tmp_path / "all.onnx", _Reader("image", _windows(16, 1)),
                     op_types=OPS, method="minmax", calibration_cache=cache)
    assert cache.is_file()  # the ranges are computed once and reused below
    ranking = node_sensitivity(pre, _windows(8, 2), "image", "tissue", calibration_cache=cache,
                               op_types=OPS, method="minmax", mode=mode)
    assert [r["node"] for r in ranking] == ["conv_fragile", "conv_good"]
    fragile, good = ranking
    assert fragile["score"] > 5 * max(good["score"], 1e-6)
    if mode == "alone":
        assert fragile["argmax_flip"] > 0.05 and good["argmax_flip"] < 0.02
    again = node_sensitivity(pre, _windows(8, 2), "image", "tissue", calibration_cache=cache,
                             op_types=OPS, method="minmax", mode=mode)
    assert again == ranking  # deterministic
    with pytest.raises(ValueError, match="unknown sensitivity mode"):
        node_sensitivity(pre, _windows(1, 2), "image", "tissue", calibration_cache=cache,
                         op_types=OPS, method="minmax", mode="random")


@pytest.mark.parametrize("need", [0, 1, 2, 3, 5, 8, 13, 20])
def test_smallest_passing_finds_the_threshold(need: int) -> None:
    calls: list[int] = []

    def passes(k: int) -> bool:
        calls.append(k)
        return k >= need

    assert smallest_passing(20, passes) == need
    assert 20 not in calls  # all float is assumed to pass, never built
    assert len(calls) <= 2 * 5 + 1 and len(set(calls)) == len(calls)


def test_mixed_precision_keeps_the_fragile_conv_float_and_records_why(
        graph: Path, tmp_path: Path, tiny_package: ModelPackage) -> None:
    ref_windows = _windows(8, 3)  # "validation" windows of the pass rule
    want = _run_windows(graph, ref_windows, "image", "tissue", "softmax", 1, 4).argmax(1)

    def passes(candidate: Path) -> dict[str, Any]:
        got = _run_windows(candidate, ref_windows, "image", "tissue", "softmax", 1, 4)
        agree = float(np.mean(got.argmax(1) == want))
        return {"passed": agree >= 0.99, "argmax_agreement": round(agree, 4)}

    out, cal = tmp_path / INT8_FILE, tmp_path / "calibration.json"
    info = mixed_precision(graph, out, _windows(16, 1), _windows(8, 2), "image", "tissue",
                           passes, op_types=OPS, method="minmax", calibration_cache=cal)
    auto = info["auto_exclude"]
    assert cal.is_file() and auto["calibration_cache"] == "computed"
    # a second search reads the ranges (no calibration data given) and chooses the same
    again = mixed_precision(graph, tmp_path / "again.onnx", [], _windows(8, 2), "image",
                            "tissue", passes, op_types=OPS, method="minmax",
                            calibration_cache=cal)
    assert again["auto_exclude"]["calibration_cache"] == "read"
    assert again["excluded_nodes"] == info["excluded_nodes"]
    assert (tmp_path / "again.onnx").read_bytes() == out.read_bytes()
    cal.write_text("not json")  # a damaged cache is recomputed, not fatal
    third = mixed_precision(graph, tmp_path / "third.onnx", _windows(16, 1), _windows(8, 2),
                            "image", "tissue", passes, op_types=OPS, method="minmax",
                            calibration_cache=cal)
    assert third["excluded_nodes"] == ["conv_fragile"]
    assert third["auto_exclude"]["calibration_cache"] == "computed"
    assert cal.read_text().startswith("{")  # and written again
    assert info["excluded_nodes"] == ["conv_fragile"] and auto["k"] == 1
    assert [t["k"] for t in auto["tried"]] == [0, 1]
    assert not auto["tried"][0]["passed"] and auto["tried"][1]["passed"]
    assert auto["float_nodes"][0]["node"] == "conv_fragile"
    assert auto["next_most_sensitive"][0]["node"] == "conv_good"
    # the written graph: conv_good quantised (int8 weight), conv_fragile float
    model = onnx.load(str(out))
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    assert convs["conv_fragile"].input[1] in inits
    assert producers[convs["conv_good"].input[1]].op_type == "DequantizeLinear"
    # recorded in model.yaml as the variant's quantisation
    shutil.copytree(tiny_package.folder, tmp_path / "pkg")
    pkg = ModelPackage.load(tmp_path / "pkg")
    shutil.copy(out, pkg.file(INT8_FILE))
    add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=info, check=None,
                make_default=False)
    loaded = ModelPackage.load(pkg.folder)
    entry = loaded.spec.variants[0]
    assert entry.quantisation["excluded_nodes"] == ["conv_fragile"]
    assert entry.quantisation["auto_exclude"]["float_nodes"][0]["score"] > 0
    assert loaded.spec.variant == "fp32"


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "omnimri-tiny"


@pytest.mark.slow
def test_auto_exclude_on_the_shipped_model(tmp_path: Path) -> None:
    """The OmniMRI search on a copy, shrunk (1 calibration case, 1 selection case)."""
    from inference.quantize import auto_exclude

    shutil.copytree(SHIPPED, tmp_path / "pkg", ignore=shutil.ignore_patterns("ort_cache"))
    pkg = ModelPackage.load(tmp_path / "pkg")
    path, info = auto_exclude(pkg, cases=1, every=10, sensitivity_cases=1,
                              sensitivity_every=40, select_cases=1)
    auto = info["auto_exclude"]
    assert path == pkg.file(INT8_FILE) and info["calibration_set"] == "validation"
    assert auto["select_seed"] != info["calibration_seed"] and auto["select_on"] == "tissue"
    k = auto["k"]
    assert info["excluded_nodes"] == [r["node"] for r in auto["float_nodes"]] and len(
        info["excluded_nodes"]) == k <= auto["quantisable_nodes"]
    scores = [r["score"] for r in auto["float_nodes"] + auto["next_most_sensitive"]]
    assert scores == sorted(scores, reverse=True)
    tried = {t["k"]: t["passed"] for t in auto["tried"]}
    assert not any(p for j, p in tried.items() if j < k)  # the smallest that passed
    assert k == auto["quantisable_nodes"] or tried[k]
    assert auto["calibration_cache"] == "computed"
    assert [p.name for p in pkg.ort_cache_dir().glob("calibration.*.json")]
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    for name in info["excluded_nodes"]:
        if by_name[name].op_type == "Conv":
            assert by_name[name].input[1] in inits  # float weight, no DequantizeLinear
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=info, check=None,
                make_default=False)
    entry = ModelPackage.load(pkg.folder).spec.variants[0]
    assert entry.quantisation["auto_exclude"]["k"] == k
