"""Parse a routing-rule condition (``when:``) into a small, typed syntax tree.

The grammar lives in ``grammar.lark`` and is parsed by lark's LALR parser; nothing is ever
evaluated as Python. Every problem an admin can make is reported as a
:class:`ConditionSyntaxError` with a 1-based column, so ``rules check`` can draw a caret under
the offending spot:

* syntax errors (``Modality = "MR"``: "use == to compare"),
* unknown attribute keywords, with the closest DICOM keyword as a suggestion,
* numeric comparisons against something that is not a number,
* regular expressions that do not compile or are too long.

This module must not import :mod:`dicom_node.config` (the config validates rules with it).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import lark
import regex
from pydicom.datadict import keyword_dict

PSEUDO_ATTRIBUTES: dict[str, str] = {
    "CallingAE": "AE title the sender called from (calling AE of the association)",
    "CalledAE": "AE title the sender called (the node's AE title or one of its aliases)",
    "SenderHost": "IP address of the sender",
    "InstanceCount": "number of instances in the series (revision)",
}
"""Attributes that are not DICOM keywords but describe how the series arrived."""

MAX_PATTERN_CHARS = 512
"""Longest regular expression accepted after ``matches``, characters."""

MAX_CONDITION_CHARS = 4096
"""Longest condition accepted, characters."""

CompareOp: TypeAlias = Literal["==", "!=", "<", "<=", ">", ">="]
Scalar: TypeAlias = str | float


class ConditionSyntaxError(ValueError):
    """A condition that cannot be used, with the 1-based ``column`` where the problem is.

    ``str(err)`` is ``"column N: reason"``, which is what the config validation reports after
    the key path (``rules.0.when: column 12: unknown attribute 'Modaliti' ...``).
    """

    def __init__(self, text: str, column: int, reason: str) -> None:
        self.text = text
        self.column = max(1, column)
        self.reason = reason
        super().__init__(f"column {self.column}: {reason}")

    def caret(self, indent: str = "    ") -> str:
        """The condition on one line and a ``^`` under the offending column."""
        line = self.text.replace("\n", " ")
        return f"{indent}{line}\n{indent}{' ' * (self.column - 1)}^"


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True, slots=True)
class Node:
    """Base of all syntax-tree nodes: where the node sits in the condition text."""

    column: int
    """1-based column of the node's first character."""
    source: str
    """The node's own text, as written."""


@dataclass(frozen=True, slots=True)
class Const(Node):
    """``true`` or ``false``."""

    value: bool


@dataclass(frozen=True, slots=True)
class And(Node):
    """All operands true."""

    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or(Node):
    """At least one operand true."""

    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not(Node):
    """Negation (``not x``): true when ``x`` is false, including when ``x`` saw a missing value."""

    operand: Node


@dataclass(frozen=True, slots=True)
class Compare(Node):
    """``Keyword OP literal`` with OP in ``== != < <= > >=``."""

    keyword: str
    op: CompareOp
    value: Scalar
    """A ``str`` (compared exactly) or a ``float`` (compared numerically)."""


@dataclass(frozen=True, slots=True)
class InList(Node):
    """``Keyword in [..]`` or ``Keyword not in [..]``."""

    keyword: str
    values: tuple[Scalar, ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class Contains(Node):
    """``Keyword contains "text"``: case-insensitive substring of any value."""

    keyword: str
    needle: str


@dataclass(frozen=True, slots=True)
class Matches(Node):
    """``Keyword matches "regex"``: :func:`regex.search` on any value."""

    keyword: str
    pattern: str
    compiled: Any = field(compare=False, repr=False)
    """The pattern, compiled once at parse time (a ``regex.Pattern``)."""


@dataclass(frozen=True, slots=True)
class Has(Node):
    """``has(Keyword)``: the attribute is present with a non-empty value."""

    keyword: str


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition: its text, its syntax tree and the attributes it reads."""

    text: str
    root: Node
    keywords: frozenset[str]


# --------------------------------------------------------------------------- parsing


@functools.cache
def _parser() -> lark.Lark:
    grammar = (Path(__file__).with_name("grammar.lark")).read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


@functools.cache
def _known_keywords() -> tuple[str, ...]:
    return tuple(sorted(set(keyword_dict) | set(PSEUDO_ATTRIBUTES)))


def is_known_attribute(keyword: str) -> bool:
    """Whether ``keyword`` is a DICOM keyword or one of :data:`PSEUDO_ATTRIBUTES`."""
    return keyword in keyword_dict or keyword in PSEUDO_ATTRIBUTES


def suggest_attribute(keyword: str) -> str | None:
    """The known attribute most like ``keyword`` (case-insensitive), or ``None``."""
    known = _known_keywords()
    lowered = {k.lower(): k for k in known}
    if keyword.lower() in lowered:
        return lowered[keyword.lower()]
    close = difflib.get_close_matches(keyword.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[close[0]] if close else None


_TERMINAL_WORDS = {
    "COMP_OP": "a comparison (==, !=, <, <=, >, >=)",
    "NAME": "an attribute keyword",
    "STRING": "a quoted string",
    "NUMBER": "a number",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "AND": "'and'",
    "OR": "'or'",
    "NOT": "'not'",
    "IN": "'in'",
    "HAS": "'has'",
    "CONTAINS": "'contains'",
    "MATCHES": "'matches'",
    "TRUE": "'true'",
    "FALSE": "'false'",
    "$END": "the end of the condition",
}

_ORDER = list(_TERMINAL_WORDS)


def _expected(names: set[str]) -> str:
    words = sorted(
        {_TERMINAL_WORDS.get(n, n) for n in names},
        key=lambda w: _ORDER.index(next((k for k, v in _TERMINAL_WORDS.items() if v == w), "$END")),
    )
    if not words:
        return "something else"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_error(text: str, err: lark.exceptions.LarkError) -> ConditionSyntaxError:
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        col = err.column if isinstance(err.column, int) and err.column > 0 else 1
        rest = text[col - 1 :]
        if rest.startswith("="):
            return ConditionSyntaxError(text, col, "use '==' to compare ('=' alone is not valid)")
        if rest.startswith("&&") or rest.startswith("&"):
            return ConditionSyntaxError(text, col, "use 'and' instead of '&&'")
        if rest.startswith("||") or rest.startswith("|"):
            return ConditionSyntaxError(text, col, "use 'or' instead of '||'")
        if rest.startswith("!"):
            return ConditionSyntaxError(text, col, "use 'not' or '!=' ('!' alone is not valid)")
        if rest[:1] in ('"', "'"):
            return ConditionSyntaxError(text, col, "unterminated string (missing closing quote)")
        return ConditionSyntaxError(text, col, f"unexpected character {rest[:1]!r}")
    if isinstance(err, lark.exceptions.UnexpectedToken):
        tok = err.token
        expected = _expected(set(err.expected))
        if tok.type == "$END":
            return ConditionSyntaxError(
                text, len(text.rstrip()) + 1, f"unexpected end of condition, expected {expected}"
            )
        col = tok.column if isinstance(tok.column, int) else 1
        return ConditionSyntaxError(text, col, f"expected {expected}, got {str(tok)!r}")
    if isinstance(err, lark.exceptions.UnexpectedEOF):
        return ConditionSyntaxError(text, len(text.rstrip()) + 1, "unexpected end of condition")
    return ConditionSyntaxError(text, 1, str(err))


def _unquote(token: str) -> str:
    quote, body = token[0], token[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] in (quote, "\\"):
            out.append(body[i + 1])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


class _Builder:
    """Turns lark's parse tree into :class:`Node` objects, checking meaning as it goes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.keywords: set[str] = set()

    def error(self, column: int | None, reason: str) -> ConditionSyntaxError:
        return ConditionSyntaxError(self.text, column or 1, reason)

    def span(self, item: lark.Tree[Any] | lark.Token) -> tuple[int, str]:
        if isinstance(item, lark.Token):
            return int(item.column or 1), str(item)
        meta = item.meta
        if getattr(meta, "empty", True):
            return 1, self.text
        return int(meta.column), self.text[meta.start_pos : meta.end_pos]

    def keyword(self, tok: lark.Token) -> str:
        name = str(tok)
        if not is_known_attribute(name):
            hint = suggest_attribute(name)
            reason = f"unknown attribute {name!r}: not a DICOM keyword nor one of " + ", ".join(
                PSEUDO_ATTRIBUTES
            )
            if hint:
                reason = f"unknown attribute {name!r} (did you mean {hint!r}?)"
            raise self.error(tok.column, reason)
        self.keywords.add(name)
        return name

    def scalar(self, tok: lark.Token, *, context: str) -> Scalar:
        if tok.type == "STRING":
            return _unquote(str(tok))
        if tok.type == "NUMBER":
            return float(str(tok))
        raise self.error(
            tok.column,
            f"{str(tok).lower()} cannot be compared with an attribute in {context}; "
            "use a quoted string or a number",
        )

    def build(self, item: lark.Tree[Any] | lark.Token) -> Node:
        column, source = self.span(item)
        if isinstance(item, lark.Token):
            if item.type in ("TRUE", "FALSE"):
                return Const(column, source, item.type == "TRUE")
            raise self.error(column, f"{str(item)!r} is not a condition")
        kind = str(item.data)
        ch: list[Any] = list(item.children)
        if kind == "const":
            return Const(column, source, ch[0].type == "TRUE")
        if kind in ("or_expr", "and_expr"):
            operands = tuple(self.build(c) for c in ch if not isinstance(c, lark.Token))
            return (Or if kind == "or_expr" else And)(column, source, operands)
        if kind == "not_":
            return Not(column, source, self.build(ch[-1]))
        if kind == "has":
            return Has(column, source, self.keyword(ch[-1]))
        if kind == "compare":
            name_tok, op_tok, value_tok = ch
            keyword = self.keyword(name_tok)
            op = str(op_tok)
            value = self.scalar(value_tok, context=f"'{op}'")
            if op in ("<", "<=", ">", ">=") and not isinstance(value, float):
                raise self.error(
                    value_tok.column,
                    f"'{op}' compares numbers; write a number without quotes, got {value_tok}",
                )
            return Compare(column, source, keyword, op, value)  # type: ignore[arg-type]
        if kind in ("in_list", "not_in_list"):
            keyword = self.keyword(ch[0])
            lst = ch[-1]
            values = tuple(
                self.scalar(v, context="a list") for v in lst.children if isinstance(v, lark.Token)
            )
            return InList(column, source, keyword, values, kind == "not_in_list")
        if kind == "contains":
            keyword = self.keyword(ch[0])
            return Contains(column, source, keyword, _unquote(str(ch[-1])))
        if kind == "matches":
            keyword = self.keyword(ch[0])
            pat_tok = ch[-1]
            pattern = _unquote(str(pat_tok))
            if len(pattern) > MAX_PATTERN_CHARS:
                raise self.error(
                    pat_tok.column,
                    f"regular expression too long ({len(pattern)} > {MAX_PATTERN_CHARS} chars)",
                )
            try:
                compiled = regex.compile(pattern, flags=regex.VERSION0)
            except regex.error as err:
                raise self.error(
                    pat_tok.column, f"invalid regular expression {pattern!r}: {err}"
                ) from None
            return Matches(column, source, keyword, pattern, compiled)
        raise self.error(column, f"unsupported expression {source!r}")  # pragma: no cover


def parse_condition(text: str) -> Condition:
    """Parse a rule condition.

    Args:
        text: The condition, e.g. ``Modality == "MR" and SliceThickness < 2``.

    Returns:
        The parsed :class:`Condition` (regular expressions already compiled).

    Raises:
        ConditionSyntaxError: With the 1-based column and the reason.
    """
    if not isinstance(text, str):
        raise ConditionSyntaxError(str(text), 1, "a condition must be a string")
    if len(text) > MAX_CONDITION_CHARS:
        raise ConditionSyntaxError(text, MAX_CONDITION_CHARS, "condition too long")
    if not text.strip():
        raise ConditionSyntaxError(text, 1, "empty condition (write true to match everything)")
    try:
        tree = _parser().parse(text)
    except lark.exceptions.LarkError as err:
        raise _syntax_error(text, err) from None
    builder = _Builder(text)
    root = builder.build(tree)
    return Condition(text=text, root=root, keywords=frozenset(builder.keywords))


def check_condition(text: str) -> str:
    """Pydantic-friendly validator: return ``text`` unchanged if it parses, else raise."""
    parse_condition(text)
    return text
