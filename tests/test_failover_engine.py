"""The failover engine applied to a real data plane: BFD Down moves every
policy on the path (one set_paths call, one entry per move), failback waits
for the hold, toggling links are damped, SLA violations move traffic after
N windows, events land in the SQLite state. tests/test_failover_core.py
holds the sans-I/O engine as a state machine."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import Failover, Match, Mesh, Policy, Site, Uplink, packets
from patronus.dataplane import Userspace
from patronus.failover import DEFAULT_CLASS, BfdSession, Engine, State
from patronus.errors import ConfigError
from patronus.store import Store

MPLS, LTE = "br.inet~hq.mpls", "br.inet~hq.lte"


class RecordingPlane(Userspace):
    """The real userspace data plane, recording each move it is given as
    (class, path) (the site in ``sites``, each set_paths call in ``batches``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[str, int]] = []
        self.sites: list[str] = []
        self.batches: list[list[tuple]] = []

    def set_paths(self, moves):
        moves = list(moves)
        super().set_paths(moves)
        self.batches.append(moves)
        for policy, site, path_id in moves:
            self.calls.append((DEFAULT_CLASS if policy is None else policy, path_id))
            self.sites.append(site)


def make_mesh(**failover):
    mesh = Mesh("t")
    mesh.add_site(Site("hq", subnets=["10.1.0.0/24"],
                       uplinks=[Uplink("mpls", "192.0.2.1"), Uplink("lte", "198.51.100.1")]))
    mesh.add_site(Site("br", subnets=["10.2.0.0/24"], uplinks=[Uplink("inet", "203.0.113.1")]))
    mesh.add_policy(Policy("voip", Match(dst="10.2.0.0/24", proto="udp"), priority=1, app="voip", prefer=["mpls"]))
    mesh.add_policy(Policy("video", Match(dst="10.2.0.0/24", proto="tcp"), priority=2, app="video",
                           prefer=["mpls"]))
    mesh.add_policy(Policy("bulk", Match(dst="10.2.0.0/24"), priority=3, app="bulk", prefer=["lte"]))
    mesh.failover = Failover(**{"failback_hold_s": 30, "cooldown_s": 1, **failover})
    return mesh


@pytest.fixture
def setup(tmp_path):
    mesh = make_mesh()
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=1024)
    store = Store(tmp_path / "state.db")
    engine = Engine(mesh, dp, local_site="hq", store=store)
    engine.start(now=0.0)
    yield mesh, dp, engine, store
    store.close()


def idx(mesh, pid):
    return next(p.index for p in mesh.paths("hq", "br") if p.id == pid)


def test_bfd_down_moves_every_policy_on_the_path_in_one_set_paths_call(setup):
    mesh, dp, engine, store = setup
    assert engine.where() == {("voip", "br"): MPLS, ("video", "br"): MPLS, ("bulk", "br"): LTE,
                            (DEFAULT_CLASS, "br"): MPLS}
    voice = packets.udp("10.1.0.5", "10.2.0.9", 4000, 5060)
    dp.process([voice], ts_ns=[1])
    dp.calls.clear()
    dp.batches.clear()
    evs = engine.bfd(MPLS, up=False, now=5.0)
    assert sorted(dp.calls) == [(DEFAULT_CLASS, idx(mesh, LTE)), ("video", idx(mesh, LTE)), ("voip", idx(mesh, LTE))]
    assert len(dp.batches) == 1 and engine.set_path_calls == 4 + 3  # 4 initial moves, then these 3
    assert set(dp.sites[-3:]) == {"br"}
    assert {(e.policy, e.site, e.reason, e.from_path, e.to_path) for e in evs} == {
        ("voip", "br", "bfd_down", MPLS, LTE), ("video", "br", "bfd_down", MPLS, LTE),
        (DEFAULT_CLASS, "br", "bfd_down", MPLS, LTE)}
    dp.process([voice], ts_ns=[2])
    (flow,) = dp.flows()
    assert flow["packets"] == 2 and flow["path"] == idx(mesh, LTE)  # same record, new path


def test_failback_waits_for_the_hold(setup):
    mesh, dp, engine, store = setup
    engine.bfd(MPLS, up=False, now=5.0)
    engine.bfd(MPLS, up=True, now=10.0)
    dp.calls.clear()
    assert engine.tick(now=39.9) == [] and dp.calls == []
    evs = engine.tick(now=40.0)
    assert {(e.policy, e.reason) for e in evs} == {("voip", "failback"), ("video", "failback"),
                                                   (DEFAULT_CLASS, "failback")}
    assert engine.where()[("voip", "br")] == MPLS and len(dp.calls) == 3


def test_a_toggling_link_is_damped_then_reused(setup):
    mesh, dp, engine, store = setup
    t, damped = 1.0, []
    for _ in range(4):  # down/up every 300 ms
        damped += [e for e in engine.bfd(MPLS, up=False, now=t) if e.reason == "damped"]
        engine.bfd(MPLS, up=True, now=t + 0.3)
        engine.tick(now=t + 0.3)
        t += 0.6
    assert len(damped) == 1 and engine.paths[MPLS].suppressed
    assert engine.where()[("voip", "br")] == LTE
    dp.calls.clear()
    # the penalty (about 3,700) halves every 15 s: still above the reuse
    # level of 750 after 31 s, when the link has been up longer than the hold
    assert engine.tick(now=t + 31) == [] and dp.calls == [] and engine.where()[("voip", "br")] == LTE
    evs = engine.tick(now=t + 36)      # below 750 after about 34.5 s
    assert [e.reason for e in evs] == ["reuse"]
    assert engine.tick(now=t + 36 + 29.9) == []
    evs = engine.tick(now=t + 36 + 30)  # and then the hold again
    assert {e.reason for e in evs} == {"failback"} and engine.where()[("voip", "br")] == MPLS


def test_sla_violation_moves_after_n_windows_only(setup):
    mesh, dp, engine, store = setup
    bad = {"voip": "loss 3.2 % > 1 %", "video": None, "bulk": None}
    assert engine.sla(MPLS, bad, now=1.0) == [] and engine.sla(MPLS, bad, now=2.0) == []
    (ev,) = engine.sla(MPLS, bad, now=3.0)
    assert (ev.policy, ev.reason, ev.detail, ev.to_path) == ("voip", "sla_violation", "loss 3.2 % > 1 % for voip", LTE)
    assert engine.where()[("video", "br")] == MPLS  # video's SLA holds there
    engine.sla(MPLS, {"voip": None}, now=4.0)
    assert engine.tick(now=4.0 + 29.9) == []
    assert [e.reason for e in engine.tick(now=34.0)] == ["failback"]


def test_events_are_persisted(setup):
    mesh, dp, engine, store = setup
    engine._clock = lambda: 105.0          # the engine's (monotonic) clock reads 105 s now
    before = time.time()
    evs = engine.bfd(MPLS, up=False, now=5.0)
    after = time.time()
    assert {e.ts for e in evs} == {5.0}  # callbacks get the engine's clock
    rows = store.events()
    assert [(r["reason"], r["policy"]) for r in rows if r["reason"] != "initial"] == [
        ("bfd_down", "voip"), ("bfd_down", "video"), ("bfd_down", DEFAULT_CLASS)]
    assert rows[-1]["from_path"] == MPLS and rows[-1]["to_path"] == LTE
    # the store holds wall time, as flow snapshots do: 100 s before the wall clock's now
    assert before - 100 <= rows[-1]["ts"] <= after - 100
    assert {r["site"] for r in rows if r["policy"]} == {"br"}


def test_cooldown_holds_back_a_quick_return():
    mesh = make_mesh(failback_hold_s=0, cooldown_s=5)
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="hq")
    engine.start(0.0)
    engine.bfd(MPLS, up=False, now=1.0)
    engine.bfd(MPLS, up=True, now=1.5)
    assert engine.tick(now=5.9) == []
    assert {e.reason for e in engine.tick(now=6.0)} == {"failback"}


events = st.lists(st.tuples(st.sampled_from(["down", "up", "bad", "good", "tick"]), st.sampled_from([MPLS, LTE]),
                            st.floats(0.01, 20)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(events)
def test_any_event_sequence_keeps_policies_on_usable_paths(evs):
    mesh = make_mesh()
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="hq")
    moves = len(engine.start(0.0))
    t = 0.0
    for kind, pid, dt in evs:
        t += dt
        if kind in ("down", "up"):
            out = engine.bfd(pid, up=kind == "up", now=t)
        elif kind in ("bad", "good"):
            out = engine.sla(pid, {"voip": "loss 5 % > 1 %" if kind == "bad" else None}, now=t)
        else:
            out = engine.tick(now=t)
        out += engine.tick(now=t)
        moves += sum(1 for e in out if e.to_path is not None and e.policy is not None)
        for st_ in engine.core.pairs.values():
            usable = [c for c in st_.candidates if engine.core.usable(c, st_.app)]
            if usable:  # after a tick a policy is never left on an unusable path when a usable one exists
                assert st_.current in usable
            assert not engine.paths[st_.current].suppressed or not usable
    assert moves == len(dp.calls)  # one set_path per move, nothing else


def test_engine_on_asyncio_with_real_bfd_sessions(tmp_path):
    """Two BFD sessions on loopback stand for the two paths; killing the far
    end of one (no goodbye) moves voip within the detection time."""
    mesh = make_mesh(failback_hold_s=0.5, cooldown_s=0)
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)

    async def main():
        ends = {}
        engine = Engine(mesh, dp, local_site="hq", tick_s=0.02)
        for i, pid in enumerate((MPLS, LTE)):
            a = BfdSession("127.0.0.1", f"127.0.1.{i + 1}", 20, 20, 3, port=14000 + i, peer_port=15000 + i)
            b = BfdSession(f"127.0.1.{i + 1}", "127.0.0.1", 20, 20, 3, port=15000 + i, peer_port=14000 + i)
            await a.start()
            await b.start()
            await asyncio.wait_for(a.wait_for(State.UP), 5)
            engine.watch(pid, a)
            ends[pid] = (a, b)
        task = asyncio.create_task(engine.run())
        await asyncio.sleep(0.2)
        first = engine.where()[("voip", "br")]
        got = []

        async def follow():
            async for ev in engine.events():
                got.append(ev)
                if ev.reason == "bfd_down" and ev.policy == "voip":
                    return ev

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        t0 = asyncio.get_running_loop().time()
        ends[MPLS][1].kill()
        ev = await asyncio.wait_for(follower, 2)
        took = asyncio.get_running_loop().time() - t0
        engine.stop()
        await task
        for a, b in ends.values():
            await a.stop()
            await b.stop()
        return first, ev, took

    first, ev, took = asyncio.run(main())
    assert first == MPLS and ev.to_path == LTE
    # 3 x 20 ms detection plus scheduling; a loose guard (a loaded VM delays
    # the loop), the BFD benchmarks measure the distribution
    assert took < 1.0, took


def test_backups_avoid_the_uplink_that_just_failed():
    """Two paths share hq.mpls; when one goes down the other is suspect (its
    BFD may lag), so the backup is a path over another uplink."""
    mesh = Mesh("t")
    mesh.add_site(Site("hq", subnets=["10.1.0.0/24"],
                       uplinks=[Uplink("mpls", "192.0.2.1"), Uplink("lte", "198.51.100.1")]))
    mesh.add_site(Site("br", subnets=["10.2.0.0/24"],
                       uplinks=[Uplink("a", "203.0.113.1"), Uplink("b", "203.0.113.2")]))
    mesh.add_policy(Policy("voip", Match(dst="10.2.0.0/24"), priority=1, app="voip", prefer=["mpls"]))
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="hq")
    engine.start(0.0)
    first = engine.where()[("voip", "br")]
    assert "hq.mpls" in first
    (ev,) = [e for e in engine.bfd(first, up=False, now=1.0) if e.policy == "voip"]
    assert "hq.lte" in ev.to_path  # not the other hq.mpls path


def three_sites():
    mesh = Mesh("t3")
    for i in range(3):
        mesh.add_site(Site(f"s{i}", subnets=[f"10.{i}.0.0/24"],
                           uplinks=[Uplink("u0", f"192.0.2.{i + 1}"), Uplink("u1", f"198.51.100.{i + 1}")]))
    mesh.add_policy(Policy("voip", Match(proto="udp", dst_ports=[5060, (10000, 20000)]), priority=1, app="voip",
                           prefer=["u1"]))
    mesh.add_policy(Policy("to-s2", Match(dst="10.2.0.0/24"), priority=2, app="bulk"))
    mesh.add_policy(Policy("blocked", Match(proto="tcp", dst_ports=23), priority=3, action="drop"))
    return mesh


def test_every_class_has_a_path_to_every_site_and_a_cut_moves_one_pair_only():
    mesh = three_sites()
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="s0")
    engine.start(0.0)
    where = engine.where()
    # voip and the default class reach both sites; a policy for s2's subnet only s2; drop policies none
    assert set(where) == {("voip", "s1"), ("voip", "s2"), (DEFAULT_CLASS, "s1"), (DEFAULT_CLASS, "s2"),
                          ("to-s2", "s2")}
    for site in ("s1", "s2"):
        assert where[("voip", site)].startswith("s0.u1~") or where[("voip", site)].endswith("~s0.u1") or             "s0.u1" in where[("voip", site)]
        assert mesh.path(where[("voip", site)]).remote_site in ("s0", site)
    # the data plane agrees: voice to each site leaves on that site's u1 path
    frames = [packets.udp("10.0.0.2", f"10.{i}.0.2", 4000, 5060) for i in (1, 2)]
    got = dp.process(frames, detail=True)
    assert [mesh.paths("s0", f"s{i}")[0].__class__ for i in (1, 2)]
    assert got["path"].tolist() == [mesh.path(where[("voip", s)]).index for s in ("s1", "s2")]
    before = dict(where)
    dp.calls.clear()
    evs = engine.bfd(where[("voip", "s1")], up=False, now=1.0)
    after = engine.where()
    moved = {k for k in after if after[k] != before[k]}
    assert moved == {k for k in before if before[k] == before[("voip", "s1")]}
    assert all(site == "s1" for _, site in moved) and ("voip", "s1") in moved
    assert {e.site for e in evs if e.to_path} == {"s1"}
    assert after[("voip", "s2")] == before[("voip", "s2")]
    assert dp.process(frames, detail=True)["path"].tolist() == [mesh.path(after[("voip", "s1")]).index,
                                                                mesh.path(before[("voip", "s2")]).index]


def test_a_path_coming_up_only_takes_pairs_of_its_own_site():
    """Every path to s2 down, then a path to s1 comes up: the s2 pairs stay
    where they are (a path to s1 cannot carry them) and the engine keeps
    ticking."""
    mesh = three_sites()
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="s0")
    engine.start(0.0)
    to_s1 = [p.id for p in mesh.paths("s0", "s1")]
    to_s2 = [p.id for p in mesh.paths("s0", "s2")]
    for pid in to_s1 + to_s2:
        engine.bfd(pid, up=True, now=0.5)
    for pid in to_s2 + to_s1[:1]:
        engine.bfd(pid, up=False, now=1.0)
    before = engine.where()
    evs = engine.bfd(to_s1[0], up=True, now=2.0)
    assert all(e.site in (None, "s1") for e in evs)
    for (cls, site), pid in engine.where().items():
        assert mesh.path(pid).remote_site in (site, "s0") and {x.split(".")[0] for x in pid.split("~")} == {"s0", site}
        if site == "s2":
            assert pid == before[(cls, site)]
    for t in range(3, 60):  # ticks never fail, whatever the pairs hold
        engine.tick(now=float(t))


PATHS3 = ["s0.u0~s1.u0", "s0.u0~s1.u1", "s0.u1~s1.u0", "s0.u1~s1.u1",
          "s0.u0~s2.u0", "s0.u0~s2.u1", "s0.u1~s2.u0", "s0.u1~s2.u1"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["down", "up", "bad", "good", "tick"]), st.sampled_from(PATHS3),
                          st.floats(0.01, 20)), max_size=60))
def test_any_event_sequence_keeps_every_pair_on_a_path_to_its_site(evs):
    mesh = three_sites()
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="s0")
    engine.start(0.0)
    t = 0.0
    for kind, pid, dt in evs:
        t += dt
        if kind in ("down", "up"):
            engine.bfd(pid, up=kind == "up", now=t)
        elif kind in ("bad", "good"):
            engine.sla(pid, {"voip": "loss 5 % > 1 %" if kind == "bad" else None}, now=t)
        engine.tick(now=t)
        for (cls, site), st_ in engine.core.pairs.items():
            assert st_.current in st_.candidates  # a path to the pair's own site
            usable = [c for c in st_.candidates if engine.core.usable(c, st_.app)]
            if usable:
                assert st_.current in usable
    # the data plane holds what the engine says, pair by pair
    routes = dp.routes()
    for (cls, site), pid in engine.where().items():
        row = 0 if cls == DEFAULT_CLASS else dp.table.index(cls) + 1
        assert routes[row, dp.table.site_id(site)] == mesh.path(pid).index


class RefusingPlane(RecordingPlane):
    """Refuses set_paths while ``refuse`` is set (a data plane write that failed)."""

    refuse = False

    def set_paths(self, moves):
        if self.refuse:
            raise OSError("map update failed")
        super().set_paths(moves)


def test_a_refused_write_leaves_the_pairs_where_the_data_plane_has_them():
    """The data plane refuses a batch (all or nothing): the engine forgets
    those moves, still reports the path's own events, raises, and the next
    tick moves the pairs again."""
    mesh = make_mesh()
    dp = RefusingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="hq")
    engine.start(now=0.0)
    got = []
    engine.on_event(got.append)
    before = engine.where()
    dp.refuse = True
    with pytest.raises(OSError):
        engine.bfd(MPLS, up=False, now=1.0)
    assert engine.where() == before and got == []   # no move happened, no move reported
    assert dp.path_of("voip", "br") == idx(mesh, MPLS) and engine.paths[MPLS].bfd_up is False
    dp.refuse = False
    evs = engine.tick(now=1.1)
    assert {(e.policy, e.to_path) for e in evs} == {("voip", LTE), ("video", LTE), (DEFAULT_CLASS, LTE)}
    assert dp.path_of("voip", "br") == idx(mesh, LTE) and got == evs


def test_the_engine_judges_sla_windows_from_metrics():
    """``window`` turns each path's metrics into SLA verdicts per application
    with the mesh's profiles: three windows of 1.5 % loss move voip and
    video (limit 1 %), not the default class (2 %) nor bulk (on lte)."""
    from patronus.paths.stats import Metrics

    mesh = make_mesh(sla_windows=3)
    dp = RecordingPlane(mesh.policy_table(), flow_capacity=64)
    engine = Engine(mesh, dp, local_site="hq")
    engine.start(now=0.0)
    lossy = Metrics(rtt_ms=20.0, jitter_ms=1.0, loss_pct=1.5, samples=10, alive=True)
    clean = Metrics(rtt_ms=20.0, jitter_ms=1.0, loss_pct=0.0, samples=10, alive=True)
    evs = []
    for t in (1.0, 2.0, 3.0):
        evs += engine.window({MPLS: lossy, LTE: clean, "not.a~path.x": lossy}, now=t)
    assert [(e.policy, e.reason, e.to_path, e.ts) for e in evs] == [("voip", "sla_violation", LTE, 3.0),
                                                                    ("video", "sla_violation", LTE, 3.0)]
    assert evs[0].detail == "loss 1.5 % > 1 % for voip"
    assert engine.where()[(DEFAULT_CLASS, "br")] == MPLS


def test_reconfigure_moves_what_the_new_policies_say_and_keeps_what_was_seen(setup):
    """Preferences changed while running: the pairs they concern move (reason
    ``config``) and the data plane holds every pair's path afterwards
    (through the new table); a path seen Down stays Down across the change."""
    mesh, dp, engine, _ = setup

    def prefer(m, **by_policy):
        d = m.to_dict()
        for p in d["policies"]:
            if p["name"] in by_policy:
                p["prefer"] = by_policy[p["name"]]
        return Mesh.from_dict(d)

    def in_dataplane(m):
        for (cls, site), pid in engine.where().items():
            assert dp.path_of(None if cls == DEFAULT_CLASS else cls, site) == m.path(pid).index, (cls, site, pid)

    new = prefer(mesh, voip=["lte"])
    events = engine.reconfigure(new, new.policy_table(), now=1.0)
    assert [(e.reason, e.policy, e.from_path, e.to_path) for e in events] == \
        [("config", "voip", "br.inet~hq.mpls", "br.inet~hq.lte")]
    in_dataplane(new)
    engine.bfd("br.inet~hq.mpls", False, now=2.0)        # video leaves mpls
    newer = prefer(new, bulk=["mpls"])                    # wants the path that is down: stays
    assert engine.reconfigure(newer, newer.policy_table(), now=3.0) == []
    assert engine.paths["br.inet~hq.mpls"].bfd_up is False
    in_dataplane(newer)
    engine.bfd("br.inet~hq.mpls", True, now=4.0)
    engine.tick(now=40.0)                                 # after the hold: home under the new preferences
    assert engine.where()[("voip", "br")] == "br.inet~hq.lte"
    assert engine.where()[("bulk", "br")] == "br.inet~hq.mpls"
    assert engine.where()[("video", "br")] == "br.inet~hq.mpls"
    in_dataplane(newer)


def test_reconfigure_with_a_new_policy_count_takes_a_new_data_plane(setup):
    mesh, dp, engine, _ = setup
    d = mesh.to_dict()
    d["policies"] = [p for p in d["policies"] if p["name"] != "video"]
    new = Mesh.from_dict(d)
    with pytest.raises(ConfigError):   # the old plane counts three policies
        engine.reconfigure(new, new.policy_table(), now=1.0)
    fresh = RecordingPlane(new.policy_table(), flow_capacity=1024)
    engine.reconfigure(new, dataplane=fresh, now=1.0)
    assert engine.dataplane is fresh
    assert {k[0] for k in engine.where()} == {"voip", "bulk", DEFAULT_CLASS}
    for (cls, site), pid in engine.where().items():
        assert fresh.path_of(None if cls == DEFAULT_CLASS else cls, site) == new.path(pid).index
