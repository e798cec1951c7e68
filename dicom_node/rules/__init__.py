"""Routing rules: a small, safe condition language over DICOM attributes, and the rule set.

Public API::

    from dicom_node.rules import RuleSet, SeriesAttributes, attributes_for_series
    rules = RuleSet(settings.rules)
    decision = rules.evaluate(attributes_for_series(series))
    decision.fired, decision.discarded, decision.to_text()

See ``docs/rules.md`` for the language.
"""

from dicom_node.rules.attributes import (
    SeriesAttributes,
    SeriesReadError,
    attributes_for_file,
    attributes_for_paths,
    attributes_for_series,
)
from dicom_node.rules.engine import Decision, RuleExplanation, RuleSet, StudyCheck
from dicom_node.rules.evaluate import Trace, evaluate
from dicom_node.rules.parser import (
    PSEUDO_ATTRIBUTES,
    Condition,
    ConditionSyntaxError,
    parse_condition,
)

__all__ = [
    "PSEUDO_ATTRIBUTES",
    "Condition",
    "ConditionSyntaxError",
    "Decision",
    "RuleExplanation",
    "RuleSet",
    "SeriesAttributes",
    "SeriesReadError",
    "StudyCheck",
    "Trace",
    "attributes_for_file",
    "attributes_for_paths",
    "attributes_for_series",
    "evaluate",
    "parse_condition",
]
