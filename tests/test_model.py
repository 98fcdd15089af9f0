"""The object model: validation, canonical forms, to_dict/from_dict round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Failover, Match, Policy, QoS, Site, Uplink
from patronus import _validate as v
from patronus.apps import BUILTIN_PROFILES, AppProfile

from .strategies import failovers, matches, policy_lists, qos
from .test_mesh import site_lists, uplinks  # site and uplink names without '.'


def test_match_canonical_forms():
    m = Match(src="2001:DB8::/32", dst="2001:db8:1::/48", src_ports=80, proto="TCP")
    assert m.src == "2001:db8::/32"
    assert m.src_ports == ((80, 80),)
    assert m.proto == 6 and m.proto_name == "tcp" and m.protos == (6,)
    assert Match(proto="udp") == Match(proto=17)
    assert Match(dst_ports=53).dst_ports == ((53, 53),)
    assert Match(dst_ports=(5060, 5061)).dst_ports == ((5060, 5061),)  # a two-int tuple is one range


def test_match_several_ranges_and_protocols():
    sip = Match(proto="tcp/udp", dst_ports=[5060, 5061, (10000, 20000)])
    assert sip.dst_ports == ((5060, 5061), (10000, 20000))
    assert sip.proto == (6, 17) and sip.protos == (6, 17) and sip.proto_name == "tcp/udp"
    assert sip == Match(proto="UDP, tcp", dst_ports="5060-5061,10000-20000")
    assert sip == Match(proto={6, "udp"}, dst_ports=" 10000 - 20000 ,5060 , 5061")
    assert sip == Match(proto=("tcp", "udp", "tcp"), dst_ports=[[10000, 20000], (5060, 5061)])
    assert sip.dst_ports_text == "5060-5061,10000-20000" and sip.src_ports_text is None
    assert sip.to_dict() == {"src": None, "dst": None, "src_ports": None, "dst_ports": "5060-5061,10000-20000",
                             "proto": [6, 17], "dscp": None}
    assert Match.from_dict(sip.to_dict()) == sip
    # a list is ports, a two-int tuple a range; overlapping and adjacent ranges merge
    assert Match(dst_ports=[1000, 2000]).dst_ports == ((1000, 1000), (2000, 2000))
    assert Match(dst_ports=[(1, 5), (3, 9), 10, (20, 30), 19]).dst_ports == ((1, 10), (19, 30))
    assert Match(dst_ports=((1, 2), (3, 4))).dst_ports == ((1, 4),)
    assert Match(dst_ports="53").dst_ports_text == "53"
    assert Match(proto=["udp"]).proto == 17 and Match(proto="6/17").proto == (6, 17)
    assert Match(proto=[132, 1]).proto_name == "icmp/132"
    assert Match().protos == () and Match().proto_name is None
    m = Match(proto=(6, 17))  # a tuple of protocols, as stored, reads back the same
    assert Match(proto=m.proto) == m and Match(proto=m.proto_name) == m


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"dst": "10.0.0.1/8"}, "Match.dst", "host bits set (did you mean 10.0.0.0/8?)"),
        ({"src": "10.0.0.0/33"}, "Match.src", "not a valid IPv4 or IPv6 CIDR"),
        ({"src": "banana"}, "Match.src", "not a valid"),
        ({"src": 42}, "Match.src", "not a CIDR string"),
        ({"dst_ports": (10, 5)}, "Match.dst_ports", "lo > hi"),
        ({"dst_ports": 70000}, "Match.dst_ports", "out of range"),
        ({"src_ports": [(1, 2, 3)]}, "Match.src_ports", "inclusive (lo, hi)"),
        ({"src_ports": True}, "Match.src_ports", "not a port"),
        ({"src_ports": [80, "443"]}, "Match.src_ports", "inclusive (lo, hi)"),
        ({"dst_ports": []}, "Match.dst_ports", "is empty: use None for any port"),
        ({"dst_ports": " "}, "Match.dst_ports", "is empty: use None for any port"),
        ({"dst_ports": "53,,80"}, "Match.dst_ports", "not a port or a lo-hi range"),
        ({"dst_ports": "80-70"}, "Match.dst_ports", "lo > hi"),
        ({"dst_ports": "1-70000"}, "Match.dst_ports", "out of range"),
        ({"dst_ports": "-1"}, "Match.dst_ports", "not a port or a lo-hi range"),
        ({"dst_ports": list(range(257))}, "Match.dst_ports", "more than 256 items"),
        ({"dst_ports": ",".join(["1"] * 257)}, "Match.dst_ports", "more than 256 items"),
        ({"dst_ports": "1" + " " * 2048}, "Match.dst_ports", "longer than 2048 characters"),
        ({"dst_ports": [(10000 + 3 * i, 10001 + 3 * i) for i in range(256)]}, "Match.dst_ports",
         "longer than 2048 characters written as a string"),
        ({"dst_ports": {53}}, "Match.dst_ports", "not a port"),
        ({"proto": "tcp/sctpx"}, "Match.proto", "'sctpx' that is not a known protocol"),
        ({"proto": []}, "Match.proto", "is empty: use None for any protocol"),
        ({"proto": ["tcp", 300]}, "Match.proto", "out of range"),
        ({"proto": [["tcp"]]}, "Match.proto", "not a known protocol"),
        ({"proto": "tcp/icmp", "dst_ports": 80}, "Match.proto", "ports are matched for tcp and udp only"),
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
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**400), 10**400), st.sampled_from([10**400, -(10**400), 2**1024, 10**5000, math.inf, -math.inf,
                                                       math.nan]),
    st.text(max_size=40),
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


# Ports and protocols: several ranges, several protocols, three spellings.
port_items = st.one_of(st.integers(-3, 65538), st.tuples(st.integers(-3, 65538), st.integers(-3, 65538)),
                       st.lists(st.integers(-3, 65538), min_size=0, max_size=3), junk)
port_text_items = st.one_of(
    st.integers(-1, 70000).map(str), st.tuples(st.integers(0, 70000), st.integers(0, 70000)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.from_regex(r"[0-9 \-,]{0,8}", fullmatch=True), st.text(max_size=6))
port_inputs = st.one_of(
    junk, port_items, st.lists(port_items, max_size=8), st.lists(port_items, max_size=8).map(tuple),
    st.lists(port_text_items, max_size=8).map(lambda xs: ",".join(xs)),
    st.lists(port_text_items, max_size=8).map(lambda xs: " , ".join(xs)),
)
proto_items = st.one_of(st.integers(-2, 258), st.sampled_from(["tcp", "UDP", "icmp", "icmpv6", " tcp ", "17", "x", ""]))
proto_inputs = st.one_of(
    junk, proto_items, st.lists(proto_items, max_size=5), st.lists(proto_items, max_size=5).map(tuple),
    st.sets(proto_items, max_size=5), st.frozensets(proto_items, max_size=5),
    st.lists(proto_items.map(str), max_size=5).map("/".join), st.lists(proto_items.map(str), max_size=5).map(",".join),
)


def _canonical_ports(r):
    assert isinstance(r, tuple) and r
    for lo, hi in r:
        assert type(lo) is int and type(hi) is int and 0 <= lo <= hi <= 65535
    for (_, hi), (lo, _) in zip(r, r[1:]):
        assert lo > hi + 1  # sorted, neither overlapping nor adjacent


@settings(max_examples=500)
@given(port_inputs)
def test_ports_converter_gives_canonical_value_or_config_error(value):
    try:
        r = v.ports("Match.dst_ports", value)
    except ConfigError as e:
        assert e.field == "Match.dst_ports"
        return
    if r is None:
        assert value is None
        return
    _canonical_ports(r)
    assert v.ports("Match.dst_ports", r) == r  # idempotent: the canonical form is an input
    assert v.ports("Match.dst_ports", v.port_text(r)) == r  # the string form parses back
    assert Match(dst_ports=r).dst_ports == r


@settings(max_examples=500)
@given(proto_inputs)
def test_protocols_converter_gives_canonical_value_or_config_error(value):
    try:
        p = v.protocols("Match.proto", value)
    except ConfigError as e:
        assert e.field == "Match.proto"
        return
    if p is None:
        assert value is None
        return
    if isinstance(p, tuple):
        assert len(p) >= 2 and list(p) == sorted(set(p)) and all(type(x) is int and 0 <= x <= 255 for x in p)
    else:
        assert type(p) is int and 0 <= p <= 255
    m = Match(proto=p)
    assert m.proto == p and Match(proto=m.proto_name) == m and Match(proto=list(m.protos)) == m


ranges_in = st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda t: (min(t), max(t))),
                     min_size=1, max_size=40)


@settings(max_examples=300)
@given(ranges_in, st.sampled_from(["list", "text"]))
def test_port_ranges_merge_to_the_union_of_the_input(ranges, form):
    value = list(ranges) if form == "list" else ",".join(f"{lo}-{hi}" for lo, hi in ranges)
    r = Match(src_ports=value).src_ports
    _canonical_ports(r)
    want = np.zeros(65536, bool)
    for lo, hi in ranges:
        want[lo : hi + 1] = True
    got = np.zeros(65536, bool)
    for lo, hi in r:
        assert not got[lo : hi + 1].any()
        got[lo : hi + 1] = True
    assert (got == want).all()


@settings(max_examples=300)
@given(st.lists(st.one_of(st.integers(0, 65535), ranges_in.map(lambda rs: rs[0])), min_size=1, max_size=10),
       st.lists(st.sampled_from(["tcp", "udp", 6, 17]), min_size=1, max_size=3), st.integers(0, 2))
def test_several_ranges_and_protocols_round_trip(ports, protos, side):
    kw = [{"src_ports": ports}, {"dst_ports": ports}, {"src_ports": ports, "dst_ports": ports[::-1]}][side]
    m = Match(proto=protos, **kw)
    assert Match.from_dict(m.to_dict()) == m
    assert Match.from_dict(json.loads(json.dumps(m.to_dict()))) == m
