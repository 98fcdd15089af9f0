"""The GraphQL types, ``Query`` and ``Mutation`` (being built)."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.types import Info

from .context import Context
from .subscriptions import Subscription

__all__ = ["make_schema"]


@strawberry.type
class Me:
    name: str
    role: str
    kind: str


@strawberry.type
class Query:
    @strawberry.field(description="who is asking")
    def me(self, info: Info[Context, None]) -> Me:
        p = info.context.principal
        return Me(name=p.name, role=getattr(p.role, "value", str(p.role)), kind=p.kind)


def make_schema(*, introspection: bool = True) -> tuple[strawberry.Schema, Any]:
    """The schema and its cache (None until the cache is built)."""
    return strawberry.Schema(query=Query, subscription=Subscription), None
