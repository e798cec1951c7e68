"""Language models on TensorRT vs ONNX Runtime on CPU (run by ``tests/gpu/run_gpu_checks.sh``).

``python3 -m tests.gpu.language_trt_check [PACKAGE]`` copies the package's language folder to a
temporary folder (plans are written next to the ONNX files), builds the TensorRT plans of the
text encoder and of the report-decoder step (removed afterwards), and prints:

* the text encoder's largest absolute logit difference, TensorRT vs ORT CPU, on held-out
  phrasings (one padded batch over the profile's largest batch, so it runs in chunks, and
  texts alone);
* how many greedy report generations give the same tokens on both (random findings).

Exit status 1 when the encoder differs by more than :data:`ENCODER_ATOL` or any generation
differs; 2 when TensorRT cannot run here (the reason is printed).
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENCODER_ATOL = 1e-3
"""Largest allowed encoder logit difference, TensorRT fp32 vs ORT CPU (TF32 kernels differ)."""

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "models" / "omnimri-tiny"


@dataclass
class LanguageCheck:
    """What :func:`compare` measured."""

    encoder_max_abs_diff: float
    reports_same: int
    reports: int
    encoder_provider: str
    decoder_provider: str


def compare(package: Path = PACKAGE, texts: int = 40, reports: int = 20,
            work: Path | None = None) -> LanguageCheck:
    """Run both language graphs on TensorRT and on ORT CPU and compare.

    Raises:
        inference.engines.EngineUnavailable: TensorRT cannot run here.
        LookupError: The package has no language model.
    """
    from inference.engines import EngineUnavailable
    from inference.engines.tensorrt import tensorrt_status
    from inference.omnimri.language import corpus as C
    from inference.omnimri.language.evaluate import random_facts
    from inference.omnimri.language.reportgen import ReportDecoder, prefix_tokens
    from inference.omnimri.language.runtime import TextModel
    from inference.package import ModelPackage

    status = tensorrt_status()
    if not status.startswith("ok"):
        raise EngineUnavailable(f"TensorRT {status}")
    pkg = ModelPackage.load(package)
    spec = dict(pkg.spec.extra).get("language")
    if not spec or not spec.get("report_decoder"):
        raise LookupError(f"{package} has no extra.language with a report decoder")
    folder = (Path(tempfile.mkdtemp(prefix="lang-trt-")) if work is None else work) / "language"
    shutil.copytree(pkg.version_folder() / spec.get("folder", "language"), folder)
    args = (folder, int(spec.get("max_tokens", 40)), spec.get("tokenizer", "tokenizer.json"),
            spec.get("encoder", "text_encoder.onnx"))
    trt_tm, cpu_tm = TextModel(*args, engine="tensorrt"), TextModel(*args, engine="onnxruntime")
    if trt_tm.sess.name != "tensorrt":
        raise EngineUnavailable("the text encoder fell back to ONNX Runtime (see the log)")
    phrasings = [e.text for e in C.generate(texts, "heldout", seed=11)]
    diff = 0.0
    for batch in [phrasings] + [[t] for t in phrasings[:10]]:
        a, b = trt_tm.logits(batch), cpu_tm.logits(batch)
        diff = max(diff, *(float(np.abs(a[k] - b[k]).max()) for k in b))
    dec_args = (folder, spec["report_decoder"],
                spec.get("report_tokenizer", "report_tokenizer.json"))
    trt_dec = ReportDecoder(*dec_args, engine="tensorrt")
    cpu_dec = ReportDecoder(*dec_args, engine="onnxruntime")
    if trt_dec.sess.name != "tensorrt":
        raise EngineUnavailable("the report decoder fell back to ONNX Runtime (see the log)")
    rng = random.Random(5)
    same = 0
    for n in range(reports):
        facts = random_facts(rng)
        prefix = [cpu_dec.token_id(t) for t in prefix_tokens(facts, n)]
        same += trt_dec.generate_ids(prefix) == cpu_dec.generate_ids(prefix)
    return LanguageCheck(diff, same, reports, trt_tm.sess.provider, trt_dec.sess.provider)


def main(argv: list[str]) -> int:
    """Print the comparison; exit status as in the module docstring."""
    from inference.engines import EngineUnavailable

    try:
        with tempfile.TemporaryDirectory(prefix="lang-trt-") as work:
            r = compare(Path(argv[0]) if argv else PACKAGE, work=Path(work))
    except (EngineUnavailable, LookupError) as err:
        print(f"language on TensorRT: skipped: {err}")
        return 2
    print(f"language text encoder  TensorRT ({r.encoder_provider}) vs ORT CPU: "
          f"max |diff| {r.encoder_max_abs_diff:.2e} (limit {ENCODER_ATOL:.0e})")
    print(f"language report decoder TensorRT ({r.decoder_provider}) vs ORT CPU: same tokens "
          f"in {r.reports_same}/{r.reports} greedy generations")
    ok = r.encoder_max_abs_diff <= ENCODER_ATOL and r.reports_same == r.reports
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
