"""The userspace data plane: flow records against the pure-Python accounting,
eviction, timeouts, counters, path slots and table swaps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Match, Policy, PolicyTable, packets, reference
from patronus.abi import MALFORMED_REASONS
from patronus.dataplane import Userspace
from patronus.policy import frames_to_buffer

from .frames import any_frames
from .strategies import policy_lists, site_tables

FIELDS = ("family", "sport", "dport", "proto", "packets", "bytes", "first_ns", "last_ns", "policy", "site", "path",
          "tcp_flags", "dscp")


def rows(arr: np.ndarray) -> list[tuple]:
    """Flow rows as comparable tuples (addresses trimmed to their family's length)."""
    out = []
    for r in arr:
        n = 4 if r["family"] == 4 else 16
        out.append((bytes(r["src"])[:n], bytes(r["dst"])[:n]) + tuple(int(r[f]) for f in FIELDS))
    return sorted(out)


def ref_rows(recs) -> list[tuple]:
    return sorted((r["src"], r["dst"]) + tuple(int(r[f]) for f in FIELDS) for r in recs)


@st.composite
def traffic(draw):
    """Frames drawn from a small pool (so flows repeat) with non-decreasing timestamps."""
    pool = draw(st.lists(any_frames, min_size=1, max_size=12))
    seq = draw(st.lists(st.sampled_from(pool), max_size=60))
    gaps = draw(st.lists(st.integers(0, 3_000), min_size=len(seq), max_size=len(seq)))
    return seq, np.cumsum(gaps, dtype=np.uint64) + 1_000


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_lists(max_size=10), traffic(), st.integers(1, 8),
       st.sampled_from([0, 2_000, 5_000]), st.sampled_from([0, 4_000, 20_000]), site_tables(), st.data())
def test_flows_equal_reference_accounting(policies, tr, capacity, idle, active, sites, data):
    frames, ts = tr
    table = PolicyTable(policies, sites=sites)
    path_of = {i: 100 + i for i in range(-1, len(policies))}
    # and a path of its own for some (class, site) pairs
    routes = data.draw(st.dictionaries(st.tuples(st.integers(-1, len(policies) - 1), st.integers(0, len(sites))),
                                       st.integers(0, 1000), max_size=8))
    dp = Userspace(table, flow_capacity=capacity, idle_timeout_s=idle / 1e9 or None,
                   active_timeout_s=active / 1e9 or None)
    for i, p in path_of.items():
        dp.set_path(i, p)
    dp.set_paths([(c, s, p) for (c, s), p in routes.items()])
    ref = reference.FlowAccounting(policies, capacity, idle, active, path_of, sites=sites, routes=routes)
    got = dp.process(frames, ts_ns=ts)
    want = ref.process(frames, [int(t) for t in ts])
    assert got.tolist() == want
    assert rows(dp.flows()) == ref_rows(ref.flows.values())
    assert rows(dp.drain()) == ref_rows(ref.exported)
    c = dp.counters()
    assert (c["evicted"], c["expired_idle"], c["expired_active"]) == (ref.evicted, ref.expired_idle,
                                                                     ref.expired_active)
    assert c["malformed"] == ref.malformed
    assert [c["default"]["packets"]] + [v["packets"] for v in c["policies"].values()] == ref.policy_packets
    assert [c["default"]["bytes"]] + [v["bytes"] for v in c["policies"].values()] == ref.policy_bytes


@settings(max_examples=60, deadline=None)
@given(policy_lists(max_size=6), traffic())
def test_buffer_input_equals_list_input(policies, tr):
    frames, ts = tr
    a, b = Userspace(PolicyTable(policies), 64), Userspace(PolicyTable(policies), 64)
    assert a.process(frames, ts).tolist() == b.process(frames_to_buffer(frames), ts).tolist()
    assert rows(a.flows()) == rows(b.flows())


def test_eviction_exports_exactly_k_with_full_counts():
    n, k = 100, 37
    table = PolicyTable([Policy("udp", Match(proto="udp"), priority=1)])
    dp = Userspace(table, flow_capacity=n)
    frames, ts = [], []
    for i in range(n + k):  # flow i gets i % 5 + 1 packets, back to back
        f = packets.udp("10.0.0.1", "10.0.1.1", 1000 + i, 53, b"x" * i)
        for j in range(i % 5 + 1):
            frames.append(f)
            ts.append(1_000 * len(ts))
    dp.process(frames, ts_ns=ts)
    c = dp.counters()
    assert c["evicted"] == k and c["flows"] == n
    drained = dp.drain()
    assert len(drained) == k
    assert sorted(drained["sport"].tolist()) == list(range(1000, 1000 + k))  # the k least recent
    for r in drained:
        i = r["sport"] - 1000
        assert r["packets"] == i % 5 + 1
        assert r["bytes"] == (i % 5 + 1) * (20 + 8 + i)
    live = dp.flows()
    assert live["packets"].sum() + drained["packets"].sum() == len(frames)
    total_bytes = sum(len(f) - 14 for f in frames)
    assert live["bytes"].sum() + drained["bytes"].sum() == total_bytes == c["policies"]["udp"]["bytes"]
    assert len(dp.drain()) == 0  # drain clears
    assert len(dp.drain(flush=True)) == n and len(dp.flows()) == 0


def test_idle_and_active_timeouts_from_timestamps():
    dp = Userspace(PolicyTable([]), 16, idle_timeout_s=1.0, active_timeout_s=5.0)
    a = packets.udp("10.0.0.1", "10.0.0.2", 1, 2)
    b = packets.udp("10.0.0.1", "10.0.0.2", 3, 4)
    s = 1_000_000_000
    # a: every 0.5 s for 6 s (active timeout at 5 s); b: once, then idle
    seq = [(b, 0)] + [(a, i * s // 2) for i in range(13)]
    dp.process([f for f, _ in seq], ts_ns=[t for _, t in seq])
    out = dp.drain()
    c = dp.counters()
    assert c["expired_idle"] == 1 and c["expired_active"] == 1
    idle = out[out["sport"] == 3]
    assert len(idle) == 1 and idle["packets"][0] == 1
    active = out[out["sport"] == 1]
    assert active["packets"][0] == 10 and active["first_ns"][0] == 0  # 0 .. 4.5 s
    live = dp.flows()
    assert live["packets"][0] == 3 and live["first_ns"][0] == 5 * s


def test_set_path_is_one_write_and_flows_keep_records():
    table = PolicyTable([Policy("voip", Match(proto="udp", dst_ports=5060), priority=1)])
    dp = Userspace(table, 64)
    f = packets.udp("10.1.0.1", "10.2.0.1", 4000, 5060)
    dp.set_path("voip", 3)
    dp.process([f, f], ts_ns=[1, 2])
    dp.set_path("voip", 7)
    assert dp.path_of("voip") == 7
    dp.process([f], ts_ns=[3])
    (row,) = dp.flows()
    assert row["packets"] == 3 and row["path"] == 7 and row["first_ns"] == 1
    with pytest.raises(ConfigError):
        dp.set_path("nope", 1)
    with pytest.raises(ConfigError):
        dp.set_path(5, 1)
    with pytest.raises(ConfigError):
        dp.set_path("voip", -2)


def test_table_swap_reclassifies_and_keeps_counters():
    f = packets.udp("10.1.0.1", "10.2.0.1", 4000, 5060)
    old = PolicyTable([Policy("a", Match(proto="tcp"), priority=1)])
    new = PolicyTable([Policy("a", Match(proto="udp"), priority=1)])
    dp = Userspace(old, 64)
    assert dp.process([f], ts_ns=[1]).tolist() == [-1]
    dp.set_table(new)
    assert dp.process([f], ts_ns=[2]).tolist() == [0]
    (row,) = dp.flows()
    assert row["packets"] == 2 and row["policy"] == 0
    with pytest.raises(ConfigError, match="policies given"):
        dp.set_table(PolicyTable([]))


def test_bad_arguments_are_config_errors():
    t = PolicyTable([])
    with pytest.raises(ConfigError, match="flow_capacity"):
        Userspace(t, 0)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        Userspace(t, 10, idle_timeout_s=-1)
    with pytest.raises(ConfigError, match="timestamps"):
        Userspace(t, 10).process([b"x"], ts_ns=[1, 2])


def test_malformed_frames_counted_not_accounted():
    dp = Userspace(PolicyTable([]), 8)
    frames = [b"", b"\x00" * 13, packets.udp("10.0.0.1", "10.0.0.2", 1, 2)[:40], bytes(14)]
    assert dp.process(frames, ts_ns=[1, 2, 3, 4]).tolist() == [-1] * 4
    c = dp.counters()
    assert c["malformed"]["trunc_l2"] == 2 and c["malformed"]["bad_len"] == 1 and c["malformed"]["not_ip"] == 1
    assert c["flows"] == 0 and set(c["malformed"]) == set(MALFORMED_REASONS)
