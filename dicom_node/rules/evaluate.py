"""Evaluate a parsed condition against a series' attributes, keeping a trace of why.

Semantics (also in ``docs/rules.md``):

* A comparison on a *missing* attribute (absent, or present with only empty values) is false,
  never an error; the trace says ``missing``. ``not`` turns that into true.
* Multi-valued attributes match by element: ``ImageType == "DERIVED"`` is true when any element
  equals; ``!=`` and ``not in`` are true when *no* element equals.
* ``==``/``!=``/``in`` with a quoted string compare exactly (case-sensitive) after DICOM
  padding is stripped; with a number they compare numerically (``"1.50"`` equals ``1.5``).
* ``< <= > >=`` compare numerically; values that are not numbers do not satisfy them.
* ``contains`` is a case-insensitive substring test per element; ``matches`` is a regular
  expression *search* per element (anchor with ``^``/``$``), run with a time limit.
* Every operand of ``and``/``or`` is evaluated, so the trace explains all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dicom_node.rules.attributes import SeriesAttributes
from dicom_node.rules.parser import (
    And,
    Compare,
    Condition,
    Const,
    Contains,
    Has,
    InList,
    Matches,
    Node,
    Not,
    Or,
    Scalar,
)

REGEX_TIMEOUT_S = 0.05
"""Longest one regular-expression search may run, seconds; a timeout counts as no match."""


@dataclass(slots=True)
class Trace:
    """How one node of a condition evaluated, with the values it saw."""

    expression: str
    """The node's text, as written in the rule."""
    result: bool
    reason: str
    """Why the result is what it is, in words."""
    attribute: str | None = None
    """The attribute the node reads (comparisons and ``has``)."""
    values: tuple[str, ...] | None = None
    """The values it saw; ``None`` when the attribute is missing."""
    children: list[Trace] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {
            "expression": self.expression,
            "result": self.result,
            "reason": self.reason,
        }
        if self.attribute is not None:
            out["attribute"] = self.attribute
            out["values"] = None if self.values is None else list(self.values)
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out

    def lines(self, indent: str = "") -> list[str]:
        """Human-readable tree, one node per line: ``[true ] expr  (reason)``."""
        mark = "true " if self.result else "false"
        out = [f"{indent}[{mark}] {self.expression}  ({self.reason})"]
        for child in self.children:
            out.extend(child.lines(indent + "    "))
        return out


def _fmt_literal(value: Scalar) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return '"' + value.replace('"', '\\"') + '"'


def _fmt_values(values: tuple[str, ...]) -> str:
    if len(values) == 1:
        return f'"{values[0]}"'
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _equals(element: str, literal: Scalar) -> bool:
    if isinstance(literal, float):
        num = _number(element)
        return num is not None and num == literal
    return element == literal


_NUMERIC_OPS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _missing(node: Node, keyword: str) -> Trace:
    return Trace(node.source, False, f"{keyword} is missing", keyword, None)


def _compare(node: Compare, attrs: SeriesAttributes) -> Trace:
    vals = attrs.get(node.keyword)
    if vals is None:
        return _missing(node, node.keyword)
    seen = f"{node.keyword} = {_fmt_values(vals)}"
    lit = _fmt_literal(node.value)
    if node.op in ("==", "!="):
        hits = [v for v in vals if _equals(v, node.value)]
        why = f'{seen}: "{hits[0]}" equals {lit}' if hits else f"{seen}: no value equals {lit}"
        result = bool(hits) == (node.op == "==")
        return Trace(node.source, result, why, node.keyword, vals)
    assert isinstance(node.value, float)
    test = _NUMERIC_OPS[node.op]
    numbers = [(v, _number(v)) for v in vals]
    usable = [(v, n) for v, n in numbers if n is not None]
    if not usable:
        return Trace(node.source, False, f"{seen}: not a number", node.keyword, vals)
    for v, n in usable:
        if test(n, node.value):
            return Trace(node.source, True, f"{seen}: {v} {node.op} {lit}", node.keyword, vals)
    return Trace(node.source, False, f"{seen}: no value {node.op} {lit}", node.keyword, vals)


def _in_list(node: InList, attrs: SeriesAttributes) -> Trace:
    vals = attrs.get(node.keyword)
    if vals is None:
        return _missing(node, node.keyword)
    seen = f"{node.keyword} = {_fmt_values(vals)}"
    hits = [v for v in vals if any(_equals(v, lit) for lit in node.values)]
    if hits:
        return Trace(
            node.source, not node.negated, f'{seen}: "{hits[0]}" is in the list', node.keyword, vals
        )
    return Trace(node.source, node.negated, f"{seen}: no value is in the list", node.keyword, vals)


def _contains(node: Contains, attrs: SeriesAttributes) -> Trace:
    vals = attrs.get(node.keyword)
    if vals is None:
        return _missing(node, node.keyword)
    seen = f"{node.keyword} = {_fmt_values(vals)}"
    needle = node.needle.casefold()
    for v in vals:
        if needle in v.casefold():
            return Trace(
                node.source, True, f'{seen}: "{v}" contains "{node.needle}"', node.keyword, vals
            )
    return Trace(
        node.source, False, f'{seen}: no value contains "{node.needle}"', node.keyword, vals
    )


def _matches(node: Matches, attrs: SeriesAttributes) -> Trace:
    vals = attrs.get(node.keyword)
    if vals is None:
        return _missing(node, node.keyword)
    seen = f"{node.keyword} = {_fmt_values(vals)}"
    timed_out = False
    for v in vals:
        try:
            m = node.compiled.search(v, timeout=REGEX_TIMEOUT_S)
        except TimeoutError:
            timed_out = True
            continue
        if m is not None:
            return Trace(
                node.source,
                True,
                f'{seen}: "{v}" matches at "{m.group(0)}"',
                node.keyword,
                vals,
            )
    why = "regular expression timed out" if timed_out else "no value matches"
    return Trace(node.source, False, f"{seen}: {why}", node.keyword, vals)


def evaluate_node(node: Node, attrs: SeriesAttributes) -> Trace:
    """Evaluate one syntax-tree node (and all its operands) against ``attrs``."""
    if isinstance(node, Const):
        return Trace(node.source, node.value, "constant")
    if isinstance(node, Not):
        inner = evaluate_node(node.operand, attrs)
        return Trace(
            node.source,
            not inner.result,
            f"operand is {'true' if inner.result else 'false'}",
            children=[inner],
        )
    if isinstance(node, And):
        kids = [evaluate_node(c, attrs) for c in node.operands]
        false = sum(1 for k in kids if not k.result)
        reason = "all operands true" if not false else f"{false} of {len(kids)} operands false"
        return Trace(node.source, false == 0, reason, children=kids)
    if isinstance(node, Or):
        kids = [evaluate_node(c, attrs) for c in node.operands]
        true = sum(1 for k in kids if k.result)
        reason = f"{true} of {len(kids)} operands true" if true else "no operand true"
        return Trace(node.source, true > 0, reason, children=kids)
    if isinstance(node, Has):
        vals = attrs.get(node.keyword)
        if vals is None:
            return _missing(node, node.keyword)
        return Trace(node.source, True, f"{node.keyword} = {_fmt_values(vals)}", node.keyword, vals)
    if isinstance(node, Compare):
        return _compare(node, attrs)
    if isinstance(node, InList):
        return _in_list(node, attrs)
    if isinstance(node, Contains):
        return _contains(node, attrs)
    if isinstance(node, Matches):
        return _matches(node, attrs)
    raise TypeError(f"unknown condition node {type(node).__name__}")  # pragma: no cover


def evaluate(condition: Condition, attrs: SeriesAttributes) -> Trace:
    """Evaluate a parsed condition; ``trace.result`` is the answer, the rest explains it."""
    return evaluate_node(condition.root, attrs)
