"""The OmniMRI training stages, each resumable from its checkpoint.

1. ``pretrain``   - self-supervised vision pretraining: masked-patch (SimMIM-style) image
   reconstruction of randomly masked 16 mm tokens; no labels.
2. ``align``      - vision-language alignment: contrastive (InfoNCE) loss between the image
   embedding of a case (mean over its slices) and a text embedding of its report.
3. ``multimodal`` - multimodal pretraining: all dense heads (tissue, lesion, reconstruction),
   the diagnosis head and the grounded report decoder trained jointly.
4. ``instruct``   - multi-task instruction tuning: each step samples one instruction and trains
   the heads that instruction runs, at a lower learning rate, with abnormal slices oversampled.
5. ``finetune``   - task-focused fine-tuning of the reading heads (tissue, lesion, diagnosis)
   every step, lesion slices oversampled further and a lighter false-lesion term, the report
   decoder and reconstruction kept on a few steps so they do not forget.
6. ``refine``     - ``finetune``'s step at a lower learning rate on new data: lesion centres drawn
   anywhere (the earlier stages keep to the training layout's cells, and the model had learned
   them) and in-plane voxels up to 5 mm (clinical T2/FLAIR heads are 4-5 mm in-plane).
7. ``refine2``    - a second cosine cycle of ``refine`` from its checkpoint (the cyclic schedule
   of stochastic weight averaging) on new data that adds neck and face soft tissue of grey- and
   white-matter-like intensity (``make_case(neck="textured")``: Colin27, a real head with
   skull, read its neck as brain).
8. ``refine3``    - a third cycle from ``refine2`` on heads tilted up to 35 degrees (pitch; roll
   and yaw a third of it: oblique series, dipy's ``aniso_vox``) and, in 30 % of the cases,
   fat-suppressed (EPI and fat-saturated series: dark scalp and marrow).

Each stage reads the previous stage's checkpoint, saves ``<out>/<stage>.pt`` every
``save_every`` steps (model, optimiser, data-pool seeds, step) and writes ``<out>/<stage>.done``
when finished, so a killed run resumes where it stopped. ``train_all(seed)`` runs the
stages in order with the shipped step counts, then :func:`make_soup`: the shipped weights are
the uniform average of the ``finetune``, ``refine``, ``refine2`` and ``refine3`` checkpoints
(``soup.pt``; a "model soup", Wortsman et al., ICML 2022; with the cycle ends of one run,
stochastic weight averaging, Izmailov et al., UAI 2018), measured better on held-out and real
MR than the checkpoints alone (model card).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
from torch import Tensor
from torch.nn import functional as F

from inference.omnimri import report_text as rt
from inference.omnimri import synthetic as syn
from inference.omnimri.config import OmniMRIConfig, preset
from inference.omnimri.model import OmniMRI, ReportDecoder, TextEncoder

log = structlog.get_logger(__name__)

STAGES = ("pretrain", "align", "multimodal", "instruct", "finetune", "refine", "refine2",
          "refine3")

DEFAULT_STEPS: dict[str, int] = {"pretrain": 150, "align": 80, "multimodal": 3000,
                                 "instruct": 2500, "finetune": 7000, "refine": 6000,
                                 "refine2": 6000, "refine3": 4500}
"""Steps of the shipped ``tiny`` run (batch 12 crops of 96x96 pixels), head synthesis
included: about 90 minutes of one CPU core shared with other work (v3.2.0: 48 + 13 + 1 267 +
756 + 3 254 s); ``finetune`` alone is 0.43 s per step."""

SEG_HEADS = frozenset({"tissue", "lesion", "diagnosis"})
"""Heads trained from one forward pass of the image (one shared segmentation decoder)."""
STRIP_STAGES = frozenset({"instruct", "finetune", "refine", "refine2", "refine3"})
"""Stages whose pools hold skull-stripped cases (:attr:`TrainSettings.strip_fraction`)."""
STAGE_SYNTHESIS: dict[str, dict[str, Any]] = {
    "refine": {"layout": "anywhere", "max_in_plane_mm": 5.0},
    "refine2": {"layout": "anywhere", "max_in_plane_mm": 5.0, "neck": "textured"},
    "refine3": {"layout": "anywhere", "max_in_plane_mm": 5.0, "neck": "textured",
                "tilt_deg": 35.0, "fat_sat": 0.3}}
"""Per-stage :func:`inference.omnimri.synthetic.make_case` options (the other stages: its
defaults, the training layout, 2-3 mm in-plane, the fat/muscle marble neck). ``refine2``, a
second cosine cycle from ``refine``, adds neck and face soft tissue of brain-like intensity
(Colin27 with skull, a real head: the neck below the cerebellum read as brain). ``refine3``, a
third cycle, adds heads tilted up to 35 degrees (oblique series: dipy's ``aniso_vox``) and
fat-suppressed contrasts (EPI, fat-saturated series)."""


@dataclass
class TrainSettings:
    """Settings shared by the stages."""

    size: str = "tiny"
    seed: int = 0
    out: Path = Path("training-runs/omnimri-tiny")
    batch: int = 12
    crop: int = 96
    """Training crop (pixels, multiple of 8, at most ``patch_size``); inference uses the patch."""
    pool_cases: int = 24
    """Cases held in memory; ``refresh_cases`` of them are regenerated every ``refresh_every``."""
    refresh_cases: int = 1
    refresh_every: int = 40
    """Steps between pool refreshes (a head case costs ~1.4 s of one core to generate)."""
    strip_fraction: float = 0.3
    """Share of brain-extracted (skull-stripped) cases in the ``instruct`` stage's pool, so the
    model reads brains without a head around them too (the earlier stages see heads only)."""
    hard_fraction: float = 0.5
    """Share of a normal case's non-lesion slices drawn from its hard negatives (slices through
    ventricles, deep grey matter, basal cisterns: what a model mistakes for a mass)."""
    save_every: int = 100
    threads: int = 1
    """Torch CPU threads. One: on a shared 2-core machine two OpenMP threads spin-wait on each
    other (3.5 s per multimodal step measured vs ~0.5 s with one). The thread count can change
    floating-point results, so a bit-for-bit rerun must use the same count."""
    bf16: bool = True
    """bfloat16 autocast on the CPU (fp32 master weights): ~2.5x faster steps on CPUs with
    AVX512-BF16/AMX; the exported model is float32 either way."""
    device: str = "cpu"
    """``cpu`` (the shipped recipe) or ``cuda`` (``scripts/train_gpu.sh``)."""
    workers: int = 0
    """Processes generating pool cases ahead of time (0: in the training process). Cases depend
    only on their seeds, so the data, and the weights, do not depend on this."""
    cfg_overrides: dict[str, Any] | None = None

    def config(self) -> OmniMRIConfig:
        """The architecture for :attr:`size`."""
        return preset(self.size, **(self.cfg_overrides or {}))


# --------------------------------------------------------------------------- data


@dataclass
class PoolCase:
    """A generated case prepared for slice sampling."""

    image: npt.NDArray[np.float32]
    zero_filled: npt.NDArray[np.float32]
    tissue: npt.NDArray[np.int64]
    lesion: npt.NDArray[np.int64]
    diagnosis: int
    report_tokens: npt.NDArray[np.int64]
    facts: dict[str, str]
    brain_slices: npt.NDArray[np.int_]
    lesion_slices: npt.NDArray[np.int_]
    hard_slices: npt.NDArray[np.int_]


def prepare_case(case: syn.Case, max_tokens: int, kspace_seed: int) -> PoolCase:
    """Normalise a case (the served normalisation) and add its 4x zero-filled reconstruction."""
    img = syn.normalise(case.image)
    zf = syn.zero_filled(img, 4, seed=kspace_seed)
    brain = np.flatnonzero((case.tissue > 0).any(axis=(1, 2)))
    les = np.flatnonzero(((case.lesion == 1) | (case.lesion == 2)).any(axis=(1, 2)))
    facts = syn.facts_from_lesions(syn.DIAGNOSES[case.diagnosis], case.lesions)
    return PoolCase(
        image=img, zero_filled=zf, tissue=case.tissue.astype(np.int64),
        lesion=case.lesion.astype(np.int64), diagnosis=case.diagnosis,
        report_tokens=rt.encode(case.report, max_tokens), facts=facts, brain_slices=brain,
        lesion_slices=les, hard_slices=np.asarray(case.hard_slices, np.int_),
    )


class CasePool:
    """A rolling pool of synthetic training cases (deterministic from seed and step).

    Case ``n`` of a stage has seed ``base + n``: the first ``pool_cases`` fill slots
    ``0 .. pool_cases - 1``, then ``refresh_cases`` new ones every ``refresh_every`` steps, case
    ``n`` into slot ``(n + 1) % pool_cases`` (see :meth:`slot`). ``start_step`` rebuilds the
    pool exactly as an uninterrupted run has it when that step begins (resumed runs see the
    same data).
    """

    def __init__(self, s: TrainSettings, stage_index: int, max_tokens: int,
                 start_step: int = 0) -> None:
        self.s = s
        self.base = (s.seed + 1) * 1_000_000 + stage_index * 100_000
        self.max_tokens = max_tokens
        self.strip = s.strip_fraction if STAGES[stage_index] in STRIP_STAGES else 0.0
        self.synthesis = STAGE_SYNTHESIS.get(STAGES[stage_index], {})
        n = s.pool_cases
        # pool.step(k) has run for k < start_step; each refresh issued refresh_cases ids.
        issued = n + (max(start_step - 1, 0) // s.refresh_every) * s.refresh_cases
        holds = list(range(n))
        for case_id in range(n, issued):
            holds[self.slot(case_id)] = case_id
        self._ahead: dict[int, Any] = {}
        self._exec: Any = None
        if s.workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._exec = ProcessPoolExecutor(s.workers, mp_context=mp.get_context("spawn"))
            for i in holds:
                self._ahead[i] = self._exec.submit(_make_pool_case, self.base, i, max_tokens,
                                                   self.strip, self.synthesis)
        self.cases: list[PoolCase] = [self._make_id(i) for i in holds]
        self.next_id = issued
        self._prefetch()

    def _prefetch(self) -> None:
        if self._exec is None:
            return
        for i in range(self.next_id, self.next_id + 2 * self.s.workers):
            if i not in self._ahead:
                self._ahead[i] = self._exec.submit(_make_pool_case, self.base, i,
                                                   self.max_tokens, self.strip, self.synthesis)

    def close(self) -> None:
        """Stop the case-generating processes (if any)."""
        if self._exec is not None:
            self._exec.shutdown(wait=False, cancel_futures=True)
            self._exec = None

    def slot(self, case_id: int) -> int:
        """The pool slot of case ``case_id`` (the shipped run's order, kept for reproduction)."""
        n = self.s.pool_cases
        return case_id if case_id < n else (case_id + 1) % n

    def _make_id(self, n: int) -> PoolCase:
        fut = self._ahead.pop(n, None)
        if fut is not None:
            out: PoolCase = fut.result()
            return out
        return _make_pool_case(self.base, n, self.max_tokens, self.strip, self.synthesis)

    def _make(self) -> PoolCase:
        case = self._make_id(self.next_id)
        self.next_id += 1
        self._prefetch()
        return case

    def step(self, step: int) -> None:
        """Regenerate a few cases every ``refresh_every`` steps."""
        if step > 0 and step % self.s.refresh_every == 0:
            for _ in range(self.s.refresh_cases):
                where = self.slot(self.next_id)
                self.cases[where] = self._make()


def _make_pool_case(base: int, n: int, max_tokens: int, strip: float = 0.0,
                    synthesis: dict[str, Any] | None = None) -> PoolCase:
    """Case ``n`` of a pool whose seeds start at ``base`` (class-balanced: diagnoses cycle).

    ``synthesis``: extra :func:`inference.omnimri.synthetic.make_case` options.
    """
    seed = base + n
    case = syn.make_case(seed, diagnosis=n % 3, strip=strip, **(synthesis or {}))
    return prepare_case(case, max_tokens, kspace_seed=seed)


def _stack(vol: npt.NDArray[np.float32], k: int, c: int) -> npt.NDArray[np.float32]:
    idx = np.clip(np.arange(k - c, k + c + 1), 0, vol.shape[0] - 1)
    out: npt.NDArray[np.float32] = vol[idx]
    return out


def _pad(a: npt.NDArray[Any], size: int, oj: int, oi: int) -> npt.NDArray[Any]:
    out = np.zeros((*a.shape[:-2], size, size), a.dtype)
    h, w = a.shape[-2:]
    out[..., oj : oj + h, oi : oi + w] = a[..., : size - oj, : size - oi]
    return out


def sample_batch(
    pool: CasePool, rng: np.random.Generator, n: int, cfg: OmniMRIConfig,
    lesion_fraction: float = 0.5, cases: list[int] | None = None, flip: bool = False,
) -> dict[str, Tensor]:
    """A batch of 2.5D slice stacks with every target, padded to ``patch_size`` squares.

    ``flip``: mirror each slice left-right (image and labels together) with probability 1/2,
    so lesions are seen on both sides of every structure rather than only where the training
    lesion layout puts them (a random draw only when set: the other stages' streams are kept).
    """
    c, size = cfg.context_slices, cfg.patch_size
    xs, zs, ts, ls, ds, rs, ns = [], [], [], [], [], [], []
    for b in range(n):
        ci = cases[b] if cases is not None else int(rng.integers(len(pool.cases)))
        pc = pool.cases[ci]
        u = rng.random()
        if len(pc.lesion_slices) and u < lesion_fraction:
            k = int(rng.choice(pc.lesion_slices))
        elif u > 0.9:  # slices without brain (the model must leave them empty)
            empty = np.setdiff1d(np.arange(pc.image.shape[0]), pc.brain_slices)
            k = int(rng.choice(empty)) if len(empty) else int(rng.integers(pc.image.shape[0]))
        elif (pc.diagnosis == 0 and len(pc.hard_slices)
              and rng.random() < pool.s.hard_fraction):  # hard negatives
            k = int(rng.choice(pc.hard_slices))
        else:
            k = int(rng.choice(pc.brain_slices))
        h, w = pc.image.shape[1:]
        oj = int(rng.integers(0, max(size - h, 0) + 1))
        oi = int(rng.integers(0, max(size - w, 0) + 1))
        lr = flip and bool(rng.random() < 0.5)

        def mirror(a: npt.NDArray[Any], lr: bool = lr) -> npt.NDArray[Any]:
            return np.ascontiguousarray(a[..., ::-1]) if lr else a

        xs.append(_pad(mirror(_stack(pc.image, k, c)), size, oj, oi))
        zs.append(_pad(mirror(_stack(pc.zero_filled, k, c)), size, oj, oi))
        ts.append(_pad(mirror(pc.tissue[k]), size, oj, oi))
        ls.append(_pad(mirror(pc.lesion[k]), size, oj, oi))
        ctx = pc.lesion[max(k - c, 0) : k + c + 1]
        ds.append(2 if (ctx == 2).any() else 1 if (ctx == 1).any() else 0)
        rs.append(ci)
        ns.append(pc.diagnosis == 0)
    crop = pool.s.crop
    a = b = 0
    if crop < size:
        a, b = (int(v) for v in rng.integers(0, (size - crop) // 8 + 1, 2))
        cut = (slice(None), slice(a * 8, a * 8 + crop), slice(b * 8, b * 8 + crop))
        xs = [x[cut] for x in xs]
        zs = [z[cut] for z in zs]
        ts = [t[cut[1:]] for t in ts]
        ls = [t[cut[1:]] for t in ls]
    dev = pool.s.device
    return {
        "crop_at": torch.tensor([a, b]),
        "image": torch.from_numpy(np.stack(xs)).to(dev),
        "zero_filled": torch.from_numpy(np.stack(zs)).to(dev),
        "tissue": torch.from_numpy(np.stack(ts)).to(dev),
        "lesion": torch.from_numpy(np.stack(ls)).to(dev),
        "diagnosis": torch.tensor(ds).to(dev),
        "case": torch.tensor(rs),
        "normal": torch.tensor(ns, dtype=torch.float32).to(dev),
    }


# --------------------------------------------------------------------------- losses


def dice_loss(logits: Tensor, target: Tensor, classes: list[int]) -> Tensor:
    """Soft Dice loss (batch-pooled) averaged over those ``classes`` present in ``target``.

    A class absent from the batch is left out: its Dice term would be ``1 - 1/(sum p + 1)``,
    whose gradient pushes the class's probability down everywhere with a weight of ~1 per
    voxel. For small, rare classes (white-matter hyperintensities) that suppression beat every
    positive signal and the class never appeared (the first clean run: P(WMH) < 0.001 on every
    voxel, even on FLAIR).
    """
    p = logits.softmax(1)
    losses = []
    for k in classes:
        tk = (target == k).float()
        if not bool(tk.any()):
            continue
        pk = p[:, k]
        inter = (pk * tk).sum()
        losses.append(1 - (2 * inter + 1) / (pk.sum() + tk.sum() + 1))
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0


LESION_WEIGHTS = torch.tensor([1.0, 20.0, 3.0, 2.0])
"""Cross-entropy weights: none, WMH (about 0.04 % of training voxels), mass, oedema."""
DIAG_WEIGHTS = torch.tensor([1.0, 2.0, 2.0])


FALSE_LESION_WEIGHT = 2.0
"""Weight of :func:`false_lesion_loss` in the lesion loss."""
FALSE_LESION_TOP = 32
"""Pixels per slice whose lesion probability :func:`false_lesion_loss` penalises."""


def false_lesion_loss(lesion_logits: Tensor, b: dict[str, Tensor]) -> Tensor:
    """Mean of the ``FALSE_LESION_TOP`` highest P(WMH) + P(mass) on slices without a lesion.

    A small confident false component is what turns a normal case into "mass"; cross-entropy
    averaged over ~10^4 pixels barely sees it, the top-k mean does. Slices of normal cases
    weigh twice (their hard negatives: ventricles, deep grey matter, cisterns).
    """
    p = lesion_logits.softmax(1)
    pl = (p[:, 1] + p[:, 2]).flatten(1)
    top = pl.topk(min(FALSE_LESION_TOP, pl.shape[1]), dim=1).values.mean(1)
    clean = (b["lesion"].flatten(1).amax(1) == 0).float()
    w = clean * (1.0 + b["normal"])
    return (top * w).sum() / w.sum().clamp(min=1.0)


def seg_losses(out: dict[str, Tensor], b: dict[str, Tensor],
               false_lesion_weight: float = FALSE_LESION_WEIGHT) -> dict[str, Tensor]:
    """Tissue, lesion and slice diagnosis losses.

    Tissue and lesion: cross-entropy + Dice; lesion also :func:`false_lesion_loss` at
    ``false_lesion_weight``.

    Logits are cast to float32 first (the forward pass may run under bfloat16 autocast).
    """
    tissue, lesion = out["tissue"].float(), out["lesion"].float()
    return {
        "tissue": F.cross_entropy(tissue, b["tissue"])
        + dice_loss(tissue, b["tissue"], [0, 1, 2, 3]),
        "lesion": F.cross_entropy(lesion, b["lesion"], weight=LESION_WEIGHTS.to(lesion.device))
        + dice_loss(lesion, b["lesion"], [1, 2, 3])
        + false_lesion_weight * false_lesion_loss(lesion, b),
        "diagnosis": F.cross_entropy(out["diagnosis"].float(), b["diagnosis"],
                                     weight=DIAG_WEIGHTS.to(lesion.device)),
    }


def _ca(b: dict[str, Tensor]) -> tuple[int, int]:
    return int(b["crop_at"][0]), int(b["crop_at"][1])


def recon_loss(model: OmniMRI, b: dict[str, Tensor]) -> Tensor:
    """L1 between the reconstruction of the zero-filled input and the full image."""
    c = model.cfg.context_slices
    out = model(b["zero_filled"], crop_at=_ca(b), heads=frozenset({"recon"}))
    return F.l1_loss(out["recon"].float(), b["image"][:, c : c + 1])


def random_facts(rng: np.random.Generator) -> dict[str, str]:
    """A random but well-formed fact set (teaches the decoder every combination)."""
    kind = str(rng.choice(syn.DIAGNOSES))
    if kind == "normal":
        return {"kind": "normal", "count": "none", "side": "none", "lobe": "none", "size": "0"}
    if kind == "mass":
        count = str(rng.choice(rt.SLOTS["count"][1:], p=[0.6, 0.25, 0.15]))
    else:
        count = str(rng.choice(rt.SLOTS["count"][1:]))
    return {"kind": kind, "count": count, "side": str(rng.choice(rt.SLOTS["side"][1:])),
            "lobe": str(rng.choice(rt.SLOTS["lobe"][1:])),
            "size": str(rng.choice(rt.SLOTS["size"][1:]))}


def facts_batch(facts: list[dict[str, str]], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Memory ``[N, slots, F]`` and token ids ``[N, T]`` for a list of fact sets."""
    mem = np.stack([rt.facts_memory(f) for f in facts])
    toks = []
    for f in facts:
        fi, im = syn.write_report(f)
        toks.append(rt.encode(f"findings : {fi} impression : {im}", max_tokens))
    return torch.from_numpy(mem), torch.from_numpy(np.stack(toks))


def decoder_loss(dec: ReportDecoder, mem: Tensor, tokens: Tensor) -> Tensor:
    """Teacher-forced next-token cross-entropy (PAD ignored)."""
    dev = dec.out.weight.device
    mem, tokens = mem.to(dev), tokens.to(dev)
    logits = dec(mem, tokens[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                           ignore_index=0)


# --------------------------------------------------------------------------- stages


@dataclass
class Modules:
    """Everything trained (the text encoder is used by alignment only)."""

    vision: OmniMRI
    text: TextEncoder
    decoder: ReportDecoder

    def params(self) -> list[torch.nn.Parameter]:
        """All parameters."""
        return [*self.vision.parameters(), *self.text.parameters(), *self.decoder.parameters()]

    def state(self) -> dict[str, Any]:
        """State dicts."""
        return {"vision": self.vision.state_dict(), "text": self.text.state_dict(),
                "decoder": self.decoder.state_dict()}

    def load(self, st: dict[str, Any]) -> None:
        """Load state dicts."""
        self.vision.load_state_dict(st["vision"])
        self.text.load_state_dict(st["text"])
        self.decoder.load_state_dict(st["decoder"])


def weights_sha256(m: Modules) -> str:
    """SHA-256 over the shipped weights (vision model and report decoder, name-sorted).

    Recorded in ``model.yaml`` at export, so a rerun of ``train all`` can prove it reproduced
    the shipped model bit for bit.
    """
    import hashlib

    h = hashlib.sha256()
    for group, state in (("vision", m.vision.state_dict()), ("decoder", m.decoder.state_dict())):
        for name in sorted(state):
            h.update(f"{group}.{name}".encode())
            h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def build_modules(cfg: OmniMRIConfig, seed: int) -> Modules:
    """Fresh, seeded modules."""
    torch.manual_seed(seed)
    return Modules(OmniMRI(cfg), TextEncoder(cfg), ReportDecoder(cfg))


StepFn = Callable[[Modules, CasePool, np.random.Generator, int, int], dict[str, Tensor]]


def _step_pretrain(m: Modules, pool: CasePool, rng: np.random.Generator, step: int,
                   total: int) -> dict[str, Tensor]:
    cfg = m.vision.cfg
    b = sample_batch(pool, rng, pool.s.batch, cfg, lesion_fraction=0.3)
    g = b["image"].shape[-1] // 8
    tm = torch.from_numpy((rng.random((b["image"].shape[0], 1, g, g)) < 0.4).astype(
        np.float32)).to(b["image"].device)
    out = m.vision(b["image"], token_mask=tm, crop_at=_ca(b), heads=frozenset({"recon"}))
    c = cfg.context_slices
    target = b["image"][:, c : c + 1]
    pix = F.interpolate(tm, scale_factor=8.0, mode="nearest")
    err = (out["recon"].float() - target).abs()
    masked = (err * pix).sum() / pix.sum().clamp(min=1.0)
    return {"mim": masked + 0.1 * err.mean()}


def _step_align(m: Modules, pool: CasePool, rng: np.random.Generator, step: int,
                total: int) -> dict[str, Tensor]:
    cfg = m.vision.cfg
    per = 2
    n_cases = min(pool.s.batch // per, len(pool.cases))
    chosen = rng.choice(len(pool.cases), size=n_cases, replace=False)
    cases = [int(c) for c in chosen for _ in range(per)]
    b = sample_batch(pool, rng, len(cases), cfg, lesion_fraction=0.8, cases=cases)
    emb = m.vision(b["image"], crop_at=_ca(b), heads=frozenset({"embedding"}))["embedding"]
    emb = F.normalize(emb.float().reshape(n_cases, per, -1).mean(1), dim=1)
    toks = torch.from_numpy(np.stack([pool.cases[int(c)].report_tokens for c in chosen])).to(
        emb.device)
    txt = m.text(toks).float()
    logits = emb @ txt.T / 0.1
    same = (toks[:, None, :] == toks[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(
        0).mean()
    return {"contrastive": loss / 2}


RECON_WEIGHT = 10.0
"""Weight of the L1 reconstruction loss (its raw scale is ~1/20 of the segmentation losses)."""


def _step_multimodal(m: Modules, pool: CasePool, rng: np.random.Generator, step: int,
                     total: int) -> dict[str, Tensor]:
    cfg = m.vision.cfg
    b = sample_batch(pool, rng, pool.s.batch, cfg, lesion_fraction=0.5)
    losses = seg_losses(m.vision(b["image"], crop_at=_ca(b), heads=SEG_HEADS), b)
    if step % 3 == 0:
        rb = sample_batch(pool, rng, pool.s.batch // 2, cfg, lesion_fraction=0.2)
        losses["recon"] = RECON_WEIGHT * recon_loss(m.vision, rb)
    facts = [random_facts(rng) for _ in range(8)] + [
        pool.cases[int(rng.integers(len(pool.cases)))].facts for _ in range(8)]
    mem, toks = facts_batch(facts, cfg.max_tokens)
    losses["report"] = decoder_loss(m.decoder, mem, toks)
    return losses


INSTRUCTION_MIX = (("segment brain tissues", 0.25), ("detect abnormalities", 0.3),
                   ("suggest a diagnosis", 0.15), ("write the report", 0.05),
                   ("reconstruct", 0.25))
"""Instruction sampled per instruction-tuning step, with its probability."""

INSTRUCTION_WEIGHTS: dict[str, dict[str, float]] = {
    "segment brain tissues": {"tissue": 1.0, "lesion": 0.5, "diagnosis": 0.3},
    "detect abnormalities": {"tissue": 0.5, "lesion": 1.0, "diagnosis": 0.3},
    "suggest a diagnosis": {"tissue": 0.3, "lesion": 0.5, "diagnosis": 1.0},
    "write the report": {"tissue": 0.3, "lesion": 0.5, "diagnosis": 1.0},
}
"""Loss weights per image instruction: the instruction's own heads weigh most, and the others
(computed by the same forward pass anyway) keep learning, so no head forgets."""


def _step_instruct(m: Modules, pool: CasePool, rng: np.random.Generator, step: int,
                   total: int) -> dict[str, Tensor]:
    cfg = m.vision.cfg
    names = [n for n, _ in INSTRUCTION_MIX]
    p = np.array([w for _, w in INSTRUCTION_MIX])
    ins = str(rng.choice(names, p=p / p.sum()))
    losses: dict[str, Tensor] = {}
    if step % 4 == 0 or ins == "write the report":
        # The grounded decoder is cheap; it keeps every template it learned in `multimodal`.
        mem, toks = facts_batch([random_facts(rng) for _ in range(16)], cfg.max_tokens)
        losses["report"] = decoder_loss(m.decoder, mem, toks)
    if ins == "reconstruct":
        rb = sample_batch(pool, rng, pool.s.batch, cfg, 0.2)
        losses["recon"] = RECON_WEIGHT * recon_loss(m.vision, rb)
        return losses
    frac = 0.3 if ins == "segment brain tissues" else 0.6
    b = sample_batch(pool, rng, pool.s.batch, cfg, lesion_fraction=frac)
    sl = seg_losses(m.vision(b["image"], crop_at=_ca(b), heads=SEG_HEADS), b)
    for name, w in INSTRUCTION_WEIGHTS[ins].items():
        losses[name] = w * sl[name]
    return losses


FINETUNE_FALSE_LESION_WEIGHT = 2.0
"""The ``finetune`` stage's false-lesion weight, as in the earlier stages. Tried: 0.5 gave 3.1
false positives per held-out volume, 1.0 held-out numbers within noise of 2.0 and more normal
cases called abnormal (model card, v3.1.0)."""
FINETUNE_DIAGNOSIS_WEIGHT = 0.1
"""Weight of the slice-diagnosis loss in ``finetune``. Measured on the instruct model: its
gradient norm was 18-57 against 3-5 for tissue and 2-9 for lesions, so under the global
gradient clipping (norm 1) it set the encoder's direction and the segmentation heads hardly
learned (tissue Dice on *training* cases 0.6-0.7). At 0.1 the three are of one order."""
FINETUNE_LESION_FRACTION = 0.65
"""Share of a lesion case's slices drawn through its lesions in ``finetune``."""


def _step_finetune(m: Modules, pool: CasePool, rng: np.random.Generator, step: int,
                   total: int) -> dict[str, Tensor]:
    cfg = m.vision.cfg
    b = sample_batch(pool, rng, pool.s.batch, cfg, lesion_fraction=FINETUNE_LESION_FRACTION,
                     flip=True)
    losses = seg_losses(m.vision(b["image"], crop_at=_ca(b), heads=SEG_HEADS), b,
                        false_lesion_weight=FINETUNE_FALSE_LESION_WEIGHT)
    losses["diagnosis"] = FINETUNE_DIAGNOSIS_WEIGHT * losses["diagnosis"]
    if step % 5 == 0:
        rb = sample_batch(pool, rng, pool.s.batch // 2, cfg, lesion_fraction=0.2)
        losses["recon"] = RECON_WEIGHT * recon_loss(m.vision, rb)
    if step % 4 == 0:
        mem, toks = facts_batch([random_facts(rng) for _ in range(16)], cfg.max_tokens)
        losses["report"] = decoder_loss(m.decoder, mem, toks)
    return losses


_STEP_FNS: dict[str, StepFn] = {"pretrain": _step_pretrain, "align": _step_align,
                                "multimodal": _step_multimodal, "instruct": _step_instruct,
                                "finetune": _step_finetune, "refine": _step_finetune,
                                "refine2": _step_finetune, "refine3": _step_finetune}
_LR = {"pretrain": 2e-3, "align": 1e-3, "multimodal": 2e-3, "instruct": 1e-3, "finetune": 1e-3,
       "refine": 5e-4, "refine2": 5e-4, "refine3": 5e-4}


def _ckpt(out: Path, stage: str) -> Path:
    return out / f"{stage}.pt"


def load_stage(out: Path, stage: str) -> tuple[Modules, dict[str, Any]]:
    """Modules and metadata of a finished (or partial) stage checkpoint."""
    st = torch.load(_ckpt(out, stage), map_location="cpu", weights_only=False)
    cfg = OmniMRIConfig.from_dict(st["config"])
    m = build_modules(cfg, 0)
    m.load(st["modules"])
    return m, st


def run_stage(stage: str, s: TrainSettings, steps: int | None = None,
              progress: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) one stage; returns its checkpoint path.

    The stage starts from the previous stage's checkpoint if one exists (a fresh model for
    ``pretrain``, or when stages are run alone on an empty folder).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    torch.set_num_threads(max(1, s.threads))
    total = steps if steps is not None else DEFAULT_STEPS[stage]
    s.out.mkdir(parents=True, exist_ok=True)
    si = STAGES.index(stage)
    cfg = s.config()
    m = build_modules(cfg, s.seed)
    if s.device != "cpu":
        for mod in (m.vision, m.text, m.decoder):
            mod.to(s.device)
    opt = torch.optim.AdamW(m.params(), lr=_LR[stage], weight_decay=0.01)
    start = 0
    ck = _ckpt(s.out, stage)
    st: dict[str, Any] = {}
    if ck.exists():
        st = torch.load(ck, map_location="cpu", weights_only=False)
        m.load(st["modules"])
        opt.load_state_dict(st["optimizer"])
        start = int(st["step"])
        if st.get("total") != total:
            start = min(start, total)
    elif si > 0 and _ckpt(s.out, STAGES[si - 1]).exists():
        prev, _ = load_stage(s.out, STAGES[si - 1])
        m.load(prev.state())
    torch.manual_seed(s.seed * 101 + si * 7 + start)
    rng = np.random.default_rng([s.seed, si, start])
    if start and "rng" in st:  # resume bit for bit: the random streams where they stopped
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
    pool = CasePool(s, si, cfg.max_tokens, start_step=start)
    warm = max(1, total // 20)

    def lr_at(k: int) -> float:
        if k < warm:
            return _LR[stage] * (k + 1) / warm
        return _LR[stage] * 0.5 * (1 + np.cos(np.pi * (k - warm) / max(1, total - warm)))

    fn = _STEP_FNS[stage]
    m.vision.train()
    t0 = time.monotonic()
    history: dict[str, float] = {}
    for k in range(start, total):
        pool.step(k)
        for gq in opt.param_groups:
            gq["lr"] = lr_at(k)
        with torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=s.bf16):
            losses = fn(m, pool, rng, k, total)
        loss = torch.stack(list(losses.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.params(), 1.0)
        opt.step()
        for name, v in losses.items():
            fv = float(v.detach())
            history[name] = 0.9 * history.get(name, fv) + 0.1 * fv
        if (k + 1) % 10 == 0 or k + 1 == total:
            msg = (f"{stage} step {k + 1}/{total} "
                   + " ".join(f"{n}={v:.4f}" for n, v in history.items())
                   + f" {time.monotonic() - t0:.0f}s")
            log.info("train.progress", stage=stage, step=k + 1, total=total,
                     **{n: round(v, 4) for n, v in history.items()})
            if progress:
                progress(msg)
        if (k + 1) % s.save_every == 0 or k + 1 == total:
            tmp = ck.with_suffix(".pt.tmp")
            torch.save({"stage": stage, "step": k + 1, "total": total, "config": cfg.to_dict(),
                        "seed": s.seed, "modules": m.state(), "optimizer": opt.state_dict(),
                        "losses": history, "rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state()}, tmp)
            tmp.replace(ck)  # a kill during the save leaves the previous checkpoint
    pool.close()
    (s.out / f"{stage}.done").write_text(json.dumps({"steps": total, "losses": history,
                                                      "seconds": time.monotonic() - t0}))
    return ck


SOUP = "soup"
"""Name of the averaged checkpoint (``<out>/soup.pt``): what ``train export`` exports."""
SOUP_OF = ("finetune", "refine", "refine2", "refine3")
"""Stage checkpoints whose weights :func:`make_soup` averages. Measured (model card): v3.3.0,
``refine`` alone lowered false positives but made the MNI template "Normal" at p = 0.50 (mass
0.50); the average of ``finetune`` and ``refine`` read it Normal at p = 0.76. v3.4.0,
``refine2`` alone had the best tissue Dice but 0.97 false positives per held-out volume on
seed 1 and the template's brain at 1 814 ml; the average of the three kept 0.23 / 0.37 false
positives, 1 772 ml, and better lesion Dice, sensitivity and AUC than v3.3.0 on both seeds.
v3.5.0, ``refine3`` alone read the pitched Colin27 with four false lesions; the average of the
four read all seven real scans normal, with better tissue and lesion Dice and AUC than v3.4.0
on both held-out seeds (model card)."""


def make_soup(out: Path, of: tuple[str, ...] = SOUP_OF) -> Path:
    """Uniform average of the floating-point weights of the ``of`` checkpoints in ``out``.

    Each tensor is ``sum_k t_k * (1 / len(of))`` in checkpoint order (for two: exactly
    ``a * 0.5 + b * 0.5``; for three ``a * w + b * w + c * w``, ``w = 1/3``), in the tensors'
    own dtype; integer buffers come from the last.
    Writes ``<out>/soup.pt`` (modules, config and seed of the last checkpoint) and
    ``soup.done``; returns the checkpoint path.
    """
    if len(of) < 1:
        raise ValueError("a soup needs at least one checkpoint")
    states = [torch.load(_ckpt(out, k), map_location="cpu", weights_only=False) for k in of]
    w = 1.0 / len(of)
    modules: dict[str, dict[str, Tensor]] = {}
    for group, tensors in states[-1]["modules"].items():
        modules[group] = {}
        for name, last in tensors.items():
            if not last.is_floating_point():
                modules[group][name] = last
                continue
            acc = states[0]["modules"][group][name] * w
            for st in states[1:]:
                acc = acc + st["modules"][group][name] * w
            modules[group][name] = acc.to(last.dtype)
    ck = _ckpt(out, SOUP)
    tmp = ck.with_suffix(".pt.tmp")
    torch.save({"stage": SOUP, "of": list(of), "config": states[-1]["config"],
                "seed": states[-1].get("seed", 0), "modules": modules}, tmp)
    tmp.replace(ck)
    (out / f"{SOUP}.done").write_text(json.dumps({"of": list(of), "weights": [w] * len(of)}))
    return ck


def train_all(seed: int = 0, s: TrainSettings | None = None,
              steps: dict[str, int] | None = None,
              progress: Callable[[str], None] | None = None) -> Path:
    """Run the stages in order (skipping finished ones), then :func:`make_soup`.

    Returns the soup checkpoint (what is exported).

    ``train_all(0)`` with the default settings reproduces the shipped ``omnimri-tiny`` model
    (up to floating-point nondeterminism of multi-threaded CPU kernels).
    """
    s = s or TrainSettings(seed=seed)
    s.seed = seed
    for stage in STAGES:
        n = (steps or {}).get(stage, DEFAULT_STEPS[stage])
        if (s.out / f"{stage}.done").exists():
            continue
        run_stage(stage, s, n, progress)
    return make_soup(s.out)  # always: seconds, and never stale after a stage was rerun
