"""OmniMRI's language half: corpus split, grounded answers and reports, the text encoder.

The text-encoder tests use the shipped package's language model
(``models/omnimri-tiny/<version>/language``, ``extra.language`` in model.yaml) through ONNX
Runtime, as the node serves it; one test trains a very small encoder end to end (tokenizer,
transformers BERT from scratch, ONNX export checked against PyTorch).
"""

from __future__ import annotations

import random
import re
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


def _tag_held_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mark every held-out template, out-of-scope word and verb-object pair with a tag."""
    names = [n for n in dir(C) if isinstance(getattr(C, n), tuple)
             and any(getattr(C, n) is v for v in C.TEMPLATE_LISTS.values())]
    assert len(names) >= 15
    for name in names:
        monkeypatch.setattr(C, name, tuple(
            f"zzheld {t}" if n % 4 == 3 else t for n, t in enumerate(getattr(C, name))))
    for qtype, frames in C.QUESTION_TEMPLATES.items():
        monkeypatch.setitem(C.QUESTION_TEMPLATES, qtype, tuple(
            f"zzheld {t}" if n % 4 == 3 else t for n, t in enumerate(frames)))
    for k, task in enumerate(C.TASKS):
        monkeypatch.setitem(C.TASK_VERBS, task, tuple(
            f"zzv{k}x{n}" for n in range(len(C.TASK_VERBS[task]))))
        monkeypatch.setitem(C.TASK_OBJECTS, task, tuple(
            f"zzo{n}" for n in range(len(C.TASK_OBJECTS[task]))))


def _pairs(texts: list[str]) -> set[tuple[int, int, int]]:
    """(task, verb, object) of every verb clause in tagged instruction texts."""
    return {(int(t), int(v), int(o)) for text in texts for t, v, o in
            re.findall(r"zzv(\d+)x(\d+)(?:(?!zzv).)*?zzo(\d+)", text.lower())}


def test_held_out_templates_never_reach_training(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, items in C.TEMPLATE_LISTS.items():
        tr, ho = set(C.split(items, "train")), set(C.split(items, "heldout"))
        assert ho and tr and not tr & ho, name
    for task in C.TASKS:  # verb-object pairs: each in exactly one split, both non-empty
        grid = [(C.pair_split(v, o, "train"), C.pair_split(v, o, "heldout"))
                for v in range(len(C.TASK_VERBS[task])) for o in range(len(C.TASK_OBJECTS[task]))]
        assert all(a != b for a, b in grid) and any(a for a, _ in grid) and any(b for _, b in grid)
    _tag_held_out(monkeypatch)
    train = C.generate(6000, "train", seed=0, noisy=True)
    assert not [e.text for e in train if "zzheld" in e.text.lower()][:3]
    pairs = _pairs([e.text for e in train if e.kind == "instruction"])
    assert len(pairs) > 300
    assert not {p for p in pairs if not C.pair_split(p[1], p[2], "train")}
    # the check can fail: the held-out set is made of the tagged templates and pairs
    held = C.generate(3000, "heldout", seed=1)
    assert sum("zzheld" in e.text.lower() for e in held) > 2900
    held_pairs = _pairs([e.text for e in held if e.kind == "instruction"])
    assert len(held_pairs) > 50 and all(C.pair_split(p[1], p[2], "heldout") for p in held_pairs)


def test_held_out_in_scope_text_uses_only_taught_words() -> None:
    """Held-out in-scope texts are new phrasings of the taught lexicon (a model trained from
    scratch cannot know a word it never saw, and the runtime refuses one); out-of-scope texts
    bring words never taught."""
    from inference.omnimri.language.runtime import taught_words, unknown_words
    from inference.omnimri.language.textmodel import LanguageTrainSettings, train_tokenizer

    tok = train_tokenizer(LanguageTrainSettings().vocab_size)
    taught = taught_words(tok)
    held = C.generate(8000, "heldout", seed=3)
    assert not [e.text for e in held if C.INTENTS[e.intent] != "refuse"
                and unknown_words(tok, taught, e.text)][:3]
    new = {w for e in held if C.INTENTS[e.intent] == "refuse"
           for w in unknown_words(tok, taught, e.text)}
    assert len(new) > 300
    assert unknown_words(tok, taught, "Segmnet the brain, please") == ("segmnet",)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(300)


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


REFUSED = {
    "other organ": ["segment the liver", "detect lesions in the kidneys"],
    "other modality": ["detect lesions on the ct scan", "read the chest x-ray"],
    "other finding or measure": ["look for fractures", "measure the ejection fraction"],
    "treatment": ["prescribe steroids", "plan radiotherapy for the tumour"],
    "patient data, administration": ["delete the series", "change the patient name"],
    "document": ["write a poem"],
    "nonsense": ["blorptang vexulat", "qwzx the flimbor"],
    "mixed with in scope": ["detect abnormalities and segment the heart",
                            "write the report and email it to the family"],
    "question": ["how many lesions are there?"],
}
"""Instructions the shipped model must refuse, by class (some words trained, some never seen)."""


def test_free_text_instructions_route_and_unsupported_ones_are_refused() -> None:
    pkg = package_with_language()
    assert route_instructions(["look for white-matter lesions and write a short report"],
                              pkg) == ["detect abnormalities", "write the report"]
    assert route_instructions(["Segment Brain  Tissues"], pkg) == ["segment brain tissues"]
    assert route_instructions(["could you denoise the images, segment grey and white matter "
                               "and suggest a likely diagnosis?"], pkg) == [
        "segment brain tissues", "suggest a diagnosis", "reconstruct"]
    for bare, task in (("find tumours", "detect abnormalities"),  # config lines are often bare
                       ("measure the grey matter", "segment brain tissues"),
                       ("denoise the images", "reconstruct")):
        assert route_instructions([bare], pkg) == [task], bare
    for cls, texts in REFUSED.items():
        for bad in texts:
            with pytest.raises(InstructionRefused):
                route_instructions([bad], pkg)
                pytest.fail(f"{cls}: {bad!r} was not refused")


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
    texts = [texts[0] for texts in REFUSED.values()]  # one of each refusal class
    with pytest.raises(ConfigError) as err:
        load_config(cfg(["write the report", *texts]))
    keys = [k for k, _ in err.value.problems]
    assert keys == [f"pipelines.brain.instructions.{n}" for n in range(1, len(texts) + 1)]
    for (_, why), text in zip(err.value.problems, texts, strict=True):
        assert repr(text) in why and ("cannot follow" in why or "question" in why
                                      or "not sure" in why), why


def test_training_exports_an_encoder_that_matches_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from inference.omnimri.language.runtime import TextModel
    from inference.omnimri.language.textmodel import LanguageTrainSettings, train_language

    s = LanguageTrainSettings(steps=20, train_examples=400, batch=16, decoder_steps=0)
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
