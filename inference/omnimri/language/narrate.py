"""Reports in natural, varied sentences, grounded on the structured findings.

The writer *realises* :class:`~inference.omnimri.language.facts.SeriesFacts` as text: it picks
one of several sentence templates for each statement (deterministically from a seed, e.g. the
job id, so the same job writes the same report) and fills them with the measured values only:
the side and lobe of each lesion, its diameter in mm and volume in ml, the lesion count, the
tissue volumes in ml, and an impression that follows the diagnosis as agreed with the
detections. It states nothing that is not in the facts, so
:func:`~inference.omnimri.language.facts.verify_text` finds no contradiction in its output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from inference import results as R
from inference.omnimri.language.facts import SeriesFacts, number_word

NORMAL_FINDINGS = (
    "No focal lesion is identified.",
    "There is no focal abnormality of the brain parenchyma.",
    "No mass or white-matter lesion is seen.",
    "The brain parenchyma shows no focal lesion.",
)
GREY_WHITE = (
    "Grey-white matter differentiation is preserved.",
    "The grey and white matter appear unremarkable.",
    "Grey and white matter are of normal appearance.",
)
VOLUMES = (
    "Segmented volumes: brain {brain} ml, grey matter {gm} ml, white matter {wm} ml and "
    "CSF {csf} ml.",
    "The brain measures {brain} ml (grey matter {gm} ml, white matter {wm} ml); CSF "
    "{csf} ml.",
    "Tissue volumes are {gm} ml of grey matter, {wm} ml of white matter and {csf} ml of CSF, "
    "for a brain volume of {brain} ml.",
)
ONE_MASS = (
    "A mass is seen in the {where}, measuring {d} mm ({v} ml).",
    "There is a {d} mm mass in the {where}.",
    "A space-occupying lesion of {d} mm is present in the {where}.",
    "In the {where} there is a mass measuring {d} mm in maximal diameter.",
)
MANY_MASSES = (
    "{nw} masses are seen; the largest lies in the {where} and measures {d} mm.",
    "There are {n} masses, the largest {d} mm in the {where}.",
    "{nw} space-occupying lesions are present, the largest in the {where} ({d} mm).",
)
ONE_WMH = (
    "A single white-matter hyperintensity is seen in the {where}, measuring {d} mm.",
    "There is one white-matter lesion in the {where} of {d} mm.",
    "A solitary {d} mm white-matter lesion lies in the {where}.",
)
MANY_WMH = (
    "{nw} white-matter hyperintensities are present, the largest in the {where} ({d} mm).",
    "There are {n} white-matter lesions; the largest, in the {where}, measures {d} mm.",
    "Multiple white-matter lesions ({n}) are seen, the largest {d} mm in the {where}.",
)
SPREAD = (
    "Lesions are also seen in the {places}.",
    "Further lesions involve the {places}.",
    "Other lesions lie in the {places}.",
)
NO_WMH_WITH_MASS = (
    "No white-matter hyperintensity is seen.",
    "There is no white-matter lesion.",
)
IMPRESSION = {
    "normal": (
        "Normal MRI of the brain.",
        "No intracranial abnormality is detected.",
        "Unremarkable study.",
    ),
    "small_vessel": (
        "Findings are in keeping with cerebral small-vessel disease.",
        "White-matter changes compatible with small-vessel disease.",
        "Appearances suggest small-vessel ischaemic change.",
    ),
    "mass": (
        "Intracranial mass in the {where}; further evaluation with contrast-enhanced MRI is "
        "recommended.",
        "Space-occupying lesion of the {where}. Further characterisation is recommended.",
        "Mass in the {where}, for further assessment.",
    ),
}
ALL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "normal": NORMAL_FINDINGS, "grey_white": GREY_WHITE, "volumes": VOLUMES,
    "one_mass": ONE_MASS, "many_masses": MANY_MASSES, "one_wmh": ONE_WMH, "many_wmh": MANY_WMH,
    "spread": SPREAD, "no_wmh": NO_WMH_WITH_MASS,
    **{f"impression_{k}": v for k, v in IMPRESSION.items()},
}
"""Every sentence template, by statement (the variety measure counts distinct ones used)."""


def _fmt_mm(x: float) -> str:
    return str(round(x))


def _fmt_ml(x: float) -> str:
    return f"{x:.1f}" if x >= 0.1 else f"{x:.2f}"


class _Picker:
    def __init__(self, seed: str) -> None:
        h = hashlib.sha256(seed.encode()).digest()
        self.rng = random.Random(int.from_bytes(h[:8], "big"))

    def __call__(self, key: str) -> int:
        return self.rng.randrange(len(ALL_TEMPLATES[key]))


Statement = tuple[str, str]
"""One sentence of a report plan: ``(template key, group)``; the group (``mass``, ``wmh`` or
``""``) says whose values the sentence's slots take (:func:`slot_values`)."""


def slot_values(facts: SeriesFacts) -> dict[str, str]:
    """The measured values a report may state, by slot name.

    ``where_mass``, ``d_mass`` (mm), ``v_mass`` (ml), ``n_mass``, ``nw_mass``, ``places_mass``
    and the same for ``wmh`` (for each kind that was detected; ``places`` only when other
    lesions lie elsewhere); ``brain``, ``gm``, ``wm``, ``csf`` (ml) when all four tissue
    volumes were measured.
    """
    out: dict[str, str] = {}
    for kind in ("mass", "wmh"):
        group = [x for x in facts.lesions if x.kind == kind]
        if not group:
            continue
        big = group[0]
        out |= {f"where_{kind}": big.where, f"d_{kind}": _fmt_mm(big.diameter_mm),
                f"v_{kind}": _fmt_ml(big.volume_ml), f"n_{kind}": str(len(group)),
                f"nw_{kind}": number_word(len(group))}
        others = sorted({x.where for x in group[1:]} - {big.where})[:3]
        if others:
            out[f"places_{kind}"] = (others[0] if len(others) == 1
                                     else ", ".join(others[:-1]) + " and " + others[-1])
    t = facts.tissue_ml
    if all(k in t for k in ("brain", "grey matter", "white matter", "csf")):
        out |= {"brain": f"{t['brain']:.0f}", "gm": f"{t['grey matter']:.0f}",
                "wm": f"{t['white matter']:.0f}", "csf": f"{t['csf']:.0f}"}
    return out


def report_plan(facts: SeriesFacts) -> tuple[list[Statement], Statement]:
    """The statements of the report of ``facts``: findings sentences and the impression.

    A normal study says so, and describes grey and white matter only when the tissues were
    segmented (:attr:`SeriesFacts.tissues_measured`); lesions by kind (the largest, the count,
    other places); the tissue volumes when measured; the impression follows
    :attr:`SeriesFacts.report_kind`.
    """
    values = slot_values(facts)
    masses = any(x.kind == "mass" for x in facts.lesions)
    wmh = [x for x in facts.lesions if x.kind == "wmh"]
    findings: list[Statement] = []
    if not facts.lesions:
        findings.append(("normal", ""))
        if facts.tissues_measured:
            findings.append(("grey_white", ""))
    for kind, one, many in (("mass", "one_mass", "many_masses"), ("wmh", "one_wmh", "many_wmh")):
        if f"n_{kind}" not in values:
            continue
        findings.append((one if values[f"n_{kind}"] == "1" else many, kind))
        if f"places_{kind}" in values:
            findings.append(("spread", kind))
        if kind == "mass" and not wmh:
            findings.append(("no_wmh", ""))
    if "brain" in values:
        findings.append(("volumes", ""))
    kind = facts.report_kind
    return findings, (f"impression_{kind}", "mass" if kind == "mass" and masses else "")


def slotted(template: str, group: str) -> str:
    """``template`` with its slots named for ``group`` (``{where}`` -> ``{where_mass}``)."""
    if not group:
        return template
    return re.sub(r"\{(where|d|v|n|nw|places)\}", rf"{{\1_{group}}}", template)


SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")


def capitalise(text: str) -> str:
    """Each sentence of ``text`` starting with a capital."""
    return SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def fill(template_text: str, values: dict[str, str]) -> str:
    """Delexicalised text (slots ``{d_mass}``...) with the measured values, capitalised.

    Raises:
        KeyError: A slot the findings have no value for.
    """
    return capitalise(re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template_text))


def delexicalised_report(facts: SeriesFacts, choose: Callable[[str], int]
                         ) -> tuple[str, str, list[str]]:
    """Findings and impression of ``facts`` with slots instead of values, and template ids.

    ``choose(key)`` picks the template of each statement (an index into
    :data:`ALL_TEMPLATES` ``[key]``).
    """
    findings, impression = report_plan(facts)
    used: list[str] = []
    out: list[str] = []
    for key, group in [*findings, impression]:
        n = choose(key)
        used.append(f"{key}:{n}")
        out.append(slotted(ALL_TEMPLATES[key][n], group))
    return " ".join(out[:-1]), out[-1], used


def styled_choice(style: int) -> Callable[[str], int]:
    """The template choice of one style: index ``style % len(templates)`` of every statement.

    Twelve styles cover every pair of a 3- and a 4-template choice (the report decoder is
    trained on these and told the style: :mod:`inference.omnimri.language.decoder`).
    """
    return lambda key: style % len(ALL_TEMPLATES[key])


def write_report(facts: SeriesFacts, seed: str = "") -> tuple[R.Report, list[str]]:
    """Findings and impression for ``facts``, and the ids of the sentence templates used.

    Args:
        facts: The structured findings of the series.
        seed: Chooses among the templates (same seed and facts: same text), e.g. the job id.
    """
    pick = _Picker(seed)
    findings, impression, used = delexicalised_report(facts, pick)
    values = slot_values(facts)
    return R.Report(findings=fill(findings, values), impression=fill(impression, values)), used


def vocabulary_text() -> list[str]:
    """Every template with example values (part of the tokenizer's corpus)."""
    kw = {"where": "left frontal lobe", "d": "12", "v": "1.5", "n": "3", "nw": "three", "places":
          "right parietal lobe", "brain": "1200", "gm": "600", "wm": "450", "csf": "250"}
    return [t.format(**kw) for ts in ALL_TEMPLATES.values() for t in ts]


def narrate_results(res: R.Results, detections: list[R.Detection],
                    affine: npt.NDArray[np.float64]) -> R.Report:
    """The report of model results (:data:`inference.omnimri.tasks.Narrator`).

    ``detections`` are all lesion detections (also when the pipeline does not export them);
    ``affine`` (source grid, mm) gives the tissue volumes. The template choice is seeded by
    the findings themselves, so a series gets the same report each time it is run.
    """
    facts = SeriesFacts.from_results(dataclasses.replace(res, detections=list(detections)),
                                     affine)
    seed = json.dumps(facts.to_dict(), sort_keys=True, default=str)
    return write_report(facts, seed=seed)[0]
