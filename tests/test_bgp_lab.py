"""Acceptance test of BGP on the LAN side (issue 25), with real routers.

3 sites x 1 uplink of ``patronus agent`` (wireguard-go tunnels, BFD at 50 ms
x 3). Each site's LAN namespace is a router (FRR zebra + bgpd; the second
run of the module, BIRD 2) peering over eBGP with its edge (the agent's
ExaBGP); behind each router a host namespace on 10.{s+1}.100.0/24, which
the router announces. The sites' subnets in the mesh are 10.{s+1}.0.0/16
(where learned prefixes may lie); nothing else routes the hosts' prefixes.

* hosts behind each router reach the hosts behind the other routers;
* a prefix added on one router appears in the other routers' RIBs and is
  reachable (measured); removed, it disappears;
* cutting every path to one site withdraws its prefixes from the other
  routers (measured over 10 cuts: median and max); healing re-announces them;
* a router announcing a default route, another site's prefix or more than
  the maximum: refused by name and counted, nothing else affected;
* the BGP speaker killed: reported, restarted, forwarding untouched;
* a third run with the FRR routers has the agents enrolled with a
  controller (no shared file): the learned prefixes travel in the signed
  announcements and the controller's pushes; it shows each edge at
  ``GET /api/v1/agents/{site}/bgp``.

Every wait is for an event, bounded; measurements are printed (and written
to docs/BGP.md by hand), never asserted against a clock. The agents run the
userspace data plane; ``PN_BGP_BACKEND=xdp`` runs the shared-state runs on
the XDP one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from patronus import Failover
from patronus.lab.net import Lab
from patronus.controller.app import PREFIX
from patronus.mesh import Mesh

from .bgp_routers import BirdRouter, FrrRouter, bird_available, frr_available
from .controller_server import Controller
from .netns import unique

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                 reason="needs root and wireguard-go"),
              pytest.mark.root, pytest.mark.slow]

SITES = 3
READY_S = 150.0
EVENT_S = 30.0
EDGE_ASN, ROUTER_ASN = 65010, 65100
MAX_PREFIXES = 4
METRICS_PORT = 9464


def host_net(s: int) -> str:
    return f"10.{s + 1}.100.0/24"


def host_addr(s: int) -> str:
    return f"10.{s + 1}.100.2"


def bgp_file(s: int) -> dict[str, Any]:
    return {"asn": EDGE_ASN + s, "max_prefixes": MAX_PREFIXES,
            "neighbors": [{"address": Lab.lan_addr(s), "asn": ROUTER_ASN + s, "hold_time": 9}],
            "networks": [f"10.{s + 1}.0.0/24"]}


def mesh() -> Mesh:
    d = Lab.plan_mesh(SITES, 1).to_dict()
    for site in d["sites"]:   # the site's space: learned prefixes must lie inside it
        site["subnets"] = [f"10.{int(site['name'][1:]) + 1}.0.0/16"]
    m = Mesh.from_dict(d)
    m.failover = Failover(failback_hold_s=1, cooldown_s=0.5, damp_half_life_s=2)
    return m


def _ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=check,
                          timeout=30)


def ping(ns: str, dst: str, count: int = 3) -> int:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2",
                        dst], capture_output=True, text=True, timeout=30)
    return next((int(w) for line in r.stdout.splitlines() if "received" in line
                 for w, nxt in zip(line.split(), line.split()[1:]) if nxt.startswith("received")), 0)


class BgpLab:
    """``kind``: "frr" or "bird" (the routers), "frr+controller": FRR routers
    and agents that get their desired state and their peers (with the
    subnets each announced) from a controller instead of a shared file."""

    def __init__(self, lab: Lab, kind: str, workdir: Path) -> None:
        self.lab, self.dir = lab, workdir
        self.label = kind
        self.kind, self.controlled = kind.split("+")[0], kind.endswith("+controller")
        self.ctl: Any = None
        self.token = ""
        self.routers: dict[int, Any] = {}
        self.hosts: dict[int, str] = {}

    def up(self) -> None:
        lab = self.lab
        cls = FrrRouter if self.kind == "frr" else BirdRouter
        for s in range(SITES):
            ln, h = lab.lan_ns(s), f"{lab.tag}h{s}"
            subprocess.run(["ip", "netns", "add", h], check=True)
            self.hosts[s] = h
            _ns(ln, "ip", "link", "add", f"{lab.tag}r{s}", "type", "veth", "peer", "name", "eth1", "netns", h)
            _ns(ln, "ip", "addr", "add", f"10.{s + 1}.100.1/24", "dev", f"{lab.tag}r{s}")
            _ns(ln, "ip", "link", "set", f"{lab.tag}r{s}", "up")
            _ns(ln, "ip", "route", "del", "default", check=False)   # only what BGP teaches routes off the LAN
            _ns(ln, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _ns(h, "ip", "addr", "add", f"{host_addr(s)}/24", "dev", "eth1")
            _ns(h, "ip", "link", "set", "eth1", "up")
            _ns(h, "ip", "link", "set", "lo", "up")
            _ns(h, "ip", "route", "add", "default", "via", f"10.{s + 1}.100.1")
            rdir = self.dir / f"r{s}"
            r = cls(ln, rdir, asn=ROUTER_ASN + s, router_id=lab.lan_addr(s),
                    neighbors=[(f"10.{s + 1}.0.1", EDGE_ASN + s)])
            r.announced["ipv4"].append(host_net(s))
            self.routers[s] = r
            r.start()
        extra = {}
        for s in range(SITES):
            f = self.dir / f"s{s}.bgp.json"
            f.write_text(json.dumps(bgp_file(s)))
            extra[s] = ["--bgp", str(f)]
        metrics_arg = ["--metrics-listen", f"127.0.0.1:{METRICS_PORT}"]   # each site's own loopback
        if not self.controlled:
            lab.write_agent_state(mesh())
            lab.start_agents(backend=os.environ.get("PN_BGP_BACKEND", "userspace"), site_extra=extra, extra=metrics_arg)
        else:
            lab.add_controller_net()
            self.ctl = Controller(self.dir / "ctl", netns=lab.controller_ns, listen="0.0.0.0:8443",
                                  url=f"https://{Lab.CONTROLLER_HOST}:8443")
            self.ctl.start()
            self.token = self.ctl.login("admin", self.ctl.admin_password)["access_token"]
            m = mesh()
            with self.admin() as a:
                for site in m.sites:
                    a.post(f"{PREFIX}/sites", json=site.to_dict()).raise_for_status()
                r = a.get(f"{PREFIX}/failover").raise_for_status()
                a.put(f"{PREFIX}/failover", json={**r.json(), **m.failover.to_dict()},
                      headers={"If-Match": r.headers["etag"]}).raise_for_status()
                tokens = {x.name: a.post(f"{PREFIX}/tokens", json={"site": x.name}).raise_for_status().json()["token"]
                          for x in m.sites}
            lab.start_agents(backend="userspace", controller=f"https://{Lab.CONTROLLER_WAN}:8443", tokens=tokens,
                             site_extra=extra, extra=metrics_arg)
        lab.wait_agents(READY_S)

    def admin(self) -> Any:
        return self.ctl.client(self.token)

    def down(self) -> None:
        if self.lab.agents:
            with contextlib.suppress(Exception):
                self.lab.stop_agents()
        if self.ctl is not None:
            with contextlib.suppress(Exception):
                self.ctl.stop()
        for r in self.routers.values():
            with contextlib.suppress(Exception):
                r.stop()
        for h in self.hosts.values():
            subprocess.run(["ip", "netns", "del", h], capture_output=True)

    # -- reading --------------------------------------------------------------------

    def status(self, s: int) -> dict[str, Any]:
        st = self.lab.agent_status(s)
        assert st is not None, f"no status file for s{s}"
        return st

    def context(self) -> str:
        out = []
        for s, r in self.routers.items():
            try:
                out.append(f"router {s}: {r.describe()}")
            except Exception as e:  # noqa: BLE001 - a diagnostic
                out.append(f"router {s}: ? {e}")
            out.append(f"edge {s}: {json.dumps((self.lab.agent_status(s) or {}).get('bgp'))}")
            log = Path(f"{self.lab.agent_state_path}.s{s}.bgp") / "exabgp.log"
            with contextlib.suppress(OSError):
                out.append(f"exabgp {s}, last lines:\n" + "\n".join(log.read_text().splitlines()[-12:]))
        return "\n".join(out) + "\n" + self.lab.agent_logs(15)

    def healthy(self) -> None:
        for s, p in self.lab.agents.items():
            if p.poll() is not None:
                pytest.fail(f"agent s{s} exited rc={p.returncode}\n{self.context()}")

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = EVENT_S, interval: float = 0.1) -> Any:
        end = time.monotonic() + timeout
        while True:
            self.healthy()
            got = cond()
            if got:
                return got
            if time.monotonic() > end:
                pytest.fail(f"{what}: not after {timeout:g} s\n{self.context()}")
            time.sleep(interval)

    def has(self, s: int, prefix: str) -> bool:
        return prefix in self.routers[s].rib("ipv4")

    def all_routes(self) -> bool:
        return all(self.has(s, host_net(d)) for s in range(SITES) for d in range(SITES) if d != s)


@pytest.fixture(scope="module", params=["frr", "bird", "frr+controller"])
def bl(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BgpLab]:
    avail = bird_available() if request.param == "bird" else frr_available()
    if avail is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{request.param} is needed under CI: {avail}")
        pytest.skip(avail)
    work = tmp_path_factory.mktemp("bgp")
    os.chmod(work, 0o711)
    for p in work.parents:   # FRR runs as user frr and must reach its directory
        if p != Path("/") and not os.stat(p).st_mode & 0o001:
            os.chmod(p, os.stat(p).st_mode | 0o001)
    lab = Lab(unique("G")[:6], sites=SITES, uplinks=1, state_dir=work / "lab")
    b = BgpLab(lab, request.param, work)
    try:
        lab.up(tunnels=False)
        b.up()
        yield b
    finally:
        b.down()
        with contextlib.suppress(Exception):
            lab.down()


def test_hosts_behind_routers_reach_each_other(bl: BgpLab) -> None:
    bl.wait("every router learned every other site's host prefix", bl.all_routes, timeout=READY_S)
    for s in range(SITES):
        for d in range(SITES):
            if d != s:
                rib = bl.routers[s].rib("ipv4")[host_net(d)]
                assert f"{EDGE_ASN + s}:{d + 1}" in rib["communities"], (s, d, rib)   # the site's community
                assert rib["next_hop"] == f"10.{s + 1}.0.1", rib                       # the edge
    bad = {(s, d): n for s in range(SITES) for d in range(SITES) if d != s
           if (n := bl.wait(f"h{s} -> h{d}", lambda s=s, d=d: ping(bl.hosts[s], host_addr(d), 2), timeout=20)) < 1}
    assert not bad, f"{bad}\n{bl.context()}"
    for s in range(SITES):   # the edges' view: accepted, advertised, nothing refused
        b = bl.status(s)["bgp"]
        assert b["accepted"] == [host_net(s)] and not b["refused"], b
        assert set(b["advertised"]) >= {host_net(d) for d in range(SITES) if d != s}, b
        m = metrics(bl.lab.site_ns(s))   # and the same through the agent's Prometheus endpoint
        assert m[("patronus_bgp_session_up", (("neighbor", Lab.lan_addr(s)),))] == 1.0, m
        assert m[("patronus_bgp_accepted_prefixes", ())] == 1.0
        assert m[("patronus_bgp_advertised_prefixes", ())] == len(b["advertised"])
        assert m[("patronus_bgp_received_routes", ())] == b["received"]
    if bl.controlled:   # the controller saw the learned prefixes go by, and shows each edge
        for s in range(SITES):
            got = bl.wait(f"the controller's view of s{s}'s BGP", lambda s=s: (
                r := bl.admin().get(f"{PREFIX}/agents/s{s}/bgp")).status_code == 200 and r.json())
            assert got["accepted"] == [host_net(s)] and got["sessions"] == {Lab.lan_addr(s): "up"}, got

def metrics(ns: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The agent's /metrics in namespace ns, parsed: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    code = (f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', "
            "timeout=10).read().decode())")
    text = _ns(ns, sys.executable, "-c", code).stdout
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def test_a_prefix_added_on_a_router_reaches_the_others_and_goes_when_removed(bl: BgpLab) -> None:
    bl.wait("routes", bl.all_routes, timeout=READY_S)
    r0, new = bl.routers[0], "10.1.200.0/24"
    _ns(bl.lab.lan_ns(0), "ip", "addr", "add", "10.1.200.1/24", "dev", "lo")   # an address behind router 0
    seen: dict[str, list[float]] = {"rib": [], "reach": []}
    try:
        t0 = time.monotonic()
        r0.announce(new)
        for s in (1, 2):
            bl.wait(f"router {s} learned {new}", lambda s=s: bl.has(s, new), interval=0.05)
            seen["rib"].append(time.monotonic() - t0)
        bl.wait("h1 reaches 10.1.200.1", lambda: ping(bl.hosts[1], "10.1.200.1", 1), interval=0.05)
        seen["reach"].append(time.monotonic() - t0)
        print(f"\n[{bl.label}] {new} added on router 0: in routers 1, 2 after {seen['rib'][0]:.2f} / "
              f"{seen['rib'][1]:.2f} s, reachable from h1 after {seen['reach'][0]:.2f} s")
        t0 = time.monotonic()
        r0.withdraw(new)
        for s in (1, 2):
            bl.wait(f"router {s} dropped {new}", lambda s=s: not bl.has(s, new), interval=0.05)
        print(f"[{bl.label}] {new} removed: gone from routers 1, 2 after {time.monotonic() - t0:.2f} s")
        assert new not in bl.status(1)["bgp"]["advertised"] or bl.wait(
            "edge 1 stopped advertising it", lambda: new not in bl.status(1)["bgp"]["advertised"])
    finally:
        with contextlib.suppress(Exception):
            r0.withdraw(new)
        _ns(bl.lab.lan_ns(0), "ip", "addr", "del", "10.1.200.1/24", "dev", "lo", check=False)


@contextlib.contextmanager
def cut_site(lab: Lab, s: int) -> Iterator[None]:
    """Drop everything on every uplink of site s: every path to it goes."""
    table = f"pnbgpcut{s}"
    pat = f"{lab.tag}u{s}x*"
    _ns(lab.site_ns(s), "nft", f"add table inet {table}; "
        f"add chain inet {table} pre {{ type filter hook prerouting priority -300; }}; "
        f"add chain inet {table} post {{ type filter hook postrouting priority -300; }}; "
        f'add rule inet {table} pre iifname "{pat}" drop; add rule inet {table} post oifname "{pat}" drop')
    try:
        yield
    finally:
        _ns(lab.site_ns(s), "nft", f"delete table inet {table}", check=False)


def test_cutting_every_path_to_a_site_withdraws_its_prefixes_and_healing_brings_them_back(bl: BgpLab) -> None:
    if bl.kind != "frr" or bl.controlled:
        pytest.skip("measured with the FRR routers and a shared state (the others check reach and prefix changes)")
    bl.wait("routes", bl.all_routes, timeout=READY_S)
    gone, back = [], []
    for _ in range(10):
        bl.wait("every route back before the cut", bl.all_routes, timeout=60)
        t0 = time.monotonic()
        with cut_site(bl.lab, 2):
            for s in (0, 1):
                bl.wait(f"router {s} withdrew {host_net(2)}", lambda s=s: not bl.has(s, host_net(2)), interval=0.02)
            gone.append(time.monotonic() - t0)
            assert bl.has(0, host_net(1)) and bl.has(1, host_net(0)), "a cut of s2 took other sites' routes"
            t1 = time.monotonic()
        for s in (0, 1):
            bl.wait(f"router {s} learned {host_net(2)} again", lambda s=s: bl.has(s, host_net(2)), timeout=60,
                    interval=0.05)
        back.append(time.monotonic() - t1)
    print(f"\n[{bl.label}] cut of every path to s2, until both other routers withdrew its prefix (10 cuts): "
          f"median {statistics.median(gone) * 1e3:.0f} ms, max {max(gone) * 1e3:.0f} ms "
          f"({', '.join(f'{x * 1e3:.0f}' for x in gone)}); healed, back in median {statistics.median(back):.2f} s, "
          f"max {max(back):.2f} s")
    assert ping(bl.hosts[0], host_addr(2), 3) >= 1


def test_bad_announcements_are_refused_by_name_and_nothing_else_moves(bl: BgpLab) -> None:
    if bl.kind != "frr" or bl.controlled:
        pytest.skip("FRR routers and a shared state only")
    bl.wait("routes", bl.all_routes, timeout=READY_S)
    r1 = bl.routers[1]
    before = dict(bl.status(1)["bgp"]["refused"])
    bad = ["0.0.0.0/0", "10.1.50.0/24"] + [f"10.2.{150 + i}.0/24" for i in range(MAX_PREFIXES)]
    try:
        for p in bad:
            r1.announce(p)
        b = bl.wait("edge 1 counted the refusals",
                    lambda: (x := bl.status(1)["bgp"])["refused"].get("max_prefixes", 0) > before.get("max_prefixes", 0)
                    and x["refused"].get("default_route", 0) > before.get("default_route", 0)
                    and x["refused"].get("other_site", 0) > before.get("other_site", 0) and x)
        assert b["refused_now"]["0.0.0.0/0"] == "default_route" and b["refused_now"]["10.1.50.0/24"] == "other_site"
        assert len(b["accepted"]) == MAX_PREFIXES and host_net(1) in b["accepted"], b
        m = metrics(bl.lab.site_ns(1))
        for reason in ("default_route", "other_site", "max_prefixes"):
            assert m[("patronus_bgp_refused_total", (("reason", reason),))] >= 1, (reason, m)
        # the others never hear of the refused ones; their routes and the hosts' reach are untouched
        for s in (0, 2):
            rib = bl.routers[s].rib("ipv4")
            assert "10.1.50.0/24" not in rib or rib["10.1.50.0/24"]["next_hop"] != f"10.{s + 1}.0.1"
            assert not any(p in rib for p in b["refused_now"]), (s, sorted(rib))
        assert bl.all_routes()
        assert ping(bl.hosts[0], host_addr(1), 3) >= 2 and ping(bl.hosts[2], host_addr(0), 3) >= 2
    finally:
        for p in bad:
            with contextlib.suppress(Exception):
                r1.withdraw(p)
        # settled: edge 1 accepts its one prefix again and every site has applied that (the next test's quiet)
        bl.wait("edge 1 back to its own prefix", lambda: bl.status(1)["bgp"]["accepted"] == [host_net(1)])
        bl.wait("the other routers without the refused ones' neighbours",
                lambda: not any(bl.has(s, f"10.2.{150 + i}.0/24") for s in (0, 2) for i in range(MAX_PREFIXES)))


def test_the_speaker_killed_is_restarted_and_forwarding_goes_on(bl: BgpLab) -> None:
    if bl.kind != "frr" or bl.controlled:
        pytest.skip("FRR routers and a shared state only")
    bl.wait("routes", bl.all_routes, timeout=READY_S)
    bl.wait("h0 reaches h1 steadily", lambda: ping(bl.hosts[0], host_addr(1), 3) == 3)
    sp = bl.status(0)["bgp"]["speaker"]
    assert sp["alive"] and sp["pid"], sp
    exits = sp["exits"]
    os.kill(sp["pid"], signal.SIGKILL)
    lost: list[float] = []
    fib_gone: list[float] = []
    sent = 0
    t0 = time.monotonic()
    # while it restarts: the edge keeps its learned prefix, router 0 keeps the routes it learned (graceful
    # restart), and host 0 keeps reaching the others
    end = time.monotonic() + 60
    while True:
        st = bl.status(0)["bgp"]
        sent += 1
        if ping(bl.hosts[0], host_addr(1), 1) < 1:
            lost.append(round(time.monotonic() - t0, 2))
        if not bl.routers[0].fib(host_net(1)):
            fib_gone.append(round(time.monotonic() - t0, 2))
        assert host_net(0) in st["accepted"], st
        if st["speaker"]["exits"] > exits and st["speaker"]["restarts"] >= 1 and all(
                v == "up" for v in st["sessions"].values()):
            break
        assert time.monotonic() < end, f"speaker not back: {st}\n{bl.context()}"
    print(f"\n[{bl.label}] speaker killed: restarted, {len(lost)} of {sent} pings lost meanwhile (at {lost} s); "
          f"router 0 without the route to h1 at {fib_gone} s")
    assert not fib_gone, f"router 0 lost its route to h1 at {fib_gone} s (graceful restart)\n{bl.context()}"
    assert len(lost) <= 1, f"{len(lost)} of {sent} lost at {lost} s\n{bl.context()}"
    bl.wait("routes after the restart", bl.all_routes)
