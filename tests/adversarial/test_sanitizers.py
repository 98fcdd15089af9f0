"""The C data plane under AddressSanitizer and UBSan, fed generated inputs.

tests/c/dataplane_fuzz.c is compiled once per session with csrc/classify.c,
sites.c and flowtable.c (and parse.h) and run on one binary input per
example: rules, site prefixes and timestamped frames (format at the top of
the C file). Inside, it checks pn_classify against pn_classify_linear,
pn_site_of against a brute-force longest-prefix scan, pn_dp_run against a
model of the flow table (LRU, idle / active timeouts, eviction at a tiny
capacity, route indexes), bursts against one frame at a time, and
pn_cache_run / pn_cache_classify against the linear classifier; any
violation or sanitizer report fails the example. Here the per-frame parse
results are also compared with patronus.reference.parse.

PATRONUS_FUZZ_EXAMPLES raises the number of examples and PATRONUS_FUZZ_LEAKS=1
turns on LeakSanitizer (`make fuzz` sets both).
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import packets as pk
from patronus import reference
from patronus.abi import MALFORMED_REASONS

from ..frames import V4, V6, any_frames
from ..sanitized import build, san_env

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["csrc/classify.c", "csrc/sites.c", "csrc/flowtable.c", "tests/c/dataplane_fuzz.c"]
# Leak checks only when asked (`make fuzz`): LeakSanitizer cannot run under
# ptrace, which some CI sandboxes use.
LEAKS = int(os.environ.get("PATRONUS_FUZZ_LEAKS", "0"))
SAN_ENV = san_env(bool(LEAKS))
EXAMPLES = int(os.environ.get("PATRONUS_FUZZ_EXAMPLES", "150"))

# struct layouts of csrc/patronus_abi.h and the harness header
HDR = struct.Struct("<HHHHBBHQQI")          # 32 bytes
RULE = struct.Struct("<16s16sBBBBHHHHBBHiI")  # struct pn_rule, 56 bytes
PFX = struct.Struct("<16sBBHI")             # struct pn_site_prefix, 24 bytes
FRAME = struct.Struct("<QH")

RF_SRC, RF_DST, RF_SPORT, RF_DPORT, RF_PROTO, RF_DSCP = 1, 2, 4, 8, 16, 32


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    return build(tmp_path_factory.mktemp("dataplane_c") / "dataplane_fuzz", SOURCES)


def run(exe: Path, data: bytes, *args: str) -> str:
    proc = subprocess.run([str(exe), *args, "-"], input=data, capture_output=True, env=SAN_ENV, timeout=60)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and not err, f"exit {proc.returncode}\n{err}\ninput: {data.hex()}"
    return proc.stdout.decode()


# --------------------------------------------------------------------------
# Input encoding
# --------------------------------------------------------------------------


def packed(family: int, addr: int) -> bytes:
    return addr.to_bytes(4 if family == 4 else 16, "big").ljust(16, b"\0")


def encode(rules, prefixes, frames, *, capacity=64, cache_log2=4, bump=False, npolicies=8,
           idle_ns=0, active_ns=0) -> bytes:
    """rules: RULE tuples; prefixes: (family, addr int, plen, site); frames: (ts, bytes)."""
    out = [HDR.pack(len(rules), len(prefixes), len(frames), capacity, cache_log2, int(bump), npolicies,
                    idle_ns, active_ns, 0)]
    out += [RULE.pack(*r) for r in rules]
    out += [PFX.pack(packed(f, a) if f in (4, 6) else a.to_bytes(16, "big"), plen, f, 0, site)
            for f, a, plen, site in prefixes]
    out += [FRAME.pack(ts, len(b)) + b for ts, b in frames]
    return b"".join(out)


def bits(family: int) -> int:
    return 32 if family == 4 else 128


def mask(family: int, addr: int, plen: int) -> int:
    b = bits(family)
    return addr & (((1 << plen) - 1) << (b - plen)) if plen else 0


def pool_int(family: int) -> st.SearchStrategy[int]:
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    pool = [int(cls(a)) for a in (V4 if family == 4 else V6)]
    return st.one_of(st.sampled_from(pool), st.integers(0, 2 ** bits(family) - 1))


@st.composite
def prefixes(draw, family=None):
    """(family, network int, plen), host bits zero; edge lengths favoured."""
    f = family or draw(st.sampled_from([4, 6]))
    b = bits(f)
    plen = draw(st.one_of(st.sampled_from([0, 1, 7, 8, 9, 16, 24, b - 1, b]), st.integers(0, b)))
    return f, mask(f, draw(pool_int(f)), plen), plen


ports = st.one_of(st.sampled_from([0, 1, 53, 80, 443, 5060, 5061, 65534, 65535]), st.integers(0, 65535))


@st.composite
def port_range(draw):
    a, b = draw(ports), draw(st.one_of(ports, st.just(None)))
    b = a if b is None else b
    return min(a, b), max(a, b)


@st.composite
def rules(draw, npolicies):
    family = draw(st.sampled_from([0, 4, 6]))
    flags, src, dst, splen, dplen = 0, b"\0" * 16, b"\0" * 16, 0, 0
    if family:
        if draw(st.booleans()):
            _, a, splen = draw(prefixes(family))
            src, flags = packed(family, a), flags | RF_SRC
        if draw(st.booleans()):
            _, a, dplen = draw(prefixes(family))
            dst, flags = packed(family, a), flags | RF_DST
    sp = dp = (0, 0)
    if draw(st.booleans()):
        sp, flags = draw(port_range()), flags | RF_SPORT
    if draw(st.booleans()):
        dp, flags = draw(port_range()), flags | RF_DPORT
    proto = dscp = 0
    if draw(st.booleans()):
        proto, flags = draw(st.one_of(st.sampled_from([1, 6, 17, 58]), st.integers(0, 255))), flags | RF_PROTO
    if draw(st.integers(0, 3)) == 0:
        dscp, flags = draw(st.integers(0, 63)), flags | RF_DSCP
    return (src, dst, splen, dplen, family, proto, sp[0], sp[1], dp[0], dp[1], dscp, flags, 0,
            draw(st.integers(0, npolicies - 1)), 0)


@st.composite
def site_prefixes(draw):
    """Site subnets, some nested in others, some given twice, a few invalid."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["new", "new", "nested", "duplicate", "invalid"])) if out else "new"
        site = draw(st.integers(1, 8))
        if kind == "new":
            f, a, plen = draw(prefixes())
        elif kind in ("nested", "duplicate"):
            f, a, plen, _ = draw(st.sampled_from([p for p in out if p[0] in (4, 6) and p[2] <= bits(p[0])]))
            if kind == "nested":  # a subnet of it, its own network address included
                host = draw(st.integers(0, 2 ** bits(f) - 1)) & ((1 << (bits(f) - plen)) - 1)
                plen = draw(st.integers(plen, bits(f)))
                a = mask(f, a | host, plen)
        else:
            f, a, plen, site = draw(st.sampled_from([(0, 0, 0, 1), (5, 0, 0, 1), (4, 0, 33, 1), (6, 0, 129, 1),
                                                     (4, 0, 8, 0)]))
        out.append((f, a, plen, site))
    return out


@st.composite
def targeted_frame(draw, nets):
    """A frame whose destination (and maybe source) sits on a prefix edge."""
    f, a, plen = draw(st.sampled_from(nets))
    hi = a | ((1 << (bits(f) - plen)) - 1)
    top = 2 ** bits(f) - 1
    pick = lambda: draw(st.sampled_from([a, hi, max(a - 1, 0), min(hi + 1, top),  # noqa: E731
                                         draw(st.integers(a, hi))]))
    cls = ipaddress.IPv4Address if f == 4 else ipaddress.IPv6Address
    dst = str(cls(pick()))
    src = str(cls(pick() if draw(st.booleans()) else draw(st.integers(0, top))))
    kind = draw(st.sampled_from(["udp", "tcp", "icmp"]))
    dscp = draw(st.integers(0, 63)) if draw(st.booleans()) else 0
    if kind == "icmp":
        return pk.icmp(src, dst, dscp=dscp)
    return getattr(pk, kind)(src, dst, draw(ports), draw(ports), dscp=dscp)


@st.composite
def inputs(draw):
    npolicies = draw(st.integers(1, 8))
    rl = draw(st.lists(rules(npolicies), max_size=12))
    sp = draw(site_prefixes())
    nets = [(f, a, p) for f, a, p, _ in sp if f in (4, 6) and p <= bits(f)]
    nets += [(r[4], int.from_bytes(r[1][: 4 if r[4] == 4 else 16], "big"), r[3]) for r in rl if r[11] & RF_DST]
    frame = st.one_of(any_frames, targeted_frame(nets)) if nets else any_frames
    raw = draw(st.lists(frame, max_size=40))
    # repeat some frames so flows get hits, timeouts and evictions
    if raw:
        raw += draw(st.lists(st.sampled_from(raw), max_size=20))
        raw = draw(st.permutations(raw))
    idle = draw(st.sampled_from([0, 0, 10, 1000, 10**9]))
    active = draw(st.sampled_from([0, 0, 15, 3000, 10**9]))
    ts = draw(st.sampled_from([0, 1, 10**18, 2**64 - 100]))
    frames = []
    for b in raw:
        frames.append((ts, b))
        step = draw(st.sampled_from([0, 1, 5, 10, 11, 999, 1000, 1001, 2**63, -1, -1000]))
        ts = (ts + step) % 2**64
    return encode(rl, sp, frames, capacity=draw(st.sampled_from([0, 1, 2, 3, 4, 7, 16, 1024])),
                  cache_log2=draw(st.integers(0, 6)), bump=draw(st.booleans()), npolicies=npolicies,
                  idle_ns=idle, active_ns=active), [b for _, b in frames]


def check_parse_lines(out: str, frames: list[bytes]) -> None:
    lines = [ln.split() for ln in out.splitlines() if ln.startswith("frame ")]
    assert len(lines) == len(frames)
    for ln, frame in zip(lines, frames):
        want = reference.parse(frame)
        rc = int(ln[2])
        if isinstance(want, reference.Malformed):
            assert rc != 0 and MALFORMED_REASONS[rc - 1] == want.reason, (frame.hex(), ln)
            continue
        assert rc == 0, (frame.hex(), ln, want)
        got = [int(x) for x in ln[5:13]] + [bytes.fromhex(ln[13]), bytes.fromhex(ln[14])]
        assert got == [want.family, want.proto, want.sport, want.dport, want.dscp, int(want.has_ports),
                       want.tcp_flags, want.l3_len, want.src, want.dst], (frame.hex(), ln, want)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(inputs())
def test_dataplane_generated_inputs(harness, case):
    data, frames = case
    out = run(harness, data, "-v")
    assert out.splitlines()[-1].startswith("ok "), out
    check_parse_lines(out, frames)


@settings(max_examples=max(EXAMPLES // 3, 10), deadline=None)
@given(st.binary(max_size=32).map(lambda h: h.ljust(32, b"\0")), st.binary(max_size=1500))
def test_dataplane_arbitrary_bytes(harness, header, body):
    """Any bytes are an input (counts capped, values folded into range)."""
    hdr = bytearray(header)
    for i in range(0, 8, 2):  # nrules, nprefixes, nframes, capacity: keep them small
        hdr[i + 1] = 0
        hdr[i] %= 40
    hdr[11] = 0  # npolicies < 256: the route table stays small
    assert run(harness, bytes(hdr) + body).startswith("ok ")


def random_table(rnd: random.Random, nrules: int, nprefixes: int):
    """Rules (policy i = rule i) and site prefixes in bulk, from a seed that
    hypothesis draws: past 64 rules the bitmaps span words, past 4096
    summary words. Mostly specific rules, so that frames aimed at one rule
    often hit it and not a wildcard before it."""
    def pfx(f, short=True):
        plen = rnd.choice([0, 8, 16, 24, bits(f), rnd.randint(0, bits(f))] if short else
                          [16, 24, bits(f) - 8, bits(f), rnd.randint(12, bits(f))])
        a = rnd.getrandbits(bits(f)) if rnd.random() < 0.7 else int(ipaddress.ip_address(
            rnd.choice(V4 if f == 4 else V6)))
        return mask(f, a, plen), plen

    rl = []
    for i in range(nrules):
        f = 0 if rnd.random() < 0.003 else rnd.choice([4, 6])
        flags = rnd.getrandbits(6) | (RF_DST if f else RF_PROTO | RF_DPORT)
        flags &= ~(RF_SRC | RF_DST) if not f else 0x3F
        (sa, sl), (da, dl) = (pfx(f), pfx(f, short=False)) if f else ((0, 0), (0, 0))
        sp = sorted(rnd.randint(0, 65535) for _ in range(2)) if flags & RF_SPORT else (0, 0)
        dp = sorted([rnd.choice([53, 443, 5060]), rnd.randint(0, 65535)]) if flags & RF_DPORT else (0, 0)
        proto = rnd.choice([6, 17]) if flags & (RF_SPORT | RF_DPORT) else rnd.choice([1, 6, 17, 58])
        rl.append((packed(f, sa) if f else b"\0" * 16, packed(f, da) if f else b"\0" * 16, sl, dl, f,
                   proto, *sp, *dp, rnd.choice([0, 46, rnd.randint(0, 63)]), flags, 0, i, 0))
    sp = []
    for _ in range(nprefixes):
        if sp and rnd.random() < 0.4:  # nested in or equal to an earlier one
            f, a, plen, _ = rnd.choice(sp)
            host = rnd.getrandbits(bits(f)) & ((1 << (bits(f) - plen)) - 1)
            plen = rnd.randint(plen, bits(f))
            a = mask(f, a | host, plen)
        else:
            f = rnd.choice([4, 6])
            a, plen = pfx(f)
        sp.append((f, a, plen, rnd.randint(1, 64)))
    return rl, sp


def aimed_frame(rnd: random.Random, r, sp, to_site: bool) -> bytes:
    """A frame matching rule r (src, dst, ports, protocol, DSCP), or, with
    to_site, the same but for a destination in a random site prefix."""
    f = r[4] or rnd.choice([4, 6])
    cls = ipaddress.IPv4Address if f == 4 else ipaddress.IPv6Address

    def inside(a, plen):
        return str(cls(a | rnd.getrandbits(bits(f)) & ((1 << (bits(f) - plen)) - 1)))

    src = inside(int.from_bytes(r[0][: bits(f) // 8], "big"), r[2])
    sites = [(a, p) for g, a, p, _ in sp if g == f]
    dst = inside(*(rnd.choice(sites) if sites and to_site else
                   (int.from_bytes(r[1][: bits(f) // 8], "big"), r[3])))
    dscp = r[10] if r[11] & RF_DSCP else rnd.randint(0, 63)
    sport, dport = rnd.randint(r[6], r[7]), rnd.randint(r[8], r[9])
    if r[5] == 6:
        return pk.tcp(src, dst, sport, dport, dscp=dscp)
    if r[5] == 17:
        return pk.udp(src, dst, sport, dport, dscp=dscp)
    ip = (pk.ipv4 if f == 4 else pk.ipv6)(src, dst, r[5], b"\0" * 8, dscp=dscp)
    return pk.ethernet(ip, 0x0800 if f == 4 else 0x86DD)


@settings(max_examples=max(EXAMPLES // 30, 4), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(0, 2**32 - 1), st.sampled_from([65, 130, 700, 4097, 4300, 8500]),
       st.integers(0, 300), st.lists(any_frames, max_size=20))
def test_dataplane_big_tables(harness, seed, nrules, nprefixes, extra):
    rnd = random.Random(seed)
    rl, sp = random_table(rnd, nrules, nprefixes)
    # aimed at rules throughout the table, the last ones (other summary words) included
    aims = [rnd.randrange(len(rl)) for _ in range(150)] + list(range(max(len(rl) - 50, 0), len(rl)))
    to_site = [rnd.random() < 0.3 for _ in aims]
    frames = [aimed_frame(rnd, rl[i], sp, t) for i, t in zip(aims, to_site)] + extra
    out = run(harness, encode(rl, sp, [(i, b) for i, b in enumerate(frames)], capacity=rnd.choice([1, 5, 100]),
                              npolicies=len(rl), idle_ns=rnd.choice([0, 50]), active_ns=rnd.choice([0, 30]),
                              bump=True), "-v")
    assert out.splitlines()[-1].startswith("ok "), out
    check_parse_lines(out, frames)
    # each frame aimed at a rule matches it, or one before it
    for i, t, ln in zip(aims, to_site, out.splitlines()):
        assert t or 0 <= int(ln.split()[3]) <= i, (i, ln)


def summary(out: str) -> dict[str, int]:
    words = out.split()
    return {k: int(v) for k, v in zip(words[1::2], words[2::2])}


def test_every_path_is_reached(harness):
    """A hand-made input that evicts, expires idle and active flows and has
    nested and duplicate site prefixes: the harness really goes there."""
    v4 = lambda s: int(ipaddress.IPv4Address(s))  # noqa: E731
    rl = [
        (b"\0" * 16, packed(4, v4("10.2.0.0")), 0, 16, 4, 17, 0, 0, 5060, 5061, 0, RF_DST | RF_DPORT | RF_PROTO, 0,
         1, 0),
        (b"\0" * 16, b"\0" * 16, 0, 0, 0, 0, 0, 0, 0, 0, 46, RF_DSCP, 0, 2, 0),
        (packed(6, 0), b"\0" * 16, 0, 0, 6, 0, 0, 0, 0, 0, 0, RF_SRC, 0, 0, 0),
    ]
    sp = [(4, v4("10.0.0.0"), 8, 1), (4, v4("10.2.0.0"), 16, 2), (4, v4("10.2.3.0"), 24, 3),
          (4, v4("10.2.3.0"), 24, 4), (4, 0, 0, 5), (6, 0, 0, 6), (6, 1, 128, 7), (4, 0, 8, 0)]
    fr = [pk.udp("10.1.0.1", "10.2.3.4", 1000, 5060), pk.udp("10.1.0.1", "10.2.9.9", 1000, 5061),
          pk.icmp("10.1.0.1", "10.9.9.9", dscp=46), pk.icmp("2001:db8::1", "::1"), pk.tcp("1.1.1.1", "2.2.2.2", 1, 2)]
    seq = [(t, fr[i]) for t, i in enumerate([0, 1, 2, 3, 4, 0, 0, 1, 4, 4, 4, 4, 4, 4, 2, 3, 0])]
    seq += [(1000, fr[0][:20]), (1000, fr[1])]
    out = run(harness, encode(rl, sp, seq, capacity=3, idle_ns=20, active_ns=4, bump=True, npolicies=3))
    s = summary(out)
    assert s["frames"] == 19 and s["parsed"] == 18 and s["prefixes"] == 7
    assert s["evicted"] and s["idle"] and s["active"], out
