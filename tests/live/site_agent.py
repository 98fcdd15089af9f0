"""A site agent for lab tests, inside a site namespace.

role "near": XDP + tc steering on the LAN interface, a BFD session over
every path's tunnel, the failover engine moving policies; prints one JSON
line per engine event. role "far": the BFD sessions of the other end only.
argv: role, JSON config {"lan_if", "site", "other", "sites", "uplinks",
"sessions": [[path_id, local_inner, remote_inner], ...], "hold_s"}.
stdin "stop" ends it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from patronus import Failover, Match, Policy
from patronus.failover import BfdSession, Engine
from patronus.lab.net import Lab

role, cfg = sys.argv[1], json.loads(sys.argv[2])


async def main() -> None:
    sessions = {}
    for pid, local, remote in cfg["sessions"]:
        s = BfdSession(local, remote, 50, 50, 3)
        await s.start()
        sessions[pid] = s
    engine = None
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
        x.enable_steering(cfg["lan_if"], mark_base=0x7000)
        engine = Engine(mesh, x, local_site=cfg["site"], tick_s=0.02)
        engine.on_event(lambda ev: print(json.dumps({**ev.as_dict(), "mono": time.monotonic()}), flush=True))
        for pid, s in sessions.items():
            engine.watch(pid, s)
        task = asyncio.create_task(engine.run())
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    if engine is not None:
        engine.stop()
        await task
        x.close()
    for s in sessions.values():
        await s.stop()


asyncio.run(main())
