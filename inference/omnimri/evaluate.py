"""Held-out evaluation of an OmniMRI model against the quality targets.

Held-out cases come from :func:`inference.omnimri.synthetic.make_case` with a seed range never
used in training and the held-out lesion layout (lesion centres in the other half of the 16 mm
cells). Metrics (each printed with its target and PASS/MISS):

* tissue Dice (brain, CSF, GM, WM), mean over cases, target >= 0.92 each;
* lesion Dice (WMH + mass core), mean over cases with lesions, target >= 0.75;
* detection sensitivity for lesions >= 3 mm (any overlap), target >= 0.90, at <= 0.5 false
  positive components per volume;
* diagnosis AUC (macro one-vs-rest over normal / small vessel / mass), target >= 0.95;
* report fact agreement with the ground truth (presence, count bucket, side, lobe, largest size
  within 5 mm), target >= 95 %, and reports contradicting the model's own structured outputs,
  target 0;
* reconstruction PSNR gain over zero-filled at 4x, target >= 5 dB.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from inference import results as R
from inference.omnimri import report_text as rt
from inference.omnimri import synthetic as syn
from inference.omnimri.predict import GridOutputs, RunFn, onnx_runner, predict_grid, torch_runner
from inference.omnimri.tasks import (
    DIAGNOSIS_CODES,
    HeadOutputs,
    ReportWriter,
    TaskSettings,
    build_results,
    report_facts,
)

HELDOUT_SEED_BASE = 900_000_000
"""Held-out case seeds start here (training seeds are ``(seed + 1) * 1e6 + ...``)."""

ALL_INSTRUCTIONS = ["segment brain tissues", "detect abnormalities", "suggest a diagnosis",
                    "write the report"]


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
    Target("diagnosis_auc", 0.95), Target("report_fact_agreement", 0.95),
    Target("report_contradictions", 0.0, False), Target("recon_psnr_gain_db", 5.0),
)


@dataclass
class EvalReport:
    """Metric values and per-case details."""

    metrics: dict[str, float] = field(default_factory=dict)
    cases: list[dict[str, object]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """``metric value target PASS/MISS`` lines, then the informational metrics."""
        out = []
        for t in TARGETS:
            if t.name not in self.metrics:
                continue
            v = self.metrics[t.name]
            op = ">=" if t.higher_is_better else "<="
            out.append(f"{t.name:30s} {v:8.4f}   target {op} {t.threshold:<6g} "
                       f"{'PASS' if t.passes(v) else 'MISS'}")
        names = {t.name for t in TARGETS}
        for k, v in self.metrics.items():
            if k not in names:
                out.append(f"{k:30s} {v:8.4f}   (info)")
        return out

    def passed(self) -> dict[str, bool]:
        """Target name -> met."""
        return {t.name: t.passes(self.metrics[t.name]) for t in TARGETS if t.name in self.metrics}


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


def psnr(x: npt.NDArray[np.float32], ref: npt.NDArray[np.float32], data_range: float = 1.0
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
    probabilities: list[float]
    """Case-level diagnosis probabilities (normal, small vessel, mass)."""
    detections: int = 0
    predicted: str = ""
    report: str = ""
    facts_ok: int = 0
    facts_stated: int = 0
    contradicts: bool = False
    kind_differs: bool = False


def score_case(case: syn.Case, g: GridOutputs, settings: TaskSettings,
               writer: ReportWriter | None = None) -> CaseScore:
    """Score one case's grid outputs under post-processing ``settings``.

    Without a ``writer`` the report is not written (calibration scores only the rest).
    """
    heads = HeadOutputs(affine=case.affine, tissue=g.tissue, lesion=g.lesion,
                        slice_diagnosis=g.slice_diagnosis)
    instructions = ALL_INSTRUCTIONS if writer else ALL_INSTRUCTIONS[:3]
    res = build_results(heads, instructions, R.ModelInfo("omnimri-eval", "0"), settings,
                        report_writer=writer)
    seg = {s.label.label: s.mask for s in res.segments}
    d = {"brain": dice(seg["Brain"], case.tissue > 0), "csf": dice(seg["CSF"], case.tissue == 1),
         "gm": dice(seg["Grey matter"], case.tissue == 2),
         "wm": dice(seg["White matter"], case.tissue == 3)}
    gt_les = (case.lesion == 1) | (case.lesion == 2)
    pred_les = seg["WM hyperintensity"] | seg["Mass"]
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
    assert res.diagnosis is not None
    sc = CaseScore(dice=d, hits=hits, lesions=total, false_positives=fp,
                   probabilities=[res.diagnosis.probabilities[k]
                                  for k in ("normal", "small_vessel", "mass")],
                   detections=len(res.detections), predicted=res.diagnosis.code.meaning)
    if writer is None:
        return sc
    # Report: facts vs ground truth, and vs the structured outputs.
    assert res.report is not None
    text = f"findings : {res.report.findings} impression : {res.report.impression}"
    stated = rt.parse_facts(text)
    truth = syn.facts_from_lesions(syn.DIAGNOSES[case.diagnosis], case.lesions)
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


def heldout_case(n: int, seed: int = 0) -> syn.Case:
    """Held-out case ``n`` of set ``seed`` (held-out seeds and lesion layout, cycling classes)."""
    return syn.make_case(HELDOUT_SEED_BASE + seed * 10_000 + n, heldout=True, diagnosis=n % 3)


def evaluate(
    run: RunFn, writer: ReportWriter, n_cases: int = 30, *, seed: int = 0,
    recon_cases: int | None = None, progress: Callable[[str], None] | None = None,
    settings: TaskSettings | None = None, grid: GridSpec | None = None,
) -> EvalReport:
    """Evaluate a model (``run`` on the model grid) on ``n_cases`` held-out cases.

    Cases cycle the three diagnoses; contrast, deformation and lesions are random.
    ``settings`` are the package's post-processing settings (defaults if ``None``), ``grid``
    its patch size and context (the shipped ``tiny`` geometry if ``None``).
    """
    grid = grid or GridSpec()
    settings = settings or TaskSettings()
    rep = EvalReport()
    scores: list[CaseScore] = []
    truth: list[int] = []
    gains, psnr_model, psnr_zf = [], [], []
    recon_cases = n_cases if recon_cases is None else recon_cases
    for n in range(n_cases):
        t0 = time.monotonic()
        case = heldout_case(n, seed)
        img = syn.normalise(case.image)
        zf = syn.zero_filled(img, 4, seed=n) if n < recon_cases else None
        g = predict_grid(run, img, recon_input=zf, patch=grid.patch, context=grid.context)
        sc = score_case(case, g, settings, writer)
        scores.append(sc)
        truth.append(case.diagnosis)
        if zf is not None and g.recon is not None:
            pm, pz = psnr(np.clip(g.recon, 0, 1), img), psnr(zf, img)
            psnr_model.append(pm)
            psnr_zf.append(pz)
            gains.append(pm - pz)
        rep.cases.append({
            "case": n, "diagnosis": syn.DIAGNOSES[case.diagnosis], "contrast": case.contrast,
            "predicted": sc.predicted, "report": sc.report,
            "truth": syn.facts_from_lesions(syn.DIAGNOSES[case.diagnosis], case.lesions),
            "lesions": len(case.lesions), "detections": sc.detections,
            "dice_lesion": sc.dice.get("lesion"),
            "dice": {k: round(v, 4) for k, v in sc.dice.items()},
            "seconds": round(time.monotonic() - t0, 1),
        })
        if progress:
            progress(f"case {n + 1}/{n_cases}: {rep.cases[-1]}")
    rep.metrics.update(summarise(scores, truth))
    m = rep.metrics
    m["report_fact_agreement"] = sum(s.facts_ok for s in scores) / max(
        sum(s.facts_stated for s in scores), 1)
    m["report_contradictions"] = float(sum(s.contradicts for s in scores))
    m["report_kind_differs_from_diagnosis_head"] = float(sum(s.kind_differs for s in scores))
    if gains:
        m["recon_psnr_gain_db"] = float(np.mean(gains))
        m["recon_psnr_db"] = float(np.mean(psnr_model))
        m["zero_filled_psnr_db"] = float(np.mean(psnr_zf))
    m["cases"] = float(n_cases)
    return rep


def summarise(scores: list[CaseScore], truth: list[int]) -> dict[str, float]:
    """Dice, detection and diagnosis metrics over cases (``truth``: diagnosis indices)."""
    m: dict[str, float] = {}
    for key, name in (("brain", "dice_brain"), ("csf", "dice_csf"), ("gm", "dice_grey_matter"),
                      ("wm", "dice_white_matter"), ("lesion", "dice_lesion")):
        vals = [s.dice[key] for s in scores if key in s.dice]
        if vals:
            m[name] = float(np.mean(vals))
    lesions = sum(s.lesions for s in scores)
    if lesions:
        m["detection_sensitivity_3mm"] = sum(s.hits for s in scores) / lesions
    m["false_positives_per_volume"] = sum(s.false_positives for s in scores) / max(len(scores), 1)
    y = np.array(truth)
    p = np.array([s.probabilities for s in scores])
    if len(set(truth)) > 1:
        m["diagnosis_auc"] = auc_macro(y, p)
    m["diagnosis_accuracy"] = float((p.argmax(1) == y).mean())
    m["lesions_evaluated"] = float(lesions)
    return m


def evaluate_package(folder: Path, n_cases: int = 30, *, seed: int = 0, threads: int = 2,
                     recon_cases: int | None = None,
                     progress: Callable[[str], None] | None = None) -> EvalReport:
    """Evaluate a model package's ``model.onnx`` + ``decoder.onnx`` on held-out cases."""
    from inference.omnimri.tasks import onnx_report_writer

    vf = folder / "1"
    return evaluate(onnx_runner(vf / "model.onnx", threads),
                    onnx_report_writer(str(vf / "decoder.onnx")), n_cases, seed=seed,
                    recon_cases=recon_cases, progress=progress,
                    settings=package_task_settings(folder), grid=GridSpec.of_package(folder))


@dataclass(frozen=True)
class GridSpec:
    """Where the model looks: square in-plane patch (pixels) and neighbour slices per side."""

    patch: int = 128
    context: int = 1

    @classmethod
    def of_package(cls, folder: Path) -> GridSpec:
        """From a package's ``model.yaml`` ``input`` section."""
        from inference.package import ModelPackage

        spec = ModelPackage.load(folder).spec.input
        return cls(int(spec.patch_size[0]), int(spec.context_slices))


def package_task_settings(folder: Path) -> TaskSettings:
    """The post-processing settings a package declares (``model.yaml`` ``extra.tasks``)."""
    from inference.package import ModelPackage

    return TaskSettings.from_dict(ModelPackage.load(folder).spec.extra.get("tasks"))


def evaluate_checkpoint(checkpoint: Path, n_cases: int = 30, *, seed: int = 0,
                        recon_cases: int | None = None,
                        progress: Callable[[str], None] | None = None) -> EvalReport:
    """Evaluate a PyTorch training checkpoint (same code path, torch instead of ONNX)."""
    import torch

    from inference.omnimri import report_text as rtx

    run, mods = torch_runner(checkpoint)
    dec = mods.decoder  # type: ignore[attr-defined]
    dec.eval()

    def writer(facts: dict[str, str]) -> str:
        mem = torch.from_numpy(rtx.facts_memory(facts)[None])
        ids = dec.generate(mem, rtx.WORD_ID[rtx.BOS], rtx.WORD_ID[rtx.EOS],
                           dec.pos.shape[1])[0]
        return rtx.decode(ids)

    return evaluate(run, writer, n_cases, seed=seed, recon_cases=recon_cases, progress=progress)
