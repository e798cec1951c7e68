#!/usr/bin/env python3
"""End-to-end latency: the sender's last instance → the preview SC stored in the PACS.

A real Orthanc (Debian's, started like the test fixture) is both the sender and the PACS; a
real ``omnimri-node serve`` runs the ``preview`` pipeline and sends the result back by C-STORE.
Each round uploads a new synthetic MR series to Orthanc, asks Orthanc to C-STORE it to the node
(``POST /modalities/node/store``, synchronous), and starts the clock when that call returns
(the sender's last instance was acknowledged). The clock stops when Orthanc's REST API finds the
preview's SOP Instance UID (derived from the job id, so known in advance; polled every 5 ms).

Two ways a series completes:

* ``quiet``: no count in the header; the node waits ``completion.quiet_seconds`` after the last
  instance. Printed both *including* and *excluding* the quiet period.
* ``expected``: the header carries NumberOfTemporalPositions × NumberOfSlices, so the series
  completes with its last instance (no quiet period at all).

Usage::

    python3 benchmarks/e2e_preview.py [--rounds 5] [--slices 64] [--size 256] [--quiet 1.0]

Not a timed test; numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.jobs import job_id_for  # noqa: E402
from dicom_node.pipelines.preview import preview_uids  # noqa: E402
from omnimri_samples import synthetic_series  # noqa: E402
from tests.fixtures.net import free_port, wait_for_port  # noqa: E402
from tests.fixtures.node import NODE_AE, node_command, write_node_config  # noqa: E402
from tests.fixtures.orthanc import OrthancServer  # noqa: E402


def run_round(orthanc: OrthancServer, mode: str, slices: int, size: int, seed: int) -> float:
    """One series through the node; returns seconds from last ack to the preview in Orthanc."""
    datasets = synthetic_series(slices, size, size, seed=seed, description=f"T1 {mode} {seed}")
    for ds in datasets:
        if mode == "expected":
            ds.NumberOfTemporalPositions = 1
            ds.NumberOfSlices = slices
        orthanc.upload(ds)
    series_uid = str(datasets[0].SeriesInstanceUID)
    sop_uid = preview_uids(job_id_for(f"{series_uid}#r1", "preview"))[1]
    orthanc.send_study(str(datasets[0].StudyInstanceUID))
    t0 = time.perf_counter()
    with httpx.Client(base_url=orthanc.url, timeout=5.0) as client:
        while True:
            r = client.post("/tools/lookup", content=sop_uid.encode())
            if r.status_code == 200 and r.json():
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > 120:
                raise TimeoutError("no preview after 120 s")
            time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quiet", type=float, default=1.0, help="completion.quiet_seconds")
    ap.add_argument("--poll", type=float, default=0.5,
                    help="completion.poll_interval_s and jobs.poll_interval_s (shipped: 0.5)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="e2e-preview-") as tmp:
        root = Path(tmp)
        node_port = free_port()
        orthanc = OrthancServer(root / "orthanc", node=(NODE_AE, "127.0.0.1", node_port))
        orthanc.start()
        config = write_node_config(
            root / "node", node_port,
            completion={"quiet_seconds": args.quiet, "poll_interval_s": args.poll},
            jobs={"workers": 2, "poll_interval_s": args.poll},
            destinations={"pacs": {"kind": "dimse", "ae_title": orthanc.ae_title,
                                   "host": "127.0.0.1", "port": orthanc.dicom_port}},
            pipelines={"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
            rules=[{"name": "mr", "when": 'Modality == "MR"', "pipelines": ["preview"],
                    "destinations": ["pacs"]}],  # type: ignore[dict-item]
            logging={"level": "warning", "format": "json"},
        )
        log = open(root / "node.log", "wb")  # noqa: SIM115
        node = subprocess.Popen(node_command(config), cwd=root / "node", stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_for_port(node_port, timeout_s=60)
            run_round(orthanc, "expected", 4, 32, seed=999)  # warm-up (imports, first decode)
            results: dict[str, list[float]] = {"quiet": [], "expected": []}
            for k in range(args.rounds):
                for mode in ("quiet", "expected"):
                    results[mode].append(run_round(orthanc, mode, args.slices, args.size,
                                                   seed=k * 2 + (mode == "expected")))
        finally:
            node.terminate()
            node.wait(30)
            log.close()
            orthanc.stop()

    print(f"series: {args.slices} × {args.size}² MR (uint16), preview SC back by C-STORE; "
          f"{args.rounds} rounds; quiet_seconds={args.quiet:g}, poll_interval_s={args.poll:g}")
    q = results["quiet"]
    e = results["expected"]
    print(f"quiet completion, including the quiet period : median {statistics.median(q):.3f} s"
          f"  (min {min(q):.3f}, max {max(q):.3f})")
    print(f"quiet completion, excluding the quiet period : median "
          f"{statistics.median(q) - args.quiet:.3f} s")
    print(f"expected-count completion (no quiet period)  : median {statistics.median(e):.3f} s"
          f"  (min {min(e):.3f}, max {max(e):.3f})")


if __name__ == "__main__":
    main()
