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

Two layers, as in ``bfd`` / ``transport``:

* ``FailoverCore`` is the decision logic, sans-I/O: its inputs are a path's
  BFD state, a path's metrics (one SLA window) and the time (``tick``), each
  with an explicit ``now``; each returns an ``Outcome``: the moves to make
  (``Move``: (class, site) -> path) and the events (``Event``). It touches
  neither the data plane nor the store, so tests drive it with any clock.
* ``Engine`` composes a core with a data plane and a store: it applies the
  moves of each outcome with one ``dataplane.set_paths(moves)`` (checked
  before any is written: all or nothing; one (class, site) entry of the
  route table per move, flows keep their records), writes the events to the
  SQLite state, passes them to ``on_event`` callbacks and ``events()``
  iterators, and runs on asyncio with real BFD sessions and a path monitor.

Times inside the engine (``now``, ``Event.ts``) are of its clock,
``time.monotonic`` (so holds and damping are immune to wall-clock steps);
the store gets wall-clock time (``time.time()``, as flow snapshots and path
metrics), converted when the event is written: ``ts + (time.time() -
clock())``.

>>> from patronus import Mesh, Site, Uplink, Policy, Match, Failover
>>> mesh = Mesh("m")
>>> mesh.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("mpls", "192.0.2.1"), Uplink("lte", "198.51.100.1")]))
>>> mesh.add_site(Site("br", subnets=["10.2.0.0/24"], uplinks=[Uplink("inet", "203.0.113.1")]))
>>> mesh.add_policy(Policy("voip", Match(dst="10.2.0.0/24", proto="udp"), priority=1, app="voip", prefer=["mpls"]))
>>> mesh.failover = Failover(failback_hold_s=10)
>>> core = FailoverCore(mesh, local_site="hq")
>>> [(m.cls, m.site, m.path, m.slot) for m in core.start(now=0.0).moves]
[('voip', 'br', 'br.inet~hq.mpls', 0), ('(default)', 'br', 'br.inet~hq.mpls', 0)]
>>> out = core.bfd("br.inet~hq.mpls", up=False, now=5.0)
>>> [m.dataplane() for m in out.moves]          # what DataPlane.set_paths takes
[('voip', 'br', 1), (None, 'br', 1)]
>>> [(e.policy, e.reason) for e in out.events]
[('voip', 'bfd_down'), ('(default)', 'bfd_down')]
>>> _ = core.bfd("br.inet~hq.mpls", up=True, now=6.0); core.tick(now=15.0).moves
()
>>> [e.reason for e in core.tick(now=16.0).events]
['failback', 'failback']
>>> core.where()[("voip", "br")], core.where()[(DEFAULT_CLASS, "br")]
('br.inet~hq.mpls', 'br.inet~hq.mpls')

The same with a data plane (``Engine`` applies each outcome and returns its
events):

>>> from patronus.dataplane import Userspace
>>> engine = Engine(mesh, Userspace(mesh.policy_table(), flow_capacity=64), local_site="hq")
>>> _ = engine.start(now=0.0)
>>> [e.reason for e in engine.bfd("br.inet~hq.mpls", up=False, now=5.0)]
['bfd_down', 'bfd_down']
>>> engine.dataplane.path_of("voip", "br"), engine.set_path_calls
(1, 4)
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .._fanout import Fanout
from ..apps import BUILTIN_PROFILES, AppProfile
from ..errors import ConfigError
from ..tracing import enabled as _tracing_on, span as _span
from ..model import Failover, Path

if TYPE_CHECKING:
    from ..dataplane.base import DataPlane
    from ..mesh import Mesh
    from ..paths.stats import Metrics
    from ..store import Store

__all__ = ["FailoverCore", "Engine", "Event", "Move", "Outcome", "DEFAULT_CLASS"]

# The name of the default class (no policy matched) in events and where():
# not a valid policy name, so it never collides with one.
DEFAULT_CLASS = "(default)"


@dataclass(frozen=True)
class Event:
    """One thing the engine did or noticed."""

    ts: float              # the engine's clock (time.monotonic); the store keeps wall time
    reason: str            # bfd_down, bfd_up, sla_violation, failback, reroute, damped, reuse, initial, config
    policy: str | None = None   # a move's class: a policy name or DEFAULT_CLASS
    from_path: str | None = None
    to_path: str | None = None
    detail: str | None = None
    site: str | None = None     # a move's destination site

    def as_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "reason": self.reason, "policy": self.policy, "site": self.site,
                "from_path": self.from_path, "to_path": self.to_path, "detail": self.detail}


class Move(NamedTuple):
    """One (class, remote site) pair pointed at a path.

    >>> Move("voip", "br", "br.inet~hq.lte", 1).dataplane()
    ('voip', 'br', 1)
    >>> Move(DEFAULT_CLASS, "br", "br.inet~hq.lte", 1).dataplane()
    (None, 'br', 1)
    """

    cls: str    # a policy name or DEFAULT_CLASS
    site: str   # the remote site
    path: str   # the path id
    slot: int   # the path's index: its slot in the data plane

    def dataplane(self) -> tuple[str | None, str, int]:
        """This move as ``DataPlane.set_paths`` takes it: (policy or None for
        the default class, site, path slot)."""
        return (None if self.cls == DEFAULT_CLASS else self.cls, self.site, self.slot)


@dataclass(frozen=True)
class Outcome:
    """What one input to a ``FailoverCore`` led to: the moves to apply, in
    order, and every event, in order; each move has exactly one event (its
    ``policy``, ``site`` and ``to_path`` are the move's), the other events
    are about a path (``policy`` and ``site`` None)."""

    moves: tuple[Move, ...] = ()
    events: tuple[Event, ...] = ()
    # (pair, path in use, moved_at) before the moves: what FailoverCore.revert restores
    prior: tuple[tuple[tuple[str, str], str | None, float], ...] = field(default=(), repr=False, compare=False)


class _Collect:
    """The moves and events of one input, as they happen."""

    def __init__(self) -> None:
        self.moves: list[Move] = []
        self.events: list[Event] = []
        self.prior: list[tuple[tuple[str, str], str | None, float]] = []

    def outcome(self) -> Outcome:
        return Outcome(tuple(self.moves), tuple(self.events), tuple(self.prior))


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


def _duplicating(mesh: Mesh) -> frozenset[str]:
    """The policies whose packets are copied onto a second path."""
    return frozenset(p.name for p in mesh.policies if p.qos.duplicate and p.action != "drop")


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
    """Failover decisions, sans-I/O: inputs with an explicit ``now``, each
    returning an ``Outcome`` (moves and events). Nothing here writes the
    data plane or the store; ``Engine`` does.

    ``selector``: a ``patronus.paths.Selector`` whose scores rank the paths
    among those equally preferred (read on every decision).
    """

    def __init__(self, mesh: Mesh, *, local_site: str | None = None, selector: Any = None,
                 profiles: Mapping[str, AppProfile] | None = None) -> None:
        names = [site.name for site in mesh.sites]
        if local_site is None and names:
            local_site = names[0]  # the site this agent runs at; the first one unless told
        if local_site not in names:
            raise ConfigError("Engine.local_site", local_site, "is not a site of the mesh")
        self.mesh, self.selector = mesh, selector
        self.local_site: str = local_site
        self.cfg: Failover = mesh.failover
        self._given_profiles = dict(profiles or {})
        self.profiles = {**BUILTIN_PROFILES, **dict(getattr(mesh, "profiles", None) or {}), **self._given_profiles}
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

    def local_uplink(self, path_id: str) -> str:
        """The local site's uplink a path leaves by."""
        p = self.paths[path_id].path
        return p.local_uplink if p.local_site == self.local_site else p.remote_uplink

    def _pref(self, st: _PolicyState, pid: str) -> int:
        """Rank of the path's local uplink in the policy's ``prefer`` (unlisted last)."""
        return st.prefer.get(self.local_uplink(pid), len(st.prefer))

    # -- health ---------------------------------------------------------------

    def usable(self, path_id: str, app: str) -> bool:
        """May traffic of application ``app`` take this path now: BFD not
        Down, not damped, and its SLA for ``app`` not violated."""
        h = self.paths[path_id]
        return h.bfd_up is not False and not h.suppressed and h.sla_bad.get(app, 0) < self.cfg.sla_windows

    def _healthy_for(self, pid: str, app: str, now: float) -> float:
        h = self.paths[pid]
        if not self.usable(pid, app) or h.healthy_since is None:
            return -1.0
        return now - h.healthy_since

    def _best(self, st: _PolicyState, now: float | None = None) -> str | None:
        order = st.candidates
        if self.selector is not None:  # the selector's ranking among equally preferred paths
            order = self._ranked(st)
        usable = [pid for pid in order if self.usable(pid, st.app)]
        if now is not None:
            clear = [pid for pid in usable if self._suspect.get(self.local_uplink(pid), -math.inf) <= now]
            if clear:
                return clear[0]
        if usable:
            return usable[0]
        # nothing usable: the least bad path still forwards. An SLA violation says the quality is poor, not
        # that the path cannot carry traffic, and no path drops it all (a new pair had none: a policy added
        # while every path of its site violated the policy's SLA was black-holed until one recovered). Never
        # a path that is BFD Down or damped; the pair stays where it is when that is as good as any
        alive = [p for p in order if self.paths[p].bfd_up is not False and not self.paths[p].suppressed]
        if alive:
            return st.current if st.current in alive else alive[0]
        return None

    def second(self, st: _PolicyState, now: float | None = None) -> str | None:
        """Where a duplicating pair's copies go: the best usable path besides
        the one in use, over another local uplink when there is one (a cut
        uplink takes every path over it); None without one."""
        if st.current is None:
            return None
        order = self._ranked(st) if self.selector is not None else st.candidates
        usable = [pid for pid in order if pid != st.current and self.usable(pid, st.app)]
        if not usable:
            return None
        here = self.local_uplink(st.current)

        def suspect(pid: str) -> bool:
            return now is not None and self._suspect.get(self.local_uplink(pid), -math.inf) > now

        # another uplink first (what cuts the path in use cannot cut the copy), then not suspect, then rank
        return min(usable, key=lambda pid: (self.local_uplink(pid) == here, suspect(pid)))

    def _ranked(self, st: _PolicyState) -> list[str]:
        try:
            scores = self.selector.scores_
            names = [p.name for p in self.selector.profiles]
            idx = {pid: i for i, pid in enumerate(self.selector.ids)}
        except AttributeError:
            return st.candidates
        if st.app not in names:
            return st.candidates
        c = names.index(st.app)
        return sorted(st.candidates, key=lambda pid: (self._pref(st, pid),
                                                      -float(scores[c, idx[pid]]) if pid in idx else 0.0))

    # -- deciding ---------------------------------------------------------------

    def _move(self, out: _Collect, st: _PolicyState, to: str, reason: str, detail: str | None, now: float) -> None:
        out.prior.append(((st.name, st.site), st.current, st.moved_at))
        out.moves.append(Move(st.name, st.site, to, self.paths[to].path.index))
        out.events.append(Event(now, reason, st.name, st.current, to, detail, site=st.site))
        st.current, st.moved_at = to, now

    def start(self, now: float) -> Outcome:
        """Put every pair on its best usable path."""
        out = _Collect()
        for st in self.pairs.values():
            best = self._best(st)
            if best is not None:
                self._move(out, st, best, "initial", None, now)
        return out.outcome()

    def bfd(self, path_id: str, up: bool, now: float) -> Outcome:
        """A BFD state change on a path."""
        h = self.paths.get(path_id)
        if h is None:
            raise ConfigError("Engine.bfd", path_id, "is not a path of the local site")
        out = _Collect()
        if h.bfd_up is not False and not up:
            h.bfd_up = False
            h.healthy_since = None
            h.penalty = h.decayed(now, self.cfg.damp_half_life_s) + self.cfg.damp_penalty
            h.penalty_at = now
            if not h.suppressed and h.penalty > self.cfg.damp_suppress:
                h.suppressed = True
                out.events.append(Event(now, "damped", None, path_id, None,
                                        f"penalty {h.penalty:.0f} > {self.cfg.damp_suppress:g}"))
            self._suspect[self.local_uplink(path_id)] = now + 2 * self.cfg.detect_ms / 1000
            for st in self.pairs.values():
                if st.current == path_id:
                    to = self._best(st, now)
                    if to is not None and to != path_id:
                        self._move(out, st, to, "bfd_down", f"{path_id} down", now)
        elif up and h.bfd_up is not True:
            h.bfd_up = True
            h.healthy_since = now
            out.events.append(Event(now, "bfd_up", None, None, path_id, None))
            # a pair to this path's site with no usable path at all takes it at once
            for st in self.pairs.values():
                if path_id in st.candidates and st.current is not None and not self.usable(st.current, st.app) \
                        and self.usable(path_id, st.app):
                    self._move(out, st, path_id, "bfd_up", f"{path_id} up, {st.current} unusable", now)
        return out.outcome()

    def sla(self, path_id: str, violations: Mapping[str, str | None], now: float) -> Outcome:
        """One measurement window of a path: for each application, the SLA
        violation (a reason such as ``loss 3.2 % > 1 %``) or None."""
        out = _Collect()
        self._sla(out, path_id, violations, now)
        return out.outcome()

    def _sla(self, out: _Collect, path_id: str, violations: Mapping[str, str | None], now: float) -> None:
        h = self.paths[path_id]
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
                            self._move(out, st, to, "sla_violation", f"{why} for {app}", now)

    def window(self, metrics: Mapping[str, Metrics], now: float) -> Outcome:
        """One SLA window from measured metrics (``patronus.paths.Metrics`` by
        path id; paths without samples and paths of other sites are skipped):
        each path is judged against the profile of every application a pair
        uses, then as ``sla``."""
        # the applications in pair order (deterministic: the order of the moves follows it)
        apps = list(dict.fromkeys(st.app for st in self.pairs.values() if st.app in self.profiles))
        out = _Collect()
        for pid in self.paths:
            m = metrics.get(pid)
            if m is not None and m.samples:
                self._sla(out, pid, {app: self.profiles[app].violation(m.rtt_ms, m.jitter_ms, m.loss_pct, m.alive)
                                     for app in apps}, now)
        return out.outcome()

    def tick(self, now: float) -> Outcome:
        """Damping decay and failback; call it every few hundred ms."""
        out = _Collect()
        for pid, h in self.paths.items():
            if h.suppressed and h.decayed(now, self.cfg.damp_half_life_s) < self.cfg.damp_reuse:
                h.suppressed = False
                h.penalty, h.penalty_at = h.decayed(now, self.cfg.damp_half_life_s), now
                if h.bfd_up is not False:
                    h.healthy_since = now
                out.events.append(Event(now, "reuse", None, None, pid, "penalty decayed"))
        for st in self.pairs.values():
            best = self._best(st)
            if best is None or best == st.current:
                continue
            cur_ok = st.current is not None and self.usable(st.current, st.app)
            if not cur_ok:
                self._move(out, st, best, "failback" if best == st.candidates[0] else "reroute",
                           f"{st.current} unusable", now)
                continue
            if st.candidates.index(best) >= st.candidates.index(st.current):
                continue  # only better-preferred paths pull traffic back
            if now - st.moved_at < self.cfg.cooldown_s:
                continue
            if self._healthy_for(best, st.app, now) >= self.cfg.failback_hold_s:
                self._move(out, st, best, "failback", f"{best} healthy for {self.cfg.failback_hold_s:g} s", now)
        return out.outcome()

    def reconfigure(self, mesh: Mesh, now: float) -> Outcome:
        """Take a new configuration (policies, preferences, sites, failover
        settings) without forgetting what was observed: the health of every
        path kept (same id) carries over, a pair kept stays on its path, and
        then every pair is put on its best usable path under the new
        configuration; a pair whose path changes (or a new pair) moves with
        reason ``config``. Raises ConfigError (nothing changed) when the local
        site is not in ``mesh``."""
        new = FailoverCore(mesh, local_site=self.local_site, selector=self.selector,
                           profiles=self._given_profiles)
        for pid, h in new.paths.items():
            old = self.paths.get(pid)
            if old is not None:
                old.path = h.path          # its index may have moved
                new.paths[pid] = old
        for key, st in new.pairs.items():
            old_st = self.pairs.get(key)
            if old_st is not None and old_st.current in st.candidates:
                st.current, st.moved_at = old_st.current, old_st.moved_at
        new._suspect = {u: t for u, t in self._suspect.items()}
        self.__dict__.update(new.__dict__)
        out = _Collect()
        for st in self.pairs.values():
            best = self._best(st, now)
            if best is not None and best != st.current:
                self._move(out, st, best, "config", "configuration changed", now)
        return out.outcome()

    def revert(self, outcome: Outcome) -> None:
        """Put the pairs an outcome moved back where they were (the data
        plane refused its moves); the next ``tick`` decides them again.
        Path health stays as observed."""
        for key, current, moved_at in reversed(outcome.prior):
            st = self.pairs[key]
            st.current, st.moved_at = current, moved_at

    def where(self) -> dict[tuple[str, str], str | None]:
        """(class, remote site) -> path id in use; the class is a policy name
        or DEFAULT_CLASS."""
        return {k: st.current for k, st in self.pairs.items()}


class Engine:
    """A ``FailoverCore`` applied: each outcome's moves go to the data plane
    in one ``set_paths`` call, its events to the store (when given), to
    ``on_event`` callbacks and to ``events()`` iterators.

    On asyncio, ``watch(path_id, bfd_session)`` feeds BFD state changes in as
    they happen; ``watch_monitor(monitor)`` feeds each path's metrics every
    ``window_s`` as SLA windows; ``await run()`` ticks every ``tick_s`` until
    ``stop()``; ``async for ev in events()`` follows it. ``start``, ``bfd``,
    ``sla``, ``window`` and ``tick`` feed one input at ``now`` (default: the
    engine's clock) and return its events, applied.
    """

    def __init__(self, mesh: Mesh, dataplane: DataPlane, selector: Any = None, *, local_site: str | None = None,
                 store: Store | None = None, window_s: float = 1.0, tick_s: float = 0.1,
                 profiles: Mapping[str, AppProfile] | None = None) -> None:
        self.core = FailoverCore(mesh, local_site=local_site, selector=selector, profiles=profiles)
        self.dataplane, self.store = dataplane, store
        self.window_s, self.tick_s = window_s, tick_s
        # (class, site) entries written to the data plane (one per move)
        self.set_path_calls = 0
        self._events: Fanout[Event] = Fanout()
        # the clock ``now`` comes from; events are stored in wall time (wall_time)
        self._clock: Callable[[], float] = time.monotonic
        self._monitor: Any = None
        self._stop: asyncio.Event | None = None
        # duplication: path id -> the tunnel interface its copies leave by (set by the agent); the
        # (class, site) pairs of duplicating policies -> the interface their copies go to now
        self.duplicate_via: Callable[[str], str | None] | None = None
        self.duplicating: dict[tuple[str, str], str | None] = {}
        self._duplicating_policies = _duplicating(mesh)

    @property
    def mesh(self) -> Mesh:
        return self.core.mesh

    @property
    def local_site(self) -> str:
        return self.core.local_site

    @property
    def paths(self) -> Mapping[str, _PathHealth]:
        """Each local path's health (BFD state, damping, SLA windows), by path id."""
        return self.core.paths

    def where(self) -> dict[tuple[str, str], str | None]:
        """(class, remote site) -> path id in use (``FailoverCore.where``)."""
        return self.core.where()

    def on_event(self, callback: Callable[[Event], Any]) -> None:
        """Call ``callback(event)`` for every event from now on."""
        self._events.subscribe(callback)

    def events(self) -> AsyncIterator[Event]:
        """Every event from now on (``async for ev in engine.events()``)."""
        return self._events.stream()

    def wall_time(self, ts: float) -> float:
        """``ts`` of the engine's clock as wall-clock time (``time.time()``),
        by the offset between the two clocks now."""
        return ts + (time.time() - self._clock())

    # -- applying ---------------------------------------------------------------

    def _apply(self, outcome: Outcome) -> list[Event]:
        """Write the moves (all or nothing), then record and publish the
        events. When the data plane refuses, the core forgets the moves, the
        path events still go out, and the error propagates."""
        if outcome.moves:
            try:
                # copies first, to where they go after the moves: the path a pair moves onto never
                # carries both the packet and its copy (the far end passes repeats on one tunnel)
                self.sync_duplicates()
                self.dataplane.set_paths([m.dataplane() for m in outcome.moves])
            except BaseException:
                self.core.revert(outcome)
                for ev in outcome.events:
                    if ev.site is None:
                        self._emit(ev)
                raise
            self.set_path_calls += len(outcome.moves)
        else:
            self.sync_duplicates()   # a path came back or went: the copies may have a better place
        for ev in outcome.events:
            self._emit(ev)
        return list(outcome.events)

    def sync_duplicates(self) -> None:
        """Point each duplicating pair's copies at its second path
        (``FailoverCore.second``), writing only what changed. Nothing
        without ``duplicate_via`` or a data plane that can duplicate."""
        dup = self._duplicating_policies
        if self.duplicate_via is None or (not dup and not self.duplicating):
            return   # every tick passes here: nothing more unless something duplicates
        from ..dataplane.base import DUPLICATE

        if DUPLICATE not in getattr(self.dataplane, "capabilities", ()):
            return
        want: dict[tuple[str, str], str | None] = {}
        for key, st in self.core.pairs.items():
            if st.name in dup:
                second = self.core.second(st, self._clock())
                want[key] = self.duplicate_via(second) if second is not None else None
        for key in set(self.duplicating) - set(want):
            want[key] = None   # a policy that stopped duplicating
        for (name, site), ifname in want.items():
            if self.duplicating.get((name, site)) != ifname:
                self.dataplane.set_duplicate(name, ifname, site=site)
        self.duplicating = {k: v for k, v in want.items() if v is not None}

    def _emit(self, ev: Event) -> None:
        if _tracing_on() and (ev.policy is not None or ev.site is not None):   # a decision: a span of it
            with _span(f"failover.{ev.reason}", root=True, reason=ev.reason, policy=ev.policy, remote_site=ev.site,
                              from_path=ev.from_path, to_path=ev.to_path,
                              detail=None if ev.detail is None else str(ev.detail)):
                pass
        if self.store is not None:
            self.store.add_event(ev.reason, policy=ev.policy, from_path=ev.from_path, to_path=ev.to_path,
                                 detail=ev.detail, ts=self.wall_time(ev.ts), site=ev.site)
        self._events.publish(ev)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def start(self, now: float | None = None) -> list[Event]:
        """Put every pair on its best usable path (``FailoverCore.start``)."""
        return self._apply(self.core.start(self._now(now)))

    def bfd(self, path_id: str, up: bool, now: float | None = None) -> list[Event]:
        """A BFD state change on a path (``FailoverCore.bfd``)."""
        return self._apply(self.core.bfd(path_id, up, self._now(now)))

    def sla(self, path_id: str, violations: Mapping[str, str | None], now: float | None = None) -> list[Event]:
        """One SLA window of a path (``FailoverCore.sla``)."""
        return self._apply(self.core.sla(path_id, violations, self._now(now)))

    def window(self, metrics: Mapping[str, Metrics], now: float | None = None) -> list[Event]:
        """One SLA window from measured metrics (``FailoverCore.window``)."""
        return self._apply(self.core.window(metrics, self._now(now)))

    def tick(self, now: float | None = None) -> list[Event]:
        """Damping decay and failback (``FailoverCore.tick``)."""
        return self._apply(self.core.tick(self._now(now)))

    def reconfigure(self, mesh: Mesh, table: Any = None, *, dataplane: DataPlane | None = None,
                    now: float | None = None) -> list[Event]:
        """A new configuration (``FailoverCore.reconfigure``), applied: the
        data plane gets ``table`` first (``set_table``) when given, or is
        replaced by ``dataplane`` (a new one, for a new policy count); then
        every pair's path is written again (the table may have re-indexed
        them) and the ``config`` moves' events go out."""
        outcome = self.core.reconfigure(mesh, self._now(now))
        self._duplicating_policies = _duplicating(mesh)
        if dataplane is not None:
            self.dataplane = dataplane
        elif table is not None:
            self.dataplane.set_table(table)
        moves = [(None if cls == DEFAULT_CLASS else cls, site, self.core.paths[pid].path.index)
                 for (cls, site), pid in self.core.where().items() if pid is not None]
        self.duplicating = {}   # a new table or data plane holds no copies: write them all again
        self.sync_duplicates()
        if moves:
            self.dataplane.set_paths(moves)
            self.set_path_calls += len(outcome.moves)
        for ev in outcome.events:
            self._emit(ev)
        return list(outcome.events)

    # -- asyncio ------------------------------------------------------------------

    def watch(self, path_id: str, session: Any) -> None:
        """Follow a BFD session (``BfdSession``) of the path: Up and Down go in as they happen."""
        from .bfd import State

        def changed(t: Any) -> None:
            if t.new == State.UP:
                self.bfd(path_id, True)
            elif t.old == State.UP or t.new in (State.DOWN, State.ADMIN_DOWN):
                self.bfd(path_id, False)

        session.on_change(changed)
        if session.state == State.UP:
            self.bfd(path_id, True)

    def watch_monitor(self, monitor: Any) -> None:
        """Read each path's metrics from ``monitor`` (``patronus.paths.Monitor``) every ``window_s``."""
        self._monitor = monitor

    def _metrics(self) -> dict[str, Metrics]:
        mon = self._monitor
        known = mon.paths()
        return {pid: mon.metrics(pid) for pid in self.core.paths if pid in known}

    async def run(self) -> None:
        """Start, then tick (and judge an SLA window every ``window_s``) until ``stop()``."""
        self._stop = asyncio.Event()
        self.start()
        next_window = self._clock() + self.window_s
        while not self._stop.is_set():
            now = self._clock()
            if self._monitor is not None and now >= next_window:
                self.window(self._metrics(), now)
                next_window = now + self.window_s
            self.tick(now)
            try:
                await asyncio.wait_for(self._stop.wait(), self.tick_s)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        """End ``run()`` after its current tick."""
        if self._stop is not None:
            self._stop.set()
