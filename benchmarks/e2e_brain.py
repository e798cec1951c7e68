#!/usr/bin/env python3
"""End-to-end latency of the ``brain`` pipeline: PACS → node → OmniMRI → five kinds → PACS.

A real Orthanc (Debian's, configured like ``tests/test_e2e.py``) is both the sender and the
PACS; a real ``omnimri-node serve`` runs the shipped ``brain`` pipeline (``config.yaml``: model
``omnimri-tiny`` on ONNX Runtime, outputs SEG, SR, SC, GSPS, KOS, shipped job and poll
settings) and C-STOREs the results back. The series is the MNI152 brain at 1 mm, 189 axial
slices, each padded from 233 × 197 to 256 × 256 pixels (zero background; the geometry is kept).

Each round uploads a new series to Orthanc, asks Orthanc to C-STORE it to the node
(``POST /modalities/node/store``, synchronous) and starts the clock when that call returns (the
sender's last instance was acknowledged). The clock stops when Orthanc's REST API holds every
output the node delivered. The split comes from the node's JSON log (timestamps, and the
``seconds`` of the ``omnimri pipeline done`` line):

==================  ============================================================================
completion wait     send returned → ``series_complete`` (expected count, or the quiet period)
routing + claim     ``series_complete`` → the pipeline starts (rules, job row, worker wake-up)
model load          package + engine (once per process; 0 after the warm-up round)
volume              decode + sort + stack the stored files (``build_volume``)
inference           the model on the volume (resampling, patches, heads, report decoder)
results             post-processing of the raw outputs into segments, detections, diagnosis
export              SEG, SR, SC, GSPS, KOS datasets built (``export.build_outputs``)
write outputs       outputs fsync'd under ``<spool>/results/<job>/`` (→ ``job outputs stored``);
                    each output is C-STOREd as soon as it is durable, so sending overlaps this
dispatch            what is left of sending after the last output is stored, until the PACS
                    acknowledged every output (→ ``job outputs delivered``)
PACS visible        delivered → every output found through Orthanc's REST API
==================  ============================================================================

Each round also prints the CPU seconds the node and Orthanc processes used during it (user +
system, from ``/proc``): on a shared machine the wall-clock split says more about the other
load than about the node.

Usage::

    python3 benchmarks/e2e_brain.py [--rounds 3] [--completion expected|quiet] [--quiet 2]
                                    [--models DIR] [--size 256] [--json PATH]

Not a timed test; numbers depend on the machine and what else runs on it (the load average
is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omnimri_samples import brain_volume, make_mr_series  # noqa: E402
from tests.fixtures.net import free_port, wait_for_port  # noqa: E402
from tests.fixtures.node import NODE_AE, node_command, write_node_config  # noqa: E402
from tests.fixtures.orthanc import OrthancServer  # noqa: E402
from tests.test_e2e import labelmap_capable  # noqa: E402

PIPELINE = "brain"
STAGES = ("completion wait", "routing + claim", "model load", "volume", "inference", "results",
          "export", "write outputs", "dispatch", "PACS visible")
"""Rows of the latency table, in the order they happen."""


TARGETS_S = ((12.0, "issue #11, the model on 2 CPU cores"), (8.0, "issue #18, CPU inference"))
"""End-to-end latency targets, seconds from the sender's last instance to the last result."""


def padded_brain(resolution_mm: int = 1, size: int = 256, slices: int | None = None,
                 description: str = "T1 3D BRAIN 1MM") -> list[Dataset]:
    """The MNI152 brain as an axial MR series, each slice zero-padded to ``size`` × ``size``.

    The padding is split evenly around the template and the origin moved by the pixels added
    before it, so positions in LPS millimetres are unchanged. Intensities as in
    :func:`omnimri_samples.brain_series` (0–1000).
    """
    arr, aff = brain_volume(resolution_mm, slices)
    _, rows, cols = arr.shape
    before_r = max(size - rows, 0) // 2
    before_c = max(size - cols, 0) // 2
    arr = np.pad(arr, ((0, 0), (before_r, max(size - rows, 0) - before_r),
                       (before_c, max(size - cols, 0) - before_c)))
    aff = aff.copy()
    aff[:3, 3] = (aff @ np.array([0, -before_r, -before_c, 1.0]))[:3]
    return make_mr_series(arr, aff, description=description)


def shipped_sections(models: Path) -> dict[str, Any]:
    """The shipped ``config.yaml``'s brain pipeline, rules, models, jobs and completion."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    models_cfg = dict(cfg["models"], path=str(models))
    return {"pipelines": {PIPELINE: cfg["pipelines"][PIPELINE]}, "rules": cfg["rules"],
            "models": models_cfg, "jobs": dict(cfg["jobs"]),
            "completion": dict(cfg["completion"])}


@dataclass
class Flow:
    """A running Orthanc (sender and PACS) and node, and the node's log."""

    orthanc: OrthancServer
    node: subprocess.Popen[bytes]
    node_root: Path
    node_port: int
    log_path: Path
    rounds: int = field(default=0)

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out


@contextmanager
def running_flow(root: Path, models: Path, quiet_s: float | None = None,
                 orthanc: OrthancServer | None = None) -> Iterator[Flow]:
    """Start Orthanc (unless given, already running) and the node; stop what was started.

    Args:
        root: Folder for Orthanc's storage and the node's config, spool and log.
        models: Folder holding the ``omnimri-tiny`` package.
        quiet_s: ``completion.quiet_seconds``; ``None`` keeps the shipped value.
        orthanc: A running Orthanc to use instead of starting one (the node is registered
            in it as modality ``node``).
    """
    node_port = free_port()
    own_orthanc = orthanc is None
    if orthanc is None:
        orthanc = labelmap_capable(OrthancServer(root / "orthanc"))
        orthanc.start()
    sections = shipped_sections(models)
    if quiet_s is not None:
        sections["completion"]["quiet_seconds"] = quiet_s
    node_root = root / "node"
    config = write_node_config(
        node_root, node_port,
        destinations={"pacs": {"kind": "dimse", "ae_title": orthanc.ae_title,
                               "host": "127.0.0.1", "port": orthanc.dicom_port,
                               "timeout_s": 60}},
        logging={"level": "info", "format": "json"},
        **sections,
    )
    log_path = node_root / "node.log"
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    node = subprocess.Popen(node_command(config), cwd=node_root, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    try:
        wait_for_port(node_port, timeout_s=60)
        orthanc.set_node(NODE_AE, node_port)
        yield Flow(orthanc, node, node_root, node_port, log_path)
    finally:
        node.terminate()
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(5)
        if own_orthanc:
            orthanc.stop()


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def _one(events: list[dict[str, Any]], name: str, **match: Any) -> dict[str, Any]:
    found = [e for e in events if e.get("event") == name
             and all(e.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise RuntimeError(f"expected one {name!r} {match} in the node log, found {len(found)}")
    return found[0]


@dataclass
class RoundResult:
    """One series through the flow: the stage split (seconds) and what came back."""

    stages: dict[str, float]
    total_s: float
    outputs: dict[str, str]
    """Orthanc instance id → modality of every output."""
    job_id: str
    seg_type: str = ""
    inference_split: dict[str, float] = field(default_factory=dict)
    """The runner's own split of ``inference`` (``model run`` log line), seconds."""
    export_split: dict[str, float] = field(default_factory=dict)
    """Seconds per output kind (``outputs built`` log line)."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds (user + system) of the ``node`` and ``orthanc`` processes in the round."""


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_now(flow: Flow) -> dict[str, float]:
    out = {"node": process_cpu_s(flow.node.pid)}
    proc = getattr(flow.orthanc, "proc", None)
    if proc is not None:
        out["orthanc"] = process_cpu_s(proc.pid)
    return out


def run_round(flow: Flow, datasets: list[Dataset], expected_count: bool,
              timeout_s: float = 300.0) -> RoundResult:
    """Upload ``datasets`` to Orthanc, have it send them to the node, wait for the outputs."""
    orthanc = flow.orthanc
    if expected_count:
        for ds in datasets:
            ds.NumberOfTemporalPositions = 1
            ds.NumberOfSlices = len(datasets)
    for ds in datasets:
        orthanc.upload(ds)
    series_uid = str(datasets[0].SeriesInstanceUID)
    study_uid = str(datasets[0].StudyInstanceUID)
    source_uids = {str(ds.SOPInstanceUID) for ds in datasets}
    cpu0 = _cpu_now(flow)
    orthanc.send_study(study_uid)
    t0 = time.time()
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=orthanc.url, timeout=10.0) as client:
        delivered: dict[str, Any] | None = None
        while delivered is None:
            events = flow.log_events()
            completed = [e for e in events if e.get("event") == "series_complete"
                         and e.get("series_uid") == series_uid]
            if completed:
                jobs = [e for e in events if e.get("event") == "job outputs delivered"
                        and _ts(e) >= _ts(completed[0])]
                failed = [e for e in events if e.get("level") == "error" and _ts(e) >= t0]
                if failed:
                    raise RuntimeError(f"node error: {failed[0]}")
                if jobs:
                    delivered = jobs[0]
            if delivered is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no delivery within {timeout_s} s; see {flow.log_path}")
                time.sleep(0.02)
        n_out = int(delivered["count"])
        while True:
            r = client.post("/tools/find", json={"Level": "Instance", "Expand": True,
                                                 "Query": {"StudyInstanceUID": study_uid}})
            r.raise_for_status()
            outs = [i for i in r.json()
                    if i["MainDicomTags"]["SOPInstanceUID"] not in source_uids]
            if len(outs) >= n_out:
                t_end = time.time()
                cpu1 = _cpu_now(flow)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(outs)} of {n_out} outputs in Orthanc")
            time.sleep(0.005)
        modalities = {}
        for inst in outs:
            tags = client.get(f"/series/{inst['ParentSeries']}").json()["MainDicomTags"]
            modalities[inst["ID"]] = tags.get("Modality", "")
    events = flow.log_events()
    job_id = str(delivered["job_id"])
    complete = _one(events, "series_complete", series_uid=series_uid)
    done = _one(events, "omnimri pipeline done", job_id=job_id)
    stored = _one(events, "job outputs stored", job_id=job_id)
    sec = {k: float(v) for k, v in done["seconds"].items()}
    pipeline_start = _ts(done) - sum(sec.values())
    stages = {
        "completion wait": _ts(complete) - t0,
        "routing + claim": pipeline_start - _ts(complete),
        "model load": sec.get("load", 0.0),
        "volume": sec.get("volume", 0.0),
        "inference": sec.get("inference", 0.0),
        "results": sec.get("results", 0.0),
        "export": sec.get("export", 0.0),
        "write outputs": _ts(stored) - _ts(done),
        "dispatch": _ts(delivered) - _ts(stored),
        "PACS visible": t_end - _ts(delivered),
    }
    seg = [e for e in events if e.get("event") == "seg built" and e.get("job_id") == job_id]
    runs = [e for e in events if e.get("event") == "model run"
            and pipeline_start <= _ts(e) <= _ts(done)]
    split = {k: float(v) for k, v in runs[-1].get("timings_s", {}).items()} if runs else {}
    built = [e for e in events if e.get("event") == "outputs built" and e.get("job_id") == job_id]
    per_kind = {k: float(v) for k, v in built[0].get("seconds", {}).items()} if built else {}
    flow.rounds += 1
    cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1 if k in cpu0}
    return RoundResult(stages, t_end - t0, modalities, job_id,
                       str(seg[0].get("type", "")) if seg else "", split, per_kind, cpu)


def default_models() -> Path:
    """The repository's ``models`` folder (the shipped ``omnimri-tiny``)."""
    return REPO / "models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--completion", choices=["expected", "quiet"], default="expected",
                    help="expected: the header carries the slice count (no quiet period); "
                         "quiet: the node waits --quiet seconds after the last instance")
    ap.add_argument("--quiet", type=float, default=2.0, help="completion.quiet_seconds, s")
    ap.add_argument("--models", type=Path, default=default_models(),
                    help="folder holding omnimri-tiny/ (default: the repository's models/)")
    ap.add_argument("--size", type=int, default=256, help="pixels per row and column")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "e2e_brain.json")
    args = ap.parse_args()
    if not (args.models / "omnimri-tiny" / "model.yaml").is_file():
        sys.exit(f"no omnimri-tiny package under {args.models} (use --models)")

    results: list[RoundResult] = []
    with tempfile.TemporaryDirectory(prefix="e2e-brain-") as tmp:
        quiet = args.quiet if args.completion == "quiet" else None
        with running_flow(Path(tmp), args.models, quiet_s=quiet) as flow:
            # Warm-up: model and engine load, highdicom tables, first decode.
            warm = run_round(flow, padded_brain(2, 128, slices=16, description="WARM UP"), True)
            print(f"warm-up round: {warm.total_s:.2f} s (model load "
                  f"{warm.stages['model load']:.2f} s)", flush=True)
            for k in range(args.rounds):
                series = padded_brain(1, args.size, description=f"T1 3D BRAIN 1MM {k}")
                res = run_round(flow, series, args.completion == "expected")
                results.append(res)
                cpu = ", ".join(f"{p} {v:.2f}" for p, v in res.cpu_s.items())
                print(f"round {k + 1}: {res.total_s:.2f} s, {len(res.outputs)} outputs "
                      f"({', '.join(sorted(res.outputs.values()))}), SEG {res.seg_type}; "
                      f"CPU s (incl. receiving the series): {cpu}", flush=True)

    n_slices = 189
    load = os.getloadavg()
    print(f"\nseries: MNI152 1 mm, {n_slices} slices of {args.size}×{args.size} (uint16), "
          f"completion: {args.completion}"
          + (f" (quiet_seconds {args.quiet:g})" if args.completion == "quiet" else "")
          + f"; {args.rounds} rounds after a warm-up; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'stage':<18}{'median s':>10}{'min s':>9}{'max s':>9}")
    med: dict[str, float] = {}
    for stage in STAGES:
        vals = [r.stages[stage] for r in results]
        med[stage] = statistics.median(vals)
        print(f"{stage:<18}{med[stage]:>10.2f}{min(vals):>9.2f}{max(vals):>9.2f}")
    totals = [r.total_s for r in results]
    total = statistics.median(totals)
    print(f"{'total':<18}{total:>10.2f}{min(totals):>9.2f}{max(totals):>9.2f}")
    splits = [r.inference_split for r in results if r.inference_split]
    if splits:
        parts = ", ".join(f"{k} {statistics.median(s.get(k, 0.0) for s in splits):.2f} s"
                          for k in splits[0])
        print(f"  inference, the runner's split (median): {parts}")
    exports = [r.export_split for r in results if r.export_split]
    if exports:
        parts = ", ".join(f"{k} {statistics.median(s.get(k, 0.0) for s in exports):.2f} s"
                          for k in exports[0])
        print(f"  export, per kind (median): {parts}")
    cpus = [r.cpu_s for r in results if r.cpu_s]
    if cpus:
        parts = ", ".join(f"{k} {statistics.median(c.get(k, 0.0) for c in cpus):.2f} s"
                          for k in cpus[0])
        print(f"  CPU seconds per round (median; the node's includes receiving the series): "
              f"{parts}")
    wait = med["completion wait"]
    if wait < 0:
        print("  (completion wait < 0: the series completed at its last instance, before "
              "Orthanc's synchronous send call returned)")
    net = total - wait
    verdicts = ", ".join(f"≤ {t:g} s ({why}): {'met' if net <= t else 'NOT met'}"
                         for t, why in TARGETS_S)
    print(f"total excluding the completion wait: {net:.2f} s; targets {verdicts}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "series": {"slices": n_slices, "rows": args.size, "cols": args.size,
                   "completion": args.completion},
        "load_average": load, "rounds": [
            {"stages": r.stages, "total_s": r.total_s, "seg_type": r.seg_type,
             "inference_split": r.inference_split, "export_split": r.export_split,
             "cpu_s": r.cpu_s, "outputs": sorted(r.outputs.values())} for r in results],
        "median": med, "median_total_s": total,
    }, indent=2))
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
