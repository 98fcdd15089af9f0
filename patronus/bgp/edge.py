"""One site's BGP edge: what its routers announce, what it advertises to them.

* **Learned**: every route a router announces goes into the RIB-in (per
  neighbor); :class:`patronus.bgp.RouteFilter` decides which are accepted,
  in the order they arrived. Refusals are counted by reason (and kept per
  prefix while they last), nothing else is affected. Accepted prefixes get a
  kernel route through the router that announced them (``proto bgp``) and
  become the site's announced subnets (``learned()``, plus ``Bgp.networks``):
  the agent announces them into the mesh, where the registry checks them
  again, and every other site's data plane, tunnels and path tables take them.
* **Advertised**: the agent hands ``advertise()`` the prefixes of every
  remote site it can reach, each with its site's community; the edge sends
  ExaBGP the difference (``next-hop self``: the edge's address on the LAN).
* **The speaker dying** is not the routers withdrawing: the learned routes,
  their kernel routes and the mesh's forwarding stay; the speaker is
  restarted (backoff 0.5 s doubling to 8 s); once a neighbor's session is up
  again, what it did not announce again within ``GRACE_S`` goes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import Bgp, RouteFilter
from .speaker import ExaBgp

log = logging.getLogger("patronus.bgp")

__all__ = ["BgpEdge", "GRACE_S"]

GRACE_S = 10.0       # after a restarted speaker's session is up: routes not announced again by then go
STALE_S = 120.0      # a dead speaker's routes go after this long without its session back (its restart time)
# learned routes' kernel metric: beside, never replacing, a route the site has already (its connected LAN,
# its default route); ``ip route replace`` matches on the metric too
KERNEL_METRIC = "20"
MAX_RIB = 200_000    # RIB-in entries kept (all neighbors); past it announcements are refused as max_prefixes


@attrs.define
class _Route:
    neighbor: str
    prefix: str
    next_hop: str
    as_path: tuple[int, ...]
    seq: int
    stale: bool = False


def _as_path(attr: Mapping[str, Any]) -> tuple[int, ...]:
    raw = attr.get("as-path")
    out: list[int] = []
    if isinstance(raw, Mapping):   # ExaBGP 5: {"0": {"element": "as-sequence", "value": [..]}}
        for seg in raw.values():
            if isinstance(seg, Mapping) and isinstance(seg.get("value"), list):
                out += [a for a in seg["value"] if isinstance(a, int)]
    elif isinstance(raw, list):    # ExaBGP 4: [65001, 65002]
        out = [a for a in raw if isinstance(a, int)]
    return tuple(out)


class BgpEdge:
    """The BGP side of a site agent (see the module docstring).

    ``on_learned()`` is called (on the event loop) whenever the accepted set
    changes. ``route(cmds)`` runs ``ip route`` commands (argument tuples
    after ``route``) in the site's namespace, all at once (the agent runs
    one ``ip -batch``: each ``ip`` is a process started from the event loop). ``speaker`` builds the speaker
    (default :class:`ExaBgp`).
    """

    def __init__(self, bgp: Bgp, *, workdir: Path, local: Mapping[str, str], router_id: str,
                 lan_if: str | None, route: Callable[..., Any], on_learned: Callable[[], None],
                 speaker: Callable[..., Any] = ExaBgp) -> None:
        self.bgp = bgp
        self.lan_if = lan_if
        self._route = route
        self._on_learned = on_learned
        self._make = lambda: speaker(bgp, workdir, local=local, router_id=router_id, on_message=self._message,
                                     on_connect=self._connected, on_exit=self._exited, routes=self._configured)
        self.speaker: Any = self._make()
        self.filter = RouteFilter(bgp, own=[], others={})
        self.rib: dict[tuple[str, str], _Route] = {}
        self.accepted: dict[str, _Route] = {}
        self.refused: collections.Counter[str] = collections.Counter()   # refusals, by reason, since start
        self.refused_now: dict[str, str] = {}                             # prefix -> reason, while announced
        self.sessions: dict[str, str] = {n.address: "idle" for n in bgp.neighbors}
        self.want: dict[str, str] = {}      # prefix -> community, advertised to every router of its family
        self.speaker_exits = 0
        self.restarts = 0
        self.updates = 0                    # update messages received
        self.looped = 0                     # routes dropped for our own AS in their path (our own, reflected)
        self.last_change: float | None = None   # wall time the accepted set last changed
        self._seq = 0
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._restart: asyncio.Task[None] | None = None
        self._stopped = False
        self._installed: dict[str, str] = {}   # prefix -> next hop of its kernel route
        self._static: dict[str, str] = {}      # the routes the running speaker's configuration announces
        self._failing = 0                      # exits since a session was last up (the restart backoff)
        self._stale_timer: asyncio.TimerHandle | None = None
        self._cap = max(1_000, 4 * bgp.max_prefixes)   # RIB-in entries a neighbor may hold; past it: dropped

    # -- what the agent reads ------------------------------------------------------------

    def learned(self) -> tuple[str, ...]:
        """The site's announced subnets: ``Bgp.networks`` and every accepted
        prefix except a default route (never announced into the mesh)."""
        nets = {ipaddress.ip_network(p) for p in (*self.bgp.networks, *self.accepted)}
        nets = {n for n in nets if n.prefixlen}
        # a prefix inside another one the site announces adds nothing (and a site's subnets may not overlap)
        top = [n for n in nets if not any(o != n and o.version == n.version and n.subnet_of(o)  # type: ignore[arg-type]
                                          for o in nets)]
        return tuple(str(n) for n in sorted(top, key=lambda n: (n.version, n)))

    def status(self) -> dict[str, Any]:
        return {"sessions": dict(self.sessions), "received": len(self.rib), "accepted": sorted(self.accepted),
                "refused": dict(self.refused), "refused_now": dict(self.refused_now),
                "advertised": sorted(self.want),
                "speaker": {"alive": self.speaker.alive, "pid": getattr(self.speaker, "pid", None),
                            "exits": self.speaker_exits, "restarts": self.restarts},
                "updates": self.updates, "looped": self.looped, "last_change": self.last_change}

    # -- inputs from the agent -----------------------------------------------------------

    def set_space(self, own: Sequence[str], others: Mapping[str, Sequence[str]]) -> None:
        """The site's subnets and every other site's (the mesh changed):
        every learned route is judged again."""
        self.filter = RouteFilter(self.bgp, own, others)
        self._evaluate()

    def advertise(self, routes: Mapping[str, str]) -> None:
        """Advertise exactly ``routes`` (prefix -> community, see
        :func:`patronus.bgp.community_of`) to the routers."""
        for p in sorted(set(self.want) - set(routes)):
            del self.want[p]
            self._send_route("withdraw", p, None)
        for p, c in sorted(routes.items()):
            if self.want.get(p) != c:
                self.want[p] = c
                self._send_route("announce", p, c)

    def _send_route(self, verb: str, prefix: str, community: str | None) -> None:
        v = ipaddress.ip_network(prefix).version
        for n in self.bgp.neighbors:
            if ipaddress.ip_address(n.address).version != v:
                continue
            tail = f" next-hop self {community}" if verb == "announce" else ""
            self.speaker.send(f"neighbor {n.address} {verb} route {prefix}{tail}")

    # -- the speaker -----------------------------------------------------------------------

    async def start(self) -> None:
        self._stopped = False
        await self.speaker.start()

    async def stop(self) -> None:
        """Stop the speaker and remove the kernel routes of learned prefixes."""
        self._stopped = True
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
        for h in self._grace.values():
            h.cancel()
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        await self.speaker.stop()
        self._route([("del", p, "via", nh, "proto", "bgp", "metric", KERNEL_METRIC)
                     for p, nh in sorted(self._installed.items())])
        self._installed.clear()

    def _configured(self) -> dict[str, str]:
        """The routes a starting speaker's configuration announces: what is
        advertised now (they precede its End-of-RIB, see speaker.py)."""
        self._static = dict(self.want)
        return self._static

    def _connected(self) -> None:
        """The API is up (first start or a restart): everything advertised
        again, and what its configuration announces but is no longer wanted
        (withdrawn while it started) withdrawn."""
        for p in sorted(set(self._static) - set(self.want)):
            self._send_route("withdraw", p, None)
        for p, c in sorted(self.want.items()):
            self._send_route("announce", p, c)

    def _exited(self, rc: int | None) -> None:
        if self._stopped:
            return
        self.speaker_exits += 1
        self._failing += 1
        for h in self._grace.values():   # a sweep meant for the previous speaker's sessions
            h.cancel()
        self._grace.clear()
        for r in self.rib.values():
            r.stale = True
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        # never back: what it learned goes after its restart time (a speaker that cannot start again)
        self._stale_timer = asyncio.get_running_loop().call_later(STALE_S, self._expire_stale)
        for n in self.sessions:
            self.sessions[n] = "unknown"
        log.warning("BGP speaker exited (rc %s, %d times so far): restarting it; the %d learned prefixes, their "
                    "routes and forwarding are kept", rc, self.speaker_exits, len(self.accepted),
                    extra={"reason": "bgp_speaker_exit"})
        self._restart = asyncio.get_running_loop().create_task(self._restart_later())

    def _expire_stale(self) -> None:
        self._stale_timer = None
        gone = [k for k, r in self.rib.items() if r.stale]
        for k in gone:
            del self.rib[k]
        if gone:
            log.warning("bgp: %d routes of a speaker that did not come back expired", len(gone))
            self._evaluate()

    async def _restart_later(self) -> None:
        delay = min(8.0, 0.5 * 2 ** min(self._failing - 1, 4))
        while not self._stopped:
            await asyncio.sleep(delay)
            try:
                self.speaker = self._make()
                await self.speaker.start()
                self.restarts += 1
                return
            except Exception as e:   # not startable now: try again, slower
                log.warning("BGP speaker restart failed: %s", e)
                delay = min(8.0, delay * 2)

    # -- messages ----------------------------------------------------------------------------

    def _message(self, msg: dict[str, Any]) -> None:
        if self._stopped:   # lines still buffered when the edge stopped: its routes are being removed
            return
        kind = msg.get("type")
        nb = msg.get("neighbor")
        if not isinstance(nb, Mapping):
            return
        addr = nb.get("address")
        peer = addr.get("peer") if isinstance(addr, Mapping) else None
        if peer not in self.sessions:
            return   # not a neighbor of ours
        if kind == "state":
            self._state(peer, str(nb.get("state")))
        elif kind == "update":
            upd = (nb.get("message") or {}).get("update") if isinstance(nb.get("message"), Mapping) else None
            if isinstance(upd, Mapping) and nb.get("direction", "receive") == "receive":
                self.updates += 1
                self._update(peer, upd)

    def _state(self, peer: str, state: str) -> None:
        old, self.sessions[peer] = self.sessions[peer], state
        if state == old:
            return
        log.info("bgp session %s %s (was %s)", peer, state, old, extra={"reason": f"bgp_{state}"})
        if state == "down":   # the router is gone: its routes are withdrawn
            for key in [k for k in self.rib if k[0] == peer]:
                del self.rib[key]
            self._evaluate()
        elif state == "up":
            self._failing = 0
        if state == "up" and any(r.stale for r in self.rib.values() if r.neighbor == peer):
            h = self._grace.pop(peer, None)
            if h is not None:
                h.cancel()
            self._grace[peer] = asyncio.get_running_loop().call_later(GRACE_S, self._sweep, peer)

    def _sweep(self, peer: str) -> None:
        """A restarted speaker's session has been up GRACE_S: what the router
        did not announce again is gone."""
        self._grace.pop(peer, None)
        gone = [k for k, r in self.rib.items() if r.neighbor == peer and r.stale]
        for k in gone:
            del self.rib[k]
        if gone:
            self._evaluate()

    def _update(self, peer: str, upd: Mapping[str, Any]) -> None:
        attr = upd.get("attribute") if isinstance(upd.get("attribute"), Mapping) else {}
        path = _as_path(attr)
        changed = False
        new: list[str] = []
        wd = upd.get("withdraw")
        if isinstance(wd, Mapping):
            for nlris in wd.values():
                for e in nlris if isinstance(nlris, list) else ():
                    p = e.get("nlri") if isinstance(e, Mapping) else None
                    if isinstance(p, str) and self.rib.pop((peer, p), None) is not None:
                        changed = True
        ann = upd.get("announce")
        if isinstance(ann, Mapping):
            for by_nh in ann.values():
                if not isinstance(by_nh, Mapping):
                    continue
                for nh, nlris in by_nh.items():
                    for e in nlris if isinstance(nlris, list) else ():
                        p = e.get("nlri") if isinstance(e, Mapping) else None
                        if not isinstance(p, str):
                            continue
                        try:
                            p = str(ipaddress.ip_network(p))
                            nh = str(ipaddress.ip_address(nh))
                        except ValueError:
                            self.refused["bad_prefix"] += 1
                            continue
                        old = self.rib.get((peer, p))
                        if old is None and (len(self.rib) >= MAX_RIB or (
                                len(self.rib) >= self._cap and sum(k[0] == peer for k in self.rib) >= self._cap)):
                            # a router sending far more than it may (a full table): the excess is not kept
                            self.refused["max_prefixes"] += 1
                            continue
                        if old is None:
                            self._seq += 1
                            self.rib[(peer, p)] = _Route(peer, p, nh, path, self._seq)
                            new.append(p)
                        else:
                            old.next_hop, old.as_path, old.stale = nh, path, False
                        changed = True
        if changed:
            self._evaluate()
        for p in new:   # counted once, when it comes: a refusal is an event, not a state
            reason = self.refused_now.get(p)
            if self.bgp.asn in path:   # our own advertisement coming back: normal, counted apart
                self.looped += 1
            elif reason:
                self.refused[reason] += 1
                log.warning("bgp: %s announced %s: refused (%s)", peer, p, reason,
                            extra={"reason": f"bgp_refused_{reason}"})

    def _evaluate(self) -> None:
        """Accepted = the RIB-in through the filter, in arrival order; kernel
        routes and the agent follow the difference."""
        acc: dict[str, _Route] = {}
        refused: dict[str, str] = {}
        for r in sorted(self.rib.values(), key=lambda r: r.seq):
            if r.prefix in acc:
                continue   # another router announced it first
            reason = self.filter.check(r.prefix, r.as_path, len(acc))
            if reason == "as_loop":
                continue
            if reason:
                refused[r.prefix] = reason
            else:
                acc[r.prefix] = r
        self.refused_now = refused
        before = {p: r.next_hop for p, r in self.accepted.items()}
        self.accepted = acc
        after = {p: r.next_hop for p, r in acc.items()}
        if before == after:
            return
        cmds: list[tuple[str, ...]] = []
        for p in sorted(set(before) - set(after)):
            cmds.append(("del", p, "via", before[p], "proto", "bgp", "metric", KERNEL_METRIC))
            self._installed.pop(p, None)
        for p, nh in sorted(after.items()):
            if before.get(p) != nh:
                dev = ("dev", self.lan_if) if self.lan_if else ()
                cmds.append(("replace", p, "via", nh, *dev, "proto", "bgp", "metric", KERNEL_METRIC))
                self._installed[p] = nh
        if cmds:
            self._route(cmds)
        self.last_change = time.time()
        log.info("bgp: %d prefixes accepted (%s)", len(acc), ", ".join(sorted(acc)) or "none")
        self._on_learned()
