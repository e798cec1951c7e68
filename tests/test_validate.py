"""dicom_node.validate: pydicom's shipped files accepted, broken structure refused, never raises."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from dicom_node import status
from dicom_node.validate import Rejection, validate
from tests.fixtures.part10 import part10_bytes

IMPLICIT = str(ImplicitVRLittleEndian)
EXPLICIT = str(ExplicitVRLittleEndian)
BIG = str(ExplicitVRBigEndian)
DEFLATED = str(DeflatedExplicitVRLittleEndian)

BROKEN = {
    "MR_truncated.dcm": "pixel data cut short",
    "rtplan_truncated.dcm": "cut inside a sequence",
    "SC_rgb_jpeg.dcm": "file meta says JPEG Baseline, the data set is Implicit VR",
    "no_meta.dcm": "a stray space byte before the first element",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "pixel data cut short (pydicom-data)",
}
"""pydicom test files that are broken on purpose (or mislabelled): refused."""


def _split(path: str) -> tuple[bytes, int, str]:
    """(file bytes, offset of the data set, transfer syntax the data set is encoded in)."""
    data = Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as f:
            read_preamble(f, force=True)
            meta = _read_file_meta_info(f)
            offset = f.tell()
        ts = str(meta.get("TransferSyntaxUID", "") or "")
        if not ts:  # no file meta: the encoding pydicom found
            ds = dcmread(path, force=True)
            implicit, little = ds.original_encoding
            ts = IMPLICIT if implicit else (EXPLICIT if little else BIG)
    return data, offset, ts


def _testdata() -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = get_testdata_files("*")
    return sorted(p for p in files if Path(p).is_file()
                  and (p.endswith(".dcm") or "." not in Path(p).name))


VALID = [p for p in _testdata() if Path(p).name not in BROKEN]
PRESENT_BROKEN = sorted({Path(p).name for p in _testdata()} & set(BROKEN))
"""The broken files found (pydicom-data, when installed, adds some)."""


def test_enough_testdata() -> None:
    assert len(VALID) >= 60
    assert len(PRESENT_BROKEN) >= 5


@pytest.mark.parametrize("path", VALID, ids=lambda p: Path(p).name)
def test_pydicom_testdata_accepted(path: str, tmp_path: Path) -> None:
    data, offset, ts = _split(path)
    assert validate(data[offset:], ts) is None
    assert validate(memoryview(data)[offset:], ts) is None
    assert validate(data, ts, offset=offset) is None
    assert validate(io.BytesIO(data), ts, offset=offset) is None
    with open(path, "rb") as f:  # memory-mapped
        assert validate(f, ts, offset=offset) is None


@pytest.mark.parametrize("name", PRESENT_BROKEN)
def test_broken_testdata_refused(name: str) -> None:
    data, offset, ts = _split(get_testdata_file(name))  # type: ignore[arg-type]
    got = validate(data[offset:], ts)
    assert got is not None and got.status == status.CANNOT_UNDERSTAND


# --- hand-made data sets -----------------------------------------------------------------

def _el(group: int, elem: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element."""
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV",
              b"SV", b"UV"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


def _header() -> bytes:
    return (_el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.4\0")
            + _el(0x0008, 0x0018, b"UI", b"1.2.3.4\0")
            + _el(0x0010, 0x0010, b"PN", b"DOE^JANE")
            + _el(0x0010, 0x0030, b"DA", b"19700101")
            + _el(0x0020, 0x000D, b"UI", b"1.2.3\0")
            + _el(0x0020, 0x000E, b"UI", b"1.2.3.5\0"))


PIXELS = b"\x01\x02" * 64


def _reason(got: Rejection | None) -> str:
    assert got is not None, "accepted"
    assert got.status == status.CANNOT_UNDERSTAND
    for value in ("DOE", "JANE", "19700101"):
        assert value not in got.reason
    return got.reason


def test_handmade_valid() -> None:
    data = _header() + _el(0x7FE0, 0x0010, b"OW", PIXELS)
    assert validate(data, EXPLICIT) is None
    frags = (struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE000, 4)
             + b"\xff\xd8\xff\xd9" + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    assert validate(_header() + _el(0x7FE0, 0x0010, b"OB", frags, length=0xFFFFFFFF),
                    str(JPEGBaseline8Bit)) is None


def test_invalid_vr_refused() -> None:
    data = _header() + _el(0x0028, 0x0030, b"ZZ", b"1.5\0") + _el(0x7FE0, 0x0010, b"OW", PIXELS)
    assert "invalid VR" in _reason(validate(data, EXPLICIT))
    for bad in (b"\0\0", b"ds", b"A1", b"  "):
        assert validate(_header() + _el(0x0028, 0x0030, bad, b"1.5\0"), EXPLICIT) is not None


def test_native_pixel_data_undefined_length_refused() -> None:
    delim = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    for tail in (b"", delim):  # without and with a delimiter
        data = _header() + _el(0x7FE0, 0x0010, b"OW", PIXELS + tail, length=0xFFFFFFFF)
        assert "native pixel data" in _reason(validate(data, EXPLICIT))
        big = struct.pack(">HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 0xFFFFFFFF) + PIXELS
        assert "native pixel data" in _reason(validate(big, BIG))
    implicit = struct.pack("<HHL", 0x0008, 0x0018, 8) + b"1.2.3.4\0" + struct.pack(
        "<HHL", 0x7FE0, 0x0010, 0xFFFFFFFF) + PIXELS
    assert "native pixel data" in _reason(validate(implicit, IMPLICIT))


def test_encapsulated_without_delimiter_refused() -> None:
    frags = (struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE000, 4)
             + b"abcd")
    got = validate(_header() + _el(0x7FE0, 0x0010, b"OB", frags, length=0xFFFFFFFF),
                   str(JPEGBaseline8Bit))
    assert "delimiter" in _reason(got)


def test_element_past_end_refused() -> None:
    data = _header() + _el(0x7FE0, 0x0010, b"OW", PIXELS)
    for cut in (1, 2, 50, len(PIXELS) - 1, len(PIXELS) + 3):
        assert "truncated" in _reason(validate(data[:-cut], EXPLICIT))
    grown = _header() + _el(0x0028, 0x0030, b"DS", b"1.5\0", length=200)
    assert "truncated" in _reason(validate(grown, EXPLICIT))


def test_out_of_order_and_repeated_tags_refused() -> None:
    a = _el(0x0008, 0x0018, b"UI", b"1.2.3.4\0")
    b = _el(0x0008, 0x0016, b"UI", b"1.2\0")
    assert "order" in _reason(validate(a + b, EXPLICIT))
    assert "order" in _reason(validate(a + a, EXPLICIT))


def test_undefined_length_on_a_value_refused() -> None:
    data = _el(0x0008, 0x0018, b"UT", b"1.2.3.4\0", length=0xFFFFFFFF)
    assert "undefined length" in _reason(validate(data, EXPLICIT))


def test_item_tag_at_top_level_refused() -> None:
    data = _header() + struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    assert "item" in _reason(validate(data, EXPLICIT))


def _seq(items: list[bytes], *, defined: bool) -> bytes:
    body = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(i)) + i for i in items)
    if defined:
        return _el(0x0008, 0x1140, b"SQ", body)
    return _el(0x0008, 0x1140, b"SQ", body + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0),
               length=0xFFFFFFFF)


def test_sequences() -> None:
    item = _el(0x0008, 0x1150, b"UI", b"1.2\0") + _el(0x0008, 0x1155, b"UI", b"1.3\0")
    for defined in (True, False):
        assert validate(_seq([item, item], defined=defined), EXPLICIT) is None
    bad = _el(0x0008, 0x1150, b"ZZ", b"1.2\0")  # an invalid VR inside an item
    for defined in (True, False):
        assert "invalid VR" in _reason(validate(_seq([item, bad], defined=defined), EXPLICIT))
    # An undefined-length sequence that never ends.
    unterminated = _el(0x0008, 0x1140, b"SQ", struct.pack("<HHL", 0xFFFE, 0xE000, len(item))
                       + item, length=0xFFFFFFFF)
    assert "delimiter" in _reason(validate(unterminated, EXPLICIT))
    # Nesting bomb: refused, not a RecursionError.
    deep = _el(0x0008, 0x1150, b"UI", b"1.2\0")
    for _ in range(200):
        deep = _seq([deep], defined=True)
    assert "nested" in _reason(validate(deep, EXPLICIT))


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def test_deflated() -> None:
    plain = _header() + _el(0x7FE0, 0x0010, b"OW", PIXELS)
    packed = _deflate(plain)
    assert validate(packed, DEFLATED) is None
    assert validate(packed + b"\0", DEFLATED) is None  # PS3.5 A.5 padding
    trailer = struct.pack("<LL", zlib.crc32(plain), len(plain))
    assert validate(packed + trailer, DEFLATED) is None  # a gzip trailer that matches
    assert "after the end" in _reason(validate(packed + b"junk", DEFLATED))
    assert "after the end" in _reason(validate(packed + trailer[:4] + b"\0\0\0\0", DEFLATED))
    assert "cut short" in _reason(validate(packed[:-3], DEFLATED))
    assert _reason(validate(b"\xff" * 40, DEFLATED))
    # Raw deflate has no checksum: a flip in literal data may inflate to another valid data
    # set. Most flips break the stream or the structure it inflates to.
    refused = 0
    for i in range(len(packed)):
        flipped = bytearray(packed)
        flipped[i] ^= 0xFF
        got = validate(bytes(flipped), DEFLATED)
        refused += got is not None
    assert refused > len(packed) // 2, (refused, len(packed))
    # The inflated data set is walked too.
    assert "invalid VR" in _reason(validate(_deflate(_el(0x0008, 0x0018, b"ZZ", b"1\0")),
                                            DEFLATED))
    bomb = _deflate(_el(0x0008, 0x0018, b"OB", b"\0" * 1_000_000))
    got = validate(bomb, DEFLATED, max_inflated_bytes=100_000)
    assert got is not None and got.status == status.OUT_OF_RESOURCES


def test_empty_refused() -> None:
    for ts in (IMPLICIT, EXPLICIT, DEFLATED):
        assert validate(b"", ts) is not None
    assert validate(io.BytesIO(b""), EXPLICIT) is not None


def test_empty_file_refused(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with open(p, "rb") as f:
        assert validate(f, EXPLICIT) is not None


def test_trailing_zero_padding_accepted() -> None:
    data = _header() + _el(0x7FE0, 0x0010, b"OW", PIXELS)
    assert validate(data + b"\0" * 6, EXPLICIT) is None
    assert validate(data + b"\0" * 64, EXPLICIT) is None
    assert validate(data + b"\0" * 64 + b"\1", EXPLICIT) is not None


@pytest.mark.parametrize("path", [p for p in VALID if _split(p)[2] != DEFLATED][:40],
                         ids=lambda p: Path(p).name)
def test_flipped_vr_and_length_bytes_refused(path: str) -> None:
    """A VR byte made invalid, or an element's length grown past the end: refused."""
    data, offset, ts = _split(path)
    body = bytearray(data[offset:])
    if ts == IMPLICIT:
        grown = bytearray(body)
        grown[4:8] = struct.pack("<L", len(body) + 1)  # first element's length
        assert validate(bytes(grown), ts) is not None
        return
    bad_vr = bytearray(body)
    bad_vr[4] = ord("z")  # first element's VR
    assert "invalid VR" in _reason(validate(bytes(bad_vr), ts))
    cut = body[:-1]
    got = validate(bytes(cut), ts)
    if got is not None:
        _reason(got)


def test_truncations_inside_pixel_data_refused() -> None:
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm",
                 "MR_small_bigendian.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"):
        data, offset, ts = _split(get_testdata_file(name))  # type: ignore[arg-type]
        body = data[offset:]
        for cut in (1, 2, 7, 100, 1000):
            assert validate(body[:-cut], ts) is not None, (name, cut)


def test_cost_per_instance() -> None:
    """Cheap enough for > 1,000 instances/s on one core.

    Measured in this thread's CPU time (``time.thread_time``), which other processes on a
    shared machine do not inflate the way they do wall-clock time.
    """
    data, offset, ts = _split(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    view = memoryview(data)[offset:]
    runs = 200
    cpu0 = time.thread_time()
    for _ in range(runs):
        assert validate(view, ts) is None
    cpu_per_instance_s = (time.thread_time() - cpu0) / runs
    assert cpu_per_instance_s < 0.001, cpu_per_instance_s  # ~0.1 ms on an idle core


# --- properties ----------------------------------------------------------------------------

TRANSFER_SYNTAXES = [IMPLICIT, EXPLICIT, BIG, DEFLATED, str(JPEGBaseline8Bit),
                     "1.2.840.10008.1.2.5", "", "9.9.9"]
SEEDS = [d for d in (_split(p) for p in VALID[:30])]


def _check_result(got: Rejection | None) -> None:
    if got is not None:
        assert isinstance(got, Rejection)
        assert got.status in status.STORE_FAILURES
        assert isinstance(got.reason, str) and got.reason


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), ts=st.sampled_from(TRANSFER_SYNTAXES))
def test_random_bytes_never_raise(data: bytes, ts: str) -> None:
    _check_result(validate(data, ts))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(SEEDS))),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8),
       cut=st.integers(0, 10**6), insert=st.binary(max_size=16))
def test_mutated_files_never_raise(seed: int, flips: list[tuple[int, int]], cut: int,
                                   insert: bytes) -> None:
    data, offset, ts = SEEDS[seed]
    body = bytearray(data[offset:])
    for where, mask in flips:
        body[where % len(body)] ^= mask
    at = cut % (len(body) + 1)
    body[at:at] = insert
    _check_result(validate(bytes(body), ts))
    _check_result(validate(bytes(body[:at]), ts))


_TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ^", max_size=40)
_ELEMENTS = {
    "PatientName": _TEXT, "PatientID": _TEXT, "StudyDescription": _TEXT,
    "SeriesDescription": _TEXT, "InstanceNumber": st.integers(-1000, 10**6),
    "SliceThickness": st.floats(0.1, 100, allow_nan=False).map(lambda x: round(x, 3)),
    "Rows": st.integers(0, 65535), "ImageComments": st.text(max_size=200),
    "ImageType": st.lists(st.sampled_from(["ORIGINAL", "PRIMARY", "M", "DERIVED"]),
                          max_size=4),
    "WindowCenter": st.lists(st.integers(-3000, 3000), min_size=1, max_size=3),
}


@st.composite
def _datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword in draw(st.lists(st.sampled_from(sorted(_ELEMENTS)), unique=True)):
        setattr(ds, keyword, draw(_ELEMENTS[keyword]))
    if draw(st.booleans()):
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ref.ReferencedSOPInstanceUID = generate_uid()
        ds.ReferencedImageSequence = [ref] * draw(st.integers(0, 3))
    if draw(st.booleans()):
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 4, 4, 16, 12
        ds.PixelData = draw(st.binary(min_size=32, max_size=32))
    return ds


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ds=_datasets(), ts=st.sampled_from([IMPLICIT, EXPLICIT, BIG, DEFLATED]))
def test_valid_datasets_always_pass(ds: Dataset, ts: str) -> None:
    """Whatever pydicom writes in a native transfer syntax is accepted."""
    part10, offset = part10_bytes(ds, ts)
    assert validate(part10, ts, offset=offset) is None


def test_binary_number_with_a_broken_length_refused() -> None:
    """pydicom raises BytesLengthException on such a value when the router reads the header."""
    for vr, value in ((b"US", b"\1\2\3"), (b"UL", b"\1\2\3\4\5\6"), (b"FD", b"\0" * 12),
                      (b"SS", b"\1")):
        data = _header() + _el(0x0028, 0x0030, vr, value)
        assert "multiple" in _reason(validate(data, EXPLICIT))
    assert validate(_header() + _el(0x0028, 0x0030, b"US", b"\1\2\3\4"), EXPLICIT) is None
    sv = _header() + _el(0x0028, 0x0030, b"SV", b"\0" * 9)
    assert "multiple" in _reason(validate(sv, EXPLICIT))
