"""End to end in the lab: policies steer voice and bulk into different
paths; the voice path's uplink is cut; BFD (50 ms x 3) detects it, the
engine moves voice with one set_path and the receiver's largest sequence gap
stays under 200 ms; the TCP transfer completes intact; voice fails back
after the hold and not before."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from patronus.lab.net import Lab, _run
from patronus.netns import socket_in

from .netns import unique

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                reason="needs root and wireguard-go")
HOLD_S = 2.0


def agent(ns, role, cfg):
    p = subprocess.Popen([sys.executable, str(ROOT / "tests/live/site_agent.py"), role, json.dumps(cfg)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=None)
    return p


def run_failover(tmp_path) -> dict:
    lab = Lab(unique("E")[:6], sites=2, uplinks=2, state_dir=tmp_path)
    procs = []
    try:
        lab.up()
        paths = lab.mesh.paths("s0", "s1")
        ns0, ns1 = lab.site_ns(0), lab.site_ns(1)
        for p in paths:
            t0_, t1_ = lab.tunnels[("s0", p.index)], lab.tunnels[("s1", p.index)]
            _run("ip", "route", "add", "10.2.0.0/24", "dev", t0_.ifname, "table", str(200 + p.index), ns=ns0)
            _run("ip", "rule", "add", "fwmark", hex(0x7000 + p.index), "lookup", str(200 + p.index),
                 "priority", str(500 + p.index), ns=ns0)
        back = next(p for p in paths if p.local_uplink == "u1" and p.remote_uplink == "u1")
        lab.force_path(back.id)  # the way back (TCP ACKs) and unmarked traffic: an uplink we do not cut
        sess = lambda s, o: [[p.id, lab.tunnels[(s, p.index)].local_v4.split("/")[0],  # noqa: E731
                              lab.tunnels[(s, p.index)].remote_v4] for p in paths]
        far = subprocess.Popen(["ip", "netns", "exec", ns1, sys.executable, str(ROOT / "tests/live/site_agent.py"),
                                "far", json.dumps({"sessions": sess("s1", "s0")})],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(far)
        near = subprocess.Popen(["ip", "netns", "exec", ns0, sys.executable, str(ROOT / "tests/live/site_agent.py"),
                                 "near", json.dumps({"lan_if": f"{lab.tag}l0", "site": "s0", "sites": 2, "uplinks": 2,
                                                     "sessions": sess("s0", "s1"), "hold_s": HOLD_S})],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(near)
        assert json.loads(far.stdout.readline())["ready"]
        events = []
        ready = threading.Event()

        def read_events():
            for line in near.stdout:
                ev = json.loads(line)
                if ev.get("ready"):
                    ready.set()
                    continue
                events.append(ev)

        threading.Thread(target=read_events, daemon=True).start()
        assert ready.wait(30)
        deadline = time.monotonic() + 15
        while sum(1 for e in events if e["reason"] == "bfd_up") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(1 for e in events if e["reason"] == "bfd_up") == 4, events
        voice_first = next(e["to_path"] for e in events if e["policy"] == "voip" and e["reason"] == "initial")
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
            f = tmp_path / f"uplink{k}.pcap"
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
        while time.monotonic() - start < 7.0:  # 50 packets/s with sequence numbers
            tx.sendto(sent.to_bytes(4, "big") + bytes(160), (lab.lan_addr(1), 5060))
            sent += 1
            el = time.monotonic() - start
            if t_cut is None and el >= 1.5:
                lab.set_loss(0, 0, 100)  # uplink u0 of s0 dies
                t_cut = time.monotonic()
            if t_heal is None and el >= 3.5:
                lab.set_loss(0, 0, 0)
                t_heal = time.monotonic()
            time.sleep(max(0.0, start + sent * 0.02 - time.monotonic()))
        time.sleep(HOLD_S + 1.5)
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
        return {"sent": sent, "received": len(arrivals), "max_gap_ms": max(gaps) * 1e3,
                "tcp_ok": bytes(got) == payload, "moves": moves, "t_cut": t_cut, "t_heal": t_heal,
                "voice_first": voice_first, "events": events, "wan": wan}
    finally:
        for p in procs:
            try:
                p.stdin.write("stop\n")
                p.stdin.flush()
                p.wait(10)
            except Exception:
                p.kill()
        lab.down()


def test_voice_fails_over_in_under_200ms_and_fails_back_after_the_hold(tmp_path):
    try:
        from patronus.dataplane.xdp import _preflight

        _preflight()
    except Exception as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"XDP unavailable: {e}")
    r = run_failover(tmp_path)
    assert r["tcp_ok"], "the TCP transfer did not survive intact"
    down = next(m for m in r["moves"] if m["reason"] == "bfd_down")
    assert down["from_path"] == r["voice_first"] and "s0.u1" in down["to_path"]
    detect_ms = (down["mono"] - r["t_cut"]) * 1e3
    assert detect_ms < 200, detect_ms
    # the gap is the detection plus up to two voice intervals (the last packet
    # before the cut, the first after the move); benchmarks/test_bench_e2e.py
    # measures its distribution over 20 runs against the 200 ms goal (p95 195
    # ms, max 199 ms here), this single run guards against regressions
    assert r["max_gap_ms"] < detect_ms + 70 and r["max_gap_ms"] < 250, (r["max_gap_ms"], detect_ms)
    # no packet left the site unencrypted: on the WAN uplinks only WireGuard
    # (UDP between the uplink addresses, ports 51820 + path), and plenty of it
    assert len(r["wan"]) > 1000
    wg = re.compile(r"^\S+ IP 172\.(16|17)\.0\.2\.518\d\d > 172\.(16|17)\.1\.2\.518\d\d: UDP|"
                    r"^\S+ IP 172\.(16|17)\.1\.2\.518\d\d > 172\.(16|17)\.0\.2\.518\d\d: UDP")
    assert [line for line in r["wan"] if not wg.match(line)] == []
    back = [m for m in r["moves"] if m["reason"] == "failback"]
    assert back and back[0]["to_path"] == r["voice_first"]
    assert back[0]["mono"] - r["t_heal"] >= HOLD_S  # not before the hold
