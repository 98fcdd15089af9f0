"""Runs inside a test namespace: attach Xdp to an interface, wait, report flows as JSON.

stdin protocol: the agent prints "ready" once attached; then each line read is
a command: "dump" prints one JSON line of flows and counters, "swap" swaps in a
rebuilt table of the same policies, "close" detaches and prints the interface's
XDP state, then exits.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

from patronus import Match, Policy, PolicyTable
from patronus.dataplane.xdp import Xdp

ifname, mode = sys.argv[1], sys.argv[2]
policies = [Policy("udp9", Match(proto="udp", dst_ports=9999), priority=1),
            Policy("tcp", Match(proto="tcp"), priority=2)]
x = Xdp(PolicyTable(policies), flow_capacity=4096)
x.attach(ifname, mode=mode)
x.set_path("udp9", 3)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "dump":
        flows = []
        for r in x.flows():
            fam = int(r["family"])
            conv = (lambda b: str(ipaddress.IPv4Address(bytes(b)[:4]))) if fam == 4 else \
                (lambda b: str(ipaddress.IPv6Address(bytes(b))))
            flows.append({"src": conv(r["src"]), "dst": conv(r["dst"]), "sport": int(r["sport"]),
                          "dport": int(r["dport"]), "proto": int(r["proto"]), "packets": int(r["packets"]),
                          "bytes": int(r["bytes"]), "policy": int(r["policy"]), "path": int(r["path"]),
                          "tcp_flags": int(r["tcp_flags"])})
        print(json.dumps({"flows": flows, "counters": x.counters()}), flush=True)
    elif cmd == "swap":
        x.set_table(PolicyTable(list(policies)))
        print("swapped", flush=True)
    elif cmd == "close":
        x.close()
        out = subprocess.run(["ip", "-d", "link", "show", ifname], capture_output=True, text=True).stdout
        print(json.dumps({"link": out}), flush=True)
        break
