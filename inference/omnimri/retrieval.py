"""Report<->image retrieval through the served path (issue #16, item 5).

The image side is the vision package's ``embedding`` output (:mod:`.export`), pooled per series
by :class:`inference.runner.EmbeddingPool` and read from
:func:`inference.runner.run_model`'s outputs exactly as a node job computes it. The text side is
the package's report embedder (:mod:`inference.omnimri.language.align`: the served BERT text
encoder's states and the projection aligned with the image embeddings, on ONNX Runtime).

A case's report is its *ground-truth* report: :func:`inference.omnimri.language.narrate.
write_report` of the case's true findings (:func:`case_facts`: the synthetic lesions, the true
diagnosis; no tissue volumes, so normal cases share one report).

**Recall@1** among ``n`` cases, both directions (report -> image, image -> report): a query
retrieves the item of highest cosine similarity. A retrieval counts as *correct* when the
retrieved case's true report facts equal the query's (:func:`fact_key`: kind, count bucket,
side and lobe of the largest lesion, size to 5 mm; all normal cases are equal), because many
cases share identical reports (every normal case) and no model can tell such cases apart from
the report. The *strict* recall@1 (the exact case) and the chance level of both rules (the
expected recall of a random ranking) are given beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.omnimri import synthetic as syn

RECALL_TARGET = 0.9
"""Issue #16: report<->image retrieval recall@1 >= 0.9 among 30 held-out cases."""

EVAL_CASES = 30
"""Cases in one retrieval set (issue #16)."""

VOXEL_ML = 8.0 / 1000.0
"""Volume of one voxel of a synthetic case (2 mm grid), ml."""


def fact_key(case: syn.Case) -> tuple[tuple[str, str], ...]:
    """The report facts of a case (:func:`inference.omnimri.synthetic.facts_from_lesions`).

    Kind, count bucket, side, lobe and size (5 mm buckets) of the largest lesion of the
    diagnosis' kind; the same for every normal case. Two cases with equal keys have
    interchangeable reports for the retrieval rule.
    """
    facts = syn.facts_from_lesions(syn.DIAGNOSES[case.diagnosis], case.lesions)
    return tuple(sorted(facts.items()))


def case_facts(case: syn.Case) -> Any:
    """The true :class:`~inference.omnimri.language.facts.SeriesFacts` of a synthetic case.

    Its lesions (white-matter hyperintensities and masses: side, lobe, diameter in mm, volume in
    ml from the instance masks) and its diagnosis; lesions and diagnosis were "measured", the
    tissues were not (the report then states no tissue volumes).
    """
    from inference.omnimri.language.facts import Lesion, SeriesFacts

    counts = np.bincount(case.instances.ravel().clip(min=0))
    lesions = sorted(
        (Lesion(kind="mass" if x.kind == "mass" else "wmh", side=x.side, lobe=x.lobe,
                diameter_mm=round(float(x.diameter_mm), 1),
                volume_ml=round(float(counts[x.instance] if x.instance < len(counts) else 0)
                                * VOXEL_ML, 2))
         for x in case.lesions), key=lambda x: -x.diameter_mm)
    diagnosis = syn.DIAGNOSES[case.diagnosis]
    if diagnosis == "normal":
        lesions = []
    return SeriesFacts(lesions=tuple(lesions), diagnosis=diagnosis, diagnosis_probability=1.0,
                       lesions_measured=True, model="ground truth",
                       tasks=("detect abnormalities", "suggest a diagnosis", "write the report"))


def report_text(facts: Any, seed: str | None = None) -> str:
    """Findings and impression of ``facts`` by the project's report writer, one string.

    ``seed`` picks the sentence templates (default: the facts themselves, as
    :func:`~inference.omnimri.language.narrate.narrate_results` does, so equal facts give
    equal text).
    """
    from inference.omnimri.language.narrate import write_report

    if seed is None:
        seed = json.dumps(facts.to_dict(), sort_keys=True, default=str)
    rep, _ = write_report(facts, seed=seed)
    return f"{rep.findings} {rep.impression}"


# --------------------------------------------------------------------------- image side


def case_embedding(model: Any, case: syn.Case) -> npt.NDArray[np.float32]:
    """The served image embedding of ``case`` (``[D]``, unit length).

    ``model`` is a :class:`inference.omnimri.evaluate.ServedModel`; the case becomes the volume
    a node builds from its DICOM series (:func:`~inference.omnimri.evaluate.case_volume`) and
    runs :func:`inference.runner.run_model` with ``write the report`` (the instruction whose
    outputs include ``embedding``).

    Raises:
        ValueError: The package has no ``embedding`` output.
    """
    from inference.omnimri.evaluate import case_volume

    raw = model.raw(case_volume(case), ["write the report"])
    if not raw.embedding:
        raise ValueError(f"model {model.package.name!r} has no embedding output (export it "
                         "again with this code: 'omnimri-node train export')")
    return np.asarray(next(iter(raw.embedding.values())), np.float32)


@dataclass
class CaseRecord:
    """One case as retrieval sees it: its served image embedding and true facts."""

    name: str
    embedding: npt.NDArray[np.float32]
    facts: dict[str, Any]
    """:meth:`SeriesFacts.to_dict` of :func:`case_facts`."""
    key: tuple[tuple[str, str], ...]
    """:func:`fact_key`."""
    contrast: str = ""

    def series_facts(self) -> Any:
        """The :class:`~inference.omnimri.language.facts.SeriesFacts`."""
        from inference.omnimri.language.facts import SeriesFacts

        return SeriesFacts.from_dict(self.facts)


def package_fingerprint(folder: Path) -> str:
    """Identifies a package's image embedding (vision weights and embedding spec) for caches."""
    import hashlib

    from inference.package import ModelPackage

    pkg = ModelPackage.load(folder)
    spec = pkg.spec.output("embedding") if "embedding" in [
        o.name for o in pkg.spec.outputs] else None
    h = hashlib.sha256()
    h.update(str((pkg.spec.provenance.model_extra or {}).get("weights_sha256", "")).encode())
    h.update(json.dumps(spec.model_dump() if spec is not None else None,
                        sort_keys=True).encode())
    h.update(str(pkg.onnx_path().stat().st_size).encode())
    return h.hexdigest()[:16]


def case_records(model: Any, cases: Sequence[tuple[str, Callable[[], syn.Case]]],
                 cache: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> list[CaseRecord]:
    """:class:`CaseRecord` of each ``(name, make)`` case, computed once per package.

    ``cache`` (a folder): records are stored there as ``<name>.json`` and read back when present
    (the caller keys the folder by :func:`package_fingerprint`).
    """
    say = progress or (lambda m: None)
    out = []
    t0 = time.perf_counter()
    for n, (name, make) in enumerate(cases):
        path = cache / f"{name}.json" if cache is not None else None
        if path is not None and path.is_file():
            d = json.loads(path.read_text())
            out.append(CaseRecord(d["name"], np.asarray(d["embedding"], np.float32), d["facts"],
                                  tuple(tuple(x) for x in d["key"]), d.get("contrast", "")))
            continue
        case = make()
        rec = CaseRecord(name, case_embedding(model, case), case_facts(case).to_dict(),
                         fact_key(case), case.contrast)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"name": rec.name, "embedding": rec.embedding.tolist(),
                                       "facts": rec.facts, "key": rec.key,
                                       "contrast": rec.contrast}, default=str))
            tmp.replace(path)
        out.append(rec)
        if (n + 1) % 10 == 0:
            say(f"image embeddings: {n + 1}/{len(cases)} ({time.perf_counter() - t0:.0f} s)")
    return out


# --------------------------------------------------------------------------- the metric


def recall_at_1(sim: npt.NDArray[np.floating], keys: Sequence[Any],
                kinds: Sequence[str] | None = None) -> dict[str, float]:
    """Recall@1 of a square similarity matrix ``sim[report i, image j]`` (same case: i == j).

    Returns ``report_to_image`` and ``image_to_report`` (correct: the retrieved case's
    ``keys`` equal the query's), their ``_strict`` versions (correct: the same case) and
    ``chance`` / ``chance_strict`` (expected recall@1 of a random ranking: mean over queries
    of the fraction of items with the query's key; ``1/n``). With ``kinds`` (a coarser key,
    e.g. the diagnosis) also ``*_kind`` and ``chance_kind`` (correct: the same kind).
    """
    s = np.asarray(sim, np.float64)
    n = s.shape[0]
    if s.shape != (n, n) or n != len(keys) or n == 0:
        raise ValueError(f"similarity {s.shape} does not match {len(keys)} cases")
    r2i = s.argmax(1)  # ties: the first
    i2r = s.argmax(0)
    idx = np.arange(n)

    def rule(k: Sequence[Any], suffix: str) -> dict[str, float]:
        same = np.array([[k[i] == k[j] for j in range(n)] for i in range(n)])
        return {f"report_to_image{suffix}": float(same[idx, r2i].mean()),
                f"image_to_report{suffix}": float(same[i2r, idx].mean()),
                f"chance{suffix}": float(same.mean(1).mean())}

    out = rule(keys, "")
    out |= {"report_to_image_strict": float((r2i == idx).mean()),
            "image_to_report_strict": float((i2r == idx).mean()), "chance_strict": 1.0 / n}
    if kinds is not None:
        out |= rule(kinds, "_kind")
    return out


@dataclass
class RetrievalReport:
    """Retrieval numbers of one case set (see the module docstring)."""

    metrics: dict[str, float] = field(default_factory=dict)
    seed: int = 1
    cases: int = 0
    distinct_reports: int = 0
    examples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable lines with the target (PASS/MISS)."""
        m = self.metrics
        out = [f"report<->image retrieval: {self.cases} held-out cases (seed {self.seed}), "
               f"{self.distinct_reports} distinct true reports; correct = the retrieved "
               "case's true report facts equal the query's (kind, count, side, lobe, size)"]
        for k in ("report_to_image", "image_to_report"):
            ok = m[k] >= RECALL_TARGET
            out.append(f"  recall@1 {k:16s} {m[k]:6.3f}   target >= {RECALL_TARGET:g}   "
                       f"{'PASS' if ok else 'MISS'}   (strict, same case: "
                       f"{m[k + '_strict']:.3f})")
        out.append(f"  chance: {m['chance']:.3f} (same facts), {m['chance_strict']:.3f} (same "
                   "case)")
        if "report_to_image_kind" in m:
            out.append(f"  same diagnosis kind only: report->image "
                       f"{m['report_to_image_kind']:.3f}, image->report "
                       f"{m['image_to_report_kind']:.3f} (chance {m['chance_kind']:.3f})")
        out += [f"  e.g. {e}" for e in self.examples]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return {"metrics": self.metrics, "seed": self.seed, "cases": self.cases,
                "distinct_reports": self.distinct_reports, "examples": self.examples}


def heldout_cases(n: int = EVAL_CASES, seed: int = 1
                  ) -> list[tuple[str, Callable[[], syn.Case]]]:
    """The ``n`` held-out cases of set ``seed``, as ``(name, make)`` for :func:`case_records`.

    :func:`inference.omnimri.evaluate.heldout_case` ``(k, seed)``, held-out lesion layout.
    """
    import functools

    from inference.omnimri.evaluate import heldout_case

    return [(f"heldout-s{seed}-{k}", functools.partial(heldout_case, k, seed))
            for k in range(n)]


def evaluate_retrieval(folder: Path, n: int = EVAL_CASES, seed: int = 1, *,
                       cache: Path | None = None, threads: int = 2,
                       progress: Callable[[str], None] | None = None) -> RetrievalReport:
    """Report<->image recall@1 among ``n`` held-out cases of set ``seed``, served path.

    Image embeddings from the package's vision ONNX (:func:`case_embedding`), reports (the true
    ones, :func:`report_text` of :func:`case_facts`) through the package's report encoder
    (:func:`inference.omnimri.language.align.report_embedder_for`); cosine similarity.
    ``cache``: a folder for the image embeddings (kept per :func:`package_fingerprint`).

    Raises:
        ValueError: The package has no ``embedding`` output or no report encoder
            (``extra.language.report_encoder``, written by ``train align-text``).
    """
    from inference.omnimri.evaluate import ServedModel
    from inference.omnimri.language.align import report_embedder_for
    from inference.package import ModelPackage

    pkg = ModelPackage.load(folder)
    if "embedding" not in [o.name for o in pkg.spec.outputs]:
        raise ValueError(f"{folder}: the vision model has no embedding output (export it again "
                         "with this code: 'omnimri-node train export')")
    embedder = report_embedder_for(pkg)
    if embedder is None:
        raise ValueError(f"{folder}: no report encoder (extra.language.report_encoder); run "
                         f"'omnimri-node train align-text --model {folder}' first")
    model = ServedModel.load(folder, threads=threads)
    try:
        sub = cache / package_fingerprint(folder) if cache is not None else None
        recs = case_records(model, heldout_cases(n, seed), sub, progress)
    finally:
        model.close()
    texts = [report_text(r.series_facts()) for r in recs]
    txt = embedder(texts)
    img = np.stack([r.embedding for r in recs])
    sim = txt @ img.T
    keys = [r.key for r in recs]
    kinds = [dict(k)["kind"] for k in keys]
    rep = RetrievalReport(metrics=recall_at_1(sim, keys, kinds), seed=seed, cases=len(recs),
                          distinct_reports=len(set(texts)))
    r2i = sim.argmax(1)
    misses = [k for k in range(len(recs)) if keys[r2i[k]] != keys[k]]
    for k in misses[:3]:
        rep.examples.append(f"report of {recs[k].name} ({dict(keys[k])['kind']}) retrieved "
                            f"{recs[r2i[k]].name} ({dict(keys[r2i[k]])['kind']}): "
                            f"{texts[k][:90]}...")
    return rep
