"""OmniMRI model family: synthetic data, the four training stages, export and post-processing.

The shipped model's held-out evaluation is in ``test_omnimri_shipped.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference import results as R
from inference.omnimri import report_text as rt
from inference.omnimri import synthetic as syn
from inference.omnimri.config import heads_for, preset
from inference.omnimri.tasks import HeadOutputs, build_results, report_facts

TINY = {"conv_channels": (4, 8, 8), "embed_dim": 16, "depth": 1, "heads": 2, "text_dim": 16,
        "text_layers": 1, "text_heads": 2, "align_dim": 8, "patch_size": 64}


def test_synthetic_case_is_deterministic_and_labelled() -> None:
    a = syn.make_case(5, diagnosis=1)
    b = syn.make_case(5, diagnosis=1)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape == a.tissue.shape == a.lesion.shape == syn.load_template().t1.shape
    assert set(np.unique(a.tissue)) == {0, 1, 2, 3}
    assert a.diagnosis == 1 and a.lesions
    # every instance is a WMH lesion, in the lesion mask, and described in the report
    for les in a.lesions:
        m = a.instances == les.instance
        assert m.any() and (a.lesion[m] == 1).all()
        assert les.side in ("left", "right", "midline")
    facts = syn.facts_from_lesions("small_vessel", a.lesions)
    assert rt.parse_facts(a.report) == {k: v for k, v in facts.items() if k != "kind"} | {
        "kind": "small_vessel"}
    # held-out layout uses the other half of the 16 mm cells
    h = syn.make_case(5, diagnosis=2, layout="heldout")
    for les in h.lesions:
        assert int((np.floor(np.array(les.centre_index)) // 8).sum()) % 2 in (0, 1)
    normal = syn.make_case(6, diagnosis=0)
    assert not normal.lesions and normal.report.startswith("findings : no focal lesion")


def test_heldout_lesion_centres_use_other_cells() -> None:
    rng = np.random.default_rng(0)
    cand = np.argwhere(np.ones((20, 20, 20), bool))
    for parity in (0, 1):
        for c in syn._pick_centres(rng, cand, 5, parity, 0.0):
            assert int((c // 8).sum()) % 2 == parity


def test_anywhere_layout_uses_both_cell_parities_and_unknown_layouts_are_refused() -> None:
    rng = np.random.default_rng(0)
    cand = np.argwhere(np.ones((20, 20, 20), bool))
    parities = {int((c // 8).sum()) % 2 for c in syn._pick_centres(rng, cand, 12, None, 0.0)}
    assert parities == {0, 1}
    with pytest.raises(ValueError, match="unknown layout"):
        syn.make_case(1, layout="nowhere")  # type: ignore[arg-type]


def test_in_plane_voxels_reach_the_requested_coarseness() -> None:
    img = np.random.default_rng(0).random((24, 32, 32)).astype(np.float32)

    def widest(max_mm: float) -> float:
        out = 0.0
        for seed in range(40):
            _, meta = syn._acquire(np.random.default_rng(seed), img, 1.0, max_mm)
            s = sorted(v for k, v in meta.items() if k.startswith("spacing_"))
            if s:
                out = max(out, s[1])  # the coarser in-plane axis (the largest is the slice)
        return out

    assert widest(3.0) <= 3.0
    assert 4.0 < widest(5.0) <= 5.0


def test_cli_stages_are_the_training_stages() -> None:
    from dicom_node.cli.train import Stage
    from inference.omnimri.train import STAGES

    assert [s.value for s in Stage if s is not Stage.all] == list(STAGES)


def test_undersampling_keeps_a_quarter_and_zero_filled_degrades() -> None:
    mask = syn.undersampling_mask(128, 4)
    assert mask.sum() == 32 and mask[60:68].all()
    img = syn.normalise(syn.make_case(1, diagnosis=0, augment=0.0).image)
    zf = syn.zero_filled(img, 4)
    err = float(np.mean((zf - img) ** 2))
    assert 1e-4 < err < 0.05


def test_lobes_and_sides() -> None:
    assert syn.lobe_of([30, 40, 30]) == "frontal"
    assert syn.lobe_of([30, -85, 10]) == "occipital"
    assert syn.lobe_of([50, -10, -20]) == "temporal"
    assert syn.lobe_of([20, -50, 50]) == "parietal"
    assert syn.lobe_of([20, -60, -40]) == "cerebellum"
    assert syn.side_of_lps_x(10.0) == "left" and syn.side_of_lps_x(-10.0) == "right"


def test_report_vocabulary_round_trip() -> None:
    facts = {"kind": "mass", "count": "single", "side": "right", "lobe": "temporal",
             "size": "25"}
    f, i = syn.write_report(facts)
    ids = rt.encode(f"findings : {f} impression : {i}", 48)
    assert rt.parse_facts(rt.decode(ids)) == facts
    mem = rt.facts_memory(facts)
    assert mem.shape == (5, rt.FACT_DIM) and mem.sum() == 5
    with pytest.raises(KeyError):
        rt.encode("an unknown word", 48)


def test_instructions_select_heads() -> None:
    assert heads_for(["segment brain tissues"]) == {"tissue"}
    assert heads_for(["write the report"]) == {"report", "diagnosis", "lesion"}
    with pytest.raises(ValueError, match="unknown instruction"):
        heads_for(["make coffee"])
    assert preset("base").embed_dim > preset("tiny").embed_dim


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.omnimri.train import STAGES, TrainSettings, train_all

    out = tmp_path_factory.mktemp("run")
    s = TrainSettings(out=out, batch=2, crop=32, pool_cases=2, threads=1, cfg_overrides=TINY)
    logs: list[str] = []
    train_all(3, s, steps={k: 2 for k in STAGES}, progress=logs.append)
    assert all((out / f"{k}.done").exists() for k in STAGES)
    assert (out / "soup.pt").is_file()
    assert any("multimodal step 2/2" in m and "report=" in m for m in logs)
    return out


def test_the_soup_is_the_mean_of_finetune_refine_refine2_and_refine3(tiny_run: Path) -> None:
    import torch

    from inference.omnimri.train import SOUP_OF

    assert SOUP_OF == ("finetune", "refine", "refine2", "refine3")
    a, b, c, d, soup = (torch.load(tiny_run / f"{k}.pt", weights_only=False)["modules"]
                        for k in (*SOUP_OF, "soup"))
    w = 1.0 / 4.0
    differs = 0
    for group, tensors in soup.items():
        for name, t in tensors.items():
            ta, tb, tc, td = a[group][name], b[group][name], c[group][name], d[group][name]
            if t.is_floating_point():
                assert torch.equal(t, ta * w + tb * w + tc * w + td * w), f"{group}.{name}"
                differs += int(not torch.equal(t, td))
            else:
                assert torch.equal(t, td)
    assert differs > 0  # the stages' weights differ, so the soup is none of them


def test_every_stage_runs_and_resumes(tiny_run: Path) -> None:
    import torch

    from inference.omnimri.train import TrainSettings, load_stage, run_stage

    st = torch.load(tiny_run / "instruct.pt", weights_only=False)
    assert st["step"] == 2 and st["stage"] == "instruct"
    # Resuming a finished stage with more steps continues from its checkpoint.
    s = TrainSettings(out=tiny_run, batch=2, crop=32, pool_cases=2, threads=1, cfg_overrides=TINY,
                      seed=3)
    before, _ = load_stage(tiny_run, "align")
    run_stage("align", s, steps=3)
    after, meta = load_stage(tiny_run, "align")
    assert meta["step"] == 3
    w0 = before.vision.encoder.embed.weight
    assert not torch.equal(w0, after.vision.encoder.embed.weight)


def _same_weights(a: Path, b: Path) -> None:
    import torch

    wa = torch.load(a, weights_only=False)["modules"]
    wb = torch.load(b, weights_only=False)["modules"]
    for group, tensors in wa.items():
        for name, t in tensors.items():
            assert torch.equal(t, wb[group][name]), f"{group}.{name} differs"


def test_train_all_reproduces_bit_for_bit_from_the_seed(tiny_run: Path, tmp_path: Path) -> None:
    from inference.omnimri.train import STAGES, TrainSettings, train_all

    s = TrainSettings(out=tmp_path, batch=2, crop=32, pool_cases=2, threads=1, cfg_overrides=TINY)
    train_all(3, s, steps={k: 2 for k in STAGES})
    _same_weights(tiny_run / "instruct.pt", tmp_path / "instruct.pt")
    _same_weights(tiny_run / "soup.pt", tmp_path / "soup.pt")  # the whole recipe, soup included


def test_a_killed_stage_resumes_bit_for_bit(tiny_run: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Same data, random streams and optimiser state after a crash as without one."""
    import shutil

    from inference.omnimri import train as T

    def settings(out: Path) -> T.TrainSettings:
        return T.TrainSettings(out=out, batch=2, crop=32, pool_cases=2, refresh_every=2,
                               save_every=2, threads=1, cfg_overrides=TINY, seed=3)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for d in (straight, killed):
        d.mkdir()
        shutil.copy(tiny_run / "pretrain.pt", d / "align.pt")
    T.run_stage("multimodal", settings(straight), steps=7)
    real = T._STEP_FNS["multimodal"]

    def dies_at_step_5(m: T.Modules, pool: T.CasePool, rng: np.random.Generator, step: int,
                       total: int) -> dict[str, object]:
        if step == 5:
            raise RuntimeError("killed")
        return real(m, pool, rng, step, total)  # type: ignore[return-value]

    monkeypatch.setitem(T._STEP_FNS, "multimodal", dies_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        T.run_stage("multimodal", settings(killed), steps=7)
    monkeypatch.setitem(T._STEP_FNS, "multimodal", real)
    T.run_stage("multimodal", settings(killed), steps=7)  # resumes at step 4
    _same_weights(straight / "multimodal.pt", killed / "multimodal.pt")


def test_onnx_export_matches_pytorch(tiny_run: Path, tmp_path: Path) -> None:
    from inference.omnimri.export import export_package
    from inference.package import ModelPackage

    folder = export_package(tiny_run / "instruct.pt", tmp_path / "pkg", name="omnimri-test")
    pkg = ModelPackage.load(folder)
    assert pkg.spec.input.layout == "NCHW" and pkg.spec.input.context_slices == 1
    diffs = pkg.spec.provenance.model_extra["onnx_max_abs_diff"]  # type: ignore[index]
    assert set(diffs) >= {"tissue", "lesion", "recon", "diagnosis", "decoder_logits"}
    assert max(diffs.values()) <= 1e-3
    assert (folder / "1" / "decoder.onnx").is_file()
    assert pkg.spec.outputs_for(["segment brain tissues"]) == ["tissue"]
    from inference.omnimri.train import load_stage, weights_sha256

    prov = pkg.spec.provenance.model_extra
    assert prov["weights_sha256"] == weights_sha256(load_stage(tiny_run, "instruct")[0])
    assert prov["stage_runs"]["instruct"]["steps"] == 2


def test_reexport_keeps_the_language_models_and_drops_stale_variants(
        tiny_run: Path, tmp_path: Path) -> None:
    import yaml

    from inference.omnimri.export import export_package

    folder = export_package(tiny_run / "instruct.pt", tmp_path / "pkg", name="omnimri-test")
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec["extra"]["language"] = {"folder": "language", "routing": "text_encoder.onnx"}
    spec["variants"] = [{"name": "int8", "file": "model.int8.onnx", "precision": "int8"}]
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    (folder / "1" / "model.int8.onnx").write_bytes(b"old weights, quantised")
    (folder / "1" / "ort_cache").mkdir()
    (folder / "1" / "ort_cache" / "model.old.onnx").write_bytes(b"old graph")

    export_package(tiny_run / "instruct.pt", folder, name="omnimri-test")
    again = yaml.safe_load((folder / "model.yaml").read_text())
    assert again["extra"]["language"] == spec["extra"]["language"]
    assert "variants" not in again
    assert not (folder / "1" / "model.int8.onnx").exists()
    assert not (folder / "1" / "ort_cache").exists()
    assert (folder / "1" / "model.onnx").is_file()


def test_train_all_then_trains_the_language_half_once(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train all``'s path: the (finished) stages, then ``train language`` with the run's seed
    into the package; a second run skips it, as a finished stage is skipped.

    The language settings are shrunk (fewer examples, a 30-step report decoder) where
    ``train language`` makes them, so the command itself runs, quickly.
    """
    pytest.importorskip("transformers")
    import functools
    import json

    import yaml
    from typer.testing import CliRunner

    from dicom_node.cli import app
    from dicom_node.cli.train import language_is_trained, train_everything
    from inference.omnimri.export import export_package
    from inference.omnimri.language import textmodel
    from inference.omnimri.language.runtime import TextModel
    from inference.omnimri.train import STAGES, TrainSettings

    monkeypatch.setattr(textmodel, "LanguageTrainSettings", functools.partial(
        textmodel.LanguageTrainSettings, train_examples=400, batch=16, decoder_steps=30,
        decoder_examples=300))
    pkg = export_package(tiny_run / "instruct.pt", tmp_path / "pkg", name="omnimri-test")
    s = TrainSettings(out=tiny_run, batch=2, crop=32, pool_cases=2, threads=1,
                      cfg_overrides=TINY, seed=3)
    logs: list[str] = []
    assert not language_is_trained(pkg, 3, 20)
    ck = train_everything(s, {k: 2 for k in STAGES}, pkg, language_steps=20,
                          progress=logs.append)
    assert ck == tiny_run / "soup.pt" and all((tiny_run / f"{k}.done").exists() for k in STAGES)
    assert "language: train language --model" in "\n".join(logs)
    spec = yaml.safe_load((pkg / "model.yaml").read_text())["extra"]["language"]
    assert spec["seed"] == 3 and spec["reports"] == "decoder"
    folder = pkg / "1" / "language"
    assert json.loads((folder / "language.json").read_text())["settings"]["steps"] == 20
    assert (folder / spec["encoder"]).is_file() and len(list(folder.glob("*.onnx"))) >= 2
    assert len(TextModel(folder).parse(["write the report"])) == 1
    assert language_is_trained(pkg, 3, 20)
    assert not language_is_trained(pkg, 4, 20) and not language_is_trained(pkg, 3)

    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    logs.clear()
    train_everything(s, {k: 2 for k in STAGES}, pkg, language_steps=20, progress=logs.append)
    assert logs == [f"language: {pkg} has the language model of seed 3, skipped"]
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before

    # A missing package is refused before any stage trains.
    r = CliRunner().invoke(app, ["train", "all", "--out", str(tmp_path / "run"), "--model",
                                 str(tmp_path / "none")])
    assert r.exit_code == 2 and "is not a model package" in r.output, r.output
    assert not (tmp_path / "run").exists()


def _blob(shape: tuple[int, int, int], centre: tuple[int, int, int], r: int) -> np.ndarray:
    g = np.indices(shape)
    return sum((g[d] - centre[d]) ** 2 for d in range(3)) <= r * r  # type: ignore[no-any-return]


def test_tasks_turn_outputs_into_consistent_results() -> None:
    tpl = syn.load_template()
    shape = tpl.t1.shape
    tissue = tpl.probs.copy()
    lesion = np.zeros((4, *shape), np.float32)
    lesion[0] = 1.0
    # a 14 mm WMH in frontal white matter at MNI x = -28 (RAS: the patient's left)
    centre_mni = np.array([-28.0, 20.0, 30.0])
    lps = centre_mni * [-1, -1, 1]
    kji = np.round(np.linalg.solve(tpl.affine[:3, :3], lps - tpl.affine[:3, 3])).astype(int)
    m = _blob(shape, tuple(kji), 3)
    lesion[1][m], lesion[0][m] = 0.9, 0.1
    heads = HeadOutputs(affine=tpl.affine, tissue=tissue, lesion=lesion,
                        slice_diagnosis=np.tile([[0.9, 0.05, 0.05]], (shape[0], 1)).astype(
                            np.float32))
    heads.slice_diagnosis[kji[0] - 2 : kji[0] + 2] = [0.05, 0.9, 0.05]  # type: ignore[index]

    def writer(facts: dict[str, str]) -> str:
        f, i = syn.write_report(facts)
        return f"findings : {f} impression : {i}"

    res = build_results(heads, ["segment brain tissues", "detect abnormalities",
                                "suggest a diagnosis", "write the report"],
                        R.ModelInfo("t", "1"), report_writer=writer)
    names = [s.label.label for s in res.segments]
    assert names == ["Brain", "CSF", "Grey matter", "White matter", "WM hyperintensity", "Mass",
                     "Oedema"]
    assert len({s.label.number for s in res.segments}) == len(names)
    assert len(res.detections) == 1
    d = res.detections[0]
    assert d.side == "left" and d.location == "frontal lobe"
    assert d.finding == R.WM_HYPERINTENSITY and 12.0 <= d.diameter_mm <= 16.0
    assert res.diagnosis is not None and res.diagnosis.code.meaning.startswith("Cerebral small")
    assert res.report is not None and "left frontal lobe" in res.report.findings
    assert rt.parse_facts(f"{res.report.findings} impression : {res.report.impression}")[
        "kind"] == report_facts(res.diagnosis, res.detections)["kind"]
    with pytest.raises(ValueError, match="unknown instruction"):
        build_results(heads, ["guess"], R.ModelInfo("t", "1"))


def test_calibration_chooses_settings_on_validation_cases_and_eval_uses_them(
        tiny_run: Path, tmp_path: Path) -> None:
    import yaml

    from inference.omnimri import calibrate as C
    from inference.omnimri.evaluate import HELDOUT_SEED_BASE, package_task_settings
    from inference.omnimri.export import export_package

    # Validation, training and held-out seeds never meet.
    # (training seeds: (seed + 1) * 1e6 + stage * 1e5 + n, for seeds below 700.)
    assert C.VALIDATION_SEED_BASE > (699 + 1) * 1_000_000 + 4 * 100_000
    assert C.VALIDATION_SEED_BASE + 10**8 <= HELDOUT_SEED_BASE
    folder = export_package(tiny_run / "instruct.pt", tmp_path / "pkg", name="omnimri-test")
    cal = C.calibrate_package(folder, n_cases=2, threads=1)
    assert len(cal.detection) == len(C.THRESHOLDS) * len(C.MIN_LESION_MM3)
    best = max(r["csi"] for r in cal.detection)
    chosen = next(r for r in cal.detection if (r["threshold"], r["min_lesion_mm3"])
                  == (cal.settings.lesion_threshold, cal.settings.min_lesion_mm3))
    assert chosen["csi"] == best and cal.settings.diagnosis_top_mm in C.TOP_MM
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    assert spec["extra"]["tasks"]["lesion_threshold"] == cal.settings.lesion_threshold
    assert spec["extra"]["calibration"]["layout"] == "training"
    assert package_task_settings(folder) == cal.settings
    assert any(line.startswith("*") for line in cal.lines())


def test_dice_loss_leaves_out_classes_absent_from_the_batch() -> None:
    """An absent class must not be pushed down everywhere (it killed the WMH class once)."""
    import torch

    from inference.omnimri.train import dice_loss

    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 2:4, 2:4] = 2
    assert torch.equal(dice_loss(logits, target, [1, 2]), dice_loss(logits, target, [2]))
    none = dice_loss(logits, torch.zeros_like(target), [1, 2])
    none.backward()
    assert float(none) == 0.0 and logits.grad is not None and float(logits.grad.abs().max()) == 0


def test_diagnosis_blends_the_slice_head_with_the_detections() -> None:
    from inference.omnimri.tasks import DIAGNOSIS_CODES, blend_diagnosis, diagnosis_from_detections

    head = R.Diagnosis(DIAGNOSIS_CODES["normal"], 0.8,
                       {"normal": 0.8, "small_vessel": 0.15, "mass": 0.05})
    mass = R.Detection(finding=R.MASS, segment_number=6, centroid_index=(1.0, 2.0, 3.0),
                       centroid_lps_mm=(0.0, 0.0, 0.0), bbox_index=(0, 0, 0, 2, 2, 2),
                       diameter_mm=20.0, volume_ml=2.0, probability=0.9)
    assert np.allclose(diagnosis_from_detections([]), [1.0, 0.0, 0.0])
    assert np.allclose(diagnosis_from_detections([mass]), [0.1, 0.0, 0.9])
    assert blend_diagnosis(head, [mass], 0.0) is head
    only = blend_diagnosis(head, [mass], 1.0)
    assert only.code == DIAGNOSIS_CODES["mass"] and only.probability == 0.9
    half = blend_diagnosis(head, [mass], 0.5)
    assert half.probabilities["mass"] == round(0.5 * 0.05 + 0.5 * 0.9, 4)
    assert abs(sum(half.probabilities.values()) - 1.0) < 1e-3


def test_flipped_batches_mirror_image_and_labels_together() -> None:
    """``sample_batch(flip=True)``: about half the slices mirrored, labels with their image."""
    from types import SimpleNamespace

    from inference.omnimri.config import preset
    from inference.omnimri.train import PoolCase, TrainSettings, sample_batch

    rng0 = np.random.default_rng(3)
    image = rng0.random((6, 40, 52), dtype=np.float32)
    image[:, :, :20] += 1.0  # one side brighter: a mirrored slice is told apart
    labels = (image > 1.0).astype(np.int64)  # tissue and lesion labels follow the image
    pc = PoolCase(image=image, zero_filled=image.copy(), tissue=labels, lesion=labels,
                  diagnosis=1, report_tokens=np.zeros(4, np.int64), facts={},
                  brain_slices=np.arange(1, 5), lesion_slices=np.arange(1, 5),
                  hard_slices=np.arange(0))
    pool = SimpleNamespace(cases=[pc], s=TrainSettings(crop=128, device="cpu"))
    cfg = preset("tiny")
    b = sample_batch(pool, np.random.default_rng(0), 40, cfg, flip=True)  # type: ignore[arg-type]
    centre = b["image"][:, cfg.context_slices].numpy()
    mirrored = 0
    for n in range(40):
        inside = centre[n] > 0  # the padded case
        np.testing.assert_array_equal(b["tissue"][n].numpy()[inside], centre[n][inside] > 1.0)
        np.testing.assert_array_equal(b["lesion"][n].numpy(), b["tissue"][n].numpy())
        cols = np.flatnonzero(inside.any(0))
        left, right = centre[n][:, cols[:10]], centre[n][:, cols[-10:]]
        mirrored += int(right[right > 0].mean() > left[left > 0].mean())
    assert 10 <= mirrored <= 30
    plain = sample_batch(pool, np.random.default_rng(0), 40, cfg)  # type: ignore[arg-type]
    p = plain["image"][:, cfg.context_slices].numpy()
    assert all(p[n][:, np.flatnonzero((p[n] > 0).any(0))[:10]].mean()
               > p[n][:, np.flatnonzero((p[n] > 0).any(0))[-10:]].mean() for n in range(40))
