"""Userspace.process_pcap on the checked-in captures, against flows written out by hand
(tests/fixtures/EXPECTED.md, expected.py)."""

from __future__ import annotations

import ipaddress
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Match, Policy, PolicyTable
from patronus.dataplane import Userspace

from .fixtures.expected import EXPECTED
from .fixtures.make_captures import epb, idb, pcap_file, shb
from .frames import any_frames, valid_frames

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


def _pcapng(frames: list[bytes], linktypes: list[int], cut: int) -> bytes:
    """One section, an interface per link type, every frame on the interface
    drawn for it, the last ``cut`` bytes cut off (0: a clean end)."""
    e = "<"
    out = shb(e) + b"".join(idb(e, linktype=lt) for lt in (1, 101))
    t = 1_700_000_000_000_000
    for i, (f, lt) in enumerate(zip(frames, linktypes)):
        t += 700 + (i * 7919) % 3000
        out += epb(e, 0 if lt == 1 else 1, t, f)
    return out[:len(out) - cut] if cut else out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_frames, min_size=1, max_size=40), st.one_of(st.integers(1, 50), st.integers(1_000, 6_000)),
       st.integers(0, 2**32 - 1),
       st.sampled_from([0, 0, 3, 40]), st.sampled_from([4, 64, 4096]))
def test_two_threads_account_exactly_as_one(tmp_path_factory, pool, n, seed, cut, capacity):
    """The reader thread hands batches of 1,024 records to the accounting
    thread: the same ids, flows, exports and counters as one thread, across
    batch edges, evictions, timeouts, other link types and a truncated end."""
    rng = np.random.default_rng(seed)
    frames = [pool[i] for i in rng.integers(0, len(pool), n)]
    linktypes = [101 if x < 0.05 else 1 for x in rng.random(n)]
    path = tmp_path_factory.mktemp("two") / "t.pcapng"
    path.write_bytes(_pcapng(frames, linktypes, cut))
    got = []
    for threads in (1, 2):
        dp = Userspace(PolicyTable(TABLE), flow_capacity=capacity, idle_timeout_s=0.002)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # the truncated end, checked below
            ids = dp.process_pcap(path, threads=threads)
        info = dp.last_capture
        assert info["threads"] == threads
        got.append((ids.tolist(), info["packets"], info["skipped_linktype"], info["error"],
                    sorted(map(tuple, as_dicts(dp.flows()))), sorted(map(tuple, as_dicts(dp.drain()))),
                    dp.counters()))
    assert got[0] == got[1]
    assert got[0][1] == len(got[0][0]) == (n if not cut else got[0][1])
    assert (got[0][3] is None) == (cut == 0)


def test_threads_must_be_one_or_two(tmp_path):
    with pytest.raises(ConfigError, match="threads"):
        Userspace(PolicyTable(TABLE), 8).process_pcap(FIX / sorted(EXPECTED)[0], threads=3)


TRUNCATIONS = {"trunc_l2", "trunc_ip", "trunc_l4", "trunc_ext"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(valid_frames(), st.integers(0, 2_000)), min_size=1, max_size=30))
def test_a_snapped_frame_counts_at_its_ip_length_or_as_a_truncation(tmp_path_factory, drawn):
    """A capture's snap length cuts frames short (``tcpdump -s 96``): a frame
    whose headers survived the cut is accounted exactly as the whole frame
    (its IP length, from the IP header); one whose headers did not is a
    truncation (never ``bad_len``, which is for an IP length past the wire)."""
    d = tmp_path_factory.mktemp("snap")
    whole_recs, snap_recs = [], []
    for i, (f, cut) in enumerate(drawn):
        snap = f[:cut]
        whole_recs.append((1_700_000_000, i, f))
        snap_recs.append((1_700_000_000, i, snap, len(f)))
    (d / "whole.pcap").write_bytes(pcap_file(whole_recs, big_endian=False, nanos=False))
    (d / "snap.pcap").write_bytes(pcap_file(snap_recs, big_endian=False, nanos=False))
    whole = Userspace(PolicyTable(TABLE), flow_capacity=64)
    snapped = Userspace(PolicyTable(TABLE), flow_capacity=64)
    w_ids = whole.process_pcap(d / "whole.pcap")
    s_ids = snapped.process_pcap(d / "snap.pcap")
    assert snapped.last_capture["snapped"] == sum(1 for f, cut in drawn if cut < len(f))
    # frame by frame: the same verdict, or a truncation where the whole frame was fine
    per_frame = []
    for f, cut in drawn:
        one_w, one_s = Userspace(PolicyTable(TABLE), 4), Userspace(PolicyTable(TABLE), 4)
        (d / "1w.pcap").write_bytes(pcap_file([(1, 0, f)], big_endian=False, nanos=False))
        (d / "1s.pcap").write_bytes(pcap_file([(1, 0, f[:cut], len(f))], big_endian=False, nanos=False))
        one_w.process_pcap(d / "1w.pcap")
        one_s.process_pcap(d / "1s.pcap")
        mw = {k for k, v in one_w.counters()["malformed"].items() if v}
        ms = {k for k, v in one_s.counters()["malformed"].items() if v}
        assert "bad_len" not in ms - mw
        if ms and not mw:
            assert ms <= TRUNCATIONS
        elif not ms:
            assert as_dicts(one_s.flows()) == as_dicts(one_w.flows())   # same key, packets and IP bytes
        per_frame.append(bool(ms))
    assert [int(x) for x in s_ids] == [(-1 if bad else int(x)) for x, bad in zip(w_ids, per_frame)]
