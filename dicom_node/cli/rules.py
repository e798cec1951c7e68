"""``omnimri-node rules check|explain``: validate the routing rules and explain a decision.

``rules check`` loads the configuration like the node does and, for a condition that does not
parse, prints its key path (``rules.0.when``), the reason, and the condition with a caret under
the offending column. Exit code 0 when valid, 2 when not.

``rules explain PATH|SERIES_UID`` reads a DICOM file, a folder holding one series, or a stored
series (by Series Instance UID, from the node's index) and prints which rules fired and, for every
condition, the values it saw and why it was true or false.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from dicom_node.cli.common import EXIT_CONFIG, ConfigOption, JsonOption, load_or_exit
from dicom_node.config import DEFAULT_CONFIG_PATH, ConfigError, NodeSettings, load_config
from dicom_node.rules import (
    ConditionSyntaxError,
    RuleSet,
    SeriesAttributes,
    SeriesReadError,
    attributes_for_file,
    attributes_for_series,
    parse_condition,
)

EXIT_NOT_FOUND = 1
"""Exit code when the file or series to explain does not exist or cannot be read."""

_RULE_KEY = re.compile(r"^rules\.(\d+)\.(when|required_series)$")
_ENTRY = re.compile(r"^entry (\d+): ")


def _raw_rules(path: Path) -> list[Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    rules = raw.get("rules") if isinstance(raw, dict) else None
    return rules if isinstance(rules, list) else []


def _caret_for(problem: tuple[str, str], raw_rules: list[Any]) -> str | None:
    """The condition with a caret for a ``rules.N.when`` / ``required_series`` problem."""
    key, reason = problem
    m = _RULE_KEY.match(key)
    if not m:
        return None
    index, field = int(m.group(1)), m.group(2)
    if index >= len(raw_rules) or not isinstance(raw_rules[index], dict):
        return None
    value = raw_rules[index].get(field)
    if field == "required_series":
        e = _ENTRY.match(reason)
        if not e or not isinstance(value, list) or int(e.group(1)) >= len(value):
            return None
        value = value[int(e.group(1))]
    if not isinstance(value, str):
        return None
    try:
        parse_condition(value)
    except ConditionSyntaxError as err:
        return err.caret()
    return None


def check_rules(path: Path) -> tuple[NodeSettings | None, list[str]]:
    """Validate the configuration at ``path``; return the settings and the problem lines.

    Each problem is ``key.path: reason``, followed by the condition and a caret line when the
    problem is a condition that does not parse.
    """
    try:
        settings = load_config(path if path != DEFAULT_CONFIG_PATH or path.exists() else None)
    except ConfigError as err:
        raw_rules = _raw_rules(path)
        lines = [f"{err.path or path}: invalid configuration"]
        for problem in err.problems:
            lines.append(f"  {problem[0]}: {problem[1]}")
            caret = _caret_for(problem, raw_rules)
            if caret:
                lines.append(caret)
        return None, lines
    return settings, []


def _describe(settings: NodeSettings) -> list[str]:
    out = []
    for i, r in enumerate(settings.rules):
        flags = [f for f, on in (("fallback", r.fallback), ("stop", r.stop)) if on]
        if not r.enabled:
            flags.append("disabled")
        if r.trigger == "study":
            flags.append(f"study trigger, {len(r.required_series)} required series")
        what = (
            "discard"
            if r.action == "discard"
            else f"-> {', '.join(r.pipelines)} -> {', '.join(r.destinations) or '(none)'}"
        )
        extra = f" [{', '.join(flags)}]" if flags else ""
        out.append(f"  {i}. {r.name}{extra}: when {r.when}  {what}  ({r.priority})")
    return out


def _attributes_for_uid(
    settings: NodeSettings, uid: str, revision: int | None
) -> tuple[SeriesAttributes, list[SeriesAttributes]]:
    """Attributes of a stored series and of the other complete series of its study."""
    from dicom_node.index import SeriesIndex  # the index is only needed for this form

    db = settings.storage.database_path
    if isinstance(db, Path) and not db.exists():  # a PostgreSQL URL: SeriesIndex says
        raise LookupError(f"no node database at {db}")
    index = SeriesIndex(db)
    try:
        info = index.get_series(uid)
        if info is None:
            raise LookupError(f"no series {uid} in {db}")
        revisions = [int(e["revision"]) for e in info.get("events", [])]
        if revision is None:
            if not revisions:
                raise LookupError(f"series {uid} has no complete revision yet")
            revision = max(revisions)
        try:
            series = index.load_series(uid, revision)
        except KeyError as err:
            raise LookupError(str(err.args[0]) if err.args else str(err)) from None
        attrs = attributes_for_series(series)
        study = [
            attributes_for_series(s)
            for s in index.series_in_study(series.study_instance_uid)
            if s.series_instance_uid != uid
        ]
        return attrs, [attrs, *study]
    finally:
        index.close()


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    group = typer.Typer(
        help="Routing rules: validate them, explain which fire for a series.",
        no_args_is_help=True,
    )
    app.add_typer(group, name="rules")

    @group.command("check")
    def check(config: ConfigOption = DEFAULT_CONFIG_PATH, as_json: JsonOption = False) -> None:
        """Validate the configuration and every rule condition (exit 2 when invalid)."""
        settings, problems = check_rules(config)
        if settings is None:
            if as_json:
                json.dump({"valid": False, "problems": problems}, sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                typer.echo("\n".join(problems), err=True)
            raise typer.Exit(EXIT_CONFIG)
        if as_json:
            json.dump(
                {
                    "valid": True,
                    "rules": [r.model_dump(mode="json") for r in settings.rules],
                    "warnings": RuleSet(settings.rules).warnings(),
                },
                sys.stdout,
                indent=2,
            )
            sys.stdout.write("\n")
            return
        typer.echo(f"{config}: valid, {len(settings.rules)} rule(s)")
        for line in _describe(settings):
            typer.echo(line)
        for warning in RuleSet(settings.rules).warnings():
            typer.echo(f"warning: {warning}")

    @group.command("explain")
    def explain(
        target: Annotated[
            str,
            typer.Argument(
                help="A DICOM file, a folder holding one series, or a stored Series Instance UID."
            ),
        ],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        as_json: JsonOption = False,
        revision: Annotated[
            int | None,
            typer.Option(help="Revision of a stored series; default the latest complete one."),
        ] = None,
        calling_ae: Annotated[
            str, typer.Option("--calling-ae", help="Pretend this calling AE title (PATH form).")
        ] = "",
        called_ae: Annotated[
            str, typer.Option("--called-ae", help="Pretend this called AE title (PATH form).")
        ] = "",
        sender_host: Annotated[
            str, typer.Option("--sender-host", help="Pretend this sender address (PATH form).")
        ] = "",
    ) -> None:
        """Show which rules fire for a series and why each condition is true or false."""
        settings = load_or_exit(config)
        rules = RuleSet(settings.rules)
        study: list[SeriesAttributes] = []
        path = Path(target)
        try:
            if path.exists():
                attrs = attributes_for_file(
                    path, calling_ae=calling_ae, called_ae=called_ae, sender_host=sender_host
                )
                study = [attrs]
            else:
                attrs, study = _attributes_for_uid(settings, target, revision)
        except (LookupError, SeriesReadError, OSError) as err:
            typer.echo(f"cannot explain {target}: {err}", err=True)
            raise typer.Exit(EXIT_NOT_FOUND) from None
        decision = rules.evaluate(attrs)
        checks = [rules.study_ready(r, study) for r in decision.study_rules]
        if as_json:
            out = decision.to_dict()
            out["study_checks"] = [c.to_dict() for c in checks]
            json.dump(out, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        typer.echo(decision.to_text())
        for c in checks:
            state = "ready" if c.ready else "waiting"
            typer.echo(f"study trigger {c.rule.name!r}: {state}")
            for cond, uids in c.matched.items():
                typer.echo(f"    {'found  ' if uids else 'missing'} {cond}  {', '.join(uids)}")
