"""WireGuard interface configuration as data: render to the ``wg setconf``
format (and wg-quick's, which adds Address and MTU), parse either back.

>>> from patronus.wireguard.keys import PrivateKey
>>> k, peer = PrivateKey.generate(), PrivateKey.generate().public_key()
>>> cfg = InterfaceConfig(k, listen_port=51820, peers=(
...     PeerConfig(peer, endpoint="192.0.2.7:51821", allowed_ips=("10.2.0.0/24",), persistent_keepalive=25),))
>>> parse(render(cfg)) == cfg
True
>>> print(render(cfg).splitlines()[0])
[Interface]
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from ..errors import ConfigError
from .keys import PresharedKey, PrivateKey, PublicKey

__all__ = ["InterfaceConfig", "PeerConfig", "render", "render_quick", "parse", "parse_endpoint"]


MIN_MTU = 68   # IPv4's minimum (RFC 791); an interface cannot go lower
_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_endpoint(text: str) -> tuple[str, int]:
    """"192.0.2.1:51820" or "[2001:db8::1]:51820" -> (host, port). The port
    is 1-5 ASCII digits (no sign, no "_"); an IPv6 address needs brackets
    ("::1:80" is refused: which colon ends the address?), an IPv4 one none."""
    t = text.strip() if isinstance(text, str) else ""
    bracketed = t.startswith("[")
    if bracketed:
        host, sep, port = t[1:].partition("]:")
    else:
        host, sep, port = t.rpartition(":")
    try:
        if not sep or not _PORT_RE.fullmatch(port):
            raise ValueError
        addr = ipaddress.ip_address(host)
        if (addr.version == 6) != bracketed:
            raise ValueError
        p = int(port)
    except ValueError:
        raise ConfigError("Endpoint", text, "is not IP:port (IPv6 in brackets, port in decimal digits)") from None
    if not 1 <= p <= 65535:
        raise ConfigError("Endpoint", text, "has a port outside 1..65535")
    return host, p


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _net(text: str, field_: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ConfigError(field_, text, "is not an IP prefix") from None


def _addr(text: str) -> str:
    try:
        return str(ipaddress.ip_interface(text.strip()))
    except ValueError:
        raise ConfigError("Address", text, "is not an interface address (IP/prefix)") from None


@dataclass(frozen=True)
class PeerConfig:
    public_key: PublicKey
    endpoint: str | None = None                 # "host:port"
    allowed_ips: tuple[str, ...] = ()
    persistent_keepalive: int = 0               # seconds, 0 = off
    preshared_key: PresharedKey | None = None

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", format_endpoint(*parse_endpoint(self.endpoint)))
        object.__setattr__(self, "allowed_ips", tuple(_net(a, "AllowedIPs") for a in self.allowed_ips))
        if not 0 <= self.persistent_keepalive <= 65535:
            raise ConfigError("PersistentKeepalive", self.persistent_keepalive, "is not in 0..65535")


@dataclass(frozen=True)
class InterfaceConfig:
    """What ``wg setconf`` takes, plus what wg-quick adds (addresses, MTU)."""

    private_key: PrivateKey
    listen_port: int | None = None
    fwmark: int = 0
    peers: tuple[PeerConfig, ...] = ()
    addresses: tuple[str, ...] = field(default=(), compare=True)   # wg-quick only
    mtu: int | None = None                                          # wg-quick only

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(_addr(a) for a in self.addresses))
        if self.listen_port is not None and not 0 <= self.listen_port <= 65535:
            raise ConfigError("ListenPort", self.listen_port, "is not in 0..65535")
        if self.mtu is not None and (isinstance(self.mtu, bool) or not isinstance(self.mtu, int)
                                     or not MIN_MTU <= self.mtu <= 65535):
            raise ConfigError("MTU", self.mtu, f"is not in {MIN_MTU}..65535")
        keys = [p.public_key for p in self.peers]
        if len(set(keys)) != len(keys):
            raise ConfigError("Peer", [k.base64 for k in keys], "lists a public key twice")
        seen: dict[str, str] = {}
        for p in self.peers:
            for a in p.allowed_ips:
                if a in seen:
                    raise ConfigError("AllowedIPs", a, "is given to two peers (WireGuard routes by it)")
                seen[a] = p.public_key.base64

    def without_quick(self) -> InterfaceConfig:
        return replace(self, addresses=(), mtu=None)


def _render(cfg: InterfaceConfig, quick: bool) -> str:
    lines = ["[Interface]", f"PrivateKey = {cfg.private_key.base64}"]
    if cfg.listen_port is not None:
        lines.append(f"ListenPort = {cfg.listen_port}")
    if cfg.fwmark:
        lines.append(f"FwMark = {cfg.fwmark}")
    if quick:
        if cfg.addresses:
            lines.append(f"Address = {', '.join(cfg.addresses)}")
        if cfg.mtu is not None:
            lines.append(f"MTU = {cfg.mtu}")
    for p in cfg.peers:
        lines += ["", "[Peer]", f"PublicKey = {p.public_key.base64}"]
        if p.preshared_key is not None:
            lines.append(f"PresharedKey = {p.preshared_key.base64}")
        if p.allowed_ips:
            lines.append(f"AllowedIPs = {', '.join(p.allowed_ips)}")
        if p.endpoint:
            lines.append(f"Endpoint = {p.endpoint}")
        if p.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {p.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def render(cfg: InterfaceConfig) -> str:
    """The ``wg setconf`` format (no Address/MTU: wg refuses them)."""
    return _render(cfg, quick=False)


def render_quick(cfg: InterfaceConfig) -> str:
    """The wg-quick format (Address and MTU in [Interface])."""
    return _render(cfg, quick=True)


_IFACE_KEYS = {"privatekey", "listenport", "fwmark", "address", "mtu"}
_PEER_KEYS = {"publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive"}


def parse(text: str) -> InterfaceConfig:
    """Parse the setconf or wg-quick format; ``ConfigError`` names the line."""
    iface: dict[str, str] = {}
    peers: list[dict[str, str]] = []
    section = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        low = line.lower()
        if low == "[interface]":
            if section is not None:
                raise ConfigError(f"line {n}", raw, "[Interface] must come first and once")
            section = "interface"
            continue
        if low == "[peer]":
            if section is None:
                raise ConfigError(f"line {n}", raw, "a [Peer] before [Interface]")
            section = "peer"
            peers.append({})
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if not sep or section is None:
            raise ConfigError(f"line {n}", raw, "is not 'Key = value' inside a section")
        target, allowed = (iface, _IFACE_KEYS) if section == "interface" else (peers[-1], _PEER_KEYS)
        if key not in allowed:
            raise ConfigError(f"line {n}", key, f"is not a key of [{section.capitalize()}]")
        value = value.strip()
        if key in ("allowedips", "address") and key in target:
            target[key] += "," + value  # repeated lines accumulate
        else:
            target[key] = value
    if "privatekey" not in iface:
        raise ConfigError("[Interface]", None, "has no PrivateKey")

    def integer(v: str, what: str, hi: int, lo: int = 0) -> int:
        try:
            if not re.fullmatch(r"[0-9]+|0[xX][0-9a-fA-F]+", v):
                raise ValueError
            x = int(v, 0)
        except ValueError:
            raise ConfigError(what, v, "is not an integer (decimal, or 0x hex)") from None
        if not lo <= x <= hi:
            raise ConfigError(what, v, f"is not in {lo}..{hi}")
        return x

    def split(v: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in v.split(",") if x.strip())

    out_peers = []
    for p in peers:
        if "publickey" not in p:
            raise ConfigError("[Peer]", None, "has no PublicKey")
        ka = p.get("persistentkeepalive", "0")
        out_peers.append(PeerConfig(
            PublicKey.from_text(p["publickey"]), p.get("endpoint"), split(p.get("allowedips", "")),
            0 if ka.lower() == "off" else integer(ka, "PersistentKeepalive", 65535),
            PresharedKey.from_text(p["presharedkey"]) if "presharedkey" in p else None))
    return InterfaceConfig(
        PrivateKey.from_text(iface["privatekey"]),
        integer(iface["listenport"], "ListenPort", 65535) if "listenport" in iface else None,
        integer(iface["fwmark"], "FwMark", 2**32 - 1) if iface.get("fwmark", "off").lower() != "off" else 0,
        tuple(out_peers),
        tuple(_addr(a) for a in split(iface.get("address", ""))),
        integer(iface["mtu"], "MTU", 65535, MIN_MTU) if "mtu" in iface else None,
    )
