"""Mesh: sites, path enumeration, policies, whole-mesh round trips."""

from __future__ import annotations

import ipaddress

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Failover, Match, Mesh, Policy, QoS, Site, Uplink
from patronus.apps import AppProfile

from .strategies import addresses, failovers, policy_lists

# Site and uplink names hold no '.' (the path id separator); tests.strategies.names
# does (policy names keep it), so these strategies draw names of their own.
endpoint_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,11}", fullmatch=True)
uplinks = st.builds(
    Uplink, name=endpoint_names, address=addresses, mtu=st.integers(576, 9000),
    port=st.one_of(st.none(), st.integers(1, 65535)), nat=st.booleans(),
    bandwidth_mbps=st.one_of(st.none(), st.floats(0.001, 1e5)), cost=st.integers(0, 100),
)


@st.composite
def site_lists(draw, max_sites=5):
    """As tests.strategies.site_lists, with site and uplink names without '.'
    and uplink addresses unique across sites (a mesh refuses one address at two)."""
    n = draw(st.integers(0, max_sites))
    snames = draw(st.lists(endpoint_names, min_size=n, max_size=n, unique=True))
    out, used = [], set()
    for i, sn in enumerate(snames):
        subnets = draw(st.sets(st.sampled_from([f"10.{i}.{j}.0/24" for j in range(4)]
                                               + [f"fd00:{i}:{j}::/64" for j in range(4)]), max_size=3))
        ups = draw(st.lists(uplinks.filter(lambda u: u.address not in used), min_size=1, max_size=3,
                            unique_by=lambda u: u.name))
        used.update(u.address for u in ups)
        out.append(Site(sn, subnets=sorted(subnets), uplinks=ups))
    return out


def acme() -> Mesh:
    hq = Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp1", "192.0.2.1"), Uplink("lte", "198.51.100.7")])
    mesh = Mesh("acme")
    mesh.add_site(hq)
    mesh.add_site(Site("br1", subnets=["10.2.0.0/24"], uplinks=[Uplink("isp1", "203.0.113.9")]))
    return mesh


def test_issue_example():
    mesh = acme()
    paths = mesh.paths("hq", "br1")
    assert [(p.local_uplink, p.remote_uplink) for p in paths] == [("isp1", "isp1"), ("lte", "isp1")]
    assert all(p.local_site == "hq" and p.remote_site == "br1" for p in paths)
    back = mesh.paths("br1", "hq")
    assert [p.id for p in back] == [p.id for p in paths]
    assert all(p.local_site == "br1" for p in back)
    mesh.add_policy(Policy("voip", Match(proto="udp", dst_ports=(5060, 5061)), priority=10,
                           app="voip", qos=QoS(dscp=46)))
    mesh.failover = Failover(detect_ms=150, failback_hold_s=30)
    assert Mesh.from_dict(mesh.to_dict()) == mesh


def test_path_enumeration_counts_and_stable_indexes():
    mesh = acme()
    mesh.add_site(Site("br2", subnets=[], uplinks=[Uplink("a", "192.0.2.50"), Uplink("b", "192.0.2.51"),
                                                    Uplink("c", "192.0.2.52")]))
    # hq(2) x br1(1) + hq(2) x br2(3) + br1(1) x br2(3)
    assert len(mesh.paths()) == 2 + 6 + 3
    assert sorted(p.index for p in mesh.paths()) == list(range(11))
    assert len({p.id for p in mesh.paths()}) == 11
    before = {p.id: p.index for p in mesh.paths()}
    mesh.add_site(Site("br3", subnets=[], uplinks=[Uplink("x", "192.0.2.60")]))
    after = {p.id: p.index for p in mesh.paths()}
    assert all(after[k] == v for k, v in before.items())  # adding a site only appends
    assert len(mesh.paths("br3")) == 2 + 1 + 3
    assert mesh.path(mesh.paths("hq", "br3")[0].id).index == mesh.paths("hq", "br3")[0].index


def test_mesh_rejects_and_changes_nothing():
    mesh = acme()
    snapshot = mesh.to_dict()
    with pytest.raises(ConfigError, match="duplicate site name"):
        mesh.add_site(Site("hq", subnets=[], uplinks=[Uplink("x", "192.0.2.9")]))
    with pytest.raises(ConfigError, match="overlaps 10.1.0.0/24 of site 'hq'"):
        mesh.add_site(Site("br9", subnets=["10.1.0.128/25"], uplinks=[Uplink("x", "192.0.2.9")]))
    with pytest.raises(ConfigError, match="is not a site"):
        mesh.paths("hq", "nowhere")
    with pytest.raises(ConfigError, match="same site"):
        mesh.paths("hq", "hq")
    mesh.add_policy(Policy("a", Match(), priority=5))
    with pytest.raises(ConfigError, match="duplicate policy name"):
        mesh.add_policy(Policy("a", Match(), priority=6))
    with pytest.raises(ConfigError, match="already used by policy 'a'"):
        mesh.add_policy(Policy("b", Match(), priority=5))
    with pytest.raises(ConfigError, match="not a known profile"):
        mesh.add_policy(Policy("c", Match(), priority=7, app="telepathy"))
    with pytest.raises(ConfigError, match="Mesh.failover"):
        mesh.failover = "fast"
    with pytest.raises(ConfigError, match="Mesh.name"):
        Mesh("")
    assert [p.name for p in mesh.policies] == ["a"]
    snapshot["policies"] = [mesh.policies[0].to_dict()]
    assert mesh.to_dict() == snapshot


def test_custom_profile():
    mesh = acme()
    mesh.add_profile(AppProfile("trading", max_rtt_ms=20, max_jitter_ms=5, max_loss_pct=0.1))
    mesh.add_policy(Policy("t", Match(proto="tcp", dst_ports=9000), priority=1, app="trading"))
    assert Mesh.from_dict(mesh.to_dict()) == mesh


@st.composite
def meshes(draw):
    mesh = Mesh(draw(st.sampled_from(["acme", "m-1", "x.y"])))
    mesh.failover = draw(failovers)
    for s in draw(site_lists()):
        mesh.add_site(s)
    ups = sorted({u.name for s in mesh.sites for u in s.uplinks})
    for p in draw(policy_lists()):
        # prefer names an uplink of some site (add_policy refuses others)
        prefer = draw(st.lists(st.sampled_from(ups), max_size=3, unique=True)) if ups else []
        mesh.add_policy(attrs.evolve(p, prefer=prefer))
    return mesh


@settings(max_examples=100)
@given(meshes())
def test_mesh_dict_roundtrip(mesh):
    assert Mesh.from_dict(mesh.to_dict()) == mesh
    n = len(mesh.sites)
    ups = [len(s.uplinks) for s in mesh.sites]
    assert len(mesh.paths()) == sum(ups[i] * ups[j] for i in range(n) for j in range(i + 1, n))


_nets4 = st.builds(lambda a, p: f"{ipaddress.ip_network((a, p), strict=False)}",
                   st.integers(0, (1 << 32) - 1), st.integers(8, 30))
_nets6 = st.builds(lambda a, p: f"{ipaddress.ip_network((a, p), strict=False)}",
                   st.integers(0, (1 << 128) - 1), st.integers(16, 120))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.one_of(_nets4, _nets6), min_size=1, max_size=3), min_size=1, max_size=12),
       st.lists(st.integers(0, 11), max_size=3))
def test_add_site_refuses_exactly_the_overlapping_subnets(subnet_sets, removals):
    """The indexed overlap check of add_site (and after remove_site) agrees
    with comparing every pair of subnets."""
    m = Mesh("m")
    held: dict[str, list[ipaddress._BaseNetwork]] = {}

    def brute(nets):
        return any(a.version == b.version and a.overlaps(b) for b in nets for other in held.values() for a in other)

    for i, subnets in enumerate(subnet_sets):
        try:
            site = Site(f"s{i}", subnets=subnets, uplinks=[Uplink("u", f"192.0.2.{i + 1}")])
        except ConfigError:
            continue   # overlapping within the site: refused by Site itself
        nets = [ipaddress.ip_network(x) for x in site.subnets]
        want = brute(nets)
        try:
            m.add_site(site)
            got = False
        except ConfigError as e:
            assert e.field == "Site.subnets"
            got = True
        assert got == want, (subnets, held)
        if not got:
            held[site.name] = nets
        for r in removals:
            if f"s{r}" in held and r == i:
                m.remove_site(f"s{r}")
                del held[f"s{r}"]
