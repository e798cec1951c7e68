"""Stage-2 vision-language alignment: the text encoder aligned with the image embedding (LiT).

Locked-image tuning (Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning"): the image side is frozen - the served vision package's ``embedding`` output, pooled
per series (:class:`inference.runner.EmbeddingPool`, read through
:func:`inference.omnimri.retrieval.case_embedding`) - and the text side learns to meet it. Here
the text side is the project's BERT text encoder (:mod:`.textmodel`, served as
``text_encoder.onnx``), also frozen, read at its pooled states (the ``[CLS]`` and mean token
states its heads read, ``2 * hidden`` wide), and a projection trained here: a two-layer MLP to
the image embedding's width, unit length.

* **Data**: training cases (:func:`training_cases`: held-out-*layout* cases of set 0,
  :func:`inference.omnimri.evaluate.heldout_case` ``(k, seed=0)``; the retrieval metric uses
  sets 1 and 2). Each case's image embedding is computed once through the served ONNX and
  cached; its true findings (:func:`inference.omnimri.retrieval.case_facts`) are written as
  reports by the project's report writer in :data:`STYLES` template styles
  (:func:`~inference.omnimri.language.narrate.styled_choice`), so the projection sees the
  paraphrases.
* **Loss**: symmetric InfoNCE over the cases of a batch with soft targets: every case whose
  report facts equal the query's (:func:`inference.omnimri.retrieval.fact_key`) is a positive
  (normal cases share one report), temperature :attr:`AlignSettings.temperature`.
* **Export**: one ONNX graph ``report_encoder.onnx`` - the text encoder's graph up to its pooled
  states (the same weights as ``text_encoder.onnx``) followed by the projection:
  ``(input_ids, attention_mask) -> embedding [N, D]``; checked against PyTorch (the projection
  applied to the served encoder's states) on held-out reports.

Serving: :class:`ReportEmbedder` (ONNX Runtime, CPU). Training needs the ``train`` extra.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPORT_ENCODER_FILE = "report_encoder.onnx"
"""The aligned report encoder in the package's language folder."""

STYLES = 12
"""Template styles each training report is written in (those of
:func:`~inference.omnimri.language.narrate.styled_choice`)."""

POOLED_OUTPUT = "/Concat_output_0"
"""The tensor of ``text_encoder.onnx`` that its heads read: ``[CLS]`` and mean token states."""


@dataclass
class AlignSettings:
    """Hyper-parameters of the text projection (defaults: seconds on one core)."""

    seed: int = 0
    train_cases: int = 120
    """Training cases (set 0 of :func:`inference.omnimri.evaluate.heldout_case`)."""
    hidden: int = 256
    """Width of the projection's hidden layer."""
    steps: int = 1500
    batch: int = 64
    """Cases per step (each with one report of a random style)."""
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05


def training_cases(n: int) -> list[tuple[str, Callable[[], Any]]]:
    """The ``n`` training cases of the alignment, as ``(name, make)`` (see the module)."""
    from inference.omnimri.retrieval import heldout_cases

    return heldout_cases(n, seed=0)


# --------------------------------------------------------------------------- text features


def feature_graph(encoder_onnx: Path) -> Any:
    """``text_encoder.onnx`` cut at its pooled states: ``(input_ids, attention_mask) -> pooled``.

    Raises:
        ValueError: The graph has no tensor :data:`POOLED_OUTPUT` (another encoder layout).
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(encoder_onnx))
    if not any(POOLED_OUTPUT in n.output for n in model.graph.node):
        raise ValueError(f"{encoder_onnx.name} has no tensor {POOLED_OUTPUT!r} (the pooled "
                         "states its heads read)")
    ext = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    sub = ext.extract_model(["input_ids", "attention_mask"], [POOLED_OUTPUT])
    # rename the output to 'pooled' (an Identity keeps the inner name intact)
    sub.graph.node.append(helper.make_node("Identity", [POOLED_OUTPUT], ["pooled"]))
    out = sub.graph.output[0]
    out.name = "pooled"
    return sub


class _TextGraph:
    """A text graph ``(input_ids, attention_mask) -> output`` on ONNX Runtime (CPU).

    Called on texts: tokenised, run in batches of 64, ``[N, D]`` float32 rows, one per text.
    """

    def __init__(self, model: Path | bytes, output: str, language_folder: Path, tokenizer: str,
                 max_tokens: int, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.tok = Tokenizer.from_file(str(language_folder / tokenizer))
        self.max_tokens = max_tokens
        self.output = output
        self.sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                         opts, providers=["CPUExecutionProvider"])

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        from inference.omnimri.language.textmodel import encode_batch

        out = []
        for i in range(0, len(texts), 64):
            ids, mask = encode_batch(self.tok, list(texts[i:i + 64]), self.max_tokens)
            out.append(self.sess.run([self.output], {"input_ids": ids,
                                                     "attention_mask": mask})[0])
        return np.concatenate(out).astype(np.float32)


class _Features(_TextGraph):
    """The served encoder's pooled states on ONNX Runtime."""

    def __init__(self, language_folder: Path, encoder: str, tokenizer: str,
                 max_tokens: int) -> None:
        graph = feature_graph(language_folder / encoder)
        super().__init__(graph.SerializeToString(), "pooled", language_folder, tokenizer,
                         max_tokens)


# --------------------------------------------------------------------------- training


def _projection(width: int, hidden: int, out: int) -> Any:
    import torch
    from torch import nn

    class Projection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                     nn.Linear(hidden, out))

        def forward(self, pooled: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.mlp(self.norm(pooled)), dim=-1)

    return Projection()


def style_reports(facts: Any) -> list[str]:
    """The report of ``facts`` in each of the :data:`STYLES` template styles."""
    from inference.omnimri.language.narrate import (
        delexicalised_report,
        fill,
        slot_values,
        styled_choice,
    )

    values = slot_values(facts)
    out = []
    for style in range(STYLES):
        findings, impression, _ = delexicalised_report(facts, styled_choice(style))
        out.append(f"{fill(findings, values)} {fill(impression, values)}")
    return out


def _soft_targets(keys: Sequence[Any]) -> npt.NDArray[np.float32]:
    same = np.array([[a == b for b in keys] for a in keys], np.float32)
    out: npt.NDArray[np.float32] = same / same.sum(1, keepdims=True)
    return out


def train_projection(images: npt.NDArray[np.float32], feats: npt.NDArray[np.float32],
                     keys: Sequence[Any], s: AlignSettings,
                     progress: Callable[[str], None] | None = None) -> Any:
    """Train the projection contrastively (see the module); returns it (eval mode).

    Args:
        images: ``[C, D]`` unit image embeddings of the ``C`` training cases.
        feats: ``[C, STYLES, W]`` pooled text-encoder states of each case's reports.
        keys: The cases' report facts (:func:`inference.omnimri.retrieval.fact_key`).
        s: Settings.
        progress: Receives a line every 250 steps.
    """
    import torch

    say = progress or (lambda m: None)
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    proj = _projection(feats.shape[-1], s.hidden, images.shape[-1])
    opt = torch.optim.AdamW(proj.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps,
                                                pct_start=0.1)
    img = torch.from_numpy(images)
    txt = torch.from_numpy(feats)
    key_ids = {k: n for n, k in enumerate(sorted(set(keys)))}
    kid = torch.tensor([key_ids[k] for k in keys])
    n = len(keys)
    proj.train()
    for step in range(1, s.steps + 1):
        idx = torch.randperm(n, generator=gen)[: min(s.batch, n)]
        style = torch.randint(0, feats.shape[1], (len(idx),), generator=gen)
        t = proj(txt[idx, style])
        logits = t @ img[idx].T / s.temperature
        same = (kid[idx][:, None] == kid[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = -(target * logits.log_softmax(1)).sum(1).mean() - (
            target * logits.log_softmax(0)).sum(0).mean()
        loss = loss / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == s.steps:
            say(f"align-text step {step}/{s.steps} loss {loss.item():.4f}")
    return proj.eval()


def export_report_encoder(proj: Any, features: _Features, language_folder: Path,
                          encoder: str, texts: Sequence[str]) -> float:
    """Write :data:`REPORT_ENCODER_FILE` (feature graph + projection) and check it.

    Returns the largest absolute difference between ONNX Runtime on the whole graph and the
    PyTorch projection applied to the served encoder's states, on ``texts``.

    Raises:
        RuntimeError: The difference exceeds 1e-4.
    """
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import compose

    from inference.omnimri.export import OPSET
    from inference.omnimri.language.textmodel import encode_batch

    width = int(features(list(texts[:1])).shape[-1])
    tmp = language_folder / "report_projection.tmp.onnx"
    torch.onnx.export(proj, (torch.zeros(2, width),), str(tmp), input_names=["pooled"],
                      output_names=["embedding"],
                      dynamic_axes={"pooled": {0: "N"}, "embedding": {0: "N"}},
                      opset_version=OPSET, dynamo=False)
    head = onnx.load(str(tmp))
    tmp.unlink()
    base = feature_graph(language_folder / encoder)
    head = compose.add_prefix(head, prefix="align/")
    if head.ir_version != base.ir_version:
        head.ir_version = base.ir_version
    merged = compose.merge_models(base, head, io_map=[("pooled", "align/pooled")],
                                  outputs=["align/embedding"])
    merged.graph.node.append(onnx.helper.make_node("Identity", ["align/embedding"],
                                                   ["embedding"]))
    merged.graph.output[0].name = "embedding"
    onnx.checker.check_model(merged)
    path = language_folder / REPORT_ENCODER_FILE
    onnx.save(merged, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for batch in ([list(texts)] + [[t] for t in texts[:10]]):
        ids, mask = encode_batch(features.tok, batch, features.max_tokens)
        got = sess.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            ref = proj(torch.from_numpy(features(batch))).numpy()
        diff = max(diff, float(np.abs(got - ref).max()))
    if diff > 1e-4:
        raise RuntimeError(f"ONNX report encoder differs from PyTorch by {diff:.2e}")
    return diff


def train_align_text(package: Path, s: AlignSettings | None = None, *,
                     cache: Path | None = None, threads: int = 2,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Align the package's text encoder with its image embedding; write the report encoder.

    Computes (or reads from ``cache``) the served image embeddings of the training cases,
    trains the projection, writes ``<version>/language/report_encoder.onnx`` checked against
    PyTorch and ``align.json`` (settings, summary). Returns the ``extra.language`` keys to add
    (``report_encoder``, ``align_*``).

    Raises:
        ValueError: The package has no ``embedding`` output or no text encoder.
    """
    import torch

    from inference.omnimri import retrieval as rv
    from inference.omnimri.evaluate import ServedModel
    from inference.package import ModelPackage

    s = s or AlignSettings()
    say = progress or (lambda m: None)
    torch.set_num_threads(1)
    pkg = ModelPackage.load(package)
    if "embedding" not in [o.name for o in pkg.spec.outputs]:
        raise ValueError(f"{package}: the vision model has no embedding output (export it "
                         "again with this code: 'omnimri-node train export')")
    lang = dict(pkg.spec.extra.get("language") or {})
    if not lang.get("encoder"):
        raise ValueError(f"{package}: no text encoder (extra.language); run "
                         "'omnimri-node train language' first")
    folder = pkg.version_folder() / str(lang.get("folder", "language"))
    t0 = time.perf_counter()
    model = ServedModel.load(package, threads=threads)
    try:
        sub = cache / rv.package_fingerprint(package) if cache is not None else None
        recs = rv.case_records(model, training_cases(s.train_cases), sub, progress=say)
    finally:
        model.close()
    image_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = _Features(folder, str(lang["encoder"]), str(lang.get("tokenizer",
                                                                    "tokenizer.json")),
                         int(lang.get("max_tokens", 64)))
    texts = [style_reports(r.series_facts()) for r in recs]
    feats = features([t for ts in texts for t in ts]).reshape(len(recs), STYLES, -1)
    images = np.stack([r.embedding for r in recs]).astype(np.float32)
    keys = [r.key for r in recs]
    proj = train_projection(images, feats, keys, s, say)
    train_s = time.perf_counter() - t0
    with torch.no_grad():  # how well it fits its own training cases (first style)
        fit = rv.recall_at_1(proj(torch.from_numpy(feats[:, 0])).numpy() @ images.T, keys)
    say(f"training cases: recall@1 report->image {fit['report_to_image']:.3f}, image->report "
        f"{fit['image_to_report']:.3f} (chance {fit['chance']:.3f})")
    check_texts = [t[k % STYLES] for k, t in enumerate(texts[:40])]
    diff = export_report_encoder(proj, features, folder, str(lang["encoder"]), check_texts)
    say(f"report encoder: onnx vs pytorch max |diff| {diff:.2e}")
    summary = {"settings": asdict(s), "image_seconds": round(image_s, 1),
               "train_seconds": round(train_s, 1), "onnx_max_abs_diff": diff,
               "training_cases": len(recs), "distinct_training_reports": len(set(keys)),
               "training_recall_at_1": {k: round(v, 4) for k, v in fit.items()},
               "training_set": "heldout_case(k, seed=0), k < train_cases (held-out layout)"}
    (folder / "align.json").write_text(json.dumps(summary, indent=1))
    return {"report_encoder": REPORT_ENCODER_FILE, "align_seed": s.seed,
            "align_train_cases": len(recs), "align_train_seconds": round(train_s, 1),
            "align_onnx_max_abs_diff": float(f"{diff:.3g}")}


# --------------------------------------------------------------------------- serving


class ReportEmbedder(_TextGraph):
    """The package's aligned report encoder on ONNX Runtime (CPU).

    Called on texts: ``[N, D]`` unit-length report embeddings.
    """

    def __init__(self, language_folder: Path, encoder: str = REPORT_ENCODER_FILE,
                 tokenizer: str = "tokenizer.json", max_tokens: int = 64,
                 threads: int = 1) -> None:
        super().__init__(language_folder / encoder, "embedding", language_folder, tokenizer,
                         max_tokens, threads)


def report_embedder_for(package: Any) -> ReportEmbedder | None:
    """The package's :class:`ReportEmbedder` (``extra.language.report_encoder``), or ``None``."""
    spec = dict(package.spec.extra).get("language") or {}
    if not spec.get("report_encoder"):
        return None
    folder = package.version_folder() / str(spec.get("folder", "language"))
    return ReportEmbedder(folder, str(spec["report_encoder"]),
                          str(spec.get("tokenizer", "tokenizer.json")),
                          int(spec.get("max_tokens", 64)))
