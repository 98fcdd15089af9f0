"""Userspace.process_pcap on the checked-in captures, against flows written out by hand
(tests/fixtures/EXPECTED.md, expected.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np
import pytest

from patronus import ConfigError, Match, Policy, PolicyTable
from patronus.dataplane import Userspace

from .fixtures.expected import EXPECTED

FIX = Path(__file__).parent / "fixtures"
TABLE = [Policy("sip", Match(proto="udp", dst_ports=5060), priority=1), Policy("tcp", Match(proto="tcp"), priority=2)]


def as_dicts(flows: np.ndarray) -> list[dict]:
    out = []
    for r in flows:
        fam = int(r["family"])
        conv = ipaddress.IPv4Address if fam == 4 else ipaddress.IPv6Address
        raw = (lambda b: bytes(b)[:4]) if fam == 4 else bytes
        out.append(dict(src=str(conv(raw(r["src"]))), dst=str(conv(raw(r["dst"]))), sport=int(r["sport"]),
                        dport=int(r["dport"]), proto=int(r["proto"]), packets=int(r["packets"]),
                        bytes=int(r["bytes"]), first_ns=int(r["first_ns"]), last_ns=int(r["last_ns"]),
                        tcp_flags=int(r["tcp_flags"])))
    return out


def key(d: dict) -> tuple:
    return (d["first_ns"], d["src"], d["dst"], d["sport"], d["dport"], d["proto"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_flows_by_hand(name):
    exp = EXPECTED[name]
    dp = Userspace(PolicyTable(TABLE), flow_capacity=64)
    if exp["status"] == "END":
        ids = dp.process_pcap(FIX / name)
    else:
        with pytest.warns(RuntimeWarning, match="truncated"):
            ids = dp.process_pcap(FIX / name)
    info = dp.last_capture
    assert info["format"] == exp["format"]
    assert info["packets"] == len(exp["packets"]) == len(ids)
    got = sorted(as_dicts(dp.flows()), key=key)
    want = sorted(exp["flows"], key=key)
    assert got == want
    c = dp.counters()
    assert {k: v for k, v in c["malformed"].items() if v} == exp["malformed"]
    # sip flows are the UDP ones to port 5060 with ports; tcp the TCP ones
    sip = sum(f["packets"] for f in want if f["proto"] == 17 and f["dport"] == 5060)
    tcp = sum(f["packets"] for f in want if f["proto"] == 6)
    assert c["policies"]["sip"]["packets"] == sip and c["policies"]["tcp"]["packets"] == tcp
    assert int((ids == 0).sum()) == sip


def test_not_a_capture(tmp_path):
    bad = tmp_path / "x.pcap"
    bad.write_bytes(b"GIF89a" + bytes(100))
    dp = Userspace(PolicyTable([]), 8)
    with pytest.raises(ConfigError, match="not a readable capture"):
        dp.process_pcap(bad)
    (tmp_path / "empty.pcap").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty file"):
        dp.process_pcap(tmp_path / "empty.pcap")
