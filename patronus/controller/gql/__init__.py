"""GraphQL at ``/api/graphql`` (strawberry), on the controller's service layer.

The same operations as REST (:mod:`patronus.controller.service`, the agent
store, auth), the same validation, transactions, audit log and RBAC (per
field where a viewer must not see something). Queries and mutations over
HTTP POST (a bearer token or API key, as REST); subscriptions over
WebSocket with the graphql-transport-ws protocol, authenticated in
``connection_init`` (``{"authorization": "Bearer ..."}``) and ended when the
token is revoked or expires.

- :mod:`.context`: the per-request context (principal, service, loaders, cache).
- :mod:`.schema`: types, ``Query`` and ``Mutation``.
- :mod:`.subscriptions`: the event bus and ``Subscription``.
- :mod:`.router`: the FastAPI router and its authentication.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_router", "GRAPHQL_PATH"]


def __getattr__(name: str) -> Any:   # strawberry and FastAPI only when the controller runs (the extra)
    if name in __all__:
        from . import router

        return getattr(router, name)
    raise AttributeError(name)
