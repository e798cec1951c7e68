"""The language models' GPU path without a GPU: profiles, engine choice, CPU fallback.

The TensorRT plans of the text encoder and of the report-decoder step are built and compared
with ONNX Runtime on CPU by ``tests/gpu/`` (:mod:`tests.gpu.language_trt_check`) on a machine
with an NVIDIA GPU. Here: the optimisation-profile shapes of the shipped graphs, that every
shape a real generation feeds lies inside them, which engines a language model gets for a
configuration, and that without TensorRT it runs on ONNX Runtime on CPU with the reason
logged.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from structlog.testing import capture_logs

from inference.omnimri.language.trt import (
    PREFIX_MAX_TOKENS,
    DimRange,
    OrtCpuSession,
    decoder_dims,
    encoder_dims,
    graph_inputs,
    language_engine_order,
    language_session,
    plan_path,
    profile_shapes,
)
from inference.package import ModelPackage

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "models" / "omnimri-tiny"


def language_folder() -> tuple[Path, dict[str, Any]]:
    pkg = ModelPackage.load(PACKAGE)
    spec = dict(pkg.spec.extra).get("language")
    if not spec or not spec.get("report_decoder"):
        pytest.skip(f"{PACKAGE} has no extra.language with a report decoder: run "
                    "'omnimri-node train language'")
    return pkg.version_folder() / spec.get("folder", "language"), spec


def _tensorrt_usable() -> bool:
    from inference.engines.tensorrt import tensorrt_status

    return tensorrt_status().startswith("ok")


# ------------------------------------------------------------------ profile shapes


def test_profile_of_the_shipped_text_encoder() -> None:
    folder, spec = language_folder()
    shapes = profile_shapes(graph_inputs(folder / spec["encoder"]),
                            encoder_dims(int(spec["max_tokens"])))
    want = ((1, 1), (1, 16), (16, int(spec["max_tokens"])))
    assert shapes == {"input_ids": want, "attention_mask": want}


def test_profile_of_the_shipped_decoder_step_covers_the_kv_cache() -> None:
    from inference.omnimri.language.reportgen import MAX_NEW_TOKENS

    folder, spec = language_folder()
    inputs = graph_inputs(folder / spec["report_decoder"])
    shapes = profile_shapes(inputs, decoder_dims())
    cache = PREFIX_MAX_TOKENS + MAX_NEW_TOKENS
    layers, two, batch, heads, _, head_dim = inputs["past"]
    assert (two, batch) == (2, 1)
    assert shapes["past"] == ((layers, 2, 1, heads, 0, head_dim),  # empty cache: the prefix
                              (layers, 2, 1, heads, 64, head_dim),
                              (layers, 2, 1, heads, cache, head_dim))
    assert shapes["input_ids"] == shapes["position_ids"] == ((1, 1), (1, 1),
                                                             (1, PREFIX_MAX_TOKENS))
    assert shapes["attention_mask"] == ((1, 1, 1, 1), (1, 1, 1, 65),
                                        (1, 1, PREFIX_MAX_TOKENS, cache + PREFIX_MAX_TOKENS))


class _Recorder:
    """An ORT CPU session that records every input shape it is fed."""

    def __init__(self, inner: OrtCpuSession) -> None:
        self.inner = inner
        self.name, self.provider = inner.name, inner.provider
        self.seen: list[dict[str, tuple[int, ...]]] = []

    def run(self, names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[Any]:
        self.seen.append({k: tuple(v.shape) for k, v in feed.items()})
        return self.inner.run(names, feed)

    def input_shape(self, name: str) -> Any:
        return self.inner.input_shape(name)


def _inside(shape: tuple[int, ...], prof: tuple[tuple[int, ...], ...]) -> bool:
    lo, _, hi = prof
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi,
                                                                         strict=True))


def test_every_shape_a_generation_feeds_is_inside_the_decoder_profile() -> None:
    """Real greedy generations (ORT CPU) to the longest allowed: the plan would accept them."""
    from inference.omnimri.language.evaluate import random_facts
    from inference.omnimri.language.reportgen import MAX_NEW_TOKENS, ReportDecoder, prefix_tokens

    folder, spec = language_folder()
    dec = ReportDecoder(folder, spec["report_decoder"], spec["report_tokenizer"],
                        engine="onnxruntime")
    assert isinstance(dec.sess, OrtCpuSession)
    rec = _Recorder(dec.sess)
    dec.sess = rec
    shapes = profile_shapes(graph_inputs(folder / spec["report_decoder"]), decoder_dims())
    rng = random.Random(3)
    for style in range(4):
        prefix = [dec.token_id(t) for t in prefix_tokens(random_facts(rng), style)]
        assert len(prefix) <= PREFIX_MAX_TOKENS
        dec.generate_ids(prefix)
    dec.end = -1  # never stops: the longest generation the decoder allows
    dec.generate_ids(prefix, MAX_NEW_TOKENS)
    assert max(s["past"][4] for s in rec.seen) == len(prefix) + MAX_NEW_TOKENS - 1
    for fed in rec.seen:
        for name, shape in fed.items():
            assert _inside(shape, shapes[name]), (name, shape, shapes[name])
    too_long = dict(rec.seen[-1], past=(*rec.seen[-1]["past"][:4], shapes["past"][2][4] + 1,
                                        rec.seen[-1]["past"][5]))
    assert not _inside(too_long["past"], shapes["past"])  # the check can fail


def test_the_longest_facts_prefix_fits_the_profile() -> None:
    from inference.omnimri.language.evaluate import random_facts
    from inference.omnimri.language.reportgen import prefix_tokens

    rng = random.Random(0)
    longest = max(len(prefix_tokens(random_facts(rng), s)) for s in range(400))
    assert 0 < longest <= PREFIX_MAX_TOKENS


def test_profile_refuses_an_unknown_dynamic_dimension_and_bad_ranges() -> None:
    with pytest.raises(ValueError, match="axis 1: dynamic dimension 'L' has no range"):
        profile_shapes({"x": (1, "L")}, {"T": DimRange(1, 1, 4)})
    assert profile_shapes({"x": (3, "T")}, {"T": DimRange(1, 2, 4)}) == {
        "x": ((3, 1), (3, 2), (3, 4))}
    for bad in ((2, 1, 4), (0, 0, 0), (-1, 1, 2)):
        with pytest.raises(ValueError, match="bad dimension range"):
            DimRange(*bad)


def test_plan_file_is_keyed_by_gpu_and_tensorrt_version(tmp_path: Path) -> None:
    p = plan_path(tmp_path / "text_encoder.onnx", "9.0", "10.9.0.34")
    assert p == tmp_path / "text_encoder.sm90.trt10.9.0.34.fp32.plan"
    assert plan_path(tmp_path / "report_decoder.onnx", "8.6", "10/3") .name == \
        "report_decoder.sm86.trt103.fp32.plan"


# ------------------------------------------------------------------ engine selection


@pytest.mark.parametrize(("preference", "want"), [
    ("auto", ["tensorrt", "onnxruntime"]),
    ([], ["tensorrt", "onnxruntime"]),
    ("tensorrt", ["tensorrt", "onnxruntime"]),
    ("onnxruntime", ["onnxruntime"]),
    ("torch", ["onnxruntime"]),
    ("triton", ["onnxruntime"]),
    (["triton", "tensorrt", "tensorrt"], ["tensorrt", "onnxruntime"]),
    (["onnxruntime", "tensorrt"], ["onnxruntime", "tensorrt"]),
])
def test_language_engine_order(preference: str | list[str], want: list[str]) -> None:
    assert language_engine_order(preference) == want


def test_language_engine_order_refuses_an_unknown_engine() -> None:
    with pytest.raises(ValueError, match="unknown engine 'cuda'"):
        language_engine_order(["cuda"])


@pytest.mark.parametrize(("pipeline_engine", "engine_order", "want"), [
    ("auto", ["tensorrt", "onnxruntime"], ["tensorrt", "onnxruntime"]),
    ("auto", ["onnxruntime"], ["onnxruntime"]),
    ("auto", ["torch", "tensorrt"], ["tensorrt", "onnxruntime"]),
    ("tensorrt", ["onnxruntime"], ["tensorrt", "onnxruntime"]),
    ("torch", ["tensorrt", "onnxruntime"], ["onnxruntime"]),
])
def test_language_engines_follow_the_pipelines_engine_choice(
        tmp_path: Path, pipeline_engine: str, engine_order: list[str], want: list[str]) -> None:
    """A pipeline's ``engine`` (or ``models.engine_order`` for ``auto``) picks both halves."""
    from dicom_node.config import load_config
    from dicom_node.pipelines.models import engine_slot

    language_folder()
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({
        "storage": {"path": "spool"},
        "models": {"path": str(REPO / "models"), "engine_order": engine_order},
        "pipelines": {"brain": {"model": "omnimri-tiny", "engine": pipeline_engine,
                                "instructions": ["segment brain tissues"]}}}))
    s = load_config(p)
    slot = engine_slot(s.pipelines["brain"], s)
    assert language_engine_order(slot.preference) == want


def test_without_tensorrt_both_models_run_on_ort_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not installed: not tried, nothing logged; installed but unusable: the reason logged."""
    if _tensorrt_usable():
        pytest.skip("TensorRT is usable here; tests/gpu/test_gpu_language.py covers it")
    import logging

    import structlog

    # An earlier test in the same process may have configured logging at WARNING: the filtering
    # logger then drops INFO before capture_logs sees it. Capture at every level here.
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        _run_without_tensorrt(monkeypatch)
    finally:
        structlog.configure(**old)


def _run_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.omnimri.language import trt
    from inference.omnimri.language.reportgen import ReportDecoder
    from inference.omnimri.language.runtime import TextModel

    folder, spec = language_folder()
    for installed in (False, True):
        monkeypatch.setattr(trt, "_tensorrt_installed", lambda v=installed: v)
        with capture_logs() as logs:
            tm = TextModel(folder, int(spec["max_tokens"]), spec["tokenizer"],
                           spec["encoder"], engine=("tensorrt",))
            dec = ReportDecoder(folder, spec["report_decoder"], spec["report_tokenizer"],
                                engine="auto")
        assert (tm.sess.name, tm.sess.provider) == ("onnxruntime", "CPUExecutionProvider")
        assert (dec.sess.name, dec.sess.provider) == ("onnxruntime", "CPUExecutionProvider")
        chosen = [e for e in logs if e["event"] == "language engine selected"]
        if not installed:
            assert chosen == []
            continue
        assert [e["graph"] for e in chosen] == [spec["encoder"], spec["report_decoder"]]
        for e in chosen:
            assert e["engine"] == "onnxruntime"
            assert "tensorrt" in e["not_used"] and e["not_used"]["tensorrt"]
    assert tm.parse(["segment brain tissues"])[0].tasks == ("segment brain tissues",)
    assert dec.empty_past.shape[4] == 0


def test_a_missing_graph_is_refused_with_every_reason(tmp_path: Path) -> None:
    from inference.engines import EngineUnavailable

    with pytest.raises(EngineUnavailable, match=r"no engine can run nothing\.onnx here "
                                                r"\(.*onnxruntime: no nothing\.onnx"):
        language_session(tmp_path / "nothing.onnx", "auto", dims=encoder_dims(8))


def test_no_torch_import_on_the_cpu_path() -> None:
    """Choosing the language engines on a machine without tensorrt never imports torch."""
    import subprocess
    import sys

    if _tensorrt_usable():
        pytest.skip("TensorRT is installed here (torch is then used for CUDA buffers)")
    folder, spec = language_folder()
    code = ("import sys\nfrom pathlib import Path\n"
            "from inference.omnimri.language.trt import language_session, encoder_dims\n"
            f"s = language_session(Path({str(folder / spec['encoder'])!r}), 'auto', "
            "dims=encoder_dims(64))\n"
            "print(s.name, 'torch' in sys.modules)\n")  # the log goes to stdout too
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=True)
    assert out.stdout.splitlines()[-1].split() == ["onnxruntime", "False"], out.stdout + out.stderr
