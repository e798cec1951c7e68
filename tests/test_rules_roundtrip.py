"""Rules applied through the admin backend change only the ``rules:`` lines of config.yaml.

Every test works on a copy of the shipped ``config.yaml`` (the file that documents every
setting in its comments) and diffs the whole file before and after.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
import yaml

from dicom_node.admin.auth import Principal
from dicom_node.admin.backend import AdminBackend, AdminError
from dicom_node.config import RuleConfig, load_config
from dicom_node.config_edit import ConfigEditError, replace_rules

SHIPPED = Path(__file__).resolve().parents[1] / "config.yaml"
ADMIN = Principal(token_id="ops", role="admin")

DRAFT = """\
- name: mr-brain
  when: 'Modality == "MR"'
  pipelines: [brain]
  destinations: [pacs]
  priority: normal
- name: ct-preview
  when: 'Modality == "CT" and SeriesDescription contains "head"'
  pipelines: [preview]
  destinations: [pacs]
  priority: low
  stop: true
"""


def _backend(tmp_path: Path) -> tuple[AdminBackend, Path]:
    path = tmp_path / "config.yaml"
    shutil.copy(SHIPPED, path)
    settings = load_config(path)
    return AdminBackend(settings, config_path=path), path


def _rules_span(lines: list[str]) -> range:
    """Line indices of the ``rules:`` section: the key line up to the next top-level key."""
    start = lines.index(next(ln for ln in lines if ln.startswith("rules:")))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i][:1].isalpha()), len(lines))
    while not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#"):
        end -= 1
    return range(start, end)


def _comment_lines(text: str) -> int:
    return sum(1 for ln in text.splitlines() if "#" in ln and ln.lstrip().startswith("#")
               or " #" in ln)


def test_apply_changes_only_the_rules_lines(tmp_path: Path) -> None:
    backend, path = _backend(tmp_path)
    before = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out = backend.rules.apply(ADMIN, DRAFT)
    assert out["persisted"] and out["applied"] == ["mr-brain", "ct-preview"]
    after = path.read_text(encoding="utf-8").splitlines(keepends=True)

    span_before, span_after = _rules_span(before), _rules_span(after)
    # Everything outside the rules section, in order, byte for byte (every comment included).
    outside_before = before[:span_before.start] + before[span_before.stop:]
    outside_after = after[:span_after.start] + after[span_after.stop:]
    assert outside_after == outside_before, "".join(
        difflib.unified_diff(outside_before, outside_after))
    # The whole-file diff touches nothing but lines inside the rules section.
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            assert span_before.start <= i1 and i2 <= span_before.stop, (tag, i1, i2)
            assert span_after.start <= j1 and j2 <= span_after.stop, (tag, j1, j2)
    # The unchanged rule kept its text, the rules: key its comment; the new rule is there.
    assert after[span_after.start] == before[span_before.start]
    assert "".join(before[span_before.start + 1:span_before.stop]) in "".join(after)
    assert _comment_lines("".join(after)) == _comment_lines("".join(before))
    # The new rules are valid and in force, and the old file is kept.
    reloaded = load_config(path)
    assert [r.name for r in reloaded.rules] == ["mr-brain", "ct-preview"]
    assert reloaded.rules[1].priority == "low" and reloaded.rules[1].stop
    assert reloaded.rules[1].when == 'Modality == "CT" and SeriesDescription contains "head"'
    raw_before, raw_after = yaml.safe_load("".join(before)), yaml.safe_load("".join(after))
    assert raw_after.pop("rules") != raw_before.pop("rules")
    assert raw_after == raw_before
    assert path.with_name("config.yaml.bak").read_text(encoding="utf-8") == "".join(before)


def test_applying_the_same_rules_leaves_the_file_identical(tmp_path: Path) -> None:
    backend, path = _backend(tmp_path)
    before = path.read_text(encoding="utf-8")
    backend.rules.apply(ADMIN, backend.rules.current()["yaml"])
    assert path.read_text(encoding="utf-8") == before


def test_removing_every_rule_keeps_the_rest(tmp_path: Path) -> None:
    backend, path = _backend(tmp_path)
    before = path.read_text(encoding="utf-8").splitlines(keepends=True)
    backend.rules.apply(ADMIN, "[]")
    after = path.read_text(encoding="utf-8").splitlines(keepends=True)
    changed = [ln for ln in difflib.ndiff(before, after) if ln[:1] in "+-"]
    span = _rules_span(before)
    key_line = before[span.start]
    comment_col = key_line.index("#")
    assert [ln for ln in changed if ln[0] == "+"] == [  # the key's comment stays in its column
        "+ " + "rules: []".ljust(comment_col) + key_line[comment_col:]]
    assert sorted(ln[2:] for ln in changed if ln[0] == "-") == sorted(before[i] for i in span)
    assert load_config(path).rules == []
    # ... and the rules come back, again without touching anything else.
    backend.rules.apply(ADMIN, DRAFT)
    assert [r.name for r in load_config(path).rules] == ["mr-brain", "ct-preview"]
    again = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert _comment_lines("".join(again)) == _comment_lines("".join(before))


def test_a_file_without_rules_gets_the_section_appended() -> None:
    text = "# my node\nnode:\n  ae_title: X   # called AE\n"
    out = replace_rules(text, [RuleConfig(name="all", pipelines=[])])
    assert out.startswith(text)
    assert yaml.safe_load(out)["rules"] == [{"name": "all"}]


def test_a_broken_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    backend, path = _backend(tmp_path)
    path.write_text("node: [unclosed\n", encoding="utf-8")
    with pytest.raises(AdminError) as err:
        backend.rules.apply(ADMIN, DRAFT)
    assert err.value.status == 500 and "not valid YAML" in str(err.value)
    assert path.read_text(encoding="utf-8") == "node: [unclosed\n"
    with pytest.raises(ConfigEditError, match="not a mapping"):
        replace_rules("- a\n- b\n", [])
