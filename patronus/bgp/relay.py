"""The process ExaBGP runs for the agent (``python -m patronus.bgp.relay SOCK``).

ExaBGP talks to "API processes" it starts itself, over their stdin (its
JSON messages) and stdout (our commands). The agent is not a process ExaBGP
can start, so this relay connects to the agent's Unix socket and copies
lines both ways until either side closes. It holds no state. ExaBGP runs
with ``api.respawn`` off; when the relay's connection closes, the agent
stops ExaBGP and restarts both (patronus.bgp.speaker).
"""

from __future__ import annotations

import socket
import sys
import threading


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m patronus.bgp.relay SOCKET", file=sys.stderr)
        return 2
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(argv[1])
    except OSError as e:
        print(f"patronus.bgp.relay: cannot reach the agent at {argv[1]}: {e}", file=sys.stderr)
        return 1
    out = s.makefile("rb", buffering=0)

    def commands() -> None:   # agent -> ExaBGP (our stdout)
        try:
            for line in out:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
        except (OSError, ValueError):
            pass
        finally:
            sys.stdout.close()

    threading.Thread(target=commands, daemon=True).start()
    try:   # ExaBGP (our stdin) -> agent
        for line in sys.stdin.buffer:
            s.sendall(line)
    except OSError:
        pass
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
