"""The data-plane interface every backend implements, and what a backend can do.

Code above the data plane (the failover engine, the site agent, notebooks)
types its data plane as ``DataPlane`` and asks ``capabilities`` what it can
do instead of testing which class it holds.

>>> from patronus import Policy, Match, PolicyTable
>>> from patronus.dataplane import DataPlane, Userspace, STEER
>>> dp = Userspace(PolicyTable([Policy("dns", Match(dst_ports=53), priority=1)]), flow_capacity=64)
>>> isinstance(dp, DataPlane), STEER in dp.capabilities
(True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from ..policy import PolicyTable

__all__ = ["DataPlane", "Move", "STEER", "QOS_DSCP", "QOS_RATE", "DUPLICATE", "REDIRECT", "PATH_MARK", "PATH_TABLE",
           "PATH_RULE_PRIORITY"]

# Steering convention shared by the XDP/tc pair, the nftables rules, the site
# realiser and the lab: a packet steered into path i carries the mark
# PATH_MARK + i, and `ip rule fwmark` (priority PATH_RULE_PRIORITY + i) sends
# it to routing table PATH_TABLE + i, whose routes leave by that path's tunnel.
PATH_MARK, PATH_TABLE, PATH_RULE_PRIORITY = 0x7000, 200, 500

# Capabilities a backend declares in ``capabilities``:
STEER = "steer"        # steer(ifname): LAN traffic of an interface marked into its class's path
QOS_DSCP = "qos.dscp"  # a policy's QoS.dscp is written into its packets while steering
QOS_RATE = "qos.rate"  # a policy's QoS.rate_kbps is enforced while steering
DUPLICATE = "duplicate"  # a policy's packets can be copied onto a second path (QoS.duplicate)
REDIRECT = "redirect"  # set_redirect(path, ifname): a path slot sent out of an interface directly

# one move: (class: policy name or index, None/-1 the default class;
#            destination site: name or number, None every site;
#            path slot, None no path)
Move = tuple["str | int | None", "str | int | None", "int | None"]


@runtime_checkable
class DataPlane(Protocol):
    """Classification, flow accounting and path choice for one rule table.

    Flows are pinned to the policy and destination site of their first
    packet; a class points at a path slot per destination site, and moving
    it is one write (``set_path``). ``tests/test_conformance.py`` runs one
    body of tests against every backend.
    """

    table: PolicyTable
    flow_capacity: int
    capabilities: frozenset[str]

    def process(self, frames: Sequence[bytes] | tuple[Any, np.ndarray], ts_ns: Any = None, *,
                detail: bool = False) -> np.ndarray:
        """Account frames given by Python; each frame's policy (-1: default
        class or malformed), or ``abi.DETAIL_DTYPE`` rows with ``detail``."""
        ...

    def set_table(self, table: PolicyTable) -> None:
        """Swap the rule table atomically; flows keep their counts."""
        ...

    def set_path(self, policy: str | int | None, path_id: int | None, site: str | int | None = None) -> None:
        """Point (class, destination site) at a path slot; one write."""
        ...

    def set_paths(self, moves: Iterable[Move]) -> None:
        """Several moves, all checked before any is applied."""
        ...

    def path_of(self, policy: str | int | None, site: str | int = 0) -> int | None:
        """The path slot of (class, destination site); None: no path."""
        ...

    def routes(self) -> np.ndarray:
        """Path slot per (class + 1, site column), ``abi.NO_PATH`` for none."""
        ...

    def flows(self) -> np.ndarray:
        """Live flows, ``abi.FLOW_DTYPE``."""
        ...

    def drain(self, flush: bool = False, *, idle_timeout_s: float | None = None,
              now_ns: int | None = None) -> np.ndarray:
        """Export and remove flows: those evicted or expired since the last
        drain, plus every live flow (``flush``) or those idle for
        ``idle_timeout_s`` at ``now_ns``."""
        ...

    def counters(self) -> dict[str, Any]:
        """Per-policy packets/bytes, malformed frames by reason, flow table counts."""
        ...

    def steer(self, ifname: str, mark_base: int = PATH_MARK) -> None:
        """Steer traffic arriving on ``ifname`` into its class's path (mark
        ``mark_base + path``); needs ``STEER`` in ``capabilities``."""
        ...

    def close(self) -> None:
        """Undo everything the backend did to the system (idempotent)."""
        ...

    def __enter__(self) -> DataPlane: ...

    def __exit__(self, *exc: object) -> None: ...
