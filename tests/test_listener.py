"""The listener as a running ``omnimri-node serve`` process, fed by real senders.

Senders: pynetdicom's SCU (raw bytes of each file, chunked send) and DCMTK's echoscu,
storescu and dcmsend (``TCP_NODELAY=1``). Data: pydicom's shipped MR files in every transfer
syntax they come in, a few other shipped files for the remaining syntaxes, an MNI152 brain
MR series and an Enhanced MR multi-frame instance from :mod:`omnimri_samples`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
)

from dicom_node import status
from omnimri_samples import (
    PatientInfo,
    brain_series,
    iter_pydicom_mr_files,
    write_series,
)
from tests.fixtures.dcmtk import dcmsend, echoscu, storescu
from tests.fixtures.node import NodeProcess, dataset_bytes, store_files

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
OTHER_SYNTAX_FILES = [
    "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG Baseline
    "JPGExtended.dcm",  # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_rgb_gdcm_KY.dcm",  # JPEG 2000
]
PHI = PatientInfo(patient_name="ZZSECRET^PHINAME", patient_id="PHIID98765",
                  patient_birth_date="19010203")
PHI_STRINGS = ("ZZSECRET", "PHINAME", "PHIID98765", "19010203")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from dicom_node.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=60)


def made_syntax_files(folder: Path) -> list[Path]:
    """MR files in syntaxes pydicom ships no MR file for: Deflated and HTJ2K (relabelled)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".99"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = folder / "MR_small_deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    # An HTJ2K decoder reads classic J2K code streams; the node never decodes anyway.
    j2k = pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm")
    assert j2k.file_meta.TransferSyntaxUID == JPEG2000Lossless
    j2k.SOPInstanceUID = j2k.SOPInstanceUID + ".98"
    j2k.file_meta.MediaStorageSOPInstanceUID = j2k.SOPInstanceUID
    j2k.file_meta.TransferSyntaxUID = HTJ2KLossless
    htj2k = folder / "MR_small_htj2k.dcm"
    j2k.save_as(htj2k, enforce_file_format=True)
    return [deflated, htj2k]


def test_every_transfer_syntax_is_stored_as_received(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    # Several shipped MR files share a SOP Instance UID: with duplicate_policy "replace", each
    # is checked right after it is sent.
    node = node_factory(storage={"duplicate_policy": "replace"})
    mr = [p for p in iter_pydicom_mr_files() if p.name != "MR_truncated.dcm"]
    files = mr + [TEST_FILES / n for n in OTHER_SYNTAX_FILES] + made_syntax_files(tmp_path)
    index = node.index()
    syntaxes = set()
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        assert store_files(node.port, [f]) == [status.SUCCESS], f.name
        found = index.lookup_instance(str(meta.MediaStorageSOPInstanceUID))
        assert found is not None, f.name
        stored, size = found
        assert stored.is_relative_to(node.spool) and stored.stat().st_size == size
        assert dataset_bytes(stored) == dataset_bytes(f), f.name
        ts = pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ts == meta.TransferSyntaxUID
        syntaxes.add(str(ts))
    names = {pydicom.uid.UID(s).name for s in syntaxes}
    for wanted in ("Implicit VR Little Endian", "Explicit VR Little Endian",
                   "Explicit VR Big Endian", "Deflated Explicit VR Little Endian",
                   "JPEG Baseline (Process 1)", "JPEG Extended (Process 2 and 4)",
                   "JPEG-LS Lossless Image Compression", "RLE Lossless",
                   "JPEG 2000 Image Compression (Lossless Only)", "JPEG 2000 Image Compression",
                   "High-Throughput JPEG 2000 Image Compression (Lossless Only)"):
        assert wanted in names, f"{wanted} not stored; got {sorted(names)}"
    assert any("JPEG Lossless" in n for n in names)
    assert list((node.spool / ".incoming").iterdir()) == []


def test_dcmtk_senders_echo_cli_and_series_complete(node: NodeProcess, tmp_path: Path,
                                                    dcmtk: None) -> None:
    r = echoscu(node.port, "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("echo", "127.0.0.1", str(node.port), "--aec", "OMNIMRI")
    assert r.returncode == 0 and "success" in r.stdout
    r = cli("echo", "127.0.0.1", str(node.port), "--aec", "NOT-US")
    assert r.returncode == 1 and "called AE title not recognised" in r.stderr

    series = brain_series(resolution_mm=2, slices=12, patient=PHI, description="T1 BRAIN")
    files = write_series(series, tmp_path / "brain")
    enhanced = brain_series(resolution_mm=2, slices=12, enhanced=True, patient=PHI,
                            description="T1 ENHANCED")
    efile = write_series(enhanced, tmp_path / "enh")
    compressed = [TEST_FILES / "MR_small_RLE.dcm", TEST_FILES / "MR_small_jpeg_ls_lossless.dcm"]

    r = storescu(node.port, files[:6], "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr
    r = dcmsend(node.port, files[6:] + efile + compressed, "OMNIMRI")
    assert r.returncode == 0, r.stdout + r.stderr

    # The Enhanced MR instance is the whole series: complete at once, before the quiet period.
    enh_uid = enhanced[0].SeriesInstanceUID
    [ev] = node.wait_for_event("series_complete", series_uid=enh_uid)
    assert ev["reason"] == "expected_count" and ev["instances"] == 1
    uid = series[0].SeriesInstanceUID
    [ev] = node.wait_for_event("series_complete", series_uid=uid)
    assert ev["reason"] == "quiet" and ev["instances"] == 12 and ev["revision"] == 1

    index = node.index()
    s = index.load_series(uid, 1)
    assert [i.sop_instance_uid for i in s.instances] == [d.SOPInstanceUID for d in series]
    assert s.series_description == "T1 BRAIN" and s.calling_ae in ("STORESCU", "DCMSEND")
    for inst, f in zip(s.instances, files, strict=True):
        got, sent = pydicom.dcmread(inst.path), pydicom.dcmread(f)
        assert got.file_meta.TransferSyntaxUID == inst.transfer_syntax_uid
        assert got.PixelData == sent.PixelData
        if inst.calling_ae == "DCMSEND":  # dcmsend -dn sends the file's data set unchanged
            assert dataset_bytes(inst.path) == dataset_bytes(f)
        # (storescu may re-encode an uncompressed data set in the syntax it prefers)
    e = index.load_series(enh_uid, 1)
    assert e.instances[0].number_of_frames == 12
    assert e.instances[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.1"

    r = cli("series", "list", "--json", "--config", str(node.config))
    assert r.returncode == 0, r.stderr
    rows = {row["series_instance_uid"]: row for row in json.loads(r.stdout)}
    assert rows[uid]["state"] == "complete" and rows[uid]["instance_count"] == 12
    assert rows[uid]["modality"] == "MR" and rows[uid]["series_description"] == "T1 BRAIN"
    r = cli("series", "list", "--config", str(node.config))
    assert "T1 ENHANCED" in r.stdout and "complete" in r.stdout
    r = cli("series", "show", uid, "--config", str(node.config))
    shown = json.loads(r.stdout)
    assert len(shown["instances"]) == 12 and shown["events"][0]["reason"] == "quiet"

    # Association log lines carry an id, the caller, counts and timings ...
    done = node.events("association_released", calling_ae="DCMSEND")
    # (the two shipped compressed MR files share one SOP Instance UID: 8 stored + 1 duplicate)
    assert done and (done[0]["stored"], done[0]["duplicates"]) == (8, 1)
    assert done[0]["assoc_id"] and done[0]["duration_s"] > 0 and done[0]["peer_host"]
    # ... and no patient data anywhere in the node's output.
    text = node.log_path.read_text()
    for s in PHI_STRINGS:
        assert s not in text


def test_duplicates_keep_first(node: NodeProcess, tmp_path: Path) -> None:
    f = TEST_FILES / "MR_small.dcm"
    assert store_files(node.port, [f, f]) == [status.SUCCESS, status.SUCCESS]
    sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    [dup] = node.wait_for_event("duplicate_instance", sop_instance_uid=sop)
    assert dup["same_bytes"] is True
    changed = pydicom.dcmread(f)
    changed.SeriesDescription = "CHANGED"
    other = tmp_path / "changed.dcm"
    changed.save_as(other, enforce_file_format=True)
    assert store_files(node.port, [other]) == [status.SUCCESS]
    node.wait_for_event("duplicate_instance", count=2, sop_instance_uid=sop)
    assert node.events("duplicate_instance", same_bytes=False)[0]["policy"] == "keep_first"
    path, _ = node.index().lookup_instance(sop)
    assert dataset_bytes(path) == dataset_bytes(f)
    assert node.index().count_instances() == 1


def test_duplicates_replace(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_factory(storage={"duplicate_policy": "replace"})
    f = TEST_FILES / "MR_small.dcm"
    changed = pydicom.dcmread(f)
    changed.SeriesDescription = "CHANGED"
    other = tmp_path / "changed.dcm"
    changed.save_as(other, enforce_file_format=True)
    assert store_files(node.port, [f, other]) == [status.SUCCESS, status.SUCCESS]
    path, _ = node.index().lookup_instance(str(changed.SOPInstanceUID))
    assert dataset_bytes(path) == dataset_bytes(other)
    assert node.events("duplicate_instance", policy="replace")


def bad_files(folder: Path) -> dict[str, tuple[Path, int]]:
    """Malformed instances and the status each must get."""
    folder.mkdir(parents=True, exist_ok=True)
    src = TEST_FILES / "MR_small.dcm"
    out: dict[str, tuple[Path, int]] = {
        "truncated": (TEST_FILES / "MR_truncated.dcm", status.CANNOT_UNDERSTAND)}
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    p = folder / "good.dcm"
    ds.save_as(p, enforce_file_format=True)
    raw = p.read_bytes()
    offset = len(raw) - len(dataset_bytes(p))
    junk = folder / "junk.dcm"
    junk.write_bytes(raw[:offset] + bytes(range(7, 250)) * 40)
    out["undecodable"] = (junk, status.CANNOT_UNDERSTAND)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID"):
        d = pydicom.dcmread(p)
        delattr(d, kw)
        d.SOPInstanceUID = d.SOPInstanceUID + ("2" if kw.startswith("Study") else "3")
        d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        q = folder / f"no-{kw}.dcm"
        d.save_as(q, enforce_file_format=True)
        out[f"missing {kw}"] = (q, status.MISSING_UIDS)
    # Presentation context (from the file meta) says CT Image Storage; the data set says MR.
    d = pydicom.dcmread(p)
    d.SOPInstanceUID = d.SOPInstanceUID + "4"
    d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
    d.file_meta.MediaStorageSOPClassUID = CTImageStorage
    q = folder / "class-mismatch.dcm"
    d.save_as(q, enforce_file_format=False)
    out["SOP class mismatch"] = (q, status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    d = pydicom.dcmread(p)
    d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID + "5"
    q = folder / "instance-mismatch.dcm"
    d.save_as(q, enforce_file_format=False)
    out["SOP instance mismatch"] = (q, status.SOP_INSTANCE_MISMATCH)
    out["good"] = (p, status.SUCCESS)
    return out


def test_bad_input_gets_a_status_and_one_log_line(node: NodeProcess, tmp_path: Path) -> None:
    cases = bad_files(tmp_path)
    files = [p for p, _ in cases.values()]
    # All in ONE association: each failure leaves it (and the node) running; the good one
    # sent last is stored.
    statuses = store_files(node.port, files)
    assert dict(zip(cases, statuses, strict=True)) == {k: v for k, (_, v) in cases.items()}
    refused = node.wait_for_event("instance_refused", count=len(cases) - 1)
    assert len(refused) == len(cases) - 1  # one line per refusal
    assert {e["status"] for e in refused} == {f"0x{v:04X}" for k, (_, v) in cases.items()
                                              if k != "good"}
    assert node.index().count_instances() == 1
    assert list((node.spool / ".incoming").iterdir()) == []
    assert len(list(node.spool.rglob("*.dcm"))) == 1
    assert node.proc is not None and node.proc.poll() is None
    assert store_files(node.port, [TEST_FILES / "MR_small.dcm"]) == [status.SUCCESS]
