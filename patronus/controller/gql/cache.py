"""An in-memory TTL cache for GraphQL's hot reads: the topology and each
path's latest metrics.

Entries are dropped when they expire (``ttl_s``), when the cache is full
(the oldest first) and, above all, by the events that feed the
subscriptions: every change of the mesh (``Service.changes``) drops the
topology, every metric an agent stores (``Service.telemetry``, kind
``metric``) drops that path's latest metrics. A read that raced with a
write cannot put back the older value: each key has a generation, bumped
by every invalidation, and :meth:`Cache.put` only stores a value read at
the generation still current (:meth:`Cache.generation`, taken before the
read). The topology is also keyed by the mesh object the service returns
(a new one after every save, in this process or another), so a change is
visible in the next read even without its event.

Counters (``hits``, ``misses``, ``evictions``, ``invalidations``, per area)
are on the controller's ``/metrics`` as
``patronus_controller_graphql_cache_*_total{cache}``.

>>> c = Cache(ttl_s={"metrics": 60.0})
>>> g = c.generation("metrics", "a~b")
>>> c.put("metrics", "a~b", {"rtt_ms": 1.0}, g)
>>> c.get("metrics", "a~b")
(True, {'rtt_ms': 1.0})
>>> c.invalidate("metrics", "a~b"); c.get("metrics", "a~b")
(False, None)
>>> c.put("metrics", "a~b", {"rtt_ms": 9.0}, g)   # read before the invalidation: not stored
>>> c.get("metrics", "a~b"), c.stats()["metrics"]["hits"]
((False, None), 1)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["Cache", "AREAS", "DEFAULT_TTL_S", "MAX_ENTRIES"]

AREAS = ("topology", "metrics")
#: seconds an entry lives without an invalidating event (the events make them exact; the TTL bounds the rest)
DEFAULT_TTL_S = {"topology": 60.0, "metrics": 10.0}
MAX_ENTRIES = 200_000   # per area: a 1,000-site mesh has 499,500 paths, most never asked for one by one


class _Area:
    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self.entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()   # key -> (expires, value)
        self.gens: dict[Any, int] = {}
        self.epoch = 0   # bumped by a whole-area invalidation
        self.hits = self.misses = self.evictions = self.invalidations = 0


class Cache:
    """Areas (``topology``, ``metrics``) of key -> value with a TTL; thread-safe."""

    def __init__(self, *, ttl_s: dict[str, float] | None = None, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        ttl = {**DEFAULT_TTL_S, **(ttl_s or {})}
        self._areas = {a: _Area(ttl[a], max_entries) for a in ttl}
        self._lock = threading.Lock()
        self._clock = clock
        self._bound: set[int] = set()

    # -- the events ----------------------------------------------------------------------

    def bind(self, service: Any) -> None:
        """Listen to ``service``'s change and telemetry streams (once per service)."""
        with self._lock:
            if id(service) in self._bound:
                return
            self._bound.add(id(service))
        service.changes.subscribe(self._on_change)
        telemetry = getattr(service, "telemetry", None)
        if telemetry is not None:
            telemetry.subscribe(self._on_telemetry)

    def _on_change(self, ev: dict[str, Any]) -> None:
        self.invalidate("topology")   # sites, policies, failover, agents: any change may show in a topology

    def _on_telemetry(self, ev: dict[str, Any]) -> None:
        if ev.get("kind") == "metric" and ev.get("path") is not None:
            self.invalidate("metrics", ev["path"])

    # -- reads and writes ----------------------------------------------------------------

    def generation(self, area: str, key: Any) -> tuple[int, int]:
        """The version of ``key`` to hand :meth:`put` after reading it from the store."""
        with self._lock:
            a = self._areas[area]
            return a.epoch, a.gens.get(key, 0)

    def get(self, area: str, key: Any) -> tuple[bool, Any]:
        """``(True, value)`` for a live entry (a hit), ``(False, None)`` otherwise (a miss)."""
        now = self._clock()
        with self._lock:
            a = self._areas[area]
            e = a.entries.get(key)
            if e is not None and e[0] <= now:
                del a.entries[key]
                a.evictions += 1
                e = None
            if e is None:
                a.misses += 1
                return False, None
            a.hits += 1
            return True, e[1]

    def put(self, area: str, key: Any, value: Any, generation: tuple[int, int]) -> None:
        """Store ``value`` unless ``key`` was invalidated since ``generation`` was taken."""
        now = self._clock()
        with self._lock:
            a = self._areas[area]
            if generation != (a.epoch, a.gens.get(key, 0)):
                return
            a.entries[key] = (now + a.ttl_s, value)
            a.entries.move_to_end(key)
            while len(a.entries) > a.max_entries:
                a.entries.popitem(last=False)
                a.evictions += 1

    def invalidate(self, area: str, key: Any = None) -> None:
        """Drop ``key`` (or every entry of the area when None)."""
        with self._lock:
            a = self._areas[area]
            if key is None:
                a.epoch += 1
                a.gens.clear()
                a.invalidations += len(a.entries)
                a.entries.clear()
                return
            a.gens[key] = a.gens.get(key, 0) + 1
            if len(a.gens) > 4 * a.max_entries:   # bounded: forgetting generations only costs an epoch
                a.gens.clear()
                a.epoch += 1
            if a.entries.pop(key, None) is not None:
                a.invalidations += 1

    def stats(self) -> dict[str, dict[str, int]]:
        """Per area: ``hits``, ``misses``, ``evictions`` (expired or pushed out), ``invalidations``
        (dropped by an event) and ``size``."""
        with self._lock:
            return {name: {"hits": a.hits, "misses": a.misses, "evictions": a.evictions,
                           "invalidations": a.invalidations, "size": len(a.entries)}
                    for name, a in self._areas.items()}
