"""Pure functions that turn inference ``Results`` and the source series into DICOM datasets.

Call :func:`build_outputs` with an :class:`~export.context.ExportContext`; it returns the
datasets per output kind, every one in the source's study, each kind in its own series, with
UIDs derived from the job id (a re-run replaces, not duplicates). See ``docs/outputs.md``.
"""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from export.options import ALL_OUTPUTS, ExportOptions, OutputKind, SegOptions

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from export.context import NOTHING_BUILT, Built, ExportContext, Exporter, ExportError

__all__ = [
    "ALL_OUTPUTS",
    "NOTHING_BUILT",
    "Built",
    "ExportContext",
    "ExportError",
    "ExportOptions",
    "Exporter",
    "OutputKind",
    "SegOptions",
    "build_outputs",
    "exporters",
    "warm_up",
]

log = structlog.get_logger(__name__)

_LAZY = {"NOTHING_BUILT", "Built", "ExportContext", "ExportError", "Exporter"}
"""Names from :mod:`export.context`, imported on first use: ``export.options`` (which the
node's configuration embeds) stays free of pydicom and highdicom."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("export.context"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warm_up() -> float:
    """Load highdicom's tables of the standard now (once per process); returns seconds.

    highdicom reads them lazily on the first object it builds (about 0.5 s, several seconds on
    a busy machine); a worker calls this at start so the first job does not pay it. Uses
    highdicom's private loaders and does nothing if they are not there.
    """
    t0 = time.perf_counter()
    try:
        from highdicom import _standard_utils as std

        std.get_sop_class_iod_map()
        std.get_iod_module_map()
        std.get_module_attribute_map()
    except (ImportError, AttributeError):  # pragma: no cover - other highdicom versions
        pass
    return time.perf_counter() - t0


def exporters() -> dict[OutputKind, Exporter]:
    """The exporter of each output kind, in :data:`ALL_OUTPUTS` (dependency) order.

    Imported on first use (see :data:`_LAZY`).
    """
    from export.ko import build_ko
    from export.pr import build_pr
    from export.sc import build_sc
    from export.seg import build_seg
    from export.sr import build_sr

    by_kind: dict[OutputKind, Exporter] = {
        "seg": build_seg, "sr": build_sr, "sc": build_sc, "pr": build_pr, "ko": build_ko,
    }
    return {kind: by_kind[kind] for kind in ALL_OUTPUTS}


def build_outputs(ctx: ExportContext) -> dict[OutputKind, list[Dataset]]:
    """Build the requested outputs in dependency order (SEG before SR, SC before KO).

    Each :class:`~export.context.Exporter` gets the outputs built before it.

    Args:
        ctx: Results, volume, source headers and options of one job.

    Returns:
        ``{kind: [datasets]}`` for each requested kind in ``seg, sr, sc, pr, ko`` order; a kind
        with nothing to show (e.g. SEG without segments) maps to an empty list. Datasets carry
        file meta and can be saved or sent as they are.

    Raises:
        ExportError: The results do not fit the source series (message says why).
    """
    out: dict[OutputKind, list[Dataset]] = {}
    timings: dict[str, float] = {}
    for kind, exporter in exporters().items():
        if not ctx.wants(kind):
            continue
        t0 = time.perf_counter()
        out[kind] = exporter(ctx, out)
        timings[kind] = round(time.perf_counter() - t0, 3)
    log.info(
        "outputs built",
        job_id=ctx.job_id,
        counts={k: len(v) for k, v in out.items()},
        seconds=timings,
    )
    return out
