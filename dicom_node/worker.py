"""The worker pool: threads that run jobs and deliver their outputs exactly once.

Each worker takes a job from the queue, runs the pipeline, stores the outputs durably and
dispatches them to each destination.

One job, one worker thread::

    claim (lease) ─▶ running: pipeline.run(series, job_id)
                  ─▶ exporting: outputs fsync'd one by one to <spool>/results/<job_id>/ (each
                     handed to the destinations' senders as soon as it is durable), listed in
                     the DB
                  ─▶ dispatching: the senders finish; per destination, record each acknowledged
                     SOP Instance UID, then send what is not yet recorded as delivered
                  ─▶ done

Sending overlaps writing (:class:`_DeliveryStream`: one sender thread per destination, over one
association for ``dimse``), and the PACS stores the first outputs while the next are written
(:func:`write_order`: single-frame objects first, the multi-frame SEG, costliest to encode,
last).
An output is never sent before its file and directory entry are fsync'd, and only to a
destination that has not acknowledged it before (the ``deliveries`` table), so a rerun never
sends it twice.

A pipeline error or an undelivered output is a failed attempt: the job goes back to the queue
with a backoff (and to ``failed`` when its attempts are spent, or, for undelivered outputs,
after ``jobs.dispatch_retry_for_s``); the next attempt resumes where the last one stopped
(stored outputs are not computed again, delivered ones not sent again). A heartbeat thread
renews the leases of the jobs being worked on, so only a dead process loses its jobs. A probe
thread checks the destinations that waiting jobs could not deliver to (``Destination.test``:
C-ECHO, HTTP check) every ``jobs.probe_interval_s`` and makes those jobs due at once when one
answers again, so an hours-long PACS outage ends in delivery within seconds of its end.
"""

from __future__ import annotations

import functools
import os
import queue as queue_mod
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from dicom_node import metrics
from dicom_node.audit import get_audit
from dicom_node.config import NodeSettings
from dicom_node.destinations import (
    DeliveryResult,
    Destination,
    DestinationError,
    destination_for,
    negotiation_key,
    send_stream,
)
from dicom_node.destinations.folder import write_atomic
from dicom_node.jobs import LEASE_S, Job, JobError, JobOutput, JobQueue, LeaseLost, results_dir
from dicom_node.logs import get_logger, scrub_text
from dicom_node.pipelines import Pipeline, PipelineError, get_pipeline
from dicom_node.router import SENDER, resolve_sender

log = get_logger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long :meth:`WorkerPool.stop` waits for busy workers, seconds; a job still running then
is taken again by the next start. Default 10."""


class DispatchIncomplete(Exception):
    """Some outputs were not acknowledged by some destination (the attempt failed).

    Args:
        message: What failed, per destination.
        undelivered: The destinations (configured names) that did not take every output.
    """

    def __init__(self, message: str, undelivered: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.undelivered = tuple(undelivered)


def _run_with_timeout(fn: Callable[[], list[pydicom.Dataset]], timeout_s: float,
                      what: str) -> list[pydicom.Dataset]:
    """Run ``fn`` on a helper thread and wait at most ``timeout_s`` seconds.

    A pipeline that overruns is abandoned (Python cannot kill a thread): the attempt fails and
    the helper thread finishes in the background, its result discarded.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the worker thread
            box["error"] = exc

    t = threading.Thread(target=target, name=f"pipeline-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise PipelineError(f"{what} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


class WorkerPool:
    """``jobs.workers`` threads working the job queue (a node service: ``start``/``stop``).

    Args:
        settings: The node configuration.
        queue: The queue to work; default one on ``storage.database_path``.
    """

    def __init__(self, settings: NodeSettings, queue: JobQueue | None = None) -> None:
        self.settings = settings
        self.queue = queue or JobQueue(settings)
        self._own_queue = queue is None
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._held: dict[str, str] = {}
        """job id → worker thread name, for the heartbeat."""
        self._held_lock = threading.Lock()
        self._pipelines: dict[str, Pipeline] = {}
        self._pipelines_lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Release the jobs of a dead previous process, then start the workers and heartbeat."""
        self._stop.clear()
        self.queue.recover_orphans()
        n = self.settings.jobs.workers
        for k in range(n):
            t = threading.Thread(target=self._work, name=f"job-worker-{k}", daemon=True)
            t.start()
            self._threads.append(t)
        hb = threading.Thread(target=self._heartbeat, name="job-heartbeat", daemon=True)
        hb.start()
        self._threads.append(hb)
        probe = threading.Thread(target=self._probe_loop, name="destination-probe",
                                 daemon=True)
        probe.start()
        self._threads.append(probe)
        log.info("worker pool started", workers=n, queued=self.queue.counts().get("queued", 0))

    def stop(self) -> None:
        """Stop taking jobs; wait up to :data:`STOP_TIMEOUT_S` for the busy ones."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy:
            log.warning("workers still busy at stop; their jobs run again at next start",
                        workers=busy)
        self._threads.clear()
        if self._own_queue and not busy:
            self.queue.close()
        log.info("worker pool stopped")

    def wake(self) -> None:
        """Tell idle workers that a job may be due (the router calls this after enqueueing)."""
        with self._wake:
            self._wake.notify_all()

    def apply_settings(self, settings: NodeSettings) -> None:
        """Use a reloaded configuration for jobs claimed from now on (pipelines, destinations)."""
        with self._pipelines_lock:
            self.settings = settings
            self._pipelines.clear()

    # -- the loop ---------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.claim()
            except Exception:  # noqa: BLE001 - database trouble: log, wait, try again
                log.exception("claiming a job failed")
                job = None
            if job is None:
                with self._wake:
                    self._wake.wait(self.settings.jobs.poll_interval_s)
                continue
            with self._held_lock:
                self._held[job.id] = threading.current_thread().name
            try:
                self.process(job)
            finally:
                with self._held_lock:
                    self._held.pop(job.id, None)

    def _heartbeat(self) -> None:
        interval = LEASE_S / 4
        while not self._stop.wait(interval):
            with self._held_lock:
                held = list(self._held)
            for jid in held:
                try:
                    self.queue.renew(jid)
                except LeaseLost:
                    log.info("job no longer held (cancelled?)", job_id=jid)
                except Exception:  # noqa: BLE001
                    log.exception("lease renewal failed", job_id=jid)

    def _probe_loop(self) -> None:
        down: set[str] = set()
        while not self._stop.wait(self.settings.jobs.probe_interval_s):
            try:
                self.probe_waiting(down)
            except Exception:  # noqa: BLE001 - database trouble: try at the next interval
                log.exception("probing destinations failed")

    def probe_waiting(self, down: set[str] | None = None) -> int:
        """Check each destination that queued jobs wait for; resume them when it is back.

        Jobs are made due when a destination that a probe found not answering answers again
        (a destination that answers its check but refused the outputs is not retried faster
        than the backoff).

        Args:
            down: Names found not answering so far (updated from call to call).

        Returns:
            How many jobs were made due now.
        """
        down = set() if down is None else down
        resumed = 0
        with self._pipelines_lock:
            settings = self.settings
        for name in sorted(self.queue.waiting_destinations()):
            if self._stop.is_set():
                break
            try:
                destination_for(name, settings).test()
            except Exception as exc:  # noqa: BLE001 - any failure means: not yet
                if name not in down:
                    log.info("destination still not answering; jobs keep waiting",
                             destination=name, error=scrub_text(str(exc))[:300])
                    down.add(name)
                continue
            if name not in down:
                continue  # it answered all along: the jobs failed otherwise, keep backing off
            down.discard(name)
            n = self.queue.resume_waiting(name)
            if n:
                resumed += n
                log.info("destination answers again; waiting jobs retried now",
                         destination=name, jobs=n)
        if resumed:
            self.wake()
        return resumed

    # -- one job ----------------------------------------------------------------------------

    def process(self, job: Job) -> None:
        """Take one claimed job as far as it goes; failures are recorded on the job."""
        t0 = time.perf_counter()
        stream: _DeliveryStream | None = None
        try:
            if job.state == "running":
                stream = self._run_pipeline(job)
            outputs = self._stored_outputs(job)
            with metrics.time_stage("dispatch"):
                failed = self._finish_stream(job, stream) if stream is not None else {}
                self._dispatch(job, outputs, failed)
            self.queue.complete(job.id)
            log.info("job finished", job_id=job.id, outputs=len(outputs),
                     seconds=round(time.perf_counter() - t0, 3))
        except LeaseLost as exc:
            log.warning("job dropped by this worker", job_id=job.id, reason=str(exc))
        except PipelineError as exc:
            self._fail(job, f"pipeline {job.pipeline}: {exc}", permanent=exc.permanent)
        except DispatchIncomplete as exc:
            self._fail(job, str(exc), undelivered=exc.undelivered)
        except DestinationError as exc:
            self._fail(job, str(exc), undelivered=job.destinations)
        except Exception as exc:  # noqa: BLE001 - any other error is one failed attempt
            log.exception("job attempt crashed", job_id=job.id)
            self._fail(job, f"{exc.__class__.__name__}: {scrub_text(str(exc))}")
        finally:
            if stream is not None and not stream.finished:
                self._finish_stream(job, stream)  # what was acknowledged is recorded

    def _fail(self, job: Job, error: str, permanent: bool = False,
              undelivered: Sequence[str] | None = None) -> None:
        try:
            state = self.queue.fail(job.id, error, permanent=permanent,
                                    undelivered=undelivered)
        except (LeaseLost, JobError) as exc:
            log.warning("could not record the failure", job_id=job.id, reason=str(exc))
            return
        if state == "failed":
            metrics.record_stage_failure("dispatch" if undelivered is not None else "job")

    def _pipeline(self, name: str) -> Pipeline:
        with self._pipelines_lock:
            p = self._pipelines.get(name)
            if p is None:
                cfg = self.settings.pipelines.get(name)
                if cfg is None:
                    err = PipelineError(f"no pipeline {name!r} is configured")
                    err.permanent = True
                    raise err
                p = get_pipeline(name, cfg, self.settings)
                self._pipelines[name] = p
            return p

    def _run_pipeline(self, job: Job) -> _DeliveryStream | None:
        """Run the pipeline, write its outputs durably and list them on the job.

        Returns:
            The delivery stream that sends the outputs while they are written (still
            sending: :meth:`_finish_stream` waits for it), ``None`` if nothing is to be sent.
        """
        pipeline = self._pipeline(job.pipeline)
        cfg = self.settings.pipelines[job.pipeline]
        series = job.series
        # The pipeline records its own stages (volume, inference, export = building the
        # objects) via metrics.observe_stage on its helper thread; they are collected there and
        # observed here once per stage, the spool writing added to export.
        stages: dict[str, float] = {}

        def run() -> list[pydicom.Dataset]:
            with metrics.collect_stages() as acc:
                try:
                    return pipeline.run(series, job.id)
                finally:
                    stages.update(acc)

        stream: _DeliveryStream | None = None
        try:
            datasets = write_order(
                _run_with_timeout(run, cfg.timeout_s, f"pipeline {job.pipeline}"))
            self.queue.set_state(job.id, "exporting")
            t0 = time.perf_counter()
            uids = _output_uids(datasets)
            stream = self._open_stream(job, datasets, uids)
            outputs = self._write_outputs(job, datasets,
                                          on_durable=stream.put if stream else None)
            stages["export"] = stages.get("export", 0.0) + time.perf_counter() - t0
            self.queue.store_outputs(job.id, outputs)
        except BaseException:
            if stream is not None:
                self._finish_stream(job, stream)  # record what was acknowledged, then fail
            raise
        finally:
            metrics.observe_stages(dict(stages))
        log.info("job outputs stored", job_id=job.id, outputs=len(outputs))
        for out in outputs:
            _audit("output_produced", job_id=job.id, series_uid=job.series_uid,
                   kind=output_kind(out.sop_class_uid),
                   sop_instance_uid=out.sop_instance_uid, sop_class_uid=out.sop_class_uid)
        return stream

    def _write_outputs(self, job: Job, datasets: Sequence[pydicom.Dataset],
                       on_durable: Callable[[JobOutput], None] | None = None
                       ) -> list[JobOutput]:
        """Write (fsync) each output to ``<spool>/results/<job_id>/<SOPInstanceUID>.dcm``.

        ``on_durable`` gets each output once its file and directory entry are fsync'd.
        """
        seen = set(_output_uids(datasets))
        folder = results_dir(self.settings) / job.id
        folder.mkdir(parents=True, exist_ok=True)
        outputs: list[JobOutput] = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            path = folder / f"{uid}.dcm"
            write_atomic(ds, path)
            out = JobOutput(uid, str(ds.SOPClassUID), path)
            outputs.append(out)
            if on_durable is not None:
                on_durable(out)
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in {f"{u}.dcm" for u in seen}:
                stale.unlink()
        return outputs

    def _stored_outputs(self, job: Job) -> list[JobOutput]:
        outputs = self.queue.outputs(job.id)
        missing = [o for o in outputs if not o.path.exists()]
        if missing:
            self.queue.forget_outputs(job.id)
            raise PipelineError(
                f"{len(missing)} stored output file(s) vanished; the pipeline runs again"
            )
        return outputs

    def _target(self, job: Job, name: str) -> str:
        """The configured destination a job's destination name means (resolves the sender).

        Raises:
            DestinationError: ``sender`` and no dimse destination has the sender's AE title.
        """
        if name != SENDER:
            return name
        target = resolve_sender(job.series, self.settings) or ""  # enqueued unresolved
        if not target:
            raise DestinationError(
                f"no dimse destination has the sender's AE title {job.series.calling_ae!r}"
            )
        return target

    def _settle(self, job: Job, name: str, target: str, todo: int,
                results: Sequence[DeliveryResult] | None, error: BaseException | None
                ) -> str | None:
        """Record one destination's answers (deliveries, audit, metrics); the problem or None.

        Args:
            job: The job.
            name: The job's destination name.
            target: The configured destination it resolved to.
            todo: How many outputs were to be sent to it.
            results: Its answers (``None`` when ``error`` says why nothing was sent).
            error: Why nothing was sent.
        """
        if results is None:
            metrics.record_dispatch_failure(name)
            why = (str(error) if isinstance(error, DestinationError)
                   else f"destination {name}: {error.__class__.__name__}: "
                        f"{scrub_text(str(error))}")
            _audit("delivery", job_id=job.id, destination=name, status="failed",
                   instances=0, error=why)
            return why
        ok = [r.sop_instance_uid for r in results if r.ok]
        self.queue.record_deliveries(job.id, name, ok)
        failed = [r for r in results if not r.ok]
        _audit("delivery", job_id=job.id, destination=name,
               status="failed" if failed else "ok", instances=len(ok),
               sop_instance_uids=ok, failed=len(failed))
        if failed or len(results) < todo:
            metrics.record_dispatch_failure(name)
            return (f"destination {name}: {todo - len(ok)} of {todo} not delivered"
                    f" ({failed[0].detail if failed else 'no answer'})")
        log.info("job outputs delivered", job_id=job.id, destination=name, count=len(ok))
        return None

    def _open_stream(self, job: Job, datasets: Sequence[pydicom.Dataset], uids: Sequence[str]
                     ) -> _DeliveryStream | None:
        """Start one sender per destination that has outputs to take (``None``: none has)."""
        classes = sorted({negotiation_key(ds) for ds in datasets})
        lanes: list[_Lane] = []
        try:
            for name in job.destinations:
                done = self.queue.delivered(job.id, name)
                want = [u for u in uids if u not in done]
                if not want:
                    continue
                lane = _Lane(name, frozenset(want))
                try:
                    lane.target = self._target(job, name)
                    dest = destination_for(lane.target, self.settings)
                except DestinationError as exc:
                    lane.error = exc
                    lanes.append(lane)
                    continue
                record = functools.partial(self.queue.record_deliveries, job.id, name)
                lane.thread = threading.Thread(
                    target=lane.run, args=(dest, classes, record), daemon=True,
                    name=f"send-{threading.current_thread().name}-{len(lanes)}")
                lane.thread.start()
                lanes.append(lane)
        except BaseException:
            _DeliveryStream(lanes).finish()  # senders already started end (nothing was sent)
            raise
        return _DeliveryStream(lanes) if lanes else None

    def _finish_stream(self, job: Job, stream: _DeliveryStream) -> dict[str, tuple[str, str]]:
        """Wait for the senders and record their answers.

        Returns:
            Destination name → (configured destination, problem) for each that did not take
            every output it was sent (the attempt fails for them; not sent again now).
        """
        failed: dict[str, tuple[str, str]] = {}
        for lane in stream.finish():
            problem = self._settle(job, lane.name, lane.target or lane.name, len(lane.sent),
                                   lane.results, lane.error)
            if problem is not None:
                failed[lane.name] = (lane.target or lane.name, problem)
        return failed

    def _dispatch(self, job: Job, outputs: Sequence[JobOutput],
                  failed: dict[str, tuple[str, str]] | None = None) -> None:
        """Send each destination what it has not acknowledged; raise if any did not take all.

        Args:
            job: The job.
            outputs: Its stored outputs.
            failed: Destinations whose stream already failed in this attempt
                (:meth:`_finish_stream`): not tried again now, reported.
        """
        problems: list[str] = []
        undelivered: list[str] = []
        for name in job.destinations:
            if failed and name in failed:
                undelivered.append(failed[name][0])
                problems.append(failed[name][1])
                continue
            done = self.queue.delivered(job.id, name)
            todo = [o for o in outputs if o.sop_instance_uid not in done]
            if not todo:
                continue
            target = name
            results: list[DeliveryResult] | None = None
            error: DestinationError | None = None
            try:
                target = self._target(job, name)
                results = destination_for(target, self.settings).send([o.path for o in todo])
            except DestinationError as exc:
                error = exc
            problem = self._settle(job, name, target, len(todo), results, error)
            if problem is not None:
                undelivered.append(target or name)
                problems.append(problem)
        if problems:
            raise DispatchIncomplete("; ".join(problems), undelivered)


def write_order(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The outputs in the order they are written and sent: fewest frames first (stable).

    Writing and sending overlap (:class:`_DeliveryStream`), so the PACS should be busy with
    cheap-to-write objects while the costly one is encoded: pydicom's writer spends its time
    per data element, and a multi-frame object's per-frame functional groups grow with its
    frames (on the 189-slice brain the 1134-frame SEG takes ~0.46 s CPU to encode, a
    secondary capture ~0.004 s). Single-frame objects keep the pipeline's order.
    """
    return sorted(datasets, key=lambda ds: int(ds.get("NumberOfFrames", 1) or 1))


def _output_uids(datasets: Sequence[pydicom.Dataset]) -> list[str]:
    """The outputs' SOP Instance UIDs, in order.

    Raises:
        PipelineError: An output has none, or two share one (checked before anything is
            written or sent).
    """
    uids: list[str] = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid or uid in uids:
            raise PipelineError(f"output without a unique SOP Instance UID ({uid or 'none'})")
        uids.append(uid)
    return uids


_END = object()
"""Ends a sender's queue."""


@dataclass(eq=False)
class _Lane:
    """One destination's sender: outputs go in as they become durable, answers come out."""

    name: str
    """The job's destination name (``sender`` possibly)."""
    want: frozenset[str]
    """SOP Instance UIDs it has not acknowledged before."""
    target: str = ""
    """The configured destination ``name`` resolves to."""
    queue: queue_mod.SimpleQueue[object] = field(default_factory=queue_mod.SimpleQueue)
    sent: list[str] = field(default_factory=list)
    """UIDs handed to the destination, in order."""
    results: list[DeliveryResult] | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def items(self) -> Iterator[Path]:
        """The durable outputs' paths as they come (blocks), until :data:`_END`."""
        while (item := self.queue.get()) is not _END:
            assert isinstance(item, JobOutput)
            self.sent.append(item.sop_instance_uid)
            yield item.path

    def run(self, dest: Destination, classes: Sequence[tuple[str, str]],
            record: Callable[[list[str]], None]) -> None:
        """Send everything that comes (the sender thread's body); keeps answers or the error.

        ``record`` stores each acknowledged UID at once (the worker records all answers again
        at the end, idempotently), so a crash in the middle re-sends nothing acknowledged.
        """
        def acknowledged(r: DeliveryResult) -> None:
            if r.ok:
                try:
                    record([r.sop_instance_uid])
                except Exception:  # noqa: BLE001 - recorded again by _finish_stream
                    log.exception("recording a delivery failed", destination=self.name)

        try:
            self.results = send_stream(dest, self.items(), classes, acknowledged)
        except BaseException as exc:  # noqa: BLE001 - reported by _finish_stream
            self.error = exc
            if not isinstance(exc, DestinationError):
                log.exception("sending outputs crashed", destination=self.name)


class _DeliveryStream:
    """A job's senders (one thread per destination) while its outputs are being written."""

    def __init__(self, lanes: list[_Lane]) -> None:
        self.lanes = lanes
        self.finished = False

    def put(self, out: JobOutput) -> None:
        """Hand a durable output to every destination that still wants it."""
        for lane in self.lanes:
            if lane.thread is not None and out.sop_instance_uid in lane.want:
                lane.queue.put(out)

    def finish(self) -> list[_Lane]:
        """End the senders' queues and wait for them (their own timeouts bound the wait)."""
        if not self.finished:
            self.finished = True
            for lane in self.lanes:
                lane.queue.put(_END)
            for lane in self.lanes:
                if lane.thread is not None:
                    lane.thread.join()
        return self.lanes


def output_kind(sop_class_uid: str) -> str:
    """``seg``, ``sr``, ``sc``, ``pr``, ``ko`` for a derived object's SOP class, else the UID."""
    if sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.59":
        return "ko"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "sr"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.66."):
        return "seg"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "sc"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.11."):
        return "pr"
    return sop_class_uid


def _audit(event: str, **fields: object) -> None:
    """One audit line; an unwritable audit file is logged, not fatal to the job."""
    try:
        get_audit().write(event, **fields)
    except OSError as exc:
        log.error("audit write failed", audit_event=event, error=str(exc))


def remove_results(settings: NodeSettings, job_id: str) -> None:
    """Delete the stored outputs of a finished job (for retention clean-up)."""
    folder: Path = results_dir(settings) / job_id
    if folder.is_dir():
        shutil.rmtree(folder)
        dfd = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
