"""The ``triton`` engine against a REAL Triton Inference Server with the shipped model.

The server is ``tritonserver`` 2.51 from the ``nvidia-pytriton`` wheel (tests/fixtures/triton.py:
why a NumPy 1 venv for its Python back-end stub). The model repository is written from
``models/omnimri-tiny`` by :func:`write_model_repository` with the Python back end (the wheel
has no ONNX Runtime back end), so Triton runs the package's default graph variant with ONNX
Runtime in its Python back end, and the node's engine must get what its own ONNX Runtime engine
gets on the same graph, over HTTP (binary tensors) and gRPC.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inference.engines import EngineUnavailable, create_engine, select_engine
from inference.engines.triton import TritonEngine
from inference.engines.triton_repo import model_config, write_model_repository
from inference.package import ModelPackage
from inference.runner import run_model
from inference.volume import SliceRef, Volume
from omnimri_samples import brain_volume
from tests.fixtures.triton import TritonServer, triton_server, triton_unavailable

pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "omnimri-tiny"


@pytest.fixture(scope="module")
def shipped() -> ModelPackage:
    return ModelPackage.load(SHIPPED)


@pytest.fixture(scope="module")
def triton(shipped: ModelPackage, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[TritonServer]:
    reason = triton_unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("triton")
    write_model_repository(shipped, work / "repo", "python", instances=1, intra_op_threads=2)
    with triton_server(work / "repo", work) as server:
        yield server


def _windows(package: ModelPackage, n: int, seed: int) -> np.ndarray:
    h, w = package.spec.input.patch_size[:2]
    c = 2 * package.spec.input.context_slices + 1
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_real_triton_matches_onnxruntime(shipped: ModelPackage, triton: TritonServer,
                                         protocol: str) -> None:
    if protocol == "grpc":
        pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    url = triton.http_url if protocol == "http" else triton.grpc_url
    engine = select_engine(shipped, ["triton"], triton_url=url)
    assert engine.name == "triton"
    assert engine.provider == f"{url}/omnimri-tiny"
    local = create_engine("onnxruntime", shipped)
    assert engine.input_names == local.input_names
    assert sorted(engine.output_names) == sorted(local.output_names)
    x = _windows(shipped, shipped.spec.input.batch_size, seed=7)
    got, want = engine.run({"image": x}), local.run({"image": x})
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        assert got[name].dtype == np.float32
        # Same graph, same ONNX Runtime; only the session's optimisation level may differ.
        np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=1e-4, err_msg=name)
    assert np.isfinite(got["tissue"]).all() and np.abs(got["tissue"]).max() > 0
    engine.close()
    local.close()


def test_real_triton_serves_the_node_path(shipped: ModelPackage, triton: TritonServer) -> None:
    """``run_model`` (windows, batches, stitching, post-processing) on Triton = on ORT."""
    arr, aff = brain_volume(2, slices=6)
    vol = Volume(array=arr, affine=aff, slices=[
        SliceRef(f"1.2.{k}", "1.2.840.10008.5.1.4.1.1.4") for k in range(arr.shape[0])])
    instructions = ["segment brain tissues", "suggest a diagnosis"]
    remote = TritonEngine.for_package(shipped, triton.grpc_url)
    local = create_engine("onnxruntime", shipped)
    got = run_model(shipped, vol, remote, instructions)
    want = run_model(shipped, vol, local, instructions)
    assert got.engine == "triton" and got.windows == want.windows > 0
    assert set(got.segmentation) == set(want.segmentation) >= {"tissue"}
    for name, seg in want.segmentation.items():
        np.testing.assert_allclose(got.segmentation[name].probabilities, seg.probabilities,
                                   atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(got.segmentation[name].label_map, seg.label_map)
    for name, cls in want.classification.items():
        assert got.classification[name].probabilities == pytest.approx(cls.probabilities,
                                                                       abs=1e-4), name
    remote.close()
    local.close()


def test_real_triton_batch_limit_and_unknown_model(shipped: ModelPackage,
                                                   triton: TritonServer) -> None:
    from tritonclient.utils import InferenceServerException

    engine = TritonEngine.for_package(shipped, triton.http_url)
    one = engine.run({"image": _windows(shipped, 1, seed=1)})
    assert one["diagnosis"].shape == (1, 3)
    too_many = 2 * shipped.spec.input.batch_size + 1  # config.pbtxt max_batch_size + 1
    with pytest.raises(InferenceServerException, match="batch"):
        engine.run({"image": _windows(shipped, too_many, seed=2)})
    engine.close()
    with pytest.raises(EngineUnavailable, match="model 'nope' is not ready"):
        TritonEngine(triton.http_url, "nope")
    with pytest.raises(EngineUnavailable, match="model 'nope' is not ready"):
        TritonEngine(triton.grpc_url, "nope")


def test_model_config_names_the_variant_and_shapes(shipped: ModelPackage) -> None:
    graph = shipped.model_path()  # the variant the package runs by default
    spec = shipped.spec.input
    c, (h, w) = 2 * spec.context_slices + 1, spec.patch_size[:2]
    text = model_config(shipped, graph, "onnxruntime")
    assert 'backend: "onnxruntime"' in text
    assert f'default_model_filename: "{graph.name}"' in text  # not always model.onnx
    assert f"max_batch_size: {2 * spec.batch_size}" in text and "dynamic_batching" in text
    assert f'{{ name: "image" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }}' in text
    unbatched = model_config(shipped, graph, "python", max_batch_size=0)
    assert "dynamic_batching" not in unbatched
    assert f'{{ name: "image" data_type: TYPE_FP32 dims: [ -1, {c}, {h}, {w} ] }}' in unbatched
    assert f'string_value: "{graph.name}"' in unbatched and "KIND_CPU" in unbatched
    fp32 = model_config(shipped, shipped.model_path(variant="fp32"), "onnxruntime")
    assert 'default_model_filename: "model.onnx"' in fp32
