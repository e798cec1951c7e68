"""Pure functions that turn inference ``Results`` and the source series into DICOM datasets.

Call :func:`build_outputs` with an :class:`~export.context.ExportContext`; it returns the
datasets per output kind, every one in the source's study, each kind in its own series, with
UIDs derived from the job id (a re-run replaces, not duplicates). See ``docs/outputs.md``.
"""

from __future__ import annotations

import time

import structlog
from pydicom.dataset import Dataset

from export.context import (
    ALL_OUTPUTS,
    ExportContext,
    ExportError,
    ExportOptions,
    OutputKind,
    SegExportOptions,
)

__all__ = [
    "ALL_OUTPUTS",
    "ExportContext",
    "ExportError",
    "ExportOptions",
    "OutputKind",
    "SegExportOptions",
    "build_outputs",
    "warm_up",
]

log = structlog.get_logger(__name__)


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


def build_outputs(ctx: ExportContext) -> dict[str, list[Dataset]]:
    """Build the requested outputs in dependency order (SEG before SR, SC before KO).

    Args:
        ctx: Results, volume, source headers and options of one job.

    Returns:
        ``{kind: [datasets]}`` for each requested kind in ``seg, sr, sc, pr, ko`` order; a kind
        with nothing to show (e.g. SEG without segments) maps to an empty list. Datasets carry
        file meta and can be saved or sent as they are.

    Raises:
        ExportError: The results do not fit the source series (message says why).
    """
    from export.ko import build_ko
    from export.pr import build_pr
    from export.sc import build_sc
    from export.seg import build_seg
    from export.sr import build_sr

    out: dict[str, list[Dataset]] = {}
    timings: dict[str, float] = {}
    seg: Dataset | None = None

    def timed(kind: str, t0: float) -> None:
        timings[kind] = round(time.perf_counter() - t0, 3)

    if ctx.wants("seg"):
        t0 = time.perf_counter()
        out["seg"] = build_seg(ctx)
        seg = out["seg"][0] if out["seg"] else None
        timed("seg", t0)
    if ctx.wants("sr"):
        t0 = time.perf_counter()
        out["sr"] = build_sr(ctx, seg)
        timed("sr", t0)
    if ctx.wants("sc"):
        t0 = time.perf_counter()
        out["sc"] = build_sc(ctx)
        timed("sc", t0)
    if ctx.wants("pr"):
        t0 = time.perf_counter()
        out["pr"] = build_pr(ctx)
        timed("pr", t0)
    if ctx.wants("ko"):
        t0 = time.perf_counter()
        out["ko"] = build_ko(ctx, out.get("sc", [])[:1])
        timed("ko", t0)
    log.info(
        "outputs built",
        job_id=ctx.job_id,
        counts={k: len(v) for k, v in out.items()},
        seconds=timings,
    )
    return out
