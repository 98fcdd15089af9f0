"""FlowMeter over a real data plane (userspace, timed by the test's clock):
whatever the traffic, the polls and the table size, every packet is in
exactly one exported record, no record is empty, and a flow that lives
past the active timeout is exported in several records."""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import PolicyTable
from patronus.dataplane import Userspace
from patronus.export import FlowMeter
from patronus.ipfix import END_REASONS

S = 1_000_000_000


def frame(flow: int, size: int = 60) -> bytes:
    """An Ethernet + IPv4 + UDP frame of flow number ``flow``."""
    payload = bytes(size)
    udp = struct.pack("!HHHH", 10000 + flow, 53, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]),
                     bytes([10, 1, flow // 256, flow % 256])) + udp
    return b"\x04" * 6 + b"\x02" * 6 + b"\x08\x00" + ip


events = st.lists(st.one_of(
    st.tuples(st.just("pkt"), st.integers(0, 30), st.integers(1, 20 * S)),   # a packet of a flow, after a delay
    st.tuples(st.just("poll"), st.just(0), st.integers(1, 20 * S))), min_size=1, max_size=150)


@settings(max_examples=80, deadline=None)
@given(events, st.integers(2, 40), st.sampled_from([5, 15]), st.sampled_from([10, 30]))
def test_every_packet_is_in_exactly_one_record(evs, capacity, idle_s, active_s):
    dp = Userspace(PolicyTable([]), capacity)
    records: list[tuple[int, int, int]] = []   # (flow, packets, reason)

    def sink(flows, codes):
        assert len(flows) == len(codes)
        for f, c in zip(flows, codes):
            assert f["packets"] > 0 and f["bytes"] > 0 and f["last_ns"] >= f["first_ns"]
            records.append((int(f["sport"]) - 10000, int(f["packets"]), int(c)))

    meter = FlowMeter(dp, [sink], idle_timeout_s=idle_s, active_timeout_s=active_s)
    now, sent = 10 * S, Counter()
    for kind, flow, delay in evs:
        now += delay
        if kind == "pkt":
            dp.process([frame(flow)], np.array([now], np.uint64))
            sent[flow] += 1
        else:
            meter.poll(now)
    meter.close()
    got = Counter()
    for flow, packets, _ in records:
        got[flow] += packets
    assert got == sent
    assert dp.counters()["export_lost"] == 0


def test_a_long_flow_is_exported_every_active_timeout_and_adds_up():
    dp = Userspace(PolicyTable([]), 64)
    out: list[tuple[int, int, int, int]] = []
    meter = FlowMeter(dp, [lambda f, c: out.extend((int(x["packets"]), int(x["first_ns"]), int(x["last_ns"]), int(r))
                                                   for x, r in zip(f, c))],
                      idle_timeout_s=15, active_timeout_s=60)
    t = 100 * S
    for k in range(181):                 # a packet a second for three minutes, polled every 5 s
        dp.process([frame(1)], np.array([t + k * S], np.uint64))
        if k % 5 == 4:
            meter.poll(t + k * S)
    meter.poll(t + 200 * S)              # idle since 180 s: its last record
    # records at the polls of 64 s and 124 s (60 s after the flow's, then the record's, start), then the idle one
    assert [r for *_, r in out] == [END_REASONS["active"]] * 2 + [END_REASONS["idle"]]
    assert [p for p, *_ in out] == [65, 60, 56]
    assert sum(p for p, *_ in out) == 181
    # each record starts where the one before ended
    assert all(out[i + 1][1] == out[i][2] for i in range(len(out) - 1))
    assert meter.close() == 0            # nothing left
