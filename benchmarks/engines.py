#!/usr/bin/env python3
"""Engine benchmark: ONNX Runtime vs PyTorch eager (CPU), TensorRT vs PyTorch eager (GPU).

Same package, same input volume, same sliding windows, same run: each engine runs the whole
:func:`inference.runner.run_model` pipeline on the MNI152 brain at 2 mm (91×109×91), runs are
interleaved (A, B, A, B, ...) so machine load hits both alike, and the median per volume is
printed with the ratio. ``inference`` is the time inside the engine over all windows; ``total``
adds the (identical) pre- and post-processing.

The default network is a small 3-D U-Net (16/32 channels, 4 classes + a 2-class head) built
here with a fixed seed and exported to ONNX; ``--package PATH`` benchmarks a real package
instead (ONNX Runtime vs its TorchScript ``1/model.pt``).

Targets (docs/engines.md): ONNX Runtime CPU ≤ 0.5× PyTorch eager; TensorRT ≤ 0.25× on a GPU.

Usage::

    python3 benchmarks/engines.py [--repeats 3] [--threads N] [--gpu] [--package PATH] [--json F]
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

import yaml  # noqa: E402

from inference.engines import Engine  # noqa: E402
from inference.package import ModelPackage  # noqa: E402
from inference.runner import run_model  # noqa: E402
from inference.volume import SliceRef, Volume  # noqa: E402

PATCH = (48, 48, 48)


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


def brain_volume() -> Volume:
    """The MNI152 template at 2 mm as a Volume (shipped with nilearn: no download)."""
    from dicom_node.samples import mni_brain

    arr, aff = mni_brain(2)
    return Volume(array=arr, affine=aff,
                  slices=[SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.4")
                          for k in range(arr.shape[0])])


def compare(
    label_a: str, make_a: Callable[[], Engine], label_b: str, make_b: Callable[[], Engine],
    package: ModelPackage, volume: Volume, repeats: int,
) -> dict[str, Any]:
    """Interleaved runs of two engines; medians (ms per volume) and ratio a/b."""
    eng_a, eng_b = make_a(), make_b()
    times: dict[str, dict[str, list[float]]] = {
        label_a: {"inference": [], "total": []}, label_b: {"inference": [], "total": []}}
    windows = 0
    for r in range(repeats + 1):  # first round is warm-up
        for label, eng in ((label_a, eng_a), (label_b, eng_b)):
            t0 = time.perf_counter()
            raw = run_model(package, volume, eng)
            total = time.perf_counter() - t0
            windows = raw.windows
            if r > 0:
                times[label]["inference"].append(raw.timings_s["inference"] * 1000)
                times[label]["total"].append(total * 1000)
    eng_a.close()
    eng_b.close()
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    result = {
        "a": label_a, "b": label_b, "windows": windows, "repeats": repeats,
        "ms_per_volume": med,
        "ratio_inference": med[label_a]["inference"] / med[label_b]["inference"],
        "ratio_total": med[label_a]["total"] / med[label_b]["total"],
    }
    print(f"  {'engine':34s} {'inference ms':>13s} {'total ms':>10s}")
    for label in (label_a, label_b):
        print(f"  {label:34s} {med[label]['inference']:13.1f} {med[label]['total']:10.1f}")
    print(f"  ratio {label_a} / {label_b}: inference {result['ratio_inference']:.3f}x, "
          f"total {result['ratio_total']:.3f}x  ({windows} windows, median of {repeats})")
    return result


def main() -> None:
    """Parse arguments, run the CPU section and, with ``--gpu``, the GPU section."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads for both engines")
    ap.add_argument("--package", type=Path, help="benchmark this package (needs 1/model.pt)")
    ap.add_argument("--net", choices=("unet", "tiny", "all"), default="unet",
                    help="built-in network(s): the 3-D U-Net (compute-bound) and/or the tests' "
                         "tiny net (per-call overhead-bound)")
    ap.add_argument("--gpu", action="store_true", help="also TensorRT vs torch eager on CUDA")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import torch

    from inference.engines.onnxruntime import OnnxRuntimeEngine
    from inference.engines.torch import TorchEngine

    torch.set_num_threads(args.threads)
    volume = brain_volume()
    results: dict[str, Any] = {"threads": args.threads, "volume_shape": volume.shape}
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[ModelPackage, Any, str]] = []
        if args.package:
            package = ModelPackage.load(args.package)
            module = torch.jit.load(str(package.torchscript_path()), map_location="cpu")
            cases.append((package, module, "torch TorchScript (cpu)"))
        if not args.package and args.net in ("unet", "all"):
            package, module = build_bench_package(Path(tmp) / "bench-unet")
            cases.append((package, module, "torch eager (cpu)"))
        if not args.package and args.net in ("tiny", "all"):
            from tests.fixtures.tiny_model import build_tiny_package, make_tiny_net

            cases.append((build_tiny_package(Path(tmp) / "tiny"), make_tiny_net(),
                          "torch eager (cpu)"))
        for package, module, torch_label in cases:
            outs = package.spec.engine_outputs()
            inp = [package.spec.input.name]
            print(f"CPU: {package.name}, volume {volume.shape}, {args.threads} threads")
            res = compare(
                "onnxruntime CPUExecutionProvider",
                lambda p=package: OnnxRuntimeEngine(  # type: ignore[misc]
                    p.onnx_path(), providers=["CPUExecutionProvider"],
                    intra_op_threads=args.threads),
                torch_label,
                lambda m=module, i=inp, o=outs: TorchEngine(  # type: ignore[misc]
                    m, i, o, device="cpu"),
                package, volume, args.repeats,
            )
            results[f"cpu:{package.name}"] = res
            print(f"  target <= 0.5x: {'met' if res['ratio_inference'] <= 0.5 else 'NOT met'}")
            if args.gpu:
                results[f"gpu:{package.name}"] = gpu_section(
                    package, module, inp, outs, volume, args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))


def gpu_section(
    package: ModelPackage, module: Any, inp: list[str], outs: list[str], volume: Volume,
    repeats: int,
) -> dict[str, Any]:
    """TensorRT plan vs torch eager on CUDA; skipped with the reason on a CPU machine."""
    from inference.engines import EngineUnavailable
    from inference.engines.tensorrt import TensorRTEngine, build_plan, tensorrt_status
    from inference.engines.torch import TorchEngine

    status = tensorrt_status()
    print(f"GPU: {status}")
    if not status.startswith("ok"):
        print("  GPU section skipped")
        return {"skipped": status}
    try:
        t0 = time.perf_counter()
        plan = build_plan(package)
        print(f"  plan {plan.name} ready in {time.perf_counter() - t0:.1f} s")
    except EngineUnavailable as err:
        print(f"  GPU section skipped: {err}")
        return {"skipped": str(err)}
    result = compare(
        "tensorrt plan (fp32)", lambda: TensorRTEngine(plan),
        "torch eager (cuda)", lambda: TorchEngine(module, inp, outs, device="cuda"),
        package, volume, repeats,
    )
    print(f"  target <= 0.25x: {'met' if result['ratio_inference'] <= 0.25 else 'NOT met'}")
    return result


if __name__ == "__main__":
    main()
