"""Per-path probe statistics, sans-I/O: feed sends and replies with their
times, read metrics. Tests drive it with hand-made times; the asyncio
monitor drives it with real ones.

Definitions (all over the sliding window: the last ``window`` probes whose
fate is known, and of those only the ones sent in the last ``window_s``
seconds when that is set):

* RTT = (t4 - t1) - (t3 - t2): the round trip minus the responder's dwell.
  Mean, EWMA (RFC 6298's alpha = 1/8, over every reply, not windowed) and
  percentiles p50/p95/p99 (linear interpolation between order statistics,
  numpy's default).
* Jitter: RFC 3550 section 6.4.1 interarrival jitter, J += (|D| - J) / 16
  with D the change in transit time between consecutive probes in arrival
  order; forward (t2 - t1, what the far end's RTP receiver would see) and
  reverse (t4 - t3). Clock offsets between the ends cancel in D.
* Loss: probes without a reply within the loss timeout, over probes whose
  fate is known. The timeout adapts like TCP's RTO (RFC 6298): srtt +
  4 rttvar, at least 2 srtt and ``min_timeout_s``, at most ``timeout_s``
  (and ``timeout_s`` until the first reply), so loss shows within a few
  round trips. A reply after the timeout is counted as ``late`` and the
  probe stays lost (as TWAMP-light does with its waiting time). Probes sent
  after the oldest unanswered one are left out of the window until it is
  decided, so fast replies never crowd out not-yet-declared losses.
* Duplicates: further replies for a sequence number already answered
  (ignored otherwise). Reordered: replies whose sequence number is below the
  highest one received before (RFC 4737's type-P-reordered).
* MOS: ITU-T G.107 E-model with its default parameters (R0 - Is = 93.2),
  the delay impairment in the form of Cole & Rosenbluth (2001),
  Id = 0.024 d + 0.11 (d - 177.3) H(d - 177.3), and G.711 with packet-loss
  concealment for the loss impairment (Ie = 0, Bpl = 25.1, random loss:
  ITU-T G.113 appendix I), Ie,eff = Ie + (95 - Ie) Ppl / (Ppl + Bpl).
  Mouth-to-ear delay d = RTT / 2 + 2 x forward jitter (a jitter buffer) +
  20 ms (one frame of packetisation; our choice). R to MOS by G.107 annex B.

>>> s = PathStats(window=10, timeout_s=1.0)
>>> for i, (fwd, back) in enumerate([(10, 10), (12, 10), (10, 10)]):
...     t1 = i * 100_000_000
...     s.on_send(i, t1)
...     _ = s.on_reply(i, t1, t1 + fwd * 1_000_000, t1 + fwd * 1_000_000, t1 + (fwd + back) * 1_000_000)
>>> m = s.metrics(now_ns=10**9)
>>> round(m.rtt_ms, 3), m.loss_pct, round(m.jitter_ms, 4)
(20.667, 0.0, 0.2422)
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PathStats", "Metrics", "mos", "percentile"]

_NS = 1_000_000  # ns per ms


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default method)
    of an ascending list; NaN when empty.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    """
    n = len(sorted_values)
    if not n:
        return math.nan
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def mos(rtt_ms: float, jitter_ms: float, loss_pct: float) -> float:
    """E-model MOS estimate for a voice call over a path (see module docs).

    >>> round(mos(20, 1, 0), 2), round(mos(300, 30, 5), 2)
    (4.39, 3.41)
    """
    if math.isnan(rtt_ms):
        return math.nan
    d = rtt_ms / 2 + 2 * (0.0 if math.isnan(jitter_ms) else jitter_ms) + 20.0
    i_d = 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)
    ppl = max(0.0, min(100.0, loss_pct))
    i_e = 95.0 * ppl / (ppl + 25.1)
    r = 93.2 - i_d - i_e
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    # the annex B polynomial dips a hair under 1 just above R = 0: clamp
    return max(1.0, 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6)


@dataclass(frozen=True)
class Metrics:
    """What a path looks like right now. Times in ms; NaN where there is no
    sample yet. ``latency_ms`` is the round-trip mean (patronus profiles set
    round-trip limits)."""

    rtt_ms: float = math.nan
    rtt_ewma_ms: float = math.nan
    rtt_min_ms: float = math.nan
    rtt_p50_ms: float = math.nan
    rtt_p95_ms: float = math.nan
    rtt_p99_ms: float = math.nan
    jitter_ms: float = math.nan
    jitter_rev_ms: float = math.nan
    loss_pct: float = math.nan
    mos: float = math.nan
    mtu: int | None = None
    bandwidth_mbps: float = math.nan
    train_mbps: float = math.nan
    samples: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0
    late: int = 0
    duplicates: int = 0
    reordered: int = 0
    alive: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def latency_ms(self) -> float:
        return self.rtt_ms

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["latency_ms"] = self.rtt_ms
        return d


class PathStats:
    """Statistics of one path's probes. Times are integers in nanoseconds.

    ``window``: probes in the sliding window; ``window_s``: also drop probes
    sent longer ago than this; ``timeout_s``: a probe with no reply after this
    long is lost. A path is ``alive`` when one of its last ``dead_after``
    probes with a known fate got a reply.
    """

    def __init__(self, window: int = 50, window_s: float | None = None, timeout_s: float = 1.0,
                 dead_after: int = 3, min_timeout_s: float = 0.2) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.window_ns = None if window_s is None else int(window_s * 1e9)
        self.timeout_ns = int(timeout_s * 1e9)
        self.min_timeout_ns = min(int(min_timeout_s * 1e9), self.timeout_ns)
        self._rttvar: float = 0.0
        self.dead_after = dead_after
        self._pending: OrderedDict[int, int] = OrderedDict()  # seq -> t1, in send order
        # probes whose fate is known: (t1, rtt_ns or None when lost), in the
        # order they were decided; the window is taken by send time
        self._done: list[tuple[int, int | None]] = []
        self._answered: deque[int] = deque()  # seqs answered recently (duplicate detection)
        self._answered_set: set[int] = set()
        self._lost_set: set[int] = set()
        self._lost_order: deque[int] = deque()
        self._max_seq = -1
        self._srtt: float | None = None
        self._jit_f = math.nan
        self._jit_r = math.nan
        self._last_transit: tuple[int, int] | None = None  # (forward, reverse) of the last arrival
        self.sent = self.received = self.lost = self.late = self.duplicates = self.reordered = 0
        self.mtu: int | None = None
        self._bw: tuple[int, int] | None = None  # (bytes, ns) of the last counter reading
        self.bandwidth_mbps = math.nan
        self.train_mbps = math.nan

    # -- events ---------------------------------------------------------------

    def on_send(self, seq: int, t1: int) -> None:
        self._pending[seq] = t1
        self.sent += 1

    def on_reply(self, seq: int, t1: int, t2: int, t3: int, t4: int) -> float | None:
        """A reply arrived at t4; returns its RTT in ms, or None when it is a
        duplicate, late (already counted lost) or for a probe never sent."""
        if seq in self._answered_set:
            self.duplicates += 1
            return None
        if seq in self._lost_set:
            self.late += 1
            return None
        sent_t1 = self._pending.pop(seq, None)
        if sent_t1 is None or sent_t1 != t1:
            if sent_t1 is not None:
                self._pending[seq] = sent_t1
            return None
        self._remember(self._answered, self._answered_set, seq)
        if seq < self._max_seq:
            self.reordered += 1
        self._max_seq = max(self._max_seq, seq)
        rtt = max(0, (t4 - t1) - (t3 - t2))
        self.received += 1
        self._decided(t1, rtt)
        if self._srtt is None:
            self._srtt, self._rttvar = float(rtt), rtt / 2
        else:
            self._rttvar += (abs(self._srtt - rtt) - self._rttvar) / 4
            self._srtt += (rtt - self._srtt) / 8
        fwd, rev = t2 - t1, t4 - t3
        if self._last_transit is not None:
            df = abs(fwd - self._last_transit[0]) / _NS
            dr = abs(rev - self._last_transit[1]) / _NS
            self._jit_f = df / 16 if math.isnan(self._jit_f) else self._jit_f + (df - self._jit_f) / 16
            self._jit_r = dr / 16 if math.isnan(self._jit_r) else self._jit_r + (dr - self._jit_r) / 16
        self._last_transit = (fwd, rev)
        return rtt / _NS

    @property
    def loss_timeout_ns(self) -> int:
        """How long a probe may go unanswered before it counts as lost."""
        if self._srtt is None:
            return self.timeout_ns
        rto = max(self._srtt + 4 * self._rttvar, 2 * self._srtt, self.min_timeout_ns)
        return int(min(rto, self.timeout_ns))

    def expire(self, now_ns: int) -> int:
        """Count probes unanswered for longer than the loss timeout as lost; returns how many."""
        n = 0
        limit = self.loss_timeout_ns
        while self._pending:
            seq, t1 = next(iter(self._pending.items()))
            if now_ns - t1 < limit:
                break
            del self._pending[seq]
            self._remember(self._lost_order, self._lost_set, seq)
            self._decided(t1, None)
            self.lost += 1
            n += 1
        return n

    def observe_bytes(self, total_bytes: int, now_ns: int) -> None:
        """Passive bandwidth: feed a path's cumulative byte counter (from the
        data plane); the rate between readings becomes ``bandwidth_mbps``."""
        if self._bw is not None and now_ns > self._bw[1] and total_bytes >= self._bw[0]:
            rate = (total_bytes - self._bw[0]) * 8 / ((now_ns - self._bw[1]) / 1e9) / 1e6
            self.bandwidth_mbps = rate if math.isnan(self.bandwidth_mbps) else \
                0.75 * self.bandwidth_mbps + 0.25 * rate
        self._bw = (total_bytes, now_ns)

    def _decided(self, t1: int, rtt: int | None) -> None:
        self._done.append((t1, rtt))
        if len(self._done) > 2 * self.window + 16:
            self._done.sort(key=lambda d: d[0])
            del self._done[: -self.window]

    def _remember(self, order: deque[int], members: set[int], seq: int) -> None:
        order.append(seq)
        members.add(seq)
        while len(order) > 4 * self.window + 64:
            members.discard(order.popleft())

    # -- reading --------------------------------------------------------------

    def metrics(self, now_ns: int | None = None) -> Metrics:
        if now_ns is not None:
            self.expire(now_ns)
        done = sorted(self._done, key=lambda d: d[0])
        if self._pending:  # leave out what was sent after the oldest undecided probe
            oldest = next(iter(self._pending.values()))
            done = [d for d in done if d[0] < oldest]
        done = done[-self.window:]
        if self.window_ns is not None and now_ns is not None:
            done = [d for d in done if now_ns - d[0] <= self.window_ns + self.timeout_ns]
        rtts = sorted(r for _, r in done if r is not None)
        lost = sum(1 for _, r in done if r is None)
        ms = [r / _NS for r in rtts]
        loss = 100.0 * lost / len(done) if done else math.nan
        tail = done[-self.dead_after:]
        alive = any(r is not None for _, r in tail)
        rtt = sum(ms) / len(ms) if ms else math.nan
        return Metrics(
            rtt_ms=rtt,
            rtt_ewma_ms=math.nan if self._srtt is None else self._srtt / _NS,
            rtt_min_ms=ms[0] if ms else math.nan,
            rtt_p50_ms=percentile(ms, 50), rtt_p95_ms=percentile(ms, 95), rtt_p99_ms=percentile(ms, 99),
            jitter_ms=self._jit_f, jitter_rev_ms=self._jit_r,
            loss_pct=loss, mos=mos(rtt, self._jit_f, loss if done else 0.0),
            mtu=self.mtu, bandwidth_mbps=self.bandwidth_mbps, train_mbps=self.train_mbps,
            samples=len(done), sent=self.sent, received=self.received, lost=self.lost, late=self.late,
            duplicates=self.duplicates, reordered=self.reordered, alive=alive,
        )
