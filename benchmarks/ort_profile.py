#!/usr/bin/env python3
"""Where ONNX Runtime CPU spends its time: per operator type and per node, from ORT's profiler.

For every graph given (or every variant of ``--package``), with the node's own session settings
(:func:`inference.engines.onnxruntime.session_options`):

1. **the optimised graph** ORT runs (``optimized_model_filepath``): node types before and after
   optimisation, so one sees whether an INT8 QDQ graph really runs integer kernels
   (``QLinearConv``, ``QLinearMatMul``, ``QGemm``) or ``DequantizeLinear -> Conv`` in float,
   how many ``QuantizeLinear``/``DequantizeLinear`` are left un-fused, and the layout nodes the
   NCHWc/NHWC transformers added (``ReorderInput``/``ReorderOutput``, ``Transpose``);
2. **time per operator type** (ms per batch and share), median over the profiled runs;
3. **the top nodes** with their shapes and, for convolutions and matrix products, their
   multiply-accumulates and achieved GFLOP/s (and % of ``--peak-from``'s peak of the graph's
   precision).

Per-node times are medians over ``--runs`` runs (one warm-up first): on a loaded machine a
single preempted kernel would otherwise dominate. Absolute times on a loaded machine are not
benchmark results; the shares and the graph structure are.

Usage::

    python3 benchmarks/ort_profile.py --package models/omnimri-tiny [--batch 4] [--runs 10]
        [--threads N] [--top 25] [--peak-from peak.json] [--json out.json]
    python3 benchmarks/ort_profile.py A.onnx B.onnx ...
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from inference.engines.flops import physical_cores  # noqa: E402

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                   "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSoftmax")
"""Node types that compute in int8 (what an INT8 graph should run)."""

LAYOUT_NODES = ("ReorderInput", "ReorderOutput", "Transpose")
"""Node types the layout transformers add (NCHWc blocking, NHWC for integer convolution)."""

_MAC_OPS = {"Conv": 1, "QLinearConv": 3, "FusedConv": 1}
"""Convolutions and where their weight is among the inputs."""


def op_key(node: Any) -> str:
    """``domain:op_type`` (``op_type`` for the default domain)."""
    return f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def graph_summary(source: Path, optimised: Path) -> dict[str, Any]:
    """Node-type counts of the source and the optimised graph, and what the INT8 nodes became.

    Returns:
        ``source`` and ``optimised`` (type → count), ``float_conv_after_dq`` (float ``Conv``
        nodes fed by a ``DequantizeLinear``: QDQ groups ORT did not fuse), ``integer_nodes``,
        ``qdq_left`` (``QuantizeLinear`` + ``DequantizeLinear`` in the optimised graph, weight
        dequantisation included) and ``layout_nodes``.
    """
    import onnx

    src = onnx.load(str(source), load_external_data=False)
    opt = onnx.load(str(optimised), load_external_data=False)
    made_by = {o: n for n in opt.graph.node for o in n.output}
    float_conv_after_dq = sum(
        1 for n in opt.graph.node
        if n.op_type in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul")
        and any(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear"
                for i in n.input[:2]))
    counts = collections.Counter(op_key(n) for n in opt.graph.node)
    return {
        "source": dict(collections.Counter(op_key(n) for n in src.graph.node).most_common()),
        "optimised": dict(counts.most_common()),
        "float_conv_after_dq": float_conv_after_dq,
        "integer_nodes": sum(v for k, v in counts.items() if k.split(":")[-1] in INTEGER_KERNELS),
        "qdq_left": sum(v for k, v in counts.items()
                        if k in ("QuantizeLinear", "DequantizeLinear")),
        "layout_nodes": sum(v for k, v in counts.items() if k.split(":")[-1] in LAYOUT_NODES),
    }


def _shape(entry: dict[str, Any]) -> list[int]:
    return [int(d) for d in next(iter(entry.values()), [])]


def _weight_dims(optimised: Path) -> dict[str, list[int]]:
    """Convolution node name → its weight's dims ``[M, C/group, k...]`` in the optimised graph.

    Taken from the graph, not the profiler: ORT pre-packs constant weights, and the profiler
    then reports no shape for them.
    """
    import onnx

    graph = onnx.load(str(optimised), load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    out = {}
    for node in graph.node:
        k = _MAC_OPS.get(node.op_type)
        if k is not None and len(node.input) > k and node.input[k] in dims:
            out[node.name] = dims[node.input[k]]
    return out


def node_macs(op: str, in_shapes: list[list[int]], out_shapes: list[list[int]]) -> int:
    """Multiply-accumulates of one profiled node (0 if unknown).

    Args:
        op: Node type.
        in_shapes: ``[input, weight]`` for convolutions (the weight ``[M, C/group, k...]`` in
            every layout ORT uses), the inputs for matrix products.
        out_shapes: The outputs' shapes.

    Convolutions: output elements × ``prod(weight[1:])``; matrix products: output elements ×
    the reduced dimension. NCHWc convolutions count the output channels padded to the block
    (8 or 16): what ORT computes (the OmniMRI convolutions have 16, 32, 64 channels: no padding).
    """
    if not out_shapes or not out_shapes[0]:
        return 0
    out = math.prod(out_shapes[0])
    base = op.split(":")[-1]
    if base in _MAC_OPS:
        w = in_shapes[1] if len(in_shapes) > 1 else []
        return out * math.prod(w[1:]) if len(w) >= 3 else 0
    if base in ("MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger", "Gemm", "QGemm"):
        a = in_shapes[0] if in_shapes else []
        return out * a[-1] if a else 0
    return 0


def profile(model: Path, x: np.ndarray, input_name: str, *, threads: int, runs: int,
            tmp: Path) -> tuple[dict[str, Any], Path]:
    """Profile ``runs`` runs of ``model`` on ``x``; returns the per-node medians and the graph.

    Returns:
        ``({"nodes": {name: {op, ms, in, out, macs}}, "run_ms": median run ms}, optimised path)``.
    """
    import onnxruntime as ort

    from inference.engines.onnxruntime import session_options

    opts = session_options(threads)
    optimised = tmp / f"{model.stem}.optimised.onnx"
    opts.optimized_model_filepath = str(optimised)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / model.stem)
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, {input_name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    starts = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    per: dict[str, list[float]] = collections.defaultdict(list)
    meta: dict[str, dict[str, Any]] = {}
    run_of = [s for s, _ in starts]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        k = int(np.searchsorted(run_of, e["ts"], side="right")) - 1
        if k < 1:  # the warm-up run
            continue
        name = e["name"].removesuffix("_kernel_time")
        per[name].append(e["dur"] / 1000.0)
        if name not in meta:
            args = e.get("args", {})
            ins = [_shape(d) for d in args.get("input_type_shape", [])]
            outs = [_shape(d) for d in args.get("output_type_shape", [])]
            op = args.get("op_name", "?")
            meta[name] = {"op": op, "in": ins[:1], "out": outs[:1], "macs": 0}
    weights = _weight_dims(optimised)
    for name, m in meta.items():
        m["in"] += [weights[name]] if name in weights else []
        m["macs"] = node_macs(m["op"], m["in"], m["out"])
    nodes = {n: {**meta[n], "ms": statistics.median(v + [0.0] * (runs - len(v)))}
             for n, v in per.items()}
    run_ms = statistics.median(d / 1000.0 for _, d in starts[1:]) if len(starts) > 1 else 0.0
    return {"nodes": nodes, "run_ms": run_ms}, optimised


def report(label: str, prof: dict[str, Any], summary: dict[str, Any], top: int,
           peak: float) -> dict[str, Any]:
    """Print one graph's profile; returns the per-type table and the MAC-node rates."""
    nodes = prof["nodes"]
    total = sum(n["ms"] for n in nodes.values())
    by_op: dict[str, float] = collections.defaultdict(float)
    for n in nodes.values():
        by_op[n["op"]] += n["ms"]
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    print(f"\n== {label}: kernels {total:.1f} ms per batch (sum of per-node medians), run "
          f"{prof['run_ms']:.1f} ms")
    print(f"  source graph:    {summary['source']}")
    print(f"  optimised graph: {summary['optimised']}")
    print(f"  integer kernels {summary['integer_nodes']}, float Conv/MatMul fed by "
          f"DequantizeLinear {summary['float_conv_after_dq']}, Q/DQ left "
          f"{summary['qdq_left']}, layout nodes {summary['layout_nodes']}")
    print("  per operator type:")
    for op, ms in by_op.items():
        if ms >= 0.005 * total:
            print(f"    {op:26s} {ms:8.2f} ms {100 * ms / total:5.1f} %")
    mac_ms = sum(n["ms"] for n in nodes.values() if n["macs"])
    macs = sum(n["macs"] for n in nodes.values() if n["macs"])
    rate = 2 * macs / 1e9 / (mac_ms / 1000) if mac_ms else 0.0
    pct = f" = {100 * rate / peak:.1f} % of peak" if peak else ""
    print(f"  Conv/MatMul kernels: {100 * mac_ms / total:.0f} % of kernel time, "
          f"{2 * macs / 1e9:.2f} GFLOP per batch at {rate:.1f} GFLOP/s{pct}; everything "
          f"else (memory-bound: layout, norms, activations, Q/DQ) "
          f"{100 * (1 - mac_ms / total):.0f} %")
    print(f"  top {top} nodes:")
    for name, n in sorted(nodes.items(), key=lambda kv: -kv[1]["ms"])[:top]:
        gf = (f" {2 * n['macs'] / 1e9 / (n['ms'] / 1000):6.1f} GFLOP/s" if n["macs"] and n["ms"]
              else "")
        print(f"    {n['ms']:7.2f} ms {100 * n['ms'] / total:5.1f} % {n['op']:22s} "
              f"{name[:58]:58s} {n['in']} -> {n['out']}{gf}")
    return {"kernel_ms": total, "run_ms": prof["run_ms"], "by_op_ms": by_op,
            "mac_kernels_gflops": rate, "mac_kernels_share": mac_ms / total if total else 0.0,
            "graph": summary}


def real_batch(input_spec: Any, batch: int) -> np.ndarray:
    """``batch`` real windows of the MNI template (what the node feeds the engine)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engines import brain_volume  # benchmarks/engines.py: the MNI template volume

    from inference.preprocess import extract_batch, pad_to_patch, prepare, sliding_windows

    vol = brain_volume()
    prepared = prepare(vol.array, vol.affine, input_spec)
    padded = pad_to_patch(prepared.array, input_spec)
    windows = sliding_windows(prepared.transform.model_shape, input_spec)
    mid = max(0, len(windows) // 2 - batch // 2)
    return np.asarray(extract_batch(padded, windows[mid:mid + batch], input_spec),
                      dtype=np.float32)


def main() -> None:
    """Parse arguments, profile every graph, print and optionally write the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", type=Path, help="ONNX graphs (input NCHW float32)")
    ap.add_argument("--package", type=Path, help="profile every variant of this package")
    ap.add_argument("--batch", type=int, default=0, help="windows per run (default: package's)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--peak-from", type=Path, help="benchmarks/engines.py --json with the peak")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    graphs: list[tuple[str, Path, str]] = []
    spec = None
    if args.package:
        from inference.package import ModelPackage

        pkg = ModelPackage.load(args.package)
        spec = pkg.spec.input
        for v in pkg.variant_names():
            path = pkg.model_path(variant=v)
            prec = "float32" if v == "fp32" else str(pkg.spec.variant_spec(v).precision)  # type: ignore[union-attr]
            if path.is_file():
                graphs.append((v, path, prec))
    graphs += [(p.name, p, "int8" if "int8" in p.name else "float32") for p in args.models]
    if not graphs:
        ap.error("give ONNX files or --package")
    peaks: dict[str, float] = {}
    if args.peak_from:
        peaks = {k: float(v["gflops"]) for k, v in
                 json.loads(args.peak_from.read_text())["peak_gflops"].items()}
    if spec is not None:
        x = real_batch(spec, args.batch or spec.batch_size)
        name = spec.name
    else:
        import onnxruntime as ort

        inp = ort.InferenceSession(str(graphs[0][1]), providers=["CPUExecutionProvider"]
                                   ).get_inputs()[0]
        dims = [d if isinstance(d, int) else (args.batch or 4) for d in inp.shape]
        x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
        name = inp.name
    print(f"batch {list(x.shape)}, {args.threads} threads, {args.runs} profiled runs "
          "(per-node medians; absolute ms on a loaded machine are not benchmark results)")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, prec in graphs:
            prof, optimised = profile(path, x, name, threads=args.threads, runs=args.runs,
                                      tmp=Path(tmp))
            summary = graph_summary(path, optimised)
            out[label] = report(label, prof, summary, args.top,
                                peaks.get("int8" if prec == "int8" else "float32", 0.0))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
