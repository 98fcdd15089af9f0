"""Run the benchmarks and print frames/s per case, the ratios to each
baseline and the issue's goals, met or not.

    .venv/bin/python benchmarks/report.py                  # run, then report
    .venv/bin/python benchmarks/report.py --save run.json  # keep the JSON too
    .venv/bin/python benchmarks/report.py --runs 3         # three runs: median of the runs' medians
    .venv/bin/python benchmarks/report.py --json a.json b.json  # report earlier runs
    .venv/bin/python benchmarks/report.py -- -k e2e        # extra pytest arguments

The benchmarks store per-frame times (see test_bench_classify.py), so every
figure here is per frame; verdicts use the median round (over several runs,
the median of the runs' medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BIG = 10_000


def _run(extra: list[str], out: Path) -> None:
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "--benchmark-only",
           "--benchmark-columns=min,median,ops,rounds", f"--benchmark-json={out}", *extra]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        sys.exit(f"benchmarks failed (exit {rc})")


def _fmt_rate(pps: float) -> str:
    if pps >= 1e6:
        return f"{pps / 1e6:.2f} M"
    if pps >= 1e3:
        return f"{pps / 1e3:.1f} k"
    return f"{pps:.0f}"


def _fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def _fmt_ratio(r: float) -> str:
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x"


def load(paths: list[Path]) -> tuple[dict, dict]:
    """Rows by benchmark name. Over several runs: the median of the runs'
    medians, the fastest round of all, and the range of the runs' medians."""
    per: dict[str, list[dict]] = {}
    machine: dict = {}
    for path in paths:
        data = json.loads(path.read_text())
        machine = data.get("machine_info", machine)
        for b in data["benchmarks"]:
            per.setdefault(b["name"], []).append(b)
    rows = {}
    for name, bs in per.items():
        ei = bs[-1].get("extra_info", {})
        meds = sorted(b["stats"]["median"] for b in bs)
        med = statistics.median(meds)
        best = min(b["stats"]["min"] for b in bs)
        rows[name] = {
            "name": name, "group": bs[-1]["group"], "case": ei.get("case", name),
            "role": ei.get("role", "?"), "frames": ei.get("frames_per_round"),
            "ns": med * 1e9, "ns_best": best * 1e9, "pps": 1 / med, "pps_best": 1 / best,
            "pps_lo": 1 / meds[-1], "pps_hi": 1 / meds[0], "runs": len(bs),
            "rounds": sum(b["stats"]["rounds"] for b in bs), "extra": ei,
        }
    return rows, machine


def table(rows: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for r in rows.values():
        groups.setdefault(r["group"], []).append(r)
    order = ("cached classify", "cache-miss classify", "end to end", "pcap end to end")

    def gkey(g: str) -> tuple:
        kind, _, pol = g.rpartition(", ")
        return (order.index(kind) if kind in order else 99, int(pol.split()[0]) if pol[:1].isdigit() else 0)

    lines = [("| group | case | frames/round | time/frame (median) | frames/s (median) | run medians | "
              "frames/s (best round) | vs baselines (median) |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for g in sorted(groups, key=gkey):
        rs = sorted(groups[g], key=lambda r: (r["role"] != "patronus", r["ns"]))
        bases = [r for r in rs if r["role"] == "baseline"]
        for r in rs:
            vs = ""
            if r["role"] == "patronus" and bases:
                vs = "; ".join(f"{_fmt_ratio(b['ns'] / r['ns'])} {b['extra'].get('label', b['case'])}" for b in bases)
            extra = r["extra"]
            note = ""
            if "cache_hit_rate" in extra:
                note = f" (hit rate {extra['cache_hit_rate']:.1%})"
            spread = (f"{_fmt_rate(r['pps_lo'])} to {_fmt_rate(r['pps_hi'])}" if r["runs"] > 1 else "")
            lines.append(f"| {g} | {r['case']}{note} | {r['frames']:,} | {_fmt_ns(r['ns'])} | "
                         f"{_fmt_rate(r['pps'])} | {spread} | {_fmt_rate(r['pps_best'])} | {vs} |")
    return "\n".join(lines)


def goals(rows: dict) -> str:
    def get(name: str) -> dict | None:
        return rows.get(name)

    out = ["| goal | measured (median; best) | met |", "| --- | --- | --- |"]

    def line(goal: str, measured: str, ok: bool | None) -> None:
        out.append(f"| {goal} | {measured} | {'yes' if ok else 'n/a' if ok is None else '**no**'} |")

    for n in (10, 1_000, BIG):
        r = get(f"test_cached_classify[{n}]")
        if r:
            line(f">= 20 M cached classifications/s ({n:,} policies, 10k flows)",
                 f"{_fmt_rate(r['pps'])}/s; {_fmt_rate(r['pps_best'])}/s", r["pps"] >= 20e6)
    for cs, size in (("default", "131,072"), ("cache256k", "262,144")):
        r = get(f"test_cached_classify_100k_flows[{cs}]")
        if r:
            line(f">= 20 M cached classifications/s ({BIG:,} policies, 100k flows, cache {size})",
                 f"{_fmt_rate(r['pps'])}/s; {_fmt_rate(r['pps_best'])}/s", r["pps"] >= 20e6)
    r = get("test_cached_classify_hot")
    if r:
        line(f"(best case, not the goal's test) >= 20 M cached classifications/s, {BIG:,} policies, 64 flows",
             f"{_fmt_rate(r['pps'])}/s; {_fmt_rate(r['pps_best'])}/s", r["pps"] >= 20e6)
    e2e = get(f"test_e2e_userspace[{BIG}]")
    if e2e:
        line(f">= 5 M frames/s end to end ({BIG:,} policies, 10k flows)",
             f"{_fmt_rate(e2e['pps'])}/s; {_fmt_rate(e2e['pps_best'])}/s", e2e["pps"] >= 5e6)
        for name, what in (("test_e2e_userspace_100k_flows", "100k flows"),
                           ("test_e2e_userspace_all_new_flows", "every frame a new flow")):
            r = get(name)
            if r:
                line(f">= 5 M frames/s end to end ({BIG:,} policies, {what})",
                     f"{_fmt_rate(r['pps'])}/s; {_fmt_rate(r['pps_best'])}/s", r["pps"] >= 5e6)
        ref = get(f"test_e2e_reference[{BIG}]")
        if ref:
            line(f">= 200x reference.FlowAccounting end to end ({BIG:,} policies)",
                 f"{_fmt_ratio(ref['ns'] / e2e['ns'])}; {_fmt_ratio(ref['ns_best'] / e2e['ns_best'])}",
                 ref["ns"] / e2e["ns"] >= 200)
        dp = get("test_e2e_dpkt")
        if dp:
            line(f">= 50x dpkt parsing alone (end to end, {BIG:,} policies)",
                 f"{_fmt_ratio(dp['ns'] / e2e['ns'])}; {_fmt_ratio(dp['ns_best'] / e2e['ns_best'])}",
                 dp["ns"] / e2e["ns"] >= 50)
    pc, pd = get("test_pcap_userspace"), get("test_pcap_dpkt")
    if pc and pd:
        line(f">= 50x dpkt (pcap file, {BIG:,} policies)",
             f"{_fmt_ratio(pd['ns'] / pc['ns'])}; {_fmt_ratio(pd['ns_best'] / pc['ns_best'])}",
             pd["ns"] / pc["ns"] >= 50)
    c, rc = get(f"test_cached_classify[{BIG}]"), get(f"test_reference_classify[{BIG}]")
    if c and rc:
        line(f">= 200x reference.classify (cached classify, {BIG:,} policies)",
             f"{_fmt_ratio(rc['ns'] / c['ns'])}; {_fmt_ratio(rc['ns_best'] / c['ns_best'])}",
             rc["ns"] / c["ns"] >= 200)
    m = get(f"test_miss_classify[{BIG}]")
    if m:
        line(f"< 1 µs per cache-miss classification ({BIG:,} policies, parse included)",
             f"{_fmt_ns(m['ns'])}; {_fmt_ns(m['ns_best'])}", m["ns"] < 1000)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, nargs="+", help="report earlier --benchmark-json runs instead of running")
    ap.add_argument("--runs", type=int, default=1, help="run the suite this many times (default 1)")
    ap.add_argument("--save", type=Path, help="keep the JSON of the runs here (run i of n: NAME.i.json)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args(argv)
    if a.json:
        paths = a.json
    else:
        base = a.save or Path(tempfile.mkdtemp(prefix="patronus-bench-")) / "bench.json"
        paths = [base if a.runs == 1 else base.with_suffix(f".{i}.json") for i in range(1, a.runs + 1)]
        for p in paths:
            _run(a.pytest_args, p)
    rows, machine = load(paths)
    cpu = machine.get("cpu", {})
    print(f"\nmachine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} logical CPUs; "
          f"python {machine.get('python_version', '?')}; {len(paths)} run(s): {', '.join(map(str, paths))}\n")
    print(table(rows))
    print()
    print(goals(rows))


if __name__ == "__main__":
    main()
