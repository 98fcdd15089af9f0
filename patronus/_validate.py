"""Converters shared by the model: each turns user input into a canonical value
or raises ConfigError naming the field and the value. Never another exception."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from .errors import ConfigError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")   # always fullmatch: no trailing newline
# Site and uplink names make path ids ("br1.isp1~hq.lte"): '.' and '~' are
# the separators there, so these names may not contain them (else sites
# "a.b"/"a" with uplinks "c"/"b.c" would both be "a.b.c").
PATH_ID_SEPARATORS = ".~"

PROTOCOLS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
PROTOCOL_NAMES: dict[int, str] = {v: k for k, v in PROTOCOLS.items()}


def name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(
            field, value, "is not a valid name (1-32 characters: letters, digits, '_', '.', '-')"
        )
    return value


def endpoint_name(field: str, value: Any) -> str:
    """A site or uplink name: a name without '.' (or '~'), the separators of path ids."""
    if isinstance(value, str) and any(c in value for c in PATH_ID_SEPARATORS):
        raise ConfigError(field, value, "contains '.' or '~', which separate the parts of a path id "
                          "('site.uplink~site.uplink'): use '-' or '_' in site and uplink names")
    name(field, value)
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
    """A finite float in [lo, hi] (``(lo, hi]`` with ``lo_open``); ints are
    converted. NaN, infinities and ints too large for a float are errors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, value, "is not a number")
    lo_b = "(" if lo_open else "["
    try:
        x = float(value)
    except OverflowError:
        raise ConfigError(field, value, f"is out of range {lo_b}{lo}, {hi}]") from None
    if not math.isfinite(x):
        raise ConfigError(field, value, "is not a finite number")
    if x < lo or (lo_open and x == lo) or x > hi:
        raise ConfigError(field, value, f"is out of range {lo_b}{lo}, {hi}]")
    return x


def optional_number(field: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float | None:
    return None if value is None else number(field, value, lo, hi, lo_open=lo_open)


MAX_PORT_ITEMS = 256
MAX_PORT_TEXT = 2048
_PORT_ITEM_RE = re.compile(r"([0-9]{1,5})(?:\s*-\s*([0-9]{1,5}))?")
_PORTS_WHAT = ("is not a port, an inclusive (lo, hi) pair, a list of ports and (lo, hi) pairs, "
               "a '5060-5061,10000' string, or None")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _port_pair(field: str, value: Any, lo: Any, hi: Any) -> tuple[int, int]:
    integer(field, lo, 0, 65535)
    integer(field, hi, 0, 65535)
    if lo > hi:
        raise ConfigError(field, value, "has lo > hi")
    return (lo, hi)


def _port_item(field: str, item: Any) -> tuple[int, int]:
    """One item of a port list: a port or a [lo, hi] / (lo, hi) pair."""
    if _is_int(item):
        integer(field, item, 0, 65535)
        return (item, item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return _port_pair(field, item, item[0], item[1])
    raise ConfigError(field, item, "is not a port or an inclusive (lo, hi) pair")


def _port_text_items(field: str, value: str) -> list[tuple[int, int]]:
    if len(value) > MAX_PORT_TEXT:
        raise ConfigError(field, value[:40] + "...", f"is longer than {MAX_PORT_TEXT} characters")
    if not value.strip():
        raise ConfigError(field, value, "is empty: use None for any port")
    items = value.split(",")
    if len(items) > MAX_PORT_ITEMS:
        raise ConfigError(field, value[:40] + "...", f"has more than {MAX_PORT_ITEMS} items")
    out = []
    for item in items:
        m = _PORT_ITEM_RE.fullmatch(item.strip())
        if m is None:
            raise ConfigError(field, value, f"has item {item.strip()!r} that is not a port or a lo-hi range")
        lo = int(m.group(1))
        out.append(_port_pair(field, value, lo, lo if m.group(2) is None else int(m.group(2))))
    return out


def merge_ranges(ranges: Any) -> tuple[tuple[int, int], ...]:
    """Inclusive (lo, hi) ranges sorted, overlapping and adjacent ones merged."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def ports(field: str, value: Any) -> tuple[tuple[int, int], ...] | None:
    """None (any port), or a port set in canonical form: sorted (lo, hi)
    tuples, overlapping and adjacent ranges merged.

    Takes a port, a (lo, hi) tuple of two ints (one inclusive range), a list
    (or any other tuple) of ports and (lo, hi) pairs, or a string of
    comma-separated ports and lo-hi ranges.

    >>> ports("f", "10000-20000, 5060,5061")
    ((5060, 5061), (10000, 20000))
    >>> ports("f", (1000, 2000)), ports("f", [1000, 2000])
    (((1000, 2000),), ((1000, 1000), (2000, 2000)))
    """
    if value is None:
        return None
    if _is_int(value):
        integer(field, value, 0, 65535)
        return ((value, value),)
    if isinstance(value, str):
        items = _port_text_items(field, value)
    elif isinstance(value, tuple) and len(value) == 2 and _is_int(value[0]) and _is_int(value[1]):
        items = [_port_pair(field, value, value[0], value[1])]
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_PORT_ITEMS:
            raise ConfigError(field, f"<{len(value)} items>", f"has more than {MAX_PORT_ITEMS} items")
        if not value:
            raise ConfigError(field, value, "is empty: use None for any port")
        items = [_port_item(field, x) for x in value]
    else:
        raise ConfigError(field, value, _PORTS_WHAT)
    merged = merge_ranges(items) if len(items) > 1 else tuple(items)
    if len(merged) * 12 > MAX_PORT_TEXT and len(port_text(merged) or "") > MAX_PORT_TEXT:
        raise ConfigError(field, value if isinstance(value, str) else f"<{len(merged)} ranges>",
                          f"is longer than {MAX_PORT_TEXT} characters written as a string")
    return merged


def port_text(ranges: tuple[tuple[int, int], ...] | None) -> str | None:
    """The string form of canonical ports: '5060-5061,10000-20000', '53'; None for None.

    >>> port_text(((53, 53),)), port_text(((5060, 5061), (10000, 20000)))
    ('53', '5060-5061,10000-20000')
    """
    if ranges is None:
        return None
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


MAX_PROTOCOL_ITEMS = 256
MAX_PROTOCOL_TEXT = 1024
_PROTOCOLS_WHAT = f"is not a known protocol (one of {', '.join(PROTOCOLS)} or 0-255)"


def _one_protocol(field: str, item: Any, value: Any) -> int:
    if isinstance(item, str):
        key = item.strip().lower()
        if key in PROTOCOLS:
            return PROTOCOLS[key]
        if key.isascii() and key.isdigit() and len(key) <= 3 and int(key) <= 255:
            return int(key)
        why = _PROTOCOLS_WHAT if item is value else f"has {item!r} that {_PROTOCOLS_WHAT}"
        raise ConfigError(field, value, why)
    return integer(field, item, 0, 255)


def protocols(field: str, value: Any) -> int | tuple[int, ...] | None:
    """None (any protocol), the number of one protocol, or a sorted tuple of
    two or more distinct numbers. Takes a number, a name, names and numbers
    joined by '/' or ',', or a list, tuple or set of names and numbers.

    >>> protocols("f", "udp"), protocols("f", "tcp/udp"), protocols("f", [17, "tcp", 6])
    (17, (6, 17), (6, 17))
    """
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_PROTOCOL_TEXT:
            raise ConfigError(field, value[:40] + "...", f"is longer than {MAX_PROTOCOL_TEXT} characters")
        if value.lower() in PROTOCOLS:
            return PROTOCOLS[value.lower()]
        if not value.strip():
            raise ConfigError(field, value, "is empty: use None for any protocol")
        parts = re.split(r"[/,]", value)
        nums = {_one_protocol(field, value if len(parts) == 1 else p, value) for p in parts}
    elif isinstance(value, (list, tuple, set, frozenset)):
        if len(value) > MAX_PROTOCOL_ITEMS:
            raise ConfigError(field, f"<{len(value)} items>", f"has more than {MAX_PROTOCOL_ITEMS} items")
        if not value:
            raise ConfigError(field, value, "is empty: use None for any protocol")
        nums = set()
        for item in value:
            if not isinstance(item, str) and not _is_int(item):
                raise ConfigError(field, item, _PROTOCOLS_WHAT)
            nums.add(_one_protocol(field, item, value))
    else:
        nums = {_one_protocol(field, value, value)}
    if len(nums) == 1:
        return nums.pop()
    return tuple(sorted(nums))


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
