"""Calibration of OmniMRI post-processing on validation cases (never the held-out set).

The network gives probabilities; turning them into findings needs four numbers that are
properties of a trained model, not of the code: the lesion probability threshold, the smallest
lesion component kept (mm³), the slab (mm) whose most abnormal slices decide the case-level
diagnosis, and how much the lesion detections weigh in that diagnosis. :func:`calibrate`
chooses them on *validation* cases - seeds from :data:`VALIDATION_SEED_BASE`, the training
lesion layout - so the held-out evaluation
(:mod:`.evaluate`, other seeds and the other lesion layout) stays untouched:

* lesion threshold x minimum size: the pair with the best detection critical success index,
  ``hits / (lesions + false positives)`` (lesions >= 3 mm); ties go to fewer false positives,
  then to the higher threshold and the larger minimum size (:func:`detection_key`: the
  conservative reading, since a false component is what turns a normal brain into a "mass");
* diagnosis slab x weight of the detections in the diagnosis: the best macro one-vs-rest AUC.

Calibration runs the served path only: each validation case becomes a
:class:`inference.volume.Volume` and runs through :func:`inference.runner.run_model` once (the
network); every candidate setting is then applied to those cached source-grid probabilities by
:func:`inference.omnimri.tasks.results_from_raw`, the post-processing a node job runs, and
scored from the ``Results`` (:func:`inference.omnimri.evaluate.score_case`).

The result is written to ``model.yaml`` ``extra.tasks``, which the node and ``eval`` read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.omnimri import synthetic as syn
from inference.omnimri.evaluate import (
    ALL_INSTRUCTIONS,
    CaseScore,
    ServedModel,
    auc_macro,
    case_volume,
    score_case,
)
from inference.omnimri.tasks import TaskSettings
from inference.volume import Volume

CAL_INSTRUCTIONS = ALL_INSTRUCTIONS[:3]
"""Segment, detect, diagnose: everything calibration scores (the report is not needed)."""

VALIDATION_SEED_BASE = 800_000_000
"""Validation case seeds start here (training: ``(seed + 1) * 1e6 + ...``; held-out: 9e8)."""

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""Candidate lesion probability thresholds (P(WMH) + P(mass))."""
MIN_LESION_MM3 = (16.0, 32.0, 64.0, 128.0)
"""Candidate smallest lesion components, mm³ (a 4 mm WMH is about 32 mm³)."""
TOP_MM = (2.0, 4.0, 6.0, 10.0, 16.0)
"""Candidate diagnosis slabs, mm."""
DETECTION_WEIGHTS = (0.0, 0.5, 1.0)
"""Candidate weights of the detections in the case-level diagnosis."""


@dataclass
class Calibration:
    """Chosen settings and the table they were chosen from."""

    settings: TaskSettings
    cases: int
    seed: int
    detection: list[dict[str, float]] = field(default_factory=list)
    """One row per (threshold, minimum size): hits, lesions, false positives, CSI."""
    diagnosis: list[dict[str, float]] = field(default_factory=list)
    """One row per (slab, detection weight): AUC."""

    def lines(self) -> list[str]:
        """A readable table, best rows marked with ``*``."""
        s = self.settings
        out = [f"validation cases: {self.cases} (seed {self.seed}, training lesion layout)",
               "threshold  min_mm3  hits/lesions  FP/volume    CSI"]
        for r in self.detection:
            mark = "*" if (r["threshold"], r["min_lesion_mm3"]) == (
                s.lesion_threshold, s.min_lesion_mm3) else " "
            out.append(f"{mark} {r['threshold']:7.2f} {r['min_lesion_mm3']:8.0f} "
                       f"{int(r['hits']):6d}/{int(r['lesions']):<6d} "
                       f"{r['fp_per_volume']:9.2f} {r['csi']:7.3f}")
        out.append("diagnosis slab (mm)  detection weight    AUC")
        for r in self.diagnosis:
            mark = "*" if (r["top_mm"], r["detection_weight"]) == (
                s.diagnosis_top_mm, s.diagnosis_detection_weight) else " "
            out.append(f"{mark} {r['top_mm']:17.0f} {r['detection_weight']:17.1f} "
                       f"{r['auc']:7.3f}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """What ``model.yaml`` records (settings go to ``extra.tasks``)."""
        best = next(r for r in self.detection
                    if (r["threshold"], r["min_lesion_mm3"])
                    == (self.settings.lesion_threshold, self.settings.min_lesion_mm3))
        auc = next(r["auc"] for r in self.diagnosis
                   if (r["top_mm"], r["detection_weight"])
                   == (self.settings.diagnosis_top_mm, self.settings.diagnosis_detection_weight))
        return {"cases": self.cases, "seed_base": VALIDATION_SEED_BASE + self.seed * 10_000,
                "layout": "training", "objective": "detection CSI; diagnosis AUC",
                "validation_csi": round(best["csi"], 4),
                "validation_fp_per_volume": round(best["fp_per_volume"], 4),
                "validation_sensitivity": round(best["hits"] / max(best["lesions"], 1), 4),
                "validation_auc": round(auc, 4)}


def validation_case(n: int, seed: int = 0) -> syn.Case:
    """Validation case ``n`` (cycling the three diagnoses, training lesion layout)."""
    return syn.make_case(VALIDATION_SEED_BASE + seed * 10_000 + n, diagnosis=n % 3)


def cached_raw(model: ServedModel, volume: Volume, instructions: list[str]) -> Any:
    """The engine run of one case, kept for re-post-processing under many settings.

    Source-grid probabilities are built once here (not once per setting); of the per-slice
    diagnosis map only its per-slice means are kept (all that post-processing reads).
    """
    raw = model.raw(volume, instructions)
    for name, seg in raw.segmentation.items():
        if name == "diagnosis_map":
            seg.release()
        else:
            seg.probabilities  # noqa: B018 - built now, cached
    return raw


def detection_key(row: dict[str, float]) -> tuple[float, float, float, float]:
    """Order of the detection grid's rows (the best is the largest key).

    Best CSI, then fewest false positives per volume, then the higher threshold, then the
    larger minimum size (mm³). CSI is rounded to 1e-9 so that equal ratios compare equal.
    """
    return (round(row["csi"], 9), -row["fp_per_volume"], row["threshold"],
            row["min_lesion_mm3"])


def calibrate(model: ServedModel, n_cases: int = 12, *, seed: int = 0,
              base: TaskSettings | None = None,
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Choose the post-processing settings for a served model on validation cases."""
    base = base or model.settings or TaskSettings.from_dict(
        model.package.spec.extra.get("tasks"))
    data: list[tuple[syn.Case, Volume, Any]] = []
    for n in range(n_cases):
        case = validation_case(n, seed)
        vol = case_volume(case)
        data.append((case, vol, cached_raw(model, vol, CAL_INSTRUCTIONS)))
        if progress:
            progress(f"validation case {n + 1}/{n_cases} predicted")
    truth = np.array([c.diagnosis for c, _, _ in data])

    def scores(st: TaskSettings) -> list[CaseScore]:
        return [score_case(c, model.results(r, v, CAL_INSTRUCTIONS, st)) for c, v, r in data]

    cal = Calibration(settings=base, cases=n_cases, seed=seed)
    for thr in THRESHOLDS:
        for mn in MIN_LESION_MM3:
            sc = scores(replace(base, lesion_threshold=thr, min_lesion_mm3=mn))
            hits = sum(s.hits for s in sc)
            lesions = sum(s.lesions for s in sc)
            fp = sum(s.false_positives for s in sc)
            csi = hits / max(lesions + fp, 1)
            cal.detection.append({"threshold": thr, "min_lesion_mm3": mn, "hits": hits,
                                  "lesions": lesions, "fp_per_volume": fp / n_cases,
                                  "csi": csi})
            if progress:
                progress(f"threshold {thr} min {mn} mm3: CSI {csi:.3f}")
    best_row = max(cal.detection, key=detection_key)
    chosen = replace(base, lesion_threshold=best_row["threshold"],
                     min_lesion_mm3=best_row["min_lesion_mm3"])
    for top in TOP_MM:
        for w in DETECTION_WEIGHTS:
            sc = scores(replace(chosen, diagnosis_top_mm=top, diagnosis_detection_weight=w))
            auc = auc_macro(truth, np.array([s.probabilities or [1.0, 0.0, 0.0] for s in sc]))
            cal.diagnosis.append({"top_mm": top, "detection_weight": w,
                                  "auc": auc if np.isfinite(auc) else 0.5})
    # Best AUC; on a tie the setting closest to the current one.
    best = max(cal.diagnosis, key=lambda r: (
        round(r["auc"], 6), -abs(r["detection_weight"] - base.diagnosis_detection_weight),
        -abs(r["top_mm"] - base.diagnosis_top_mm)))
    cal.settings = replace(chosen, diagnosis_top_mm=best["top_mm"],
                           diagnosis_detection_weight=best["detection_weight"])
    return cal


def calibrate_package(folder: Path, n_cases: int = 12, *, seed: int = 0, threads: int = 2,
                      write: bool = True,
                      progress: Callable[[str], None] | None = None) -> Calibration:
    """Calibrate a package's ``model.onnx``; with ``write``, store the result in model.yaml."""
    import yaml

    from inference.omnimri.evaluate import package_task_settings

    model = ServedModel.load(folder, threads)
    try:
        cal = calibrate(model, n_cases, seed=seed, base=package_task_settings(folder),
                        progress=progress)
    finally:
        model.close()
    if write:
        path = folder / "model.yaml"
        spec = yaml.safe_load(path.read_text())
        extra = spec.setdefault("extra", {})
        extra["tasks"] = {k: float(v) for k, v in asdict(cal.settings).items()}
        extra["calibration"] = cal.to_dict()
        spec.setdefault("thresholds", {})["lesion"] = cal.settings.lesion_threshold
        if "outputs" in spec:
            for out in spec["outputs"]:
                if out.get("name") == "lesion" and isinstance(out.get("detection"), dict):
                    out["detection"]["min_volume_mm3"] = cal.settings.min_lesion_mm3
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return cal
