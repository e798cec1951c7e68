#!/usr/bin/env python3
"""Engine benchmark: how close each engine gets to the CPU's limit, and ORT vs PyTorch eager.

Prints, in one run:

1. **the machine**: physical cores, load average before and after (a loaded machine makes
   absolute numbers meaningless; ratios of interleaved runs still hold), ORT and torch versions;
2. **the CPU's peak**: best square-GEMM rate at float32, bfloat16 and int8
   (:func:`inference.engines.flops.measure_peak`: torch/oneDNN, ONNX Runtime MLAS, numpy);
3. per network: **FLOPs** per window and per volume (Conv/MatMul/Gemm MACs from the ONNX graph
   × windows), then every engine on the whole :func:`inference.runner.run_model` pipeline on
   the same volume, same windows, runs interleaved (A, B, C, A, B, C, ...): median inference
   and total ms, CPU seconds, achieved GFLOP/s and **% of the peak** of the engine's precision,
   and the **ratio** to PyTorch eager at its best thread count; twice, like for like:
   **(a) all outputs** (every engine computes every graph output) and **(b) the served
   outputs** of the default tasks (the node's ``config.yaml`` pipeline instructions for this
   model, e.g. the brain pipeline's, or ``--instruction``): ONNX Runtime on the graph pruned to
   those outputs (``run(..., outputs=)``, what a job runs) vs PyTorch eager computing the same
   heads (``OmniMRI.forward(heads=)``); skipped when the tasks read every output or the
   baseline is TorchScript (it cannot skip heads);
4. with ``--profile``: ORT's per-operator kernel time, and the Conv kernels' own GFLOP/s and %
   of peak (the dominant kernels);
5. with ``--batch-sizes``: ms per window of ONNX Runtime on the volume's real windows per batch
   size (how ``input.batch_size`` is chosen).

Engines: ``onnxruntime`` (tuned: :class:`inference.engines.onnxruntime.OnnxRuntimeEngine`,
optimised-graph cache, physical-core threads) with every graph variant of the package
(``fp32``, ``int8`` QDQ, ...), and PyTorch eager float32 at 1 and N threads (the baseline).
``--package`` without a TorchScript ``1/model.pt``: an OmniMRI package's eager baseline is the
same architecture (``extra.architecture``) with seeded random weights: speed does not depend on
the weight values; outputs are not compared here (``omnimri-node engines verify`` does that).

Targets (docs/engines.md): ONNX Runtime ≤ 0.5× PyTorch eager; ≥ 50 % of peak for the dominant
kernels or a profile that says why not; TensorRT ≤ 0.25× on a GPU (``--gpu``).

Usage::

    python3 benchmarks/engines.py [--package models/omnimri-tiny] [--net unet|tiny|all]
        [--repeats 3] [--threads N] [--profile] [--batch-sizes 1,2,4,8,16,32] [--no-peak]
        [--peak-from EARLIER.json] [--torch-bf16] [--gpu] [--json F]
        [--instruction "segment brain tissues" ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from inference.engines import Engine  # noqa: E402
from inference.engines.flops import (  # noqa: E402
    count_macs,
    measure_peak,
    physical_cores,
)
from inference.package import ModelPackage  # noqa: E402
from inference.preprocess import extract_batch, pad_to_patch, prepare, sliding_windows  # noqa: E402
from inference.runner import run_model  # noqa: E402
from inference.volume import SliceRef, Volume  # noqa: E402

PATCH = (48, 48, 48)
REPO = Path(__file__).resolve().parents[1]

PRECISION_OF_VARIANT = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8",
                        "fp16": "float32", "fp8": "int8"}
"""Which measured peak an engine is compared against."""


def bench_unet(seed: int = 0) -> Any:
    """A small 3-D U-Net: ``[N,1,D,H,W] -> (seg [N,4,D,H,W], cls [N,2])``."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01),
        )

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1 = block(1, 16)
            self.down = nn.Conv3d(16, 32, 2, stride=2)
            self.e2 = block(32, 32)
            self.up = nn.ConvTranspose3d(32, 16, 2, stride=2)
            self.d1 = block(32, 16)
            self.head = nn.Conv3d(16, 4, 1)
            self.cls = nn.Linear(32, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = self.e1(x)
            b = self.e2(self.down(a))
            d = self.d1(torch.cat([self.up(b), a], dim=1))
            return self.head(d), self.cls(b.mean(dim=(2, 3, 4)))

    torch.manual_seed(seed)
    return UNet().eval()


def build_bench_package(folder: Path) -> tuple[ModelPackage, Any]:
    """Export :func:`bench_unet` as a package (ONNX + TorchScript); returns it and the module."""
    import torch

    net = bench_unet()
    (folder / "1").mkdir(parents=True, exist_ok=True)
    example = torch.zeros((2, 1, *PATCH))
    torch.onnx.export(
        net, (example,), str(folder / "1" / "model.onnx"), input_names=["image"],
        output_names=["seg", "cls"],
        dynamic_axes={"image": {0: "N"}, "seg": {0: "N"}, "cls": {0: "N"}},
        opset_version=17, dynamo=False,
    )
    torch.jit.save(torch.jit.trace(net, example), str(folder / "1" / "model.pt"))
    code = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
    spec = {
        "name": "bench-unet", "version": "0", "tasks": ["segment brain tissues"],
        "input": {"name": "image", "spacing_mm": None, "patch_size": list(PATCH),
                  "overlap": 0.25, "batch_size": 2},
        "outputs": [
            {"name": "seg", "kind": "segmentation",
             "labels": [{"value": v, "label": f"class {v}", "category": code, "type": code}
                        for v in (1, 2, 3)]},
            {"name": "cls", "kind": "classification", "classes": [{"name": "a"}, {"name": "b"}]},
        ],
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return ModelPackage.load(folder), net


def eager_module(package: ModelPackage) -> tuple[Any, str, list[str]]:
    """The package's PyTorch baseline: TorchScript ``1/model.pt``, else the OmniMRI architecture.

    Returns:
        ``(module, label, output names in the module's order)``.

    Raises:
        SystemExit: Neither is available.
    """
    import torch

    ts = package.torchscript_path()
    if ts.is_file():
        return (torch.jit.load(str(ts), map_location="cpu"), "torch TorchScript fp32",
                package.spec.engine_outputs())
    arch = package.spec.extra.get("architecture")
    if package.spec.extra.get("family") == "omnimri" and isinstance(arch, dict):
        from inference.omnimri.config import OmniMRIConfig
        from inference.omnimri.export import VISION_OUTPUTS, _Vision
        from inference.omnimri.model import OmniMRI

        torch.manual_seed(0)
        return (_Vision(OmniMRI(OmniMRIConfig.from_dict(arch))).eval(),
                "torch eager fp32 (same arch)", list(VISION_OUTPUTS))
    raise SystemExit(f"{package.folder}: no 1/model.pt and no OmniMRI architecture to build")


def brain_volume() -> Volume:
    """The MNI152 template at 2 mm as a Volume (shipped with nilearn: no download)."""
    from omnimri_samples import mni_brain

    arr, aff = mni_brain(2)
    return Volume(array=arr, affine=aff,
                  slices=[SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.4")
                          for k in range(arr.shape[0])])


def machine() -> dict[str, Any]:
    """Cores, load average, library versions."""
    import onnxruntime as ort

    info: dict[str, Any] = {"physical_cores": physical_cores(), "cpu_count": os.cpu_count(),
                            "loadavg": os.getloadavg(), "onnxruntime": ort.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def compare(
    engines: dict[str, Callable[[], Engine]], package: ModelPackage, volume: Volume,
    repeats: int, gflop_per_volume: float, peaks: dict[str, float], precisions: dict[str, str],
    baseline: list[str], threads: int = 1, instructions: list[str] | None = None,
) -> dict[str, Any]:
    """Interleaved :func:`run_model` runs of every engine; medians, % of peak, ratios.

    Args:
        engines: Label → factory.
        package: The package all engines serve.
        volume: The input volume.
        repeats: Timed rounds (one warm-up round first).
        gflop_per_volume: The graph's GFLOP for this volume's windows.
        peaks: Precision → measured peak GFLOP/s.
        precisions: Label → precision (``float32`` / ``bfloat16`` / ``int8``).
        baseline: Labels of the PyTorch eager runs; the fastest is the ratio's denominator.
        threads: Threads the peak was measured with (for the per-core share).
        instructions: Passed to :func:`run_model` (``None``: every output).
    """
    made = {label: make() for label, make in engines.items()}
    times: dict[str, dict[str, list[float]]] = {
        k: {"inference": [], "total": [], "cpu": []} for k in made}
    windows = 0
    for r in range(repeats + 1):  # first round is warm-up
        for label, eng in made.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            raw = run_model(package, volume, eng, instructions)
            total = time.perf_counter() - t0
            cpu = time.process_time() - c0
            windows = raw.windows
            if r > 0:
                times[label]["inference"].append(raw.timings_s["inference"] * 1000)
                times[label]["total"].append(total * 1000)
                times[label]["cpu"].append(cpu)
    for eng in made.values():
        eng.close()
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    best_base = min(baseline, key=lambda k: med[k]["inference"])
    rows: dict[str, dict[str, Any]] = {}
    print(f"  {'engine':46s} {'infer ms':>9s} {'total ms':>9s} {'CPU s':>6s} "
          f"{'GFLOP/s':>8s} {'% peak':>7s} {'GF/CPU-s':>8s} {'% core':>7s} {'ratio':>6s}")
    for label in made:
        m = med[label]
        rate = gflop_per_volume / (m["inference"] / 1000)
        per_cpu_s = gflop_per_volume / m["cpu"] if m["cpu"] else 0.0
        peak = peaks.get(precisions[label], 0.0)
        core_peak = peak / threads if threads else 0.0
        ratio = m["inference"] / med[best_base]["inference"]
        rows[label] = {**m, "gflops": rate, "pct_peak": 100 * rate / peak if peak else 0.0,
                       "gflop_per_cpu_s": per_cpu_s,
                       "pct_core_peak": 100 * per_cpu_s / core_peak if core_peak else 0.0,
                       "peak_precision": precisions[label], "ratio_vs_best_torch": ratio}
        print(f"  {label:46s} {m['inference']:9.1f} {m['total']:9.1f} {m['cpu']:6.2f} "
              f"{rate:8.1f} {rows[label]['pct_peak']:6.1f}% {per_cpu_s:8.1f} "
              f"{rows[label]['pct_core_peak']:6.1f}% {ratio:5.2f}x")
    print(f"  ({windows} windows, median of {repeats}; ratio = inference / {best_base}; "
          f"% peak against the {', '.join(sorted(set(precisions.values())))} peak; "
          "GF/CPU-s and % core: GFLOP per CPU-second of the whole process against one core's "
          "share of the peak - what a loaded machine leaves comparable; CPU s includes "
          "PyTorch's spinning OpenMP threads)")
    return {"windows": windows, "repeats": repeats, "baseline": best_base, "engines": rows}


def batch_sweep(model_path: Path, package: ModelPackage, volume: Volume, sizes: list[int],
                threads: int, repeats: int) -> dict[int, dict[str, float]]:
    """Wall and CPU ms per window of ONNX Runtime over the volume's real windows, per batch."""
    from inference.engines.onnxruntime import OnnxRuntimeEngine

    spec = package.spec.input
    prepared = prepare(volume.array, volume.affine, spec)
    padded = pad_to_patch(prepared.array, spec)
    windows = sliding_windows(prepared.transform.model_shape, spec)
    eng = OnnxRuntimeEngine(model_path, providers=["CPUExecutionProvider"],
                            intra_op_threads=threads)
    per: dict[int, list[float]] = {b: [] for b in sizes}
    cpu: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(repeats + 1):
        for b in sizes:  # interleaved
            t0, c0 = time.perf_counter(), time.process_time()
            for s in range(0, len(windows), b):
                eng.run({spec.name: extract_batch(padded, windows[s:s + b], spec)})
            if r > 0:
                per[b].append((time.perf_counter() - t0) * 1000 / len(windows))
                cpu[b].append((time.process_time() - c0) * 1000 / len(windows))
    eng.close()
    out = {b: statistics.median(v) for b, v in per.items()}
    out_cpu = {b: statistics.median(v) for b, v in cpu.items()}
    best = min(out, key=lambda b: out[b])
    best_cpu = min(out_cpu, key=lambda b: out_cpu[b])
    print(f"  batch sweep {model_path.name} ({len(windows)} windows, median of {repeats}), "
          "ms per window wall: " + "  ".join(f"{b}: {v:.1f}{'*' if b == best else ''}"
                                             for b, v in out.items()))
    print("    CPU ms per window: " + "  ".join(
        f"{b}: {v:.1f}{'*' if b == best_cpu else ''}" for b, v in out_cpu.items()))
    return {b: {"wall_ms": out[b], "cpu_ms": out_cpu[b]} for b in sizes}


def profile_section(model_path: Path, package: ModelPackage, peaks: dict[str, float],
                    precision: str, threads: int, volume: Volume) -> dict[str, Any]:
    """ORT's profile of one real batch (:mod:`benchmarks.ort_profile`): per operator and node,
    what the optimised graph runs (integer kernels, Q/DQ left, layout nodes), and the Conv/MatMul
    kernels' own GFLOP/s and % of the peak of ``precision``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ort_profile import graph_summary, profile, report

    spec = package.spec.input
    prepared = prepare(volume.array, volume.affine, spec)
    padded = pad_to_patch(prepared.array, spec)
    windows = sliding_windows(prepared.transform.model_shape, spec)
    mid = max(0, len(windows) // 2 - spec.batch_size // 2)
    x = np.asarray(extract_batch(padded, windows[mid:mid + spec.batch_size], spec),
                   dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        prof, optimised = profile(model_path, x, spec.name, threads=threads, runs=5,
                                  tmp=Path(tmp))
        summary = graph_summary(model_path, optimised)
    out: dict[str, Any] = report(f"profile {model_path.name}, batch {spec.batch_size}", prof,
                                 summary, 12, peaks.get(precision, 0.0))
    peak = peaks.get(precision, 0.0)
    out["mac_kernels_pct_peak"] = 100 * out["mac_kernels_gflops"] / peak if peak else 0.0
    return out


def main() -> None:
    """Parse arguments, run the CPU section and, with ``--gpu``, the GPU section."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=physical_cores(),
                    help="intra-op threads for ONNX Runtime (default: physical cores)")
    ap.add_argument("--package", type=Path, help="benchmark this package (every variant)")
    ap.add_argument("--net", choices=("unet", "tiny", "all"), default="unet",
                    help="built-in network(s): the 3-D U-Net (compute-bound) and/or the tests' "
                         "tiny net (per-call overhead-bound)")
    ap.add_argument("--profile", action="store_true", help="ORT per-operator profile")
    ap.add_argument("--batch-sizes", help="comma list: ORT ms/window per batch size")
    ap.add_argument("--no-peak", action="store_true", help="skip the GEMM peak measurement")
    ap.add_argument("--peak-from", type=Path,
                    help="take the peak from an earlier run's --json (e.g. measured when the "
                         "machine was quiet) instead of measuring it now")
    ap.add_argument("--peak-only", action="store_true",
                    help="measure the peak (and write --json), nothing else")
    ap.add_argument("--torch-bf16", action="store_true",
                    help="also PyTorch eager under bf16 autocast (what AMX/AVX-512 BF16 gives; "
                         "ONNX Runtime's CPU provider has no bf16 Conv/MatMul kernels)")
    ap.add_argument("--gpu", action="store_true", help="also TensorRT vs torch eager on CUDA")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--instruction", action="append", dest="instructions",
                    help="(b) the tasks whose served outputs are timed (repeat it); default: "
                         "the config.yaml pipeline's instructions for the package's model")
    args = ap.parse_args()

    from inference.engines.torch import TorchEngine

    info = machine()
    print(f"machine: {info['physical_cores']} physical cores, load average "
          f"{' '.join(f'{x:.2f}' for x in info['loadavg'])} (1/5/15 min), onnxruntime "
          f"{info['onnxruntime']}, torch {info.get('torch', '-')}")
    results: dict[str, Any] = {"machine": info, "threads": args.threads}
    peaks = {"float32": 0.0, "bfloat16": 0.0, "int8": 0.0}
    if args.peak_from:
        earlier = json.loads(args.peak_from.read_text())["peak_gflops"]
        peaks = {k: float(v["gflops"]) for k, v in earlier.items()}
        results["peak_gflops"] = earlier
        print(f"CPU peak from {args.peak_from}: "
              + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    elif not args.no_peak:
        peak = measure_peak(args.threads)
        print(f"CPU peak, {args.threads} threads, best square GEMM (n={peak['float32'].size}):")
        for prec, p in peak.items():
            tried = ", ".join(f"{k} {v:.0f}" for k, v in p.tried.items())
            print(f"  {prec:9s} {p.gflops:8.1f} GFLOP/s  ({tried})")
            peaks[prec] = p.gflops
        results["peak_gflops"] = {k: {"gflops": v.gflops, "library": v.library,
                                      "tried": v.tried} for k, v in peak.items()}
    if args.peak_only:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return
    volume = brain_volume()
    results["volume_shape"] = volume.shape
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[ModelPackage, Any, str, list[str]]] = []
        if args.package:
            package = ModelPackage.load(args.package)
            cases.append((package, *eager_module(package)))
        if not args.package and args.net in ("unet", "all"):
            package, module = build_bench_package(Path(tmp) / "bench-unet")
            cases.append((package, module, "torch eager fp32", package.spec.engine_outputs()))
        if not args.package and args.net in ("tiny", "all"):
            from tests.fixtures.tiny_model import build_tiny_package, make_tiny_net

            tiny = build_tiny_package(Path(tmp) / "tiny")
            cases.append((tiny, make_tiny_net(), "torch eager fp32", tiny.spec.engine_outputs()))
        for package, module, torch_label, outs in cases:
            inp = [package.spec.input.name]
            cost = count_macs(package.onnx_path())
            spec_in = package.spec.input
            prepared = prepare(volume.array, volume.affine, spec_in)
            n_windows = len(sliding_windows(prepared.transform.model_shape, spec_in))
            gflop_volume = cost.gflops * n_windows
            shares = ", ".join(f"{k} {100 * cost.share(k):.0f} %" for k in cost.by_op)
            print(f"CPU: {package.name} (runs variant {package.spec.variant!r}), volume "
                  f"{volume.shape}: {cost.gflops:.3f} GFLOP per window ({shares}) × "
                  f"{n_windows} windows = {gflop_volume:.1f} GFLOP per volume")
            print(f"  (a) all outputs {package.spec.engine_outputs()}")
            engines, precisions = ort_factories(package, args.threads)
            baseline = add_eager(engines, precisions, module, torch_label, inp, outs,
                                 args.threads)
            if args.torch_bf16:
                label = f"{torch_label.replace('fp32', 'bf16 autocast')} ({args.threads} thr)"

                def make_bf16(m: Any = module, i: list[str] = inp, o: list[str] = outs
                              ) -> Engine:
                    return _ThreadedTorch(TorchEngine(_bf16_module(m), i, o, device="cpu"),
                                          args.threads, bf16=True)

                engines[label] = make_bf16
                precisions[label] = "bfloat16"
            res = compare(engines, package, volume, args.repeats, gflop_volume, peaks,
                          precisions, baseline, args.threads)
            res.update({"gflop_per_window": cost.gflops, "gflop_per_volume": gflop_volume,
                        "macs_by_op": cost.by_op})
            best_ort = min((k for k in res["engines"] if k.startswith("onnxruntime")),
                           key=lambda k: res["engines"][k]["inference"])
            ratio = res["engines"][best_ort]["ratio_vs_best_torch"]
            print(f"  best ONNX Runtime: {best_ort}, {ratio:.3f}x PyTorch eager; target <= 0.5x: "
                  f"{'met' if ratio <= 0.5 else 'NOT met'}")
            results[f"cpu:{package.name}"] = res
            served = served_section(package, module, torch_label, volume, args, peaks)
            if served:
                res["served"] = served
            if args.profile:
                res["profile"] = {}
                for variant in package.variant_names():
                    path = package.model_path(variant=variant)
                    if path.is_file():
                        prec = "float32" if variant == "fp32" else "int8"
                        res["profile"][variant] = profile_section(
                            path, package, peaks, prec, args.threads, volume)
            if args.batch_sizes:
                sizes = [int(b) for b in args.batch_sizes.split(",")]
                res["batch_sweep"] = {}
                for variant in package.variant_names():
                    path = package.model_path(variant=variant)
                    if path.is_file():
                        res["batch_sweep"][variant] = batch_sweep(
                            path, package, volume, sizes, args.threads, args.repeats)
            if args.gpu:
                results[f"gpu:{package.name}"] = gpu_section(
                    package, module, inp, outs, volume, args.repeats)
    info_after = os.getloadavg()
    results["loadavg_after"] = info_after
    print(f"load average after: {' '.join(f'{x:.2f}' for x in info_after)} "
          f"(above ~0.5 the machine was not quiet: compare ratios, not absolute times)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))


def ort_factories(package: ModelPackage, threads: int
                  ) -> tuple[dict[str, Callable[[], Engine]], dict[str, str]]:
    """The tuned ONNX Runtime engine of every graph variant of ``package``, and its precision."""
    from inference.engines.onnxruntime import OnnxRuntimeEngine

    engines: dict[str, Callable[[], Engine]] = {}
    precisions: dict[str, str] = {}
    for variant in package.variant_names():
        path = package.model_path(variant=variant)
        if not path.is_file():
            continue
        prec = PRECISION_OF_VARIANT.get(
            "fp32" if variant == "fp32" else package.spec.variant_spec(variant)
            .precision, "float32")  # type: ignore[union-attr]
        label = f"onnxruntime {variant} ({threads} thr)"
        cache_dir = package.ort_cache_dir()
        engines[label] = lambda p=path, c=cache_dir: (  # type: ignore[misc]
            OnnxRuntimeEngine(p, providers=["CPUExecutionProvider"],
                              intra_op_threads=threads, optimized_dir=c))
        precisions[label] = prec
    return engines, precisions


def add_eager(engines: dict[str, Callable[[], Engine]], precisions: dict[str, str],
              module: Any, torch_label: str, inp: list[str], outs: list[str],
              threads: int) -> list[str]:
    """Add PyTorch eager float32 at 1 and ``threads`` threads; returns their labels."""
    from inference.engines.torch import TorchEngine

    baseline = []
    for t in sorted({1, threads}):
        label = f"{torch_label} ({t} thr)"

        def make(m: Any = module, t: int = t, i: list[str] = inp, o: list[str] = outs
                 ) -> Engine:
            return _ThreadedTorch(TorchEngine(m, i, o, device="cpu"), t)

        engines[label] = make
        precisions[label] = "float32"
        baseline.append(label)
    return baseline


def default_instructions(package: ModelPackage, config: Path = REPO / "config.yaml"
                         ) -> list[str]:
    """The instructions the node's ``config.yaml`` runs this model with (its first pipeline
    naming the package's folder or model name); the package's tasks when none does."""
    try:
        pipelines = (yaml.safe_load(config.read_text()) or {}).get("pipelines") or {}
    except OSError:
        pipelines = {}
    for p in pipelines.values():
        if isinstance(p, dict) and p.get("model") in (package.folder.name, package.spec.name):
            return [str(i) for i in p.get("instructions") or []]
    return list(package.spec.tasks)


def served_heads_module(module: Any, names: list[str]) -> Any | None:
    """PyTorch eager computing only the heads ``names`` need (``OmniMRI.forward(heads=)``),
    returning them in ``names`` order; ``None`` when ``module`` cannot skip heads
    (TorchScript, other networks)."""
    import torch

    from inference.omnimri.model import OmniMRI

    found = getattr(module, "model", None)
    if not isinstance(found, OmniMRI):
        return None
    inner: OmniMRI = found
    heads = frozenset("diagnosis" if n == "diagnosis_map" else n for n in names)

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model: OmniMRI = inner

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(image, heads=heads)
            if "diagnosis" in out:  # as the export wrapper builds it
                d = out["diagnosis"]
                out["diagnosis_map"] = d[:, :, None, None].expand(
                    -1, -1, image.shape[2], image.shape[3])
            return tuple(out[n] for n in names)

    return Heads().eval()


def served_section(package: ModelPackage, module: Any, torch_label: str, volume: Volume,
                   args: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any] | None:
    """(b): ONNX Runtime on the graph pruned to the default tasks' outputs vs PyTorch eager
    computing the same heads, interleaved on the same volume and windows."""
    from inference.engines.onnxruntime import prune_graph
    from inference.package import TextOutput

    instructions = args.instructions or default_instructions(package)
    wanted = package.spec.outputs_for(instructions)
    served = [n for n in wanted if not isinstance(package.spec.output(n), TextOutput)]
    every = package.spec.engine_outputs()
    head = f"  (b) served outputs of {instructions}: {served}"
    if set(served) >= set(every):
        print(f"{head}: every output, (b) = (a)")
        return None
    eager = served_heads_module(module, served)
    if eager is None:
        print(f"{head}: skipped, the PyTorch baseline ({torch_label}) cannot skip heads")
        return {"skipped": "baseline cannot skip heads", "outputs": served}
    print(f"{head} (ONNX Runtime on the pruned graph, PyTorch eager on the same heads)")
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "served.onnx"
        cut.write_bytes(prune_graph(package.onnx_path(), served))
        cost = count_macs(cut)
    spec_in = package.spec.input
    prepared = prepare(volume.array, volume.affine, spec_in)
    gflop_volume = cost.gflops * len(sliding_windows(prepared.transform.model_shape, spec_in))
    print(f"  pruned graph: {cost.gflops:.3f} GFLOP per window, {gflop_volume:.1f} per volume")
    engines, precisions = ort_factories(package, args.threads)
    baseline = add_eager(engines, precisions, eager,
                         torch_label.replace("(same arch)", "(same heads)"),
                         [spec_in.name], served, args.threads)
    res = compare(engines, package, volume, args.repeats, gflop_volume, peaks, precisions,
                  baseline, args.threads, instructions)
    best = min((k for k in res["engines"] if k.startswith("onnxruntime")),
               key=lambda k: res["engines"][k]["inference"])
    ratio = res["engines"][best]["ratio_vs_best_torch"]
    print(f"  (b) best ONNX Runtime: {best}, {ratio:.3f}x PyTorch eager on the same heads; "
          f"target <= 0.5x: {'met' if ratio <= 0.5 else 'NOT met'}")
    res.update({"instructions": instructions, "outputs": served,
                "gflop_per_window": cost.gflops, "gflop_per_volume": gflop_volume})
    return res


def _bf16_module(module: Any) -> Any:
    """``module`` under ``torch.autocast("cpu", bfloat16)``, outputs cast back to float32."""
    import torch

    class Bf16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *x: torch.Tensor) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.inner(*x)
            if isinstance(out, torch.Tensor):
                return out.float()
            return tuple(t.float() for t in out)

    return Bf16().eval()


class _ThreadedTorch:
    """A TorchEngine that sets ``torch.set_num_threads`` before each run (process-wide).

    ``bf16``: run under ``torch.autocast("cpu", torch.bfloat16)`` (oneDNN AMX/AVX-512 BF16
    kernels where the CPU has them), outputs back to float32.
    """

    def __init__(self, engine: Any, threads: int, bf16: bool = False) -> None:
        self._engine = engine
        self._threads = threads
        self._bf16 = bf16
        self.name = engine.name
        self.provider = f"{engine.provider} {threads} thr{' bf16' if bf16 else ''}"

    @property
    def input_names(self) -> list[str]:
        return list(self._engine.input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self._engine.output_names)

    def run(self, inputs: dict[str, Any], outputs: Any = None) -> dict[str, Any]:
        import torch

        torch.set_num_threads(self._threads)
        return dict(self._engine.run(inputs, outputs))

    def close(self) -> None:
        self._engine.close()


def gpu_section(
    package: ModelPackage, module: Any, inp: list[str], outs: list[str], volume: Volume,
    repeats: int,
) -> dict[str, Any]:
    """TensorRT plans (fp32 and each QDQ variant) vs torch eager on CUDA; skipped on CPU."""
    from inference.engines import EngineUnavailable
    from inference.engines.tensorrt import TensorRTEngine, build_plan, tensorrt_status
    from inference.engines.torch import TorchEngine

    status = tensorrt_status()
    print(f"GPU: {status}")
    if not status.startswith("ok"):
        print("  GPU section skipped")
        return {"skipped": status}
    engines: dict[str, Callable[[], Engine]] = {}
    precisions: dict[str, str] = {}
    for variant in package.variant_names():
        try:
            t0 = time.perf_counter()
            plan = build_plan(package, variant=variant)
            print(f"  plan {plan.name} ready in {time.perf_counter() - t0:.1f} s")
        except EngineUnavailable as err:
            print(f"  {variant}: skipped: {err}")
            continue
        label = f"tensorrt {variant}"
        engines[label] = lambda p=plan: TensorRTEngine(p)  # type: ignore[misc]
        precisions[label] = "gpu"
    if not engines:
        return {"skipped": "no plan could be built"}
    engines["torch eager (cuda)"] = lambda: TorchEngine(module, inp, outs, device="cuda")
    precisions["torch eager (cuda)"] = "gpu"
    result = compare(engines, package, volume, repeats, 0.0, {}, precisions,
                     ["torch eager (cuda)"])
    best = min((k for k in result["engines"] if k.startswith("tensorrt")),
               key=lambda k: result["engines"][k]["inference"])
    ratio = result["engines"][best]["ratio_vs_best_torch"]
    print(f"  best TensorRT: {best}, {ratio:.3f}x; target <= 0.25x: "
          f"{'met' if ratio <= 0.25 else 'NOT met'}")
    return result


if __name__ == "__main__":
    main()
