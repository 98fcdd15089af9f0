"""Shared data for the benchmarks: policy tables and traffic, generated
deterministically (fixed seeds) so every run measures the same work.

Policy tables (``make_policies(n)``) look like what an SD-WAN deployment
carries: mostly IPv4 destination prefixes from /8 to /32 (site subnets in
10/8 and "SaaS" ranges in public space), some source prefixes, about 10%
IPv6, TCP/UDP with a single port or a small range, a few ICMP and
protocol-less rules, some DSCP, unique priorities in random order.

Traffic (``make_traffic(...)``) is N frames over M flows: every flow appears
at least once, the rest of the packets follow a Zipf(0.8) law over the flows
(a few elephants, a long tail), in random order, with IMIX frame sizes
(7:4:1 of 60/594/1514 bytes). A chosen fraction of the flows is built to
match a policy of the table (it may match a higher-priority one first); the
rest goes to 100.64.0.0/10 or 2001:db8::/32, which no generated prefix covers
(prefix-less rules can still take them). ``Traffic.matched`` is the measured
share of frames that got a policy.

Nothing here is a test: pytest's testpaths is tests/, run these with
``make bench`` or ``python -m pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

import functools
import os
import ipaddress
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from patronus import DataplaneUnavailable, Match, Policy, PolicyTable
from patronus.policy import frames_to_buffer

SEED = 20_240_917
SIZES = (10, 1_000, 10_000)

# ---------------------------------------------------------------------------
# policies

_WELL_KNOWN = (22, 25, 53, 80, 123, 389, 443, 445, 465, 587, 636, 993, 1194, 1433, 1521, 1812, 3306,
               3389, 3478, 5060, 5061, 5222, 5432, 5900, 6379, 8080, 8443, 9000, 9092, 9443, 27017)
_DSCPS = (46, 34, 26, 18, 10, 8)
_UNMATCHED_V4 = ipaddress.ip_network("100.64.0.0/10")
_UNMATCHED_V6 = ipaddress.ip_network("2001:db8::/32")


def _v4_dst(rng: random.Random) -> str:
    if rng.random() < 0.4:  # a site subnet
        plen = rng.choice((16, 20, 22, 24, 24, 24, 26, 28, 32))
        addr = (10 << 24) | rng.getrandbits(24)
    else:  # a public ("SaaS") range
        plen = rng.choices((8, 12, 16, 20, 22, 24, 26, 28, 32), weights=(1, 2, 6, 6, 6, 12, 4, 4, 6))[0]
        first = rng.choice([o for o in range(1, 224) if o not in (10, 100, 127)])
        addr = (first << 24) | rng.getrandbits(24)
    return str(ipaddress.ip_network((addr, plen), strict=False))


def _v4_src(rng: random.Random) -> str:
    if rng.random() < 0.8:
        plen = rng.choice((16, 20, 24, 24, 28))
        return str(ipaddress.ip_network(((10 << 24) | rng.getrandbits(24), plen), strict=False))
    return str(ipaddress.ip_network(((192 << 24) | (168 << 16) | rng.getrandbits(16), 24), strict=False))


def _v6_dst(rng: random.Random) -> str:
    while True:
        addr = (0x2 << 125) | rng.getrandbits(125)  # 2000::/3
        net = ipaddress.ip_network((addr, rng.choice((32, 40, 48, 48, 56, 64, 64, 128))), strict=False)
        if not net.overlaps(_UNMATCHED_V6):
            return str(net)


def _v6_src(rng: random.Random) -> str:
    return str(ipaddress.ip_network(((0xFD << 120) | rng.getrandbits(120), rng.choice((48, 56, 64))), strict=False))


def _ports(rng: random.Random, common: bool = True) -> int | tuple[int, int]:
    if rng.random() < 0.7:
        return rng.choice(_WELL_KNOWN) if common and rng.random() < 0.5 else rng.randint(1, 49151)
    lo = rng.randint(1, 65000)
    return (lo, lo + rng.randint(1, 64))


@functools.cache
def make_policies(n: int, seed: int = SEED) -> tuple[Policy, ...]:
    """n realistic policies, the same every run for the same (n, seed)."""
    rng = random.Random(f"{seed}/policies/{n}")
    matches = []
    for _ in range(n):
        v6 = rng.random() < 0.10
        kw: dict = {}
        if rng.random() < 0.88:
            kw["dst"] = _v6_dst(rng) if v6 else _v4_dst(rng)
        if rng.random() < 0.25:
            kw["src"] = _v6_src(rng) if v6 else _v4_src(rng)
        r = rng.random()
        if r < 0.50:
            kw["proto"] = "tcp"
        elif r < 0.85:
            kw["proto"] = "udp"
        elif r < 0.90:
            kw["proto"] = "icmpv6" if v6 else "icmp"
        # else: any protocol
        if kw.get("proto") in ("tcp", "udp", None):
            # a rule without a destination prefix names its port (dns, sip, ...)
            if "dst" not in kw or rng.random() < 0.8:
                kw["dst_ports"] = _ports(rng)
            if rng.random() < 0.05:
                kw["src_ports"] = _ports(rng, common=False)
        if rng.random() < 0.10:
            kw["dscp"] = rng.choice(_DSCPS)
        matches.append(Match(**kw))
    # Priorities: unique, and like a hand-kept table mostly specific-before-
    # broad (longer prefixes, more fields set), with noise so it is not sorted.
    def specificity(m: Match) -> float:
        s = ipaddress.ip_network(m.dst).prefixlen / ipaddress.ip_network(m.dst).max_prefixlen if m.dst else 0.0
        return s + 0.3 * (m.src is not None) + 0.2 * (m.dst_ports is not None) + 0.1 * (m.dscp is not None)
    noisy = [specificity(m) + rng.random() * 0.5 for m in matches]
    rank = sorted(range(n), key=lambda i: -noisy[i])
    prio = {i: 10 * (r + 1) for r, i in enumerate(rank)}
    return tuple(Policy(f"p{i}", m, priority=prio[i]) for i, m in enumerate(matches))


@functools.cache
def make_table(n: int) -> PolicyTable:
    return PolicyTable(make_policies(n))


# ---------------------------------------------------------------------------
# frames

_IMIX = (60, 594, 1514)  # Ethernet frame sizes without FCS, weights 7:4:1
_IMIX_P = np.array([7, 4, 1]) / 12
_MACS = bytes.fromhex("020000000002020000000001")  # dst, src


@dataclass(frozen=True)
class FlowSpec:
    family: int
    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int
    dscp: int


def build_frame(f: FlowSpec, size: int) -> bytes:
    """Ethernet + IP + TCP/UDP/ICMP frame of (at least) ``size`` bytes."""
    if f.proto == 6:
        l4h = struct.pack("!HHIIBBHHH", f.sport, f.dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    elif f.proto == 17:
        l4h = b""  # length depends on the payload, packed below
    else:
        l4h = struct.pack("!BBHHH", 128 if f.family == 6 else 8, 0, 0, 1, 1)
    iph = 20 if f.family == 4 else 40
    udph = 8 if f.proto == 17 else 0
    pay = max(0, size - 14 - iph - len(l4h) - udph)
    if f.proto == 17:
        l4h = struct.pack("!HHHH", f.sport, f.dport, 8 + pay, 0)
    seg = l4h + bytes(pay)
    if f.family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, f.dscp << 2, 20 + len(seg), 0, 0x4000, 64, f.proto, 0, f.src, f.dst)
        return _MACS + b"\x08\x00" + ip + seg
    ip = struct.pack("!IHBB16s16s", (6 << 28) | (f.dscp << 22), len(seg), f.proto, 64, f.src, f.dst)
    return _MACS + b"\x86\xdd" + ip + seg


def _in_net(rng: random.Random, cidr: str | None, fallback: ipaddress._BaseNetwork) -> bytes:
    net = ipaddress.ip_network(cidr) if cidr else fallback
    host_bits = net.max_prefixlen - net.prefixlen
    return (int(net.network_address) | (rng.getrandbits(host_bits) if host_bits else 0)).to_bytes(
        net.max_prefixlen // 8, "big")


_LAN_V4 = ipaddress.ip_network("10.0.0.0/8")
_LAN_V6 = ipaddress.ip_network("fd00::/8")
_ANY_V4 = ipaddress.ip_network("0.0.0.0/0")
_ANY_V6 = ipaddress.ip_network("2000::/3")


def _flow_for(rng: random.Random, p: Policy | None, family: int) -> FlowSpec:
    """A flow that satisfies every field of ``p`` (None: one aimed at no prefix)."""
    m = p.match if p is not None else Match()
    for cidr in (m.src, m.dst):
        if cidr is not None:
            family = ipaddress.ip_network(cidr).version
    lan, anyd = (_LAN_V4, _ANY_V4) if family == 4 else (_LAN_V6, _ANY_V6)
    src = _in_net(rng, m.src, lan)
    if p is None:
        dst = _in_net(rng, None, _UNMATCHED_V4 if family == 4 else _UNMATCHED_V6)
    else:
        dst = _in_net(rng, m.dst, anyd)
    if m.protos:
        proto = rng.choice(m.protos)
    elif m.src_ports or m.dst_ports:
        proto = rng.choice((6, 17))
    else:
        proto = rng.choices((6, 17, 1 if family == 4 else 58), weights=(60, 35, 5))[0]
    sport = rng.randint(*rng.choice(m.src_ports)) if m.src_ports else rng.randint(1024, 65535)
    if m.dst_ports:
        dport = rng.randint(*rng.choice(m.dst_ports))
    elif p is None:
        dport = rng.randint(1024, 65535)
    else:
        dport = rng.choice(_WELL_KNOWN)
    if proto not in (6, 17):
        sport = dport = 0
    dscp = m.dscp if m.dscp is not None else rng.choice((0,) * 8 + (46, 26))
    return FlowSpec(family, src, dst, proto, sport, dport, dscp)


@dataclass
class Traffic:
    """A trace: frames in order, also packed as (buf, offsets), with timestamps."""

    policies: int
    n_flows: int
    frames: list[bytes]
    buf: np.ndarray
    offsets: np.ndarray
    ts: np.ndarray
    flows: list[FlowSpec] = field(repr=False)
    matched: float = 0.0  # share of frames some policy took (measured with the classifier)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def bytes(self) -> int:
        return int(self.offsets[-1])

    def head(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(buf, offsets) of the first k frames (for slow baselines; per-packet work
        that does not depend on earlier packets, so a prefix is a fair sample)."""
        return self.buf[: int(self.offsets[k])], self.offsets[: k + 1]

    def write_pcap(self, path: Path, limit: int | None = None) -> Path:
        """Classic pcap (microsecond timestamps, LINKTYPE_ETHERNET)."""
        n = len(self.frames) if limit is None else min(limit, len(self.frames))
        parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
        for i in range(n):
            fr = self.frames[i]
            t = int(self.ts[i])
            parts.append(struct.pack("<IIII", t // 1_000_000_000, (t // 1000) % 1_000_000, len(fr), len(fr)))
            parts.append(fr)
        path.write_bytes(b"".join(parts))
        return path


@functools.cache
def make_traffic(policies: int, n_frames: int, n_flows: int, match_fraction: float = 0.8,
                 v6_fraction: float = 0.1, seed: int = SEED) -> Traffic:
    """n_frames over n_flows (n_flows == n_frames: every frame a new flow)."""
    assert 1 <= n_flows <= n_frames
    # flows come from their own stream: a smaller trace's flows are a prefix of a bigger one's
    rng = random.Random(f"{seed}/flows/{policies}/{match_fraction}/{v6_fraction}")
    nprng = np.random.default_rng([seed, policies, n_frames, n_flows])
    pols = make_policies(policies)
    by_family = {4: [p for p in pols if _family(p) in (0, 4)], 6: [p for p in pols if _family(p) in (0, 6)]}
    flows = []
    for _ in range(n_flows):
        fam = 6 if rng.random() < v6_fraction else 4
        target = None
        if rng.random() < match_fraction and by_family[fam]:
            target = rng.choice(by_family[fam])
        flows.append(_flow_for(rng, target, fam))

    # every flow once, the rest Zipf(0.8) over the flows (rank order shuffled)
    seq = np.arange(n_flows)
    if n_frames > n_flows:
        w = 1.0 / np.arange(1, n_flows + 1) ** 0.8
        rank_to_flow = nprng.permutation(n_flows)
        extra = rank_to_flow[nprng.choice(n_flows, n_frames - n_flows, p=w / w.sum())]
        seq = np.concatenate([seq, extra])
    nprng.shuffle(seq)
    sizes = nprng.choice(len(_IMIX), n_frames, p=_IMIX_P)

    cache: dict[tuple[int, int], bytes] = {}
    frames = []
    for fi, si in zip(seq.tolist(), sizes.tolist(), strict=True):
        fr = cache.get((fi, si))
        if fr is None:
            fr = cache[(fi, si)] = build_frame(flows[fi], _IMIX[si])
        frames.append(fr)
    buf, offsets = frames_to_buffer(frames)
    # 1 ms apart on average, jittered, increasing
    ts = (1_700_000_000 * 10**9 + np.cumsum(nprng.integers(1, 2_000_000, n_frames))).astype(np.uint64)
    tr = Traffic(policies, n_flows, frames, buf, offsets, ts, flows)
    ids = PolicyTable(pols).classify((buf, offsets), cache=False)
    tr.matched = float((ids >= 0).mean())
    return tr


def _family(p: Policy) -> int:
    for cidr in (p.match.src, p.match.dst):
        if cidr is not None:
            return ipaddress.ip_network(cidr).version
    return 0


# ---------------------------------------------------------------------------
# fixtures


class BenchData:
    """What the benchmarks ask for; everything is built once per session."""

    sizes = SIZES

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._pcaps: dict[tuple, Path] = {}

    policies = staticmethod(make_policies)
    table = staticmethod(make_table)
    traffic = staticmethod(make_traffic)

    def pcap(self, policies: int, n_frames: int, n_flows: int, limit: int | None = None) -> Path:
        """The trace make_traffic(policies, n_frames, n_flows) (its first ``limit``
        frames) as a classic pcap file, written once per session."""
        key = (policies, n_frames, n_flows, limit)
        if key not in self._pcaps:
            tr = make_traffic(policies, n_frames, n_flows)
            self._pcaps[key] = tr.write_pcap(self._tmp / f"trace-{policies}-{n_frames}-{n_flows}-{limit}.pcap", limit)
        return self._pcaps[key]


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory: pytest.TempPathFactory) -> BenchData:
    return BenchData(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def Xdp():
    """The XDP data plane class, or a skip saying why it cannot run here."""
    if os.geteuid() != 0:
        pytest.skip("XDP needs root")
    try:
        from patronus.dataplane.xdp import Xdp

        return Xdp
    except DataplaneUnavailable as e:
        pytest.skip(str(e))


# -- the controller's benchmarks (a real server under load) ---------------------------------------

import pytest  # noqa: E402


@pytest.fixture
def benchmark_only(request):
    """Skip unless run with --benchmark-only: these start a real controller."""
    if not request.config.getoption("benchmark_only", False):
        pytest.skip("a real controller under load: run with --benchmark-only")


def pct_ms(xs: list[float], q: float) -> float:
    """The ``q`` quantile of seconds ``xs``, in milliseconds (0.1 ms)."""
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)
