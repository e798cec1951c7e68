"""The router: turns durable "series complete" events into jobs, using the rules.

For each pending completion event (oldest first) the router loads the series revision,
evaluates the rule set on its attributes, and for every fired rule enqueues one job per
pipeline. The jobs and the "event routed" mark are written in ONE transaction, so a crash
never loses an event nor routes it twice (enqueueing is idempotent anyway); with several nodes
on one PostgreSQL database each router may read an event, but the conditional "routed" update
lets one of them enqueue.

* ``trigger: series`` rules enqueue for the completed series.
* ``trigger: study`` rules check :meth:`RuleSet.study_ready` over every complete series of the
  study; when ready they enqueue for the series that matched the required-series conditions
  (a later completion re-checks; jobs already there are not duplicated). A series completing
  more than ``study_timeout_s`` after the study's first complete series no longer fires the
  rule (logged once per such completion: the study rule gave up).
* The destination ``sender`` is resolved to the configured ``dimse`` destination whose AE title
  is the calling AE of the series (preferring one whose host is the sender's address); without
  one the job goes to its other destinations and a clear error is logged.
* When two rules send the same series to the same pipeline, one job carries the union of their
  destinations and the most urgent priority.
* A completion event that cannot be routed (its files unreadable, or anything raising while
  its attributes are read or the rules evaluated) goes to the *failed* state with its reason
  (``series show``, the admin API, ``omnimri_series_routing_failed``, a ``rule_decision`` audit
  line with ``error``) and the next event is routed at once; it is not retried (also not after
  a restart) until ``SeriesIndex.retry_failed`` or a rules reload. Only database errors
  (locked, disk full: they would hit every event alike) leave the event pending for the next
  poll.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dicom_node import metrics
from dicom_node.audit import get_audit
from dicom_node.config import DimseDestination, NodeSettings, RuleConfig
from dicom_node.db import db_errors
from dicom_node.index import CompletionEvent, SeriesIndex
from dicom_node.jobs import PRIORITY_RANK, JobQueue, NewJob
from dicom_node.logs import get_logger, scrub_text
from dicom_node.rules import RuleSet, SeriesAttributes, SeriesReadError, attributes_for_series
from dicom_node.series import Series

log = get_logger(__name__)

SENDER = "sender"
"""Destination name meaning "back to the AE that sent the series"."""


def resolve_sender(series: Series, settings: NodeSettings) -> str | None:
    """The destination name that reaches the sender of ``series``, or ``None``.

    A ``dimse`` destination whose ``ae_title`` equals the calling AE; one whose host is also
    the sender's address wins over others.
    """
    calling = series.calling_ae.strip()
    if not calling:
        return None
    candidates = [
        (name, d) for name, d in settings.destinations.items()
        if isinstance(d, DimseDestination) and d.ae_title == calling
    ]
    if not candidates:
        return None
    same_host = [name for name, d in candidates if d.host == series.peer_host]
    return same_host[0] if same_host else candidates[0][0]


class Router:
    """Consumes completion events and enqueues jobs (a node service: ``start``/``stop``).

    Args:
        settings: The node configuration (rules, destinations, poll interval).
        queue: The job queue; default one on ``storage.database_path``.
        index: The series index; default one on ``storage.database_path``.
        on_enqueued: Called after new jobs were committed (e.g. ``WorkerPool.wake``).
    """

    def __init__(
        self,
        settings: NodeSettings,
        queue: JobQueue | None = None,
        index: SeriesIndex | None = None,
        on_enqueued: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.rules = RuleSet(settings.rules)
        self.queue = queue or JobQueue(settings)
        self.index = index or SeriesIndex(settings.storage.database_path)
        self.on_enqueued = on_enqueued
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Route what is pending, then keep polling for new events on a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="router", daemon=True)
        self._thread.start()
        log.info("router started", rules=len(self.rules))

    def stop(self) -> None:
        """Stop polling (an event being routed finishes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None
        log.info("router stopped")

    def wake(self) -> None:
        """Look for events now instead of at the next poll (the tracker may call this)."""
        self._wake.set()

    def apply_settings(self, settings: NodeSettings) -> None:
        """Route with a reloaded configuration from the next event on."""
        rules = RuleSet(settings.rules)
        with self._lock:
            self.settings = settings
            self.rules = rules
        log.info("router rules replaced", rules=len(rules))
        retried = self.index.retry_failed()
        if retried:
            log.info("failed completion events retried under the new rules", events=retried)
            self.wake()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.route_pending()
            except Exception:  # noqa: BLE001 - database trouble: log and poll again
                log.exception("routing failed; retrying at the next poll")
            self._wake.wait(self.settings.completion.poll_interval_s)
            self._wake.clear()

    # -- routing ----------------------------------------------------------------------------

    def route_pending(self) -> int:
        """Route every pending completion event; returns how many new jobs were queued."""
        created = 0
        for event in self.index.pending_events():
            if self._stop.is_set():
                break
            try:
                created += self.route_event(event)
            except db_errors():
                raise  # the database, not the event: every event would fail; poll again
            except Exception as exc:  # noqa: BLE001 - isolate the event, route the next one
                self._fail(event, exc)
        return created

    def _fail(self, event: CompletionEvent, exc: BaseException) -> None:
        """Put an event that cannot be routed in the failed state (visible, not retried)."""
        reason = failure_reason(exc)
        self.index.mark_failed(event.event_id, reason)
        metrics.record_stage_failure("routing")
        log.error("completion event cannot be routed; marked failed", event_id=event.event_id,
                  series_uid=event.series_instance_uid, revision=event.revision,
                  error=reason)
        try:
            get_audit().rule_decision(
                series_uid=event.series_instance_uid, revision=event.revision, matched=[],
                discarded=False, pipelines=[], destinations=[], jobs=[], error=reason)
        except OSError as err:
            log.error("audit write failed", error=str(err))

    def route_event(self, event: CompletionEvent) -> int:
        """Route one completion event (jobs + routed mark in one transaction).

        Returns:
            How many new jobs were queued.
        """
        with self._lock:
            settings, rules = self.settings, self.rules
        try:
            series = self.index.load_series(event.series_instance_uid, event.revision)
        except KeyError as exc:  # purged meanwhile: nothing left to route
            log.error("completion event has no series; skipped", event_id=event.event_id,
                      series_uid=event.series_instance_uid, revision=event.revision,
                      error=failure_reason(exc))
            self.index.mark_routed(event.event_id)
            return 0
        attrs = attributes_for_series(series)  # SeriesReadError etc.: the caller fails it
        decision = rules.evaluate(attrs)
        new_jobs: list[NewJob] = []
        if not decision.discarded:
            for rule in decision.series_rules:
                new_jobs += self._jobs_for(rule, series, event, settings)
            for rule in decision.study_rules:
                new_jobs += self._study_jobs(rule, series, attrs, event, settings, rules)
        merged = _merge(new_jobs)
        created_ids: list[str] = []
        try:
            with self.queue.transaction() as conn:
                # The routed mark first: with several nodes on one PostgreSQL database, the
                # one whose conditional update wins enqueues; the other waits, then rolls back.
                if not self.index.mark_routed(event.event_id, conn):
                    raise _RoutedElsewhere
                for job in merged:
                    jid, created = self.queue.enqueue(job, conn)
                    if created:
                        created_ids.append(jid)
        except _RoutedElsewhere:
            log.info("completion event routed by another node", event_id=event.event_id,
                     series_key=series.key)
            return 0
        log.info(
            "series routed", event_id=event.event_id, series_key=series.key,
            fired=[r.name for r in decision.fired], discarded=decision.discarded,
            jobs=len(merged), new_jobs=len(created_ids),
        )
        try:
            get_audit().rule_decision(
                series_uid=series.series_instance_uid, revision=series.revision,
                matched=[r.name for r in decision.fired], discarded=decision.discarded,
                pipelines=sorted({j.pipeline for j in merged}),
                destinations=sorted({d for j in merged for d in j.destinations}),
                jobs=created_ids,
            )
        except OSError as exc:
            log.error("audit write failed", error=str(exc))
        if created_ids and self.on_enqueued is not None:
            self.on_enqueued()
        return len(created_ids)

    def _destinations(self, rule: RuleConfig, series: Series,
                      settings: NodeSettings) -> tuple[str, ...]:
        out: list[str] = []
        for name in rule.destinations:
            if name == SENDER:
                resolved = resolve_sender(series, settings)
                if resolved is None:
                    log.error(
                        "rule sends to 'sender' but no dimse destination has the sender's"
                        " AE title; add one under destinations (ae_title, host, port)",
                        rule=rule.name, calling_ae=series.calling_ae,
                        sender_host=series.peer_host, series_key=series.key,
                    )
                    continue
                name = resolved
            if name not in out:
                out.append(name)
        return tuple(out)

    def _jobs_for(self, rule: RuleConfig, series: Series, event: CompletionEvent,
                  settings: NodeSettings) -> list[NewJob]:
        dests = self._destinations(rule, series, settings)
        return [
            NewJob(series, p, dests, rule.name, rule.priority, str(event.event_id))
            for p in rule.pipelines
        ]

    def _study_jobs(self, rule: RuleConfig, series: Series, attrs: SeriesAttributes,
                    event: CompletionEvent, settings: NodeSettings,
                    rules: RuleSet) -> list[NewJob]:
        in_study = self.index.series_in_study(series.study_instance_uid)
        if series.key not in {s.key for s in in_study}:
            in_study.append(series)
        attrs_of: dict[str, SeriesAttributes] = {}
        for s in in_study:
            try:
                attrs_of[s.series_instance_uid] = (
                    attrs if s.key == series.key else attributes_for_series(s)
                )
            except (SeriesReadError, OSError) as exc:
                log.warning("series of the study unreadable for the study rule",
                            rule=rule.name, series_uid=s.series_instance_uid, error=str(exc))
        first_done = min(s.completed_at for s in in_study)
        waited_s = (series.completed_at - first_done).total_seconds()
        check = rules.study_ready(rule, list(attrs_of.values()))
        if not check.ready and waited_s > rule.study_timeout_s:
            log.warning("study rule gave up: required series missing after the study timeout",
                        rule=rule.name, study_uid=series.study_instance_uid,
                        missing=check.missing, waited_s=round(waited_s, 1),
                        study_timeout_s=rule.study_timeout_s)
            return []
        if check.ready and waited_s > rule.study_timeout_s:
            log.warning("study rule: required series arrived after the study timeout; not run",
                        rule=rule.name, study_uid=series.study_instance_uid,
                        waited_s=round(waited_s, 1))
            return []
        if not check.ready:
            log.info("study rule waiting for series", rule=rule.name,
                     study_uid=series.study_instance_uid, missing=check.missing)
            return []
        wanted = {uid for uids in check.matched.values() for uid in uids}
        if not wanted:
            wanted = {series.series_instance_uid}
        jobs: list[NewJob] = []
        for s in in_study:
            if s.series_instance_uid in wanted:
                jobs += self._jobs_for(rule, s, event, settings)
        log.info("study rule ready", rule=rule.name, study_uid=series.study_instance_uid,
                 series=len(wanted))
        return jobs


class _RoutedElsewhere(Exception):
    """Another node sharing the database routed this event first (its transaction rolls back)."""


MAX_REASON_CHARS = 300
"""Longest failure reason kept (characters)."""


def failure_reason(exc: BaseException) -> str:
    """``Type: message`` of an exception, scrubbed of patient-like values and shortened."""
    text = scrub_text(str(exc))
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason[:MAX_REASON_CHARS]


def _merge(jobs: list[NewJob]) -> list[NewJob]:
    """One job per (series revision, pipeline): union of destinations, most urgent priority."""
    merged: dict[tuple[str, str], NewJob] = {}
    for j in jobs:
        key = (j.series.key, j.pipeline)
        prev = merged.get(key)
        if prev is None:
            merged[key] = j
            continue
        dests = prev.destinations + tuple(d for d in j.destinations if d not in prev.destinations)
        priority = min(prev.priority, j.priority, key=lambda p: PRIORITY_RANK[p])
        rule = prev.rule if j.rule in prev.rule.split(",") else f"{prev.rule},{j.rule}"
        merged[key] = NewJob(prev.series, prev.pipeline, dests, rule, priority, prev.event_id)
    return list(merged.values())
