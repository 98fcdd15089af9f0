"""Per-request data loaders: no N+1.

A GraphQL query for every site with its paths and each path's latest
metrics makes a handful of store round trips whatever the number of sites:

- the mesh, once per request (:meth:`Loaders.mesh`), and from it an index
  of each site's paths;
- the agents (site status), once per request (:meth:`Loaders.site_status`);
- the latest metrics of every path asked for in one wave, in one SQL query
  (:attr:`Loaders.latest`; paths the cache has are not asked for);
- the state of those paths, in one query (:attr:`Loaders.state`).

Every round trip adds one to ``ctx.store_queries`` (the response carries it
in ``extensions.patronus.storeQueries``; the tests count it). The store is
read through the service's own per-thread connection, in a worker thread,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from strawberry.dataloader import DataLoader

__all__ = ["Loaders", "loaders_of", "METRIC_COLS"]

METRIC_COLS = ("ts", "rtt_ms", "jitter_ms", "loss_pct", "mos", "mtu", "bandwidth_mbps")

# the newest row of each path named in a JSON array (one parameter, however many paths): an index lookup
# per path (path_metrics_path_ts) inside one statement, one round trip
_LATEST_SQL = (f"SELECT j.value AS path, {', '.join('m.' + c for c in METRIC_COLS)} FROM json_each(?) AS j "
               "JOIN path_metrics AS m ON m.rowid = (SELECT rowid FROM path_metrics WHERE path = j.value "
               "ORDER BY ts DESC, rowid DESC LIMIT 1)")


class _Once:
    """An async value computed at most once per request (concurrent callers share it)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.task: asyncio.Future[Any] | None = None

    async def __call__(self) -> Any:
        if self.task is None:
            self.task = asyncio.ensure_future(run_in_threadpool(self.fn))
        return await self.task


class Loaders:
    """The loaders of one request (``ctx.loaders``; made by :func:`loaders_of`)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.service = ctx.service
        self.cache = ctx.cache
        self.mesh = _Once(self._mesh)
        self.site_status = _Once(self._site_status)
        self.latest: DataLoader[str, dict[str, Any] | None] = DataLoader(self._latest)
        self.state: DataLoader[str, dict[str, Any] | None] = DataLoader(self._state)
        self._paths_of: dict[str, list[Any]] | None = None

    def count(self, n: int = 1) -> None:
        self.ctx.store_queries += n

    # -- the mesh and its index ------------------------------------------------------------

    def _mesh(self) -> Any:
        self.count()
        return self.service.mesh()

    async def paths_of(self, site: str) -> list[Any]:
        """The paths touching ``site`` (mesh order), from one index per request."""
        if self._paths_of is None:
            mesh = await self.mesh()
            if self._paths_of is None:
                index: dict[str, list[Any]] = {s.name: [] for s in mesh.sites}
                for p in mesh.paths():
                    index[p.local_site].append(p)
                    index[p.remote_site].append(p)
                self._paths_of = index
        return self._paths_of.get(site, [])

    # -- agents ------------------------------------------------------------------------------

    def _site_status(self) -> dict[str, str]:
        """Site -> status of its best agent (Active, Degraded, Inactive, Revoked), as the
        subscription bus computes it; a site without an agent is absent."""
        agents = getattr(self.ctx, "agents", None)
        if agents is None:
            return {}
        self.count()
        order = {"Active": 0, "Degraded": 1, "Inactive": 2, "Revoked": 3}
        out: dict[str, str] = {}
        for r in agents.agents():
            cur = out.get(r["site"])
            if cur is None or order.get(r["status"], 9) < order.get(cur, 9):
                out[r["site"]] = r["status"]
        return out

    # -- paths: latest metrics and state -----------------------------------------------------

    async def _latest(self, ids: list[str]) -> list[dict[str, Any] | None]:
        cache = self.cache
        found: dict[str, dict[str, Any] | None] = {}
        missing: list[str] = []
        gens: dict[str, Any] = {}
        for pid in dict.fromkeys(ids):
            if cache is not None:
                hit, value = cache.get("metrics", pid)
                if hit:
                    found[pid] = value
                    continue
                gens[pid] = cache.generation("metrics", pid)
            missing.append(pid)
        if missing:
            rows = await run_in_threadpool(self._latest_rows, missing)
            for pid in missing:
                found[pid] = rows.get(pid)
                if cache is not None:
                    cache.put("metrics", pid, found[pid], gens[pid])
        return [found[pid] for pid in ids]

    def _latest_rows(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        self.count()
        with self.service._store() as st:
            rows = st.records("path_metrics", _LATEST_SQL, (json.dumps(ids),))
        return {r["path"]: {k: r[k] for k in METRIC_COLS} for r in rows}

    async def _state(self, ids: list[str]) -> list[dict[str, Any] | None]:
        states = await run_in_threadpool(self._states, set(ids))
        return [states.get(pid) for pid in ids]

    def _states(self, ids: set[str]) -> dict[str, dict[str, Any]]:
        self.count()
        with self.service._store() as st:
            return dict(self.service._path_states(st, ids))


def loaders_of(ctx: Any) -> Loaders:
    """The request's loaders, made on first use."""
    if ctx.loaders is None:
        ctx.loaders = Loaders(ctx)
    return ctx.loaders
