"""INT8 QDQ variants, the variants schema, FLOP counting, the CPU peak and the ORT graph cache.

The OmniMRI accuracy check itself (held-out cases through the served path) is run by
``omnimri-node engines quantize`` / ``engines verify --accuracy`` on the shipped package; here
its detection matching and the gate it feeds (``variant:`` needs ``accuracy_check.passed``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from inference.engines import EngineUnavailable, create_engine
from inference.engines.flops import count_macs, measure_peak, physical_cores
from inference.engines.onnxruntime import OnnxRuntimeEngine
from inference.package import ModelPackage, PackageError
from inference.quantize import INT8_FILE, _same_detections, add_variant, quantize_onnx
from tests.fixtures.tiny_model import TINY_PATCH


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, *TINY_PATCH)).astype(np.float32)


@pytest.fixture()
def pkg(tmp_path: Path, tiny_package: ModelPackage) -> ModelPackage:
    """A private copy of the tiny package (variants and caches are written into it)."""
    shutil.copytree(tiny_package.folder, tmp_path / "tiny")
    return ModelPackage.load(tmp_path / "tiny")


@pytest.fixture()
def int8_pkg(pkg: ModelPackage) -> tuple[ModelPackage, dict[str, object]]:
    info = quantize_onnx(pkg.onnx_path(), pkg.file(INT8_FILE), [_x(1, s) for s in range(8)],
                         "image")
    return pkg, info


def test_count_macs_matches_the_tiny_net_by_hand(tiny_package: ModelPackage) -> None:
    cost = count_macs(tiny_package.onnx_path())
    vox = int(np.prod(TINY_PATCH))
    conv = vox * 8 * (1 * 27) + vox * 8 * (8 * 27) + vox * 3 * 8  # conv1, conv2, 1x1 seg head
    assert cost.by_op["Conv"] == conv
    assert cost.by_op.get("Gemm", 0) + cost.by_op.get("MatMul", 0) == 8 * 2  # the Linear
    assert cost.macs == conv + 16 and not cost.unknown
    assert cost.gflops == pytest.approx(2 * cost.macs / 1e9)
    assert count_macs(tiny_package.onnx_path(), batch=4).macs == cost.macs  # per sample


def test_peak_and_cores_are_measured() -> None:
    cores = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    peak = measure_peak(1, n=256, seconds=0.05)
    assert peak["float32"].gflops > 0.5 and peak["float32"].library
    assert peak["int8"].gflops > 0.5 and "onnxruntime MatMulInteger" in peak["int8"].tried
    assert set(peak) == {"float32", "bfloat16", "int8"}


def test_qdq_variant_is_per_channel_and_close(int8_pkg: tuple[ModelPackage, dict[str, object]]
                                              ) -> None:
    import onnx

    pkg, info = int8_pkg
    assert info["format"] == "QDQ" and info["calibration_windows"] == 8
    model = onnx.load(str(pkg.file(INT8_FILE)))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    inits = {i.name: i for i in model.graph.initializer}
    # per-channel: some weight DequantizeLinear has one scale per output channel (8)
    scales = [list(inits[n.input[1]].dims) for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert [8] in scales
    x = _x(3, seed=42)
    want = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"]).run(
        {"image": x})
    got = OnnxRuntimeEngine(pkg.file(INT8_FILE), providers=["CPUExecutionProvider"]).run(
        {"image": x})
    err = np.abs(got["tissues"] - want["tissues"]).max()
    scale = np.abs(want["tissues"]).max()
    assert 0 < err < 0.05 * scale  # quantised (not identical), but close
    assert (got["tissues"].argmax(1) == want["tissues"].argmax(1)).mean() > 0.9


def test_variant_declared_checked_and_chosen(int8_pkg: tuple[ModelPackage, dict[str, object]]
                                             ) -> None:
    pkg, info = int8_pkg
    add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=dict(info), check=None,
                make_default=False)
    loaded = ModelPackage.load(pkg.folder)
    assert loaded.variant_names() == ["fp32", "int8"] and loaded.spec.variant == "fp32"
    first = create_engine("onnxruntime", loaded)
    assert isinstance(first, OnnxRuntimeEngine) and first.model_path == loaded.onnx_path()
    with pytest.raises(ValueError, match="did not pass the accuracy check"):
        add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation={},
                    check={"passed": False}, make_default=True)
    add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=dict(info),
                check={"passed": True, "cases": 6}, make_default=True)
    loaded = ModelPackage.load(pkg.folder)
    assert loaded.spec.variant == "int8" and loaded.model_path().name == INT8_FILE
    engine = create_engine("onnxruntime", loaded)
    assert isinstance(engine, OnnxRuntimeEngine) and engine.model_path.name == INT8_FILE
    fp32 = create_engine("onnxruntime", loaded, variant="fp32")
    assert isinstance(fp32, OnnxRuntimeEngine) and fp32.model_path.name == "model.onnx"
    with pytest.raises(EngineUnavailable, match="no variant 'bf16'"):
        create_engine("onnxruntime", loaded, variant="bf16")


def _write_spec(folder: Path, **changes: object) -> None:
    path = folder / "model.yaml"
    spec = yaml.safe_load(path.read_text())
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))


def test_variant_schema_refuses_unchecked_or_missing(pkg: ModelPackage) -> None:
    v = {"name": "int8", "file": INT8_FILE, "precision": "int8",
         "accuracy_check": {"passed": False}}
    _write_spec(pkg.folder, variants=[v], variant="int8")
    with pytest.raises(PackageError, match="has not passed its accuracy check"):
        ModelPackage.load(pkg.folder)
    _write_spec(pkg.folder, variants=[{**v, "accuracy_check": {"passed": True}}],
                variant="int8")
    with pytest.raises(PackageError, match="variant 'int8' runs but .*model.int8.onnx is missing"):
        ModelPackage.load(pkg.folder)
    _write_spec(pkg.folder, variants=[v], variant="fp16")
    with pytest.raises(PackageError, match="variant 'fp16' is not declared"):
        ModelPackage.load(pkg.folder)
    _write_spec(pkg.folder, variants=[{**v, "name": "fp32"}], variant="fp32")
    with pytest.raises(PackageError, match="not 'fp32'"):
        ModelPackage.load(pkg.folder)
    _write_spec(pkg.folder, variants=[{**v, "precision": "int4"}], variant="fp32")
    with pytest.raises(PackageError, match="variants.0.precision"):
        ModelPackage.load(pkg.folder)


def test_tensorrt_builds_int8_from_the_qdq_variant(
        int8_pkg: tuple[ModelPackage, dict[str, object]]) -> None:
    from inference.engines.tensorrt import build_input

    pkg, info = int8_pkg
    add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=dict(info), check=None,
                make_default=False)
    pkg = ModelPackage.load(pkg.folder)
    assert build_input(pkg, variant="int8") == (pkg.file(INT8_FILE), "int8")
    assert build_input(pkg) == (pkg.onnx_path(), "fp32")
    assert build_input(pkg, precision="fp16") == (pkg.onnx_path(), "fp16")
    with pytest.raises(EngineUnavailable, match="unknown precision 'int4'"):
        build_input(pkg, precision="int4")
    with pytest.raises(EngineUnavailable, match="no variant 'fp8'"):
        build_input(pkg, variant="fp8")


def test_optimised_graph_cache(pkg: ModelPackage, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    x = _x(2)
    first = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"],
                              optimized_dir=cache)
    assert first.optimized_path is not None and first.optimized_path.is_file()
    name = first.optimized_path.name
    assert name.startswith("model.") and f"ort{__import__('onnxruntime').__version__}" in name
    second = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"],
                               optimized_dir=cache)
    assert second.optimized_path == first.optimized_path
    plain = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"])
    for k, want in plain.run({"image": x}).items():
        np.testing.assert_allclose(second.run({"image": x})[k], want, atol=1e-5)
    # the int8 variant's cached graph lives beside it and is not taken for the fp32 one's
    (cache / "model.int8.0123456789ab.ort0.cpu.cpu00000000.onnx").write_bytes(b"other")
    # a changed model gets a new file; the stale one of the same graph goes
    shutil.copy(pkg.onnx_path(), tmp_path / "model.onnx")
    from tests.fixtures.tiny_model import build_tiny_package

    other = build_tiny_package(tmp_path / "other", seed=1)
    shutil.copy(other.onnx_path(), pkg.onnx_path())
    third = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"],
                              optimized_dir=cache)
    assert third.optimized_path is not None and third.optimized_path.name != name
    names = sorted(p.name for p in cache.iterdir())
    assert name not in names and third.optimized_path.name in names
    assert "model.int8.0123456789ab.ort0.cpu.cpu00000000.onnx" in names
    # a damaged cached graph is rebuilt, not fatal
    third.optimized_path.write_bytes(b"garbage")
    fourth = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"],
                               optimized_dir=cache)
    assert fourth.run({"image": x})["tissues"].shape == (2, 3, *TINY_PATCH)
    assert third.optimized_path.stat().st_size > 100


def test_read_only_cache_folder_is_skipped(pkg: ModelPackage, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-folder"
        blocked.write_text("x")  # mkdir under a file fails even for root
        cache = blocked / "cache"
    else:
        cache = tmp_path / "ro"
        cache.mkdir()
        cache.chmod(0o500)
    eng = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"],
                            optimized_dir=cache)
    assert eng.optimized_path is None
    assert eng.run({"image": _x(1)})["tissues"].shape == (1, 3, *TINY_PATCH)


def test_threads_default_to_physical_cores(pkg: ModelPackage) -> None:
    eng = OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"])
    assert eng.intra_op_threads == physical_cores()
    assert OnnxRuntimeEngine(pkg.onnx_path(), providers=["CPUExecutionProvider"],
                             intra_op_threads=1).intra_op_threads == 1


def _det(finding: str, mm: tuple[float, float, float]) -> SimpleNamespace:
    return SimpleNamespace(finding=finding, centroid_lps_mm=mm)


def test_same_detections_matching() -> None:
    a = [_det("wmh", (0, 0, 0)), _det("mass", (10, 0, 0))]
    assert _same_detections(a, [_det("mass", (11, 1, 0)), _det("wmh", (0, 2, 0))])
    assert not _same_detections(a, [_det("mass", (10, 0, 0))])  # one missing
    assert not _same_detections(a, [_det("wmh", (0, 0, 0)), _det("mass", (20, 0, 0))])  # moved
    assert not _same_detections(a, [_det("wmh", (0, 0, 0)), _det("wmh", (10, 0, 0))])  # kind
    assert _same_detections([], [])


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "omnimri-tiny"


@pytest.mark.slow
def test_shipped_model_int8_through_the_served_path(tmp_path: Path) -> None:
    """Calibrate on one validation case, check on one held-out case: the numbers and the gate."""
    from inference.quantize import accuracy_check, quantize_package, validation_inputs

    shutil.copytree(SHIPPED, tmp_path / "pkg", ignore=shutil.ignore_patterns("ort_cache"))
    pkg = ModelPackage.load(tmp_path / "pkg")
    inputs = validation_inputs(pkg, cases=1, every=10)
    spec = pkg.spec.input
    assert inputs and inputs[0].shape == (1, spec.channels, *spec.patch_size)
    path, info = quantize_package(pkg, cases=1, every=10)
    assert path == pkg.file(INT8_FILE) and info["calibration_set"] == "validation"
    assert info["calibration_windows"] == len(inputs)
    add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=info, check=None,
                make_default=False)
    res = accuracy_check(ModelPackage.load(pkg.folder), "int8", cases=1)
    assert res["set"] == "held-out" and res["cases"] == 1
    for k in ("brain", "csf", "gm", "wm"):
        d = res[f"dice_{k}"]
        assert 0 < d["fp32"] <= 1 and 0 < d["int8"] <= 1
        assert d["delta"] == pytest.approx(d["int8"] - d["fp32"], abs=2e-5)
    gate = (res["tissue_dice_max_mean_delta"] <= 0.005 and res["same_detections_cases"] == 1
            and res["same_diagnosis_cases"] == 1)
    assert res["passed"] is gate
    assert res["detections"]["matched"] <= min(res["detections"]["fp32"],
                                               res["detections"]["int8"])
    if not res["passed"]:
        with pytest.raises(ValueError, match="did not pass"):
            add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=info, check=res,
                        make_default=True)
