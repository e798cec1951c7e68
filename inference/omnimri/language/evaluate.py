"""Evaluation of the language half against the issue #16 targets, on held-out phrasings.

* **Routing**: held-out instruction paraphrases (templates never trained on, alone and
  combined); correct when :func:`~.runtime.route_instructions`' reading gives exactly the
  intended set of canonical instructions.
* **Refusal**: held-out out-of-scope requests and questions (other organs, modalities,
  findings and measures, treatment, patient data, administration, nonsense, and in-scope
  requests mixed with any of these); each must be refused. Most bring words never taught
  (the out-of-scope world is open), which the runtime refuses by itself; the rate of the
  encoder alone (unknown words ignored) is reported beside it. Also counted: in-scope
  instructions routed to a *wrong* set of tasks (not refused: guessed wrong), and in-scope
  texts with an unknown word (0 by construction of the corpus: tested), and the routing of
  bare held-out verb-object pairs (``detect masses``: no wrapper, as a config line often is;
  measured apart because the bare form is itself a training template).
* **Question answering**: held-out question phrasings about sampled structured findings;
  correct when the answer states the value the true question slots give; contradictions are
  answers :func:`~.facts.verify_text` finds false against the findings.
* **Reports**: sampled findings written by :func:`~.narrate.write_report`; report facts are the
  statements a report must make (impression, place, size and count of the largest lesion of
  each kind, tissue volumes), contradictions as above, variety the distinct sentence templates
  and distinct reports.
* **Neural reports**: the report decoder (:mod:`~.reportgen`, ONNX Runtime with a key/value
  cache) on the same findings: facts and contradictions of the reports used (grounded: the
  grammar's where a generation fails the check), how many generations were refused, variety
  (distinct sentence templates and reports), ms per report p50/p95.
* **Latency**: text encoder on ONNX Runtime (one thread) per text, report writing per series.

The findings are sampled, not read from images: the answers and reports are computed from
whatever findings the vision model gives, so their correctness does not depend on the images;
how well the vision model finds lesions is :mod:`inference.omnimri.evaluate`'s measure.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from inference.omnimri.language import corpus as C
from inference.omnimri.language.facts import (
    Lesion,
    SeriesFacts,
    report_fact_checks,
    verify_text,
)
from inference.omnimri.language.narrate import (
    ALL_TEMPLATES,
    fill,
    slot_values,
    slotted,
    write_report,
)
from inference.omnimri.language.qa import answer, expected_value
from inference.omnimri.language.reportgen import ReportDecoder
from inference.omnimri.language.runtime import Parse, TextModel, refusal_reason

TARGETS: dict[str, tuple[str, float]] = {
    "routing_accuracy": (">=", 0.99),
    "refusal_rate": (">=", 1.0),
    "qa_accuracy": (">=", 0.95),
    "qa_contradictions": ("<=", 0),
    "report_fact_rate": (">=", 0.95),
    "report_contradictions": ("<=", 0),
    "report_seconds_p95": ("<=", 1.0),
    "decoder_report_fact_rate": (">=", 0.95),
    "decoder_report_contradictions": ("<=", 0),
    "decoder_ms_p95": ("<=", 1000.0),
}
"""Metric -> (comparison, target) from issue #16."""


def random_facts(rng: random.Random) -> SeriesFacts:
    """Plausible structured findings of one series.

    Normal, small-vessel disease or mass (with or without white-matter lesions); tissue
    volumes in ml (tissues not segmented in one case of ten: ``tasks`` says which ran); the
    diagnosis disagrees with the lesions in
    about one case of ten.
    """
    kind = rng.choice(("normal", "small_vessel", "mass"))
    lesions: list[Lesion] = []

    def one(k: str, lo: float, hi: float) -> Lesion:
        lobe = rng.choice(C.LOBES[1:])
        side = rng.choice(("left", "right", "left", "right", "midline"))
        d = round(rng.uniform(lo, hi), 1)
        return Lesion(k, side, lobe, d, round(d ** 3 * 3.1416 / 6000 * rng.uniform(0.5, 1), 2))

    if kind == "small_vessel":
        lesions += [one("wmh", 3, 18) for _ in range(rng.randint(1, 9))]
    if kind == "mass":
        lesions += [one("mass", 10, 60) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        lesions += [one("wmh", 3, 12) for _ in range(rng.choice((0, 0, 1, 3)))]
    lesions.sort(key=lambda x: -x.diameter_mm)
    tissue: dict[str, float] = {}
    if rng.random() < 0.9:
        gm, wm, csf = rng.uniform(500, 800), rng.uniform(350, 600), rng.uniform(150, 400)
        tissue = {"brain": round(gm + wm + csf, 1), "grey matter": round(gm, 1),
                  "white matter": round(wm, 1), "csf": round(csf, 1)}
    diag = kind if rng.random() < 0.9 else rng.choice(("normal", "small_vessel", "mass"))
    ran = ("detect abnormalities", "suggest a diagnosis", "write the report")
    return SeriesFacts(lesions=tuple(lesions), diagnosis=diag,
                       diagnosis_probability=round(rng.uniform(0.5, 1.0), 3), tissue_ml=tissue,
                       model="sampled", tasks=(("segment brain tissues",) if tissue else ()) + ran)


@dataclass
class LanguageReport:
    """Evaluation numbers (see the module docstring)."""

    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable lines: each metric with its target, PASS/MISS."""
        out = [f"held-out phrasings: {self.counts.get('instructions', 0)} instructions, "
               f"{self.counts.get('refusals', 0)} out-of-scope, "
               f"{self.counts.get('questions', 0)} questions; "
               f"{self.counts.get('reports', 0)} reports"]
        for k, v in self.metrics.items():
            if k in TARGETS:
                op, t = TARGETS[k]
                ok = v >= t if op == ">=" else v <= t
                out.append(f"  {k:24s} {v:10.4g}   target {op} {t:g}   "
                           f"{'PASS' if ok else 'MISS'}")
            else:
                out.append(f"  {k:24s} {v:10.4g}")
        out += [f"  e.g. {e}" for e in self.examples]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return {"metrics": self.metrics, "counts": self.counts, "examples": self.examples}


def decoder_metrics(decoder: ReportDecoder, cases: list[SeriesFacts],
                    rejections: list[str] | None = None) -> dict[str, float]:
    """The neural report decoder on ``cases`` (findings), as served (ONNX Runtime, cache).

    ``decoder_report_fact_rate`` and ``decoder_report_contradictions`` score the reports
    *used* (the decoder's when grounded, else the grammar's); ``decoder_rejected`` counts the
    generations the grounding check refused (and their rate), ``decoder_fact_rate_raw`` the
    decoder's own texts before that check; variety is the distinct sentence templates
    (:data:`~.narrate.ALL_TEMPLATES`) its accepted texts use and the distinct reports;
    ``decoder_ms_p50``/``p95`` the generation time per report, ms (one thread). The first
    three refused generations and why go to ``rejections``.
    """
    ok = n = bad = rejected = raw_ok = raw_n = 0
    sentences: set[str] = set()
    texts: set[str] = set()
    ms = []
    for k, facts in enumerate(cases):
        g = decoder.write(facts, seed=f"case-{k}")
        ms.append(1000 * g.seconds)
        checks = report_fact_checks(g.report.findings, g.report.impression, facts)
        ok += sum(checks)
        n += len(checks)
        bad += bool(verify_text(f"{g.report.findings} {g.report.impression}", facts))
        rejected += not g.neural
        if not g.neural and rejections is not None and len(rejections) < 3:
            rejections.append(f"decoder text refused ({'; '.join(g.problems)}): "
                              f"{g.delexicalised}")
        findings, _, impression = g.delexicalised.partition(" <impression> ")
        try:
            raw = fill(findings, slot_values(facts)), fill(impression, slot_values(facts))
            raw_checks = report_fact_checks(*raw, facts)
        except KeyError:
            raw_checks = [False]
        raw_ok += sum(raw_checks)
        raw_n += len(raw_checks)
        if g.neural:
            sentences |= {f"{key}:{n}" for key, ts in ALL_TEMPLATES.items()
                          for n, t in enumerate(ts) for group in ("", "mass", "wmh")
                          if slotted(t, group) in g.delexicalised}
        texts.add(g.report.findings + g.report.impression)
    ms.sort()
    return {
        "decoder_report_fact_rate": ok / max(1, n),
        "decoder_report_contradictions": bad,
        "decoder_rejected": rejected,
        "decoder_rejected_rate": rejected / max(1, len(cases)),
        "decoder_fact_rate_raw": raw_ok / max(1, raw_n),
        "decoder_sentence_templates": len(sentences),
        "decoder_distinct_reports": len(texts),
        "decoder_ms_p50": ms[len(ms) // 2] if ms else 0.0,
        "decoder_ms_p95": ms[int(0.95 * (len(ms) - 1))] if ms else 0.0,
    }


def evaluate_language(model: TextModel, n: int = 2000, seed: int = 1, reports: int = 300,
                      decoder: ReportDecoder | None = None) -> LanguageReport:
    """All language metrics on ``n`` held-out texts and ``reports`` sampled findings.

    With ``decoder``, also the neural report decoder's (:func:`decoder_metrics`) on the same
    findings.
    """
    rep = LanguageReport()
    ex = C.generate(n, "heldout", seed=seed)
    t0 = time.perf_counter()
    parses: list[Parse] = []
    for i in range(0, len(ex), 64):
        parses += model.parse([e.text for e in ex[i:i + 64]])
    batch_s = (time.perf_counter() - t0) / max(1, len(ex))
    t0 = time.perf_counter()
    for e in ex[:50]:
        model.parse([e.text])
    single_s = (time.perf_counter() - t0) / 50
    rng = random.Random(seed)
    routed = refused = qa_ok = qa_bad = wrong = alone = n_unknown = in_unknown = 0
    n_ins = n_ref = n_q = 0
    by_kind: dict[str, list[int]] = {}
    misses: list[str] = []
    for e, p in zip(ex, parses, strict=True):
        if C.INTENTS[e.intent] != "refuse":
            in_unknown += bool(p.unknown)
        if C.INTENTS[e.intent] == "instruction":
            n_ins += 1
            want = {t for t, b in zip(C.TASKS, e.tasks, strict=True) if b}
            if refusal_reason(p) is None and set(p.tasks) == want:
                routed += 1
                continue
            wrong += refusal_reason(p) is None
            if len(misses) < 3:
                misses.append(f"routing miss: {e.text!r} -> {p.intent} {p.tasks}")
        elif C.INTENTS[e.intent] == "refuse":
            n_ref += 1
            tally = by_kind.setdefault(e.kind, [0, 0])
            tally[1] += 1
            n_unknown += bool(p.unknown)
            bare = replace(p, unknown=())
            alone += refusal_reason(bare) is not None and answer(bare, SeriesFacts()).refused
            # refused as an instruction and as a question
            if refusal_reason(p) is not None and answer(p, SeriesFacts()).refused:
                refused += 1
                tally[0] += 1
            elif len(misses) < 6:
                misses.append(f"not refused: {e.text!r} -> {p.intent} {p.tasks}")
        else:
            n_q += 1
            facts = random_facts(rng)
            lab = {h: C.HEADS[h][e.labels[h]] if h in e.labels else d for h, d in
                   (("qtype", ""), ("target", "lesion"), ("tissue", "brain"), ("side", "any"),
                    ("lobe", "any"))}
            want = expected_value(lab["qtype"], lab["target"], lab["tissue"], lab["side"],
                                  lab["lobe"], facts)
            a = answer(p, facts)
            if not a.refused and a.value == want and p.qtype == lab["qtype"]:
                qa_ok += 1
            elif len(misses) < 9:
                misses.append(f"qa miss: {e.text!r} -> {p.qtype}/{p.target}/{p.side}/{p.lobe}"
                              f"/{p.tissue}: {a.text}")
            if verify_text(a.text, facts):
                qa_bad += 1
    facts_ok = facts_n = rep_bad = 0
    templates: set[str] = set()
    texts: set[str] = set()
    times = []
    cases = []
    for k in range(reports):
        facts = random_facts(rng)
        cases.append(facts)
        t0 = time.perf_counter()
        r, used = write_report(facts, seed=f"case-{k}")
        times.append(time.perf_counter() - t0)
        checks = report_fact_checks(r.findings, r.impression, facts)
        facts_ok += sum(checks)
        facts_n += len(checks)
        if verify_text(f"{r.findings} {r.impression}", facts):
            rep_bad += 1
        templates.update(used)
        texts.add(r.findings + r.impression)
        if k < 2:
            rep.examples.append(f"report: {r.findings} | {r.impression}")
    times.sort()
    rep.examples += misses
    pairs = [(t, C.bare_clause(t, rng, "heldout")) for t in C.TASKS for _ in range(40)]
    bare_ok = sum(refusal_reason(p) is None and p.tasks == (t,) for (t, _), p in zip(
        pairs, model.parse([b for _, b in pairs]), strict=True))
    rep.counts = {"instructions": n_ins, "refusals": n_ref, "questions": n_q,
                  "reports": reports, "bare": len(pairs)}
    rep.metrics = {
        "routing_accuracy": routed / max(1, n_ins),
        "routing_wrong_tasks": wrong,
        "routing_accuracy_bare_pairs": bare_ok / len(pairs),
        "refusal_rate": refused / max(1, n_ref),
        "refusal_rate_encoder_alone": alone / max(1, n_ref),
        "out_of_scope_with_unknown_words": n_unknown / max(1, n_ref),
        "in_scope_with_unknown_words": in_unknown,
        **{f"refusal_rate_{k.replace(' ', '_')}": ok / max(1, n)
           for k, (ok, n) in sorted(by_kind.items())},
        "qa_accuracy": qa_ok / max(1, n_q),
        "qa_contradictions": qa_bad,
        "report_fact_rate": facts_ok / max(1, facts_n),
        "report_contradictions": rep_bad,
        "report_templates_used": len(templates),
        "report_templates_total": sum(len(v) for v in ALL_TEMPLATES.values()),
        "report_distinct_texts": len(texts),
        "report_seconds_p95": times[int(0.95 * (len(times) - 1))] if times else 0.0,
        "encoder_ms_per_text_batched": 1000 * batch_s,
        "encoder_ms_per_text_single": 1000 * single_s,
    }
    if decoder is not None:
        turned_down: list[str] = []
        rep.metrics |= decoder_metrics(decoder, cases, turned_down)
        rep.examples += turned_down
        g = decoder.write(cases[0], seed="case-0")
        rep.examples.insert(0, f"decoder report ({'neural' if g.neural else 'grammar'}): "
                               f"{g.report.findings} | {g.report.impression}")
    return rep


def evaluate_package(folder: Path, n: int = 2000, seed: int = 1, reports: int = 300
                     ) -> LanguageReport:
    """:func:`evaluate_language` with the text model of the package in ``folder``.

    Raises:
        ValueError: The package has no ``extra.language``.
    """
    from inference.omnimri.language.reportgen import decoder_for
    from inference.omnimri.language.runtime import text_model_for
    from inference.package import ModelPackage

    pkg = ModelPackage.load(folder)
    tm = text_model_for(pkg)
    if tm is None:
        raise ValueError(f"{folder}: no language model (extra.language); run "
                         "'omnimri-node train language' first")
    return evaluate_language(tm, n, seed, reports, decoder_for(pkg))
