"""The GraphQL endpoint: ``POST /api/graphql`` (queries, mutations) and the
graphql-transport-ws WebSocket on the same path (subscriptions).

HTTP requests authenticate as REST does (a bearer access token or API key;
401 without one); the route's own RBAC action is ``self`` (any role) and
each field checks its own. A WebSocket authenticates in ``connection_init``
(``{"authorization": "Bearer <token>"}``; 4403 when refused), and a
watchdog re-checks the credential every ``recheck_s`` and closes the
socket (4401, the reason named) when it was revoked or expired: every
subscription on it ends. No GraphQL IDE is served (no CDN at run time) and
queries are not accepted over GET (no cross-site reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import Depends
from starlette.requests import HTTPConnection
from strawberry.exceptions import ConnectionRejectionError
from strawberry.fastapi import GraphQLRouter

from .. import auth as _auth
from .context import Context

__all__ = ["build_router", "GRAPHQL_PATH", "CLOSE_REVOKED"]

log = logging.getLogger("patronus.controller.graphql")

GRAPHQL_PATH = "/api/graphql"
CLOSE_REVOKED = 4401   # graphql-transport-ws "Unauthorized": the credential was revoked or expired


def _remote(conn: HTTPConnection) -> str | None:
    return conn.client.host if conn.client else None


def _principal(conn: HTTPConnection) -> Any:
    """HTTP: authenticate the bearer (AuthError -> 401 problem); WebSocket:
    nothing yet (``connection_init`` carries the credential)."""
    if conn.scope["type"] != "http":
        return None
    header = conn.headers.get("authorization", "")
    if header[:7].lower() != "bearer " or not header[7:].strip():
        raise _auth.AuthError("missing bearer token (Authorization: Bearer ...)")
    bearer = header[7:].strip()
    principal = conn.app.state.auth.authenticate(bearer, remote=_remote(conn))
    conn.state.principal, conn.state.bearer = principal, bearer
    return principal


_principal._patronus_action = "self"  # type: ignore[attr-defined]   # any role; fields check their own


class _Router(GraphQLRouter):   # type: ignore[misc]
    recheck_s = 1.0

    async def on_ws_connect(self, context: Context) -> Any:
        params = context.connection_params or {}
        raw = params.get("authorization") or params.get("Authorization") if isinstance(params, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise ConnectionRejectionError({"reason": "connection_init needs {\"authorization\": \"Bearer ...\"}"})
        bearer = raw.strip()
        bearer = bearer[7:].strip() if bearer[:7].lower() == "bearer " else bearer
        try:
            context.principal = context.auth.authenticate(bearer, remote=context.remote)
        except _auth.ControllerError as e:
            raise ConnectionRejectionError({"reason": str(e)}) from None
        context.bearer = bearer
        ws = context.request
        task = asyncio.ensure_future(self._watch(ws, context))
        context.bus.keep(task)
        return {"principal": context.actor, "role": getattr(context.principal.role, "value", "")}

    async def _watch(self, ws: Any, context: Context) -> None:
        """Close the socket when its credential stops being valid."""
        from starlette.websockets import WebSocketState

        loop = asyncio.get_running_loop()
        while ws.application_state != WebSocketState.DISCONNECTED and ws.client_state != WebSocketState.DISCONNECTED:
            await asyncio.sleep(self.recheck_s)
            try:
                await loop.run_in_executor(None, context.auth.recheck, context.bearer)
            except _auth.ControllerError as e:
                with contextlib.suppress(Exception):
                    await ws.close(code=CLOSE_REVOKED, reason=f"credential no longer valid: {e}"[:120])
                return
            except Exception:   # a store hiccup: try again next time, never kill the channel for it
                log.exception("re-checking a subscription's credential")


def build_router(service: Any, auth: Any, agents: Any, *, introspection: bool = True) -> GraphQLRouter:
    """The router to include in the controller app (``create_app`` does)."""
    from .schema import make_schema
    from .subscriptions import Bus

    bus = Bus(service, agents)
    schema, cache = make_schema(introspection=introspection)

    def context_getter(conn: HTTPConnection, principal: Any = Depends(_principal)) -> Context:
        return Context(service=service, auth=auth, agents=agents, bus=bus, cache=cache, principal=principal,
                       bearer=getattr(conn.state, "bearer", None), remote=_remote(conn))

    router = _Router(schema, path=GRAPHQL_PATH, graphql_ide=None, allow_queries_via_get=False,
                     context_getter=context_getter, dependencies=[Depends(_principal)], tags=["graphql"],
                     max_subscriptions_per_connection=1000)
    router.bus = bus          # type: ignore[attr-defined]
    router.cache = cache      # type: ignore[attr-defined]
    return router
