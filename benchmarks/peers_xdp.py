"""patronus's XDP program against a plain eBPF flow tracker, side by side.

The peer is benchmarks/bpf/peer_flows.c: it parses the 5-tuple (with
patronus's parser) and keeps {packets, bytes, first_ns, last_ns} per flow in
a kernel hash map, without classifying; one build with
``BPF_MAP_TYPE_LRU_HASH`` ("lru_hash"), one with ``BPF_MAP_TYPE_PERCPU_HASH``
("percpu_hash"). Both are loaded with BCC and run with BPF_PROG_TEST_RUN
through the same ``Libbpf.test_run`` call (and output buffer size) that
``Xdp.bench`` uses, so the harness costs both the same.

For each (policies, flow capacity) case, in one process pinned to one CPU:

* hit: one frame of a known flow, 20,000 runs a batch; every round runs a
  batch through patronus and each peer, in an order that rotates from round
  to round; a run is ``HIT_ROUNDS`` rounds and its value each program's
  median batch.
* miss: builds where every run is a new flow (patronus ``PN_BENCH_NEW_FLOWS``,
  the peer ``PEER_NEW_FLOWS``: the same source-port sequence, so both see the
  same new 5-tuples), ``MISS_REPEAT`` runs of each of ``miss_frames`` frames,
  every program's table empty at the start of each batch (patronus:
  ``drain(flush=True)``, as benchmarks/test_bench_xdp.py does; the peer:
  ``BPF_MAP_LOOKUP_AND_DELETE_BATCH``); a run's value is the median batch.

Three runs; per run the ratio patronus / peer; reported: the median of each
side, the median ratio and its min-max. Equal work is checked, not assumed:
every batch went through every program, each table then held exactly the
batch's flows, the same 5-tuples in patronus's table and the peer's map, and
the same packet and byte totals. Timings are never asserted.

    .venv/bin/python benchmarks/peers_xdp.py [--policies 1,1000,10000,65536] [--big 1,1000,10000,65536]

(root, BCC, kernel headers). The pytest form is benchmarks/test_bench_peers_xdp.py;
both append JSON lines to $PATRONUS_PEERS_OUT (default .bench-peers/results.jsonl).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))   # the checkout, unless a patronus is importable already (PYTHONPATH)

from patronus import DataplaneUnavailable, PolicyTable  # noqa: E402
from patronus._sources import source_dirs  # noqa: E402
from patronus.dataplane._bpf import BatchOpts, Libbpf, captured_stderr, possible_cpus, preflight  # noqa: E402

from conftest import make_table, make_traffic  # noqa: E402

PEER_SOURCE = HERE / "bpf" / "peer_flows.c"
PEER_MAPS = {"lru_hash": 1, "percpu_hash": 2, "lru_percpu_hash": 3}
DEFAULT_PEERS = ("lru_hash", "percpu_hash")
POLICY_COUNTS = (1, 1_000, 10_000, 65_536)
SMALL, BIG = 1 << 16, 1 << 20           # flow capacities compared
RUNS = 3
HIT_REPEAT, HIT_ROUNDS = 20_000, 7
MISS_REPEAT = 2_000
MISS_FRAMES = {SMALL: 24, BIG: 10}      # frames (batches) per miss run
OUT_BYTES = 65536 + 256                 # as patronus.dataplane.xdp.OUT_BYTES
KEY_BYTES, FLOW_BYTES = 40, 96          # struct pn_flow_key, struct pn_flow
GROUP = "xdp"
GOAL = "ratio <= 1"


class UnequalWork(AssertionError):
    """patronus and a peer did not do the same work: the comparison is void."""


def out_path() -> Path:
    return Path(os.environ.get("PATRONUS_PEERS_OUT", ".bench-peers/results.jsonl"))


def big_policy_counts() -> tuple[int, ...]:
    """Policy counts also measured with 1,048,576-flow tables
    ($PATRONUS_PEERS_XDP_BIG, comma-separated; default every count of the
    issue, 1,1000,10000,65536: each count takes about 25 s)."""
    raw = os.environ.get("PATRONUS_PEERS_XDP_BIG", "1,1000,10000,65536")
    return tuple(int(s) for s in raw.split(",") if s.strip())


def peer_names() -> tuple[str, ...]:
    raw = os.environ.get("PATRONUS_PEERS_XDP_MAPS")
    names = tuple(s.strip() for s in raw.split(",")) if raw else DEFAULT_PEERS
    for n in names:
        if n not in PEER_MAPS:
            raise ValueError(f"PATRONUS_PEERS_XDP_MAPS: unknown peer {n!r} (one of {', '.join(PEER_MAPS)})")
    return names


# -- the peer program -------------------------------------------------------------------------------


class Peer:
    """benchmarks/bpf/peer_flows.c, compiled by BCC for one map type and capacity."""

    def __init__(self, name: str, entries: int, new_flows: bool, lib: Libbpf | None = None) -> None:
        bcc = preflight()
        self.name, self.entries, self.new_flows = name, entries, new_flows
        self.lib = lib or Libbpf()
        _, csrc = source_dirs()
        cflags = [f"-I{csrc}", f"-DPEER_MAP={PEER_MAPS[name]}", f"-DPEER_ENTRIES={entries}"]
        if new_flows:
            cflags.append("-DPEER_NEW_FLOWS")
        self._bpf = None
        with captured_stderr() as log:
            try:
                self._bpf = bcc.BPF(text=PEER_SOURCE.read_bytes(), cflags=cflags)
                self._fn = self._bpf.load_func(b"peer_flows", bcc.BPF.XDP)
            except Exception as e:
                tail = "\n".join(log.read().strip().splitlines()[-15:])
                raise DataplaneUnavailable(f"the peer program {PEER_SOURCE.name} ({name}) did not load: {e}\n{tail}",
                                           "see the compiler/verifier log above") from None
        self.percpu = name != "lru_hash"
        self.ncpu = len(possible_cpus())
        self._obuf = ctypes.create_string_buffer(OUT_BYTES)
        self._fd = self._bpf[b"peer_flows_map"].map_fd
        chunk = min(entries, 1 << 16)
        self._keys = np.empty((chunk, KEY_BYTES), dtype=np.uint8)
        self._vals = np.empty((chunk, self.ncpu if self.percpu else 1, 4), dtype=np.uint64)
        self.runs = 0   # runs since it was loaded
        self.table_bytes = map_bytes(self._fd)

    def bench(self, frame: bytes, repeat: int) -> float:
        """ns per run on one frame, measured by the kernel (as ``Xdp.bench``)."""
        self.runs += repeat
        return float(self.lib.test_run(self._fn.fd, frame, repeat, self._obuf)[2])

    def set_seq(self, value: int) -> None:
        """The new-flow builds' counter, on every CPU (patronus: pn_scratch.bench_seq)."""
        fd = self._bpf[b"peer_seq_map"].map_fd
        self.lib.update_batch(fd, "peer_seq_map", np.zeros(1, np.uint32),
                              np.full((1, self.ncpu), value & 0xFFFFFFFF, dtype=np.uint64))

    def take(self, delete: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The map's flows: keys (n, 40 bytes) and [packets, bytes, first_ns,
        last_ns] (n, 4), summed over CPUs for per-CPU maps; ``delete``
        empties the map (BPF_MAP_LOOKUP_AND_DELETE_BATCH)."""
        fn = self.lib.lib.bpf_map_lookup_and_delete_batch if delete else self.lib.lib.bpf_map_lookup_batch
        opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
        token = ctypes.c_uint32(0)
        keys, vals, first = [], [], True
        while True:
            count = ctypes.c_uint32(len(self._keys))
            rc = fn(self._fd, None if first else ctypes.byref(token), ctypes.byref(token), self._keys.ctypes.data,
                    self._vals.ctypes.data, ctypes.byref(count), ctypes.byref(opts))
            err = ctypes.get_errno()
            first = False
            if count.value:
                keys.append(self._keys[: count.value].copy())
                vals.append(self._vals[: count.value].copy())
            if rc != 0:
                if err == errno.ENOENT:
                    break
                raise OSError(err, f"reading {self.name}'s map: {os.strerror(err)}")
        if not keys:
            return np.empty((0, KEY_BYTES), np.uint8), np.empty((0, 4), np.uint64)
        k, v = np.concatenate(keys), np.concatenate(vals)
        pk = v[:, :, 0]
        tot = np.stack([pk.sum(axis=1), v[:, :, 1].sum(axis=1),
                        np.where(pk > 0, v[:, :, 2], np.uint64(2**64 - 1)).min(axis=1),
                        v[:, :, 3].max(axis=1)], axis=1)
        return k, tot

    def stats(self) -> dict[str, int]:
        """Malformed frames and new flows a full per-CPU map refused."""
        v = self.lib.percpu_sum(self._bpf[b"peer_stats_map"].map_fd, "peer_stats_map", 2, 1, self.ncpu)[:, 0]
        return {"malformed": int(v[0]), "refused": int(v[1])}

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


class PeerPool:
    """Peer builds by (name, capacity, new-flow build), loaded once and kept
    while their capacity is the one measured (the peer does not depend on
    the policy count)."""

    def __init__(self, names: tuple[str, ...] | None = None) -> None:
        self.names = names or peer_names()
        self.lib = Libbpf()
        self._peers: dict[tuple[str, int, bool], Peer] = {}
        self.load_s = 0.0

    def get(self, entries: int, new_flows: bool) -> dict[str, Peer]:
        for key in [k for k in self._peers if k[1] != entries]:
            self._peers.pop(key).close()
        out = {}
        for name in self.names:
            key = (name, entries, new_flows)
            if key not in self._peers:
                t0 = time.perf_counter()
                self._peers[key] = Peer(name, entries, new_flows, self.lib)
                self.load_s += time.perf_counter() - t0
            out[name] = self._peers[key]
        return out

    def close(self) -> None:
        for p in self._peers.values():
            p.close()
        self._peers.clear()


@contextlib.contextmanager
def pinned() -> Iterator[int]:
    """Run on one CPU: BPF_PROG_TEST_RUN runs on the caller's CPU, so every
    program's per-CPU new-flow counter advances alike (the same new flows),
    and a flow is always counted by the CPU that created it (one receive
    queue), for patronus and the peers alike."""
    saved = os.sched_getaffinity(0)
    cpu = max(saved)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, saved)


# -- the measurements ------------------------------------------------------------------------------


def map_bytes(fd: int) -> int:
    """Kernel memory charged to a map (its fdinfo's memlock)."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    return 0


def _table(n: int) -> PolicyTable:
    if n == 1:
        return PolicyTable(make_table(10).policies[:1])
    return make_table(n)


def _frames(n: int) -> list[bytes]:
    return make_traffic(max(n, 10), 4000, 4000).frames   # every frame its own flow


def _sorted_keys(keys: np.ndarray) -> np.ndarray:
    return np.sort(np.ascontiguousarray(keys).view(f"V{KEY_BYTES}").ravel())


def _patronus_take(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Drain patronus's table (empty afterwards): keys (n, 40), [packets, bytes]."""
    fl = np.ascontiguousarray(x.drain(flush=True))
    keys = fl.view(np.uint8).reshape(-1, FLOW_BYTES)[:, :KEY_BYTES]
    return keys, np.stack([fl["packets"], fl["bytes"]], axis=1).astype(np.uint64)


def _rotated(progs: list[tuple[str, Callable[[], float]]], i: int) -> list[tuple[str, Callable[[], float]]]:
    i %= len(progs)
    return progs[i:] + progs[:i]


def measure_hit(x: Any, peers: dict[str, Peer], hot: bytes, runs: int = RUNS, rounds: int = HIT_ROUNDS,
                repeat: int = HIT_REPEAT) -> dict[str, list[float]]:
    """Per-run medians (ns) of hits on one known flow, for "patronus" and each peer."""
    x.test_run([hot])        # the flow, classified and inserted once
    x.steering = False
    for p in peers.values():
        p.take()             # empty (a cached build may hold an earlier case's flow)
        p.runs = 0
        p.bench(hot, 1)
    progs = [("patronus", lambda: x.bench(hot, repeat))] + [(n, lambda p=p: p.bench(hot, repeat))
                                                            for n, p in peers.items()]
    out: dict[str, list[float]] = {n: [] for n, _ in progs}
    for r in range(runs):
        got: dict[str, list[float]] = {n: [] for n, _ in progs}
        for i in range(rounds):
            for name, fn in _rotated(progs, r * rounds + i):
                got[name].append(fn())
        for name, v in got.items():
            out[name].append(float(statistics.median(v)))
    # equal work: one flow each, every run counted on it
    want = 1 + runs * rounds * repeat
    c = x.counters()
    fl = x.flows()
    if not (len(fl) == c["flows"] == 1 and c["new_flows"] == 1 and int(fl["packets"][0]) == want):
        raise UnequalWork(f"patronus hit: {len(fl)} flows, {c['new_flows']} new, "
                          f"{fl['packets'].tolist()} packets (want 1 flow of {want})")
    pkey = np.ascontiguousarray(fl).view(np.uint8).reshape(-1, FLOW_BYTES)[:, :KEY_BYTES]
    for name, p in peers.items():
        keys, tot = p.take(delete=False)
        if len(keys) != 1 or p.runs != want or int(tot[0, 0]) != want or int(tot[0, 1]) != int(fl["bytes"][0]) \
                or not np.array_equal(keys, pkey):
            raise UnequalWork(f"{name} hit: {len(keys)} flows, {tot[:, :2].tolist()} packets/bytes after {p.runs} "
                              f"runs; patronus: 1 flow, {want} packets, {int(fl['bytes'][0])} bytes")
    return out


def measure_miss(x: Any, x_runs: int, peers: dict[str, Peer], frames: list[bytes], runs: int = RUNS,
                 repeat: int = MISS_REPEAT) -> tuple[dict[str, list[float]], int]:
    """Per-run medians (ns per new flow) of batches of new flows into empty
    tables. ``x`` is a PN_BENCH_NEW_FLOWS build that has run ``x_runs`` times
    on this CPU; returns the medians and its run count after."""
    x.steering = False
    _patronus_take(x)
    for p in peers.values():
        p.take()
        p.set_seq(x_runs)    # the same next source port as patronus's
        p.runs = x_runs
    runs_of = {"patronus": x_runs}

    def pat(f: bytes) -> float:
        runs_of["patronus"] += repeat
        return x.bench(f, repeat)

    progs: list[tuple[str, Callable[[bytes], float]]] = [("patronus", pat)] + [
        (n, lambda f, p=p: p.bench(f, repeat)) for n, p in peers.items()]
    out: dict[str, list[float]] = {n: [] for n, _ in progs}
    batch = 0
    for r in range(runs):
        got: dict[str, list[float]] = {n: [] for n, _ in progs}
        for j, f in enumerate(frames):
            taken: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for name, fn in _rotated(progs, batch):
                got[name].append(fn(f))
                taken[name] = _patronus_take(x) if name == "patronus" else peers[name].take()
            batch += 1
            _check_batch(taken, repeat, f"miss run {r + 1}, frame {j}", runs_of["patronus"],
                         {n: p.runs for n, p in peers.items()})
        for name, v in got.items():
            out[name].append(float(statistics.median(v)))
    return out, runs_of["patronus"]


def _check_batch(taken: dict[str, tuple[np.ndarray, np.ndarray]], repeat: int, where: str, x_runs: int,
                 peer_runs: dict[str, int]) -> None:
    """Every program ran the batch and its table held exactly the batch's
    ``repeat`` new flows, one packet each: the same 5-tuples and bytes."""
    pkeys, ptot = taken["patronus"]
    ref = _sorted_keys(pkeys)
    if len(pkeys) != repeat or len(ref) != len(np.unique(ref)) or int(ptot[:, 0].sum()) != repeat:
        raise UnequalWork(f"{where}: patronus's table held {len(pkeys)} flows, {int(ptot[:, 0].sum())} packets "
                          f"(want {repeat} new flows of one packet)")
    for name, (keys, tot) in taken.items():
        if name == "patronus":
            continue
        if peer_runs[name] != x_runs:
            raise UnequalWork(f"{where}: {name} ran {peer_runs[name]} times, patronus {x_runs}")
        if len(keys) != len(pkeys) or int(tot[:, 0].sum()) != repeat or int(tot[:, 1].sum()) != int(ptot[:, 1].sum()):
            raise UnequalWork(f"{where}: {name}'s map held {len(keys)} flows, {int(tot[:, 0].sum())} packets, "
                              f"{int(tot[:, 1].sum())} bytes; patronus {len(pkeys)} flows, {repeat} packets, "
                              f"{int(ptot[:, 1].sum())} bytes")
        if not np.array_equal(_sorted_keys(keys), ref):
            raise UnequalWork(f"{where}: {name}'s map holds other 5-tuples than patronus's table")


def _records(case: str, pat: list[float], peers: dict[str, list[float]], mem: dict[str, int]) -> list[dict]:
    recs = []
    for name, vals in peers.items():
        ratios = [a / b for a, b in zip(pat, vals, strict=True)]
        ratio = float(statistics.median(ratios))
        recs.append({
            "group": GROUP, "case": case, "unit": "ns",
            "patronus": round(float(statistics.median(pat)), 1),
            "peer": name, "peer_value": round(float(statistics.median(vals)), 1),
            "ratio": round(ratio, 3), "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "runs": [[round(a, 1), round(b, 1)] for a, b in zip(pat, vals, strict=True)],
            "goal": GOAL, "met": bool(ratio <= 1),
            # the flow tables' kernel memory (MiB): patronus's pn_ftab_map, the peer's hash map
            "patronus_table_mib": round(mem["patronus"] / 2**20, 1), "peer_table_mib": round(mem[name] / 2**20, 1),
        })
    return recs


def run_case(xdp_cls: Any, pool: PeerPool, n: int, flows: int, runs: int = RUNS) -> list[dict]:
    """Hit and miss of patronus (``n`` policies, ``flows`` flow capacity)
    against every peer at the same capacity: JSON-ready records."""
    table, frames = _table(n), _frames(n)
    t0 = time.perf_counter()
    with xdp_cls(table, flow_capacity=flows) as x:
        x.steering = False
        peers = pool.get(flows, False)
        mem = {"patronus": map_bytes(x._bpf[b"pn_ftab_map"].map_fd), **{k: p.table_bytes for k, p in peers.items()}}
        hit = measure_hit(x, peers, frames[0], runs)
    with xdp_cls(table, flow_capacity=flows, _bench_new_flows=True) as x:
        miss, _ = measure_miss(x, 0, pool.get(flows, True), frames[: MISS_FRAMES.get(flows, 12)], runs)
    recs = (_records(f"hit p={n} flows={flows}", hit.pop("patronus"), hit, mem) +
            _records(f"miss p={n} flows={flows}", miss.pop("patronus"), miss, mem))
    for r in recs:
        r["seconds"] = round(time.perf_counter() - t0, 1)
    return recs


# -- results -------------------------------------------------------------------------------------


def reset_group(path: Path, group: str = GROUP) -> None:
    """Drop earlier lines of ``group`` from the results file (other groups stay)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("group") == group:
                continue
        except ValueError:
            pass
        keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def append(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def format_table(recs: list[dict]) -> str:
    rows = ["| case | peer | patronus ns | peer ns | patronus / peer (min-max of 3 runs) | ratio <= 1 |",
            "| --- | --- | ---: | ---: | --- | --- |"]
    for r in recs:
        rows.append(f"| {r['case']} | {r['peer']} | {r['patronus']:.0f} | {r['peer_value']:.0f} | "
                    f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                    f"{'met' if r['met'] else 'not met'} |")
    return "\n".join(rows)


def cases(policies: tuple[int, ...] = POLICY_COUNTS, big: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    big = big_policy_counts() if big is None else big
    return [(n, SMALL) for n in policies] + [(n, BIG) for n in big]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", default=",".join(map(str, POLICY_COUNTS)))
    ap.add_argument("--big", default=None, help="policy counts also run with 1,048,576-flow tables")
    ap.add_argument("--runs", type=int, default=RUNS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (BPF_PROG_TEST_RUN)")
    from patronus.dataplane.xdp import Xdp

    pol = tuple(int(s) for s in args.policies.split(",") if s)
    big = None if args.big is None else tuple(int(s) for s in args.big.split(",") if s)
    out = out_path()
    reset_group(out)
    pool = PeerPool()
    t0 = time.perf_counter()
    allrecs = []
    try:
        with pinned() as cpu:
            print(f"pinned to CPU {cpu}; peers: {', '.join(pool.names)}", flush=True)
            for n, flows in cases(pol, big):
                recs = run_case(Xdp, pool, n, flows, args.runs)
                append(out, recs)
                allrecs += recs
                print(format_table(recs).split("\n", 2)[2], flush=True)
    finally:
        pool.close()
    print(format_table(allrecs))
    print(f"{time.perf_counter() - t0:.0f} s (peer builds {pool.load_s:.0f} s); results in {out}")


if __name__ == "__main__":
    main()
