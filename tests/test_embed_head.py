"""The findings-aware embedding head (issue #16, retrieval): head-only, side-aware, trainable.

No synthetic case is generated: the window features the head trains on are written into its
cache here (what :func:`inference.omnimri.embed_head.case_windows` would compute).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from inference.omnimri import embed_head as E
from inference.omnimri.config import preset
from inference.omnimri.model import OmniMRI

TINY = {"conv_channels": (4, 8, 8), "embed_dim": 16, "depth": 1, "heads": 2, "text_dim": 16,
        "text_layers": 1, "text_heads": 2, "align_dim": 8, "patch_size": 64}
OTHER = ("tissue", "lesion", "recon", "diagnosis")


def _model(seed: int = 0) -> OmniMRI:
    torch.manual_seed(seed)
    return OmniMRI(preset("tiny", **TINY)).eval()


def test_the_head_changes_only_the_embedding_and_loads_from_a_state_dict() -> None:
    m = _model()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        before = m(x)
        assert not any(k.startswith("findings.") for k in m.state_dict())
        torch.manual_seed(1)
        m.findings = E.FindingsHead(m.cfg.embed_dim, m.cfg.align_dim, hidden=12)
        after = m(x)
        only = m(x, heads=frozenset({"embedding"}))
    for k in OTHER:
        assert torch.equal(before[k], after[k]), k
    assert after["embedding"].shape == (3, m.cfg.align_dim)
    assert not torch.allclose(after["embedding"], before["embedding"])
    assert set(only) == {"embedding"}
    torch.testing.assert_close(only["embedding"], after["embedding"])
    # a state with the head makes a fresh model grow one (strict load); one without stays bare
    fresh = _model(5)
    fresh.load_state_dict(m.state_dict())
    assert isinstance(fresh.findings, E.FindingsHead) and fresh.findings.mlp[0].out_features == 12
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)["embedding"], after["embedding"])
    bare = _model(6)
    bare.load_state_dict(_model().state_dict())
    assert bare.findings is None


def _maps(lesion_col: int | None, brain_col: int = 20, n: int = 32
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One window: a brain disc centred at column ``brain_col`` and a lesion at ``lesion_col``."""
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    brain = (((yy - 16) ** 2 + (xx - brain_col) ** 2) < 10 ** 2).float()[None, None]
    les = torch.zeros(1, 3, n, n)
    if lesion_col is not None:
        les[0, 1] = (((yy - 14) ** 2 + (xx - lesion_col) ** 2) < 2 ** 2).float() * 0.9
    return torch.zeros(1, 16, n // 4, n // 4), brain, les


def test_the_features_keep_the_side_of_a_lesion_relative_to_the_brain() -> None:
    d = 16
    left_area, right_area = 3 * d + 1, 3 * d + 12 + 1  # mass channel, log(1 + area)
    # brain off-centre in the window (columns 10-30): halves follow the brain, not the window
    fl = E.FindingsHead.features(*_maps(26))  # +columns of the LPS grid: patient left
    fr = E.FindingsHead.features(*_maps(14))
    f0 = E.FindingsHead.features(*_maps(None))
    assert fl.shape == (1, E.feature_width(d))
    assert fl[0, left_area] > 2.0 and fl[0, left_area] - fl[0, right_area] > 1.5
    assert fr[0, right_area] > 2.0 and fr[0, right_area] - fr[0, left_area] > 1.5
    assert f0[0, left_area] == 0 and f0[0, right_area] == 0
    # mirroring the window about the brain's centre swaps the two halves
    t, b, q = _maps(26, brain_col=16)
    fm = E.FindingsHead.features(t, b.flip(3), q.flip(3))
    torch.testing.assert_close(fm[0, right_area], E.FindingsHead.features(t, b, q)[0, left_area],
                               atol=1e-3, rtol=1e-3)


def _fake_case(kind: int, rng: np.random.Generator, d: int = 16, windows: int = 6
               ) -> E.CaseFeatures:
    """Window features of a case: normal (0), a left (1) or right (2) lesion; random contrast."""
    toks, brains, less = [], [], []
    gain = rng.uniform(0.5, 2.0)
    for w in range(windows):
        t, b, q = _maps({0: None, 1: 26, 2: 14}[kind] if w in (2, 3) else None)
        toks.append((t + gain + 0.05 * torch.from_numpy(rng.normal(size=t.shape)).float()
                     ).numpy())
        brains.append(b.numpy())
        less.append(q.numpy())
    facts = {0: ("normal", "none"), 1: ("mass", "left"), 2: ("mass", "right")}[kind]
    key = (("count", "1" if kind else "none"), ("kind", facts[0]), ("lobe", "none"),
           ("side", facts[1]), ("size", "10" if kind else "0"))
    return E.CaseFeatures(np.concatenate(toks).astype(np.float16),
                          np.concatenate(brains).astype(np.float16),
                          np.concatenate(less).astype(np.float16),
                          np.full(windows, 0.3), key, "T1")


def test_the_head_learns_to_put_equal_facts_together_whatever_the_contrast() -> None:
    rng = np.random.default_rng(0)
    data = [_fake_case(k % 3, rng) for k in range(15)]
    untrained = E.FindingsHead(16, 8)
    head = E.train_head(data, 16, 8, E.EmbedSettings(steps=60, batch=15, hidden=32))
    fit = E.training_fit(head, data)
    assert fit == {"nearest_same_facts": 1.0, "nearest_same_kind": 1.0}
    assert E.training_fit(untrained, data)["nearest_same_facts"] < 1.0


def _write_cache(cache: Path, vision: OmniMRI, n: int) -> None:
    rng = np.random.default_rng(1)
    sub = cache / E.features_key(vision)
    sub.mkdir(parents=True)
    for k in range(n):
        cf = _fake_case(k % 3, rng)
        np.savez(sub / f"heldout-s0-{k}.npz", tokens=cf.tokens, brain=cf.brain, lesion=cf.lesion,
                 weights=cf.weights, meta=json.dumps({"key": cf.key, "contrast": "T1"}))


def test_train_embed_writes_a_checkpoint_that_exports_with_the_other_outputs_unchanged(
        tmp_path: Path) -> None:
    import onnxruntime as ort

    from dicom_node.cli import app
    from inference.omnimri.train import build_modules
    from inference.package import ModelPackage

    cfg = preset("tiny", **TINY)
    mods = build_modules(cfg, 0)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"stage": "soup", "of": ["finetune"], "config": cfg.to_dict(), "seed": 0,
                "modules": mods.state()}, run / "soup.pt")
    cache = tmp_path / "cache"
    _write_cache(cache, mods.vision, 9)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "embed", "--run", str(tmp_path / "none"), "--cache",
                              str(cache)])
    assert res.exit_code == 2 and "no checkpoint" in res.output
    res = runner.invoke(app, ["train", "embed", "--run", str(run), "--cases", "9", "--steps",
                              "40", "--cache", str(cache)])
    assert res.exit_code == 0, res.output
    assert (run / "embed.pt").is_file() and "--stage embed" in res.output
    done = json.loads((run / "embed.done").read_text())
    assert done["training_cases"] == 9 and done["of"] == "soup"
    outs = {}
    x = np.random.default_rng(2).random((3, 3, 64, 64)).astype(np.float32)
    for stage in ("soup", "embed"):
        res = runner.invoke(app, ["train", "export", "--run", str(run), "--stage", stage,
                                  "--out", str(tmp_path / stage)])
        assert res.exit_code == 0, res.output
        pkg = ModelPackage.load(tmp_path / stage)
        prov = pkg.spec.provenance.model_extra or {}
        assert ("embedding_head" in prov) == (stage == "embed")
        assert prov["onnx_max_abs_diff"]["embedding"] <= 1e-3
        sess = ort.InferenceSession(str(pkg.onnx_path()), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        outs[stage] = dict(zip(names, sess.run(None, {"image": x}), strict=True))
    for k in OTHER:
        np.testing.assert_array_equal(outs["soup"][k], outs["embed"][k], err_msg=k)
    assert not np.allclose(outs["soup"]["embedding"], outs["embed"]["embedding"])


@pytest.mark.parametrize("bad", ["1"])
def test_train_embed_refuses_too_few_cases(bad: str, tmp_path: Path) -> None:
    from dicom_node.cli import app

    res = CliRunner().invoke(app, ["train", "embed", "--run", str(tmp_path), "--cases", bad])
    assert res.exit_code == 2 and "at least 2" in res.output
