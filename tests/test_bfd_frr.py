"""patronus BFD against FRR's bfdd, a BFD implementation nobody here wrote,
in network namespaces the test creates: Up at 50 ms x 3, Down within 200 ms
of a cut on both sides, Up again after, timers changed by Poll/Final."""

from __future__ import annotations

import asyncio
import time

import pytest

from patronus.failover import BfdSession, State

from . import frr
from .netns import sh, unique, veth_pair

pytestmark = pytest.mark.skipif(frr.available() is not None, reason=str(frr.available()))

A, B = "10.96.0.1", "10.96.0.2"


@pytest.fixture
def lab():
    with veth_pair(unique("bf"), f"{A}/24", f"{B}/24") as v:
        with frr.bfdd(v["ns_b"], frr.peer_config(A, B, 50, 50, 3)) as d:
            yield v, d


def cut(v, how):
    if how == "nftables":  # every BFD packet into or out of the FRR side dropped
        sh("nft", "add table inet cut; add chain inet cut in { type filter hook input priority -300; }; "
           "add chain inet cut out { type filter hook output priority -300; }; "
           "add rule inet cut in udp dport 3784 drop; add rule inet cut out udp dport 3784 drop", ns=v["ns_b"])
    else:
        sh("ip", "link", "set", v["if_b"], "down", ns=v["ns_b"])


def heal(v, how):
    if how == "nftables":
        sh("nft", "delete table inet cut", ns=v["ns_b"])
    else:
        sh("ip", "link", "set", v["if_b"], "up", ns=v["ns_b"])


@pytest.mark.parametrize("how", ["nftables", "link"])
def test_up_down_within_200ms_and_up_again_with_frr(lab, how):
    v, d = lab

    async def main():
        s = BfdSession(local=A, peer=B, tx_ms=50, rx_ms=50, multiplier=3, netns=v["ns_a"])
        await s.start()
        try:
            await asyncio.wait_for(s.wait_for(State.UP), 10)
            await asyncio.sleep(0.5)  # both sides at the fast rate
            assert s.core.tx_interval() == 0.05 and s.core.detection_time() == pytest.approx(0.15)
            up_frr = await asyncio.to_thread(d.status, A)
            t0 = time.monotonic()
            await asyncio.to_thread(cut, v, how)
            t_cut = time.monotonic()
            down = await asyncio.wait_for(s.wait_for(State.DOWN), 2)
            detected_ms = (time.monotonic() - t_cut) * 1e3
            frr_down = await asyncio.to_thread(d.wait_status, A, "down", 2.0)
            await asyncio.to_thread(heal, v, how)
            await asyncio.wait_for(s.wait_for(State.UP), 10)
            frr_up = await asyncio.to_thread(d.wait_status, A, "up", 5.0)
            return up_frr, down, detected_ms, frr_down, frr_up, t_cut - t0
        finally:
            await s.stop()

    up_frr, down, detected_ms, frr_down, frr_up, cut_ms = asyncio.run(main())
    assert up_frr == "up"
    assert down.diag.name == "DETECT_EXPIRED"
    # 150 ms detection time; the guard leaves room for a loaded VM (the
    # distribution is benchmarks/test_bench_bfd.py's business)
    assert detected_ms < 400, detected_ms
    assert frr_down and frr_up


def test_timer_change_by_poll_final_is_accepted_by_frr(lab):
    v, d = lab

    async def main():
        s = BfdSession(local=A, peer=B, tx_ms=50, rx_ms=50, multiplier=3, netns=v["ns_a"])
        flaps = []
        s.on_change(flaps.append)
        await s.start()
        try:
            await asyncio.wait_for(s.wait_for(State.UP), 10)
            await asyncio.sleep(0.3)
            n = len(flaps)
            s.set_timers(tx_ms=200, rx_ms=300)
            assert s.poll_pending
            await asyncio.sleep(1.0)
            peer = await asyncio.to_thread(d.peer, A)
            return s.poll_pending, peer, flaps[n:], s.core.tx_interval(), s.core.detection_time()
        finally:
            await s.stop()

    polling, peer, flaps, tx, detect = asyncio.run(main())
    assert not polling                       # bfdd answered the Poll with a Final
    assert peer["status"] == "up" and flaps == []
    assert peer["remote-transmit-interval"] == 200 and peer["remote-receive-interval"] == 300
    assert tx == pytest.approx(0.2)          # max(our 200, bfdd's required 50)
    assert detect == pytest.approx(3 * 0.3)  # bfdd multiplier x max(our rx 300, its tx 50)


def test_the_bfd_command_prints_json_lines_per_state_change(lab):
    import json
    import subprocess
    import sys

    v, d = lab
    p = subprocess.run([sys.executable, "-m", "patronus.cli", "bfd", "--local", A, "--peer", B, "--tx-ms", "50",
                        "--rx-ms", "50", "--multiplier", "3", "--netns", v["ns_a"], "--duration", "2"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert [x["new"] for x in lines][:1] in (["UP"], ["INIT"]) and lines[-1]["new"] == "ADMIN_DOWN"
    assert any(x["new"] == "UP" for x in lines) and all(x["peer"] == B for x in lines)
    bad = subprocess.run([sys.executable, "-m", "patronus.cli", "bfd", "--local", A, "--peer", "not-an-ip"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "not an IP address" in bad.stderr
