"""Triton Python back-end model that runs one ONNX graph with ONNX Runtime on CPU.

Not imported by the node: :func:`inference.engines.triton_repo.write_model_repository` copies
this file to ``<repository>/<model>/<version>/model.py`` for Triton servers that have the
Python back end but no ONNX Runtime back end (the ``tritonserver`` bundled in the
``nvidia-pytriton`` wheel, which the tests run). Triton's own image has the ONNX Runtime back
end: there the repository is written with ``backend="onnxruntime"`` and this file is unused.

Parameters (``config.pbtxt``): ``onnx_file`` (the graph in the version folder) and
``intra_op_threads`` (``0`` = ONNX Runtime's default, all cores).

The Python back-end stub is built against NumPy 1.x: under NumPy 2 its tensor conversion reads
the wrong dtype size (empty outputs, misread inputs), so the stub must run in an environment
with ``numpy<2`` (see tests/fixtures/triton.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # only inside Triton's Python back end


class TritonPythonModel:
    """One ONNX Runtime session; each request is one ``session.run``."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the session on ``<model_repository>/<model_version>/<onnx_file>``."""
        config: dict[str, Any] = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            os.path.join(folder, params.get("onnx_file", "model.onnx")), opts,
            providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run every request; a request that fails gets an error response, the others go on."""
        responses = []
        for request in requests:
            try:
                feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy()
                        for n in self._inputs}
                values = self._session.run(self._outputs, feed)
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v))
                           for n, v in zip(self._outputs, values, strict=True)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as err:  # noqa: BLE001 - reported to the client, not swallowed
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(err))))
        return responses

    def finalize(self) -> None:
        """Drop the session."""
        del self._session
