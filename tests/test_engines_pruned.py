"""ONNX Runtime on a graph pruned to the outputs a job reads (issue #18).

``OnnxRuntimeEngine.run(inputs, outputs=[...])`` with a subset runs a session on the graph cut
down to those outputs: the same values as the full graph, cached on disk beside the optimised
graph and reused by the next engine, built once when threads race for it, and a clear fallback
(the full graph) when the cut fails.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from structlog.testing import capture_logs

import inference.engines.onnxruntime as ortmod
from inference.engines.onnxruntime import OnnxRuntimeEngine, pruned_model_path
from inference.package import ModelPackage

REPO = Path(__file__).resolve().parents[1]
OMNIMRI = REPO / "models" / "omnimri-tiny" / "1" / "model.onnx"
CPU = ["CPUExecutionProvider"]


def two_branch_graph(path: Path) -> Path:
    """``x [N,8]`` → ``a = Relu(x W1)`` and ``b = Tanh(x W2) W3``: two independent branches."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in (("W1", (8, 4)), ("W2", (8, 16)), ("W3", (16, 2)))}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a"]),
        helper.make_node("MatMul", ["x", "W2"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["t2"]),
        helper.make_node("MatMul", ["t2", "W3"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])],
        initializer=list(w.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _x(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_subset_equals_full_graph_and_drops_the_other_branch(tmp_path: Path) -> None:
    model = two_branch_graph(tmp_path / "model.onnx")
    cache = tmp_path / "ort_cache"
    eng = OnnxRuntimeEngine(model, providers=CPU, intra_op_threads=1, optimized_dir=cache)
    x = _x()
    full = eng.run({"x": x})
    only_a = eng.run({"x": x}, ["a"])
    assert sorted(only_a) == ["a"]
    np.testing.assert_array_equal(only_a["a"], full["a"])
    only_b = eng.run({"x": x}, outputs=("b",))
    np.testing.assert_allclose(only_b["b"], full["b"], rtol=0, atol=1e-6)
    both = eng.run({"x": x}, ["b", "a"])  # every output: the full graph's session
    assert sorted(both) == ["a", "b"]
    cut = eng.pruned_paths[frozenset({"a"})]
    assert cut is not None and cut == pruned_model_path(model, cache, CPU[0], ["a"])
    ops = {n.op_type for n in onnx.load(str(cut)).graph.node}
    assert "Tanh" not in ops and [o.name for o in onnx.load(str(cut)).graph.output] == ["a"]
    assert frozenset({"a", "b"}) not in eng.pruned_paths  # no pruned session for all outputs


def test_unknown_or_no_output_is_a_clear_error(tmp_path: Path) -> None:
    eng = OnnxRuntimeEngine(two_branch_graph(tmp_path / "model.onnx"), providers=CPU,
                            intra_op_threads=1)
    with pytest.raises(KeyError, match=r"unknown outputs \['nope'\].*\['a', 'b'\]"):
        eng.run({"x": _x()}, ["a", "nope"])
    with pytest.raises(ValueError, match="outputs is empty"):
        eng.run({"x": _x()}, [])


def test_pruned_graph_is_cached_and_reused_by_the_next_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_branch_graph(tmp_path / "model.onnx")
    cache = tmp_path / "ort_cache"
    cuts: list[list[str]] = []
    real = ortmod.prune_graph

    def counting(path: Path, outputs: Any) -> bytes:
        cuts.append(list(outputs))
        return real(path, outputs)

    monkeypatch.setattr(ortmod, "prune_graph", counting)
    first = OnnxRuntimeEngine(model, providers=CPU, intra_op_threads=1, optimized_dir=cache)
    want = first.run({"x": _x()}, ["b"])["b"]
    cached = pruned_model_path(model, cache, CPU[0], ["b"])
    assert cuts == [["b"]] and cached.is_file()
    stamp = cached.stat().st_mtime_ns
    first.close()

    second = OnnxRuntimeEngine(model, providers=CPU, intra_op_threads=1, optimized_dir=cache)
    got = second.run({"x": _x()}, ["b"])["b"]
    assert cuts == [["b"]], "the second engine cut the graph again instead of loading the cache"
    assert second.pruned_paths[frozenset({"b"})] == cached
    assert cached.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(got, want)
    # the full graph's own cache and the pruned one live side by side
    assert second.optimized_path is not None and second.optimized_path.is_file()

    # a changed model (new digest) never loads the old cut; the full engine's start drops it
    changed = onnx.load(str(model))
    w1 = numpy_helper.to_array(changed.graph.initializer[0]) * 2
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    onnx.save(changed, str(model))
    third = OnnxRuntimeEngine(model, providers=CPU, intra_op_threads=1, optimized_dir=cache)
    assert not cached.exists()
    third.run({"x": _x()}, ["b"])
    assert cuts == [["b"], ["b"]]
    assert third.pruned_paths[frozenset({"b"})] != cached


def test_threads_share_one_pruned_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    model = two_branch_graph(tmp_path / "model.onnx")
    eng = OnnxRuntimeEngine(model, providers=CPU, intra_op_threads=1,
                            optimized_dir=tmp_path / "ort_cache")
    inputs = [_x(2, seed=s) for s in range(6)]
    expected = [eng.run({"x": x})["a"] for x in inputs]
    cuts: list[int] = []
    real = ortmod.prune_graph

    def counting(path: Path, outputs: Any) -> bytes:
        cuts.append(1)
        return real(path, outputs)

    monkeypatch.setattr(ortmod, "prune_graph", counting)
    start = threading.Barrier(len(inputs))
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait(timeout=60)
            for _ in range(5):
                got[i] = eng.run({"x": inputs[i]}, ["a"])["a"]
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(cuts) == 1
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(got[i], want)


def test_failed_cut_falls_back_to_the_full_graph_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_branch_graph(tmp_path / "model.onnx")
    eng = OnnxRuntimeEngine(model, providers=CPU, intra_op_threads=1)
    want = eng.run({"x": _x()})["a"]

    def broken(path: Path, outputs: Any) -> bytes:
        raise ValueError("cannot cut this graph")

    monkeypatch.setattr(ortmod, "prune_graph", broken)
    with capture_logs() as logs:
        for _ in range(3):
            got = eng.run({"x": _x()}, ["a"])
    assert sorted(got) == ["a"]
    np.testing.assert_array_equal(got["a"], want)
    warned = [e for e in logs if e["event"] == "pruned graph not built; running the full graph"]
    assert len(warned) == 1 and warned[0]["outputs"] == ["a"]
    assert "cannot cut this graph" in warned[0]["error"]
    assert frozenset({"a"}) not in eng.pruned_paths


def test_tiny_package_subset_equals_full(tiny_package: ModelPackage) -> None:
    eng = OnnxRuntimeEngine(tiny_package.onnx_path(), providers=CPU, intra_op_threads=1)
    x = np.random.default_rng(1).standard_normal(
        (2, 1, *tiny_package.spec.input.patch_size)).astype(np.float32)
    full = eng.run({"image": x})
    for name in eng.output_names:
        np.testing.assert_allclose(eng.run({"image": x}, [name])[name], full[name],
                                   rtol=0, atol=1e-6)


@pytest.mark.skipif(not OMNIMRI.is_file(), reason="the shipped OmniMRI package is not here")
def test_omnimri_without_recon_equals_full(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copyfile(OMNIMRI, model)
    eng = OnnxRuntimeEngine(model, providers=CPU, optimized_dir=tmp_path / "ort_cache")
    keep = [n for n in eng.output_names if n != "recon"]
    x = np.random.default_rng(2).standard_normal((1, 3, 128, 128)).astype(np.float32)
    full = eng.run({"image": x})
    cut = eng.run({"image": x}, keep)
    assert sorted(cut) == sorted(keep)
    for name in keep:
        np.testing.assert_allclose(cut[name], full[name], rtol=0, atol=1e-6, err_msg=name)
    path = eng.pruned_paths[frozenset(keep)]
    assert path is not None
    full_nodes = len(onnx.load(str(eng.optimized_path)).graph.node)
    assert len(onnx.load(str(path)).graph.node) < full_nodes  # the recon decoder is gone


def test_run_model_asks_only_for_the_outputs_its_instructions_need(tmp_path: Path) -> None:
    from inference.engines import create_engine
    from inference.runner import run_model
    from inference.volume import SliceRef, Volume
    from tests.fixtures.tiny_model import identity_package

    pkg = identity_package(tmp_path / "identity")
    arr = np.random.default_rng(3).uniform(0, 100, (10, 12, 9)).astype(np.float32)
    vol = Volume(array=arr, affine=np.eye(4),
                 slices=[SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.4")
                         for k in range(arr.shape[0])])
    engine = create_engine("onnxruntime", pkg, intra_op_threads=1)
    assert isinstance(engine, OnnxRuntimeEngine)
    everything = run_model(pkg, vol, engine)
    assert engine.pruned_paths == {}  # all outputs: the full graph
    seg = run_model(pkg, vol, engine, ["segment"])
    assert list(seg.segmentation) == ["mask"] and not seg.image
    assert set(engine.pruned_paths) == {frozenset({"mask"})}
    np.testing.assert_array_equal(seg.segmentation["mask"].probabilities,
                                  everything.segmentation["mask"].probabilities)


@pytest.mark.skipif(not OMNIMRI.is_file(), reason="the shipped OmniMRI package is not here")
def test_benchmark_served_baseline_is_like_for_like() -> None:
    """benchmarks/engines.py (b): the brain pipeline's outputs, and PyTorch eager computing
    exactly those heads (values equal to the all-heads module's)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_engines",
                                                  REPO / "benchmarks" / "engines.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pkg = ModelPackage.load(OMNIMRI.parents[1])
    instructions = bench.default_instructions(pkg)
    assert "reconstruct" not in instructions and instructions  # config.yaml's brain pipeline
    served = [n for n in pkg.spec.outputs_for(instructions) if n in pkg.spec.engine_outputs()]
    assert "recon" not in served and {"tissue", "lesion"} <= set(served)
    module, _, names = bench.eager_module(pkg)
    heads = bench.served_heads_module(module, served)
    assert heads is not None
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = dict(zip(names, module(x), strict=True))
        cut = heads(x)
    assert len(cut) == len(served)
    for name, value in zip(served, cut, strict=True):
        torch.testing.assert_close(value, full[name], rtol=0, atol=0)
    assert bench.served_heads_module(torch.nn.Identity(), served) is None  # cannot skip heads
