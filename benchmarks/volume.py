#!/usr/bin/env python3
"""Volume-building benchmark: seconds and peak memory to turn a stored series into a Volume.

A synthetic MR series (default 500 slices of 256×256, uint16) is written to a temporary folder
in chunks (never all in memory), then :func:`inference.volume.build_volume` runs in a fresh
child process that reports wall seconds and memory from ``/proc/self/status``: resident memory
just before the build, and the peak (VmHWM) after it. The increase is compared with the raw
pixel bytes (rows × columns × 2 × slices) and with the float32 result (2× the raw bytes): a
builder that holds every Dataset's pixel data next to the array would need about 3× raw.

Usage::

    python3 benchmarks/volume.py [--slices 500] [--size 256] [--syntax raw|rle] [--large]

``--large`` adds a 1000-slice 512×512 run (0.5 GB of pixels, 1 GB float32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def write_series(folder: Path, slices: int, size: int, syntax: str, chunk: int = 50) -> int:
    """Write the series chunk by chunk; returns the raw pixel bytes."""
    from pydicom.uid import RLELossless, generate_uid

    from omnimri_samples import UID_PREFIX, make_mr_series
    from omnimri_samples import write_series as save

    series_uid = generate_uid(prefix=UID_PREFIX)
    study_uid = generate_uid(prefix=UID_PREFIX)
    for_uid = generate_uid(prefix=UID_PREFIX)
    rng = np.random.default_rng(0)
    base = np.eye(4)
    base[:3, 0], base[:3, 1], base[:3, 2] = [0, 0, 1.0], [0, 0.9, 0], [0.9, 0, 0]
    for k0 in range(0, slices, chunk):
        n = min(chunk, slices - k0)
        arr = rng.integers(0, 4095, size=(n, size, size)).astype(np.float32)
        aff = base.copy()
        aff[:3, 3] = (base @ [k0, 0, 0, 1])[:3]
        datasets = make_mr_series(arr, aff, series_uid=series_uid, study_uid=study_uid)
        for k, ds in enumerate(datasets):
            ds.FrameOfReferenceUID = for_uid
            ds.InstanceNumber = k0 + k + 1
            if syntax == "rle":
                ds.compress(RLELossless)
        sub = folder / f"{k0:05d}"
        save(datasets, sub)
    return slices * size * size * 2


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(folder: Path) -> None:
    """Build the volume in this (fresh) process and print a JSON line of measurements."""
    from inference.volume import build_volume

    paths = sorted(folder.rglob("*.dcm"))
    rss_before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    vol = build_volume(paths)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "seconds": seconds, "rss_before_kib": rss_before, "peak_kib": _status_kib("VmHWM"),
        "array_bytes": vol.array.nbytes, "shape": vol.shape,
    }))


def run(slices: int, size: int, syntax: str) -> dict[str, float]:
    """Write a series, build it in a child process, print and return the numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        raw = write_series(folder, slices, size, syntax)
        print(f"{slices} x {size}x{size} ({syntax}): wrote in {time.perf_counter() - t0:.1f} s")
        out = subprocess.run([sys.executable, __file__, "--child", str(folder)], check=True,
                             capture_output=True, text=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
    increase = (m["peak_kib"] - m["rss_before_kib"]) * 1024
    result = {
        "slices": slices, "size": size, "syntax": syntax, "seconds": m["seconds"],
        "raw_pixel_mb": raw / 1e6, "float32_mb": m["array_bytes"] / 1e6,
        "peak_increase_mb": increase / 1e6, "peak_increase_vs_raw": increase / raw,
        "slices_per_s": slices / m["seconds"],
    }
    print(f"  build {m['seconds']:.2f} s ({result['slices_per_s']:.0f} slices/s); peak RSS "
          f"+{increase / 1e6:.0f} MB = {increase / raw:.2f}x raw pixels "
          f"({raw / 1e6:.0f} MB raw, {m['array_bytes'] / 1e6:.0f} MB float32 result)")
    return result


def main() -> None:
    """Parse arguments and run the benchmark(s)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--syntax", choices=("raw", "rle"), default="raw")
    ap.add_argument("--large", action="store_true", help="also 1000 x 512x512")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    results = [run(args.slices, args.size, args.syntax)]
    if args.large:
        results.append(run(1000, 512, args.syntax))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
