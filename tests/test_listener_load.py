"""Concurrency: 4 associations at once, 200 instances each, none lost."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from omnimri_samples import synthetic_series, write_series
from tests.fixtures.dcmtk import popen_dcmtk
from tests.fixtures.node import NodeProcess, dataset_bytes

SENDERS = 4
PER_SENDER = 200


def test_four_concurrent_associations_lose_nothing(
        node_factory: Callable[..., NodeProcess], tmp_path: Path, dcmtk: None) -> None:
    node = node_factory()
    series = [synthetic_series(PER_SENDER, 64, 64, seed=k, series_number=k + 1)
              for k in range(SENDERS)]
    folders = [write_series(s, tmp_path / f"s{k}") for k, s in enumerate(series)]
    procs = [popen_dcmtk("dcmsend", ["-aet", f"SENDER{k}", "-aec", "OMNIMRI", "-dn",
                                     "127.0.0.1", str(node.port), *map(str, files)])
             for k, files in enumerate(folders)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * SENDERS, "\n".join(outputs)

    index = node.index()
    assert index.count_instances() == SENDERS * PER_SENDER
    released = [node.wait_for_event("association_released", calling_ae=f"SENDER{k}")[0]
                for k in range(SENDERS)]
    assert [e["stored"] for e in released] == [PER_SENDER] * SENDERS
    assert all(e["failed"] == 0 and e["duplicates"] == 0 for e in released)
    for s, files in zip(series, folders, strict=True):
        uid = s[0].SeriesInstanceUID
        [ev] = node.wait_for_event("series_complete", series_uid=uid)
        assert ev["instances"] == PER_SENDER
        stored = index.load_series(uid, 1)
        assert {i.sop_instance_uid for i in stored.instances} == {d.SOPInstanceUID for d in s}
        # spot-check bytes of a few
        by_uid = {i.sop_instance_uid: i.path for i in stored.instances}
        for d, f in list(zip(s, files, strict=True))[::50]:
            assert dataset_bytes(by_uid[d.SOPInstanceUID]) == dataset_bytes(f)
    # The four associations overlapped: every one was accepted before any was released, so
    # at the last acceptance all four were open at once (log timestamps, UTC ISO 8601).
    accepted = [e for e in node.events("association_accepted")
                if e["calling_ae"].startswith("SENDER")]
    assert len(accepted) == SENDERS
    last_accepted = max(datetime.fromisoformat(e["timestamp"]) for e in accepted)
    first_released = min(datetime.fromisoformat(e["timestamp"]) for e in released)
    assert last_accepted < first_released, (last_accepted, first_released)
