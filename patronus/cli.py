"""The `patronus` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patronus", description="SD-WAN toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the demo")
    d.add_argument("--state", help="state file to write (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from . import demo

        return demo.run(sys.stdout, args.state)
    return 2


if __name__ == "__main__":
    sys.exit(main())
