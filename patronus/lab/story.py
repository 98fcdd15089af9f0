"""The failover story in the lab, used by ``patronus demo`` and the
end-to-end tests: policies steer a VoIP-like stream and a TCP transfer from
site s0 to s1 onto different paths, the voice path's uplink is cut, BFD
detects it, the engine moves voice, the link comes back, voice fails back
after the hold. Needs root, BCC and wireguard-go.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..netns import socket_in
from .net import Lab, LabError, _run

__all__ = ["failover_story", "HOLD_S"]

HOLD_S = 2.0
_ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{_ROOT}{os.pathsep}{path}" if path else str(_ROOT)}


def failover_story(workdir: Path | str, *, tag: str = "demo", sites: int = 3, hold_s: float = HOLD_S,
                   say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Build the lab, steer voice and bulk from s0 to s1 by policy, cut the
    voice path's uplink, restore it, tear down. Returns what was measured."""
    workdir = Path(workdir)
    lab = Lab(tag, sites=sites, uplinks=2, state_dir=workdir)
    procs = []
    try:
        t_up = time.monotonic()
        lab.up()
        say(f"lab up in {time.monotonic() - t_up:.1f} s: {sites} sites x 2 uplinks, {len(lab.wg)} wireguard-go "
            f"tunnels, LAN hosts {', '.join(lab.lan_addr(s) for s in range(sites))}")
        paths = lab.mesh.paths("s0", "s1")
        ns0, ns1 = lab.site_ns(0), lab.site_ns(1)
        lab.steer_tables(0, 1)
        back = next(p for p in paths if p.local_uplink == "u1" and p.remote_uplink == "u1")
        lab.force_path(back.id)  # the way back (TCP ACKs) and unmarked traffic: an uplink we do not cut
        sess = lambda s, o: [[p.id, lab.tunnels[(s, p.index)].local_v4.split("/")[0],  # noqa: E731
                              lab.tunnels[(s, p.index)].remote_v4] for p in paths]
        far = subprocess.Popen(["ip", "netns", "exec", ns1, sys.executable, "-m", "patronus.lab.agent",
                                "far", json.dumps({"sessions": sess("s1", "s0")})],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=_env())
        procs.append(far)
        near = subprocess.Popen(["ip", "netns", "exec", ns0, sys.executable, "-m", "patronus.lab.agent",
                                 "near", json.dumps({"lan_if": f"{lab.tag}l0", "site": "s0", "sites": sites, "uplinks": 2,
                                                     "sessions": sess("s0", "s1"), "hold_s": hold_s})],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=_env())
        procs.append(near)
        if not json.loads(far.stdout.readline())["ready"]:
            raise LabError("the far agent did not start")
        events = []
        ready = threading.Event()

        dump_box: dict[str, Any] = {}

        def read_events():
            for line in near.stdout:
                ev = json.loads(line)
                if ev.get("ready"):
                    ready.set()
                elif "flows" in ev:
                    dump_box["stats"] = ev
                else:
                    events.append(ev)

        threading.Thread(target=read_events, daemon=True).start()
        if not ready.wait(30):
            raise LabError("the near agent did not start (XDP and BCC needed)")
        deadline = time.monotonic() + 15
        while sum(1 for e in events if e["reason"] == "bfd_up") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        if sum(1 for e in events if e["reason"] == "bfd_up") < 4:
            raise LabError(f"BFD did not come up on every path: {events}")
        voice_first = next(e["to_path"] for e in events if e["policy"] == "voip" and e["reason"] == "initial")
        bulk_first = next(e["to_path"] for e in events if e["policy"] == "bulk" and e["reason"] == "initial")
        say(f"BFD (50 ms x 3) Up on all {len(paths)} paths between s0 and s1; policies put voip on {voice_first} "
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
                                              "-U", "--immediate-mode", "-w", str(f), "ip"],
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
        time.sleep(hold_s + 1.5)
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
        moves = [e for e in events if e["policy"] == "voip" and e["reason"] in ("bfd_down", "failback", "reroute")]
        near.stdin.write("dump\n")
        near.stdin.flush()
        stats = None
        deadline = time.monotonic() + 5
        while stats is None and time.monotonic() < deadline:
            stats = dump_box.get("stats")
            time.sleep(0.05)
        # the voice gap the cut made: the gap spanning it, or starting between
        # it and the move that answered it
        down = next((e for e in moves if e["reason"] == "bfd_down" and e["mono"] >= t_cut), None)
        end = down["mono"] if down else t_heal
        cut_gaps = [b - a for a, b in zip(times, times[1:]) if a <= t_cut <= b or t_cut <= a <= end]
        return {"sent": sent, "received": len(arrivals), "max_gap_ms": max(gaps) * 1e3, "arrivals": times,
                "cut_gap_ms": max(cut_gaps, default=0.0) * 1e3,
                "tcp_ok": bytes(got) == payload, "moves": moves, "t_cut": t_cut, "t_heal": t_heal,
                "voice_first": voice_first, "bulk_first": bulk_first, "events": list(events), "wan": wan,
                "stats": stats}
    finally:
        for p in procs:
            try:
                p.stdin.write("stop\n")
                p.stdin.flush()
                p.wait(10)
            except Exception:
                p.kill()
        lab.down()
