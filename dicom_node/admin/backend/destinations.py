"""Destinations in the admin API: list (never secrets) and test (``/api/v1/destinations``)."""

from __future__ import annotations

import time
from typing import Any

from dicom_node.admin.auth import Principal
from dicom_node.admin.backend.errors import AdminError
from dicom_node.admin.backend.parts import NodeParts
from dicom_node.config import (
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    OrthancDestination,
)


class DestinationsAdmin:
    """The configured destinations, shown without secrets, and a check that one answers.

    Args:
        parts: The shared node parts (destinations are ``parts.settings.destinations``).
    """

    def __init__(self, parts: NodeParts) -> None:
        self.parts = parts

    def configured(self) -> list[dict[str, Any]]:
        """Configured destinations without secrets (passwords and tokens are never returned)."""
        out: list[dict[str, Any]] = []
        for name, d in sorted(self.parts.settings.destinations.items()):
            row: dict[str, Any] = {"name": name, "kind": d.kind}
            if isinstance(d, DimseDestination):
                row.update(ae_title=d.ae_title, host=d.host, port=d.port, tls=d.tls,
                           target=f"{d.ae_title}@{d.host}:{d.port}")
            elif isinstance(d, DicomwebDestination | OrthancDestination):
                row.update(url=d.url, target=d.url,
                           auth="basic" if d.username else (
                               "bearer" if getattr(d, "bearer_token", None) else "none"))
            elif isinstance(d, FolderDestination):
                row.update(path=str(d.path), target=str(d.path))
            out.append(row)
        return out

    def test(self, who: Principal, name: str) -> dict[str, Any]:
        """Check that a destination answers, with the destination's own ``test()``.

        That is a C-ECHO for ``dimse``, an HTTP request for ``dicomweb``/``orthanc`` and a
        write probe for ``folder``.

        Returns ``{"name", "kind", "ok", "detail", "elapsed_ms"}`` (milliseconds); the attempt
        is audited.

        Raises:
            AdminError: 404 for an unknown destination.
        """
        settings = self.parts.settings
        dest = settings.destinations.get(name)
        if dest is None:
            raise AdminError(404, f"no destination {name!r}")
        from dicom_node.destinations import DestinationError, make_destination

        t0 = time.perf_counter()
        try:
            detail = make_destination(name, dest, settings).test()
            ok = True
        except DestinationError as err:
            ok, detail = False, str(err)
        except Exception as err:  # a broken peer must not break the API
            ok, detail = False, f"{type(err).__name__}: {err}"
        elapsed = round((time.perf_counter() - t0) * 1000, 1)
        self.parts.record(who, "destination_test", name, status="ok" if ok else "failed")
        return {"name": name, "kind": dest.kind, "ok": ok, "detail": detail,
                "elapsed_ms": elapsed}
