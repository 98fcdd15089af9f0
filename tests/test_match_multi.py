"""Policies with several port ranges and protocols: compiled into one rule
per (source range x destination range x protocol), classified like the
pure-Python reference, written as nftables sets."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Match, Policy, PolicyTable, packets, reference
from patronus.dataplane.nft import rule_text
from patronus.policy import compile_rules, frames_to_buffer

from .frames import PORTS, V4, V6, any_frames
from .strategies import names, networks

# ports near the ones tests/frames.py draws, so random frames hit the ranges
near = st.one_of(st.sampled_from(PORTS), st.sampled_from(PORTS).flatmap(
    lambda p: st.integers(max(p - 3, 0), min(p + 3, 65535))), st.integers(0, 65535))
port_items = st.one_of(near, st.tuples(near, near).map(lambda t: (min(t), max(t))))
port_sets = st.one_of(
    st.none(), near, st.lists(port_items, min_size=1, max_size=6),
    st.lists(port_items, min_size=1, max_size=6).map(lambda xs: ",".join(
        str(x) if isinstance(x, int) else f"{x[0]}-{x[1]}" for x in xs)),
)


@st.composite
def multi_matches(draw):
    """Matches with several port ranges and protocols (and the single forms)."""
    fam = draw(st.sampled_from([4, 6]))
    src = draw(st.one_of(st.none(), networks(fam)))
    dst = draw(st.one_of(st.none(), networks(fam)))
    sp, dp = draw(port_sets), draw(port_sets)
    if sp is not None or dp is not None:
        proto = draw(st.sampled_from([None, "tcp", "udp", "tcp/udp", [17, 6], 6, 17]))
    else:
        proto = draw(st.one_of(st.none(), st.sampled_from(["tcp/udp", "icmp,icmpv6", "udp/icmp", "tcp"]),
                               st.lists(st.one_of(st.sampled_from([1, 6, 17, 58]), st.integers(0, 255)),
                                        min_size=1, max_size=4)))
    dscp = draw(st.one_of(st.none(), st.integers(0, 63)))
    return Match(src=src, dst=dst, src_ports=sp, dst_ports=dp, proto=proto, dscp=dscp)


@st.composite
def multi_policy_lists(draw, max_size=10):
    n = draw(st.integers(0, max_size))
    pnames = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    prios = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n, unique=True))
    return [Policy(pn, draw(multi_matches()), priority=pr) for pn, pr in zip(pnames, prios)]


def _addr_in(draw, cidr, fam):
    if cidr is None:
        return draw(st.sampled_from(V6 if fam == 6 else V4))
    net = ipaddress.ip_network(cidr)
    return str(net.network_address + draw(st.integers(0, net.num_addresses - 1)))


@st.composite
def aimed_frames(draw, policies):
    """Frames built to match a policy, with ports at the edges of its ranges
    (lo - 1, lo, hi, hi + 1: just outside, as often as inside) and protocols
    from its set (or next to it)."""
    out = []
    for _ in range(draw(st.integers(0, 16)) if policies else 0):
        m = draw(st.sampled_from(policies)).match
        fam = 6 if any(c and ":" in c for c in (m.src, m.dst)) else 4 if (m.src or m.dst) else \
            draw(st.sampled_from([4, 6]))
        src, dst = _addr_in(draw, m.src, fam), _addr_in(draw, m.dst, fam)
        ports = []
        for ranges in (m.src_ports, m.dst_ports):
            lo, hi = draw(st.sampled_from(ranges)) if ranges else (0, 65535)
            ports.append(draw(st.sampled_from([max(lo - 1, 0), lo, hi, min(hi + 1, 65535)])))
        proto = draw(st.sampled_from(m.protos or (6, 17)))
        proto = draw(st.sampled_from([proto, proto, (proto + 1) % 256, 6, 17]))
        dscp = draw(st.sampled_from([m.dscp or 0, draw(st.integers(0, 63))]))
        if proto in (6, 17):
            make = packets.tcp if proto == 6 else packets.udp
            out.append(make(src, dst, ports[0], ports[1], dscp=dscp))
        elif fam == 4:
            out.append(packets.ethernet(packets.ipv4(src, dst, proto, bytes(8), dscp=dscp), 0x0800))
        else:
            out.append(packets.ethernet(packets.ipv6(src, dst, proto, bytes(8), dscp=dscp), 0x86DD))
    return out


def ref_ids(policies, frames):
    return [reference.classify(policies, f) for f in frames]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), multi_policy_lists())
def test_several_ranges_and_protocols_classify_like_the_reference(data, policies):
    frames = data.draw(st.lists(any_frames, max_size=20)) + data.draw(aimed_frames(policies))
    table = PolicyTable(policies)
    want = ref_ids(policies, frames)
    assert table.classify(frames).tolist() == want
    assert table.classify(frames, cache=False).tolist() == want
    assert table.classify_linear(frames).tolist() == want
    assert table.classify(frames_to_buffer(frames)).tolist() == want


@settings(max_examples=200, deadline=None)
@given(multi_policy_lists())
def test_each_policy_compiles_to_a_contiguous_block_of_its_combinations(policies):
    rules = compile_rules(policies)
    want = sum(len(p.match.src_ports or (0,)) * len(p.match.dst_ports or (0,)) * len(p.match.protos or (0,))
               for p in policies)
    assert len(rules) == want
    assert (np.diff(rules["priority"].astype(np.int64)) >= 0).all()
    blocks = [int(rules["policy"][0])] if len(rules) else []
    for a, b in zip(rules["policy"][:-1], rules["policy"][1:]):
        if a != b:
            blocks.append(int(b))
    assert sorted(blocks) == sorted(range(len(policies)))  # one block per policy
    for i, p in enumerate(policies):
        rows = rules[rules["policy"] == i]
        assert (rows["priority"] == p.priority).all()
        got = {(int(r["sport_lo"]), int(r["sport_hi"]), int(r["dport_lo"]), int(r["dport_hi"]), int(r["proto"]))
               for r in rows}
        assert got == {(s[0], s[1], d[0], d[1], pr) for s in (p.match.src_ports or ((0, 0),))
                       for d in (p.match.dst_ports or ((0, 0),)) for pr in (p.match.protos or (0,))}
        assert len(got) == len(rows)


def test_sip_over_tcp_and_udp_plus_rtp():
    sip = Policy("sip", Match(proto="tcp/udp", dst_ports=[5060, 5061, (10000, 20000)]), priority=10)
    dns = Policy("dns", Match(proto="udp", dst_ports="53"), priority=20)
    t = PolicyTable([dns, sip])
    assert len(t.rules) == 5 and t.rules["policy"].tolist() == [1, 1, 1, 1, 0]
    frames = [packets.udp("10.0.0.1", "10.0.0.2", 9, 5060), packets.tcp("10.0.0.1", "10.0.0.2", 9, 5061),
              packets.udp("10.0.0.1", "10.0.0.2", 9, 5062), packets.tcp("10.0.0.1", "10.0.0.2", 9, 10000),
              packets.udp("::1", "::2", 9, 20000), packets.udp("::1", "::2", 9, 20001),
              packets.udp("10.0.0.1", "10.0.0.2", 9, 53), packets.tcp("10.0.0.1", "10.0.0.2", 9, 53),
              packets.icmp("10.0.0.1", "10.0.0.2")]
    assert t.classify(frames).tolist() == [1, 1, -1, 1, 1, -1, 0, -1, -1]


def test_one_policy_takes_at_most_4096_rules():
    ok = Match(proto="tcp/udp", src_ports=list(range(0, 128, 2)), dst_ports=list(range(0, 64, 2)))
    assert len(compile_rules([Policy("ok", ok, priority=1)])) == 4096
    big = Match(proto="tcp/udp", src_ports=list(range(0, 130, 2)), dst_ports=list(range(0, 64, 2)))
    with pytest.raises(ConfigError) as ei:
        PolicyTable([Policy("ok", ok, priority=1), Policy("big", big, priority=2)])
    assert ei.value.field == "Policy.match" and ei.value.value == "big"
    assert "4,160 classifier rules" in str(ei.value) and "more than 4,096" in str(ei.value)


def test_nft_rule_text_writes_sets():
    sip = Policy("sip", Match(proto="tcp/udp", dst_ports="5060-5061,10000-20000"), priority=1)
    assert rule_text(sip, "lan0", 0x7003) == (
        'iifname "lan0" meta l4proto { 6, 17 } th dport { 5060-5061, 10000-20000 } meta mark set 0x7003 accept')
    dns = Policy("dns", Match(src_ports=(1024, 65535), dst_ports=[53, 853]), priority=2, action="drop")
    assert rule_text(dns, "lan0", None) == (
        'iifname "lan0" meta l4proto { 6, 17 } th sport 1024-65535 th dport { 53, 853 } drop')
    one = Policy("one", Match(proto="udp", dst_ports=5060), priority=3)
    assert rule_text(one, "lan0", None) == 'iifname "lan0" meta l4proto 17 th dport 5060 accept'
    icmp = Policy("icmp", Match(proto="icmp/icmpv6"), priority=4)
    assert rule_text(icmp, "lan0", None) == 'iifname "lan0" meta l4proto { 1, 58 } accept'


def test_a_two_port_list_in_a_mapping_is_refused_when_it_could_mean_a_range():
    """Earlier versions wrote a range as [lo, hi]; now a list holds ports. A
    mapping (JSON) with such a list is refused by name instead of guessed."""
    with pytest.raises(ConfigError, match=r'ambiguous in a mapping: write "10000-20000" for the range'):
        Match.from_dict({"proto": 17, "dst_ports": [10000, 20000]})
    # where both readings are the same ports, nothing to guess
    assert Match.from_dict({"dst_ports": [5060, 5061]}).dst_ports == ((5060, 5061),)
    assert Match.from_dict({"dst_ports": "10000-20000"}).dst_ports == ((10000, 20000),)
    assert Match.from_dict({"dst_ports": [[10000, 20000], 53]}).dst_ports == ((53, 53), (10000, 20000))
