"""``omnimri-node serve`` (run the node) and ``omnimri-node echo`` (C-ECHO a peer)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from dicom_node.cli.common import ConfigOption, load_or_exit
from dicom_node.config import DEFAULT_CONFIG_PATH, NodeSettings

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


def run_node(settings: NodeSettings, config_path: Path | None = None) -> None:
    """Configure logging and run a :class:`~dicom_node.runtime.Node` until SIGTERM/SIGINT.

    With ``admin.enabled`` the admin API and console (:class:`~dicom_node.admin.AdminServer`)
    run as a service of the node; ``config_path`` is the file its rule editor rewrites. With
    ``storage.retention_days`` set, :class:`~dicom_node.retention.RetentionService` purges
    finished series.
    """
    from dicom_node import metrics
    from dicom_node.audit import configure_audit
    from dicom_node.logs import configure_logging
    from dicom_node.runtime import Node

    configure_logging(settings.logging.level, settings.logging.format)
    configure_audit(settings.audit.path)
    metrics.bind_node(settings)
    node = Node(settings)
    node.tracker.add_listener(_completion_observer(node))
    if config_path is not None:
        node.add_service(_config_reloader(node, config_path))
    if settings.storage.retention_days is not None:
        from dicom_node.retention import RetentionService

        node.add_service(RetentionService(settings, node.index))
    if settings.admin.enabled:
        from dicom_node.admin import AdminServer

        admin = AdminServer(settings, config_path=config_path,
                            ready_check=lambda: _listener_ready(node))
        # Rules applied through the API take effect at once in the running router.
        admin.backend.rules_hooks.append(node.router.apply_settings)
        node.add_service(admin)
    node.serve_forever()


def _completion_observer(node: Any) -> Any:
    """Count, time and audit each completed series (UIDs and counts only)."""
    from datetime import datetime

    from dicom_node import metrics
    from dicom_node.audit import get_audit

    def observe(event: Any) -> None:
        metrics.record_series_completed(event.reason)
        info = node.index.get_series(event.series_instance_uid) or {}
        last = info.get("last_received_at")
        if last:
            wait = (event.completed_at - datetime.fromisoformat(last)).total_seconds()
            metrics.observe_stage("completion_wait", max(wait, 0.0))
        get_audit().series_received(
            study_uid=str(info.get("study_instance_uid", "")),
            series_uid=event.series_instance_uid,
            instances=event.instance_count,
            revision=event.revision,
            reason=event.reason,
        )

    return observe


def _config_reloader(node: Any, config_path: Path) -> Any:
    """Reload ``config_path`` on SIGHUP or when it changes.

    Rules, pipelines, destinations and jobs settings take effect at once; listener, storage,
    admin, audit and logging settings at the next restart (the log line names them).
    """
    from dicom_node.logs import get_logger
    from dicom_node.reload import ConfigReloader

    log = get_logger("reload")

    def apply(new: NodeSettings) -> None:
        restart = [k for k in ("node", "storage", "admin", "audit", "logging")
                   if getattr(new, k) != getattr(node.settings, k)]
        node.router.apply_settings(new)
        node.workers.apply_settings(new)
        log.info("config_applied", rules=len(new.rules), pipelines=len(new.pipelines),
                 destinations=len(new.destinations), needs_restart=restart)

    return ConfigReloader(config_path, apply, initial=node.settings)


def _listener_ready(node: Any) -> tuple[bool, str]:
    """Readiness of the DICOM listener (its port accepts TCP connections)."""
    import socket

    host = node.settings.node.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    try:
        with socket.create_connection((host, node.listener.port), timeout=0.5):
            return True, f"listening on port {node.listener.port}"
    except OSError:
        return False, f"DICOM port {node.listener.port} not accepting connections"


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
