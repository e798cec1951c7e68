"""Fuzzing the rule-condition parser (issue #17): it answers a Condition or its documented
ConditionSyntaxError for any text, and a parsed condition evaluates on any attributes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_node.rules.attributes import SeriesAttributes
from dicom_node.rules.evaluate import evaluate
from dicom_node.rules.parser import (
    MAX_CONDITION_CHARS,
    Condition,
    ConditionSyntaxError,
    parse_condition,
)

KEYWORDS = ["Modality", "SeriesDescription", "SliceThickness", "ImageType", "CalledAE",
            "CallingAE", "InstanceCount", "EchoTime", "Modaliti", "_x", "and", "NOT"]
TOKENS = KEYWORDS + ["==", "!=", "<", "<=", ">", ">=", "=", "in", "not", "and", "or",
                     "contains", "matches", "has", "true", "false", "(", ")", "[", "]", ",",
                     '"MR"', "'t1'", '"(?i)flair"', '"[unclosed"', '"(a+)+$"', "2", "-1.5e3",
                     ".5", "1e999", '"\\"', "\\", '"', "'", "\n", "\t", "\u00e9", "\x00", " "]


def _check(text: str) -> Condition | None:
    try:
        cond = parse_condition(text)
    except ConditionSyntaxError as err:
        assert err.column >= 1 and isinstance(err.reason, str) and err.reason
        err.caret()  # the caret drawing works for every reported column
        return None
    assert isinstance(cond, Condition) and cond.text == text
    return cond


_ATTRS = st.dictionaries(
    st.sampled_from(KEYWORDS[:8]),
    st.lists(st.one_of(st.text(max_size=20), st.sampled_from(["MR", "1.5", "abc", "", "-0",
                                                               "1e400", "nan", "inf"])),
             max_size=3).map(tuple),
    max_size=8)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300))
def test_any_text(text: str) -> None:
    _check(text)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=40), attrs=_ATTRS)
def test_token_soup_parses_or_fails_cleanly_and_evaluates(tokens: list[str],
                                                          attrs: dict[str, tuple[str, ...]]
                                                          ) -> None:
    cond = _check(" ".join(tokens))
    if cond is not None:
        trace = evaluate(cond, SeriesAttributes(attrs))
        assert isinstance(trace.result, bool)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(1, MAX_CONDITION_CHARS), op=st.sampled_from(["(", "not ", "( not "]))
def test_deep_nesting(depth: int, op: str) -> None:
    """Nesting up to the length limit: parsed or refused, never a RecursionError."""
    close = ")" * op.count("(")
    text = (op * depth + 'Modality == "MR"' + close * depth)[: MAX_CONDITION_CHARS + 10]
    _check(text)


def test_oversized_and_non_string() -> None:
    assert _check("true" + " " * MAX_CONDITION_CHARS) is None
    for bad in (None, 3, b"true", ["true"]):
        try:
            parse_condition(bad)  # type: ignore[arg-type]
        except ConditionSyntaxError:
            continue
        raise AssertionError(f"{bad!r} accepted")
