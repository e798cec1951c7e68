"""The worker pool with the real preview pipeline, a folder, a closed port and Orthanc."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.config import NodeSettings, parse_config
from dicom_node.jobs import Job, JobQueue, NewJob, results_dir
from dicom_node.pipelines.preview import preview_uids
from dicom_node.worker import WorkerPool
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.net import free_port
from tests.fixtures.orthanc import OrthancServer
from tests.test_destinations import series_from_files


def settings_for(tmp: Path, pacs_port: int, **jobs: Any) -> NodeSettings:
    return parse_config({
        "storage": {"path": "spool", "fsync": False},
        "jobs": {"max_attempts": 3, "backoff_initial_s": 1, "backoff_max_s": 2, **jobs},
        "pipelines": {"preview": {"kind": "preview", "model": None, "outputs": ["sc"]}},
        "destinations": {
            "archive": {"kind": "folder", "path": "archive"},
            "pacs": {"kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1",
                     "port": pacs_port, "timeout_s": 3},
        },
    }, tmp)


def claimed(queue: JobQueue, now: float | None = None) -> Job:
    """The job :meth:`JobQueue.claim` hands out (the test fails if none is due)."""
    job = queue.claim(now=now)
    assert job is not None, "no job was due"
    return job


@pytest.fixture
def series(tmp_path: Path) -> Any:
    return series_from_files(write_series(synthetic_series(5, 32, 32, seed=1), tmp_path / "src"))


def test_job_runs_preview_and_delivers_to_a_folder(tmp_path: Path, series: Any) -> None:
    settings = settings_for(tmp_path, free_port())
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)
    jid, _ = queue.enqueue(NewJob(series, "preview", ("archive",)))
    pool.process(claimed(queue))
    job = queue.get(jid)
    assert job.state == "done" and job.attempts == 1 and job.last_error is None
    [out] = queue.outputs(jid)
    assert out.sop_instance_uid == preview_uids(jid)[1]
    assert out.path == results_dir(settings) / jid / f"{out.sop_instance_uid}.dcm"
    written = list((tmp_path / "archive").rglob("*.dcm"))
    assert [p.name for p in written] == [f"{out.sop_instance_uid}.dcm"]
    ds = pydicom.dcmread(written[0])
    assert ds.StudyInstanceUID == series.study_instance_uid
    assert ds.SeriesInstanceUID != series.series_instance_uid
    # A full re-run produces the very same UIDs (the PACS replaces instead of duplicating).
    queue.retry(jid, rerun=True)
    pool.process(claimed(queue))
    assert [o.sop_instance_uid for o in queue.outputs(jid)] == [out.sop_instance_uid]
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 1


def test_pacs_down_backoff_then_resume_without_rerunning(
        tmp_path: Path, series: Any, orthanc: OrthancServer, caplog: Any) -> None:
    settings = settings_for(tmp_path, free_port())  # nothing listens there: the PACS is down
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)
    jid, _ = queue.enqueue(NewJob(series, "preview", ("archive", "pacs")))
    pool.process(claimed(queue))
    job = queue.get(jid)
    assert job.state == "queued" and "destination pacs" in (job.last_error or "")
    assert job.next_attempt_at >= time.time() + 0.5  # backoff
    assert queue.delivered(jid, "archive") == {preview_uids(jid)[1]}
    assert queue.delivered(jid, "pacs") == set()
    out_path = queue.outputs(jid)[0].path
    mtime = out_path.stat().st_mtime_ns
    archived = next((tmp_path / "archive").rglob("*.dcm"))
    archived_mtime = archived.stat().st_mtime_ns
    # The PACS comes back (here: the destination now points at a live Orthanc).
    pool.apply_settings(settings_for(tmp_path, orthanc.dicom_port))
    again = queue.claim(now=time.time() + 10)
    assert again is not None and again.state == "dispatching"  # outputs are not recomputed
    pool.process(again)
    assert queue.get(jid).state == "done"
    assert out_path.stat().st_mtime_ns == mtime
    assert archived.stat().st_mtime_ns == archived_mtime  # the folder got it only once
    assert orthanc.sop_uids(SOPClassUID="1.2.840.10008.5.1.4.1.1.7") == [preview_uids(jid)[1]]


def test_dead_letter_after_the_dispatch_window(tmp_path: Path, series: Any) -> None:
    """An unreachable destination: retried for jobs.dispatch_retry_for_s, not max_attempts."""
    settings = settings_for(tmp_path, free_port(), max_attempts=1, dispatch_retry_for_s=1.0)
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)
    jid, _ = queue.enqueue(NewJob(series, "preview", ("pacs",)))
    pool.process(claimed(queue))
    job = queue.get(jid)
    assert job.state == "queued" and job.waiting_for == ("pacs",)  # max_attempts 1 spent
    time.sleep(1.1)
    pool.process(claimed(queue, now=time.time() + 10))
    job = queue.get(jid)
    assert job.state == "failed" and job.attempts == 2 and job.dispatch_attempts == 2
    assert "association" in (job.last_error or "")
    assert "jobs.dispatch_retry_for_s" in (job.last_error or "")


def test_unsupported_series_fails_at_once(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID = (generate_uid() for _ in "abc")
    ds.Modality, ds.InstanceNumber = "MR", 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    settings = settings_for(tmp_path, free_port())
    queue = JobQueue(settings)
    jid, _ = queue.enqueue(NewJob(series_from_files([path]), "preview", ("archive",)))
    WorkerPool(settings, queue).process(claimed(queue))
    job = queue.get(jid)
    assert job.state == "failed" and job.attempts == 1
    assert "nothing to preview" in (job.last_error or "")


def test_vanished_outputs_are_made_again(tmp_path: Path, series: Any) -> None:
    settings = settings_for(tmp_path, free_port())
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)
    jid, _ = queue.enqueue(NewJob(series, "preview", ("pacs",)))
    pool.process(claimed(queue))  # PACS down: outputs stored, not delivered
    queue.outputs(jid)[0].path.unlink()
    pool.process(claimed(queue, now=time.time() + 10))
    assert queue.outputs(jid) == [] and queue.get(jid).state == "queued"
    job = queue.claim(now=time.time() + 10)
    assert job is not None and job.state == "running"


def test_pool_threads_work_the_queue(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, free_port(), workers=2, poll_interval_s=0.05)
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)
    ids = []
    for k in range(3):
        paths = write_series(synthetic_series(3, 16, 16, seed=k), tmp_path / f"s{k}")
        ids.append(queue.enqueue(NewJob(series_from_files(paths), "preview", ("archive",)))[0])
    pool.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and queue.counts().get("done", 0) < 3:
            time.sleep(0.05)
    finally:
        pool.stop()
    assert queue.counts() == {"done": 3}
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 3


def test_unresolved_sender_goes_back_to_the_calling_ae(tmp_path: Path, series: Any,
                                                       orthanc: OrthancServer) -> None:
    settings = settings_for(tmp_path, orthanc.dicom_port)  # "pacs" is AE ORTHANC
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)
    from_orthanc = dataclasses.replace(series, calling_ae="ORTHANC", peer_host="127.0.0.1")
    stranger = dataclasses.replace(series, revision=2, calling_ae="STRANGER")
    ok = queue.enqueue(NewJob(from_orthanc, "preview", ("sender",)))[0]
    bad = queue.enqueue(NewJob(stranger, "preview", ("sender",)))[0]
    pool.process(claimed(queue))
    pool.process(claimed(queue))
    assert queue.get(ok).state == "done" and queue.delivered(ok, "sender") == {
        preview_uids(ok)[1]}
    assert orthanc.sop_uids(SOPClassUID="1.2.840.10008.5.1.4.1.1.7") == [preview_uids(ok)[1]]
    assert queue.get(bad).state == "queued"
    assert "sender's AE title 'STRANGER'" in (queue.get(bad).last_error or "")


def test_pipeline_overrunning_its_timeout_is_a_failed_attempt(tmp_path: Path,
                                                              series: Any) -> None:
    settings = parse_config({
        "storage": {"path": "spool", "fsync": False},
        "pipelines": {"preview": {"kind": "preview", "model": None, "timeout_s": 0.2}},
        "destinations": {"archive": {"kind": "folder", "path": "archive"}},
    }, tmp_path)
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)

    release, finished = threading.Event(), threading.Event()

    class HangingModel:  # stands in for a model that hangs until the test lets it go
        def run(self, s: Any, job_id: str) -> list[Any]:
            release.wait(60)
            finished.set()
            return []

    pool._pipelines["preview"] = HangingModel()
    jid, _ = queue.enqueue(NewJob(series, "preview", ("archive",)))
    try:
        pool.process(claimed(queue))
        # The attempt ended while the model still hung: the timeout ended it, not the model.
        assert not finished.is_set()
    finally:
        release.set()
    job = queue.get(jid)
    assert job.state == "queued" and "did not finish within 0.2 s" in (job.last_error or "")


def test_probe_resumes_waiting_jobs_when_the_destination_answers(tmp_path: Path,
                                                                  series: Any) -> None:
    """A job waiting out a long backoff is retried as soon as the PACS answers a C-ECHO."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    port = free_port()
    settings = settings_for(tmp_path, port, backoff_initial_s=600, backoff_max_s=600)
    queue = JobQueue(settings)
    pool = WorkerPool(settings, queue)
    jid, _ = queue.enqueue(NewJob(series, "preview", ("pacs",)))
    claimed = queue.claim()
    assert claimed is not None
    pool.process(claimed)
    job = queue.get(jid)
    assert job.state == "queued" and job.next_attempt_at > time.time() + 500
    down: set[str] = set()
    assert pool.probe_waiting(down) == 0 and down == {"pacs"}  # still down: keeps waiting
    assert queue.get(jid).next_attempt_at > time.time() + 500
    scp = AE(ae_title="ORTHANC")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    assert server is not None
    try:
        assert pool.probe_waiting(down) == 1 and down == set()
        assert queue.get(jid).next_attempt_at <= time.time()
        assert pool.probe_waiting(down) == 0  # due already: nothing more to do
    finally:
        server.shutdown()
