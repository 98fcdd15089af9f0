"""Runs inside a lab site namespace: de-duplication on that site's tunnel
interfaces. argv: ifnames. stdin: "stats", "close". Prints "ready" once attached."""

from __future__ import annotations

import json
import sys

from patronus.dataplane.dedup import Dedup

d = Dedup(sys.argv[1:])
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "stats":
        print(json.dumps(d.stats()), flush=True)
    elif cmd[0] == "close":
        d.close()
        print("closed", flush=True)
        break
