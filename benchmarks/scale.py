#!/usr/bin/env python3
"""Scale-out benchmark: 1 and 2 nodes on one PostgreSQL, and SQLite vs PostgreSQL on one node.

Real ``omnimri-node serve`` processes, a real PostgreSQL (Debian's, started like
tests/fixtures/postgres.py in a temporary folder) and DCMTK's ``dcmsend`` as the modality.
Each node has its own spool folder (the receive journal is per process; see
tests/test_two_nodes.py), all on this machine's disk, so every path the shared index holds is
readable by every node, as on a shared file system.

Scenarios (each on fresh folders and a fresh database):

* **ingest**: one synthetic series (``--instances`` × 256×256, ~128 KiB each), durable
  (``fsync``), no rules. SQLite 1 node, PostgreSQL 1 node, PostgreSQL 2 nodes (the series'
  instances split over both, one association each, sent at once). Instances/s and the nodes'
  CPU ms per instance.
* **jobs** per pipeline (``--pipelines preview,brain``): ``--series`` series sent round-robin
  to the nodes, each series one job; the ``preview`` pipeline is model-free (a secondary-
  capture montage), ``brain`` is the shipped ``omnimri-tiny`` pipeline on the 2 mm MNI brain.
  SQLite 1 node, PostgreSQL 1 node, PostgreSQL 2 nodes; every job's outputs go to one folder
  destination. Jobs per minute = done jobs / (last ``finished_at`` − first ``created_at``),
  which jobs each node ran (its log), and whether every output was delivered exactly once
  (delivery rows = output rows = files in the folder).

* **jobs-brain-triton** (``--triton``): the brain jobs on PostgreSQL × 1 and × 2 with
  ``engine_order: [triton]``, inference on one real ``tritonserver`` (the nvidia-pytriton
  build from tests/fixtures/triton.py: Python back end, ONNX Runtime on CPU), i.e. the
  deployment's shape with the GPU replaced by the same two cores.

The same total of job workers and inference threads is given to 1 and 2 nodes
(``--workers`` per node × nodes, ``models.intra_op_threads`` = cores ÷ nodes), so the ratio
shows what a second process on the same database costs or gains, not extra threads.

Usage::

    python3 benchmarks/scale.py [--instances 400] [--series 8] [--pipelines preview,brain]
                                [--skip-ingest] [--skip-jobs] [--workers 1] [--rounds 1] [--triton]

Prints one line per run, then the ratios (2 nodes ÷ 1 node on PostgreSQL; PostgreSQL ÷ SQLite
on one node), and writes them to ``benchmarks/out/scale.json``. On a shared 2-core machine
the absolute numbers are small and noisy; the ratios and where the time goes are the point.
Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.db import connect  # noqa: E402
from omnimri_samples import (  # noqa: E402
    brain_volume,
    make_mr_series,
    synthetic_series,
    write_series,
)
from tests.fixtures.dcmtk import dcmtk_binary  # noqa: E402
from tests.fixtures.net import free_port  # noqa: E402
from tests.fixtures.node import NodeProcess, write_node_config  # noqa: E402
from tests.fixtures.postgres import PostgresServer, pg_bin  # noqa: E402

CORES = len(os.sched_getaffinity(0))


@dataclass
class Run:
    """One measured run."""

    scenario: str
    backend: str
    nodes: int
    value: float
    """instances/s (ingest) or jobs/min (jobs)."""
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def query(target: str | Path, sql: str) -> list[Any]:
    conn = connect(target)
    try:
        return list(conn.execute(sql).fetchall())
    finally:
        conn.close()


def start_nodes(work: Path, n: int, database: str | Path, triton_url: str | None = None,
                **sections: Any) -> list[NodeProcess]:
    """``n`` nodes on one database, each with its own folder, port and spool.

    With ``triton_url`` the nodes infer on that Triton server (``engine_order: [triton]``).
    """
    models: dict[str, Any] = {"path": str(REPO / "models"),
                              "intra_op_threads": max(CORES // n, 1)}
    if triton_url:
        models.update(triton_url=triton_url, engine_order=["triton"])
    nodes = []
    for k in range(n):
        root = work / f"node{k}"
        port = free_port()
        cfg = write_node_config(
            root, port, storage={"database": str(database), "fsync": True,
                                 "min_free_bytes": 0, "min_free_percent": 0},
            models=models, **sections)
        nodes.append(NodeProcess(root, port, cfg))
    for node in nodes:
        node.start(timeout_s=90)
    time.sleep(0.5)  # start-up work (imports, journal preparation) done before the clock
    return nodes


def stop_nodes(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.stop(timeout_s=30)


def dcmsend(binary: str, port: int, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([binary, "-aet", "BENCH", "-aec", "OMNIMRI", "-dn", "127.0.0.1",
                             str(port), *map(str, files)], env=dict(os.environ, TCP_NODELAY="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def send_all(binary: str, jobs: list[tuple[int, list[Path]]]) -> float:
    """Run one dcmsend per (port, files) at once; seconds until all finished."""
    t0 = time.perf_counter()
    procs = [dcmsend(binary, port, files) for port, files in jobs]
    outs = [p.communicate()[0] for p in procs]
    dt = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"dcmsend failed ({p.returncode}): {out.decode()[-2000:]}")
    return dt


class Databases:
    """A fresh SQLite file or PostgreSQL database per run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.pg: PostgresServer | None = None
        self._n = 0

    def new(self, backend: str) -> str | Path:
        self._n += 1
        if backend == "sqlite":
            return self.work / f"sqlite-{self._n}.db"
        if self.pg is None:
            bin_dir = pg_bin()
            if bin_dir is None:
                raise SystemExit("PostgreSQL is not installed (Debian postgresql)")
            root = self.work / "pg"
            root.mkdir(parents=True)
            os.chmod(self.work, 0o755)
            self.pg = PostgresServer(root / "cluster", bin_dir)
            self.pg.start()
        return self.pg.create_database()

    def close(self) -> None:
        if self.pg is not None:
            self.pg.stop()


def ingest_run(work: Path, dbs: Databases, backend: str, n_nodes: int, files: list[Path],
               binary: str) -> Run:
    folder = work / f"ingest-{backend}-{n_nodes}"
    target = dbs.new(backend)
    nodes = start_nodes(folder, n_nodes, target, rules=[],
                        completion={"quiet_seconds": 30.0, "poll_interval_s": 0.5})
    try:
        c0 = [cpu_s(n.proc.pid) for n in nodes if n.proc]
        dt = send_all(binary, [(node.port, files[k::n_nodes]) for k, node in enumerate(nodes)])
        used = sum(cpu_s(n.proc.pid) for n in nodes if n.proc) - sum(c0)
    finally:
        stop_nodes(nodes)
    (count,) = query(target, "SELECT count(*) FROM instances")[0]
    if count != len(files):
        raise RuntimeError(f"{backend} x{n_nodes}: indexed {count} of {len(files)}")
    return Run("ingest", backend, n_nodes, len(files) / dt, "instances/s",
               {"seconds": dt, "node_cpu_ms_per_instance": 1000 * used / len(files)})


def pipeline_sections(pipeline: str, out: Path) -> dict[str, Any]:
    if pipeline == "preview":
        pipe = {"kind": "preview", "model": None, "outputs": ["sc"]}
    else:
        pipe = yaml.safe_load((REPO / "config.yaml").read_text())["pipelines"]["brain"]
    return {
        "pipelines": {pipeline: pipe},
        "rules": [{"name": "all-mr", "when": 'Modality == "MR"', "pipelines": [pipeline],
                   "destinations": ["out"]}],
        "destinations": {"out": {"kind": "folder", "path": str(out)}},
        "completion": {"quiet_seconds": 2.0, "poll_interval_s": 0.1,
                       "use_expected_count": True},
    }


def series_for(pipeline: str, work: Path, count: int) -> list[list[Path]]:
    out = []
    for k in range(count):
        if pipeline == "preview":
            ds = synthetic_series(24, 128, 128, seed=k, series_number=k + 1,
                                  description=f"T1 {k}")
        else:
            arr, aff = brain_volume(2)
            ds = make_mr_series(arr, aff, description=f"T1 BRAIN 2MM {k}")
        out.append(write_series(ds, work / f"{pipeline}-series{k}"))
    return out


def jobs_run(work: Path, dbs: Databases, backend: str, n_nodes: int, pipeline: str,
             series: list[list[Path]], binary: str, workers: int, timeout_s: float,
             triton_url: str | None = None) -> Run:
    folder = work / f"jobs-{pipeline}-{backend}-{n_nodes}"
    out = folder / "out"
    target = dbs.new(backend)
    nodes = start_nodes(folder, n_nodes, target, triton_url, jobs={"workers": workers,
                                                                  "poll_interval_s": 0.1},
                        **pipeline_sections(pipeline, out))
    try:
        t0 = time.time()
        for k, files in enumerate(series):  # one association per series, round-robin
            send_all(binary, [(nodes[k % n_nodes].port, files)])
        deadline = time.monotonic() + timeout_s
        while True:
            rows = query(target, "SELECT state, count(*) FROM jobs GROUP BY state")
            states = {s: int(c) for s, c in rows}
            if sum(states.get(s, 0) for s in ("done", "failed", "cancelled")) >= len(series):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pipeline} {backend} x{n_nodes}: jobs {states} after "
                                   f"{timeout_s} s")
            time.sleep(0.25)
        ran = [len(n.events("job finished")) for n in nodes]
        connections = None
        if backend == "postgresql":  # what the nodes hold open (PostgreSQL sizing)
            (connections,) = query(target, "SELECT count(*) - 1 FROM pg_stat_activity"
                                           " WHERE datname = current_database()")[0]
    finally:
        stop_nodes(nodes)
    (first, last, done) = query(
        target, "SELECT min(created_at), max(finished_at), count(*) FROM jobs"
                " WHERE state = 'done'")[0]
    # More jobs than series = a series completed twice (a revision 2): name them.
    revisions = {f"revision {r}": int(c) for r, c in query(
        target, "SELECT revision, count(*) FROM jobs GROUP BY revision ORDER BY revision")}
    (outputs,) = query(target, "SELECT count(*) FROM job_outputs")[0]
    (deliveries,) = query(target, "SELECT count(*) FROM deliveries")[0]
    n_files = sum(1 for _ in out.rglob("*.dcm"))
    span = float(last) - float(first)
    scenario = "jobs-" + pipeline + ("-triton" if triton_url else "")
    return Run(scenario, backend, n_nodes, 60.0 * int(done) / span, "jobs/min", {
        "jobs": len(series), "done": int(done), "revisions": revisions, "span_s": span,
        "send_to_last_done_s": float(last) - t0, "jobs_per_node": ran,
        "outputs": int(outputs), "deliveries": int(deliveries), "files": n_files,
        "exactly_once": int(outputs) == int(deliveries) == n_files,
        "pg_connections": None if connections is None else int(connections),
        "workers_per_node": workers})


def triton_runs(work: Path, dbs: Databases, series: list[list[Path]], binary: str,
                args: argparse.Namespace) -> list[Run]:
    """Brain jobs on PostgreSQL x1 and x2, inference on one real Triton server."""
    from inference.engines.triton_repo import write_model_repository
    from inference.package import ModelPackage
    from tests.fixtures.triton import triton_server, triton_unavailable

    reason = triton_unavailable()
    if reason:
        print(f"triton runs skipped: {reason}")
        return []
    folder = work / "triton"
    write_model_repository(ModelPackage.load(REPO / "models" / "omnimri-tiny"),
                           folder / "repo", "python", intra_op_threads=CORES)
    out = []
    with triton_server(folder / "repo", folder) as server:
        for n in (1, 2):
            out.append(jobs_run(work / f"t{n}", dbs, "postgresql", n, "brain", series, binary,
                                args.workers * (2 if n == 1 else 1), args.timeout,
                                triton_url=server.grpc_url))
    return out


def ratio(runs: list[Run], scenario: str, a: tuple[str, int], b: tuple[str, int]) -> float | None:
    def med(backend: str, n: int) -> float | None:
        vals = [r.value for r in runs if r.scenario == scenario and r.backend == backend
                and r.nodes == n]
        return statistics.median(vals) if vals else None

    va, vb = med(*a), med(*b)
    return None if va is None or vb is None or vb == 0 else va / vb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=400)
    ap.add_argument("--series", type=int, default=8, help="series (= jobs) per jobs run")
    ap.add_argument("--brain-series", type=int, default=4, help="series per brain jobs run")
    ap.add_argument("--pipelines", default="preview,brain")
    ap.add_argument("--workers", type=int, default=1, help="job workers per node (1 node gets "
                    "2x this so both setups have the same total)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-jobs", action="store_true")
    ap.add_argument("--timeout", type=float, default=900.0, help="per jobs run, seconds")
    ap.add_argument("--triton", action="store_true", help="also: brain jobs on PostgreSQL x1 "
                    "and x2 with inference on a real tritonserver (tests/fixtures/triton.py: "
                    "the nvidia-pytriton build, Python back end, CPU)")
    args = ap.parse_args()
    binary = dcmtk_binary("dcmsend")
    if binary is None:
        raise SystemExit("dcmsend (DCMTK) is not installed")
    work = Path(tempfile.mkdtemp(prefix="omnimri-scale-"))
    dbs = Databases(work)
    runs: list[Run] = []
    setups = [("sqlite", 1), ("postgresql", 1), ("postgresql", 2)]

    def record(run: Run) -> None:
        runs.append(run)
        print(f"{run.scenario:14s} {run.backend:10s} x{run.nodes}: {run.value:8.1f} {run.unit}"
              f"  {json.dumps(run.detail)}", flush=True)

    try:
        print(f"scale benchmark: {CORES} cores, load {os.getloadavg()[0]:.1f}; work {work}")
        if not args.skip_ingest:
            files = write_series(synthetic_series(args.instances, 256, 256, seed=1),
                                 work / "ingest-series")
            for _ in range(args.rounds):
                for backend, n in setups:
                    record(ingest_run(work / f"r{len(runs)}", dbs, backend, n, files, str(binary)))
        if not args.skip_jobs:
            for pipeline in [p for p in args.pipelines.split(",") if p]:
                count = args.series if pipeline == "preview" else args.brain_series
                series = series_for(pipeline, work, count)
                for _ in range(args.rounds):
                    for backend, n in setups:
                        workers = args.workers * (2 if n == 1 else 1)  # same total
                        record(jobs_run(work / f"r{len(runs)}", dbs, backend, n, pipeline,
                                        series, str(binary), workers, args.timeout))
                if pipeline == "brain" and args.triton:
                    for run in triton_runs(work, dbs, series, str(binary), args):
                        record(run)
    finally:
        dbs.close()
    print("\nratios (medians):")
    ratios: dict[str, float | None] = {}
    for scenario in sorted({r.scenario for r in runs}):
        ratios[f"{scenario}: 2 nodes / 1 node (PostgreSQL)"] = ratio(
            runs, scenario, ("postgresql", 2), ("postgresql", 1))
        ratios[f"{scenario}: PostgreSQL / SQLite (1 node)"] = ratio(
            runs, scenario, ("postgresql", 1), ("sqlite", 1))
    for name, value in ratios.items():
        print(f"  {name}: {'n/a' if value is None else f'{value:.2f}'}")
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(
        {"cores": CORES, "runs": [asdict(r) for r in runs], "ratios": ratios}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
