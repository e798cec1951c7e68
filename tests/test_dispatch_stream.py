"""Outputs go to the PACS while they are written: each only once durable, each only once.

A real pynetdicom Storage SCP is the PACS. The job's pipeline hands the worker several
secondary captures (the preview pipeline's, under distinct UIDs). The worker writes them one
by one into the spool; its sender must C-STORE each as soon as its file is fsync'd and
renamed, over one association, before the next is written (the test's writer waits for the
SCP to hold output k before it writes output k + 1, so a worker that sends only after the
last write fails here). The SCP checks that every instance it receives is already in the
spool with the same bytes. A refused instance is sent again on the next attempt, and
nothing the SCP acknowledged is sent twice (``deliveries`` table), not even when the spool
files vanish and the pipeline runs again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from dicom_node.config import NodeSettings, parse_config
from dicom_node.jobs import Job, JobOutput, JobQueue, NewJob, results_dir
from dicom_node.pipelines.preview import PreviewPipeline
from dicom_node.series import Series
from dicom_node.worker import WorkerPool
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.net import free_port
from tests.test_destinations import series_from_files

N_OUTPUTS = 4
WAIT_S = 20.0


class ManyOutputs:
    """The preview pipeline's secondary capture, ``N_OUTPUTS`` times under distinct UIDs."""

    def __init__(self, settings: NodeSettings) -> None:
        self.inner = PreviewPipeline("preview", settings.pipelines["preview"], settings)

    def run(self, series: Series, job_id: str) -> list[pydicom.Dataset]:
        [sc] = self.inner.run(series, job_id)
        out = []
        for k in range(N_OUTPUTS):
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(sc)))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=[job_id, str(k)])  # the same UIDs on a rerun, as the exporters
            ds.InstanceNumber = k + 1
            out.append(ds)
        return out


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Scp:
    """A Storage SCP that checks each instance is already durable in the spool."""

    def __init__(self, spool_of: Callable[[str], Path]) -> None:
        self.spool_of = spool_of
        self.received: list[str] = []
        self.associations = 0
        self.problems: list[str] = []
        self.refuse: set[str] = set()
        """UIDs answered 0xA700 (out of resources) once."""
        self.cond = threading.Condition()
        self.port = free_port()
        ae = AE(ae_title="STREAMSCP")
        ae.add_supported_context(SecondaryCaptureImageStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)])

    def _established(self, event: Any) -> None:
        with self.cond:
            self.associations += 1

    def _store(self, event: Any) -> int:
        ds = event.dataset
        uid = str(ds.SOPInstanceUID)
        path = self.spool_of(uid)
        if not path.is_file():
            self.problems.append(f"{uid} sent before it was in the spool")
        elif pydicom.dcmread(path).PixelData != ds.PixelData:
            self.problems.append(f"{uid} differs from its spool file")
        with self.cond:
            if uid in self.refuse:
                self.refuse.discard(uid)
                return 0xA700
            self.received.append(uid)
            self.cond.notify_all()
        return 0x0000

    def wait_for(self, uid: str) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: uid in self.received, timeout=WAIT_S)

    def stop(self) -> None:
        self.server.shutdown()


class StepWorker(WorkerPool):
    """The worker, its pipeline replaced by :class:`ManyOutputs`; writing waits on the SCP."""

    def __init__(self, settings: NodeSettings, queue: JobQueue, scp: Scp,
                 no_wait: frozenset[str] = frozenset()) -> None:
        super().__init__(settings, queue)
        self.scp = scp
        self.no_wait = no_wait
        """UIDs the SCP will not hold (refused): writing goes on without waiting for them."""
        self.waited: list[bool] = []

    def _pipeline(self, name: str) -> Any:
        return ManyOutputs(self.settings)

    def _write_outputs(self, job: Job, datasets: Sequence[pydicom.Dataset],
                       on_durable: Callable[[JobOutput], None] | None = None
                       ) -> list[JobOutput]:
        def then_wait(out: JobOutput) -> None:
            if on_durable is not None:
                on_durable(out)
            if out.sop_instance_uid not in self.no_wait:
                self.waited.append(self.scp.wait_for(out.sop_instance_uid))

        return super()._write_outputs(job, datasets, on_durable=then_wait)


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[tuple[NodeSettings, JobQueue, Scp, Series]]:
    holder: dict[str, NodeSettings] = {}
    jobs: dict[str, str] = {}

    def spool_of(uid: str) -> Path:
        return results_dir(holder["s"]) / jobs["id"] / f"{uid}.dcm"

    scp = Scp(spool_of)
    settings = parse_config({
        "storage": {"path": "spool", "fsync": False},
        "jobs": {"max_attempts": 3, "backoff_initial_s": 1, "backoff_max_s": 2},
        "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        "destinations": {"pacs": {"kind": "dimse", "ae_title": "STREAMSCP",
                                  "host": "127.0.0.1", "port": scp.port, "timeout_s": 10}},
    }, tmp_path)
    holder["s"] = settings
    queue = JobQueue(settings)
    series = series_from_files(write_series(synthetic_series(3, 32, 32, seed=4),
                                            tmp_path / "src"))
    jid, _ = queue.enqueue(NewJob(series, "preview", ("pacs",)))
    jobs["id"] = jid
    try:
        yield settings, queue, scp, series
    finally:
        scp.stop()
        queue.close()


def test_each_output_is_sent_once_durable_before_the_next_is_written(flow: Any) -> None:
    settings, queue, scp, _ = flow
    worker = StepWorker(settings, queue, scp)
    job = queue.claim()
    worker.process(job)
    assert queue.get(job.id).state == "done", queue.get(job.id).last_error
    assert worker.waited == [True] * N_OUTPUTS, "an output was not sent before the next write"
    assert scp.problems == []
    uids = [str(d.SOPInstanceUID) for d in ManyOutputs(settings).run(job.series, job.id)]
    assert {o.sop_instance_uid for o in queue.outputs(job.id)} == set(uids)
    assert scp.received == uids and len(set(uids)) == N_OUTPUTS  # in order, each once
    assert scp.associations == 1
    assert queue.delivered(job.id, "pacs") == set(uids)


def test_a_refused_output_is_sent_again_and_only_it(flow: Any) -> None:
    settings, queue, scp, _ = flow
    job = queue.claim()
    second = str(ManyOutputs(settings).run(job.series, job.id)[1].SOPInstanceUID)
    scp.refuse.add(second)
    worker = StepWorker(settings, queue, scp, no_wait=frozenset({second}))
    worker.process(job)
    failed = queue.get(job.id)
    assert failed.state == "queued" and "1 of 4 not delivered" in (failed.last_error or "")
    assert "0xA700" in (failed.last_error or "")
    assert len(scp.received) == N_OUTPUTS - 1 and second not in scp.received
    assert queue.delivered(job.id, "pacs") == set(scp.received)
    # The spool files vanish: that attempt fails, the next runs the pipeline again (same
    # UIDs) and streams only the output the SCP never acknowledged.
    for out in queue.outputs(job.id):
        out.path.unlink()
    lost = queue.claim(now=failed.next_attempt_at + 1)
    assert lost is not None and lost.state == "dispatching"
    worker.process(lost)
    assert "vanished" in (queue.get(job.id).last_error or "")
    rerun = queue.claim(now=queue.get(job.id).next_attempt_at + 1)
    assert rerun is not None and rerun.state == "running"
    worker.process(rerun)
    assert queue.get(job.id).state == "done", queue.get(job.id).last_error
    assert sorted(scp.received) == sorted(o.sop_instance_uid for o in queue.outputs(job.id))
    assert scp.received[-1] == second and scp.problems == []
    assert scp.associations == 2


def test_write_order_puts_multiframe_objects_last_and_keeps_the_rest_in_order() -> None:
    from dicom_node.worker import write_order

    made = []
    for n, frames in enumerate([1134, None, 1, 4, None]):
        ds = pydicom.Dataset()
        ds.SOPInstanceUID = f"1.2.3.{n}"
        if frames is not None:
            ds.NumberOfFrames = frames
        made.append(ds)
    assert [d.SOPInstanceUID for d in write_order(made)] == [
        "1.2.3.1", "1.2.3.2", "1.2.3.4", "1.2.3.3", "1.2.3.0"]
