"""The header of a received data set, read without pydicom where that is safe.

:func:`scan_header` walks the top-level elements of an Implicit / Explicit VR Little Endian
data set with :mod:`struct` (0.06-0.1 ms instead of 0.6-0.9 ms with pydicom); anything unusual
falls back to :func:`read_header_bytes` (pydicom, the same checks as
:func:`dicom_node.spool.read_header`). Both are tested equal on every shipped MR file.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from dicom_node import status
from dicom_node.spool import (
    _LONG_VRS,
    InstanceHeader,
    InstanceRejected,
    _int_or_none,
    _skip_encapsulated,
    read_header_from,
)
from dicom_node.validate import _NUMBER_SIZE, _VRS

_TAGS_STR = {0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid",
             0x0020000D: "study_instance_uid", 0x0020000E: "series_instance_uid",
             0x00080060: "modality", 0x0008103E: "series_description"}
_TAGS_IS = {0x00200013: "instance_number", 0x00280008: "number_of_frames",
            0x00200105: "number_of_temporal_positions"}
_NUMBER_OF_SLICES = 0x00540081
_PIXEL_DATA = 0x7FE00010
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_IMPLICIT_HEAD = struct.Struct("<HHL")
_LONG = struct.Struct("<L")
_VR_INFO: dict[bytes, tuple[bool, int]] = {
    vr: (vr in _LONG_VRS, -1 if vr == b"SQ" else _NUMBER_SIZE.get(vr, 0)) for vr in _VRS}
"""Standard VR → (long-form length?, what :func:`~dicom_node.validate.validate` checks of its
length: 0 nothing, -1 a sequence (walked: only an empty one passes the one walk), n: a
multiple of n bytes)."""
_WANTED: dict[int, tuple[str, bool]] = {
    **{tag: (name, False) for tag, name in _TAGS_STR.items()},
    **{tag: (name, True) for tag, name in _TAGS_IS.items()},
    _NUMBER_OF_SLICES: ("number_of_slices", True)}
"""Header tag → (field name, an integer?)."""


def scan_header(dataset: bytes | bytearray | memoryview, transfer_syntax: str, *,
                validated: bool = False) -> InstanceHeader | None:
    """The header fields of an Implicit/Explicit VR Little Endian data set, in one pass.

    Walks the top-level elements with :mod:`struct` (no pydicom objects), taking the
    :data:`~dicom_node.spool.HEADER_TAGS` and checking that every element ends inside the
    data (encapsulated pixel data included). ``None`` whenever anything is unusual (another
    transfer syntax, tags out of order, an undefined-length sequence, multi-valued or
    non-ASCII values, ...): the caller then uses pydicom (:func:`read_header_bytes`).

    Args:
        dataset: The data set as received (no preamble, no file meta).
        transfer_syntax: Its negotiated transfer syntax UID.
        validated: The walk also stands in for :func:`dicom_node.validate.validate`: a
            header is answered only for a data set ``validate`` accepts for certain (every
            top-level element of defined length inside the data, a standard VR whose
            length fits its number size, tags ascending, no item tags, no sequence with
            content, not empty); anything else, truncation included, answers ``None`` (no
            raise), and the caller validates and reads the header the usual way. Saves the
            second walk over the same elements (~0.1 ms per instance).

    Raises:
        InstanceRejected: ``CANNOT_UNDERSTAND`` when an element runs past the end (unless
            ``validated``); ``MISSING_UIDS`` when a required UID is absent or empty.
    """
    if transfer_syntax == _EXPLICIT_LE:
        explicit = True
    elif transfer_syntax == _IMPLICIT_LE:
        explicit = False
    else:
        return None
    size = len(dataset)
    if validated and size == 0:
        return None
    hdr_ex = _EXPLICIT_HEAD.unpack_from
    hdr_im = _IMPLICIT_HEAD.unpack_from
    u32 = _LONG.unpack_from
    vr_info = _VR_INFO
    wanted = _WANTED
    pos = 0
    last_tag = -1
    found: dict[str, Any] = {}
    while pos < size:
        if pos + 8 > size:
            return None
        if explicit:
            group, elem, vr, length = hdr_ex(dataset, pos)
            info = vr_info.get(vr)
            if info is None:
                # Not a standard VR: validate judges it; the plain header read takes any
                # two upper-case letters (short form unless a long-form VR).
                if validated:
                    return None
                if vr in _LONG_VRS:
                    info = (True, 0)
                elif b"A" <= vr[:1] <= b"Z" and b"A" <= vr[1:] <= b"Z":
                    info = (False, 0)
                else:
                    return None
            long_form, kind = info
            if long_form:
                if pos + 12 > size:
                    return None
                (length,) = u32(dataset, pos + 8)
                start = pos + 12
            else:
                start = pos + 8
            if kind and validated and (
                    length if kind < 0 else (length % kind and length != 0xFFFFFFFF)):
                return None  # validate walks sequences and judges number sizes
        else:
            group, elem, length = hdr_im(dataset, pos)
            start = pos + 8
        tag = (group << 16) | elem
        if tag <= last_tag or group < 0x0008 or (validated and group == 0xFFFE):
            return None
        last_tag = tag
        if length == 0xFFFFFFFF:
            if validated or tag != _PIXEL_DATA:
                return None  # an undefined-length sequence: pydicom walks it
            end = _skip_encapsulated(BytesIO(bytes(dataset)), start, size, "<")
            if end is None:
                return None
            pos = end
            continue
        end = start + length
        if end > size:
            if validated:
                return None
            raise InstanceRejected(status.CANNOT_UNDERSTAND,
                                   "truncated: an element runs past the end of the data")
        want = wanted.get(tag)
        if want is not None:
            name, as_int = want
            if name == "number_of_slices":
                if length != 2:
                    return None
                found[name] = int(struct.unpack_from("<H", dataset, start)[0])
            else:
                raw = bytes(dataset[start:end])
                if b"\\" in raw or not raw.isascii() or b"\x7f" in raw:
                    return None
                text = raw.decode("ascii").rstrip(" \0")
                if text != text.lstrip():
                    return None
                found[name] = _int_or_none(text) if as_int else text
        pos = end
    missing = [k for k, name in (("SOPClassUID", "sop_class_uid"),
                                 ("SOPInstanceUID", "sop_instance_uid"),
                                 ("StudyInstanceUID", "study_instance_uid"),
                                 ("SeriesInstanceUID", "series_instance_uid"))
               if not found.get(name)]
    if missing:
        raise InstanceRejected(status.MISSING_UIDS, "missing " + ", ".join(missing))
    return InstanceHeader(
        transfer_syntax_uid=transfer_syntax,
        number_of_frames=found.pop("number_of_frames", None) or 1,
        **found,
    )


def read_header_bytes(part10: bytes | bytearray) -> InstanceHeader:
    """:func:`dicom_node.spool.read_header` for a Part 10 file held in memory.

    Raises:
        InstanceRejected: ``CANNOT_UNDERSTAND`` (not DICOM, truncated) or ``MISSING_UIDS``.
    """
    return read_header_from(BytesIO(part10), len(part10))
