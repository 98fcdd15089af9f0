"""patronus's XDP program against the plain eBPF flow tracker a user would
run instead (benchmarks/bpf/peer_flows.c: the 5-tuple's record
{packets, bytes, first_ns, last_ns} in a kernel LRU hash map, or a per-CPU
hash map, no classification), in one process, the same frames, the same
flow capacity, BPF_PROG_TEST_RUN through the same call.

Per case (policies x flow capacity): the hit cost (ns a packet of a known
flow) and the miss cost (ns a new flow, every table empty at the start of
each batch) of patronus and of each peer, interleaved, three runs; the
ratio patronus / peer of each run, reported as the median and min-max.
Equal work is asserted (same runs through each program; after every miss
batch each table held the batch's flows, the same 5-tuples, packets and
bytes; after the hits, one flow with every run counted). Timings are never
asserted: the goal "at most the peer's cost" (ratio <= 1) is reported as
met or not met, in ``extra_info`` and as JSON lines in $PATRONUS_PEERS_OUT
(default .bench-peers/results.jsonl). How it measures: benchmarks/peers_xdp.py.

Run (root, BCC, kernel headers; about 2-2.5 minutes, most of it loading
patronus's program, 10-15 s a load at 65,536 policies, and the kernel's
~18 ms per BPF_PROG_TEST_RUN call outside the timed loop):
    .venv/bin/python -m pytest benchmarks/test_bench_peers_xdp.py --benchmark-only -s
$PATRONUS_PEERS_XDP_BIG (default 1,1000,10000,65536, every count): policy
counts also measured with 1,048,576-flow tables (about 25 s each); $PATRONUS_PEERS_XDP_MAPS (default lru_hash,percpu_hash; also
lru_percpu_hash).
"""

from __future__ import annotations

import os

import pytest

import peers_xdp as px
from patronus import DataplaneUnavailable

CASES = px.cases()
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def peers(Xdp):
    """The peer builds (loaded on first use), the process pinned to one CPU,
    the results file's earlier XDP lines dropped; prints the table at the end."""
    if os.geteuid() != 0:
        pytest.skip("the XDP peer comparison needs root (BPF_PROG_TEST_RUN)")
    pool = px.PeerPool()
    try:
        pool.get(px.SMALL, False)   # compile one build now: a missing piece skips here
    except DataplaneUnavailable as e:
        pool.close()
        pytest.skip(str(e))
    px.reset_group(px.out_path())
    with px.pinned():
        yield pool
    pool.close()
    if RESULTS:
        print("\n\nXDP: patronus against plain eBPF flow trackers (BPF_PROG_TEST_RUN, 3 interleaved runs)\n" +
              px.format_table(RESULTS) + f"\n(results in {px.out_path()})")


@pytest.mark.parametrize("n,flows", CASES, ids=[f"p{n}-flows{f}" for n, f in CASES])
def test_xdp_against_peers(benchmark, Xdp, peers, n, flows):
    recs = px.run_case(Xdp, peers, n, flows)   # raises UnequalWork if the programs did not do the same work
    px.append(px.out_path(), recs)
    RESULTS.extend(recs)
    for r in recs:
        kind = r["case"].split()[0]
        benchmark.extra_info[f"{kind}_{r['peer']}_ratio"] = r["ratio"]
        benchmark.extra_info[f"{kind}_{r['peer']}_ratio_spread"] = [r["ratio_min"], r["ratio_max"]]
        benchmark.extra_info[f"{kind}_{r['peer']}_met"] = r["met"]
        benchmark.extra_info[f"{kind}_patronus_ns"] = r["patronus"]
        benchmark.extra_info[f"{kind}_{r['peer']}_ns"] = r["peer_value"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print("\n" + px.format_table(recs).split("\n", 2)[2])
