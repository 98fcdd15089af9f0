"""Hitless voice: a duplicating policy's packets go over two paths at once
(the tc steering program clones each one to the second path's tunnel) and
the far end keeps the first copy (bpf/patronus_dedup.c on its tunnels). In
the real lab (2 sites x 2 uplinks, wireguard-go): a voice stream while the
primary uplink is cut and restored 5 times loses nothing and delivers
nothing twice; the same run without duplication loses packets. Counters
prove the copies went out on the second tunnel, and only for that policy."""

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
from typing import Any

import pytest

from patronus.lab.net import Lab
from patronus.netns import socket_in

from .netns import Capture, require_xdp, unique

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                reason="needs root and wireguard-go")

PPS = 200          # voice packets a second (a 5 ms packetisation; G.711 sends 50)
CUTS = 5
CUT_S, HEAL_S = 0.4, 0.4


class Helper:
    """A line-oriented helper script in a namespace (tests/live/)."""

    def __init__(self, ns: str, script: str, *args: str) -> None:
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(ROOT / "tests/live" / script), *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.p.stdout.readline().strip() if self.p.stdout else ""
        assert line == "ready", f"{script} did not start: {line!r}"

    def ask(self, line: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> None:
        try:
            self.ask("close")
            self.p.wait(10)
        except Exception:
            self.p.kill()
            self.p.wait()


def stream(lab: Lab, seconds: float, cut: Any) -> tuple[int, list[int]]:
    """Voice from s0's LAN to s1's for ``seconds`` (sequence numbers), while
    ``cut`` runs in a thread; what was sent and each number received."""
    rx = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 5060))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    tx = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
    got: list[int] = []
    done = threading.Event()

    def receive() -> None:
        rx.settimeout(0.5)
        while True:
            try:
                got.append(int.from_bytes(rx.recv(2048)[:4], "big"))
            except (socket.timeout, TimeoutError):
                if done.is_set():
                    return

    r = threading.Thread(target=receive)
    r.start()
    c = threading.Thread(target=cut)
    c.start()
    sent, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        tx.sendto(sent.to_bytes(4, "big") + bytes(156), (lab.lan_addr(1), 5060))
        sent += 1
        time.sleep(max(0.0, t0 + sent / PPS - time.monotonic()))
    c.join()
    done.set()
    r.join(30)
    rx.close()
    tx.close()
    return sent, got


def test_duplicated_voice_loses_nothing_through_five_cuts_and_delivers_nothing_twice(tmp_path: Path) -> None:
    require_xdp()
    lab = Lab(unique("D")[:6], sites=2, uplinks=2, state_dir=tmp_path)
    steer = dedup = None
    caps: list[Capture] = []
    try:
        lab.up()
        paths = lab.mesh.paths("s0", "s1")
        primary = next(p for p in paths if p.local_uplink == "u0" and p.remote_uplink == "u0")
        second = next(p for p in paths if p.local_uplink == "u1" and p.remote_uplink == "u1")
        lab.steer_tables(0, 1)
        lab.force_path(primary.id)
        steer = Helper(lab.site_ns(0), "steer_agent.py", f"{lab.tag}l0",
                       json.dumps({"voip": primary.index, "bulk": primary.index}))
        dedup = Helper(lab.site_ns(1), "dedup_agent.py",
                       lab.tunnels[("s1", primary.index)].ifname, lab.tunnels[("s1", second.index)].ifname)
        second_if = lab.tunnels[("s0", second.index)].ifname

        def tx(p: Any) -> int:
            (peer,) = lab.wg[lab.tunnels[("s0", p.index)].ifname].uapi.get().peers.values()
            return int(peer.tx_bytes)

        def cuts() -> None:
            time.sleep(0.5)
            for _ in range(CUTS):
                lab.set_loss(0, 0, 100)   # the primary uplink: everything in and out dropped
                time.sleep(CUT_S)
                lab.set_loss(0, 0, 0)
                time.sleep(HEAL_S)

        seconds = 0.5 + CUTS * (CUT_S + HEAL_S) + 0.5
        # -- duplication on --------------------------------------------------------------------
        assert steer.ask(f"dup voip {second_if}") == "ok"
        before = {p.index: tx(p) for p in (primary, second)}
        # what enters each of s0's two tunnels (the inner traffic), voice and bulk
        caps += [Capture(lab.site_ns(0), lab.tunnels[("s0", p.index)].ifname, tmp_path / f"s0-{p.index}.pcap",
                        "udp dst port 5060 or tcp dst port 8000") for p in (primary, second)]
        for c in caps:
            c.__enter__()
        sent, got = stream(lab, seconds, cuts)
        after = {p.index: tx(p) for p in (primary, second)}
        lost = sent - len(set(got))
        twice = len(got) - len(set(got))
        d = json.loads(dedup.ask("stats"))
        print(f"\nduplicated voice: {sent} sent, {len(set(got))} received, {lost} lost, "
              f"{twice} duplicates delivered ({CUTS} cuts of {CUT_S * 1000:.0f} ms); far end: {d}")
        assert lost == 0 and twice == 0 and sorted(got) == list(range(sent)), [
            s for s in set(got) if got.count(s) > 1]
        c = json.loads(steer.ask("dump"))
        assert c["duplicates"] == {"voip": {"sent": sent, "refused": 0}}   # every voice packet, nothing else
        # the copies went out on the second tunnel (WireGuard adds 32 bytes + padding to each 188-byte packet)
        assert after[second.index] - before[second.index] >= sent * 188
        assert d["duplicates_dropped"] > 0 and d["duplicates_dropped"] + d["first_copies"] >= sent, d
        # bulk (another policy) on the same primary path is not copied
        bulk_before = tx(second)
        cli = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_STREAM)
        srv = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("0.0.0.0", 8000))
        srv.listen()
        cli.connect((lab.lan_addr(1), 8000))
        conn, _ = srv.accept()
        payload = os.urandom(256 << 10)
        cli.sendall(payload)
        cli.close()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
        srv.close()
        assert data == payload
        assert tx(second) - bulk_before < len(payload) // 10, "bulk traffic was copied to the second path"
        assert "bulk" not in json.loads(steer.ask("dump"))["duplicates"]
        # the captures: every voice packet went out on both uplinks' tunnels, bulk only on the primary
        on_primary, on_second = caps[0].wait_for(sent + 1), caps[1].wait_for(sent)
        for c in caps:
            c.__exit__()
        assert sum(".5060: UDP" in x or ".5060: SIP" in x for x in on_primary) == sent, on_primary[:3]
        assert sum(".5060: UDP" in x or ".5060: SIP" in x for x in on_second) == sent, on_second[:3]
        assert any(".8000: Flags" in x for x in on_primary)
        assert not any(".8000: Flags" in x for x in on_second), [x for x in on_second if ".8000" in x][:3]

        # -- duplication off: the same cuts lose packets ----------------------------------------
        assert steer.ask("dup voip -") == "ok"
        sent_off, got_off = stream(lab, seconds, cuts)
        lost_off = sent_off - len(set(got_off))
        print(f"without duplication: {sent_off} sent, {len(set(got_off))} received, {lost_off} lost")
        assert lost_off > 0
    finally:
        for c in caps:
            c.__exit__()
        for h in (steer, dedup):
            if h is not None:
                h.close()
        lab.down()
