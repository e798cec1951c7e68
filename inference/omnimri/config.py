"""OmniMRI size presets and the instruction vocabulary.

The family is one architecture at several widths/depths. ``tiny`` is the shipped reference
(trained on a 2-core CPU in well under an hour); ``small``/``base``/``large`` are the same code,
meant for GPUs and real data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "segment brain tissues": ("tissue",),
    "detect abnormalities": ("lesion",),
    "suggest a diagnosis": ("diagnosis", "lesion"),
    "write the report": ("report", "diagnosis", "lesion"),
    "reconstruct": ("recon",),
}
"""Task instruction -> the heads it runs (the report needs the lesion and diagnosis heads)."""


NORMALISATION: dict[str, Any] = {"kind": "percentile", "low": 0.5, "high": 99.5, "mask": "none"}
"""The input normalisation of every OmniMRI package (``model.yaml`` ``input.normalisation``),
used by training through the served function :func:`inference.preprocess.normalise`: the
0.5th/99.5th percentiles of the whole volume map to 0/1; nothing is clipped above."""


def heads_for(instructions: list[str]) -> set[str]:
    """Heads needed for a list of instructions; unknown words raise ``ValueError``."""
    out: set[str] = set()
    for ins in instructions:
        key = " ".join(ins.lower().split())
        if key not in INSTRUCTIONS:
            raise ValueError(
                f"unknown instruction {ins!r}; known: {', '.join(sorted(INSTRUCTIONS))}"
            )
        out.update(INSTRUCTIONS[key])
    return out


@dataclass(frozen=True)
class OmniMRIConfig:
    """Architecture hyper-parameters of one OmniMRI size."""

    name: str = "tiny"
    context_slices: int = 1
    """Neighbour slices on each side fed as channels (2.5D): input has ``2*c+1`` channels."""
    patch_size: int = 128
    """Square in-plane patch, pixels on the model grid (2 mm): 256 mm field of view."""
    spacing_mm: float = 2.0
    """Model grid spacing, millimetres (isotropic)."""
    conv_channels: tuple[int, int, int] = (16, 32, 64)
    """Conv stem widths at full, 1/2 and 1/4 resolution."""
    embed_dim: int = 96
    """Transformer width (tokens at 1/8 resolution, i.e. 16 mm on the 2 mm grid)."""
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    text_dim: int = 96
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 48
    n_tissue: int = 4
    n_lesion: int = 4
    n_diagnosis: int = 3
    align_dim: int = 64

    @property
    def in_channels(self) -> int:
        """Number of input channels (slices)."""
        return 2 * self.context_slices + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and model.yaml)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OmniMRIConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["conv_channels"] = tuple(d["conv_channels"])
        return cls(**d)


PRESETS: dict[str, OmniMRIConfig] = {
    "tiny": OmniMRIConfig(),
    "small": OmniMRIConfig(name="small", conv_channels=(24, 48, 96), embed_dim=192, depth=6,
                           heads=6, text_dim=192, text_layers=3, text_heads=6, align_dim=128),
    "base": OmniMRIConfig(name="base", context_slices=2, conv_channels=(32, 64, 128),
                          embed_dim=384, depth=8, heads=8, text_dim=384, text_layers=4,
                          text_heads=8, align_dim=256),
    "large": OmniMRIConfig(name="large", context_slices=3, conv_channels=(48, 96, 192),
                           embed_dim=768, depth=12, heads=12, text_dim=512, text_layers=6,
                           text_heads=8, align_dim=512),
}


def preset(name: str, **overrides: Any) -> OmniMRIConfig:
    """A named size (``tiny``, ``small``, ``base``, ``large``) with optional overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown size {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
