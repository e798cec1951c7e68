"""The ``omnimri`` pipeline: a model package run on a series, results written as DICOM.

Steps per job: lease the package and its engine from the engine cache
(:mod:`inference.engines.cache`: loaded once, loaded again and the old engine closed when the
package's files change), build the volume from the stored files
(:func:`inference.volume.build_volume`), run the model for the pipeline's instructions
(:func:`inference.runner.run_model`), turn the raw outputs into
:class:`inference.results.Results` through the package's model family
(:func:`inference.family.family_of`: ``extra.family: omnimri`` or the generic one), then write
the configured outputs with :func:`export.build_outputs` (SEG, SR, SC, GSPS, KOS; UIDs derived
from the job id).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pydicom

from dicom_node import __version__, metrics
from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.logs import get_logger
from dicom_node.pipelines import PipelineError, UnsupportedSeries
from dicom_node.pipelines.models import engine_slot
from dicom_node.series import Series
from export import ALL_OUTPUTS, ExportContext, ExportError, ExportOptions, build_outputs, warm_up
from inference import results as R
from inference.engines import Engine, EngineUnavailable
from inference.engines.cache import EngineCache, default_cache
from inference.family import FamilyUnavailable, family_of
from inference.package import ModelPackage, PackageError
from inference.runner import RawOutputs, run_model
from inference.volume import Volume, VolumeError, build_volume

log = get_logger(__name__)


@contextmanager
def _leased_model(cfg: PipelineConfig, settings: NodeSettings,
                  cache: EngineCache | None = None) -> Iterator[tuple[ModelPackage, Engine]]:
    """The package and its ready engine from the engine cache, held for the ``with`` block.

    Loaded once per process and again when the package's files change (the old engine is
    closed once no job uses it); see :mod:`inference.engines.cache`.

    Raises:
        PipelineError: Invalid package or no engine can run it here (permanent).
    """
    slot = engine_slot(cfg, settings)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        try:
            loaded = stack.enter_context((cache or default_cache()).lease(slot))
        except PackageError as err:
            raise PipelineError(f"model package {Path(slot.folder).name}: {err}",
                                permanent=True) from err
        except EngineUnavailable as err:
            raise PipelineError(str(err), permanent=True) from err
        if loaded.fresh:
            warm_s = warm_up()  # highdicom's standard tables, so the first export is not slower
            log.info("model loaded", model=loaded.package.name, engine=loaded.engine.name,
                     seconds=round(time.perf_counter() - t0, 3),
                     exporter_warm_up_s=round(warm_s, 3))
        yield loaded.package, loaded.engine


def load_model(cfg: PipelineConfig, settings: NodeSettings) -> tuple[ModelPackage, Engine]:
    """The package and a ready engine, loaded once per process (and again if the package changes).

    The engine stays open until the package changes, a reload drops the pipeline or the node
    stops; a job holds it with :func:`_leased_model` instead.

    Raises:
        PipelineError: Invalid package or no engine can run it here (permanent).
    """
    with _leased_model(cfg, settings) as model:
        return model


def _to_results(
    package: ModelPackage, raw: RawOutputs, volume: Volume, instructions: list[str]
) -> R.Results:
    """The package's family (:func:`inference.family.family_of`) turns ``raw`` into results.

    Raises:
        PipelineError: The family's post-processing cannot be loaded (permanent).
    """
    try:
        return family_of(package).results(package, raw, volume, instructions, __version__)
    except FamilyUnavailable as err:
        raise PipelineError(str(err), permanent=True) from err


class OmniMRIPipeline:
    """Runs a model package on a series and writes the results as DICOM objects.

    Args:
        name: The pipeline's name in the configuration.
        cfg: Its configuration (model, engine, instructions, outputs, SEG options).
        settings: The node configuration (models folder, engine order, node AE title).
        engines: The engine cache; default the process's
            (:func:`inference.engines.cache.default_cache`, closed by the node).
    """

    def __init__(self, name: str, cfg: PipelineConfig, settings: NodeSettings, *,
                 engines: EngineCache | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.settings = settings
        self.engines = engines

    def export_options(self) -> ExportOptions:
        """The exporters' options: this pipeline's outputs and SEG options, the node's name."""
        return ExportOptions(
            outputs=tuple(self.cfg.outputs),
            seg=self.cfg.seg,
            node_name=self.settings.node.ae_title,
            node_version=__version__,
        )

    def run(self, series: Series, job_id: str) -> list[pydicom.Dataset]:
        """Model + exporters on ``series``; outputs in SEG, SR, SC, GSPS, KOS order.

        Raises:
            UnsupportedSeries: The series is not one volume (several stacks, bad geometry,
                undecodable pixels), or the results do not fit it.
            PipelineError: Model or engine unavailable (permanent), or the run failed.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with _leased_model(self.cfg, self.settings, self.engines) as (package, engine):
            timings["load"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            paths = series.paths
            headers: list[pydicom.Dataset] = []  # read once, by build_volume (no pixels)
            try:
                volume = build_volume(paths, headers=headers)
            except VolumeError as err:
                raise UnsupportedSeries(f"series {series.key}: {err}") from err
            timings["volume"] = time.perf_counter() - t0
            metrics.observe_stage("volume", timings["volume"])

            t0 = time.perf_counter()
            instructions = list(self.cfg.instructions)
            try:
                raw = run_model(package, volume, engine, instructions)
            except PackageError as err:
                raise PipelineError(f"pipeline {self.name!r}: {err}", permanent=True) from err
            except ValueError as err:
                raise PipelineError(f"pipeline {self.name!r}: model run failed: {err}") from err
            timings["inference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = _to_results(package, raw, volume, instructions)
        timings["results"] = time.perf_counter() - t0
        metrics.observe_stage("inference", timings["load"] + timings["inference"]
                              + timings["results"])

        t0 = time.perf_counter()
        try:
            ctx = ExportContext(job_id=job_id, results=results, volume=volume, sources=headers,
                                options=self.export_options())
            outputs = build_outputs(ctx)
        except ExportError as err:
            raise UnsupportedSeries(f"series {series.key}: {err}") from err
        timings["export"] = time.perf_counter() - t0
        metrics.observe_stage("export", timings["export"])
        datasets = [ds for kind in ALL_OUTPUTS for ds in outputs.get(kind, [])]
        log.info(
            "omnimri pipeline done", pipeline=self.name, job_id=job_id, model=package.name,
            engine=engine.name, segments=len(results.segments),
            detections=len(results.detections), outputs=len(datasets),
            seconds={k: round(v, 3) for k, v in timings.items()},
        )
        return datasets
