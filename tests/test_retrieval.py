"""Report<->image retrieval and the stage-2 text alignment (issue #16 item 5).

The recall rule is checked on similarity matrices built here; the alignment trains the real
text encoder's projection (the shipped package's tokenizer and ``text_encoder.onnx``) against
image embeddings made here, exports the report encoder and checks ONNX against PyTorch.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from inference.omnimri import retrieval as rv

SHIPPED_LANGUAGE = Path(__file__).resolve().parents[1] / "models" / "omnimri-tiny" / "1" / (
    "language")


def test_recall_counts_equal_facts_as_correct_and_gives_strict_and_chance() -> None:
    keys = ["normal", "normal", "mass-left", "svd-right"]
    sim = np.eye(4)
    m = rv.recall_at_1(sim, keys)
    assert m["report_to_image"] == m["image_to_report"] == m["report_to_image_strict"] == 1.0
    # the two normal reports retrieve each other's image: correct by facts, not strictly
    sim = np.eye(4)[[1, 0, 2, 3]]
    m = rv.recall_at_1(sim, keys)
    assert m["report_to_image"] == 1.0 and m["report_to_image_strict"] == 0.5
    assert m["image_to_report"] == 1.0 and m["image_to_report_strict"] == 0.5
    assert m["chance"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert m["chance_strict"] == 0.25
    # the mass report retrieves the normal image: wrong both ways for that query
    sim = np.eye(4)
    sim[2] = [0.0, 1.0, 0.5, 0.0]
    m = rv.recall_at_1(sim, keys, kinds=["normal", "normal", "mass", "svd"])
    assert m["report_to_image"] == 0.75 and m["report_to_image_kind"] == 0.75
    assert m["chance_kind"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    with pytest.raises(ValueError, match="does not match"):
        rv.recall_at_1(np.eye(3), keys)


def test_a_case_report_states_its_true_facts() -> None:
    from inference.omnimri import synthetic as syn
    from inference.omnimri.language.facts import verify_text

    case = syn.make_case(4242, diagnosis=2, contrast="T1")
    facts = rv.case_facts(case)
    key = dict(rv.fact_key(case))
    assert key["kind"] == "mass" and facts.report_kind == "mass"
    big = next(x for x in facts.lesions if x.kind == "mass")
    assert (big.side, big.lobe) == (key["side"], key["lobe"])
    assert all(x.volume_ml > 0 for x in facts.lesions)
    text = rv.report_text(facts)
    assert f"{key['side']} {key['lobe']}" in text or key["lobe"] == "cerebellum"
    assert verify_text(text, facts) == []
    assert rv.report_text(facts) == text  # the same facts, the same report
    normal = rv.case_facts(syn.make_case(4243, diagnosis=0, contrast="T2"))
    text = rv.report_text(normal)
    assert normal.lesions == () and normal.report_kind == "normal"
    assert verify_text(text, normal) == [] and "mass" not in text.lower()


@pytest.mark.skipif(not (SHIPPED_LANGUAGE / "text_encoder.onnx").is_file(),
                    reason="shipped text encoder missing")
def test_the_projection_learns_to_retrieve_and_its_onnx_matches_pytorch(tmp_path: Path
                                                                        ) -> None:
    from inference.omnimri.language import align as A
    from inference.omnimri.language.evaluate import random_facts
    from inference.omnimri.language.facts import SeriesFacts

    folder = tmp_path / "language"
    folder.mkdir()
    for name in ("tokenizer.json", "text_encoder.onnx"):
        shutil.copy(SHIPPED_LANGUAGE / name, folder / name)
    rng = random.Random(5)
    facts: list[SeriesFacts] = []
    while len(facts) < 12:  # distinct findings (one normal), tissues not measured
        f = random_facts(rng)
        g = SeriesFacts(lesions=f.lesions, diagnosis=f.diagnosis,
                        tasks=("detect abnormalities", "suggest a diagnosis"))
        if rv.report_text(g) not in [rv.report_text(x) for x in facts]:
            facts.append(g)
    keys = [rv.report_text(f) for f in facts]
    # image embeddings: one random unit vector per case (what the projection must meet)
    images = np.random.default_rng(0).normal(size=(len(facts), 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    features = A._Features(folder, "text_encoder.onnx", "tokenizer.json", 64)
    texts = [A.style_reports(f) for f in facts]
    feats = features([t for ts in texts for t in ts]).reshape(len(facts), A.STYLES, -1)
    s = A.AlignSettings(steps=300, batch=12, hidden=64)
    proj = A.train_projection(images, feats, keys, s)
    diff = A.export_report_encoder(proj, features, folder, "text_encoder.onnx",
                                   [t[0] for t in texts])
    assert diff <= 1e-4
    emb = A.ReportEmbedder(folder)(keys)
    assert emb.shape == (len(facts), 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    m = rv.recall_at_1(emb @ images.T, keys)
    assert m["report_to_image"] >= 0.9 and m["image_to_report"] >= 0.9
    # an untrained projection does not (the test can fail)
    untrained = A.train_projection(images, feats, keys, A.AlignSettings(steps=1, lr=1e-9))
    import torch

    with torch.no_grad():
        raw = untrained(torch.from_numpy(feats[:, 0])).numpy()
    assert rv.recall_at_1(raw @ images.T, keys)["report_to_image"] < 0.9


def test_align_text_refuses_a_package_without_the_image_embedding(tiny_package: object
                                                                  ) -> None:
    from dicom_node.cli import app

    folder = tiny_package.folder  # type: ignore[attr-defined]
    res = CliRunner().invoke(app, ["train", "align-text", "--model", str(folder)])
    assert res.exit_code == 2
    assert "has no embedding output" in res.output
    res = CliRunner().invoke(app, ["train", "language-eval", "--model", str(folder),
                                   "--retrieval-cases", "-1"])
    assert res.exit_code == 2 and "--retrieval-cases must be >= 0" in res.output


def test_a_vision_reexport_drops_the_alignment_but_keeps_the_language_models(
        tmp_path: Path) -> None:
    import yaml

    from inference.omnimri.export import _keep_foreign_extra

    lang = tmp_path / "1" / "language"
    lang.mkdir(parents=True)
    for name in ("tokenizer.json", "report_encoder.onnx", "align.json"):
        (lang / name).write_text("x")
    old = {"extra": {"language": {"folder": "language", "tokenizer": "tokenizer.json",
                                  "report_encoder": "report_encoder.onnx", "align_seed": 0,
                                  "align_train_cases": 60}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(old))
    spec: dict = {"extra": {"family": "omnimri"}}
    _keep_foreign_extra(tmp_path / "model.yaml", spec)
    assert spec["extra"]["language"] == {"folder": "language", "tokenizer": "tokenizer.json"}
    assert (lang / "tokenizer.json").is_file()
    assert not (lang / "report_encoder.onnx").exists() and not (lang / "align.json").exists()


def _fake_records(cache: Path, seed: int, n: int, dim: int) -> None:
    """Cached records for ``heldout-s{seed}-k`` (no case is generated): facts sampled, the
    image embedding a random unit vector."""
    import json

    from inference.omnimri.language.evaluate import random_facts
    from inference.omnimri.language.facts import SeriesFacts

    rng = random.Random(seed)
    vecs = np.random.default_rng(seed).normal(size=(n, dim))
    cache.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        f = random_facts(rng)
        f = SeriesFacts(lesions=f.lesions, diagnosis=f.diagnosis, tasks=("detect abnormalities",))
        (cache / f"heldout-s{seed}-{k}.json").write_text(json.dumps({
            "name": f"heldout-s{seed}-{k}", "embedding": (vecs[k] / np.linalg.norm(vecs[k])
                                                          ).tolist(),
            "facts": f.to_dict(), "key": [["kind", f.report_kind], ["text", rv.report_text(f)]],
            "contrast": "T1"},
            default=str))


@pytest.mark.skipif(not (SHIPPED_LANGUAGE / "text_encoder.onnx").is_file(),
                    reason="shipped text encoder missing")
def test_align_text_then_language_eval_retrieval_on_a_package(tmp_path: Path) -> None:
    import torch
    import yaml

    from dicom_node.cli import app
    from inference.omnimri.config import preset
    from inference.omnimri.export import export_vision, model_spec
    from inference.omnimri.model import OmniMRI
    from inference.package import ModelPackage

    torch.manual_seed(0)
    cfg = preset("tiny", conv_channels=(4, 8, 8), embed_dim=16, depth=1, heads=2, text_dim=16,
                 text_layers=1, text_heads=2, align_dim=8, patch_size=64)
    pkg = tmp_path / "pkg"
    export_vision(OmniMRI(cfg).eval(), pkg / "1" / "model.onnx")
    spec = model_spec(OmniMRI(cfg), "t", "1")
    spec["extra"]["language"] = {"folder": "language", "tokenizer": "tokenizer.json",
                                 "encoder": "text_encoder.onnx", "max_tokens": 64}
    (pkg / "model.yaml").write_text(yaml.safe_dump(spec))
    shutil.copytree(SHIPPED_LANGUAGE, pkg / "1" / "language",
                    ignore=shutil.ignore_patterns("report_encoder.onnx", "align.json"))
    cache = tmp_path / "cache"
    sub = cache / rv.package_fingerprint(pkg)
    _fake_records(sub, 0, 8, cfg.align_dim)  # training set 0
    _fake_records(sub, 1, 5, cfg.align_dim)  # held-out set 1
    runner = CliRunner()
    res = runner.invoke(app, ["train", "align-text", "--model", str(pkg), "--cases", "8",
                              "--steps", "200", "--cache", str(cache)])
    assert res.exit_code == 0, res.output
    assert "training cases: recall@1 report->image" in res.output
    lang = ModelPackage.load(pkg).spec.extra["language"]
    assert lang["report_encoder"] == "report_encoder.onnx" and lang["align_train_cases"] == 8
    assert lang["align_onnx_max_abs_diff"] <= 1e-4 and lang["encoder"] == "text_encoder.onnx"
    assert (pkg / "1" / "language" / "report_encoder.onnx").is_file()
    res = runner.invoke(app, ["train", "language-eval", "--model", str(pkg), "--texts", "20",
                              "--reports", "3", "--retrieval-cases", "5", "--seed", "1",
                              "--cache", str(cache), "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "report<->image retrieval: 5 held-out cases (seed 1)" in res.output
    assert "target >= 0.9" in res.output and "chance: " in res.output
    import json

    got = json.loads((tmp_path / "e.json").read_text())["retrieval"]["metrics"]
    assert got["chance_strict"] == pytest.approx(0.2)
    assert 0.0 <= got["report_to_image"] <= 1.0
