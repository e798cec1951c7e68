"""Bearer-token authentication of the admin API, with the roles ``viewer`` and ``admin``.

Tokens come from ``settings.admin.tokens``. A request authenticates with
``Authorization: Bearer <token>``; the browser console may also send the token as the
``omnimri_token`` cookie, which is honoured for reading (``GET``/``HEAD``) only, so a forged
cross-site form can never change anything. Without any configured token every call but the
health checks is refused.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dicom_node.config import AdminToken

Role = Literal["viewer", "admin"]
COOKIE_NAME = "omnimri_token"
"""Cookie the console stores the token in (``SameSite=Strict``; read-only requests only)."""

_bearer = HTTPBearer(auto_error=False, description="A token from `admin.tokens` in config.yaml.")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's id (recorded in the audit log) and role."""

    token_id: str
    role: Role

    @property
    def is_admin(self) -> bool:
        """Whether the caller may change things and see patient-identifying data."""
        return self.role == "admin"


def find_token(tokens: list[AdminToken], presented: str) -> AdminToken | None:
    """The configured token equal to ``presented`` (constant-time comparison), or ``None``."""
    found: AdminToken | None = None
    for t in tokens:
        if hmac.compare_digest(t.token.encode(), presented.encode()):
            found = t
    return found


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail,
                         headers={"WWW-Authenticate": "Bearer"})


def principal(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """FastAPI dependency: the authenticated caller (401 when missing or unknown)."""
    tokens: list[AdminToken] = request.app.state.backend.settings.admin.tokens
    if not tokens:
        raise _unauthorized("no admin tokens are configured (admin.tokens in config.yaml)")
    presented: str | None = creds.credentials if creds is not None else None
    if presented is None and request.method in ("GET", "HEAD"):
        presented = request.cookies.get(COOKIE_NAME)
    if not presented:
        raise _unauthorized("missing bearer token")
    tok = find_token(tokens, presented)
    if tok is None:
        raise _unauthorized("unknown token")
    return Principal(token_id=tok.id, role=tok.role)


def admin_principal(who: Annotated[Principal, Depends(principal)]) -> Principal:
    """FastAPI dependency: the caller, who must hold the ``admin`` role (403 otherwise)."""
    if not who.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="this action needs the admin role")
    return who


Viewer = Annotated[Principal, Depends(principal)]
"""Parameter type of an endpoint any valid token may call."""
Admin = Annotated[Principal, Depends(admin_principal)]
"""Parameter type of an endpoint only ``admin`` tokens may call."""
