"""Issue #17 item 6: library warnings and logging go through the PHI scrubber."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.logs import REPEAT_EVERY, configure_logging, get_logger, scrub_text
from tests.fixtures.node import NodeProcess, store_files

NAME, BIRTH = "DOE^JANE", "19700101"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The node's logging configured onto a buffer; the previous hooks restored after."""
    out = io.StringIO()
    old = (warnings.showwarning, threading.excepthook, list(logging.getLogger().handlers),
           logging.getLogger().level)
    configure_logging("info", "json", stream=out)
    try:
        yield out
    finally:
        warnings.showwarning, threading.excepthook = old[0], old[1]
        root = logging.getLogger()
        root.handlers[:] = old[2]
        root.setLevel(old[3])
        structlog.reset_defaults()


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def _corrupted(tmp_path: Path) -> Path:
    """An MR header whose Frame of Reference UID swallowed the name and birth date."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientName = NAME
    ds.PatientBirthDate = BIRTH
    ds.FrameOfReferenceUID = f"1.2.{NAME}{BIRTH}"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "corrupt.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def test_scrub_text() -> None:
    assert scrub_text(f"Invalid value for VR UI: '{NAME}{BIRTH}'") == (
        "Invalid value for VR UI: <value>")
    assert NAME not in scrub_text(f"name {NAME} here") and BIRTH not in scrub_text(f"b {BIRTH}")
    assert BIRTH not in scrub_text("1970-01-01 was the date")
    assert scrub_text("tag (0020,000D) UID 1.2.19700101.3 length 64") == (
        "tag (0020,000D) UID 1.2.19700101.3 length 64")
    assert NAME not in scrub_text(f"unbalanced 'quote {NAME}")
    assert scrub_text("two\nlines 'x'") == "two\nlines <value>"


def test_pydicom_warning_is_scrubbed(captured: io.StringIO, tmp_path: Path) -> None:
    path = _corrupted(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)
        for elem in ds:  # converting the values raises pydicom's warnings
            _ = elem.value
    text = captured.getvalue()
    events = _lines(captured)
    assert any(e["event"] == "library_log" and "Invalid value for VR UI" in str(e["message"])
               for e in events), text
    assert NAME not in text and "DOE" not in text and BIRTH not in text


def test_stdlib_logging_is_bridged_and_scrubbed(captured: io.StringIO) -> None:
    logging.getLogger("pydicom").warning("Invalid value for VR UI: '%s'", NAME + BIRTH)
    logging.getLogger("somelib").error("value %s was bad", NAME)
    try:
        raise ValueError(f"bad {NAME} {BIRTH}")
    except ValueError:
        logging.getLogger("otherlib").exception("failed on '%s'", BIRTH)
    text = captured.getvalue()
    assert "DOE" not in text and BIRTH not in text
    events = [e for e in _lines(captured) if e["event"] == "library_log"]
    assert [e["library"] for e in events] == ["pydicom", "somelib", "otherlib"]
    assert "ValueError" in str(events[2]["exception"])


def test_repeats_are_summarised(captured: io.StringIO) -> None:
    lib = logging.getLogger("floodlib")
    for i in range(REPEAT_EVERY + 5):
        lib.warning("Invalid value for VR UI: '%s'", f"{NAME}{i}")
    events = [e for e in _lines(captured) if e.get("library") == "floodlib"]
    assert len(events) == 2 and events[1]["repeats"] == REPEAT_EVERY


def test_node_own_error_and_exception_text_scrubbed(captured: io.StringIO) -> None:
    log = get_logger("t")
    log.error("x", error=f"could not parse '{NAME}'")
    try:
        raise RuntimeError(f"value '{BIRTH}'")
    except RuntimeError:
        log.exception("y")
    text = captured.getvalue()
    assert "DOE" not in text and BIRTH not in text and "RuntimeError" in text


def test_thread_crash_is_scrubbed(captured: io.StringIO) -> None:
    def boom() -> None:
        raise KeyError(f"{NAME} {BIRTH}")

    t = threading.Thread(target=boom, name="boom")
    t.start()
    t.join()
    text = captured.getvalue()
    assert "thread_crashed" in text and "DOE" not in text and BIRTH not in text


def test_node_log_has_no_value_of_a_corrupted_data_set(node_factory: Any,
                                                       tmp_path: Path) -> None:
    """Through a real node: received, routed (headers read by pydicom), nothing in node.log."""
    node: NodeProcess = node_factory(start=False)
    node.start(timeout_s=90)  # a loaded machine can take more than the default 30 s
    path = _corrupted(tmp_path)
    statuses = store_files(node.port, [path])
    assert len(statuses) == 1
    if statuses[0] == 0:  # stored: wait until the router read its headers
        node.wait_for_event("series routed", timeout_s=30)
        assert node.events("library_log"), "pydicom's warning did not reach the log"
    node.stop()
    text = node.log_path.read_text(errors="replace")
    audit = (node.root / "var" / "audit.jsonl")
    text += audit.read_text(errors="replace") if audit.exists() else ""
    assert "DOE" not in text and "JANE" not in text and BIRTH not in text
