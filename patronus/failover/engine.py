"""The failover engine: which path each class of traffic takes to each
site, and when it moves.

A class is a policy, or the default class (``DEFAULT_CLASS``: traffic no
policy takes). For every (class, remote site) pair the engine keeps an
ordered list of candidate paths from the local site to that site (the
policy's ``prefer`` uplinks first, then the selector's ranking for the
policy's application, then path order) and the path in use. A policy whose
``match.dst`` lies outside a site's subnets has no pair for that site, and
drop policies have none at all. It moves a pair when

* BFD reports its path Down (``bfd_down``, at once),
* the path has violated the policy's SLA for ``sla_windows`` consecutive
  measurement windows (``sla_violation(loss 3.2 % > 1 % for voip)``),
* the preferred path has been healthy again for ``failback_hold_s``
  (``failback``), no sooner than ``cooldown_s`` after the last move,

and never onto a path that flap damping suppresses (``damped``): every Down
adds ``damp_penalty`` to the path, the penalty halves every
``damp_half_life_s``, a path above ``damp_suppress`` is not used until it
decays below ``damp_reuse`` (BGP route flap dampening, RFC 2439).

A move is one ``dataplane.set_path(policy, path.index, site=remote)``
(policy None for the default class): one (class, site) entry of the data
plane's route table; flows keep their records, and the other sites' paths
do not change. Every event goes to callbacks, to ``events()`` iterators and to the
SQLite state when a ``Store`` is given.

Times inside the engine (``now``, ``Event.ts``) are of its clock,
``time.monotonic`` (so holds and damping are immune to wall-clock steps);
the store gets wall-clock time (``time.time()``, as flow snapshots and path
metrics), converted when the event is written: ``ts + (time.time() -
clock())``.

``FailoverCore`` is the decision logic with an explicit clock (tests drive
it); ``Engine`` runs it on asyncio with real BFD sessions and a path monitor.

>>> from patronus import Mesh, Site, Uplink, Policy, Match, Failover
>>> mesh = Mesh("m")
>>> mesh.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("mpls", "192.0.2.1"), Uplink("lte", "198.51.100.1")]))
>>> mesh.add_site(Site("br", subnets=["10.2.0.0/24"], uplinks=[Uplink("inet", "203.0.113.1")]))
>>> mesh.add_policy(Policy("voip", Match(dst="10.2.0.0/24", proto="udp"), priority=1, app="voip", prefer=["mpls"]))
>>> mesh.failover = Failover(failback_hold_s=10)
>>> class Plane:                                   # any object with set_path(policy, slot, site)
...     def set_path(self, policy, slot, site): print("set_path", policy, slot, site)
>>> core = FailoverCore(mesh, Plane(), local_site="hq")
>>> _ = core.start(now=0.0)
set_path voip 0 br
set_path None 0 br
>>> [(e.policy, e.reason) for e in core.bfd("br.inet~hq.mpls", up=False, now=5.0)]
set_path voip 1 br
set_path None 1 br
[('voip', 'bfd_down'), ('(default)', 'bfd_down')]
>>> _ = core.bfd("br.inet~hq.mpls", up=True, now=6.0); core.tick(now=15.0)
[]
>>> [e.reason for e in core.tick(now=16.0)]
set_path voip 0 br
set_path None 0 br
['failback', 'failback']
>>> core.where()[("voip", "br")], core.where()[(DEFAULT_CLASS, "br")]
('br.inet~hq.mpls', 'br.inet~hq.mpls')
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .._fanout import Fanout
from ..apps import BUILTIN_PROFILES, AppProfile
from ..errors import ConfigError
from ..model import Failover, Path

__all__ = ["FailoverCore", "Engine", "Event", "DEFAULT_CLASS"]

# The name of the default class (no policy matched) in events and where():
# not a valid policy name, so it never collides with one.
DEFAULT_CLASS = "(default)"


@dataclass(frozen=True)
class Event:
    """One thing the engine did or noticed."""

    ts: float              # the engine's clock (time.monotonic); the store keeps wall time
    reason: str            # bfd_down, bfd_up, sla_violation, failback, reroute, damped, reuse, initial
    policy: str | None = None   # a move's class: a policy name or DEFAULT_CLASS
    from_path: str | None = None
    to_path: str | None = None
    detail: str | None = None
    site: str | None = None     # a move's destination site

    def as_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "reason": self.reason, "policy": self.policy, "site": self.site,
                "from_path": self.from_path, "to_path": self.to_path, "detail": self.detail}


@dataclass
class _PathHealth:
    path: Path
    bfd_up: bool | None = None        # None: no BFD on this path
    penalty: float = 0.0
    penalty_at: float = 0.0
    suppressed: bool = False
    healthy_since: float | None = 0.0
    sla_bad: dict[str, int] = field(default_factory=dict)   # app -> consecutive violating windows
    sla_why: dict[str, str] = field(default_factory=dict)

    def decayed(self, now: float, half_life: float) -> float:
        return self.penalty * math.pow(0.5, max(0.0, now - self.penalty_at) / half_life)


@dataclass
class _PolicyState:
    """One (class, remote site) pair: where its traffic goes now."""

    name: str              # policy name or DEFAULT_CLASS
    site: str              # remote site
    app: str
    candidates: list[str]
    prefer: dict[str, int] = field(default_factory=dict)  # local uplink -> rank in Policy.prefer
    current: str | None = None
    moved_at: float = -math.inf


class FailoverCore:
    """Failover decisions with an explicit clock. Methods return the events
    they produced (and have already acted on the data plane)."""

    def __init__(self, mesh: Any, dataplane: Any, *, local_site: str | None = None, selector: Any = None,
                 store: Any = None, profiles: dict[str, AppProfile] | None = None) -> None:
        names = [site.name for site in mesh.sites]
        if local_site is None and names:
            local_site = names[0]  # the site this agent runs at; the first one unless told
        if local_site not in names:
            raise ConfigError("Engine.local_site", local_site, "is not a site of the mesh")
        self.mesh, self.dataplane, self.selector, self.store = mesh, dataplane, selector, store
        self.local_site = local_site
        self.cfg: Failover = mesh.failover
        self.profiles = {**BUILTIN_PROFILES, **dict(getattr(mesh, "profiles", None) or {}), **(profiles or {})}
        self.paths: dict[str, _PathHealth] = {}
        for remote in names:
            if remote != local_site:
                for p in mesh.paths(local_site, remote):
                    self.paths[p.id] = _PathHealth(p)
        # (class, remote site) -> its state; the default class last
        self.pairs: dict[tuple[str, str], _PolicyState] = {}
        classes = [(p.name, p.app or "default", p.prefer, p.match.dst) for p in mesh.policies if p.action != "drop"]
        classes.append((DEFAULT_CLASS, "default", (), None))
        for name, app, prefer, dst in classes:
            for remote in names:
                if remote == local_site or not self._reaches(dst, remote):
                    continue
                cands = [p.id for p in mesh.paths(local_site, remote)]
                st = _PolicyState(name, remote, app, cands, {u: i for i, u in enumerate(prefer)})
                st.candidates = sorted(cands, key=lambda pid, st=st: (self._pref(st, pid), self.paths[pid].path.index))
                self.pairs[(name, remote)] = st
        self._events: Fanout[Event] = Fanout()
        # the clock ``now`` comes from; events are stored in wall time (wall_time)
        self._clock: Callable[[], float] = time.monotonic
        self.set_path_calls = 0
        # fate sharing: after a path over a local uplink goes down, the other
        # paths over that uplink are suspect for a while (their own BFD may
        # not have noticed yet); backups avoid them when there is a choice
        self._suspect: dict[str, float] = {}

    # -- set-up ---------------------------------------------------------------

    def _reaches(self, dst: str | None, remote: str) -> bool:
        """Can a policy matching destination prefix ``dst`` take traffic to ``remote``?"""
        if dst is None:
            return True
        net = ipaddress.ip_network(dst)
        return any(net.version == sn.version and net.overlaps(sn)
                   for sn in map(ipaddress.ip_network, self.mesh.site(remote).subnets))

    def _local_uplink(self, pid: str) -> str:
        p = self.paths[pid].path
        return p.local_uplink if p.local_site == self.local_site else p.remote_uplink

    def _pref(self, st: _PolicyState, pid: str) -> int:
        """Rank of the path's local uplink in the policy's ``prefer`` (unlisted last)."""
        return st.prefer.get(self._local_uplink(pid), len(st.prefer))

    def on_event(self, callback: Callable[[Event], Any]) -> None:
        self._events.subscribe(callback)

    # -- health ---------------------------------------------------------------

    def _usable(self, pid: str, app: str) -> bool:
        h = self.paths[pid]
        return h.bfd_up is not False and not h.suppressed and h.sla_bad.get(app, 0) < self.cfg.sla_windows

    def _healthy_for(self, pid: str, app: str, now: float) -> float:
        h = self.paths[pid]
        if not self._usable(pid, app) or h.healthy_since is None:
            return -1.0
        return now - h.healthy_since

    def _best(self, st: _PolicyState, now: float | None = None) -> str | None:
        order = st.candidates
        if self.selector is not None:  # the selector's ranking among equally preferred paths
            order = self._ranked(st)
        usable = [pid for pid in order if self._usable(pid, st.app)]
        if now is not None:
            clear = [pid for pid in usable if self._suspect.get(self._local_uplink(pid), -math.inf) <= now]
            if clear:
                return clear[0]
        return usable[0] if usable else None

    def _ranked(self, st: _PolicyState) -> list[str]:
        try:
            scores = self.selector.scores_
            names = [p.name for p in self.selector.profiles]
            c = names.index(st.app) if st.app in names else None
            idx = self.selector._index
        except (AttributeError, ValueError):
            return st.candidates
        if c is None:
            return st.candidates
        return sorted(st.candidates, key=lambda pid: (self._pref(st, pid),
                                                      -float(scores[c, idx[pid]]) if pid in idx else 0.0))

    # -- acting -----------------------------------------------------------------

    def wall_time(self, ts: float) -> float:
        """``ts`` of the engine's clock as wall-clock time (``time.time()``),
        by the offset between the two clocks now."""
        return ts + (time.time() - self._clock())

    def _emit(self, ev: Event) -> Event:
        if self.store is not None:
            self.store.add_event(ev.reason, policy=ev.policy, from_path=ev.from_path, to_path=ev.to_path,
                                 detail=ev.detail, ts=self.wall_time(ev.ts), site=ev.site)
        self._events.publish(ev)
        return ev

    def _move(self, st: _PolicyState, to: str, reason: str, detail: str | None, now: float) -> Event:
        frm = st.current
        self.dataplane.set_path(None if st.name == DEFAULT_CLASS else st.name, self.paths[to].path.index,
                                site=st.site)
        self.set_path_calls += 1
        st.current, st.moved_at = to, now
        return self._emit(Event(now, reason, st.name, frm, to, detail, site=st.site))

    def start(self, now: float) -> list[Event]:
        """Put every policy on its best usable path."""
        out = []
        for st in self.pairs.values():
            best = self._best(st)
            if best is not None:
                out.append(self._move(st, best, "initial", None, now))
        return out

    def bfd(self, path_id: str, up: bool, now: float) -> list[Event]:
        """A BFD state change on a path."""
        h = self.paths.get(path_id)
        if h is None:
            raise ConfigError("Engine.bfd", path_id, "is not a path of the local site")
        out: list[Event] = []
        if h.bfd_up is not False and not up:
            h.bfd_up = False
            h.healthy_since = None
            h.penalty = h.decayed(now, self.cfg.damp_half_life_s) + self.cfg.damp_penalty
            h.penalty_at = now
            if not h.suppressed and h.penalty > self.cfg.damp_suppress:
                h.suppressed = True
                out.append(self._emit(Event(now, "damped", None, path_id, None,
                                            f"penalty {h.penalty:.0f} > {self.cfg.damp_suppress:g}")))
            self._suspect[self._local_uplink(path_id)] = now + 2 * self.cfg.detect_ms / 1000
            for st in self.pairs.values():
                if st.current == path_id:
                    to = self._best(st, now)
                    if to is not None and to != path_id:
                        out.append(self._move(st, to, "bfd_down", f"{path_id} down", now))
        elif up and h.bfd_up is not True:
            h.bfd_up = True
            h.healthy_since = now
            out.append(self._emit(Event(now, "bfd_up", None, None, path_id, None)))
            # a pair to this path's site with no usable path at all takes it at once
            for st in self.pairs.values():
                if path_id in st.candidates and st.current is not None and not self._usable(st.current, st.app) \
                        and self._usable(path_id, st.app):
                    out.append(self._move(st, path_id, "bfd_up", f"{path_id} up, {st.current} unusable", now))
        return out

    def sla(self, path_id: str, violations: dict[str, str | None], now: float) -> list[Event]:
        """One measurement window of a path: for each application, the SLA
        violation (a reason such as ``loss 3.2 % > 1 %``) or None."""
        h = self.paths[path_id]
        out: list[Event] = []
        for app, why in violations.items():
            was = h.sla_bad.get(app, 0)
            if why is None:
                h.sla_bad[app] = 0
                if was >= self.cfg.sla_windows and h.bfd_up is not False:
                    h.healthy_since = now
                continue
            h.sla_bad[app] = was + 1
            h.sla_why[app] = why
            if h.sla_bad[app] == self.cfg.sla_windows:
                h.healthy_since = None
                for st in self.pairs.values():
                    if st.current == path_id and st.app == app:
                        to = self._best(st)
                        if to is not None and to != path_id:
                            out.append(self._move(st, to, "sla_violation", f"{why} for {app}", now))
        return out

    def tick(self, now: float) -> list[Event]:
        """Damping decay and failback; call it every few hundred ms."""
        out: list[Event] = []
        for pid, h in self.paths.items():
            if h.suppressed and h.decayed(now, self.cfg.damp_half_life_s) < self.cfg.damp_reuse:
                h.suppressed = False
                h.penalty, h.penalty_at = h.decayed(now, self.cfg.damp_half_life_s), now
                if h.bfd_up is not False:
                    h.healthy_since = now
                out.append(self._emit(Event(now, "reuse", None, None, pid, "penalty decayed")))
        for st in self.pairs.values():
            best = self._best(st)
            if best is None or best == st.current:
                continue
            cur_ok = st.current is not None and self._usable(st.current, st.app)
            if not cur_ok:
                out.append(self._move(st, best, "failback" if best == st.candidates[0] else "reroute",
                                      f"{st.current} unusable", now))
                continue
            if st.candidates.index(best) >= st.candidates.index(st.current):
                continue  # only better-preferred paths pull traffic back
            if now - st.moved_at < self.cfg.cooldown_s:
                continue
            if self._healthy_for(best, st.app, now) >= self.cfg.failback_hold_s:
                out.append(self._move(st, best, "failback", f"{best} healthy for {self.cfg.failback_hold_s:g} s",
                                      now))
        return out

    def where(self) -> dict[tuple[str, str], str | None]:
        """(class, remote site) -> path id in use; the class is a policy name
        or DEFAULT_CLASS."""
        return {k: st.current for k, st in self.pairs.items()}


class Engine(FailoverCore):
    """The failover engine on asyncio: ``watch(path_id, bfd_session)`` feeds
    BFD state changes in as they happen; ``watch_monitor(monitor)`` feeds
    each path's metrics every ``window_s`` as SLA windows; ``await run()``
    ticks until ``stop()``; ``async for ev in events()`` follows it."""

    def __init__(self, mesh: Any, dataplane: Any, selector: Any = None, *, local_site: str | None = None,
                 store: Any = None, window_s: float = 1.0, tick_s: float = 0.1, **kw: Any) -> None:
        super().__init__(mesh, dataplane, local_site=local_site, selector=selector, store=store, **kw)
        self.window_s, self.tick_s = window_s, tick_s
        self._monitor: Any = None
        self._stop: asyncio.Event | None = None

    def watch(self, path_id: str, session: Any) -> None:
        from .bfd import State

        def changed(t: Any) -> None:
            if t.new == State.UP:
                self.bfd(path_id, True, self._clock())
            elif t.old == State.UP or t.new in (State.DOWN, State.ADMIN_DOWN):
                self.bfd(path_id, False, self._clock())

        session.on_change(changed)
        if session.state == State.UP:
            self.bfd(path_id, True, self._clock())

    def watch_monitor(self, monitor: Any) -> None:
        self._monitor = monitor

    def events(self) -> AsyncIterator[Event]:
        """Every event from now on (``async for ev in engine.events()``)."""
        return self._events.stream()

    def _window(self, now: float) -> None:
        mon = self._monitor
        apps = {st.app for st in self.pairs.values() if st.app in self.profiles}
        for pid in self.paths:
            if pid not in mon.paths():
                continue
            m = mon.metrics(pid)
            if m.samples:
                self.sla(pid, {app: self.profiles[app].violation(m.rtt_ms, m.jitter_ms, m.loss_pct, m.alive)
                               for app in apps}, now)

    async def run(self) -> None:
        self._stop = asyncio.Event()
        self.start(self._clock())
        next_window = self._clock() + self.window_s
        while not self._stop.is_set():
            now = self._clock()
            if self._monitor is not None and now >= next_window:
                self._window(now)
                next_window = now + self.window_s
            self.tick(now)
            try:
                await asyncio.wait_for(self._stop.wait(), self.tick_s)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
