"""``omnimri-node demo``: a first look on one machine, in one command.

Starts a local Orthanc (Debian's ``Orthanc``, temporary configuration on free loopback ports) as
the PACS, starts the node (``omnimri-node serve`` with a generated ``config.yaml``, admin
console on), puts a sample brain MR series (MNI152 template, :func:`omnimri_samples.
brain_series`) into Orthanc, has Orthanc send it to the node by C-STORE, waits until the node's
results are back in Orthanc, and prints where to look. Everything lives in one working folder
(kept, so it can be inspected); nothing is downloaded.

Stopping: Ctrl-C, ``kill`` (SIGTERM) or SIGINT, and a hang-up (SIGHUP, unless the demo runs
under ``nohup``, which asks to ignore it) stop Orthanc and the node before the demo exits,
wherever it runs (also ``nohup omnimri-node demo &``, where the shell has SIGINT ignored). Each
child runs in its own process group, which is signalled whole (SIGTERM, then SIGKILL after
15 s), so nothing is left re-parented to PID 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import yaml

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
"""Where the Orthanc executable is looked for (then ``PATH``)."""
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
"""Where the Orthanc DICOMweb plugin is looked for."""
EXIT_NO_ORTHANC = 3
"""Exit code when Orthanc is not installed."""
EXIT_TIMEOUT = 4
"""Exit code when the results did not come back in time."""


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where the log is."""


class DemoStopped(Exception):  # noqa: N818 - a request, not an error
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop the demo and its children."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM, SIGINT and SIGHUP into :class:`DemoStopped` while the block runs.

    SIGINT is handled even where it is ignored (``nohup ... &`` in a non-interactive shell):
    a ``kill -INT`` is then still a request to stop. SIGHUP is left ignored where it is
    (``nohup``). Only the first signal raises; later ones (while stopping) are ignored, so
    the clean-up in ``finally`` is not interrupted. The previous handlers come back on exit.
    """
    fired = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise DemoStopped(signum)

    previous: dict[signal.Signals, Any] = {}
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if sig == signal.SIGHUP and current == signal.SIG_IGN:
            continue
        previous[sig] = current
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_orthanc() -> str | None:
    """The Orthanc executable, or ``None`` when it is not installed."""
    for c in ORTHANC_CANDIDATES:
        if Path(c).is_file():
            return c
    return shutil.which("Orthanc")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"process exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        time.sleep(0.1)
    raise DemoError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


@dataclass
class DemoPorts:
    """The loopback ports the demo uses."""

    orthanc_http: int
    orthanc_dicom: int
    node_dicom: int
    admin: int

    @classmethod
    def pick(cls) -> DemoPorts:
        """Four free ports."""
        return cls(_free_port(), _free_port(), _free_port(), _free_port())


def write_orthanc_config(folder: Path, ports: DemoPorts, node_ae: str) -> Path:
    """Orthanc's JSON configuration: loopback only, the node registered as modality ``omnimri``."""
    plugins = [str(p) for d in PLUGIN_DIRS for p in sorted(Path(d).glob("libOrthancDicomWeb.so*"))]
    cfg: dict[str, Any] = {
        "Name": "OmniMRI demo PACS",
        "StorageDirectory": str(folder / "orthanc-storage"),
        "IndexDirectory": str(folder / "orthanc-storage"),
        "HttpPort": ports.orthanc_http,
        "DicomPort": ports.orthanc_dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "StableAge": 2,
        "DicomModalities": {"omnimri": [node_ae, "127.0.0.1", ports.node_dicom]},
        "Plugins": plugins[:1],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


def write_node_config(folder: Path, ports: DemoPorts, pipeline: str, token: str,
                      models: Path) -> Path:
    """The node's ``config.yaml`` for the demo (results go to the demo Orthanc)."""
    pipelines: dict[str, Any] = {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}}
    if pipeline == "brain":
        pipelines["brain"] = {"kind": "omnimri", "model": "omnimri-tiny", "engine": "auto",
                              "instructions": ["segment brain tissues", "detect abnormalities",
                                               "suggest a diagnosis", "write the report"],
                              "outputs": ["seg", "sr", "sc", "pr", "ko"]}
    cfg = {
        "node": {"ae_title": "OMNIMRI", "host": "127.0.0.1", "port": ports.node_dicom},
        "storage": {"path": "var/spool", "min_free_bytes": 0, "min_free_percent": 0},
        "completion": {"quiet_seconds": 2, "poll_interval_s": 0.2},
        "destinations": {"pacs": {"kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": ports.orthanc_dicom}},
        "pipelines": pipelines,
        "rules": [{"name": "demo-mr", "when": 'Modality == "MR"', "pipelines": [pipeline],
                   "destinations": ["pacs"]}],
        "models": {"path": str(models)},
        "jobs": {"backoff_initial_s": 1, "max_attempts": 3},
        "admin": {"enabled": True, "host": "127.0.0.1", "port": ports.admin,
                  "tokens": [{"id": "demo", "token": token, "role": "admin"}]},
        "audit": {"path": "var/audit.jsonl"},
        "logging": {"level": "info", "format": "json"},
    }
    path = folder / "config.yaml"
    path.write_text("# Written by `omnimri-node demo`.\n" + yaml.safe_dump(cfg, sort_keys=False),
                    encoding="utf-8")
    return path


@dataclass
class DemoResult:
    """What the demo produced."""

    workdir: Path
    study_uid: str
    orthanc_url: str
    orthanc_study_id: str
    console_url: str
    token: str
    result_series: list[dict[str, Any]]
    seconds: float


class Demo:
    """The demo's processes and steps (usable from tests: ``run()`` then ``stop()``)."""

    def __init__(self, workdir: Path, *, pipeline: str = "preview", slices: int = 24,
                 models: Path = Path("models"), orthanc_bin: str | None = None) -> None:
        self.workdir = workdir
        self.pipeline = pipeline
        self.slices = slices
        self.models = models.resolve()
        self.orthanc_bin = orthanc_bin or find_orthanc()
        self.ports = DemoPorts.pick()
        self.token = secrets.token_urlsafe(18)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def orthanc_url(self) -> str:
        """Orthanc's REST/UI base URL."""
        return f"http://127.0.0.1:{self.ports.orthanc_http}"

    def _start(self, cmd: list[str], log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / log_name
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def run(self, timeout_s: float = 180.0, say: Any = print) -> DemoResult:
        """Start Orthanc and the node, send the sample series, wait for the results.

        Raises:
            DemoError: Orthanc missing, a process failed, or no results within ``timeout_s``.
        """
        import httpx

        from omnimri_samples import brain_series

        t0 = time.monotonic()
        if self.orthanc_bin is None:
            raise DemoError("Orthanc is not installed (Debian: apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        say(f"working folder: {self.workdir}")
        orthanc_cfg = write_orthanc_config(self.workdir, self.ports, "OMNIMRI")
        node_cfg = write_node_config(self.workdir, self.ports, self.pipeline, self.token,
                                     self.models)
        proc, log = self._start([self.orthanc_bin, str(orthanc_cfg)], "orthanc.log")
        _wait_http(f"{self.orthanc_url}/system", proc, log, 30)
        say(f"Orthanc (the PACS) is up: {self.orthanc_url}  (DICOM ORTHANC@127.0.0.1:"
            f"{self.ports.orthanc_dicom})")
        proc, log = self._start([sys.executable, "-c", "from dicom_node.cli import main; main()",
                                 "serve", "--config", str(node_cfg)], "node.log")
        _wait_ready(f"http://127.0.0.1:{self.ports.admin}/readyz", proc, log, 60)
        say(f"the node is up: DICOM OMNIMRI@127.0.0.1:{self.ports.node_dicom}, pipeline "
            f"{self.pipeline!r}")

        series = brain_series(resolution_mm=2, slices=self.slices)
        study_uid = str(series[0].StudyInstanceUID)
        for ds in series:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            httpx.post(f"{self.orthanc_url}/instances", content=buf.getvalue(),
                       timeout=30).raise_for_status()
        found = httpx.post(f"{self.orthanc_url}/tools/lookup", content=study_uid,
                           timeout=10).json()
        study_id = next(x["ID"] for x in found if x["Type"] == "Study")
        say(f"sample brain MR series ({len(series)} slices) stored in Orthanc; Orthanc sends it "
            "to the node (C-STORE)...")
        httpx.post(f"{self.orthanc_url}/modalities/omnimri/store",
                   json={"Resources": [study_id], "Synchronous": True},
                   timeout=120).raise_for_status()

        # preview writes one SC series; the brain pipeline one series per output kind.
        expected = 1 if self.pipeline == "preview" else 2
        deadline = time.monotonic() + timeout_s
        results: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            results = [s for s in httpx.get(f"{self.orthanc_url}/studies/{study_id}/series",
                                            params={"expand": ""}, timeout=10).json()
                       if s["MainDicomTags"].get("Modality") != "MR"]
            if len(results) >= expected and all(s.get("IsStable", True) for s in results):
                break
            if proc.poll() is not None:
                raise DemoError(f"the node exited with {proc.returncode}; see {log}")
            time.sleep(0.5)
        else:
            raise DemoError(f"no results in Orthanc after {timeout_s:.0f} s; see {log} and "
                            f"{self.workdir / 'var' / 'audit.jsonl'}")
        rows = [{"modality": s["MainDicomTags"].get("Modality", ""),
                 "description": s["MainDicomTags"].get("SeriesDescription", ""),
                 "instances": len(s.get("Instances", []))} for s in results]
        return DemoResult(
            workdir=self.workdir, study_uid=study_uid, orthanc_url=self.orthanc_url,
            orthanc_study_id=study_id,
            console_url=f"http://127.0.0.1:{self.ports.admin}/console",
            token=self.token, result_series=rows, seconds=time.monotonic() - t0)

    def stop(self) -> None:
        """Stop the node and Orthanc, newest first.

        SIGTERM to each child's process group, SIGKILL to the group after 15 s.
        """
        for proc in reversed(self.procs):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=5)
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the node exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise DemoError(f"the node was not ready within {timeout_s:.0f} s; see {log}")


def _summary(r: DemoResult) -> str:
    lines = [
        "",
        f"Results are back in Orthanc after {r.seconds:.1f} s:",
        *[f"  - {s['modality']:<4} {s['description'] or '(no description)'}"
          f" ({s['instances']} instance(s))" for s in r.result_series],
        "",
        "Where to look:",
        f"  Orthanc explorer : {r.orthanc_url}/app/explorer.html#study?uuid={r.orthanc_study_id}",
        f"  node console     : {r.console_url}   (token: {r.token})",
        f"  node API docs    : {r.console_url.removesuffix('/console')}/docs",
        f"  audit trail      : {r.workdir / 'var' / 'audit.jsonl'}",
        f"  logs             : {r.workdir / 'node.log'}, {r.workdir / 'orthanc.log'}",
    ]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""

    @app.command("demo")
    def demo(
        workdir: Annotated[Path | None, typer.Option(
            "--workdir", help="Folder for configs, spool, logs (default: a new temp folder).")
        ] = None,
        pipeline: Annotated[str, typer.Option(
            "--pipeline", help="'preview' (no model: SC montage) or 'brain' (OmniMRI model "
            "package models/omnimri-tiny)."
        )] = "preview",
        slices: Annotated[int, typer.Option("--slices", min=4, max=91,
                                            help="Slices of the sample series.")] = 24,
        models: Annotated[Path, typer.Option("--models", help="Folder of model packages."
                                             )] = Path("models"),
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for "
                                               "results.")] = 180.0,
        keep_running: Annotated[bool, typer.Option(
            "--keep-running/--exit", help="Keep Orthanc and the node running until Ctrl-C."
        )] = True,
    ) -> None:
        """Start Orthanc and the node, send a sample brain MR through Orthanc, show results."""
        if pipeline not in ("preview", "brain"):
            typer.echo("--pipeline must be 'preview' or 'brain'", err=True)
            raise typer.Exit(2)
        if pipeline == "brain" and not (models / "omnimri-tiny" / "model.yaml").is_file():
            typer.echo(f"no model package {models / 'omnimri-tiny'}; use --pipeline preview or "
                       "--models PATH", err=True)
            raise typer.Exit(2)
        if find_orthanc() is None:
            typer.echo("Orthanc is not installed (Debian: apt-get install orthanc "
                       "orthanc-dicomweb); the demo needs it as the PACS.", err=True)
            raise typer.Exit(EXIT_NO_ORTHANC)
        folder = workdir or Path(tempfile.mkdtemp(prefix="omnimri-demo-"))
        d = Demo(folder.resolve(), pipeline=pipeline, slices=slices, models=models)
        with stop_on_signals():
            try:
                result = d.run(timeout_s=timeout, say=typer.echo)
                typer.echo(_summary(result))
                if keep_running:
                    typer.echo("\nRunning; press Ctrl-C (or kill the demo) to stop Orthanc and "
                               "the node.")
                    while all(p.poll() is None for p in d.procs):
                        time.sleep(0.5)
            except DemoStopped as stop:
                typer.echo(f"\n{stop}: stopping Orthanc and the node.", err=True)
                raise typer.Exit(128 + stop.signum) from None
            except KeyboardInterrupt:
                typer.echo("\nstopping Orthanc and the node.", err=True)
                raise typer.Exit(128 + signal.SIGINT) from None
            except DemoError as err:
                typer.echo(f"demo failed: {err}", err=True)
                raise typer.Exit(EXIT_TIMEOUT) from None
            finally:
                d.stop()
