"""Adversarial model input: ambiguous names, trailing newlines, huge and
non-finite numbers, enormous values in messages, mesh-level consistency."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Failover, Match, Mesh, Policy, QoS, Site, Uplink
from patronus import _validate as v
from patronus.apps import AppProfile


def up(name="isp1", addr="192.0.2.1", **kw):
    return Uplink(name, addr, **kw)


# -- 1: path ids are unambiguous -------------------------------------------

@pytest.mark.parametrize("bad", ["a.b", "a~b", "x.", "isp.1"])
def test_site_and_uplink_names_refuse_path_id_separators(bad):
    with pytest.raises(ConfigError, match=r"Site\.name: .*path id"):
        Site(bad, subnets=[], uplinks=[up()])
    with pytest.raises(ConfigError, match=r"Uplink\.name: .*path id"):
        Uplink(bad, "192.0.2.1")


def test_the_colliding_mesh_of_the_report_cannot_be_built():
    # sites "a.b"/"a" with uplinks "c"/"b.c" both gave "a.b.c"
    with pytest.raises(ConfigError, match="Site.name"):
        Site("a.b", subnets=[], uplinks=[up("c")])
    with pytest.raises(ConfigError, match="Uplink.name"):
        up("b.c")


def test_policy_and_mesh_names_keep_dots():
    assert Policy("voice.v2", Match(), priority=1).name == "voice.v2"
    assert Mesh("corp.eu").name == "corp.eu"
    assert AppProfile("x.y", max_rtt_ms=1, max_jitter_ms=1, max_loss_pct=1).name == "x.y"


@settings(max_examples=200)
@given(st.lists(st.tuples(st.from_regex(r"[ab.]{1,3}", fullmatch=True),
                          st.lists(st.from_regex(r"[ab.]{1,3}", fullmatch=True), min_size=1, max_size=3,
                                   unique=True)),
                min_size=2, max_size=4, unique_by=lambda t: t[0]))
def test_path_ids_are_unique(spec):
    mesh = Mesh("m")
    for i, (sname, unames) in enumerate(spec):
        try:
            site = Site(sname, subnets=[f"10.{i}.0.0/24"],
                        uplinks=[Uplink(u, f"192.0.{i}.{j + 1}") for j, u in enumerate(unames)])
        except ConfigError:
            continue
        mesh.add_site(site)
    ids = [p.id for p in mesh.paths()]
    assert len(ids) == len(set(ids))
    for p in mesh.paths():
        assert mesh.path(p.id) == p


# -- 2: no trailing newline --------------------------------------------------

@pytest.mark.parametrize("bad", ["hq\n", "hq\r", "hq\n\n", "\nhq", "hq\x00", "h q"])
def test_names_refuse_newlines_and_control_characters(bad):
    with pytest.raises(ConfigError, match="Policy.name"):
        Policy(bad, Match(), priority=1)
    with pytest.raises(ConfigError, match="Site.name"):
        Site(bad, subnets=[], uplinks=[up()])
    with pytest.raises(ConfigError, match="Mesh.name"):
        Mesh(bad)


# -- 3: huge and non-finite numbers -----------------------------------------

def _id(x):
    return f"int{x.bit_length()}b" if isinstance(x, int) else type(x).__name__ if isinstance(x, (list, tuple, set)) \
        else repr(x)


HUGE = [10**400, -(10**400), 2**1024, 10**5000, math.inf, -math.inf, math.nan, 1e308 * 10]


@pytest.mark.parametrize("x", HUGE, ids=_id)
def test_number_fields_refuse_huge_and_non_finite_values(x):
    for build in (lambda: Uplink("a", "192.0.2.1", bandwidth_mbps=x),
                  lambda: Uplink("a", "192.0.2.1", mtu=x),
                  lambda: Uplink("a", "192.0.2.1", cost=x),
                  lambda: Failover(failback_hold_s=x),
                  lambda: Failover(damp_suppress=x),
                  lambda: Failover(detect_ms=x),
                  lambda: AppProfile("x", max_rtt_ms=x, max_jitter_ms=1, max_loss_pct=1),
                  lambda: QoS(rate_kbps=x),
                  lambda: Match(dscp=x),
                  lambda: Match(dst_ports=x),
                  lambda: Match(proto=x),
                  lambda: Policy("p", Match(), priority=x)):
        with pytest.raises(ConfigError):
            build()


@pytest.mark.parametrize("conv", [
    lambda x: v.number("f", x, 0), lambda x: v.number("f", x, 0, 10), lambda x: v.optional_number("f", x, 0),
    lambda x: v.integer("f", x, 0, 10), lambda x: v.ports("f", x), lambda x: v.protocols("f", x),
    lambda x: v.name("f", x), lambda x: v.network("f", x), lambda x: v.address("f", x),
])
@pytest.mark.parametrize("x", HUGE + [[10**400], (10**400, 1), {10**400}], ids=_id)
def test_converters_raise_config_error_only(conv, x):
    with pytest.raises(ConfigError):
        conv(x)


def test_finite_large_numbers_within_range_still_convert():
    assert v.number("f", 10**300, 0) == 1e300
    assert Uplink("a", "192.0.2.1", bandwidth_mbps=10**6).bandwidth_mbps == 1e6


junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400),
    st.sampled_from([10**400, -(10**400), 2**1024, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=8),
    st.lists(st.one_of(st.integers(), st.floats()), max_size=3),
    st.tuples(st.integers(), st.integers()),
)


@settings(max_examples=400)
@given(x=junk, lo=st.sampled_from([0, 1, -5]), hi=st.sampled_from([10, 1e6, math.inf]), lo_open=st.booleans())
def test_number_gives_a_canonical_float_or_config_error(x, lo, hi, lo_open):
    try:
        r = v.number("f", x, lo, hi, lo_open=lo_open)
    except ConfigError:
        return
    assert type(r) is float and math.isfinite(r) and lo <= r <= hi


@settings(max_examples=300)
@given(name=junk, address=junk, mtu=junk, port=junk, nat=junk, bw=junk, cost=junk)
def test_uplink_with_huge_junk_only_raises_config_error(name, address, mtu, port, nat, bw, cost):
    try:
        u = Uplink(name, address, mtu=mtu, port=port, nat=nat, bandwidth_mbps=bw, cost=cost)
    except ConfigError:
        return
    assert Uplink.from_dict(u.to_dict()) == u


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["detect_ms", "failback_hold_s", "multiplier", "sla_windows", "cooldown_s",
                                        "damp_penalty", "damp_half_life_s", "damp_reuse", "damp_suppress"]), junk))
def test_failover_with_huge_junk_only_raises_config_error(d):
    try:
        f = Failover.from_dict(d)
    except ConfigError:
        return
    assert all(math.isfinite(x) for x in f.to_dict().values())


@settings(max_examples=300)
@given(src=junk, dst=junk, sp=junk, dp=junk, proto=junk, dscp=junk)
def test_match_with_huge_junk_only_raises_config_error(src, dst, sp, dp, proto, dscp):
    try:
        m = Match(src=src, dst=dst, src_ports=sp, dst_ports=dp, proto=proto, dscp=dscp)
    except ConfigError:
        return
    assert Match.from_dict(m.to_dict()) == m


# -- 5: messages quote a bounded amount --------------------------------------

def test_error_message_caps_a_huge_name():
    big = "x" * 1_000_000
    with pytest.raises(ConfigError) as ei:
        Site(big, subnets=[], uplinks=[up()])
    msg = str(ei.value)
    assert len(msg) < 500
    assert msg.startswith("Site.name: 'xxx")
    assert "1000000 characters" in msg and "..." in msg
    assert ei.value.value == big  # the attribute keeps the whole value


def test_error_message_of_a_huge_int_and_a_huge_list():
    for x in (10**5000, list(range(100_000)), b"\xff" * 10_000):
        with pytest.raises(ConfigError) as ei:
            Uplink("a", "192.0.2.1", mtu=x)
        assert len(str(ei.value)) < 500 and "Uplink.mtu" in str(ei.value)


def test_error_message_of_a_value_whose_repr_fails():
    class Nasty:
        def __repr__(self):
            raise RuntimeError("no")

    with pytest.raises(ConfigError, match="Uplink.mtu: <Nasty object"):
        Uplink("a", "192.0.2.1", mtu=Nasty())


def test_short_values_are_quoted_as_before():
    with pytest.raises(ConfigError) as ei:
        Match(dst="10.0.0.1/8")
    assert str(ei.value) == "Match.dst: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"


# -- 7: mesh-level consistency ----------------------------------------------

def two_sites():
    mesh = Mesh("acme")
    mesh.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[up("isp1", "192.0.2.1"), up("lte", "198.51.100.7")]))
    mesh.add_site(Site("br1", subnets=["10.2.0.0/24", "fd00:2::/64"], uplinks=[up("isp1", "203.0.113.9")]))
    return mesh


def test_remove_site_refuses_while_a_policy_sends_only_there():
    mesh = two_sites()
    mesh.add_policy(Policy("to-br1", Match(dst="10.2.0.0/25"), priority=1))
    before = mesh.to_dict()
    with pytest.raises(ConfigError, match=r"'br1'.*policy 'to-br1'"):
        mesh.remove_site("br1")
    assert mesh.to_dict() == before
    mesh.remove_policy("to-br1")
    mesh.remove_site("br1")
    assert [s.name for s in mesh.sites] == ["hq"]


def test_remove_site_allows_policies_that_reach_other_sites():
    mesh = two_sites()
    mesh.add_site(Site("br2", subnets=["10.3.0.0/24"], uplinks=[up("isp1", "203.0.113.10")]))
    mesh.add_policy(Policy("all10", Match(dst="10.0.0.0/8"), priority=1))   # reaches hq and br2 too
    mesh.add_policy(Policy("any", Match(proto="udp"), priority=2))           # no dst
    mesh.add_policy(Policy("v6", Match(dst="fd00:9::/64"), priority=3))      # reaches no site at all
    mesh.remove_site("br1")


def test_remove_site_refuses_a_supernet_policy_that_only_covered_it():
    mesh = two_sites()
    mesh.add_policy(Policy("br1v6", Match(dst="fd00::/16"), priority=1))
    with pytest.raises(ConfigError, match="br1v6"):
        mesh.remove_site("br1")


def test_prefer_must_name_an_uplink_of_some_site():
    mesh = two_sites()
    with pytest.raises(ConfigError, match=r"Policy.prefer: 'ltee' .*uplink"):
        mesh.add_policy(Policy("v", Match(), priority=1, prefer=["isp1", "ltee"]))
    assert mesh.policies == ()
    mesh.add_policy(Policy("v", Match(), priority=1, prefer=["lte", "isp1"]))


def test_remove_site_refuses_to_orphan_a_prefer_name():
    mesh = two_sites()
    mesh.add_site(Site("br2", subnets=["10.3.0.0/24"], uplinks=[up("sat", "203.0.113.10")]))
    mesh.add_policy(Policy("v", Match(), priority=1, prefer=["sat"]))
    with pytest.raises(ConfigError, match=r"policy 'v'.*'sat'"):
        mesh.remove_site("br2")
    mesh.remove_site("br1")  # isp1 is also at hq; nothing preferred only there


def test_same_uplink_address_at_two_sites_is_refused():
    mesh = two_sites()
    with pytest.raises(ConfigError, match=r"Uplink.address: '192.0.2.1' .*'br2'.*'hq'"):
        mesh.add_site(Site("br2", subnets=["10.3.0.0/24"], uplinks=[up("x", "192.0.2.1")]))
    with pytest.raises(ConfigError, match="Uplink.address"):  # canonical form compared
        mesh.add_site(Site("br3", subnets=["fd00:3::/64"], uplinks=[up("x", "198.51.100.7")]))
    assert [s.name for s in mesh.sites] == ["hq", "br1"]


def test_from_dict_applies_the_mesh_checks():
    d = two_sites().to_dict()
    d["policies"] = [Policy("v", Match(), priority=1, prefer=["ltee"]).to_dict()]
    with pytest.raises(ConfigError, match="ltee"):
        Mesh.from_dict(d)
