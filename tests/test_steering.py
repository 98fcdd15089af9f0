"""Policies steer real traffic into paths: XDP classifies on the site's LAN
interface and writes the path into the packet metadata, tc turns it into
skb->mark, `ip rule fwmark` picks the path's table and tunnel. Proved by the
per-tunnel WireGuard counters; a set_path moves the traffic."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from patronus.lab.net import Lab
from patronus.netns import socket_in

from .netns import Capture, require_xdp, unique

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                reason="needs root and wireguard-go")


def test_voice_and_bulk_take_their_policies_paths_and_set_path_moves_voice(tmp_path):
    require_xdp()
    lab = Lab(unique("S")[:6], sites=2, uplinks=2, state_dir=tmp_path)
    agent = None
    try:
        lab.up()
        paths = lab.mesh.paths("s0", "s1")
        voice_path = next(p for p in paths if p.local_uplink == "u0")
        bulk_path = next(p for p in paths if p.local_uplink == "u1")
        ns0 = lab.site_ns(0)
        lab.steer_tables(0, 1)  # a table per path, chosen by its steering mark
        lab.force_path(paths[0].id)  # unmarked traffic and the way back
        agent = subprocess.Popen(
            ["ip", "netns", "exec", ns0, sys.executable, str(ROOT / "tests/live/steer_agent.py"), f"{lab.tag}l0",
             json.dumps({"voip": voice_path.index, "bulk": bulk_path.index})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert agent.stdout.readline().strip() == "ready"

        def tx(p):
            (peer,) = lab.wg[lab.tunnels[("s0", p.index)].ifname].uapi.get().peers.values()
            return peer.tx_bytes

        # a TCP sink and a UDP sink on the far LAN host
        tcp_srv = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_STREAM)
        tcp_srv.bind(("0.0.0.0", 8000))
        tcp_srv.listen()
        got = {"tcp": b"", "udp": 0}

        def tcp_sink():
            c, _ = tcp_srv.accept()
            while chunk := c.recv(65536):
                got["tcp"] += chunk
            c.close()

        th = threading.Thread(target=tcp_sink)
        th.start()
        udp_rx = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
        udp_rx.bind(("0.0.0.0", 5060))
        udp_rx.settimeout(0.5)
        udp_rx.setsockopt(socket.IPPROTO_IP, 13, 1)  # IP_RECVTOS: the TOS byte with each datagram
        before = {p.index: tx(p) for p in paths}
        payload = os.urandom(1 << 20)
        cli = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_STREAM)
        cli.connect((lab.lan_addr(1), 8000))
        cli.sendall(payload)
        cli.close()
        th.join(20)
        voice = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
        # the tunnel's inner traffic, captured where it leaves the tunnel at the far end (XDP redirects
        # into the near end's tun device past the stack, where tcpdump would not see it)
        with Capture(lab.site_ns(1), lab.tunnels[("s1", voice_path.index)].ifname, tmp_path / "voice.pcap",
                     "udp dst port 5060") as capture:
            for i in range(100):
                voice.sendto(i.to_bytes(4, "big") + bytes(160), (lab.lan_addr(1), 5060))
            n, tos = 0, set()
            try:
                while n < 100:
                    _, anc, _, _ = udp_rx.recvmsg(2048, 64)
                    tos |= {c[2][0] for c in anc if c[0] == socket.IPPROTO_IP and c[1] == 1}  # IP_TOS
                    n += 1
            except socket.timeout:
                pass
            inner = capture.wait_for(100)
        assert tos == {46 << 2}  # the voice policy's QoS DSCP (EF), written by the tc program
        assert len(inner) == 100 and all("tos 0xb8" in line for line in inner), inner[:3]
        mid = {p.index: tx(p) for p in paths}
        assert got["tcp"] == payload and n >= 98
        assert mid[bulk_path.index] - before[bulk_path.index] > len(payload)       # the bulk transfer
        assert 100 * 164 < mid[voice_path.index] - before[voice_path.index] < len(payload) // 4  # the voice only
        # move voice to the bulk path: one map write
        agent.stdin.write(f"path voip {bulk_path.index}\n")
        agent.stdin.flush()
        assert agent.stdout.readline().strip() == "ok"
        for i in range(100):
            voice.sendto(i.to_bytes(4, "big") + bytes(160), (lab.lan_addr(1), 5060))
        time.sleep(0.5)
        after = {p.index: tx(p) for p in paths}
        assert after[bulk_path.index] - mid[bulk_path.index] > 100 * 164
        assert after[voice_path.index] - mid[voice_path.index] < 100 * 164 // 4  # keepalives at most
        agent.stdin.write("dump\n")
        agent.stdin.flush()
        c = json.loads(agent.stdout.readline())
        assert c["policies"]["voip"]["packets"] >= 200 and c["policies"]["bulk"]["packets"] > 500
        # a UDP flood at the 1 Mbit/s policy for 5 s: the far end gets the rate (plus one 50 ms burst)
        # within 10 %, and every packet the XDP policer dropped is counted
        agent.stdin.write("path capped %d\n" % bulk_path.index)
        agent.stdin.flush()
        assert agent.stdout.readline().strip() == "ok"
        sink = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("0.0.0.0", 6000))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        received = 0

        def drain_sink():
            nonlocal received
            sink.settimeout(1.0)
            try:
                while True:
                    received += len(sink.recv(4096)) > 0
            except (socket.timeout, TimeoutError):
                pass

        th = threading.Thread(target=drain_sink)
        th.start()
        flood = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
        sent, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 5.0:
            for _ in range(20):
                flood.sendto(bytes(972), (lab.lan_addr(1), 6000))   # 1,000 bytes of IP each
            sent += 20
            time.sleep(0.001)
        elapsed = time.monotonic() - t0
        th.join(30)
        want = 1_000_000 / 8 * (elapsed + 0.05) / 1000   # packets of 1,000 bytes at the rate, plus the burst
        assert abs(received - want) <= 0.1 * want, (received, want, sent)
        agent.stdin.write("dump\n")
        agent.stdin.flush()
        c = json.loads(agent.stdout.readline())
        assert c["qos_dropped"]["capped"] == {"packets": sent - received, "bytes": (sent - received) * 1000}
        assert c["policies"]["capped"]["packets"] == sent
        for s_ in (tcp_srv, udp_rx, voice, sink, flood):
            s_.close()
    finally:
        if agent is not None:
            try:
                agent.stdin.write("close\n")
                agent.stdin.flush()
                agent.wait(10)
            except Exception:
                agent.kill()
        lab.down()


def test_the_userspace_backend_steers_with_nftables_marks_and_applies_qos(tmp_path):
    """Without XDP: nftables rules mark each policy's packets with its path,
    rewrite DSCP and police a rate limit; set_path replaces one rule."""
    from patronus import Match, Policy, PolicyTable, QoS
    from patronus.dataplane.nft import NftSteering

    lab = Lab(unique("N")[:6], sites=2, uplinks=2, state_dir=tmp_path)
    try:
        lab.up()
        paths = lab.mesh.paths("s0", "s1")
        a = next(p for p in paths if p.local_uplink == "u0")
        b = next(p for p in paths if p.local_uplink == "u1")
        ns0 = lab.site_ns(0)
        lab.steer_tables(0, 1)
        lab.force_path(b.id)
        table = PolicyTable([Policy("voip", Match(proto="udp", dst_ports=5060), priority=1, qos=QoS(dscp=46)),
                             Policy("capped", Match(proto="udp", dst_ports=6000), priority=2,
                                    qos=QoS(rate_kbps=64))])
        nft = NftSteering(table, f"{lab.tag}l0", netns=ns0)
        nft.set_path("voip", a.index)
        nft.set_path("capped", b.index)

        def tx(p):
            (peer,) = lab.wg[lab.tunnels[("s0", p.index)].ifname].uapi.get().peers.values()
            return peer.tx_bytes

        rx = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", 5060))
        rx.settimeout(0.5)
        rx.setsockopt(socket.IPPROTO_IP, 13, 1)
        cap = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
        cap.bind(("0.0.0.0", 6000))
        cap.settimeout(0.5)
        out = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
        before = {p.index: tx(p) for p in (a, b)}
        with Capture(ns0, lab.tunnels[("s0", a.index)].ifname, tmp_path / "voice.pcap", "udp dst port 5060") as capture:
            for i in range(50):
                out.sendto(bytes(200), (lab.lan_addr(1), 5060))
            tos = set()
            n = 0
            try:
                while n < 50:
                    _, anc, _, _ = rx.recvmsg(2048, 64)
                    tos |= {c[2][0] for c in anc if c[0] == socket.IPPROTO_IP and c[1] == 1}
                    n += 1
            except (socket.timeout, TimeoutError):
                pass
            inner = capture.wait_for(50)   # the tunnel's inner traffic: rewritten before it entered the tunnel
        mid = {p.index: tx(p) for p in (a, b)}
        assert n == 50 and tos == {46 << 2}
        assert len(inner) == 50 and all("tos 0xb8" in line for line in inner), inner[:3]
        assert mid[a.index] - before[a.index] > 50 * 200 and mid[b.index] - before[b.index] < 50 * 200 // 4
        # 1 MB in a burst at a 64 kbit/s (8 kB/s) policer: the excess is dropped
        for _ in range(1000):
            out.sendto(bytes(1000), (lab.lan_addr(1), 6000))
        got = 0
        try:
            while True:
                got += len(cap.recv(4096))
        except (socket.timeout, TimeoutError):
            pass
        assert 0 < got < 100_000, got  # the burst allowance plus about a second of 8 kB/s
        # every packet the policer dropped is counted, by policy (1,028 bytes of IP each)
        assert nft.qos_drops() == {"capped": {"packets": 1000 - got // 1000, "bytes": (1000 - got // 1000) * 1028}}
        nft.set_path("voip", b.index)  # one rule replaced
        for i in range(50):
            out.sendto(bytes(200), (lab.lan_addr(1), 5060))
        time.sleep(0.3)
        after = {p.index: tx(p) for p in (a, b)}
        assert after[b.index] - mid[b.index] > 50 * 200 and after[a.index] - mid[a.index] < 50 * 200 // 4
        nft.close()
        for s_ in (rx, cap, out):
            s_.close()
    finally:
        lab.down()
