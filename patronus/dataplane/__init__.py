"""Data planes: where packets are classified, accounted and steered.

``Userspace`` runs the Cython extension (anywhere, no root). The XDP backend
(bpf/, loaded with BCC) arrives with the kernel data plane work and is
imported lazily so that ``import patronus`` never needs BCC.

>>> from patronus import Policy, Match, PolicyTable, packets
>>> from patronus.dataplane import Userspace
>>> dp = Userspace(PolicyTable([Policy("dns", Match(proto="udp", dst_ports=53), priority=1)]), flow_capacity=1024)
>>> dp.process([packets.udp("10.0.0.1", "10.0.0.2", 5353, 53)] * 3, ts_ns=[1, 2, 3]).tolist()
[0, 0, 0]
>>> int(dp.flows()["packets"][0])
3
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataplaneUnavailable
from .userspace import Userspace

if TYPE_CHECKING:
    from ..policy import PolicyTable
    from .xdp import Xdp

__all__ = ["Userspace", "Xdp", "open", "PATH_MARK", "PATH_TABLE", "PATH_RULE_PRIORITY"]

# Steering convention shared by the XDP/tc pair, the nftables rules, the site
# agent and the lab: a packet steered into path i carries the mark
# PATH_MARK + i, and `ip rule fwmark` (priority PATH_RULE_PRIORITY + i) sends
# it to routing table PATH_TABLE + i, whose routes leave by that path's tunnel.
PATH_MARK, PATH_TABLE, PATH_RULE_PRIORITY = 0x7000, 200, 500

log = logging.getLogger("patronus.dataplane")
_warned: set[str] = set()


def __getattr__(name: str) -> Any:
    if name == "Xdp":  # imported on first use: it needs BCC, root and kernel headers
        from .xdp import Xdp

        return Xdp
    raise AttributeError(f"module 'patronus.dataplane' has no attribute {name!r}")


def open(table: PolicyTable, backend: str = "auto", flow_capacity: int = 1 << 20, **kw: Any) -> Userspace | Xdp:
    """A data plane for ``table``: ``"xdp"``, ``"userspace"``, or ``"auto"``
    (XDP where it can run, else userspace, saying why once per process)."""
    if backend not in ("auto", "xdp", "userspace"):
        raise ConfigError("backend", backend, "is not one of auto, xdp, userspace")
    if backend == "userspace":
        return Userspace(table, flow_capacity, **kw)
    try:
        from .xdp import Xdp

        return Xdp(table, flow_capacity, **kw)
    except DataplaneUnavailable as e:
        if backend == "xdp":
            raise
        if e.cause not in _warned:
            _warned.add(e.cause)
            log.warning("XDP data plane unavailable (%s); using the userspace data plane. Fix: %s", e.cause, e.fix)
        return Userspace(table, flow_capacity)
