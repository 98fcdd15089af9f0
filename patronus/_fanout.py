"""One source, many listeners: callbacks called at once and async iterators
that each get every item (BFD state changes, failover events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Fanout(Generic[T]):
    def __init__(self) -> None:
        self._callbacks: list[Callable[[T], Any]] = []
        self._queues: list[asyncio.Queue[T]] = []

    def subscribe(self, callback: Callable[[T], Any]) -> None:
        self._callbacks.append(callback)

    def publish(self, item: T) -> None:
        for cb in self._callbacks:
            cb(item)
        for q in self._queues:
            q.put_nowait(item)

    async def stream(self) -> AsyncIterator[T]:
        """Every item published from now on, until the consumer stops."""
        q: asyncio.Queue[T] = asyncio.Queue()
        self._queues.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._queues.remove(q)
