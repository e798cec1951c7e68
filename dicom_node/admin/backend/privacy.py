"""What a viewer may see: patient-identifying values removed or replaced by ``<hidden>``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dicom_node.admin.auth import Principal
from dicom_node.audit import is_phi_field

if TYPE_CHECKING:
    from dicom_node.rules import Decision

HIDDEN = "<hidden>"
"""What a viewer sees instead of a patient-identifying value."""


def scrub_for(who: Principal | None, obj: Any) -> Any:
    """Remove patient-identifying data for a viewer (admins get ``obj`` unchanged).

    Keys named like patient data are dropped; a rule trace node reading such an attribute
    keeps its result but its ``values`` become ``["<hidden>"]``.
    """
    if who is not None and who.is_admin:
        return obj
    return _scrub(obj)


def _scrub(obj: Any) -> Any:
    """:func:`scrub_for` for a viewer: a copy of ``obj`` without patient data, recursively."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        phi_attr = isinstance(obj.get("attribute"), str) and is_phi_field(obj["attribute"])
        for k, v in obj.items():
            if is_phi_field(str(k)):
                continue
            if phi_attr and k == "values" and v is not None:
                out[k] = [HIDDEN]
                continue
            out[k] = _scrub(v)
        return out
    if isinstance(obj, list | tuple):
        return [_scrub(v) for v in obj]
    return obj


def phi_values(decision: Decision) -> list[str]:
    """The values of patient attributes the rules read, longest first."""
    found = {v for k, vals in decision.attributes.values.items() if is_phi_field(k)
             for v in vals if v and len(v) >= 2}
    return sorted(found, key=len, reverse=True)


def redact(obj: Any, secrets: list[str]) -> Any:
    """Replace every occurrence of ``secrets`` in the strings of ``obj`` by ``<hidden>``."""
    if isinstance(obj, str):
        for v in secrets:
            obj = obj.replace(v, HIDDEN)
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    return obj
