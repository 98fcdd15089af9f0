"""End to end in the lab: policies steer voice and bulk into different
paths; the voice path's uplink is cut; BFD (50 ms x 3) detects it, the
engine moves voice with one set_path and the receiver's largest sequence gap
stays small; the TCP transfer completes intact; nothing leaves the site
unencrypted; voice fails back after the hold and not before."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from patronus.lab.story import HOLD_S, failover_story

from .netns import require_xdp, unique

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                reason="needs root and wireguard-go")


def run_failover(tmp_path, sites: int = 2) -> dict:
    return failover_story(tmp_path, tag=unique("E")[:6], sites=sites)


# BFD at 50 ms x 3 detects a silent path in 150 ms; the guard leaves room for
# a loaded 2-core VM (the agent's loop, nftables applying the cut). The
# distribution against the 200 ms goal is benchmarks/test_bench_e2e.py's job
# (p95 195 ms, max 199 ms over 20 runs here), not a pass/fail margin.
DETECT_GUARD_MS = 400


def test_voice_fails_over_on_bfd_detection_and_fails_back_after_the_hold(tmp_path):
    require_xdp()
    r = run_failover(tmp_path)
    assert r["tcp_ok"], "the TCP transfer did not survive intact"
    # the move the cut caused: the first bfd_down after it (BFD at 50 ms may
    # flap once before the cut on a loaded machine; the engine handles that,
    # the test must not take that move for this one), from where voice was
    carrying = r["voice_first"]
    for m in r["moves"]:
        if m["mono"] < r["t_cut"]:
            carrying = m["to_path"]
    down = next((m for m in r["moves"] if m["reason"] == "bfd_down" and m["mono"] >= r["t_cut"]), None)
    assert down is not None, f"no bfd_down move of voip after the cut; its moves: {r['moves']}\n{r['logs']}"
    assert "s0.u0" in carrying and down["from_path"] == carrying and "s0.u1" in down["to_path"], (carrying, down)
    detect_ms = (down["mono"] - r["t_cut"]) * 1e3
    assert 0 < detect_ms < DETECT_GUARD_MS, detect_ms
    # the voice gap the cut made (the one spanning it) is the detection plus
    # up to two voice intervals (the last packet before the cut, the first
    # after the move), and the sender's own delays
    assert r["cut_gap_ms"] < detect_ms + 150, (r["cut_gap_ms"], detect_ms, r["logs"])
    # no packet left the site unencrypted: on the WAN uplinks only WireGuard
    # (UDP between the uplink addresses, ports 51820 + path), and plenty of it
    assert len(r["wan"]) > 1000
    wg = re.compile(r"^\S+ IP 172\.(16|17)\.0\.2\.518\d\d > 172\.(16|17)\.1\.2\.518\d\d: UDP|"
                    r"^\S+ IP 172\.(16|17)\.1\.2\.518\d\d > 172\.(16|17)\.0\.2\.518\d\d: UDP")
    assert [line for line in r["wan"] if not wg.match(line)] == []
    back = [m for m in r["moves"] if m["reason"] == "failback" and m["mono"] >= r["t_heal"]]
    assert back and back[0]["to_path"] == r["voice_first"]
    # then duplication on for voice (the agents take it from the desired state, live), the same cut:
    # nothing lost, nothing delivered twice
    d = r["duplicated"]
    assert d["sent"] > 250 and d["lost"] == 0 and d["duplicates"] == 0, d
    assert back[0]["mono"] - r["t_heal"] >= HOLD_S  # not before the hold
