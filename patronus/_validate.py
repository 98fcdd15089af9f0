"""Converters shared by the model: each turns user input into a canonical value
or raises ConfigError naming the field and the value. Never another exception."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from .errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")

PROTOCOLS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
PROTOCOL_NAMES: dict[int, str] = {v: k for k, v in PROTOCOLS.items()}


def name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            field, value, "is not a valid name (1-32 characters: letters, digits, '_', '.', '-')"
        )
    return value


def network(field: str, value: Any) -> str:
    """A CIDR string in canonical form ('2001:db8::/32'); host bits are an error."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value.with_prefixlen
    if not isinstance(value, str):
        raise ConfigError(field, value, "is not a CIDR string")
    try:
        return ipaddress.ip_network(value, strict=True).with_prefixlen
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(field, value, "is not a valid IPv4 or IPv6 CIDR") from None
    raise ConfigError(field, value, f"has host bits set (did you mean {loose.with_prefixlen}?)")


def address(field: str, value: Any) -> str:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(field, value, "is not an IP address string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(field, value, "is not a valid IPv4 or IPv6 address") from None


def integer(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, value, f"is not an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise ConfigError(field, value, f"is out of range [{lo}, {hi}]")
    return value


def optional_integer(field: str, value: Any, lo: int, hi: int) -> int | None:
    return None if value is None else integer(field, value, lo, hi)


def number(field: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(field, value, "is not a number")
    if value < lo or (lo_open and value == lo) or value > hi:
        lo_b = "(" if lo_open else "["
        raise ConfigError(field, value, f"is out of range {lo_b}{lo}, {hi}]")
    return float(value)


def optional_number(field: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float | None:
    return None if value is None else number(field, value, lo, hi, lo_open=lo_open)


def port_range(field: str, value: Any) -> tuple[int, int] | None:
    """None, a port, or an inclusive (lo, hi) pair -> (lo, hi) or None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        integer(field, value, 0, 65535)
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = value
        integer(field, lo, 0, 65535)
        integer(field, hi, 0, 65535)
        if lo > hi:
            raise ConfigError(field, value, "has lo > hi")
        return (lo, hi)
    raise ConfigError(field, value, "is not a port, an inclusive (lo, hi) pair, or None")


def protocol(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        key = value.lower()
        if key in PROTOCOLS:
            return PROTOCOLS[key]
        raise ConfigError(field, value, f"is not a known protocol (one of {', '.join(PROTOCOLS)} or 0-255)")
    return integer(field, value, 0, 255)


def boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, value, "is not a bool")
    return value


def sequence(field: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(field, value, "is not a list")
    return tuple(value)


def choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(field, value, f"is not one of {', '.join(allowed)}")
    return value


def mapping(field: str, value: Any, keys: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    """Check a dict from from_dict input: known keys only, required keys present."""
    if not isinstance(value, dict):
        raise ConfigError(field, value, "is not a mapping")
    unknown = set(value) - keys
    if unknown:
        raise ConfigError(field, sorted(map(str, unknown)), "are unknown keys")
    missing = required - set(value)
    if missing:
        raise ConfigError(field, sorted(missing), "are missing")
    return value
