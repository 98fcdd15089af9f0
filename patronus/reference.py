"""The reference data plane in plain Python: the oracle every test compares
the Cython and XDP data planes against.

It is written to be obviously right, not fast: a straightforward parser that
follows the matching semantics line by line, a classifier that checks every
policy in priority order, and flow accounting on an OrderedDict. Do not
optimise it; its value is that a reader can check it against the spec.

>>> from patronus import Policy, Match
>>> frame = bytes.fromhex("ffffffffffff" "020000000001" "0800"
...     "450000200000000040110000" "0a000001" "0a000002" "138813c4000c0000" "00000000")
>>> parse(frame).dport
5060
>>> classify([Policy("sip", Match(proto="udp", dst_ports=5060), priority=1)], frame)
0
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from .abi import MALFORMED_REASONS, NO_PATH
from .model import Policy

__all__ = ["Parsed", "Malformed", "parse", "matches", "classify", "site_of", "FlowAccounting"]

ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
IPV6_EXT = (0, 43, 44, 60)  # hop-by-hop, routing, fragment, destination options


class Parsed(NamedTuple):
    family: int  # 4 or 6
    src: bytes  # 4 or 16 bytes, network order
    dst: bytes
    proto: int
    has_ports: bool
    sport: int
    dport: int
    dscp: int
    tcp_flags: int
    l3_len: int


class Malformed(NamedTuple):
    reason: str  # one of abi.MALFORMED_REASONS


def parse(frame: bytes) -> Parsed | Malformed:
    """Parse an Ethernet frame per the matching semantics (docs/ARCHITECTURE.md)."""
    n = len(frame)
    if n < 14:
        return Malformed("trunc_l2")
    ethertype = int.from_bytes(frame[12:14], "big")
    off = 14
    tags = 0
    while ethertype in VLAN_TPIDS and tags < 2:
        if off + 4 > n:
            return Malformed("trunc_l2")
        ethertype = int.from_bytes(frame[off + 2 : off + 4], "big")
        off += 4
        tags += 1
    if ethertype == ETH_P_IPV4:
        return _parse_ipv4(frame, off)
    if ethertype == ETH_P_IPV6:
        return _parse_ipv6(frame, off)
    return Malformed("not_ip")


def _parse_ipv4(frame: bytes, off: int) -> Parsed | Malformed:
    n = len(frame)
    if off + 20 > n:
        return Malformed("trunc_ip")
    if frame[off] >> 4 != 4:
        return Malformed("bad_version")
    ihl = (frame[off] & 0x0F) * 4
    if ihl < 20:
        return Malformed("bad_ihl")
    total = int.from_bytes(frame[off + 2 : off + 4], "big")
    if total < ihl or off + total > n:
        return Malformed("bad_len")
    dscp = frame[off + 1] >> 2
    proto = frame[off + 9]
    frag_offset = int.from_bytes(frame[off + 6 : off + 8], "big") & 0x1FFF
    src, dst = frame[off + 12 : off + 16], frame[off + 16 : off + 20]
    return _l4(frame, 4, src, dst, proto, dscp, off + ihl, off + total, frag_offset != 0, total)


def _parse_ipv6(frame: bytes, off: int) -> Parsed | Malformed:
    n = len(frame)
    if off + 40 > n:
        return Malformed("trunc_ip")
    if frame[off] >> 4 != 6:
        return Malformed("bad_version")
    payload = int.from_bytes(frame[off + 4 : off + 6], "big")
    end = off + 40 + payload
    if end > n:
        return Malformed("bad_len")
    tclass = ((frame[off] & 0x0F) << 4) | (frame[off + 1] >> 4)
    src, dst = frame[off + 8 : off + 24], frame[off + 24 : off + 40]
    nh = frame[off + 6]
    p = off + 40
    nonfirst = False
    walked = 0
    while nh in IPV6_EXT and walked < 8:
        if nh == 44:
            if p + 8 > end:
                return Malformed("trunc_ext")
            nh = frame[p]
            frag_offset = int.from_bytes(frame[p + 2 : p + 4], "big") >> 3
            p += 8
            walked += 1
            if frag_offset != 0:
                nonfirst = True  # what follows is fragment data, not headers
                break
        else:
            if p + 2 > end:
                return Malformed("trunc_ext")
            hlen = (frame[p + 1] + 1) * 8
            if p + hlen > end:
                return Malformed("trunc_ext")
            nh = frame[p]
            p += hlen
            walked += 1
    return _l4(frame, 6, src, dst, nh, tclass >> 2, p, end, nonfirst, 40 + payload)


def _l4(frame: bytes, family: int, src: bytes, dst: bytes, proto: int, dscp: int,
        l4: int, end: int, nonfirst: bool, l3_len: int) -> Parsed | Malformed:
    sport = dport = flags = 0
    has_ports = False
    if proto in (6, 17) and not nonfirst:
        need = 20 if proto == 6 else 8
        if l4 + need > end:
            return Malformed("trunc_l4")
        sport, dport = struct.unpack_from("!HH", frame, l4)
        has_ports = True
        if proto == 6:
            flags = frame[l4 + 13]
    return Parsed(family, bytes(src), bytes(dst), proto, has_ports, sport, dport, dscp, flags, l3_len)


def _prefix_ok(cidr: str | None, family: int, addr: bytes) -> bool:
    if cidr is None:
        return True
    net = ipaddress.ip_network(cidr)
    if net.version != family:
        return False
    return ipaddress.ip_address(addr) in net


def _ports_ok(ranges: tuple[tuple[int, int], ...] | None, pkt: Parsed, port: int) -> bool:
    if ranges is None:
        return True
    return pkt.has_ports and any(lo <= port <= hi for lo, hi in ranges)


def matches(policy: Policy, pkt: Parsed) -> bool:
    """Does ``pkt`` match every field ``policy.match`` sets?"""
    m = policy.match
    return (
        _prefix_ok(m.src, pkt.family, pkt.src)
        and _prefix_ok(m.dst, pkt.family, pkt.dst)
        and _ports_ok(m.src_ports, pkt, pkt.sport)
        and _ports_ok(m.dst_ports, pkt, pkt.dport)
        and (not m.protos or pkt.proto in m.protos)
        and (m.dscp is None or m.dscp == pkt.dscp)
    )


def classify_parsed(policies: Sequence[Policy], pkt: Parsed | Malformed) -> int:
    """Index into ``policies`` of the first match in priority order, or -1."""
    if isinstance(pkt, Malformed):
        return -1
    for i in sorted(range(len(policies)), key=lambda i: policies[i].priority):
        if matches(policies[i], pkt):
            return i
    return -1


def classify(policies: Sequence[Policy], frame: bytes) -> int:
    """Parse and classify one frame."""
    return classify_parsed(policies, parse(frame))


def site_of(sites: Mapping[str, Sequence[str]] | None, pkt: Parsed | Malformed) -> int:
    """Destination site number of a packet: 1 + the position in ``sites``
    (name -> subnets) of the site with the longest subnet holding the
    destination address; 0 when no subnet holds it (or for a malformed frame)."""
    if isinstance(pkt, Malformed) or not sites:
        return 0
    addr = ipaddress.ip_address(pkt.dst)
    best, best_len = 0, -1
    for i, nets in enumerate(sites.values()):
        for n in nets:
            net = ipaddress.ip_network(n)
            if net.version == addr.version and addr in net and net.prefixlen > best_len:
                best, best_len = i + 1, net.prefixlen
    return best


class FlowAccounting:
    """Flow table semantics, spelled out: LRU eviction when full, idle and
    active timeouts driven by packet timestamps, everything that leaves the
    table goes to ``exported``.

    Each flow's destination site comes from ``sites`` (``site_of``) and its
    path from ``routes[(policy, site)]``, else ``path_of[policy]`` (policy
    -1 is the default class), else no path.
    """

    def __init__(self, policies: Sequence[Policy], capacity: int, idle_ns: int = 0, active_ns: int = 0,
                 path_of: dict[int, int] | None = None, *, sites: Mapping[str, Sequence[str]] | None = None,
                 routes: dict[tuple[int, int], int] | None = None) -> None:
        self.policies = list(policies)
        self.sites = dict(sites or {})
        self.routes = routes or {}
        self.capacity = capacity
        self.idle_ns = idle_ns
        self.active_ns = active_ns
        self.path_of = path_of or {}
        self.flows: OrderedDict[tuple, dict] = OrderedDict()  # last = most recently used
        self.exported: list[dict] = []
        self.evicted = self.expired_idle = self.expired_active = 0
        self.malformed = dict.fromkeys(MALFORMED_REASONS, 0)
        self.policy_packets = [0] * (len(self.policies) + 1)
        self.policy_bytes = [0] * (len(self.policies) + 1)

    def process(self, frames: Iterable[bytes], ts_ns: Iterable[int]) -> list[int]:
        return [self.packet(f, t) for f, t in zip(frames, ts_ns)]

    def packet(self, frame: bytes, ts: int) -> int:
        pkt = parse(frame)
        if isinstance(pkt, Malformed):
            self.malformed[pkt.reason] += 1
            return -1
        if self.idle_ns:
            while self.flows:
                k, rec = next(iter(self.flows.items()))
                if rec["last_ns"] + self.idle_ns > ts:
                    break
                self.exported.append(self.flows.pop(k))
                self.expired_idle += 1
        key = (pkt.family, pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto)
        rec = self.flows.get(key)
        if rec is None:
            if len(self.flows) >= self.capacity:
                _, old = self.flows.popitem(last=False)
                self.exported.append(old)
                self.evicted += 1
            policy = classify_parsed(self.policies, pkt)
            rec = dict(family=pkt.family, src=pkt.src, dst=pkt.dst, sport=pkt.sport, dport=pkt.dport,
                       proto=pkt.proto, packets=0, bytes=0, first_ns=ts, last_ns=ts, policy=policy,
                       site=site_of(self.sites, pkt), path=0, tcp_flags=0, dscp=0)
            self.flows[key] = rec
        elif self.active_ns and ts - rec["first_ns"] >= self.active_ns:
            self.exported.append(dict(rec))
            self.expired_active += 1
            rec.update(packets=0, bytes=0, first_ns=ts, tcp_flags=0)
        self.flows.move_to_end(key)
        rec["packets"] += 1
        rec["bytes"] += pkt.l3_len
        rec["last_ns"] = ts
        rec["tcp_flags"] |= pkt.tcp_flags
        rec["dscp"] = pkt.dscp
        rec["path"] = self.routes.get((rec["policy"], rec["site"]), self.path_of.get(rec["policy"], NO_PATH))
        self.policy_packets[rec["policy"] + 1] += 1
        self.policy_bytes[rec["policy"] + 1] += pkt.l3_len
        return rec["policy"]
