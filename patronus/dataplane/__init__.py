"""Data planes: where packets are classified, accounted and steered.

Every backend implements ``DataPlane`` (``base.py``) and declares what it
can do in ``capabilities``. ``Userspace`` runs the Cython extension
anywhere, without root (steering, where asked, through nftables). ``Xdp``
runs bpf/patronus_xdp.c, loaded with BCC; it is imported on first use so
that ``import patronus`` never needs BCC. ``open`` picks one.

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
from .base import DUPLICATE, PATH_MARK, PATH_RULE_PRIORITY, PATH_TABLE, QOS_DSCP, QOS_RATE, REDIRECT, STEER, DataPlane
from .userspace import Userspace

if TYPE_CHECKING:
    from ..policy import PolicyTable

__all__ = ["DataPlane", "Userspace", "Xdp", "Dedup", "open", "preflight", "STEER", "QOS_DSCP", "QOS_RATE",
           "DUPLICATE", "REDIRECT",
           "PATH_MARK", "PATH_TABLE", "PATH_RULE_PRIORITY"]

log = logging.getLogger("patronus.dataplane")
_warned: set[str] = set()


def __getattr__(name: str) -> Any:
    if name == "Xdp":  # imported on first use: it needs BCC, root and kernel headers
        from .xdp import Xdp

        return Xdp
    if name == "Dedup":  # the same
        from .dedup import Dedup

        return Dedup
    raise AttributeError(f"module 'patronus.dataplane' has no attribute {name!r}")


def preflight() -> None:
    """Check that the XDP backend can run here (root, BCC, kernel headers);
    ``DataplaneUnavailable`` names what is missing and the fix."""
    from ._bpf import preflight as check

    check()


def open(table: PolicyTable, backend: str = "auto", flow_capacity: int = 1 << 20, **kw: Any) -> DataPlane:
    """A data plane for ``table``: ``"xdp"``, ``"userspace"``, or ``"auto"``
    (XDP where it can run, else userspace, saying why once per process).
    ``kw`` goes to the backend (both take ``idle_timeout_s`` and the
    capacity hints ``max_policies``, ``max_sites``, ``max_site_prefixes``)."""
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
        return Userspace(table, flow_capacity, **kw)
