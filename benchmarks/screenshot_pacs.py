#!/usr/bin/env python3
"""Screenshots of the AI results in the PACS's own web interface (Orthanc Explorer).

Runs the whole flow of ``benchmarks/e2e_brain.py`` (a real Orthanc and ``omnimri-node serve``
with the shipped ``brain`` pipeline; a brain MR series uploaded to Orthanc and C-STOREd to the
node; the results C-STOREd back), or reuses a running Orthanc that already holds results
(``--orthanc-url``), then photographs Orthanc's own pages with Debian's headless Chromium:

* ``explorer-study.png``: Orthanc Explorer's study page, the source MR series beside the five
  AI series (SEG, SR, SC, GSPS, KOS) with their descriptions;
* ``sc-key-slice.png``: Orthanc's rendering (``/instances/<id>/preview``) of the first key-slice
  secondary capture: the source slice with the masks, detections and legend burned in;
* ``sc-summary-card.png``: the same for the summary card (model, measurements, findings).

PNGs are written under ``benchmarks/out/pacs/`` (git-ignored); ``--docs`` also copies the key
slice to ``docs/img/e2e-sc-key-slice.png``.

Usage::

    python3 benchmarks/screenshot_pacs.py [--slices 189] [--resolution 1] [--models DIR]
    python3 benchmarks/screenshot_pacs.py --orthanc-url http://127.0.0.1:8042
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.e2e_brain import (  # noqa: E402
    default_models,
    padded_brain,
    run_round,
    running_flow,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)
OUT = REPO / "benchmarks" / "out" / "pacs"
DOCS_IMG = REPO / "docs" / "img" / "e2e-sc-key-slice.png"


def screenshot(url: str, path: Path, width: int, height: int, js_budget_ms: int = 0) -> Path:
    """Photograph ``url`` with headless Chromium (fresh profile) into ``path``.

    Args:
        js_budget_ms: Virtual time given to the page's scripts before the picture (Orthanc
            Explorer loads its lists by AJAX); 0 for plain images.

    Raises:
        RuntimeError: Chromium failed or wrote no picture (its output is in the message).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="omnimri-chromium-") as profile:
        cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={path}"]
        if js_budget_ms:
            cmd.append(f"--virtual-time-budget={js_budget_ms}")
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no {path} (exit {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-2000:])
    return path


def latest_results(orthanc_url: str) -> dict[str, Any]:
    """The most recent study holding AI secondary captures: its ids and the SC instances."""
    with httpx.Client(base_url=orthanc_url, timeout=30.0) as client:
        found = client.post("/tools/find", json={
            "Level": "Series", "Expand": True, "Query": {"Modality": "OT"}}).json()
        ai = [s for s in found
              if "NOT FOR DIAG" in s["MainDicomTags"].get("SeriesDescription", "")]
        if not ai:
            raise SystemExit(f"no AI secondary captures in the Orthanc at {orthanc_url}")
        series = ai[-1]
        instances = client.get(f"/series/{series['ID']}/instances").json()
        by_number = sorted(instances,
                           key=lambda i: int(i["MainDicomTags"].get("InstanceNumber", 0)))
        comments = {i["ID"]: client.get(f"/instances/{i['ID']}/content/0020,4000").text
                    for i in by_number}
        card = next((i for i in by_number if "summary" in comments[i["ID"]]), by_number[0])
        keys = [i for i in by_number if i["ID"] != card["ID"]]
        size = {i["ID"]: (int(i["MainDicomTags"].get("Columns", 0) or 0),
                          int(i["MainDicomTags"].get("Rows", 0) or 0)) for i in by_number}
        for iid in size:
            if not all(size[iid]):
                tags = client.get(f"/instances/{iid}/simplified-tags").json()
                size[iid] = (int(tags["Columns"]), int(tags["Rows"]))
        return {"study": series["ParentStudy"], "card": card["ID"],
                "key": keys[0]["ID"] if keys else card["ID"], "size": size}


def take_all(orthanc_url: str, out: Path = OUT) -> list[Path]:
    """The three screenshots of the latest results in the Orthanc at ``orthanc_url``."""
    res = latest_results(orthanc_url)
    shots = [screenshot(f"{orthanc_url}/app/explorer.html#study?uuid={res['study']}",
                        out / "explorer-study.png", 1280, 1280, js_budget_ms=8000)]
    for name, iid in (("sc-key-slice.png", res["key"]), ("sc-summary-card.png", res["card"])):
        w, h = res["size"][iid]
        shots.append(screenshot(f"{orthanc_url}/instances/{iid}/preview", out / name, w, h))
    return shots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orthanc-url", help="use this running Orthanc (already holding results)")
    ap.add_argument("--models", type=Path, default=default_models(),
                    help="folder holding omnimri-tiny/ (default: the repository's models/)")
    ap.add_argument("--resolution", type=int, default=1, choices=[1, 2], help="mm")
    ap.add_argument("--slices", type=int, default=None, help="central slab (default: all)")
    ap.add_argument("--size", type=int, default=256, help="pixels per row and column")
    ap.add_argument("--docs", action="store_true", help=f"also copy the key slice to {DOCS_IMG}")
    args = ap.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"headless Chromium not installed ({CHROMIUM}; Debian package chromium)")

    if args.orthanc_url:
        shots = take_all(args.orthanc_url.rstrip("/"))
    else:
        if not (args.models / "omnimri-tiny" / "model.yaml").is_file():
            sys.exit(f"no omnimri-tiny package under {args.models} (use --models)")
        with tempfile.TemporaryDirectory(prefix="screenshot-pacs-") as tmp, \
                running_flow(Path(tmp), args.models) as flow:
            series = padded_brain(args.resolution, args.size, slices=args.slices,
                                  description="T1 3D BRAIN")
            res = run_round(flow, series, expected_count=True)
            print(f"results in Orthanc {res.total_s:.1f} s after the send: "
                  f"{', '.join(sorted(res.outputs.values()))}")
            shots = take_all(flow.orthanc.url)
    for p in shots:
        print(f"written: {p} ({p.stat().st_size // 1024} KB)")
    if args.docs:
        shutil.copyfile(shots[1], DOCS_IMG)
        print(f"copied: {DOCS_IMG}")


if __name__ == "__main__":
    main()
