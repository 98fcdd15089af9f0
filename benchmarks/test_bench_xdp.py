"""XDP data plane with BPF_PROG_TEST_RUN, beside its floor and the Cython path.

Every group holds, for one policy count: the floor (pn_floor: the same parser,
one counter, pass), the XDP program on a flow-cache hit and on a miss (a new
flow: classification plus insert), and the Cython data plane on the same
frames. The kernel reports ns per run; ratios to the floor of the same run are
what to compare (absolute numbers drift on this VM).

Misses are measured two ways. "miss" repeats each of 40 frames 2,000 times
in a build of the program where every run is a new flow (PN_BENCH_NEW_FLOWS:
the source port counts up), beside the floor on the same frame: the steady
cost of new flows between known hosts, in a 65,536-flow table (and, at
10,000 policies, also in a table of Xdp's default 1,048,576 flows). "miss_1"
runs 500 distinct frames once each: a new flow with cold caches, plus the
kernel's per-run overhead, which the floor measured the same way ("floor_1")
carries too.

Run: .venv/bin/python -m pytest benchmarks/test_bench_xdp.py --benchmark-only -s
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from patronus.dataplane import Userspace

from conftest import make_table, make_traffic

COUNTS = [1, 100, 1_000, 10_000, 65_536]
RESULTS: dict[int, dict[str, float]] = {}


def _per_run(x, frames, floor=False):
    """Mean kernel-measured ns of one run over distinct frames, each run once."""
    return float(np.mean([x.bench(f, 1, floor=floor) for f in frames]))


@pytest.mark.parametrize("n", COUNTS)
def test_xdp_vs_floor_vs_cython(benchmark, Xdp, n):
    table = make_table(max(n, 10)) if n > 1 else make_table(10)
    if n == 1:
        from patronus import PolicyTable

        table = PolicyTable(table.policies[:1])
    tr = make_traffic(max(n, 10), 4000, 4000)  # every frame its own flow
    frames = tr.frames[:2000]
    with Xdp(table, flow_capacity=1 << 16) as x:
        x.steering = False
        hot = frames[0]
        x.test_run([hot])
        x.steering = False
        # floor and hit alternate, so a noisy neighbour hits both alike; the
        # minimum of each is its cost with the least interference
        pairs = [(x.bench(hot, 20_000, floor=True), x.bench(hot, 20_000)) for _ in range(15)]
        r = {
            "floor": min(p[0] for p in pairs),
            "hit": min(p[1] for p in pairs),
            "floor_med": np.median([p[0] for p in pairs]),
            "hit_med": np.median([p[1] for p in pairs]),
            "floor_1": _per_run(x, frames[:500], floor=True),
            "miss_1": _per_run(x, frames[500:1000]),
            "hit_1": _per_run(x, frames[500:1000]),
        }
        x.steering = True
        r["hit_steering"] = min(x.bench(hot, 20_000) for _ in range(15))
    with Xdp(table, flow_capacity=1 << 16, _bench_new_flows=True) as x:
        x.steering = False
        per_frame = []
        for f in frames[:40]:
            fl = min(x.bench(f, 2_000, floor=True) for _ in range(3))
            mi = []
            for _ in range(3):
                x.drain(flush=True)
                mi.append(x.bench(f, 2_000))
            per_frame.append((fl, min(mi)))
        pf = np.array(per_frame)
        r["floor_m"], r["miss"] = float(np.median(pf[:, 0])), float(np.median(pf[:, 1]))
        r["miss_p90"] = float(np.percentile(pf[:, 1], 90))
    if n == 10_000:  # the same at Xdp's default capacity: a 1,048,576-flow table (113 MB) is colder
        with Xdp(table, flow_capacity=1 << 20, _bench_new_flows=True) as x:
            x.steering = False
            per_frame = []
            for f in frames[:10]:
                mi = []
                for _ in range(2):
                    x.drain(flush=True)
                    mi.append(x.bench(f, 2_000))
                per_frame.append((x.bench(f, 2_000, floor=True), min(mi)))
            pf = np.array(per_frame)
            r["floor_m_1m"], r["miss_1m"] = float(np.median(pf[:, 0])), float(np.median(pf[:, 1]))
    us = Userspace(table, 1 << 16)
    buf, off = tr.buf, tr.offsets
    t0 = time.perf_counter()
    us.process((buf[: int(off[2000])], off[:2001]), tr.ts[:2000])
    r["cython_miss"] = (time.perf_counter() - t0) / 2000 * 1e9
    rep = (np.frombuffer(hot * 1, np.uint8), np.arange(0, len(hot) * 100_000 + 1, len(hot), dtype=np.int64))
    rep = (np.frombuffer(hot * 100_000, np.uint8), rep[1])
    ts = np.arange(100_000, dtype=np.uint64)
    t0 = time.perf_counter()
    us.process(rep, ts)
    r["cython_hit"] = (time.perf_counter() - t0) / 100_000 * 1e9
    RESULTS[n] = r
    benchmark.extra_info.update({k: round(float(v), 1) for k, v in r.items()})
    benchmark.extra_info["hit_over_floor"] = round(r["hit"] / r["floor"], 2)
    benchmark.extra_info["miss_over_floor"] = round(r["miss"] / r["floor_m"], 2)
    benchmark.extra_info["miss_1_over_floor_1"] = round(r["miss_1"] / r["floor_1"], 2)
    benchmark.pedantic(lambda: x_dummy(), rounds=1, iterations=1)
    print(f"\n{n:>6} policies: floor {r['floor']:.0f} ns, hit {r['hit']:.0f} ns ({r['hit'] / r['floor']:.1f}x), "
          f"(medians {r['floor_med']:.0f}/{r['hit_med']:.0f}), hit+steering {r['hit_steering']:.0f} ns | "
          f"new flows: floor {r['floor_m']:.0f}, miss {r['miss']:.0f} ({r['miss'] / r['floor_m']:.1f}x, p90 {r['miss_p90']:.0f}) | "
          f"one run each: floor {r['floor_1']:.0f}, "
          f"miss {r['miss_1']:.0f} ({r['miss_1'] / r['floor_1']:.1f}x), hit {r['hit_1']:.0f} | "
          f"cython hit {r['cython_hit']:.0f} ns, miss {r['cython_miss']:.0f} ns" +
          (f" | new flows in a 1,048,576-flow table: floor {r['floor_m_1m']:.0f}, miss {r['miss_1m']:.0f} "
           f"({r['miss_1m'] / r['floor_m_1m']:.1f}x)" if "miss_1m" in r else ""))


def x_dummy():
    return None


def test_flow_export_rate(benchmark, Xdp):
    """flows() of a full table of 1,048,576 flows into numpy, records per second."""
    n = 1 << 20
    table = make_table(10)
    tr = make_traffic(10, n, n)
    with Xdp(table, flow_capacity=n) as x:
        x.test_run(tr.frames)
        c = x.counters()
        got = benchmark.pedantic(x.flows, rounds=3, iterations=1)
        # a full table evicts (and exports) the odd flow whose 32 slots are taken
        # (the generator may repeat a 5-tuple now and then: count new flows)
        assert len(got) == c["flows"] == c["new_flows"] - c["evicted"] and c["evicted"] < n // 10_000
        benchmark.extra_info.update(flows=len(got), evicted=c["evicted"])
        rate = len(got) / benchmark.stats.stats.min
        benchmark.extra_info["records_per_s"] = round(rate)
        print(f"\nflow export: {len(got)} flows ({c['evicted']} evicted at full capacity), "
              f"{rate / 1e6:.1f} M records/s")


def test_hit_flat_across_rule_counts(benchmark, Xdp):
    """The goal "hit flat within 10 % across rule counts", measured so that
    the VM's noise hits every rule count alike: one program per rule count,
    all loaded at once, the same frame (one flow) hit in each in turn, 41
    rounds. The spread is (slowest - fastest) / fastest of the per-count
    minimums (and medians); each count's floor is taken in the same rounds."""
    hot = make_traffic(10, 10, 10).frames[0]
    xs = {}
    try:
        for n in COUNTS:
            table = make_table(max(n, 10))
            if n == 1:
                from patronus import PolicyTable

                table = PolicyTable(table.policies[:1])
            x = Xdp(table, flow_capacity=1 << 16)
            xs[n] = x
            x.test_run([hot])  # the flow, classified once
            x.steering = False
        rounds = {n: [] for n in COUNTS}
        floors = []
        for _ in range(41):
            floors.append(xs[COUNTS[0]].bench(hot, 20_000, floor=True))
            for n in COUNTS:
                rounds[n].append(xs[n].bench(hot, 20_000))
        for n in COUNTS:  # every hit was a hit: no new flow after the first packet
            assert xs[n].counters()["new_flows"] == 1
    finally:
        for x in xs.values():
            x.close()
    mins = {n: min(v) for n, v in rounds.items()}
    meds = {n: float(np.median(v)) for n, v in rounds.items()}
    spread_min = (max(mins.values()) - min(mins.values())) / min(mins.values())
    spread_med = (max(meds.values()) - min(meds.values())) / min(meds.values())
    benchmark.extra_info.update({f"hit_min_{n}": mins[n] for n in COUNTS})
    benchmark.extra_info.update({f"hit_median_{n}": meds[n] for n in COUNTS})
    benchmark.extra_info.update(floor_min=min(floors), spread_min=round(spread_min, 3),
                                spread_median=round(spread_med, 3))
    benchmark.pedantic(lambda: x_dummy(), rounds=1, iterations=1)
    print("\nhit, interleaved across rule counts (ns): " +
          ", ".join(f"{n}: min {mins[n]:.0f} median {meds[n]:.0f}" for n in COUNTS) +
          f" | floor min {min(floors):.0f} | spread of minimums {100 * spread_min:.0f} %, "
          f"of medians {100 * spread_med:.0f} %")


def test_policer_cost_per_packet(benchmark, Xdp):
    """What a rate-limited policy adds to a hit: the same frame, the same
    table, once with its policy unlimited and once with a rate it never
    reaches (100 Gbit/s: every run goes through the policer's compare-and-
    swap and passes), beside the floor, interleaved for 21 rounds."""
    from patronus import Match, Policy, PolicyTable, QoS, packets

    frame = packets.udp("10.0.0.1", "10.0.0.2", 4000, 9, b"x" * 172)
    plain = PolicyTable([Policy("p", Match(proto="udp"), priority=1)])
    capped = PolicyTable([Policy("p", Match(proto="udp"), priority=1, qos=QoS(rate_kbps=100_000_000))])
    with Xdp(plain, flow_capacity=1 << 10) as a, Xdp(capped, flow_capacity=1 << 10) as b:
        for x in (a, b):
            x.test_run([frame])
            x.steering = False
        rounds = [(a.bench(frame, 20_000, floor=True), a.bench(frame, 20_000), b.bench(frame, 20_000))
                  for _ in range(21)]
        assert b.qos_drops()["p"]["packets"] == 0   # the rate was never reached: the cost is the check alone
    floor, hit, policed = (min(r[i] for r in rounds) for i in range(3))
    benchmark.extra_info.update(floor_ns=floor, hit_ns=hit, hit_policed_ns=policed)
    benchmark.pedantic(x_dummy, rounds=1, iterations=1)
    print(f"\npolicer: floor {floor:.1f} ns, hit {hit:.1f} ns, hit through the policer {policed:.1f} ns "
          f"(+{policed - hit:.1f} ns)")


def test_dedup_cost_per_packet(benchmark, Xdp):
    """The far end of duplication: bpf/patronus_dedup.c on one frame,
    BPF_PROG_TEST_RUN (the first run records the digest, every later run is
    the same bytes on the same device: a digest lookup and a table update,
    the cost every arriving packet pays), beside the XDP floor program on
    the same frame, interleaved for 21 rounds."""
    import ctypes

    from patronus import Match, Policy, PolicyTable, packets
    from patronus.dataplane.dedup import Dedup

    frame = packets.udp("10.0.0.1", "10.0.0.2", 4000, 5060, b"x" * 172)
    arp = frame[:12] + b"\x08\x06" + bytes(28)   # not IP: the program's first test passes it (the tc floor)
    obuf = ctypes.create_string_buffer(4096)
    with Dedup() as d, Xdp(PolicyTable([Policy("p", Match(proto="udp"), priority=1)]), flow_capacity=1 << 10) as x:
        rounds = [(x.bench(frame, 20_000, floor=True), d._lib.test_run(d._fn.fd, arp, 20_000, obuf)[2],
                   d._lib.test_run(d._fn.fd, frame, 20_000, obuf)[2]) for _ in range(21)]
        stats = d.stats()
    assert stats["first_copies"] == 1 and stats["repeats_same_tunnel"] == 21 * 20_000 - 1, stats
    floor, tc_floor, dedup = (min(r[i] for r in rounds) for i in range(3))
    benchmark.extra_info.update(floor_ns=floor, tc_floor_ns=tc_floor, dedup_ns=dedup)
    benchmark.pedantic(x_dummy, rounds=1, iterations=1)
    print(f"\nde-duplication: {dedup:.1f} ns a packet; the same tc program passing a non-IP frame "
          f"{tc_floor:.1f} ns (XDP floor {floor:.1f} ns)")
