"""Runs inside a lab site namespace: XDP + tc steering on the LAN-facing
interface. argv: ifname, JSON {policy: path slot}. stdin: "path NAME SLOT",
"dup NAME IFNAME|-" (copies of a policy's packets to a second tunnel, or
none), "dump" (counters, with the copies sent as "duplicates"), "close".
Prints "ready" once attached."""

from __future__ import annotations

import json
import sys

from patronus import Match, Policy, PolicyTable, QoS
from patronus.dataplane.xdp import Xdp

ifname, paths = sys.argv[1], json.loads(sys.argv[2])
table = PolicyTable([Policy("voip", Match(proto="udp", dst_ports=5060), priority=1, app="voip", qos=QoS(dscp=46)),
                     Policy("bulk", Match(proto="tcp"), priority=2, app="bulk"),
                     Policy("capped", Match(proto="udp", dst_ports=6000), priority=3, qos=QoS(rate_kbps=1000))])
x = Xdp(table, flow_capacity=4096)
x.attach(ifname, mode="native")
x.enable_steering(ifname, mark_base=0x7000)
for name, slot in paths.items():
    x.set_path(name, slot)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "path":
        x.set_path(cmd[1], int(cmd[2]))
        print("ok", flush=True)
    elif cmd[0] == "dup":
        x.set_duplicate(cmd[1], None if cmd[2] == "-" else cmd[2])
        print("ok", flush=True)
    elif cmd[0] == "dump":
        print(json.dumps({**x.counters(), "duplicates": x.duplicates()}), flush=True)
    elif cmd[0] == "close":
        x.close()
        print("closed", flush=True)
        break
