"""Native TensorRT engine: plans built from the package's ONNX with the ``tensorrt`` Python API.

* Plans are keyed by GPU compute capability and TensorRT version in their file name
  (:meth:`inference.package.ModelPackage.plan_path`), so a plan is rebuilt when either
  changes and a plan from another GPU is never loaded.
* Networks are built **strongly typed**: precision comes from the ONNX graph. FP16 is obtained
  by converting the graph first (``modelopt.onnx.autocast.convert_to_mixed_precision``,
  keeping float32 I/O), not with the deprecated ``BuilderFlag.FP16`` (removed in TensorRT 11).
* INT8 (and FP8) come from the package's quantised **QDQ** variant (``variants:`` in
  ``model.yaml``, e.g. ``model.int8.onnx`` from :mod:`inference.quantize`): in a strongly typed
  network the Q/DQ scales fix every int8 tensor, so the plan computes exactly what ONNX Runtime
  computes on CPU from the same file (no TensorRT calibrator, no ``BuilderFlag.INT8``). FP8
  needs an FP8 QDQ graph (NVIDIA ModelOpt ``modelopt.onnx.quantization``, Hopper/Ada GPUs).
* One optimisation profile makes the batch dimension dynamic: min 1, opt the package's
  ``input.batch_size``, max ``max_batch`` (default 2 × batch size).
* Execution uses torch CUDA tensors for device memory and a CUDA stream; ``run`` is serialised by
  a lock (an execution context is not thread-safe).

Without the ``tensorrt`` package or a CUDA device every entry point raises
:class:`~inference.engines.EngineUnavailable` with the reason.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from inference.engines import EngineUnavailable, Tensors
from inference.engines._io import NamedIO, check_outputs
from inference.package import ModelPackage

_log = structlog.get_logger(__name__)


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineUnavailable(
            "the tensorrt Python package is not installed (pip install omnimri-node[gpu])"
        ) from None
    return trt


def _import_cuda_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise EngineUnavailable("torch is needed for CUDA buffers and is not installed") from None
    if not torch.cuda.is_available():
        raise EngineUnavailable("no CUDA device visible (torch.cuda.is_available() is False)")
    return torch


def gpu_key() -> tuple[str, str]:
    """``(compute_capability, tensorrt_version)`` of this machine, e.g. ``("8.6", "10.3.0")``."""
    trt = _import_trt()
    torch = _import_cuda_torch()
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}", str(trt.__version__)


def tensorrt_status() -> str:
    """``"ok: <gpu> sm<cc> TensorRT <v>"`` or why TensorRT cannot be used here."""
    try:
        cc, version = gpu_key()
    except EngineUnavailable as err:
        return f"unavailable: {err}"
    import torch

    return f"ok: {torch.cuda.get_device_name(0)} sm{cc.replace('.', '')} TensorRT {version}"


def fp16_onnx(onnx_path: Path, out_path: Path) -> Path:
    """Convert an FP32 ONNX graph to mixed FP16 with NVIDIA ModelOpt AutoCast.

    Inputs and outputs stay float32; the result feeds a strongly typed build.

    Raises:
        EngineUnavailable: ``nvidia-modelopt`` is not installed.
    """
    try:
        import onnx
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise EngineUnavailable(
            "FP16 plans need nvidia-modelopt (modelopt.onnx.autocast) to convert the graph"
        ) from None
    model = convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True
    )
    onnx.save(model, str(out_path))
    return out_path


def build_input(
    package: ModelPackage, *, version: int | None = None, precision: str = "fp32",
    variant: str | None = None,
) -> tuple[Path, str]:
    """The ONNX file a plan is built from and the plan's precision label.

    ``variant`` ``None`` means ``fp32`` here (plans are asked for explicitly; the package's
    default variant applies through :meth:`TensorRTEngine.for_package`).

    Raises:
        EngineUnavailable: Unknown precision or variant, or the file is missing.
    """
    from inference.package import FP32_VARIANT, PackageError

    if variant not in (None, FP32_VARIANT):
        try:
            v = package.spec.variant_spec(variant)
        except PackageError as err:
            raise EngineUnavailable(str(err)) from None
        assert v is not None
        if v.precision not in ("int8", "fp8"):
            raise EngineUnavailable(
                f"variant {v.name!r} is {v.precision}; TensorRT builds QDQ int8/fp8 variants "
                "(fp16 comes from model.onnx with --precision fp16)")
        onnx_path, precision = package.file(v.file, version), v.precision
    elif precision in ("fp32", "fp16"):
        onnx_path = package.onnx_path(version)
    else:
        raise EngineUnavailable(
            f"unknown precision {precision!r}: fp32, fp16, or a QDQ variant (--variant int8)")
    if not onnx_path.is_file():
        raise EngineUnavailable(f"package {package.name!r} has no {onnx_path.name} to build from")
    return onnx_path, precision


def build_plan(
    package: ModelPackage,
    *,
    version: int | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
    workspace_gib: float = 4.0,
    force: bool = False,
    variant: str | None = None,
) -> Path:
    """Build (or reuse) the TensorRT plan of ``package`` for this GPU and TensorRT version.

    Args:
        package: The model package (its ``<version>/model.onnx`` is the build input).
        version: Package version folder; highest when ``None``.
        precision: ``fp32`` (graph as is) or ``fp16`` (graph converted with ModelOpt AutoCast);
            ignored when ``variant`` names a quantised variant (its precision is used).
        variant: A declared QDQ variant (``int8``, ``fp8``) to build from; ``None``/``fp32``:
            ``model.onnx``.
        max_batch: Largest batch the profile accepts; default ``2 * input.batch_size``.
        workspace_gib: Builder workspace limit, GiB.
        force: Rebuild even if the plan exists.

    Returns:
        The plan path (``model.sm<cc>.trt<version>.<precision>.plan``).

    Raises:
        EngineUnavailable: No tensorrt, no CUDA device, no ONNX file, or the build failed.
    """
    onnx_path, precision = build_input(package, version=version, precision=precision,
                                       variant=variant)
    trt = _import_trt()
    cc, trt_version = gpu_key()
    plan = package.plan_path(cc, trt_version, version, precision)
    if plan.is_file() and not force and plan.stat().st_mtime >= onnx_path.stat().st_mtime:
        return plan
    if precision == "fp16":
        onnx_path = fp16_onnx(onnx_path, plan.with_suffix(".fp16.onnx"))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineUnavailable(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    timing_path = plan.with_name(f"timing.sm{cc.replace('.', '')}.trt{trt_version}.cache")
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    spec_in = package.spec.input
    opt_batch = spec_in.batch_size
    max_b = max_batch or max(2 * opt_batch, 1)
    patch = (spec_in.channels, *spec_in.patch_size)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        rest = [d if d > 0 else patch[n] for n, d in enumerate(dims[1:])]
        profile.set_shape(tensor.name, (1, *rest), (opt_batch, *rest), (max_b, *rest))
    config.add_optimization_profile(profile)
    _log.info("building TensorRT plan", model=package.name, plan=plan.name, precision=precision)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineUnavailable(f"TensorRT failed to build a plan for {package.name!r}")
    tmp = plan.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan)
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan


_TORCH_DTYPES = {
    "float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64",
    "int8": "int8", "bool": "bool", "uint8": "uint8",
}


class TensorRTEngine(NamedIO):
    """A deserialised TensorRT plan behind the :class:`~inference.engines.Engine` Protocol."""

    name = "tensorrt"

    def __init__(self, plan_path: Path) -> None:
        trt = _import_trt()
        torch = _import_cuda_torch()
        if not plan_path.is_file():
            raise EngineUnavailable(f"no TensorRT plan {plan_path.name}")
        self._trt = trt
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise EngineUnavailable(f"TensorRT cannot load {plan_path.name} (built elsewhere?)")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._lock = threading.Lock()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self._outputs = [n for n in names if n not in self._inputs]
        self.provider = f"cuda:0 {plan_path.name}"

    @classmethod
    def for_package(
        cls, package: ModelPackage, *, version: int | None = None, build: bool = True,
        precision: str = "fp32", variant: str | None = None,
    ) -> TensorRTEngine:
        """The engine for this GPU's plan; builds it first when missing and ``build``.

        ``variant`` ``None`` = the package's ``variant`` (an accuracy-checked INT8 QDQ variant
        gives an INT8 plan).
        """
        variant = variant or package.spec.variant
        _, precision = build_input(package, version=version, precision=precision,
                                   variant=variant)
        cc, trt_version = gpu_key()
        plan = package.plan_path(cc, trt_version, version, precision)
        if build:  # reuses an up-to-date plan, rebuilds a missing or stale one
            plan = build_plan(package, version=version, precision=precision, variant=variant)
        elif not plan.is_file():
            raise EngineUnavailable(
                f"no plan {plan.name} for this GPU; run `omnimri-node engines build "
                f"{package.name}`"
            )
        return cls(plan)


    def _torch_dtype(self, name: str) -> Any:
        np_type = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))
        return getattr(self._torch, _TORCH_DTYPES[np_type.name])

    def run(self, inputs: Tensors, outputs: Sequence[str] | None = None) -> Tensors:
        """Copy inputs to the GPU, execute on a CUDA stream, copy outputs back.

        ``outputs`` is checked and otherwise ignored: the plan computes every output (each
        needs a device buffer) and all are returned.
        """
        check_outputs(outputs, self._outputs)
        torch = self._torch
        with self._lock, torch.cuda.stream(self._stream):
            keep = []
            for n in self._inputs:
                t = torch.from_numpy(np.ascontiguousarray(inputs[n])).to(
                    "cuda", dtype=self._torch_dtype(n), non_blocking=True
                ).contiguous()
                keep.append(t)
                self._context.set_input_shape(n, tuple(t.shape))
                self._context.set_tensor_address(n, t.data_ptr())
            outs = {}
            for n in self._outputs:
                shape = tuple(self._context.get_tensor_shape(n))
                t = torch.empty(shape, dtype=self._torch_dtype(n), device="cuda")
                outs[n] = t
                self._context.set_tensor_address(n, t.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self._stream.synchronize()
            result: Tensors = {}
            for n, t in outs.items():
                arr = t.cpu().numpy()
                result[n] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
            return result

    def close(self) -> None:
        """Free the execution context and engine."""
        self._context = None
        self._engine = None
