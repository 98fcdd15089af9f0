"""`patronus demo` runs and tells its story."""

from __future__ import annotations

import subprocess
import sys

from patronus import Mesh


def test_demo(tmp_path):
    state = tmp_path / "demo.db"
    out = subprocess.run([sys.executable, "-m", "patronus.cli", "demo", "--state", str(state)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert "3 sites, 8 paths" in out
    assert "SIP INVITE hq->br1 udp/5060    -> voip" in out
    assert "truncated frame" in out and "identical" in out
    assert len(Mesh.load(state).sites) == 3


def test_demo_shows_flows_and_failover_write(tmp_path):
    out = subprocess.run([sys.executable, "-m", "patronus.cli", "demo", "--state", str(tmp_path / "d.db")],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    voip = next(line for line in out.splitlines() if "10.2.0.20:5060" in line)
    assert "voip" in voip and "path #2" in voip and "4 pkts" in voip
    assert "'trunc_ip': 3" in out
