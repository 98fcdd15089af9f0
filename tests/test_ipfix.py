"""IPFIX export (RFC 7011): messages decoded here by an independent reader
(templates first, then data sets by template), property-tested; then a real
collector, nfcapd from Debian's nfdump, receives a capture's flows from
`patronus flows --pcap ... --ipfix`, and `nfdump -r` must show exactly the
records the data plane drained (evicted, active-timeout and final ones)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus import abi
from patronus.errors import ConfigError
from patronus.ipfix import END_REASONS, PEN, TEMPLATE_V4, TEMPLATE_V6, IpfixExporter, parse_collector

ROOT = Path(__file__).resolve().parents[1]


# -- an independent reader -------------------------------------------------------------------------

def read_message(msg: bytes, templates: dict[int, list[tuple[int, int, int | None]]]) -> tuple[dict, list[dict]]:
    """(header, data records as {(ie, pen): int|bytes}) of one message; learns templates."""
    version, length, export_time, seq, domain = struct.unpack("!HHIII", msg[:16])
    assert version == 10 and length == len(msg)
    off, records = 16, []
    while off < length:
        set_id, set_len = struct.unpack("!HH", msg[off:off + 4])
        assert set_len >= 4 and off + set_len <= length
        body, off = msg[off + 4:off + set_len], off + set_len
        if set_id == 2:
            p = 0
            while p + 4 <= len(body):
                tid, count = struct.unpack("!HH", body[p:p + 4])
                p += 4
                fields = []
                for _ in range(count):
                    ie, flen = struct.unpack("!HH", body[p:p + 4])
                    p += 4
                    pen = None
                    if ie & 0x8000:
                        (pen,) = struct.unpack("!I", body[p:p + 4])
                        p += 4
                    fields.append((ie & 0x7FFF, flen, pen))
                templates[tid] = fields
        else:
            fields = templates[set_id]   # a data set before its template is a failure here
            size = sum(f[1] for f in fields)
            for p in range(0, len(body) - size + 1, size):
                rec, q = {"template": set_id}, p
                for ie, flen, pen in fields:
                    raw = body[q:q + flen]
                    rec[(ie, pen)] = raw if flen == 16 or ie in (8, 12) else int.from_bytes(raw, "big")
                    q += flen
                records.append(rec)
    return {"length": length, "export_time": export_time, "seq": seq, "domain": domain}, records


class Sink:
    """A UDP socket on loopback that keeps every datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.addr = self.sock.getsockname()

    def take(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except (socket.timeout, TimeoutError):
                return out

    def close(self) -> None:
        self.sock.close()


flow_rows = st.lists(st.tuples(
    st.sampled_from([4, 6]), st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
    st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 255), st.integers(0, 2**40),
    st.integers(0, 2**50), st.integers(0, 2**40), st.integers(0, 10**12), st.integers(-1, 1000),
    st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 63), st.integers(0, 2**32 - 1)),
    max_size=120)


def to_flows(rows: list[tuple]) -> np.ndarray:
    f = np.zeros(len(rows), abi.FLOW_DTYPE)
    for i, (fam, src, dst, sp, dp, pr, pk, by, first, dur, pol, path, flags, dscp, site) in enumerate(rows):
        f[i]["family"], f[i]["sport"], f[i]["dport"], f[i]["proto"] = fam, sp, dp, pr
        f[i]["src"] = np.frombuffer(src if fam == 6 else src[:4] + bytes(12), np.uint8)
        f[i]["dst"] = np.frombuffer(dst if fam == 6 else dst[:4] + bytes(12), np.uint8)
        f[i]["packets"], f[i]["bytes"], f[i]["first_ns"], f[i]["last_ns"] = pk, by, first, first + dur
        f[i]["policy"], f[i]["path"], f[i]["tcp_flags"], f[i]["dscp"], f[i]["site"] = pol, path, flags, dscp, site
    return f


@settings(max_examples=60, deadline=None)
@given(flow_rows, st.integers(200, 9000), st.sampled_from(list(END_REASONS)), st.booleans())
def test_every_flow_is_one_record_with_its_fields_in_messages_within_the_mtu(rows, mtu, reason, compiled):
    import patronus.ipfix as ipfix

    flows = to_flows(rows)
    sink = Sink()
    saved = ipfix._fast
    try:
        if not compiled:   # the numpy encoder, for an install without the extension
            ipfix._fast = None
        with IpfixExporter(sink.addr, mtu=mtu, clock_offset_ns=5_000_000, observation_domain=7) as exp:
            sent = exp.export(flows, reason)
            msgs = sink.take()
        ipfix._fast = saved
        assert sent == len(flows) == exp.stats()["records"] and exp.sequence == len(flows)
        templates: dict = {}
        got, seq = [], 0
        for i, m in enumerate(msgs):
            head, recs = read_message(m, templates)
            assert head["length"] <= mtu and head["domain"] == 7
            assert head["seq"] == seq   # the records sent before this message
            if i == 0:
                assert set(templates) == {TEMPLATE_V4, TEMPLATE_V6}   # the templates lead
            seq += len(recs)
            got += recs
        assert len(got) == len(flows)
        # records go out IPv4 first, then IPv6, each in the flows' order
        order = [i for fam in (4, 6) for i in range(len(flows)) if flows[i]["family"] == fam]
        for i, r in zip(order, got):
            f = flows[i]
            fam = int(f["family"])
            assert r["template"] == (TEMPLATE_V4 if fam == 4 else TEMPLATE_V6)
            src = (8, None) if fam == 4 else (27, None)
            assert r[src] == bytes(f["src"])[:4 if fam == 4 else 16]
            assert (r[(7, None)], r[(11, None)], r[(4, None)]) == (f["sport"], f["dport"], f["proto"])
            assert (r[(2, None)], r[(1, None)]) == (f["packets"], f["bytes"])
            assert r[(152, None)] == (int(f["first_ns"]) + 5_000_000) // 1_000_000
            assert r[(153, None)] == (int(f["last_ns"]) + 5_000_000) // 1_000_000
            assert r[(5, None)] == int(f["dscp"]) << 2 and r[(195, None)] == f["dscp"]
            assert r[(136, None)] == END_REASONS[reason]
            assert r[(1, PEN)] == (0xFFFFFFFF if f["policy"] < 0 else f["policy"])
            assert (r[(2, PEN)], r[(3, PEN)]) == (f["path"], f["site"])
    finally:
        ipfix._fast = saved
        sink.close()


def test_templates_are_sent_again_on_schedule_and_sequence_numbers_carry_on():
    sink = Sink()
    flows = to_flows([(4, bytes(16), bytes(16), 1, 2, 17, 1, 100, 0, 0, 0, 0, 0, 0, 0)] * 3)
    try:
        with IpfixExporter(sink.addr, template_refresh_s=0.2) as exp:
            exp.export(flows)
            exp.export(flows)                 # within the interval: data only
            deadline = time.monotonic() + 5
            while time.monotonic() < exp._next_templates and time.monotonic() < deadline:
                time.sleep(0.02)              # the schedule's own clock, not a margin
            exp.export(flows)
            msgs = sink.take()
        templates: dict = {}
        heads = []
        for m in msgs:
            sets = []
            off = 16
            while off < len(m):
                sid, slen = struct.unpack("!HH", m[off:off + 4])
                sets.append(sid)
                off += slen
            heads.append((read_message(m, templates)[0]["seq"], sets))
        assert heads == [(0, [2, TEMPLATE_V4]), (3, [TEMPLATE_V4]), (6, [2, TEMPLATE_V4])]
        assert exp.stats()["templates_sent"] == 2
    finally:
        sink.close()


@pytest.mark.parametrize("text", ["collector", "host:0", "host:70000", ":4739", "1.2.3.4:x"])
def test_a_bad_collector_is_refused_by_name(text):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_collector(text)


def test_bad_reasons_and_sizes_are_refused():
    with IpfixExporter(("127.0.0.1", 9)) as exp:
        with pytest.raises(ConfigError, match="flowEndReason"):
            exp.export(np.zeros(1, abi.FLOW_DTYPE), "tired")
        with pytest.raises(ConfigError, match="one code per flow"):
            exp.export(np.zeros(2, abi.FLOW_DTYPE), np.array([1], np.uint8))
    with pytest.raises(ConfigError, match="mtu"):
        IpfixExporter(("127.0.0.1", 9), mtu=100)


# -- a real collector ------------------------------------------------------------------------------

def write_capture(path: Path, t0: float) -> None:
    """2,000 short UDP/TCP flows over IPv4 and IPv6 spread over 100 s, and
    3 long flows with a packet every 5 s for 150 s (cut by a 60 s active timeout)."""
    import dpkt

    frames = []
    for i in range(2000):
        v6 = i % 4 == 0
        for k in range(1 + i % 3):
            ts = t0 + i * 0.05 + k * 0.01
            if v6:
                ip: Any = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, f"2001:db8::{i % 50 + 1:x}"),
                                       dst=socket.inet_pton(socket.AF_INET6, f"2001:db8:1::{i + 1:x}"), nxt=17,
                                       hlim=64)
                ip.data = dpkt.udp.UDP(sport=20000 + i, dport=53, data=b"q" * (20 + k))
                ip.data.ulen = len(ip.data)
                ip.plen = len(ip.data)
                eth_type = 0x86DD
            else:
                ip = dpkt.ip.IP(src=socket.inet_aton(f"10.0.{i % 50}.1"), dst=socket.inet_aton(f"10.1.{i // 250}.{i % 250 + 1}"),
                                p=17 if i % 2 else 6, tos=(46 << 2) if i % 5 == 0 else 0)
                if i % 2:
                    ip.data = dpkt.udp.UDP(sport=30000 + i, dport=5060, data=b"v" * (100 + k))
                    ip.data.ulen = len(ip.data)
                else:
                    ip.data = dpkt.tcp.TCP(sport=40000 + i, dport=443, flags=dpkt.tcp.TH_ACK, data=b"t" * (500 + k))
                ip.len = len(ip)
                eth_type = 0x0800
            frames.append((ts, bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=eth_type, data=ip))))
    for j in range(3):
        for k in range(31):
            ip = dpkt.ip.IP(src=socket.inet_aton("10.9.0.1"), dst=socket.inet_aton(f"10.9.1.{j + 1}"), p=17)
            ip.data = dpkt.udp.UDP(sport=7000 + j, dport=7000, data=b"L" * 200)
            ip.data.ulen = len(ip.data)
            ip.len = len(ip)
            frames.append((t0 + k * 5.0 + j * 0.001,
                           bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=0x0800, data=ip))))
    frames.sort(key=lambda x: x[0])
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh)
        for ts, raw in frames:
            w.writepkt(raw, ts=ts)


def drained(pcap: Path, capacity: int, idle: float, active: float) -> list[tuple]:
    """What the data plane drains for the capture, as the command exports it (the reference)."""
    from patronus import PolicyTable
    from patronus.dataplane import Userspace

    out = []
    with Userspace(PolicyTable([]), capacity, idle_timeout_s=idle, active_timeout_s=active) as dp:
        dp.process_pcap(pcap)
        for flows in (dp.drain(), dp.drain(flush=True)):
            for f in flows:
                fam = int(f["family"])
                n = 4 if fam == 4 else 16
                conv = socket.AF_INET if fam == 4 else socket.AF_INET6
                out.append((socket.inet_ntop(conv, bytes(f["src"])[:n]), socket.inet_ntop(conv, bytes(f["dst"])[:n]),
                            int(f["sport"]), int(f["dport"]), int(f["proto"]), int(f["packets"]), int(f["bytes"]),
                            int(f["first_ns"]) // 1_000_000, int(f["last_ns"]) // 1_000_000))
    return out


def test_nfcapd_receives_every_record_of_a_capture_exactly(tmp_path):
    if not shutil.which("nfcapd"):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("nfcapd not installed (apt-get install nfdump)")
    t0 = float(int(time.time()) - 3600)
    pcap = tmp_path / "flows.pcap"
    write_capture(pcap, t0)
    capacity, idle, active = 256, 15.0, 60.0   # a small table: evictions mid-run
    want = drained(pcap, capacity, idle, active)
    assert len(want) > 2003   # the long flows in several records each

    store = tmp_path / "nf"
    store.mkdir()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log = open(tmp_path / "nfcapd.log", "w+")
    # a receive buffer for the burst (-B): the capture's records arrive in well under a second
    nf = subprocess.Popen(["nfcapd", "-w", str(store), "-b", "127.0.0.1", "-p", str(port), "-t", "3600",
                           "-B", "16777216"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20   # listening once it has bound the port
        while f":{port:04X}" not in Path("/proc/net/udp").read_text() and time.monotonic() < deadline:
            assert nf.poll() is None, Path(tmp_path / "nfcapd.log").read_text()
            time.sleep(0.05)
        r = subprocess.run([sys.executable, "-m", "patronus.cli", "flows", "--pcap", str(pcap), "--ipfix",
                            f"127.0.0.1:{port}", "--capacity", str(capacity), "--idle-timeout", str(idle),
                            "--active-timeout", str(active)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        assert f"{len(want):,} flow records" in r.stdout and "flows evicted" in r.stdout, r.stdout
        evicted = int(r.stdout.split(" flows evicted")[0].rsplit("; ", 1)[1].replace(",", ""))
        assert evicted > 0, r.stdout
        # nfcapd has the records once its counter says so; then it is stopped and writes the file
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            files = list(store.glob("nfcapd.current.*"))
            if files and subprocess.run(["nfdump", "-r", str(files[0]), "-q", "-o", "csv"], capture_output=True,
                                        text=True).stdout.count("\n") >= len(want):
                break
            time.sleep(0.2)
    finally:
        nf.terminate()
        nf.wait(20)
    log.seek(0)
    said = log.read()
    assert "Sequence Errors: 0" in said and f"Flows: {len(want)}," in said, said
    (done,) = [f for f in store.glob("nfcapd.*") if "current" not in f.name]
    got_json = json.loads(subprocess.run(["nfdump", "-r", str(done), "-o", "json"], capture_output=True, text=True,
                                         check=True).stdout)

    def ms(text: str) -> int:   # nfdump prints local time with milliseconds
        import datetime

        return int(datetime.datetime.fromisoformat(text).timestamp() * 1000)

    got = [(g.get("src4_addr") or g.get("src6_addr"), g.get("dst4_addr") or g.get("dst6_addr"), g["src_port"],
            g["dst_port"], g["proto"], g["in_packets"], g["in_bytes"], ms(g["first"]), ms(g["last"]))
           for g in got_json]
    assert Counter(got) == Counter(want)
    # the long flows: several records each, adding up to every packet
    long = [g for g in got if g[3] == 7000]
    assert len(long) >= 9 and sum(g[5] for g in long) == 3 * 31
    tos = {(g.get("dst4_addr"), g["src_tos"]) for g in got_json if g.get("src_tos")}
    assert tos and all(t == 46 << 2 for _, t in tos)


class Nfcapd:
    """nfcapd on 127.0.0.1:``port`` in namespace ``ns`` (or here), storing in ``store``; stopped on exit."""

    def __init__(self, store: Path, port: int, ns: str | None = None) -> None:
        self.store, self.port, self.ns = store, port, ns
        store.mkdir(parents=True, exist_ok=True)
        self.log = open(store / "nfcapd.log", "w+")
        cmd = ["nfcapd", "-w", str(store), "-b", "127.0.0.1", "-p", str(port), "-t", "3600", "-B", "16777216"]
        self.proc = subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + cmd, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        udp = Path(f"/proc/{self.proc.pid}/net/udp")   # the namespace's table, seen through the process
        deadline = time.monotonic() + 20
        while f"0100007F:{port:04X}" not in (udp.read_text() if udp.exists() else "") and time.monotonic() < deadline:
            assert self.proc.poll() is None, (store / "nfcapd.log").read_text()
            time.sleep(0.05)

    def stop(self) -> tuple[str, list[dict]]:
        """Stop it; (what it said, the flows it stored as nfdump reads them)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.log.seek(0)
        files = [f for f in self.store.glob("nfcapd.*") if "current" not in f.name and f.suffix != ".log"]
        flows: list[dict] = []
        for f in files:
            out = subprocess.run(["nfdump", "-r", str(f), "-o", "json"], capture_output=True, text=True).stdout
            flows += json.loads(out) if out.strip() else []
        return self.log.read(), flows


def test_agents_export_every_flow_of_a_lab_run_to_nfcapd(tmp_path):
    """Two lab sites, each agent exporting to an nfcapd in its own namespace
    (idle 1 s, active 2 s): UDP flows of known sizes, one that lives 6 s (in
    several records), a TCP transfer; after the agents stop, nfdump holds
    every packet of every flow, exactly."""
    if os.geteuid() != 0 or not shutil.which("wireguard-go"):
        pytest.skip("needs root and wireguard-go")
    if not shutil.which("nfcapd"):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("nfcapd not installed (apt-get install nfdump)")
    from patronus.lab.net import Lab
    from patronus.netns import socket_in

    from .netns import require_xdp, unique

    require_xdp()
    lab = Lab(unique("F")[:6], sites=2, uplinks=2, state_dir=tmp_path)
    collectors: list[Nfcapd] = []
    try:
        lab.up(tunnels=False)
        state = lab.write_agent_state()
        collectors = [Nfcapd(tmp_path / f"nf{s}", 29995, lab.site_ns(s)) for s in range(2)]
        lab.start_agents(state, backend="xdp", extra=["--ipfix", "127.0.0.1:29995", "--flow-idle-timeout", "1",
                                                      "--flow-active-timeout", "2", "--log-format", "json"])
        lab.wait_agents()
        # the agents' logs as JSON lines (--log-format json): each names its site; BFD lines their path
        lines = [json.loads(x) for x in lab.agent_logs(200).splitlines() if x.startswith("{")]
        assert lines and {x["site"] for x in lines} == {"s0", "s1"}
        assert any(x.get("reason") == "bfd_up" and x.get("path") in {p.id for p in lab.mesh.paths()} for x in lines)
        tx = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
        rx = socket_in(lab.lan_ns(1), socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", 6100))
        sent: Counter = Counter()
        sizes = {}
        for i in range(20):                       # 20 short flows of 1-5 packets
            s = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 41000 + i))
            for _ in range(1 + i % 5):
                s.sendto(bytes(100 + i), (lab.lan_addr(1), 6100))
                sent[41000 + i] += 1
            sizes[41000 + i] = 20 + 8 + 100 + i
            s.close()
        tx.bind(("0.0.0.0", 42000))
        for _ in range(13):                       # one flow that lives 6 s: a packet every 0.5 s
            tx.sendto(bytes(300), (lab.lan_addr(1), 6100))
            sent[42000] += 1
            time.sleep(0.5)
        sizes[42000] = 20 + 8 + 300
        deadline = time.monotonic() + 30          # the receiver got them all (nothing lost on the way)
        got = 0
        rx.settimeout(0.5)
        while got < sum(sent.values()) and time.monotonic() < deadline:
            try:
                rx.recv(2048)
                got += 1
            except (socket.timeout, TimeoutError):
                pass
        assert got == sum(sent.values())
        # a policy more in the desired state: each agent replaces its data plane (another rule table size),
        # exporting the old one's flows first; then more traffic, counted in the new one
        from patronus import Match, Policy

        before = {s: (lab.agent_status(s, state) or {}).get("version") for s in range(2)}
        mesh = lab.mesh
        mesh.add_policy(Policy("bulk", Match(proto="tcp", dst_ports=443), priority=5))
        lab.write_agent_state(mesh, state)
        wait_until = time.monotonic() + 60
        while any((lab.agent_status(s, state) or {}).get("version") == before[s] for s in range(2)):
            assert time.monotonic() < wait_until, lab.agent_logs(20)
            time.sleep(0.1)
        s = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 43000))
        for _ in range(7):
            s.sendto(bytes(200), (lab.lan_addr(1), 6100))
        s.close()
        sent[43000], sizes[43000] = 7, 20 + 8 + 200
        deadline = time.monotonic() + 30
        got = 0
        while got < 7 and time.monotonic() < deadline:
            try:
                rx.recv(2048)
                got += 1
            except (socket.timeout, TimeoutError):
                pass
        assert got == 7
        lab.stop_agents()   # each exports what is still live as it stops
        said, flows = collectors[0].stop()
    finally:
        for c in collectors:
            with contextlib.suppress(Exception):
                c.stop()
        lab.down()
    assert "Sequence Errors: 0" in said, said
    mine = [f for f in flows if f.get("dst_port") == 6100 and f["proto"] == 17]
    by_port: Counter = Counter()
    octets: Counter = Counter()
    for f in mine:
        by_port[f["src_port"]] += f["in_packets"]
        octets[f["src_port"]] += f["in_bytes"]
    assert by_port == sent
    assert all(octets[p] == sent[p] * sizes[p] for p in sent)
    assert sum(1 for f in mine if f["src_port"] == 42000) >= 2   # the long flow in several records
