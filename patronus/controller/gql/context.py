"""The context every resolver gets: who asks, and the controller's parts."""

from __future__ import annotations

from typing import Any

from strawberry.fastapi import BaseContext

from .. import auth as _auth

__all__ = ["Context", "require"]


class Context(BaseContext):
    """``principal`` (None on a WebSocket until ``connection_init``), ``bearer``
    (the credential it came with, to re-check it), ``service``, ``auth``,
    ``agents`` (the agent store), ``bus`` (events), ``cache`` (hot reads) and
    ``loaders`` (data loaders, made per request by the schema)."""

    def __init__(self, *, service: Any, auth: Any, agents: Any, bus: Any, cache: Any,
                 principal: Any = None, bearer: str | None = None, remote: str | None = None) -> None:
        super().__init__()
        self.service, self.auth, self.agents, self.bus, self.cache = service, auth, agents, bus, cache
        self.principal, self.bearer, self.remote = principal, bearer, remote
        self.connection_params: dict[str, Any] | None = None
        self.loaders: Any = None
        self.store_queries = 0   # state-file and database reads made for this request (tests count them)

    @property
    def actor(self) -> str:
        return str(self.principal.actor) if self.principal is not None else "-"


def require(ctx: Context, action: str) -> Any:
    """The principal when its role may do ``action``; Forbidden (or AuthError
    when nobody authenticated) otherwise."""
    p = ctx.principal
    if p is None:
        raise _auth.AuthError("not authenticated")
    if not _auth.allowed(p.role, action):
        raise _auth.Forbidden(f"role {getattr(p.role, 'value', p.role)!r} may not {action}")
    return p
