#!/usr/bin/env python3
"""Ingest benchmark: the durable node against DCMTK's storescp, same data, same disk.

A synthetic MR series (default 500 instances of 256×256, uint16, ~128 KiB each) is sent with
DCMTK's ``dcmsend`` (``TCP_NODELAY=1``) alternately to

- ``storescp +B`` (bit-preserving: writes the received stream straight to disk, no fsync), and
- ``omnimri-node serve`` (fsync of every instance and folder, SQLite index, before each
  0x0000),

for a few rounds; each round starts both receivers fresh on empty folders, so the node never
sees duplicates. Printed: instances/s of each round, the medians and the ratio node/storescp.

Usage::

    python3 benchmarks/ingest.py [--rounds 3] [--instances 500] [--size 256] [--senders 1]

``--senders N`` splits the series over N concurrent dcmsend processes (N associations).
``--receiver pynetdicom|fast|both`` picks ``node.receiver`` (``both``: one node of each kind
per round, alternating with storescp; the fast receiver acknowledges after one ``fdatasync``
of its receive journal, see docs/listener.md).
Not a timed test; numbers depend on the machine and on what else it is running.
"""

from __future__ import annotations

import argparse
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

from dicom_node.samples import synthetic_series, write_series  # noqa: E402
from tests.fixtures.dcmtk import dcmtk_binary  # noqa: E402
from tests.fixtures.node import write_node_config  # noqa: E402


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


def round_node(dcmsend: str, work: Path, files: list[Path], senders: int,
               fsync: bool = True, receiver: str | None = None) -> float:
    root = work / "node"
    shutil.rmtree(root, ignore_errors=True)
    port = free_port()
    node: dict[str, str] = {} if receiver is None else {"receiver": receiver}
    config = write_node_config(root, port, completion={"quiet_seconds": 10.0},
                               storage={"fsync": fsync}, logging={"level": "info"}, node=node)
    log = open(root / "node.log", "wb")  # noqa: SIM115
    exe = shutil.which("omnimri-node")
    cmd = ([exe] if exe else [sys.executable, "-c",
                              "from dicom_node.cli import main; main()"])
    proc = subprocess.Popen([*cmd, "serve", "--config", str(config)], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        dt = send(dcmsend, port, "OMNIMRI", files, senders)
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
    return dt


LAST_ASSOC_LINES: list[str] = []
"""The node's association summaries (per-step timings) of the last rounds."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--size", type=int, default=256, help="rows = columns")
    ap.add_argument("--senders", type=int, default=1, help="concurrent dcmsend processes")
    ap.add_argument("--no-node-fsync", action="store_true",
                    help="diagnosis only: the node skips its file/folder fsyncs (SQLite still "
                         "commits durably); not a durable configuration")
    ap.add_argument("--receiver", choices=["pynetdicom", "fast", "both"], default=None,
                    help="node.receiver of the node (default: as configured, i.e. the "
                         "config default or OMNIMRI__NODE__RECEIVER); 'both' runs a node "
                         "of each kind in every round (pynetdicom, then fast)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where data and receivers write (default: a temp folder)")
    args = ap.parse_args()
    receivers: list[str | None] = (["pynetdicom", "fast"] if args.receiver == "both"
                                   else [args.receiver])

    storescp, dcmsend = dcmtk_binary("storescp"), dcmtk_binary("dcmsend")
    if not storescp or not dcmsend:
        print("DCMTK storescp/dcmsend not installed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="omnimri-ingest-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        files = write_series(synthetic_series(args.instances, args.size, args.size),
                             work / "data")
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"series: {len(files)} instances of {args.size}x{args.size}, {mib:.1f} MiB "
              f"(generated in {time.perf_counter() - t0:.1f} s); senders: {args.senders}; "
              f"receiver: {args.receiver or os.environ.get('OMNIMRI__NODE__RECEIVER', 'default')};"
              f" "
              f"work dir {work}")
        labels = {rx: "node" if len(receivers) == 1 else f"node[{rx}]" for rx in receivers}
        rates: dict[str, list[float]] = {"storescp": [], **{lb: [] for lb in labels.values()}}
        for r in range(1, args.rounds + 1):
            dt_s = round_storescp(storescp, dcmsend, work, files, args.senders)
            rates["storescp"].append(len(files) / dt_s)
            line = f"round {r}: storescp {len(files) / dt_s:7.1f} inst/s ({dt_s:.2f} s)"
            for rx in receivers:
                if rx:  # the environment wins over the config file
                    os.environ["OMNIMRI__NODE__RECEIVER"] = rx
                dt_n = round_node(dcmsend, work, files, args.senders, not args.no_node_fsync,
                                  rx)
                rates[labels[rx]].append(len(files) / dt_n)
                line += (f"   {labels[rx]} {len(files) / dt_n:7.1f} inst/s ({dt_n:.2f} s)"
                         f" ratio {dt_s / dt_n:.2f}")
            print(line)
        med_s = statistics.median(rates["storescp"])
        import json

        for line in LAST_ASSOC_LINES[-args.senders * len(receivers):]:
            d = json.loads(line)
            print(f"node[{d.get('receiver', 'pynetdicom')}] per-instance ms (last round): "
                  + ", ".join(f"{k[:-7]} {d[k]}" for k in d if k.endswith("_ms_avg")))
        for rx in receivers:
            med_n = statistics.median(rates[labels[rx]])
            print(f"median: storescp {med_s:.1f} instances/s, {labels[rx]} {med_n:.1f} "
                  f"instances/s, ratio {labels[rx]}/storescp {med_n / med_s:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
