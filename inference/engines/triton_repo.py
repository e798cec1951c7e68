"""Write a Triton model repository entry from a model package.

The package folder is already shaped like a repository entry (``<name>/1/model.onnx``), but a
Triton server needs to be told which graph variant to load (the package runs
``model.int8.onnx`` by default), the shapes, and, for a server without the ONNX Runtime back
end, a Python model. :func:`write_model_repository` writes::

    <repository>/<package folder name>/
      config.pbtxt            # backend, default_model_filename / onnx_file, I/O, batching
      <version>/<graph>.onnx  # the variant that runs (a copy: the repository may be mounted
                              # into another container)
      <version>/model.py      # backend "python" only: inference/engines/triton_python_model.py

Back ends:

* ``onnxruntime``: Triton's ONNX Runtime back end (the NGC ``tritonserver`` image; CUDA or
  TensorRT execution provider on a GPU). What production uses.
* ``python``: Triton's Python back end running ONNX Runtime on CPU in the model's process
  (``tritonserver`` from the ``nvidia-pytriton`` wheel has only this back end; the tests use it).

The model name on the server is the package folder name, as :class:`TritonEngine` expects.

Command line (e.g. in an init container before Triton starts)::

    python -m inference.engines.triton_repo models/omnimri-tiny /models --backend onnxruntime
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from inference.package import ModelPackage

Backend = Literal["onnxruntime", "python"]

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
"""The Python back-end model copied to ``<version>/model.py``."""

_CONFIG_TYPES = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL",
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    data_type: str
    dims: list[int]
    """-1 for a dynamic axis."""


def _graph_io(path: Path) -> tuple[list[_Tensor], list[_Tensor]]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def conv(args: list[ort.NodeArg]) -> list[_Tensor]:
        out = []
        for a in args:
            if a.type not in _CONFIG_TYPES:
                raise ValueError(f"{path}: tensor {a.name!r} has type {a.type}, which Triton's "
                                 f"config cannot name here ({sorted(_CONFIG_TYPES)})")
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in a.shape]
            out.append(_Tensor(a.name, _CONFIG_TYPES[a.type], dims))
        return out

    return conv(sess.get_inputs()), conv(sess.get_outputs())


def _tensor_block(kind: str, tensors: list[_Tensor], batched: bool) -> str:
    rows = []
    for t in tensors:
        dims = t.dims[1:] if batched else t.dims
        rows.append(f'  {{ name: "{t.name}" data_type: {t.data_type} '
                    f'dims: [ {", ".join(str(d) for d in dims)} ] }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def model_config(
    package: ModelPackage, graph: Path, backend: Backend, *, max_batch_size: int | None = None,
    instances: int = 1, intra_op_threads: int = 0, queue_delay_us: int = 2000,
) -> str:
    """``config.pbtxt`` text for ``graph`` (one ONNX file of ``package``).

    Args:
        package: The model package (name, default batch size).
        graph: The ONNX file the server loads.
        backend: ``onnxruntime`` or ``python``.
        max_batch_size: Largest batch Triton accepts (windows per request); ``None`` = twice
            the package's ``input.batch_size``. ``0`` (also when an input or output has no
            dynamic first axis) turns batching and the dynamic batcher off.
        instances: Model instances per device (``instance_group.count``).
        intra_op_threads: ONNX Runtime intra-op threads of the Python back end (``0`` =
            ORT's default). Ignored by the ONNX Runtime back end.
        queue_delay_us: Dynamic batcher's wait for more requests, microseconds.
    """
    inputs, outputs = _graph_io(graph)
    if max_batch_size is None:
        max_batch_size = 2 * package.spec.input.batch_size
    if any(not t.dims or t.dims[0] != -1 for t in inputs + outputs):
        max_batch_size = 0
    batched = max_batch_size > 0
    lines = [f'name: "{package.folder.name}"']
    if backend == "onnxruntime":
        lines += ['backend: "onnxruntime"', f'default_model_filename: "{graph.name}"']
    else:
        lines += ['backend: "python"',
                  f'parameters: {{ key: "onnx_file" value: {{ string_value: "{graph.name}" }} }}',
                  'parameters: { key: "intra_op_threads" '
                  f'value: {{ string_value: "{intra_op_threads}" }} }}']
    lines.append(f"max_batch_size: {max_batch_size}")
    text = "\n".join(lines) + "\n"
    text += _tensor_block("input", inputs, batched) + _tensor_block("output", outputs, batched)
    if batched:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
    kind = "KIND_CPU" if backend == "python" else "KIND_AUTO"
    text += f"instance_group [ {{ kind: {kind} count: {instances} }} ]\n"
    return text


def write_model_repository(
    package: ModelPackage, repository: Path, backend: Backend = "onnxruntime", *,
    variant: str | None = None, version: int | None = None, max_batch_size: int | None = None,
    instances: int = 1, intra_op_threads: int = 0,
) -> Path:
    """Write (or replace) the repository entry of ``package`` under ``repository``.

    Args:
        package: The model package.
        repository: The Triton model repository folder (created if missing).
        backend: ``onnxruntime`` (Triton's image) or ``python`` (ONNX Runtime inside Triton's
            Python back end).
        variant: Graph variant (``fp32``, ``int8``, ...); ``None`` = the package's default.
        version: Package version folder; ``None`` = the highest.
        max_batch_size: See :func:`model_config`.
        instances: Model instances per device.
        intra_op_threads: See :func:`model_config`.

    Returns:
        The entry folder ``<repository>/<package folder name>``.

    Raises:
        PackageError: An undeclared variant.
        FileNotFoundError: The variant's graph is missing.
    """
    graph = package.model_path(version, variant)
    if not graph.is_file():
        raise FileNotFoundError(f"{graph}: the graph of variant "
                                f"{variant or package.spec.variant!r} is missing")
    entry = repository / package.folder.name
    if entry.exists():
        shutil.rmtree(entry)
    vdir = entry / package.version_folder(version).name
    vdir.mkdir(parents=True)
    shutil.copy2(graph, vdir / graph.name)
    if backend == "python":
        shutil.copy2(PYTHON_MODEL, vdir / "model.py")
    (entry / "config.pbtxt").write_text(
        model_config(package, graph, backend, max_batch_size=max_batch_size,
                     instances=instances, intra_op_threads=intra_op_threads), encoding="utf-8")
    return entry


def main(argv: list[str] | None = None) -> int:
    """``python -m inference.engines.triton_repo PACKAGE REPOSITORY [--backend ...]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("package", type=Path, help="model package folder (models/<name>)")
    ap.add_argument("repository", type=Path, help="Triton model repository folder")
    ap.add_argument("--backend", choices=["onnxruntime", "python"], default="onnxruntime")
    ap.add_argument("--variant", default=None, help="graph variant (default: the package's)")
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--instances", type=int, default=1)
    args = ap.parse_args(argv)
    entry = write_model_repository(
        ModelPackage.load(args.package), args.repository, args.backend, variant=args.variant,
        max_batch_size=args.max_batch_size, instances=args.instances)
    print(entry)  # noqa: T201 - the command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
