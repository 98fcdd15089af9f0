"""The BFD state machine's per-packet work, Python specification against the
compiled session, side by side in one run: 1,000 pairs of sessions at 50 ms x 3
exchange packets for 10 simulated seconds (each session: its periodic packets
decoded and applied by the peer, its timers ticked every 10 ms), no sockets.
Reported: CPU microseconds per session per second of BFD at 50 ms, and the
sessions one core could carry at that rate (the state machine alone: the
transport's syscalls come on top).

Run: .venv/bin/python -m pytest benchmarks/test_bench_bfd_core.py --benchmark-only -s
"""

from __future__ import annotations

import random
import time

from patronus._bfd import FastSession
from patronus.failover.bfd import Session, decode

PAIRS, SECONDS, STEP = 1_000, 10.0, 0.01


def _pairs(cls):
    return [(cls(2 * i + 1, 50_000, 50_000, 3, rng=random.Random(i)),
             cls(2 * i + 2, 50_000, 50_000, 3, rng=random.Random(-i))) for i in range(PAIRS)]


def _run_python(pairs) -> int:
    n, t = 0, 0.0
    while t < SECONDS:
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                for p in x.tick(t):
                    n += 1
                    for q in y.receive(decode(x.encode(p)), t):
                        x.receive(decode(y.encode(q)), t)
        t += STEP
    return n


def _run_fast(pairs) -> int:
    n, t = 0, 0.0
    while t < SECONDS:
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                for p in x.tick(t):
                    n += 1
                    for q in y.receive(p, t):
                        x.receive(q, t)
        t += STEP
    return n


def test_bfd_state_machine_python_vs_compiled(benchmark):
    out = {}
    for name, cls, run in (("python", Session, _run_python), ("compiled", FastSession, _run_fast)):
        pairs = _pairs(cls)
        t0 = time.process_time()
        packets = run(pairs)
        cpu = time.process_time() - t0
        assert all(a.state == b.state == 3 for a, b in pairs)   # every session Up, none flapped
        assert sum(a.transition_count + b.transition_count for a, b in pairs) <= 4 * PAIRS   # no flap
        per = cpu / (2 * PAIRS * SECONDS) * 1e6   # CPU us per session per second
        out[name] = {"packets": packets, "cpu_s": round(cpu, 3), "us_per_session_s": round(per, 1),
                     "sessions_per_core": int(1e6 / per)}
    benchmark.extra_info.update({f"{k}_{m}": v for k, d in out.items() for m, v in d.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nBFD state machine, {2 * PAIRS} sessions at 50 ms x 3, {SECONDS:g} s simulated: " + "; ".join(
        f"{k} {d['cpu_s']} s CPU for {d['packets']} packets = {d['us_per_session_s']} us a session-second "
        f"(one core: {d['sessions_per_core']:,} sessions)" for k, d in out.items()))
