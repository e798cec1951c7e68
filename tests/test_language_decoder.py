"""The neural report decoder: training, ONNX export with a key/value cache, grounding.

One test trains a very small decoder end to end (word-level tokenizer, transformers GPT-2 from
scratch, the decoder step exported to ONNX and checked against PyTorch); the others use the
shipped package's decoder (``models/omnimri-tiny/<version>/language``) through ONNX Runtime,
as the node serves it, and skip when the package has none.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.omnimri.language.evaluate import decoder_metrics, random_facts
from inference.omnimri.language.facts import Lesion, SeriesFacts, verify_text
from inference.omnimri.language.narrate import write_report
from inference.omnimri.language.reportgen import (
    ReportDecoder,
    decoder_for,
    ground,
    prefix_tokens,
)
from inference.package import ModelPackage

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "models" / "omnimri-tiny"

MASS = SeriesFacts(lesions=(Lesion("mass", "left", "frontal", 31.6, 9.81),
                            Lesion("mass", "right", "parietal", 12.2, 0.61)),
                   diagnosis="mass", tasks=("detect abnormalities", "write the report"))


def shipped_decoder() -> ReportDecoder:
    dec = decoder_for(ModelPackage.load(PACKAGE))
    if dec is None:
        pytest.skip(f"{PACKAGE} has no report decoder: run 'omnimri-node train language'")
    return dec


def test_the_grounding_check_refuses_a_text_that_disagrees_with_the_findings() -> None:
    good = "There are {n_mass} masses, the largest {d_mass} mm in the {where_mass}."
    rep, problems = ground(good, "Mass in the {where_mass}, for further assessment.", MASS)
    assert problems == [] and rep is not None and "32 mm in the left frontal lobe" in (
        rep.findings)
    for findings, why in [
        ("There is a {d_mass} mm mass in the {where_mass}.", "missing"),  # count not stated
        ("There are {n_mass} masses, the largest {d_mass} mm in the {where_wmh}.", "slot"),
        ("There are {n_mass} masses, the largest 20 mm in the {where_mass}.", "20 mm"),
        ("There are {n_mass} masses, the largest {d_mass} mm in the {where_mass}. "
         "Grey and white matter are of normal appearance.", "not segmented"),
    ]:
        rep, problems = ground(findings, "Mass in the {where_mass}, for further assessment.",
                               MASS)
        assert rep is None and any(why in p for p in problems), (findings, problems)


def test_training_exports_a_decoder_step_that_matches_pytorch_and_is_reproducible(
        tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from inference.omnimri.language.decoder import DecoderSettings, train_decoder

    s = DecoderSettings(steps=30, train_examples=300, batch=8)
    out = train_decoder(tmp_path / "a", s)
    assert out["onnx_max_abs_diff"] < 1e-3
    assert out["spec"] == {"report_decoder": "report_decoder.onnx",
                           "report_tokenizer": "report_tokenizer.json"}
    train_decoder(tmp_path / "b", s)  # same seed: the same files' behaviour
    assert (tmp_path / "a" / "report_tokenizer.json").read_text() == (
        tmp_path / "b" / "report_tokenizer.json").read_text()
    a, b = ReportDecoder(tmp_path / "a"), ReportDecoder(tmp_path / "b")
    prefix = [a.token_id(t) for t in prefix_tokens(MASS, 3)]
    la, ca = a.step(prefix, 0, a.empty_past)
    lb, _ = b.step(prefix, 0, b.empty_past)
    np.testing.assert_allclose(la, lb, atol=1e-5)
    assert ca.shape[4] == len(prefix)  # the cache holds the prefix positions
    g = a.write(MASS, seed="job-1")  # barely trained: whatever it writes, the report is true
    assert verify_text(f"{g.report.findings} {g.report.impression}", MASS) == []
    if not g.neural:
        assert g.report == write_report(MASS, "job-1")[0] and g.problems


def test_shipped_decoder_writes_grounded_varied_reports() -> None:
    dec = shipped_decoder()
    rng = random.Random(11)
    cases = [random_facts(rng) for _ in range(120)]
    m = decoder_metrics(dec, cases)
    assert m["decoder_report_contradictions"] == 0
    assert m["decoder_report_fact_rate"] >= 0.95
    assert m["decoder_rejected_rate"] <= 0.05
    assert m["decoder_sentence_templates"] >= 25 and m["decoder_distinct_reports"] >= 110
    g, again = dec.write(cases[0], seed="x"), dec.write(cases[0], seed="x")
    assert (g.report, g.delexicalised) == (again.report, again.delexicalised)  # same seed
    no_tissue = SeriesFacts(diagnosis="normal", tasks=("detect abnormalities",
                                                       "write the report"))
    for k in range(12):
        g = dec.write(no_tissue, seed=f"job-{k}")
        text = f"{g.report.findings} {g.report.impression}".lower()
        assert "grey" not in text and "csf" not in text, text


def test_serving_the_decoder_does_not_import_torch() -> None:
    shipped_decoder()
    code = (
        "import sys\n"
        "from inference.omnimri.language.reportgen import decoder_for\n"
        "from inference.omnimri.language.facts import SeriesFacts\n"
        "from inference.package import ModelPackage\n"
        f"dec = decoder_for(ModelPackage.load({str(PACKAGE)!r}))\n"
        "g = dec.write(SeriesFacts(diagnosis='normal'), seed='s')\n"
        "assert g.report.findings, g\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok', g.neural)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


def test_a_pipeline_with_neural_reports_writes_the_decoders_grounded_text() -> None:
    shipped_decoder()
    from inference import results as R
    from inference.omnimri.language.reportgen import narrator_for
    from inference.omnimri.tasks import build_results
    from tests.test_language_reports import template_heads

    narrate = narrator_for(ModelPackage.load(PACKAGE))
    heads = template_heads()
    for seg in (False, True):
        ins = ["segment brain tissues"] * seg + ["detect abnormalities", "write the report"]
        res = build_results(heads, ins, R.ModelInfo("t", "1"), narrator=narrate)
        assert res.report is not None
        text = f"{res.report.findings} {res.report.impression}"
        assert ("grey matter" in text.lower() and " ml" in text) if seg else (
            "grey" not in text.lower() and "csf" not in text.lower()), text
