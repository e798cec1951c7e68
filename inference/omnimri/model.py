"""The OmniMRI network: a shared 2.5D hybrid vision encoder, task heads and a report decoder.

Why 2.5D: on a CPU a 3D ViT over a 2 mm brain (95x117x99 voxels) costs ~30x more per training
step than a slice model, while the lesion sizes here (>= 4 mm) and tissue boundaries are well
resolved in-plane; through-plane context comes from ``2*c+1`` neighbouring slices fed as
channels. Why hybrid: a light conv stem gives full-resolution edges for Dice, and transformer
blocks at 1/8 resolution (16 mm tokens) give the global context ViTs are good at, cheaply.

``OmniMRI.forward`` returns every head for a batch of slice stacks ``[N, C, H, W]``:

* ``tissue``     ``[N, 4, H, W]`` logits: background, CSF, grey matter, white matter;
* ``lesion``     ``[N, 4, H, W]`` logits: none, WM hyperintensity, mass, oedema;
* ``recon``      ``[N, 1, H, W]`` image (centre slice, reconstruction / masked-patch head);
* ``diagnosis``  ``[N, 3]`` slice-level logits: normal, small vessel, mass;
* ``embedding``  ``[N, align_dim]`` image embedding (vision-language alignment).

Which of them a pipeline uses is chosen by its instructions (see :mod:`.config`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inference.omnimri.config import OmniMRIConfig
from inference.omnimri.embed_head import FindingsHead, head_for_state
from inference.omnimri.report_text import FACT_DIM, SLOTS, VOCAB


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.GELU(),
    )


class Attention(nn.Module):
    """Multi-head attention written with plain matmuls (exports cleanly to ONNX)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``x`` ``[N, T, D]`` attends to ``ctx`` (self if ``None``); ``mask`` is additive."""
        ctx = x if ctx is None else ctx
        n, t, d = x.shape
        h = self.heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)
        kv = self.kv(ctx).reshape(n, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        att = (q @ kv[0].transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        if mask is not None:
            att = att + mask
        y = att.softmax(-1) @ kv[1]
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block (optional cross-attention)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross: bool = False) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.att = Attention(dim, heads)
        self.cross = Attention(dim, heads) if cross else None
        self.nc = nn.LayerNorm(dim) if cross else None
        self.n2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mem: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Apply the block."""
        x = x + self.att(self.n1(x), mask=mask)
        if self.cross is not None and self.nc is not None and mem is not None:
            x = x + self.cross(self.nc(x), mem)
        return x + self.mlp(self.n2(x))


def _sincos_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``[h*w, dim]``."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                          torch.arange(w, dtype=torch.float32), indexing="ij")
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / q))
    oy = y.reshape(-1, 1) * omega
    ox = x.reshape(-1, 1) * omega
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], 1)


class VisionEncoder(nn.Module):
    """Conv stem (full, 1/2, 1/4 resolution) + ViT blocks on 1/8-resolution tokens."""

    def __init__(self, cfg: OmniMRIConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.conv_channels
        self.s1 = nn.Sequential(_conv(cfg.in_channels, c1), _conv(c1, c1))
        self.s2 = nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2))
        self.s3 = nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3))
        self.embed = nn.Conv2d(c3, cfg.embed_dim, 2, stride=2)
        g = cfg.patch_size // 8
        self.register_buffer("pos", _sincos_2d(g, g, cfg.embed_dim)[None], persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim, 1, 1))
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x: Tensor, token_mask: Tensor | None = None,
                crop_at: tuple[int, int] | None = None) -> tuple[Tensor, ...]:
        """Features ``(f1, f2, f3, tokens[N, D, H/8, W/8])``.

        ``token_mask`` (``[N, 1, H/8, W/8]``, 1 = masked) replaces tokens by a learned mask
        token (masked-image pretraining). ``crop_at`` (training on crops smaller than the
        patch): the crop's offset in tokens, selecting its part of the position embedding.
        """
        f1 = self.s1(x)
        f2 = self.s2(f1)
        f3 = self.s3(f2)
        t = self.embed(f3)
        if token_mask is not None:
            t = t * (1 - token_mask) + self.mask_token * token_mask
        n, d, h, w = t.shape
        pos: Tensor = self.pos  # type: ignore[assignment]
        if crop_at is not None:
            g = int(math.isqrt(pos.shape[1]))
            a, b = crop_at
            pos = pos.reshape(1, g, g, d)[:, a : a + h, b : b + w].reshape(1, h * w, d)
        seq = t.flatten(2).transpose(1, 2) + pos
        for blk in self.blocks:
            seq = blk(seq)
        seq = self.norm(seq)
        return f1, f2, f3, seq.transpose(1, 2).reshape(n, d, h, w)


class DenseDecoder(nn.Module):
    """U-Net-style light decoder from tokens back to full resolution."""

    def __init__(self, cfg: OmniMRIConfig, out_channels: int) -> None:
        super().__init__()
        c1, c2, c3 = cfg.conv_channels
        self.u3 = _conv(cfg.embed_dim + c3, c3)
        self.u2 = _conv(c3 + c2, c2)
        self.u1 = _conv(c2 + c1, c1)
        self.head = nn.Conv2d(c1, out_channels, 1)

    def forward(self, feats: tuple[Tensor, ...]) -> Tensor:
        """Logits ``[N, out, H, W]``."""
        f1, f2, f3, t = feats
        y = self.u3(torch.cat([F.interpolate(t, scale_factor=2.0, mode="nearest"), f3], 1))
        y = self.u2(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), f2], 1))
        y = self.u1(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), f1], 1))
        out: Tensor = self.head(y)
        return out


ALL_HEADS = frozenset({"tissue", "lesion", "recon", "diagnosis", "embedding"})
"""Every output of :meth:`OmniMRI.forward`."""


class OmniMRI(nn.Module):
    """The multi-task vision model (all heads; instructions pick the ones used)."""

    def __init__(self, cfg: OmniMRIConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionEncoder(cfg)
        # One shared decoder trunk for the segmentations, one for images.
        self.seg = DenseDecoder(cfg, cfg.n_tissue + cfg.n_lesion)
        self.img = DenseDecoder(cfg, 1)
        self.cls = nn.Sequential(nn.LayerNorm(2 * cfg.embed_dim), nn.Linear(2 * cfg.embed_dim,
                                                                             cfg.n_diagnosis))
        self.proj = nn.Linear(2 * cfg.embed_dim, cfg.align_dim)
        # Optional findings-aware embedding head (``train embed``); None: ``proj`` as before.
        self.findings: FindingsHead | None = None
        self.register_load_state_dict_pre_hook(self._attach_findings)

    def _attach_findings(self, module: nn.Module, state: dict[str, Tensor], prefix: str,
                         *args: object) -> None:
        """Loading a state with ``findings.*`` tensors adds a :class:`FindingsHead` first."""
        if self.findings is None:
            self.findings = head_for_state(state, f"{prefix}findings.", self.cfg.embed_dim,
                                           self.cfg.align_dim)

    def pooled(self, tokens: Tensor) -> Tensor:
        """Mean and max pooled tokens ``[N, 2D]``."""
        return torch.cat([tokens.mean((2, 3)), tokens.amax((2, 3))], 1)

    def forward(self, x: Tensor, token_mask: Tensor | None = None,
                crop_at: tuple[int, int] | None = None,
                heads: frozenset[str] | None = None) -> dict[str, Tensor]:
        """Heads for slice stacks ``x`` ``[N, C, H, W]`` (normalised intensities).

        ``heads`` limits the work to some of ``tissue``/``lesion`` (one shared decoder),
        ``recon``, ``diagnosis`` and ``embedding`` (training skips the decoders it does not
        use); ``None`` computes all of them.
        """
        feats = self.encoder(x, token_mask, crop_at)
        want = ALL_HEADS if heads is None else heads
        out: dict[str, Tensor] = {}
        if "tissue" in want or "lesion" in want:
            seg = self.seg(feats)
            out["tissue"] = seg[:, : self.cfg.n_tissue]
            out["lesion"] = seg[:, self.cfg.n_tissue :]
        if "recon" in want:
            centre = x[:, self.cfg.context_slices : self.cfg.context_slices + 1]
            out["recon"] = centre + self.img(feats)
        pooled = self.pooled(feats[3])
        if "diagnosis" in want:
            out["diagnosis"] = self.cls(pooled)
        if "embedding" in want and self.findings is not None:  # frozen features, own head
            seg = self.seg(feats) if "tissue" not in out else torch.cat(
                [out["tissue"], out["lesion"]], 1)
            t = self.cfg.n_tissue
            out["embedding"] = self.findings(feats[3], seg[:, :t], seg[:, t:])
        elif "embedding" in want:
            out["embedding"] = F.normalize(self.proj(pooled), dim=1)
        return out


class OnnxVision(nn.Module):
    """Export wrapper: ``image`` -> tissue/lesion logits, recon, diagnosis logits."""

    def __init__(self, model: OmniMRI) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four outputs used by the node."""
        out = self.model(image)
        return out["tissue"], out["lesion"], out["recon"], out["diagnosis"]


class TextEncoder(nn.Module):
    """Bag-of-words report encoder for vision-language alignment (training only)."""

    def __init__(self, cfg: OmniMRIConfig) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), cfg.text_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU(),
                                 nn.Linear(cfg.text_dim, cfg.align_dim))

    def forward(self, tokens: Tensor) -> Tensor:
        """Normalised report embeddings ``[N, align_dim]``."""
        e = self.emb(tokens)
        m = (tokens > 0).float().unsqueeze(-1)
        return F.normalize(self.mlp((e * m).sum(1) / m.sum(1).clamp(min=1.0)), dim=1)


class ReportDecoder(nn.Module):
    """Small causal transformer decoder: ``memory`` [N, M, F] + ``tokens`` [N, T] -> logits.

    The memory is the structured-findings slots of :mod:`.report_text` (grounded generation).
    """

    def __init__(self, cfg: OmniMRIConfig) -> None:
        super().__init__()
        d = cfg.text_dim
        self.mem_in = nn.Linear(FACT_DIM, d)
        self.mem_pos = nn.Parameter(torch.zeros(1, len(SLOTS), d))
        self.tok = nn.Embedding(len(VOCAB), d)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_tokens, d))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.mem_pos, std=0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.text_heads, 2.0, cross=True) for _ in range(cfg.text_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, len(VOCAB))

    def forward(self, memory: Tensor, tokens: Tensor) -> Tensor:
        """Next-token logits ``[N, T, V]``."""
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos[:, :t]
        mem = self.mem_in(memory) + self.mem_pos
        idx = torch.arange(t, device=tokens.device)
        causal = (idx[None, :] > idx[:, None]).float() * -1e4
        for blk in self.blocks:
            x = blk(x, mem, causal)
        out: Tensor = self.out(self.norm(x))
        return out

    @torch.no_grad()
    def generate(self, memory: Tensor, bos: int, eos: int, max_tokens: int) -> list[list[int]]:
        """Greedy decoding (the same loop the engines run over ``decoder.onnx``)."""
        n = memory.shape[0]
        tokens = torch.full((n, 1), bos, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        for _ in range(max_tokens - 1):
            nxt = self.forward(memory, tokens)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
        return [row[1:] for row in tokens.tolist()]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
