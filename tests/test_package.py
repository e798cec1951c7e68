"""Model packages: model.yaml validation with key paths, folder layout, instruction → outputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference.package import (
    ModelPackage,
    PackageError,
    SegmentationOutput,
    TextOutput,
    find_packages,
)
from inference.results import Code
from tests.fixtures.tiny_model import tiny_spec


def _write(folder: Path, spec: Any, *, onnx: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    if onnx:
        (folder / "1").mkdir(exist_ok=True)
        (folder / "1" / "model.onnx").write_bytes(b"")
    return folder


def _load_error(tmp_path: Path, spec: Any) -> str:
    with pytest.raises(PackageError) as info:
        ModelPackage.load(_write(tmp_path / "m", spec))
    return str(info.value)


def test_tiny_package_loads(tiny_package: ModelPackage) -> None:
    spec = tiny_package.spec
    assert spec.name == "tiny" and spec.version == "0.0.1"
    assert spec.input.patch_size == (16, 16, 16) and spec.input.channels == 1
    seg = spec.output("tissues")
    assert isinstance(seg, SegmentationOutput) and seg.channels == 3
    assert seg.labels[1].to_segment_label(2).type == Code("52988006", "SCT", "Lesion")
    assert spec.outputs_for(["suggest a diagnosis"]) == ["diagnosis"]
    assert spec.outputs_for(["write the report"]) == ["diagnosis", "report"]  # memory added
    assert spec.outputs_for(None) == ["tissues", "diagnosis", "report"]
    assert spec.engine_outputs() == ["tissues", "diagnosis"]
    assert tiny_package.versions() == [1]
    assert tiny_package.onnx_path().name == "model.onnx" and tiny_package.onnx_path().is_file()
    assert tiny_package.torchscript_path().is_file()
    report = spec.output("report")
    assert isinstance(report, TextOutput)
    assert tiny_package.vocabulary(report)[2] == "no"
    info = tiny_package.model_info("1.2.3")
    assert (info.name, info.version, info.node_version) == ("tiny", "0.0.1", "1.2.3")


def test_plan_path_keyed_by_gpu_and_trt(tiny_package: ModelPackage) -> None:
    a = tiny_package.plan_path("8.6", "10.3.0")
    b = tiny_package.plan_path("9.0", "10.3.0")
    c = tiny_package.plan_path("8.6", "10.4.1", precision="fp16")
    assert a.name == "model.sm86.trt10.3.0.fp32.plan"
    assert len({a, b, c}) == 3 and a.parent == tiny_package.version_folder(1)


def test_unsupported_instruction(tiny_package: ModelPackage) -> None:
    with pytest.raises(PackageError, match=r"does not support \['make coffee'\]"):
        tiny_package.spec.outputs_for(["make coffee"])


def test_missing_folder_and_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no model.yaml"):
        ModelPackage.load(tmp_path / "absent")
    assert "not valid YAML" in _load_error(tmp_path, "name: [unclosed")
    assert "top level must be a mapping" in _load_error(tmp_path, "- a\n- b\n")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s.update(inptu=s.pop("input")),
         ["input: Field required", "inptu: Extra inputs are not permitted"]),
        (lambda s: s["input"].update(patch_size=[16, 16]),
         ["input: Value error, patch_size has 2 values; layout NCDHW needs 3"]),
        (lambda s: s["input"].update(layout="NCHW", patch_size=[16, 16, 16]),
         ["patch_size has 3 values; layout NCHW needs 2"]),
        (lambda s: s["input"].update(overlap=1.5), ["input.overlap: Input should be less than 1"]),
        (lambda s: s["input"].update(spacing_mm=[1, 0, 1]), ["input.spacing_mm: Value error"]),
        (lambda s: s["input"]["normalisation"].update(kind="robust"),
         ["input.normalisation.kind: Input should be 'zscore', 'percentile', 'minmax' or 'none'"]),
        (lambda s: s["outputs"][0]["labels"][1].update(color=[0, 0, 256]),
         ["outputs.0.segmentation.labels.1.color: Value error, colour components must be 0-255"]),
        (lambda s: s["outputs"][0]["labels"][1].update(value=1),
         ["outputs.0.segmentation: Value error, label values must be unique, got [1, 1]"]),
        (lambda s: s["outputs"][0].update(kind="segmentatoin"),
         ["outputs.0: Input tag 'segmentatoin' found using 'kind' does not match"]),
        (lambda s: s["outputs"][1].update(name="tissues"),
         ["output names must be unique: ['tissues']"]),
        (lambda s: s["task_outputs"].update({"segment brain tissues": ["nope"]}),
         ["task_outputs['segment brain tissues'] names unknown outputs ['nope']"]),
        (lambda s: s["task_outputs"].update({"dance": ["tissues"]}),
         ["task_outputs names 'dance', which is not in tasks"]),
        (lambda s: s["outputs"][2].update(memory_output="missing"),
         ["memory_output 'missing' is not an output"]),
        (lambda s: s["outputs"][0]["labels"][0]["category"].pop("meaning"),
         ["outputs.0.segmentation.labels.0.category.meaning: Field required"]),
    ],
    ids=["typo", "patch-3d", "patch-2d", "overlap", "spacing", "norm-kind", "color",
         "dup-label", "kind", "dup-output", "task-output", "task-name", "memory", "code"],
)
def test_validation_errors_name_key_paths(
    tmp_path: Path, mutate: Any, expected: list[str]
) -> None:
    spec = copy.deepcopy(tiny_spec())
    mutate(spec)
    msg = _load_error(tmp_path, spec)
    assert "model.yaml: invalid model package spec" in msg
    for text in expected:
        assert text in msg, msg


def test_numeric_codes_and_version_become_text(tmp_path: Path) -> None:
    spec = tiny_spec()
    spec["version"] = 2
    spec["outputs"][0]["labels"][0]["type"]["value"] = 389080004
    pkg = ModelPackage.load(_write(tmp_path / "m", spec))
    assert pkg.spec.version == "2"
    out = pkg.spec.output("tissues")
    assert isinstance(out, SegmentationOutput) and out.labels[0].type.value == "389080004"


def test_no_version_folder(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"no version folder \(e.g. 1/\)"):
        ModelPackage.load(_write(tmp_path / "m", tiny_spec(), onnx=False))


def test_highest_version_and_vocabulary_file(tmp_path: Path) -> None:
    spec = tiny_spec()
    spec["outputs"][2]["vocabulary"] = "vocab.txt"
    folder = _write(tmp_path / "m", spec)
    (folder / "3").mkdir()
    (folder / "3" / "model.pt").write_bytes(b"")
    (folder / "2").mkdir()  # empty: not a version
    pkg = ModelPackage.load(folder)
    assert pkg.versions() == [1, 3] and pkg.version_folder().name == "3"
    report = pkg.spec.output("report")
    assert isinstance(report, TextOutput)
    with pytest.raises(PackageError, match="vocab.txt: vocabulary file of output 'report'"):
        pkg.vocabulary(report)
    (folder / "3" / "vocab.txt").write_text("<pad>\n<bos>\nhello\n")
    assert pkg.vocabulary(report) == ["<pad>", "<bos>", "hello"]


def test_find_packages_reports_broken_ones(tmp_path: Path) -> None:
    _write(tmp_path / "good", tiny_spec())
    bad = tiny_spec()
    bad["input"]["batch_size"] = 0
    _write(tmp_path / "bad", bad)
    (tmp_path / "not-a-package").mkdir()
    found, problems = find_packages(tmp_path)
    assert [p.name for p in found] == ["tiny"]
    assert list(problems) == [tmp_path / "bad"]
    reason = problems[tmp_path / "bad"]
    assert "input.batch_size: Input should be greater than or equal to 1" in reason
