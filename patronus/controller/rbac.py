"""Who may call a route: the ``require(action)`` dependency every REST and
agent route declares (or the ``public`` / ``credentials`` markers), which
authenticates the bearer through ``Auth`` and checks the role's permission.
``create_app`` reads the marker of every route into ``app.ROUTE_ACTIONS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from . import auth as _auth

__all__ = ["require", "public", "credentials", "PUBLIC", "CREDENTIALS"]

PUBLIC = "public"            # no authentication at all (health)
CREDENTIALS = "credentials"  # authenticated by the credentials in the body (login, refresh)


_bearer = HTTPBearer(auto_error=False, description="a JWT access token or an API key (pnk_...)")


def _remote(request: Request) -> str | None:
    return request.client.host if request.client else None


def require(action: str) -> Callable[..., Any]:
    """A dependency that authenticates the bearer and checks ``action`` for its role;
    returns the :class:`~patronus.controller.auth.Principal`."""
    if action not in _auth.PERMISSIONS:
        raise KeyError(f"unknown action {action!r}")

    def dependency(request: Request,
                   creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Any:
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise _auth.AuthError("missing bearer token (Authorization: Bearer ...)")
        principal = request.app.state.auth.authenticate(creds.credentials, remote=_remote(request))
        if not _auth.allowed(principal.role, action):
            raise _auth.Forbidden(f"role {_role(principal.role)!r} may not {action}")
        request.state.bearer = creds.credentials
        request.state.principal = principal
        return principal

    dependency._patronus_action = action  # type: ignore[attr-defined]
    return dependency


def _marker(kind: str) -> Callable[[], None]:
    def dependency() -> None:
        return None

    dependency._patronus_action = kind  # type: ignore[attr-defined]
    return dependency


public = _marker(PUBLIC)
credentials = _marker(CREDENTIALS)


def _role(role: Any) -> str:
    return getattr(role, "value", role)


