"""Benchmarks of the userspace fast path, each in a group with its baselines
so one run puts every number next to what it is compared with.

Groups (``benchmark.group``):

1. ``cached classify, N policies``: ``PolicyTable.classify((buf, offsets))``
   on a warm cache, 200k frames over 10k flows vs the pure-Python
   ``reference.classify`` on the first frames of the same trace. At 10k
   policies also 1M frames over 100k flows (more flows than the default
   131,072-entry 8-way cache; and with a 262,144-entry one) and a best case of 64
   flows (every lookup hits a cache that fits in L1/L2).
2. ``cache-miss classify, N policies``: ``classify(cache=False)`` (parse + bit
   vectors on every frame) vs ``classify_linear`` (parse + C scan of every rule).
3. ``end to end, N policies``: ``Userspace.process((buf, offsets), ts)`` on a
   fresh data plane per round (every flow's first packet is classified), vs
   ``reference.FlowAccounting`` on a shorter trace with the same frames per
   flow, and (at 10k policies) vs dpkt parsing alone, plus 100k flows and
   all-new-flows cases.
4. ``pcap end to end, 10000 policies``: ``Userspace.process_pcap`` vs
   ``dpkt.pcap.Reader`` + dpkt parsing.

Times are reported per frame (round time / frames in the round), so the
console's Min/Median columns are seconds per frame, OPS is frames per second
and the ratio in parentheses compares per-frame costs. extra_info also keeps
``frames_per_round``, ``round_median_s``, ``ns_per_pkt`` and ``pps`` (median
round) and ``pps_best`` (fastest round);
``benchmarks/report.py`` turns a JSON run into the table of docs/PERFORMANCE.md.
Slow Python baselines run small batches: per-packet figures are what compare.
"""

from __future__ import annotations

import statistics

import dpkt
import pytest
from pytest_benchmark.stats import Stats

from patronus import PolicyTable, reference
from patronus.dataplane import Userspace

SIZES = (10, 1_000, 10_000)
BIG = 10_000
FRAMES, FLOWS = 200_000, 10_000  # the C paths: 20 frames per flow
FLOWS_100K = (1_000_000, 100_000)  # 10 frames per flow
HOT_FLOWS = 64
CAPACITY = 1 << 20

# Python baselines: batch sizes that keep a round under ~1.5 s
REF_CLASSIFY_SAMPLE = {10: 5_000, 1_000: 200, 10_000: 30}
LINEAR_SAMPLE = {10: 200_000, 1_000: 20_000, 10_000: 2_000}
# FlowAccounting: (frames, flows), the same 20 frames per flow as the C trace,
# its flows the first ones of the C trace's flow list
REF_E2E = {10: (40_000, 2_000), 1_000: (4_000, 200), 10_000: (1_000, 50)}
DPKT_SAMPLE = 20_000


def measure(benchmark, fn, *, frames: int, group: str, case: str, role: str, setup=None,
            rounds: int | None = None, **info):
    """Run fn (one batch of ``frames``) and attach per-packet figures."""
    benchmark.group = group
    benchmark.extra_info.update(case=case, role=role, frames_per_round=frames, **info)
    if setup is not None or rounds is not None:
        result = benchmark.pedantic(fn, setup=setup, rounds=rounds or 5, iterations=1,
                                    warmup_rounds=1 if (rounds or 5) > 3 else 0)
    else:
        result = benchmark(fn)
    meta = getattr(benchmark, "stats", None)
    if meta is not None and meta.stats:  # None under --benchmark-disable
        # Report time per frame, not per round: batches differ between a case
        # and its baselines, and per-frame times make pytest-benchmark's own
        # ratio column (and OPS = frames/s) compare like with like.
        rounds = list(meta.stats.data)
        per_frame = Stats()
        per_frame.data = [t / frames for t in rounds]
        meta.stats = per_frame
        benchmark.extra_info.update(unit="seconds per frame", round_median_s=statistics.median(rounds),
                                    ns_per_pkt=per_frame.median * 1e9, pps=1 / per_frame.median,
                                    pps_best=1 / per_frame.min)
    return result


def dpkt_fields(frames) -> int:
    """What a dpkt user does per frame: parse, read addresses and ports."""
    n = 0
    for fr in frames:
        eth = dpkt.ethernet.Ethernet(fr)
        ip = eth.data
        _src, _dst = ip.src, ip.dst
        l4 = ip.data
        if isinstance(l4, (dpkt.tcp.TCP, dpkt.udp.UDP)):
            _sp, _dp = l4.sport, l4.dport
        n += 1
    return n


# ---------------------------------------------------------------------------
# 1. cached classification


@pytest.mark.parametrize("n", SIZES)
def test_cached_classify(benchmark, bench_data, n):
    table = bench_data.table(n)
    tr = bench_data.traffic(n, FRAMES, FLOWS)
    frames = (tr.buf, tr.offsets)
    table.classifier.clear_cache()
    table.classify(frames)  # warm: every flow seen once
    before = table.classifier.cache_stats
    out = measure(benchmark, lambda: table.classify(frames), frames=len(tr), group=f"cached classify, {n} policies",
                  case=f"classify cached, {n} policies, {FLOWS} flows", role="patronus", policies=n, flows=FLOWS,
                  matched=tr.matched)
    after = table.classifier.cache_stats
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    benchmark.extra_info["cache_hit_rate"] = hits / max(hits + misses, 1)
    assert len(out) == len(tr)


@pytest.mark.parametrize("cache_size", [1 << 17, 1 << 18], ids=["default", "cache256k"])
def test_cached_classify_100k_flows(benchmark, bench_data, cache_size):
    """More flows than the default 131,072-entry cache, and with a 2x bigger one."""
    n = BIG
    table = bench_data.table(n) if cache_size == 1 << 17 else PolicyTable(bench_data.policies(n), cache_size=cache_size)
    tr = bench_data.traffic(n, *FLOWS_100K)
    frames = (tr.buf, tr.offsets)
    table.classifier.clear_cache()
    table.classify(frames)
    before = table.classifier.cache_stats
    measure(benchmark, lambda: table.classify(frames), frames=len(tr), group=f"cached classify, {n} policies",
            case=f"classify cached, {n} policies, {FLOWS_100K[1]} flows, cache_size={cache_size}", role="patronus",
            policies=n, flows=FLOWS_100K[1], matched=tr.matched, rounds=5)
    after = table.classifier.cache_stats
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    benchmark.extra_info["cache_hit_rate"] = hits / max(hits + misses, 1)


def test_cached_classify_hot(benchmark, bench_data):
    """Best case, not a goal: 64 flows, every lookup a hit in a cache that fits L1/L2."""
    n = BIG
    table = bench_data.table(n)
    tr = bench_data.traffic(n, FRAMES, HOT_FLOWS)
    frames = (tr.buf, tr.offsets)
    table.classifier.clear_cache()
    table.classify(frames)
    before = table.classifier.cache_stats
    measure(benchmark, lambda: table.classify(frames), frames=len(tr), group=f"cached classify, {n} policies",
            case=f"classify cached, {n} policies, {HOT_FLOWS} flows (best case)", role="patronus", policies=n,
            flows=HOT_FLOWS, matched=tr.matched)
    after = table.classifier.cache_stats
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    benchmark.extra_info["cache_hit_rate"] = hits / max(hits + misses, 1)


@pytest.mark.parametrize("n", SIZES)
def test_reference_classify(benchmark, bench_data, n):
    policies = bench_data.policies(n)
    tr = bench_data.traffic(n, FRAMES, FLOWS)
    sample = tr.frames[: REF_CLASSIFY_SAMPLE[n]]
    out = measure(benchmark, lambda: [reference.classify(policies, f) for f in sample], frames=len(sample),
                  group=f"cached classify, {n} policies", case=f"reference.classify, {n} policies",
                  role="baseline", label="reference.classify", policies=n, rounds=3)
    assert out == bench_data.table(n).classify(sample, cache=False).tolist()


# ---------------------------------------------------------------------------
# 2. cache-miss classification


@pytest.mark.parametrize("n", SIZES)
def test_miss_classify(benchmark, bench_data, n):
    table = bench_data.table(n)
    tr = bench_data.traffic(n, FRAMES, FLOWS)
    frames = (tr.buf, tr.offsets)
    measure(benchmark, lambda: table.classify(frames, cache=False), frames=len(tr),
            group=f"cache-miss classify, {n} policies", case=f"classify cache=False, {n} policies",
            role="patronus", policies=n)


@pytest.mark.parametrize("n", SIZES)
def test_linear_classify(benchmark, bench_data, n):
    table = bench_data.table(n)
    tr = bench_data.traffic(n, FRAMES, FLOWS)
    k = LINEAR_SAMPLE[n]
    frames = tr.head(k)
    out = measure(benchmark, lambda: table.classify_linear(frames), frames=k,
                  group=f"cache-miss classify, {n} policies", case=f"classify_linear (C scan), {n} policies",
                  role="baseline", label="classify_linear", policies=n, rounds=None if k >= 20_000 else 5)
    assert (out == table.classify(frames, cache=False)).all()


# ---------------------------------------------------------------------------
# 3. end to end: parse + classify + account


def _fresh(table):
    return lambda: ((Userspace(table, flow_capacity=CAPACITY),), {})


@pytest.mark.parametrize("n", SIZES)
def test_e2e_userspace(benchmark, bench_data, n):
    table = bench_data.table(n)
    tr = bench_data.traffic(n, FRAMES, FLOWS)
    frames, ts = (tr.buf, tr.offsets), tr.ts
    measure(benchmark, lambda dp: dp.process(frames, ts_ns=ts), setup=_fresh(table), rounds=15, frames=len(tr),
            group=f"end to end, {n} policies", case=f"Userspace.process, {n} policies, {FLOWS} flows",
            role="patronus", policies=n, flows=FLOWS, frame_bytes_avg=tr.bytes / len(tr))


def test_e2e_userspace_100k_flows(benchmark, bench_data):
    n = BIG
    table = bench_data.table(n)
    tr = bench_data.traffic(n, *FLOWS_100K)
    frames, ts = (tr.buf, tr.offsets), tr.ts
    measure(benchmark, lambda dp: dp.process(frames, ts_ns=ts), setup=_fresh(table), rounds=5, frames=len(tr),
            group=f"end to end, {n} policies", case=f"Userspace.process, {n} policies, {FLOWS_100K[1]} flows",
            role="patronus", policies=n, flows=FLOWS_100K[1])


def test_e2e_userspace_all_new_flows(benchmark, bench_data):
    n = BIG
    table = bench_data.table(n)
    tr = bench_data.traffic(n, FRAMES, FRAMES)
    frames, ts = (tr.buf, tr.offsets), tr.ts
    measure(benchmark, lambda dp: dp.process(frames, ts_ns=ts), setup=_fresh(table), rounds=10, frames=len(tr),
            group=f"end to end, {n} policies", case=f"Userspace.process, {n} policies, every frame a new flow",
            role="patronus", policies=n, flows=FRAMES)


@pytest.mark.parametrize("n", SIZES)
def test_e2e_reference(benchmark, bench_data, n):
    policies = bench_data.policies(n)
    nf, nflows = REF_E2E[n]
    tr = bench_data.traffic(n, nf, nflows)
    ts = tr.ts.tolist()

    def setup():
        return (reference.FlowAccounting(policies, CAPACITY),), {}

    out = measure(benchmark, lambda fa: fa.process(tr.frames, ts), setup=setup, rounds=3, frames=len(tr),
                  group=f"end to end, {n} policies", case=f"reference.FlowAccounting, {n} policies",
                  role="baseline", label="reference.FlowAccounting", policies=n, flows=nflows)
    assert out == Userspace(bench_data.table(n), flow_capacity=CAPACITY).process(tr.frames, ts_ns=tr.ts).tolist()


def test_e2e_dpkt(benchmark, bench_data):
    tr = bench_data.traffic(BIG, FRAMES, FLOWS)
    sample = tr.frames[:DPKT_SAMPLE]
    measure(benchmark, lambda: dpkt_fields(sample), frames=len(sample), rounds=5,
            group=f"end to end, {BIG} policies", case="dpkt parse only (Ethernet, addresses, ports)",
            role="baseline", label="dpkt parsing")


# ---------------------------------------------------------------------------
# 4. pcap file end to end


def test_pcap_userspace(benchmark, bench_data):
    table = bench_data.table(BIG)
    path = bench_data.pcap(BIG, FRAMES, FLOWS)
    out = measure(benchmark, lambda dp: dp.process_pcap(path), setup=_fresh(table), rounds=10, frames=FRAMES,
                  group=f"pcap end to end, {BIG} policies", case=f"Userspace.process_pcap, {BIG} policies",
                  role="patronus", policies=BIG, flows=FLOWS, file_bytes=path.stat().st_size)
    assert len(out) == FRAMES


def test_pcap_dpkt(benchmark, bench_data):
    path = bench_data.pcap(BIG, FRAMES, FLOWS, limit=DPKT_SAMPLE)

    def run():
        with open(path, "rb") as fh:
            return dpkt_fields(buf for _ts, buf in dpkt.pcap.Reader(fh))

    n = measure(benchmark, run, frames=DPKT_SAMPLE, rounds=5, group=f"pcap end to end, {BIG} policies",
                case="dpkt.pcap.Reader + dpkt parse", role="baseline", label="dpkt pcap")
    assert n == DPKT_SAMPLE
