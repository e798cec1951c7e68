"""``omnimri-node demo`` stops Orthanc and the node on SIGTERM and SIGINT, also under nohup.

The demo runs as a real process, started the way ``nohup omnimri-node demo &`` starts it from a
non-interactive shell (SIGINT and SIGHUP ignored), until it prints that it is running with its
real Orthanc and node children. Then it gets the signal; it must exit with 128 + the signal
number and leave neither child behind (none re-parented to PID 1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.cli import demo as demo_mod

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(demo_mod.find_orthanc() is None,
                       reason="Orthanc not installed (apt-get install orthanc)"),
]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _like_nohup_in_background() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo_stops_its_children_on_signal(sig: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from dicom_node.cli import main; main()", "demo",
             "--pipeline", "preview", "--slices", "4", "--workdir", str(tmp_path / "demo"),
             "--timeout", "150"],
            stdout=fh, stderr=subprocess.STDOUT, preexec_fn=_like_nohup_in_background,
        )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 200
        while b"Running;" not in out.read_bytes():
            assert proc.poll() is None, out.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, out.read_text(errors="replace")[-3000:]
            time.sleep(0.3)
        children = _children(proc.pid)
        assert len(children) == 2, children  # Orthanc and the node
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig, out.read_text(errors="replace")[-2000:]
        assert f"{sig.name}: stopping" in out.read_text(errors="replace")
        left = [c for c in children if _alive(c)]
        assert left == [], left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for c in children:
            if _alive(c):
                os.killpg(c, signal.SIGKILL)  # each child leads its own process group
