"""Held-out evaluation of an OmniMRI package through the code a node job runs.

Every held-out case (:func:`inference.omnimri.synthetic.make_case`, a seed range never used in
training and the held-out lesion layout) becomes a :class:`inference.volume.Volume` - its image
as a 12-bit scanner stores it, with the case's LPS affine - and then runs exactly what a job
runs: :func:`inference.runner.run_model` (``preprocess.prepare``, sliding windows, the engine,
Gaussian tile weights, probabilities back onto the source grid) and
:func:`inference.omnimri.tasks.results_from_raw` (brain mask, tissue segments, lesion masks and
detections, diagnosis, report) -> :class:`inference.results.Results`. Scoring reads only the
``Results`` against the case's ground truth on the case grid. A node job on the same case as a
DICOM series gives the same results (``tests/test_omnimri_eval_served.py``).

Metrics (each printed with its target from issue #11 and PASS/MISS), over all cases and per
contrast (:data:`inference.omnimri.synthetic.CONTRASTS`; cases cycle diagnoses and contrasts):

* tissue Dice (brain, CSF, GM, WM), mean over cases, target >= 0.92 each;
* lesion Dice (WMH + mass core), mean over cases with lesions, target >= 0.75;
* detection sensitivity for lesions >= 3 mm (any overlap), target >= 0.90, at <= 0.5 false
  positive components per volume;
* diagnosis AUC (macro one-vs-rest over normal / small vessel / mass), target >= 0.95, and
  normal cases called normal, target >= 90 % in every contrast;
* report fact agreement with the ground truth (presence, count bucket, side, lobe, largest size
  within 5 mm), target >= 95 %, and reports contradicting the model's own structured outputs,
  target 0;
* reconstruction PSNR gain over zero-filled at 4x (served ``reconstruct`` on the zero-filled
  volume; PSNR on the fully sampled image's percentile scale), target >= 5 dB;
* with ``baselines``: the conventional methods of :mod:`.baselines` on the same cases and the
  same scoring, and the targets relative to them (tissue Dice >= 20 % above the Gaussian
  mixture on every contrast; FLAIR lesions ahead of the robust z-threshold).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from inference import results as R
from inference.omnimri import report_text as rt
from inference.omnimri import synthetic as syn
from inference.omnimri.tasks import (
    DIAGNOSIS_CODES,
    ReportWriter,
    TaskSettings,
    report_facts,
    results_from_raw,
)
from inference.volume import SliceRef, Volume

HELDOUT_SEED_BASE = 900_000_000
"""Held-out case seeds start here (training seeds are ``(seed + 1) * 1e6 + ...``)."""

ALL_INSTRUCTIONS = ["segment brain tissues", "detect abnormalities", "suggest a diagnosis",
                    "write the report"]
RECON_INSTRUCTIONS = ["reconstruct"]
SCANNER_MAX = 4095.0
"""Largest stored value of a case image (12-bit, as a scanner writes MR pixel data)."""


@dataclass(frozen=True)
class Target:
    """One quality target."""

    name: str
    threshold: float
    higher_is_better: bool = True

    def passes(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        return value >= self.threshold if self.higher_is_better else value <= self.threshold


TARGETS = (
    Target("dice_brain", 0.92), Target("dice_csf", 0.92), Target("dice_grey_matter", 0.92),
    Target("dice_white_matter", 0.92), Target("dice_lesion", 0.75),
    Target("detection_sensitivity_3mm", 0.90), Target("false_positives_per_volume", 0.5, False),
    Target("diagnosis_auc", 0.95), Target("normal_called_normal_worst_contrast", 0.90),
    Target("report_fact_agreement", 0.95), Target("report_contradictions", 0.0, False),
    Target("recon_psnr_gain_db", 5.0),
    Target("tissue_gain_over_gmm_worst", 0.20),
    Target("flair_lesion_dice_minus_z", 0.0), Target("flair_detection_csi_minus_z", 0.0),
)
"""Issue #11's targets; the last three need ``baselines`` (relative gains, worst contrast and
class; FLAIR lesion Dice and detection CSI differences, > 0 = the model is ahead)."""

CONTRAST_COLUMNS = (
    ("cases", "cases", "{:5.0f}"), ("dice_brain", "brain", "{:6.3f}"),
    ("dice_csf", "CSF", "{:6.3f}"), ("dice_grey_matter", "GM", "{:6.3f}"),
    ("dice_white_matter", "WM", "{:6.3f}"), ("dice_lesion", "lesion", "{:6.3f}"),
    ("detection_sensitivity_3mm", "sens", "{:5.2f}"),
    ("false_positives_per_volume", "FP/vol", "{:6.2f}"),
    ("normal_called_normal", "normal", "{:6.2f}"),
)
"""Per-contrast table: metric key, header, format (``normal``: normal cases called normal)."""


@dataclass
class EvalReport:
    """Metric values, per-contrast metrics and per-case details."""

    metrics: dict[str, float] = field(default_factory=dict)
    by_contrast: dict[str, dict[str, float]] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    """Contrast (and ``all``) -> baseline metrics (``gmm_*``, ``z_*``), with ``baselines``."""
    cases: list[dict[str, object]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    layout: str = "heldout"
    """Lesion layout of the cases (:data:`LAYOUTS`); only ``heldout`` is a held-out metric."""
    scores: list[CaseScore] = field(default_factory=list, repr=False)
    baseline_scores: list[CaseScore] = field(default_factory=list, repr=False)
    recon: list[tuple[float, float]] = field(default_factory=list, repr=False)
    """Per reconstructed case: (model PSNR, zero-filled PSNR), dB."""

    def lines(self) -> list[str]:
        """Per-contrast tables, then ``metric value target PASS/MISS`` lines, then the rest."""
        out = [f"held-out seeds {self.seeds}: {int(self.metrics.get('cases', 0))} cases, "
               "served path (Volume -> prepare -> engine -> post-processing -> Results)"]
        if self.layout != "heldout":
            out.append(f"lesions in the {self.layout} layout: a diagnostic, not a held-out "
                       "metric")
        out.append("contrast " + " ".join(f"{h:>6s}" for _, h, _ in CONTRAST_COLUMNS))
        for c, m in self.by_contrast.items():
            cells = [(f.format(m[k]) if k in m else "     -").rjust(6)
                     for k, _, f in CONTRAST_COLUMNS]
            out.append(f"{c:8s} " + " ".join(cells))
        if self.baselines:
            out.extend(self.baseline_lines())
        out.append("targets (issue #11):")
        for t in TARGETS:
            if t.name not in self.metrics:
                continue
            v = self.metrics[t.name]
            op = ">=" if t.higher_is_better else "<="
            out.append(f"{t.name:36s} {v:8.4f}   target {op} {t.threshold:<6g} "
                       f"{'PASS' if t.passes(v) else 'MISS'}")
        names = {t.name for t in TARGETS}
        for k, v in self.metrics.items():
            if k not in names:
                out.append(f"{k:36s} {v:8.4f}   (info)")
        return out

    def baseline_lines(self) -> list[str]:
        """Model vs conventional baselines, per contrast (``model/baseline``)."""
        out = ["model vs baselines (Gaussian mixture in the ground-truth brain mask, robust "
               "z > 3; same cases, same scoring):",
               "contrast  CSF m/gmm    GM m/gmm    WM m/gmm   lesion m/z   sens m/z     "
               "FP/vol m/z"]
        for c, b in self.baselines.items():
            m = self.metrics if c == "all" else self.by_contrast.get(c, {})

            def pair(mk: str, bk: str, fmt: str = "{:.3f}",
                     m: dict[str, float] = m, b: dict[str, float] = b) -> str:
                a = fmt.format(m[mk]) if mk in m else "-"
                z = fmt.format(b[bk]) if bk in b else "-"
                return f"{a}/{z}".ljust(12)

            out.append(f"{c:9s} " + pair("dice_csf", "gmm_dice_csf")
                       + pair("dice_grey_matter", "gmm_dice_grey_matter")
                       + pair("dice_white_matter", "gmm_dice_white_matter")
                       + pair("dice_lesion", "z_dice_lesion")
                       + pair("detection_sensitivity_3mm", "z_detection_sensitivity_3mm", "{:.2f}")
                       + pair("false_positives_per_volume", "z_false_positives_per_volume",
                              "{:.2f}"))
        return out

    def passed(self) -> dict[str, bool]:
        """Target name -> met."""
        return {t.name: t.passes(self.metrics[t.name]) for t in TARGETS if t.name in self.metrics}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content (metrics, per contrast, baselines, cases)."""
        return {"seeds": self.seeds, "layout": self.layout, "metrics": self.metrics,
                "by_contrast": self.by_contrast, "baselines": self.baselines,
                "cases": self.cases}


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient (1.0 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def auc_macro(y: npt.NDArray[np.int_], p: npt.NDArray[np.float64]) -> float:
    """Macro one-vs-rest ROC AUC (classes absent from ``y`` are skipped)."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for c in range(p.shape[1]):
        yc = (y == c).astype(int)
        if 0 < yc.sum() < len(yc):
            aucs.append(float(roc_auc_score(yc, p[:, c])))
    return float(np.mean(aucs)) if aucs else float("nan")


def psnr(x: npt.NDArray[np.floating], ref: npt.NDArray[np.floating], data_range: float = 1.0
         ) -> float:
    """Peak signal-to-noise ratio in dB."""
    mse = float(np.mean((x.astype(np.float64) - ref) ** 2))
    return 99.0 if mse <= 0 else 10.0 * float(np.log10(data_range**2 / mse))


def _fact_agreement(stated: dict[str, str], truth: dict[str, str]) -> tuple[int, int]:
    """(agreeing, stated) facts of one report against the ground truth."""
    ok = n = 0
    n += 1  # presence
    ok += int((stated.get("kind") == "normal") == (truth["kind"] == "normal"))
    if stated.get("kind") not in ("normal", "unknown") and truth["kind"] != "normal":
        for key in ("count", "side", "lobe"):
            if key in stated:
                n += 1
                ok += int(stated[key] == truth[key])
        if "size" in stated:
            n += 1
            ok += int(abs(int(stated["size"]) - int(truth["size"])) <= 5)
    elif stated.get("kind") not in ("normal", "unknown"):
        n += sum(k in stated for k in ("count", "side", "lobe", "size"))  # all wrong
    return ok, n


# --------------------------------------------------------------------------- cases as volumes


def case_volume(case: syn.Case, image: npt.NDArray[np.floating] | None = None) -> Volume:
    """A synthetic case (or another image on its grid) as the node would build it from DICOM.

    The image is scaled to 0-:data:`SCANNER_MAX` and rounded (a 12-bit MR series; the model's
    percentile normalisation does not see the scale), so :func:`inference.volume.build_volume`
    on the series :func:`omnimri_samples.make_mr_series` writes from it gives this array
    exactly. The affine is the case's ``(k, j, i, 1)`` -> LPS mm.
    """
    img = np.asarray(case.image if image is None else image, dtype=np.float64)
    top = float(img.max()) if img.size else 0.0
    arr = np.round(np.clip(img, 0, None) * (SCANNER_MAX / top if top > 0 else 1.0))
    slices = [SliceRef(f"2.25.{n + 1}", "1.2.840.10008.5.1.4.1.1.4") for n in range(arr.shape[0])]
    return Volume(array=arr.astype(np.float32), affine=np.asarray(case.affine, np.float64),
                  slices=slices, metadata={"contrast": case.contrast})


LAYOUTS = ("heldout", "training")
"""Lesion layouts of the evaluation cases: ``heldout`` (the metric), ``training`` (a diagnostic:
the same held-out seeds with lesions in the training layout's cells, so the difference shows how
much the model learned *where* lesions may be)."""


def heldout_case(n: int, seed: int = 0, layout: str = "heldout") -> syn.Case:
    """Held-out case ``n`` of set ``seed`` (held-out seeds and, by default, lesion layout).

    Diagnoses cycle, then contrasts (:data:`inference.omnimri.synthetic.CONTRASTS`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    contrast = syn.CONTRASTS[(n // 3) % len(syn.CONTRASTS)]
    return syn.make_case(HELDOUT_SEED_BASE + seed * 10_000 + n,
                         layout="heldout" if layout == "heldout" else "training",
                         diagnosis=n % 3, contrast=contrast)


# --------------------------------------------------------------------------- the served model


@dataclass
class ServedModel:
    """A package and its engine, run the way a node job runs them.

    ``writer`` replaces the package's report decoder (a training checkpoint's); ``settings``
    replaces its post-processing settings (``model.yaml`` ``extra.tasks``).
    """

    package: Any
    """The :class:`inference.package.ModelPackage`."""
    engine: Any
    """An :class:`inference.engines.Engine` loaded with its graph."""
    writer: ReportWriter | None = None
    settings: TaskSettings | None = None

    @classmethod
    def load(cls, folder: Path, threads: int = 2) -> ServedModel:
        """The package in ``folder`` on ONNX Runtime (CPU) with ``threads`` threads."""
        from inference.engines import create_engine
        from inference.package import ModelPackage

        package = ModelPackage.load(folder)
        return cls(package, create_engine("onnxruntime", package, intra_op_threads=threads))

    def raw(self, volume: Volume, instructions: list[str]) -> Any:
        """:func:`inference.runner.run_model` on ``volume`` (the network's part of a job)."""
        from inference.runner import run_model

        return run_model(self.package, volume, self.engine, instructions)

    def results(self, raw: Any, volume: Volume, instructions: list[str],
                settings: TaskSettings | None = None) -> R.Results:
        """:func:`inference.omnimri.tasks.results_from_raw` (the post-processing of a job)."""
        return results_from_raw(self.package, raw, volume, instructions,
                                settings=settings or self.settings, writer=self.writer)

    def run(self, volume: Volume, instructions: list[str],
            settings: TaskSettings | None = None) -> R.Results:
        """Engine run + post-processing: the ``Results`` a job on ``volume`` would export."""
        return self.results(self.raw(volume, instructions), volume, instructions, settings)

    def close(self) -> None:
        """Release the engine."""
        self.engine.close()


def package_task_settings(folder: Path) -> TaskSettings:
    """The post-processing settings a package declares (``model.yaml`` ``extra.tasks``)."""
    from inference.package import ModelPackage

    return TaskSettings.from_dict(ModelPackage.load(folder).spec.extra.get("tasks"))


# --------------------------------------------------------------------------- scoring


def _class_index(names: Sequence[str], name: str, default: int) -> int:
    return names.index(name) if name in names else default


def truth_masks(case: syn.Case) -> dict[str, npt.NDArray[np.bool_]]:
    """Ground-truth masks on the case grid.

    ``brain`` (CSF + GM + WM), ``csf``, ``gm``, ``wm``, ``lesion`` (WMH + mass core).
    """
    tc = list(syn.TISSUE_CLASSES)
    lc = list(syn.LESION_CLASSES)
    csf = case.tissue == _class_index(tc, "csf", 1)
    gm = case.tissue == _class_index(tc, "grey_matter", 2)
    wm = case.tissue == _class_index(tc, "white_matter", 3)
    les = np.isin(case.lesion, [_class_index(lc, "wm_hyperintensity", 1),
                                _class_index(lc, "mass", 2)])
    return {"brain": csf | gm | wm, "csf": csf, "gm": gm, "wm": wm, "lesion": les}


@dataclass
class CaseScore:
    """Everything one case contributes to the metrics."""

    dice: dict[str, float]
    """``brain``, ``csf``, ``gm``, ``wm`` and (cases with lesions) ``lesion``."""
    hits: int
    """Ground-truth lesions >= 3 mm touched by a detection."""
    lesions: int
    """Ground-truth lesions >= 3 mm."""
    false_positives: int
    """Detections touching no ground-truth lesion."""
    probabilities: list[float] | None
    """Case-level diagnosis probabilities (normal, small vessel, mass); ``None`` without."""
    truth: int = 0
    """Ground-truth diagnosis (index into :data:`inference.omnimri.synthetic.DIAGNOSES`)."""
    contrast: str = ""
    detections: int = 0
    predicted: str = ""
    report: str = ""
    facts_ok: int = 0
    facts_stated: int = 0
    contradicts: bool = False
    kind_differs: bool = False
    has_report: bool = False


def score_case(case: syn.Case, res: R.Results) -> CaseScore:
    """Score the ``Results`` of one case against its ground truth (on the case grid).

    Segments are found by label (Brain, CSF, Grey matter, White matter, WM hyperintensity,
    Mass); a detection counts as a false positive when its component touches no ground-truth
    lesion; the report (if any) is parsed back into facts.
    """
    gt = truth_masks(case)
    seg = {s.label.label: s.mask for s in res.segments}
    none = np.zeros(case.lesion.shape, bool)
    d = {"brain": dice(seg["Brain"], gt["brain"]), "csf": dice(seg["CSF"], gt["csf"]),
         "gm": dice(seg["Grey matter"], gt["gm"]), "wm": dice(seg["White matter"], gt["wm"])}
    gt_les = gt["lesion"]
    pred_les = seg.get("WM hyperintensity", none) | seg.get("Mass", none)
    if gt_les.any():
        d["lesion"] = dice(pred_les, gt_les)
    # Detection: predicted components (after the size filter) vs GT instances.
    det_mask = np.zeros(case.lesion.shape, bool)
    fp = 0
    for det in res.detections:
        k0, j0, i0, k1, j1, i1 = det.bbox_index
        box = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
        det_mask[box] |= pred_les[box]
        comp_labels, _ = ndimage.label(pred_les[box])
        fp += int(not (gt_les[box] & (comp_labels > 0)).any())
    hits = total = 0
    for les in case.lesions:
        if les.diameter_mm >= 3.0:
            total += 1
            hits += int((det_mask & (case.instances == les.instance)).any())
    probs = None
    predicted = ""
    if res.diagnosis is not None:
        probs = [res.diagnosis.probabilities[k] for k in ("normal", "small_vessel", "mass")]
        predicted = res.diagnosis.code.meaning
    sc = CaseScore(dice=d, hits=hits, lesions=total, false_positives=fp, probabilities=probs,
                   truth=case.diagnosis, contrast=case.contrast,
                   detections=len(res.detections), predicted=predicted)
    if res.report is None or res.diagnosis is None:
        return sc
    # Report: facts vs ground truth, and vs the structured outputs.
    text = f"findings : {res.report.findings} impression : {res.report.impression}"
    stated = rt.parse_facts(text)
    truth = syn.facts_from_lesions(syn.DIAGNOSES[case.diagnosis], case.lesions)
    sc.has_report = True
    sc.report = text
    sc.facts_ok, sc.facts_stated = _fact_agreement(stated, truth)
    own = report_facts(res.diagnosis, res.detections)
    own_stated = {k: v for k, v in own.items() if k in stated}
    if own["kind"] == "normal":
        own_stated = {"kind": "normal"}
    sc.contradicts = stated != own_stated
    sc.kind_differs = own["kind"] != next(k for k, c in DIAGNOSIS_CODES.items()
                                          if c == res.diagnosis.code)
    return sc


def summarise(scores: list[CaseScore]) -> dict[str, float]:
    """Dice, detection, diagnosis and report metrics over ``scores``."""
    m: dict[str, float] = {}
    for key, name in (("brain", "dice_brain"), ("csf", "dice_csf"), ("gm", "dice_grey_matter"),
                      ("wm", "dice_white_matter"), ("lesion", "dice_lesion")):
        vals = [s.dice[key] for s in scores if key in s.dice]
        if vals:
            m[name] = float(np.mean(vals))
    lesions = sum(s.lesions for s in scores)
    fps = sum(s.false_positives for s in scores)
    if lesions:
        m["detection_sensitivity_3mm"] = sum(s.hits for s in scores) / lesions
        m["detection_csi"] = sum(s.hits for s in scores) / (lesions + fps)
    m["false_positives_per_volume"] = fps / max(len(scores), 1)
    with_p = [s for s in scores if s.probabilities is not None]
    if with_p:
        y = np.array([s.truth for s in with_p])
        p = np.array([s.probabilities for s in with_p])
        if len(set(y.tolist())) > 1:
            m["diagnosis_auc"] = auc_macro(y, p)
        m["diagnosis_accuracy"] = float((p.argmax(1) == y).mean())
        normals = [s for s in with_p if s.truth == 0]
        if normals:
            m["normal_called_normal"] = float(np.mean(
                [s.predicted == DIAGNOSIS_CODES["normal"].meaning for s in normals]))
    reports = [s for s in scores if s.has_report]
    if reports:
        m["report_fact_agreement"] = sum(s.facts_ok for s in reports) / max(
            sum(s.facts_stated for s in reports), 1)
        m["report_contradictions"] = float(sum(s.contradicts for s in reports))
        m["report_kind_differs_from_diagnosis_head"] = float(sum(s.kind_differs
                                                                 for s in reports))
    m["lesions_evaluated"] = float(lesions)
    m["cases"] = float(len(scores))
    return m


def _by_contrast(scores: list[CaseScore]) -> dict[str, list[CaseScore]]:
    order = [c for c in syn.CONTRASTS if any(s.contrast == c for s in scores)]
    order += sorted({s.contrast for s in scores} - set(order))
    return {c: [s for s in scores if s.contrast == c] for c in order}


def build_report(scores: list[CaseScore], recon: list[tuple[float, float]],
                 baseline_scores: list[CaseScore] | None = None,
                 cases: list[dict[str, object]] | None = None,
                 seeds: list[int] | None = None) -> EvalReport:
    """Metrics over all cases and per contrast (and against the baselines, if scored)."""
    rep = EvalReport(cases=list(cases or []), seeds=list(seeds or []), scores=list(scores),
                     baseline_scores=list(baseline_scores or []), recon=list(recon))
    m = rep.metrics
    m.update(summarise(scores))
    groups = _by_contrast(scores)
    rep.by_contrast = {c: summarise(g) for c, g in groups.items()}
    worst = [v["normal_called_normal"] for v in rep.by_contrast.values()
             if "normal_called_normal" in v]
    if worst:
        m["normal_called_normal_worst_contrast"] = float(min(worst))
    if recon:
        m["recon_psnr_gain_db"] = float(np.mean([a - b for a, b in recon]))
        m["recon_psnr_db"] = float(np.mean([a for a, _ in recon]))
        m["zero_filled_psnr_db"] = float(np.mean([b for _, b in recon]))
    if baseline_scores:
        bgroups = _by_contrast(baseline_scores)
        for c, g in [("all", baseline_scores), *bgroups.items()]:
            b = summarise(g)
            rep.baselines[c] = {
                **{f"gmm_{k}": b[k] for k in ("dice_csf", "dice_grey_matter",
                                              "dice_white_matter") if k in b},
                **{f"z_{k}": b[k] for k in ("dice_lesion", "detection_sensitivity_3mm",
                                            "false_positives_per_volume", "detection_csi")
                   if k in b},
            }
        gains = []
        for c, b in rep.baselines.items():
            if c == "all":
                continue
            mc = rep.by_contrast.get(c, {})
            for k in ("dice_csf", "dice_grey_matter", "dice_white_matter"):
                if k in mc and b.get(f"gmm_{k}", 0) > 0:
                    gains.append(mc[k] / b[f"gmm_{k}"] - 1.0)
        if gains:
            m["tissue_gain_over_gmm_worst"] = float(min(gains))
        fl, bf = rep.by_contrast.get("FLAIR", {}), rep.baselines.get("FLAIR", {})
        if "dice_lesion" in fl and "z_dice_lesion" in bf:
            m["flair_lesion_dice_minus_z"] = fl["dice_lesion"] - bf["z_dice_lesion"]
        if "detection_csi" in fl and "z_detection_csi" in bf:
            m["flair_detection_csi_minus_z"] = fl["detection_csi"] - bf["z_detection_csi"]
    return rep


def merge_reports(reports: list[EvalReport]) -> EvalReport:
    """One report over the cases of several (e.g. several held-out seeds)."""
    layouts = {r.layout for r in reports}
    if len(layouts) > 1:
        raise ValueError(f"reports of different lesion layouts: {sorted(layouts)}")
    rep = build_report([s for r in reports for s in r.scores],
                       [x for r in reports for x in r.recon],
                       [s for r in reports for s in r.baseline_scores],
                       [c for r in reports for c in r.cases],
                       [s for r in reports for s in r.seeds])
    rep.layout = layouts.pop() if layouts else "heldout"
    return rep


# --------------------------------------------------------------------------- reconstruction


def recon_psnr(model: ServedModel, case: syn.Case, volume: Volume, seed: int = 0
               ) -> tuple[float, float]:
    """(model, zero-filled) PSNR in dB of the served ``reconstruct`` at 4x.

    The volume is undersampled (:func:`inference.omnimri.synthetic.zero_filled`, along the
    row axis of each slice), the zero-filled volume runs through the served path, and both it
    and the reconstruction (source units) are compared with the fully sampled image on its
    percentile scale (0.5-99.5 % -> 0-1, clipped).
    """
    ref = volume.array
    zf = syn.zero_filled(ref, 4, seed=seed)
    zvol = replace(volume, array=zf.astype(np.float32))
    res = model.run(zvol, RECON_INSTRUCTIONS)
    assert res.reconstruction is not None
    lo, hi = (float(v) for v in np.percentile(ref, [0.5, 99.5]))
    scale = max(hi - lo, 1e-6)

    def unit(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        return np.clip((np.asarray(x, np.float64) - lo) / scale, 0.0, 1.0)

    r = unit(ref)
    return psnr(unit(res.reconstruction), r), psnr(unit(zf), r)


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model: ServedModel, n_cases: int = 30, *, seed: int = 0, recon_cases: int | None = None,
    baselines: bool = False, progress: Callable[[str], None] | None = None,
    layout: str = "heldout",
) -> EvalReport:
    """Evaluate a served model on ``n_cases`` held-out cases of set ``seed``.

    Cases cycle the three diagnoses, then the contrasts; deformation and lesions are random.
    ``recon_cases``: how many (the first) also measure reconstruction (all if ``None``).
    ``baselines``: also score the conventional methods of :mod:`.baselines` on the same cases.
    """
    from inference.omnimri import baselines as B

    settings = model.settings or TaskSettings.from_dict(model.package.spec.extra.get("tasks"))
    scores: list[CaseScore] = []
    bscores: list[CaseScore] = []
    recon: list[tuple[float, float]] = []
    cases: list[dict[str, object]] = []
    recon_cases = n_cases if recon_cases is None else recon_cases
    for n in range(n_cases):
        t0 = time.monotonic()
        case = heldout_case(n, seed, layout)
        vol = case_volume(case)
        res = model.run(vol, ALL_INSTRUCTIONS)
        sc = score_case(case, res)
        scores.append(sc)
        if baselines:
            bscores.append(score_case(case, B.baseline_results(case, vol, settings)))
        if n < recon_cases:
            recon.append(recon_psnr(model, case, vol, seed=n))
        cases.append({
            "seed": seed, "case": n, "diagnosis": syn.DIAGNOSES[case.diagnosis],
            "contrast": case.contrast, "predicted": sc.predicted, "report": sc.report,
            "truth": syn.facts_from_lesions(syn.DIAGNOSES[case.diagnosis], case.lesions),
            "lesions": len(case.lesions), "detections": sc.detections,
            "hits": sc.hits, "false_positives": sc.false_positives,
            "dice": {k: round(v, 4) for k, v in sc.dice.items()},
            "seconds": round(time.monotonic() - t0, 1),
        })
        if progress:
            progress(f"case {n + 1}/{n_cases}: {cases[-1]}")
    rep = build_report(scores, recon, bscores, cases, [seed])
    rep.layout = layout
    return rep


def evaluate_package(folder: Path, n_cases: int = 30, *, seed: int = 0, threads: int = 2,
                     recon_cases: int | None = None, baselines: bool = False,
                     progress: Callable[[str], None] | None = None,
                     layout: str = "heldout") -> EvalReport:
    """Evaluate a model package (ONNX Runtime, as the node runs it) on held-out cases."""
    model = ServedModel.load(folder, threads)
    try:
        return evaluate(model, n_cases, seed=seed, recon_cases=recon_cases, baselines=baselines,
                        progress=progress, layout=layout)
    finally:
        model.close()


def checkpoint_model(checkpoint: Path, settings: TaskSettings | None = None) -> ServedModel:
    """A training checkpoint served like a package.

    The spec is the ``model.yaml`` export would write, the engine the PyTorch modules behind
    :class:`inference.engines.torch.TorchEngine`, the report writer its own decoder.
    """
    import torch

    from inference.engines.torch import TorchEngine
    from inference.omnimri import report_text as rtx
    from inference.omnimri.export import VISION_OUTPUTS, _Vision, model_spec
    from inference.omnimri.train import load_stage
    from inference.package import ModelPackage, ModelSpec

    mods, _ = load_stage(checkpoint.parent, checkpoint.stem)
    vision = mods.vision
    spec = ModelSpec.model_validate(model_spec(vision, f"checkpoint-{checkpoint.stem}", "0.0.0"))
    package = ModelPackage(folder=checkpoint.parent, spec=spec)
    engine = TorchEngine(_Vision(vision), [spec.input.name], list(VISION_OUTPUTS), device="cpu")
    dec = mods.decoder
    dec.eval()

    def writer(facts: dict[str, str]) -> str:
        mem = torch.from_numpy(rtx.facts_memory(facts)[None])
        with torch.no_grad():
            ids = dec.generate(mem, rtx.WORD_ID[rtx.BOS], rtx.WORD_ID[rtx.EOS],
                               dec.pos.shape[1])[0]
        return rtx.decode(ids)

    return ServedModel(package, engine, writer=writer, settings=settings)


def evaluate_checkpoint(checkpoint: Path, n_cases: int = 30, *, seed: int = 0,
                        recon_cases: int | None = None, baselines: bool = False,
                        settings: TaskSettings | None = None,
                        progress: Callable[[str], None] | None = None,
                        layout: str = "heldout") -> EvalReport:
    """Evaluate a PyTorch training checkpoint through the same served path (torch engine)."""
    model = checkpoint_model(checkpoint, settings)
    try:
        return evaluate(model, n_cases, seed=seed, recon_cases=recon_cases, baselines=baselines,
                        progress=progress, layout=layout)
    finally:
        model.close()
