"""Report text and labels written as a radiologist writes them (export/text.py)."""

from __future__ import annotations

import pytest

from export.text import detection_line, sentence_case, where
from inference import results as r
from inference.omnimri.synthetic import write_report


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("few mass lesions . the largest is in the left frontal lobe measuring 20 mm with "
         "surrounding oedema .",
         "A few mass lesions. The largest is in the left frontal lobe measuring 20 mm with "
         "surrounding oedema."),
        ("single white matter lesion . the largest is in the right cerebellum lobe measuring "
         "5 mm .",
         "A single white matter lesion. The largest is in the right cerebellar hemisphere "
         "measuring 5 mm."),
        ("a mass is seen in the midline parietal lobe measuring 30 mm with surrounding oedema .",
         "A mass is seen in the parietal lobe, in the midline, measuring 30 mm with surrounding "
         "oedema."),
        ("normal study .", "Normal study."),
        ("intracranial mass . further evaluation is recommended .",
         "Intracranial mass. Further evaluation is recommended."),
        ("measuring 12mm", "Measuring 12 mm."),
        ("", ""),
    ],
)
def test_sentence_case(raw: str, expected: str) -> None:
    assert sentence_case(raw) == expected


@pytest.mark.parametrize("kind", ["normal", "small_vessel", "mass"])
@pytest.mark.parametrize("side", ["left", "right", "midline"])
@pytest.mark.parametrize("lobe", ["frontal", "cerebellum"])
@pytest.mark.parametrize("count", ["single", "few", "multiple"])
def test_every_decoder_report_reads_as_sentences(kind: str, side: str, lobe: str,
                                                 count: str) -> None:
    for text in write_report({"kind": kind, "count": count, "side": side, "lobe": lobe,
                              "size": "20"}):
        out = sentence_case(text)
        assert " ." not in out and " ," not in out and ",." not in out
        assert "cerebellum lobe" not in out and "midline " not in out.replace("midline,", "")
        for sentence in out.split(". "):
            assert sentence[0].isupper(), out
        assert out.endswith(".")


def _det(side: str, location: str) -> r.Detection:
    return r.Detection(
        finding=r.MASS, segment_number=1, centroid_index=(1.0, 1.0, 1.0),
        centroid_lps_mm=(0.0, 0.0, 0.0), bbox_index=(0, 0, 0, 2, 2, 2), diameter_mm=20.04,
        volume_ml=3.1, probability=0.912, side=side, location=location, tracking_id="mass-1",
    )


def test_where_and_detection_line() -> None:
    assert where(_det("left", "frontal lobe")) == "left frontal lobe"
    assert where(_det("right", "cerebellum")) == "right cerebellar hemisphere"
    assert where(_det("midline", "cerebellum")) == "cerebellar vermis"
    assert where(_det("midline", "parietal lobe")) == "parietal lobe, midline"
    assert where(_det("", "")) == "location not given"
    assert detection_line(_det("left", "frontal lobe"), 1) == (
        "Mass 1: left frontal lobe, 20.0 mm, 3.10 ml, p = 0.91.")
