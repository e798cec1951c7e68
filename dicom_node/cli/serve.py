"""``omnimri-node serve`` (run the node) and ``omnimri-node echo`` (C-ECHO a peer)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from dicom_node.cli.common import ConfigOption, load_or_exit
from dicom_node.config import DEFAULT_CONFIG_PATH

EXIT_ECHO_FAILED = 1
"""``echo``: the peer answered with a failure status, rejected, or could not be reached."""

_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def echo_peer(host: str, port: int, aet: str, aec: str, timeout_s: float) -> tuple[bool, str]:
    """C-ECHO ``aec`` at ``host:port`` calling as ``aet``; returns (success, message)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    t0 = time.perf_counter()
    try:
        assoc = ae.associate(host, port, ae_title=aec)
    except OSError as err:
        return False, f"cannot connect to {host}:{port}: {err}"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result = getattr(rj, "result", None)
        source = getattr(rj, "result_source", None)
        diag = getattr(rj, "diagnostic", None)
        why = _REJECT_REASONS.get((source or 0, diag or 0), "unknown reason")
        kind = "permanently" if result == 1 else "transiently"
        return False, f"association {kind} rejected by {aec}@{host}:{port}: {why}"
    if not assoc.is_established:
        return False, f"no association with {aec}@{host}:{port} (aborted or no answer)"
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    ms = (time.perf_counter() - t0) * 1000
    if rsp is None or "Status" not in rsp:
        return False, f"no C-ECHO response from {aec}@{host}:{port}"
    code = int(rsp.Status)
    if code != 0:
        return False, f"C-ECHO to {aec}@{host}:{port} answered status 0x{code:04X}"
    return True, f"C-ECHO to {aec}@{host}:{port}: success ({ms:.1f} ms)"


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``echo`` to ``app``."""

    @app.command("serve")
    def serve(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
        """Run the node: DICOM listener, series tracker and the services configured."""
        from dicom_node.runtime import run_node

        settings = load_or_exit(config)
        run_node(settings, config_path=config if config.exists() else None)

    @app.command("echo")
    def echo(
        host: Annotated[str, typer.Argument(help="Peer host name or address.")],
        port: Annotated[int, typer.Argument(help="Peer DICOM port.")],
        aet: Annotated[str, typer.Option("--aet", help="Our (calling) AE title.")] = "OMNIMRI",
        aec: Annotated[str, typer.Option("--aec", help="The peer's AE title.")] = "ANY-SCP",
        timeout: Annotated[float, typer.Option("--timeout", help="Timeout, seconds.")] = 10.0,
    ) -> None:
        """Send a C-ECHO (DICOM ping); exit 0 on success, 1 otherwise."""
        ok, message = echo_peer(host, port, aet, aec, timeout)
        typer.echo(message, err=not ok)
        if not ok:
            raise typer.Exit(EXIT_ECHO_FAILED)
