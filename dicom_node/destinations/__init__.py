"""Destinations: where the node sends derived objects (one Protocol, one module per kind).

* ``dimse``: C-STORE SCU (pynetdicom), :mod:`.dimse`.
* ``dicomweb``: STOW-RS (dicomweb-client), :mod:`.dicomweb`.
* ``orthanc``: Orthanc's REST API (pyorthanc), :mod:`.orthanc`.
* ``folder``: files in a folder, :mod:`.folder`.

Each ``send`` answers one :class:`DeliveryResult` per instance, in input order, and raises
:class:`DestinationError` only when nothing could be tried (peer unreachable, association
refused); the dispatcher records the successful instances and retries the rest later.
:func:`send_stream` sends items as they become available: item by item over one association
where the kind can (``dimse``), else as one batch once the last has come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.config import Destination as DestinationConfig
from dicom_node.config import (
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    NodeSettings,
    OrthancDestination,
)

Item = pydicom.Dataset | Path
"""What a destination sends: a dataset, or the path of a DICOM Part 10 file."""


class DestinationError(Exception):
    """The destination could not be reached or refused the whole batch; says why."""


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of sending one instance."""

    sop_instance_uid: str
    ok: bool
    """``True`` when the destination acknowledged (stored, or already held) the instance."""
    detail: str = ""
    """Status in words, e.g. ``0x0000``, ``AlreadyStored``, ``0xA700 out of resources``."""


@runtime_checkable
class Destination(Protocol):
    """A place results are delivered to."""

    name: str

    def send(self, items: Sequence[Item]) -> list[DeliveryResult]:
        """Deliver ``items`` (in one association / request batch where the kind allows).

        Returns:
            One result per item, in input order.

        Raises:
            DestinationError: Nothing could be sent (unreachable, refused association).
        """
        ...

    def test(self) -> str:
        """Check the destination answers (C-ECHO, HTTP ping, writable folder).

        Returns:
            A one-line description of the successful check.

        Raises:
            DestinationError: The check failed; the message says how.
        """
        ...


def load_item(item: Item) -> pydicom.Dataset:
    """The dataset of an item (reads the file of a path)."""
    if isinstance(item, Path):
        return pydicom.dcmread(item)
    return item


def item_uid(item: Item) -> str:
    """SOP Instance UID of an item (reads only the header of a file)."""
    if isinstance(item, Path):
        ds = pydicom.dcmread(item, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.SOPInstanceUID)
    return str(item.SOPInstanceUID)


def negotiation_key(item: Item) -> tuple[str, str]:
    """``(SOP Class UID, stored Transfer Syntax UID)`` of an item (a file's meta only)."""
    if isinstance(item, Path):
        meta = read_file_meta_info(item)
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    ts = getattr(item, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    return str(item.SOPClassUID), str(ts or ExplicitVRLittleEndian)


def send_stream(dest: Destination, items: Iterable[Item], classes: Sequence[tuple[str, str]],
                on_result: Callable[[DeliveryResult], None] | None = None
                ) -> list[DeliveryResult]:
    """Send ``items`` as the iterable yields them (it may block until the next one exists).

    A destination with a ``send_stream(items, classes, on_result)`` method (``dimse``: one
    association negotiated for ``classes``, the ``(SOP Class UID, Transfer Syntax UID)`` of
    every item) sends each item when it comes; any other sends them all in one ``send`` after
    the last. ``on_result`` gets each item's result as soon as it is known.

    Returns:
        One result per item, in order.

    Raises:
        DestinationError: Nothing could be sent.
    """
    stream = getattr(dest, "send_stream", None)
    if callable(stream):
        results: list[DeliveryResult] = stream(items, classes, on_result)
        return results
    results = dest.send(list(items))
    if on_result is not None:
        for r in results:
            on_result(r)
    return results


def make_destination(name: str, cfg: DestinationConfig, settings: NodeSettings) -> Destination:
    """Build the destination ``name`` from its configuration.

    Args:
        name: The key under ``destinations`` (used in logs and delivery records).
        cfg: Its settings.
        settings: The node configuration (the node's AE title for ``dimse``).
    """
    if isinstance(cfg, DimseDestination):
        from dicom_node.destinations.dimse import DimseStore

        return DimseStore(name, cfg, calling_ae=cfg.calling_ae_title or settings.node.ae_title)
    if isinstance(cfg, DicomwebDestination):
        from dicom_node.destinations.dicomweb import DicomwebStore

        return DicomwebStore(name, cfg)
    if isinstance(cfg, OrthancDestination):
        from dicom_node.destinations.orthanc import OrthancStore

        return OrthancStore(name, cfg)
    if isinstance(cfg, FolderDestination):
        from dicom_node.destinations.folder import FolderStore

        return FolderStore(name, cfg)
    raise DestinationError(f"destination {name!r}: unknown kind {getattr(cfg, 'kind', '?')!r}")


def destination_for(name: str, settings: NodeSettings) -> Destination:
    """The configured destination ``name``.

    Raises:
        DestinationError: No destination of that name is configured.
    """
    cfg = settings.destinations.get(name)
    if cfg is None:
        known = ", ".join(sorted(settings.destinations)) or "none"
        raise DestinationError(f"no destination {name!r} is configured (known: {known})")
    return make_destination(name, cfg, settings)
