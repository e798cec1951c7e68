"""The structured findings of a series that answers and reports are computed from.

:class:`SeriesFacts` is what the language half knows about a series: the lesion detections
(kind, side, lobe, diameter in mm, volume in ml), the suggested diagnosis and the tissue
volumes (ml), all taken from :class:`inference.results.Results`. Text is *written from* these
facts and :func:`verify_text` checks any text back against them (the contradiction count of the
evaluation), independently of how the text was written.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from inference import results as R

LOBE_WORDS = ("frontal", "parietal", "temporal", "occipital", "cerebellum")
SIDE_WORDS = ("left", "right", "midline")
TISSUE_TASK = "segment brain tissues"
"""The canonical instruction that segments the tissues."""
TISSUE_LABELS = {"Brain": "brain", "CSF": "csf", "Grey matter": "grey matter",
                 "White matter": "white matter"}
"""Segment label of :mod:`inference.omnimri.tasks` -> tissue name of the questions."""


@dataclass(frozen=True)
class Lesion:
    """One detected lesion."""

    kind: str
    """``wmh`` (white-matter hyperintensity) or ``mass``."""
    side: str
    """``left``, ``right`` (the patient's) or ``midline``."""
    lobe: str
    """``frontal``, ``parietal``, ``temporal``, ``occipital`` or ``cerebellum``."""
    diameter_mm: float
    """Largest diameter, mm (one decimal)."""
    volume_ml: float
    """Volume, ml."""

    @property
    def where(self) -> str:
        """``left frontal lobe``, ``right cerebellar hemisphere``, ``midline parietal lobe``."""
        if self.lobe == "cerebellum":
            return "midline cerebellum" if self.side == "midline" else (
                f"{self.side} cerebellar hemisphere")
        return f"{self.side} {self.lobe} lobe"


@dataclass(frozen=True)
class SeriesFacts:
    """What the model found in one series (no patient data)."""

    lesions: tuple[Lesion, ...] = ()
    """Largest first."""
    diagnosis: str | None = None
    """``normal``, ``small_vessel`` or ``mass``; ``None`` when not suggested."""
    diagnosis_probability: float | None = None
    tissue_ml: dict[str, float] = field(default_factory=dict)
    """Tissue volumes, ml, keyed by ``brain``, ``csf``, ``grey matter``, ``white matter``."""
    lesions_measured: bool = True
    """``False`` when the lesion head did not run (then ``lesions`` says nothing)."""
    model: str = ""
    """``name version`` of the model that found them."""
    tasks: tuple[str, ...] = ()
    """The canonical instructions that ran (empty: not recorded, e.g. an older cache; then the
    tissues count as segmented only when :attr:`tissue_ml` holds volumes)."""

    @property
    def tissues_measured(self) -> bool:
        """Whether the tissues were segmented (text may describe grey/white matter, CSF)."""
        return TISSUE_TASK in self.tasks or bool(self.tissue_ml)

    @property
    def report_kind(self) -> str:
        """Diagnosis the report states, agreeing with the detections.

        The rule of :func:`inference.omnimri.tasks.report_facts`.
        """
        masses = any(x.kind == "mass" for x in self.lesions)
        wmh = any(x.kind == "wmh" for x in self.lesions)
        kind = self.diagnosis or "normal"
        if kind == "mass" and not masses:
            kind = "small_vessel" if wmh else "normal"
        if kind == "small_vessel" and not wmh:
            kind = "mass" if masses else "normal"
        if kind == "normal" and self.lesions:
            kind = "mass" if masses else "small_vessel"
        return kind

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeriesFacts:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["lesions"] = tuple(Lesion(**x) for x in d.get("lesions", ()))
        d["tasks"] = tuple(d.get("tasks", ()))
        return cls(**d)

    @classmethod
    def from_results(cls, res: R.Results, affine: npt.NDArray[np.float64] | None = None
                     ) -> SeriesFacts:
        """From model results.

        ``affine`` (source grid, mm) gives the voxel volume of the tissue masks (no tissue
        volumes without it).
        """
        from inference.omnimri.tasks import DIAGNOSIS_CODES

        lesions = tuple(sorted(
            (Lesion(kind="mass" if d.finding == R.MASS else "wmh", side=d.side or "midline",
                    lobe=d.location.removesuffix(" lobe") or "frontal",
                    diameter_mm=round(float(d.diameter_mm), 1),
                    volume_ml=round(float(d.volume_ml), 2))
             for d in res.detections), key=lambda x: -x.diameter_mm))
        diag = prob = None
        if res.diagnosis is not None:
            diag = next((k for k, c in DIAGNOSIS_CODES.items() if c == res.diagnosis.code), None)
            prob = round(float(res.diagnosis.probability), 3)
        tissue: dict[str, float] = {}
        if affine is not None:
            voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
            for s in res.segments:
                if s.label.label in TISSUE_LABELS:
                    tissue[TISSUE_LABELS[s.label.label]] = round(
                        float(np.count_nonzero(s.mask)) * voxel_ml, 1)
        ran = tuple(" ".join(i.lower().split()) for i in res.instructions)
        measured = "detect abnormalities" in ran or bool(res.detections)
        return cls(lesions=lesions, diagnosis=diag, diagnosis_probability=prob,
                   tissue_ml=tissue, lesions_measured=measured,
                   model=f"{res.model.name} {res.model.version}", tasks=ran)


# --------------------------------------------------------------------------- checking text

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")


def number_word(n: int) -> str:
    """``three`` for 3 (digits from 13 on), as a sentence may start with."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


_LESION_NOUN = r"(?:lesions?|abnormalit(?:y|ies)|mass(?:es)?|tumou?rs?|hyperintensit(?:y|ies))"
_NEG = re.compile(r"\bno (?:[a-z-]+ ){0,3}?" + _LESION_NOUN)


def _mentions(sentence: str) -> list[tuple[str, str]]:
    """``(side, lobe)`` places a sentence names (``any`` where it does not say)."""
    out = []
    for m in re.finditer(r"\b(?:(left|right|midline) )?(frontal|parietal|temporal|occipital) "
                         r"lobes?", sentence):
        out.append((m.group(1) or "any", m.group(2)))
    for m in re.finditer(r"\b(left|right) cerebellar hemisphere", sentence):
        out.append((m.group(1), "cerebellum"))
    for m in re.finditer(r"\b(?:(midline) )?cerebellum\b", sentence):
        out.append((m.group(1) or "any", "cerebellum"))
    for m in re.finditer(r"\bon the (left|right)(?: side)?\b|\b(left|right) hemisphere\b",
                         sentence):
        out.append((m.group(1) or m.group(2), "any"))
    if re.search(r"\bin the midline\b(?! (?:frontal|parietal|temporal|occipital|cerebellum))",
                 sentence):
        out.append(("midline", "any"))
    return out


def _at(x: Lesion, place: tuple[str, str]) -> bool:
    side, lobe = place
    return (side == "any" or x.side == side) and (lobe == "any" or x.lobe == lobe)


def _kind_of(sentence: str) -> str | None:
    """The lesion kind a sentence is about: ``mass``, ``wmh`` or ``None`` (any)."""
    if re.search(r"\b(mass(es)?|tumou?rs?)\b", sentence):
        return "mass"
    if re.search(r"white[- ]matter (lesion|hyperintens)|\bwmhs?\b|small[- ]vessel", sentence):
        return "wmh"
    return None


_TISSUE_STATEMENT = re.compile(
    r"\b(?:gr[ae]y(?:[- ]white)?(?: matter)?|csf|cerebrospinal|tissue volumes?|segmented "
    r"volumes?|brain (?:measures|volume)|white matter (?:are|is|appears?|volume|\d))\b")
"""Words that describe the segmented tissues (grey/white matter, CSF, tissue volumes); a
white-matter *lesion* is not one."""

DIAGNOSIS_TEXT = {"normal": "normal", "small_vessel": "small-vessel disease",
                  "mass": "intracranial mass"}


def verify_text(text: str, facts: SeriesFacts) -> list[str]:
    """Statements of ``text`` that contradict ``facts`` (empty list: none).

    Checked, sentence by sentence: every place named (side and/or lobe) holds a lesion of the
    sentence's kind; every ``N mm`` is a lesion diameter (rounded) and every ``N ml`` a tissue
    or lesion volume; a ``no lesion``/``no mass`` statement has no such lesion (where it names
    a place, none there); a lesion count stated in digits is neither below the lesions at the
    places named nor above all of that kind; a sentence naming "the diagnosis" names the
    model's; grey/white matter, CSF and tissue volumes are described only when the tissues
    were segmented (:attr:`SeriesFacts.tissues_measured`).
    """
    problems: list[str] = []
    low = text.lower()
    diameters = {round(x.diameter_mm) for x in facts.lesions}
    volumes = {float(round(v)) for v in facts.tissue_ml.values()} | {
        round(x.volume_ml, 1) for x in facts.lesions} | {
        round(x.volume_ml, 2) for x in facts.lesions}
    for sentence in re.split(r"(?<=[.;!?])\s+", low):
        if (not facts.tissues_measured and _TISSUE_STATEMENT.search(sentence)
                and not re.search(r"\bnot (?:measured|segmented)\b", sentence)):
            problems.append(f"describes the tissues, which were not segmented: {sentence!r}")
        kind = _kind_of(sentence)
        pool = [x for x in facts.lesions if kind is None or x.kind == kind]
        places = _mentions(sentence)
        if _NEG.search(sentence) is not None:
            hit = [x for x in pool if not places or any(_at(x, p) for p in places)]
            if hit:
                problems.append(f"denies a lesion that was detected: {sentence!r}")
            continue
        for place in places:
            if not any(_at(x, place) for x in pool):
                problems.append(f"names a place with no such lesion {place}: {sentence!r}")
        for m in re.finditer(r"(\d+(?:\.\d+)?) mm\b", sentence):
            if round(float(m.group(1))) not in diameters:
                problems.append(f"size {m.group(1)} mm is no lesion's diameter: {sentence!r}")
        for m in re.finditer(r"(\d+(?:\.\d+)?) ml\b", sentence):
            v = float(m.group(1))
            if float(round(v)) not in volumes and v not in volumes:
                problems.append(f"volume {m.group(1)} ml is not measured: {sentence!r}")
        words = "|".join(NUMBER_WORDS[2:])
        for m in re.finditer(rf"(?<![\d.])\b(\d+|{words}) (?:[a-z-]+ ){{0,2}}?" + _LESION_NOUN,
                             sentence):
            if " mm " in m.group(0):
                continue
            k = int(m.group(1)) if m.group(1).isdigit() else NUMBER_WORDS.index(m.group(1))
            at = [x for x in pool if any(_at(x, p) for p in places)] if places else pool
            if not len(at) <= k <= len(pool) or (not places and k != len(pool)):
                problems.append(f"count {k} but {len(pool)} detected: {sentence!r}")
        if "diagnosis" in sentence and facts.diagnosis is not None:
            said = [k for k, w in DIAGNOSIS_TEXT.items() if re.search(rf"\b{w}\b", sentence)]
            if said and facts.diagnosis not in said:
                problems.append(f"names diagnosis {said[0]!r}, the model's is "
                                f"{facts.diagnosis!r}: {sentence!r}")
    return problems


def report_fact_checks(findings: str, impression: str, facts: SeriesFacts) -> list[bool]:
    """Whether each statement a report must make is there (one bool per statement)."""
    text = f"{findings} {impression}".lower()
    checks = []
    kind = facts.report_kind
    key = {"normal": r"normal|unremarkable|no intracranial abnormality",
           "small_vessel": r"small-vessel", "mass": r"mass|space-occupying"}[kind]
    checks.append(re.search(key, impression.lower()) is not None)
    for k in ("mass", "wmh"):
        group = [x for x in facts.lesions if x.kind == k]
        if not group:
            continue
        big = group[0]
        checks.append(big.where in text)
        checks.append(f"{round(big.diameter_mm)} mm" in text)
        n = len(group)
        stated = rf"\b({n}|{number_word(n)}) |\({n}\)"
        checks.append(bool(re.search(stated, text)) if n > 1 else bool(
            re.search(r"\b(a|one|single|solitary)\b", text)))
    if not facts.lesions:
        checks.append(bool(re.search(r"\bno (focal |mass)", text)))
    for v in facts.tissue_ml.values():
        checks.append(f"{v:.0f} ml" in text)
    return checks
