"""Prometheus metrics of the node, in one registry (:data:`REGISTRY`), served at ``/metrics``.

Every part of the node records through the small functions below; none of them raises.

Calling API::

    from dicom_node import metrics

    metrics.record_instance(nbytes)                 # listener, per stored instance
    metrics.record_association("accepted")          # listener: accepted | rejected | aborted
    metrics.association_started() / metrics.association_ended()   # live associations gauge
    metrics.record_series_completed("quiet")        # tracker: quiet | expected_count | forced
    with metrics.time_stage("dispatch"):            # worker: dispatch
        ...
    metrics.observe_stage("completion_wait", seconds)   # tracker
    metrics.observe_stage("volume", seconds)        # pipelines: volume | inference | export
    with metrics.collect_stages() as acc:           # worker, around one pipeline run: the
        ...                                         #   pipeline's observe_stage calls add up
    metrics.observe_stages(acc)                     #   in acc, then one sample per stage

Stages (one sample per job each): ``completion_wait`` (series completion), ``volume`` (reading
and stacking the source pixels), ``inference`` (model: load, pre-processing, engine run,
post-processing, model-specific results), ``export`` (building the DICOM outputs and writing
them into the spool), ``dispatch`` (sending them to the destinations).
    metrics.record_dispatch_failure("pacs")         # dispatcher, per failed delivery attempt
    metrics.record_stage_failure("routing")         # an item a stage gave up on (failed state)
    metrics.bind_node(settings)                     # once at start: jobs table + spool disk
    body, content_type = metrics.render()           # the /metrics answer

Jobs by state and pipeline, and disk usage of the spool, are read when Prometheus scrapes (a
custom collector reads the ``jobs`` table of the node database, SQLite or PostgreSQL, if it
exists, and
:func:`shutil.disk_usage` of the spool folder), so they are right even after a restart.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.db import DatabaseTarget, PgConnection, db_errors, is_postgres, table_columns
from dicom_node.logs import get_logger

if TYPE_CHECKING:
    from dicom_node.config import NodeSettings

log = get_logger("metrics")

REGISTRY: Final = CollectorRegistry(auto_describe=True)
"""The node's own registry (not the process-global default, so tests and embeds stay clean)."""

STAGES: Final = ("completion_wait", "volume", "inference", "export", "dispatch")
"""Stages with a latency histogram (label ``stage``)."""

ASSOCIATION_RESULTS: Final = ("accepted", "rejected", "aborted")
"""Values of the ``result`` label of :data:`ASSOCIATIONS`."""

_LATENCY_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

INSTANCES_RECEIVED: Final = Counter(
    "omnimri_instances_received", "DICOM instances stored (C-STORE success).",
    registry=REGISTRY,
)
BYTES_RECEIVED: Final = Counter(
    "omnimri_received_bytes", "Bytes of DICOM instances stored, bytes.", registry=REGISTRY
)
ASSOCIATIONS: Final = Counter(
    "omnimri_associations", "DICOM associations by result.", ["result"], registry=REGISTRY
)
ACTIVE_ASSOCIATIONS: Final = Gauge(
    "omnimri_associations_active", "DICOM associations open now.", registry=REGISTRY
)
SERIES_COMPLETED: Final = Counter(
    "omnimri_series_completed", "Series the tracker declared complete, by reason.", ["reason"],
    registry=REGISTRY,
)
STAGE_SECONDS: Final = Histogram(
    "omnimri_stage_duration_seconds", "Latency of each processing stage, seconds.", ["stage"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
DISPATCH_FAILURES: Final = Counter(
    "omnimri_dispatch_failures", "Failed delivery attempts, by destination.", ["destination"],
    registry=REGISTRY,
)

STAGE_FAILURES: Final = Counter(
    "omnimri_stage_failures",
    "Items a stage gave up on and put in a visible failed state (the queue moves on), by stage.",
    ["stage"], registry=REGISTRY,
)

for _r in ASSOCIATION_RESULTS:
    ASSOCIATIONS.labels(result=_r)
for _s in STAGES:
    STAGE_SECONDS.labels(stage=_s)


def record_instance(nbytes: int) -> None:
    """Count one stored instance of ``nbytes`` bytes."""
    INSTANCES_RECEIVED.inc()
    if nbytes > 0:
        BYTES_RECEIVED.inc(nbytes)


def record_association(result: str) -> None:
    """Count one association by ``result``: ``accepted``, ``rejected`` or ``aborted``."""
    if result not in ASSOCIATION_RESULTS:
        log.warning("metrics_unknown_association_result", result=result)
        return
    ASSOCIATIONS.labels(result=result).inc()


def association_started() -> None:
    """One more association is open (pair with :func:`association_ended`)."""
    ACTIVE_ASSOCIATIONS.inc()


def association_ended() -> None:
    """One association closed."""
    ACTIVE_ASSOCIATIONS.dec()


def record_series_completed(reason: str = "quiet") -> None:
    """Count a completed series; ``reason`` is ``quiet``, ``expected_count`` or ``forced``."""
    SERIES_COMPLETED.labels(reason=reason).inc()


_collecting = threading.local()


def observe_stage(stage: str, seconds: float) -> None:
    """Record that ``stage`` (one of :data:`STAGES`) took ``seconds`` seconds.

    Inside :func:`collect_stages` (same thread) the seconds are added to its dict instead.
    """
    if stage not in STAGES:
        log.warning("metrics_unknown_stage", stage=stage)
        return
    acc: dict[str, float] | None = getattr(_collecting, "acc", None)
    if acc is not None:
        acc[stage] = acc.get(stage, 0.0) + max(0.0, seconds)
        return
    STAGE_SECONDS.labels(stage=stage).observe(max(0.0, seconds))


def observe_stages(seconds_by_stage: dict[str, float]) -> None:
    """:func:`observe_stage` for each ``stage → seconds`` item (one sample each)."""
    for stage, seconds in seconds_by_stage.items():
        observe_stage(stage, seconds)


@contextmanager
def collect_stages() -> Iterator[dict[str, float]]:
    """Add up this thread's :func:`observe_stage` calls in the yielded dict (seconds).

    Lets a caller combine one job's stage parts (e.g. export = building in the pipeline +
    writing in the worker) into one sample per stage with :func:`observe_stages`.
    """
    previous = getattr(_collecting, "acc", None)
    acc: dict[str, float] = {}
    _collecting.acc = acc
    try:
        yield acc
    finally:
        _collecting.acc = previous


@contextmanager
def time_stage(stage: str) -> Iterator[None]:
    """Context manager timing its body into the ``stage`` histogram (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe_stage(stage, time.perf_counter() - start)


def record_dispatch_failure(destination: str) -> None:
    """Count one failed delivery attempt to ``destination`` (its name in the config)."""
    DISPATCH_FAILURES.labels(destination=destination).inc()


def record_stage_failure(stage: str) -> None:
    """Count one item ``stage`` (``routing``, ``job``, ...) put in its failed state."""
    STAGE_FAILURES.labels(stage=stage).inc()


class NodeStateCollector(Collector):
    """Scrape-time gauges read from the node's database and spool folder.

    * ``omnimri_jobs{state,pipeline}``: rows of the ``jobs`` table (when it exists).
    * ``omnimri_spool_disk_bytes{kind=total|used|free}``: the file system holding the spool.
    * ``omnimri_series_routing_failed``: completion events the router could not route.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.database: DatabaseTarget | None = None
        self.spool: Path | None = None

    def bind(self, database: DatabaseTarget | None, spool: Path | None) -> None:
        """Point the collector at a node database and spool folder (``None`` to unbind)."""
        with self._lock:
            self.database, self.spool = database, spool

    def describe(self) -> Iterable[Metric]:
        """Nothing to pre-describe: families depend on what exists at scrape time."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Build the gauges now (called on each scrape)."""
        with self._lock:
            database, spool = self.database, self.spool
        jobs = GaugeMetricFamily(
            "omnimri_jobs", "Jobs in the queue by state and pipeline.",
            labels=["state", "pipeline"],
        )
        for (state, pipeline), n in sorted(job_counts(database).items()):
            jobs.add_metric([state, pipeline], n)
        yield jobs
        disk = GaugeMetricFamily(
            "omnimri_spool_disk_bytes", "File system of the spool, bytes.", labels=["kind"]
        )
        usage = spool_disk_usage(spool)
        if usage is not None:
            for kind, value in usage.items():
                disk.add_metric([kind], value)
        yield disk
        failed = routing_failed_count(database)
        if failed is not None:
            yield GaugeMetricFamily(
                "omnimri_series_routing_failed",
                "Series completions the router could not route (failed state, see series show).",
                value=failed)


@contextmanager
def _read_only(database: DatabaseTarget | None) -> Iterator[Any]:
    """A short-lived read-only connection to the node database, or ``None`` when absent.

    SQLite is opened ``mode=ro`` (never creates the file); PostgreSQL through
    :class:`~dicom_node.db.PgConnection` (connect timeout ``PG_CONNECT_TIMEOUT_S``).
    """
    if database is None:
        yield None
        return
    conn: Any = None
    try:
        if is_postgres(database):
            conn = PgConnection(str(database))
        elif Path(database).exists():
            conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2.0)
    except db_errors() as err:
        log.warning("metrics_database_unreachable", error=type(err).__name__)
        conn = None
    try:
        yield conn
    finally:
        if conn is not None:
            conn.close()


def routing_failed_count(database: DatabaseTarget | None) -> int | None:
    """Completion events in the failed state; ``None`` when the database or column is absent."""
    with _read_only(database) as conn:
        if conn is None:
            return None
        try:
            if "failed_at" not in table_columns(conn, "series_events"):
                return None
            return int(conn.execute("SELECT COUNT(*) FROM series_events WHERE routed_at IS NULL"
                                    " AND failed_at IS NOT NULL").fetchone()[0])
        except db_errors() as err:
            log.warning("metrics_events_unreadable", error=str(err))
            return None


def job_counts(database: DatabaseTarget | None) -> dict[tuple[str, str], int]:
    """``{(state, pipeline): count}`` from the ``jobs`` table; empty when it does not exist.

    The column holding the state may be called ``state`` or ``status``.
    """
    with _read_only(database) as conn:
        if conn is None:
            return {}
        try:
            cols = table_columns(conn, "jobs")
            state_col = "state" if "state" in cols else "status" if "status" in cols else None
            if state_col is None:
                return {}
            pipe_expr = "pipeline" if "pipeline" in cols else "''"
            rows = conn.execute(
                f"SELECT {state_col}, {pipe_expr}, COUNT(*) FROM jobs GROUP BY 1, 2"  # noqa: S608
            ).fetchall()
            return {(str(st), str(p or "")): int(n) for st, p, n in rows}
        except db_errors() as err:
            log.warning("metrics_jobs_unreadable", error=str(err))
            return {}


def spool_disk_usage(spool: Path | None) -> dict[str, int] | None:
    """``{"total", "used", "free"}`` bytes of the file system holding ``spool`` (or its parent)."""
    if spool is None:
        return None
    p = Path(spool)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        u = shutil.disk_usage(p)
    except OSError:
        return None
    return {"total": u.total, "used": u.used, "free": u.free}


NODE_STATE: Final = NodeStateCollector()
"""The scrape-time collector; point it at a node with :func:`bind_node`."""
REGISTRY.register(NODE_STATE)


def bind_node(settings: NodeSettings) -> None:
    """Read jobs and spool disk usage of this node's database and spool on each scrape."""
    NODE_STATE.bind(settings.storage.database_path, settings.storage.path)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of :data:`REGISTRY` and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample (``0.0`` when absent); handy for tests and status pages."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)
