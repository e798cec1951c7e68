"""Text for people: the generated report and the burned-in labels, as a radiologist writes them.

The report decoder (``inference/omnimri/report_text.py``) writes lower-case tokens separated by
spaces (``"few mass lesions . the largest is in the left frontal lobe measuring 20 mm ."``);
evaluation parses that form, so it is kept there and formatted here, at export time only:
sentences with capitals, no space before punctuation, "mm" and "ml" after numbers, lobe and
side in words a reader expects ("left frontal lobe", "left cerebellar hemisphere").
"""

from __future__ import annotations

import re

from inference.results import Detection

_COUNT_WORDS = {"few": "a few", "single": "a single"}
"""Count buckets of the decoder that read better with an article."""

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?)])")
_SPACES = re.compile(r"\s+")
_NUMBER_UNIT = re.compile(r"(\d)(mm|ml|cm)\b")


def _fix_anatomy(text: str) -> str:
    """Anatomy in words: ``left cerebellum lobe`` -> ``left cerebellar hemisphere``.

    Also ``midline X lobe`` -> ``X lobe, in the midline``.
    """
    text = re.sub(r"\b(left|right) cerebellum lobe\b", r"\1 cerebellar hemisphere", text)
    text = re.sub(r"\bcerebellum lobe\b", "cerebellum", text)
    text = re.sub(r"\bmidline (\w+) lobe\b", r"\1 lobe, in the midline,", text)
    text = re.sub(r"\bmidline cerebellum\b", "cerebellar vermis", text)
    return text


def sentence_case(text: str) -> str:
    """Sentences from decoder tokens: capitals, articles, no space before punctuation.

    >>> sentence_case("few mass lesions . the largest is in the left frontal lobe measuring "
    ...               "20 mm with surrounding oedema .")
    'A few mass lesions. The largest is in the left frontal lobe measuring 20 mm with \
surrounding oedema.'
    >>> sentence_case("normal study .")
    'Normal study.'
    """
    text = _SPACES.sub(" ", text).strip()
    if not text:
        return ""
    text = _fix_anatomy(text)
    text = _NUMBER_UNIT.sub(r"\1 \2", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = re.sub(r",([.,])", r"\1", text)  # "..., in the midline,." -> "..., in the midline."
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    out = []
    for s in sentences:
        first, _, rest = s.partition(" ")
        if first in _COUNT_WORDS:
            s = f"{_COUNT_WORDS[first]} {rest}".strip()
        s = s[0].upper() + s[1:]
        if s[-1] not in ".!?":
            s += "."
        out.append(s)
    return " ".join(out)


def where(det: Detection) -> str:
    """Location of a detection in words: side and lobe (``"left frontal lobe"``).

    Or what is known of them (``"right side"``, ``"location not given"``).
    """
    side = det.side if det.side in ("left", "right") else ""
    loc = det.location.strip()
    if loc == "cerebellum":
        if side:
            return f"{side} cerebellar hemisphere"
        return "cerebellar vermis" if det.side == "midline" else "cerebellum"
    if loc:
        if side and not loc.startswith(side):
            return f"{side} {loc}"
        if det.side == "midline":
            return f"{loc}, midline"
        return loc
    if side:
        return f"{side} side"
    if det.side == "midline":
        return "midline"
    return "location not given"


def detection_label(det: Detection, n: int) -> str:
    """Short label of a detection for images: ``"Mass 1, 20 mm, p = 0.91"``."""
    return f"{det.finding.meaning} {n}, {det.diameter_mm:.0f} mm, p = {det.probability:.2f}"


def detection_line(det: Detection, n: int) -> str:
    """One sentence about a detection.

    E.g. ``"Mass 1: left frontal lobe, 20.0 mm, 3.10 ml, p = 0.91."``.
    """
    return (
        f"{det.finding.meaning} {n}: {where(det)}, {det.diameter_mm:.1f} mm, "
        f"{det.volume_ml:.2f} ml, p = {det.probability:.2f}."
    )
