"""Path quality at scale: probes one process sustains (monitor + responder
in the same asyncio loop, one core), and scoring + selecting 100,000 paths
with numpy beside the same scoring done path by path in Python.

Run: .venv/bin/python -m pytest benchmarks/test_bench_paths.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import math
import resource
import time

import numpy as np
import pytest

from patronus.paths import Monitor, Responder, Selector

N_PATHS = 100_000


def _metrics(n: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    rtt = rng.gamma(2.0, 30.0, n)
    jit = rng.gamma(1.5, 4.0, n)
    loss = np.where(rng.random(n) < 0.8, 0.0, rng.gamma(1.0, 1.5, n))
    alive = rng.random(n) > 0.02
    bw = rng.uniform(1, 1000, n)
    return rtt, jit, loss, alive, bw


PROFILE_SETS = {"5 profiles": ["voip", "video", "gaming", "bulk", "default"], "8 profiles": None}


@pytest.fixture(scope="module", params=list(PROFILE_SETS))
def selector(request):
    sel = Selector(PROFILE_SETS[request.param], hold_down_s=10)
    ids = [f"p{i}" for i in range(N_PATHS)]
    groups = [f"g{i // 4}" for i in range(N_PATHS)]  # 25,000 site pairs x 4 paths
    sel.set_paths(ids, groups=groups)
    return sel


def test_score_and_select_100k_paths(benchmark, selector):
    m = _metrics(N_PATHS)
    state = {"t": 0.0}

    def step():
        state["t"] += 1.0
        return selector.update_arrays(*m[:4], bandwidth_mbps=m[4], now=state["t"])

    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(paths=N_PATHS, profiles=len(selector.profiles), median_ms=round(ms, 2))
    print(f"\nscore + select, {N_PATHS} paths x {len(selector.profiles)} profiles: median {ms:.2f} ms")


def _python_scores(m, profiles):
    """The same score, one path and one profile at a time (the baseline)."""
    rtt, jit, loss, alive, bw = (x.tolist() for x in m)
    out = []
    for p in profiles:
        wsum = p.w_latency + p.w_jitter + p.w_loss
        row = []
        for r, j, lo, a, b in zip(rtt, jit, loss, alive, bw):
            if not a:
                row.append(0.0)
                continue
            rl, rj, rlo = r / p.max_rtt_ms, j / p.max_jitter_ms, lo / max(p.max_loss_pct, 1e-9)
            cost = (p.w_latency * rl + p.w_jitter * rj + p.w_loss * rlo) / wsum + p.w_bandwidth * 10 / (b + 10)
            if rl <= 1 and rj <= 1 and rlo <= 1:
                row.append(1 + 1 / (1 + cost))
            else:
                over = (p.w_latency * max(rl - 1, 0) + p.w_jitter * max(rj - 1, 0) + p.w_loss * max(rlo - 1, 0)) / wsum
                row.append(0.999 / (1 + over + 1e-3 * cost))
        out.append(row)
    return out


def test_score_100k_paths_python_baseline(benchmark, selector):
    m = _metrics(N_PATHS)
    profiles = selector.profiles
    got = benchmark.pedantic(lambda: _python_scores(m, profiles), rounds=3, iterations=1)
    np.testing.assert_allclose(np.array(got), selector.score(*m[:4], bandwidth_mbps=m[4]), rtol=1e-5)  # float32
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(paths=N_PATHS, median_ms=round(ms, 1))
    print(f"\nscore only, {len(profiles)} profiles, pure Python baseline: median {ms:.0f} ms")


async def _probe_load(paths: int, interval_ms: float, seconds: float) -> dict:
    async with Responder(("127.0.0.1", 0)) as resp:
        async with Monitor(interval_ms=interval_ms, window=50) as mon:
            for i in range(paths):
                mon.add(f"p{i}", remote=resp.address)
            await asyncio.sleep(1.0)  # every path's phase has come round once
            sent0, ans0 = mon.sent, resp.answered
            cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await asyncio.sleep(seconds)
            cpu1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            sent, ans = mon.sent - sent0, resp.answered - ans0
            ms = mon.all_metrics()
            lost = sum(m.lost for m in ms.values())
            total = sum(m.received + m.lost for m in ms.values())
            cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / (t1 - t0)
            return {"paths": paths, "target_pps": paths * 1000 / interval_ms, "sent_pps": sent / (t1 - t0),
                    "answered_pps": ans / (t1 - t0), "loss_pct": 100 * lost / max(total, 1), "cpu": cpu,
                    "p99_rtt_ms": float(np.nanmax([m.rtt_p99_ms for m in ms.values()]))}


@pytest.mark.parametrize("paths", [1_000, 2_000, 4_000])
def test_probes_per_second_one_process(benchmark, paths):
    r = benchmark.pedantic(lambda: asyncio.run(_probe_load(paths, 100, 5.0)), rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 3) if isinstance(v, float) and math.isfinite(v) else v
                                 for k, v in r.items()})
    print(f"\n{paths} paths x 10/s: sent {r['sent_pps']:.0f}/s, answered {r['answered_pps']:.0f}/s "
          f"(target {r['target_pps']:.0f}/s), loss {r['loss_pct']:.2f} %, CPU {100 * r['cpu']:.0f} % of one core, "
          f"worst path p99 RTT {r['p99_rtt_ms']:.1f} ms")
