"""ONNX Runtime engine: TensorRT → CUDA → CPU execution providers, whichever this build has.

With the TensorRT provider, ORT's engine cache and timing cache live under the package's
version folder (``<version>/trt_cache``), so the slow TensorRT build happens once per GPU.
``InferenceSession.run`` is thread-safe: one engine is shared by all worker threads.

CPU tuning (measurements in docs/engines.md):

* graph optimisations at ``ORT_ENABLE_ALL`` (constant folding, fusions, NCHWc layout); the
  optimised graph is written once to ``<version>/ort_cache/`` and loaded from there with
  optimisations off (faster session start). The file name carries the source graph's SHA-256,
  the ORT version, the provider and a hash of the CPU's feature flags (NCHWc blocking depends on
  the vector width), so a changed model, ORT, provider or CPU never loads a stale graph;
  stale files of the same graph are removed. A read-only package folder just skips the cache.
* intra-op threads = the physical cores this process may use (affinity mask, SMT siblings once)
  unless set; inter-op threads 1, sequential execution (the graphs are chains).
* thread spinning off (the node shares its cores with the listener and other workers).

Only the outputs a job reads (``run(inputs, outputs=[...])``): ORT executes the whole graph
whatever is fetched, so a subset that leaves graph outputs out runs a second session on the
graph *pruned* to those outputs (:func:`prune_graph`: ``onnx.utils.Extractor``, initializers and
opset kept), built once per output set on first use, and cached on disk like the optimised graph
(:func:`pruned_model_path`: same digest/ORT/provider/CPU name plus a key of the kept outputs). If
pruning fails the engine logs one line and runs the full graph for that set.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from inference.engines import EngineUnavailable, Tensors
from inference.engines._io import NamedIO, check_outputs
from inference.engines.flops import physical_cores

_log = structlog.get_logger(__name__)

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


def _cpu_key() -> str:
    """8 hex digits from this CPU's feature flags (what NCHWc and kernel choice depend on)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        import platform

        flags = platform.machine() + platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def optimized_model_path(model_path: Path, cache_dir: Path, provider: str) -> Path:
    """Where the ORT-optimised copy of ``model_path`` lives for this ORT, provider and CPU."""
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:12]
    prov = provider.removesuffix("ExecutionProvider").lower()
    return cache_dir / (f"{Path(model_path).stem}.{digest}.ort{ort.__version__}.{prov}."
                        f"cpu{_cpu_key()}.onnx")


def pruned_model_path(model_path: Path, cache_dir: Path, provider: str,
                      outputs: Sequence[str]) -> Path:
    """Where the optimised copy of ``model_path`` pruned to ``outputs`` lives.

    The name is :func:`optimized_model_path`'s plus ``keep-<8 hex>`` (SHA-256 of the sorted
    output names), so a new model, ORT, provider or CPU never loads a stale pruned graph.
    """
    full = optimized_model_path(model_path, cache_dir, provider)
    key = hashlib.sha256("\0".join(sorted(outputs)).encode()).hexdigest()[:8]
    return full.with_name(f"{full.stem}.keep-{key}.onnx")


def prune_graph(model_path: Path, outputs: Sequence[str]) -> bytes:
    """The serialised ONNX graph of ``model_path`` cut down to the nodes ``outputs`` need.

    Every graph input is kept (the engine feeds them all); initializers the kept nodes use,
    the opset imports, IR version and local functions are kept (``onnx.utils.Extractor``).

    Raises:
        ImportError: The ``onnx`` package is missing.
        ValueError: An output is not a tensor of the graph.
    """
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(model_path))
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    pruned = Extractor(model).extract_model(inputs, list(outputs))
    pruned.metadata_props.extend(model.metadata_props)
    return bytes(pruned.SerializeToString())


def session_options(threads: int = 0, *, allow_spinning: bool = False,
                    mem_arena: bool = True) -> Any:
    """The ``ort.SessionOptions`` every CPU session of the node uses (see the module notes).

    Args:
        threads: Intra-op threads (0 = :func:`~inference.engines.flops.physical_cores`).
        allow_spinning: Let idle ORT threads spin-wait.
        mem_arena: CPU memory arena and memory-pattern planning.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads if threads > 0 else physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = mem_arena
    opts.enable_mem_pattern = mem_arena
    opts.log_severity_level = 3
    spin = "1" if allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return opts


class OnnxRuntimeEngine(NamedIO):
    """An ``onnxruntime.InferenceSession`` behind the :class:`~inference.engines.Engine` Protocol.

    Args:
        model_path: The ``.onnx`` file.
        providers: Providers to try, best first; default :func:`available_providers`.
        cache_dir: Folder for the TensorRT provider's engine and timing caches.
        intra_op_threads: Threads per inference on CPU (0 = the physical cores this process
            may use, :func:`inference.engines.flops.physical_cores`).
        fp16: Let the TensorRT provider use FP16 kernels.
        allow_spinning: Let idle ORT threads spin-wait. Off by default: on a node that shares its
            cores with the listener and other workers, spinning burns CPU (and measured ~10-15 %
            slower under load here).
        optimized_dir: Folder for the cached optimised graph (CPU provider only); ``None``: no
            cache, optimise at every session start.
        mem_arena: ORT's CPU memory arena and memory-pattern planning (on by default: the
            window batches have one shape, so buffers are reused run after run).

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
        optimized_dir: Path | None = None,
        mem_arena: bool = True,
    ) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise EngineUnavailable(f"{model_path} does not exist")
        wanted = providers if providers is not None else available_providers()
        if not wanted:
            raise EngineUnavailable("no usable ONNX Runtime execution provider")
        self.intra_op_threads = intra_op_threads if intra_op_threads > 0 else physical_cores()
        opts = session_options(self.intra_op_threads, allow_spinning=allow_spinning,
                               mem_arena=mem_arena)
        load_path = model_path
        self.optimized_path: Path | None = None
        """The cached optimised graph this session loaded or wrote (``None``: not cached)."""
        if optimized_dir is not None and wanted == ["CPUExecutionProvider"]:
            load_path = self._use_cache(model_path, optimized_dir, opts)
        self._session: Any = None
        prov = [(p, _provider_options(p, cache_dir, fp16)) for p in wanted]
        try:
            try:
                self._session = ort.InferenceSession(str(load_path), sess_options=opts,
                                                     providers=prov)
            except Exception:
                if load_path == model_path:
                    raise
                # a damaged cached graph: drop it, optimise the source again
                _log.warning("cached optimised graph unreadable; rebuilding",
                             file=load_path.name)
                load_path.unlink(missing_ok=True)
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                opts.optimized_model_filepath = str(load_path)
                self._session = ort.InferenceSession(str(model_path), sess_options=opts,
                                                     providers=prov)
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineUnavailable(f"ONNX Runtime cannot load {model_path.name}: {err}") from None
        used = self._session.get_providers()
        self.provider = used[0] if used else "CPUExecutionProvider"
        self.model_path = model_path
        self.fallback_reason = (
            "" if not wanted or used[:1] == wanted[:1]
            else f"{wanted[0]} requested but ORT fell back to {self.provider}"
        )
        self._inputs: dict[str, Any] = {
            i.name: _NP_TYPES.get(i.type, np.float32) for i in self._session.get_inputs()
        }
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._session_args = (self.intra_op_threads, allow_spinning, mem_arena)
        self._providers = prov
        self._prune_cache = optimized_dir if wanted == ["CPUExecutionProvider"] else None
        self._pruned: dict[frozenset[str], Any] = {}
        self._prune_lock = threading.Lock()
        self.pruned_paths: dict[frozenset[str], Path | None] = {}
        """Per output set: the cached pruned graph its session loaded or wrote (``None``: not
        cached); a set whose pruning failed (runs the full graph) is absent."""

    def _use_cache(self, model_path: Path, cache: Path, opts: Any) -> Path:
        """Load the cached optimised graph, or have this session write it; returns what to load."""
        target = optimized_model_path(model_path, cache, "CPUExecutionProvider")
        if target.is_file():
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.optimized_path = target
            return target
        try:
            cache.mkdir(parents=True, exist_ok=True)
            mine = re.compile(re.escape(model_path.stem) + r"\.[0-9a-f]{12}\.ort.*\.onnx")
            same = optimized_model_path(model_path, cache, "CPUExecutionProvider").stem + "."
            for old in cache.iterdir():  # this graph's copies for another digest/ORT/CPU
                if (old.name != target.name and mine.fullmatch(old.name)
                        and not old.name.startswith(same)):
                    old.unlink(missing_ok=True)
            probe = cache / f".{target.name}.probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            _log.info("optimised-graph cache not writable; optimising at every start",
                      folder=str(cache), error=str(err))
            return model_path
        opts.optimized_model_filepath = str(target)
        self.optimized_path = target
        return model_path

    def run(self, inputs: Tensors, outputs: Sequence[str] | None = None) -> Tensors:
        """Run one batch; inputs are cast to the graph's element types.

        Args:
            inputs: One array per graph input.
            outputs: Graph outputs to compute; ``None``: all. A subset that leaves graph
                outputs out runs on the graph pruned to it (see the module notes); exactly
                these are returned.

        Raises:
            KeyError: An input is missing, or an output is not one of the graph's.
            ValueError: ``outputs`` is empty.
        """
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise KeyError(f"missing inputs {missing}; the graph takes {self.input_names}")
        session, names = self._session, self._outputs
        if outputs is not None:
            check_outputs(outputs, self._outputs)
            asked = frozenset(outputs)
            if not asked:
                raise ValueError("outputs is empty: name at least one graph output")
            if len(asked) < len(self._outputs):
                names = [n for n in self._outputs if n in asked]
                session = self._session_for(asked) or session
        feed: dict[str, Any] = {
            n: np.ascontiguousarray(inputs[n], dtype=t) for n, t in self._inputs.items()
        }
        results = session.run(names, feed)
        out: Tensors = {}
        for name, value in zip(names, results, strict=True):
            arr = np.asarray(value)
            out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
        return out

    def _session_for(self, outputs: frozenset[str]) -> Any:
        """The session of the graph pruned to ``outputs`` (built once); ``None``: run the full one.

        Thread-safe: the first caller of a set builds it under a lock, later callers (and
        other threads waiting) reuse it. A failure is logged once per set.
        """
        try:
            return self._pruned[outputs]
        except KeyError:
            pass
        with self._prune_lock:
            if outputs not in self._pruned:
                try:
                    self._pruned[outputs] = self._build_pruned(outputs)
                except Exception as err:  # onnx missing, Extractor or ORT failing on the cut
                    _log.warning("pruned graph not built; running the full graph",
                                 model=self.model_path.name, outputs=sorted(outputs),
                                 error=f"{type(err).__name__}: {err}")
                    self._pruned[outputs] = None
            return self._pruned[outputs]

    def _build_pruned(self, outputs: frozenset[str]) -> Any:
        """A session on the graph pruned to ``outputs``: from the disk cache, else cut now."""
        names = [n for n in self._outputs if n in outputs]
        threads, spinning, arena = self._session_args
        opts = session_options(threads, allow_spinning=spinning, mem_arena=arena)
        target = (None if self._prune_cache is None else
                  pruned_model_path(self.model_path, self._prune_cache, "CPUExecutionProvider",
                                    names))
        if target is not None and target.is_file():
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                session = ort.InferenceSession(str(target), sess_options=opts,
                                               providers=self._providers)
            except Exception:  # a damaged cached graph: cut and optimise it again
                _log.warning("cached pruned graph unreadable; rebuilding", file=target.name)
                target.unlink(missing_ok=True)
                opts = session_options(threads, allow_spinning=spinning, mem_arena=arena)
            else:
                self._check_outputs(session, names)
                self.pruned_paths[outputs] = target
                return session
        data = prune_graph(self.model_path, names)
        tmp: Path | None = None
        if target is not None:
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(b"")
                opts.optimized_model_filepath = str(tmp)
            except OSError:
                tmp = None
        session = ort.InferenceSession(data, sess_options=opts, providers=self._providers)
        self._check_outputs(session, names)
        cached: Path | None = None
        if tmp is not None and target is not None:
            try:
                if tmp.stat().st_size > 0:  # ORT wrote the optimised pruned graph
                    os.replace(tmp, target)
                    cached = target
            except OSError:
                pass
            tmp.unlink(missing_ok=True)
        self.pruned_paths[outputs] = cached
        _log.info("pruned graph built", model=self.model_path.name, outputs=names,
                  cached=cached.name if cached is not None else None)
        return session

    @staticmethod
    def _check_outputs(session: Any, names: list[str]) -> None:
        got = [o.name for o in session.get_outputs()]
        if got != names:
            raise ValueError(f"pruned graph returns {got}, expected {names}")

    def close(self) -> None:
        """Drop the sessions (ORT frees them when unreferenced)."""
        self._session = None
        with self._prune_lock:
            self._pruned.clear()
