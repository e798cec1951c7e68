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

import numpy as np
import numpy.typing as npt

from inference import results as R
from inference.omnimri.language.facts import Lesion, SeriesFacts, number_word

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


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fmt_mm(x: float) -> str:
    return str(round(x))


def _fmt_ml(x: float) -> str:
    return f"{x:.1f}" if x >= 0.1 else f"{x:.2f}"


class _Picker:
    def __init__(self, seed: str) -> None:
        h = hashlib.sha256(seed.encode()).digest()
        self.rng = random.Random(int.from_bytes(h[:8], "big"))
        self.used: list[str] = []

    def __call__(self, key: str, **kw: str) -> str:
        n = self.rng.randrange(len(ALL_TEMPLATES[key]))
        self.used.append(f"{key}:{n}")
        return _cap(ALL_TEMPLATES[key][n].format(**kw))


def _lesion_sentences(pick: _Picker, group: list[Lesion], one: str, many: str) -> list[str]:
    big = group[0]
    kw = {"where": big.where, "d": _fmt_mm(big.diameter_mm), "v": _fmt_ml(big.volume_ml),
          "n": str(len(group)), "nw": number_word(len(group))}
    out = [pick(one if len(group) == 1 else many, **kw)]
    others = sorted({x.where for x in group[1:]} - {big.where})
    if others:
        places = others[:3]
        text = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
        out.append(pick("spread", places=text))
    return out


def write_report(facts: SeriesFacts, seed: str = "") -> tuple[R.Report, list[str]]:
    """Findings and impression for ``facts``, and the ids of the sentence templates used.

    Args:
        facts: The structured findings of the series.
        seed: Chooses among the templates (same seed and facts: same text), e.g. the job id.
    """
    pick = _Picker(seed)
    masses = [x for x in facts.lesions if x.kind == "mass"]
    wmh = [x for x in facts.lesions if x.kind == "wmh"]
    findings: list[str] = []
    if not facts.lesions:
        findings.append(pick("normal"))
        findings.append(pick("grey_white"))
    if masses:
        findings += _lesion_sentences(pick, masses, "one_mass", "many_masses")
        if not wmh:
            findings.append(pick("no_wmh"))
    if wmh:
        findings += _lesion_sentences(pick, wmh, "one_wmh", "many_wmh")
    t = facts.tissue_ml
    if all(k in t for k in ("brain", "grey matter", "white matter", "csf")):
        findings.append(pick("volumes", brain=f"{t['brain']:.0f}", gm=f"{t['grey matter']:.0f}",
                             wm=f"{t['white matter']:.0f}", csf=f"{t['csf']:.0f}"))
    kind = facts.report_kind
    where = masses[0].where if masses else ""
    impression = pick(f"impression_{kind}", where=where)
    return R.Report(findings=" ".join(findings), impression=impression), pick.used


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
