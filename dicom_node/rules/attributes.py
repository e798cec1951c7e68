r"""The attributes a rule condition sees: DICOM header values of a series plus how it arrived.

Values are read with ``pydicom.dcmread(stop_before_pixels=True)`` from a sample of the series'
stored instances (the first, the last and evenly spaced ones in between, at most
:data:`DEFAULT_SAMPLE_SIZE`) and united per keyword, so an attribute that varies across the
series (``ImageType`` of mixed instances, ``EchoTime`` of a multi-echo series) offers every value
seen. Every value is a string, as DICOM writes it, with its padding (spaces, NUL) stripped;
multi-valued attributes (``ORIGINAL\\PRIMARY\\M\\ND``) are split into their elements.

Enhanced (multi-frame) MR keeps many attributes in functional groups (``SliceThickness`` in the
Pixel Measures sequence, ``EchoTime`` in MR Echo); values found in the shared functional groups
and in the first frame's groups are offered under their keyword when the top level lacks them.

Pseudo-attributes that are not in the header: ``CallingAE``, ``CalledAE``, ``SenderHost``
and ``InstanceCount`` (see :data:`dicom_node.rules.parser.PSEUDO_ATTRIBUTES`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from dicom_node.logs import get_logger
from dicom_node.series import Series

log = get_logger(__name__)

DEFAULT_SAMPLE_SIZE = 5
"""Instances whose headers are read per series (first, last, evenly spaced between)."""

_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_PAD = " \x00"
_MAX_VALUE_CHARS = 1024
"""Longer values (long text) are cut to this many characters, so no rule reads a megabyte."""


class SeriesReadError(ValueError):
    """None of the sampled instances of a series could be read as DICOM."""


@dataclass(frozen=True, slots=True)
class SeriesAttributes:
    """What the rules see of one series: keyword → the values seen (strings, padding stripped).

    A keyword absent from :attr:`values`, or present with only empty values, is *missing*.
    """

    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Keyword → values in the order first seen (duplicates removed)."""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    source: str = ""
    """Where the values came from (a series key or a file path), for explanations."""

    def get(self, keyword: str) -> tuple[str, ...] | None:
        """The non-empty values of ``keyword``, or ``None`` when it is missing or empty."""
        vals = self.values.get(keyword)
        if not vals:
            return None
        kept = tuple(v for v in vals if v != "")
        return kept or None

    def has(self, keyword: str) -> bool:
        """Whether ``keyword`` is present with at least one non-empty value."""
        return self.get(keyword) is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (only keywords listed; values as lists)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "source": self.source,
            "values": {k: list(v) for k, v in self.values.items()},
        }

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        *,
        series_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        source: str = "",
    ) -> SeriesAttributes:
        r"""Build from plain values: ``{"Modality": "MR", "ImageType": ["ORIGINAL", "M"]}``.

        A string containing ``\\`` is split into elements as DICOM does; numbers become
        strings; ``None`` means missing. Useful for the admin API and for tests.
        """
        out: dict[str, list[str]] = {}
        for key, value in values.items():
            _add(out, key, _strings(value))
        series_uid = series_instance_uid or _first(out.get("SeriesInstanceUID"))
        study_uid = study_instance_uid or _first(out.get("StudyInstanceUID"))
        return cls(
            {k: tuple(v) for k, v in out.items()},
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            source=source,
        )


def _first(vals: Sequence[str] | None) -> str:
    return vals[0] if vals else ""


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes):
        return []
    if isinstance(value, str):
        return [p.strip(_PAD)[:_MAX_VALUE_CHARS] for p in value.split("\\")]
    if isinstance(value, MultiValue | list | tuple):
        out: list[str] = []
        for v in value:
            out.extend(_strings(v))
        return out
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return [str(value).strip(_PAD)[:_MAX_VALUE_CHARS]]


def _add(out: dict[str, list[str]], keyword: str, vals: Iterable[str]) -> None:
    """Merge ``vals`` into ``out[keyword]``.

    The first source is kept as is (so a vector like ImageOrientationPatient keeps all six
    numbers); later ones only add values not seen yet.
    """
    if keyword not in out:
        out[keyword] = list(vals)
        return
    seen = out[keyword]
    for v in vals:
        if v not in seen:
            seen.append(v)


def _element_strings(elem: DataElement) -> list[str] | None:
    """String values of a non-binary element, or ``None`` to skip it."""
    if elem.VR in _BINARY_VRS or not elem.keyword:
        return None
    if elem.VR in _TEXT_VRS:  # free text may hold a backslash that is not a separator
        text = elem.value if isinstance(elem.value, str) else ""
        return [text.strip(_PAD)[:_MAX_VALUE_CHARS]]
    try:
        return _strings(elem.value)
    except Exception:  # a malformed value must not break routing of the series
        return None


def _flatten_functional_groups(ds: Dataset, out: dict[str, list[str]]) -> None:
    """Offer values from shared and first-frame functional groups (Enhanced MR)."""
    top = {e.keyword for e in ds if e.keyword}
    for seq_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_kw)
        if not seq:
            continue
        for macro in seq[0]:
            if macro.VR != "SQ" or not macro.value:
                continue
            for elem in macro.value[0]:
                if elem.keyword in top:
                    continue
                vals = _element_strings(elem)
                if vals is not None:
                    _add(out, elem.keyword, vals)


def dataset_values(ds: Dataset, out: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Collect the keyword → string values of one dataset's header into ``out``."""
    out = {} if out is None else out
    for elem in ds:
        vals = _element_strings(elem)
        if vals is not None:
            _add(out, elem.keyword, vals)
    _flatten_functional_groups(ds, out)
    return out


def _sample(n: int, size: int) -> list[int]:
    if n <= size:
        return list(range(n))
    if size <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (size - 1)) for i in range(size)})


def attributes_for_paths(
    paths: Sequence[Path],
    *,
    calling_ae: str = "",
    called_ae: str = "",
    sender_host: str = "",
    instance_count: int | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    source: str = "",
) -> SeriesAttributes:
    """Attributes of a series given the paths of its instances (headers of a sample).

    Args:
        paths: Instance files of one series, first-received first.
        calling_ae: The association's calling AE title (empty = missing).
        called_ae: The AE title the sender called (empty = missing).
        sender_host: The sender's address (empty = missing).
        instance_count: ``InstanceCount``; default ``len(paths)``.
        sample_size: How many instances to read at most.
        source: Description for explanations; default the first path.

    Raises:
        SeriesReadError: When no sampled file is readable DICOM.
    """
    out: dict[str, list[str]] = {}
    read = 0
    for i in _sample(len(paths), sample_size):
        try:
            ds = pydicom.dcmread(paths[i], stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError, EOFError) as err:
            log.warning("rules_header_unreadable", path=str(paths[i]), error=type(err).__name__)
            continue
        dataset_values(ds, out)
        read += 1
    if read == 0:
        raise SeriesReadError(
            f"none of {len(paths)} instance file(s) could be read as DICOM"
            + (f" (first: {paths[0]})" if paths else "")
        )
    pseudo = {
        "CallingAE": calling_ae,
        "CalledAE": called_ae,
        "SenderHost": sender_host,
        "InstanceCount": str(len(paths) if instance_count is None else instance_count),
    }
    for key, value in pseudo.items():
        out[key] = [value.strip(_PAD)] if value.strip(_PAD) else []
    return SeriesAttributes(
        {k: tuple(v) for k, v in out.items()},
        series_instance_uid=_first(out.get("SeriesInstanceUID")),
        study_instance_uid=_first(out.get("StudyInstanceUID")),
        source=source or (str(paths[0]) if paths else ""),
    )


def attributes_for_series(
    series: Series, *, sample_size: int = DEFAULT_SAMPLE_SIZE
) -> SeriesAttributes:
    """Attributes of a complete series revision: sampled headers + association pseudo-attributes.

    The AE titles and host come from :class:`~dicom_node.series.Series` (the association that
    delivered the last instance); when those are empty, from the first stored instance.
    """
    first = series.instances[0] if series.instances else None
    attrs = attributes_for_paths(
        series.paths,
        calling_ae=series.calling_ae or (first.calling_ae if first else ""),
        called_ae=series.called_ae or (first.called_ae if first else ""),
        sender_host=series.peer_host or (first.peer_host if first else ""),
        instance_count=len(series.instances),
        sample_size=sample_size,
        source=series.key,
    )
    if not attrs.series_instance_uid or not attrs.study_instance_uid:
        return SeriesAttributes(
            attrs.values,
            series_instance_uid=attrs.series_instance_uid or series.series_instance_uid,
            study_instance_uid=attrs.study_instance_uid or series.study_instance_uid,
            source=attrs.source,
        )
    return attrs


def attributes_for_file(
    path: Path | str,
    *,
    calling_ae: str = "",
    called_ae: str = "",
    sender_host: str = "",
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> SeriesAttributes:
    """Attributes of one DICOM file, or of a folder holding one series (``rules explain PATH``).

    A folder is read as one series: every regular file in it (sorted by name, recursively).
    The association pseudo-attributes are missing unless given.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        SeriesReadError: When no file there is readable DICOM.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(str(p))
    paths = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if not paths:
        raise SeriesReadError(f"no files under {p}")
    return attributes_for_paths(
        paths,
        calling_ae=calling_ae,
        called_ae=called_ae,
        sender_host=sender_host,
        sample_size=sample_size,
        source=str(p),
    )
