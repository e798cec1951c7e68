"""The durable spool: received instances as Part 10 files, named safely from their UIDs.

Layout (``storage.path``)::

    <spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   stored instances
    <spool>/.incoming/                                                     partial receptions

A UID that is not a conformant UID (digits and dots, at most 64 characters) never becomes a
path component as is: it is replaced by ``x-`` and a SHA-256 of it, so ``../../x`` cannot leave
the spool. An instance is written to ``.incoming`` first, fsync'd, renamed into place, and its
folder fsync'd (batched across concurrent instances by :class:`GroupCommit`) before the listener
acknowledges it. ``.incoming`` is emptied at start: whatever is there was never acknowledged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Generic, TypeVar

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_node import status

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
INCOMING = ".incoming"
"""Folder (inside the spool) for receptions not yet acknowledged."""

HEADER_TAGS: list[int | str] = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "SeriesDescription", "InstanceNumber", "NumberOfFrames",
    0x00200105,  # NumberOfTemporalPositions
    0x00540081,  # NumberOfSlices
]
"""The only tags the listener decodes from a received data set."""

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD


def safe_component(uid: str) -> str:
    """A path component for a UID: the UID itself if conformant, else ``x-<sha256 prefix>``.

    >>> safe_component("1.2.3")
    '1.2.3'
    >>> safe_component("../../x").startswith("x-")
    True
    """
    if len(uid) <= 64 and _UID_RE.match(uid):
        return uid
    return "x-" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class InstanceRejected(Exception):
    """A received data set that the listener refuses; carries the DICOM status to answer."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status_code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few header attributes the listener and the series tracker need."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    series_description: str = ""
    instance_number: int | None = None
    number_of_frames: int = 1
    number_of_temporal_positions: int | None = None
    number_of_slices: int | None = None


def _int_or_none(value: object) -> int | None:
    try:
        return None if value in (None, "") else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> InstanceHeader:
    """Decode the header tags of a received Part 10 file and check its structure.

    Only :data:`HEADER_TAGS` are decoded; pixel data is never read. The element structure
    from the pixel data to the end of the file is walked so that a truncated instance is
    refused rather than stored.

    Raises:
        InstanceRejected: ``CANNOT_UNDERSTAND`` (not DICOM, truncated) or ``MISSING_UIDS``.
    """
    try:
        with open(path, "rb") as f:
            return read_header_from(f, path.stat().st_size)
    except OSError as err:
        raise InstanceRejected(status.CANNOT_UNDERSTAND,
                               f"undecodable: {type(err).__name__}") from None


def read_header_from(f: IO[bytes], size: int) -> InstanceHeader:
    """:func:`read_header` for an open Part 10 file object of ``size`` bytes (file or memory).

    Raises:
        InstanceRejected: ``CANNOT_UNDERSTAND`` (not DICOM, truncated) or ``MISSING_UIDS``.
    """
    try:
        ds = dcmread(f, stop_before_pixels=True,
                    specific_tags=HEADER_TAGS)  # type: ignore[arg-type]
        pos = f.tell()
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        if pos > size:
            raise InstanceRejected(status.CANNOT_UNDERSTAND,
                                   "truncated: an element runs past the end of the data")
        if ts and not ts.is_deflated:
            if pos >= size:
                # Stopped at the end without pixel data: walk the whole data set, so a
                # cut inside the header is told apart from a complete non-image object.
                pos = _dataset_start(f)
            _check_tail(f, pos, size, ts.is_implicit_VR, ts.is_little_endian)
        # pydicom decodes element values lazily: an unknown VR or a bad value raises here,
        # on first access, not in dcmread.
        return _header_of(ds, ts)
    except InstanceRejected:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error,
            NotImplementedError, TypeError, AttributeError) as err:
        raise InstanceRejected(status.CANNOT_UNDERSTAND,
                               f"undecodable: {type(err).__name__}") from None


def _header_of(ds: Dataset, ts: UID) -> InstanceHeader:
    """The :class:`InstanceHeader` of a data set read with :data:`HEADER_TAGS`."""
    uids = {k: str(ds.get(k, "") or "").strip() for k in
            ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise InstanceRejected(status.MISSING_UIDS, "missing " + ", ".join(missing))
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(ts),
        modality=str(ds.get("Modality", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        number_of_frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        number_of_temporal_positions=_int_or_none(ds.get(0x00200105).value
                                                  if 0x00200105 in ds else None),
        number_of_slices=_int_or_none(ds.get(0x00540081).value if 0x00540081 in ds else None),
    )


def _dataset_start(f: IO[bytes]) -> int:
    """Offset of the data set after the preamble and file meta (group length required)."""
    f.seek(128)
    head = f.read(16)
    if head[:4] != b"DICM" or head[4:8] != b"\x02\x00\x00\x00":
        raise InstanceRejected(status.CANNOT_UNDERSTAND, "no file meta group length")
    (length,) = struct.unpack("<L", head[12:16])
    return 144 + int(length)


def _check_tail(f: IO[bytes], pos: int, size: int, implicit: bool, little: bool) -> None:
    """Walk top-level elements from ``pos`` to the end; raise if one runs past the end."""
    e = "<" if little else ">"
    while pos < size:
        f.seek(pos)
        hdr = f.read(12)
        if len(hdr) < 8:
            raise InstanceRejected(status.CANNOT_UNDERSTAND, "truncated: partial element header")
        group, elem = struct.unpack(e + "HH", hdr[:4])
        if group == 0 and elem == 0 and hdr[4:8] == b"\0\0\0\0" and not any(f.read(64)):
            return  # trailing zero padding after the data set
        if implicit or (group, elem) in ((0xFFFE, 0xE000), (0xFFFE, 0xE0DD)):
            (length,) = struct.unpack(e + "L", hdr[4:8])
            hlen = 8
        elif hdr[4:6] in _LONG_VRS:
            if len(hdr) < 12:
                raise InstanceRejected(status.CANNOT_UNDERSTAND,
                                       "truncated: partial element header")
            (length,) = struct.unpack(e + "L", hdr[8:12])
            hlen = 12
        else:
            (length,) = struct.unpack(e + "H", hdr[6:8])
            hlen = 8
        if length == 0xFFFFFFFF:
            end = _skip_encapsulated(f, pos + hlen, size, e)
            if end is None:
                return  # an undefined-length sequence: not walked further
            pos = end
        else:
            pos += hlen + length
    if pos != size:
        raise InstanceRejected(status.CANNOT_UNDERSTAND,
                               f"truncated: data ends {pos - size} bytes early")


def _skip_encapsulated(f: IO[bytes], pos: int, size: int, e: str) -> int | None:
    """End offset of encapsulated pixel data starting at ``pos`` (``None``: not walkable)."""
    while pos + 8 <= size:
        f.seek(pos)
        tag_group, tag_elem, length = struct.unpack(e + "HHL", f.read(8))
        tag = (tag_group << 16) | tag_elem
        if tag == _SEQ_DELIM:
            return pos + 8
        if tag != _ITEM or length == 0xFFFFFFFF:
            return None
        pos += 8 + length
    raise InstanceRejected(status.CANNOT_UNDERSTAND,
                           "truncated: encapsulated pixel data has no sequence delimiter")


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool folder: where instances go and how they get there durably.

    Args:
        root: ``storage.path``; created if missing.
        fsync: fsync files and folders before acknowledging (``storage.fsync``).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.incoming = self.root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._pool: ThreadPoolExecutor | None = None

    def purge_incoming(self) -> int:
        """Delete partial receptions left by a crash; returns how many were removed."""
        n = 0
        for p in self.incoming.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        return n

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance with these UIDs is stored (always inside the spool)."""
        # safe_component() yields digits and dots (never "." or "..") or "x-<hex>".
        return (self.root / safe_component(study_uid) / safe_component(series_uid)
                / (safe_component(sop_uid) + ".dcm"))

    def free_space(self) -> tuple[int, float]:
        """Free bytes and free percentage of the spool's file system."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        return free, (100.0 * free / total if total else 0.0)

    def has_room(self, min_free_bytes: int, min_free_percent: float, incoming_bytes: int = 0
                 ) -> bool:
        """Whether storing ``incoming_bytes`` more keeps the disk above its watermark."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        after_pct = 100.0 * (free - incoming_bytes) / total if total else 0.0
        return free - incoming_bytes >= min_free_bytes and after_pct >= min_free_percent

    def install(self, tmp: Path, final: Path, *, sync_first: bool = True) -> set[Path]:
        """Rename ``tmp`` to ``final`` (atomically replacing any file there).

        Args:
            tmp: The received file in ``.incoming``.
            final: Its place (:meth:`path_for`).
            sync_first: fsync ``tmp`` before the rename. Required when ``final`` may hold an
                acknowledged instance (a replacement). For a new instance the caller may
                instead fsync ``final`` together with the folders (:meth:`sync`), before it
                indexes and acknowledges it: a crash in between can only leave an unindexed,
                unacknowledged file behind, which the sender's retry overwrites.

        Returns:
            Folders whose entries changed and need an fsync before the instance counts as
            durable.
        """
        dirs: set[Path] = {final.parent}
        if not final.parent.is_dir():
            # New study/series folders: their parents' entries must be made durable too.
            for parent in (final.parent.parent, final.parent):
                if not parent.is_dir():
                    parent.mkdir(parents=True, exist_ok=True)
                    dirs.add(parent.parent)
        if self.fsync and sync_first:
            fsync_path(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Different file system (should not happen: .incoming is inside the spool).
            shutil.copyfile(tmp, final)
            if self.fsync:
                fsync_path(final)
            tmp.unlink(missing_ok=True)
        return dirs

    @staticmethod
    def is_intact(path: Path, size_bytes: int, sop_instance_uid: str) -> bool:
        """Whether a stored file is whole: its size, header and SOP Instance UID as indexed."""
        try:
            if path.stat().st_size != size_bytes:
                return False
            return read_header(path).sop_instance_uid == sop_instance_uid
        except (OSError, InstanceRejected):
            return False

    def sync_dirs(self, dirs: Iterable[Path]) -> None:
        """Fsync each folder once (no-op when ``fsync`` is off)."""
        self.sync((), dirs)

    def sync(self, files: Iterable[Path], dirs: Iterable[Path]) -> None:
        """Fsync files and folders concurrently; return when all are durable.

        Concurrent fsyncs can share one journal commit of the file system. No-op when
        ``fsync`` is off.
        """
        if not self.fsync:
            return
        jobs = [(f, False) for f in dict.fromkeys(files)] + [(d, True) for d in set(dirs)]
        if len(jobs) <= 1:
            for path, is_dir in jobs:
                fsync_path(path, directory=is_dir)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-fsync")
        futures = [self._pool.submit(fsync_path, p, directory=d) for p, d in jobs[1:]]
        fsync_path(jobs[0][0], directory=jobs[0][1])
        for fut in futures:
            fut.result()


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes."""
    import filecmp

    return filecmp.cmp(a, b, shallow=False)


T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Leader/follower group commit: concurrent callers share one commit.

    The first caller to arrive commits everything queued at that moment (and, when other
    associations are active, what arrives within ``window_s``); the others wait for it. One
    caller alone pays no extra latency.

    Args:
        commit: Makes a batch durable; returns one result per item, in order.
        window_s: Longest the leader waits for company, seconds.
        concurrency: How many callers may be in flight (e.g. open associations); the leader
            stops waiting once that many items are queued.
    """

    def __init__(self, commit: Callable[[list[T]], list[R]], window_s: float,
                 concurrency: Callable[[], int]) -> None:
        self._commit = commit
        self._window_s = window_s
        self._concurrency = concurrency
        self._cond = threading.Condition()
        self._queue: list[_Slot[T, R]] = []
        self._busy = False
        self.batches = 0
        """Commits done (for tests and metrics)."""

    def _queued(self, n: int) -> bool:
        return len(self._queue) >= n

    def submit(self, item: T) -> R:
        """Queue ``item``, wait until it is committed, and return its result (or raise)."""
        slot: _Slot[T, R] = _Slot(item)
        with self._cond:
            self._queue.append(slot)
            self._cond.notify_all()  # a leader waiting for company counts the queue
            while not slot.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                if self._window_s > 0:
                    want = self._concurrency()
                    if want > 1 and len(self._queue) < want:
                        self._cond.wait_for(functools.partial(self._queued, want),
                                            timeout=self._window_s)
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    results = self._commit([s.item for s in batch])
                    for s, r in zip(batch, results, strict=True):
                        s.result = r
                except BaseException as err:  # noqa: BLE001 - handed to every waiter
                    for s in batch:
                        s.error = err
                finally:
                    self._cond.acquire()
                    for s in batch:
                        s.done = True
                    self._busy = False
                    self.batches += 1
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]


class _Slot(Generic[T, R]):
    __slots__ = ("item", "result", "error", "done")

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.done = False
