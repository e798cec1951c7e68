"""INT8 variants of a package's ONNX graph: static QDQ quantisation on validation windows.

:func:`quantize_package` writes ``<version>/model.int8.onnx`` with ONNX Runtime's static
quantiser: QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs around float ops, the form
ONNX Runtime fuses into integer kernels on CPU and TensorRT builds INT8 plans from), per-channel
symmetric int8 weights, asymmetric uint8 activations (U8S8, the fast path of AVX-512 VNNI and
AMX). Activation ranges are calibrated on **validation** inputs only: the validation cases of
:func:`inference.omnimri.calibrate.validation_case` turned into exactly the tensors the node
feeds the engine (:func:`inference.preprocess.prepare`,
:func:`~inference.preprocess.sliding_windows`, :func:`~inference.preprocess.extract_batch`).
Held-out cases are left for the accuracy check (:func:`accuracy_check`), which decides whether
the variant may run.

:func:`add_variant` declares the file in ``model.yaml`` ``variants`` and, when asked and the
check passed, makes it the one that runs (``variant``).

Needs ``onnx`` (train/test extras); offline tooling, not the node's runtime.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import structlog
import yaml
from pydantic import ValidationError

from inference.package import SPEC_FILE, InputSpec, ModelPackage, ModelSpec
from inference.postprocess import activate
from inference.preprocess import extract_batch, windowed

_log = structlog.get_logger(__name__)

INT8_FILE = "model.int8.onnx"
"""File name of the INT8 (QDQ) variant in the version folder."""

DEFAULT_OPS = ("Conv", "Concat", "Resize")
"""Node types quantised by default: the convolutions, and the decoders' upsampling and skip
concatenations in front of them.

Chosen by profile (``benchmarks/ort_profile.py``; docs/engines.md): ONNX Runtime fuses each
``DequantizeLinear -> op -> QuantizeLinear`` group into an integer kernel (``QLinearConv``,
``QLinearConcat``, a uint8 ``Resize``), so quantising ``Concat`` and ``Resize`` moves the
activations' quantisation in front of the 2× upsampling (a quarter of the elements) and drops a
float concatenation of the full-resolution skip. ``MatMul``/``Gemm`` (the ViT at 1/8
resolution, the heads) stay float: their ``QLinearMatMul`` saved less than the
``QuantizeLinear``/``DequantizeLinear`` around the attention scores cost."""


def window_tensors(array: npt.NDArray[np.float32], affine: npt.NDArray[np.float64],
                   spec: InputSpec, every: int = 1) -> Iterator[npt.NDArray[np.generic]]:
    """The engine inputs the node makes from one source volume, one window at a time.

    Args:
        array: Source ``[K, J, I]`` volume (float32, rescaled).
        affine: Its 4x4 LPS affine, mm.
        spec: The package's input spec.
        every: Keep every ``every``-th window (neighbouring 2.5-D windows are near duplicates).

    Yields:
        ``[1, C, ...]`` tensors in ``spec.dtype``.
    """
    win = windowed(array, affine, spec)
    for n, w in enumerate(win.windows):
        if n % every == 0:
            yield extract_batch(win.padded, [w], spec)


def validation_inputs(package: ModelPackage, cases: int = 6, *, seed: int = 0, every: int = 3
                      ) -> list[npt.NDArray[np.generic]]:
    """Calibration inputs from OmniMRI validation cases (never held-out ones).

    Each case becomes the volume a node would build from its DICOM series
    (:func:`inference.omnimri.evaluate.case_volume`), then the engine's input windows.

    Args:
        package: The package whose input spec makes the windows.
        cases: Validation cases (they cycle normal / small vessel / mass).
        seed: Validation set seed.
        every: Keep every ``every``-th window of each case.
    """
    from inference.omnimri.calibrate import validation_case
    from inference.omnimri.evaluate import case_volume

    out: list[npt.NDArray[np.generic]] = []
    for n in range(cases):
        vol = case_volume(validation_case(n, seed))
        out.extend(window_tensors(vol.array, vol.affine, package.spec.input, every))
    return out


def light_nodes(model_path: Path, min_macs_per_output: int = 64) -> list[str]:
    """Nodes not worth quantising: too little arithmetic per element to pay for Q/DQ.

    A ``Conv`` whose every output element costs fewer than ``min_macs_per_output``
    multiply-accumulates (``Cin/group × kernel`` from its weight: stems on few input channels,
    1×1 heads) spends more time quantising and dequantising its tensors than it saves in
    integer arithmetic, and is where the quantisation error reaches the outputs directly.
    A ``MatMul`` of two activations (attention scores and mixing) has no constant weight to
    quantise per channel. Both stay float.
    """
    import onnx

    model = onnx.load(str(model_path))
    consts = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = list(node.attribute[0].t.dims)
    out = []
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.op_type == "Conv" and node.input[1] in consts:
            if int(np.prod(consts[node.input[1]][1:])) < min_macs_per_output:
                out.append(name)
        elif node.op_type == "MatMul" and not any(i in consts for i in node.input[:2]):
            out.append(name)
    return out


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of tensors."""

    def __init__(self, name: str, tensors: Sequence[npt.NDArray[np.generic]]) -> None:
        self._name = name
        self._tensors = tensors
        self._it = iter(tensors)

    def get_next(self) -> dict[str, npt.NDArray[np.generic]] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}

    def rewind(self) -> None:
        """Start again from the first tensor (calibration methods that read twice)."""
        self._it = iter(self._tensors)


_METHODS = ("minmax", "percentile", "entropy")


def _preprocess(model_path: Path, pre: Path) -> None:
    """ORT's quantisation pre-processing (shape inference, graph clean-up) into ``pre``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the quantiser's shape inference drops temporary files into the working directory
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        try:
            quant_pre_process(str(model_path), str(pre), auto_merge=True)
        except Exception:  # symbolic shape inference gives up on some dynamic graphs
            quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)


def _quantize_static(
    pre: Path, out_path: Path, reader: _Reader | None, *, op_types: Sequence[str],
    exclude_nodes: Sequence[str] = (), only_nodes: Sequence[str] = (), method: str,
    calibration_cache: Path | None = None,
) -> None:
    """``quantize_static`` with the node's settings (QDQ, U8S8, per-channel symmetric weights).

    ``calibration_cache``: ORT's calibration-range file; written on the first call (from
    ``reader``), read on later ones (``reader`` may then be ``None``), so a search quantises
    the same graph many ways from one calibration. ``only_nodes``: quantise just these.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    # ``calibration_cache_path`` is recent (ORT 1.31 has it, 1.24 not): passed only when asked
    cache = {"calibration_cache_path": str(calibration_cache)} if calibration_cache else {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        quantize_static(
            str(pre), str(out_path), reader,
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types), nodes_to_exclude=list(exclude_nodes),
            nodes_to_quantize=list(only_nodes), calibrate_method=methods[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                           "CalibPercentile": 99.999},
            **cache,
        )


def quantize_onnx(
    model_path: Path, out_path: Path, inputs: Sequence[npt.NDArray[np.generic]], input_name: str,
    *, op_types: Sequence[str] = DEFAULT_OPS, exclude_nodes: Sequence[str] = (),
    method: str = "minmax",
) -> dict[str, Any]:
    """Static QDQ quantisation of ``model_path`` into ``out_path``.

    Args:
        model_path: Float32 ONNX graph.
        out_path: Where the QDQ graph goes.
        inputs: Calibration tensors (validation data only).
        input_name: The graph input they feed.
        op_types: Node types to quantise.
        exclude_nodes: Node names kept in float (e.g. output heads).
        method: ``minmax``, ``percentile`` (99.999) or ``entropy`` activation calibration.

    Returns:
        What was done (recorded in ``model.yaml``): format, op types, method, sample count,
        seconds.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(_METHODS)}")
    t0 = time.perf_counter()
    model_path, out_path = Path(model_path).resolve(), Path(out_path).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        _preprocess(model_path, pre)
        _quantize_static(pre, out_path, _Reader(input_name, inputs), op_types=op_types,
                         exclude_nodes=exclude_nodes, method=method)
    info = {"format": "QDQ", "weights": "int8 per-channel symmetric",
            "activations": "uint8 per-tensor asymmetric", "op_types": list(op_types),
            "excluded_nodes": list(exclude_nodes), "calibration_method": method,
            "calibration_windows": len(inputs),
            "seconds": round(time.perf_counter() - t0, 1)}
    _log.info("quantised", model=model_path.name, out=out_path.name, **{
        k: v for k, v in info.items() if k != "excluded_nodes"})
    return info


def quantize_package(
    package: ModelPackage, *, out_path: Path | None = None, cases: int = 6, seed: int = 0,
    every: int = 3, op_types: Sequence[str] = DEFAULT_OPS, exclude_nodes: Sequence[str] = (),
    method: str = "percentile", version: int | None = None, exclude_light: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write the INT8 QDQ variant of ``package`` (default ``<version>/model.int8.onnx``).

    Calibrated on ``cases`` OmniMRI validation cases (every ``every``-th window);
    ``exclude_light`` keeps :func:`light_nodes` in float as well as ``exclude_nodes``.

    Returns:
        ``(path, info)``; ``info`` adds the validation cases and seed to :func:`quantize_onnx`'s.
    """
    out_path = out_path or package.file(INT8_FILE, version)
    inputs = validation_inputs(package, cases, seed=seed, every=every)
    exclude = list(exclude_nodes)
    if exclude_light:
        exclude += [n for n in light_nodes(package.onnx_path(version)) if n not in exclude]
    info = quantize_onnx(package.onnx_path(version), out_path, inputs, package.spec.input.name,
                         op_types=op_types, exclude_nodes=exclude, method=method)
    info.update({"calibration_set": "validation", "calibration_cases": cases,
                 "calibration_seed": seed})
    return out_path, info


SENSITIVITY_MODES = ("alone", "all-but-one")
"""How a node's sensitivity is measured: quantise that node **alone** (everything else float:
its own error), or quantise **all but one** (the error it removes from the fully quantised
graph). One quantised graph and one run over the windows per node either way."""


def quantisable_nodes(model_path: Path, op_types: Sequence[str] = DEFAULT_OPS
                      ) -> list[tuple[str, str]]:
    """``(name, op_type)`` of the nodes of ``model_path`` the quantiser would quantise.

    Nodes without a name cannot be excluded by name and are left out.
    """
    import onnx

    model = onnx.load(str(model_path))
    return [(n.name, n.op_type) for n in model.graph.node
            if n.op_type in op_types and n.name]


def _run_windows(path: Path, inputs: Sequence[npt.NDArray[np.generic]], input_name: str,
                 output: str, activation: str, threads: int, batch: int
                 ) -> npt.NDArray[np.float64]:
    """``output``'s probabilities over ``inputs`` (batched), from the graph at ``path``."""
    import onnxruntime as ort

    from inference.engines.onnxruntime import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
    outs = [sess.run([output], {input_name: np.concatenate(inputs[i:i + batch])})[0]
            for i in range(0, len(inputs), batch)]
    return activate(np.concatenate(outs), activation, axis=1).astype(np.float64)


def node_sensitivity(
    pre: Path, inputs: Sequence[npt.NDArray[np.generic]], input_name: str, output: str, *,
    calibration_cache: Path, op_types: Sequence[str] = DEFAULT_OPS, method: str = "percentile",
    mode: str = "alone", activation: str = "softmax", threads: int = 1, batch: int = 4,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Rank the quantisable nodes by how much quantising them moves ``output``'s probabilities.

    The graph is cut to the nodes ``output`` needs (nodes of other heads cannot move it); each
    quantisable node gets one QDQ graph, quantised from the cached calibration ranges
    (``mode``: that node alone, or all nodes but it; :data:`SENSITIVITY_MODES`), run over
    ``inputs`` and compared with the float graph's probabilities.

    Args:
        pre: The pre-processed float graph (:func:`_preprocess`).
        inputs: Validation windows (never held-out data).
        input_name: The graph input.
        output: The output compared (the tissue probabilities).
        calibration_cache: ORT's calibration-range file, already written from the full graph.
        op_types: Node types quantised.
        method: Calibration method the cache was made with.
        mode: ``alone`` or ``all-but-one``.
        activation: ``output``'s activation (``softmax``, ``sigmoid``, ``none``).
        threads: ORT intra-op threads.
        batch: Windows per run.
        progress: Called with a line per node measured.

    Returns:
        One entry per node, most sensitive first (ties by name): ``node``, ``op_type``,
        ``score`` (``alone``: the node's mean |delta p|; ``all-but-one``: the mean |delta p| the
        fully quantised graph loses without it), ``mean_abs_dp`` and ``argmax_flip`` (fraction
        of voxels whose most probable class changes) of the graph measured.
    """
    from inference.engines.onnxruntime import prune_graph

    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"unknown sensitivity mode {mode!r}; one of "
                         f"{', '.join(SENSITIVITY_MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "cut.onnx"
        cut.write_bytes(prune_graph(pre, [output]))
        ref = _run_windows(cut, inputs, input_name, output, activation, threads, batch)
        ref_arg = ref.argmax(1)

        def error(**nodes: Sequence[str]) -> tuple[float, float]:
            q = Path(tmp) / "q.onnx"
            _quantize_static(cut, q, None, op_types=op_types, method=method,
                             calibration_cache=calibration_cache, **nodes)
            got = _run_windows(q, inputs, input_name, output, activation, threads, batch)
            return (float(np.mean(np.abs(got - ref))),
                    float(np.mean(got.argmax(1) != ref_arg)))

        nodes = quantisable_nodes(cut, op_types)
        full = error() if mode == "all-but-one" else (0.0, 0.0)
        ranking: list[dict[str, Any]] = []
        for i, (name, op) in enumerate(nodes):
            dp, flip = error(only_nodes=[name]) if mode == "alone" else error(
                exclude_nodes=[name])
            score = dp if mode == "alone" else full[0] - dp
            ranking.append({"node": name, "op_type": op, "score": float(f"{score:.4g}"),
                            "mean_abs_dp": float(f"{dp:.4g}"),
                            "argmax_flip": float(f"{flip:.4g}")})
            if progress:
                progress(f"sensitivity {i + 1}/{len(nodes)}: {ranking[-1]}")
    ranking.sort(key=lambda r: (-float(r["score"]), str(r["node"])))
    return ranking


SELECT_ON = ("tissue", "all")
"""What a candidate must meet on the validation cases of :func:`auto_exclude`: the tissue
Dice tolerance only, or the accuracy check's whole rule (also detections and diagnoses)."""


def _exclusion_steps(n: int) -> Iterator[int]:
    """The doubling phase of the search: k = 0, 1, 2, 4, ... up to ``n``."""
    k = 0
    while k < n:
        yield k
        k = 1 if k == 0 else 2 * k
    yield n


def smallest_passing(n: int, passes: Callable[[int], bool]) -> int:
    """The smallest k in ``0..n`` with ``passes(k)``: doubling (0, 1, 2, 4, ...), then bisection.

    ``passes(n)`` is assumed true (everything float is the float graph) and is only called when
    no smaller k passed. About ``2 log2 n`` calls for a monotone ``passes``.
    """
    lo, hi = -1, n
    for k in _exclusion_steps(n):
        if k == n:
            break
        if passes(k):
            hi = k
            break
        lo = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def mixed_precision(
    model_path: Path, out_path: Path, calibration: Sequence[npt.NDArray[np.generic]],
    windows: Sequence[npt.NDArray[np.generic]], input_name: str, output: str,
    passes: Callable[[Path], dict[str, Any]], *, op_types: Sequence[str] = DEFAULT_OPS,
    method: str = "percentile", mode: str = "alone", activation: str = "softmax",
    threads: int = 1, calibration_cache: Path | None = None, progress: Any = None,
) -> dict[str, Any]:
    """Quantise ``model_path`` keeping its most sensitive nodes float, as few as ``passes``.

    The standard mixed-precision recipe (TensorRT / ModelOpt layer-wise sensitivity):

    1. calibrate once on ``calibration`` (the ranges are cached; every later graph is quantised
       from them, none is calibrated again);
    2. rank the quantisable nodes by :func:`node_sensitivity` of ``output`` on ``windows``;
    3. keep the top k float, k the smallest whose QDQ graph ``passes``
       (:func:`smallest_passing`), and write that graph to ``out_path``.

    Deterministic given the graph, the inputs and ``passes``.

    Args:
        model_path: Float32 ONNX graph.
        out_path: Where the chosen QDQ graph goes.
        calibration: Calibration tensors (validation data only).
        windows: Tensors the sensitivity is measured on (validation data only).
        input_name: The graph input.
        output: The output whose probabilities rank the nodes.
        passes: Judges a candidate QDQ graph (a file): a dict with ``passed`` and whatever
            numbers should be recorded.
        op_types: Node types quantised.
        method: Calibration method.
        mode: :data:`SENSITIVITY_MODES`.
        activation: ``output``'s activation.
        threads: ORT intra-op threads of the sensitivity runs.
        calibration_cache: Keep the calibration ranges in this file: read when it exists
            (``calibration`` is then not run), written otherwise; ``None``: a temporary file.
        progress: Called with a line per step.

    Returns:
        ``excluded_nodes`` (the top k) and ``auto_exclude``: mode, metric, k, every node kept
        float with its sensitivity, the next most sensitive, each k tried with its numbers and
        the seconds of each phase.
    """
    import inspect

    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static

    if method not in _METHODS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(_METHODS)}")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise RuntimeError(f"the sensitivity search needs an onnxruntime whose quantize_static "
                           f"reuses calibration ranges (calibration_cache_path; 1.31 has it), "
                           f"not {ort.__version__}")
    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    out_path = Path(out_path).resolve()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pre, candidate = tmp / "pre.onnx", tmp / "k.onnx"
        cache = calibration_cache or tmp / "calibration.json"
        cached = cache.is_file()
        _preprocess(Path(model_path).resolve(), pre)
        try:
            _quantize_static(pre, candidate, _Reader(input_name, calibration),
                             op_types=op_types, method=method, calibration_cache=cache)
        except (OSError, ValueError) as err:  # a damaged or unwritable cache: calibrate afresh
            _log.warning("calibration cache unusable; calibrating", error=str(err))
            with contextlib.suppress(OSError):
                cache.unlink(missing_ok=True)
            if not cached or cache.exists():  # unwritable, or undeletable: a temporary file
                cache = tmp / "calibration.json"
            cached = False
            _quantize_static(pre, candidate, _Reader(input_name, calibration),
                             op_types=op_types, method=method, calibration_cache=cache)
        t_calib = time.perf_counter() - t0
        say(f"{'calibration ranges from ' + cache.name if cached else 'calibrated'} on "
            f"{len(calibration)} windows ({t_calib:.0f} s)")
        ranking = node_sensitivity(pre, windows, input_name, output, calibration_cache=cache,
                                   op_types=op_types, method=method, mode=mode,
                                   activation=activation, threads=threads, progress=say)
        t_sens = time.perf_counter() - t0 - t_calib
        tried: dict[int, dict[str, Any]] = {}

        def check(k: int) -> bool:
            _quantize_static(pre, candidate, None, op_types=op_types, method=method,
                             exclude_nodes=[r["node"] for r in ranking[:k]],
                             calibration_cache=cache)
            tried[k] = {"k": k, **passes(candidate)}
            say(f"k={k}: {tried[k]}")
            return bool(tried[k]["passed"])

        k = smallest_passing(len(ranking), check)
        exclude = [r["node"] for r in ranking[:k]]
        _quantize_static(pre, out_path, None, op_types=op_types, exclude_nodes=exclude,
                         method=method, calibration_cache=cache)
    return {
        "excluded_nodes": exclude,
        "auto_exclude": {
            "mode": mode, "metric": f"mean |delta p| of {output} ({activation})",
            "sensitivity_windows": len(windows), "k": k, "quantisable_nodes": len(ranking),
            "float_nodes": ranking[:k], "next_most_sensitive": ranking[k:k + 5],
            "tried": [tried[j] for j in sorted(tried)],
            "calibration_cache": "read" if cached else "computed",
            "seconds": {"calibration": round(t_calib, 1), "sensitivity": round(t_sens, 1),
                        "selection": round(time.perf_counter() - t0 - t_calib - t_sens, 1)},
        },
    }


def _calibration_cache_path(package: ModelPackage, version: int | None, method: str,
                            op_types: Sequence[str], cases: int, seed: int, every: int
                            ) -> Path | None:
    """Where :func:`auto_exclude` keeps a package's calibration ranges (``ort_cache``).

    Keyed by the graph's SHA-256, the ORT version and every calibration setting, so a new
    model or setting never reads stale ranges; ``None`` when the folder is not writable.
    """
    import hashlib

    import onnxruntime as ort

    folder = package.ort_cache_dir(version)
    digest = hashlib.sha256(package.onnx_path(version).read_bytes()).hexdigest()[:12]
    ops = "-".join(sorted(op_types)).lower()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / (f"calibration.{digest}.ort{ort.__version__}.{method}.{ops}."
                     f"c{cases}s{seed}e{every}.json")


def auto_exclude(
    package: ModelPackage, *, out_path: Path | None = None, cases: int = 6, seed: int = 0,
    every: int = 3, op_types: Sequence[str] = DEFAULT_OPS, method: str = "percentile",
    version: int | None = None, mode: str = "alone", sensitivity_cases: int = 2,
    sensitivity_every: int = 12, select_cases: int = 6, select_seed: int = 1,
    margin: float = 0.5, select_on: str = "tissue", output: str | None = None,
    threads: int = 1, progress: Any = None,
) -> tuple[Path, dict[str, Any]]:
    """The INT8 variant of an OmniMRI package with its most sensitive nodes kept float.

    :func:`mixed_precision` on validation data only: calibrated on ``cases`` validation cases
    of ``seed`` (every ``every``-th window), nodes ranked on the tissue probabilities of
    ``sensitivity_cases`` of them (every ``sensitivity_every``-th window), and a candidate
    passes when, through the served path on ``select_cases`` validation cases of set
    ``select_seed`` (not the calibration cases), every tissue class's mean Dice moves by at
    most ``margin`` × :data:`TISSUE_DICE_TOLERANCE` (headroom for the held-out check) and,
    with ``select_on="all"``, every case also has the same detections and diagnosis (the
    accuracy check's whole rule, :func:`_compare`); with ``"tissue"`` those are recorded, not
    required. Held-out cases stay for :func:`accuracy_check`, which the caller runs once on
    the result and which requires all three.

    Returns:
        ``(path, info)``: :func:`quantize_package`'s info (``excluded_nodes`` the top k) with
        ``auto_exclude`` (:func:`mixed_precision`'s, plus the rule in words and the cases).
    """
    from inference.engines import create_engine
    from inference.engines.onnxruntime import OnnxRuntimeEngine
    from inference.omnimri.calibrate import validation_case
    from inference.omnimri.evaluate import ServedModel

    if select_on not in SELECT_ON:
        raise ValueError(f"unknown select_on {select_on!r}; one of {', '.join(SELECT_ON)}")
    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"unknown sensitivity mode {mode!r}; one of "
                         f"{', '.join(SENSITIVITY_MODES)}")
    if method not in _METHODS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(_METHODS)}")
    t0 = time.perf_counter()
    out_path = Path(out_path or package.file(INT8_FILE, version))
    seg = [o for o in package.spec.outputs if o.kind == "segmentation"]
    spec_out = next((o for o in seg if o.name == (output or "tissue")), seg[0] if seg else None)
    if spec_out is None:
        raise ValueError(f"{package.name}: no segmentation output to measure sensitivity on")
    activation = str(getattr(spec_out, "activation", "softmax") or "none")
    calib = validation_inputs(package, cases, seed=seed, every=every)
    windows = validation_inputs(package, sensitivity_cases, seed=seed, every=sensitivity_every)
    instr = [t for t in ACCURACY_INSTRUCTIONS if t in package.spec.tasks]
    select = [validation_case(n, select_seed) for n in range(select_cases)]
    ref = ServedModel(package, create_engine("onnxruntime", package, variant="fp32",
                                             intra_op_threads=threads))
    try:
        ref_out = [_outcome(ref, c, instr) for c in select]
    finally:
        ref.close()
    tolerance = margin * TISSUE_DICE_TOLERANCE

    def passes(candidate: Path) -> dict[str, Any]:
        var = ServedModel(package, OnnxRuntimeEngine(
            candidate, providers=["CPUExecutionProvider"], intra_op_threads=threads))
        try:
            got = [_outcome(var, c, instr) for c in select]
        finally:
            var.close()
        res = _compare(ref_out, got, "int8", tolerance)
        if select_on == "tissue":
            res["passed"] = res["tissue_dice_max_mean_delta"] <= tolerance
        return {k: res[k] for k in ("passed", "tissue_dice_max_mean_delta",
                                    "same_detections_cases", "same_diagnosis_cases")}

    found = mixed_precision(package.onnx_path(version), out_path, calib, windows,
                            package.spec.input.name, spec_out.name, passes, op_types=op_types,
                            method=method, mode=mode, activation=activation, threads=threads,
                            calibration_cache=_calibration_cache_path(
                                package, version, method, op_types, cases, seed, every),
                            progress=progress)
    auto = found["auto_exclude"]
    auto.update({
        "rule": (f"the k most sensitive of {auto['quantisable_nodes']} quantisable nodes stay "
                 f"float; k the smallest whose variant keeps every tissue class's mean Dice "
                 f"within {tolerance:g}"
                 + (", the same detections and the same diagnoses" if select_on == "all"
                    else "") + f" on {select_cases} validation cases of seed {select_seed}"),
        "select_on": select_on, "sensitivity_cases": sensitivity_cases,
        "select_cases": select_cases, "select_seed": select_seed, "margin": margin})
    info: dict[str, Any] = {
        "format": "QDQ", "weights": "int8 per-channel symmetric",
        "activations": "uint8 per-tensor asymmetric", "op_types": list(op_types),
        "excluded_nodes": found["excluded_nodes"], "calibration_method": method,
        "calibration_windows": len(calib), "seconds": round(time.perf_counter() - t0, 1),
        "calibration_set": "validation", "calibration_cases": cases, "calibration_seed": seed,
        "auto_exclude": auto,
    }
    _log.info("auto-excluded", model=package.name, k=auto["k"],
              nodes=auto["quantisable_nodes"], seconds=info["seconds"])
    return out_path, info


FP8_FILE = "model.fp8.onnx"
"""File name of the FP8 (QDQ, ModelOpt) variant: TensorRT on Hopper/Ada GPUs only."""


def quantize_fp8_modelopt(
    package: ModelPackage, *, out_path: Path | None = None, cases: int = 6, seed: int = 0,
    every: int = 3, version: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The FP8 QDQ variant with NVIDIA ModelOpt (``modelopt.onnx.quantization``), same inputs.

    ONNX Runtime's CPU kernels do not run FP8; the file is a TensorRT build input
    (:func:`inference.engines.tensorrt.build_plan` with ``variant="fp8"``). Calibrated on the
    same validation windows as the INT8 variant (``max`` calibration).

    Raises:
        RuntimeError: ``nvidia-modelopt`` is not installed.
    """
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError:
        raise RuntimeError("FP8 variants need nvidia-modelopt (pip install nvidia-modelopt"
                           "[onnx]) on a machine with TensorRT") from None
    out_path = out_path or package.file(FP8_FILE, version)
    inputs = validation_inputs(package, cases, seed=seed, every=every)
    t0 = time.perf_counter()
    mo_quantize(str(package.onnx_path(version)), quantize_mode="fp8",
                calibration_data={package.spec.input.name: np.concatenate(inputs)},
                calibration_method="max", output_path=str(out_path))
    return out_path, {"format": "QDQ", "tool": "nvidia-modelopt", "mode": "fp8",
                      "calibration_method": "max", "calibration_set": "validation",
                      "calibration_cases": cases, "calibration_windows": len(inputs),
                      "seconds": round(time.perf_counter() - t0, 1)}


ACCURACY_INSTRUCTIONS = ("segment brain tissues", "detect abnormalities", "suggest a diagnosis")
"""What the accuracy check runs (tissues, detections, diagnosis: the three criteria)."""

TISSUE_DICE_TOLERANCE = 0.005
"""Largest allowed change of a tissue class's mean Dice (against ground truth)."""

DETECTION_MATCH_MM = 4.0
"""A variant's detection is "the same" as fp32's when its centroid lies within this (mm)."""


def _match_detections(a: list[Any], b: list[Any]) -> int:
    """How many detections of ``a`` have a partner in ``b``.

    A partner has the same finding and its centroid within :data:`DETECTION_MATCH_MM` (greedy,
    nearest first, each partner used once).
    """
    left = list(b)
    matched = 0
    for det in a:
        pa = np.asarray(det.centroid_lps_mm)
        cands = [d for d in left if d.finding == det.finding]
        if not cands:
            continue
        dist = [float(np.linalg.norm(pa - np.asarray(d.centroid_lps_mm))) for d in cands]
        k = int(np.argmin(dist))
        if dist[k] <= DETECTION_MATCH_MM:
            matched += 1
            left.remove(cands[k])
    return matched


def _same_detections(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and _match_detections(a, b) == len(a)


class _Outcome(NamedTuple):
    """What one case's served run contributes to a comparison."""

    score: Any
    """:class:`inference.omnimri.evaluate.CaseScore` against the case's ground truth."""
    detections: list[Any]
    diagnosis: str | None
    """The diagnosis code (``None``: no diagnosis)."""
    seconds: float
    """Inference seconds (the runner's ``timings_s["inference"]``)."""


def _outcome(model: Any, case: Any, instructions: list[str]) -> _Outcome:
    """Run one synthetic case through the served path (engine run + post-processing)."""
    from inference.omnimri.evaluate import case_volume, score_case

    vol = case_volume(case)
    t0 = time.perf_counter()
    raw = model.raw(vol, instructions)
    secs = float(raw.timings_s.get("inference", time.perf_counter() - t0))
    res = model.results(raw, vol, instructions)
    dx = res.diagnosis.code if res.diagnosis is not None else None
    return _Outcome(score_case(case, res), list(res.detections), dx, secs)


def _compare(ref: Sequence[_Outcome], var: Sequence[_Outcome], variant: str,
             tolerance: float = TISSUE_DICE_TOLERANCE) -> dict[str, Any]:
    """The accuracy-check numbers of ``var`` against ``ref`` (same cases, same order).

    Passed when every tissue class's mean Dice moves by at most ``tolerance``, every case has
    the same detections and every case the same diagnosis.
    """
    keys = ("brain", "csf", "gm", "wm", "lesion")
    dice: dict[str, dict[str, list[float]]] = {k: {"fp32": [], variant: []} for k in keys}
    same_det = same_dx = det_matched = 0
    det_counts = [0, 0]
    per_case: list[dict[str, Any]] = []
    for n, (a, b) in enumerate(zip(ref, var, strict=True)):
        for k in keys:
            if k in a.score.dice and k in b.score.dice:
                dice[k]["fp32"].append(a.score.dice[k])
                dice[k][variant].append(b.score.dice[k])
        det = _same_detections(a.detections, b.detections)
        det_matched += _match_detections(a.detections, b.detections)
        dx = a.diagnosis == b.diagnosis
        same_det += int(det)
        same_dx += int(dx)
        det_counts[0] += len(a.detections)
        det_counts[1] += len(b.detections)
        per_case.append({"case": n, "same_detections": det, "same_diagnosis": dx,
                         "detections": [len(a.detections), len(b.detections)],
                         "dice_delta": {k: round(b.score.dice[k] - a.score.dice[k], 5)
                                        for k in a.score.dice if k in b.score.dice}})
    result: dict[str, Any] = {}
    worst_tissue = 0.0
    for k in keys:
        xs, ys = dice[k]["fp32"], dice[k][variant]
        if not xs:
            continue
        delta = float(np.mean(ys) - np.mean(xs))
        worst = float(max(abs(y - x) for x, y in zip(xs, ys, strict=True)))
        result[f"dice_{k}"] = {"fp32": round(float(np.mean(xs)), 5),
                               variant: round(float(np.mean(ys)), 5),
                               "delta": round(delta, 5), "worst_case_delta": round(worst, 5)}
        if k != "lesion":
            worst_tissue = max(worst_tissue, abs(delta))
    cases = len(per_case)
    secs = {"fp32": sum(o.seconds for o in ref), variant: sum(o.seconds for o in var)}
    result["tissue_dice_max_mean_delta"] = round(worst_tissue, 5)
    result["same_detections_cases"] = same_det
    result["detections"] = {"fp32": det_counts[0], variant: det_counts[1],
                            "matched": det_matched}
    result["same_diagnosis_cases"] = same_dx
    result["inference_s"] = {k: round(v, 2) for k, v in secs.items()}
    result["speedup"] = round(secs["fp32"] / secs[variant], 3) if secs[variant] else 0.0
    result["passed"] = bool(worst_tissue <= tolerance and same_det == cases
                            and same_dx == cases)
    result["per_case"] = per_case
    return result


def accuracy_check(
    package: ModelPackage, variant: str = "int8", *, cases: int = 6, seed: int = 0,
    threads: int = 0, progress: Any = None,
) -> dict[str, Any]:
    """Compare ``variant`` with ``fp32`` through the served path on held-out cases.

    Each held-out case (:func:`inference.omnimri.evaluate.heldout_case`) becomes the volume a
    node builds from DICOM, runs through :func:`inference.runner.run_model` and the OmniMRI
    post-processing on both graphs, and is scored against its ground truth
    (:func:`inference.omnimri.evaluate.score_case`). The variant passes when

    * every tissue class's mean Dice (brain, CSF, GM, WM) moves by at most
      :data:`TISSUE_DICE_TOLERANCE`,
    * every case has the same detections (same count and finding, centroids within
      :data:`DETECTION_MATCH_MM`),
    * every case has the same diagnosis.

    Returns:
        The numbers (recorded in ``model.yaml``): ``passed``, per-class mean Dice of both and
        the worst per-case change, detection and diagnosis agreement, inference seconds of
        both (interleaved, same machine), the cases and seed.
    """
    from inference.engines import create_engine
    from inference.omnimri.evaluate import ServedModel, heldout_case

    instr = [t for t in ACCURACY_INSTRUCTIONS if t in package.spec.tasks]
    ref = ServedModel(package, create_engine("onnxruntime", package, variant="fp32",
                                             intra_op_threads=threads))
    var = ServedModel(package, create_engine("onnxruntime", package, variant=variant,
                                             intra_op_threads=threads))
    ref_out: list[_Outcome] = []
    var_out: list[_Outcome] = []
    try:
        for n in range(cases):
            case = heldout_case(n, seed)
            ref_out.append(_outcome(ref, case, instr))
            var_out.append(_outcome(var, case, instr))
            if progress:
                row = _compare(ref_out[-1:], var_out[-1:], variant)["per_case"][0]
                progress(f"case {n + 1}/{cases}: {dict(row, case=n)}")
    finally:
        ref.close()
        var.close()
    result: dict[str, Any] = {"cases": cases, "seed": seed, "set": "held-out",
                              "instructions": instr}
    result.update(_compare(ref_out, var_out, variant))
    return result


def add_variant(
    folder: Path, name: str, file: str, precision: str, *, quantisation: dict[str, Any],
    check: dict[str, Any] | None, make_default: bool,
) -> None:
    """Declare a variant in ``folder/model.yaml`` (replacing one of the same name).

    Args:
        folder: Package folder.
        name: Variant name, e.g. ``int8``.
        file: Its file in the version folder.
        precision: ``int8``, ``bf16``, ``fp16``, ``fp8``.
        quantisation: How it was made (:func:`quantize_package`'s info).
        check: The accuracy check's numbers (``passed`` among them), or ``None`` (not run).
        make_default: Make it the variant that runs; refused unless ``check["passed"]``.

    Raises:
        ValueError: ``make_default`` without a passed check.
    """
    if make_default and not (check and check.get("passed")):
        raise ValueError(f"variant {name!r} did not pass the accuracy check; it cannot run")
    path = folder / SPEC_FILE
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    entry: dict[str, Any] = {"name": name, "file": file, "precision": precision,
                             "quantisation": quantisation}
    if check is not None:
        entry["accuracy_check"] = check
    variants = [v for v in spec.get("variants", []) if v.get("name") != name]
    variants.append(entry)
    spec["variants"] = variants
    if make_default:
        spec["variant"] = name
    elif spec.get("variant") == name:
        spec["variant"] = "fp32"
    try:
        ModelSpec.model_validate(spec)
    except ValidationError as err:
        raise ValueError(f"{path}: the variant would make model.yaml invalid: {err}") from None
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
