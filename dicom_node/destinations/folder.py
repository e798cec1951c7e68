"""``folder`` destination: write each instance to ``<path>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.

Files are written to a temporary name, fsync'd and renamed, so a reader never sees half a
file and a re-send replaces the earlier copy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pydicom

from dicom_node.config import FolderDestination
from dicom_node.destinations import DeliveryResult, DestinationError, Item, load_item
from dicom_node.logs import get_logger

log = get_logger(__name__)


def write_atomic(ds: pydicom.Dataset | Path, target: Path) -> None:
    """Write a dataset (or copy a file) to ``target`` via a fsync'd temporary file + rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if isinstance(ds, Path):
        shutil.copyfile(ds, tmp)
    else:
        ds.save_as(tmp, enforce_file_format=True)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    dfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FolderStore:
    """Files in a folder.

    Args:
        name: Destination name (logs, delivery records).
        cfg: The target folder.
    """

    def __init__(self, name: str, cfg: FolderDestination) -> None:
        self.name = name
        self.cfg = cfg

    def test(self) -> str:
        """Check the folder exists (it is created) and is writable.

        Raises:
            DestinationError: It cannot be created or written.
        """
        try:
            self.cfg.path.mkdir(parents=True, exist_ok=True)
            probe = self.cfg.path / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise DestinationError(
                f"destination {self.name}: folder {self.cfg.path} is not writable ({exc})"
            ) from None
        return f"folder {self.cfg.path} is writable"

    def send(self, items: Sequence[Item]) -> list[DeliveryResult]:
        """Write each item; one result per item, in order."""
        results = []
        for item in items:
            ds = load_item(item)
            uid = str(ds.SOPInstanceUID)
            target = (self.cfg.path / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
                      / f"{uid}.dcm")
            try:
                write_atomic(item if isinstance(item, Path) else ds, target)
            except OSError as exc:
                results.append(DeliveryResult(uid, False, f"write failed: {exc.strerror}"))
                continue
            results.append(DeliveryResult(uid, True, "written"))
        log.info("folder write", destination=self.name, count=len(results),
                 failed=sum(not r.ok for r in results))
        return results
