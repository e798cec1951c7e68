"""The receive journal: append-only segment files that make an instance durable cheaply.

An instance's Part 10 bytes and its index fields are appended as one record to the current
segment (``<spool>/.journal/seg-<n>.jnl``); one ``fdatasync`` of the segment (shared by every
association whose records are waiting: group commit) makes them durable. That is one flush,
where a file per instance needs a file fsync, a rename and a folder fsync.

Record layout (little endian)::

    magic "OMJ1" | u32 header length | u64 data length | u32 CRC-32 of header+data
    | header (JSON) | data (the Part 10 file)

A record cut short by a crash (never acknowledged: the flush did not finish) fails its length
or CRC check; reading a segment stops there. Records are materialised into the spool by the
receiver in the background; a segment is deleted once all its records are in the spool and the
file system was synced. At start, every segment still present is replayed (idempotent).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.logs import get_logger

log = get_logger("journal")

MAGIC = b"OMJ1"
_HEAD = struct.Struct("<4sLQL")
SEGMENT_BYTES = 64 * 1024**2
"""A segment is closed once it holds this many bytes (the next record opens a new one)."""


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    fd: int
    size: int = 0
    last_seq: int = 0


def _libc_syncfs() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    fn = getattr(ctypes.CDLL(name, use_errno=True), "syncfs", None)
    return fn


_SYNCFS = _libc_syncfs()


def syncfs(folder: Path) -> None:
    """Flush the whole file system holding ``folder`` (``syncfs(2)``; ``os.sync`` fallback)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    finally:
        os.close(fd)


class Journal:
    """Segments of received instances, appended by several threads, flushed in groups.

    Args:
        folder: The journal folder (created if missing).
        fsync: ``fdatasync`` in :meth:`sync` (``storage.fsync``).
        segment_bytes: Size at which a segment is closed.
    """

    def __init__(self, folder: Path, *, fsync: bool = True,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._seq = 0
        self._closed: list[_Segment] = []
        numbers = [int(p.stem[4:]) for p in self.folder.glob("seg-*.jnl")
                   if p.stem[4:].isdigit()]
        self._next_number = max(numbers, default=0) + 1
        self._current: _Segment | None = None

    def _open_segment(self) -> _Segment:
        path = self.folder / f"seg-{self._next_number:08d}.jnl"
        self._next_number += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if self.fsync:  # the new name must survive a crash before the first record does
            dfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return _Segment(self._next_number - 1, path, fd)

    def append(self, header: dict[str, Any], data: bytes | bytearray | memoryview) -> int:
        """Append one record (not yet durable: see :meth:`sync`); returns its sequence number."""
        hdr = json.dumps(header, separators=(",", ":")).encode("utf-8")
        crc = zlib.crc32(data, zlib.crc32(hdr))
        head = _HEAD.pack(MAGIC, len(hdr), len(data), crc)
        with self._lock:
            seg = self._current
            if seg is None or seg.size >= self.segment_bytes:
                if seg is not None:
                    if self.fsync:
                        os.fdatasync(seg.fd)
                    self._closed.append(seg)
                seg = self._current = self._open_segment()
            n = len(head) + len(hdr) + len(data)
            written = os.writev(seg.fd, [head, hdr, data])
            if written != n:
                raise OSError(f"journal: short write ({written} of {n} bytes)")
            seg.size += n
            self._seq += 1
            seg.last_seq = self._seq
            return self._seq

    def sync(self) -> None:
        """Make every record appended so far durable (``fdatasync`` of the open segment)."""
        with self._lock:
            seg = self._current
        if seg is not None and self.fsync:
            os.fdatasync(seg.fd)

    def release_upto(self, seq: int, spool_root: Path) -> int:
        """Delete closed segments whose records (≤ ``seq``) are all in the spool.

        The spool's file system is synced first (once), so the materialised files are durable
        before the records that back them disappear. Returns how many segments were deleted.
        """
        with self._lock:
            done = [s for s in self._closed if s.last_seq <= seq]
            if not done:
                return 0
        if self.fsync:
            syncfs(spool_root)
        with self._lock:
            for s in done:
                self._closed.remove(s)
                os.close(s.fd)
                s.path.unlink(missing_ok=True)
        return len(done)

    def close(self, spool_root: Path, *, all_materialised: bool) -> None:
        """Close the segments; delete them when everything they hold is in the spool."""
        with self._lock:
            segs = [*self._closed, *([self._current] if self._current else [])]
            self._closed, self._current = [], None
        if all_materialised and segs and self.fsync:
            syncfs(spool_root)
        for s in segs:
            os.close(s.fd)
            if all_materialised:
                s.path.unlink(missing_ok=True)

    # -- replay ------------------------------------------------------------------------------

    def pending_segments(self) -> list[Path]:
        """Segments left by a previous run (oldest first)."""
        return sorted(self.folder.glob("seg-*.jnl"))


def read_segment(path: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The whole records of one segment, in order; stops at the first torn or corrupt one."""
    with open(path, "rb") as f:
        while True:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                return
            magic, hlen, dlen, crc = _HEAD.unpack(head)
            if magic != MAGIC:
                log.warning("journal_record_invalid", segment=path.name, offset=f.tell(),
                            reason="bad magic")
                return
            hdr = f.read(hlen)
            data = f.read(dlen)
            if len(hdr) < hlen or len(data) < dlen or zlib.crc32(data, zlib.crc32(hdr)) != crc:
                log.warning("journal_record_torn", segment=path.name,
                            detail="never acknowledged (cut by a crash)")
                return
            try:
                header = json.loads(hdr)
            except ValueError:
                return
            yield header, data


def remove_segments(paths: list[Path]) -> None:
    """Delete replayed segments."""
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
