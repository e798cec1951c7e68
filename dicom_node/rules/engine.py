"""The rule set: which rules fire for a series, in order, and why.

Evaluation of one series (:meth:`RuleSet.evaluate`):

1. Rules are taken in file order. A disabled rule is skipped (its condition is still evaluated
   so ``rules explain`` can say whether it would have matched).
2. A rule whose condition is true *matches*. A matching ``route`` rule fires; a matching
   ``discard`` rule marks the series discarded and stops evaluation (rules before it that fired
   stay fired, so put discard rules first). A firing rule with ``stop: true`` stops evaluation.
3. ``fallback`` rules are considered only after all others, and only when no other enabled
   rule matched and nothing was discarded; among them the same order/stop/discard logic holds.

Rules with ``trigger: study`` fire like the others when their ``when`` matches the series (the
series belongs to a study the rule is interested in); the router then asks
:meth:`RuleSet.study_ready` with every series of the study whether each ``required_series``
condition is matched by some series, and waits (up to ``study_timeout_s``) while some are missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_node.config import NodeSettings, RuleConfig
from dicom_node.rules.attributes import SeriesAttributes
from dicom_node.rules.evaluate import Trace, evaluate
from dicom_node.rules.parser import Condition, Const, parse_condition


@dataclass(slots=True)
class RuleExplanation:
    """What happened to one rule for one series."""

    index: int
    """Position in ``rules`` (0-based, as in the key path ``rules.N``)."""
    rule: RuleConfig
    matched: bool
    """The condition was true (whether or not the rule fired)."""
    fired: bool
    """The rule took effect (route: jobs will be made; discard: the series was dropped)."""
    skipped: str | None = None
    """Why the rule was not considered (disabled, stopped, fallback not needed), else ``None``."""
    trace: Trace | None = None

    @property
    def name(self) -> str:
        """The rule's name."""
        return self.rule.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "index": self.index,
            "name": self.rule.name,
            "action": self.rule.action,
            "trigger": self.rule.trigger,
            "fallback": self.rule.fallback,
            "enabled": self.rule.enabled,
            "when": self.rule.when,
            "matched": self.matched,
            "fired": self.fired,
            "skipped": self.skipped,
            "pipelines": list(self.rule.pipelines),
            "destinations": list(self.rule.destinations),
            "priority": self.rule.priority,
            "trace": None if self.trace is None else self.trace.to_dict(),
        }

    def lines(self) -> list[str]:
        """Human-readable lines: a header and the condition trace."""
        r = self.rule
        if self.fired and r.action == "discard":
            status = "DISCARDED the series"
        elif self.fired:
            target = f"pipelines {', '.join(r.pipelines) or '-'}"
            target += f" -> {', '.join(r.destinations) or '(no destination)'}"
            status = f"FIRED: {target}, priority {r.priority}"
            if r.trigger == "study":
                status += f", trigger study (waits for {len(r.required_series)} required series)"
        elif self.skipped:
            status = f"skipped: {self.skipped}"
            status += " (condition true)" if self.matched else " (condition false)"
        else:
            status = "no match"
        flags = [f for f, on in (("fallback", r.fallback), ("stop", r.stop)) if on]
        head = f"rule {self.index} {r.name!r}" + (f" [{', '.join(flags)}]" if flags else "")
        out = [f"{head}: {status}"]
        if self.trace is not None:
            out.extend(self.trace.lines("    "))
        return out


@dataclass(slots=True)
class Decision:
    """The outcome of evaluating every rule for one series."""

    attributes: SeriesAttributes
    fired: list[RuleConfig] = field(default_factory=list)
    """``route`` rules that fired, in rule order (check ``rule.trigger`` for study rules)."""
    discarded: bool = False
    """A ``discard`` rule matched: make no (further) jobs for this series."""
    explanations: list[RuleExplanation] = field(default_factory=list)

    @property
    def series_rules(self) -> list[RuleConfig]:
        """Fired rules with ``trigger: series`` (enqueue now)."""
        return [r for r in self.fired if r.trigger == "series"]

    @property
    def study_rules(self) -> list[RuleConfig]:
        """Fired rules with ``trigger: study`` (enqueue once :meth:`RuleSet.study_ready`)."""
        return [r for r in self.fired if r.trigger == "study"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``rules explain --json`` and the admin API)."""
        return {
            "series_instance_uid": self.attributes.series_instance_uid,
            "study_instance_uid": self.attributes.study_instance_uid,
            "source": self.attributes.source,
            "fired": [r.name for r in self.fired],
            "discarded": self.discarded,
            "rules": [e.to_dict() for e in self.explanations],
        }

    def to_text(self) -> str:
        """Human-readable explanation (for ``rules explain``)."""
        a = self.attributes
        head = f"series {a.series_instance_uid or '?'}"
        if a.source and a.source != a.series_instance_uid:
            head += f" ({a.source})"
        if self.discarded:
            verdict = "discarded"
        elif self.fired:
            verdict = "fired: " + ", ".join(r.name for r in self.fired)
        else:
            verdict = "no rule fired"
        out = [head, f"result: {verdict}", ""]
        for e in self.explanations:
            out.extend(e.lines())
        return "\n".join(out)


@dataclass(slots=True)
class StudyCheck:
    """Whether a study holds every series a ``trigger: study`` rule requires."""

    rule: RuleConfig
    ready: bool
    when_matched: bool
    """Some series of the study matched the rule's own ``when``."""
    matched: dict[str, list[str]] = field(default_factory=dict)
    """Required-series condition → Series Instance UIDs that match it."""
    missing: list[str] = field(default_factory=list)
    """Required-series conditions no series of the study matches yet."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "rule": self.rule.name,
            "ready": self.ready,
            "when_matched": self.when_matched,
            "matched": {k: list(v) for k, v in self.matched.items()},
            "missing": list(self.missing),
        }


class RuleSet:
    """Parsed, ordered rules; immutable once built (build a new one on config reload)."""

    def __init__(self, rules: Sequence[RuleConfig]) -> None:
        """Parse every rule's condition and required-series conditions.

        Raises:
            dicom_node.rules.parser.ConditionSyntaxError: When a condition does not parse
                (a validated :class:`NodeSettings` never has one).
        """
        self.rules: tuple[RuleConfig, ...] = tuple(rules)
        self._when: tuple[Condition, ...] = tuple(parse_condition(r.when) for r in self.rules)
        self._required: tuple[tuple[Condition, ...], ...] = tuple(
            tuple(parse_condition(c) for c in r.required_series) for r in self.rules
        )

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> RuleSet:
        """The rule set of a loaded configuration."""
        return cls(settings.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def condition(self, index: int) -> Condition:
        """The parsed ``when`` of rule ``index``."""
        return self._when[index]

    def warnings(self) -> list[str]:
        """Likely mistakes that are still valid configuration, as ``rules.N: message`` lines.

        Flags rules that can never be reached (after an always-true ``stop``/``discard`` rule),
        study-trigger rules without required series, and route rules without destinations.
        """
        out: list[str] = []
        blocker: str | None = None
        for i, (r, cond) in enumerate(zip(self.rules, self._when, strict=True)):
            if not r.enabled:
                continue
            always = isinstance(cond.root, Const) and cond.root.value
            if blocker is not None and not r.fallback:
                out.append(f"rules.{i}: never evaluated: {blocker}")
            if r.trigger == "study" and not r.required_series:
                out.append(f"rules.{i}: trigger study without required_series")
            if r.action == "route" and not r.destinations:
                out.append(f"rules.{i}: no destinations: results stay on the node")
            if always and not r.fallback and (r.stop or r.action == "discard") and not blocker:
                what = "discards" if r.action == "discard" else "stops at"
                blocker = f"rule {r.name!r} {what} every series"
        return out

    def evaluate(self, attrs: SeriesAttributes) -> Decision:
        """Decide which rules fire for a series, with an explanation for every rule."""
        decision = Decision(attributes=attrs)
        expl: dict[int, RuleExplanation] = {}
        halted: str | None = None
        matched_any = False

        def run(indices: list[int], fallback_pass: bool) -> None:
            nonlocal halted, matched_any
            for i in indices:
                rule = self.rules[i]
                trace = evaluate(self._when[i], attrs)
                e = RuleExplanation(i, rule, trace.result, False, None, trace)
                expl[i] = e
                if not rule.enabled:
                    e.skipped = "disabled"
                    continue
                if halted is not None:
                    e.skipped = halted
                    continue
                if fallback_pass and matched_any:
                    e.skipped = "fallback: another rule matched"
                    continue
                if not trace.result:
                    continue
                if not fallback_pass:
                    matched_any = True
                e.fired = True
                if rule.action == "discard":
                    decision.discarded = True
                    halted = f"rule {rule.name!r} discarded the series"
                    continue
                decision.fired.append(rule)
                if rule.stop:
                    halted = f"rule {rule.name!r} stopped evaluation"

        order = range(len(self.rules))
        run([i for i in order if not self.rules[i].fallback], False)
        run([i for i in order if self.rules[i].fallback], True)
        decision.explanations = [expl[i] for i in order]
        return decision

    def study_ready(
        self, rule: RuleConfig | str, series_attrs_of_study: Sequence[SeriesAttributes]
    ) -> StudyCheck:
        """Whether a study holds a series for each of ``rule``'s ``required_series``.

        Args:
            rule: The rule (or its name); it should have ``trigger: study``.
            series_attrs_of_study: Attributes of every complete series of the study so far.

        Returns:
            A :class:`StudyCheck`; ``ready`` is true when some series matches the rule's
            ``when`` and every required-series condition is matched by some series.

        Raises:
            KeyError: When no rule of that name is in the set.
        """
        index = self._index(rule)
        r = self.rules[index]
        when_matched = any(evaluate(self._when[index], a).result for a in series_attrs_of_study)
        matched: dict[str, list[str]] = {}
        missing: list[str] = []
        for text, cond in zip(r.required_series, self._required[index], strict=True):
            uids = [
                a.series_instance_uid or a.source
                for a in series_attrs_of_study
                if evaluate(cond, a).result
            ]
            matched[text] = uids
            if not uids:
                missing.append(text)
        return StudyCheck(
            rule=r,
            ready=when_matched and not missing,
            when_matched=when_matched,
            matched=matched,
            missing=missing,
        )

    def _index(self, rule: RuleConfig | str) -> int:
        name = rule if isinstance(rule, str) else rule.name
        for i, r in enumerate(self.rules):
            if r.name == name:
                return i
        raise KeyError(f"no rule named {name!r}")
