"""Triton engine: a remote Triton Inference Server (KServe v2 protocol) for scale-out.

The package folder doubles as the Triton model-repository entry (``<name>/1/model.onnx``), so
the model name on the server is the package's folder name. HTTP sends tensors with the
binary-data extension (no JSON number lists); ``grpc://host:port`` selects gRPC. The client is
not thread-safe, so calls are serialised by a lock (run several engines for concurrency).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.engines import EngineUnavailable, Tensors
from inference.engines._io import NamedIO, check_outputs
from inference.package import ModelPackage

_TRITON_DTYPES = {
    "float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64",
    "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}


def triton_status() -> str:
    """``"ok: ..."`` when tritonclient is importable, else why not (the server is per config)."""
    try:
        import tritonclient.http  # noqa: F401
    except ImportError:
        return "unavailable: tritonclient is not installed (pip install 'tritonclient[http]')"
    return "ok: tritonclient installed (needs models.triton_url)"


def _split_url(url: str) -> tuple[str, str]:
    if url.startswith("grpc://"):
        return "grpc", url[len("grpc://"):]
    if url.startswith("http://"):
        return "http", url[len("http://"):]
    if url.startswith("https://"):
        raise EngineUnavailable("https Triton URLs are not supported; use http:// or grpc://")
    return "http", url


class TritonEngine(NamedIO):
    """One model on a Triton server behind the :class:`~inference.engines.Engine` Protocol.

    Args:
        url: ``host:port``, ``http://host:port`` or ``grpc://host:port``.
        model_name: Model name on the server.
        model_version: Version string; ``""`` lets the server choose.
        timeout_s: Network timeout per call, seconds.

    Raises:
        EngineUnavailable: tritonclient missing, server unreachable or not live, model not ready.
    """

    name = "triton"

    def __init__(
        self, url: str, model_name: str, model_version: str = "", *, timeout_s: float = 120.0
    ) -> None:
        protocol, hostport = _split_url(url)
        try:
            if protocol == "grpc":
                import tritonclient.grpc as client_mod
            else:
                import tritonclient.http as client_mod
        except ImportError:
            raise EngineUnavailable(
                f"tritonclient[{protocol}] is not installed "
                f"(pip install 'tritonclient[{protocol}]')"
            ) from None
        self._mod: Any = client_mod
        self._grpc = protocol == "grpc"
        try:
            if self._grpc:
                self._client = client_mod.InferenceServerClient(url=hostport)
            else:
                self._client = client_mod.InferenceServerClient(
                    url=hostport, connection_timeout=timeout_s, network_timeout=timeout_s
                )
            live = self._client.is_server_live()
            ready = live and self._client.is_model_ready(model_name, model_version)
        except Exception as err:  # tritonclient raises InferenceServerException or socket errors
            raise EngineUnavailable(f"Triton at {url} is unreachable: {err}") from None
        if not live:
            raise EngineUnavailable(f"Triton at {url} is not live")
        if not ready:
            raise EngineUnavailable(f"model {model_name!r} is not ready on Triton at {url}")
        meta = (
            self._client.get_model_metadata(model_name, model_version, as_json=True)
            if self._grpc else self._client.get_model_metadata(model_name, model_version)
        )
        self._inputs: dict[str, str] = {i["name"]: i["datatype"] for i in meta["inputs"]}
        self._outputs = [o["name"] for o in meta["outputs"]]
        self._model = model_name
        self._version = model_version
        self._lock = threading.Lock()
        self.provider = f"{protocol}://{hostport}/{model_name}"

    @classmethod
    def for_package(
        cls, package: ModelPackage, url: str, *, version: int | None = None
    ) -> TritonEngine:
        """The package's model on the server (model name = package folder name)."""
        return cls(url, package.folder.name, "" if version is None else str(version))


    def run(self, inputs: Tensors, outputs: Sequence[str] | None = None) -> Tensors:
        """One inference request with binary tensors; outputs as numpy.

        ``outputs``: request (and return) only these (``None``: all); the server's back end
        may still compute the whole graph, but only these travel back.
        """
        check_outputs(outputs, self._outputs)
        names = self._outputs if outputs is None else [
            n for n in self._outputs if n in set(outputs)]
        mod = self._mod
        reqs = []
        for name, datatype in self._inputs.items():
            np_type = {v: k for k, v in _TRITON_DTYPES.items()}.get(datatype, "float32")
            arr = np.ascontiguousarray(inputs[name], dtype=np.dtype(np_type))
            inp = mod.InferInput(name, list(arr.shape), datatype)
            if self._grpc:
                inp.set_data_from_numpy(arr)
            else:
                inp.set_data_from_numpy(arr, binary_data=True)
            reqs.append(inp)
        outs = [
            mod.InferRequestedOutput(n) if self._grpc
            else mod.InferRequestedOutput(n, binary_data=True)
            for n in names
        ]
        with self._lock:
            res = self._client.infer(self._model, reqs, model_version=self._version, outputs=outs)
        result: Tensors = {}
        for n in names:
            arr = np.asarray(res.as_numpy(n))
            result[n] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
        return result

    def close(self) -> None:
        """Close the connection."""
        self._client.close()
