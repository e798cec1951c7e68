"""Report vocabulary, tokenisation and the structured-findings memory of the text decoder.

The report decoder is *grounded*: its memory is the model's own structured findings (diagnosis,
lesion count bucket, side, lobe and size of the largest lesion), one slot each, so that the
text it writes can be checked against - and does not contradict - the structured outputs.
"""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt

from inference.omnimri.synthetic import DIAGNOSES, write_report

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

SLOTS: dict[str, tuple[str, ...]] = {
    "kind": DIAGNOSES,
    "count": ("none", "single", "few", "multiple"),
    "side": ("none", "left", "right", "midline"),
    "lobe": ("none", "frontal", "parietal", "temporal", "occipital", "cerebellum"),
    "size": tuple(str(s) for s in range(0, 105, 5)),
}
"""Fact slots and their values, in memory order."""

FACT_DIM = sum(len(v) for v in SLOTS.values())
"""Width of one memory slot (one-hot over all slot values)."""


def build_vocabulary() -> list[str]:
    """All words the templated reports use, sorted, after the three special tokens."""
    words: set[str] = set()
    for kind in DIAGNOSES:
        for count, side, lobe, size in itertools.product(
            SLOTS["count"], SLOTS["side"], SLOTS["lobe"], SLOTS["size"]
        ):
            f, i = write_report({"kind": kind, "count": count, "side": side, "lobe": lobe,
                                 "size": size})
            words.update(f"findings : {f} impression : {i}".split())
    return [PAD, BOS, EOS, *sorted(words)]


VOCAB: list[str] = build_vocabulary()
WORD_ID = {w: n for n, w in enumerate(VOCAB)}


def encode(text: str, max_tokens: int) -> npt.NDArray[np.int64]:
    """Token ids ``[max_tokens]``: BOS, words, EOS, then PAD; raises on unknown words."""
    ids = [WORD_ID[BOS]] + [WORD_ID[w] for w in text.split()] + [WORD_ID[EOS]]
    if len(ids) > max_tokens:
        raise ValueError(f"report longer than {max_tokens} tokens")
    return np.array(ids + [WORD_ID[PAD]] * (max_tokens - len(ids)), np.int64)


def decode(ids: list[int] | npt.NDArray[np.int64]) -> str:
    """Words from token ids (stops at EOS, skips BOS/PAD)."""
    out = []
    for t in ids:
        w = VOCAB[int(t)]
        if w == EOS:
            break
        if w in (BOS, PAD):
            continue
        out.append(w)
    return " ".join(out)


def facts_memory(facts: dict[str, str]) -> npt.NDArray[np.float32]:
    """One-hot memory ``[slots, FACT_DIM]`` for the text decoder from report facts."""
    mem = np.zeros((len(SLOTS), FACT_DIM), np.float32)
    offset = 0
    for n, (slot, values) in enumerate(SLOTS.items()):
        v = facts.get(slot, values[0])
        if slot == "size":
            v = str(min(100, max(0, int(v))))
        mem[n, offset + values.index(v)] = 1.0
        offset += len(values)
    return mem


def split_report(text: str) -> tuple[str, str]:
    """``(findings, impression)`` from a generated ``findings : ... impression : ...`` text."""
    body = text.removeprefix("findings :").strip()
    if "impression :" in body:
        f, i = body.split("impression :", 1)
        return f.strip(), i.strip()
    return body, ""


def parse_facts(text: str) -> dict[str, str]:
    """The facts a generated report states (inverse of the report template).

    Returns a dict with ``kind`` always and, for abnormal reports, whichever of ``count``,
    ``side``, ``lobe`` and ``size`` the text states. Unrecognised text gives ``kind: unknown``.
    """
    words = text.split()
    if "no focal lesion" in text or "normal study" in text:
        return {"kind": "normal"}
    facts: dict[str, str] = {}
    if "mass" in words:
        facts["kind"] = "mass"
        facts["count"] = "single"
        if "a mass is seen" not in text:
            facts["count"] = next((w for w in words if w in SLOTS["count"][2:]), "unknown")
    elif "white" in words and "matter" in words:
        facts["kind"] = "small_vessel"
        if words and words[0] in ("findings",) and len(words) > 2 and words[2] in SLOTS["count"]:
            facts["count"] = words[2]
        else:
            for w in words:
                if w in SLOTS["count"][1:]:
                    facts["count"] = w
                    break
    else:
        return {"kind": "unknown"}
    for n, w in enumerate(words):
        if w in SLOTS["side"][1:] and n + 1 < len(words) and words[n + 1] in SLOTS["lobe"]:
            facts["side"], facts["lobe"] = w, words[n + 1]
        if w == "measuring" and n + 1 < len(words) and words[n + 1].isdigit():
            facts["size"] = words[n + 1]
    return facts
