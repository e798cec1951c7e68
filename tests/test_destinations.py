"""Every destination kind delivers a preview SC; what arrived is read back from a real Orthanc
(or a real DCMTK storescp where the test needs a peer that refuses compressed syntaxes)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicom_node.config import (
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    OrthancDestination,
    parse_config,
)
from dicom_node.destinations import DestinationError, destination_for, make_destination
from dicom_node.destinations.dimse import DimseStore
from dicom_node.destinations.folder import FolderStore
from dicom_node.pipelines import get_pipeline
from dicom_node.pipelines.preview import SERIES_DESCRIPTION, preview_uids
from dicom_node.series import Series, StoredInstance
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.net import free_port, wait_for_port
from tests.fixtures.orthanc import OrthancServer

DCMTK_STORESCP = "/usr/bin/storescp"  # not pynetdicom's app of the same name on PATH
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def series_from_files(paths: list[Path], revision: int = 1) -> Series:
    now = datetime.now(UTC)
    insts = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        insts.append(StoredInstance(
            ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, p,
            ds.file_meta.TransferSyntaxUID, p.stat().st_size, now,
            instance_number=int(ds.InstanceNumber)))
    first = insts[0]
    return Series(first.series_instance_uid, first.study_instance_uid, revision, tuple(insts),
                  now, modality="MR")


Preview = tuple[pydicom.Dataset, Path]
"""The ``preview`` fixture: a secondary capture data set and its file."""


@pytest.fixture(scope="module")
def preview(tmp_path_factory: pytest.TempPathFactory) -> Preview:
    """A preview SC made by the real pipeline from a small synthetic MR series."""
    tmp = tmp_path_factory.mktemp("preview")
    paths = write_series(synthetic_series(6, 64, 64, seed=3), tmp / "src")
    settings = parse_config({"pipelines": {"preview": {"kind": "preview", "model": None}}}, tmp)
    out = get_pipeline("preview", settings.pipelines["preview"], settings).run(
        series_from_files(paths), "job-destinations")
    assert len(out) == 1
    path = tmp / "sc.dcm"
    out[0].save_as(path, enforce_file_format=True)
    return out[0], path


def dimse_cfg(orthanc: OrthancServer, port: int | None = None) -> DimseDestination:
    return DimseDestination(ae_title=orthanc.ae_title, host="127.0.0.1",
                            port=port or orthanc.dicom_port, timeout_s=5)


def assert_one_preview(orthanc: OrthancServer, sc: pydicom.Dataset) -> None:
    assert orthanc.sop_uids(StudyInstanceUID=sc.StudyInstanceUID) == [sc.SOPInstanceUID]
    tags = orthanc.instance_tags(sc.SOPInstanceUID)
    assert tags["SOPClassUID"] == SC_CLASS
    assert tags["SeriesDescription"] == SERIES_DESCRIPTION
    assert tags["SeriesInstanceUID"] == preview_uids("job-destinations")[0]


def test_dimse_delivers_and_resend_replaces(orthanc: OrthancServer, preview: Preview) -> None:
    sc, path = preview
    dest = DimseStore("pacs", dimse_cfg(orthanc), calling_ae="OMNIMRI")
    assert "succeeded" in dest.test()
    results = dest.send([path])
    assert [(r.sop_instance_uid, r.ok) for r in results] == [(sc.SOPInstanceUID, True)]
    results = dest.send([path])  # same UID again: replaced, not duplicated
    assert results[0].ok
    assert_one_preview(orthanc, sc)
    assert orthanc.count_instances() == 1


def test_dimse_keeps_compressed_syntax_the_peer_accepts(orthanc: OrthancServer, preview: Preview,
                                                        tmp_path: Path) -> None:
    sc, _ = preview
    rle = pydicom.dcmread(preview[1])
    rle.compress(RLELossless, generate_instance_uid=False)
    path = tmp_path / "rle.dcm"
    rle.save_as(path, enforce_file_format=True)
    assert DimseStore("pacs", dimse_cfg(orthanc), "OMNIMRI").send([path])[0].ok
    [found] = orthanc.find_instances(SOPInstanceUID=sc.SOPInstanceUID)
    ts = orthanc.get(f"/instances/{found['ID']}/metadata?expand")["TransferSyntax"]
    assert ts == RLELossless


def test_dimse_transcodes_only_for_a_peer_that_refuses(preview: Preview, tmp_path: Path) -> None:
    """DCMTK storescp +xi accepts Implicit VR Little Endian only: RLE must be decoded."""
    if not Path(DCMTK_STORESCP).exists():
        pytest.skip("DCMTK storescp is not installed")
    sc, _ = preview
    rle = pydicom.dcmread(preview[1])
    rle.compress(RLELossless, generate_instance_uid=False)
    src = tmp_path / "rle.dcm"
    rle.save_as(src, enforce_file_format=True)
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([DCMTK_STORESCP, "+xi", "-aet", "STORESCP", "-od", str(out),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout_s=10)
        cfg = DimseDestination(ae_title="STORESCP", host="127.0.0.1", port=port, timeout_s=5)
        [result] = DimseStore("scp", cfg, "OMNIMRI").send([src])
        assert result.ok, result.detail
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    [received] = list(out.iterdir())
    ds = pydicom.dcmread(received)
    assert ds.SOPInstanceUID == sc.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID != RLELossless
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert (ds.pixel_array == sc.pixel_array).all()


def test_dicomweb_delivers(orthanc: OrthancServer, preview: Preview) -> None:
    if not orthanc.has_dicomweb:
        pytest.skip("Orthanc DICOMweb plugin not installed")
    sc, path = preview
    dest = make_destination("web", DicomwebDestination(url=orthanc.dicomweb_url, timeout_s=10),
                            parse_config({}, Path.cwd()))
    assert "QIDO-RS" in dest.test()
    results = dest.send([path, path])  # twice in one STOW-RS request: still one instance
    assert all(r.ok for r in results) and len(results) == 2
    assert_one_preview(orthanc, sc)


def test_orthanc_rest_delivers(orthanc: OrthancServer, preview: Preview) -> None:
    sc, path = preview
    settings = parse_config(
        {"destinations": {"rest": {"kind": "orthanc", "url": orthanc.url, "timeout_s": 10}}},
        Path.cwd())
    dest = destination_for("rest", settings)
    assert "answered GET /system" in dest.test()
    assert dest.send([sc])[0].ok
    again = dest.send([path])[0]
    assert again.ok and again.detail in ("Success", "AlreadyStored")
    assert_one_preview(orthanc, sc)


def test_folder_delivers_a_file_orthanc_accepts(orthanc: OrthancServer, preview: Preview,
                                                tmp_path: Path) -> None:
    sc, path = preview
    dest = FolderStore("archive", FolderDestination(path=tmp_path / "results"))
    assert "writable" in dest.test()
    assert dest.send([path])[0].ok and dest.send([sc])[0].ok
    files = list((tmp_path / "results").rglob("*.dcm"))
    assert files == [tmp_path / "results" / sc.StudyInstanceUID / sc.SeriesInstanceUID
                     / f"{sc.SOPInstanceUID}.dcm"]
    orthanc.upload(files[0])
    assert_one_preview(orthanc, sc)


def test_unreachable_destinations_raise(preview: Preview) -> None:
    _, path = preview
    closed = free_port()
    dimse = DimseStore("pacs", DimseDestination(ae_title="X", host="127.0.0.1", port=closed,
                                                timeout_s=2), "OMNIMRI")
    rest = make_destination("rest", OrthancDestination(url=f"http://127.0.0.1:{closed}",
                                                       timeout_s=2), parse_config({}, Path.cwd()))
    web = make_destination("web", DicomwebDestination(url=f"http://127.0.0.1:{closed}/dw",
                                                      timeout_s=2), parse_config({}, Path.cwd()))
    for dest in (dimse, rest, web):
        with pytest.raises(DestinationError, match="unreachable|association"):
            dest.send([path])
        with pytest.raises(DestinationError):
            dest.test()
    with pytest.raises(DestinationError, match="no destination 'nope'"):
        destination_for("nope", parse_config({}, Path.cwd()))
    assert ExplicitVRLittleEndian  # the fallback syntax every peer is offered
