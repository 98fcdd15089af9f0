"""The sans-I/O failover core as a state machine: random BFD Up/Down, SLA
windows (verdicts and metrics) and ticks, with these held after every step:

* each outcome's moves and move events match one to one, and applying the
  moves to a copy of the route table gives ``where()``;
* a move goes to a path of its pair's own site, never onto a path that is
  BFD Down or damped;
* after a BFD Down no pair stays on that path when it has a usable one,
  and after a tick every pair with a usable path is on one, and a pair
  with no usable path but one that is neither Down nor damped (only its
  SLA violated) is on such a path: never on none, never on a dead one;
* a failback from a usable path goes to a better-preferred path that has
  not gone down within ``failback_hold_s``, and not within ``cooldown_s``
  of the pair's last move.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from patronus import Failover
from patronus.failover import DEFAULT_CLASS, FailoverCore, Move, Outcome
from patronus.paths.stats import Metrics

from .test_failover_engine import make_mesh, three_sites

MESHES = {"two sites": (make_mesh, "hq"), "three sites": (three_sites, "s0")}


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core: FailoverCore | None = None

    @initialize(which=st.sampled_from(sorted(MESHES)), hold=st.sampled_from([0.0, 2.0, 30.0]),
                cooldown=st.sampled_from([0.0, 1.0, 5.0]), windows=st.integers(1, 3))
    def setup(self, which, hold, cooldown, windows):
        build, local = MESHES[which]
        self.mesh = build()
        self.mesh.failover = Failover(failback_hold_s=hold, cooldown_s=cooldown, sla_windows=windows)
        self.cfg = self.mesh.failover
        self.core = FailoverCore(self.mesh, local_site=local)
        self.t = 0.0
        self.table: dict[tuple[str, str], str] = {}     # the route table the moves built
        self.went_down: dict[str, float] = {}           # path -> when BFD last reported it Down
        self.moved_at: dict[tuple[str, str], float] = {}
        self.apply(self.core.start(self.t))
        assert all(st_.current is not None for st_ in self.core.pairs.values())

    # -- applying an outcome, with the per-outcome checks ---------------------

    def apply(self, out: Outcome, once: bool = True) -> None:
        core = self.core
        assert isinstance(out, Outcome)
        move_events = [e for e in out.events if e.site is not None]
        assert len(move_events) == len(out.moves)
        assert all(e.policy is None for e in out.events if e.site is None)   # about a path, not a move
        assert all(e.ts == self.t for e in out.events)
        if once:  # a pair moves at most once per input (a window of several paths may move it per path)
            assert len({(m.cls, m.site) for m in out.moves}) == len(out.moves)
        for m, e in zip(out.moves, move_events):
            assert isinstance(m, Move)
            key = (m.cls, m.site)
            assert (e.policy, e.site, e.to_path) == (m.cls, m.site, m.path)
            assert e.from_path == self.table.get(key) != m.path
            assert m.slot == self.mesh.path(m.path).index
            assert m.dataplane() == (None if m.cls == DEFAULT_CLASS else m.cls, m.site, m.slot)
            assert m.path in core.pairs[key].candidates                      # a path to the pair's site
            h = core.paths[m.path]
            assert h.bfd_up is not False and not h.suppressed
            if e.reason == "failback" and e.from_path is not None and e.detail.endswith(" s"):
                # a failback from a usable path: to a better one, after the hold and the cooldown
                cands = core.pairs[key].candidates
                assert cands.index(m.path) < cands.index(e.from_path)
                assert self.t - self.went_down.get(m.path, -math.inf) >= self.cfg.failback_hold_s
                assert self.t - self.moved_at.get(key, -math.inf) >= self.cfg.cooldown_s
            self.table[key] = m.path
            self.moved_at[key] = self.t
        assert self.table == {k: v for k, v in core.where().items() if v is not None}

    def on_usable(self) -> None:
        for st_ in self.core.pairs.values():
            usable = [c for c in st_.candidates if self.core.usable(c, st_.app)]
            if usable:
                assert st_.current in usable, (st_.name, st_.site, st_.current, usable)
                continue
            alive = [c for c in st_.candidates if self.core.paths[c].bfd_up is not False
                     and not self.core.paths[c].suppressed]
            if alive:   # only SLA violations: the least bad path, not none
                assert st_.current in alive, (st_.name, st_.site, st_.current, alive)

    # -- inputs -------------------------------------------------------------------

    def advance(self, dt: float) -> None:
        self.t = round(self.t + dt, 6)

    def path_ids(self) -> list[str]:
        return sorted(self.core.paths)

    @precondition(lambda self: self.core is not None)
    @rule(i=st.integers(0, 63), dt=st.floats(0, 10), then_tick=st.booleans())
    def down(self, i, dt, then_tick):
        pid = self.path_ids()[i % len(self.path_ids())]
        self.advance(dt)
        was = self.core.paths[pid].bfd_up
        self.apply(self.core.bfd(pid, up=False, now=self.t))
        if was is not False:  # a Down (a repeated Down report changes nothing)
            self.went_down[pid] = self.t
            for st_ in self.core.pairs.values():
                if st_.current == pid:  # left only when nothing else is usable
                    assert not any(self.core.usable(c, st_.app) for c in st_.candidates if c != pid)
        if then_tick:
            self.tick(0.0)

    @precondition(lambda self: self.core is not None)
    @rule(i=st.integers(0, 63), dt=st.floats(0, 10), then_tick=st.booleans())
    def up(self, i, dt, then_tick):
        pid = self.path_ids()[i % len(self.path_ids())]
        self.advance(dt)
        self.apply(self.core.bfd(pid, up=True, now=self.t))
        if then_tick:
            self.tick(0.0)

    @precondition(lambda self: self.core is not None)
    @rule(i=st.integers(0, 63), app=st.sampled_from(["voip", "bulk", "default"]), bad=st.booleans(),
          dt=st.floats(0, 10))
    def sla(self, i, app, bad, dt):
        pid = self.path_ids()[i % len(self.path_ids())]
        self.advance(dt)
        self.apply(self.core.sla(pid, {app: "loss 5 % > 1 %" if bad else None}, now=self.t))

    @precondition(lambda self: self.core is not None)
    @rule(losses=st.lists(st.sampled_from([0.0, 1.5, 3.0, 100.0]), min_size=8, max_size=8), dt=st.floats(0, 10))
    def window(self, losses, dt):
        self.advance(dt)
        metrics = {pid: Metrics(rtt_ms=20.0, jitter_ms=1.0, loss_pct=loss, samples=10, alive=loss < 100)
                   for pid, loss in zip(self.path_ids(), losses)}
        self.apply(self.core.window(metrics, now=self.t), once=False)

    @precondition(lambda self: self.core is not None)
    @rule(dt=st.floats(0, 40))
    def tick(self, dt):
        self.advance(dt)
        self.apply(self.core.tick(now=self.t))
        self.on_usable()

    @precondition(lambda self: self.core is not None)
    @rule(which=st.integers(0, 7), drop=st.booleans(), dt=st.floats(0, 10))
    def reconfigure(self, which, drop, dt):
        """A new configuration: a policy's preference reversed, or a policy
        dropped. Health carries over; every pair ends on its best usable path."""
        self.advance(dt)
        d = self.mesh.to_dict()
        pols = d["policies"]
        i = which % len(pols)
        if drop and len(pols) > 1:
            del pols[i]
        else:
            uplinks = [u["name"] for s in d["sites"] if s["name"] == self.core.local_site for u in s["uplinks"]]
            pols[i]["prefer"] = list(reversed(pols[i].get("prefer") or uplinks))
        health = {pid: (h.bfd_up, h.suppressed) for pid, h in self.core.paths.items()}
        self.mesh = type(self.mesh).from_dict(d)
        keep = set(FailoverCore(self.mesh, local_site=self.core.local_site).pairs)
        self.table = {k: v for k, v in self.table.items() if k in keep}
        self.apply(self.core.reconfigure(self.mesh, self.t))
        assert {pid: (h.bfd_up, h.suppressed) for pid, h in self.core.paths.items()} == health
        assert set(self.core.pairs) == keep
        for st_ in self.core.pairs.values():
            best = self.core._best(st_, self.t)
            if best is not None:
                assert st_.current == best, (st_.name, st_.site, st_.current, best)

    @invariant()
    def pairs_on_their_own_site(self):
        if self.core is None:
            return
        for (cls, site), st_ in self.core.pairs.items():
            assert st_.current in st_.candidates
            assert self.mesh.path(st_.current).remote_site in (site, self.core.local_site)

    @invariant()
    def copies_go_to_another_usable_path_over_another_uplink_when_there_is_one(self):
        """Duplication's second path (FailoverCore.second): never the path in
        use, always usable, over another local uplink whenever a usable path
        over one exists; None only when no other path is usable."""
        if self.core is None:
            return
        core = self.core
        for st_ in core.pairs.values():
            second = core.second(st_, self.t)
            others = [p for p in st_.candidates if p != st_.current and core.usable(p, st_.app)]
            if second is None:
                assert not others
                continue
            assert second != st_.current and core.usable(second, st_.app)
            here = core.local_uplink(st_.current)
            if any(core.local_uplink(p) != here for p in others):
                assert core.local_uplink(second) != here


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_the_core_has_no_data_plane_or_store():
    """The core takes only the mesh and decisions' inputs; the data plane and
    the store belong to Engine."""
    with pytest.raises(TypeError):
        FailoverCore(make_mesh(), object(), local_site="hq")  # type: ignore[misc]
    core = FailoverCore(make_mesh(), local_site="hq")
    assert not any(hasattr(core, a) for a in ("dataplane", "store"))


def test_revert_puts_the_pairs_back():
    core = FailoverCore(make_mesh(), local_site="hq")
    core.start(0.0)
    before = core.where()
    out = core.bfd("br.inet~hq.mpls", up=False, now=1.0)
    assert out.moves and core.where() != before
    core.revert(out)
    assert core.where() == before
    # the path is still known to be down: the next tick moves the pairs again
    assert {m.path for m in core.tick(1.1).moves} == {"br.inet~hq.lte"}
