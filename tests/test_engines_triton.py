"""Triton engine against a STAND-IN server (a KServe-v2 imitation, not Triton).

The real server test is tests/test_triton_server.py (``tritonserver`` from the
``nvidia-pytriton`` wheel, the shipped model, HTTP and gRPC). This stand-in stays for what that
one cannot cover everywhere: the wheel runs only on x86_64 Linux with glibc >= 2.35, so here
the engine's request encoding is still checked where no server can start. It is a small
KServe-v2 HTTP server in a thread that implements the parts of the protocol the node uses
(health, model ready, metadata, infer with the binary-tensor extension) and answers with ONNX
Runtime on the tiny test package. The real ``tritonclient`` library talks to it, so request
encoding, binary tensors and response decoding are exercised; Triton's own scheduling and
back ends are not.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from inference.engines import EngineUnavailable, create_engine, select_engine
from inference.engines.onnxruntime import OnnxRuntimeEngine
from inference.package import ModelPackage
from tests.fixtures.tiny_model import TINY_PATCH

pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

_DT = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


def _stand_in(model_name: str, engine: OnnxRuntimeEngine) -> type[BaseHTTPRequestHandler]:
    meta = {
        "name": model_name, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, *TINY_PATCH]}],
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1]} for n in engine.output_names],
    }
    model_path = re.compile(rf"^/v2/models/{re.escape(model_name)}(/versions/1)?(/[a-z]+)?$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output quiet
            return

        def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
                   ) -> None:
            self.send_response(code)
            for k, v in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/v2/health/live":
                return self._reply(200)
            m = model_path.match(self.path)
            if m and m.group(2) == "/ready":
                return self._reply(200)
            if m and m.group(2) is None:
                return self._reply(200, json.dumps(meta).encode())
            return self._reply(404, json.dumps({"error": f"unknown model {self.path}"}).encode())

        def do_POST(self) -> None:  # noqa: N802
            m = model_path.match(self.path)
            if not m or m.group(2) != "/infer":
                return self._reply(404, b'{"error": "not found"}')
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hlen = int(self.headers.get("Inference-Header-Content-Length", len(body)))
            request = json.loads(body[:hlen])
            offset = hlen
            inputs = {}
            for inp in request["inputs"]:
                size = inp["parameters"]["binary_data_size"]  # node always sends binary
                raw = body[offset : offset + size]
                offset += size
                inputs[inp["name"]] = np.frombuffer(raw, dtype=_DT[inp["datatype"]]).reshape(
                    inp["shape"])
            result = engine.run(inputs)
            header_outputs, blobs = [], []
            for out in request.get("outputs", [{"name": n} for n in engine.output_names]):
                arr = np.ascontiguousarray(result[out["name"]], dtype=np.float32)
                blobs.append(arr.tobytes())
                header_outputs.append({
                    "name": out["name"], "datatype": "FP32", "shape": list(arr.shape),
                    "parameters": {"binary_data_size": len(blobs[-1])},
                })
            header = json.dumps({"model_name": model_name, "model_version": "1",
                                 "outputs": header_outputs}).encode()
            self._reply(200, header + b"".join(blobs), {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            })
            return None

    return Handler


@pytest.fixture(scope="module")
def triton_stand_in(tiny_package: ModelPackage) -> Iterator[str]:
    engine = create_engine("onnxruntime", tiny_package)
    assert isinstance(engine, OnnxRuntimeEngine)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _stand_in(tiny_package.folder.name, engine))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_triton_engine_matches_onnxruntime(
    tiny_package: ModelPackage, triton_stand_in: str
) -> None:
    triton = select_engine(tiny_package, ["triton"], triton_url=f"http://{triton_stand_in}")
    assert triton.name == "triton" and triton.provider.endswith(f"/{tiny_package.folder.name}")
    assert triton.input_names == ["image"] and triton.output_names == ["tissues", "diagnosis"]
    x = np.random.default_rng(5).standard_normal((3, 1, *TINY_PATCH)).astype(np.float32)
    got = triton.run({"image": x})
    want = create_engine("onnxruntime", tiny_package).run({"image": x})
    for name in ("tissues", "diagnosis"):
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], atol=1e-6)
    triton.close()


def test_triton_unknown_model_and_unreachable(triton_stand_in: str) -> None:
    from inference.engines.triton import TritonEngine
    from tests.fixtures.net import free_port

    port = free_port()
    with pytest.raises(EngineUnavailable, match="model 'nope' is not ready"):
        TritonEngine(triton_stand_in, "nope")
    with pytest.raises(EngineUnavailable, match=f"Triton at 127.0.0.1:{port} is unreachable"):
        TritonEngine(f"127.0.0.1:{port}", "tiny", timeout_s=2.0)
    with pytest.raises(EngineUnavailable, match="https Triton URLs are not supported"):
        TritonEngine("https://example.invalid:8000", "tiny")
