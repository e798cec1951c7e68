"""The one error type of the admin backend: an HTTP status and a precise message."""

from __future__ import annotations


class AdminError(Exception):
    """A request the backend refuses: ``status`` is the HTTP status, ``str(err)`` the reason.

    Args:
        status: The HTTP status code the API answers with (404, 409, 422, 500 ...).
        message: Why the request was refused, in words (no patient data).
        problems: For an invalid draft, one ``{"key": "rules.N.field", "reason": ...}`` each.
    """

    def __init__(self, status: int, message: str, problems: list[dict[str, str]] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems or []
