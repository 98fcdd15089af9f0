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

from .userspace import Userspace

__all__ = ["Userspace"]
