#!/usr/bin/env python3
"""OmniMRI training-step benchmark: the shipped recipe's step vs a plain float32 PyTorch step.

Peer: the same `tiny` network, batch and loss in float32 eager PyTorch computing every head (what
v1.1.0 trained with). Recipe: bfloat16 autocast on the CPU and ``heads=SEG_HEADS`` (the image
decoder skipped on segmentation steps). Runs are interleaved (A, B, A, B, ...) so machine load
hits both alike; the median seconds per step and the ratio are printed. Synthetic tensors stand
in for the data (data preparation is the same for both).

Usage::

    python3 benchmarks/train_step.py [--repeats 5] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn import functional as F

from inference.omnimri.config import preset
from inference.omnimri.model import OmniMRI
from inference.omnimri.train import SEG_HEADS, dice_loss


def _steps(model: OmniMRI, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor,
           n: int, recipe: bool) -> float:
    """Seconds per step over ``n`` steps (after one warm-up step)."""
    times = []
    for k in range(n + 1):
        t0 = time.perf_counter()
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if recipe
               else contextlib.nullcontext())
        with ctx:
            out = model(x, crop_at=(0, 0), heads=SEG_HEADS if recipe else None)
            loss = sum(F.cross_entropy(out[h].float(), t) + dice_loss(out[h].float(), t, [1, 2, 3])
                       for h in ("tissue", "lesion"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--crop", type=int, default=96)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.rand(a.batch, 3, a.crop, a.crop)
    t = torch.randint(0, 4, (a.batch, a.crop, a.crop))
    runs: dict[str, list[float]] = {"fp32 eager, all heads": [], "recipe (bf16, seg heads)": []}
    models = {}
    for name in runs:
        torch.manual_seed(0)
        m = OmniMRI(preset("tiny"))
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3))
    for _ in range(a.repeats):
        for name, (m, opt) in models.items():
            runs[name].append(_steps(m, opt, x, t, a.steps, recipe=name.startswith("recipe")))
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:28s} {v:.3f} s/step  (runs: {', '.join(f'{s:.3f}' for s in runs[k])})")
    base, rec = med["fp32 eager, all heads"], med["recipe (bf16, seg heads)"]
    print(f"ratio recipe / fp32 eager: {rec / base:.2f}x  ({base / rec:.2f}x faster); "
          f"batch {a.batch} x {a.crop}^2, {a.threads} threads")


if __name__ == "__main__":
    main()
