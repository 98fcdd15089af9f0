"""`patronus demo` runs and tells its story: the offline parts everywhere,
the live failover story in the lab where root, BCC and wireguard-go are."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from patronus import Mesh


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo") / "demo.db"
    out = subprocess.run([sys.executable, "-m", "patronus.cli", "demo", "--state", str(state)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout, state


def test_demo(demo):
    out, state = demo
    assert "3 sites, 8 paths" in out
    assert "SIP INVITE hq->br1 udp/5060    -> voip" in out
    assert "truncated frame" in out and "identical" in out
    assert len(Mesh.load(state).sites) == 3


def test_demo_shows_flows_and_failover_write(demo):
    out, _ = demo
    voip = next(line for line in out.splitlines() if "10.2.0.20:5060" in line)
    assert "voip" in voip and "path #2" in voip and "4 pkts" in voip
    assert "'trunc_ip': 3" in out


def test_demo_live_failover_story(demo):
    out, _ = demo
    if "cannot run here" in out:
        if os.geteuid() == 0 and os.environ.get("CI"):
            pytest.fail("CI installs everything the live story needs: " + out.split("7. ")[-1][:300])
        pytest.skip("the live story needs root, BCC and wireguard-go")
    assert "24 wireguard-go tunnels" in out and "arrived intact" in out and "all WireGuard: yes" in out
    gap = float(re.search(r"largest gap the voice receiver saw: (\d+) ms", out).group(1))
    detect = float(re.search(r"detection: (\d+) ms after the cut", out).group(1))
    assert detect < 200 and gap < detect + 70
    assert re.search(r"bfd_down\s+voip\s+s0\.u0~s1\.u0\s+-> s0\.u1", out)
    assert re.search(r"failback\s+voip\s+s0\.u1~s1\.u\d\s+-> s0\.u0~s1\.u0", out)
    assert "lab torn down" in out


def test_simulated_story_without_a_network():
    """What the demo shows where it cannot build the lab: the same story on the
    userspace data plane with simulated paths and BFD."""
    from patronus.demo import _simulated_story

    lines: list[str] = []
    assert _simulated_story(lines.append) == 0
    out = "\n".join(lines)
    gap = float(re.search(r"largest voice gap (\d+) ms", out).group(1))
    assert 150 <= gap < 200
    assert re.search(r"1\.66 s bfd_down\s+voip\s+br1\.isp1~hq\.isp1 -> br1\.isp1~hq\.lte", out)
    assert re.search(r"failback\s+voip\s+br1\.isp1~hq\.lte -> br1\.isp1~hq\.isp1", out)
    assert "flow of voip   : 350 packets" in out
