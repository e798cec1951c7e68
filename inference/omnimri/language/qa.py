"""Answers to questions about a series, computed from its structured findings.

The text encoder only *reads* the question (:class:`~inference.omnimri.language.runtime.Parse`:
question type, lesion kind, side and lobe filters, tissue); the answer's content comes from
:class:`~inference.omnimri.language.facts.SeriesFacts` alone, so it cannot contradict the
segmentation, detections and diagnosis the node wrote as DICOM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.omnimri.language.facts import DIAGNOSIS_TEXT as DIAGNOSIS_WORDS
from inference.omnimri.language.facts import Lesion, SeriesFacts
from inference.omnimri.language.runtime import Parse

NOUN = {"lesion": ("lesion", "lesions"), "wmh": ("white-matter lesion", "white-matter lesions"),
        "mass": ("mass", "masses")}
TISSUE_NAMES = {"brain": "Brain", "csf": "CSF", "grey matter": "Grey matter",
                "white matter": "White matter"}


@dataclass(frozen=True)
class Answer:
    """An answer: the sentence, the value it states and what question it answers."""

    text: str
    value: Any
    """``bool`` (presence), ``int`` (count), ``str`` (side, lobe, diagnosis), ``float`` (size
    mm, volume ml) or ``None`` (nothing to state)."""
    parse: Parse
    refused: bool = False


def _place(side: str, lobe: str) -> str:
    """`` in the left frontal lobe`` etc. for the question's filters (``""`` for none)."""
    if lobe == "cerebellum":
        return " in the cerebellum" if side == "any" else f" in the {side} cerebellar hemisphere"
    if lobe != "any":
        return f" in the {lobe} lobe" if side == "any" else f" in the {side} {lobe} lobe"
    return "" if side == "any" else f" on the {side} side"


def matching(facts: SeriesFacts, target: str, side: str = "any", lobe: str = "any"
             ) -> list[Lesion]:
    """Lesions of kind ``target`` (``lesion``: any) at ``side``/``lobe`` (``any``: anywhere)."""
    return [x for x in facts.lesions
            if (target == "lesion" or x.kind == target)
            and (side == "any" or x.side == side) and (lobe == "any" or x.lobe == lobe)]


def _n(k: int, target: str) -> str:
    one, many = NOUN[target]
    return f"{k} {one if k == 1 else many}"


def answer(parse: Parse, facts: SeriesFacts) -> Answer:
    """The answer to a parsed question from ``facts`` (a refusal for a non-question)."""
    if parse.intent != "question" or not parse.confident:
        why = ("it is outside what the model reports on (lesions, diagnosis, tissue volumes)"
               if parse.intent == "refuse" or parse.intent == "question"
               else "it reads as an instruction, not a question")
        if parse.intent == "question":
            why = f"the model is not sure what it asks (confidence {parse.intent_p:.2f})"
        if parse.unknown:
            why = (f"it was never taught the word{'s' if len(parse.unknown) > 1 else ''} "
                   f"{', '.join(repr(w) for w in parse.unknown)}")
        return Answer(f"I cannot answer that: {why}.", None, parse, refused=True)
    q, target = parse.qtype, parse.target or "lesion"
    if q == "diagnosis":
        if facts.diagnosis is None:
            return Answer("No diagnosis was suggested for this series.", None, parse)
        p = f" (model probability {facts.diagnosis_probability:.2f})" if (
            facts.diagnosis_probability is not None) else ""
        return Answer(f"The suggested diagnosis is {DIAGNOSIS_WORDS[facts.diagnosis]}{p}.",
                      facts.diagnosis, parse)
    if q == "volume":
        tissue = parse.tissue or "brain"
        if tissue not in facts.tissue_ml:
            return Answer(f"{TISSUE_NAMES[tissue]} volume was not measured for this series.",
                          None, parse)
        v = facts.tissue_ml[tissue]
        return Answer(f"{TISSUE_NAMES[tissue]} volume is {v:.0f} ml.", round(v), parse)
    if not facts.lesions_measured:
        return Answer("Lesion detection was not run on this series.", None, parse)
    one, many = NOUN[target]
    if q in ("presence", "count"):
        hits = matching(facts, target, parse.side, parse.lobe)
        where = _place(parse.side, parse.lobe)
        if q == "count":
            text = (f"{_n(len(hits), target).capitalize()} detected{where}." if hits
                    else f"No {many} detected{where}.")
            return Answer(text, len(hits), parse)
        if not hits:
            return Answer(f"No, no {one} is detected{where}.", False, parse)
        big = hits[0]
        return Answer(f"Yes: {_n(len(hits), target)}{where}, the largest {big.diameter_mm:.0f} "
                      f"mm in the {big.where}.", True, parse)
    hits = matching(facts, target)
    if not hits:
        return Answer(f"No {one} is detected, so there is no {q} to give.", None, parse)
    big = hits[0]
    more = f" ({len(hits)} {many} in all)" if len(hits) > 1 else ""
    if q == "side":
        sides = sorted({x.side for x in hits})
        extra = f"; {many} are on: {', '.join(sides)}" if len(sides) > 1 else ""
        side_word = "in the midline" if big.side == "midline" else f"on the {big.side}"
        return Answer(f"The largest {one} is {side_word} ({big.where}){more}{extra}.", big.side,
                      parse)
    if q == "lobe":
        return Answer(f"The largest {one} is in the {big.where}{more}.", big.lobe, parse)
    return Answer(f"The largest {one} measures {big.diameter_mm:.0f} mm ({big.volume_ml:.2f} ml)"
                  f" in the {big.where}{more}.", round(big.diameter_mm), parse)


def expected_value(qtype: str, target: str, tissue: str, side: str, lobe: str,
                   facts: SeriesFacts) -> Any:
    """The value a correct answer states (the evaluation's ground truth).

    Same rules as :func:`answer`, from the question's true slots.
    """
    p = Parse(text="", intent="question", intent_p=1.0, qtype=qtype, target=target,
              tissue=tissue, side=side, lobe=lobe)
    return answer(p, facts).value
