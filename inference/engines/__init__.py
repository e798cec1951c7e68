"""Engines: one small Protocol, four implementations (ONNX Runtime, TensorRT, PyTorch, Triton).

An engine runs a package's encoder graph on named numpy tensors. Pick one with
:func:`select_engine`, which tries engines in order, logs once which engine and provider it
chose and why each earlier one was not usable, and returns an instance that is safe to share
between worker threads.

Modules import their optional dependencies (``tensorrt``, ``torch``, ``tritonclient``) lazily;
a missing dependency or device raises :class:`EngineUnavailable` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy.typing as npt
import structlog

from inference.package import ModelPackage, PackageError

_log = structlog.get_logger(__name__)

ENGINE_NAMES = ("tensorrt", "onnxruntime", "torch", "triton")
"""Every engine kind, in the usual order of preference."""

DEFAULT_ORDER = ("tensorrt", "onnxruntime", "torch")
"""Order tried for ``auto`` (Triton only when asked for: it needs a server)."""

Tensors = dict[str, npt.NDArray[Any]]
"""Named tensors in and out of an engine."""


class EngineUnavailable(RuntimeError):
    """An engine cannot run here; the message says why (missing package, no GPU, no file)."""


@runtime_checkable
class Engine(Protocol):
    """Runs one model graph. Implementations are thread-safe for :meth:`run`."""

    name: str
    """Engine kind: ``onnxruntime``, ``tensorrt``, ``torch`` or ``triton``."""
    provider: str
    """What actually executes: ORT provider, ``cuda:0``, ``cpu``, the Triton URL."""

    @property
    def input_names(self) -> list[str]:
        """Graph input names."""
        ...

    @property
    def output_names(self) -> list[str]:
        """Graph output names."""
        ...

    def run(self, inputs: Tensors, outputs: Sequence[str] | None = None) -> Tensors:
        """Run one batch; returns graph outputs as numpy arrays (float outputs float32).

        ``outputs``: the outputs the caller reads; ``None`` = all. With a subset an engine
        returns at least those (ONNX Runtime computes only them, on a pruned graph; TensorRT
        and PyTorch compute and return every output; Triton returns only them). An output
        the graph lacks raises ``KeyError``.
        """
        ...

    def close(self) -> None:
        """Release sessions, GPU memory and connections."""
        ...


def create_engine(
    name: str,
    package: ModelPackage,
    *,
    version: int | None = None,
    intra_op_threads: int = 0,
    triton_url: str | None = None,
    build_plan: bool = True,
    variant: str | None = None,
) -> Engine:
    """Create one engine of kind ``name`` for ``package`` or raise :class:`EngineUnavailable`.

    Args:
        name: One of :data:`ENGINE_NAMES`.
        package: The loaded model package.
        version: Package version folder; the highest when ``None``.
        intra_op_threads: CPU threads per inference (0 = the physical cores this process may
            use).
        triton_url: ``host:port`` of a Triton server (``http://`` or ``grpc://`` prefix picks
            the protocol; HTTP by default). Needed for ``triton``.
        build_plan: ``tensorrt`` only: build the plan for this GPU if it is missing.
        variant: Graph variant (``fp32``, ``int8``, ...) for ``onnxruntime`` and ``tensorrt``;
            ``None`` = the package's ``variant`` (the fastest one that passed its accuracy
            check).
    """
    if name in ("onnxruntime", "tensorrt"):
        try:
            path = package.model_path(version, variant)
        except PackageError as err:
            raise EngineUnavailable(str(err)) from None
    if name == "onnxruntime":
        from inference.engines.onnxruntime import OnnxRuntimeEngine

        if not path.is_file():
            raise EngineUnavailable(f"package {package.name!r} has no {path.name}")
        return OnnxRuntimeEngine(
            path, cache_dir=package.engine_cache_dir(version), intra_op_threads=intra_op_threads,
            optimized_dir=package.ort_cache_dir(version),
        )
    if name == "tensorrt":
        from inference.engines.tensorrt import TensorRTEngine

        return TensorRTEngine.for_package(package, version=version, build=build_plan,
                                          variant=variant)
    if name == "torch":
        from inference.engines.torch import TorchEngine

        return TorchEngine.for_package(package, version=version, intra_op_threads=intra_op_threads)
    if name == "triton":
        from inference.engines.triton import TritonEngine

        if not triton_url:
            raise EngineUnavailable("no Triton server configured (models.triton_url)")
        return TritonEngine.for_package(package, triton_url, version=version)
    raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")


def select_engine(
    package: ModelPackage,
    preference: str | Sequence[str] = "auto",
    triton_url: str | None = None,
    *,
    version: int | None = None,
    intra_op_threads: int = 0,
    build_plan: bool = True,
    variant: str | None = None,
) -> Engine:
    """The first engine in ``preference`` that works here; logs the choice and reasons once.

    Args:
        package: The model package.
        preference: ``"auto"`` (:data:`DEFAULT_ORDER`), one engine name, or an ordered list
            (e.g. the config's ``models.engine_order``).
        triton_url: Triton server for ``triton``.
        version: Package version folder.
        intra_op_threads: CPU threads per inference (0 = default).
        build_plan: Let ``tensorrt`` build a missing plan (minutes) instead of skipping it.
        variant: Graph variant; ``None`` = the package's ``variant``.

    Raises:
        EngineUnavailable: None of the engines can run; the message lists every reason.
    """
    if isinstance(preference, str):
        order = list(DEFAULT_ORDER) if preference == "auto" else [preference]
    else:
        order = list(preference) or list(DEFAULT_ORDER)
    skipped: dict[str, str] = {}
    for name in order:
        try:
            engine = create_engine(
                name, package, version=version, intra_op_threads=intra_op_threads,
                triton_url=triton_url, build_plan=build_plan, variant=variant,
            )
        except EngineUnavailable as err:
            skipped[name] = str(err)
            continue
        _log.info(
            "engine selected", model=package.name, engine=engine.name, provider=engine.provider,
            variant=(variant or package.spec.variant)
            if engine.name in ("onnxruntime", "tensorrt") else None,
            not_used=skipped or None, fallback=getattr(engine, "fallback_reason", "") or None,
        )
        return engine
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    _log.error("no engine available", model=package.name, reasons=reasons)
    raise EngineUnavailable(f"no engine can run model {package.name!r} here ({reasons})")


def engine_availability() -> dict[str, str]:
    """For each engine kind, ``"ok: <detail>"`` or the reason it cannot run on this machine."""
    out: dict[str, str] = {}
    from inference.engines.onnxruntime import available_providers

    out["onnxruntime"] = "ok: " + ", ".join(available_providers())
    from inference.engines.tensorrt import tensorrt_status

    out["tensorrt"] = tensorrt_status()
    from inference.engines.torch import torch_status

    out["torch"] = torch_status()
    from inference.engines.triton import triton_status

    out["triton"] = triton_status()
    return out


def shared_engine(
    package: ModelPackage,
    preference: str | Sequence[str] = "auto",
    triton_url: str | None = None,
    *,
    intra_op_threads: int = 0,
    warm_up: bool = True,
) -> Engine:
    """One engine per (package folder, preference) for the whole process, warmed up once.

    Worker threads call this for every job; the first call selects (and logs) the engine and
    runs one zero batch through it, later calls return the same thread-safe instance. It is
    the process's :func:`inference.engines.cache.default_cache`: when the package's files
    change the next call loads it again and the old engine is closed.
    """
    from inference.engines.cache import EngineSlot, default_cache

    slot = EngineSlot.of(package.folder, preference, triton_url, intra_op_threads)
    return default_cache().get(slot, warm_up=warm_up, package=package).engine


def close_shared_engines() -> None:
    """Close every engine of the process's engine cache (at node shutdown)."""
    from inference.engines.cache import default_cache

    default_cache().close()
