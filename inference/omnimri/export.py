"""Export a trained OmniMRI checkpoint to a model package (ONNX, verified against PyTorch).

Writes::

    models/<name>/model.yaml      # inference.package.ModelSpec
    models/<name>/1/model.onnx    # vision encoder + heads, input ``image`` [N, 2c+1, P, P]
                                  # (outputs: VISION_OUTPUTS; ``embedding`` [N, align_dim] the
                                  # unit-length image embedding of each window)
    models/<name>/1/decoder.onnx  # report decoder: ``memory`` [N, 5, F], ``tokens`` [N, T]
    models/<name>/1/vocabulary.txt

The report decoder is declared under ``extra.report_decoder`` rather than as a generic ``text``
output: its memory is the structured findings (see :mod:`.report_text`), built by
:mod:`.tasks`, not a window-averaged encoder tensor.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import yaml
from torch import Tensor, nn

from inference.omnimri import report_text as rt
from inference.omnimri.config import INSTRUCTIONS, NORMALISATION
from inference.omnimri.model import OmniMRI, ReportDecoder
from inference.omnimri.tasks import DIAGNOSIS_CODES, MNI_BRAIN_BBOX_MM, TaskSettings

log = structlog.get_logger(__name__)

OPSET = 17


class ExportError(RuntimeError):
    """ONNX and PyTorch outputs differ by more than the tolerance."""


class _Vision(nn.Module):
    def __init__(self, model: OmniMRI) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        out = self.model(image)
        d = out["diagnosis"]
        dmap = d[:, :, None, None].expand(-1, -1, image.shape[2], image.shape[3])
        return out["tissue"], out["lesion"], out["recon"], d, dmap, out["embedding"]


VISION_OUTPUTS = ("tissue", "lesion", "recon", "diagnosis", "diagnosis_map", "embedding")
"""Outputs of ``model.onnx``, in order. ``embedding`` (unit-length ``[N, align_dim]`` per
window, pooled per series by :class:`inference.runner.EmbeddingPool`, windows weighted by
their brain probability from ``tissue``) is what report<->image retrieval reads
(:mod:`inference.omnimri.retrieval`); packages exported before it lack it."""


def export_vision(model: OmniMRI, path: Path) -> None:
    """Write ``model.onnx`` (dynamic batch)."""
    model.eval()
    cfg = model.cfg
    x = torch.zeros(2, cfg.in_channels, cfg.patch_size, cfg.patch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _Vision(model), (x,), str(path), input_names=["image"], output_names=list(VISION_OUTPUTS),
        dynamic_axes={"image": {0: "N"}, **{n: {0: "N"} for n in VISION_OUTPUTS}},
        opset_version=OPSET, dynamo=False,
    )


def export_decoder(decoder: ReportDecoder, path: Path) -> None:
    """Write ``decoder.onnx`` (dynamic batch and token count)."""
    decoder.eval()
    mem = torch.zeros(1, len(rt.SLOTS), rt.FACT_DIM)
    toks = torch.ones(1, 3, dtype=torch.long)
    torch.onnx.export(
        decoder, (mem, toks), str(path), input_names=["memory", "tokens"],
        output_names=["logits"],
        dynamic_axes={"memory": {0: "N"}, "tokens": {0: "N", 1: "T"}, "logits": {0: "N", 1: "T"}},
        opset_version=OPSET, dynamo=False,
    )


def verify(model: OmniMRI, decoder: ReportDecoder, folder: Path, atol: float = 1e-3,
           seed: int = 0) -> dict[str, float]:
    """Max absolute difference ONNX vs PyTorch per output; raises :class:`ExportError`.

    Inputs: a synthetic case's slices (realistic) and uniform noise; the decoder on a few
    fact sets with teacher-forced tokens.
    """
    import onnxruntime as ort

    from inference.omnimri import synthetic as syn
    from inference.omnimri.train import _pad, _stack

    cfg = model.cfg
    case = syn.make_case(seed + 12345, diagnosis=2)
    img = syn.normalise(case.image)
    mid = img.shape[0] // 2
    xs = [_pad(_stack(img, k, cfg.context_slices), cfg.patch_size, 5, 10) for k in (mid - 8, mid)]
    rng = np.random.default_rng(seed)
    xs.append(rng.random((cfg.in_channels, cfg.patch_size, cfg.patch_size)).astype(np.float32))
    x = np.stack(xs).astype(np.float32)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(VISION_OUTPUTS, sess.run(None, {"image": x}), strict=True))
    with torch.no_grad():
        ref = _Vision(model.eval())(torch.from_numpy(x))
    diffs = {n: float(np.abs(got[n] - r.numpy()).max()) for n, r in zip(VISION_OUTPUTS, ref,
                                                                        strict=True)}
    dsess = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    from inference.omnimri.train import facts_batch, random_facts

    mem, toks = facts_batch([random_facts(rng) for _ in range(3)], cfg.max_tokens)
    dg = dsess.run(None, {"memory": mem.numpy(), "tokens": toks[:, :20].numpy()})[0]
    with torch.no_grad():
        dr = decoder.eval()(mem, toks[:, :20]).numpy()
    diffs["decoder_logits"] = float(np.abs(dg - dr).max())
    bad = {k: v for k, v in diffs.items() if v > atol}
    if bad:
        raise ExportError(f"ONNX differs from PyTorch beyond {atol}: {bad}")
    log.info("export.verified", **{k: round(v, 7) for k, v in diffs.items()})
    return diffs


def _code(c: Any) -> dict[str, str]:
    return {"value": c.value, "scheme": c.scheme, "meaning": c.meaning}


def model_spec(model: OmniMRI, name: str, version: str, *, metrics: dict[str, float] | None = None,
               provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``model.yaml`` content (an :class:`inference.package.ModelSpec` as a dict)."""
    from inference import results as R

    cfg = model.cfg
    tissue_cat = _code(R.TISSUE)
    abn = _code(R.MORPHOLOGICALLY_ABNORMAL)
    settings = TaskSettings()
    return {
        "name": name,
        "version": version,
        "description": (
            f"OmniMRI {cfg.name}: one 2.5D hybrid conv/ViT encoder with tissue, lesion, "
            "diagnosis and reconstruction heads and a grounded report decoder; trained on "
            "synthetic MR made from the MNI152 2009 template. Research use only."
        ),
        "tasks": list(INSTRUCTIONS),
        "input": {
            "name": "image", "layout": "NCHW", "context_slices": cfg.context_slices,
            "spacing_mm": [cfg.spacing_mm] * 3, "orientation": "LPS-axial",
            "patch_size": [cfg.patch_size, cfg.patch_size], "overlap": 0.25,
            "batch_size": EXPORT_BATCH_SIZE,
            "normalisation": dict(NORMALISATION),
        },
        "outputs": [
            {"kind": "segmentation", "name": "tissue", "activation": "softmax", "labels": [
                {"value": 1, "label": "CSF", "category": tissue_cat, "type": _code(R.CSF),
                 "color": [60, 120, 230]},
                {"value": 2, "label": "Grey matter", "category": tissue_cat,
                 "type": _code(R.GREY_MATTER), "color": [150, 150, 150]},
                {"value": 3, "label": "White matter", "category": tissue_cat,
                 "type": _code(R.WHITE_MATTER), "color": [240, 240, 240]},
            ]},
            {"kind": "segmentation", "name": "lesion", "activation": "softmax", "labels": [
                {"value": 1, "label": "WM hyperintensity", "category": abn,
                 "type": _code(R.WM_HYPERINTENSITY), "color": [255, 200, 0],
                 "task": "pathological"},
                {"value": 2, "label": "Mass", "category": abn, "type": _code(R.MASS),
                 "color": [255, 0, 0], "task": "pathological"},
                {"value": 3, "label": "Oedema", "category": abn, "type": _code(R.EDEMA),
                 "color": [0, 200, 120], "task": "pathological"},
            ], "detection": {"min_volume_mm3": settings.min_lesion_mm3, "connectivity": 26}},
            {"kind": "segmentation", "name": "diagnosis_map", "activation": "softmax", "labels": [
                {"value": 1, "label": "Small vessel disease evidence", "category": abn,
                 "type": _code(DIAGNOSIS_CODES["small_vessel"]), "task": "pathological"},
                {"value": 2, "label": "Mass evidence", "category": abn,
                 "type": _code(R.MASS), "task": "pathological"},
            ]},
            {"kind": "classification", "name": "diagnosis", "activation": "softmax",
             "classes": [{"name": n, "code": _code(c)} for n, c in DIAGNOSIS_CODES.items()]},
            {"kind": "image", "name": "recon", "denormalise": True},
            {"kind": "embedding", "name": "embedding", "pool": "segmentation",
             "weight_output": "tissue", "normalise": True},
        ],
        "task_outputs": {
            "segment brain tissues": ["tissue"],
            "detect abnormalities": ["lesion", "tissue"],
            "suggest a diagnosis": ["diagnosis_map", "diagnosis", "lesion", "tissue"],
            "write the report": ["diagnosis_map", "diagnosis", "lesion", "tissue", "embedding"],
            "reconstruct": ["recon"],
        },
        "thresholds": {"lesion": settings.lesion_threshold},
        "provenance": provenance or {},
        "metrics": metrics or {},
        "license": "Apache-2.0 (code and weights); training template: ICBM152 2009a via nilearn",
        "intended_use": "Research use only. Not a medical device; not for diagnosis.",
        "extra": {
            "family": "omnimri",
            "size": cfg.name,
            "architecture": cfg.to_dict(),
            "report_decoder": {
                "file": "decoder.onnx", "vocabulary": "vocabulary.txt",
                "bos_id": rt.WORD_ID[rt.BOS], "eos_id": rt.WORD_ID[rt.EOS],
                "pad_id": rt.WORD_ID[rt.PAD], "max_tokens": cfg.max_tokens,
                "memory": "structured findings: one-hot slots " + ", ".join(rt.SLOTS),
            },
            "tasks": {"min_lesion_mm3": settings.min_lesion_mm3,
                      "lesion_threshold": settings.lesion_threshold,
                      "diagnosis_top_mm": settings.diagnosis_top_mm,
                      "midline_tolerance_mm": settings.midline_tolerance_mm},
            "atlas": {"kind": "MNI box lobes after brain bounding-box alignment",
                      "mni_brain_bbox_mm": [list(MNI_BRAIN_BBOX_MM[0]),
                                            list(MNI_BRAIN_BBOX_MM[1])]},
        },
    }


def export_package(checkpoint: Path, out_dir: Path, *, name: str = "omnimri-tiny",
                   version: str = "1.0.0", metrics: dict[str, float] | None = None,
                   atol: float = 1e-3) -> Path:
    """Export a training checkpoint to a verified model package; returns the package folder."""
    import json

    from inference.omnimri.train import STAGES, load_stage, weights_sha256

    mods, st = load_stage(checkpoint.parent, checkpoint.stem)
    runs = {}
    for stage in STAGES:  # what the run folder says each stage did (steps, wall time)
        done = checkpoint.parent / f"{stage}.done"
        if done.is_file():
            d = json.loads(done.read_text())
            runs[stage] = {"steps": int(d.get("steps", 0)),
                           "seconds": round(float(d.get("seconds", 0.0)), 1)}
    folder = out_dir / "1"
    folder.mkdir(parents=True, exist_ok=True)
    export_vision(mods.vision, folder / "model.onnx")
    export_decoder(mods.decoder, folder / "decoder.onnx")
    (folder / "vocabulary.txt").write_text("\n".join(rt.VOCAB) + "\n", encoding="utf-8")
    diffs = verify(mods.vision, mods.decoder, folder, atol=atol)
    prov = {
        "training_data": ["synthetic MR from the ICBM152 2009a template (nilearn wheel)"],
        "seed": int(st.get("seed", 0)),
        "stages": list(runs),
        "stage_runs": runs,
        **({"averaged_stages": list(st["of"])} if "of" in st else {}),
        **({"embedding_head": f"findings ('train embed' on {st['embed_of']})"}
           if "embed_of" in st else {}),
        "weights_sha256": weights_sha256(mods),
        "code_version": "inference.omnimri",
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "onnx_max_abs_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
    }
    spec = model_spec(mods.vision, name, version, metrics=metrics, provenance=prov)
    _keep_foreign_extra(out_dir / "model.yaml", spec)
    _drop_stale_variants(folder)
    (out_dir / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return out_dir


EXPORT_BATCH_SIZE = 4
"""Windows per engine call written into ``model.yaml``: measured on the 2-core CPU with
ONNX Runtime (quiet machine, 95 windows, ``benchmarks/engines.py --batch-sizes 4,16``): 21.0 ms
per window at 4 against 23.4 at 16, 37.4 against 42.1 CPU ms. GPUs may want more (an
operator's edit of ``input.batch_size``)."""

KEPT_EXTRA = ("language",)
"""``extra`` keys of an existing ``model.yaml`` that another trainer writes (the language
models of :mod:`inference.omnimri.language`, whose files live in ``1/language/``): a re-export
of the vision model keeps them."""


ALIGNED_LANGUAGE_KEYS = ("report_encoder", "align_seed", "align_train_cases",
                         "align_train_seconds", "align_onnx_max_abs_diff")
"""``extra.language`` keys of ``train align-text``: its report encoder is aligned with *these*
vision weights' image embedding, so a re-export drops them (and the files; run it again)."""


def _keep_foreign_extra(old_yaml: Path, spec: dict[str, Any]) -> None:
    if not old_yaml.is_file():
        return
    old = yaml.safe_load(old_yaml.read_text(encoding="utf-8")) or {}
    for key in KEPT_EXTRA:
        if key in (old.get("extra") or {}):
            spec["extra"][key] = old["extra"][key]
    lang = spec["extra"].get("language")
    if isinstance(lang, dict) and lang.get("report_encoder"):
        folder = old_yaml.parent / "1" / str(lang.get("folder", "language"))
        for name in (str(lang["report_encoder"]), "align.json"):
            (folder / name).unlink(missing_ok=True)
        spec["extra"]["language"] = {k: v for k, v in lang.items()
                                     if k not in ALIGNED_LANGUAGE_KEYS}


def _drop_stale_variants(folder: Path) -> None:
    """Remove what was derived from the previous weights.

    Quantised variants (re-made and re-checked by ``engines quantize``) and ONNX Runtime's
    optimised-graph cache.
    """
    import shutil

    for stale in folder.glob("model.*.onnx"):
        stale.unlink()
    shutil.rmtree(folder / "ort_cache", ignore_errors=True)
