"""``omnimri-node engines list | build | verify`` on the tiny package (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from inference.package import ModelPackage
from tests.fixtures.tiny_model import TINY_PATCH, make_tiny_net


@pytest.fixture()
def models_config(tmp_path: Path, tiny_package: ModelPackage) -> Path:
    models = tmp_path / "models"
    shutil.copytree(tiny_package.folder, models / "omnimri-tiny-test")
    (models / "broken").mkdir()
    (models / "broken" / "model.yaml").write_text("name: broken\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"models:\n  path: {models}\n  intra_op_threads: 1\n")
    return cfg


def test_list_engines_and_packages(models_config: Path) -> None:
    result = CliRunner().invoke(app, ["engines", "list", "-c", str(models_config), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    engines = {e["engine"]: e for e in data["engines"]}
    assert engines["onnxruntime"]["usable"] and "CPUExecutionProvider" in engines[
        "onnxruntime"]["detail"]
    assert not engines["triton"]["usable"] and "no models.triton_url" in engines["triton"]["detail"]
    valid = [p for p in data["packages"] if p["valid"]]
    assert [(p["name"], p["versions"], p["torchscript"]) for p in valid] == [("tiny", "1", True)]
    assert valid[0]["variants"] == "fp32" and valid[0]["runs"] == "fp32"
    broken = [p for p in data["packages"] if not p["valid"]]
    assert len(broken) == 1 and "version: Field required" in broken[0]["problem"]


def test_build_refuses_without_tensorrt(models_config: Path) -> None:
    from inference.engines.tensorrt import tensorrt_status

    if tensorrt_status().startswith("ok"):
        pytest.skip("TensorRT usable here; tests/gpu covers engines build")
    result = CliRunner().invoke(app, ["engines", "build", "tiny", "-c", str(models_config)])
    assert result.exit_code == 3
    assert "cannot build a TensorRT plan here:" in result.stderr


def test_unknown_model(models_config: Path) -> None:
    result = CliRunner().invoke(app, ["engines", "verify", "nope", "-c", str(models_config)])
    assert result.exit_code == 3 and "no model package 'nope'" in result.stderr


def test_verify_agrees_then_catches_a_wrong_engine(models_config: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["engines", "verify", "omnimri-tiny-test", "-c",
                                 str(models_config), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["engine"]: r for r in json.loads(result.stdout)}
    assert rows["onnxruntime"]["status"] == "ran" and rows["torch"]["status"] == "ran"
    assert rows["torch"]["ok"] and float(rows["torch"]["max_abs_diff"]) < 1e-3
    assert rows["tensorrt"]["status"].startswith("skipped: ") or rows["tensorrt"]["ok"]
    # replace the TorchScript by a net with other weights: verify must fail
    import torch

    folder = models_config.parent / "models" / "omnimri-tiny-test"
    wrong = torch.jit.trace(make_tiny_net(seed=1), torch.zeros((1, 1, *TINY_PATCH)))
    torch.jit.save(wrong, str(folder / "1" / "model.pt"))
    result = runner.invoke(app, ["engines", "verify", "tiny", "-c", str(models_config)])
    assert result.exit_code == 1
    assert "outputs differ by more than 0.001" in result.stderr


def test_verify_reports_a_variant_without_failing_on_it(models_config: Path) -> None:
    from inference.quantize import INT8_FILE, add_variant, quantize_onnx

    folder = models_config.parent / "models" / "omnimri-tiny-test"
    pkg = ModelPackage.load(folder)
    x = [np.random.default_rng(s).standard_normal((1, 1, *TINY_PATCH)).astype(np.float32)
         for s in range(4)]
    info = quantize_onnx(pkg.onnx_path(), pkg.file(INT8_FILE), x, "image")
    add_variant(folder, "int8", INT8_FILE, "int8", quantisation=info, check=None,
                make_default=False)
    result = CliRunner().invoke(app, ["engines", "verify", "tiny", "-c", str(models_config),
                                      "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["engine"]: r for r in json.loads(result.stdout)}
    row = rows["onnxruntime:int8"]
    assert row["status"] == "ran" and row["variant"] == "int8" and row["ok"] == "see --accuracy"
    assert float(row["max_abs_diff"]) > 0
    assert set(row["argmax_agreement"]) == {"tissues", "diagnosis"}
