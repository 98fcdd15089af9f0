"""PolicyTable.classify against the pure-Python reference (the oracle)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Match, Policy, PolicyTable, packets, reference
from patronus.abi import MALFORMED_REASONS
from patronus.policy import frames_to_buffer

from .frames import any_frames, valid_frames
from .strategies import policy_lists


def ref_ids(policies, frames):
    return np.array([reference.classify(policies, f) for f in frames], dtype=np.int32)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_lists(max_size=20), st.lists(any_frames, max_size=30))
def test_classify_equals_reference(policies, frames):
    table = PolicyTable(policies)
    want = ref_ids(policies, frames)
    assert table.classify(frames).tolist() == want.tolist()
    assert table.classify(frames, cache=False).tolist() == want.tolist()
    assert table.classify_linear(frames).tolist() == want.tolist()
    assert table.classify(frames_to_buffer(frames)).tolist() == want.tolist()
    # a second pass is served from the cache and must agree too
    assert table.classify(frames).tolist() == want.tolist()


@settings(max_examples=200, deadline=None)
@given(policy_lists(max_size=8), st.lists(valid_frames(), min_size=1, max_size=10))
def test_malformed_counted_by_reason(policies, frames):
    table = PolicyTable(policies)
    table.classify(frames)
    want = dict.fromkeys(MALFORMED_REASONS, 0)
    for f in frames:
        p = reference.parse(f)
        if isinstance(p, reference.Malformed):
            want[p.reason] += 1
    assert table.malformed() == want


def test_examples_by_hand():
    pols = [
        Policy("v6-any", Match(src="::/0"), priority=50),
        Policy("sip", Match(proto="udp", dst_ports=(5060, 5061)), priority=10),
        Policy("ports-any-proto", Match(src_ports=(0, 65535)), priority=20),
        Policy("ef", Match(dscp=46), priority=30),
        Policy("lan", Match(dst="10.2.0.0/16"), priority=40),
    ]
    t = PolicyTable(pols)
    frames = [
        packets.udp("10.1.0.1", "10.2.0.1", 1000, 5061),          # sip (10)
        packets.tcp("10.1.0.1", "10.9.0.1", 1000, 80),            # ports-any-proto (20)
        packets.icmp("10.1.0.1", "10.9.0.1", dscp=46),            # ef (30): no ports
        packets.icmp("10.1.0.1", "10.2.3.4"),                     # lan (40)
        packets.icmp("2001:db8::1", "2001:db8::2"),               # v6-any (50)
        packets.icmp("10.1.0.1", "10.9.9.9"),                     # nothing
        packets.udp("10.1.0.1", "10.2.0.1", 1000, 5060)[:40],     # IP total length past the frame
        packets.ethernet(packets.ipv4("10.1.0.1", "10.2.0.1", 17, b"\x13\xc4\x13\xc4"), 0x0800),  # 4-byte UDP
    ]
    assert t.classify(frames).tolist() == [1, 2, 3, 4, 0, -1, -1, -1]
    assert t.malformed()["bad_len"] == 1 and t.malformed()["trunc_l4"] == 1


def test_ipv4_prefix_never_matches_ipv6():
    t = PolicyTable([Policy("all4", Match(src="0.0.0.0/0"), priority=1)])
    assert t.classify([packets.icmp("::1", "::2"), packets.icmp("1.2.3.4", "5.6.7.8")]).tolist() == [-1, 0]


def test_non_first_fragment_has_no_ports():
    from patronus.packets import ethernet, ipv4

    t = PolicyTable([Policy("dns", Match(dst_ports=53), priority=1), Policy("udp", Match(proto="udp"), priority=2)])
    first = ethernet(ipv4("10.0.0.1", "10.0.0.2", 17, b"\x00\x35\x00\x35" + bytes(4), more_fragments=True), 0x0800)
    later = ethernet(ipv4("10.0.0.1", "10.0.0.2", 17, b"\x00\x35\x00\x35" + bytes(4), frag_offset=3), 0x0800)
    assert t.classify([first, later]).tolist() == [0, 1]


def test_table_rejects_duplicates():
    with pytest.raises(ConfigError, match="duplicate policy name"):
        PolicyTable([Policy("a", Match(), priority=1), Policy("a", Match(), priority=2)])
    with pytest.raises(ConfigError, match="already used"):
        PolicyTable([Policy("a", Match(), priority=1), Policy("b", Match(), priority=1)])


def test_empty_table_and_empty_input():
    t = PolicyTable([])
    assert t.classify([packets.icmp("1.1.1.1", "2.2.2.2")]).tolist() == [-1]
    assert t.classify([]).tolist() == []
    assert t.classify(frames_to_buffer([])).tolist() == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(policy_lists(max_size=12), st.lists(any_frames, max_size=20), st.integers(4_100, 9_000),
       st.integers(0, 2**32))
def test_tables_of_several_bitmap_chunks_classify_like_the_linear_scan(policies, frames, n, seed):
    """Past 4,096 rules a row's bitmap spans several 64-word chunks, stored
    once each and shared between rows. Random policies hidden among n filler
    rules (distinct /24s and ports, random priorities) classify like the
    linear scan, including frames aimed at the filler."""
    rnd = random.Random(seed)
    taken = {p.priority for p in policies}
    prios = [p for p in rnd.sample(range(2**31 - 1), n + len(taken)) if p not in taken][:n]
    filler = [Policy(f"fill{i}", Match(dst=f"10.{i // 250}.{i % 250}.0/24", dst_ports=1000 + i % 64, proto="tcp"),
                     priority=prios[i]) for i in range(n)]
    names = {p.name for p in policies}
    table = PolicyTable([p for p in filler if p.name not in names] + policies)
    aimed = [packets.tcp("192.0.2.1", f"10.{i // 250}.{i % 250}.9", 5000, 1000 + i % 64)
             for i in rnd.sample(range(n), 10)]
    aimed += [packets.tcp("192.0.2.1", f"10.{i // 250}.{i % 250}.9", 5000, 999) for i in rnd.sample(range(n), 3)]
    fs = frames + aimed
    want = table.classify_linear(fs).tolist()
    assert table.classify(fs, cache=False).tolist() == want
    assert sum(1 for w in want[len(frames):len(frames) + 10] if w >= 0) >= 1  # the filler does match
