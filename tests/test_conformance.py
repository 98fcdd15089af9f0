"""One body of tests, every data-plane backend: what ``DataPlane`` promises.

Each test takes ``make``, which builds the backend under test for a table
(the userspace one everywhere; the XDP one as root with BCC, and in CI where
it must be there). A new backend joins by adding itself to ``BACKENDS``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from patronus import ConfigError, DataplaneUnavailable, Match, Policy, PolicyTable, abi, packets
from patronus.dataplane import DUPLICATE, QOS_DSCP, QOS_RATE, REDIRECT, STEER, DataPlane, Userspace

BACKENDS = ["userspace", "xdp"]
KNOWN_CAPABILITIES = {STEER, QOS_DSCP, QOS_RATE, REDIRECT, DUPLICATE}

SITES = {"hq": ["10.1.0.0/16"], "br1": ["10.2.0.0/16", "fd00:2::/32"], "br2": ["10.3.0.0/16"]}


def voice_table(sites: dict[str, list[str]] = SITES) -> PolicyTable:
    return PolicyTable([Policy("voip", Match(proto="udp", dst_ports=5060), priority=10),
                        Policy("web", Match(proto="tcp", dst_ports=443), priority=20),
                        Policy("block", Match(proto="tcp", dst_ports=23), priority=5, action="drop")],
                       sites=sites)


@pytest.fixture(params=BACKENDS)
def make(request):
    made: list[DataPlane] = []

    def build(table: PolicyTable, **kw) -> DataPlane:
        if request.param == "userspace":
            dp: DataPlane = Userspace(table, kw.pop("flow_capacity", 4096), **kw)
        else:
            try:
                from patronus.dataplane.xdp import Xdp

                dp = Xdp(table, kw.pop("flow_capacity", 4096), **kw)
            except DataplaneUnavailable as e:
                if os.environ.get("CI"):
                    raise  # CI installs what XDP needs: a skip there would hide a broken set-up
                pytest.skip(f"XDP unavailable here: {e}")
        made.append(dp)
        return dp

    yield build
    for dp in made:
        dp.close()


def frames_to(dst: str, n: int = 1, dport: int = 5060, proto: str = "udp") -> list[bytes]:
    make_frame = packets.udp if proto == "udp" else packets.tcp
    return [make_frame("10.1.0.9", dst, 4000 + i, dport) for i in range(n)]


def test_a_backend_is_a_dataplane_and_says_what_it_can_do(make):
    dp = make(voice_table())
    assert isinstance(dp, DataPlane)
    assert isinstance(dp.capabilities, frozenset) and dp.capabilities <= KNOWN_CAPABILITIES
    assert STEER in dp.capabilities  # both backends steer (XDP + tc, or nftables)
    with dp as same:
        assert same is dp
    dp.close()  # idempotent


def test_process_classifies_like_the_table(make):
    t = voice_table()
    dp = make(t)
    frames = [*frames_to("10.2.0.7"), packets.tcp("10.1.0.9", "10.3.0.1", 5, 443),
              packets.icmp("10.1.0.9", "10.2.0.7"), packets.tcp("10.1.0.9", "8.8.8.8", 5, 23)]
    got = dp.process(frames, ts_ns=[1, 2, 3, 4], detail=True)
    assert got["policy"].tolist() == t.classify(frames).tolist() == [0, 1, -1, 2]
    assert got["site"].tolist() == t.sites_of(frames).tolist() == [2, 3, 2, 0]
    assert got["path"].tolist() == [abi.NO_PATH] * 4  # nothing routed yet


def test_set_path_moves_one_class_to_one_site(make):
    dp = make(voice_table())
    dp.set_path("voip", 1, site="br1")
    dp.set_path(None, 0)  # the default class, every destination
    assert dp.path_of("voip", "br1") == 1 and dp.path_of("voip", "br2") is None
    assert dp.path_of(None, "br2") == dp.path_of(-1, 0) == 0
    r = dp.routes()
    assert r.shape == (4, 4) and r[1, 2] == 1 and r[1, 3] == abi.NO_PATH and (r[0] == 0).all()
    out = dp.process(frames_to("10.2.0.7") + frames_to("10.3.0.7"), ts_ns=[1, 2], detail=True)
    assert out["path"].tolist() == [1, abi.NO_PATH]
    dp.set_path("voip", None, site="br1")
    assert dp.path_of("voip", "br1") is None


def test_set_paths_checks_every_move_before_applying_any(make):
    dp = make(voice_table())
    with pytest.raises(ConfigError, match="nosuch"):
        dp.set_paths([("voip", "br1", 2), ("nosuch", "br1", 1)])
    with pytest.raises(ConfigError):
        dp.set_paths([("voip", "br1", 2), ("voip", "nowhere", 1)])
    assert dp.path_of("voip", "br1") is None
    dp.set_paths([("voip", "br1", 2), ("web", "br2", 3), (None, 0, 1)])
    assert (dp.path_of("voip", "br1"), dp.path_of("web", "br2"), dp.path_of(None, 0)) == (2, 3, 1)


def test_flows_and_counters_account_every_packet(make):
    dp = make(voice_table())
    frames = frames_to("10.2.0.7") * 3 + [packets.tcp("10.1.0.9", "10.3.0.1", 5, 443)] * 2
    dp.process(frames, ts_ns=list(range(1, 6)))
    dp.process([b"\x00" * 20, b"\x08" * 14], ts_ns=[6, 7])  # too short for IP; not IP
    f = dp.flows()
    assert f.dtype == abi.FLOW_DTYPE and len(f) == 2
    by_port = {int(r["dport"]): (int(r["packets"]), int(r["policy"]), int(r["site"])) for r in f}
    assert by_port == {5060: (3, 0, 2), 443: (2, 1, 3)}
    c = dp.counters()
    assert c["policies"]["voip"]["packets"] == 3 and c["policies"]["web"]["packets"] == 2
    assert c["policies"]["voip"]["bytes"] == 3 * (len(frames[0]) - 14)
    assert sum(c["malformed"].values()) == 2 and set(c["malformed"]) == set(abi.MALFORMED_REASONS)
    assert c["flows"] == 2


def test_drain_takes_idle_flows_then_everything(make):
    dp = make(voice_table())
    s = 1_000_000_000
    dp.process(frames_to("10.2.0.7", 3), ts_ns=[1 * s, 2 * s, 9 * s])
    idle = dp.drain(idle_timeout_s=5, now_ns=10 * s)  # last seen at 1 s and 2 s
    assert sorted(int(x) for x in idle["sport"]) == [4000, 4001]
    assert len(dp.flows()) == 1
    rest = dp.drain(flush=True)
    assert [int(x) for x in rest["sport"]] == [4002] and len(dp.flows()) == 0
    assert len(dp.drain()) == 0  # handed out once
    assert dp.counters()["policies"]["voip"]["packets"] == 3  # counts outlive their flows


def test_set_table_keeps_flows_and_routes_follow_site_names(make):
    dp = make(voice_table(), max_sites=4)
    dp.set_path("voip", 1, site="br2")
    dp.process(frames_to("10.3.0.7"), ts_ns=[1])
    # br1 leaves, br9 joins: br2 becomes site 2 and keeps its path
    swapped = voice_table({"hq": ["10.1.0.0/16"], "br2": ["10.3.0.0/16"], "br9": ["10.9.0.0/16"]})
    dp.set_table(swapped)
    assert dp.path_of("voip", "br2") == 1 and dp.path_of("voip", "br9") is None
    out = dp.process(frames_to("10.3.0.7"), ts_ns=[2], detail=True)
    assert (int(out["site"][0]), int(out["path"][0])) == (2, 1)
    (flow,) = dp.flows()
    assert int(flow["packets"]) == 2  # the same record, re-stamped
    with pytest.raises(ConfigError):
        dp.set_table(PolicyTable([], sites=SITES))  # another policy count


def test_a_drop_policy_is_a_verdict_not_a_path(make):
    dp = make(voice_table())
    dp.set_path("block", 1)
    out = dp.process([packets.tcp("10.1.0.9", "10.2.0.1", 5, 23)], ts_ns=[1], detail=True)
    assert int(out["policy"][0]) == 2
    assert dp.counters()["policies"]["block"]["packets"] == 1


def test_bad_input_is_named(make):
    dp = make(voice_table())
    with pytest.raises(ConfigError):
        dp.set_path("voip", -5, site="br1")
    with pytest.raises(ConfigError):
        dp.process(frames_to("10.2.0.7", 2), ts_ns=[1])  # one timestamp for two frames
    with pytest.raises(ConfigError):
        dp.set_table("not a table")  # type: ignore[arg-type]


def test_open_gives_a_dataplane_with_the_same_options():
    from patronus.dataplane import open as dp_open

    with dp_open(voice_table(), backend="userspace", flow_capacity=64, max_policies=100, idle_timeout_s=3) as dp:
        assert isinstance(dp, DataPlane) and dp.flow_capacity == 64
        dp.process(frames_to("10.2.0.7"), ts_ns=[1])
        assert len(dp.drain(idle_timeout_s=0.5, now_ns=2_000_000_000)) == 1


def test_userspace_needs_no_root_for_anything_but_steering():
    dp = Userspace(voice_table(), 64)
    assert {STEER, QOS_DSCP, QOS_RATE} <= dp.capabilities and not {REDIRECT, DUPLICATE} & dp.capabilities
    np.testing.assert_array_equal(dp.routes(), np.full((4, 4), abi.NO_PATH, dtype=np.uint32))
