"""``dicomweb`` destination: STOW-RS with dicomweb-client, one request per batch.

The STOW-RS response names each instance in ``ReferencedSOPSequence`` (stored) or
``FailedSOPSequence`` (with a ``FailureReason``); an instance in neither counts as not
delivered. An HTTP error or an unreachable server fails the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import requests
from dicomweb_client import DICOMwebClient

from dicom_node.config import DicomwebDestination
from dicom_node.destinations import DeliveryResult, DestinationError, Item, load_item
from dicom_node.logs import get_logger

log = get_logger(__name__)


class DicomwebStore:
    """STOW-RS to a DICOMweb service.

    Args:
        name: Destination name (logs, delivery records).
        cfg: Base URL (the part before ``/studies``), credentials and timeout.
    """

    def __init__(self, name: str, cfg: DicomwebDestination) -> None:
        self.name = name
        self.cfg = cfg

    def _client(self) -> DICOMwebClient:
        session = requests.Session()
        if self.cfg.username is not None:
            session.auth = (self.cfg.username, self.cfg.password or "")
        if self.cfg.bearer_token:
            session.headers["Authorization"] = f"Bearer {self.cfg.bearer_token}"
        client = DICOMwebClient(self.cfg.url.rstrip("/"), session=session,
                                timeout=self.cfg.timeout_s)
        client.set_http_retry_params(retry=False)  # the job queue retries, with its backoff
        return client

    def _fail(self, exc: Exception) -> DestinationError:
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return DestinationError(
                f"destination {self.name}: HTTP {exc.response.status_code} from {self.cfg.url}"
            )
        return DestinationError(
            f"destination {self.name}: {self.cfg.url} unreachable ({exc.__class__.__name__})"
        )

    def test(self) -> str:
        """Ask the service for studies (a QIDO-RS search with limit 1).

        Raises:
            DestinationError: The service did not answer 2xx.
        """
        try:
            self._client().search_for_studies(limit=1)
        except (requests.RequestException, OSError) as exc:
            raise self._fail(exc) from None
        return f"DICOMweb service at {self.cfg.url} answered a QIDO-RS search"

    def send(self, items: Sequence[Item]) -> list[DeliveryResult]:
        """STOW-RS ``items`` in one multipart request; one result per item, in order.

        Raises:
            DestinationError: HTTP error or no connection.
        """
        if not items:
            return []
        datasets = [load_item(i) for i in items]
        try:
            response = self._client().store_instances(datasets)
        except (requests.RequestException, OSError) as exc:
            raise self._fail(exc) from None
        stored = {
            str(i.ReferencedSOPInstanceUID) for i in response.get("ReferencedSOPSequence", [])
        }
        failed = {
            str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0xC000))
            for i in response.get("FailedSOPSequence", [])
        }
        results = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if uid in stored:
                results.append(DeliveryResult(uid, True, "stored"))
            elif uid in failed:
                results.append(DeliveryResult(uid, False, f"failure reason 0x{failed[uid]:04X}"))
            else:
                results.append(DeliveryResult(uid, False, "not in the STOW-RS response"))
        bad = [r for r in results if not r.ok]
        log.info("stow-rs batch sent", destination=self.name, sent=len(results) - len(bad),
                 failed=len(bad))
        return results
