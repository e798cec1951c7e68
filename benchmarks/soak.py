#!/usr/bin/env python3
"""Soak: 8 concurrent senders against one node for a while, with faults mixed in.

A fresh ``omnimri-node serve`` (durable defaults, short timers: ``--timeout-s``) receives from
``--senders`` threads (default 8) for ``--seconds`` (default 600). Each sender opens
associations one after another; each association is, at random:

- ``store``: a batch of good instances with pynetdicom's SCU (every other sender) or a bare
  socket SCU (:class:`tests.test_receiver_network.RawAssociation`);
- ``abort``: a C-STORE whose data set stops halfway, then an A-ABORT;
- ``slow``: a good instance sent in small fragments with pauses;
- ``idle``: an association that sends nothing (the node must abort it after its idle timer);
- ``malformed``: a truncated data set (must get a failure status, never 0x0000).

Printed at the end: associations and instances per kind, statuses, the longest gap between a
C-STORE request and its response (and the 99th percentile), the number of gaps over 1 s, losses
(instances acknowledged 0x0000 that are not in the index with the same data set bytes after
the node stopped), malformed instances acknowledged, the node's peak RSS, and how many
C-STORE responses pynetdicom's SCU dropped itself (a race in its requestor, docs/listener.md).
Exit status 1 on any loss, malformed acknowledgement, partial file left, or stall over 1 s
that the sender's own dropped responses do not explain.

``--kill9-every S`` adds kill -9 rounds: every S seconds the node is killed (SIGKILL, no
clean-up) in the middle of the traffic and restarted on the same spool and database; the
senders' failed associations meanwhile are counted as sender-side errors, and the loss check
covers every instance acknowledged before any of the kills (acknowledged means durable, also
when its index row was not written yet: the start-up replay indexes it).

Usage::

    python3 benchmarks/soak.py [--seconds 600] [--senders 8] [--kill9-every 30]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402

from dicom_node.fastscp import upper_layer as ul  # noqa: E402
from omnimri_samples import synthetic_series, write_series  # noqa: E402
from tests.fixtures.node import dataset_bytes, write_node_config  # noqa: E402
from tests.test_receiver_network import RawAssociation, command, rss_mib  # noqa: E402

EXPLICIT_LE = "1.2.840.10008.1.2.1"
KINDS = {"store": 0.6, "abort": 0.1, "slow": 0.1, "idle": 0.05, "malformed": 0.15}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stats:
    """What the senders saw (shared, under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gaps: list[float] = []
        self.statuses: collections.Counter[str] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.acked: dict[str, bytes] = {}
        self.malformed_acked = 0

    def gap(self, seconds: float, status: int, kind: str) -> None:
        with self.lock:
            self.gaps.append(seconds)
            self.statuses[f"{kind}:0x{status:04X}"] += 1


class Sender(threading.Thread):
    """One sender: associations one after another until ``stop_at``."""

    def __init__(self, k: int, port: int, files: list[Path], stop_at: float, stats: Stats,
                 idle_s: float) -> None:
        super().__init__(daemon=True, name=f"sender-{k}")
        self.k = k
        self.port = port
        self.stop_at = stop_at
        self.stats = stats
        self.idle_s = idle_s
        self.rng = random.Random(k)
        self.items = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID), dataset_bytes(f), f)
                      for f in files
                      for ds in [pydicom.dcmread(f, stop_before_pixels=True)]]
        self.next = 0
        self.pynetdicom = k % 2 == 0

    def pick(self) -> tuple[str, str, bytes, Path]:
        item = self.items[self.next % len(self.items)]
        self.next += 1
        return item

    def run(self) -> None:
        kinds, weights = zip(*KINDS.items(), strict=True)
        while time.monotonic() < self.stop_at:
            kind = self.rng.choices(kinds, weights)[0]
            with self.stats.lock:
                self.stats.kinds[kind] += 1
            try:
                getattr(self, f"do_{kind}")()
            except Exception as err:  # noqa: BLE001 - counted, the soak goes on
                with self.stats.lock:
                    self.stats.errors[f"{kind}: {type(err).__name__}: {str(err)[:80]}"] += 1
                time.sleep(0.1)

    def _ack(self, uid: str, data: bytes, status: int) -> None:
        if status == 0:
            with self.stats.lock:
                self.stats.acked[uid] = data

    def do_store(self) -> None:
        batch = [self.pick() for _ in range(self.rng.randint(5, 40))]
        if self.pynetdicom:
            self._store_pynetdicom(batch)
            return
        a = RawAssociation(self.port, [(batch[0][0], EXPLICIT_LE)], calling=f"RAW{self.k}",
                           timeout_s=60)
        try:
            for sc, uid, data, _ in batch:
                t = time.monotonic()
                st = a.store(sc, uid.encode(), data)
                self.stats.gap(time.monotonic() - t, st, "store")
                self._ack(uid, data, st)
        finally:
            a.release()

    def _store_pynetdicom(self, batch: list[tuple[str, str, bytes, Path]]) -> None:
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title=f"PND{self.k}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(batch[0][0], [EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", self.port, ae_title="OMNIMRI")
        if not assoc.is_established:
            raise ConnectionError("pynetdicom association not established")
        try:
            for _, uid, data, path in batch:
                t = time.monotonic()
                rsp = assoc.send_c_store(path)
                st = int(rsp.Status) if rsp is not None and "Status" in rsp else -1
                self.stats.gap(time.monotonic() - t, st, "store")
                self._ack(uid, data, st)
                if st == -1:
                    raise ConnectionError("no C-STORE response (pynetdicom)")
        finally:
            if assoc.is_established:
                assoc.release()

    def do_abort(self) -> None:
        sc, uid, data, _ = self.pick()
        a = RawAssociation(self.port, [(sc, EXPLICIT_LE)], calling=f"ABORT{self.k}")
        cx = a.context_of[sc]
        a.sock.sendall(ul.p_data_tf(cx, command(ul.C_STORE_RQ, 1, sc.encode(), uid.encode(),
                                                True)))
        half = data[:len(data) // 2]  # a fragment that is not the last one, then the abort
        pdv = struct.pack(">LBB", len(half) + 2, cx, 0x00) + half
        a.sock.sendall(struct.pack(">BxL", ul.P_DATA_TF_TYPE, len(pdv)) + pdv)
        a.abort()

    def do_slow(self) -> None:
        sc, uid, data, _ = self.pick()
        a = RawAssociation(self.port, [(sc, EXPLICIT_LE)], calling=f"SLOW{self.k}", timeout_s=60)
        try:
            t = time.monotonic()
            st = a.store(sc, uid.encode(), data, fragment=max(1000, len(data) // 8),
                         pause_s=0.05)
            self.stats.gap(time.monotonic() - t - 7 * 0.05, st, "slow")
            self._ack(uid, data, st)
        finally:
            a.release()

    def do_idle(self) -> None:
        a = RawAssociation(self.port, [], calling=f"IDLE{self.k}")
        try:
            a.sock.settimeout(self.idle_s + 10)
            t = time.monotonic()
            got = a.sock.recv(16)  # the node's A-ABORT after its idle timer, then the close
            waited = time.monotonic() - t
            if got[:1] not in (b"", b"\x07") or waited > self.idle_s + 5:
                raise RuntimeError(f"idle association not aborted in time ({waited:.1f} s)")
        finally:
            a.sock.close()

    def do_malformed(self) -> None:
        sc, uid, data, _ = self.pick()
        bad_uid = f"{uid}.{self.k}{self.next}"[:64]
        a = RawAssociation(self.port, [(sc, EXPLICIT_LE)], calling=f"BAD{self.k}")
        try:
            t = time.monotonic()
            st = a.store(sc, bad_uid.encode(), data[:len(data) - 1000])  # truncated
            self.stats.gap(time.monotonic() - t, st, "malformed")
            if st == 0:
                with self.stats.lock:
                    self.stats.malformed_acked += 1
        finally:
            a.release()


class _StolenResponses(logging.Handler):
    """Counts pynetdicom's "Received unexpected C-STORE service message" warnings.

    pynetdicom 3's requestor pauses its association reactor before ``send_c_store`` with an
    unsynchronised flag (``_is_paused``): a reactor thread preempted just after its
    checkpoint still reads as paused, sends nothing, then wakes and takes the C-STORE-RSP off
    the DIMSE queue itself, dropping it with this warning; ``send_c_store`` then waits for a
    response that never comes (until the node's idle timer aborts the association).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Received unexpected" in record.getMessage():
            self.count += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--instances", type=int, default=500, help="distinct instances per sender")
    ap.add_argument("--timeout-s", type=float, default=5.0,
                    help="node acse/network/dimse timeouts, seconds")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--kill9-every", type=float, default=0.0,
                    help="kill -9 and restart the node every this many seconds (0: never)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="omnimri-soak-", dir=args.workdir))
    proc: subprocess.Popen[bytes] | None = None
    try:
        files = [write_series(synthetic_series(args.instances, 64, 64, seed=100 + k,
                                               series_number=k + 1), work / f"data{k}")
                 for k in range(args.senders)]
        root = work / "node"
        port = free_port()
        t = args.timeout_s
        config = write_node_config(root, port, node={
            "acse_timeout_s": t, "network_timeout_s": t, "dimse_timeout_s": t,
            "max_associations": 2 * args.senders}, completion={"quiet_seconds": 5.0},
            logging={"level": "info"})
        log = open(root / "node.log", "ab")  # noqa: SIM115
        exe = shutil.which("omnimri-node")
        cmd = [exe] if exe else [sys.executable, "-c", "from dicom_node.cli import main; main()"]

        def start_node() -> subprocess.Popen[bytes]:
            node = subprocess.Popen([*cmd, "serve", "--config", str(config)], cwd=root,
                                    stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    return node
                except OSError:
                    if time.monotonic() > deadline or node.poll() is not None:
                        raise RuntimeError("node did not start") from None
                    time.sleep(0.1)

        proc = start_node()
        kills: list[float] = []
        """Seconds each kill -9 → port open again took."""
        stats = Stats()
        stolen = _StolenResponses()
        logging.getLogger("pynetdicom").addHandler(stolen)
        t0 = time.monotonic()
        stop_at = t0 + args.seconds
        senders = [Sender(k, port, files[k], stop_at, stats, t) for k in range(args.senders)]
        for s in senders:
            s.start()
        peak = rss_mib(proc.pid)
        next_kill = t0 + args.kill9_every if args.kill9_every > 0 else float("inf")
        while any(s.is_alive() for s in senders):
            time.sleep(0.5)
            peak = max(peak, rss_mib(proc.pid))
            if time.monotonic() >= next_kill and time.monotonic() < stop_at - 5:
                tk = time.monotonic()
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                proc = start_node()
                kills.append(time.monotonic() - tk)
                next_kill = time.monotonic() + args.kill9_every
            if time.monotonic() > stop_at + 120:
                print("senders did not finish 120 s after the end: a hang", file=sys.stderr)
                break
        elapsed = time.monotonic() - t0
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        from dicom_node.index import SeriesIndex

        index = SeriesIndex(root / "var" / "node.db")
        lost = 0
        for uid, data in stats.acked.items():
            found = index.lookup_instance(uid)
            if found is None or not found[0].exists() or dataset_bytes(found[0]) != data:
                lost += 1
        incoming = list((root / "var" / "spool" / ".incoming").iterdir())
        events: collections.Counter[str] = collections.Counter()
        for line in (root / "node.log").read_text(errors="replace").splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            ev = d.get("event", "")
            if ev == "association_timeout":
                if d.get("pending_data_set"):
                    ev += " (mid data set: the sender paused past the timer)"
                elif d.get("requests") == d.get("responses"):
                    ev += " (every request answered)"
                else:
                    ev += " (a request unanswered)"
            elif ev == "instance_refused":
                ev += f" {d.get('status')}"
            if ev.startswith(("association_timeout", "association_protocol_error",
                              "instance_refused", "instance_store_failed",
                              "association_failed", "materialise_failed")):
                events[ev] += 1
        gaps = sorted(stats.gaps)
        stalls = sum(1 for g in gaps if g > 1.0)
        print(f"soak: {elapsed:.0f} s, {args.senders} senders, node timers {t} s "
              "(loaded machine)")
        if kills:
            print(f"kill -9 rounds: {len(kills)} (restart to port open "
                  f"{min(kills):.1f}-{max(kills):.1f} s)")
        print("associations by kind: " + ", ".join(f"{k} {v}" for k, v in
                                                   sorted(stats.kinds.items())))
        print("responses: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.statuses.items())))
        if gaps:
            p99 = gaps[int(0.99 * (len(gaps) - 1))]
            print(f"C-STORE request→response: {len(gaps)} responses, median "
                  f"{1000 * statistics.median(gaps):.1f} ms, p99 {1000 * p99:.1f} ms, longest "
                  f"{1000 * gaps[-1]:.1f} ms; gaps over 1 s: {stalls}")
        print(f"acknowledged distinct instances: {len(stats.acked)}; lost: {lost}; "
              f"malformed acknowledged: {stats.malformed_acked}; left in .incoming: "
              f"{len(incoming)}; node peak RSS {peak:.0f} MiB")
        print(f"pynetdicom SCU: {stolen.count} C-STORE responses taken off the queue by its "
              "own association reactor ('Received unexpected ... service message')")
        print("node log: " + (", ".join(f"{k} {v}" for k, v in sorted(events.items()))
                              or "no timeouts, protocol errors or refusals"))
        if stats.errors:
            print("sender-side errors (counted, not failures by themselves):")
            for e, n in stats.errors.most_common(10):
                print(f"  {n} x {e}")
        # A response the sender's own pynetdicom reactor took (see _StolenResponses) is a stall
        # of the sender, not of the node: counted apart.
        node_stalls = max(0, stalls - stolen.count)
        print(f"stalls over 1 s not explained by the sender's lost responses: {node_stalls}")
        return 1 if lost or stats.malformed_acked or node_stalls or incoming else 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

