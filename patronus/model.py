"""Value objects of the patronus model: validated, frozen, no I/O.

Every constructor checks its input and raises :class:`ConfigError` naming the
field and the value; nothing else escapes. ``to_dict``/``from_dict`` give a
JSON-able form that round-trips exactly.

>>> hq = Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp1", "192.0.2.1")])
>>> hq.uplinks[0].name
'isp1'
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

import attrs

from . import _validate as v
from .errors import ConfigError

__all__ = ["Uplink", "Site", "Path", "Match", "QoS", "Policy", "Failover"]


def _fields(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls)}


@attrs.frozen
class Uplink:
    """One WAN connection of a site (an ISP line, an LTE modem).

    ``port`` is the WireGuard listen port (None: derived per path), ``nat`` says
    the uplink sits behind NAT (keepalives are sent), ``cost`` ranks metered
    links (higher is dearer). The name may not contain '.' or '~' (the
    separators of path ids); a mesh refuses one address at two sites.

    >>> Uplink("lte", "198.51.100.7", mtu=1420, nat=True, cost=10)
    Uplink(name='lte', address='198.51.100.7', mtu=1420, port=None, nat=True, bandwidth_mbps=None, cost=10)
    """

    name: str = attrs.field(converter=lambda x: v.endpoint_name("Uplink.name", x))
    address: str = attrs.field(converter=lambda x: v.address("Uplink.address", x))
    mtu: int = attrs.field(default=1500, converter=lambda x: v.integer("Uplink.mtu", x, 576, 65535))
    port: int | None = attrs.field(default=None, converter=lambda x: v.optional_integer("Uplink.port", x, 1, 65535))
    nat: bool = attrs.field(default=False, converter=lambda x: v.boolean("Uplink.nat", x))
    bandwidth_mbps: float | None = attrs.field(
        default=None, converter=lambda x: v.optional_number("Uplink.bandwidth_mbps", x, 0, lo_open=True)
    )
    cost: int = attrs.field(default=0, converter=lambda x: v.integer("Uplink.cost", x, 0, 1_000_000))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Uplink:
        v.mapping("Uplink", d, _fields(cls), {"name", "address"})
        return cls(**d)


def _uplinks(value: Any) -> tuple[Uplink, ...]:
    items = v.sequence("Site.uplinks", value)
    if not items:
        raise ConfigError("Site.uplinks", value, "is empty: a site needs at least one uplink")
    seen: set[str] = set()
    for u in items:
        if not isinstance(u, Uplink):
            raise ConfigError("Site.uplinks", u, "is not an Uplink")
        if u.name in seen:
            raise ConfigError("Site.uplinks", u.name, "is a duplicate uplink name")
        seen.add(u.name)
    return items


def _subnets(value: Any) -> tuple[str, ...]:
    nets = tuple(v.network("Site.subnets", s) for s in v.sequence("Site.subnets", value))
    parsed = [ipaddress.ip_network(n) for n in nets]
    for i, a in enumerate(parsed):
        for b in parsed[i + 1 :]:
            if a.version == b.version and a.overlaps(b):
                raise ConfigError("Site.subnets", [str(a), str(b)], "overlap")
    return nets


@attrs.frozen
class Site:
    """A location of the mesh: its LAN subnets and its WAN uplinks. The name
    may not contain '.' or '~' (the separators of path ids).

    >>> Site("br1", subnets=["10.2.0.0/24", "fd00:2::/64"], uplinks=[Uplink("isp1", "203.0.113.9")])
    Site(name='br1', subnets=('10.2.0.0/24', 'fd00:2::/64'), uplinks=(Uplink(name='isp1', ...),))
    """

    name: str = attrs.field(converter=lambda x: v.endpoint_name("Site.name", x))
    subnets: tuple[str, ...] = attrs.field(converter=_subnets)
    uplinks: tuple[Uplink, ...] = attrs.field(converter=_uplinks)

    def __repr__(self) -> str:
        ups = ", ".join(f"Uplink(name={u.name!r}, ...)" for u in self.uplinks)
        return f"Site(name={self.name!r}, subnets={self.subnets!r}, uplinks=({ups}{',' if len(self.uplinks) == 1 else ''}))"

    def uplink(self, name: str) -> Uplink:
        """The uplink called ``name``; ConfigError if the site has none."""
        for u in self.uplinks:
            if u.name == name:
                return u
        raise ConfigError("Site.uplink", name, f"is not an uplink of site {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "subnets": list(self.subnets), "uplinks": [u.to_dict() for u in self.uplinks]}

    @classmethod
    def from_dict(cls, d: Any) -> Site:
        v.mapping("Site", d, _fields(cls), _fields(cls))
        ups = [Uplink.from_dict(u) for u in v.sequence("Site.uplinks", d["uplinks"])]
        return cls(d["name"], subnets=d["subnets"], uplinks=ups)


@attrs.frozen
class Path:
    """One tunnel between two sites: a (local uplink, remote uplink) pair.

    ``id`` is the same from both ends ("br1.isp1~hq.lte": site names sorted);
    site and uplink names hold no '.' or '~', so an id names one path;
    ``index`` is the numeric path slot the data plane uses, stable while sites
    are only added (see Mesh.paths).

    >>> p = Path(3, "hq", "lte", "br1", "isp1")
    >>> p.id, p.reverse().id == p.id
    ('br1.isp1~hq.lte', True)
    """

    index: int
    local_site: str
    local_uplink: str
    remote_site: str
    remote_uplink: str

    @property
    def id(self) -> str:
        a = f"{self.local_site}.{self.local_uplink}"
        b = f"{self.remote_site}.{self.remote_uplink}"
        return "~".join(sorted((a, b)))

    def reverse(self) -> Path:
        """The same path seen from the remote site."""
        return Path(self.index, self.remote_site, self.remote_uplink, self.local_site, self.local_uplink)

    def __str__(self) -> str:
        return f"{self.local_site}.{self.local_uplink} -> {self.remote_site}.{self.remote_uplink}"


def _check_family(inst: Match, attribute: Any, value: Any) -> None:
    if value is None or inst.src is None:
        return
    if ipaddress.ip_network(inst.src).version != ipaddress.ip_network(value).version:
        raise ConfigError("Match.dst", value, f"is not of the address family of src {inst.src!r}: never matches")


def _check_ports(inst: Match, attribute: Any, value: Any) -> None:
    protos = () if value is None else (value,) if isinstance(value, int) else value
    if (inst.src_ports or inst.dst_ports) and any(p not in (6, 17) for p in protos):
        raise ConfigError("Match.proto", value, "cannot be combined with ports: ports are matched for tcp and udp only")


@attrs.frozen
class Match:
    """Which packets a policy takes: every field set must match; None matches anything.

    ``src``/``dst`` are CIDRs (IPv4 or IPv6) and match only their family;
    ``dscp`` is 0-63.

    Ports (``src_ports``, ``dst_ports``) match only TCP/UDP packets that carry
    ports. They take a port (``53``), a tuple of exactly two ints, one
    inclusive range (``(5060, 5061)``), a list (or any other tuple) of ports
    and ``(lo, hi)`` pairs (``[5060, (10000, 20000)]``; a two-int list inside
    the list is a range too), or a string of comma-separated ports and lo-hi
    ranges (``"5060-5061, 10000-20000"``). At most 256 items, a string at
    most 2,048 characters; an empty list or string is an error (None is any
    port). They are stored as a sorted tuple of ``(lo, hi)`` ranges, with
    overlapping and adjacent ranges merged: ``Match(dst_ports=53).dst_ports
    == ((53, 53),)``.

    ``proto`` takes a number (0-255), a name ("tcp", "udp", "icmp",
    "icmpv6") or a number as a string ("132"), several joined by "/" or ","
    ("tcp/udp", "6,17"), or a list, tuple or set of names and numbers. It is
    stored as the number when there is one protocol (``Match(proto="udp").proto
    == 17``), as a sorted tuple of distinct numbers when there are several;
    ``protos`` is always a tuple. With ports, every protocol must be tcp or udp.

    ``to_dict`` writes ports in the string form and proto as a number or a
    list of numbers; ``from_dict`` reads them back to an equal Match.

    >>> m = Match(proto="tcp/udp", dst_ports="10000-20000, 5060,5061")
    >>> m
    Match(src=None, dst=None, src_ports=None, dst_ports=((5060, 5061), (10000, 20000)), proto=(6, 17), dscp=None)
    >>> m == Match(proto=["udp", 6], dst_ports=[5060, 5061, (10000, 20000)])
    True
    >>> m.proto_name, m.protos, m.dst_ports_text
    ('tcp/udp', (6, 17), '5060-5061,10000-20000')
    >>> m.to_dict()["dst_ports"], m.to_dict()["proto"]
    ('5060-5061,10000-20000', [6, 17])
    """

    src: str | None = attrs.field(default=None, converter=lambda x: None if x is None else v.network("Match.src", x))
    dst: str | None = attrs.field(
        default=None, converter=lambda x: None if x is None else v.network("Match.dst", x), validator=_check_family
    )
    src_ports: tuple[tuple[int, int], ...] | None = attrs.field(
        default=None, converter=lambda x: v.ports("Match.src_ports", x))
    dst_ports: tuple[tuple[int, int], ...] | None = attrs.field(
        default=None, converter=lambda x: v.ports("Match.dst_ports", x))
    proto: int | tuple[int, ...] | None = attrs.field(
        default=None, converter=lambda x: v.protocols("Match.proto", x), validator=_check_ports)
    dscp: int | None = attrs.field(default=None, converter=lambda x: v.optional_integer("Match.dscp", x, 0, 63))

    @property
    def protos(self) -> tuple[int, ...]:
        """The protocol numbers, sorted; () matches any protocol."""
        if self.proto is None:
            return ()
        return (self.proto,) if isinstance(self.proto, int) else self.proto

    @property
    def proto_name(self) -> str | None:
        """'udp' for 17, 'tcp/udp' for (6, 17), the number as a string for protocols without a name."""
        if self.proto is None:
            return None
        return "/".join(v.PROTOCOL_NAMES.get(p, str(p)) for p in self.protos)

    @property
    def src_ports_text(self) -> str | None:
        """``src_ports`` as a string: '5060-5061,10000-20000', '53'; None for any port."""
        return v.port_text(self.src_ports)

    @property
    def dst_ports_text(self) -> str | None:
        """``dst_ports`` as a string: '5060-5061,10000-20000', '53'; None for any port."""
        return v.port_text(self.dst_ports)

    def to_dict(self) -> dict[str, Any]:
        """Ports as their string form, proto as a number or a list of numbers."""
        d = attrs.asdict(self)
        d["src_ports"], d["dst_ports"] = self.src_ports_text, self.dst_ports_text
        if isinstance(self.proto, tuple):
            d["proto"] = list(self.proto)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Match:
        v.mapping("Match", d, _fields(cls))
        for k in ("src_ports", "dst_ports"):
            p = d.get(k)
            # JSON has no tuples: [lo, hi] was a range in earlier versions and
            # is two ports now; refuse to guess (to_dict writes "lo-hi")
            if isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p) and p[1] - p[0] > 1:
                raise ConfigError(f"Match.{k}", p, f'is ambiguous in a mapping: write "{p[0]}-{p[1]}" for the '
                                  f'range or "{p[0]},{p[1]}" for two ports')
        return cls(**d)


@attrs.frozen
class QoS:
    """What a policy does to its packets: DSCP rewrite, an optional rate limit
    (a policer: the excess is dropped and counted) and duplication (each
    packet also sent over the second-best path of its site pair; the far end
    keeps the first copy: hitless failover for voice, at twice the traffic;
    needs the XDP data plane).

    >>> QoS(dscp=46, duplicate=True)
    QoS(dscp=46, rate_kbps=None, duplicate=True)
    """

    dscp: int | None = attrs.field(default=None, converter=lambda x: v.optional_integer("QoS.dscp", x, 0, 63))
    rate_kbps: int | None = attrs.field(
        default=None, converter=lambda x: v.optional_integer("QoS.rate_kbps", x, 1, 100_000_000)
    )
    duplicate: bool = attrs.field(default=False, converter=lambda x: v.boolean("QoS.duplicate", x))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> QoS:
        v.mapping("QoS", d, _fields(cls))
        return cls(**d)


def _match(value: Any) -> Match:
    if not isinstance(value, Match):
        raise ConfigError("Policy.match", value, "is not a Match")
    return value


def _qos(value: Any) -> QoS:
    if value is None:
        return QoS()
    if not isinstance(value, QoS):
        raise ConfigError("Policy.qos", value, "is not a QoS")
    return value


def _prefer(value: Any) -> tuple[str, ...]:
    names = tuple(v.name("Policy.prefer", n) for n in v.sequence("Policy.prefer", value))
    if len(set(names)) != len(names):
        raise ConfigError("Policy.prefer", value, "names an uplink twice")
    return names


@attrs.frozen
class Policy:
    """A traffic class: which packets (``match``), in which order (``priority``,
    lower first, as with ``ip rule``), for which application profile (``app``),
    with which QoS, preferring which uplinks (``prefer``, by name, in order).

    >>> Policy("voip", Match(proto="udp", dst_ports=(5060, 5061)), priority=10, app="voip", qos=QoS(dscp=46))
    Policy(name='voip', match=Match(...), priority=10, app='voip', qos=QoS(dscp=46, rate_kbps=None, duplicate=False), prefer=(), action='forward')
    """

    name: str = attrs.field(converter=lambda x: v.name("Policy.name", x))
    match: Match = attrs.field(converter=_match, repr=lambda m: "Match(...)")
    priority: int = attrs.field(converter=lambda x: v.integer("Policy.priority", x, 0, 2**31 - 1))
    app: str = attrs.field(default="default", converter=lambda x: v.name("Policy.app", x))
    qos: QoS = attrs.field(default=None, converter=_qos)
    prefer: tuple[str, ...] = attrs.field(default=(), converter=_prefer)
    action: Literal["forward", "drop"] = attrs.field(
        default="forward", converter=lambda x: v.choice("Policy.action", x, ("forward", "drop"))
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "match": self.match.to_dict(),
            "priority": self.priority,
            "app": self.app,
            "qos": self.qos.to_dict(),
            "prefer": list(self.prefer),
            "action": self.action,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Policy:
        v.mapping("Policy", d, _fields(cls), {"name", "match", "priority"})
        kw = dict(d)
        kw["match"] = Match.from_dict(d["match"])
        if d.get("qos") is not None:
            kw["qos"] = QoS.from_dict(d["qos"])
        return cls(**kw)


def _check_damping(inst: Failover, attribute: Any, value: float) -> None:
    if inst.damp_reuse >= value:
        raise ConfigError("Failover.damp_suppress", value, f"must exceed damp_reuse ({inst.damp_reuse})")


def _check_detect(inst: Failover, attribute: Any, value: int) -> None:
    if inst.detect_ms // value < 1:
        raise ConfigError("Failover.multiplier", value, f"leaves no transmit interval within detect_ms={inst.detect_ms}")


@attrs.frozen
class Failover:
    """How fast and how carefully traffic leaves a failing path and comes back.

    ``detect_ms`` is the BFD detection time; the BFD interval is
    ``detect_ms // multiplier``. A path must be healthy for ``failback_hold_s``
    before traffic returns to it; ``sla_windows`` consecutive SLA violations
    trigger a slow move; flap damping follows BGP route dampening (a penalty
    per flap, halved every ``damp_half_life_s``, suppressed above
    ``damp_suppress`` until it decays below ``damp_reuse``).

    >>> f = Failover(detect_ms=150, failback_hold_s=30)
    >>> f.interval_ms
    50
    """

    detect_ms: int = attrs.field(default=150, converter=lambda x: v.integer("Failover.detect_ms", x, 3, 600_000))
    failback_hold_s: float = attrs.field(
        default=30.0, converter=lambda x: v.number("Failover.failback_hold_s", x, 0, 86_400)
    )
    multiplier: int = attrs.field(
        default=3, converter=lambda x: v.integer("Failover.multiplier", x, 1, 255), validator=_check_detect
    )
    sla_windows: int = attrs.field(default=3, converter=lambda x: v.integer("Failover.sla_windows", x, 1, 1000))
    cooldown_s: float = attrs.field(default=1.0, converter=lambda x: v.number("Failover.cooldown_s", x, 0, 3600))
    damp_penalty: float = attrs.field(
        default=1000.0, converter=lambda x: v.number("Failover.damp_penalty", x, 0, 1e6)
    )
    damp_half_life_s: float = attrs.field(
        default=15.0, converter=lambda x: v.number("Failover.damp_half_life_s", x, 0, 86_400, lo_open=True)
    )
    damp_reuse: float = attrs.field(default=750.0, converter=lambda x: v.number("Failover.damp_reuse", x, 0, 1e9))
    damp_suppress: float = attrs.field(
        default=2000.0, converter=lambda x: v.number("Failover.damp_suppress", x, 0, 1e9), validator=_check_damping
    )

    @property
    def interval_ms(self) -> int:
        """BFD transmit and receive interval, ms."""
        return self.detect_ms // self.multiplier

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Failover:
        v.mapping("Failover", d, _fields(cls))
        return cls(**d)
