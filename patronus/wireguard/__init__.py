"""WireGuard for the mesh: keys, one tunnel per path, configuration as data,
and two backends that apply it: the cross-platform UAPI socket
(wireguard-go, boringtun) and the kernel module through pyroute2.
"""

from __future__ import annotations

from .config import InterfaceConfig, PeerConfig, parse, render, render_quick
from .keys import PresharedKey, PrivateKey, PublicKey
from .plan import Topology, Tunnel, tunnel, tunnels

__all__ = ["PrivateKey", "PublicKey", "PresharedKey", "InterfaceConfig", "PeerConfig", "render", "render_quick",
           "parse", "Topology", "Tunnel", "tunnel", "tunnels"]
