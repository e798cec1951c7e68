"""The attributes every derived object states about itself, filled in one place.

Every object the node writes (SEG, SR, SC, GSPS, KOS, the preview montage) is built by a
highdicom SOP class, whose base (``highdicom.base.SOPClass``) takes the same keyword set: the
series and instance UIDs (derived from the job, :mod:`export.uids`), the series number and
description, the General Equipment attributes (manufacturer, model name, software versions,
device serial number, institution), the Contributing Equipment Sequence, and the series and
content date/time. :meth:`DerivedSeries.attributes` returns that set for one instance, with the
values cut to their VR's length (:func:`export.limits.fit`); the exporters pass it on as
``**attributes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from highdicom import ContributingEquipment
from pydicom.sr.codedict import codes

from export import uids
from export.limits import fit
from inference.results import ModelInfo

NOT_FOR_DIAGNOSTIC_SHORT = "NOT FOR DIAGNOSIS"

_KIND_WORDS: dict[str, str] = {
    "seg": "SEG",
    "sr": "MEASUREMENTS",
    "sc": "KEY IMAGES",
    "pr": "ANNOTATIONS",
    "ko": "KEY OBJECTS",
}


def series_description(kind: str, model: ModelInfo) -> str:
    """Series Description of output ``kind``: ``AI <KIND> <model> <version> RESEARCH - NOT FOR...``.

    Always at most 64 characters (LO); the model part is shortened first.
    """
    head = f"AI {_KIND_WORDS[kind]}"
    tail = f"RESEARCH - {NOT_FOR_DIAGNOSTIC_SHORT}"
    room = 64 - len(head) - len(tail) - 2
    model_part = f"{model.name} {model.version}".strip()[: max(room, 0)].strip()
    return fit("SeriesDescription", " ".join(p for p in (head, model_part, tail) if p))


@dataclass(frozen=True, slots=True)
class Equipment:
    """What made the derived objects: the model (or pipeline) and the node it ran on.

    Attributes:
        manufacturer: Manufacturer of the model or software.
        model_name: Manufacturer's Model Name: the model's or pipeline's name.
        software_versions: Software Versions, e.g. ``("1.0.0", "node 0.4.0")``.
        node_name: The node's name (AE title): Device Serial Number, Station Name.
        institution_name: Institution Name, if configured.
        contribution: Contribution Description of the Contributing Equipment Sequence;
            ``None``: no such sequence.
    """

    manufacturer: str
    model_name: str
    software_versions: tuple[str, ...]
    node_name: str
    institution_name: str | None = None
    contribution: str | None = None

    def contributing_equipment(self, when: datetime) -> list[ContributingEquipment] | None:
        """The Contributing Equipment Sequence items (processing equipment), or ``None``."""
        if self.contribution is None:
            return None
        return [
            ContributingEquipment(
                manufacturer=fit("Manufacturer", self.manufacturer),
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=fit("ManufacturerModelName", self.model_name),
                software_versions=list(self.software_versions),
                device_serial_number=fit("DeviceSerialNumber", self.node_name),
                station_name=fit("StationName", self.node_name),
                institution_name=self.institution_name,
                contribution_datetime=when,
                contribution_description=fit("ContributionDescription", self.contribution),
            )
        ]


@dataclass(frozen=True, slots=True)
class DerivedSeries:
    """One derived series of a job: who made it, when, what it is called.

    Attributes:
        job_id: The job; the series and instance UIDs derive from it and ``kind``.
        kind: What the series holds (``seg``, ``sr``, ``sc``, ``pr``, ``ko``, ``preview``).
        number: Series Number.
        description: Series Description (cut to 64 characters).
        equipment: What made the objects.
        created: Series and content date/time, local time.
    """

    job_id: str
    kind: str
    number: int
    description: str
    equipment: Equipment
    created: datetime

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID (:func:`export.uids.series_uid`)."""
        return uids.series_uid(self.job_id, self.kind)

    def sop_instance_uid(self, index: int = 0) -> str:
        """SOP Instance UID of the ``index``-th (0-based) instance."""
        return uids.instance_uid(self.job_id, self.kind, index)

    def attributes(self, index: int = 0, *, content_datetime: bool = True) -> dict[str, Any]:
        """Keyword arguments of a highdicom SOP class for the ``index``-th instance (0-based).

        Args:
            index: Instance index; Instance Number is ``index + 1``.
            content_datetime: Include Content Date/Time (``False`` for IODs without them,
                e.g. the presentation state, which has Presentation Creation Date/Time).
        """
        eq = self.equipment
        when = self.created
        out: dict[str, Any] = {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.number,
            "sop_instance_uid": self.sop_instance_uid(index),
            "instance_number": index + 1,
            "series_description": fit("SeriesDescription", self.description),
            "manufacturer": fit("Manufacturer", eq.manufacturer),
            "manufacturer_model_name": fit("ManufacturerModelName", eq.model_name),
            # a list at run time (pydicom's multi-value form); typed as highdicom's hint
            "software_versions": cast("tuple[str]", list(eq.software_versions)),
            "device_serial_number": fit("DeviceSerialNumber", eq.node_name),
            "institution_name": eq.institution_name,
            "contributing_equipment": eq.contributing_equipment(when),
            "series_date": when.date(),
            "series_time": when.time(),
        }
        if content_datetime:
            out["content_date"] = when.date()
            out["content_time"] = when.time()
        return out
