"""Hypothesis strategies for the model: valid objects, and the raw inputs they are built from."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from patronus import Failover, Match, Policy, QoS, Site, Uplink

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,11}", fullmatch=True)
# site and uplink names make path ids ("site.uplink~site.uplink"): no '.'
endpoint_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,11}", fullmatch=True)


@st.composite
def networks(draw, version=None):
    v = draw(st.sampled_from([4, 6])) if version is None else version
    bits = 32 if v == 4 else 128
    plen = draw(st.integers(0, bits))
    addr = draw(st.integers(0, 2**bits - 1))
    addr &= ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
    return str((ipaddress.IPv4Network if v == 4 else ipaddress.IPv6Network)((addr, plen)))


addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
ports = st.integers(0, 65535)
port_ranges = st.one_of(st.none(), ports, st.tuples(ports, ports).map(lambda t: (min(t), max(t))))

uplinks = st.builds(
    Uplink, name=endpoint_names, address=addresses, mtu=st.integers(576, 9000),
    port=st.one_of(st.none(), st.integers(1, 65535)), nat=st.booleans(),
    bandwidth_mbps=st.one_of(st.none(), st.floats(0.001, 1e5)), cost=st.integers(0, 100),
)


@st.composite
def matches(draw):
    fam = draw(st.sampled_from([4, 6]))
    src = draw(st.one_of(st.none(), networks(fam)))
    dst = draw(st.one_of(st.none(), networks(fam)))
    sp, dp = draw(port_ranges), draw(port_ranges)
    if sp is not None or dp is not None:
        proto = draw(st.sampled_from([None, "tcp", "udp", 6, 17]))
    else:
        proto = draw(st.one_of(st.none(), st.sampled_from(["tcp", "udp", "icmp", "icmpv6"]), st.integers(0, 255)))
    dscp = draw(st.one_of(st.none(), st.integers(0, 63)))
    return Match(src=src, dst=dst, src_ports=sp, dst_ports=dp, proto=proto, dscp=dscp)


qos = st.builds(QoS, dscp=st.one_of(st.none(), st.integers(0, 63)),
                rate_kbps=st.one_of(st.none(), st.integers(1, 10**6)))


@st.composite
def policy_lists(draw, max_size=12, apps=("default", "voip", "video", "gaming", "bulk")):
    n = draw(st.integers(0, max_size))
    pnames = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    prios = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n, unique=True))
    return [
        Policy(pn, draw(matches()), priority=pr, app=draw(st.sampled_from(apps)), qos=draw(qos),
               prefer=tuple(draw(st.lists(names, max_size=3, unique=True))),
               action=draw(st.sampled_from(["forward", "drop"])))
        for pn, pr in zip(pnames, prios)
    ]


failovers = st.builds(
    Failover, detect_ms=st.integers(30, 5000), failback_hold_s=st.floats(0, 3600),
    multiplier=st.integers(1, 10), sla_windows=st.integers(1, 20), cooldown_s=st.floats(0, 60),
)


@st.composite
def site_lists(draw, max_sites=5):
    """Sites with non-overlapping subnets (each site owns its own /24 and /64)."""
    n = draw(st.integers(0, max_sites))
    snames = draw(st.lists(endpoint_names, min_size=n, max_size=n, unique=True))
    out = []
    for i, sn in enumerate(snames):
        subnets = draw(st.sets(st.sampled_from([f"10.{i}.{j}.0/24" for j in range(4)]
                                               + [f"fd00:{i}:{j}::/64" for j in range(4)]), max_size=3))
        ups = draw(st.lists(uplinks, min_size=1, max_size=3, unique_by=lambda u: u.name))
        out.append(Site(sn, subnets=sorted(subnets), uplinks=ups))
    return out


def _prefix_of(addr: str, plen: int) -> str:
    return str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))


@st.composite
def site_tables(draw, max_sites=6):
    """A random site table (name -> subnets) whose prefixes often hold the
    addresses of tests/frames.py and nest inside each other across sites
    (longest prefix decides), never the same prefix twice."""
    from .frames import V4, V6

    n = draw(st.integers(0, max_sites))
    snames = draw(st.lists(endpoint_names, min_size=n, max_size=n, unique=True))
    seen: set[str] = set()
    table: dict[str, list[str]] = {}
    for sn in snames:
        nets = []
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["v4", "v6", "random"]))
            if kind == "v4":
                net = _prefix_of(draw(st.sampled_from(V4)), draw(st.integers(0, 32)))
            elif kind == "v6":
                net = _prefix_of(draw(st.sampled_from(V6)), draw(st.integers(0, 128)))
            else:
                net = draw(networks())
            if net not in seen:
                seen.add(net)
                nets.append(net)
        table[sn] = nets
    return table
