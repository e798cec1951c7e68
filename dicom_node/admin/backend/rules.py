"""Routing rules in the admin API: show, validate, test and apply a draft (``/api/v1/rules``).

Applying writes only the ``rules:`` section of ``config.yaml`` (round trip through
:mod:`dicom_node.config_edit`, every comment kept) and calls the rules hooks (the router
reloads its rule set).
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dicom_node.admin.auth import Principal
from dicom_node.admin.backend.errors import AdminError
from dicom_node.admin.backend.parts import NodeParts, log
from dicom_node.admin.backend.privacy import phi_values, redact, scrub_for
from dicom_node.admin.backend.series import SeriesAdmin
from dicom_node.config import ConfigError, NodeSettings, RuleConfig, parse_config
from dicom_node.config_edit import ConfigEditError, replace_rules

RulesHook = Callable[[NodeSettings], None]
"""Called with the new settings after rules were applied (the router reloads its RuleSet)."""


@dataclass(frozen=True, slots=True)
class RulesDraft:
    """A validated draft: the rules and the settings they would produce."""

    rules: list[RuleConfig]
    settings: NodeSettings


class RulesAdmin:
    """The rules in force and drafts of new ones.

    Args:
        parts: The shared node parts (``parts.settings`` is replaced by :meth:`apply`;
            ``parts.config_path`` is the file it rewrites, ``None``: in memory only).
        series: The series resource (a draft is tested on a series' latest revision).
    """

    def __init__(self, parts: NodeParts, series: SeriesAdmin) -> None:
        self.parts = parts
        self.series = series
        self.hooks: list[RulesHook] = []

    def current(self) -> dict[str, Any]:
        """The rules in force, as a list and as YAML text (what the editor shows)."""
        settings = self.parts.settings
        rules = [r.model_dump(mode="json", exclude_defaults=True) for r in settings.rules]
        for r, full in zip(rules, settings.rules, strict=True):
            r["name"] = full.name
        return {
            "rules": rules,
            "yaml": yaml.safe_dump(rules, sort_keys=False, allow_unicode=True),
            "pipelines": sorted(settings.pipelines),
            "destinations": sorted(settings.destinations),
        }

    def parse_draft(self, draft: Any) -> RulesDraft:
        """Validate a draft rule list (a list of mappings or YAML text of one).

        Checks the schema, names, references to pipelines/destinations, and every condition's
        syntax.

        Raises:
            AdminError: 422 with one ``{"key": "rules.N.field", "reason": ...}`` per problem.
        """
        from dicom_node.rules import ConditionSyntaxError, parse_condition

        if isinstance(draft, str):
            try:
                draft = yaml.safe_load(draft) if draft.strip() else []
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise AdminError(422, f"the draft is not valid YAML{where}",
                                 [{"key": "rules", "reason": f"not valid YAML{where}"}]) from None
        if isinstance(draft, dict) and "rules" in draft:
            draft = draft["rules"]
        if draft is None:
            draft = []
        if not isinstance(draft, list):
            raise AdminError(422, "the draft must be a list of rules",
                             [{"key": "rules", "reason": "must be a list of rules"}])
        data = self.parts.settings.model_dump(mode="python")
        data["rules"] = draft
        try:
            new = parse_config(data, Path.cwd(), None)
        except ConfigError as err:
            problems = [{"key": k, "reason": why} for k, why in err.problems]
            raise AdminError(422, "the draft rules are invalid", problems) from None
        problems = []
        for i, rule in enumerate(new.rules):
            for key, text in [("when", rule.when)] + [
                    (f"required_series.{j}", c) for j, c in enumerate(rule.required_series)]:
                try:
                    parse_condition(text)
                except ConditionSyntaxError as err:
                    problems.append({"key": f"rules.{i}.{key}",
                                     "reason": f"{err}\n{err.caret()}"})
        if problems:
            raise AdminError(422, "the draft rules are invalid", problems)
        return RulesDraft(rules=list(new.rules), settings=new)

    def test(self, who: Principal, draft: Any, *, series_uid: str | None = None,
             dicom_base64: str | None = None) -> dict[str, Any]:
        """Evaluate a draft against a stored series or an uploaded DICOM file.

        Returns the explanation of ``rules explain``: ``decision`` (as ``Decision.to_dict``)
        and ``text`` (as ``Decision.to_text``). Patient data is hidden from viewers.

        Raises:
            AdminError: 422 for an invalid draft, not exactly one of the two sources, or an
                unreadable series/file; 404/409 as :meth:`SeriesAdmin.latest`.
        """
        from dicom_node.rules import (
            RuleSet,
            SeriesReadError,
            attributes_for_file,
            attributes_for_series,
        )

        parsed = self.parse_draft(draft)
        if (series_uid is None) == (dicom_base64 is None):
            raise AdminError(422, "give exactly one of series_uid or dicom_base64")
        if series_uid is not None:
            series = self.series.latest(series_uid)
            try:
                attrs = attributes_for_series(series)
            except SeriesReadError as err:
                raise AdminError(422, str(err)) from None
        else:
            try:
                raw = base64.b64decode(dicom_base64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise AdminError(422, "dicom_base64 is not valid base64") from None
            with tempfile.TemporaryDirectory(prefix="omnimri-rules-") as tmp:
                p = Path(tmp) / "upload.dcm"
                p.write_bytes(raw)
                try:
                    attrs = attributes_for_file(p)
                except SeriesReadError:
                    raise AdminError(422, "the uploaded file is not readable DICOM") from None
        decision = RuleSet(parsed.rules).evaluate(attrs)
        d = decision.to_dict()
        if series_uid is None:
            d["source"] = "uploaded file"
        text = decision.to_text()
        if not who.is_admin:
            secrets = phi_values(decision)
            d = redact(scrub_for(who, d), secrets)
            text = redact(text, secrets)
        else:
            text = text.replace(attrs.source, "uploaded file") if series_uid is None else text
        return {"decision": d, "text": text}

    def apply(self, who: Principal, draft: Any) -> dict[str, Any]:
        """Make a draft the rules in force: validate, write ``config.yaml``, call the hooks.

        The previous file is kept as ``config.yaml.bak``; only the ``rules:`` section of the file
        changes (comments elsewhere, and unchanged rules, are kept as written).

        Raises:
            AdminError: 422 for an invalid draft (audited as ``invalid``); 500 when the file
                on disk cannot be edited.
        """
        try:
            parsed = self.parse_draft(draft)
        except AdminError as err:
            self.parts.record(who, "rules_apply", "rules", status="invalid",
                              problems=len(err.problems))
            raise
        path = self.parts.config_path
        if path is not None:
            _write_rules(path, parsed.rules)
        with self.parts.lock:
            self.parts.settings = parsed.settings
        for hook in list(self.hooks):
            try:
                hook(parsed.settings)
            except Exception as err:  # a failing hook must not undo the applied rules
                log.error("rules_hook_failed", error=str(err))
        self.parts.record(who, "rules_apply", "rules", rules=[r.name for r in parsed.rules],
                          persisted=path is not None)
        return {"applied": [r.name for r in parsed.rules], "persisted": path is not None,
                "config_path": str(path) if path else None}


def _write_rules(path: Path, rules: list[RuleConfig]) -> None:
    """Write ``rules`` as the ``rules:`` section of the config file ``path``, atomically.

    Only that section's lines change (round-trip through ruamel.yaml, see
    :mod:`dicom_node.config_edit`): every comment and every other setting stays as written.
    The previous file is kept as ``<name>.bak``; the new one is written to a temporary file
    in the same folder, fsynced and renamed over the old one.

    Raises:
        AdminError: 500 when the file on disk cannot be edited (not YAML, not a mapping).
    """
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        text = replace_rules(before, rules)
    except ConfigEditError as err:
        raise AdminError(500, f"{path.name} cannot be edited: {err}") from None
    if path.exists():
        shutil.copy2(path, path.with_name(path.name + ".bak"))
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
