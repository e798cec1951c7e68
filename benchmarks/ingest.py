#!/usr/bin/env python3
"""Ingest benchmark: the durable node against DCMTK's storescp and Orthanc, same data, same disk.

A synthetic MR series (default 500 instances of 256×256, uint16, ~128 KiB each) is sent with
DCMTK's ``dcmsend`` (``TCP_NODELAY=1``) in each round to

- ``storescp +B`` (bit-preserving: writes the received stream straight to disk, no fsync),
- Orthanc (SQLite index + files, its defaults, ``TCP_NODELAY=1`` in its environment; skipped
  with ``--no-orthanc`` or when ``/usr/sbin/Orthanc`` is missing), and
- ``omnimri-node serve`` (each instance durable before its 0x0000: index row + one
  ``fdatasync`` of the receive journal, shared by concurrent associations),

each started fresh on empty folders. Printed per round: instances/s of each; then the medians,
the ratios node/storescp and node/Orthanc, the node's CPU time per instance (user + system of
its process, ms; and of its association threads alone, from the node's ``association_released``
``cpu_ms_avg``) and the measured ``fdatasync`` bound (median latency of a 128 KiB write +
``fdatasync`` into a preallocated file in the work folder, measured just before each node
round, and the instances/s it would allow on one association if nothing else cost anything).

Usage::

    python3 benchmarks/ingest.py [--rounds 3] [--instances 500] [--size 256] [--senders 1]

``--senders N`` splits the series over N concurrent dcmsend processes (N associations).
Not a timed test; numbers depend on the machine and on what else it is running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnimri_samples import synthetic_series, write_series  # noqa: E402
from tests.fixtures.dcmtk import dcmtk_binary  # noqa: E402
from tests.fixtures.node import write_node_config  # noqa: E402
from tests.fixtures.orthanc import ORTHANC_BIN, OrthancServer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not open")


def env_nodelay() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


def send(dcmsend: str, port: int, aec: str, files: list[Path], senders: int) -> float:
    """Send ``files`` over ``senders`` concurrent dcmsend processes; returns seconds."""
    chunks = [files[i::senders] for i in range(senders)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([dcmsend, "-aet", "BENCH", "-aec", aec, "-dn", "127.0.0.1",
                               str(port), *map(str, chunk)], env=env_nodelay(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for chunk in chunks]
    outs = [p.communicate()[0] for p in procs]
    dt = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"dcmsend failed ({p.returncode}): {out.decode()[-2000:]}")
    return dt


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def round_storescp(storescp: str, dcmsend: str, work: Path, files: list[Path],
                   senders: int) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    args = [storescp, "-aet", "STORESCP", "+B", "-od", str(out), str(port)]
    if senders > 1:
        args.insert(1, "--fork")
    proc = subprocess.Popen(args, env=env_nodelay(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        dt = send(dcmsend, port, "STORESCP", files, senders)
    finally:
        stop(proc)
    stored = sum(1 for _ in out.rglob("*") if _.is_file())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)}")
    return dt


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_node(dcmsend: str, work: Path, files: list[Path], senders: int,
               fsync: bool = True) -> tuple[float, float]:
    """One round against a fresh node: (seconds, CPU seconds of the node while receiving)."""
    root = work / "node"
    shutil.rmtree(root, ignore_errors=True)
    port = free_port()
    config = write_node_config(root, port, completion={"quiet_seconds": 10.0},
                               storage={"fsync": fsync}, logging={"level": "info"})
    log = open(root / "node.log", "wb")  # noqa: SIM115
    exe = shutil.which("omnimri-node")
    cmd = ([exe] if exe else [sys.executable, "-c",
                              "from dicom_node.cli import main; main()"])
    proc = subprocess.Popen([*cmd, "serve", "--config", str(config)], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        time.sleep(0.5)  # let start-up work (imports, journal preparation) finish
        c0 = cpu_s(proc.pid)
        dt = send(dcmsend, port, "OMNIMRI", files, senders)
        used = cpu_s(proc.pid) - c0
    finally:
        stop(proc)
        log.close()
    from dicom_node.index import SeriesIndex

    n = SeriesIndex(root / "var" / "node.db").count_instances()
    if n != len(files):
        raise RuntimeError(f"node indexed {n} of {len(files)}")
    for line in (root / "node.log").read_text().splitlines():
        if '"association_released"' in line:
            LAST_ASSOC_LINES.append(line)
            d = json.loads(line)
            THREAD_CPU_MS.append((float(d.get("cpu_ms_avg", 0.0)), int(d["stored"])))
    return dt, used


def round_orthanc(dcmsend: str, work: Path, files: list[Path], senders: int) -> float:
    """One round against a fresh Orthanc (``TCP_NODELAY=1`` in its environment)."""
    root = work / "orthanc"
    shutil.rmtree(root, ignore_errors=True)
    os.environ["TCP_NODELAY"] = "1"  # Orthanc inherits it (without: Nagle stalls, ~21/s)
    server = OrthancServer(root)
    server.start()
    try:
        dt = send(dcmsend, server.dicom_port, server.ae_title, files, senders)
        n = int(server.get("/statistics")["CountInstances"])
    finally:
        server.stop()
    if n != len(files):
        raise RuntimeError(f"Orthanc stored {n} of {len(files)}")
    return dt


def fdatasync_bound(folder: Path, n: int = 300, size: int = 128 * 1024) -> float:
    """Median seconds of a ``size``-byte write + ``fdatasync`` into a preallocated file."""
    path = folder / "fdatasync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(size * 64))
        os.fsync(fd)
        block = os.urandom(size)
        times = []
        for k in range(n):
            t = time.perf_counter()
            os.pwrite(fd, block, (k % 64) * size)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times)


LAST_ASSOC_LINES: list[str] = []
"""The node's association summaries (per-step timings) of the last rounds."""
THREAD_CPU_MS: list[tuple[float, int]] = []
"""(association thread CPU ms per instance, instances) of each association, all rounds."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--size", type=int, default=256, help="rows = columns")
    ap.add_argument("--senders", type=int, default=1, help="concurrent dcmsend processes")
    ap.add_argument("--no-node-fsync", action="store_true",
                    help="diagnosis only: the node skips its flushes; not durable")
    ap.add_argument("--no-orthanc", action="store_true", help="leave Orthanc out")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where data and receivers write (default: a temp folder)")
    args = ap.parse_args()

    storescp, dcmsend = dcmtk_binary("storescp"), dcmtk_binary("dcmsend")
    if not storescp or not dcmsend:
        print("DCMTK storescp/dcmsend not installed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    with_orthanc = not args.no_orthanc and ORTHANC_BIN.exists()
    work = Path(tempfile.mkdtemp(prefix="omnimri-ingest-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        files = write_series(synthetic_series(args.instances, args.size, args.size),
                             work / "data")
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"series: {len(files)} instances of {args.size}x{args.size}, {mib:.1f} MiB "
              f"(generated in {time.perf_counter() - t0:.1f} s); senders: {args.senders}; "
              f"orthanc: {'yes' if with_orthanc else 'no'}; work dir {work}")
        rates: dict[str, list[float]] = {"storescp": [], "orthanc": [], "node": []}
        cpu_ms: list[float] = []
        bounds: list[float] = []
        for r in range(1, args.rounds + 1):
            dt_s = round_storescp(storescp, dcmsend, work, files, args.senders)
            rates["storescp"].append(len(files) / dt_s)
            line = f"round {r}: storescp {len(files) / dt_s:7.1f} inst/s"
            if with_orthanc:
                dt_o = round_orthanc(dcmsend, work, files, args.senders)
                rates["orthanc"].append(len(files) / dt_o)
                line += f"   orthanc {len(files) / dt_o:7.1f} inst/s"
            bounds.append(fdatasync_bound(work, n=100))
            dt_n, used = round_node(dcmsend, work, files, args.senders, not args.no_node_fsync)
            rates["node"].append(len(files) / dt_n)
            cpu_ms.append(1000 * used / len(files))
            line += (f"   node {len(files) / dt_n:7.1f} inst/s (cpu {cpu_ms[-1]:.2f} ms/inst,"
                     f" fdatasync {1000 * bounds[-1]:.2f} ms just before)"
                     f"   node/storescp {dt_s / dt_n:.2f}")
            if with_orthanc:
                line += f"   node/orthanc {dt_o / dt_n:.2f}"
            print(line, flush=True)
        for line in LAST_ASSOC_LINES[-args.senders:]:
            d = json.loads(line)
            print("node per-instance ms (last round, one association): "
                  + ", ".join(f"{k[:-7]} {d[k]}" for k in d if k.endswith("_ms_avg")))
        bound = statistics.median(bounds)
        thread_ms = (sum(ms * k for ms, k in THREAD_CPU_MS)
                     / max(1, sum(k for _, k in THREAD_CPU_MS)))
        med = {k: statistics.median(v) for k, v in rates.items() if v}
        print(f"median instances/s: storescp {med['storescp']:.1f}"
              + (f", orthanc {med['orthanc']:.1f}" if "orthanc" in med else "")
              + f", node {med['node']:.1f}")
        print(f"ratio node/storescp {med['node'] / med['storescp']:.2f}"
              + (f", node/orthanc {med['node'] / med['orthanc']:.2f}" if "orthanc" in med
                 else "")
              + f"; node CPU {statistics.median(cpu_ms):.2f} ms/instance (median of rounds; "
              f"association threads {thread_ms:.2f} ms/instance)")
        print(f"fdatasync bound: {1000 * bound:.3f} ms per 128 KiB write+fdatasync (median of "
              f"the rounds' medians of 100, measured before each node round) = "
              f"{1 / bound:.0f} instances/s on one association if nothing else cost")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
