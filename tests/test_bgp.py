"""patronus.bgp without a network: the configuration, the route filter (a
classifier: hypothesis against its rules) and the edge's handling of ExaBGP's
JSON messages (a parser: arbitrary messages never crash it, and what it
accepts always obeys the filter). The edge with the real ExaBGP and real
routers is tests/test_bgp_lab.py."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import ConfigError
from patronus.bgp import REFUSALS, Bgp, Neighbor, RouteFilter, community_of
from patronus.bgp.edge import BgpEdge
from patronus.bgp.speaker import exabgp_config

OWN = ["10.1.0.0/16", "fd00:1::/48"]
OTHERS = {"s1": ["10.2.0.0/16"], "s2": ["10.3.0.0/16", "fd00:3::/48"]}
BGP = Bgp(65010, [Neighbor("10.1.0.2", asn=65101), Neighbor("fd00:1::2", asn=65101)], max_prefixes=5)


def test_configuration_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="Bgp.asn"):
        Bgp(0, [Neighbor("10.1.0.2", asn=1)])
    with pytest.raises(ConfigError, match="Neighbor.address"):
        Neighbor("10.1.0.300", asn=1)
    with pytest.raises(ConfigError, match="Bgp.neighbors"):
        Bgp(1, [])
    with pytest.raises(ConfigError, match="repeat"):
        Bgp(1, [Neighbor("10.1.0.2", asn=1), Neighbor("10.1.0.2", asn=2)])
    with pytest.raises(ConfigError, match="Bgp.max_prefixes"):
        Bgp(1, [Neighbor("10.1.0.2", asn=1)], max_prefixes=0)
    with pytest.raises(ConfigError, match="Neighbor.hold_time"):
        Neighbor("10.1.0.2", asn=1, hold_time=2)
    with pytest.raises(ConfigError, match="unknown keys"):
        Bgp.from_dict({"asn": 1, "neighbors": [{"address": "10.1.0.2", "asn": 2}], "password": "x"})
    with pytest.raises(ConfigError, match="Bgp.aggregates"):
        Bgp(1, [Neighbor("10.1.0.2", asn=1)], aggregates=["10.9.0.0/16"]).check_site(OWN)
    b = Bgp(1, [Neighbor("10.1.0.2", asn=1)], aggregates=["10.1.5.0/24"], networks=["10.1.0.0/24"])
    b.check_site(OWN)
    assert Bgp.from_dict(b.to_dict()) == b


def test_communities_and_the_exabgp_configuration() -> None:
    assert community_of(BGP, 2) == "community [65010:2]"
    assert community_of(Bgp(4_200_000_000, BGP.neighbors), 2) == "large-community [4200000000:0:2]"
    conf = exabgp_config(BGP, {"10.1.0.2": "10.1.0.1", "fd00:1::2": "fd00:1::1"}, "10.1.0.1", ["relay"])
    assert conf.count("neighbor ") == 2 and "local-address fd00:1::1;" in conf and "peer-as 65101;" in conf


prefixes = st.one_of(
    st.builds(lambda a, n: str(ipaddress.ip_network((a, n), strict=False)),
              st.integers(0, 2**32 - 1).map(lambda x: ipaddress.IPv4Address(x)), st.integers(0, 32)),
    st.builds(lambda a, b, n: str(ipaddress.ip_network((f"10.{a}.{b}.0", n), strict=False)),
              st.integers(0, 4), st.integers(0, 255), st.integers(8, 32)),
    st.builds(lambda a, n: str(ipaddress.ip_network((f"fd00:{a}::", n), strict=False)),
              st.integers(0, 4), st.integers(16, 128)),
)


@settings(max_examples=400, deadline=None)
@given(prefixes, st.lists(st.integers(1, 70000), max_size=4), st.integers(0, 6), st.booleans())
def test_the_filter_accepts_only_what_its_rules_allow(prefix: str, path: list[int], accepted: int,
                                                      allow_default: bool) -> None:
    b = Bgp(65010, BGP.neighbors, max_prefixes=5, allow_default=allow_default)
    reason = RouteFilter(b, OWN, OTHERS).check(prefix, path, accepted)
    n = ipaddress.ip_network(prefix)
    inside = any(n.version == m.version and n.subnet_of(m) for m in map(ipaddress.ip_network, OWN))
    theirs = any(n.version == o.version and n.overlaps(o) for v in OTHERS.values() for o in map(ipaddress.ip_network, v))
    assert reason is None or reason in REFUSALS
    if reason is None:   # accepted: every rule holds
        assert 65010 not in path
        assert (n.prefixlen == 0 and allow_default) or (inside and not theirs and accepted < 5)
    # and each rule refuses by its own name, checked in this order
    if 65010 in path:
        assert reason == "as_loop"
    elif n.prefixlen == 0:
        assert reason == (None if allow_default else "default_route")
    elif theirs:
        assert reason == "other_site"
    elif not inside:
        assert reason == "outside"
    elif accepted >= 5:
        assert reason == "max_prefixes"


class RecordingSpeaker:
    """The speaker's interface without a process: what the edge sends is kept."""

    def __init__(self, *_a: Any, **_k: Any) -> None:
        self.lines: list[str] = []
        self.alive = True

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def send(self, line: str) -> bool:
        self.lines.append(line)
        return True


def _edge(routes: list[tuple[str, ...]], learned: list[int]) -> BgpEdge:
    e = BgpEdge(BGP, workdir=None, local={}, router_id="10.1.0.1", lan_if="lan0",   # type: ignore[arg-type]
                route=routes.extend, on_learned=lambda: learned.append(1),
                speaker=RecordingSpeaker)
    e.set_space(OWN, OTHERS)
    return e


def _update(peer: str, announce: dict[str, list[str]] | None = None, withdraw: list[str] | None = None,
            path: list[int] | None = None) -> dict[str, Any]:
    upd: dict[str, Any] = {"attribute": {"as-path": {"0": {"element": "as-sequence", "value": path or [65101]}}}}
    if announce:
        upd["announce"] = {"ipv4 unicast": {nh: [{"nlri": p} for p in ps] for nh, ps in announce.items()}}
    if withdraw:
        upd["withdraw"] = {"ipv4 unicast": [{"nlri": p} for p in withdraw]}
    return {"type": "update", "neighbor": {"address": {"local": "10.1.0.1", "peer": peer}, "direction": "receive",
                                           "message": {"update": upd}}}


def test_edge_learns_refuses_by_name_and_withdraws() -> None:
    routes: list[tuple[str, ...]] = []
    learned: list[int] = []
    e = _edge(routes, learned)
    e._message(_update("10.1.0.2", {"10.1.0.2": ["10.1.5.0/24", "0.0.0.0/0", "10.2.1.0/24", "10.7.0.0/24"]}))
    assert e.learned() == ("10.1.5.0/24",)
    assert e.refused == {"default_route": 1, "other_site": 1, "outside": 1}
    assert ("replace", "10.1.5.0/24", "via", "10.1.0.2", "dev", "lan0", "proto", "bgp", "metric", "20") in routes
    e._message(_update("10.1.0.2", {"10.1.0.2": [f"10.1.{i}.0/24" for i in range(10, 16)]}))
    assert len(e.learned()) == 5 and e.refused["max_prefixes"] == 2
    e._message(_update("10.1.0.2", {"10.1.0.2": ["10.1.9.0/24"]}, path=[65101, 65010]))
    assert e.looped == 1 and "as_loop" not in e.refused and "10.1.9.0/24" not in e.refused_now
    e._message(_update("10.1.0.2", withdraw=["10.1.5.0/24"]))
    assert "10.1.5.0/24" not in e.learned() and len(e.learned()) == 5   # a refused one takes the freed place
    assert ("del", "10.1.5.0/24", "via", "10.1.0.2", "proto", "bgp", "metric", "20") in routes
    e._message({"type": "state", "neighbor": {"address": {"peer": "10.1.0.2"}, "state": "down"}})
    assert e.learned() == () and e.sessions["10.1.0.2"] == "down"


def test_edge_advertises_the_difference_per_family() -> None:
    e = _edge([], [])
    e.advertise({"10.2.0.0/16": "community [65010:2]", "fd00:3::/48": "community [65010:3]"})
    assert e.speaker.lines == ["neighbor 10.1.0.2 announce route 10.2.0.0/16 next-hop self community [65010:2]",
                               "neighbor fd00:1::2 announce route fd00:3::/48 next-hop self community [65010:3]"]
    e.speaker.lines.clear()
    e.advertise({"10.2.0.0/16": "community [65010:2]"})
    assert e.speaker.lines == ["neighbor fd00:1::2 withdraw route fd00:3::/48"]
    e.speaker.lines.clear()
    e._connected()   # a restarted speaker gets everything again
    assert e.speaker.lines == ["neighbor 10.1.0.2 announce route 10.2.0.0/16 next-hop self community [65010:2]"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12) | prefixes,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10) | st.sampled_from(
                               ["type", "neighbor", "address", "peer", "message", "update", "announce", "withdraw",
                                "nlri", "attribute", "as-path", "state", "ipv4 unicast", "10.1.0.2"]), c, max_size=5),
                           max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(json_values, st.builds(_update, st.just("10.1.0.2"),
                                                 st.dictionaries(st.just("10.1.0.2"), st.lists(prefixes, max_size=6)),
                                                 st.lists(prefixes, max_size=3),
                                                 st.lists(st.integers(1, 70000), max_size=3))), max_size=12))
def test_any_message_sequence_keeps_the_edge_consistent(msgs: list[Any]) -> None:
    routes: list[tuple[str, ...]] = []
    e = _edge(routes, [])
    for m in msgs:
        e._message(m if isinstance(m, dict) else {"type": "update", "neighbor": m})
    f = RouteFilter(BGP, OWN, OTHERS)
    assert len(e.accepted) <= BGP.max_prefixes
    for p, r in e.accepted.items():
        assert f.check(p, r.as_path, 0) is None
    # the kernel holds exactly the accepted prefixes: replay the route calls
    kernel: dict[str, str] = {}
    for a in routes:
        if a[0] == "replace":
            kernel[a[1]] = a[3]
        elif a[0] == "del":
            kernel.pop(a[1], None)
    assert kernel == {p: r.next_hop for p, r in e.accepted.items()}


def test_a_dead_speaker_keeps_what_was_learned_until_the_grace_after_its_session() -> None:
    async def go() -> None:
        routes: list[tuple[str, ...]] = []
        e = _edge(routes, [])
        e._message(_update("10.1.0.2", {"10.1.0.2": ["10.1.5.0/24", "10.1.6.0/24"]}))
        e._exited(1)   # the speaker died: nothing withdrawn
        assert e.learned() == ("10.1.5.0/24", "10.1.6.0/24") and e.speaker_exits == 1
        e._restart.cancel()
        import patronus.bgp.edge as edge_mod
        old, edge_mod.GRACE_S = edge_mod.GRACE_S, 0.05
        try:
            e._message({"type": "state", "neighbor": {"address": {"peer": "10.1.0.2"}, "state": "up"}})
            e._message(_update("10.1.0.2", {"10.1.0.2": ["10.1.5.0/24"]}))   # announced again
            await asyncio.sleep(0.2)
        finally:
            edge_mod.GRACE_S = old
        assert e.learned() == ("10.1.5.0/24",)

    asyncio.run(go())


def test_the_effective_mesh_takes_announced_subnets_inside_the_configured_ones() -> None:
    """What every agent routes to a site: what it announces, where that lies
    inside its subnets in the mesh (a stale or hostile announcement outside
    them is dropped); a site that announced nothing keeps the mesh's."""
    from patronus import Mesh, Site, Uplink
    from patronus.agent import SiteAgent

    m = Mesh("m")
    m.add_site(Site("a", subnets=["10.1.0.0/16"], uplinks=[Uplink("u0", "192.0.2.1")]))
    m.add_site(Site("b", subnets=["10.2.0.0/16", "fd00:2::/48"], uplinks=[Uplink("u0", "192.0.2.2")]))
    assert SiteAgent._effective_of(m, {}) is m
    assert SiteAgent._effective_of(m, {"a": ("10.1.0.0/16",)}) is m   # no BGP: the same object, no rebuild
    e = SiteAgent._effective_of(m, {"a": ("10.1.5.0/24", "10.9.0.0/24", "10.2.1.0/24"), "b": ()})
    assert e.site("a").subnets == ("10.1.5.0/24",) and e.site("b").subnets == ()
    assert [p.id for p in e.paths()] == [p.id for p in m.paths()]   # the paths do not move


def test_a_learned_announcement_says_so_and_keeps_the_old_form_otherwise() -> None:
    """A BGP site marks its announcement ``learned`` (the others route exactly
    its subnets); other announcements keep their exact old bytes; a site's
    announced subnets may not overlap each other."""
    from patronus.wireguard.discovery import Announcement, AnnouncementRejected, authorize

    key = "x" * 43 + "="
    plain = Announcement.make("br1", wg_public_key=key, subnets=["10.1.0.0/24"], uplinks=[])
    assert b"learned" not in plain.to_bytes() and Announcement.from_bytes(plain.to_bytes()) == plain
    bgp = Announcement.make("br1", wg_public_key=key, subnets=["10.1.5.0/24"], uplinks=[], learned=True)
    assert b'"learned":true' in bgp.to_bytes() and Announcement.from_bytes(bgp.to_bytes()).learned
    with pytest.raises(AnnouncementRejected, match="learned is not true"):
        Announcement.from_bytes(bgp.to_bytes().replace(b'"learned":true', b'"learned":false'))
    both = Announcement.make("br1", wg_public_key=key, subnets=["10.1.0.0/16", "10.1.5.0/24"], uplinks=[])
    with pytest.raises(AnnouncementRejected, match="overlap"):
        authorize(both, ["10.1.0.0/16"], [])
