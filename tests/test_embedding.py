"""The image embedding output (issue #16 item 5): spec, pooling in the runner, OmniMRI export.

The runner tests use a hand-made ONNX graph whose window embeddings and brain probabilities
are known, so the pooled vector is checked against numbers computed here independently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from inference.package import ModelPackage, ModelSpec, PackageError
from inference.runner import run_model
from inference.volume import SliceRef, Volume

_LABEL = {"value": 1, "label": "Brain",
          "category": {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"},
          "type": {"value": "12738006", "scheme": "SCT", "meaning": "Brain"}}


def _spec(embedding: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "emb", "version": "1", "tasks": ["embed", "segment"],
        "input": {"name": "x", "layout": "NCHW", "spacing_mm": None, "orientation": "native",
                  "patch_size": [8, 8], "overlap": 0.0, "batch_size": 3,
                  "normalisation": {"kind": "none"}},
        "outputs": [
            {"name": "seg", "kind": "segmentation", "activation": "softmax",
             "labels": [_LABEL]},
            {"name": "score", "kind": "classification", "classes": [{"name": "a"},
                                                                    {"name": "b"}]},
            {"kind": "embedding", "name": "emb", **embedding},
        ],
        "task_outputs": {"embed": ["emb"], "segment": ["seg"]},
    }


def _graph(path: Path) -> None:
    """``x`` [N,1,8,8] -> ``seg`` [N,2,8,8] = (0, 10x-5), ``emb`` [N,2] = (mean x, mean 1-x),
    ``score`` [N,2] = emb."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mul", ["x", "ten"], ["x10"]),
        helper.make_node("Sub", ["x10", "five"], ["fg"]),
        helper.make_node("Mul", ["x", "zero"], ["bg"]),
        helper.make_node("Concat", ["bg", "fg"], ["seg"], axis=1),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sub", ["one", "m"], ["m1"]),
        helper.make_node("Unsqueeze", ["m", "ax1"], ["mu"]),
        helper.make_node("Unsqueeze", ["m1", "ax1"], ["m1u"]),
        helper.make_node("Concat", ["mu", "m1u"], ["emb"], axis=1),
        helper.make_node("Identity", ["emb"], ["score"]),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "emb", [helper.make_tensor_value_info("x", f, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("seg", f, ["N", 2, 8, 8]),
         helper.make_tensor_value_info("score", f, ["N", 2]),
         helper.make_tensor_value_info("emb", f, ["N", 2])],
        initializer=[numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                     (("ten", 10.0), ("five", 5.0), ("zero", 0.0), ("one", 1.0))]
        + [numpy_helper.from_array(np.array([1], np.int64), "ax1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _package(folder: Path, embedding: dict[str, Any]) -> ModelPackage:
    (folder / "1").mkdir(parents=True, exist_ok=True)
    _graph(folder / "1" / "model.onnx")
    (folder / "model.yaml").write_text(yaml.safe_dump(_spec(embedding)))
    return ModelPackage.load(folder)


def _volume() -> Volume:
    """Slice 0 all ones (brain), slices 1-3 zeros (air)."""
    arr = np.zeros((4, 8, 8), np.float32)
    arr[0] = 1.0
    slices = [SliceRef(f"2.25.{n + 1}", "1.2.840.10008.5.1.4.1.1.4") for n in range(4)]
    return Volume(array=arr, affine=np.eye(4), slices=slices)


def _run(folder: Path, embedding: dict[str, Any]) -> np.ndarray:
    from inference.engines.onnxruntime import OnnxRuntimeEngine

    pkg = _package(folder, embedding)
    eng = OnnxRuntimeEngine(pkg.onnx_path())
    try:
        raw = run_model(pkg, _volume(), eng, ["embed"])
    finally:
        eng.close()
    return raw.embedding["emb"]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_pooled_embedding_weights_windows_by_brain_probability(tmp_path: Path) -> None:
    # slice 0: emb (1, 0), brain p = softmax(0, 5)[1]; slices 1-3: emb (0, 1), p = softmax(0, -5)[1]
    p_in, p_out = 1 / (1 + np.exp(-5.0)), 1 / (1 + np.exp(5.0))
    want = _unit(np.array([p_in, 3 * p_out]) / (p_in + 3 * p_out))
    got = _run(tmp_path / "seg", {"pool": "segmentation", "weight_output": "seg"})
    assert got.dtype == np.float32 and got.shape == (2,)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # equal weights: the mean (0.25, 0.75); intensity foreground above 0.5: slice 0 alone
    np.testing.assert_allclose(_run(tmp_path / "mean", {"pool": "mean"}),
                               _unit(np.array([0.25, 0.75])), atol=1e-6)
    np.testing.assert_allclose(
        _run(tmp_path / "fg", {"pool": "foreground", "foreground_above": 0.5}), [1.0, 0.0],
        atol=1e-6)
    # not normalised: the weighted mean itself
    np.testing.assert_allclose(
        _run(tmp_path / "raw", {"pool": "mean", "normalise": False}), [0.25, 0.75], atol=1e-6)


def test_a_series_without_foreground_falls_back_to_the_plain_mean(tmp_path: Path) -> None:
    from inference.package import EmbeddingOutput
    from inference.runner import EmbeddingPool

    pool = EmbeddingPool(EmbeddingOutput(kind="embedding", name="e", pool="foreground"), 0)
    pool.add(np.array([[3.0, 4.0], [3.0, 4.0]]), np.zeros((2, 1, 4, 4)))
    np.testing.assert_allclose(pool.result(), [0.6, 0.8], atol=1e-6)
    with pytest.raises(ValueError, match="no window"):
        EmbeddingPool(EmbeddingOutput(kind="embedding", name="e")).result()


def test_the_embedding_needs_its_weights_output(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate(_spec({"pool": "segmentation", "weight_output": "seg"}))
    assert spec.outputs_for(["embed"]) == ["seg", "emb"]  # weights come along
    with pytest.raises(ValueError, match="pool 'segmentation' needs weight_output"):
        ModelSpec.model_validate(_spec({"pool": "segmentation"}))
    with pytest.raises(ValueError, match="'score' is not a softmax segmentation output"):
        ModelSpec.model_validate(_spec({"pool": "segmentation", "weight_output": "score"}))
    (tmp_path / "1").mkdir()
    _graph(tmp_path / "1" / "model.onnx")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(_spec({"pool": "sideways"})))
    with pytest.raises(PackageError, match="outputs.2.embedding.pool"):
        ModelPackage.load(tmp_path)


def test_a_package_without_the_output_runs_as_before(tiny_package: ModelPackage) -> None:
    from inference.engines.onnxruntime import OnnxRuntimeEngine

    vol = Volume(array=np.random.default_rng(0).random((20, 20, 20)).astype(np.float32),
                 affine=np.eye(4) * 2.0 + np.diag([0, 0, 0, -1.0]),
                 slices=[SliceRef(f"2.25.{n + 1}", "1.2") for n in range(20)])
    eng = OnnxRuntimeEngine(tiny_package.onnx_path())
    try:
        raw = run_model(tiny_package, vol, eng, ["suggest a diagnosis"])
    finally:
        eng.close()
    assert raw.embedding == {} and set(raw.classification) == {"diagnosis"}


def test_omnimri_export_has_the_embedding_checked_against_pytorch(tmp_path: Path) -> None:
    import torch

    from inference.omnimri import synthetic as syn
    from inference.omnimri.config import preset
    from inference.omnimri.evaluate import ServedModel, case_volume
    from inference.omnimri.export import (
        VISION_OUTPUTS,
        export_decoder,
        export_vision,
        model_spec,
        verify,
    )
    from inference.omnimri.model import OmniMRI, ReportDecoder

    torch.manual_seed(0)
    cfg = preset("tiny", conv_channels=(4, 8, 8), embed_dim=16, depth=1, heads=2, text_dim=16,
                 text_layers=1, text_heads=2, align_dim=8, patch_size=64)
    vision, decoder = OmniMRI(cfg).eval(), ReportDecoder(cfg).eval()
    folder = tmp_path / "pkg"
    export_vision(vision, folder / "1" / "model.onnx")
    export_decoder(decoder, folder / "1" / "decoder.onnx")
    diffs = verify(vision, decoder, folder / "1")
    assert "embedding" in VISION_OUTPUTS and diffs["embedding"] <= 1e-4
    (folder / "model.yaml").write_text(yaml.safe_dump(model_spec(vision, "t", "1")))
    pkg = ModelPackage.load(folder)
    out = pkg.spec.output("embedding")
    assert out.kind == "embedding" and out.weight_output == "tissue"
    assert "embedding" in pkg.spec.outputs_for(["write the report"])
    assert "embedding" not in pkg.spec.outputs_for(["segment brain tissues"])
    served = ServedModel.load(folder, threads=1)
    try:
        case = syn.make_case(7, diagnosis=0)
        vol = case_volume(case)
        vol.array = vol.array[40:52].copy()  # a slab: fast, still brain
        vol.slices = vol.slices[40:52]
        res = served.run(vol, ["write the report"])
        assert res.embedding is not None and res.embedding.shape == (cfg.align_dim,)
        assert abs(float(np.linalg.norm(res.embedding)) - 1.0) < 1e-5
        assert served.run(vol, ["segment brain tissues"]).embedding is None
    finally:
        served.close()
