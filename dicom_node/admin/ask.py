"""Questions about a stored series: ``POST /api/v1/series/{uid}/ask`` and ``omnimri-node ask``.

The question is read by the pipeline's model package's text encoder
(:mod:`inference.omnimri.language.runtime`); the answer is computed from the series' structured
findings (:mod:`inference.omnimri.language.qa`), never from the text model. The findings come
from running the package on the stored series (segment brain tissues, detect abnormalities,
suggest a diagnosis: what a job runs) and are kept as JSON under
``<storage.path>/../language/`` keyed by series revision and model version, so the next question
reuses them. Every question is audited (``admin_action``, action ``ask``: token id, series UID,
question type, refused or not); neither the question text nor patient data reach the log or
the audit trail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from dicom_node.admin.auth import Viewer
from dicom_node.admin.backend.errors import AdminError
from dicom_node.audit import AuditLog
from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.logs import get_logger

log = get_logger(__name__)

FACT_INSTRUCTIONS = ("segment brain tissues", "detect abnormalities", "suggest a diagnosis")
"""What is run on a series to answer questions about it."""

MAX_QUESTION_CHARS = 500


def model_pipelines(settings: NodeSettings) -> dict[str, PipelineConfig]:
    """The configured pipelines whose model package can answer questions, in config order."""
    return {n: p for n, p in settings.pipelines.items() if p.kind == "omnimri" and p.model}


def _pipeline(settings: NodeSettings, name: str | None) -> tuple[str, PipelineConfig]:
    models = model_pipelines(settings)
    if name is not None:
        if name not in models:
            raise AdminError(404, f"no model pipeline {name!r} (known: "
                                  f"{', '.join(sorted(models)) or 'none'})")
        return name, models[name]
    if not models:
        raise AdminError(409, "no pipeline with a model is configured")
    first = next(iter(models))
    return first, models[first]


def _package(settings: NodeSettings, cfg: PipelineConfig) -> Any:
    from dicom_node.pipelines import PipelineError
    from dicom_node.pipelines.models import model_folder
    from inference.package import ModelPackage, PackageError

    try:
        return ModelPackage.load(model_folder(cfg, settings))
    except (PipelineError, PackageError) as err:
        raise AdminError(409, str(err)) from None


def _cache_file(settings: NodeSettings, series_uid: str, revision: int, package: Any) -> Path:
    root = Path(settings.storage.path).parent / "language"
    return root / f"{series_uid}.r{revision}.{package.name}-{package.spec.version}.json"


def series_facts(settings: NodeSettings, series_uid: str, package: Any) -> tuple[Any, bool]:
    """The structured findings of a stored series and whether they came from the cache.

    Raises:
        AdminError: 404 unknown series, 422 the series is not one volume.
    """
    from dicom_node import __version__
    from dicom_node.index import SeriesIndex
    from inference.omnimri.language.facts import SeriesFacts
    from inference.omnimri.tasks import run_omnimri
    from inference.volume import VolumeError, build_volume

    index = SeriesIndex(settings.storage.database_path)
    try:
        info = index.get_series(series_uid)
        instances = index.instances_of(series_uid) if info else []
    finally:
        index.close()
    if not info or not instances:
        raise AdminError(404, f"no stored series {series_uid}")
    cache = _cache_file(settings, series_uid, int(info.get("revision") or 0), package)
    if cache.is_file():
        return SeriesFacts.from_dict(json.loads(cache.read_text())), True
    try:
        volume = build_volume([i.path for i in instances])
    except VolumeError as err:
        raise AdminError(422, f"series {series_uid}: {err}") from None
    wanted = [t for t in FACT_INSTRUCTIONS if t in package.spec.tasks]
    res = run_omnimri(package, volume, wanted, node_version=__version__)
    facts = SeriesFacts.from_results(res, volume.affine)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts.to_dict()))
    tmp.replace(cache)
    return facts, False


def ask_series(settings: NodeSettings, series_uid: str, question: str, *, token_id: str,
               pipeline: str | None = None, audit: AuditLog | None = None) -> dict[str, Any]:
    """Answer ``question`` about a stored series (see the module docstring).

    Returns:
        ``answer`` (a sentence), ``value``, ``question_type``, ``refused``, ``reading`` (the
        text encoder's slots), ``model``, ``pipeline``, ``from_cache``.

    Raises:
        AdminError: 422 empty or too long a question; 404/409/422 as :func:`series_facts`, or
            409 when the package has no language model.
    """
    from inference.omnimri.language.facts import SeriesFacts
    from inference.omnimri.language.qa import answer
    from inference.omnimri.language.runtime import text_model_for

    question = " ".join(question.split())
    if not question or len(question) > MAX_QUESTION_CHARS:
        raise AdminError(422, f"a question needs 1-{MAX_QUESTION_CHARS} characters")
    name, cfg = _pipeline(settings, pipeline)
    package = _package(settings, cfg)
    from dicom_node.pipelines.models import engine_slot

    tm = text_model_for(package, engine_slot(cfg, settings).preference)
    if tm is None:
        raise AdminError(409, f"model package {package.name} has no language model "
                              "(run 'omnimri-node train language')")
    parse = tm.parse([question])[0]
    facts, cached = SeriesFacts(), False
    if parse.intent == "question" and parse.confident:
        facts, cached = series_facts(settings, series_uid, package)
    a = answer(parse, facts)
    qtype = parse.qtype if parse.intent == "question" else parse.intent
    (audit or AuditLog(settings.audit.path)).admin_action(
        token_id=token_id, action="ask", target=series_uid, question_type=qtype,
        refused=a.refused, pipeline=name)
    log.info("question answered", series_uid=series_uid, question_type=qtype,
             refused=a.refused, from_cache=cached, model=package.name)
    reading = {"intent": parse.intent, "confidence": parse.intent_p}
    if parse.intent == "question":
        reading |= {"qtype": parse.qtype, "target": parse.target, "side": parse.side,
                    "lobe": parse.lobe, "tissue": parse.tissue}
    return {"series_uid": series_uid, "answer": a.text, "value": a.value,
            "question_type": qtype, "refused": a.refused, "reading": reading,
            "model": facts.model or f"{package.name} {package.spec.version}", "pipeline": name,
            "from_cache": cached}


# --------------------------------------------------------------------------- HTTP

router = APIRouter()


class AskBody(BaseModel):
    """A question about the series, in words."""

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS,
                          description="e.g. 'how many white matter lesions are there?'")
    pipeline: str | None = Field(default=None, description="Model pipeline whose package "
                                 "answers; default the first configured.")


@router.post("/api/v1/series/{series_uid}/ask", tags=["series"],
             summary="Ask a question about a series (viewer)")
def ask_route(request: Request, who: Viewer, series_uid: str, body: AskBody) -> dict[str, Any]:
    """Answer from the series' structured findings (runs the model once, then reuses them).

    Questions on lesions (presence, count, side, lobe, size), the diagnosis and tissue
    volumes; anything else is refused (``refused: true``). Audited with the token id.
    """
    parts = request.app.state.backend.parts
    return ask_series(parts.settings, series_uid, body.question, token_id=who.token_id,
                      pipeline=body.pipeline, audit=parts.audit)
