"""Validation at the door: refuse a received data set that later stages cannot handle.

:func:`validate` walks the element structure of a data set as it arrived over the network
(no preamble, no file meta), in the negotiated transfer syntax, with :mod:`struct` only: no
pydicom objects, no value decoding, pixel data skipped by its length. It refuses

- an element whose value runs past the end of the data (truncation, a flipped length byte);
- an Explicit VR element with a VR code that is not one of PS3.5 Table 6.2-1's, or a binary
  number VR (US, SS, UL, SL, FL, AT, FD, SV, UV) whose length is not a multiple of its size
  (pydicom raises on such a value when the header is read);
- native (uncompressed) Pixel Data with undefined length, with or without a delimiter;
- encapsulated Pixel Data without its Sequence Delimitation Item, or with a non-item inside;
- an undefined length on an element that cannot have one (only SQ, UN and Pixel Data can);
- a sequence or item that does not end where its length says, or never ends;
- tags out of ascending order (or repeated) inside one data set or item;
- a Deflated data set that does not inflate, is cut short, has bytes after the deflate
  stream (other than the padding byte PS3.5 A.5 allows, or a gzip trailer whose CRC-32 and
  size match), or inflates past a limit;

and answers ``None`` for everything else. The reason it gives names the problem and a byte
offset, never a value of the data set (a misaligned walk reads patient data as tags and VRs).

Cost: a few microseconds per element (one ``struct.unpack_from`` and a few comparisons);
a Part 10 header has 50-300 elements, pixel data is one element and is never read.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from typing import IO, Final, NamedTuple

from dicom_node import status

__all__ = ["Rejection", "validate", "DEFAULT_MAX_INFLATED_BYTES"]


class Rejection(NamedTuple):
    """Why a data set is refused: the C-STORE status to answer and a reason for the log.

    ``reason`` holds only structure (a kind of problem and byte offsets), never a value.
    """

    status: int
    reason: str


DEFAULT_MAX_INFLATED_BYTES: Final = 4 * 1024**3
"""Default limit (bytes) on what a Deflated data set may inflate to (a deflate bomb guard)."""

MAX_DEPTH: Final = 32
"""Deepest sequence nesting walked; deeper is refused (no real IOD nests nearly that deep)."""

_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
_DEFLATED: Final = frozenset({"1.2.840.10008.1.2.1.99"})
_NATIVE: Final = frozenset({_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE, *_DEFLATED})

_VRS: Final = frozenset({
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
    b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"})
"""The VR codes of PS3.5 Table 6.2-1."""
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                              b"UN", b"UR", b"UT", b"UV"})
"""VRs with a reserved 2 bytes and a 4-byte length (PS3.5 7.1.2)."""
_NUMBER_SIZE: Final = {b"US": 2, b"SS": 2, b"UL": 4, b"SL": 4, b"FL": 4, b"AT": 4, b"FD": 8,
                       b"SV": 8, b"UV": 8}
"""Binary number VRs and the size of one value, bytes."""

_UNDEFINED: Final = 0xFFFFFFFF
_PIXEL_DATA: Final = 0x7FE00010
_ITEM: Final = 0xFFFEE000
_ITEM_DELIM: Final = 0xFFFEE00D
_SEQ_DELIM: Final = 0xFFFEE0DD
_ITEM_GROUP: Final = 0xFFFE


_IMPL_LE: Final = struct.Struct("<HHL")
_U32_LE: Final = struct.Struct("<L")


class _Bad(Exception):
    """Internal: the walk found a problem (carries the reason)."""


class _Walker:
    """One walk over a buffer in one encoding."""

    __slots__ = ("buf", "size", "explicit", "native", "hdr_ex", "hdr_im", "u32", "depth")

    def __init__(self, buf: bytes | bytearray | memoryview | mmap.mmap, explicit: bool,
                 little: bool, native: bool) -> None:
        self.buf = buf
        self.size = len(buf)
        self.explicit = explicit
        self.native = native
        e = "<" if little else ">"
        self.hdr_ex = struct.Struct(e + "HH2sH").unpack_from
        self.hdr_im = struct.Struct(e + "HHL").unpack_from
        self.u32 = struct.Struct(e + "L").unpack_from
        self.depth = 0

    def dataset(self, pos: int, end: int, *, top: bool = False,
                until_item_delim: bool = False, implicit: bool = False) -> int:
        """Walk the elements of one data set from ``pos``; return where it ends.

        ``end`` bounds it (an item's length or the buffer); ``until_item_delim``: the item
        has undefined length and ends at an Item Delimitation Item. ``implicit``: encoded in
        Implicit VR Little Endian whatever the transfer syntax (inside a UN sequence).
        """
        buf = self.buf
        explicit = self.explicit and not implicit
        hdr_ex = self.hdr_ex
        hdr_im = _IMPL_LE.unpack_from if implicit else self.hdr_im
        u32 = _U32_LE.unpack_from if implicit else self.u32
        last = -1
        while pos < end:
            if pos + 8 > end:
                if top and not any(buf[pos:end]):
                    return end  # trailing zero padding after the data set
                raise _Bad(f"truncated: partial element header at offset {pos}")
            if explicit:
                group, elem, vr, short = hdr_ex(buf, pos)
            else:
                group, elem, length = hdr_im(buf, pos)
                vr = b""
            tag = (group << 16) | elem
            if group == _ITEM_GROUP:
                if tag == _ITEM_DELIM and until_item_delim:
                    if u32(buf, pos + 4)[0] != 0:
                        raise _Bad(f"item delimiter with a length at offset {pos}")
                    return pos + 8
                raise _Bad(f"item or delimiter tag where an element belongs at offset {pos}")
            if tag <= last:
                if top and tag == 0 and not any(buf[pos:end]):
                    return end  # trailing zero padding after the data set
                raise _Bad(f"tags out of order or repeated at offset {pos}")
            last = tag
            if explicit:
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise _Bad(f"truncated: partial element header at offset {pos}")
                    (length,) = u32(buf, pos + 8)
                    start = pos + 12
                elif vr in _VRS:
                    length = short
                    start = pos + 8
                else:
                    if top and tag == 0 and not any(buf[pos:end]):
                        return end
                    raise _Bad(f"invalid VR code at offset {pos}")
                if length % _NUMBER_SIZE.get(vr, 1) and length != _UNDEFINED:
                    raise _Bad(f"value length not a multiple of its VR's size at offset {pos}")
            else:
                start = pos + 8
            if length == _UNDEFINED:
                pos = self._undefined(tag, vr, start, end, pos, implicit)
                continue
            pos = start + length
            if pos > end:
                raise _Bad(f"truncated: element at offset {start - 8} runs "
                           f"{pos - end} bytes past the end of its data set")
            if vr == b"SQ" and length:
                self._sequence(start, pos, defined=True, implicit=implicit)
        if until_item_delim:
            raise _Bad("truncated: item without its delimiter")
        return pos

    def _undefined(self, tag: int, vr: bytes, start: int, end: int, at: int,
                   implicit: bool) -> int:
        """End of an element of undefined length whose value starts at ``start``."""
        if tag == _PIXEL_DATA:
            if self.native:
                raise _Bad(f"native pixel data with undefined length at offset {at}")
            return self._fragments(start, end)
        if self.explicit and not implicit:
            if vr == b"SQ":
                return self._sequence(start, end, defined=False, implicit=False)
            if vr == b"UN":  # PS3.5 6.2.2: a sequence in Implicit VR Little Endian
                return self._sequence(start, end, defined=False, implicit=True)
            raise _Bad(f"undefined length on a non-sequence element at offset {at}")
        return self._sequence(start, end, defined=False, implicit=True)

    def _sequence(self, pos: int, end: int, *, defined: bool, implicit: bool) -> int:
        """Walk a sequence's items from ``pos``; return where the sequence ends."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Bad(f"sequences nested deeper than {MAX_DEPTH} at offset {pos}")
        buf = self.buf
        # Inside a UN sequence the encoding is Implicit VR *Little* Endian.
        hdr = _IMPL_LE.unpack_from if implicit else self.hdr_im
        while pos < end:
            if pos + 8 > end:
                raise _Bad(f"truncated: partial item header at offset {pos}")
            group, elem, length = hdr(buf, pos)
            tag = (group << 16) | elem
            if tag == _SEQ_DELIM and not defined:
                if length != 0:
                    raise _Bad(f"sequence delimiter with a length at offset {pos}")
                self.depth -= 1
                return pos + 8
            if tag != _ITEM:
                raise _Bad(f"non-item inside a sequence at offset {pos}")
            start = pos + 8
            if length == _UNDEFINED:
                pos = self.dataset(start, end, until_item_delim=True, implicit=implicit)
            else:
                pos = start + length
                if pos > end:
                    raise _Bad(f"truncated: item at offset {start - 8} runs past the end "
                               "of its sequence")
                self.dataset(start, pos, implicit=implicit)
        if not defined:
            raise _Bad("truncated: sequence without its delimiter")
        self.depth -= 1
        return pos

    def _fragments(self, pos: int, end: int) -> int:
        """End of encapsulated pixel data (items, then a Sequence Delimitation Item)."""
        buf = self.buf
        hdr = self.hdr_im
        while pos + 8 <= end:
            group, elem, length = hdr(buf, pos)
            tag = (group << 16) | elem
            if tag == _SEQ_DELIM:
                return pos + 8
            if tag != _ITEM:
                raise _Bad(f"non-item inside encapsulated pixel data at offset {pos}")
            if length == _UNDEFINED:
                raise _Bad(f"pixel data fragment of undefined length at offset {pos}")
            pos += 8 + length
        raise _Bad("truncated: encapsulated pixel data without its sequence delimiter")


def _inflate(data: bytes | bytearray | memoryview | mmap.mmap, limit: int
             ) -> bytes | Rejection:
    """Inflate a Deflated data set (raw deflate, PS3.5 A.5); a :class:`Rejection` if bad."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out: list[bytes] = []
    total = 0
    view = memoryview(data)
    step = 1 << 20
    try:
        for i in range(0, len(view), step):
            chunk = d.decompress(view[i:i + step], limit + 1 - total)
            total += len(chunk)
            out.append(chunk)
            while d.unconsumed_tail and total <= limit:
                chunk = d.decompress(d.unconsumed_tail, limit + 1 - total)
                total += len(chunk)
                out.append(chunk)
            if total > limit:
                return Rejection(status.OUT_OF_RESOURCES,
                                 f"deflated data set inflates past {limit} bytes")
            if d.eof:
                break
        tail = d.flush()
        total += len(tail)
        out.append(tail)
    except zlib.error:
        return Rejection(status.CANNOT_UNDERSTAND, "deflated data set does not inflate")
    finally:
        view.release()
    if total > limit:
        return Rejection(status.OUT_OF_RESOURCES,
                         f"deflated data set inflates past {limit} bytes")
    if not d.eof:
        return Rejection(status.CANNOT_UNDERSTAND, "truncated: deflate stream cut short")
    inflated = b"".join(out)
    extra = d.unused_data
    if extra not in (b"", b"\0") and extra not in _gzip_trailers(inflated):
        return Rejection(status.CANNOT_UNDERSTAND,
                         f"{len(extra)} bytes after the end of the deflate stream")
    return inflated


def _gzip_trailers(inflated: bytes) -> tuple[bytes, bytes]:
    """The gzip trailer some writers put after the stream, without and with a padding byte.

    8 bytes: the CRC-32 of the inflated data and its size (bytes) mod 2**32.
    """
    trailer = struct.pack("<LL", zlib.crc32(inflated), len(inflated) & 0xFFFFFFFF)
    return trailer, trailer + b"\0"


def validate(data: bytes | bytearray | memoryview | IO[bytes], transfer_syntax_uid: str, *,
             offset: int = 0, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES
             ) -> Rejection | None:
    """Check a received data set's structure; ``None`` if later stages can handle it.

    Parameters
    ----------
    data
        The data set as received (no preamble, no file meta), or a buffer/file that holds it
        from ``offset``: bytes-like, or a binary file object (a real file is memory-mapped,
        so only the pages of element headers are read; any other object is read whole).
    transfer_syntax_uid
        The presentation context's transfer syntax. Implicit VR Little Endian, Explicit VR Big
        Endian and Deflated Explicit VR Little Endian are recognised; any other is walked as
        Explicit VR Little Endian (what every other standard transfer syntax is), with
        encapsulated Pixel Data required unless it is Explicit VR Little Endian itself.
    offset
        Byte offset of the data set in ``data`` (e.g. the length of a Part 10 preamble and
        file meta held in front of it).
    max_inflated_bytes
        Largest size (bytes) a Deflated data set may inflate to; past it the answer is
        ``OUT_OF_RESOURCES`` (0xA700).

    Returns
    -------
    Rejection or None
        ``None`` when acceptable, else the status to answer (``CANNOT_UNDERSTAND``, 0xC000,
        for every structural problem) and a reason naming no value of the data set. Never
        raises for any content of ``data`` (an unreadable file object raises its ``OSError``).
    """
    ts = transfer_syntax_uid.strip().rstrip("\0")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _validate_buffer(data, ts, offset, max_inflated_bytes)
    try:
        fileno = data.fileno()
    except (AttributeError, OSError, ValueError):
        fileno = -1
    if fileno >= 0:
        try:
            mm = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            return _validate_buffer(b"", ts, 0, max_inflated_bytes)
        try:
            return _validate_buffer(mm, ts, offset, max_inflated_bytes)
        finally:
            mm.close()
    data.seek(offset)
    return _validate_buffer(data.read(), ts, 0, max_inflated_bytes)


def _validate_buffer(buf: bytes | bytearray | memoryview | mmap.mmap, ts: str, offset: int,
                     max_inflated_bytes: int) -> Rejection | None:
    if isinstance(buf, memoryview) and (buf.ndim != 1 or buf.itemsize != 1):
        buf = buf.cast("B")
    if offset:
        buf = memoryview(buf)[offset:]
    if len(buf) == 0:
        return Rejection(status.CANNOT_UNDERSTAND, "empty data set")
    if ts in _DEFLATED:
        inflated = _inflate(buf, max_inflated_bytes)
        if isinstance(inflated, Rejection):
            return inflated
        buf = inflated
        if not buf:
            return Rejection(status.CANNOT_UNDERSTAND, "empty data set")
    walker = _Walker(buf, explicit=ts != _IMPLICIT_LE, little=ts != _EXPLICIT_BE,
                     native=ts in _NATIVE)
    try:
        walker.dataset(0, len(buf), top=True)
    except _Bad as bad:
        return Rejection(status.CANNOT_UNDERSTAND, str(bad))
    except (struct.error, IndexError, ValueError, TypeError):  # pragma: no cover - guard
        return Rejection(status.CANNOT_UNDERSTAND, "undecodable element structure")
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps far below the limit
        return Rejection(status.CANNOT_UNDERSTAND, "sequences nested too deep")
    return None
