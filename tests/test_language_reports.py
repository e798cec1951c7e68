"""Reports say only what the tasks that ran support (issue #16: the tissue-sentence bug).

A pipeline that ran ``detect abnormalities`` and ``write the report`` but not ``segment brain
tissues`` must not describe grey and white matter or CSF; the checker flags text that does.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from inference import results as R
from inference.omnimri import synthetic as syn
from inference.omnimri.language.evaluate import random_facts
from inference.omnimri.language.facts import SeriesFacts, verify_text
from inference.omnimri.language.narrate import ALL_TEMPLATES, narrate_results, write_report
from inference.omnimri.tasks import HeadOutputs, build_results

NO_TISSUE = SeriesFacts(diagnosis="normal", tasks=("detect abnormalities", "write the report"))
WITH_TISSUE = dataclasses.replace(NO_TISSUE, tasks=("segment brain tissues", *NO_TISSUE.tasks))


def test_a_normal_report_describes_the_tissues_only_when_they_were_segmented() -> None:
    for k in range(40):
        rep, used = write_report(NO_TISSUE, seed=f"job-{k}")
        assert not any(u.startswith("grey_white") for u in used), rep
        assert verify_text(f"{rep.findings} {rep.impression}", NO_TISSUE) == []
        assert "grey" not in rep.findings.lower() and "csf" not in rep.findings.lower()
    seen = {u.split(":")[0] for k in range(40) for u in write_report(WITH_TISSUE, f"j{k}")[1]}
    assert "grey_white" in seen


def test_the_checker_flags_tissue_statements_when_the_tissues_did_not_run() -> None:
    for sentence in ALL_TEMPLATES["grey_white"]:
        assert verify_text(sentence, NO_TISSUE), sentence
        assert verify_text(sentence, WITH_TISSUE) == [], sentence
    assert verify_text("Grey matter volume was not measured for this series.", NO_TISSUE) == []
    assert verify_text("No mass or white-matter lesion is seen.", NO_TISSUE) == []
    # an older findings cache without the tasks: volumes say the tissues were segmented
    old = SeriesFacts.from_dict({k: v for k, v in WITH_TISSUE.to_dict().items() if k != "tasks"}
                                | {"tissue_ml": {"brain": 1200.0}})
    assert old.tissues_measured and not SeriesFacts.from_dict(
        {k: v for k, v in NO_TISSUE.to_dict().items() if k != "tasks"}).tissues_measured


def test_only_sentence_starts_are_capitalised() -> None:
    from inference.omnimri.language.narrate import capitalise, fill

    assert capitalise("a mass. there are 3 lesions; the largest is 5 mm.") == (
        "A mass. There are 3 lesions; the largest is 5 mm.")
    assert fill("{nw_wmh} lesions; the largest {d_wmh} mm.", {"nw_wmh": "three", "d_wmh": "9"}
                ) == "Three lesions; the largest 9 mm."


def test_sampled_reports_never_state_tissue_findings_without_segmentation() -> None:
    rng = random.Random(7)
    n = 0
    for k in range(300):
        facts = random_facts(rng)
        if facts.tissues_measured:
            continue
        n += 1
        rep, _ = write_report(facts, seed=f"case-{k}")
        assert verify_text(f"{rep.findings} {rep.impression}", facts) == [], rep
    assert n >= 10


def template_heads() -> HeadOutputs:
    """Head outputs of a normal brain: the template's tissue probabilities, no lesion, a
    "normal" slice diagnosis (also used by tests/test_language_decoder.py)."""
    tpl = syn.load_template()
    lesion = np.zeros((4, *tpl.t1.shape), np.float32)
    lesion[0] = 1.0
    return HeadOutputs(affine=tpl.affine, tissue=tpl.probs.copy(), lesion=lesion,
                       slice_diagnosis=np.tile([[0.9, 0.05, 0.05]], (tpl.t1.shape[0], 1)
                                               ).astype(np.float32))


def test_pipeline_without_segmentation_writes_no_tissue_sentence() -> None:
    heads = template_heads()
    seen: dict[bool, set[str]] = {False: set(), True: set()}
    for seg in (False, True):
        ins = ["segment brain tissues"] * seg + ["detect abnormalities", "write the report"]
        res = build_results(heads, ins, R.ModelInfo("t", "1"), narrator=narrate_results)
        assert res.report is not None and res.detections == []
        text = f"{res.report.findings} {res.report.impression}"
        seen[seg].add(text)
        low = text.lower()
        if not seg:
            assert "grey" not in low and "white matter" not in low and "csf" not in low, text
        else:
            assert "ml" in low and "grey matter" in low, text
