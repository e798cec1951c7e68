"""SEG export speed: 180 frames x 4 segments of 256 x 256 (a 1 mm brain series).

Usage: ``python benchmarks/export.py [--repeat 3]`` (or ``python -m benchmarks.export``).
Prints seconds per SEG for LABELMAP
(non-overlapping segments), BINARY (overlapping) and each compression; target <= 1 s.
Also times the whole ``build_outputs`` (SEG, SR, SC, GSPS, KOS) once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# ``export`` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402

from export import ExportContext, ExportOptions, SegOptions, build_outputs  # noqa: E402
from export.seg import build_seg  # noqa: E402
from inference import results as r  # noqa: E402
from omnimri_samples import synthetic_series  # noqa: E402
from tests.test_export_data import volume_from_datasets  # noqa: E402

SLICES, SIZE = 180, 256


def make_context(overlap: bool, seg: SegOptions) -> ExportContext:
    datasets = synthetic_series(SLICES, SIZE, SIZE)
    vol = volume_from_datasets(datasets)
    k, j, i = np.ogrid[:SLICES, :SIZE, :SIZE]
    c = (SLICES / 2, SIZE / 2, SIZE / 2)
    radius = np.sqrt(((k - c[0]) * 1.4) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2)
    shells = [(radius < 40), (radius >= 40) & (radius < 70), (radius >= 70) & (radius < 100)]
    lesion = ((k - 90) ** 2 + (j - 100) ** 2 + (i - 100) ** 2) < 12**2
    if not overlap:
        for m in shells:
            m &= ~lesion
    labels = [
        r.SegmentLabel(1, "Inner", r.TISSUE, r.WHITE_MATTER),
        r.SegmentLabel(2, "Middle", r.TISSUE, r.GREY_MATTER),
        r.SegmentLabel(3, "Outer", r.TISSUE, r.CSF),
        r.SegmentLabel(4, "Lesion", r.MORPHOLOGICALLY_ABNORMAL, r.LESION, task="pathological"),
    ]
    masks = [*shells, lesion]
    res = r.Results(
        model=r.ModelInfo("bench", "1"),
        segments=[r.SegmentMask(lab, m) for lab, m in zip(labels, masks, strict=True)],
    )
    return ExportContext("bench", res, vol, datasets, ExportOptions(seg=seg))


def timeit(ctx: ExportContext, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        build_seg(ctx)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"SEG {SLICES} frames x 4 segments of {SIZE}x{SIZE}, median of {args.repeat}")
    rows = []
    for overlap, name in ((False, "LABELMAP"), (True, "BINARY")):
        for comp in ("none", "jpegls", "jpeg2000"):
            ctx = make_context(overlap, SegOptions(compression=comp))  # type: ignore[arg-type]
            seg = build_seg(ctx)[0]
            s = timeit(ctx, args.repeat)
            size = len(seg.PixelData) / 1e6
            rows.append((name, comp, s, size, int(seg.NumberOfFrames)))
            fallback = name == "BINARY" and comp == "jpegls"
            note = " (written as JPEG 2000: 1-bit frames)" if fallback else ""
            print(f"  {name:8s} {comp:9s} {s:6.3f} s  {size:7.2f} MB pixel data  "
                  f"{int(seg.NumberOfFrames)} frames  {'OK' if s <= 1.0 else 'SLOW'}{note}")
    lm = next(x for x in rows if x[0] == "LABELMAP" and x[1] == "none")[2]
    bi = next(x for x in rows if x[0] == "BINARY" and x[1] == "none")[2]
    print(f"  BINARY / LABELMAP time ratio (uncompressed): {bi / lm:.2f}")
    ctx = make_context(True, SegOptions())
    t0 = time.perf_counter()
    out = build_outputs(ctx)
    print(f"build_outputs (seg+sr+sc+pr+ko, no detections): {time.perf_counter() - t0:.2f} s, "
          f"{sum(len(v) for v in out.values())} objects")


if __name__ == "__main__":
    main()
