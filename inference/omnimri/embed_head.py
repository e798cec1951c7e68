"""A findings-aware image embedding head on frozen vision features (issue #16, retrieval).

The vision model's original ``embedding`` head (``OmniMRI.proj``) projects mean- and max-pooled
tokens; measured, it encodes the contrast but not the diagnosis kind nor the side (pooling over
all tokens throws laterality away). :class:`FindingsHead` replaces it, *head-only*: it reads the
frozen encoder's tokens and the frozen tissue and lesion logits of each 2.5-D window and writes
the ``embedding`` output; every other output (tissue, lesion, recon, diagnosis) is computed
exactly as before.

Per window (the model's LPS-axial grid: columns run from patient right to patient **left**, rows
from anterior to posterior; :func:`inference.preprocess.prepare` reorients every series so):

* the brain probability ``b`` (one minus tissue background) and the lesion class probabilities
  ``q`` (WM hyperintensity, mass, oedema), averaged to 4 mm pixels;
* the brain's centroid (``b``-weighted) - the window's midline estimate, so the halves do not
  depend on where the head sits in the padded window;
* per class and per half (patient left: columns right of the brain centroid, a soft gate
  8 mm wide; patient right: the rest): log(1 + lesion area in 4 mm pixels), the lesion's
  centroid relative to the brain centroid (rows, and |columns|; units of 64 mm) and its peak
  probability;
* the encoder tokens weighted by the lesion probability, pooled separately per half, and the
  plain mean token (anatomy level, contrast);

standardised (training means and deviations, stored as buffers) and mapped by a two-layer MLP
to ``align_dim`` values. The window vectors are *not* unit length: the runner's
:class:`inference.runner.EmbeddingPool` averages them over the series weighted by brain
probability and then normalises, so a lesion's windows move the series vector by their number
and strength.

Training (:func:`train_head`, the ``train embed`` command, :func:`embed_run`): on the frozen
model's window features of *training* cases (:func:`training_cases`: held-out-layout cases of
set 0, the set ``train align-text`` uses; never the retrieval sets 1 and 2), computed once and
cached; loss: supervised contrastive over series embeddings (every case with the same report
facts, :func:`inference.omnimri.retrieval.fact_key`, is a positive; all normal cases share one),
plus linear probes of kind, side and size on the series vector, so that equal facts are close
whatever the contrast.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.nn import functional as F

N_LESION_CLASSES = 3
"""Lesion classes read (the lesion head's channels 1-3: WM hyperintensity, mass, oedema)."""

POOL = 2
"""Probabilities are averaged over ``POOL x POOL`` pixels (2 mm grid: 4 mm) before use."""

SIDE_GATE_PX = 2.0
"""Width of the soft left/right gate, pooled pixels (4 mm): ``sigmoid(dx / 2 px)``."""

POSITION_SCALE_PX = 16.0
"""Unit of the lesion centroid offsets, pooled pixels (64 mm)."""

HANDCRAFTED = 4 * N_LESION_CLASSES * 2 + 1
"""Scalar features: 4 per lesion class and half, plus the brain area."""


def feature_width(embed_dim: int) -> int:
    """Width of :meth:`FindingsHead.features` for an encoder of ``embed_dim`` channels."""
    return 3 * embed_dim + HANDCRAFTED


class FindingsHead(nn.Module):
    """Window embedding from frozen tokens and tissue/lesion logits (see the module).

    Parameters
    ----------
    embed_dim
        Token channels of the encoder (``OmniMRIConfig.embed_dim``).
    out_dim
        Embedding width (``OmniMRIConfig.align_dim``).
    hidden
        Width of the MLP's hidden layer.
    """

    mu: Tensor
    sd: Tensor

    def __init__(self, embed_dim: int, out_dim: int, hidden: int = 128) -> None:
        super().__init__()
        width = feature_width(embed_dim)
        self.register_buffer("mu", torch.zeros(width))
        self.register_buffer("sd", torch.ones(width))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    @staticmethod
    def reduce(tokens: Tensor, tissue: Tensor, lesion: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the head reads: ``(tokens, brain [N,1,h,w], lesion classes [N,3,h,w])``.

        ``tissue`` and ``lesion`` are the heads' logits ``[N, 4, H, W]``; the probabilities are
        averaged over :data:`POOL` pixels (``h = H / POOL``).
        """
        brain = 1.0 - tissue.softmax(1)[:, :1]
        les = lesion.softmax(1)[:, 1 : 1 + N_LESION_CLASSES]
        return tokens, F.avg_pool2d(brain, POOL), F.avg_pool2d(les, POOL)

    @staticmethod
    def features(tokens: Tensor, brain: Tensor, les: Tensor) -> Tensor:
        """Per-window features ``[N, feature_width(D)]`` of :meth:`reduce`'s outputs."""
        n, _, h, w = brain.shape
        ys = torch.arange(h, dtype=brain.dtype, device=brain.device).view(1, 1, h, 1)
        xs = torch.arange(w, dtype=brain.dtype, device=brain.device).view(1, 1, 1, w)
        mass = brain.sum((2, 3), keepdim=True)
        cy = (brain * ys).sum((2, 3), keepdim=True) / (mass + 1.0)
        cx = (brain * xs).sum((2, 3), keepdim=True) / (mass + 1.0)
        dy = (ys - cy) / POSITION_SCALE_PX
        dx = (xs - cx) / POSITION_SCALE_PX
        left = torch.sigmoid((xs - cx) / SIDE_GATE_PX)  # +columns: patient left (LPS)
        scal = []
        for gate in (left, 1.0 - left):
            g = les * gate  # [N, 3, h, w]
            area = g.sum((2, 3))
            scal += [torch.log1p(area),
                     (g * dy).sum((2, 3)) / (area + 1.0),
                     (g * dx.abs()).sum((2, 3)) / (area + 1.0),
                     g.amax((2, 3))]
        scal.append(torch.log1p(mass.flatten(1)))
        # tokens weighted by any-lesion probability on the token grid, per half
        th, tw = tokens.shape[2], tokens.shape[3]
        f = h // th
        a = F.avg_pool2d(les.sum(1, keepdim=True), f)  # [N, 1, th, tw]
        txs = (torch.arange(tw, dtype=brain.dtype, device=brain.device).view(1, 1, 1, tw)
               + 0.5) * f - 0.5
        tleft = torch.sigmoid((txs - cx) / SIDE_GATE_PX)
        pooled = [tokens.mean((2, 3))]
        for gate in (tleft, 1.0 - tleft):
            wgt = a * gate
            pooled.append((tokens * wgt).sum((2, 3)) / (wgt.sum((2, 3)) + 1.0))
        return torch.cat([*pooled, *scal], 1)

    def embed(self, feats: Tensor) -> Tensor:
        """The window vectors ``[N, out_dim]`` of :meth:`features` (not unit length)."""
        out: Tensor = self.mlp((feats - self.mu) / self.sd)
        return out

    def forward(self, tokens: Tensor, tissue: Tensor, lesion: Tensor) -> Tensor:
        """Window embeddings ``[N, out_dim]`` from tokens and the tissue/lesion logits."""
        return self.embed(self.features(*self.reduce(tokens, tissue, lesion)))


def head_for_state(state: dict[str, Tensor], prefix: str, embed_dim: int,
                   out_dim: int) -> FindingsHead | None:
    """A :class:`FindingsHead` shaped for the ``prefix*`` tensors of ``state``, or ``None``."""
    key = f"{prefix}mlp.0.weight"
    if key not in state:
        return None
    return FindingsHead(embed_dim, out_dim, hidden=int(state[key].shape[0]))


# --------------------------------------------------------------------------- window features


@dataclass
class CaseFeatures:
    """One case's frozen window features (what :meth:`FindingsHead.reduce` returns, float16).

    ``weights`` are the runner's per-window pooling weights (mean brain probability,
    :meth:`inference.runner.EmbeddingPool.weights`).
    """

    tokens: npt.NDArray[np.float16]
    brain: npt.NDArray[np.float16]
    lesion: npt.NDArray[np.float16]
    weights: npt.NDArray[np.float64]
    key: tuple[tuple[str, str], ...]
    contrast: str


def case_windows(model: Any, spec: Any, case: Any, batch: int = 8) -> CaseFeatures:
    """The frozen window features of a synthetic ``case``, windowed as a node job windows it.

    ``model`` is the :class:`~inference.omnimri.model.OmniMRI`, ``spec`` the package's
    :class:`inference.package.ModelSpec` (input settings and ``embedding`` output): the case
    volume (:func:`inference.omnimri.evaluate.case_volume`) is prepared, padded, windowed and
    batched by the runner's own functions, so these are the windows the served graph sees.
    """
    from inference.omnimri import retrieval as rv
    from inference.omnimri.evaluate import case_volume
    from inference.preprocess import batches, extract_batch, windowed
    from inference.runner import EmbeddingPool

    vol = case_volume(case)
    win = windowed(vol.array, vol.affine, spec.input)
    pool = EmbeddingPool(spec.output("embedding"), spec.input.context_slices)
    toks, brains, less, wts = [], [], [], []
    model.eval()
    with torch.no_grad():
        for group in batches(win.windows, batch):
            x = extract_batch(win.padded, group, spec.input)
            feats = model.encoder(torch.from_numpy(np.asarray(x, np.float32)))
            seg = model.seg(feats)
            tissue = seg[:, : model.cfg.n_tissue]
            t, b, q = FindingsHead.reduce(feats[3], tissue, seg[:, model.cfg.n_tissue :])
            toks.append(t.numpy().astype(np.float16))
            brains.append(b.numpy().astype(np.float16))
            less.append(q.numpy().astype(np.float16))
            wts.append(pool.weights(x, {"tissue": tissue.numpy()}))
    return CaseFeatures(np.concatenate(toks), np.concatenate(brains), np.concatenate(less),
                        np.concatenate(wts), rv.fact_key(case), case.contrast)


def training_cases(n: int) -> list[tuple[str, Callable[[], Any]]]:
    """The head's ``n`` training cases: those of ``train align-text`` (set 0, held-out layout)."""
    from inference.omnimri.language.align import training_cases as align_cases

    return align_cases(n)


def cached_features(model: Any, spec: Any, cases: Sequence[tuple[str, Callable[[], Any]]],
                    cache: Path | None,
                    progress: Callable[[str], None] | None = None) -> list[CaseFeatures]:
    """:func:`case_windows` of each ``(name, make)`` case; stored as ``<cache>/<name>.npz``."""
    say = progress or (lambda m: None)
    out = []
    t0 = time.perf_counter()
    for n, (name, make) in enumerate(cases):
        path = cache / f"{name}.npz" if cache is not None else None
        if path is not None and path.is_file():
            d = np.load(path)
            meta = json.loads(str(d["meta"]))
            out.append(CaseFeatures(d["tokens"], d["brain"], d["lesion"], d["weights"],
                                    tuple(tuple(x) for x in meta["key"]), meta["contrast"]))
            continue
        cf = case_windows(model, spec, make())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, tokens=cf.tokens, brain=cf.brain, lesion=cf.lesion, weights=cf.weights,
                     meta=json.dumps({"key": cf.key, "contrast": cf.contrast}))
            tmp.replace(path)
        out.append(cf)
        if (n + 1) % 10 == 0:
            say(f"window features: {n + 1}/{len(cases)} ({time.perf_counter() - t0:.0f} s)")
    return out


# --------------------------------------------------------------------------- training


@dataclass
class EmbedSettings:
    """Hyper-parameters of :func:`train_head` (defaults: about a minute on one core)."""

    seed: int = 0
    train_cases: int = 120
    """Training cases (:func:`training_cases`)."""
    hidden: int = 128
    steps: int = 600
    batch: int = 48
    """Cases per step."""
    lr: float = 2e-3
    weight_decay: float = 1e-3
    temperature: float = 0.1
    probe_weight: float = 0.5
    """Weight of the kind/side/size probe losses beside the contrastive loss."""


PROBE_FACTS = ("kind", "side", "size")
"""Report facts with a linear probe on the series embedding during training."""


def series_embeddings(head: FindingsHead, feats: Sequence[Tensor],
                      weights: Sequence[Tensor]) -> Tensor:
    """Unit series vectors ``[B, out_dim]``: the runner's brain-weighted mean, normalised."""
    rows = []
    for f, w in zip(feats, weights, strict=True):
        v = head.embed(f)
        rows.append((w[:, None] * v).sum(0) / w.sum().clamp(min=1e-9))
    return F.normalize(torch.stack(rows), dim=1)


def _sup_con(z: Tensor, kid: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) with every same-key case positive."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    eye = torch.eye(n, dtype=torch.bool)
    logits = logits.masked_fill(eye, -1e9)
    pos = (kid[:, None] == kid[None, :]) & ~eye
    logp = logits.log_softmax(1)
    has = pos.any(1)
    if not bool(has.any()):
        return logits.new_zeros(())
    per = -(logp * pos).sum(1)[has] / pos.sum(1)[has]
    return per.mean()


def train_head(data: Sequence[CaseFeatures], embed_dim: int, out_dim: int, s: EmbedSettings,
               progress: Callable[[str], None] | None = None) -> FindingsHead:
    """Train a :class:`FindingsHead` on cached window features (see the module)."""
    say = progress or (lambda m: None)
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    head = FindingsHead(embed_dim, out_dim, s.hidden)
    with torch.no_grad():
        feats = [head.features(torch.from_numpy(d.tokens.astype(np.float32)),
                               torch.from_numpy(d.brain.astype(np.float32)),
                               torch.from_numpy(d.lesion.astype(np.float32))) for d in data]
        weights = [torch.from_numpy(d.weights.astype(np.float32)) for d in data]
        allw = torch.cat(weights)
        allf = torch.cat(feats)
        mu = (allw[:, None] * allf).sum(0) / allw.sum()
        sd = ((allw[:, None] * (allf - mu) ** 2).sum(0) / allw.sum()).sqrt().clamp(min=1e-3)
        head.mu.copy_(mu)
        head.sd.copy_(sd)
    keys = [d.key for d in data]
    key_ids = {k: n for n, k in enumerate(sorted(set(keys)))}
    kid = torch.tensor([key_ids[k] for k in keys])
    labels = {f: sorted({dict(k)[f] for k in keys}) for f in PROBE_FACTS}
    ytrue = {f: torch.tensor([labels[f].index(dict(k)[f]) for k in keys]) for f in PROBE_FACTS}
    probes = nn.ModuleDict({f: nn.Linear(out_dim, len(labels[f])) for f in PROBE_FACTS})
    params = [*head.parameters(), *probes.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps,
                                                pct_start=0.1)
    n = len(data)
    for step in range(1, s.steps + 1):
        idx = torch.randperm(n, generator=gen)[: min(s.batch, n)].tolist()
        z = series_embeddings(head, [feats[i] for i in idx], [weights[i] for i in idx])
        loss = _sup_con(z, kid[idx], s.temperature)
        for f in PROBE_FACTS:
            loss = loss + s.probe_weight * F.cross_entropy(probes[f](z) / s.temperature,
                                                           ytrue[f][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == s.steps:
            say(f"embed step {step}/{s.steps} loss {loss.item():.4f}")
    return head.eval()


def training_fit(head: FindingsHead, data: Sequence[CaseFeatures]) -> dict[str, float]:
    """Recall@1 (image -> image, leave-one-out: the nearest *other* case has equal facts)."""
    with torch.no_grad():
        z = series_embeddings(
            head, [head.features(torch.from_numpy(d.tokens.astype(np.float32)),
                                 torch.from_numpy(d.brain.astype(np.float32)),
                                 torch.from_numpy(d.lesion.astype(np.float32))) for d in data],
            [torch.from_numpy(d.weights.astype(np.float32)) for d in data]).numpy()
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    nn_ = sim.argmax(1)
    keys = [d.key for d in data]
    kinds = [dict(k)["kind"] for k in keys]
    return {"nearest_same_facts": float(np.mean([keys[j] == keys[i]
                                                 for i, j in enumerate(nn_)])),
            "nearest_same_kind": float(np.mean([kinds[j] == kinds[i]
                                                for i, j in enumerate(nn_)]))}


# --------------------------------------------------------------------------- the command


EMBED_STAGE = "embed"
"""Checkpoint ``train embed`` writes (``<run>/embed.pt``): ``train export --stage embed``."""


def features_key(vision: nn.Module) -> str:
    """Names the frozen vision weights the window features come from (the feature cache key).

    A digest of every vision tensor except the head's (``findings.*``).
    """
    state = {k: v for k, v in vision.state_dict().items() if not k.startswith("findings.")}
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def embed_run(run: Path, source: str = "soup", s: EmbedSettings | None = None, *,
              cache: Path | None = None,
              progress: Callable[[str], None] | None = None) -> Path:
    """``train embed``: a :class:`FindingsHead` on ``<run>/<source>.pt``'s frozen vision model.

    Computes (or reads from ``cache``, a folder keyed by the vision weights) the window
    features of the training cases, trains the head, and writes ``<run>/embed.pt`` - the source
    checkpoint with the head added to its vision model, every other tensor the same - and
    ``embed.done`` (settings, seconds, training fit). ``train export --run RUN --stage embed``
    exports it. Returns the checkpoint path.

    Raises:
        FileNotFoundError: ``<run>/<source>.pt`` does not exist.
    """
    from inference.omnimri.export import model_spec
    from inference.omnimri.train import load_stage
    from inference.package import ModelSpec

    s = s or EmbedSettings()
    say = progress or (lambda m: None)
    src = run / f"{source}.pt"
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no checkpoint (run 'omnimri-node train all' or "
                                "'train soup' first)")
    torch.set_num_threads(1)
    mods, st = load_stage(run, source)
    vision = mods.vision
    vision.findings = None  # the frozen features do not depend on an earlier head
    spec = ModelSpec.model_validate(model_spec(vision, "embed-features", "0.0.0"))
    t0 = time.perf_counter()
    sub = cache / features_key(vision) if cache is not None else None
    data = cached_features(vision, spec, training_cases(s.train_cases), sub, say)
    feat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = train_head(data, vision.cfg.embed_dim, vision.cfg.align_dim, s, say)
    train_s = time.perf_counter() - t0
    fit = training_fit(head, data)
    say(f"training cases: nearest other case has the same facts {fit['nearest_same_facts']:.3f}"
        f", same kind {fit['nearest_same_kind']:.3f}")
    vision.findings = head
    out = dict(st)
    out["stage"] = EMBED_STAGE
    out["embed_of"] = source
    out["modules"] = {**st["modules"], "vision": vision.state_dict()}
    ck = run / f"{EMBED_STAGE}.pt"
    tmp = ck.with_suffix(".pt.tmp")
    torch.save(out, tmp)
    tmp.replace(ck)
    (run / f"{EMBED_STAGE}.done").write_text(json.dumps({
        "of": source, "settings": asdict(s), "feature_seconds": round(feat_s, 1),
        "train_seconds": round(train_s, 1), "training_cases": len(data),
        "training_fit": {k: round(v, 4) for k, v in fit.items()}}, indent=1))
    return ck
