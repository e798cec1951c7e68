"""Where a pipeline's model package is, and which engine-cache slot it occupies.

Light on purpose (no inference stack): the runtime asks it, at each configuration reload,
which engines the new configuration still uses, and closes the others
(:meth:`inference.engines.cache.EngineCache.retain`).
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.pipelines import PipelineError
from inference.engines.cache import EngineSlot


def model_folder(cfg: PipelineConfig, settings: NodeSettings) -> Path:
    """The package folder of ``cfg.model``: a path, or a name under ``models.path``.

    Raises:
        PipelineError: No model configured, or no such folder (permanent).
    """
    if not cfg.model:
        raise PipelineError("pipeline has no model configured", permanent=True)
    as_path = Path(cfg.model).expanduser()
    folder = as_path if as_path.is_dir() else Path(settings.models.path) / cfg.model
    if not folder.is_dir():
        raise PipelineError(
            f"model package {cfg.model!r} not found under {settings.models.path}", permanent=True)
    return folder.resolve()


def engine_slot(cfg: PipelineConfig, settings: NodeSettings) -> EngineSlot:
    """The engine-cache slot of a model pipeline.

    Its package folder; its own ``engine`` or else ``models.engine_order``; the Triton URL and
    CPU threads of ``models``.

    Raises:
        PipelineError: No model configured, or no such folder (permanent).
    """
    preference = list(settings.models.engine_order) if cfg.engine == "auto" else cfg.engine
    return EngineSlot.of(model_folder(cfg, settings), preference, settings.models.triton_url,
                         settings.models.intra_op_threads)


def engine_slots(settings: NodeSettings) -> set[EngineSlot]:
    """The slots of every model pipeline in ``settings`` whose package folder exists."""
    out: set[EngineSlot] = set()
    for cfg in settings.pipelines.values():
        if not cfg.model:
            continue
        try:
            out.add(engine_slot(cfg, settings))
        except PipelineError:
            continue
    return out
