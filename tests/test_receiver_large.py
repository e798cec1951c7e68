"""Memory under large instances (issue #13: peak RSS bounded, 8 associations, 50 MB each).

A data set larger than :data:`dicom_node.fastscp.receiver.SPILL_BYTES` is received into a file
(not into memory), so the node's peak resident memory does not grow with instance size times
associations. Eight associations each send one 50 MB MR instance at the same time, through real
sockets; the node's peak RSS (``VmHWM``) must stay far below the 400 MB it would take to hold
them, and every instance must be stored whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node import status
from dicom_node.fastscp.receiver import SPILL_BYTES
from tests.fixtures.node import NodeProcess
from tests.test_receiver_network import EXPLICIT_LE, MR, RawAssociation

ASSOCIATIONS = 8
SIDE = 5000
"""Rows = columns of each instance: 5000 x 5000 x 16 bits = 50 MB of pixel data."""
GROWTH_LIMIT_MIB = 160
"""Allowed growth of the node's peak RSS, MiB (holding the instances would take ~ 400 MB)."""


def _hwm_mib(pid: int) -> float:
    """Peak resident memory of a process since it started (``VmHWM``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _large_mr(series: str, k: int) -> tuple[str, bytes, bytes]:
    """One 50 MB MR instance: (SOP class, SOP instance UID, data set bytes, Explicit VR LE)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds: Dataset = pydicom.dcmread(MR)
    del ds.file_meta
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(SIDE * SIDE, dtype=np.uint16) * (k + 1)).tobytes()
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return str(ds.SOPClassUID), ds.SOPInstanceUID.encode(), buf.getvalue()


def test_eight_associations_of_50_mb_instances_keep_the_node_memory_bounded(
        node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(node={"max_associations": 16})
    assert node.proc is not None
    pid = node.proc.pid
    series = generate_uid()
    instances = [_large_mr(series, k) for k in range(ASSOCIATIONS)]
    assert all(len(ds) > 10 * SPILL_BYTES for _, _, ds in instances)
    # Warm up (imports, first association, first stored instance), then measure the peak.
    warm = RawAssociation(node.port, [(instances[0][0], EXPLICIT_LE)], timeout_s=60)
    assert warm.echo() == status.SUCCESS
    warm.release()
    before = _hwm_mib(pid)
    results: list[int | BaseException] = [0] * ASSOCIATIONS
    start = threading.Barrier(ASSOCIATIONS)

    def send(k: int) -> None:
        try:
            sop_class, uid, data = instances[k]
            a = RawAssociation(node.port, [(sop_class, EXPLICIT_LE)], timeout_s=120)
            start.wait(60)
            results[k] = a.store(sop_class, uid, data)
            a.release()
        except BaseException as exc:  # reported below
            results[k] = exc

    threads = [threading.Thread(target=send, args=(k,)) for k in range(ASSOCIATIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [status.SUCCESS] * ASSOCIATIONS, results
    grown = _hwm_mib(pid) - before
    print(f"node peak RSS grew by {grown:.0f} MiB for {ASSOCIATIONS} x "
          f"{len(instances[0][2]) / 1e6:.0f} MB")
    assert grown < GROWTH_LIMIT_MIB, f"node peak RSS grew by {grown:.0f} MiB"
    # Every instance stored whole, once: its file ends with the exact data set that was sent.
    files = list(node.spool.rglob("*.dcm"))
    for _, uid, data in instances:
        hits = [p for p in files if p.name == uid.decode() + ".dcm"]
        assert len(hits) == 1, f"{uid.decode()} stored {len(hits)} times"
        assert hits[0].read_bytes().endswith(data)
