"""`patronus demo`: the story of patronus.

Parts 1-6 run anywhere: a 3-site mesh, its paths and policies, packets
classified and accounted (XDP when it runs, else the userspace data plane),
the state saved and reloaded. Part 7 runs where root, BCC and wireguard-go
are (``make demo`` installs them): a lab of namespaces with real WireGuard
tunnels, XDP steering and BFD; a voice stream and a TCP transfer, the voice
path's uplink cut and restored, with the gap, the detection time, the flows
and the events printed (``patronus.lab.story``).
"""

from __future__ import annotations

import sys

import os
import tempfile
import time
from typing import TextIO

from . import abi, packets
from .mesh import Mesh
from .model import Failover, Match, Policy, QoS, Site, Uplink
from .store import load_mesh, save_mesh


def build_mesh() -> Mesh:
    """The demo mesh: hq with two uplinks, two branches."""
    mesh = Mesh("acme")
    mesh.add_site(Site("hq", subnets=["10.1.0.0/24", "fd00:1::/64"],
                       uplinks=[Uplink("isp1", "192.0.2.1"), Uplink("lte", "198.51.100.7", nat=True, cost=10)]))
    mesh.add_site(Site("br1", subnets=["10.2.0.0/24"],
                       uplinks=[Uplink("isp1", "203.0.113.9"), Uplink("dsl", "203.0.113.77")]))
    mesh.add_site(Site("br2", subnets=["10.3.0.0/24", "fd00:3::/64"], uplinks=[Uplink("fiber", "192.0.2.200")]))
    mesh.add_policy(Policy("voip", Match(proto="udp", dst_ports=(5060, 5061)), priority=10, app="voip",
                           qos=QoS(dscp=46), prefer=("isp1", "fiber")))
    mesh.add_policy(Policy("rtp", Match(proto="udp", dst_ports=(16384, 32767), dscp=46), priority=20, app="voip"))
    mesh.add_policy(Policy("game", Match(dst="10.3.0.0/24", proto="udp"), priority=30, app="gaming"))
    mesh.add_policy(Policy("backup", Match(proto="tcp", dst_ports=873), priority=40, app="bulk",
                           qos=QoS(dscp=8, rate_kbps=50_000), prefer=("dsl", "lte")))
    mesh.add_policy(Policy("v6-web", Match(dst="fd00:3::/64", proto="tcp", dst_ports=443), priority=50))
    mesh.failover = Failover(detect_ms=150, failback_hold_s=30)
    return mesh


SAMPLE_TRAFFIC: list[tuple[str, bytes]] = [
    ("SIP INVITE hq->br1 udp/5060", packets.udp("10.1.0.10", "10.2.0.20", 5062, 5060)),
    ("RTP voice udp/20000 EF", packets.udp("10.1.0.10", "10.2.0.20", 30000, 20000, dscp=46)),
    ("RTP without EF marking", packets.udp("10.1.0.10", "10.2.0.20", 30000, 20000)),
    ("game traffic to br2", packets.udp("10.1.0.33", "10.3.0.7", 51000, 27015)),
    ("rsync backup tcp/873", packets.tcp("10.2.0.5", "10.1.0.200", 40022, 873, flags=0x02)),
    ("HTTPS over IPv6 to br2", packets.tcp("fd00:1::10", "fd00:3::80", 50123, 443, vlans=(100,))),
    ("ping", packets.icmp("10.1.0.10", "10.3.0.1")),
    ("truncated frame", packets.udp("10.1.0.10", "10.2.0.20", 5062, 5060)[:30]),
]


def run(out: TextIO, state: str | None = None) -> int:
    def say(s: str = "") -> None:
        print(s, file=out, flush=True)

    t0 = time.perf_counter()
    say("patronus demo (embedded defaults: no root, no network needed)")
    say("=" * 64)
    mesh = build_mesh()
    say(f"1. Built mesh {mesh.name!r}: {len(mesh.sites)} sites, {len(mesh.paths())} paths")
    for s in mesh.sites:
        ups = ", ".join(f"{u.name} ({u.address})" for u in s.uplinks)
        say(f"   site {s.name:<4} subnets {', '.join(s.subnets):<28} uplinks {ups}")
    say()
    say("2. Paths (one tunnel per pair of uplinks):")
    for p in mesh.paths():
        say(f"   #{p.index:<2} {p.id}")
    say()
    say("3. Policies, in evaluation order (lower priority number first):")
    for p in sorted(mesh.policies, key=lambda p: p.priority):
        say(f"   {p.priority:>3} {p.name:<7} app={p.app:<8} {_match_text(p.match)}")
    say()
    table = mesh.policy_table()
    sample = [f for _, f in SAMPLE_TRAFFIC]
    ids, sites = table.classify(sample), table.sites_of(sample)
    say("4. Classifying sample packets (policy, and the destination site from the sites' subnets):")
    for (label, _), i, site in zip(SAMPLE_TRAFFIC, ids, sites):
        target = table.name_of(i) or "(default: no policy matched)"
        to = "-" if site < 0 else table.site_name(site) or "outside every site"
        say(f"   {label:<30} -> {target:<28} to {to}")
    say()
    from . import dataplane

    dp = dataplane.open(table, backend="auto", flow_capacity=1024)
    kind = ("the XDP data plane (the kernel program, run with BPF_PROG_TEST_RUN)" if type(dp).__name__ == "Xdp"
            else "the userspace data plane (Cython; XDP needs root and BCC)")
    say(f"5. Accounting flows in {kind}.")
    say("   Every class has a path per destination site: VoIP to br1 on path #0, to br2 on #4, the default")
    say("   class on each site's first path; then VoIP to br1 moves to #2 with one write:")
    first = {s.name: mesh.paths("hq", s.name)[0].index for s in mesh.sites if s.name != "hq"}
    dp.set_paths([(cls, site, path) for site, path in first.items() for cls in (None, "voip")])
    frames = [f for _, f in SAMPLE_TRAFFIC]
    dp.process(frames * 3, ts_ns=[i * 20_000_000 for i in range(len(frames) * 3)])
    dp.set_path("voip", 2, site="br1")  # a failover is this one write; the flow keeps its counters
    dp.process(frames[:1], ts_ns=[10**9])
    for r in sorted(dp.flows(), key=lambda r: -int(r["packets"])):
        pol = table.name_of(int(r["policy"])) or "(default)"
        to = table.site_name(int(r["site"])) or "-"
        path = "-" if r["path"] == abi.NO_PATH else f"#{int(r['path'])}"
        say(f"   {_flow_text(r):<44} {pol:<9} to {to:<4} path {path:<3} {int(r['packets'])} pkts "
            f"{int(r['bytes'])} B")
    c = dp.counters()
    dp.close()
    bad = {k: v for k, v in c["malformed"].items() if v}
    say(f"   malformed frames counted (not accounted): {bad}")
    say("   (both RTP samples share one 5-tuple: a flow keeps the policy of its first packet)")
    say()
    tmpdir = None
    if state is None:
        tmpdir = tempfile.mkdtemp(prefix="patronus-demo-")
        state = os.path.join(tmpdir, "state.db")
    save_mesh(mesh, state)
    loaded = load_mesh(state)
    same = loaded == mesh
    say(f"6. Saved the state to {state} ({os.path.getsize(state)} bytes) and loaded it back: "
        f"{'identical' if same else 'DIFFERENT'}")
    say()
    rc = 0 if same else 1
    say()
    rc |= _network_story(say)
    say()
    say(f"Done in {time.perf_counter() - t0:.2f} s.")
    return rc


def _network_story(say) -> int:  # type: ignore[no-untyped-def]
    """Part 7: the same ideas on a real network (namespaces, WireGuard, XDP,
    BFD), when this machine can run it; says why not otherwise."""
    import shutil

    why = None
    if os.geteuid() != 0:
        why = "it needs root (network namespaces, XDP)"
    elif not shutil.which("wireguard-go"):
        why = "wireguard-go is not installed (apt-get install wireguard-go)"
    else:
        try:
            from .dataplane import preflight

            preflight()
        except Exception as e:  # DataplaneUnavailable names cause and fix
            why = str(e)
    if why:
        say("7. The live failover story needs a real network and cannot run here: " + why + ".")
        say("   The same story instead, on the userspace data plane with simulated paths and BFD:")
        return _simulated_story(say)
    from .lab.story import failover_story

    say("7. Live: a lab of network namespaces, a `patronus agent` per site: real WireGuard tunnels, XDP steering "
        "and BFD.")
    workdir = tempfile.mkdtemp(prefix="patronus-demo-lab-")
    r = failover_story(workdir, tag="pndemo", say=lambda m: say("   " + m))
    down = next((m for m in r["moves"] if m["reason"] == "bfd_down" and m["mono"] >= r["t_cut"]), None)
    back = next((m for m in r["moves"] if m["reason"] == "failback" and m["mono"] >= r["t_heal"]), None)
    say(f"   voice stream: {r['sent']} packets sent at 50/s, {r['received']} received, "
        f"{r['sent'] - r['received']} lost during the cut")
    if down:
        say(f"   detection: {(down['mono'] - r['t_cut']) * 1e3:.0f} ms after the cut, voice moved "
            f"{down['from_path']} -> {down['to_path']} (one data-plane write)")
    say(f"   largest gap the voice receiver saw across the cut: {r['cut_gap_ms']:.0f} ms (goal: under 200 ms)")
    say(f"   TCP bulk transfer (4 MiB) during the cut: {'arrived intact' if r['tcp_ok'] else 'BROKEN'}")
    if back:
        say(f"   failback to {back['to_path']} {back['mono'] - r['t_heal']:.1f} s after the link came back "
            f"(hold {2.0:g} s from BFD Up)")
    st = r.get("stats") or {}
    for name, f in sorted((st.get("flows") or {}).items()):
        say(f"   flows of policy {name:<7}: {f['flows']} flows, {f['packets']} packets, {f['bytes']} bytes")
    say("   events, with reasons:")
    for e in r["events"]:
        if e["reason"] in ("initial", "bfd_down", "failback", "reroute", "sla_violation", "damped"):
            say(f"     {e['reason']:<12} {e['policy'] or '':<5} {e['from_path'] or '-':<12} -> "
                f"{e['to_path'] or '-':<12} {e['detail'] or ''}")
    wan_ok = all(" UDP" in line for line in r["wan"])
    say(f"   {len(r['wan'])} packets left s0 on its WAN uplinks, all WireGuard: {'yes' if wan_ok else 'NO'}")
    d = r["duplicated"]
    say(f"   duplicated voice: {d['sent']} sent, {d['received']} received, {d['lost']} lost, "
        f"{d['duplicates']} duplicates delivered")
    if d.get("why"):   # not what it should be: what each end said, on stderr
        print(d["why"], file=sys.stderr)
    say("   lab torn down.")
    return 0 if (r["tcp_ok"] and down is not None and d["lost"] == 0 and d["duplicates"] == 0) else 1


def _simulated_story(say) -> int:  # type: ignore[no-untyped-def]
    """The failover story with simulated paths: the real policy table, data
    plane and failover engine, on a simulated clock; BFD is simulated as
    50 ms x 3 (the cut is detected 150 ms after the last packet got through)."""
    from .dataplane import Userspace
    from .failover.engine import Engine

    mesh = build_mesh()
    mesh.failover = Failover(detect_ms=150, failback_hold_s=2, cooldown_s=0.5)
    table = mesh.policy_table()
    dp = Userspace(table, flow_capacity=4096)
    core = Engine(mesh, dp, local_site="hq")
    events = list(core.start(now=0.0))
    primary = core.where()[("voip", "br1")]
    say(f"   to br1, policies put voip on {primary} and backup on {core.where()[('backup', 'br1')]}")
    voice = packets.udp("10.1.0.10", "10.2.0.20", 5062, 5060)
    bulk = packets.tcp("10.1.0.200", "10.2.0.5", 40022, 873, payload=bytes(1200))
    t_cut, t_heal, detect = 1.5, 3.5, 0.15
    dead_from, dead_to = t_cut, None
    uplink = core.paths[primary].path.local_uplink if core.paths[primary].path.local_site == "hq" else \
        core.paths[primary].path.remote_uplink
    cut = [pid for pid, h in core.paths.items() if core.core.local_uplink(pid) == uplink]  # the uplink's paths
    received, t = [], 0.0
    while t < 7.0:
        if dead_to is None and t >= t_cut + detect:
            for pid in cut:
                events += core.bfd(pid, up=False, now=t)
            dead_to = t
        if t >= t_heal + 1.0 and core.paths[primary].bfd_up is False:
            for pid in cut:  # BFD back Up after its 1 s slow start
                events += core.bfd(pid, up=True, now=t)
        events += core.tick(now=t)
        ids = dp.process([voice, bulk, bulk], ts_ns=[int(t * 1e9)] * 3)
        on = core.where()[("voip", "br1")]
        if not (on == primary and dead_from <= t < max(dead_to or t_heal, t_heal)):
            received.append(t)  # the voice packet's path was alive
        assert ids[0] == table.index("voip")
        t = round(t + 0.02, 6)
    gap = max(b - a for a, b in zip(received, received[1:]))
    say(f"   cut uplink hq.{uplink} at {t_cut} s, restored at {t_heal} s: simulated BFD (50 ms x 3) detects the "
        f"cut {detect * 1e3:.0f} ms later; largest voice gap {gap * 1e3:.0f} ms")
    for e in events:
        if e.reason in ("initial", "bfd_down", "failback") and e.policy and e.site == "br1":
            say(f"     {e.ts:5.2f} s {e.reason:<9} {e.policy:<9} {e.from_path or '-'} -> {e.to_path} "
                f"{e.detail or ''}")
    for r in dp.flows():
        say(f"   flow of {table.name_of(int(r['policy'])) or 'default':<7}: {int(r['packets'])} packets, "
            f"{int(r['bytes'])} bytes, now on path #{int(r['path'])}")
    dp.close()
    return 0


def _flow_text(r) -> str:
    import ipaddress

    fam = int(r["family"])
    conv = (lambda b: ipaddress.IPv4Address(bytes(b)[:4])) if fam == 4 else (lambda b: ipaddress.IPv6Address(bytes(b)))
    proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(int(r["proto"]), str(int(r["proto"])))
    if r["sport"] or r["dport"]:
        def hp(a, port):
            return f"{a}:{port}" if fam == 4 else f"[{a}]:{port}"

        return f"{proto} {hp(conv(r['src']), int(r['sport']))} > {hp(conv(r['dst']), int(r['dport']))}"
    return f"{proto} {conv(r['src'])} > {conv(r['dst'])}"


def _match_text(m: Match) -> str:
    parts = []
    if m.proto is not None:
        parts.append(m.proto_name or "")
    for label, v in (("src", m.src), ("dst", m.dst)):
        if v:
            parts.append(f"{label} {v}")
    for label, text in (("sport", m.src_ports_text), ("dport", m.dst_ports_text)):
        if text:
            parts.append(f"{label} {text}")
    if m.dscp is not None:
        parts.append(f"dscp {m.dscp}")
    return " ".join(parts) or "any"
