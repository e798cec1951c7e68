"""Know the limit: a graph's multiply-accumulates and the CPU's measured matrix-multiply peak.

* :func:`count_macs` reads an ONNX graph, fixes the batch to 1, infers every tensor shape
  (ONNX Runtime's symbolic shape inference, falling back to ``onnx.shape_inference`` with data
  propagation) and counts the multiply-accumulates (MACs) of ``Conv``, ``ConvTranspose``,
  ``MatMul``, ``Gemm`` and their quantised forms. Everything else (norms, activations, resize)
  is memory-bound and ignored: on these networks it is well under 1 % of the arithmetic.
  FLOPs = 2 × MACs.
* :func:`measure_peak` times large square GEMMs at float32, bfloat16 and int8 with the
  libraries the engines use (PyTorch/oneDNN, ONNX Runtime's MLAS, numpy's BLAS) and keeps the
  best rate per precision: the ceiling an engine's achieved GFLOP/s is compared against.

Needs the ``onnx`` package (test/train extras), not part of the node's runtime; torch is used
when installed and skipped otherwise.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "QLinearConv", "QLinearMatMul",
               "ConvInteger", "MatMulInteger")
"""Node types whose multiply-accumulates are counted."""


@dataclass
class GraphCost:
    """Multiply-accumulates of one graph for one sample (batch 1)."""

    macs: int
    """Total MACs per sample."""
    by_op: dict[str, int] = field(default_factory=dict)
    """MACs per node type."""
    nodes: list[tuple[str, str, int]] = field(default_factory=list)
    """``(op_type, node name, MACs)`` per counted node, graph order."""
    unknown: list[str] = field(default_factory=list)
    """Counted-type nodes whose shapes could not be inferred (their MACs are missing)."""

    @property
    def gflops(self) -> float:
        """GFLOP per sample (2 × MACs / 1e9)."""
        return 2.0 * self.macs / 1e9

    def share(self, op_type: str) -> float:
        """Fraction of all MACs in ``op_type`` nodes (0-1)."""
        return self.by_op.get(op_type, 0) / self.macs if self.macs else 0.0


def _dims(vi: Any) -> list[int] | None:
    shape = vi.type.tensor_type.shape
    out = []
    for d in shape.dim:
        if not d.HasField("dim_value"):
            return None
        out.append(int(d.dim_value))
    return out


def _infer(model: Any) -> Any:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # fall back to the reference shape inference
        from onnx import shape_inference

        return shape_inference.infer_shapes(model, data_prop=True)


def count_macs(model_path: Path | str, batch: int = 1) -> GraphCost:
    """Multiply-accumulates per sample of the graph in ``model_path``.

    Args:
        model_path: An ``.onnx`` file whose inputs have static shapes except the batch (axis 0).
        batch: Batch the shapes are inferred at; the result is divided by it (per sample).

    Returns:
        The :class:`GraphCost`.
    """
    import onnx

    model = onnx.load(str(model_path))
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
    inferred = _infer(model)
    shapes: dict[str, list[int] | None] = {
        v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input,
                                   *inferred.graph.output)
    }
    shapes.update({k: list(v) for k, v in inits.items()})
    for node in inferred.graph.node:  # Constant nodes carry shapes too (DequantizeLinear weights)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
    # QDQ graphs: a DequantizeLinear output has its input's shape
    for node in inferred.graph.node:
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and node.output[0] not in shapes:
            shapes[node.output[0]] = shapes.get(node.input[0])
    cost = GraphCost(macs=0)
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        macs = _node_macs(node, shapes)
        name = node.name or node.output[0]
        if macs is None:
            cost.unknown.append(name)
            continue
        macs = macs // batch
        cost.nodes.append((node.op_type, name, macs))
        cost.by_op[node.op_type] = cost.by_op.get(node.op_type, 0) + macs
        cost.macs += macs
    return cost


def _node_macs(node: Any, shapes: dict[str, list[int] | None]) -> int | None:
    op = node.op_type
    quant = op.startswith("QLinear")
    a_name = node.input[0]
    b_name = node.input[3] if quant else node.input[1]
    a, b, y = shapes.get(a_name), shapes.get(b_name), shapes.get(node.output[0])
    if op in ("Conv", "QLinearConv", "ConvInteger"):
        if y is None or b is None:
            return None
        # weight [Cout, Cin/group, k...]: every output element costs prod(w[1:]) MACs
        return math.prod(y) * math.prod(b[1:])
    if op == "ConvTranspose":
        if a is None or b is None:
            return None
        # weight [Cin, Cout/group, k...]: every input element feeds Cout/group * prod(k)
        return math.prod(a) * math.prod(b[1:])
    if op in ("MatMul", "QLinearMatMul", "MatMulInteger"):
        if y is None or a is None:
            return None
        return math.prod(y) * a[-1]
    if op == "Gemm":
        if y is None or a is None:
            return None
        trans_a = next((int(at.i) for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
        return math.prod(y) * k
    return None


# ---------------------------------------------------------------- peak


@dataclass
class PeakResult:
    """Best measured GEMM rate at one precision."""

    precision: str
    """``float32``, ``bfloat16`` or ``int8``."""
    gflops: float
    """Best rate, GFLOP/s (int8: giga integer multiply-adds × 2 per second)."""
    library: str
    """What reached it, e.g. ``torch.matmul`` or ``onnxruntime MatMulInteger``."""
    size: int
    """Square matrix size n (an n×n by n×n product)."""
    tried: dict[str, float] = field(default_factory=dict)
    """Every library tried → GFLOP/s (0 where it could not run)."""


def _time_best(fn: Callable[[], Any], flops: float, seconds: float) -> float:
    fn()  # warm-up: allocation, kernel selection, packing
    best = math.inf
    t_end = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if runs >= 50:
            break
    return flops / best / 1e9


def _ort_matmul_session(kind: str, n: int, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if kind == "int8":
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    else:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "gemm", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def measure_peak(threads: int | None = None, n: int = 2048, seconds: float = 1.0
                 ) -> dict[str, PeakResult]:
    """Best GEMM rate per precision on this CPU with ``threads`` threads.

    Args:
        threads: Threads for every library; default :func:`physical_cores`.
        n: Matrix size (n×n × n×n: 2·n³ FLOP). 2048 is large enough to be compute-bound.
        seconds: Time spent per library and precision (best run kept).

    Returns:
        ``float32``, ``bfloat16`` and ``int8`` → :class:`PeakResult`. A precision no library
        could run has ``gflops`` 0.
    """
    threads = threads or physical_cores()
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    tried: dict[str, dict[str, float]] = {"float32": {}, "bfloat16": {}, "int8": {}}
    a32 = rng.standard_normal((n, n)).astype(np.float32)
    b32 = rng.standard_normal((n, n)).astype(np.float32)
    tried["float32"]["numpy.matmul"] = _time_best(lambda: a32 @ b32, flops, seconds)
    try:
        sess = _ort_matmul_session("float32", n, threads)
        tried["float32"]["onnxruntime MatMul"] = _time_best(
            lambda: sess.run(None, {"a": a32, "b": b32}), flops, seconds)
        a8 = rng.integers(0, 255, (n, n), dtype=np.uint8)
        b8 = rng.integers(-127, 127, (n, n), dtype=np.int8)
        sess8 = _ort_matmul_session("int8", n, threads)
        tried["int8"]["onnxruntime MatMulInteger"] = _time_best(
            lambda: sess8.run(None, {"a": a8, "b": b8}), flops, seconds)
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return _best(tried, n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
        with torch.inference_mode():
            tried["float32"]["torch.matmul"] = _time_best(lambda: ta @ tb, flops, seconds)
            ha, hb = ta.bfloat16(), tb.bfloat16()
            tried["bfloat16"]["torch.matmul"] = _time_best(lambda: ha @ hb, flops, seconds)
            ia = torch.randint(-127, 127, (n, n), dtype=torch.int8)
            ib = torch.randint(-127, 127, (n, n), dtype=torch.int8)
            if hasattr(torch, "_int_mm"):
                try:
                    tried["int8"]["torch._int_mm"] = _time_best(
                        lambda: torch._int_mm(ia, ib), flops, seconds)
                except RuntimeError:
                    tried["int8"]["torch._int_mm"] = 0.0
    finally:
        torch.set_num_threads(old)
    return _best(tried, n)


def _best(tried: dict[str, dict[str, float]], n: int) -> dict[str, PeakResult]:
    out: dict[str, PeakResult] = {}
    for prec, rates in tried.items():
        if rates:
            lib = max(rates, key=lambda k: rates[k])
            out[prec] = PeakResult(prec, rates[lib], lib, n, dict(rates))
        else:
            out[prec] = PeakResult(prec, 0.0, "", n, {})
    return out


# ---------------------------------------------------------------- cores


def physical_cores() -> int:
    """Physical cores this process may run on (affinity mask ∩ one thread per core).

    Reads ``/sys/devices/system/cpu/cpu*/topology`` for the allowed CPUs (SMT siblings count
    once); falls back to the affinity size, then to ``os.cpu_count()``.
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            pkg = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(allowed) or 1
        cores.add((pkg, core))
    return len(cores) or len(allowed) or 1


# ---------------------------------------------------------------- profile


def profile_ops(model_path: Path | str, inputs: dict[str, Any], *, threads: int | None = None,
                runs: int = 3, disabled_optimizers: tuple[str, ...] = ()) -> dict[str, float]:
    """Kernel time per node type (ms per run) of ONNX Runtime CPU on ``inputs``.

    Runs ``runs`` profiled inferences after one warm-up (ORT's own profiler, the same session
    settings as :class:`~inference.engines.onnxruntime.OnnxRuntimeEngine`); node types sorted
    by time, largest first.
    """
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers))
        sess.run(None, inputs)  # warm-up inside the profile, dropped below
        for _ in range(runs):
            sess.run(None, inputs)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
    run_starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first_timed = run_starts[1] if len(run_starts) > 1 else 0
    by: dict[str, float] = {}
    for e in events:
        if (e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
                and e["ts"] >= first_timed):
            op = e["args"].get("op_name", "?")
            by[op] = by.get(op, 0.0) + e["dur"] / 1000.0 / runs
    return dict(sorted(by.items(), key=lambda kv: -kv[1]))
