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
from inference.omnimri.predict import RunFn, onnx_runner, predict_grid, torch_runner
from inference.omnimri.tasks import (
    DIAGNOSIS_CODES,
    HeadOutputs,
    ReportWriter,
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


def evaluate(
    run: RunFn, writer: ReportWriter, n_cases: int = 30, *, seed: int = 0,
    recon_cases: int | None = None, progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate a model (``run`` on the model grid) on ``n_cases`` held-out cases.

    Cases cycle the three diagnoses; contrast, deformation and lesions are random.
    """
    rep = EvalReport()
    per: dict[str, list[float]] = {k: [] for k in ("brain", "csf", "gm", "wm", "lesion")}
    det_hit = det_total = fp = 0
    ys, ps = [], []
    fact_ok = fact_n = contradictions = disagree = 0
    gains, psnr_model, psnr_zf = [], [], []
    recon_cases = n_cases if recon_cases is None else recon_cases
    model = R.ModelInfo("omnimri-eval", "0")
    for n in range(n_cases):
        t0 = time.monotonic()
        case = syn.make_case(HELDOUT_SEED_BASE + seed * 10_000 + n, heldout=True,
                             diagnosis=n % 3)
        img = syn.normalise(case.image)
        zf = syn.zero_filled(img, 4, seed=n) if n < recon_cases else None
        g = predict_grid(run, img, recon_input=zf)
        heads = HeadOutputs(affine=case.affine, tissue=g.tissue, lesion=g.lesion,
                            slice_diagnosis=g.slice_diagnosis)
        res = build_results(heads, ALL_INSTRUCTIONS, model, report_writer=writer)
        seg = {s.label.label: s.mask for s in res.segments}
        per["brain"].append(dice(seg["Brain"], case.tissue > 0))
        per["csf"].append(dice(seg["CSF"], case.tissue == 1))
        per["gm"].append(dice(seg["Grey matter"], case.tissue == 2))
        per["wm"].append(dice(seg["White matter"], case.tissue == 3))
        gt_les = (case.lesion == 1) | (case.lesion == 2)
        pred_les = seg["WM hyperintensity"] | seg["Mass"]
        if gt_les.any():
            per["lesion"].append(dice(pred_les, gt_les))
        # Detection: predicted components (after the size filter) vs GT instances.
        det_mask = np.zeros(case.lesion.shape, bool)
        for d in res.detections:
            k0, j0, i0, k1, j1, i1 = d.bbox_index
            det_mask[k0:k1, j0:j1, i0:i1] |= pred_les[k0:k1, j0:j1, i0:i1]
        for les in case.lesions:
            if les.diameter_mm >= 3.0:
                det_total += 1
                det_hit += int((det_mask & (case.instances == les.instance)).any())
        for d in res.detections:
            k0, j0, i0, k1, j1, i1 = d.bbox_index
            comp_labels, _ = ndimage.label(pred_les[k0:k1, j0:j1, i0:i1])
            sub = gt_les[k0:k1, j0:j1, i0:i1]
            if not (sub & (comp_labels > 0)).any():
                fp += 1
        # Diagnosis.
        assert res.diagnosis is not None
        ys.append(case.diagnosis)
        ps.append([res.diagnosis.probabilities[k] for k in ("normal", "small_vessel", "mass")])
        # Report: facts vs ground truth, and vs the structured outputs.
        assert res.report is not None
        text = f"findings : {res.report.findings} impression : {res.report.impression}"
        stated = rt.parse_facts(text)
        truth = syn.facts_from_lesions(syn.DIAGNOSES[case.diagnosis], case.lesions)
        ok, cnt = _fact_agreement(stated, truth)
        fact_ok += ok
        fact_n += cnt
        own = report_facts(res.diagnosis, res.detections)
        own_stated = {k: v for k, v in own.items() if k in stated}
        if own["kind"] == "normal":
            own_stated = {"kind": "normal"}
        if stated != own_stated:
            contradictions += 1
        if own["kind"] != next(k for k, c in DIAGNOSIS_CODES.items() if c == res.diagnosis.code):
            disagree += 1
        # Reconstruction.
        if zf is not None and g.recon is not None:
            pm, pz = psnr(np.clip(g.recon, 0, 1), img), psnr(zf, img)
            psnr_model.append(pm)
            psnr_zf.append(pz)
            gains.append(pm - pz)
        rep.cases.append({
            "case": n, "diagnosis": syn.DIAGNOSES[case.diagnosis], "contrast": case.contrast,
            "predicted": res.diagnosis.code.meaning, "report": text, "truth": truth,
            "lesions": len(case.lesions), "detections": len(res.detections),
            "dice_lesion": per["lesion"][-1] if gt_les.any() else None,
            "seconds": round(time.monotonic() - t0, 1),
        })
        if progress:
            progress(f"case {n + 1}/{n_cases}: {rep.cases[-1]}")
    m = rep.metrics
    m["dice_brain"] = float(np.mean(per["brain"]))
    m["dice_csf"] = float(np.mean(per["csf"]))
    m["dice_grey_matter"] = float(np.mean(per["gm"]))
    m["dice_white_matter"] = float(np.mean(per["wm"]))
    if per["lesion"]:
        m["dice_lesion"] = float(np.mean(per["lesion"]))
    if det_total:
        m["detection_sensitivity_3mm"] = det_hit / det_total
    m["false_positives_per_volume"] = fp / max(n_cases, 1)
    y = np.array(ys)
    p = np.array(ps)
    if len(set(ys)) > 1:
        m["diagnosis_auc"] = auc_macro(y, p)
    m["diagnosis_accuracy"] = float((p.argmax(1) == y).mean())
    m["report_fact_agreement"] = fact_ok / max(fact_n, 1)
    m["report_contradictions"] = float(contradictions)
    m["report_kind_differs_from_diagnosis_head"] = float(disagree)
    if gains:
        m["recon_psnr_gain_db"] = float(np.mean(gains))
        m["recon_psnr_db"] = float(np.mean(psnr_model))
        m["zero_filled_psnr_db"] = float(np.mean(psnr_zf))
    m["cases"] = float(n_cases)
    m["lesions_evaluated"] = float(det_total)
    return rep


def evaluate_package(folder: Path, n_cases: int = 30, *, seed: int = 0, threads: int = 2,
                     recon_cases: int | None = None,
                     progress: Callable[[str], None] | None = None) -> EvalReport:
    """Evaluate a model package's ``model.onnx`` + ``decoder.onnx`` on held-out cases."""
    from inference.omnimri.tasks import onnx_report_writer

    vf = folder / "1"
    return evaluate(onnx_runner(vf / "model.onnx", threads),
                    onnx_report_writer(str(vf / "decoder.onnx")), n_cases, seed=seed,
                    recon_cases=recon_cases, progress=progress)


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
