"""What the admin API does, independent of HTTP: one object over the node's parts.

:class:`AdminBackend` reads the series index (:class:`dicom_node.index.SeriesIndex`), the job
queue (:class:`dicom_node.jobs.JobQueue`), the rules (:mod:`dicom_node.rules`) and the
destinations of the configuration; every change it makes is written to the audit log with the
caller's token id. Errors are :class:`AdminError` with an HTTP status and a precise message.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dicom_node import metrics
from dicom_node.admin.auth import Principal
from dicom_node.admin.thumbnails import MAX_SIZE_PX, ThumbnailCache, ThumbnailError
from dicom_node.audit import AuditLog, is_phi_field
from dicom_node.config import (
    ConfigError,
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    NodeSettings,
    OrthancDestination,
    RuleConfig,
    parse_config,
)
from dicom_node.config_edit import ConfigEditError, replace_rules
from dicom_node.logs import get_logger

log = get_logger("admin")

HIDDEN = "<hidden>"
"""What a viewer sees instead of a patient-identifying value."""

RulesHook = Callable[[NodeSettings], None]
"""Called with the new settings after rules were applied (the router reloads its RuleSet)."""


class AdminError(Exception):
    """A request the backend refuses: ``status`` is the HTTP status, ``str(err)`` the reason."""

    def __init__(self, status: int, message: str, problems: list[dict[str, str]] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems or []


def scrub_for(who: Principal | None, obj: Any) -> Any:
    """Remove patient-identifying data for a viewer (admins get ``obj`` unchanged).

    Keys named like patient data are dropped; a rule trace node reading such an attribute
    keeps its result but its ``values`` become ``["<hidden>"]``.
    """
    if who is not None and who.is_admin:
        return obj
    return _scrub(obj)


def _scrub(obj: Any) -> Any:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        phi_attr = isinstance(obj.get("attribute"), str) and is_phi_field(obj["attribute"])
        for k, v in obj.items():
            if is_phi_field(str(k)):
                continue
            if phi_attr and k == "values" and v is not None:
                out[k] = [HIDDEN]
                continue
            out[k] = _scrub(v)
        return out
    if isinstance(obj, list | tuple):
        return [_scrub(v) for v in obj]
    return obj


@dataclass(frozen=True, slots=True)
class RulesDraft:
    """A validated draft: the rules and the settings they would produce."""

    rules: list[RuleConfig]
    settings: NodeSettings


class AdminBackend:
    """The admin API's view of one node.

    Args:
        settings: The loaded configuration (its ``rules`` are replaced by :meth:`apply_rules`).
        config_path: The ``config.yaml`` that :meth:`apply_rules` rewrites; ``None`` keeps
            applied rules in memory only.
        audit: Where admin actions are recorded; default ``AuditLog(settings.audit.path)``.
        ready_check: Extra readiness probe (the runtime's "listener is serving"); returns
            ``(ok, detail)``.
    """

    def __init__(self, settings: NodeSettings, *, config_path: Path | None = None,
                 audit: AuditLog | None = None,
                 ready_check: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.audit = audit if audit is not None else AuditLog(settings.audit.path)
        self.ready_check = ready_check
        self.rules_hooks: list[RulesHook] = []
        self.thumbnails = ThumbnailCache()
        self.started_at = time.time()
        self._lock = threading.RLock()
        self._index: Any = None
        self._queue: Any = None
        metrics.bind_node(settings)

    # -- the node's parts, opened lazily ---------------------------------------------------

    @property
    def index(self) -> Any:
        """The :class:`~dicom_node.index.SeriesIndex` over the node database."""
        with self._lock:
            if self._index is None:
                from dicom_node.index import SeriesIndex

                self._index = SeriesIndex(self.settings.storage.database_path)
            return self._index

    @property
    def queue(self) -> Any:
        """The :class:`~dicom_node.jobs.JobQueue` over the node database."""
        with self._lock:
            if self._queue is None:
                from dicom_node.jobs import JobQueue

                self._queue = JobQueue(self.settings)
            return self._queue

    def close(self) -> None:
        """Close the database connections this backend opened."""
        with self._lock:
            if self._queue is not None:
                self._queue.close()
                self._queue = None
            if self._index is not None:
                self._index.close()
                self._index = None

    def _audit(self, who: Principal, action: str, target: str | None, status: str = "ok",
               **extra: Any) -> None:
        try:
            self.audit.admin_action(token_id=who.token_id, action=action, target=target,
                                    status=status, role=who.role, **extra)
        except OSError as err:
            log.error("audit_write_failed", action=action, error=str(err))

    # -- health and status -----------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Whether the node can take work: database, spool folder, and the runtime's probe."""
        checks: dict[str, str] = {}
        ok = True
        try:
            self.index.conn.execute("SELECT 1").fetchone()
            checks["database"] = "ok"
        except Exception as err:  # any sqlite/OS failure means not ready
            ok, checks["database"] = False, f"unavailable: {type(err).__name__}"
        spool = self.settings.storage.path
        if spool.is_dir() and os.access(spool, os.W_OK):
            checks["spool"] = "ok"
        else:
            ok, checks["spool"] = False, f"not a writable folder: {spool}"
        if self.ready_check is not None:
            rok, detail = self.ready_check()
            ok = ok and rok
            checks["listener"] = detail
        return ok, checks

    def status(self) -> dict[str, Any]:
        """Node status: AE title and ports, associations, queue depth by state, spool disk."""
        node = self.settings.node
        usage = metrics.spool_disk_usage(self.settings.storage.path) or {}
        counts: dict[str, int] = dict(self.queue.counts())
        return {
            "ae_title": node.ae_title,
            "aliases": list(node.aliases),
            "dicom_port": node.port,
            "tls": {"enabled": node.tls.enabled, "port": node.tls.port,
                    "required": node.tls.required, "verify_client": node.tls.verify_client},
            "uptime_s": round(time.time() - self.started_at, 1),
            "associations": {
                "active": int(metrics.sample("omnimri_associations_active")),
                **{r: int(metrics.sample("omnimri_associations_total", {"result": r}))
                   for r in metrics.ASSOCIATION_RESULTS},
            },
            "instances_received": int(metrics.sample("omnimri_instances_received_total")),
            "queue": {
                "by_state": counts,
                "depth": sum(counts.get(s, 0) for s in ("queued", "running", "exporting",
                                                         "dispatching")),
            },
            "disk": {
                "spool": str(self.settings.storage.path),
                "total_bytes": usage.get("total"),
                "free_bytes": usage.get("free"),
                "used_bytes": usage.get("used"),
                "min_free_bytes": self.settings.storage.min_free_bytes,
            },
        }

    # -- series ----------------------------------------------------------------------------

    def list_series(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently active series (index rows; no patient data is indexed)."""
        rows: list[dict[str, Any]] = self.index.list_series(limit=limit)
        return rows

    def get_series(self, series_uid: str) -> dict[str, Any]:
        """One series with its completion events and its jobs.

        Raises:
            AdminError: 404 when the series is unknown.
        """
        row: dict[str, Any] | None = self.index.get_series(series_uid)
        if row is None:
            raise AdminError(404, f"no series {series_uid}")
        row["jobs"] = [j.summary() for j in self._jobs_of_series(series_uid)]
        return row

    def _jobs_of_series(self, series_uid: str) -> list[Any]:
        q = self.queue
        with q._lock:
            ids = [r[0] for r in q.conn.execute(
                "SELECT id FROM jobs WHERE series_uid = ? ORDER BY created_at", (series_uid,))]
        return [q.get(i) for i in ids]

    def latest_series(self, series_uid: str) -> Any:
        """The latest complete revision of a series (:class:`~dicom_node.series.Series`).

        Raises:
            AdminError: 404 unknown series; 409 when no revision is complete yet.
        """
        row = self.index.get_series(series_uid)
        if row is None:
            raise AdminError(404, f"no series {series_uid}")
        events = row.get("events") or []
        if not events:
            raise AdminError(409, f"series {series_uid} is still receiving (no complete revision)")
        revision = max(int(e["revision"]) for e in events)
        return self.index.load_series(series_uid, revision)

    def thumbnail(self, series_uid: str, size: int = MAX_SIZE_PX) -> bytes:
        """A PNG of the middle slice of the series (latest instances, any revision).

        Raises:
            AdminError: 404 unknown series; 422 when no pixel data can be shown.
        """
        row = self.index.get_series(series_uid)
        if row is None:
            raise AdminError(404, f"no series {series_uid}")
        instances = self.index.instances_of(series_uid)
        size = max(32, min(int(size), 1024))
        try:
            return self.thumbnails.get(
                instances, (series_uid, int(row["instance_count"]), size))
        except ThumbnailError as err:
            raise AdminError(422, str(err)) from None

    def rerun(self, who: Principal, series_uid: str, pipeline: str,
              destinations: list[str] | None = None, priority: str = "normal") -> dict[str, Any]:
        """Run ``pipeline`` again on the latest complete revision of a series.

        A new job is enqueued; if one for that revision and pipeline exists and is finished,
        it is re-run (same output UIDs, so the PACS replaces rather than duplicates).

        Raises:
            AdminError: 404 unknown series/pipeline/destination; 409 when the job is active.
        """
        from dicom_node.jobs import JobError, NewJob

        if pipeline not in self.settings.pipelines:
            raise AdminError(404, f"no pipeline {pipeline!r} (pipelines: "
                                  f"{', '.join(sorted(self.settings.pipelines)) or 'none'})")
        dests = destinations if destinations is not None else self._default_destinations(pipeline)
        for d in dests:
            if d != "sender" and d not in self.settings.destinations:
                raise AdminError(404, f"no destination {d!r}")
        if priority not in ("urgent", "normal", "low"):
            raise AdminError(422, "priority must be urgent, normal or low")
        series = self.latest_series(series_uid)
        job_id, created = self.queue.enqueue(NewJob(
            series=series, pipeline=pipeline, destinations=tuple(dests),
            rule=f"admin:{who.token_id}", priority=priority,  # type: ignore[arg-type]
        ))
        if not created:
            try:
                self.queue.retry(job_id, rerun=True)
            except JobError as err:
                self._audit(who, "series_rerun", series_uid, status="refused",
                            pipeline=pipeline, job_id=job_id)
                raise AdminError(409, str(err)) from None
        self._audit(who, "series_rerun", series_uid, pipeline=pipeline, job_id=job_id,
                    destinations=dests, new_job=created)
        job: dict[str, Any] = self.queue.get(job_id).summary()
        return job

    def reroute(self, who: Principal, series_uid: str) -> dict[str, Any]:
        """Make the failed completion events of a series pending again; returns the series.

        The router retries them at its next poll.

        Raises:
            AdminError: 404 unknown series; 409 when it has no failed completion.
        """
        if self.index.get_series(series_uid) is None:
            raise AdminError(404, f"no series {series_uid}")
        n = self.index.retry_failed(series_uid)
        if not n:
            self._audit(who, "series_reroute", series_uid, status="refused")
            raise AdminError(409, f"series {series_uid} has no completion in the failed state")
        self._audit(who, "series_reroute", series_uid, events=n)
        return self.get_series(series_uid)

    def _default_destinations(self, pipeline: str) -> list[str]:
        for rule in self.settings.rules:
            if pipeline in rule.pipelines and rule.destinations:
                return list(rule.destinations)
        return []

    # -- jobs ------------------------------------------------------------------------------

    def list_jobs(self, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally in one state."""
        from dicom_node.jobs import STATES

        if state is not None and state not in STATES:
            raise AdminError(422, f"unknown state {state!r}; one of {', '.join(STATES)}")
        return [j.summary() for j in self.queue.list_jobs(state=state, limit=limit)]

    def get_job(self, job_id: str) -> dict[str, Any]:
        """One job with its stored outputs and deliveries."""
        from dicom_node.jobs import JobError

        try:
            job = self.queue.get(job_id)
        except (JobError, KeyError):
            raise AdminError(404, f"no job {job_id}") from None
        out: dict[str, Any] = job.summary()
        out["outputs"] = [{"sop_instance_uid": o.sop_instance_uid,
                           "sop_class_uid": o.sop_class_uid} for o in self.queue.outputs(job_id)]
        out["deliveries"] = self.queue.deliveries(job_id)
        out["instances"] = len(job.series.instances)
        return out

    def retry_job(self, who: Principal, job_id: str, rerun: bool = False) -> dict[str, Any]:
        """Queue a failed/cancelled (or, with ``rerun``, done) job again."""
        return self._job_action(who, "job_retry", job_id,
                                lambda: self.queue.retry(job_id, rerun=rerun), rerun=rerun)

    def cancel_job(self, who: Principal, job_id: str) -> dict[str, Any]:
        """Cancel a job that has not finished."""
        return self._job_action(who, "job_cancel", job_id, lambda: self.queue.cancel(job_id))

    def _job_action(self, who: Principal, action: str, job_id: str, fn: Callable[[], Any],
                    **extra: Any) -> dict[str, Any]:
        from dicom_node.jobs import JobError

        self.get_job(job_id)  # 404 first
        try:
            job = fn()
        except JobError as err:
            self._audit(who, action, job_id, status="refused", **extra)
            raise AdminError(409, str(err)) from None
        self._audit(who, action, job_id, **extra)
        summary: dict[str, Any] = job.summary()
        return summary

    # -- rules -----------------------------------------------------------------------------

    def current_rules(self) -> dict[str, Any]:
        """The rules in force, as a list and as YAML text (what the editor shows)."""
        rules = [r.model_dump(mode="json", exclude_defaults=True) for r in self.settings.rules]
        for r, full in zip(rules, self.settings.rules, strict=True):
            r["name"] = full.name
        return {
            "rules": rules,
            "yaml": yaml.safe_dump(rules, sort_keys=False, allow_unicode=True),
            "pipelines": sorted(self.settings.pipelines),
            "destinations": sorted(self.settings.destinations),
        }

    def parse_draft(self, draft: Any) -> RulesDraft:
        """Validate a draft rule list (a list of mappings or YAML text of one).

        Checks the schema, names, references to pipelines/destinations, and every condition's
        syntax.

        Raises:
            AdminError: 422 with one ``{"key": "rules.N.field", "reason": ...}`` per problem.
        """
        from dicom_node.rules import ConditionSyntaxError, parse_condition

        if isinstance(draft, str):
            try:
                draft = yaml.safe_load(draft) if draft.strip() else []
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise AdminError(422, f"the draft is not valid YAML{where}",
                                 [{"key": "rules", "reason": f"not valid YAML{where}"}]) from None
        if isinstance(draft, dict) and "rules" in draft:
            draft = draft["rules"]
        if draft is None:
            draft = []
        if not isinstance(draft, list):
            raise AdminError(422, "the draft must be a list of rules",
                             [{"key": "rules", "reason": "must be a list of rules"}])
        data = self.settings.model_dump(mode="python")
        data["rules"] = draft
        try:
            new = parse_config(data, Path.cwd(), None)
        except ConfigError as err:
            problems = [{"key": k, "reason": why} for k, why in err.problems]
            raise AdminError(422, "the draft rules are invalid", problems) from None
        problems = []
        for i, rule in enumerate(new.rules):
            for key, text in [("when", rule.when)] + [
                    (f"required_series.{j}", c) for j, c in enumerate(rule.required_series)]:
                try:
                    parse_condition(text)
                except ConditionSyntaxError as err:
                    problems.append({"key": f"rules.{i}.{key}",
                                     "reason": f"{err}\n{err.caret()}"})
        if problems:
            raise AdminError(422, "the draft rules are invalid", problems)
        return RulesDraft(rules=list(new.rules), settings=new)

    def test_rules(self, who: Principal, draft: Any, *, series_uid: str | None = None,
                   dicom_base64: str | None = None) -> dict[str, Any]:
        """Evaluate a draft against a stored series or an uploaded DICOM file.

        Returns the explanation of ``rules explain``: ``decision`` (as ``Decision.to_dict``)
        and ``text`` (as ``Decision.to_text``). Patient data is hidden from viewers.
        """
        from dicom_node.rules import (
            RuleSet,
            SeriesReadError,
            attributes_for_file,
            attributes_for_series,
        )

        parsed = self.parse_draft(draft)
        if (series_uid is None) == (dicom_base64 is None):
            raise AdminError(422, "give exactly one of series_uid or dicom_base64")
        if series_uid is not None:
            series = self.latest_series(series_uid)
            try:
                attrs = attributes_for_series(series)
            except SeriesReadError as err:
                raise AdminError(422, str(err)) from None
        else:
            try:
                raw = base64.b64decode(dicom_base64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise AdminError(422, "dicom_base64 is not valid base64") from None
            with tempfile.TemporaryDirectory(prefix="omnimri-rules-") as tmp:
                p = Path(tmp) / "upload.dcm"
                p.write_bytes(raw)
                try:
                    attrs = attributes_for_file(p)
                except SeriesReadError:
                    raise AdminError(422, "the uploaded file is not readable DICOM") from None
        decision = RuleSet(parsed.rules).evaluate(attrs)
        d = decision.to_dict()
        if series_uid is None:
            d["source"] = "uploaded file"
        text = decision.to_text()
        if not who.is_admin:
            secrets = _phi_values(decision)
            d = _redact(scrub_for(who, d), secrets)
            text = _redact(text, secrets)
        else:
            text = text.replace(attrs.source, "uploaded file") if series_uid is None else text
        return {"decision": d, "text": text}

    def apply_rules(self, who: Principal, draft: Any) -> dict[str, Any]:
        """Make a draft the rules in force: validate, write ``config.yaml``, notify the router.

        The previous file is kept as ``config.yaml.bak``; only the ``rules:`` section of the file
        changes (comments elsewhere, and unchanged rules, are kept as written).
        """
        try:
            parsed = self.parse_draft(draft)
        except AdminError as err:
            self._audit(who, "rules_apply", "rules", status="invalid",
                        problems=len(err.problems))
            raise
        persisted = False
        if self.config_path is not None:
            self._write_rules(parsed.rules)
            persisted = True
        with self._lock:
            self.settings = parsed.settings
        for hook in list(self.rules_hooks):
            try:
                hook(parsed.settings)
            except Exception as err:  # a failing hook must not undo the applied rules
                log.error("rules_hook_failed", error=str(err))
        self._audit(who, "rules_apply", "rules", rules=[r.name for r in parsed.rules],
                    persisted=persisted)
        return {"applied": [r.name for r in parsed.rules], "persisted": persisted,
                "config_path": str(self.config_path) if self.config_path else None}

    def _write_rules(self, rules: list[RuleConfig]) -> None:
        """Write ``rules`` as the ``rules:`` section of ``config.yaml``, atomically.

        Only that section's lines change (round-trip through ruamel.yaml, see
        :mod:`dicom_node.config_edit`): every comment and every other setting stays as written.
        The previous file is kept as ``config.yaml.bak``.

        Raises:
            AdminError: 500 when the file on disk cannot be edited (not YAML, not a mapping).
        """
        assert self.config_path is not None
        path = self.config_path
        before = path.read_text(encoding="utf-8") if path.exists() else ""
        try:
            text = replace_rules(before, rules)
        except ConfigEditError as err:
            raise AdminError(500, f"{path.name} cannot be edited: {err}") from None
        if path.exists():
            shutil.copy2(path, path.with_name(path.name + ".bak"))
        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=str(path.parent))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- destinations ----------------------------------------------------------------------

    def list_destinations(self) -> list[dict[str, Any]]:
        """Configured destinations without secrets (passwords and tokens are never returned)."""
        out: list[dict[str, Any]] = []
        for name, d in sorted(self.settings.destinations.items()):
            row: dict[str, Any] = {"name": name, "kind": d.kind}
            if isinstance(d, DimseDestination):
                row.update(ae_title=d.ae_title, host=d.host, port=d.port, tls=d.tls,
                           target=f"{d.ae_title}@{d.host}:{d.port}")
            elif isinstance(d, DicomwebDestination | OrthancDestination):
                row.update(url=d.url, target=d.url,
                           auth="basic" if d.username else (
                               "bearer" if getattr(d, "bearer_token", None) else "none"))
            elif isinstance(d, FolderDestination):
                row.update(path=str(d.path), target=str(d.path))
            out.append(row)
        return out

    def test_destination(self, who: Principal, name: str) -> dict[str, Any]:
        """Check that a destination answers, with the destination's own ``test()``.

        That is a C-ECHO for ``dimse``, an HTTP request for ``dicomweb``/``orthanc`` and a
        write probe for ``folder``.

        Returns ``{"name", "ok", "detail", "elapsed_ms"}``; the attempt is audited.
        """
        dest = self.settings.destinations.get(name)
        if dest is None:
            raise AdminError(404, f"no destination {name!r}")
        from dicom_node.destinations import DestinationError, make_destination

        t0 = time.perf_counter()
        try:
            detail = make_destination(name, dest, self.settings).test()
            ok = True
        except DestinationError as err:
            ok, detail = False, str(err)
        except Exception as err:  # a broken peer must not break the API
            ok, detail = False, f"{type(err).__name__}: {err}"
        elapsed = round((time.perf_counter() - t0) * 1000, 1)
        self._audit(who, "destination_test", name, status="ok" if ok else "failed")
        return {"name": name, "kind": dest.kind, "ok": ok, "detail": detail,
                "elapsed_ms": elapsed}

    # -- audit -----------------------------------------------------------------------------

    def audit_tail(self, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` audit records (optionally of one event kind), newest last."""
        from collections import deque

        from dicom_node.audit import read_audit

        if self.audit.path is None:
            return []
        return list(deque(read_audit(self.audit.path, event=event), maxlen=limit))


def _phi_values(decision: Any) -> list[str]:
    """The values of patient attributes the rules read, longest first."""
    found = {v for k, vals in decision.attributes.values.items() if is_phi_field(k)
             for v in vals if v and len(v) >= 2}
    return sorted(found, key=len, reverse=True)


def _redact(obj: Any, secrets: list[str]) -> Any:
    """Replace every occurrence of ``secrets`` in the strings of ``obj`` by ``<hidden>``."""
    if isinstance(obj, str):
        for v in secrets:
            obj = obj.replace(v, HIDDEN)
        return obj
    if isinstance(obj, dict):
        return {k: _redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_redact(v, secrets) for v in obj]
    return obj
