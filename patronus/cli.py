"""The `patronus` command."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patronus", description="SD-WAN toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the demo")
    d.add_argument("--state", help="state file to write (default: a temporary file)")
    b = sub.add_parser("bfd", help="run one BFD session, print a JSON line per state change")
    b.add_argument("--local", required=True, help="local address")
    b.add_argument("--peer", required=True, help="peer address")
    b.add_argument("--tx-ms", type=float, default=300, help="desired minimum transmit interval (ms)")
    b.add_argument("--rx-ms", type=float, default=300, help="required minimum receive interval (ms)")
    b.add_argument("--multiplier", type=int, default=3, help="detection multiplier")
    b.add_argument("--multihop", action="store_true", help="RFC 5883 multihop (port 4784)")
    b.add_argument("--netns", help="run inside this named network namespace")
    b.add_argument("--duration", type=float, help="stop after this many seconds (default: until SIGINT/SIGTERM)")
    lab = sub.add_parser("lab", help="the network-namespace lab: sites, uplinks, WireGuard tunnels")
    lab.add_argument("action", choices=["up", "status", "down"])
    lab.add_argument("--tag", default="pnlab", help="name of the lab (1-6 letters/digits; default pnlab)")
    lab.add_argument("--sites", type=int, default=3)
    lab.add_argument("--uplinks", type=int, default=2)
    lab.add_argument("--agents", action="store_true",
                     help="up: the network only, then a `patronus agent` per site (its own tunnels, data plane, "
                          "BFD, failover) in the site's namespace; waits until every path's BFD is up")
    lab.add_argument("--backend", default="auto", choices=["auto", "xdp", "userspace"],
                     help="the agents' data plane (with --agents)")
    lab.add_argument("--timeout", type=float, default=120.0,
                     help="seconds to wait for the agents to be ready (with --agents)")
    lab.add_argument("--json", action="store_true", help="status: print JSON instead of tables")
    ag = sub.add_parser("agent", help="run a site: tunnels, data plane, BFD, failover, state")
    ag.add_argument("--state", required=True, help="the SQLite state file (mesh and discovery registry)")
    ag.add_argument("--site", required=True, help="which site of the mesh this is")
    ag.add_argument("--lan-if", help="LAN interface to attach the data plane and steering to")
    ag.add_argument("--token", help="enrollment token (first run of a site)")
    ag.add_argument("--prefix", help="tunnel interface name prefix (unique on the machine)")
    ag.add_argument("--backend", default="auto", choices=["auto", "xdp", "userspace"])
    args = parser.parse_args(argv)
    if args.cmd == "agent":
        from . import agent

        return agent.main(args)
    if args.cmd == "lab":
        return _lab(args)
    if args.cmd == "demo":
        from . import demo

        return demo.run(sys.stdout, args.state)
    if args.cmd == "bfd":
        return _bfd(args)
    return 2


def _lab(args: argparse.Namespace) -> int:
    import json

    from .errors import PatronusError
    from .lab import net

    path = net.STATE_DIR / f"{args.tag}.json"
    try:
        if args.action == "up" and args.agents:
            return _lab_agents(args, net)
        if args.action == "up":
            lab = net.Lab(args.tag, args.sites, args.uplinks).up()
            for p in lab.mesh.paths():  # a route for every site pair: its first path
                if p.index == lab.mesh.paths(p.local_site, p.remote_site)[0].index:
                    lab.force_path(p.id)
            print(f"lab {args.tag}: {args.sites} sites x {args.uplinks} uplinks, {len(lab.wg)} WireGuard "
                  f"tunnels up; LAN hosts in namespaces {lab.lan_ns(0)} .. {lab.lan_ns(args.sites - 1)} "
                  f"(10.N.0.2); 'patronus lab down --tag {args.tag}' removes it")
            return 0
        if args.action == "status":
            st = net.status(path)
            print(json.dumps(st, indent=2) if args.json else net.status_text(st))
            return 0
        removed = net.cleanup(path)
        print(f"lab {args.tag}: {'removed' if removed else 'nothing to remove'}")
        return 0
    except PatronusError as e:
        print(f"patronus lab: {e}", file=sys.stderr)
        return 2


def _lab_agents(args: argparse.Namespace, net: Any) -> int:
    import time

    t0 = time.monotonic()
    lab = net.Lab(args.tag, args.sites, args.uplinks).up(tunnels=False)
    try:
        lab.start_agents(backend=args.backend)
        statuses = lab.wait_agents(args.timeout)
    except BaseException:  # the agents' last words are in the error; nothing is left behind
        lab.down()
        raise
    backends = sorted({st["backend"] for st in statuses.values()})
    paths = sum(len(st["paths"]) for st in statuses.values())
    print(f"lab {args.tag}: {args.sites} sites x {args.uplinks} uplinks, {len(statuses)} agents ready "
          f"(backend {', '.join(backends)}) in {time.monotonic() - t0:.1f} s, BFD up on {paths} tunnels; "
          f"LAN hosts in namespaces {lab.lan_ns(0)} .. {lab.lan_ns(args.sites - 1)} (10.N.0.2); "
          f"'patronus lab status --tag {args.tag}' shows paths and routes, "
          f"'patronus lab down --tag {args.tag}' removes it")
    return 0


def _bfd(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from .errors import PatronusError
    from .failover.transport import BfdSession, transition_json

    async def run() -> int:
        try:
            s = BfdSession(local=args.local, peer=args.peer, tx_ms=args.tx_ms, rx_ms=args.rx_ms,
                           multiplier=args.multiplier, multihop=args.multihop, netns=args.netns)
            s.on_change(lambda t: print(transition_json(s, t), flush=True))
            await s.start()
        except PatronusError as e:
            print(f"patronus bfd: {e}", file=sys.stderr)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), args.duration)
        except asyncio.TimeoutError:
            pass
        await s.stop()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
