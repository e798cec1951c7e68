"""``orthanc`` destination: upload through Orthanc's REST API (``POST /instances``, pyorthanc).

Orthanc answers ``Success`` for a new instance and ``AlreadyStored`` for one it holds: both
count as delivered (the output UIDs are deterministic, so a re-send is the same instance).
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
from pyorthanc import Orthanc

from dicom_node.config import OrthancDestination
from dicom_node.destinations import DeliveryResult, DestinationError, Item
from dicom_node.logs import get_logger

log = get_logger(__name__)

OK_STATUSES = frozenset({"Success", "AlreadyStored"})
"""``Status`` values of ``POST /instances`` that mean Orthanc holds the instance."""


def _encode(item: Item) -> tuple[str, bytes]:
    if isinstance(item, Path):
        data = item.read_bytes()
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True,
                             specific_tags=["SOPInstanceUID"])
        return str(ds.SOPInstanceUID), data
    with BytesIO() as buf:
        item.save_as(buf, enforce_file_format=True)
        return str(item.SOPInstanceUID), buf.getvalue()


class OrthancStore:
    """Upload to Orthanc over HTTP.

    Args:
        name: Destination name (logs, delivery records).
        cfg: Orthanc's base URL, credentials and timeout.
    """

    def __init__(self, name: str, cfg: OrthancDestination) -> None:
        self.name = name
        self.cfg = cfg

    def _client(self) -> Orthanc:
        return Orthanc(self.cfg.url.rstrip("/"), username=self.cfg.username,
                       password=self.cfg.password, timeout=self.cfg.timeout_s)

    def _fail(self, exc: Exception) -> DestinationError:
        if isinstance(exc, httpx.HTTPStatusError):
            return DestinationError(
                f"destination {self.name}: HTTP {exc.response.status_code} from {self.cfg.url}"
            )
        return DestinationError(
            f"destination {self.name}: {self.cfg.url} unreachable ({exc.__class__.__name__})"
        )

    def test(self) -> str:
        """``GET /system``.

        Raises:
            DestinationError: Orthanc did not answer 2xx.
        """
        try:
            with self._client() as client:
                info = client.get_system()
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None
        version = info.get("Version", "?") if isinstance(info, dict) else "?"
        return f"Orthanc {version} at {self.cfg.url} answered GET /system"

    def send(self, items: Sequence[Item]) -> list[DeliveryResult]:
        """``POST /instances`` once per item on one HTTP connection; results in order.

        Raises:
            DestinationError: Orthanc unreachable before anything was stored.
        """
        results: list[DeliveryResult] = []
        if not items:
            return results
        with self._client() as client:
            for item in items:
                uid, data = _encode(item)
                try:
                    answer = client.post_instances(data)
                except httpx.HTTPStatusError as exc:
                    results.append(DeliveryResult(uid, False,
                                                  f"HTTP {exc.response.status_code}"))
                    continue
                except httpx.HTTPError as exc:
                    if not results:
                        raise self._fail(exc) from None
                    results.append(DeliveryResult(uid, False, exc.__class__.__name__))
                    continue
                status = answer.get("Status", "") if isinstance(answer, dict) else ""
                results.append(DeliveryResult(uid, status in OK_STATUSES, status or "?"))
        bad = [r for r in results if not r.ok]
        log.info("orthanc upload", destination=self.name, sent=len(results) - len(bad),
                 failed=len(bad))
        return results
