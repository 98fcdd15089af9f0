"""Destination sites: every packet's site by longest prefix over the site
subnets, the same in C (csrc/sites.c) as in the Python reference; the path
per (class, site); ids that never index the wrong policy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Match, Mesh, Policy, PolicyTable, Site, Uplink, abi, packets, reference
from patronus.dataplane import Userspace

from .frames import any_frames
from .strategies import site_tables


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites=site_tables(), frames=st.lists(any_frames, max_size=30))
def test_site_of_every_frame_equals_the_reference(sites, frames):
    table = PolicyTable([], sites=sites)
    got = table.sites_of(frames).tolist()
    want = [reference.site_of(sites, p) if not isinstance(p, reference.Malformed) else -1
            for p in map(reference.parse, frames)]
    assert got == want


def test_longest_prefix_wins_across_sites_and_families():
    table = PolicyTable([], sites={"a": ["10.0.0.0/8", "fd00::/16"], "b": ["10.2.0.0/16"],
                                   "c": ["10.2.3.0/24", "0.0.0.0/32"]})
    frames = [packets.icmp("192.0.2.1", d) for d in
              ("10.1.1.1", "10.2.1.1", "10.2.3.9", "10.2.4.1", "11.0.0.0", "9.255.255.255", "0.0.0.0")]
    frames.append(packets.udp("fd00::1", "fd00:1::1", 1, 2))
    frames.append(packets.udp("fd00::1", "fd01::1", 1, 2))
    assert table.sites_of(frames).tolist() == [1, 2, 3, 2, 0, 0, 3, 1, 0]
    assert [table.site_name(i) for i in (0, 1, 3)] == [None, "a", "c"]


def test_site_table_errors_are_named():
    with pytest.raises(ConfigError, match="subnet of site 'a' too"):
        PolicyTable([], sites={"a": ["10.0.0.0/24"], "b": ["10.0.0.0/24"]})
    with pytest.raises(ConfigError, match="host bits"):
        PolicyTable([], sites={"a": ["10.0.0.1/24"]})
    with pytest.raises(ConfigError, match="not a Site"):
        PolicyTable([], sites=["a"])
    t = PolicyTable([], sites={"a": ["10.0.0.0/24"]})
    with pytest.raises(ConfigError, match="not a site of this table"):
        t.site_id("zz")
    with pytest.raises(ConfigError, match="site number 0..1"):
        t.site_id(2)


def test_policy_ids_never_index_the_wrong_policy():
    t = PolicyTable([Policy("voip", Match(proto="udp", dst_ports=5060), priority=1),
                     Policy("web", Match(proto="tcp", dst_ports=443), priority=2)])
    ids = t.classify([packets.udp("10.0.0.1", "10.0.0.2", 1, 5060), packets.icmp("10.0.0.1", "10.0.0.2")])
    assert ids.tolist() == [0, -1]
    assert t.name_of(ids) == ["voip", None]
    assert t.name_of(ids[0]) == "voip" and t.policy(ids[1]) is None
    with pytest.raises(ConfigError, match="default class"):
        t.policies[ids[1]]
    with pytest.raises(ConfigError, match="default class"):
        t.policies[-1]
    assert t.policies[1].name == "web" and [p.name for p in t.policies[:1]] == ["voip"]
    with pytest.raises(ConfigError, match="policy id"):
        t.policy(2)


def test_mesh_table_routes_each_destination_site_on_its_own_path():
    mesh = Mesh("m")
    for i in range(3):
        mesh.add_site(Site(f"s{i}", subnets=[f"10.{i}.0.0/24"], uplinks=[Uplink("u0", f"192.0.2.{i + 1}")]))
    mesh.add_policy(Policy("voip", Match(proto="udp", dst_ports=5060), priority=1))
    table = mesh.policy_table()
    assert table.sites == ("s0", "s1", "s2")
    dp = Userspace(table, flow_capacity=64)
    p01, p02 = mesh.paths("s0", "s1")[0].index, mesh.paths("s0", "s2")[0].index
    dp.set_paths([("voip", "s1", p01), ("voip", "s2", p02), (None, "s1", p01), (None, "s2", p02)])
    frames = [packets.udp("10.0.0.2", "10.1.0.2", 4000, 5060), packets.udp("10.0.0.2", "10.2.0.2", 4000, 5060),
              packets.icmp("10.0.0.2", "10.2.0.2"), packets.icmp("10.0.0.2", "8.8.8.8"),
              packets.icmp("10.0.0.2", "10.0.0.9")]
    got = dp.process(frames, detail=True)
    assert got.dtype == abi.DETAIL_DTYPE
    assert got["policy"].tolist() == [0, 0, -1, -1, -1]
    assert got["site"].tolist() == [2, 3, 3, 0, 1]
    assert got["path"].tolist() == [p01, p02, p02, abi.NO_PATH, abi.NO_PATH]
    # one write moves one (class, site) pair; the flow keeps its record
    dp.set_path("voip", 7, site="s2")
    again = dp.process(frames[:2], detail=True)
    assert again["path"].tolist() == [p01, 7]
    assert dp.path_of("voip", "s1") == p01 and dp.path_of(None, "s2") == p02 and dp.path_of("voip", 0) is None
    flows = dp.flows()
    assert sorted(zip(flows["site"].tolist(), flows["path"].tolist()))[:2] == [(0, abi.NO_PATH), (1, abi.NO_PATH)]
    routes = dp.routes()
    assert routes.shape == (2, 4) and routes[1, 3] == 7 and routes[0, 2] == p01


def test_set_paths_checks_every_move_before_applying_any():
    table = PolicyTable([Policy("voip", Match(proto="udp"), priority=1)], sites={"a": ["10.0.0.0/24"]})
    dp = Userspace(table, flow_capacity=8)
    with pytest.raises(ConfigError, match="not a site"):
        dp.set_paths([("voip", "a", 3), ("voip", "nope", 4)])
    assert dp.path_of("voip", "a") is None
    with pytest.raises(ConfigError, match="path slot"):
        dp.set_path("voip", -1, "a")
    dp.set_path("voip", 3)  # every destination
    assert np.all(dp.routes()[1] == 3)
    dp.set_path("voip", None, "a")
    assert dp.path_of("voip", "a") is None and dp.path_of("voip", 0) == 3


def test_swapped_table_reclassifies_sites_and_routes_follow_site_names():
    t1 = PolicyTable([], sites={"a": ["10.0.0.0/24"]})
    dp = Userspace(t1, flow_capacity=8)
    dp.set_path(None, 5, "a")
    dp.set_path(None, 9, 0)
    frame = packets.icmp("10.9.0.1", "10.0.1.5")
    assert dp.process([frame], detail=True)[["site", "path"]].tolist() == [(0, 9)]
    dp.set_table(PolicyTable([], sites={"a": ["10.0.0.0/16"]}))  # the site's subnet grew
    assert dp.process([frame], detail=True)[["site", "path"]].tolist() == [(1, 5)]
    # a site joins in front: "a" keeps its path under its new number
    dp.set_table(PolicyTable([], sites={"b": ["10.1.0.0/16"], "a": ["10.0.0.0/16"]}))
    assert dp.routes().tolist() == [[9, abi.NO_PATH, 5]]
    assert dp.process([frame], detail=True)[["site", "path"]].tolist() == [(2, 5)]
    assert len(dp.flows()) == 1
