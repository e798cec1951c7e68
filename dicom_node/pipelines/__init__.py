"""Pipelines: what a job runs on a complete series to make derived DICOM objects.

A pipeline is anything with ``run(series, job_id) -> list[pydicom.Dataset]``. The registry maps
a :class:`~dicom_node.config.PipelineConfig` ``kind`` to its implementation:

* ``preview``: a secondary-capture montage of the series (no model), :mod:`.preview`.
* ``omnimri``: an OmniMRI model package, :mod:`dicom_node.pipelines.omnimri` (imported lazily,
  so the node starts without the inference stack when only ``preview`` is configured).

Output SOP Instance UIDs must be derived from ``job_id`` so that a re-run replaces rather than
duplicates at the PACS. The worker pool builds one instance per configured pipeline name and
shares it between its worker threads, so ``run`` must be thread-safe (keep per-run state local).
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import pydicom

from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.series import Series


class PipelineError(Exception):
    """A pipeline could not run on this series; the message says why (no patient data)."""

    permanent: bool = False
    """``True`` when retrying cannot help (unsupported input): the job fails at once."""

    def __init__(self, message: str = "", *, permanent: bool | None = None) -> None:
        super().__init__(message)
        if permanent is not None:
            self.permanent = permanent


class UnsupportedSeries(PipelineError):
    """The series cannot be processed by this pipeline (retrying will not help)."""

    permanent = True


@runtime_checkable
class Pipeline(Protocol):
    """Turns one complete series into derived DICOM objects."""

    def run(self, series: Series, job_id: str) -> list[pydicom.Dataset]:
        """Process ``series``; output UIDs are derived from ``job_id``.

        Raises:
            PipelineError: The series could not be processed.
        """
        ...


_KINDS: dict[str, str] = {
    "preview": "dicom_node.pipelines.preview:PreviewPipeline",
    "omnimri": "dicom_node.pipelines.omnimri:OmniMRIPipeline",
}
"""``kind`` → ``module:Class``; the class is built as ``Class(name, cfg, settings)``."""


def get_pipeline(name: str, cfg: PipelineConfig, settings: NodeSettings) -> Pipeline:
    """Build the pipeline ``name`` from its configuration.

    Args:
        name: The pipeline's key in ``pipelines`` (for logs and output descriptions).
        cfg: Its configuration.
        settings: The whole node configuration (model folder, engine order, node AE title).

    Raises:
        PipelineError: Unknown kind, or its implementation cannot be imported.
    """
    target = _KINDS.get(cfg.kind)
    if target is None:
        raise PipelineError(f"pipeline {name!r}: unknown kind {cfg.kind!r}", permanent=True)
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(
            f"pipeline {name!r} (kind {cfg.kind}) is not available: {exc}"
        ) from exc
    cls = getattr(module, cls_name)
    pipeline: Pipeline = cls(name, cfg, settings)
    return pipeline
