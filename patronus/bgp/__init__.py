"""BGP on the LAN side of a site: learn the site's prefixes from its router,
advertise the rest of the mesh back to it.

patronus does not speak BGP itself: the agent drives ExaBGP (a BGP speaker
written for exactly this, applications announcing and learning routes
through a JSON API over a pipe; docs/BGP.md says why it over BIRD or FRR)
behind the small :class:`Speaker` interface of :mod:`patronus.bgp.speaker`.

>>> bgp = Bgp(asn=65010, neighbors=[Neighbor("10.1.0.2", asn=65101)], max_prefixes=50)
>>> bgp.neighbors[0]
Neighbor(address='10.1.0.2', asn=65101, local_address=None, hold_time=9)
>>> RouteFilter(bgp, own=["10.1.0.0/16"], others={"br": ["10.2.0.0/16"]}).check("10.2.7.0/24", [65101])
'other_site'

What a router may announce (every refusal is counted by its reason, the
rest of the routes are untouched): nothing outside the site's own space in
the mesh (``outside``; the site's subnets, or the narrower ``aggregates``),
nothing overlapping another site's space (``other_site``), no default route
unless ``allow_default`` (``default_route``), nothing whose AS path holds the
edge's own AS (``as_loop``: our own advertisement coming back), and at most
``max_prefixes`` accepted prefixes (``max_prefixes``: the prefixes past the
limit, in the order they came, are refused until others are withdrawn).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..errors import ConfigError

__all__ = ["Bgp", "Neighbor", "RouteFilter", "REFUSALS", "community_of"]

REFUSALS = ("outside", "other_site", "default_route", "as_loop", "max_prefixes", "bad_prefix")
MAX_NEIGHBORS = 16
MAX_PREFIXES_LIMIT = 2_000   # what one signed announcement (64 KiB) holds with room to spare


def _asn(what: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4_294_967_294:
        raise ConfigError(what, v, "is not an AS number (1 to 4,294,967,294)")
    return v


def _addr(what: str, v: Any) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except (ValueError, TypeError):
        raise ConfigError(what, v, "is not an IP address") from None


def _nets(what: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise ConfigError(what, v, "is not a list of prefixes")
    out = []
    for x in v:
        try:
            out.append(str(ipaddress.ip_network(x)))
        except (ValueError, TypeError):
            raise ConfigError(what, x, "is not a prefix (address/length, host bits zero)") from None
    return tuple(out)


@attrs.frozen
class Neighbor:
    """A BGP neighbor of the edge: the site's LAN router.

    >>> Neighbor("fd00:1::2", asn=65101, hold_time=30).address
    'fd00:1::2'
    """

    address: str = attrs.field(converter=lambda v: _addr("Neighbor.address", v))
    asn: int = attrs.field(kw_only=True, validator=lambda _i, _a, v: _asn("Neighbor.asn", v))
    local_address: str | None = attrs.field(default=None, kw_only=True,
                                            converter=lambda v: None if v is None else _addr("Neighbor.local_address", v))
    hold_time: int = attrs.field(default=9, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.hold_time, bool) or not isinstance(self.hold_time, int) or not (
                self.hold_time == 0 or 3 <= self.hold_time <= 65535):
            raise ConfigError("Neighbor.hold_time", self.hold_time, "is not 0 or 3 to 65,535 seconds")

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "asn": self.asn, "local_address": self.local_address,
                "hold_time": self.hold_time}


@attrs.frozen
class Bgp:
    """BGP of one site's edge (``patronus agent --bgp FILE``, the same fields as JSON).

    ``asn``: the edge's AS; ``neighbors``: the LAN routers; ``aggregates``:
    where learned prefixes must lie (default: the site's subnets in the
    mesh; given, each must lie inside them); ``max_prefixes``: how many
    learned prefixes are accepted; ``allow_default``: accept a default route
    (a kernel route beside the site's own default, metric 20; never
    announced into the mesh: the registry refuses a default route); ``networks``: prefixes the site announces whatever
    its routers say (e.g. the LAN segment the edge sits on);
    ``community_asn``: the first half of the per-site community tag of the
    routes advertised to the routers (default ``asn``; a 32-bit AS uses
    large communities, ``asn:0:site``).

    >>> Bgp(asn=65010, neighbors=[Neighbor("10.1.0.2", asn=65101)]).max_prefixes
    100
    """

    asn: int = attrs.field(validator=lambda _i, _a, v: _asn("Bgp.asn", v))
    neighbors: tuple[Neighbor, ...] = attrs.field(converter=tuple)
    aggregates: tuple[str, ...] | None = attrs.field(
        default=None, kw_only=True, converter=lambda v: None if v is None else _nets("Bgp.aggregates", v))
    max_prefixes: int = attrs.field(default=100, kw_only=True)
    allow_default: bool = attrs.field(default=False, kw_only=True)
    networks: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=lambda v: _nets("Bgp.networks", v))
    community_asn: int | None = attrs.field(default=None, kw_only=True)
    router_id: str | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if not self.neighbors or len(self.neighbors) > MAX_NEIGHBORS:
            raise ConfigError("Bgp.neighbors", len(self.neighbors), f"must hold 1 to {MAX_NEIGHBORS} neighbors")
        if not all(isinstance(n, Neighbor) for n in self.neighbors):
            raise ConfigError("Bgp.neighbors", self.neighbors, "must be Neighbor objects")
        if len({n.address for n in self.neighbors}) != len(self.neighbors):
            raise ConfigError("Bgp.neighbors", [n.address for n in self.neighbors], "repeat an address")
        m = self.max_prefixes
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_PREFIXES_LIMIT:
            raise ConfigError("Bgp.max_prefixes", m, f"is not an integer from 1 to {MAX_PREFIXES_LIMIT:,}")
        if not isinstance(self.allow_default, bool):
            raise ConfigError("Bgp.allow_default", self.allow_default, "is not true or false")
        if self.community_asn is not None:
            _asn("Bgp.community_asn", self.community_asn)
        if self.router_id is not None:
            try:
                v4 = ipaddress.ip_address(self.router_id).version == 4
            except (ValueError, TypeError):
                v4 = False
            if not v4:
                raise ConfigError("Bgp.router_id", self.router_id, "is not an IPv4 address")

    def check_site(self, subnets: Sequence[str]) -> None:
        """Refuse (ConfigError) aggregates or networks outside the site's subnets."""
        mine = [ipaddress.ip_network(s) for s in subnets]
        for what, nets in (("Bgp.aggregates", self.aggregates or ()), ("Bgp.networks", self.networks)):
            for n in map(ipaddress.ip_network, nets):
                if not any(n.version == m.version and n.subnet_of(m) for m in mine):  # type: ignore[arg-type]
                    raise ConfigError(what, str(n), f"is not inside the site's subnets {list(subnets)}")

    def to_dict(self) -> dict[str, Any]:
        return {"asn": self.asn, "neighbors": [n.to_dict() for n in self.neighbors],
                "aggregates": None if self.aggregates is None else list(self.aggregates),
                "max_prefixes": self.max_prefixes, "allow_default": self.allow_default,
                "networks": list(self.networks), "community_asn": self.community_asn, "router_id": self.router_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Bgp:
        """The JSON form (``to_dict``); unknown keys are refused by name.

        >>> Bgp.from_dict({"asn": 65010, "neighbors": [{"address": "10.1.0.2", "asn": 65101}]}).asn
        65010
        """
        if not isinstance(d, Mapping):
            raise ConfigError("bgp", type(d).__name__, "is not an object")
        known = {"asn", "neighbors", "aggregates", "max_prefixes", "allow_default", "networks", "community_asn",
                 "router_id"}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError("bgp", extra, f"unknown keys (known: {', '.join(sorted(known))})")
        ns = d.get("neighbors")
        if not isinstance(ns, list):
            raise ConfigError("bgp.neighbors", ns, "is not a list")
        neighbors = []
        for n in ns:
            if not isinstance(n, Mapping) or set(n) - {"address", "asn", "local_address", "hold_time"}:
                raise ConfigError("bgp.neighbors", n, "is not {address, asn[, local_address, hold_time]}")
            neighbors.append(Neighbor(n.get("address"), asn=n.get("asn"), local_address=n.get("local_address"),
                                      hold_time=n.get("hold_time", 9)))
        kw = {k: d[k] for k in ("aggregates", "max_prefixes", "allow_default", "networks", "community_asn",
                                "router_id") if k in d and d[k] is not None}
        return cls(d.get("asn"), neighbors, **kw)


def community_of(bgp: Bgp, site_number: int) -> str:
    """The community an advertised route of mesh site ``site_number`` (1..)
    carries, in ExaBGP's syntax.

    >>> community_of(Bgp(asn=65010, neighbors=[Neighbor("10.1.0.2", asn=1)]), 3)
    'community [65010:3]'
    >>> community_of(Bgp(asn=4200000001, neighbors=[Neighbor("10.1.0.2", asn=1)]), 3)
    'large-community [4200000001:0:3]'
    """
    asn = bgp.community_asn or bgp.asn
    if asn <= 65535 and site_number <= 65535:
        return f"community [{asn}:{site_number}]"
    return f"large-community [{asn}:0:{site_number}]"


class RouteFilter:
    """What the edge accepts of its routers' announcements.

    ``own``: the site's subnets in the mesh; ``others``: every other site's
    subnets (name -> prefixes). ``check`` returns the refusal reason (one of
    :data:`REFUSALS`) or None; ``accepted`` is kept by the caller.
    """

    def __init__(self, bgp: Bgp, own: Sequence[str], others: Mapping[str, Sequence[str]]) -> None:
        self.bgp = bgp
        mine = [ipaddress.ip_network(x) for x in own]
        if bgp.aggregates is None:
            self.space = mine
        else:   # the aggregates that still lie inside the site's subnets (the mesh may have narrowed them)
            self.space = [a for a in map(ipaddress.ip_network, bgp.aggregates)
                          if any(a.version == m.version and a.subnet_of(m) for m in mine)]  # type: ignore[arg-type]
        self.others = [(site, ipaddress.ip_network(x)) for site, nets in others.items() for x in nets]

    def check(self, prefix: str, as_path: Sequence[int] = (), accepted: int = 0) -> str | None:
        """The refusal reason of ``prefix`` (None: accepted), given the AS
        path it came with and how many prefixes are accepted already."""
        try:
            n = ipaddress.ip_network(prefix)
        except (ValueError, TypeError):
            return "bad_prefix"
        if self.bgp.asn in as_path:
            return "as_loop"
        if n.prefixlen == 0:
            return None if self.bgp.allow_default else "default_route"
        for _site, o in self.others:
            if n.version == o.version and n.overlaps(o):
                return "other_site"
        if not any(n.version == m.version and n.subnet_of(m) for m in self.space):  # type: ignore[arg-type]
            return "outside"
        if accepted >= self.bgp.max_prefixes:
            return "max_prefixes"
        return None
