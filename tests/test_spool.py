"""The spool: safe UID-derived names, header checks, durable install, group commit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import status
from dicom_node.spool import (
    GroupCommit,
    InstanceRejected,
    Spool,
    read_header,
    safe_component,
)
from omnimri_samples import iter_pydicom_mr_files, synthetic_series

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.mark.parametrize("uid", ["../../x", "..", "/etc/passwd", "1.2/../../3", "a" * 200,
                                 "1.2.3\x00", "C:\\x", ".incoming", ""])
def test_unsafe_uids_never_escape_the_spool(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "spool")
    name = safe_component(uid)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert name.startswith("x-")
    p = spool.path_for(uid, uid, uid)
    assert p.resolve().is_relative_to(spool.root.resolve())
    assert p.parent.parent.parent == spool.root


def test_conformant_uids_are_kept_and_distinct_unsafe_ones_do_not_collide(tmp_path: Path) -> None:
    assert safe_component("1.2.840.10008.5.1.4.1.1.4") == "1.2.840.10008.5.1.4.1.1.4"
    assert safe_component("../../x") != safe_component("../../y")
    spool = Spool(tmp_path)
    assert spool.path_for("1.2", "1.2.3", "1.2.3.4") == tmp_path / "1.2" / "1.2.3" / "1.2.3.4.dcm"


def test_read_header_of_every_shipped_mr_file() -> None:
    files = list(iter_pydicom_mr_files())
    assert len(files) >= 8
    seen_ts = set()
    for f in files:
        if f.name == "MR_truncated.dcm":
            with pytest.raises(InstanceRejected) as err:
                read_header(f)
            assert err.value.status == status.CANNOT_UNDERSTAND
            assert "truncated" in err.value.reason
            continue
        h = read_header(f)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert h.sop_instance_uid == ds.SOPInstanceUID
        assert h.series_instance_uid == ds.SeriesInstanceUID
        assert h.modality == "MR"
        seen_ts.add(h.transfer_syntax_uid)
    assert len(seen_ts) >= 6  # LE explicit/implicit, BE, RLE, JPEG-LS, J2K


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_truncated_and_undecodable_and_missing_uids(tmp_path: Path) -> None:
    good = _write(synthetic_series(1, 32, 32)[0], tmp_path / "good.dcm")
    data = good.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-100])
    with pytest.raises(InstanceRejected) as err:
        read_header(cut)
    assert err.value.status == status.CANNOT_UNDERSTAND

    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(data[:400])
    with pytest.raises(InstanceRejected) as err:
        read_header(cut_header)
    assert err.value.status == status.CANNOT_UNDERSTAND

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    with pytest.raises(InstanceRejected) as err:
        read_header(junk)
    assert err.value.status == status.CANNOT_UNDERSTAND

    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        ds = synthetic_series(1, 32, 32)[0]
        delattr(ds, keyword)
        p = _write(ds, tmp_path / f"no-{keyword}.dcm")
        with pytest.raises(InstanceRejected) as err:
            read_header(p)
        assert err.value.status == status.MISSING_UIDS
        assert keyword in err.value.reason


def test_truncated_encapsulated_pixel_data_is_refused(tmp_path: Path) -> None:
    src = TEST_FILES / "MR_small_jp2klossless.dcm"
    assert read_header(src).transfer_syntax_uid.startswith("1.2.840.10008.1.2.4.9")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[:-20])
    with pytest.raises(InstanceRejected) as err:
        read_header(cut)
    assert err.value.status == status.CANNOT_UNDERSTAND


def test_header_expected_count_fields(tmp_path: Path) -> None:
    ds = synthetic_series(1, 16, 16)[0]
    ds.add_new(0x00200105, "IS", 3)
    ds.add_new(0x00540081, "US", 12)
    h = read_header(_write(ds, tmp_path / "a.dcm"))
    assert (h.number_of_temporal_positions, h.number_of_slices) == (3, 12)
    assert h.transfer_syntax_uid == ExplicitVRLittleEndian


def test_install_renames_durably_and_purge_cleans_incoming(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    tmp = spool.incoming / "rx-1.dcm"
    tmp.write_bytes(b"abc")
    final = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    dirs = spool.install(tmp, final)
    assert final.read_bytes() == b"abc" and not tmp.exists()
    assert final.parent in dirs and spool.root in dirs  # new study folder: its parent too
    spool.sync_dirs(dirs)
    (spool.incoming / "rx-2.dcm").write_bytes(b"partial")
    assert spool.purge_incoming() == 1
    assert list(spool.incoming.iterdir()) == []


def test_watermark(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    free, pct = spool.free_space()
    assert free > 0 and 0 < pct <= 100
    assert spool.has_room(0, 0)
    assert not spool.has_room(free + 1, 0)
    assert not spool.has_room(0, 100.0)


def test_group_commit_shares_commits_between_threads() -> None:
    batches: list[list[int]] = []

    def commit(items: list[int]) -> list[int]:
        batches.append(items)
        time.sleep(0.005)
        return [i * 10 for i in items]

    gc: GroupCommit[int, int] = GroupCommit(commit, window_s=0.002, concurrency=lambda: 8)
    results: dict[int, int] = {}

    def worker(k: int) -> None:
        for j in range(25):
            i = k * 100 + j
            results[i] = gc.submit(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200
    assert all(v == k * 10 for k, v in results.items())
    assert sorted(i for b in batches for i in b) == sorted(results)
    assert len(batches) < 200 / 2  # commits were shared


def test_group_commit_error_reaches_every_waiter_and_alone_costs_no_wait() -> None:
    def boom(items: list[int]) -> list[int]:
        raise OSError("disk gone")

    window_s = 30.0  # long, so that a window wait could not pass for machine load
    gc: GroupCommit[int, int] = GroupCommit(boom, window_s=window_s, concurrency=lambda: 1)
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="disk gone"):
        gc.submit(1)
    assert time.perf_counter() - t0 < window_s / 2  # one caller: no window wait
