"""Live events for GraphQL subscriptions, from the controller's own event
streams (never by polling the store):

- the service's change stream (``Service.changes``: sites, policies,
  failover settings, agents' announcements and revocations);
- the agents' telemetry as it is stored (``Service.telemetry``: path
  metrics, BFD states, failover moves, published by the agent store);
- site status (Active, Degraded, Inactive, Revoked) as it changes: status
  is a function of time since an agent's last contact, so the bus follows
  contacts (events from the agent store) and wakes exactly when a status
  would change by itself (a heap of those moments), publishing only changes.

Each subscriber has a bounded queue (``QUEUE``). A subscriber that falls
that far behind is dropped: its socket is closed with ``CLOSE_SLOW`` and
the reason, instead of memory growing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from .context import Context, require

__all__ = ["Bus", "Subscription", "QUEUE", "CLOSE_SLOW"]

QUEUE = 1000         # events a subscriber may have waiting
CLOSE_SLOW = 4413    # the socket of a subscriber that fell QUEUE events behind


class SlowSubscriber(Exception):
    pass


class _Sub:
    def __init__(self, kinds: set[str]) -> None:
        self.kinds = kinds
        self.q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        self.dropped = False


class Bus:
    """Fans the controller's events out to subscribers (on the event loop)."""

    def __init__(self, service: Any, agents: Any) -> None:
        self.service, self.agents = service, agents
        self.subs: set[_Sub] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._status: dict[str, str] | None = None
        self._agents: dict[str, dict[str, Any]] | None = None
        self._due: list[tuple[float, str, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.published = 0
        self.slow_dropped = 0
        service.changes.subscribe(self._from_service)
        telemetry = getattr(service, "telemetry", None)
        if telemetry is not None:
            telemetry.subscribe(self._from_telemetry)

    def keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a reference to a background task until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sources --------------------------------------------------------------------------

    def _from_service(self, ev: dict[str, Any]) -> None:
        kind = str(ev.get("type", ""))
        self.publish({"kind": "change", **ev})
        if kind.startswith("policy."):
            self.publish({"kind": "policy", **ev})
        elif kind.startswith("site."):
            self.publish({"kind": "site_change", **ev})
        if kind == "agent.revoke" and self._agents is not None:   # re-read who is revoked
            self._track_again()

    def _from_telemetry(self, ev: dict[str, Any]) -> None:
        if ev.get("kind") == "contact":
            self._contact(ev)
            return
        self.publish(ev)

    def publish(self, ev: dict[str, Any]) -> None:
        self.published += 1
        for sub in list(self.subs):
            if ev["kind"] not in sub.kinds or sub.dropped:
                continue
            try:
                sub.q.put_nowait(ev)
            except asyncio.QueueFull:
                sub.dropped = True
                self.slow_dropped += 1
                with contextlib.suppress(asyncio.QueueFull):   # wake it to see that it is dropped
                    sub.q.get_nowait()
                    sub.q.put_nowait({"kind": "_dropped"})

    # -- site status ------------------------------------------------------------------------
    #
    # A site's status is its best agent's (Active, Degraded after 3 intervals
    # without contact, Inactive after 10; Revoked). Contacts arrive as events
    # (AgentStore.seen); the moments a status changes by itself are known in
    # advance, so one timer waits for the earliest (a heap), not a clock tick.

    def _track(self) -> None:
        """Start following site status (the first siteStatus subscriber)."""
        if self._agents is not None:
            return
        self._agents = {r["id"]: {"site": r["site"], "last": r["last_seen"], "interval": r["interval_s"],
                                  "revoked": r["revoked"]} for r in self.agents.agents()}
        self._status = self._statuses(time.time())
        for cid in self._agents:
            self._push(cid)
        self._arm()

    def _statuses(self, now: float) -> dict[str, str]:
        from ..agents import status_of

        order = {"Active": 0, "Degraded": 1, "Inactive": 2, "Revoked": 3}
        out: dict[str, str] = {}
        for a in (self._agents or {}).values():
            st = "Revoked" if a["revoked"] else status_of(a["last"], a["interval"], now)
            cur = out.get(a["site"])
            if cur is None or order[st] < order[cur]:
                out[a["site"]] = st
        return out

    def _site_status_now(self, sites: set[str] | None = None) -> None:
        if self._agents is None:
            return
        now = time.time()
        fresh = self._statuses(now)
        old = self._status or {}
        for site in sorted(sites if sites is not None else set(fresh) | set(old)):
            if site in fresh and old.get(site) != fresh[site]:
                self.publish({"kind": "site", "site": site, "status": fresh[site], "previous": old.get(site),
                              "ts": now})
        self._status = fresh

    def _push(self, cid: str) -> None:
        a = (self._agents or {}).get(cid)
        if a is None or a["last"] is None or a["revoked"]:
            return
        from ..agents import DEGRADED_AFTER, INACTIVE_AFTER

        for k in (DEGRADED_AFTER, INACTIVE_AFTER):
            heapq.heappush(self._due, (a["last"] + k * a["interval"], cid, a["last"]))

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._due:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._due[0][0] - time.time()) + 0.001
        self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.time()
        sites: set[str] = set()
        while self._due and self._due[0][0] <= now:
            _, cid, last = heapq.heappop(self._due)
            a = (self._agents or {}).get(cid)
            if a is not None and a["last"] == last:   # not superseded by a later contact
                sites.add(a["site"])
        if sites:
            self._site_status_now(sites)
        self._arm()

    def _contact(self, ev: dict[str, Any]) -> None:
        if self._agents is None:
            return
        a = self._agents.get(ev["id"])
        if a is None:   # enrolled since: read it (a rare event)
            self._track_again()
            return
        a["last"] = ev["ts"]
        self._push(ev["id"])
        self._site_status_now({a["site"]})
        self._arm()

    def _track_again(self) -> None:
        """Re-read the agents (one enrolled or revoked) and publish what changed."""
        old = self._status
        self._agents = None
        self._track()
        if old is not None:
            fresh, self._status = self._status, old
            self._site_status_now(set(fresh or {}) | set(old))

    # -- subscribing ------------------------------------------------------------------------

    async def stream(self, info: Info[Context, None], kinds: set[str]) -> AsyncGenerator[dict[str, Any], None]:
        if "site" in kinds:
            self._track()
        sub = _Sub(kinds)
        self.subs.add(sub)
        try:
            while True:
                ev = await sub.q.get()
                if sub.dropped:
                    ws = info.context.request
                    with contextlib.suppress(Exception):
                        await ws.close(code=CLOSE_SLOW, reason=f"slow subscriber: more than {QUEUE} events waiting")
                    raise SlowSubscriber(f"dropped: more than {QUEUE} events waiting")
                yield ev
        finally:
            self.subs.discard(sub)


# -- the GraphQL types ------------------------------------------------------------------------------


@strawberry.type
class PathMetric:
    ts: float
    site: str
    path: str
    rtt_ms: float | None
    jitter_ms: float | None
    loss_pct: float | None
    mos: float | None


@strawberry.type
class PathState:
    ts: float
    site: str = strawberry.field(description="the site whose agent reported it")
    path: str
    state: str
    diag: str | None


@strawberry.type
class FailoverMove:
    ts: float
    site: str = strawberry.field(description="the site whose agent moved the traffic")
    reason: str
    policy: str | None
    to_site: str | None
    from_path: str | None
    to_path: str | None
    detail: str | None
    received: float = strawberry.field(description="when the controller stored it (Unix time)")


@strawberry.type
class SiteStatusChange:
    ts: float
    site: str
    status: str
    previous: str | None


@strawberry.type
class Change:
    seq: int
    ts: float
    type: str
    target: str
    etag: str | None
    after: JSON | None


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


async def _changes(info: Info[Context, None], action: str, kind: str) -> AsyncGenerator[Change, None]:
    """The service's changes of one kind, for a subscriber allowed ``action``."""
    require(info.context, action)
    async for ev in info.context.bus.stream(info, {kind}):
        yield Change(seq=ev["seq"], ts=ev["ts"], type=ev["type"], target=ev["target"], etag=ev.get("etag"),
                     after=ev.get("after"))


@strawberry.type
class Subscription:
    @strawberry.subscription(description="path metrics as agents report them (optionally of one path)")
    async def path_metrics(self, info: Info[Context, None], path: str | None = None) -> AsyncGenerator[PathMetric, None]:
        require(info.context, "paths.read")
        async for ev in info.context.bus.stream(info, {"metric"}):
            if path is None or ev["path"] == path:
                yield PathMetric(ts=ev["ts"], site=ev["site"], path=ev["path"], rtt_ms=_f(ev.get("rtt_ms")),
                                 jitter_ms=_f(ev.get("jitter_ms")), loss_pct=_f(ev.get("loss_pct")),
                                 mos=_f(ev.get("mos")))

    @strawberry.subscription(description="BFD state changes of paths as agents report them")
    async def path_state(self, info: Info[Context, None], path: str | None = None) -> AsyncGenerator[PathState, None]:
        require(info.context, "paths.read")
        async for ev in info.context.bus.stream(info, {"bfd"}):
            if path is None or ev["path"] == path:
                yield PathState(ts=ev["ts"], site=ev["site"], path=ev["path"], state=ev["state"],
                                diag=ev.get("diag"))

    @strawberry.subscription(description="failover moves (and path events) as agents report them")
    async def failover_moves(self, info: Info[Context, None], site: str | None = None,
                             policy: str | None = None) -> AsyncGenerator[FailoverMove, None]:
        require(info.context, "events.read")
        async for ev in info.context.bus.stream(info, {"event"}):
            if (site is None or ev["site"] == site) and (policy is None or ev.get("policy") == policy):
                yield FailoverMove(ts=ev["ts"], site=ev["site"], reason=ev["reason"], policy=ev.get("policy"),
                                   to_site=ev.get("to_site"), from_path=ev.get("from_path"),
                                   to_path=ev.get("to_path"), detail=ev.get("detail"), received=ev["received"])

    @strawberry.subscription(description="site status changes (Active, Degraded, Inactive, Revoked)")
    async def site_status(self, info: Info[Context, None]) -> AsyncGenerator[SiteStatusChange, None]:
        require(info.context, "sites.read")
        async for ev in info.context.bus.stream(info, {"site"}):
            yield SiteStatusChange(ts=ev["ts"], site=ev["site"], status=ev["status"], previous=ev.get("previous"))

    @strawberry.subscription(description="site changes (created, replaced, deleted), whoever made them")
    async def site_changes(self, info: Info[Context, None]) -> AsyncGenerator[Change, None]:
        async for c in _changes(info, "sites.read", "site_change"):
            yield c

    @strawberry.subscription(description="policy changes (created, replaced, deleted)")
    async def policy_changes(self, info: Info[Context, None]) -> AsyncGenerator[Change, None]:
        async for c in _changes(info, "policies.read", "policy"):
            yield c
