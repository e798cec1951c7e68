"""The receive journal: append-only segment files that make an instance durable cheaply.

An instance's Part 10 bytes and its index fields are appended as one record to the current
segment (``<spool>/.journal/seg-<n>.jnl``, preallocated); one ``fdatasync`` of the segment
(shared by every association whose records are waiting: group commit) makes them durable. That
is one device flush, where a file per instance needs a file fsync, a rename and a folder fsync
(each a file-system journal commit).

Layout (little endian)::

    segment: "OMJS" | u64 generation | 4 zero bytes | records... | zeros
    record:  "OMJ1" | u64 generation | u32 header length | u64 data length
             | u32 CRC-32 of header+data | header (JSON) | data (the Part 10 file)

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
SEGMENT_MAGIC = b"OMJS"
_SEG_HEAD = struct.Struct("<4sQ4x")
_HEAD = struct.Struct("<4sQLQL")
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
"""``json.dumps(..., separators=(",", ":"))`` without building an encoder per record."""
SEGMENT_BYTES = 8 * 1024**2
"""Size of a segment, bytes: preallocated (written with zeros) so that appending a record and
``fdatasync`` change no file metadata (no file-system journal commit, one device flush).
A record that does not fit opens the next segment; one larger than a segment grows it."""
SPARE_SEGMENTS = 2
"""Segments prepared at start (and recycled once materialised), so none is made mid-stream."""


@dataclass(slots=True)
class _Segment:
    path: Path
    fd: int
    generation: int = 0
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


def _segment_generation(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_SEG_HEAD.size)
    except OSError:
        return None
    if len(head) < _SEG_HEAD.size:
        return None
    magic, generation = _SEG_HEAD.unpack(head)
    return int(generation) if magic == SEGMENT_MAGIC else None


class Journal:
    """Segments of received instances, appended by several threads, flushed in groups.

    A segment starts with a header (``"OMJS"``, generation number); each record carries the
    generation of the segment it was written in, so the records of a segment's previous use
    (segments are recycled) end its reading.

    Args:
        folder: The journal folder (created if missing).
        fsync: ``fdatasync`` in :meth:`sync` (``storage.fsync``).
        segment_bytes: Preallocated size of a segment, bytes.
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
        self._free: list[_Segment] = []
        names = [int(p.stem[4:]) for p in self.folder.glob("seg-*.jnl") if p.stem[4:].isdigit()]
        self._next_name = max(names, default=0) + 1
        gens = [_segment_generation(p) for p in self.folder.glob("seg-*.jnl")]
        self._generation = max((g for g in gens if g is not None), default=0)
        self._current: _Segment | None = None

    def prepare(self, count: int = SPARE_SEGMENTS) -> None:
        """Preallocate spare segments (call after any replay, before receiving)."""
        with self._lock:
            while len(self._free) < count:
                self._free.append(self._new_segment())

    def _new_segment(self) -> _Segment:
        path = self.folder / f"seg-{self._next_name:08d}.jnl"
        self._next_name += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            zeros = bytes(1024**2)
            left = self.segment_bytes
            while left > 0:
                left -= os.write(fd, zeros[:min(left, len(zeros))])
            if self.fsync:  # blocks and name durable now: appends then change no metadata
                os.fsync(fd)
                dfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            # Disk full (or any failure) while preparing: leave no partial segment behind.
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return _Segment(path, fd)

    def _start_segment(self) -> _Segment:
        seg = self._free.pop(0) if self._free else self._new_segment()
        self._generation += 1
        seg.generation = self._generation
        os.pwrite(seg.fd, _SEG_HEAD.pack(SEGMENT_MAGIC, seg.generation), 0)
        seg.size = _SEG_HEAD.size
        seg.last_seq = 0
        return seg

    def append(self, header: dict[str, Any], data: bytes | bytearray | memoryview) -> int:
        """Append one record (not yet durable: see :meth:`sync`); returns its sequence number."""
        hdr = _ENCODE(header).encode("utf-8")
        crc = zlib.crc32(data, zlib.crc32(hdr))
        n = _HEAD.size + len(hdr) + len(data)
        with self._lock:
            seg = self._current
            if seg is None or (seg.size + n > self.segment_bytes
                               and seg.size > _SEG_HEAD.size):
                if seg is not None:
                    if self.fsync:
                        os.fdatasync(seg.fd)
                    self._closed.append(seg)
                seg = self._current = self._start_segment()
            head = _HEAD.pack(MAGIC, seg.generation, len(hdr), len(data), crc)
            written = os.pwritev(seg.fd, [head, hdr, data], seg.size)
            if written != n:
                raise OSError(f"journal: short write ({written} of {n} bytes)")
            seg.size += n
            self._seq += 1
            seg.last_seq = self._seq
            return self._seq

    def mark(self) -> tuple[_Segment | None, int, int, int]:
        """Where the journal ends now; :meth:`rollback` to it undoes later appends."""
        with self._lock:
            seg = self._current
            return seg, (seg.size if seg else 0), (seg.last_seq if seg else 0), len(self._closed)

    def rollback(self, mark: tuple[_Segment | None, int, int, int]) -> None:
        """Undo the appends since :meth:`mark` (a batch that failed: never acknowledged).

        The first record after the mark is overwritten with zeros, so a replay stops there
        even if a later flush made the undone bytes durable; segments started since the mark
        stop being replayed (their header is cleared) and become spares again. Writes stay
        inside preallocated space, so this works on a full disk.
        """
        seg0, size0, last0, n_closed = mark
        with self._lock:
            later = [s for s in self._closed[n_closed:] if s is not seg0]
            if self._current is not None and self._current is not seg0:
                later.append(self._current)
            for s in later:
                os.pwrite(s.fd, bytes(_SEG_HEAD.size), 0)
                s.size, s.last_seq = 0, 0
                if s in self._closed:
                    self._closed.remove(s)
                self._free.append(s)
            if seg0 is not None:
                if seg0 in self._closed:
                    self._closed.remove(seg0)
                if size0 + _HEAD.size <= os.fstat(seg0.fd).st_size:
                    os.pwrite(seg0.fd, bytes(_HEAD.size), size0)
                seg0.size, seg0.last_seq = size0, last0
            self._current = seg0

    def sync(self) -> None:
        """Make every record appended so far durable (``fdatasync`` of the open segment)."""
        with self._lock:
            seg = self._current
        if seg is not None and self.fsync:
            os.fdatasync(seg.fd)

    def release_upto(self, seq: int, spool_root: Path, *also: Path) -> int:
        """Recycle closed segments whose records (≤ ``seq``) are all in the spool.

        The spool's file system is synced first (once; and that of each folder in ``also``
        on another file system: the index's, whose rows of these records were committed
        without a flush), so the materialised files and rows are durable before the records
        that back them can be overwritten. Returns how many were recycled.
        """
        with self._lock:
            done = [s for s in self._closed if s.last_seq <= seq]
            if not done:
                return 0
        if self.fsync:
            synced: set[int] = set()
            for folder in (spool_root, *also):
                dev = os.stat(folder).st_dev
                if dev not in synced:
                    syncfs(folder)
                    synced.add(dev)
        with self._lock:
            for s in done:
                self._closed.remove(s)
                os.pwrite(s.fd, bytes(_SEG_HEAD.size), 0)  # no longer replayed
                if len(self._free) < SPARE_SEGMENTS and s.size <= self.segment_bytes:
                    self._free.append(s)
                else:
                    os.close(s.fd)
                    s.path.unlink(missing_ok=True)
        return len(done)

    def close(self, spool_root: Path, *, all_materialised: bool) -> None:
        """Close the segments; delete them when everything they hold is in the spool."""
        with self._lock:
            segs = [*self._closed, *([self._current] if self._current else []), *self._free]
            self._closed, self._current, self._free = [], None, []
        if all_materialised and segs and self.fsync:
            syncfs(spool_root)
        for s in segs:
            os.close(s.fd)
            if all_materialised:
                s.path.unlink(missing_ok=True)

    # -- replay ------------------------------------------------------------------------------

    def pending_segments(self) -> list[Path]:
        """Segments left by a previous run that hold records, oldest generation first."""
        found = [(g, p) for p in self.folder.glob("seg-*.jnl")
                 if (g := _segment_generation(p)) is not None]
        return [p for _, p in sorted(found)]

    def all_segments(self) -> list[Path]:
        """Every segment file (with records or not)."""
        return sorted(self.folder.glob("seg-*.jnl"))


def read_segment(path: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The whole records of one segment, in order; stops at the end of its current use.

    Reading ends at zeros (never written), at a record of the segment's previous use (other
    generation) and at a torn or corrupt record (never acknowledged).
    """
    generation = _segment_generation(path)
    if generation is None:
        return
    with open(path, "rb") as f:
        f.seek(_SEG_HEAD.size)
        while True:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                return
            magic, gen, hlen, dlen, crc = _HEAD.unpack(head)
            if magic != MAGIC or gen != generation:
                return  # zeros, or a record of the segment's previous use
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
