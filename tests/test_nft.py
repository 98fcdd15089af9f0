"""nftables steering (the data plane's decisions without XDP), on real
packets: each (class, destination site) gets its path's mark, a move
rewrites one site's elements, a site without a path keeps the packet's mark
as it is, and destinations outside every site follow the class's site-0
route."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from patronus import ConfigError, Match, Policy, PolicyTable
from patronus.dataplane.nft import NftSteering
from patronus.netns import socket_in

from .netns import sh, unique, veth_pair

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")

DESTS = {"a": "10.1.0.5", "b": "10.2.0.5", "out": "192.0.2.5"}


def marks_seen(ns: str) -> dict[int, int]:
    """Packets counted per mark by the watch chain (after the steering chain)."""
    out = json.loads(sh("nft", "-j", "list", "table", "inet", "watch", ns=ns).stdout)
    seen = {}
    for item in out["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        mark = counter = None
        for e in rule["expr"]:
            if "match" in e and e["match"]["left"].get("meta", {}).get("key") == "mark":
                mark = e["match"]["right"]
            if "counter" in e:
                counter = e["counter"]["packets"]
        if mark is not None:
            seen[mark] = counter
    return seen


def send(net: dict, dst: str, port: int, n: int = 3) -> None:
    s = socket_in(net["ns_a"], socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(n):
            s.sendto(b"x" * 32, (dst, port))
    finally:
        s.close()


def test_marks_follow_class_and_destination_site():
    tag = unique("nf")
    table = PolicyTable([Policy("voip", Match(proto="udp", dst_ports=5060), priority=1)],
                        sites={"a": ["10.1.0.0/24"], "b": ["10.2.0.0/24", "fd00:2::/64"]})
    with veth_pair(tag) as net:
        ns = net["ns_b"]
        for d in DESTS.values():  # everything goes to ns_b, which steers (and then drops: no route)
            sh("ip", "route", "add", f"{d}/32", "via", "10.77.0.2", ns=net["ns_a"])
        marks = [0x7000 + i for i in (1, 2, 3, 4, 9)] + [0x5555]
        watch = "; ".join(f"add rule inet watch w meta mark {m:#x} counter" for m in marks)
        sh("nft", "add table inet watch; add chain inet watch w { type filter hook prerouting priority 0; }; "
           + watch, ns=ns)
        nft = NftSteering(table, net["if_b"], netns=ns)
        try:
            nft.set_paths([("voip", "a", 1), ("voip", "b", 2), (None, "a", 3), (None, "b", 4)])
            for d in DESTS.values():
                send(net, d, 5060)  # voip
                send(net, d, 7000)  # default class
            seen = marks_seen(ns)
            assert (seen[0x7001], seen[0x7002], seen[0x7003], seen[0x7004]) == (3, 3, 3, 3), seen
            # one (class, site) pair moves: only its packets change mark
            nft.set_path("voip", 9, site="b")
            send(net, DESTS["b"], 5060)
            send(net, DESTS["a"], 5060)
            seen = marks_seen(ns)
            assert (seen[0x7009], seen[0x7002], seen[0x7001]) == (3, 3, 6), seen
            # no path to a site: the packet keeps the mark it came with (as tc leaves it)
            nft.set_path("voip", None, site="a")
            sh("nft", "add table inet pre; add chain inet pre p { type filter hook prerouting priority -300; }; "
               "add rule inet pre p meta mark set 0x5555", ns=ns)
            send(net, DESTS["a"], 5060)
            assert marks_seen(ns)[0x5555] == 3
            # outside every site: the class's site-0 route, if it has one
            nft.set_path(None, 9, site=0)
            send(net, DESTS["out"], 7000)
            seen = marks_seen(ns)
            assert seen[0x7009] == 6 and seen[0x5555] == 3  # the default class marked them, over the 0x5555
            assert nft.path_of("voip", "b") == 9 and nft.path_of("voip", "a") is None and nft.path_of(None, 0) == 9
        finally:
            nft.close()
        assert "patronus_" not in sh("nft", "list", "tables", ns=ns).stdout


def test_overlapping_site_subnets_are_refused_by_name():
    table = PolicyTable([], sites={"a": ["10.0.0.0/8"], "b": ["10.2.0.0/16"]})
    with pytest.raises(ConfigError, match="overlap: nftables interval maps need disjoint site subnets"):
        NftSteering(table, "lo", netns="never-created")
