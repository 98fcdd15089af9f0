"""`patronus demo` runs and tells its story: the offline parts everywhere,
the live failover story in the lab where root, BCC and wireguard-go are;
`patronus lab up --agents | status | down`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from patronus import load_mesh


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo") / "demo.db"
    out = subprocess.run([sys.executable, "-m", "patronus.cli", "demo", "--state", str(state)],
                         capture_output=True, text=True, timeout=120)
    # the story's own error ends stderr (after the agents' logs): keep enough of both to read it
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-8000:]
    return out.stdout, state


def test_demo(demo):
    out, state = demo
    assert "3 sites, 8 paths" in out
    assert "SIP INVITE hq->br1 udp/5060    -> voip" in out
    assert "truncated frame" in out and "identical" in out
    assert len(load_mesh(state).sites) == 3


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
    gap = float(re.search(r"largest gap the voice receiver saw across the cut: (\d+) ms", out).group(1))
    detect = float(re.search(r"detection: (\d+) ms after the cut", out).group(1))
    # 150 ms of BFD detection; loose guards for a loaded VM (tests/test_e2e.py)
    assert 0 < detect < 400 and gap < detect + 150
    assert re.search(r"bfd_down\s+voip\s+s0\.u0~s1\.u0\s+-> s0\.u1", out)
    assert re.search(r"failback\s+voip\s+s0\.u1~s1\.u\d\s+-> s0\.u0~s1\.u0", out)
    # the same cut with duplication on for voice: nothing lost, nothing twice
    dup = re.search(r"duplicated voice: (\d+) sent, (\d+) received, (\d+) lost, (\d+) duplicates delivered", out)
    assert dup and int(dup.group(1)) == int(dup.group(2)) > 250 and dup.group(3) == dup.group(4) == "0", out[-2000:]
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


def test_lab_status_of_no_lab(tmp_path):
    env = {**os.environ, "PATRONUS_LAB_DIR": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "patronus.cli", "lab", "status", "--tag", "nolab", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=60)
    assert run().stdout.strip() == "no such lab"
    assert run("--json").stdout.strip() == '{\n  "exists": false\n}'


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"), reason="needs root and wireguard-go")
def test_lab_up_with_agents_status_down(tmp_path):
    """`patronus lab up --agents`: the network only, an agent per site (its
    own tunnels), back once every path's BFD is up; the agents outlive the
    command; `lab status` shows them, `lab down` stops them and leaves nothing."""
    from .netns import unique

    tag = unique("Q")[:6]
    env = {**os.environ, "PATRONUS_LAB_DIR": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "patronus.cli", "lab", *a, "--tag", tag],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=240)
    agents: dict = {}
    try:
        up = run("up", "--agents", "--sites", "2", "--uplinks", "2", "--backend", "userspace")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "2 agents ready" in up.stdout and "BFD up on 8 tunnels" in up.stdout
        st = json.loads(run("status", "--json").stdout)
        agents = st["agents"]
        assert sorted(agents) == ["s0", "s1"] and all(a["alive"] for a in agents.values())
        for site, a in agents.items():
            assert a["status"]["ready"] and "Userspace" in a["status"]["backend"]
            assert len(a["status"]["paths"]) == 4 and all(p["bfd"] == "up" for p in a["status"]["paths"].values())
            assert f"site {site} started" in open(a["log"]).read()
        assert len(st["tunnels"]) == 8 and all(isinstance(t, dict) for t in st["tunnels"].values())
        table = run("status").stdout
        assert re.search(r"agent s0: pid \d+ running, backend Userspace, ready", table), table
        assert re.search(r"s0\.u0~s1\.u0\s+up\s+" + tag + r"a0t0", table), table
        again = run("up", "--agents")
        assert again.returncode == 2 and "exists already" in again.stderr
    finally:
        down = run("down")
    assert down.returncode == 0 and "removed" in down.stdout
    for a in agents.values():  # SIGTERM, waited for: no agent left
        assert not os.path.exists(f"/proc/{a['pid']}") or "zombie" in open(f"/proc/{a['pid']}/status").read().lower()
    assert list(tmp_path.iterdir()) == []
    assert f"{tag}-s0" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [x for x in os.listdir("/var/run/wireguard") if x.startswith(f"{tag}a")]
