"""Write docs/notebooks/pcap_flows.ipynb (no outputs) from the cells below.

    .venv/bin/python docs/notebooks/make_pcap_flows.py

Edit the cells here, not in the .ipynb, and re-run: tests/test_notebook.py
checks that the checked-in notebook is exactly what this script writes, then
executes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).with_name("pcap_flows.ipynb")

# (kind, source): "md" for markdown, "py" for code. Each code cell follows the
# markdown cell that says what it does and why.
CELLS: list[tuple[str, str]] = [
    ("md", """
        # Offline flow analysis of a packet capture

        You have a capture from a site (tcpdump, Wireshark, a SPAN port) and you want to know,
        before changing anything on the network:

        * which of your SD-WAN policies each conversation would land in,
        * how many flows, packets and bytes each policy carries, and what falls through to the default,
        * which frames the data plane could not parse, and why,
        * how the traffic mix changes over the minute of the capture.

        This notebook runs the patronus **userspace data plane** over the file. It needs no root,
        no interfaces and sends nothing: it is the same parser, classifier and flow table the
        forwarding path uses, fed from a file instead of a NIC.

        To analyse your own capture, start Jupyter with `PATRONUS_PCAP=/path/to/capture.pcap`
        (pcap or pcapng; the time plot at the end reads classic pcap only). Without it the
        notebook makes a one-minute capture of a small branch office and uses that.
    """),
    ("md", """
        ## Setup

        Imports only. `%matplotlib inline` draws the plots as images inside the notebook, so
        no display is needed (it also works on a headless server).
    """),
    ("py", """
        %matplotlib inline
        import os
        import random
        import shutil
        import struct
        import tempfile

        import matplotlib.pyplot as plt
        import pandas as pd

        import patronus
        from patronus import Match, Policy, PolicyTable, QoS, packets
        from patronus.apps import BUILTIN_PROFILES
        from patronus.dataplane import Userspace

        pd.set_option("display.width", 120)
    """),
    ("md", """
        ## 1. The capture

        If `PATRONUS_PCAP` is set we use that file. Otherwise the next cells build a synthetic
        but realistic minute of traffic at a branch, frame by frame, with `patronus.packets`
        (plain Ethernet/IP/UDP/TCP headers, no scapy needed):

        | traffic | what it looks like on the wire |
        |---|---|
        | a phone call | SIP signalling on UDP 5060 (DSCP 24), then 30 s of RTP both ways at 50 packets/s (20 ms G.711), DSCP 46 (EF) |
        | a backup job | rsync over TCP to port 873: full-size segments to the server, an ACK back for every second one |
        | web browsing | a DNS lookup, then a short HTTPS exchange; about a third of it over IPv6 |
        | the usual noise | ARP, pings, and a few frames cut short by the capture's snap length |

        Every frame gets a capture timestamp. `at()` collects `(timestamp, frame, length on the wire)`.
    """),
    ("py", """
        PCAP = os.environ.get("PATRONUS_PCAP")   # your capture, if you gave one

        rng = random.Random(42)                  # fixed seed: the same capture on every run
        T0 = 1_715_677_200 * 10**9               # 2024-05-14 09:00:00 UTC, in ns
        events = []                              # (timestamp ns, frame, wire length)

        def at(t_s, frame, wire=None):
            events.append((T0 + int(t_s * 1e9), frame, wire or len(frame)))
    """),
    ("md", """
        **The phone call.** SIP INVITE / 100 Trying / 180 Ringing / 200 OK, 30 s of RTP in both
        directions (172 bytes of UDP payload = 12 bytes RTP header + 160 bytes of G.711 audio),
        then BYE / 200 OK. Packets leave every 20 ms with a little jitter.
    """),
    ("py", """
        PHONE, PBX = "10.1.0.21", "10.2.0.10"

        def sip(t, src, dst):
            at(t, packets.udp(src, dst, 5060, 5060, b"SIP/2.0" + bytes(500), dscp=24))

        for i, t in enumerate([5.00, 5.03, 5.20, 5.45]):
            sip(t, *((PHONE, PBX) if i == 0 else (PBX, PHONE)))
        for k in range(30 * 50):
            t = 5.5 + k * 0.020
            at(t + rng.uniform(0, 0.002), packets.udp(PHONE, PBX, 16384, 20000, bytes(172), dscp=46))
            at(t + 0.007 + rng.uniform(0, 0.002), packets.udp(PBX, PHONE, 20000, 16384, bytes(172), dscp=46))
        sip(35.6, PHONE, PBX)
        sip(35.62, PBX, PHONE)
    """),
    ("md", """
        **The backup job.** A file server pushes about 2.3 MB to the backup server over 24 s
        (TCP port 873, rsync), with the ACKs coming back the other way.
    """),
    ("py", """
        FILER, BACKUP = "10.1.0.50", "10.2.0.200"
        at(20.0, packets.tcp(FILER, BACKUP, 51515, 873, flags=0x02))                 # SYN
        at(20.004, packets.tcp(BACKUP, FILER, 873, 51515, flags=0x12))               # SYN-ACK
        for k in range(1600):
            t = 20.01 + k * 0.015
            at(t, packets.tcp(FILER, BACKUP, 51515, 873, bytes(1448), flags=0x18))  # data
            if k % 2:
                at(t + 0.004, packets.tcp(BACKUP, FILER, 873, 51515, flags=0x10))    # ACK
    """),
    ("md", """
        **Web browsing.** 120 page loads from five clients spread over the minute: a DNS query and
        its answer, then a TCP handshake and a few request/response segments on port 443.
        Roughly a third of the clients use IPv6 (documentation prefix `2001:db8::/32`).
    """),
    ("py", """
        for _ in range(120):
            t, v6 = rng.uniform(0, 58), rng.random() < 0.35
            client = rng.choice(["2001:db8:1::31", "2001:db8:1::32"] if v6 else ["10.1.0.31", "10.1.0.32", "10.1.0.33"])
            resolver = "2001:db8:1::1" if v6 else "10.1.0.1"
            server = f"2001:db8:f::{rng.randint(1, 200):x}" if v6 else f"203.0.113.{rng.randint(1, 254)}"
            dns_port, port = rng.randint(49152, 65535), rng.randint(49152, 65535)
            at(t, packets.udp(client, resolver, dns_port, 53, bytes(40)))
            at(t + 0.02, packets.udp(resolver, client, 53, dns_port, bytes(90)))
            at(t + 0.03, packets.tcp(client, server, port, 443, flags=0x02))
            at(t + 0.06, packets.tcp(server, client, 443, port, flags=0x12))
            for j in range(rng.randint(3, 12)):
                at(t + 0.07 + j * 0.02, packets.tcp(client, server, port, 443, bytes(rng.randint(80, 600)), flags=0x18))
                at(t + 0.08 + j * 0.02, packets.tcp(server, client, 443, port, bytes(1400), flags=0x18))
    """),
    ("md", """
        **The usual noise.** ARP (not IP at all), a ping every 3 s, and a few RTP frames that the
        capture cut short (their length on the wire is still recorded, as a real snap length does).
    """),
    ("py", """
        for _ in range(30):
            at(rng.uniform(0, 60), packets.ethernet(bytes(28), 0x0806))              # ARP
        for k in range(20):
            at(k * 3.0, packets.icmp("10.1.0.1", "10.2.0.1"))                         # ping
        for cut in (30, 30, 38, 38, 38):
            rtp = packets.udp(PHONE, PBX, 16384, 20000, bytes(172), dscp=46)
            at(rng.uniform(6, 35), rtp[:cut], wire=len(rtp))                          # cut short
        print(len(events), "frames")
    """),
    ("md", """
        **Writing the file.** A classic pcap is a 24-byte file header (magic number, version,
        snap length, link type 1 = Ethernet) followed by, per frame, a 16-byte record header
        (seconds, microseconds, captured length, length on the wire) and the frame bytes.
        We write it into a temporary directory that the last cell removes.
    """),
    ("py", """
        def write_pcap(path, events):
            with open(path, "wb") as f:
                f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
                for ts, frame, wire in sorted(events, key=lambda e: e[0]):
                    sec, usec = divmod(ts // 1000, 1_000_000)
                    f.write(struct.pack("<IIII", sec, usec, len(frame), wire) + frame)

        workdir = None
        if not PCAP:
            workdir = tempfile.mkdtemp(prefix="patronus-notebook-")
            PCAP = os.path.join(workdir, "branch-1min.pcap")
            write_pcap(PCAP, events)
        print(PCAP, os.path.getsize(PCAP), "bytes")
    """),
    ("md", """
        ## 2. The policies

        A policy says *which packets* (`Match`: addresses, ports, protocol, DSCP; unset fields match
        anything), *in which order* (`priority`, lower first, first match wins, like `ip rule`),
        *what they need from the WAN* (`app`: an application profile with SLA targets) and
        *how to mark or shape them* (`QoS`). Packets no policy matches go to the **default**.

        Two things worth knowing when reading the results:

        * a match is **one direction**: `dst_ports=443` takes the requests to web servers, not the
          answers coming back from port 443 (those land in the default unless you add a rule);
        * the data plane decides a flow's policy on its **first packet** and keeps it.
    """),
    ("py", """
        policies = [
            Policy("voice", Match(proto="udp", dscp=46), priority=10, app="voip", qos=QoS(dscp=46)),
            Policy("sip", Match(proto="udp", dst_ports=(5060, 5061)), priority=20, app="voip", qos=QoS(dscp=24)),
            Policy("dns", Match(proto="udp", dst_ports=53), priority=30),
            Policy("backup", Match(proto="tcp", dst_ports=873), priority=40, app="bulk",
                   qos=QoS(dscp=8, rate_kbps=20_000)),
            Policy("web", Match(proto="tcp", dst_ports=443), priority=50),
        ]
        table = PolicyTable(policies)
        table
    """),
    ("md", """
        The same policies as a table, with the SLA targets of their application profile
        (round-trip figures; where they come from is in `docs/APPLICATIONS.md`).
    """),
    ("py", """
        pd.DataFrame([{
            "policy": p.name, "priority": p.priority, "proto": p.match.proto_name, "dst_ports": p.match.dst_ports_text,
            "dscp": p.match.dscp, "app": p.app, "max_rtt_ms": BUILTIN_PROFILES[p.app].max_rtt_ms,
            "max_loss_pct": BUILTIN_PROFILES[p.app].max_loss_pct, "mark_dscp": p.qos.dscp, "rate_kbps": p.qos.rate_kbps,
        } for p in table.by_priority]).set_index("policy")
    """),
    ("md", """
        ## 3. Run the data plane over the capture

        `Userspace` is the data plane without the kernel. `flow_capacity` bounds its flow table (one
        entry per direction of a conversation, keyed by addresses, ports and protocol); when it is
        full the least recently used flow is evicted and counted, so for a large capture raise it
        until `evicted` below stays 0. `process_pcap` reads the file in C and returns, for every
        frame, the index of the policy it was accounted to (-1: default or unparseable).
    """),
    ("py", """
        dp = Userspace(table, flow_capacity=16_384)
        ids = dp.process_pcap(PCAP)
        dp.last_capture
    """),
    ("md", """
        ## 4. Flows per policy

        `dp.flows()` is the flow table as a numpy record array; `flows_to_pandas` turns it into a
        DataFrame with readable addresses and the policy name. The biggest flows first:
    """),
    ("py", """
        flows = dp.flows()
        df = patronus.flows_to_pandas(flows, table)
        cols = ["src", "dst", "sport", "dport", "proto", "dscp", "packets", "bytes", "policy_name"]
        df.sort_values("bytes", ascending=False)[cols].head(10)
    """),
    ("md", """
        Summed per policy. *flows* counts each direction separately. The default is large here on
        purpose: it holds the answers from web servers (source port 443), the DNS answers and the
        rsync ACKs, which no policy matches in that direction, plus pings.
    """),
    ("py", """
        order = [p.name for p in table.policies] + ["(default)"]
        per_policy = (df.groupby("policy_name")
                        .agg(flows=("packets", "size"), packets=("packets", "sum"), bytes=("bytes", "sum"))
                        .reindex(order, fill_value=0))
        per_policy["bytes_%"] = (100 * per_policy["bytes"] / per_policy["bytes"].sum()).round(1)
        per_policy
    """),
    ("md", """
        ## 5. Data-plane counters

        `dp.counters()` is what the data plane keeps besides the flows: packets and bytes per policy
        and for the default (bytes are IP packet lengths, without the Ethernet header), frames it
        could not parse by reason, and the state of the flow table. Per policy first; with no flow
        evicted these agree with the flow sums above.
    """),
    ("py", """
        c = dp.counters()
        traffic = pd.DataFrame({**c["policies"], "(default)": c["default"]}).T
        traffic
    """),
    ("md", """
        Frames that were not accounted to any policy because they did not parse: `not_ip` is ARP and
        other non-IP EtherTypes; `trunc_*` are frames that end inside a header (`trunc_ip`: the IP
        header, `trunc_l4`: the TCP/UDP header); `bad_*` are IP headers that contradict themselves or
        the frame (`bad_len`: the IP length says more bytes than the frame holds). A few `not_ip` are
        normal; many `trunc_*` or `bad_len` usually mean the capture's snap length was too small, as
        with the five RTP frames cut short here.
    """),
    ("py", """
        pd.Series(c["malformed"], name="frames").to_frame()
    """),
    ("md", """
        The flow table: how full it is, whether anything was evicted (table too small) or expired
        (only with timeouts set), and how often the classification cache answered.
    """),
    ("py", """
        keys = ["flows", "capacity", "evicted", "expired_idle", "expired_active", "cache_hits", "cache_misses"]
        pd.Series({k: c[k] for k in keys}, name="value").to_frame()
    """),
    ("md", """
        ## 6. Traffic per policy over time

        A flow record only keeps its first and last timestamp, which is not enough to draw a rate.
        So for the plot we go back to the capture itself: read each frame and its timestamp from the
        pcap record headers (the layout written above), classify every frame with `table.classify`
        (the same classifier, one answer per packet) and add up bytes per policy per second.
    """),
    ("py", """
        def read_pcap(path):
            with open(path, "rb") as f:
                data = f.read()
            magic = struct.unpack_from("<I", data)[0]
            if magic in (0xA1B2C3D4, 0xA1B23C4D):
                order = "<"
            elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
                order = ">"
            else:
                raise ValueError(f"{path}: not a classic pcap (pcapng? convert with: editcap -F pcap in out)")
            frac_ns = 1 if magic in (0xA1B23C4D, 0x4D3CB2A1) else 1000   # nanosecond or microsecond pcap
            ts, frames, off = [], [], 24
            while off + 16 <= len(data):
                sec, frac, caplen, _wire = struct.unpack_from(order + "IIII", data, off)
                ts.append(sec * 10**9 + frac * frac_ns)
                frames.append(data[off + 16:off + 16 + caplen])
                off += 16 + caplen
            return ts, frames
    """),
    ("md", """
        The data plane counts IP packet lengths, so the plot does too: skip the Ethernet header (and
        any VLAN tags), then read the IPv4 total length or the IPv6 payload length + 40.
    """),
    ("py", """
        def ip_len(frame):
            off, etype = 14, int.from_bytes(frame[12:14], "big")
            while etype in (0x8100, 0x88A8) and len(frame) >= off + 4:       # VLAN tags
                etype, off = int.from_bytes(frame[off + 2:off + 4], "big"), off + 4
            if etype == 0x0800 and len(frame) >= off + 4:
                return int.from_bytes(frame[off + 2:off + 4], "big")
            if etype == 0x86DD and len(frame) >= off + 6:
                return 40 + int.from_bytes(frame[off + 4:off + 6], "big")
            return 0
    """),
    ("md", """
        Classify every frame and check it against the data plane's own answer from step 3. They agree
        unless a flow changes DSCP half-way (the data plane keeps the first packet's decision).
    """),
    ("py", """
        ts, frames = read_pcap(PCAP)
        per_packet = table.classify(frames)
        agree = (per_packet == ids).mean()
        print(f"{len(frames)} frames; per-packet policy = data-plane policy for {agree:.1%} of them")
    """),
    ("md", """
        Bin by whole seconds since the first frame, one column per policy, in kbit/s (a second with no
        traffic counts as 0). Frames that did not parse (only a handful here) are in the default column.
    """),
    ("py", """
        names = {i: p.name for i, p in enumerate(table.policies)}
        pkts = pd.DataFrame({
            "second": [(t - min(ts)) // 10**9 for t in ts],
            "policy": [names.get(i, "(default)") for i in per_packet],
            "bytes": [ip_len(f) for f in frames],
        })
        per_second = (pkts.pivot_table(index="second", columns="policy", values="bytes", aggfunc="sum")
                          .reindex(index=range(pkts["second"].max() + 1), columns=order).fillna(0))
        kbps = per_second * 8 / 1000
        pd.DataFrame({"average kbit/s": kbps.mean(), "peak kbit/s": kbps.max()}).round(1)
    """),
    ("md", """
        Stacked, so the top edge is the total the site sends and receives. In the synthetic capture you
        can see the call (80 kbit/s each way while it lasts, from 5 s to 35 s), the backup job
        taking most of the bandwidth from 20 s to 44 s, and web traffic in bursts throughout.
    """),
    ("py", """
        ax = kbps.plot.area(figsize=(10, 4), linewidth=0)
        ax.set(xlabel="seconds since the start of the capture", ylabel="kbit/s",
               title="Traffic per policy (1-second bins)")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), title="policy")
        plt.show()
    """),
    ("md", """
        ## Clean up

        Remove the synthetic capture (a capture you gave with `PATRONUS_PCAP` is left alone).
    """),
    ("py", """
        if workdir:
            shutil.rmtree(workdir)
    """),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs, with stable cell ids so that re-running is a no-op."""
    cells = []
    for i, (kind, src) in enumerate(CELLS):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(dedent(src).strip("\n"))
        cell["id"] = f"{kind}-{i:02d}"
        cells.append(cell)
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main() -> int:
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
