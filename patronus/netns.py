"""Sockets inside named network namespaces (``ip netns``), from one process.

A socket belongs to the namespace of the thread that created it and stays
there: ``socket_in`` enters the namespace in a short-lived thread, creates
the socket and returns it, so one asyncio loop can probe and relay across
several namespaces without a process per namespace. Needs root (setns).

>>> import socket
>>> s = socket_in(None, socket.AF_INET, socket.SOCK_DGRAM)   # None: this namespace
>>> s.family == socket.AF_INET
True
>>> s.close()
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from typing import Any

from .errors import ConfigError, ProbeUnavailable

__all__ = ["socket_in", "run_in"]

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


def _setns(name: str) -> None:
    path = os.path.join(NETNS_DIR, name)
    if "/" in name or not os.path.exists(path):
        raise ConfigError("netns", name, f"is not a network namespace ({path} does not exist)")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ProbeUnavailable(f"entering network namespace {name!r}: {os.strerror(err)}",
                                   "run as root (CAP_SYS_ADMIN)")
    finally:
        os.close(fd)


def run_in(netns: str | None, fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` in a thread that has entered ``netns`` (or here, if None)."""
    if netns is None:
        return fn(*args)
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns(netns)
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=target, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def socket_in(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A new socket in network namespace ``netns`` (None: the current one)."""
    return run_in(netns, socket.socket, family, type, proto)
