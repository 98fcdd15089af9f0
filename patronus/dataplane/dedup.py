"""The far end of hitless voice: drop the second copy of each duplicated
packet before it reaches the LAN (bpf/patronus_dedup.c at clsact ingress of
a site's tunnel interfaces).

A duplicating policy (``QoS(duplicate=True)``) sends every packet over two
paths; the first copy to arrive passes, the other is dropped here. A copy is
recognised by a digest of what both copies share (addresses, protocol, IPv4
identification or IPv6 flow label, length, the first 16 bytes of the
transport header and payload) arriving on a *different* tunnel within
``window_ms``; the same bytes twice on one tunnel are the application's own
and pass. Memory is bounded (``entries`` digests, least recently used
forgotten first).

>>> with Dedup(["s1w0", "s1w1"]) as d:  # doctest: +SKIP
...     d.stats()["duplicates_dropped"]
0
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError
from ._bpf import Libbpf, preflight
from ._tc import attach_ingress, detach_ingress, load_sched_cls

__all__ = ["Dedup", "DEDUP_STATS", "WINDOW_MS", "ENTRIES"]

# the second copy of a packet comes within this of the first: the paths' delay difference (tens of
# ms between continents), with room for a tunnel that holds packets while WireGuard completes a handshake
WINDOW_MS = 1000
ENTRIES = 131072     # digests kept (about 8 MiB): at 50 packets/s per call, 2,600 calls over the window
# the program's counters (bpf/patronus_dedup.c, pn_dd_stats), in order
DEDUP_STATS = ("first_copies", "duplicates_dropped", "late_copies", "repeats_same_tunnel", "not_digested")


class Dedup:
    """The de-duplication program on ``ifnames`` (the tunnels a duplicated
    flow arrives on); ``add`` more as tunnels appear; ``close`` detaches."""

    def __init__(self, ifnames: Iterable[str] = (), *, window_ms: float = WINDOW_MS, entries: int = ENTRIES) -> None:
        if not 1 <= window_ms <= 10_000:
            raise ConfigError("window_ms", window_ms, "is not 1 to 10,000 ms")
        if isinstance(entries, bool) or not isinstance(entries, int) or not 16 <= entries <= 1 << 24:
            raise ConfigError("entries", entries, "is not an integer from 16 to 16,777,216")
        preflight()
        self._lib = Libbpf()
        self._prog, self._fn = load_sched_cls("patronus_dedup.c", "pn_dedup", "de-duplication program",
                                              [f"-DPN_DD_ENTRIES={entries}"])
        cfg: Any = self._prog[b"pn_dd_cfg"]
        cfg[ctypes.c_int(0)] = ctypes.c_uint64(int(window_ms * 1e6))
        self.window_ms, self.entries = window_ms, entries
        self._pins: dict[str, Any] = {}
        try:
            for ifname in ifnames:
                self.add(ifname)
        except BaseException:
            self.close()
            raise

    def add(self, ifname: str) -> None:
        """Attach to one more tunnel interface (it must exist)."""
        if ifname in self._pins:
            return
        try:
            socket.if_nametoindex(ifname)
        except OSError:
            raise ConfigError("ifname", ifname, "is no interface here") from None
        self._pins[ifname] = attach_ingress(self._lib, self._prog, self._fn, ifname, "patronus_dd", cleanup=False)

    def remove(self, ifname: str) -> None:
        pin = self._pins.pop(ifname, None)
        if pin is not None:
            detach_ingress(ifname, pin)

    @property
    def ifnames(self) -> list[str]:
        return list(self._pins)

    def stats(self) -> dict[str, int]:
        """What the program counted, summed over CPUs (``DEDUP_STATS``)."""
        m: Any = self._prog[b"pn_dd_stats"]
        return {name: int(sum(m[ctypes.c_int(i)])) for i, name in enumerate(DEDUP_STATS)}

    def close(self) -> None:
        for ifname in list(self._pins):
            self.remove(ifname)
        self._prog.cleanup()

    def __enter__(self) -> Dedup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
