"""ONNX Runtime engine: TensorRT → CUDA → CPU execution providers, whichever this build has.

With the TensorRT provider, ORT's engine cache and timing cache live under the package's
version folder (``<version>/trt_cache``), so the slow TensorRT build happens once per GPU.
``InferenceSession.run`` is thread-safe: one engine is shared by all worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inference.engines import EngineUnavailable, Tensors
from inference.engines._io import NamedIO

PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
"""Providers tried in this order when present in the installed ONNX Runtime."""

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def available_providers() -> list[str]:
    """Preferred providers this ONNX Runtime build offers, best first."""
    have = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in have]


def _provider_options(name: str, cache_dir: Path | None, fp16: bool) -> dict[str, Any]:
    if name == "TensorrtExecutionProvider" and cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        return {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir),
            "trt_fp16_enable": fp16,
        }
    return {}


class OnnxRuntimeEngine(NamedIO):
    """An ``onnxruntime.InferenceSession`` behind the :class:`~inference.engines.Engine` Protocol.

    Args:
        model_path: The ``.onnx`` file.
        providers: Providers to try, best first; default :func:`available_providers`.
        cache_dir: Folder for the TensorRT provider's engine and timing caches.
        intra_op_threads: Threads per inference on CPU (0 = ORT default: all physical cores).
        fp16: Let the TensorRT provider use FP16 kernels.
        allow_spinning: Let idle ORT threads spin-wait. Off by default: on a node that shares its
            cores with the listener and other workers, spinning burns CPU (and measured ~10-15 %
            slower under load here).

    Raises:
        EngineUnavailable: The file is missing or ORT cannot load it.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        *,
        providers: list[str] | None = None,
        cache_dir: Path | None = None,
        intra_op_threads: int = 0,
        fp16: bool = False,
        allow_spinning: bool = False,
    ) -> None:
        if not Path(model_path).is_file():
            raise EngineUnavailable(f"{model_path} does not exist")
        wanted = providers if providers is not None else available_providers()
        if not wanted:
            raise EngineUnavailable("no usable ONNX Runtime execution provider")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            opts.intra_op_num_threads = intra_op_threads
        opts.log_severity_level = 3
        spin = "1" if allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self._session: Any = None
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=opts,
                providers=[(p, _provider_options(p, cache_dir, fp16)) for p in wanted],
            )
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineUnavailable(f"ONNX Runtime cannot load {model_path.name}: {err}") from None
        used = self._session.get_providers()
        self.provider = used[0] if used else "CPUExecutionProvider"
        self.fallback_reason = (
            "" if not wanted or used[:1] == wanted[:1]
            else f"{wanted[0]} requested but ORT fell back to {self.provider}"
        )
        self._inputs: dict[str, Any] = {
            i.name: _NP_TYPES.get(i.type, np.float32) for i in self._session.get_inputs()
        }
        self._outputs = [o.name for o in self._session.get_outputs()]


    def run(self, inputs: Tensors) -> Tensors:
        """Run the session; inputs are cast to the graph's element types."""
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise KeyError(f"missing inputs {missing}; the graph takes {self.input_names}")
        feed: dict[str, Any] = {
            n: np.ascontiguousarray(inputs[n], dtype=t) for n, t in self._inputs.items()
        }
        results = self._session.run(self._outputs, feed)
        out: Tensors = {}
        for name, value in zip(self._outputs, results, strict=True):
            arr = np.asarray(value)
            out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
        return out

    def close(self) -> None:
        """Drop the session (ORT frees it when unreferenced)."""
        self._session = None
