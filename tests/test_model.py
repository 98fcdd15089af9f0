"""The object model: validation, canonical forms, to_dict/from_dict round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Failover, Match, Policy, QoS, Site, Uplink
from patronus.apps import BUILTIN_PROFILES, AppProfile

from .strategies import failovers, matches, policy_lists, qos, site_lists, uplinks


def test_match_canonical_forms():
    m = Match(src="2001:DB8::/32", dst="2001:db8:1::/48", src_ports=80, proto="TCP")
    assert m.src == "2001:db8::/32"
    assert m.src_ports == (80, 80)
    assert m.proto == 6 and m.proto_name == "tcp"
    assert Match(proto="udp") == Match(proto=17)


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"dst": "10.0.0.1/8"}, "Match.dst", "host bits set (did you mean 10.0.0.0/8?)"),
        ({"src": "10.0.0.0/33"}, "Match.src", "not a valid IPv4 or IPv6 CIDR"),
        ({"src": "banana"}, "Match.src", "not a valid"),
        ({"src": 42}, "Match.src", "not a CIDR string"),
        ({"dst_ports": (10, 5)}, "Match.dst_ports", "lo > hi"),
        ({"dst_ports": 70000}, "Match.dst_ports", "out of range"),
        ({"src_ports": (1, 2, 3)}, "Match.src_ports", "inclusive (lo, hi)"),
        ({"src_ports": True}, "Match.src_ports", "not a port"),
        ({"proto": "sctpx"}, "Match.proto", "not a known protocol"),
        ({"proto": 256}, "Match.proto", "out of range"),
        ({"dscp": 64}, "Match.dscp", "out of range"),
        ({"proto": "icmp", "dst_ports": 80}, "Match.proto", "ports are matched for tcp and udp only"),
        ({"src": "10.0.0.0/8", "dst": "::/0"}, "Match.dst", "address family"),
    ],
)
def test_match_rejects(kwargs, field, fragment):
    with pytest.raises(ConfigError) as ei:
        Match(**kwargs)
    assert ei.value.field == field
    assert fragment in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_site_and_uplink_rejects():
    up = Uplink("isp1", "192.0.2.1")
    with pytest.raises(ConfigError, match="at least one uplink"):
        Site("hq", subnets=["10.1.0.0/24"], uplinks=[])
    with pytest.raises(ConfigError, match="duplicate uplink name"):
        Site("hq", subnets=[], uplinks=[up, up])
    with pytest.raises(ConfigError, match="overlap"):
        Site("hq", subnets=["10.0.0.0/8", "10.1.0.0/16"], uplinks=[up])
    with pytest.raises(ConfigError, match="not a valid name"):
        Site("h q", subnets=[], uplinks=[up])
    with pytest.raises(ConfigError, match="Uplink.address"):
        Uplink("isp1", "999.1.1.1")
    with pytest.raises(ConfigError, match="Uplink.mtu"):
        Uplink("isp1", "192.0.2.1", mtu=100)
    with pytest.raises(ConfigError, match="Site.uplinks"):
        Site("hq", subnets=[], uplinks="isp1")


def test_policy_and_failover_rejects():
    with pytest.raises(ConfigError, match="Policy.match"):
        Policy("p", "udp", priority=1)
    with pytest.raises(ConfigError, match="Policy.priority"):
        Policy("p", Match(), priority=-1)
    with pytest.raises(ConfigError, match="Policy.action"):
        Policy("p", Match(), priority=1, action="teleport")
    with pytest.raises(ConfigError, match="names an uplink twice"):
        Policy("p", Match(), priority=1, prefer=("a", "a"))
    with pytest.raises(ConfigError, match="Failover.detect_ms"):
        Failover(detect_ms=0)
    with pytest.raises(ConfigError, match="Failover.multiplier"):
        Failover(detect_ms=3, multiplier=5)
    with pytest.raises(ConfigError, match="damp_suppress"):
        Failover(damp_reuse=3000, damp_suppress=2000)


def test_failover_interval_and_defaults():
    f = Failover(detect_ms=150, failback_hold_s=30)
    assert f.interval_ms == 50 and f.multiplier == 3
    assert Policy("p", Match(), priority=1).qos == QoS()


def test_builtin_profiles_cite_sources():
    for name in ("voip", "video", "gaming", "bulk", "default"):
        p = BUILTIN_PROFILES[name]
        assert p.source != "user defined"
        assert p.max_rtt_ms > 0 and 0 <= p.max_loss_pct <= 100
    # voice is stricter than bulk on every threshold
    assert BUILTIN_PROFILES["voip"].max_loss_pct < BUILTIN_PROFILES["bulk"].max_loss_pct
    assert BUILTIN_PROFILES["voip"].max_rtt_ms < BUILTIN_PROFILES["bulk"].max_rtt_ms


@given(uplinks)
def test_uplink_roundtrip(u):
    assert Uplink.from_dict(u.to_dict()) == u


@given(matches(), qos)
def test_match_qos_roundtrip(m, q):
    assert Match.from_dict(m.to_dict()) == m
    assert QoS.from_dict(q.to_dict()) == q


@given(policy_lists())
def test_policy_roundtrip(pols):
    for p in pols:
        assert Policy.from_dict(p.to_dict()) == p


@given(failovers)
def test_failover_roundtrip(f):
    assert Failover.from_dict(f.to_dict()) == f


@given(site_lists())
def test_site_roundtrip(sites):
    for s in sites:
        assert Site.from_dict(s.to_dict()) == s


# Anything goes in: a constructor either builds a valid object or raises ConfigError.
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=40),
    st.binary(max_size=8), st.lists(st.integers(-5, 70000), max_size=3),
    st.tuples(st.integers(-5, 70000), st.integers(-5, 70000)),
    st.sampled_from(["10.0.0.0/8", "10.0.0.1/8", "::/0", "fe80::1/64", "tcp", "udp", "x", "1.2.3.4"]),
)


@settings(max_examples=300)
@given(src=junk, dst=junk, sp=junk, dp=junk, proto=junk, dscp=junk)
def test_match_only_raises_config_error(src, dst, sp, dp, proto, dscp):
    try:
        m = Match(src=src, dst=dst, src_ports=sp, dst_ports=dp, proto=proto, dscp=dscp)
    except ConfigError:
        return
    assert Match.from_dict(m.to_dict()) == m


@settings(max_examples=300)
@given(name=junk, address=junk, mtu=junk, port=junk, nat=junk, bw=junk, cost=junk)
def test_uplink_only_raises_config_error(name, address, mtu, port, nat, bw, cost):
    try:
        Uplink(name, address, mtu=mtu, port=port, nat=nat, bandwidth_mbps=bw, cost=cost)
    except ConfigError:
        pass


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["name", "match", "priority", "app", "qos", "prefer", "action", "bogus"]),
                       st.one_of(junk, st.dictionaries(st.sampled_from(["src", "proto", "dscp"]), junk))))
def test_policy_from_dict_only_raises_config_error(d):
    try:
        Policy.from_dict(d)
    except ConfigError:
        pass


def test_app_profile_user_defined():
    p = AppProfile("trading", max_rtt_ms=20, max_jitter_ms=5, max_loss_pct=0.1)
    assert AppProfile.from_dict(p.to_dict()) == p
    with pytest.raises(ConfigError, match="AppProfile.max_loss_pct"):
        AppProfile("x", max_rtt_ms=1, max_jitter_ms=1, max_loss_pct=101)
