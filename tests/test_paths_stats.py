"""Probe statistics against hand-computed values, and properties that hold
for any sequence of sends and replies."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from patronus.paths.stats import PathStats, mos, percentile

MS = 1_000_000


def feed(stats, seq, t1_ms, fwd_ms, back_ms, dwell_ms=0.0):
    t1 = int(t1_ms * MS)
    t2 = t1 + int(fwd_ms * MS)
    t3 = t2 + int(dwell_ms * MS)
    return stats.on_reply(seq, t1, t2, t3, t3 + int(back_ms * MS))


def test_rfc3550_jitter_by_hand():
    s = PathStats(window=10)
    fwd = [10, 12, 11, 15, 15]
    for i, f in enumerate(fwd):
        s.on_send(i, i * 100 * MS)
        feed(s, i, i * 100, f, 5)
    j = Fraction(0)
    for a, b in zip(fwd, fwd[1:]):
        j += (abs(b - a) - j) / 16
    m = s.metrics()
    assert m.jitter_ms == pytest.approx(float(j), rel=1e-12)   # 0.3923...
    assert m.jitter_rev_ms == 0.0                                  # the way back never varied
    assert m.rtt_ms == pytest.approx(sum(f + 5 for f in fwd) / 5)


def test_rtt_excludes_responder_dwell_and_clock_offset():
    s = PathStats()
    s.on_send(1, 1_000 * MS)
    # responder clock 5 s ahead, holds the probe 3 ms
    t1, t2 = 1_000 * MS, 1_000 * MS + 5_000 * MS + 7 * MS
    assert s.on_reply(1, t1, t2, t2 + 3 * MS, t1 + 7 * MS + 3 * MS + 9 * MS) == pytest.approx(16.0)


def test_loss_with_reordering_duplicates_and_late_replies():
    s = PathStats(window=50, timeout_s=1.0)
    for i in range(1, 11):
        s.on_send(i, i * 100 * MS)
    for seq in (1, 2, 4, 3, 3, 5, 7, 8, 10):       # 3 comes after 4, then again; 6 and 9 never
        feed(s, seq, seq * 100, 10, 10)
    m = s.metrics(now_ns=2_500 * MS)                # 6 and 9 are older than the 1 s timeout
    assert (m.sent, m.received, m.lost, m.duplicates, m.reordered) == (10, 8, 2, 1, 1)
    assert m.loss_pct == pytest.approx(20.0)
    assert feed(s, 6, 600, 10, 10) is None          # too late: stays lost
    m = s.metrics(now_ns=2_600 * MS)
    assert (m.lost, m.late, m.loss_pct) == (2, 1, pytest.approx(20.0))


def test_percentiles_by_hand():
    s = PathStats(window=10)
    for i, rtt in enumerate([50, 10, 40, 20, 30]):
        s.on_send(i, i * MS)
        feed(s, i, i, rtt / 2, rtt / 2)
    m = s.metrics()
    assert (m.rtt_p50_ms, m.rtt_p95_ms, m.rtt_p99_ms, m.rtt_min_ms) == (30.0, 48.0, pytest.approx(49.6), 10.0)
    # EWMA, alpha 1/8, over arrivals in order
    e = 50.0
    for r in (10, 40, 20, 30):
        e += (r - e) / 8
    assert m.rtt_ewma_ms == pytest.approx(e)
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_window_counts_only_the_last_probes_and_recent_time():
    s = PathStats(window=4, timeout_s=0.5)
    for i in range(8):                               # 4 lost, then 4 answered
        s.on_send(i, i * 100 * MS)
    for i in range(4, 8):
        feed(s, i, i * 100, 5, 5)
    assert s.metrics(now_ns=1_000 * MS).loss_pct == 0.0   # the window of 4 holds only the answered ones
    t = PathStats(window=100, window_s=1.0, timeout_s=0.1)
    for i in range(20):                              # first 10 lost, long ago; the last 10 answered
        t.on_send(i, i * 1_000 * MS)
        if i >= 10:
            feed(t, i, i * 1_000, 5, 5)
    assert t.metrics(now_ns=19_500 * MS).samples == 1
    assert t.metrics(now_ns=19_500 * MS).loss_pct == 0.0


def test_dead_after_three_unanswered():
    s = PathStats(timeout_s=0.1)
    s.on_send(1, 0)
    feed(s, 1, 0, 1, 1)
    assert s.metrics(now_ns=1 * MS).alive
    for i in range(2, 5):
        s.on_send(i, i * 200 * MS)
    assert not s.metrics(now_ns=2_000 * MS).alive


def test_passive_bandwidth_from_byte_counters():
    s = PathStats()
    s.observe_bytes(0, 0)
    s.observe_bytes(1_250_000, 1_000_000_000)       # 10 Mbit in one second
    assert s.metrics().bandwidth_mbps == pytest.approx(10.0)


def test_mos_anchors():
    assert mos(0, 0, 0) == pytest.approx(4.4, abs=0.05)   # the E-model's best narrowband call
    assert mos(20, 1, 0) > 4.3 > mos(400, 10, 0)
    assert mos(20, 1, 5) < mos(20, 1, 1) < mos(20, 1, 0)
    assert mos(2000, 0, 50) == 1.0 and math.isnan(mos(math.nan, 0, 0))


@given(st.floats(0, 3000), st.floats(0, 3000), st.floats(0, 200), st.floats(0, 200), st.floats(0, 100))
def test_mos_is_bounded_and_monotonic(r1, r2, j, j2, loss):
    a, b = mos(min(r1, r2), j, loss), mos(max(r1, r2), j, loss)
    assert 1.0 <= b <= a <= 4.5
    assert mos(r1, min(j, j2), loss) >= mos(r1, max(j, j2), loss)


events = st.lists(st.tuples(st.sampled_from(["send", "reply", "expire"]), st.integers(0, 30),
                            st.integers(0, 50), st.integers(-5, 50)), max_size=80)


@given(events)
def test_any_event_sequence_keeps_the_books_straight(evs):
    s = PathStats(window=16, timeout_s=0.05)
    now, sent = 0, {}
    for kind, seq, dt, skew in evs:
        now += dt * MS
        if kind == "send" and seq not in sent:
            sent[seq] = now
            s.on_send(seq, now)
        elif kind == "reply":
            t1 = sent.get(seq, now)
            s.on_reply(seq, t1, t1 + skew * MS, t1 + skew * MS, max(now, t1))
        else:
            s.expire(now)
    m = s.metrics(now_ns=now)
    assert m.received + m.lost + len(s._pending) == m.sent == len(sent)
    assert m.samples <= 16
    assert math.isnan(m.loss_pct) or 0 <= m.loss_pct <= 100
    assert m.rtt_ms != m.rtt_ms or m.rtt_ms >= 0
