"""From a mesh to WireGuard interfaces: one tunnel per path, seen from one
site. Everything here is deterministic (both ends compute the same answer
without talking): addresses, ports, MTU, interface names.

* Inner addresses: path ``i`` gets the i-th /31 of the IPv4 overlay prefix
  and the i-th /127 of the IPv6 one; the end whose "site.uplink" sorts first
  takes the lower address (the same order as ``Path.id``).
* Listen port: ``base_port + path.index`` on both ends (wireguard-go binds
  the port on every address, so each tunnel interface of a site needs its
  own), unless the uplink pins ``Uplink.port``.
* MTU: the smaller uplink MTU of the two ends minus the encapsulation:
  outer IPv4 (20) or IPv6 (40) + UDP (8) + WireGuard (32: 16 header, 16 tag).
* Keepalive: 25 s towards a peer when either end's uplink is behind NAT.

>>> from patronus import Mesh, Site, Uplink
>>> m = Mesh("m")
>>> m.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp", "192.0.2.1", mtu=1500)]))
>>> m.add_site(Site("br", subnets=["10.2.0.0/24"], uplinks=[Uplink("lte", "198.51.100.1", mtu=1420, nat=True)]))
>>> (p,) = m.paths("hq", "br")
>>> t = tunnel(m, p)
>>> t.local_v4, t.remote_v4, t.mtu, t.listen_port, t.remote_port, t.keepalive
('100.127.0.1/31', '100.127.0.0', 1360, 51820, 51820, 25)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import ConfigError
from ..model import Path

__all__ = ["Tunnel", "tunnel", "tunnels", "Topology", "OVERLAY_V4", "OVERLAY_V6", "BASE_PORT", "overhead",
           "iface_name"]

OVERLAY_V4 = "100.127.0.0/16"        # end of RFC 6598 space; override per mesh
OVERLAY_V6 = "fd70:6e00::/64"
BASE_PORT = 51820
WG_OVERHEAD = 32                     # message header 16 + Poly1305 tag 16
KEEPALIVE_NAT = 25


def overhead(outer_v6: bool) -> int:
    """Bytes WireGuard adds to each inner packet."""
    return (40 if outer_v6 else 20) + 8 + WG_OVERHEAD


def iface_name(prefix: str, path: Path) -> str:
    """Interface name for a path's tunnel: unique across namespaces when the
    prefix is (wireguard-go's UAPI sockets share one directory)."""
    name = f"{prefix}{path.index}"
    if len(name) > 15:
        raise ConfigError("interface prefix", prefix, f"makes {name!r} longer than 15 characters")
    return name


@dataclass(frozen=True)
class Tunnel:
    """One path's tunnel as seen from ``path.local_site``."""

    path: Path
    ifname: str
    local_v4: str            # address/31 to put on the interface
    remote_v4: str           # the other end's inner address
    local_v6: str
    remote_v6: str
    listen_port: int
    remote_endpoint: str     # host:port of the remote uplink
    remote_port: int
    mtu: int
    keepalive: int


def tunnel(mesh: object, path: Path, *, prefix: str = "pn", overlay_v4: str = OVERLAY_V4,
           overlay_v6: str = OVERLAY_V6, base_port: int = BASE_PORT) -> Tunnel:
    site_l, site_r = mesh.site(path.local_site), mesh.site(path.remote_site)  # type: ignore[attr-defined]
    ul = next(u for u in site_l.uplinks if u.name == path.local_uplink)
    ur = next(u for u in site_r.uplinks if u.name == path.remote_uplink)
    n4, n6 = ipaddress.ip_network(overlay_v4), ipaddress.ip_network(overlay_v6)
    if n4.version != 4 or n6.version != 6:
        raise ConfigError("overlay", (overlay_v4, overlay_v6), "must be an IPv4 and an IPv6 prefix")
    if path.index >= 2 ** (31 - n4.prefixlen) or path.index >= 2 ** min(64, 127 - n6.prefixlen):
        raise ConfigError("overlay_v4", overlay_v4, f"has no /31 left for path {path.index}")
    low_first = f"{path.local_site}.{path.local_uplink}" < f"{path.remote_site}.{path.remote_uplink}"
    a4 = int(n4.network_address) + 2 * path.index
    a6 = int(n6.network_address) + 2 * path.index
    mine, theirs = (0, 1) if low_first else (1, 0)
    outer_v6 = ipaddress.ip_address(ur.address).version == 6
    lport = ul.port or base_port + path.index
    rport = ur.port or base_port + path.index
    return Tunnel(
        path=path, ifname=iface_name(prefix, path),
        local_v4=f"{ipaddress.IPv4Address(a4 + mine)}/31", remote_v4=str(ipaddress.IPv4Address(a4 + theirs)),
        local_v6=f"{ipaddress.IPv6Address(a6 + mine)}/127", remote_v6=str(ipaddress.IPv6Address(a6 + theirs)),
        listen_port=lport, remote_endpoint=(f"[{ur.address}]:{rport}" if outer_v6 else f"{ur.address}:{rport}"),
        remote_port=rport, mtu=min(ul.mtu, ur.mtu) - overhead(outer_v6),
        keepalive=KEEPALIVE_NAT if (ul.nat or ur.nat) else 0)


@dataclass(frozen=True)
class Topology:
    """Which site pairs get tunnels: the full mesh, hub and spoke (spokes
    reach each other through a hub), or an explicit list of pairs. Path
    indexes stay those of the full mesh, so ports and addresses never move
    when the topology changes.

    >>> Topology.hub_and_spoke(["hq"]).allows("br1", "br2"), Topology.hub_and_spoke(["hq"]).allows("br1", "hq")
    (False, True)
    """

    kind: str = "full"
    hubs: tuple[str, ...] = ()
    pairs: frozenset[frozenset[str]] = frozenset()

    @classmethod
    def full(cls) -> Topology:
        return cls("full")

    @classmethod
    def hub_and_spoke(cls, hubs: list[str]) -> Topology:
        if not hubs:
            raise ConfigError("Topology.hubs", hubs, "needs at least one hub")
        return cls("hub", tuple(hubs))

    @classmethod
    def explicit(cls, pairs: list[tuple[str, str]]) -> Topology:
        ps = frozenset(frozenset(p) for p in pairs)
        if any(len(p) != 2 for p in ps):
            raise ConfigError("Topology.pairs", pairs, "has a pair of one site")
        return cls("pairs", (), ps)

    def allows(self, a: str, b: str) -> bool:
        if self.kind == "full":
            return True
        if self.kind == "hub":
            return a in self.hubs or b in self.hubs
        return frozenset((a, b)) in self.pairs


def tunnels(mesh: object, site: str, topology: Topology | None = None, **kw: object) -> list[Tunnel]:
    """Every tunnel of ``site``: one per path touching it that the topology allows."""
    topo = topology or Topology.full()
    return [tunnel(mesh, p, **kw) for p in mesh.paths(site)  # type: ignore[attr-defined]
            if topo.allows(p.local_site, p.remote_site)]
