"""A lab site agent, run inside a site namespace
(``ip netns exec NS python -m patronus.lab.agent ROLE CONFIG``).

role "near": XDP + tc steering on the LAN interface, a BFD session over
every path's tunnel, the failover engine moving the lab policies (voip
prefers uplink u0, bulk u1); prints one JSON line per engine event. role
"far": only the BFD sessions of the other end. CONFIG is JSON: {"lan_if",
"site", "sites", "uplinks", "sessions": [[path_id, local_inner,
remote_inner], ...], "hold_s"}. stdin: "dump" prints the data plane's
counters and flows as one JSON line, "stop" detaches everything and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from patronus import Failover, Match, Policy
from patronus.failover import BfdSession, Engine
from patronus.lab.net import Lab

async def main(role: str, cfg: dict[str, Any]) -> None:
    sessions = {}
    for pid, local, remote in cfg["sessions"]:
        s = BfdSession(local, remote, 50, 50, 3)
        await s.start()
        sessions[pid] = s
    engine = None
    x: Any = None
    mesh: Any = None
    if role == "near":
        from patronus.dataplane.xdp import Xdp

        mesh = Lab.plan_mesh(cfg["sites"], cfg["uplinks"])
        mesh.add_policy(Policy("voip", Match(dst="10.2.0.0/24", proto="udp", dst_ports=5060), priority=1,
                               app="voip", prefer=["u0"]))
        mesh.add_policy(Policy("bulk", Match(dst="10.2.0.0/24", proto="tcp"), priority=2, app="bulk",
                               prefer=["u1"]))
        mesh.failover = Failover(failback_hold_s=cfg["hold_s"], cooldown_s=0.5)
        x = Xdp(mesh.policy_table(), flow_capacity=1 << 16)
        x.attach(cfg["lan_if"], mode="native")
        x.enable_steering(cfg["lan_if"])
        engine = Engine(mesh, x, local_site=cfg["site"], tick_s=0.02)
        engine.on_event(lambda ev: print(json.dumps({**ev.as_dict(), "mono": time.monotonic()}), flush=True))
        for pid, s in sessions.items():
            engine.watch(pid, s)
        task = asyncio.create_task(engine.run())
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        cmd = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if cmd == "dump" and engine is not None:
            flows = x.flows()
            names = [p.name for p in mesh.policies]
            per = {}
            for r in flows:
                name = names[int(r["policy"])] if int(r["policy"]) >= 0 else "default"
                d = per.setdefault(name, {"flows": 0, "packets": 0, "bytes": 0, "paths": []})
                d["flows"] += 1
                d["packets"] += int(r["packets"])
                d["bytes"] += int(r["bytes"])
            c = x.counters()
            print(json.dumps({"flows": per, "policies": c["policies"], "default": c["default"],
                              "where": [{"class": c, "site": site, "path": pid}
                                        for (c, site), pid in engine.where().items()]}), flush=True)
            continue
        break
    if engine is not None:
        engine.stop()
        await task
        x.close()
    for s in sessions.values():
        await s.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
