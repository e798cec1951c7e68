"""Request-body limit of the admin API (``admin.max_body_bytes``), enforced before reading.

A pure ASGI middleware: a ``Content-Length`` over the limit is answered ``413`` before one
byte of the body is read; a body without a length (chunked) is counted as it streams and
refused with ``413`` as soon as it passes the limit. Every 413 carries ``Connection: close``,
so the server drops the connection instead of draining the rest: whatever its token, a client
cannot make the node read or buffer more than the limit.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node.logs import get_logger

log = get_logger("admin")


def too_large_detail(limit: int) -> str:
    """The ``detail`` of a 413 answer."""
    return f"request body larger than {limit} bytes (admin.max_body_bytes)"


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` with ``413 Content Too Large``.

    A streamed body over the limit raises :class:`HTTPException` (413) from ``receive``,
    which FastAPI passes on to the app's 413 handler (see :func:`dicom_node.admin.app`).

    Args:
        app: The ASGI app to protect.
        max_bytes: Largest accepted body, bytes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check ``Content-Length``, then count the streamed body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > limit:
                    await self._refuse(scope, send, 413 if length > limit else 400,
                                       too_large_detail(limit) if length > limit
                                       else "invalid Content-Length")
                    return
        seen = 0

        async def counted() -> Message:
            """``receive`` that counts body bytes and raises 413 past ``limit`` bytes."""
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, too_large_detail(limit))
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
        """Answer ``status`` with ``{"detail": ...}`` and ``Connection: close``, body unread.

        Sent as raw ASGI messages because the app (and its exception handlers) never runs.
        """
        log.warning("admin_request_refused", path=scope.get("path", ""), status=status,
                    detail=detail)
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
