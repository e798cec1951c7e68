"""The one engine cache: an edited package, a reload and shutdown close the old engines.

Real ONNX Runtime (and TorchScript) engines of the tests' tiny package; each engine's
``close`` is wrapped to count the calls, so "closed" means the engine's own close ran.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.pipelines import omnimri as pipe
from dicom_node.pipelines.models import engine_slot, engine_slots
from inference.engines import Engine
from inference.engines.cache import EngineCache, EngineSlot, default_cache, package_fingerprint
from inference.package import ModelPackage


@pytest.fixture()
def folder(tiny_package: ModelPackage, tmp_path: Path) -> Path:
    out = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_package.folder, out)
    return out


def _ort(folder: Path) -> EngineSlot:
    return EngineSlot.of(folder, ["onnxruntime"], intra_op_threads=1)


def _count_closes(engine: Engine, closes: list[str]) -> None:
    real: Callable[[], None] = engine.close

    def close() -> None:
        closes.append(engine.name)
        real()

    engine.close = close  # type: ignore[method-assign]


def _edit_model_yaml(folder: Path, version: str) -> None:
    path = folder / "model.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('version: 0.0.1', f'version: {version}', 1)
                    .replace("version: '0.0.1'", f"version: '{version}'", 1), encoding="utf-8")


def test_edited_model_yaml_closes_the_old_engine(folder: Path) -> None:
    cache, closes = EngineCache(), list[str]()
    first = cache.get(_ort(folder))
    _count_closes(first.engine, closes)
    again = cache.get(_ort(folder))
    assert first.fresh and not again.fresh and again.engine is first.engine
    assert closes == []

    _edit_model_yaml(folder, "0.0.2")
    assert ModelPackage.load(folder).spec.version == "0.0.2"
    edited = cache.get(_ort(folder))
    assert edited.fresh and edited.engine is not first.engine
    assert edited.package.spec.version == "0.0.2"
    assert closes == ["onnxruntime"] and cache.closes == 1 and len(cache) == 1
    # A replaced graph file is a new package too (same model.yaml).
    graph = folder / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes())
    assert cache.get(_ort(folder)).engine is not edited.engine
    assert cache.closes == 2 and cache.loads == 3
    assert cache.close() == 1 and cache.closes == 3 and len(cache) == 0


def test_an_engine_in_use_closes_when_its_job_ends(folder: Path) -> None:
    cache, closes = EngineCache(), list[str]()
    with cache.lease(_ort(folder)) as job:
        _count_closes(job.engine, closes)
        _edit_model_yaml(folder, "0.0.3")
        newer = cache.get(_ort(folder))
        assert newer.engine is not job.engine
        assert closes == []  # not under the running job
        assert job.engine.output_names  # still usable
    assert closes == ["onnxruntime"] and cache.closes == 1
    cache.close()


def test_reload_keeps_the_configured_engines_and_closes_the_rest(folder: Path) -> None:
    cache, closes = EngineCache(), list[str]()
    ort = cache.get(EngineSlot.of(folder, ["onnxruntime"]))
    torch = cache.get(EngineSlot.of(folder, ["torch"]))
    _count_closes(ort.engine, closes)
    _count_closes(torch.engine, closes)
    settings = NodeSettings.model_validate({
        "models": {"path": str(folder.parent), "engine_order": ["torch"]},
        "pipelines": {"brain": {"kind": "omnimri", "model": "tiny"},
                      "preview": {"kind": "preview", "model": None}}})
    wanted = engine_slots(settings)
    assert wanted == {EngineSlot.of(folder, "torch")}
    assert cache.retain(wanted) == 1 and closes == ["onnxruntime"]
    assert cache.get(EngineSlot.of(folder, ["torch"])).engine is torch.engine
    assert cache.close() == 1 and closes == ["onnxruntime", "torch"]
    assert cache.close() == 0 and cache.closes == 2  # closed exactly once


def test_the_pipeline_uses_the_process_cache(folder: Path) -> None:
    cache = default_cache()
    cache.close()
    settings = NodeSettings.model_validate(
        {"models": {"path": str(folder.parent), "engine_order": ["onnxruntime"]}})
    cfg = PipelineConfig(kind="omnimri", model="tiny")
    package, engine = pipe.load_model(cfg, settings)
    assert cache.slots() == [engine_slot(cfg, settings)]
    assert pipe.load_model(cfg, settings)[1] is engine
    closes: list[str] = []
    _count_closes(engine, closes)
    _edit_model_yaml(folder, "0.0.4")
    assert pipe.load_model(cfg, settings)[0].spec.version == "0.0.4"
    assert closes == ["onnxruntime"]
    cache.close()


def test_fingerprint_ignores_engine_caches(folder: Path) -> None:
    before = package_fingerprint(folder)
    (folder / "1" / "ort_cache").mkdir(exist_ok=True)
    (folder / "1" / "ort_cache" / "x.onnx").write_bytes(b"optimised")
    (folder / "1" / "model.sm90.trt10.fp32.plan").write_bytes(b"plan")
    assert package_fingerprint(folder) == before
    (folder / "1" / "vocabulary.txt").write_text("a\nb\n")
    assert package_fingerprint(folder) != before


def test_node_reload_and_shutdown_close_the_engines(folder: Path, tmp_path: Path) -> None:
    from dicom_node.config import parse_config
    from dicom_node.runtime import Node
    from tests.fixtures.net import free_port

    def config(pipelines: Mapping[str, Mapping[str, str | None]]) -> NodeSettings:
        return parse_config({"node": {"port": free_port()},
                             "storage": {"path": "spool", "fsync": False},
                             "models": {"path": str(folder.parent),
                                        "engine_order": ["onnxruntime"]},
                             "pipelines": pipelines}, tmp_path)

    brain: dict[str, Mapping[str, str | None]] = {"brain": {"kind": "omnimri", "model": "tiny"}}
    settings = config(brain)
    node = Node(settings)
    assert node.engines is default_cache()
    node.engines.close()
    closes: list[str] = []
    _, engine = pipe.load_model(settings.pipelines["brain"], settings)
    _count_closes(engine, closes)
    node.apply_settings(config(brain | {"preview": {"kind": "preview", "model": None}}))
    assert closes == [] and len(node.engines) == 1  # still configured: kept warm
    node.apply_settings(config({"preview": {"kind": "preview", "model": None}}))
    assert closes == ["onnxruntime"] and len(node.engines) == 0  # pipeline gone: closed

    _, engine = pipe.load_model(settings.pipelines["brain"], settings)
    _count_closes(engine, closes)
    node.stop()
    node.jobs.close()
    assert closes == ["onnxruntime", "onnxruntime"] and len(node.engines) == 0
