"""Socket helpers shared by the probe and BFD transports (no heavy imports)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

SOCKET_BUFFER = 4 << 20  # bytes: thousands of packets may arrive while the loop is busy
_SO_RCVBUFFORCE, _SO_SNDBUFFORCE = 33, 32


def big_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> None:
    """Ask for ``size``-byte socket buffers: past net.core.rmem_max with
    CAP_NET_ADMIN (the *FORCE options), else as much as the sysctl allows."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                pass


def drain(sock: socket.socket, handle: Callable[[bytes, Any], None], errors: Callable[[], None] = lambda: None,
          most: int = 256) -> None:
    """Read every datagram waiting on a non-blocking socket and pass each to
    ``handle(data, addr)``; at most ``most`` per wake-up, so one busy socket
    cannot starve the loop. ``errors()`` counts queued ICMP errors."""
    for _ in range(most):
        try:
            data, addr = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # an ICMP error queued for an earlier send
            errors()
            continue
        handle(data, addr)
