"""pcap to flows: patronus against the programs a user would pick instead.

The same capture file goes to

- patronus: ``Userspace(table).process_pcap(path)`` then ``drain(flush=True)``
  (every flow record out), with the 10,000-policy table of
  ``conftest.make_policies`` (compiled once, outside the timing: the peers
  classify nothing); a fresh data plane per run, its construction timed;
- ``nfpcapd`` (Debian nfdump): ``nfpcapd -r FILE -w DIR -e 3600,3600 -t 3600``,
  the whole process timed (it reads the file, keeps a flow cache, writes
  nfdump flow files). ``-e``: active/inactive timeouts at their maximum so a
  flow is one record, as in patronus (which has none unless asked);
  ``-t``: one output file per hour of capture time;
- ``tshark -q -n -r FILE -z conv,tcp -z conv,udp`` with only the dissectors
  those tables need (``--disable-protocol ALL --enable-protocol
  frame,eth,ethertype,ip,ipv6,tcp,udp``: twice as fast as the default set
  here), the whole process timed (it dissects every frame to TCP/UDP, tracks
  TCP streams, prints the two conversation tables).

Two captures: the synthetic trace of ``conftest.make_traffic`` (1,000,000
frames over 100,000 flows, the trace of test_bench_classify.py's 100k-flow
cases), and a capture of real programs' traffic made in the session
(``peers_capture.py``: curl against python's http.server, ping, iperf3 TCP
and UDP, over IPv4 and IPv6, in a namespace pair).

Equal work is asserted where the tools define flows the same way:

- nfpcapd keys a TCP/UDP flow by the directional 5-tuple, as patronus does:
  its TCP flow count and its UDP flow count without port 53 must equal
  patronus's; every IP packet must be accounted by both. DNS (UDP port 53)
  is one nfpcapd record per packet: its record count must equal the packets
  of patronus's port-53 flows. ICMP is not comparable: nfpcapd writes
  (almost) one record per ICMP packet (ICMPv6 under "other"); both counts are
  recorded.
- tshark's conversations are bidirectional (A:a <-> B:b, one row for both
  directions), and a TCP conversation is a connection (a 5-tuple reused by a
  later connection is a second row): its distinct TCP and UDP endpoint pairs
  must equal patronus's TCP and UDP 5-tuples folded by direction.

Each tool runs RUNS times (default 3), interleaved and in a rotating order;
the JSON line per (capture, peer) has the minimum of each, the per-run pairs,
and ratio = patronus time / peer time (lower is better) as the median of
the paired runs with their min and max. Goal: patronus at least 5x faster than
the fastest peer (ratio <= 0.2); reported, never asserted.

JSON lines go to $PATRONUS_PEERS_OUT (default .bench-peers/results.jsonl);
``benchmarks/peers_report.py`` prints them as one table. Root (namespaces,
tcpdump) and the peers (``scripts/bootstrap.sh --bench-peers``) are needed.

Run: make bench-peers, or
     .venv/bin/python -m pytest benchmarks/test_bench_peers_pcap.py -q -s
"""

from __future__ import annotations

import datetime
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from patronus import PolicyTable
from patronus.dataplane import Userspace

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("PATRONUS_PEERS_OUT", ROOT / ".bench-peers" / "results.jsonl"))
RUNS = int(os.environ.get("PN_PEERS_RUNS", "3"))
POLICIES = 10_000
FRAMES = int(os.environ.get("PN_PEERS_FRAMES", "1000000"))
FLOWS = int(os.environ.get("PN_PEERS_FLOWS", str(FRAMES // 10)))
CAPACITY = 1 << 20
GOAL = 0.2  # patronus time / fastest peer's time
SNAP = 256

PEERS = ("nfpcapd", "tshark")


def _need_peers() -> None:
    missing = [p for p in ("nfpcapd", "nfdump", "tshark", "editcap") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: run scripts/bootstrap.sh --bench-peers")


def _version(cmd: list[str], pattern: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    m = re.search(pattern, out)
    return m.group(1) if m else "?"


# ---------------------------------------------------------------------------
# the tools, each one run: (wall seconds, CPU seconds, what it counted)


def _child(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), p


def run_patronus(table: PolicyTable, path: Path) -> tuple[float, float, dict]:
    c, t = time.process_time(), time.perf_counter()
    dp = Userspace(table, flow_capacity=CAPACITY)
    ids = dp.process_pcap(path)
    flows = dp.drain(flush=True)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    assert dp.last_capture["error"] is None, dp.last_capture
    return wall, cpu, patronus_counts(flows, dp.counters(), len(ids))


def patronus_counts(flows: np.ndarray, counters: dict, frames: int) -> dict:
    proto = flows["proto"]
    tcp_udp = flows[(proto == 6) | (proto == 17)]
    dns = (proto == 17) & ((flows["sport"] == 53) | (flows["dport"] == 53))
    folded: set[tuple] = set()
    for r in tcp_udp.tolist():  # (src, dst, sport, dport, proto, family, ...) as Python objects
        a, b = (bytes(r[0]), r[2]), (bytes(r[1]), r[3])
        folded.add((r[5], r[4], *sorted((a, b))))
    return {
        "frames": frames,
        "flows": int(len(flows)),
        "tcp": int((proto == 6).sum()), "udp": int((proto == 17).sum()),
        "icmp": int(((proto == 1) | (proto == 58)).sum()),
        "icmp_packets": int(flows["packets"][(proto == 1) | (proto == 58)].sum()),
        "packets": int(flows["packets"].sum()),
        "udp53": int(dns.sum()), "udp53_packets": int(flows["packets"][dns].sum()),
        "tcp_folded": sum(1 for k in folded if k[1] == 6), "udp_folded": sum(1 for k in folded if k[1] == 17),
        "malformed": {k: v for k, v in counters["malformed"].items() if v},
        "evicted": int(counters["evicted"]),
    }


def run_nfpcapd(path: Path) -> tuple[float, float, dict]:
    out = Path(tempfile.mkdtemp(prefix="pn-nfpcapd-"))
    try:
        wall, cpu, p = _child(["nfpcapd", "-r", str(path), "-w", str(out), "-e", "3600,3600", "-t", "3600"])
        counts: dict[str, int] = {}
        files = sorted(f for f in out.rglob("nfcapd.*") if f.is_file())
        assert files, f"nfpcapd wrote no flow file: {p.stderr[-2000:]}"
        for f in files:  # -I: the file's summary (flows and packets per protocol)
            info = subprocess.run(["nfdump", "-r", str(f), "-I"], capture_output=True, text=True, check=True).stdout
            for k, v in re.findall(r"^(Flows\w*|Packets\w*): (\d+)", info, re.M):
                counts[k] = counts.get(k, 0) + int(v)
        m = re.search(r"Total: Processed: (\d+), skipped: (\d+), short caplen: (\d+), unknown: (\d+)",
                      p.stdout + p.stderr)
        if m:
            counts.update(zip(("processed", "skipped", "short_caplen", "unknown"), map(int, m.groups())))
        # DNS is a flow per packet in nfpcapd (it keeps each query/answer): its records apart
        csv = subprocess.run(["nfdump", "-R", str(out), "-q", "-o", "csv", "proto udp and port 53"],
                             capture_output=True, text=True, check=True).stdout
        recs = [line.split(",") for line in csv.splitlines() if line.count(",") > 12]
        counts["udp53"], counts["udp53_packets"] = len(recs), sum(int(r[11]) for r in recs)
        return wall, cpu, counts
    finally:
        shutil.rmtree(out, ignore_errors=True)


# only the dissectors the two conversation tables need: half the time of the
# default set on these traces (which also dissects DNS, TLS, QUIC, HTTP, ...)
TSHARK = ["tshark", "-q", "-n", "--disable-protocol", "ALL",
          "--enable-protocol", "frame,eth,ethertype,ip,ipv6,tcp,udp", "-z", "conv,tcp", "-z", "conv,udp"]


def run_tshark(path: Path) -> tuple[float, float, dict]:
    wall, cpu, p = _child([*TSHARK, "-r", str(path)])
    rows = {"tcp": 0, "udp": 0}
    pairs: dict[str, set] = {"tcp": set(), "udp": set()}
    section = None
    for line in p.stdout.splitlines():
        if line.startswith("TCP Conversations"):
            section = "tcp"
        elif line.startswith("UDP Conversations"):
            section = "udp"
        elif section and "<->" in line:
            a, _, b = line.split()[:3]
            rows[section] += 1
            pairs[section].add(frozenset((a, b)))
    # a TCP conversation is a connection (tcp.stream: a SYN after the FIN starts a new
    # one); "tcp_pairs" counts the distinct endpoint pairs, a 5-tuple folded by direction
    return wall, cpu, {**rows, "tcp_pairs": len(pairs["tcp"]), "udp_pairs": len(pairs["udp"])}


# ---------------------------------------------------------------------------
# equal work


def check_equal_work(case: str, pat: dict, nf: dict, ts: dict) -> dict[str, str]:
    """Assert the flow counts that mean the same thing; return them in words."""
    assert pat["evicted"] == 0, pat
    assert nf["Flows_tcp"] == pat["tcp"], (case, pat, nf)
    assert nf["Flows_udp"] - nf["udp53"] == pat["udp"] - pat["udp53"], (case, "UDP flows but DNS", pat, nf)
    assert nf["udp53"] == pat["udp53_packets"] == nf["udp53_packets"], (case, "DNS: a record per packet", pat, nf)
    assert nf["Packets"] == pat["packets"], (case, "IP packets accounted", pat, nf)
    assert ts["tcp_pairs"] == pat["tcp_folded"] and ts["udp_pairs"] == pat["udp_folded"], (case, pat, ts)
    assert ts["udp"] == ts["udp_pairs"], ts
    return {
        "nfpcapd": (f"TCP/UDP flows (directional 5-tuple): nfpcapd {nf['Flows_tcp']:,}/"
                    f"{nf['Flows_udp'] - nf['udp53']:,} = patronus {pat['tcp']:,}/{pat['udp'] - pat['udp53']:,} "
                    f"(UDP without port 53; DNS: nfpcapd {nf['udp53']:,} records, one per packet, for patronus's "
                    f"{pat['udp53']:,} flows of {pat['udp53_packets']:,} packets); "
                    f"IP packets {nf['Packets']:,} = {pat['packets']:,}; "
                    f"ICMP not comparable: nfpcapd {nf['Flows_icmp'] + nf['Flows_other']:,} records "
                    f"(ICMP + other) for {pat['icmp_packets']:,} ICMP packets, patronus {pat['icmp']:,} flows"),
        "tshark": (f"TCP/UDP conversations (bidirectional): tshark {ts['tcp']:,}/{ts['udp']:,}, "
                   f"{ts['tcp_pairs']:,}/{ts['udp_pairs']:,} distinct endpoint pairs = patronus 5-tuples folded "
                   f"by direction {pat['tcp_folded']:,}/{pat['udp_folded']:,} (unfolded {pat['tcp']:,}/"
                   f"{pat['udp']:,}); {ts['tcp'] - ts['tcp_pairs']:,} TCP connections reused a 5-tuple "
                   f"(tshark: a new conversation, patronus and nfpcapd: the same flow); ICMP not in these tables"),
    }


# ---------------------------------------------------------------------------
# the captures


@pytest.fixture(scope="module", autouse=True)
def fresh_results() -> None:
    """Drop earlier "pcap" lines from the results file (other groups stay)."""
    if OUT.exists():
        keep = [line for line in OUT.read_text().splitlines() if line.strip() and _group(line) != "pcap"]
        OUT.write_text("".join(line + "\n" for line in keep))


def _group(line: str) -> str | None:
    try:
        return json.loads(line).get("group")
    except ValueError:
        return None


@pytest.fixture(scope="module")
def table(bench_data) -> tuple[PolicyTable, float]:
    pols = bench_data.policies(POLICIES)
    t = time.perf_counter()
    tab = PolicyTable(pols)
    return tab, time.perf_counter() - t


@pytest.fixture(scope="module")
def captures(bench_data, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    _need_peers()
    out: dict[str, tuple[Path, dict]] = {}
    t = time.perf_counter()
    path = bench_data.pcap(POLICIES, FRAMES, FLOWS)
    tr = bench_data.traffic(POLICIES, FRAMES, FLOWS)
    keys = {(f.family, f.src, f.dst, f.proto, f.sport, f.dport) for f in tr.flows}
    out["synthetic"] = (path, {"frames": len(tr), "flows_5tuple": len(keys), "file_bytes": path.stat().st_size,
                               "prepare_s": round(time.perf_counter() - t, 1)})
    if os.geteuid() == 0:
        from peers_capture import capture_real_traffic

        real = tmp_path_factory.mktemp("peers") / "real.pcap"
        t = time.perf_counter()
        info = capture_real_traffic(real)
        info["prepare_s"] = round(time.perf_counter() - t, 1)
        out["real"] = (real, info)
    return out


CASES = {
    "synthetic": f"synthetic {FRAMES // 1000:,}k frames, {FLOWS // 1000:,}k flows, {POLICIES // 1000}k policies",
    "real": f"real programs' capture (curl, http.server, ping, iperf3), {POLICIES // 1000}k policies",
}


@pytest.mark.parametrize("capture", list(CASES))
def test_pcap_to_flows_against_peers(benchmark, captures, table, capture):
    if capture not in captures:
        pytest.skip("the real-programs capture needs root (network namespaces, tcpdump)")
    path, info = captures[capture]
    tab, compile_s = table
    tools = {"patronus": lambda: run_patronus(tab, path), "nfpcapd": lambda: run_nfpcapd(path),
             "tshark": lambda: run_tshark(path)}
    times: dict[str, list[float]] = {k: [] for k in tools}
    cpus: dict[str, list[float]] = {k: [] for k in tools}
    counts: dict[str, dict] = {}

    def all_runs() -> None:
        for run in range(RUNS):
            names = list(tools)
            names = names[run % 3:] + names[: run % 3]  # rotate who goes first
            for name in names:
                wall, cpu, c = tools[name]()
                times[name].append(wall)
                cpus[name].append(cpu)
                assert counts.setdefault(name, c) == c, (name, "counted differently from one run to the next")

    # one pedantic round wraps the interleaved runs (so --benchmark-disable, which
    # runs a benchmark once, still runs them all; pytest-benchmark's own table of
    # that round means nothing: the JSON lines are the result)
    benchmark.group = "pcap to flows against peers"
    benchmark.pedantic(all_runs, rounds=1, iterations=1, warmup_rounds=0)
    assert all(len(v) == RUNS for v in times.values())
    if capture == "synthetic":
        assert counts["patronus"]["flows"] == info["flows_5tuple"], (counts["patronus"], info)
        assert counts["patronus"]["packets"] == info["frames"] and not counts["patronus"]["malformed"]
    else:  # everything but ARP is IP and accounted
        pat = counts["patronus"]
        assert set(pat["malformed"]) <= {"not_ip"}, pat
        assert pat["packets"] + pat["malformed"].get("not_ip", 0) == pat["frames"], pat
    checks = check_equal_work(capture, counts["patronus"], counts["nfpcapd"], counts["tshark"])
    if capture == "real":
        info["snap256"] = snap = snapped(path, tab)
        # frames the snap length cut count at their IP length in both tools
        assert snap["patronus_packets"] == snap["nfpcapd_packets"], snap
    startup = startup_costs(path)

    versions = {"nfpcapd": _version(["nfpcapd", "-V"], r"Version: (\S+)"),
                "tshark": _version(["tshark", "--version"], r"TShark \(Wireshark\) (\S+)")}
    fastest = min(PEERS, key=lambda p: min(times[p]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for peer in PEERS:
        ratios = [a / b for a, b in zip(times["patronus"], times[peer], strict=True)]
        ratio = statistics.median(ratios)
        rows.append({
            "group": "pcap", "case": CASES[capture], "unit": "s",
            "patronus": round(min(times["patronus"]), 4), "peer": peer, "peer_value": round(min(times[peer]), 4),
            "ratio": round(ratio, 4), "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
            "runs": [{"patronus": round(a, 4), "peer": round(b, 4), "ratio": round(a / b, 4)}
                     for a, b in zip(times["patronus"], times[peer], strict=True)],
            "goal": f"ratio <= {GOAL} (5x the fastest peer)", "met": ratio <= GOAL,
            "fastest_peer": peer == fastest,
            "cpu_s": {"patronus": round(min(cpus["patronus"]), 4), "peer": round(min(cpus[peer]), 4)},
            "peer_startup_s": startup[peer],
            "patronus_table_compile_s": round(compile_s, 3),
            "equal_work": checks[peer], "counts": {"patronus": counts["patronus"], "peer": counts[peer]},
            "capture": {k: v for k, v in info.items()}, "peer_version": versions[peer],
            "date": datetime.date.today().isoformat(),
        })
    with OUT.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    benchmark.extra_info.update(case=CASES[capture], **{f"{k}_s_min": round(min(v), 4) for k, v in times.items()})
    print(f"\n{CASES[capture]}: " + ", ".join(f"{k} {min(v):.3f} s" for k, v in times.items()))


def snapped(path: Path, tab: PolicyTable) -> dict:
    """The same capture cut to 256 bytes a frame (``editcap -s 256``, what
    ``tcpdump -s 256`` writes): how many frames each tool accounts (both
    count a cut frame at its IP length). Not timed."""
    cut = path.with_name(f"{path.stem}.snap{SNAP}.pcap")
    subprocess.run(["editcap", "-s", str(SNAP), str(path), str(cut)], check=True, capture_output=True)
    try:
        _, _, pat = run_patronus(tab, cut)
        _, _, nf = run_nfpcapd(cut)
        return {"frames": pat["frames"], "patronus_packets": pat["packets"], "patronus_malformed": pat["malformed"],
                "patronus_flows": pat["flows"], "nfpcapd_packets": nf["Packets"],
                "nfpcapd_flows_tcp_udp": nf["Flows_tcp"] + nf["Flows_udp"],
                "patronus_flows_tcp_udp": pat["tcp"] + pat["udp"]}
    finally:
        cut.unlink(missing_ok=True)


def startup_costs(path: Path) -> dict[str, float]:
    """Each peer's time on a one-frame file (its first frame): the fixed cost
    of a process (tshark registers every dissector), min of 3."""
    one = path.with_name(f"{path.stem}.one.pcap")
    subprocess.run(["editcap", "-r", str(path), str(one), "1"], check=True, capture_output=True)
    try:
        return {"nfpcapd": round(min(run_nfpcapd(one)[0] for _ in range(3)), 4),
                "tshark": round(min(run_tshark(one)[0] for _ in range(3)), 4)}
    finally:
        one.unlink(missing_ok=True)
