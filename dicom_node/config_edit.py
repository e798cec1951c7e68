"""Rewrite the ``rules:`` section of a ``config.yaml`` text, keeping every other line as it is.

``config.yaml`` documents every setting in its comments, so writing rules from the admin
console/API must not re-serialise the file: only the lines of the ``rules:`` section change.
The file is read with ruamel.yaml's round-trip loader for the positions of the section and its
items; a rule that is unchanged (same validated :class:`~dicom_node.config.RuleConfig`) keeps
its text verbatim, comments included; a new or changed rule is written by ruamel.yaml in the
style of the shipped file (short lists in flow style, conditions single-quoted). Comment and
blank lines that close the section (they usually document the next key) are kept.

The result is checked before it is returned: parsed again, every other top-level key must be
equal to the input's and the rules must validate to the rules asked for.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import SingleQuotedScalarString

from dicom_node.config import RuleConfig

__all__ = ["ConfigEditError", "replace_rules"]

_KEY_LINE = re.compile(r"^rules:(?P<empty>\s*\[\s*\])?(?P<pad>\s+)?(?P<comment>#.*)?\s*$")
"""The key line of a block or empty rules section, with its comment (kept in its column)."""


class ConfigEditError(ValueError):
    """The configuration text cannot be edited (not YAML, not a mapping, or the check failed)."""


def _round_trip() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold a long condition
    y.indent(mapping=2, sequence=4, offset=2)  # as config.yaml: '  - name: …' under a key
    return y


def _plain(node: Any) -> Any:
    """Plain dicts and lists for ruamel's commented containers dicts and lists (for validation)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _same_rule(node: Any, rule: RuleConfig) -> bool:
    try:
        return RuleConfig.model_validate(_plain(node)) == rule
    except (ValidationError, TypeError, ValueError):
        return False


def _rule_node(rule: RuleConfig) -> CommentedMap:
    """One rule as ruamel nodes: non-default fields, name first, lists of scalars in flow style."""
    fields = {"name": rule.name} | rule.model_dump(mode="json", exclude_defaults=True)
    node = CommentedMap()
    for key, value in fields.items():
        if isinstance(value, list):
            seq = CommentedSeq(
                SingleQuotedScalarString(v) if key == "required_series" else v for v in value)
            if key != "required_series":
                seq.fa.set_flow_style()
            node[key] = seq
        elif key == "when" and isinstance(value, str):
            node[key] = SingleQuotedScalarString(value)
        else:
            node[key] = value
    return node


def _dump_item(rule: RuleConfig, dash_col: int) -> list[str]:
    buf = io.StringIO()
    _round_trip().dump([_rule_node(rule)], buf)
    pad = " " * dash_col
    return [pad + line[2:] if line.strip() else line  # ruamel puts a top-level "- " at column 2
            for line in buf.getvalue().splitlines(keepends=True)]


def _old_items(lines: list[str], old: Any, start: int, end: int) -> tuple[
        list[str], list[tuple[Any, list[str]]], int] | None:
    """Split a block sequence's lines into (header lines, [(node, item lines)], dash column).

    ``None`` when the old value is not a non-empty block sequence whose items each start
    with a ``-`` line inside ``lines[start:end]``.
    """
    if not isinstance(old, CommentedSeq) or not old or old.fa.flow_style():
        return None
    starts: list[int] = []
    dash_col = -1
    for i in range(len(old)):
        line = old.lc.item(i)[0]
        if not start < line < end or (starts and line <= starts[-1]):
            return None
        text = lines[line]
        col = len(text) - len(text.lstrip(" "))
        if not text[col:].startswith("-") or (dash_col >= 0 and col != dash_col):
            return None
        dash_col = col
        starts.append(line)
    items = [(old[i], lines[s:(starts[i + 1] if i + 1 < len(starts) else end)])
             for i, s in enumerate(starts)]
    return lines[start + 1:starts[0]], items, dash_col


def _section_end(doc: CommentedMap, lines: list[str], key_line: int) -> tuple[int, int]:
    """(end of the rules content, end of the section incl. its closing comments), line indices."""
    keys = list(doc)
    i = keys.index("rules")
    end = doc.lc.key(keys[i + 1])[0] if i + 1 < len(keys) else len(lines)
    content_end = end
    while content_end > key_line + 1 and (not lines[content_end - 1].strip()
                                          or lines[content_end - 1].lstrip().startswith("#")):
        content_end -= 1
    return content_end, end


def _check(before: str, after: str, rules: Sequence[RuleConfig]) -> None:
    try:
        old = yaml.safe_load(before) or {}
        new = yaml.safe_load(after) or {}
    except yaml.YAMLError as err:
        raise ConfigEditError(f"the rewritten configuration is not valid YAML: {err}") from None
    others_old = {k: v for k, v in old.items() if k != "rules"}
    others_new = {k: v for k, v in new.items() if k != "rules"}
    if others_old != others_new:
        raise ConfigEditError("rewriting the rules section changed other settings")
    try:
        written = [RuleConfig.model_validate(r) for r in (new.get("rules") or [])]
    except ValidationError as err:
        raise ConfigEditError(f"the rewritten rules do not validate: {err}") from None
    if written != list(rules):
        raise ConfigEditError("the rewritten rules differ from the rules asked for")


def replace_rules(text: str, rules: Sequence[RuleConfig]) -> str:
    """Return ``text`` (a ``config.yaml``) with its ``rules:`` section set to ``rules``.

    Parameters
    ----------
    text
        The configuration file's content; empty for a file that does not exist yet.
    rules
        The validated rules, in evaluation order.

    Returns
    -------
    str
        The new content: every line outside the ``rules:`` section as in ``text``, unchanged
        rules verbatim. A file without a ``rules:`` key gets the section appended.

    Raises
    ------
    ConfigEditError
        When ``text`` is not YAML or not a mapping, or the result fails its check.
    """
    try:
        doc = _round_trip().load(text) if text.strip() else CommentedMap()
    except YAMLError as err:
        raise ConfigEditError(f"the configuration is not valid YAML: {err}") from None
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, CommentedMap):
        raise ConfigEditError("the configuration is not a mapping of settings")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"

    if "rules" not in doc:
        section = ["rules:\n", *(ln for r in rules for ln in _dump_item(r, 2))] if rules \
            else ["rules: []\n"]
        out = "".join(lines + (["\n"] if lines and lines[-1].strip() else []) + section)
        _check(text, out, rules)
        return out

    key_line = doc.lc.key("rules")[0]
    content_end, end = _section_end(doc, lines, key_line)
    match = _KEY_LINE.match(lines[key_line].rstrip("\n"))
    split = (_old_items(lines, doc["rules"], key_line, content_end)
             if match and not match.group("empty") else None)
    header, olds, dash_col = split if split is not None else ([], [], 2)

    def key(text: str) -> str:  # the key line, its comment (if any) in the same column
        if not match or not match.group("comment"):
            return text + "\n"
        col = lines[key_line].index(match.group("comment"))
        return text + " " * max(1, col - len(text)) + match.group("comment") + "\n"

    if not rules:
        body = [key("rules: []")]
    else:
        body = [key("rules:"), *header]
        unused = list(olds)
        for rule in rules:
            found = next((o for o in unused if _same_rule(o[0], rule)), None)
            if found is not None:
                unused.remove(found)
                body += found[1]
            else:
                body += _dump_item(rule, dash_col)
    out = "".join(lines[:key_line] + body + lines[content_end:end] + lines[end:])
    _check(text, out, rules)
    return out
