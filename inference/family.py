"""Model families: how a package's raw engine outputs become :class:`~inference.results.Results`.

A package names its family in ``model.yaml`` (``extra.family``); a family owns the
post-processing that is specific to how its models are trained and what their heads mean.
Every caller (the node's pipeline, evaluation, calibration) asks :func:`family_of` for the
package's family and its :meth:`ModelFamily.results`, so there is one switch, here.

Registered families:

* ``generic`` (no ``extra.family``): only the ``model.yaml`` declarations, :class:`GenericFamily`.
* ``omnimri``: :func:`inference.omnimri.tasks.results_from_raw` (tissue maps, lesion
  detections with location and side, diagnosis, report), :class:`OmniMRIFamily`.

Add one with :func:`register_family`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import structlog

from inference import results as R

if TYPE_CHECKING:
    from inference.package import ModelPackage
    from inference.runner import RawOutputs
    from inference.volume import Volume

__all__ = ["FamilyUnavailable", "GenericFamily", "MAX_DETECTIONS", "ModelFamily",
           "OmniMRIFamily", "family_name", "family_of", "register_family"]

_log = structlog.get_logger(__name__)

MAX_DETECTIONS = 50
"""Most detections a generic package reports (largest first); the rest are dropped (logged)."""

GENERIC = "generic"
"""The family of a package without ``extra.family``."""


class FamilyUnavailable(RuntimeError):
    """The package's family post-processing cannot run here (its module failed to import)."""


@runtime_checkable
class ModelFamily(Protocol):
    """Turns one package's raw outputs into results."""

    name: str
    """The ``extra.family`` value this family serves."""

    def results(self, package: ModelPackage, raw: RawOutputs, volume: Volume,
                instructions: list[str], node_version: str = "") -> R.Results:
        """Results for ``volume`` from ``raw`` (:func:`inference.runner.run_model`).

        Raises:
            FamilyUnavailable: The family's post-processing cannot be loaded.
        """
        ...


class GenericFamily:
    """Any package, from its ``model.yaml`` declarations only.

    Every label of every segmentation output becomes a segment (numbered in order); connected
    components of ``pathological`` labels become detections (largest :data:`MAX_DETECTIONS`);
    the first classification output with a coded best class becomes the diagnosis; text
    outputs become the findings.
    """

    name = GENERIC

    def results(self, package: ModelPackage, raw: RawOutputs, volume: Volume,
                instructions: list[str], node_version: str = "") -> R.Results:
        """See :class:`ModelFamily`."""
        segments: list[R.SegmentMask] = []
        detections: list[R.Detection] = []
        number = 0
        for seg in raw.segmentation.values():
            for lab in seg.labels:
                number += 1
                label = lab.to_segment_label(number)
                segments.append(R.SegmentMask(label, seg.mask(lab.value)))
                if label.task != "pathological":
                    continue
                for comp in seg.components.get(lab.value, []):
                    detections.append(
                        R.Detection(
                            finding=label.type, segment_number=number,
                            centroid_index=comp.centroid_index,
                            centroid_lps_mm=comp.centroid_lps_mm,
                            bbox_index=comp.bbox_index, diameter_mm=comp.diameter_mm,
                            volume_ml=comp.volume_ml, probability=comp.probability,
                        )
                    )
        if len(detections) > MAX_DETECTIONS:
            _log.info("detections capped", model=package.name, found=len(detections),
                      kept=MAX_DETECTIONS)
        detections = sorted(detections, key=lambda d: -d.volume_ml)[:MAX_DETECTIONS]
        for n, det in enumerate(detections, start=1):
            det.tracking_id = f"{det.finding.meaning.lower()}-{n}"[:64]
        diagnosis = None
        for cls in raw.classification.values():
            best = cls.best
            if best.code is not None:
                diagnosis = R.Diagnosis(best.code.to_code(), float(cls.probabilities[best.name]),
                                        dict(cls.probabilities))
                break
        text = " ".join(t for t in raw.text.values() if t)
        report = R.Report(findings=text, impression="") if text else None
        return R.Results(
            model=package.model_info(node_version), segments=segments, detections=detections,
            diagnosis=diagnosis, report=report, timings_s=dict(raw.timings_s),
            instructions=list(instructions),
        )


class OmniMRIFamily:
    """The OmniMRI family: :func:`inference.omnimri.tasks.results_from_raw` (imported lazily)."""

    name = "omnimri"

    def results(self, package: ModelPackage, raw: RawOutputs, volume: Volume,
                instructions: list[str], node_version: str = "") -> R.Results:
        """See :class:`ModelFamily`."""
        try:
            from inference.omnimri.tasks import results_from_raw
        except ImportError as err:  # pragma: no cover - only without the OmniMRI tasks module
            raise FamilyUnavailable(
                f"OmniMRI task post-processing unavailable: {err}") from err
        results: R.Results = results_from_raw(package, raw, volume, instructions, node_version)
        return results


_FAMILIES: dict[str, ModelFamily] = {}
_WARNED: set[str] = set()


def register_family(family: ModelFamily) -> None:
    """Make ``family`` the one for packages whose ``extra.family`` is ``family.name``."""
    _FAMILIES[family.name] = family


register_family(GenericFamily())
register_family(OmniMRIFamily())


def family_name(package: ModelPackage) -> str:
    """The package's ``extra.family`` (``generic`` when it names none)."""
    name = package.spec.extra.get("family")
    return str(name) if name else GENERIC


def family_of(package: ModelPackage) -> ModelFamily:
    """The registered family of ``package``; an unknown name gets the generic one (logged once)."""
    name = family_name(package)
    family = _FAMILIES.get(name)
    if family is None:
        if name not in _WARNED:
            _WARNED.add(name)
            _log.warning("unknown model family", model=package.name, family=name,
                         using=GENERIC, known=sorted(_FAMILIES))
        return _FAMILIES[GENERIC]
    return family
