"""OmniMRI's language half: corpus split, grounded answers and reports, the text encoder.

The text-encoder tests use the shipped package's language model
(``models/omnimri-tiny/<version>/language``, ``extra.language`` in model.yaml) through ONNX
Runtime, as the node serves it; one test trains a very small encoder end to end (tokenizer,
transformers BERT from scratch, ONNX export checked against PyTorch).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from inference.omnimri.language import corpus as C
from inference.omnimri.language.evaluate import random_facts, report_fact_checks
from inference.omnimri.language.facts import Lesion, SeriesFacts, verify_text
from inference.omnimri.language.narrate import write_report
from inference.omnimri.language.qa import answer
from inference.omnimri.language.runtime import (
    InstructionRefused,
    Parse,
    route_instructions,
    text_model_for,
)
from inference.package import ModelPackage

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "models" / "omnimri-tiny"

FACTS = SeriesFacts(
    lesions=(Lesion("mass", "left", "frontal", 31.6, 9.81),
             Lesion("wmh", "right", "parietal", 8.2, 0.21),
             Lesion("wmh", "right", "occipital", 5.0, 0.06)),
    diagnosis="mass", diagnosis_probability=0.91,
    tissue_ml={"brain": 1301.0, "grey matter": 640.2, "white matter": 460.4, "csf": 200.4},
    model="test 0")


def q(qtype: str, target: str = "lesion", side: str = "any", lobe: str = "any",
      tissue: str = "brain") -> Parse:
    return Parse("", "question", 1.0, (), qtype, target, tissue, side, lobe)


def package_with_language() -> ModelPackage:
    pkg = ModelPackage.load(PACKAGE)
    if "language" not in pkg.spec.extra:  # the key is written by 'train language'
        pytest.skip(f"{PACKAGE} has no extra.language: run 'omnimri-node train language'")
    return pkg


# --------------------------------------------------------------------------- corpus


def test_held_out_templates_never_reach_training() -> None:
    for phrases in [*C.TASK_PHRASES.values(), *C.QUESTION_TEMPLATES.values(), C.WRAPPERS,
                    C.OUT_OF_SCOPE, C.OOS_ORGANS, C.OOS_FINDINGS]:
        train, held = set(C.split(phrases, "train")), set(C.split(phrases, "heldout"))
        assert held and train and not train & held
    training_text = " ".join(e.text.lower() for e in C.generate(3000, "train", seed=0))
    for phrases in C.TASK_PHRASES.values():  # nor as a verb + object pair
        for phrase in C.split(phrases, "heldout"):
            assert phrase not in training_text


def test_generation_is_deterministic_and_labelled() -> None:
    a, b = C.generate(200, "train", seed=4, noisy=True), C.generate(200, "train", seed=4,
                                                                     noisy=True)
    assert a == b
    for e in a:
        if C.INTENTS[e.intent] == "instruction":
            assert sum(e.tasks) >= 1
        if C.INTENTS[e.intent] == "question":
            assert "qtype" in e.labels


# --------------------------------------------------------------------------- answers


def test_answers_come_from_the_findings() -> None:
    assert answer(q("presence", "mass"), FACTS).value is True
    assert answer(q("presence", "mass", side="right"), FACTS).value is False
    assert answer(q("count", "wmh"), FACTS).value == 2
    assert answer(q("count", "lesion", side="right"), FACTS).value == 2
    assert answer(q("count", "mass", lobe="occipital"), FACTS).value == 0
    side = answer(q("side", "mass"), FACTS)
    assert side.value == "left" and "left frontal lobe" in side.text
    assert answer(q("lobe", "wmh"), FACTS).value == "parietal"
    size = answer(q("size", "mass"), FACTS)
    assert size.value == 32 and "32 mm" in size.text and "9.81 ml" in size.text
    assert answer(q("volume", tissue="grey matter"), FACTS).text == "Grey matter volume is 640 ml."
    assert answer(q("diagnosis"), FACTS).value == "mass"
    refused = answer(Parse("what is the patient's name?", "refuse", 0.99), FACTS)
    assert refused.refused and refused.value is None


def test_no_answer_contradicts_the_findings() -> None:
    rng = random.Random(0)
    for _ in range(60):
        facts = random_facts(rng)
        for qtype in C.QTYPES:
            for target in C.TARGETS:
                for side in C.SIDES:
                    for lobe in C.LOBES:
                        a = answer(q(qtype, target, side, lobe, "csf"), facts)
                        assert verify_text(a.text, facts) == [], a.text


def test_the_checker_catches_contradictions() -> None:
    assert verify_text("No focal lesion is identified.", FACTS)
    assert verify_text("A mass is seen in the right temporal lobe.", FACTS)
    assert verify_text("There is a 12 mm mass in the left frontal lobe.", FACTS)
    assert verify_text("3 white-matter lesions are present.", FACTS)
    assert verify_text("The suggested diagnosis is small-vessel disease.", FACTS)
    assert verify_text("Grey matter volume is 700 ml.", FACTS)
    assert not verify_text("There is a 32 mm mass in the left frontal lobe. "
                           "No mass is seen in the right parietal lobe.", FACTS)


# --------------------------------------------------------------------------- reports


def test_reports_are_grounded_varied_and_deterministic() -> None:
    rng = random.Random(2)
    texts, used = set(), set()
    for k in range(150):
        facts = random_facts(rng)
        rep, ids = write_report(facts, seed=f"job-{k}")
        assert rep == write_report(facts, seed=f"job-{k}")[0]
        whole = f"{rep.findings} {rep.impression}"
        assert verify_text(whole, facts) == [], whole
        assert all(report_fact_checks(rep.findings, rep.impression, facts)), whole
        assert rep.findings[0].isupper() and rep.impression.endswith(".")
        texts.add(whole)
        used.update(ids)
    assert len(texts) >= 140 and len(used) >= 25
    rep, _ = write_report(FACTS, seed="x")
    assert "left frontal lobe" in rep.findings and "32 mm" in rep.findings
    assert "ml" in rep.findings and ("mass" in rep.impression.lower()
                                     or "space-occupying" in rep.impression.lower())


# --------------------------------------------------------------------------- text encoder


def test_free_text_instructions_route_and_unsupported_ones_are_refused() -> None:
    pkg = package_with_language()
    assert route_instructions(["look for white-matter lesions and write a short report"],
                              pkg) == ["detect abnormalities", "write the report"]
    assert route_instructions(["Segment Brain  Tissues"], pkg) == ["segment brain tissues"]
    for bad in ("segment the liver", "write a poem",
                "how many lesions are there?", "detect abnormalities and segment the heart"):
        with pytest.raises(InstructionRefused):
            route_instructions([bad], pkg)


def test_questions_are_parsed() -> None:
    tm = text_model_for(package_with_language())
    assert tm is not None
    p = tm.parse(["How many white matter lesions are there in the left frontal lobe?"])[0]
    assert (p.intent, p.qtype, p.target, p.side, p.lobe) == (
        "question", "count", "wmh", "left", "frontal")
    p = tm.parse(["what is the grey matter volume?"])[0]
    assert (p.qtype, p.tissue) == ("volume", "grey matter")
    assert tm.parse(["what is the patient's name?"])[0].intent == "refuse"


def test_check_config_routes_free_text_and_names_the_refused_key(tmp_path: Path) -> None:
    from dicom_node.config import ConfigError, load_config

    def cfg(instructions: list[str]) -> Path:
        p = tmp_path / "config.yaml"
        p.write_text(yaml.safe_dump({
            "storage": {"path": "spool"}, "models": {"path": str(REPO / "models")},
            "pipelines": {"brain": {"model": "omnimri-tiny", "instructions": instructions}}}))
        return p

    package_with_language()
    s = load_config(cfg(["look for white-matter lesions and write a short report"]))
    assert s.pipelines["brain"].instructions == ["detect abnormalities", "write the report"]
    with pytest.raises(ConfigError) as err:
        load_config(cfg(["segment brain tissues", "segment the kidneys"]))
    assert err.value.problems[0][0] == "pipelines.brain.instructions.1"
    assert "cannot follow" in err.value.problems[0][1]


def test_training_exports_an_encoder_that_matches_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from inference.omnimri.language.runtime import TextModel
    from inference.omnimri.language.textmodel import LanguageTrainSettings, train_language

    s = LanguageTrainSettings(steps=20, train_examples=400, batch=16)
    spec = train_language(tmp_path / "language", s)
    assert spec["onnx_max_abs_diff"] < 1e-3
    tm = TextModel(tmp_path / "language")
    assert len(tm.parse(["write the report", "is there a mass?"])) == 2
    train_language(tmp_path / "again", s)  # same seed: the same model
    a = (tmp_path / "language" / "tokenizer.json").read_text()
    assert a == (tmp_path / "again" / "tokenizer.json").read_text()
    texts = ["write the report", "segment the liver", "how many masses are there?"]
    first, second = tm.logits(texts), TextModel(tmp_path / "again").logits(texts)
    for k, v in first.items():
        np.testing.assert_allclose(v, second[k], atol=1e-5)
