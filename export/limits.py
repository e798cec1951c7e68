"""Value-length limits of DICOM text attributes, from pydicom's data dictionary.

A value longer than its Value Representation allows (LO 64, SH 16, ST 1024, LT 10240
characters, PS3.5 6.2) is invalid; :func:`fit` cuts a value to the limit of the attribute it
is written to, so the limit lives in one place (pydicom's) rather than in hand-written slices.
"""

from __future__ import annotations

from functools import cache

from pydicom.datadict import dictionary_VR
from pydicom.valuerep import MAX_VALUE_LEN


@cache
def max_length(name: str) -> int | None:
    """Longest value (characters) of attribute keyword ``name``'s VR, or of VR ``name``.

    ``None``: the VR has no limit (UT, UC, ...). A VR (``"LO"``) is for values that are not
    attributes of their own, e.g. SR TEXT items highdicom holds to an attribute's limit.

    Raises:
        KeyError: ``name`` is neither a DICOM attribute keyword nor a VR.
    """
    if len(name) == 2 and name.isupper():
        return MAX_VALUE_LEN.get(name)
    try:
        vr = dictionary_VR(name)
    except (KeyError, ValueError) as err:
        raise KeyError(f"{name!r} is neither a DICOM attribute keyword nor a VR") from err
    return MAX_VALUE_LEN.get(vr)


def fit(name: str, value: str) -> str:
    """``value`` cut to the length limit of attribute ``name`` (``"Manufacturer"``: 64) or VR.

    Raises:
        KeyError: ``name`` is neither a DICOM attribute keyword nor a VR.
    """
    limit = max_length(name)
    return value if limit is None else value[:limit]
