"""The neural report decoder, served on ONNX Runtime (CPU) with a key/value cache, grounded.

The decoder (:mod:`inference.omnimri.language.decoder` trains it: a small GPT-2 from
``transformers``, configured from scratch) reads a *facts prefix* - tokens that state what the
structured findings hold (masses and white-matter lesions: none, one or several, and whether
others lie elsewhere; whether the tissues were segmented and their volumes measured; the
diagnosis the report states) and a style token - and writes the findings and the impression
word by word. Measured values are never generated: the decoder writes *slots*
(``{d_mass}``, ``{where_wmh}``, ``{brain}``...) that are filled from the findings
(:func:`inference.omnimri.language.narrate.fill`), so a number or a place in the text is always
the measured one.

Every generation is then checked against the findings (:func:`ground`): it must be well formed
(impression separator, end token, only slots the findings have a value for), state nothing
that :func:`~inference.omnimri.language.facts.verify_text` finds false (a place without such a
lesion, a wrong count, a size or volume not measured, a denied lesion, tissue statements when
the tissues were not segmented) and make every statement a report must make
(:func:`~inference.omnimri.language.facts.report_fact_checks`). A generation that fails is not
used: the grammar's report (:func:`~inference.omnimri.language.narrate.write_report`) is, and
:class:`Generated` says so (the evaluation counts how often).

Serving needs only ``onnxruntime``, ``tokenizers`` and numpy (no torch).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference import results as R
from inference.omnimri.language.facts import SeriesFacts, report_fact_checks, verify_text
from inference.omnimri.language.narrate import fill, slot_values, write_report

DECODER_FILE = "report_decoder.onnx"
DECODER_TOKENIZER_FILE = "report_tokenizer.json"
SPECIAL = ("[PAD]", "[UNK]", "<report>", "<impression>", "<end>")
"""Special tokens of the decoder's tokenizer: padding, unknown, end of the facts prefix, start
of the impression, end of the report."""
STYLES = 12
"""Style tokens ``<style=0>`` ... ``<style=11>`` (:func:`~.narrate.styled_choice`)."""
MAX_NEW_TOKENS = 120
"""Longest report the decoder may write, in tokens (the longest training report is ~75)."""


def prefix_tokens(facts: SeriesFacts, style: int) -> list[str]:
    """The facts prefix of ``facts``: what the decoder is told, ending with ``<report>``."""
    values = slot_values(facts)
    out = []
    for kind in ("mass", "wmh"):
        n = int(values.get(f"n_{kind}", "0"))
        out.append(f"<{kind}={'n' if n > 1 else n}>")
        if f"places_{kind}" in values:
            out.append(f"<{kind}_spread>")
    out.append("<seg>" if facts.tissues_measured else "<noseg>")
    out.append("<vol>" if "brain" in values else "<novol>")
    out += [f"<dx={facts.report_kind}>", f"<style={style % STYLES}>", "<report>"]
    return out


def all_prefix_tokens() -> list[str]:
    """Every token a facts prefix can hold (part of the decoder's vocabulary)."""
    out = [f"<{k}={n}>" for k in ("mass", "wmh") for n in ("0", "1", "n")]
    out += ["<mass_spread>", "<wmh_spread>", "<seg>", "<noseg>", "<vol>", "<novol>"]
    out += [f"<dx={k}>" for k in ("normal", "small_vessel", "mass")]
    return out + [f"<style={k}>" for k in range(STYLES)]


def style_of(seed: str) -> int:
    """The style a seed (e.g. the findings or the job id) chooses: stable across runs."""
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") % STYLES


def detokenize(tokens: list[str]) -> str:
    """Words back to text: no space before ``.,;:)`` nor after ``(``."""
    text = " ".join(tokens)
    return re.sub(r"\( ", "(", re.sub(r" ([.,;:)])", r"\1", text))


@dataclass
class Generated:
    """One report: the text used, and how it was written."""

    report: R.Report
    neural: bool
    """``True``: the decoder's text passed the grounding check and is used; ``False``: the
    grammar's report is used (the decoder's failed, see :attr:`problems`)."""
    problems: list[str] = field(default_factory=list)
    """Why the decoder's text was not used (empty when it was)."""
    delexicalised: str = ""
    """The decoder's text with its slots (what the variety measure counts)."""
    seconds: float = 0.0
    """Decoder generation time, s."""


def ground(findings: str, impression: str, facts: SeriesFacts) -> tuple[R.Report | None,
                                                                         list[str]]:
    """Fill the decoder's delexicalised text and check it against ``facts``.

    Returns the report (``None`` when it cannot be used) and the problems found.
    """
    values = slot_values(facts)
    try:
        rep = R.Report(findings=fill(findings, values), impression=fill(impression, values))
    except KeyError as err:
        return None, [f"slot {err.args[0]!r} has no value in the findings"]
    problems = verify_text(f"{rep.findings} {rep.impression}", facts)
    if not all(report_fact_checks(rep.findings, rep.impression, facts)):
        problems.append("a statement the report must make is missing")
    if not rep.findings or not rep.impression:
        problems.append("empty findings or impression")
    return (None if problems else rep), problems


class ReportDecoder:
    """The ONNX report decoder of one package, generating greedily with a key/value cache.

    Args:
        folder: The language folder (``report_decoder.onnx``, ``report_tokenizer.json``).
        decoder: File name of the decoder step graph.
        tokenizer: File name of its tokenizer.
        engine: The vision model's engine preference (``auto``, a name or a list): TensorRT
            when it is in it and usable here, else ONNX Runtime on CPU
            (:func:`inference.omnimri.language.trt.language_session`).
    """

    def __init__(self, folder: Path, decoder: str = DECODER_FILE,
                 tokenizer: str = DECODER_TOKENIZER_FILE,
                 engine: str | tuple[str, ...] = "auto") -> None:
        from tokenizers import Tokenizer

        from inference.omnimri.language.trt import decoder_dims, language_session

        self.tok = Tokenizer.from_file(str(folder / tokenizer))
        self.sess = language_session(folder / decoder, engine, dims=decoder_dims())
        layers, two, batch, heads, _, head_dim = self.sess.input_shape("past")
        self.empty_past = np.zeros((int(layers), int(two), int(batch), int(heads), 0,
                                    int(head_dim)), np.float32)
        self.end = self.token_id("<end>")

    def token_id(self, token: str) -> int:
        """The id of ``token`` in the decoder's vocabulary."""
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{token!r} is not in the report decoder's vocabulary")
        return int(i)

    def step(self, ids: list[int], start: int, past: npt.NDArray[np.float32]
             ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Run tokens ``ids`` at positions ``start...`` on the cache ``past``.

        Returns the logits ``[T, vocab]`` and the new cache ``[layers, 2, 1, heads, start+T,
        head_dim]``.
        """
        t = len(ids)
        mask = np.triu(np.full((t, start + t), -np.inf, np.float32), start + 1)[None, None]
        logits, present = self.sess.run(["logits", "present"], {
            "input_ids": np.array([ids], np.int64),
            "position_ids": np.arange(start, start + t, dtype=np.int64)[None],
            "attention_mask": mask, "past": past})
        return logits[0], present

    def generate_ids(self, prefix: list[int], max_new: int = MAX_NEW_TOKENS) -> list[int]:
        """Greedy continuation of ``prefix`` up to ``<end>`` (excluded) or ``max_new`` tokens."""
        logits, past = self.step(prefix, 0, self.empty_past)
        out: list[int] = []
        pos = len(prefix)
        for _ in range(max_new):
            nxt = int(np.argmax(logits[-1]))
            if nxt == self.end:
                break
            out.append(nxt)
            logits, past = self.step([nxt], pos, past)
            pos += 1
        return out

    def delexicalised(self, facts: SeriesFacts, style: int) -> tuple[str, str, list[str]]:
        """The decoder's findings and impression with slots, and format problems."""
        prefix = [self.token_id(t) for t in prefix_tokens(facts, style)]
        words = [self.tok.id_to_token(i) or "[UNK]" for i in self.generate_ids(prefix)]
        problems = []
        if words.count("<impression>") != 1:
            problems.append("not one findings and one impression")
        if any(w in SPECIAL for w in words if w != "<impression>"):
            problems.append("a special token in the text")
        if len(words) >= MAX_NEW_TOKENS:
            problems.append("no end token")
        cut = words.index("<impression>") if "<impression>" in words else len(words)
        return detokenize(words[:cut]), detokenize(words[cut + 1:]), problems

    def write(self, facts: SeriesFacts, seed: str = "") -> Generated:
        """The report of ``facts``: the decoder's when grounded, else the grammar's."""
        t0 = time.perf_counter()
        findings, impression, problems = self.delexicalised(facts, style_of(seed))
        seconds = time.perf_counter() - t0
        rep: R.Report | None = None
        if not problems:
            rep, problems = ground(findings, impression, facts)
        delex = f"{findings} <impression> {impression}"
        if rep is None:
            return Generated(write_report(facts, seed)[0], False, problems, delex, seconds)
        return Generated(rep, True, [], delex, seconds)


@functools.lru_cache(maxsize=4)
def _load(folder: str, decoder: str, tokenizer: str,
          engine: str | tuple[str, ...] = "auto") -> ReportDecoder:
    return ReportDecoder(Path(folder), decoder, tokenizer, engine)


def decoder_for(package: Any, engine: str | Sequence[str] = "auto") -> ReportDecoder | None:
    """The package's report decoder (``extra.language.report_decoder``), cached, or ``None``.

    ``engine``: the vision model's engine preference (``auto``: TensorRT, then ONNX Runtime
    on CPU).
    """
    spec = dict(package.spec.extra).get("language") or {}
    if not spec.get("report_decoder"):
        return None
    folder = package.version_folder() / spec.get("folder", "language")
    return _load(str(folder), spec["report_decoder"],
                 spec.get("report_tokenizer", DECODER_TOKENIZER_FILE),
                 engine if isinstance(engine, str) else tuple(engine))


def narrator_for(package: Any, engine: str | Sequence[str] = "auto") -> Any:
    """A :data:`inference.omnimri.tasks.Narrator` writing with the package's report decoder.

    Falls back to the grammar (:func:`~.narrate.narrate_results`) when the package has no
    decoder. The style is seeded by the findings, so a series gets the same report each run.
    """
    from inference.omnimri.language.narrate import narrate_results

    dec = decoder_for(package, engine)
    if dec is None:
        return narrate_results

    def narrate(res: R.Results, detections: list[R.Detection],
                affine: npt.NDArray[np.float64]) -> R.Report:
        facts = SeriesFacts.from_results(dataclasses.replace(res, detections=list(detections)),
                                         affine)
        seed = json.dumps(facts.to_dict(), sort_keys=True, default=str)
        return dec.write(facts, seed).report

    return narrate
