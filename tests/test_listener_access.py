"""Who may associate (allow-list, called AE, association limit) and when storage is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node import status
from dicom_node.config import NodeSettings
from dicom_node.listener import CallerPolicy
from omnimri_samples import synthetic_series, write_series
from tests.fixtures.dcmtk import echoscu
from tests.fixtures.node import NodeProcess, associate, store_files

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def rejection(assoc: object) -> tuple[int, int, int]:
    assert getattr(assoc, "is_rejected", False), "association was not rejected"
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)


def refused(answer: tuple[tuple[int, int, int], str] | None) -> tuple[int, int, int]:
    """The (result, source, reason) of a refusal by :meth:`CallerPolicy.check`."""
    assert answer is not None, "the caller was accepted"
    return answer[0]


def test_caller_policy_rules() -> None:
    s = NodeSettings.model_validate({"node": {
        "ae_title": "OMNIMRI", "aliases": ["OMNI_BRAIN"],
        "allowed_callers": [{"ae_title": "SCANNER1", "host": "10.1.2.0/24"},
                            {"host": "127.0.0.1"},
                            {"ae_title": "PACS"}]}})
    p = CallerPolicy(s)
    assert p.check("SCANNER1", "OMNIMRI", "10.1.2.77", 1) is None
    assert p.check("SCANNER1", "OMNI_BRAIN", "10.1.2.77", 1) is None
    assert refused(p.check("SCANNER1", "OMNIMRI", "10.1.3.1", 1)) == status.REJECT_UNKNOWN_CALLER
    assert p.check("ANYONE", "OMNIMRI", "127.0.0.1", 1) is None
    assert p.check("PACS", "OMNIMRI", "192.168.0.9", 1) is None
    assert refused(p.check("OTHER", "OMNIMRI", "192.168.0.9", 1)) == status.REJECT_UNKNOWN_CALLER
    assert refused(p.check("PACS", "NOTUS", "192.168.0.9", 1)) == \
        status.REJECT_UNKNOWN_CALLED_AE
    assert refused(p.check("PACS", "OMNIMRI", "192.168.0.9", 17)) == \
        status.REJECT_TOO_MANY_ASSOCIATIONS
    open_policy = CallerPolicy(NodeSettings())
    assert open_policy.check("WHOEVER", "OMNIMRI", "203.0.113.5", 1) is None


def test_allow_list_and_called_ae(node_factory: Callable[..., NodeProcess], dcmtk: None) -> None:
    node = node_factory(node={"aliases": ["OMNI_BRAIN"], "allowed_callers": [
        {"ae_title": "GOODSCU", "host": "127.0.0.1"},
        {"ae_title": "FARSCU", "host": "10.0.0.0/8"}]})
    assert echoscu(node.port, "OMNIMRI", aet="GOODSCU").returncode == 0
    assert echoscu(node.port, "OMNI_BRAIN", aet="GOODSCU").returncode == 0
    r = echoscu(node.port, "OMNIMRI", aet="BADSCU")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in (r.stdout + r.stderr)
    # Right AE title, wrong network:
    assert rejection(associate(node.port, aet="FARSCU")) == status.REJECT_UNKNOWN_CALLER
    assert rejection(associate(node.port, aet="BADSCU")) == status.REJECT_UNKNOWN_CALLER
    assert rejection(associate(node.port, aec="NOT_US", aet="GOODSCU")) == \
        status.REJECT_UNKNOWN_CALLED_AE
    rejected = node.wait_for_event("association_rejected", count=4)
    assert {e["reason"] for e in rejected} == {"calling AE/host not on the allow-list",
                                               "called AE title is not ours"}
    assert all(e["peer_host"] == "127.0.0.1" for e in rejected)
    assert not node.events("allow_list_empty")
    # The node keeps serving the allowed caller.
    assert store_files(node.port, [TEST_FILES / "MR_small.dcm"], aet="GOODSCU") == [0]


def test_max_associations(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(node={"max_associations": 1})
    first = associate(node.port)
    assert first.is_established
    try:
        assert rejection(associate(node.port)) == status.REJECT_TOO_MANY_ASSOCIATIONS
    finally:
        first.release()
    node.wait_for_event("association_released")
    again = associate(node.port)
    assert again.is_established
    again.release()
    [ev] = node.events("association_rejected")
    assert ev["reason"] == "too many associations"


def test_watermark_and_size_limit_answer_out_of_resources(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    # min_free_percent 100: the disk is always "below the watermark".
    node = node_factory(node={"max_instance_bytes": 20_000},
                        storage={"min_free_percent": 100})
    small = TEST_FILES / "MR_small.dcm"  # ~10 kB
    [big] = write_series(synthetic_series(1, 128, 128), tmp_path / "big")  # ~33 kB
    assert small.stat().st_size < 20_000 < big.stat().st_size
    assert store_files(node.port, [small, big]) == [status.OUT_OF_RESOURCES] * 2
    refused = node.wait_for_event("instance_refused", count=2)
    assert [e["status"] for e in refused] == ["0xA700", "0xA700"]
    assert "watermark" in refused[0]["reason"] and "max_instance_bytes" in refused[1]["reason"]
    assert list(node.spool.rglob("*.dcm")) == []
    assert list((node.spool / ".incoming").iterdir()) == []
    assert node.index().count_instances() == 0
    assoc = associate(node.port)  # still serving
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.parametrize("bad", ["", "x" * 17])
def test_bad_ae_title_in_config_is_refused(tmp_path: Path, bad: str) -> None:
    from dicom_node.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"node": {"ae_title": bad}}, tmp_path)
    assert "node.ae_title" in str(err.value)
