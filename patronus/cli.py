"""The `patronus` command."""

from __future__ import annotations

import argparse
import sys


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
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from . import demo

        return demo.run(sys.stdout, args.state)
    if args.cmd == "bfd":
        return _bfd(args)
    return 2


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
