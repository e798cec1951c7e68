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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import yaml
from pydantic import ValidationError

from inference.package import SPEC_FILE, InputSpec, ModelPackage, ModelSpec
from inference.preprocess import extract_batch, pad_to_patch, prepare, sliding_windows

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
    prepared = prepare(array, affine, spec)
    padded = pad_to_patch(prepared.array, spec)
    for n, w in enumerate(sliding_windows(prepared.transform.model_shape, spec)):
        if n % every == 0:
            yield extract_batch(padded, [w], spec)


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
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    t0 = time.perf_counter()
    model_path, out_path = Path(model_path).resolve(), Path(out_path).resolve()
    # the quantiser's shape inference drops temporary files into the working directory
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(model_path), str(pre), auto_merge=True)
        except Exception:  # symbolic shape inference gives up on some dynamic graphs
            quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(out_path), _Reader(input_name, inputs),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types), nodes_to_exclude=list(exclude_nodes),
            calibrate_method=methods[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                           "CalibPercentile": 99.999},
        )
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
    from inference.omnimri.evaluate import ServedModel, case_volume, heldout_case, score_case

    instr = [t for t in ACCURACY_INSTRUCTIONS if t in package.spec.tasks]
    ref = ServedModel(package, create_engine("onnxruntime", package, variant="fp32",
                                             intra_op_threads=threads))
    var = ServedModel(package, create_engine("onnxruntime", package, variant=variant,
                                             intra_op_threads=threads))
    keys = ("brain", "csf", "gm", "wm", "lesion")
    dice: dict[str, dict[str, list[float]]] = {k: {"fp32": [], variant: []} for k in keys}
    same_det = same_dx = 0
    det_counts = [0, 0]
    det_matched = 0
    secs = {"fp32": 0.0, variant: 0.0}
    per_case: list[dict[str, Any]] = []
    try:
        for n in range(cases):
            case = heldout_case(n, seed)
            vol = case_volume(case)
            out = {}
            for name, model in (("fp32", ref), (variant, var)):
                t0 = time.perf_counter()
                raw = model.raw(vol, instr)
                secs[name] += float(raw.timings_s.get("inference", time.perf_counter() - t0))
                out[name] = model.results(raw, vol, instr)
            sa, sb = score_case(case, out["fp32"]), score_case(case, out[variant])
            for k in keys:
                if k in sa.dice and k in sb.dice:
                    dice[k]["fp32"].append(sa.dice[k])
                    dice[k][variant].append(sb.dice[k])
            det = _same_detections(out["fp32"].detections, out[variant].detections)
            det_matched += _match_detections(out["fp32"].detections, out[variant].detections)
            da, db = out["fp32"].diagnosis, out[variant].diagnosis
            dx = (da is None and db is None) or (
                da is not None and db is not None and da.code == db.code)
            same_det += int(det)
            same_dx += int(dx)
            det_counts[0] += len(out["fp32"].detections)
            det_counts[1] += len(out[variant].detections)
            per_case.append({"case": n, "same_detections": det, "same_diagnosis": dx,
                             "detections": [len(out["fp32"].detections),
                                            len(out[variant].detections)],
                             "dice_delta": {k: round(sb.dice[k] - sa.dice[k], 5)
                                            for k in sa.dice if k in sb.dice}})
            if progress:
                progress(f"case {n + 1}/{cases}: {per_case[-1]}")
    finally:
        ref.close()
        var.close()
    result: dict[str, Any] = {"cases": cases, "seed": seed, "set": "held-out",
                              "instructions": instr}
    worst_tissue = 0.0
    for k in keys:
        a, b = dice[k]["fp32"], dice[k][variant]
        if not a:
            continue
        delta = float(np.mean(b) - np.mean(a))
        worst = float(max(abs(y - x) for x, y in zip(a, b, strict=True)))
        result[f"dice_{k}"] = {"fp32": round(float(np.mean(a)), 5),
                               variant: round(float(np.mean(b)), 5),
                               "delta": round(delta, 5), "worst_case_delta": round(worst, 5)}
        if k != "lesion":
            worst_tissue = max(worst_tissue, abs(delta))
    result["tissue_dice_max_mean_delta"] = round(worst_tissue, 5)
    result["same_detections_cases"] = same_det
    result["detections"] = {"fp32": det_counts[0], variant: det_counts[1],
                            "matched": det_matched}
    result["same_diagnosis_cases"] = same_dx
    result["inference_s"] = {k: round(v, 2) for k, v in secs.items()}
    result["speedup"] = round(secs["fp32"] / secs[variant], 3) if secs[variant] else 0.0
    result["passed"] = bool(worst_tissue <= TISSUE_DICE_TOLERANCE and same_det == cases
                            and same_dx == cases)
    result["per_case"] = per_case
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
