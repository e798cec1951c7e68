"""kill -9 of the node mid-series, restart, exactly-once completion, late instance → revision 2."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from omnimri_samples import synthetic_series, write_series
from tests.fixtures.dcmtk import dcmsend, popen_dcmtk
from tests.fixtures.node import NodeProcess, dataset_bytes

QUIET_S = 4.0  # long enough to restart the node and resend before the series is quiet


def test_kill9_mid_series_then_restart_completes_once_and_late_instance_is_revision_2(
        node_factory: Callable[..., NodeProcess], tmp_path: Path, dcmtk: None) -> None:
    node = node_factory(completion={"quiet_seconds": QUIET_S, "poll_interval_s": 0.1})
    datasets = synthetic_series(201, 64, 64, seed=7)
    files = write_series(datasets, tmp_path / "series")
    by_uid = {d.SOPInstanceUID: f for d, f in zip(datasets, files, strict=True)}
    series_uid = datasets[0].SeriesInstanceUID
    first, late = files[:200], files[200]

    sender = popen_dcmtk("dcmsend", ["-aet", "DCMSEND", "-aec", "OMNIMRI", "-dn", "127.0.0.1",
                                     str(node.port), *map(str, first)])
    index = node.index()
    deadline = time.monotonic() + 60
    while index.count_instances() < 40:
        assert time.monotonic() < deadline, "node stored nothing"
        assert sender.poll() is None, "dcmsend ended before the kill"
        time.sleep(0.005)
    node.kill9()
    sender.communicate(timeout=60)
    acknowledged = index.count_instances()
    assert 40 <= acknowledged < 200

    node.restart()
    # Everything the index holds is complete on disk; partial receptions were purged.
    for inst in index.instances_of(series_uid):
        assert dataset_bytes(inst.path) == dataset_bytes(by_uid[inst.sop_instance_uid])
    assert list((node.spool / ".incoming").iterdir()) == []
    assert node.events("series_resumed") and node.events("series_resumed")[-1]["count"] == 1

    # The sender retries the whole series: already stored instances are duplicates.
    r = dcmsend(node.port, first, "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    [ev] = node.wait_for_event("series_complete", timeout_s=QUIET_S + 10, series_uid=series_uid)
    assert (ev["revision"], ev["instances"], ev["reason"]) == (1, 200, "quiet")
    done = node.events("association_released", calling_ae="DCMSEND")[-1]
    assert (done["duplicates"], done["stored"]) == (acknowledged, 200 - acknowledged)
    assert [e.revision for e in index.events(series_uid)] == [1]

    # A late instance after completion starts revision 2, holding the whole series.
    r = dcmsend(node.port, [late], "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    [note] = node.wait_for_event("late_instance_new_revision", series_uid=series_uid)
    assert note["revision"] == 2
    [ev2] = node.wait_for_event("series_complete", timeout_s=QUIET_S + 10, series_uid=series_uid,
                                revision=2)
    assert ev2["instances"] == 201
    assert len(index.load_series(series_uid, 1).instances) == 200
    r2 = index.load_series(series_uid, 2)
    assert len(r2.instances) == 201 and r2.instances[-1].sop_instance_uid == \
        datasets[200].SOPInstanceUID

    # Another restart completes nothing again.
    node.kill9()
    node.restart()
    time.sleep(0.5)
    assert [(e.revision, e.instance_count) for e in index.events(series_uid)] == [(1, 200),
                                                                                  (2, 201)]
    assert len(node.events("series_complete", series_uid=series_uid)) == 2
