"""The rule language and the rule set: a table of series headers x conditions -> matches."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import ConfigError, RuleConfig, load_config
from dicom_node.rules import (
    ConditionSyntaxError,
    RuleSet,
    SeriesAttributes,
    SeriesReadError,
    attributes_for_file,
    attributes_for_series,
    evaluate,
    parse_condition,
)
from dicom_node.series import Series, StoredInstance
from omnimri_samples import make_mr_series, synthetic_series, write_series

# ----------------------------------------------------------------------------- headers

HEADERS: dict[str, dict[str, object]] = {
    "T1": {
        "Modality": "MR",
        "SeriesDescription": "T1 MPRAGE SAG ",  # DICOM pads to even length
        "ImageType": "ORIGINAL\\PRIMARY\\M\\ND",
        "SliceThickness": "1.0",
        "MagneticFieldStrength": "3",
        "BodyPartExamined": "BRAIN",
        "CalledAE": "OMNI_BRAIN",
        "CallingAE": "SCANNER1",
        "SenderHost": "10.0.0.5",
        "InstanceCount": 176,
    },
    "FLAIR_C": {
        "Modality": "MR",
        "SeriesDescription": "AX FLAIR post",
        "ImageType": ["DERIVED", "SECONDARY"],
        "SliceThickness": "5.0",
        "MagneticFieldStrength": "1.5",
        "ContrastBolusAgent": "Gadovist",
        "CalledAE": "OMNI_BRAIN",
        "InstanceCount": 30,
    },
    "KNEE": {
        "Modality": "MR",
        "SeriesDescription": "PD FS COR",
        "BodyPartExamined": "KNEE",
        "SliceThickness": "3",
        "ImageType": "ORIGINAL\\PRIMARY",
        "CalledAE": "OMNI_KNEE",
    },
    "CT": {
        "Modality": "CT",
        "SeriesDescription": "HEAD",
        "ContrastBolusAgent": "",  # type 2: present but empty = missing
        "SliceThickness": "abc",  # not a number
    },
    "EMPTY": {},
}

T, F = True, False

# condition -> expected result per header (in HEADERS order: T1, FLAIR_C, KNEE, CT, EMPTY)
TABLE: list[tuple[str, tuple[bool, bool, bool, bool, bool]]] = [
    ('Modality == "MR"', (T, T, T, F, F)),
    ('Modality != "MR"', (F, F, F, T, F)),  # missing -> false, even for !=
    ('Modality == "mr"', (F, F, F, F, F)),  # == is case-sensitive
    ('SeriesDescription == "T1 MPRAGE SAG"', (T, F, F, F, F)),  # padding stripped
    ('ImageType == "ORIGINAL"', (T, F, T, F, F)),  # by element
    ('ImageType == "ND"', (T, F, F, F, F)),
    ('ImageType != "DERIVED"', (T, F, T, F, F)),  # no element equals; missing -> false
    ('ImageType == "ORIGINAL" and ImageType == "PRIMARY"', (T, F, T, F, F)),
    ('ImageType contains "deriv"', (F, T, F, F, F)),
    ('SeriesDescription contains "FLAIR"', (F, T, F, F, F)),
    ('SeriesDescription contains "flair"', (F, T, F, F, F)),  # case-insensitive
    ('SeriesDescription matches "(?i)t1.*mprage"', (T, F, F, F, F)),
    ('SeriesDescription matches "^AX"', (F, T, F, F, F)),  # search, anchored by ^
    ('SeriesDescription matches "mprage"', (F, F, F, F, F)),  # case-sensitive without (?i)
    (r'SenderHost matches "^10\.0\."', (T, F, F, F, F)),
    ("SliceThickness < 2", (T, F, F, F, F)),  # "abc" is not a number -> false
    ("SliceThickness <= 3", (T, F, T, F, F)),
    ("SliceThickness >= 3", (F, T, T, F, F)),
    ("SliceThickness > 4.5", (F, T, F, F, F)),
    ("MagneticFieldStrength == 3", (T, F, F, F, F)),  # numeric: "3" == 3
    ("MagneticFieldStrength == 1.5", (F, T, F, F, F)),
    ('MagneticFieldStrength == "3"', (T, F, F, F, F)),  # exact string
    ('MagneticFieldStrength == "3.0"', (F, F, F, F, F)),
    ("MagneticFieldStrength in [1.5, 3]", (T, T, F, F, F)),
    ("has(ContrastBolusAgent)", (F, T, F, F, F)),  # empty value counts as missing
    ("not has(ContrastBolusAgent)", (T, F, T, T, T)),
    ('CalledAE in ["OMNI_BRAIN", "OMNI_NEURO"]', (T, T, F, F, F)),
    ('CalledAE not in ["OMNI_BRAIN"]', (F, F, T, F, F)),  # missing -> false
    ('CalledAE == "OMNI_KNEE"', (F, F, T, F, F)),
    ("InstanceCount > 100", (T, F, F, F, F)),
    ('BodyPartExamined in ["BRAIN", "HEAD"] or SeriesDescription contains "head"', (T, F, F, T, F)),
    # and binds tighter than or
    ('Modality == "CT" or Modality == "MR" and BodyPartExamined == "KNEE"', (F, F, T, T, F)),
    ('(Modality == "CT" or Modality == "MR") and BodyPartExamined == "KNEE"', (F, F, T, F, F)),
    # not binds tighter than and
    ('not Modality == "MR" and has(SeriesDescription)', (F, F, F, T, F)),
    ('not (Modality == "MR" and has(SeriesDescription))', (F, F, F, T, T)),
    ('NOT Modality == "MR" OR false', (F, F, F, T, T)),  # keywords case-insensitive
    ("true", (T, T, T, T, T)),
    ("false", (F, F, F, F, F)),
    ("SliceThickness in []", (F, F, F, F, F)),
    ("Modality == 'MR'", (T, T, T, F, F)),  # single quotes
]


@pytest.fixture(scope="module")
def headers() -> dict[str, SeriesAttributes]:
    return {k: SeriesAttributes.from_mapping(v, source=k) for k, v in HEADERS.items()}


@pytest.mark.parametrize(("condition", "expected"), TABLE, ids=[c for c, _ in TABLE])
def test_condition_table(
    headers: dict[str, SeriesAttributes], condition: str, expected: tuple[bool, ...]
) -> None:
    cond = parse_condition(condition)
    got = tuple(evaluate(cond, headers[name]).result for name in HEADERS)
    assert got == expected, dict(zip(HEADERS, got, strict=True))


def test_trace_explains_values_and_missing(headers: dict[str, SeriesAttributes]) -> None:
    cond = parse_condition('ImageType == "ND" and SliceThickness < 2 and has(ContrastBolusAgent)')
    trace = evaluate(cond, headers["T1"])
    assert trace.result is False
    image_type, thickness, contrast = trace.children
    assert image_type.values == ("ORIGINAL", "PRIMARY", "M", "ND")
    assert image_type.result and '"ND" equals "ND"' in image_type.reason
    assert thickness.result and thickness.values == ("1.0",)
    assert contrast.result is False and contrast.values is None
    assert "missing" in contrast.reason
    text = "\n".join(trace.lines())
    assert "[false] ImageType" in text.replace("[true ] ImageType", "[false] ImageType")
    assert "ContrastBolusAgent is missing" in text
    not_number = evaluate(parse_condition("SliceThickness < 2"), headers["CT"])
    assert not_number.result is False and "not a number" in not_number.reason
    as_dict = trace.to_dict()
    assert as_dict["children"][2]["values"] is None


# ----------------------------------------------------------------------------- syntax errors

ERRORS = [
    ('Modaliti == "MR"', 1, "did you mean 'Modality'"),
    ('Modality == "MR" and seriesdescription contains "x"', 22, "did you mean 'SeriesDescription'"),
    ('Modality = "MR"', 10, "use '=='"),
    ('Modality == "MR" && SliceThickness < 2', 18, "use 'and'"),
    ('Modality == "MR" || true', 18, "use 'or'"),
    ("Modality == ", 12, "unexpected end of condition"),
    ('(Modality == "MR"', 18, "expected ')'"),
    ('Modality "MR"', 10, "expected a comparison"),
    ('SliceThickness < "2"', 18, "compares numbers"),
    ('SeriesDescription matches "(unclosed"', 27, "invalid regular expression"),
    ("Modality == true", 13, "use a quoted string or a number"),
    ('Modality == "MR', 13, "unterminated string"),
    ("Frobnicate == 1", 1, "unknown attribute 'Frobnicate'"),
    ("", 1, "empty condition"),
    ('Modality == "MR" and', 21, "unexpected end"),
    ("has(Modality", 13, "expected ')'"),
]


@pytest.mark.parametrize(
    ("text", "column", "reason"), ERRORS, ids=[e[0] or "<empty>" for e in ERRORS]
)
def test_syntax_errors_have_column(text: str, column: int, reason: str) -> None:
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition(text)
    err = info.value
    assert err.column == column, str(err)
    assert reason in err.reason, str(err)
    assert str(err).startswith(f"column {column}: ")
    caret = err.caret(indent="")
    assert caret.splitlines()[1] == " " * (column - 1) + "^"


def test_regex_too_long_is_refused() -> None:
    with pytest.raises(ConditionSyntaxError, match="too long"):
        parse_condition('SeriesDescription matches "' + "a" * 600 + '"')


def test_catastrophic_regex_times_out_as_no_match() -> None:
    attrs = SeriesAttributes.from_mapping({"SeriesDescription": "a" * 40 + "!"})
    cond = parse_condition('SeriesDescription matches "(a|aa)+$"')
    trace = evaluate(cond, attrs)
    assert trace.result is False
    assert "timed out" in trace.reason


def test_keywords_and_pseudo_attributes_recorded() -> None:
    cond = parse_condition('CalledAE == "X" or (Modality == "MR" and not has(EchoTime))')
    assert cond.keywords == {"CalledAE", "Modality", "EchoTime"}


# ----------------------------------------------------------------------------- the rule set


def _rule(name: str, when: str, **kw: object) -> RuleConfig:
    kw.setdefault("pipelines", ["p"])
    return RuleConfig(name=name, when=when, **kw)  # type: ignore[arg-type]


ROUTING = [
    _rule("discard-localizers", 'SeriesDescription contains "localizer"', action="discard"),
    _rule("brain", 'CalledAE == "OMNI_BRAIN" and Modality == "MR"', pipelines=["brain"]),
    _rule("knee", 'CalledAE == "OMNI_KNEE"', pipelines=["knee"], stop=True, priority="urgent"),
    _rule("knee-extra", 'BodyPartExamined == "KNEE"', pipelines=["preview"]),
    _rule("old", "true", enabled=False),
    _rule("everything-else", "true", fallback=True, pipelines=["preview"], priority="low"),
]

ROUTING_CASES = [
    # header overrides, fired rule names, discarded
    ("T1", {}, ["brain"], False),
    ("FLAIR_C", {}, ["brain"], False),
    ("KNEE", {}, ["knee"], False),  # stop: knee-extra not evaluated
    ("CT", {}, ["everything-else"], False),  # fallback: nothing else matched
    ("EMPTY", {}, ["everything-else"], False),
    ("T1", {"SeriesDescription": "3-plane localizer"}, [], True),  # discard: no fallback
    ("T1", {"CalledAE": "OMNI_KNEE"}, ["knee"], False),  # called-AE routing
    ("KNEE", {"CalledAE": "OMNI_BRAIN"}, ["brain", "knee-extra"], False),
]


@pytest.mark.parametrize(("base", "override", "fired", "discarded"), ROUTING_CASES)
def test_routing_table(
    base: str, override: dict[str, object], fired: list[str], discarded: bool
) -> None:
    attrs = SeriesAttributes.from_mapping({**HEADERS[base], **override})
    decision = RuleSet(ROUTING).evaluate(attrs)
    assert [r.name for r in decision.fired] == fired
    assert decision.discarded is discarded
    assert [e.name for e in decision.explanations] == [r.name for r in ROUTING]


def test_explanations_say_why_rules_were_skipped() -> None:
    decision = RuleSet(ROUTING).evaluate(SeriesAttributes.from_mapping(HEADERS["KNEE"]))
    by = {e.name: e for e in decision.explanations}
    assert by["knee"].fired and by["knee"].rule.priority == "urgent"
    assert by["knee-extra"].matched and not by["knee-extra"].fired
    assert by["knee-extra"].skipped == "rule 'knee' stopped evaluation"
    assert by["old"].matched and by["old"].skipped == "disabled" and not by["old"].fired
    assert by["everything-else"].skipped is not None
    assert by["brain"].trace is not None and not by["brain"].matched
    text = decision.to_text()
    assert "rule 2 'knee' [stop]: FIRED: pipelines knee" in text
    assert "skipped: disabled (condition true)" in text
    assert 'CalledAE = "OMNI_KNEE": no value equals "OMNI_BRAIN"' in text
    d = decision.to_dict()
    assert d["fired"] == ["knee"] and d["rules"][3]["skipped"].startswith("rule 'knee'")


def test_discard_keeps_earlier_rules_and_stops_later_ones() -> None:
    rules = RuleSet(
        [
            _rule("preview-all", 'Modality == "MR"', pipelines=["preview"]),
            _rule("drop-derived", 'ImageType == "DERIVED"', action="discard"),
            _rule("brain", 'Modality == "MR"', pipelines=["brain"]),
            _rule("fb", "true", fallback=True),
        ]
    )
    d = rules.evaluate(SeriesAttributes.from_mapping(HEADERS["FLAIR_C"]))
    assert [r.name for r in d.fired] == ["preview-all"] and d.discarded
    assert d.explanations[2].skipped == "rule 'drop-derived' discarded the series"
    d2 = rules.evaluate(SeriesAttributes.from_mapping(HEADERS["T1"]))
    assert [r.name for r in d2.fired] == ["preview-all", "brain"] and not d2.discarded


def test_study_trigger_ready_and_missing() -> None:
    study_rule = _rule(
        "brain-study",
        'Modality == "MR" and CalledAE == "OMNI_BRAIN"',
        trigger="study",
        required_series=[
            'SeriesDescription matches "(?i)t1"',
            'SeriesDescription contains "flair"',
        ],
    )
    rules = RuleSet([study_rule])
    t1 = SeriesAttributes.from_mapping(HEADERS["T1"], series_instance_uid="1.2.3.1")
    flair = SeriesAttributes.from_mapping(HEADERS["FLAIR_C"], series_instance_uid="1.2.3.2")
    knee = SeriesAttributes.from_mapping(HEADERS["KNEE"], series_instance_uid="1.2.3.3")

    decision = rules.evaluate(t1)
    assert decision.study_rules == [study_rule] and decision.series_rules == []

    waiting = rules.study_ready(study_rule, [t1, knee])
    assert not waiting.ready and waiting.when_matched
    assert waiting.missing == ['SeriesDescription contains "flair"']
    assert waiting.matched['SeriesDescription matches "(?i)t1"'] == ["1.2.3.1"]

    ready = rules.study_ready("brain-study", [t1, knee, flair])
    assert ready.ready and ready.missing == []
    assert ready.matched['SeriesDescription contains "flair"'] == ["1.2.3.2"]
    assert ready.to_dict()["ready"] is True

    only_knee = rules.study_ready(study_rule, [knee])
    assert not only_knee.ready and not only_knee.when_matched
    with pytest.raises(KeyError):
        rules.study_ready("nope", [t1])


# ----------------------------------------------------------------------------- config


def test_config_refuses_bad_condition_with_key_path(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "pipelines:\n  p: {kind: preview, model: null}\n"
        "rules:\n"
        "  - {name: ok, when: 'Modality == \"MR\"', pipelines: [p]}\n"
        "  - {name: bad, when: 'SliceThicknes < 2', pipelines: [p]}\n"
        "  - name: study\n    trigger: study\n    pipelines: [p]\n"
        "    required_series: ['Modality == \"MR\"', 'Modality ==']\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    problems = dict(info.value.problems)
    assert problems["rules.1.when"] == (
        "column 1: unknown attribute 'SliceThicknes' (did you mean 'SliceThickness'?)"
    )
    assert problems["rules.2.required_series"].startswith("entry 1: column 12: unexpected end")
    assert "rules.0.when" not in problems


def test_shipped_config_rules_parse() -> None:
    settings = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    rules = RuleSet.from_settings(settings)
    assert len(rules) == len(settings.rules) >= 1


# ----------------------------------------------------------------------------- real files


def _series(paths: list[Path], **kw: str) -> Series:
    now = datetime.now(UTC)
    insts = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        insts.append(
            StoredInstance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                study_instance_uid=ds.StudyInstanceUID,
                path=p,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                size_bytes=p.stat().st_size,
                received_at=now,
            )
        )
    return Series(
        series_instance_uid=insts[0].series_instance_uid,
        study_instance_uid=insts[0].study_instance_uid,
        revision=1,
        instances=tuple(insts),
        completed_at=now,
        **kw,  # type: ignore[arg-type]
    )


def test_attributes_for_series_reads_headers_and_unions_values(tmp_path: Path) -> None:
    datasets = synthetic_series(12, rows=8, cols=8, description="AX T2 FLAIR")
    datasets[-1].ImageType = ["DERIVED", "SECONDARY", "M", "ND"]
    paths = write_series(datasets, tmp_path / "s")
    series = _series(paths, calling_ae="MODALITY1", called_ae="OMNI_BRAIN", peer_host="127.0.0.1")
    attrs = attributes_for_series(series, sample_size=4)
    assert attrs.get("Modality") == ("MR",)
    assert attrs.get("SeriesDescription") == ("AX T2 FLAIR",)
    assert attrs.get("CalledAE") == ("OMNI_BRAIN",)
    assert attrs.get("CallingAE") == ("MODALITY1",)
    assert attrs.get("SenderHost") == ("127.0.0.1",)
    assert attrs.get("InstanceCount") == ("12",)
    assert attrs.series_instance_uid == series.series_instance_uid
    image_type = attrs.get("ImageType")
    assert image_type is not None and {"ORIGINAL", "DERIVED"} <= set(image_type)
    iop = attrs.get("ImageOrientationPatient")
    assert iop is not None and len(iop) == 6  # a vector keeps its repeated numbers
    assert attrs.get("PixelData") is None

    rules = RuleSet(
        [
            _rule("brain", 'CalledAE == "OMNI_BRAIN" and SeriesDescription contains "flair"'),
            _rule("derived", 'ImageType == "DERIVED" and InstanceCount >= 12'),
        ]
    )
    assert [r.name for r in rules.evaluate(attrs).fired] == ["brain", "derived"]


def test_enhanced_mr_functional_groups_are_visible(tmp_path: Path) -> None:
    import numpy as np

    arr = np.zeros((4, 8, 8), dtype=np.float32)
    aff = np.diag([2.5, 1.0, 1.0, 1.0])[[2, 1, 0, 3]]
    aff[3, 3] = 1.0
    datasets = make_mr_series(arr, aff, enhanced=True, description="MPRAGE")
    paths = write_series(datasets, tmp_path / "e")
    attrs = attributes_for_file(paths[0])
    assert attrs.get("Modality") == ("MR",)
    st = attrs.get("SliceThickness")
    assert st is not None and float(st[0]) > 0
    assert attrs.get("InstanceCount") == ("1",)


def test_unreadable_series_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(SeriesReadError):
        attributes_for_file(bad)
    with pytest.raises(FileNotFoundError):
        attributes_for_file(tmp_path / "absent.dcm")


# ----------------------------------------------------------------------------- the docs


def _doc_yaml_blocks() -> list[object]:
    import re

    import yaml

    doc = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text(encoding="utf-8")
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)]


def test_docs_examples_are_valid() -> None:
    from dicom_node.config import parse_config

    blocks = _doc_yaml_blocks()
    assert len(blocks) == 3
    base = {
        "pipelines": {"brain": {"kind": "preview", "model": None}, "preview": {"kind": "preview"}},
        "destinations": {"pacs": {"kind": "dimse", "ae_title": "PACS", "host": "h", "port": 104}},
    }
    for block in blocks[:2]:
        assert isinstance(block, dict)
        settings = parse_config({**base, **block}, Path.cwd())
        RuleSet.from_settings(settings)
    examples = blocks[2]
    assert isinstance(examples, list) and len(examples) == 6
    conds = [parse_condition(e["when"]) for e in examples]
    thin_t1 = SeriesAttributes.from_mapping(
        {**HEADERS["T1"], "SeriesDescription": "sag 3D MPRAGE", "SliceThickness": "0.9"}
    )
    dwi = SeriesAttributes.from_mapping(
        {"Modality": "MR", "ImageType": "ORIGINAL\\PRIMARY\\DIFFUSION\\NONE"}
    )
    no_body_part = SeriesAttributes.from_mapping({"Modality": "MR"})
    assert evaluate(conds[0], thin_t1).result
    assert not evaluate(conds[0], SeriesAttributes.from_mapping(HEADERS["FLAIR_C"])).result
    assert evaluate(conds[1], SeriesAttributes.from_mapping(HEADERS["FLAIR_C"])).result
    assert evaluate(conds[4], no_body_part).result
    assert not evaluate(conds[4], SeriesAttributes.from_mapping(HEADERS["KNEE"])).result
    assert evaluate(conds[5], dwi).result
    assert evaluate(
        conds[5], SeriesAttributes.from_mapping({"SeriesDescription": "AX DWI b1000"})
    ).result
    assert not evaluate(
        conds[5], SeriesAttributes.from_mapping({"SeriesDescription": "ADCx"})
    ).result


def test_warnings_flag_unreachable_and_incomplete_rules() -> None:
    rules = RuleSet(
        [
            _rule("study-no-req", "true", trigger="study", destinations=["pacs"]),
            _rule("catch-all", "true", stop=True, destinations=["pacs"]),
            _rule("never", 'Modality == "MR"', destinations=["pacs"]),
            _rule("fb", "true", fallback=True),
        ]
    )
    assert rules.warnings() == [
        "rules.0: trigger study without required_series",
        "rules.2: never evaluated: rule 'catch-all' stops at every series",
        "rules.3: no destinations: results stay on the node",
    ]
    assert RuleSet([_rule("ok", 'Modality == "MR"', destinations=["sender"])]).warnings() == []


def test_unquoted_yaml_boolean_condition(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "pipelines:\n  p: {kind: preview, model: null}\n"
        "rules:\n  - {name: all, when: true, pipelines: [p]}\n"
        "  - {name: none, when: false, pipelines: [p]}\n",
        encoding="utf-8",
    )
    settings = load_config(cfg)
    assert [r.when for r in settings.rules] == ["true", "false"]
    decision = RuleSet(settings.rules).evaluate(SeriesAttributes.from_mapping({}))
    assert [r.name for r in decision.fired] == ["all"]
