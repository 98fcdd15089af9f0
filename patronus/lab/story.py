"""The failover story in the lab, used by ``patronus demo`` and the
end-to-end tests: a ``patronus agent`` per site (tunnels, XDP steering, BFD,
failover), policies steer a VoIP-like stream and a TCP transfer from site
s0 to s1 onto different paths, the voice path's uplink is cut, BFD detects
it, the engine moves voice, the link comes back, voice fails back after the
hold. Needs root, BCC and wireguard-go.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model import Failover, Match, Policy, QoS
from ..netns import socket_in
from ..store import Store
from .net import Lab, LabError

__all__ = ["failover_story", "HOLD_S"]

HOLD_S = 2.0


def story_mesh(sites: int, hold_s: float = HOLD_S, *, duplicate_voice: bool = False) -> Any:
    """The lab's mesh with the story's policies: voice (SIP port 5060, UDP)
    from s0 to s1 prefers uplink u0 (``duplicate_voice``: and is sent over a
    second path too), bulk (TCP) u1; failback after ``hold_s``."""
    mesh = Lab.plan_mesh(sites, 2)
    mesh.add_policy(Policy("voip", Match(dst="10.2.0.0/24", proto="udp", dst_ports=5060), priority=1,
                           app="voip", prefer=["u0"], qos=QoS(duplicate=duplicate_voice)))
    mesh.add_policy(Policy("bulk", Match(dst="10.2.0.0/24", proto="tcp"), priority=2, app="bulk", prefer=["u1"]))
    mesh.failover = Failover(failback_hold_s=hold_s, cooldown_s=0.5)
    return mesh


class _Events:
    """The failover events of site s0's agent towards s1, read from the
    agents' state as they are written; ``mono`` is each event's time on this
    process's monotonic clock."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.events: list[dict[str, Any]] = []
        self._seen = 0
        self._offset = time.time() - time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="story-events")

    def start(self) -> _Events:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.read()

    def read(self) -> None:
        with Store(self.state) as st:
            rows = st.events()
        for e in rows[self._seen:]:
            paths = f"{e['from_path'] or ''} {e['to_path'] or ''}"
            if e["site"] == "s1" and "s0." in paths:  # s0's moves towards s1 (path ids name both ends)
                self.events.append({**e, "mono": e["ts"] - self._offset})
        self._seen = len(rows)

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.read()


def _flow_stats(state: Path) -> dict[str, Any]:
    """Site s0's flows per policy from the agents' last flow snapshots."""
    with Store(state) as st:
        rows = [r for r in st.flow_snapshots() if r["site"] == "s0"]
    last: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:  # oldest first: the last snapshot of a flow has its totals
        last[(r["src"], r["dst"], r["sport"], r["dport"], r["proto"])] = r
    per: dict[str, dict[str, Any]] = {}
    for r in last.values():
        d = per.setdefault(r["policy"] or "default", {"flows": 0, "packets": 0, "bytes": 0})
        d["flows"] += 1
        d["packets"] += int(r["packets"])
        d["bytes"] += int(r["bytes"])
    return {"flows": per}


def _settled(st: dict[str, Any], voice_path: str) -> bool:
    """Site s0 as the duplicated run needs it: every path to s1 Up, voice on
    a path of ``voice_path``'s uplink (the one the run cuts; either of its
    paths is home for the policy) and its copies on a tunnel of another."""
    paths = {pid: p for pid, p in st.get("paths", {}).items() if p.get("remote_site") == "s1"}
    routes = {(r["class"], r["site"]): r["path"] for r in st.get("routes", [])}
    copies = st.get("duplication", {}).get("copies_to", {}).get("voip->s1")
    home = paths.get(voice_path, {}).get("local_uplink")
    voice = paths.get(routes.get(("voip", "s1")) or "", {})
    other = {p["ifname"] for p in paths.values() if p.get("local_uplink") != home}
    return (bool(paths) and all(p.get("bfd") == "up" for p in paths.values())
            and voice.get("local_uplink") == home and copies in other)


def duplication_phase(lab: Lab, state: Path, hold_s: float, say: Callable[[str], None],
                      voice_path: str | None = None) -> dict[str, Any]:
    """The same cut with duplication on for voice: the desired state gets
    ``QoS(duplicate=True)`` on voip (the agents apply it live), then a voice
    stream with sequence numbers while s0's uplink u0 is cut for 2 s and
    restored. Returns sent, received, lost and duplicates delivered."""
    lab.write_agent_state(story_mesh(len(lab.mesh.sites), hold_s, duplicate_voice=True), state)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # s0 copies voice to s1 and s1 de-duplicates on its tunnels
        s0, s1 = lab.agent_status(0, state) or {}, lab.agent_status(1, state) or {}
        if "voip->s1" in s0.get("duplication", {}).get("copies_to", {}) and "dedup" in s1.get("duplication", {}):
            break
        time.sleep(0.1)
    else:
        raise LabError(f"{lab.agent_logs(40)}\nduplication never came on in 30 s: s0 says "
                       f"{s0.get('duplication')}, s1 says {s1.get('duplication')}")
    if voice_path is not None:   # the first cut's failback, damping and the bulk transfer's aftermath settled
        deadline = time.monotonic() + 30
        while not _settled(lab.agent_status(0, state) or {}, voice_path):
            if time.monotonic() > deadline:
                raise LabError(f"{lab.agent_logs(40)}\ns0 never settled for the duplicated run (every path to s1 "
                               f"Up, voice on the uplink of {voice_path}, copies on another): "
                               f"{lab.agent_status(0, state)}")
            time.sleep(0.1)
        s0 = lab.agent_status(0, state) or {}
    say(f"duplication on for voip: copies to s1 over {s0['duplication']['copies_to']['voip->s1']}, "
        "the far end keeps the first copy")
    rx = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 5060))
    rx.settimeout(1.0)
    got: list[int] = []
    stop = threading.Event()

    def receive() -> None:
        while True:
            try:
                got.append(int.from_bytes(rx.recv(2048)[:4], "big"))
            except (socket.timeout, TimeoutError):
                if stop.is_set():
                    return

    th = threading.Thread(target=receive)
    th.start()
    tx = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
    sent, start, cut = 0, time.monotonic(), None
    while time.monotonic() - start < 6.0:
        tx.sendto(sent.to_bytes(4, "big") + bytes(160), (lab.lan_addr(1), 5060))
        sent += 1
        el = time.monotonic() - start
        if cut is None and el >= 1.5:
            cut = time.monotonic()
            lab.set_loss(0, 0, 100)
            say("cut: s0 uplink u0 drops every packet again")
        if cut is not None and cut > 0 and time.monotonic() - cut >= 2.0:
            lab.set_loss(0, 0, 0)
            cut = -1.0
            say("restored s0 uplink u0")
        time.sleep(max(0.0, start + sent * 0.02 - time.monotonic()))
    stop.set()
    th.join(30)
    rx.close()
    tx.close()
    received = len(set(got))
    out = {"sent": sent, "received": received, "lost": sent - received, "duplicates": len(got) - received}
    if out["lost"] or out["duplicates"]:   # what each end did, for whoever reads the failure
        s0, s1 = lab.agent_status(0, state) or {}, lab.agent_status(1, state) or {}
        lost = sorted(set(range(sent)) - set(got))
        out["why"] = (f"lost sequence numbers {lost[:5]}..{lost[-5:]} (voice at 50/s; cut at 1.5 s for 2 s); "
                      f"s0 duplication {s0.get('duplication')}, routes {s0.get('routes')}; "
                      f"s1 duplication {s1.get('duplication')}\n{lab.agent_logs(30)}")
    return out


def failover_story(workdir: Path | str, *, tag: str = "demo", sites: int = 3, hold_s: float = HOLD_S,
                   say: Callable[[str], None] = lambda s: None, bfd_ms: int = 50,
                   duplication: bool = True) -> dict[str, Any]:
    """Build the lab with a site agent per site, steer voice and bulk from
    s0 to s1 by policy, cut the voice path's uplink, restore it, then (with
    ``duplication``) the same cut with voice duplicated; tear down. BFD runs
    at ``bfd_ms`` x 3. Returns what was measured."""
    workdir = Path(workdir)
    lab = Lab(tag, sites=sites, uplinks=2, state_dir=workdir)
    reader: _Events | None = None
    try:
        t_up = time.monotonic()
        lab.up(tunnels=False)
        state = lab.write_agent_state(story_mesh(sites, hold_s))
        lab.start_agents(state, backend="xdp", extra=["--bfd-ms", str(bfd_ms)])
        statuses = lab.wait_agents()
        paths = lab.mesh.paths("s0", "s1")
        ns0 = lab.site_ns(0)
        say(f"lab up in {time.monotonic() - t_up:.1f} s: {sites} sites x 2 uplinks, a site agent each, "
            f"{sum(len(st['paths']) for st in statuses.values())} wireguard-go tunnels, LAN hosts "
            f"{', '.join(lab.lan_addr(s) for s in range(sites))}")
        reader = _Events(state).start()
        events = reader.events
        # where voice and bulk are with every path up (where voice fails back to)
        deadline = time.monotonic() + 15
        placed: dict[str | None, str | None] = {}
        while time.monotonic() < deadline:
            placed = {e["policy"]: e["to_path"] for e in list(events)}
            if placed.get("voip") and placed.get("bulk"):
                break
            time.sleep(0.05)
        else:
            raise LabError(f"voip and bulk from s0 to s1 have no path: {list(events)}\n{lab.agent_logs()}")
        time.sleep(0.5)  # a move the last BFD Up caused, read
        placed = {e["policy"]: e["to_path"] for e in list(events)}
        voice_first, bulk_first = placed["voip"], placed["bulk"]
        say(f"BFD ({bfd_ms} ms x 3) Up on all {len(paths)} paths between s0 and s1; policies put voip on {voice_first} "
            f"and bulk on {bulk_first}")
        assert "s0.u0" in voice_first

        # the voice receiver and a TCP sink on lan1
        rx = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", 5060))
        rx.settimeout(0.5)
        arrivals: dict[int, float] = {}
        stop = threading.Event()

        def receive():
            while not stop.is_set():
                try:
                    data, _ = rx.recvfrom(2048)
                except (socket.timeout, TimeoutError):
                    continue
                arrivals.setdefault(int.from_bytes(data[:4], "big"), time.monotonic())

        srv = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("0.0.0.0", 8000))
        srv.listen()
        got = bytearray()

        def tcp_sink():
            c, _ = srv.accept()
            while chunk := c.recv(65536):
                got.extend(chunk)
            c.close()

        payload = os.urandom(4 << 20)

        def tcp_source():  # about 3 s of bulk traffic, paced
            c = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_STREAM)
            c.connect((lab.lan_addr(1), 8000))
            for off in range(0, len(payload), 64 << 10):
                c.sendall(payload[off:off + (64 << 10)])
                time.sleep(0.04)
            c.close()

        # everything that leaves s0 on a WAN uplink, captured for the encryption check
        caps = []
        for k in range(2):
            f = workdir / f"uplink{k}.pcap"
            caps.append((f, subprocess.Popen(["ip", "netns", "exec", ns0, "tcpdump", "-i", f"{lab.tag}u0x{k}", "-n",
                                              "-U", "--immediate-mode", "-s", "128", "-B", "8192", "-w", str(f), "ip"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(0.5)
        threads = [threading.Thread(target=f) for f in (receive, tcp_sink, tcp_source)]
        for th in threads:
            th.start()
        tx = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
        sent, t_cut, t_heal = 0, None, None
        start = time.monotonic()
        # 50 packets/s with sequence numbers, until 3.5 s after the heal
        while (time.monotonic() - start < 20.0) if t_heal is None else (time.monotonic() - t_heal < 3.5):
            tx.sendto(sent.to_bytes(4, "big") + bytes(160), (lab.lan_addr(1), 5060))
            sent += 1
            el = time.monotonic() - start
            # cut once voice is on its first path (a BFD flap on a loaded
            # machine may have moved it for the failback hold)
            voice_now = [e["to_path"] for e in list(events) if e["policy"] == "voip" and e["to_path"]]
            if t_cut is None and el >= 1.5 and voice_now and voice_now[-1] == voice_first:
                # stamped before the rule goes in: the cut is no earlier, so
                # detection is never measured short
                t_cut = time.monotonic()
                lab.set_loss(0, 0, 100)  # uplink u0 of s0 dies
                say("cut: s0 uplink u0 now drops every packet (the voice path's uplink)")
            if t_heal is None and t_cut is not None and time.monotonic() - t_cut >= 2.0:
                # stamped before the rule goes: the heal is no earlier, so the
                # hold before failback is never measured long
                t_heal = time.monotonic()
                lab.set_loss(0, 0, 0)
                say(f"restored s0 uplink u0; failback waits {hold_s:g} s of health")
            time.sleep(max(0.0, start + sent * 0.02 - time.monotonic()))
        if t_heal is None:
            raise LabError(f"voice never settled on {voice_first} for the cut in 20 s: {list(events)[-10:]}")
        # the failback: voice back on its first path after the hold (waited
        # for as the event it is; a loaded machine may take longer than the hold)
        deadline = time.monotonic() + hold_s + 30.0
        while time.monotonic() < deadline and not any(
                e["policy"] == "voip" and e["reason"] == "failback" and e["mono"] >= t_heal
                and e["to_path"] == voice_first for e in list(events)):
            time.sleep(0.05)
        time.sleep(0.5)  # the last packets of the transfer and the voice stream arrive
        stop.set()
        for th in threads:
            th.join(30)
        wan = []
        for f, cap in caps:
            cap.terminate()
            cap.wait(5)
            wan += subprocess.run(["tcpdump", "-r", str(f), "-n", "-q"], capture_output=True,
                                  text=True).stdout.splitlines()
        seqs = sorted(arrivals)
        times = [arrivals[s] for s in seqs]
        gaps = [b - a for a, b in zip(times, times[1:])]
        reader.stop()
        moves = [e for e in events if e["policy"] == "voip" and e["reason"] in ("bfd_down", "failback", "reroute")]
        rx.close()
        duplicated = duplication_phase(lab, state, hold_s, say, voice_first) if duplication else None
        logs = lab.agent_logs(40)   # what the agents said (a test that fails shows it)
        lab.stop_agents()  # each agent writes its last flow snapshot as it stops
        stats = _flow_stats(state)
        # the voice gap the cut made: the gap spanning it, or starting between
        # it and the move that answered it
        down = next((e for e in moves if e["reason"] == "bfd_down" and e["mono"] >= t_cut), None)
        end = down["mono"] if down else t_heal
        cut_gaps = [b - a for a, b in zip(times, times[1:]) if a <= t_cut <= b or t_cut <= a <= end]
        return {"sent": sent, "received": len(arrivals), "max_gap_ms": max(gaps) * 1e3, "arrivals": times,
                "cut_gap_ms": max(cut_gaps, default=0.0) * 1e3,
                "tcp_ok": bytes(got) == payload, "moves": moves, "t_cut": t_cut, "t_heal": t_heal,
                "voice_first": voice_first, "bulk_first": bulk_first, "events": list(events), "wan": wan,
                "stats": stats, "duplicated": duplicated, "logs": logs}
    finally:
        if reader is not None:
            reader.stop()
        lab.down()
