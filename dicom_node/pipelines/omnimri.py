"""The ``omnimri`` pipeline: a model package run on a series, results written as DICOM.

Steps per job: load the package and its engine (cached per process), build the volume from the
stored files (:func:`inference.volume.build_volume`), run the model for the pipeline's
instructions (:func:`inference.runner.run_model`), turn the raw outputs into
:class:`inference.results.Results` (OmniMRI-family packages, ``extra.family: omnimri``, through
:func:`inference.omnimri.tasks.results_from_raw`; any other package through
:func:`generic_results`), then write the configured outputs with :func:`export.build_outputs`
(SEG, SR, SC, GSPS, KOS; UIDs derived from the job id).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from dicom_node import __version__, metrics
from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.logs import get_logger
from dicom_node.pipelines import PipelineError, UnsupportedSeries
from dicom_node.series import Series
from export import (
    ExportContext,
    ExportError,
    ExportOptions,
    SegExportOptions,
    build_outputs,
    warm_up,
)
from inference import results as R
from inference.engines import Engine, EngineUnavailable, select_engine
from inference.package import ModelPackage, PackageError
from inference.runner import RawOutputs, run_model
from inference.volume import Volume, VolumeError, build_volume

log = get_logger(__name__)

MAX_DETECTIONS = 50
"""Most detections a generic package reports (largest first); the rest are dropped (logged)."""

_CACHE: dict[tuple[Any, ...], tuple[ModelPackage, Engine]] = {}
_CACHE_LOCK = threading.Lock()


def _permanent(message: str) -> PipelineError:
    err = PipelineError(message)
    err.permanent = True
    return err


def model_folder(cfg: PipelineConfig, settings: NodeSettings) -> Path:
    """The package folder of ``cfg.model``: a path, or a name under ``models.path``.

    Raises:
        PipelineError: No model configured, or no such folder (permanent).
    """
    if not cfg.model:
        raise _permanent("pipeline has no model configured")
    as_path = Path(cfg.model).expanduser()
    folder = as_path if as_path.is_dir() else Path(settings.models.path) / cfg.model
    if not folder.is_dir():
        raise _permanent(f"model package {cfg.model!r} not found under {settings.models.path}")
    return folder.resolve()


def load_model(cfg: PipelineConfig, settings: NodeSettings) -> tuple[ModelPackage, Engine]:
    """The package and a ready engine, loaded once per process (and again if model.yaml changes).

    Raises:
        PipelineError: Invalid package or no engine can run it here (permanent).
    """
    folder = model_folder(cfg, settings)
    order: str | list[str] = (
        list(settings.models.engine_order) if cfg.engine == "auto" else cfg.engine
    )
    yaml_file = folder / "model.yaml"
    stamp = yaml_file.stat().st_mtime_ns if yaml_file.exists() else 0
    key = (str(folder), stamp, tuple(order) if isinstance(order, list) else order,
           settings.models.triton_url, settings.models.intra_op_threads)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        try:
            package = ModelPackage.load(folder)
            engine = select_engine(
                package, order, settings.models.triton_url,
                intra_op_threads=settings.models.intra_op_threads,
            )
        except PackageError as err:
            raise _permanent(f"model package {folder.name}: {err}") from err
        except EngineUnavailable as err:
            raise _permanent(str(err)) from err
        _CACHE[key] = (package, engine)
        warm_s = warm_up()  # highdicom's standard tables, so the first export is not slower
        log.info("model loaded", model=package.name, engine=engine.name,
                 seconds=round(time.perf_counter() - t0, 3), exporter_warm_up_s=round(warm_s, 3))
        return package, engine


def generic_results(
    package: ModelPackage, raw: RawOutputs, volume: Volume, instructions: list[str],
    node_version: str = "",
) -> R.Results:
    """Results from any package's raw outputs, using only its ``model.yaml`` declarations.

    Every label of every segmentation output becomes a segment (numbered in order); connected
    components of ``pathological`` labels become detections (largest :data:`MAX_DETECTIONS`);
    the first classification output with a coded best class becomes the diagnosis; text
    outputs become the findings.
    """
    segments: list[R.SegmentMask] = []
    detections: list[R.Detection] = []
    number = 0
    for seg in raw.segmentation.values():
        for lab in seg.labels:
            number += 1
            label = lab.to_segment_label(number)
            segments.append(R.SegmentMask(label, seg.mask(lab.value)))
            if label.task != "pathological":
                continue
            for comp in seg.components.get(lab.value, []):
                detections.append(
                    R.Detection(
                        finding=label.type, segment_number=number,
                        centroid_index=comp.centroid_index, centroid_lps_mm=comp.centroid_lps_mm,
                        bbox_index=comp.bbox_index, diameter_mm=comp.diameter_mm,
                        volume_ml=comp.volume_ml, probability=comp.probability,
                    )
                )
    if len(detections) > MAX_DETECTIONS:
        log.info("detections capped", model=package.name, found=len(detections),
                 kept=MAX_DETECTIONS)
    detections = sorted(detections, key=lambda d: -d.volume_ml)[:MAX_DETECTIONS]
    for n, det in enumerate(detections, start=1):
        det.tracking_id = f"{det.finding.meaning.lower()}-{n}"[:64]
    diagnosis = None
    for cls in raw.classification.values():
        best = cls.best
        if best.code is not None:
            diagnosis = R.Diagnosis(best.code.to_code(), float(cls.probabilities[best.name]),
                                    dict(cls.probabilities))
            break
    text = " ".join(t for t in raw.text.values() if t)
    report = R.Report(findings=text, impression="") if text else None
    return R.Results(
        model=package.model_info(node_version), segments=segments, detections=detections,
        diagnosis=diagnosis, report=report, timings_s=dict(raw.timings_s),
        instructions=list(instructions),
    )


def _to_results(
    package: ModelPackage, raw: RawOutputs, volume: Volume, instructions: list[str]
) -> R.Results:
    if package.spec.extra.get("family") == "omnimri":
        try:
            from inference.omnimri.tasks import results_from_raw
        except ImportError as err:  # pragma: no cover - only without the OmniMRI tasks module
            raise _permanent(f"OmniMRI task post-processing unavailable: {err}") from err
        results: R.Results = results_from_raw(package, raw, volume, instructions, __version__)
        return results
    return generic_results(package, raw, volume, instructions, __version__)


class OmniMRIPipeline:
    """Runs a model package on a series and writes the results as DICOM objects.

    Args:
        name: The pipeline's name in the configuration.
        cfg: Its configuration (model, engine, instructions, outputs, SEG options).
        settings: The node configuration (models folder, engine order, node AE title).
    """

    def __init__(self, name: str, cfg: PipelineConfig, settings: NodeSettings) -> None:
        self.name = name
        self.cfg = cfg
        self.settings = settings

    def export_options(self) -> ExportOptions:
        """The exporters' options from this pipeline's configuration."""
        return ExportOptions(
            outputs=tuple(self.cfg.outputs),
            seg=SegExportOptions(**self.cfg.seg.model_dump()),
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
        package, engine = load_model(self.cfg, self.settings)
        timings["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        paths = series.paths
        try:
            volume = build_volume(paths)
        except VolumeError as err:
            raise UnsupportedSeries(f"series {series.key}: {err}") from err
        headers: list[pydicom.Dataset] = [
            pydicom.dcmread(p, stop_before_pixels=True) for p in paths
        ]
        timings["volume"] = time.perf_counter() - t0
        metrics.observe_stage("volume", timings["volume"])

        t0 = time.perf_counter()
        instructions = list(self.cfg.instructions)
        try:
            raw = run_model(package, volume, engine, instructions)
        except PackageError as err:
            raise _permanent(f"pipeline {self.name!r}: {err}") from err
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
        datasets = [ds for kind in ("seg", "sr", "sc", "pr", "ko") for ds in outputs.get(kind, [])]
        log.info(
            "omnimri pipeline done", pipeline=self.name, job_id=job_id, model=package.name,
            engine=engine.name, segments=len(results.segments),
            detections=len(results.detections), outputs=len(datasets),
            seconds={k: round(v, 3) for k, v in timings.items()},
        )
        return datasets
