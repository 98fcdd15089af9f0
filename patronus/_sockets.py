"""Socket helpers shared by the probe and BFD transports (no heavy imports)."""

from __future__ import annotations

import socket

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
