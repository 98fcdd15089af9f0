"""The LAN-side routers of tests/bgp_routers.py against each other: FRR
(zebra + bgpd) in one namespace, BIRD 2 in another, joined by a veth and
peering over eBGP on IPv4 and IPv6. Each side's announcements reach the
other's rib and kernel table, and leave them again on withdrawal."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from .bgp_routers import BirdRouter, FrrRouter, bird_available, frr_available, parse_bird_routes
from .netns import sh, unique

WHY = frr_available() or bird_available()
needs_routers = pytest.mark.skipif(WHY is not None, reason=str(WHY))
FRR_AS, BIRD_AS = 65101, 65102
TIMEOUT = 30.0  # seconds for any one thing to happen; sessions come up in about 1 s here


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def delete_netns(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@contextlib.contextmanager
def two_namespaces(tag: str):
    """Namespaces ``{tag}f`` and ``{tag}b`` joined by a veth, with
    10.250.x.1/2 and fd00:250:x::1/2 (DAD off: no tentative addresses)."""
    x = int(uuid.uuid4().hex[:4], 16) % 254 + 1
    nf, nb = f"{tag}f", f"{tag}b"
    made: list[str] = []
    try:
        for ns in (nf, nb):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", f"{tag}x", "netns", nf, "type", "veth", "peer", "name", f"{tag}y", "netns", nb)
        for ns, ifname, host in ((nf, f"{tag}x", 1), (nb, f"{tag}y", 2)):
            sh("ip", "addr", "add", f"10.250.{x}.{host}/24", "dev", ifname, ns=ns)
            sh("ip", "addr", "add", f"fd00:250:{x}::{host}/64", "dev", ifname, "nodad", ns=ns)
            sh("ip", "link", "set", ifname, "up", ns=ns)
        yield {"ns_f": nf, "ns_b": nb, "v4_f": f"10.250.{x}.1", "v4_b": f"10.250.{x}.2",
               "v6_f": f"fd00:250:{x}::1", "v6_b": f"fd00:250:{x}::2", "x": x}
    finally:
        for ns in made:
            delete_netns(ns)


@pytest.fixture
def lab():
    tag = unique("bg")
    work = Path(tempfile.mkdtemp(prefix="pn-bgp-"))
    work.chmod(0o711)  # FRR's daemons run as user frr: they must reach work/frr
    routers: list[FrrRouter | BirdRouter] = []
    try:
        with two_namespaces(tag) as v:
            frr = FrrRouter(v["ns_f"], work / "frr", asn=FRR_AS, router_id=v["v4_f"],
                            neighbors=[(v["v4_b"], BIRD_AS), (v["v6_b"], BIRD_AS)])
            bird = BirdRouter(v["ns_b"], work / "bird", asn=BIRD_AS, router_id=v["v4_b"],
                              neighbors=[(v["v4_f"], FRR_AS), (v["v6_f"], FRR_AS)])
            try:
                for r in (frr, bird):
                    routers.append(r)
                    r.start()
                for r, peers in ((frr, (v["v4_b"], v["v6_b"])), (bird, (v["v4_f"], v["v6_f"]))):
                    for p in peers:
                        r.wait(lambda r=r, p=p: r.session_state(p) == "Established", f"session with {p}", TIMEOUT)
                yield v, frr, bird
            finally:
                for r in routers:
                    r.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    left = {n for n in netns_names() if n.startswith(tag)}
    assert not left, f"namespaces left behind: {left}"


@needs_routers
@pytest.mark.root
def test_sessions_are_established_on_both_sides(lab):
    v, frr, bird = lab
    assert frr.session_state(v["v4_b"]) == "Established"
    assert frr.session_state(v["v6_b"]) == "Established"
    assert bird.session_state(v["v4_f"]) == "Established"
    assert bird.session_state(v["v6_f"]) == "Established"
    assert frr.rib("ipv4") == frr.rib("ipv6") == bird.rib("ipv4") == bird.rib("ipv6") == {}


@needs_routers
@pytest.mark.root
@pytest.mark.parametrize("direction", ["frr->bird", "bird->frr"])
@pytest.mark.parametrize("fam", ["ipv4", "ipv6"])
def test_announced_prefix_reaches_the_peer_rib_and_kernel_and_leaves_on_withdraw(lab, direction, fam):
    v, frr, bird = lab
    x = v["x"]
    if direction == "frr->bird":
        speaker, receiver, next_hop, asn = frr, bird, v[f"v{fam[-1]}_f"], FRR_AS
    else:
        speaker, receiver, next_hop, asn = bird, frr, v[f"v{fam[-1]}_b"], BIRD_AS
    prefix = f"10.{x}.{7 if speaker is frr else 8}.0/24" if fam == "ipv4" else \
        f"fd10:{x:x}:{7 if speaker is frr else 8}::/48"

    speaker.announce(prefix)
    # best once the receiver has run its path selection (FRR lists the path a moment before)
    route = receiver.wait(lambda: (r := receiver.rib(fam).get(prefix)) and r["best"] and r,
                          f"{prefix} in the rib as the best path", TIMEOUT)
    assert route["next_hop"] == next_hop
    assert route["as_path"] == [asn] and route["communities"] == []
    receiver.wait(lambda: receiver.fib(prefix), f"{prefix} in {receiver.ns}'s kernel table", TIMEOUT)
    assert prefix not in speaker.rib(fam)  # a router's rib holds what it learned, not what it announces
    assert not speaker.fib(prefix)         # and its own announcements stay out of its kernel table

    speaker.withdraw(prefix)
    receiver.wait(lambda: prefix not in receiver.rib(fam), f"{prefix} gone from the rib", TIMEOUT)
    receiver.wait(lambda: not receiver.fib(prefix), f"{prefix} gone from {receiver.ns}'s kernel table", TIMEOUT)


def test_bird_route_output_is_parsed():
    out = """BIRD 2.0.12 ready.
Table master4:
10.1.0.0/24          unicast [bgp_10_0_0_1 01:34:22.417] * (100) [AS65001i]
\tvia 10.0.0.1 on veth0
\tType: BGP univ
\tBGP.origin: IGP
\tBGP.as_path: 65001 65010
\tBGP.next_hop: 10.0.0.1
\tBGP.local_pref: 100
\tBGP.community: (65001,7) (65001,8)
\tBGP.large_community: (65001, 1, 2)
                     unicast [bgp_10_0_0_3 01:34:23.000] (100) [AS65003i]
\tvia 10.0.0.3 on veth0
\tType: BGP univ
\tBGP.as_path: 65003
10.2.0.0/24          unicast [bgp_10_0_0_3 01:34:23.000] (100) [AS65003i]
\tvia 10.0.0.3 on veth0
\tBGP.as_path: 65003
"""
    assert parse_bird_routes(out) == {
        "10.1.0.0/24": {"next_hop": "10.0.0.1", "communities": ["65001:7", "65001:8", "65001:1:2"],
                        "as_path": [65001, 65010], "best": True},
        "10.2.0.0/24": {"next_hop": "10.0.0.3", "communities": [], "as_path": [65003], "best": False},
    }

