"""Engines of the language half: the text encoder and the report-decoder step on TensorRT or ORT.

The language models are two ONNX graphs in the package's language folder
(``text_encoder.onnx``: ``input_ids, attention_mask [N, T] -> logits per head``;
``report_decoder.onnx``: the GPT-2 decoder *step* with its key/value cache,
:mod:`inference.omnimri.language.decoder`). They run on the engines of the vision model's
preference that can run them:

* ``tensorrt``: a plan built from the same ONNX file with the ``tensorrt`` Python API (strongly
  typed, float32 as in the graph), cached next to it as ``<graph>.sm<cc>.trt<version>.fp32.plan``
  (a plan is keyed by GPU compute capability and TensorRT version, and rebuilt when the ONNX file
  is newer, as the vision plans of :mod:`inference.engines.tensorrt`), with one optimisation
  profile for the dynamic dimensions: :func:`encoder_dims` (batch ``N`` 1..16, tokens ``T``
  1..``max_tokens``) and :func:`decoder_dims` (batch 1; new tokens ``T`` 1..the longest facts
  prefix; key/value cache length ``P`` 0..prefix + :data:`~.reportgen.MAX_NEW_TOKENS`).
* ``onnxruntime``: ONNX Runtime on CPU, one intra-op thread (what ran before the GPU path).

:func:`language_engine_order` maps the vision model's engine preference (a pipeline's
``engine:``, or ``models.engine_order`` for ``auto``) to those engines; ONNX Runtime on CPU is
always the last resort (torch and Triton have no language form). :func:`language_session` tries
them in order and logs the choice and why earlier ones were not usable, like
:func:`inference.engines.select_engine`.

Without the ``tensorrt`` package or a CUDA device the TensorRT path raises
:class:`~inference.engines.EngineUnavailable` with the reason before importing torch (torch is
only imported for CUDA buffers once ``tensorrt`` imported), so the node's runtime imports stay
free of torch on CPU machines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

from inference.engines import DEFAULT_ORDER, EngineUnavailable

_log = structlog.get_logger(__name__)

LANGUAGE_ENGINES = ("tensorrt", "onnxruntime")
"""Engines that run the language graphs (the vision model may also use torch or Triton)."""

ENCODER_MAX_BATCH = 16
"""Largest batch of texts one TensorRT encoder run takes; larger batches run in chunks."""

PREFIX_MAX_TOKENS = 16
"""Longest facts prefix the decoder plan accepts in one step, tokens (a prefix has at most 9:
:func:`inference.omnimri.language.reportgen.prefix_tokens`)."""

Shape = tuple[int, ...]
GraphShape = tuple[int | str, ...]
"""An ONNX input shape: ints for fixed dimensions, names for dynamic ones."""


@dataclass(frozen=True)
class DimRange:
    """The range of one dynamic dimension in a TensorRT optimisation profile (sizes, items)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max or self.max < 1:
            raise ValueError(f"bad dimension range {self.min}..{self.opt}..{self.max}")


def encoder_dims(max_tokens: int, max_batch: int = ENCODER_MAX_BATCH) -> dict[str, DimRange]:
    """Ranges of the text encoder's dynamic dimensions: batch ``N`` and tokens ``T``.

    Parameters
    ----------
    max_tokens
        Longest input in tokens (``extra.language.max_tokens``).
    max_batch
        Most texts per run.
    """
    return {"N": DimRange(1, 1, max_batch),
            "T": DimRange(1, max(1, min(16, max_tokens)), max_tokens)}


def decoder_dims(prefix_max: int = PREFIX_MAX_TOKENS, max_new: int | None = None
                 ) -> dict[str, DimRange]:
    """Ranges of the decoder step's dynamic dimensions.

    ``T``: tokens fed in one step (the whole facts prefix first, then one at a time); ``P``:
    key/value cache length before the step (0 for the prefix); ``S`` = ``P + T``: the
    attention mask's key length.

    Parameters
    ----------
    prefix_max
        Longest facts prefix, tokens.
    max_new
        Longest report, tokens; default :data:`~.reportgen.MAX_NEW_TOKENS`.
    """
    from inference.omnimri.language.reportgen import MAX_NEW_TOKENS

    cache = prefix_max + (MAX_NEW_TOKENS if max_new is None else max_new)
    return {"T": DimRange(1, 1, prefix_max), "P": DimRange(0, min(64, cache), cache),
            "S": DimRange(1, min(65, cache + prefix_max), cache + prefix_max)}


def profile_shapes(inputs: Mapping[str, GraphShape], dims: Mapping[str, DimRange]
                   ) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The ``(min, opt, max)`` shape of each graph input for one optimisation profile.

    Parameters
    ----------
    inputs
        Input name to ONNX shape (fixed sizes as ints, dynamic dimensions by name), e.g.
        :func:`graph_inputs`.
    dims
        Range of each dynamic dimension name.

    Raises
    ------
    ValueError
        A dynamic dimension without a range (the graph is not the one these ranges are for).
    """
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, shape in inputs.items():
        lo: list[int] = []
        mid: list[int] = []
        hi: list[int] = []
        for axis, d in enumerate(shape):
            if isinstance(d, int) and d >= 0:
                lo.append(d)
                mid.append(d)
                hi.append(d)
                continue
            r = dims.get(str(d))
            if r is None:
                raise ValueError(f"input {name!r} axis {axis}: dynamic dimension {d!r} has no "
                                 f"range (known: {', '.join(sorted(dims)) or 'none'})")
            lo.append(r.min)
            mid.append(r.opt)
            hi.append(r.max)
        out[name] = (tuple(lo), tuple(mid), tuple(hi))
    return out


def graph_inputs(onnx_path: Path) -> dict[str, GraphShape]:
    """Input names and shapes of an ONNX graph (dynamic dimensions by name), via ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return {i.name: tuple(d if isinstance(d, int) else str(d) for d in i.shape)
            for i in sess.get_inputs()}


def language_engine_order(preference: str | Sequence[str] = "auto") -> list[str]:
    """The engines a language graph tries, in order, for the vision model's ``preference``.

    Parameters
    ----------
    preference
        As for :func:`inference.engines.select_engine`: ``"auto"``
        (:data:`~inference.engines.DEFAULT_ORDER`), one engine name, or an ordered list (a
        pipeline's ``engine`` or ``models.engine_order``; empty = ``auto``).

    Returns
    -------
    list[str]
        The preference's ``tensorrt`` / ``onnxruntime`` entries in order, then ``onnxruntime``
        (CPU) if it was not there: torch and Triton have no language form, and ONNX Runtime
        on CPU always runs the ONNX files.

    Raises
    ------
    ValueError
        An unknown engine name.
    """
    from inference.engines import ENGINE_NAMES

    if isinstance(preference, str):
        order = list(DEFAULT_ORDER) if preference == "auto" else [preference]
    else:
        order = list(preference) or list(DEFAULT_ORDER)
    bad = [n for n in order if n not in ENGINE_NAMES]
    if bad:
        raise ValueError(f"unknown engine {bad[0]!r}; known: {', '.join(ENGINE_NAMES)}")
    out = [n for n in dict.fromkeys(order) if n in LANGUAGE_ENGINES]
    return out if "onnxruntime" in out else [*out, "onnxruntime"]


def plan_path(onnx_path: Path, compute_capability: str, trt_version: str,
              precision: str = "fp32") -> Path:
    """Where the plan of ``onnx_path`` for one GPU kind and TensorRT version lives.

    ``language/text_encoder.onnx`` -> ``language/text_encoder.sm90.trt10.9.0.fp32.plan``: a
    plan built on another GPU or TensorRT version is never loaded (the naming of
    :meth:`inference.package.ModelPackage.plan_path`).
    """
    import re

    safe = re.compile(r"[^0-9A-Za-z._-]")
    cc = safe.sub("", compute_capability.replace(".", ""))
    return onnx_path.with_name(
        f"{onnx_path.stem}.sm{cc}.trt{safe.sub('', trt_version)}.{precision}.plan")


class LanguageSession(Protocol):
    """One language graph ready to run (the ``InferenceSession.run`` calling convention)."""

    name: str
    """Engine kind: ``tensorrt`` or ``onnxruntime``."""
    provider: str
    """What executes: ``CPUExecutionProvider``, ``cuda:0 <plan file>``."""

    def run(self, output_names: Sequence[str] | None,
            feed: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Outputs ``output_names`` (``None``: all, in graph order) for the named inputs."""
        ...

    def input_shape(self, name: str) -> GraphShape:
        """The input's shape (dynamic dimensions as names or ``-1``)."""
        ...


class OrtCpuSession:
    """ONNX Runtime on CPU, one intra-op thread (the language models' CPU engine)."""

    name = "onnxruntime"
    provider = "CPUExecutionProvider"

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    def run(self, output_names: Sequence[str] | None,
            feed: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """As ``onnxruntime.InferenceSession.run``."""
        out: list[npt.NDArray[Any]] = self.sess.run(
            None if output_names is None else list(output_names), dict(feed))
        return out

    def input_shape(self, name: str) -> GraphShape:
        """The ONNX input shape (dynamic dimensions by name)."""
        i = next(i for i in self.sess.get_inputs() if i.name == name)
        return tuple(d if isinstance(d, int) else str(d) for d in i.shape)


def build_language_plan(onnx_path: Path, dims: Mapping[str, DimRange], *,
                        workspace_gib: float = 1.0, force: bool = False) -> Path:
    """Build (or reuse) the float32 TensorRT plan of a language graph for this GPU.

    The build follows :func:`inference.engines.tensorrt.build_plan` (strongly typed network
    from the ONNX parser, timing cache beside the plan, plan written atomically) with the
    optimisation profile of :func:`profile_shapes`.

    Parameters
    ----------
    onnx_path
        The ONNX graph.
    dims
        Ranges of its dynamic dimensions (:func:`encoder_dims`, :func:`decoder_dims`).
    workspace_gib
        Builder workspace limit, GiB.
    force
        Rebuild even if an up-to-date plan exists.

    Raises
    ------
    EngineUnavailable
        No ``tensorrt``, no CUDA device, no ONNX file, or the build failed.
    """
    from inference.engines.tensorrt import _import_trt, gpu_key

    trt = _import_trt()
    cc, trt_version = gpu_key()
    if not onnx_path.is_file():
        raise EngineUnavailable(f"no {onnx_path.name} to build a TensorRT plan from")
    plan = plan_path(onnx_path, cc, trt_version)
    if plan.is_file() and not force and plan.stat().st_mtime >= onnx_path.stat().st_mtime:
        return plan
    try:
        shapes = profile_shapes(graph_inputs(onnx_path), dims)
    except ValueError as err:
        raise EngineUnavailable(f"{onnx_path.name}: {err}") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineUnavailable(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    timing_path = plan.with_name(f"timing.sm{cc.replace('.', '')}.trt{trt_version}.cache")
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file()
                                        else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    _log.info("building TensorRT plan", graph=onnx_path.name, plan=plan.name,
              profile={k: [list(s) for s in v] for k, v in shapes.items()})
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineUnavailable(f"TensorRT failed to build a plan for {onnx_path.name}")
    tmp = plan.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan)
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan


class TensorRTSession:
    """A language graph's TensorRT plan behind the :class:`LanguageSession` convention.

    Runs through :class:`inference.engines.tensorrt.TensorRTEngine` (CUDA stream, lock), with
    two checks of its own: shapes outside the optimisation profile are refused with the
    profile's range, and empty inputs (the decoder's cache before the prefix, ``P = 0``) get a
    valid device address. Batches over the profile's largest batch (axis 0 of every input)
    run in chunks.
    """

    name = "tensorrt"

    def __init__(self, plan: Path, shapes: Mapping[str, tuple[Shape, Shape, Shape]]) -> None:
        from inference.engines.tensorrt import TensorRTEngine

        self.engine = TensorRTEngine(plan)
        self.provider = self.engine.provider
        self.shapes = dict(shapes)
        self._dummy: Any = None

    @classmethod
    def for_onnx(cls, onnx_path: Path, dims: Mapping[str, DimRange], *, build: bool = True
                 ) -> TensorRTSession:
        """The session of this GPU's plan of ``onnx_path``, built first when missing and ``build``.

        Raises
        ------
        EngineUnavailable
            No ``tensorrt``/CUDA, no plan (``build`` off), or the build failed.
        """
        from inference.engines.tensorrt import gpu_key

        cc, version = gpu_key()  # raises first on a machine without tensorrt or CUDA
        if build:
            plan = build_language_plan(onnx_path, dims)
        else:
            plan = plan_path(onnx_path, cc, version)
            if not plan.is_file():
                raise EngineUnavailable(f"no plan {plan.name} for this GPU")
        try:
            shapes = profile_shapes(graph_inputs(onnx_path), dims)
        except ValueError as err:
            raise EngineUnavailable(f"{onnx_path.name}: {err}") from None
        return cls(plan, shapes)

    def input_shape(self, name: str) -> GraphShape:
        """The plan's input shape (``-1`` for dynamic dimensions)."""
        eng = self.engine._engine
        return tuple(int(d) for d in eng.get_tensor_shape(name))

    def _check(self, feed: Mapping[str, npt.NDArray[Any]]) -> None:
        for name, (lo, _, hi) in self.shapes.items():
            shape = tuple(feed[name].shape)
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b
                                            in zip(shape, lo, hi, strict=False)):
                raise ValueError(f"input {name!r} shape {shape} is outside the TensorRT "
                                 f"profile {lo}..{hi} (rebuild the plan for longer inputs)")

    def _run_once(self, feed: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self._check(feed)
        e = self.engine
        torch = e._torch
        with e._lock, torch.cuda.stream(e._stream):
            keep = []
            for n in e._inputs:
                t = torch.from_numpy(np.ascontiguousarray(feed[n])).to(
                    "cuda", dtype=e._torch_dtype(n), non_blocking=True).contiguous()
                keep.append(t)
                if not e._context.set_input_shape(n, tuple(t.shape)):
                    raise ValueError(f"TensorRT refused shape {tuple(t.shape)} for {n!r}")
                ptr = t.data_ptr()
                if t.numel() == 0:  # an empty tensor still needs a valid address
                    if self._dummy is None:
                        self._dummy = torch.zeros(64, dtype=torch.float32, device="cuda")
                    ptr = self._dummy.data_ptr()
                e._context.set_tensor_address(n, ptr)
            outs = {}
            for n in e._outputs:
                shape = tuple(e._context.get_tensor_shape(n))
                t = torch.empty(shape, dtype=e._torch_dtype(n), device="cuda")
                outs[n] = t
                e._context.set_tensor_address(n, t.data_ptr())
            if not e._context.execute_async_v3(e._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            e._stream.synchronize()
            return {n: t.cpu().numpy() for n, t in outs.items()}

    def run(self, output_names: Sequence[str] | None,
            feed: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Outputs ``output_names`` (``None``: the plan's outputs in order)."""
        names = list(output_names) if output_names is not None else self.engine.output_names
        max_b = min(hi[0] for _, _, hi in self.shapes.values())
        n = int(next(iter(feed.values())).shape[0])
        if n <= max_b or any(lo[0] == hi[0] for lo, _, hi in self.shapes.values()):
            got = self._run_once(feed)
            return [got[k] for k in names]
        parts = [self._run_once({k: v[i:i + max_b] for k, v in feed.items()})
                 for i in range(0, n, max_b)]
        return [np.concatenate([p[k] for p in parts]) for k in names]

    def close(self) -> None:
        """Free the plan's context and engine."""
        self._dummy = None
        self.engine.close()


def _tensorrt_installed() -> bool:
    """Whether the ``tensorrt`` package can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def language_session(onnx_path: Path, preference: str | Sequence[str] = "auto", *,
                     dims: Mapping[str, DimRange], build_plan: bool = True
                     ) -> LanguageSession:
    """The first engine of :func:`language_engine_order` that runs ``onnx_path`` here.

    Logs which engine runs the graph and why earlier ones were not usable, when there was a
    choice: on a machine without the ``tensorrt`` package TensorRT is not tried and nothing is
    logged (the vision model's :func:`~inference.engines.select_engine` already says why
    TensorRT is out), so a CPU-only process's output stays as it was.

    Parameters
    ----------
    onnx_path
        The language graph.
    preference
        The vision model's engine preference (``auto``, a name or an ordered list).
    dims
        Ranges of the graph's dynamic dimensions (the TensorRT profile).
    build_plan
        Let TensorRT build a missing plan (seconds for these graphs).

    Raises
    ------
    EngineUnavailable
        The file is missing or ONNX Runtime cannot load it (with every reason).
    """
    skipped: dict[str, str] = {}
    order = language_engine_order(preference)
    if not _tensorrt_installed():
        order = [n for n in order if n != "tensorrt"]
    for name in order:
        try:
            if name == "tensorrt":
                sess: LanguageSession = TensorRTSession.for_onnx(onnx_path, dims,
                                                                 build=build_plan)
            else:
                if not onnx_path.is_file():
                    raise EngineUnavailable(f"no {onnx_path.name}")
                sess = OrtCpuSession(onnx_path)
        except EngineUnavailable as err:
            skipped[name] = str(err)
            continue
        if skipped or sess.name != "onnxruntime":
            _log.info("language engine selected", graph=onnx_path.name, engine=sess.name,
                      provider=sess.provider, not_used=skipped or None)
        return sess
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise EngineUnavailable(f"no engine can run {onnx_path.name} here ({reasons})")
