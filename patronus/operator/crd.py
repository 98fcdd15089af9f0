"""The Site and Policy CustomResourceDefinitions, generated from the model
(``patronus crdgen``).

A resource's ``spec`` is the model's own dictionary form without ``name``
(``Site.to_dict()`` / ``Policy.to_dict()``; the name is ``metadata.name``),
so the schema is read off the model rather than written beside it:

- the fields, their structure and which are required come from the attrs
  classes (``attrs.fields``, the type hints, fields without a default);
- every value rule comes from the converter the field declares: the
  :mod:`patronus._validate` call in ``patronus/model.py`` is read with
  :mod:`ast` and its literal arguments become ``minimum``/``maximum``
  (``v.integer("Uplink.mtu", x, 576, 65535)``), ``exclusiveMinimum``
  (``lo_open=True``) or an ``enum`` (``v.choice``, checked against the
  field's ``Literal`` hint); name patterns come from ``_validate._NAME_RE``
  and ``PATH_ID_SEPARATORS``, port and protocol grammars from
  ``_validate`` (its ``MAX_*`` constants, ``PROTOCOLS``, and the bounds
  ``_port_pair`` and ``_one_protocol`` pass to ``integer``), IP grammars
  from :mod:`ipaddress`'s widths;
- the few rules the model states only in imperative code (a site needs an
  uplink, uplink names are unique, ``prefer`` names an uplink once, subnets
  never repeat) are in ``_LIST_RULES`` below, and tests/test_crd.py checks
  each against the model.

A converter the generator does not recognise raises :class:`CRDError`
naming the field: a model change cannot silently drop a rule.

What the schema enforces (apiserver-side, before the operator sees the
resource):

- ``metadata.name``: a site name (letters, digits, '_', '-'; 1-32) or a
  policy name (also '.'), on top of Kubernetes' own lowercase DNS rule;
- Site ``spec.subnets``: IPv4/IPv6 CIDRs (address/prefix-length, prefix in
  range), no duplicates (``x-kubernetes-list-type: set``);
  ``spec.uplinks``: 1 or more, unique ``name`` (``list-type: map``), each
  ``name`` (site-name pattern) and ``address`` (IPv4 or IPv6, zone allowed)
  required, ``mtu``/``port``/``cost`` integer ranges, ``bandwidth_mbps`` > 0,
  ``nat`` boolean;
- Policy ``spec.match`` (required): ``src``/``dst`` CIDRs,
  ``src_ports``/``dst_ports`` a port 0-65535 or the port-list string
  grammar (``"5060-5061,10000-20000"``, at most 256 items, 2,048
  characters), ``proto`` a number 0-255, a name (tcp, udp, icmp, icmpv6,
  any case) or several joined by '/' or ',', or a list (1-256) of those,
  ``dscp`` 0-63; ``spec.priority`` (required) 0-2**31-1; ``spec.app`` a
  name; ``spec.qos`` ``dscp`` 0-63, ``rate_kbps`` 1-100,000,000,
  ``duplicate`` boolean; ``spec.prefer`` names, each once; ``spec.action``
  forward or drop.

Model rules no schema expresses (the controller rejects these with the
model's ConfigError, which the operator shows on the resource):

- a CIDR with host bits set (``10.0.0.1/8``);
- a site's subnets overlapping each other;
- ``Match.src`` and ``Match.dst`` of different address families;
- ports combined with a protocol other than tcp/udp;
- a port range written ``hi-lo`` (lo > hi);
- ``proto`` of another JSON type than number, string or list (it is an
  untyped node: a structural schema cannot say "integer, string or array");
  a fractional number (6.5) for ``proto`` or in its list;
- ``app`` naming a profile the mesh does not have (the built-in ones are
  listed in the field's description; a mesh may add its own);
- an uplink address used by two sites, names unique across resources
  (cross-object rules).

Where the schema is stricter than the model (the model takes these and
rewrites them; the schema asks for the form ``to_dict`` writes):
CIDRs as ``address/prefix-length`` only (no bare address, netmask form or
leading zeros in the length); ports and protocols with ASCII whitespace
only; ports as a number or string (not a list). Bounds the model has
none for, so that every input is bounded: at most ``MAX_SUBNETS`` subnets,
``MAX_UPLINKS`` uplinks, ``MAX_PREFER`` preferred uplinks, addresses and
CIDRs of at most ``MAX_ADDRESS_TEXT`` characters, protocol list items of
at most ``MAX_PROTOCOL_TEXT``.

>>> site, policy = crds()
>>> site["metadata"]["name"], policy["spec"]["names"]["shortNames"]
('sites.sdwan.patronus.dev', ['ppolicy'])
>>> mtu = spec_schema("Site")["properties"]["uplinks"]["items"]["properties"]["mtu"]
>>> mtu["minimum"], mtu["maximum"], mtu["default"]
(576, 65535, 1500)
>>> spec_schema("Policy")["properties"]["action"]["enum"]
['forward', 'drop']
"""

from __future__ import annotations

import ast
import difflib
import inspect
import ipaddress
import json
import math
import operator
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import attrs

from .. import _validate as v
from .. import model
from ..apps import BUILTIN_PROFILES
from ..errors import PatronusError
from . import GROUP, KINDS, VERSION, Kind

__all__ = ["CRDError", "crds", "crd", "spec_schema", "openapi_schema", "render", "filename", "write", "check",
           "main", "DEFAULT_OUT", "MAX_SUBNETS", "MAX_UPLINKS", "MAX_PREFER", "MAX_ADDRESS_TEXT"]

DEFAULT_OUT = "deploy/helm/patronus-operator/crds"
HEADER = ("# generated by `patronus crdgen`; do not edit\n"
          "# source: patronus.model (Site, Policy), through patronus/operator/crd.py\n")

# Bounds the schema adds where the model has none. A custom resource is one
# etcd object, and bounded inputs keep the API server's validation cost
# bounded; these are far beyond any real site.
MAX_SUBNETS = 256
MAX_UPLINKS = 32
MAX_PREFER = MAX_UPLINKS        # prefer names uplinks
MAX_ADDRESS_TEXT = 64           # IPv6 text is at most 45 characters, "/128" and a zone id fit

CONDITION_STATUSES = ("True", "False", "Unknown")


class CRDError(PatronusError):
    """The model holds something the generator cannot turn into a schema
    (names the field), or the output directory cannot be written."""


# --------------------------------------------------------------------------
# reading the model's converters


@dataclass(frozen=True)
class _Rule:
    """One ``_validate`` call a field's converter makes: ``kind`` is the
    function's name, ``args`` its literal arguments after (field, value)."""

    kind: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    optional: bool = False

    def kw(self, name: str, default: Any = None) -> Any:
        return dict(self.kwargs).get(name, default)


@dataclass(frozen=True)
class _ListRule:
    """A rule on a list field that the model states only in imperative code."""

    min_items: int = 0
    unique: bool = False          # scalar items, each at most once
    map_key: str | None = None    # object items, unique by this key
    max_items: int | None = None  # a bound of the schema's own (the model has none)


# Checked against the model by tests/test_crd.py (test_list_rules_hold_in_the_model).
_LIST_RULES: dict[tuple[str, str], _ListRule] = {
    ("Site", "subnets"): _ListRule(unique=True, max_items=MAX_SUBNETS),   # a repeated subnet overlaps itself
    ("Site", "uplinks"): _ListRule(min_items=1, map_key="name", max_items=MAX_UPLINKS),
    ("Policy", "prefer"): _ListRule(unique=True, max_items=MAX_PREFER),
}

# What a field's description adds about rules the schema cannot check.
_NOTES: dict[tuple[str, str], str] = {
    ("Site", "subnets"): "Subnets may not overlap, and host bits must be zero (checked by the controller).",
    ("Match", "src"): "Host bits must be zero (checked by the controller).",
    ("Match", "dst"): "Of the address family of src; host bits must be zero (checked by the controller).",
    ("Match", "src_ports"): "Only with proto tcp and/or udp (or none); in a range lo <= hi (checked by the "
                            "controller).",
    ("Match", "dst_ports"): "Only with proto tcp and/or udp (or none); in a range lo <= hi (checked by the "
                            "controller).",
    ("Policy", "app"): "An application profile of the mesh: " + ", ".join(BUILTIN_PROFILES) + " are built in "
                       "(checked by the controller).",
    ("Uplink", "address"): "One address belongs to one site (checked by the controller).",
}

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow,
           ast.FloorDiv: operator.floordiv}


def _literal(node: ast.expr, where: str) -> Any:
    """The value of a constant expression (``2**31 - 1``, ``("a", "b")``)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand, where)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_literal(node.left, where), _literal(node.right, where))
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, where) for e in node.elts)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
        return getattr(math, node.attr)
    raise CRDError(f"{where}: {ast.unparse(node)!r} is not a constant the CRD generator can read")


def _v_call(node: ast.AST) -> ast.Call | None:
    """``node`` if it is a call ``v.something(...)`` (a _validate converter)."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "v"):
        return node
    return None


def _rule_of(call: ast.Call, where: str, optional: bool = False) -> _Rule:
    assert isinstance(call.func, ast.Attribute)
    args = tuple(_literal(a, where) for a in call.args[2:])
    kwargs = tuple((k.arg or "", _literal(k.value, where)) for k in call.keywords)
    return _Rule(call.func.attr, args, kwargs, optional)


@dataclass(frozen=True)
class _FieldSource:
    """What a field's ``attrs.field(...)`` declares: the rule of its converter
    (a lambda over one _validate call), or the named converter function
    (with the _validate rule it applies to each item, if any)."""

    rule: _Rule | None
    function: str | None = None
    item_rule: _Rule | None = None


def _model_tree() -> ast.Module:
    return ast.parse(inspect.getsource(model))


def _field_sources() -> dict[tuple[str, str], _FieldSource]:
    """Every attrs field of patronus.model with the converter it declares."""
    tree = _model_tree()
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    out: dict[tuple[str, str], _FieldSource] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(stmt.value, ast.Call)):
                continue
            field = stmt.target.id
            where = f"{cls.name}.{field}"
            conv = next((k.value for k in stmt.value.keywords if k.arg == "converter"), None)
            if conv is None:
                out[cls.name, field] = _FieldSource(None)
            elif isinstance(conv, ast.Lambda):
                body, optional = conv.body, False
                # `None if x is None else v.network(...)`
                if isinstance(body, ast.IfExp) and isinstance(body.body, ast.Constant) and body.body.value is None:
                    body, optional = body.orelse, True
                call = _v_call(body)
                if call is None:
                    raise CRDError(f"{where}: converter {ast.unparse(conv)!r} is not one _validate call")
                out[cls.name, field] = _FieldSource(_rule_of(call, where, optional))
            elif isinstance(conv, ast.Name) and conv.id in functions:
                item_rule = None
                for node in ast.walk(functions[conv.id]):
                    call = _v_call(node)
                    if call is None or not call.args or not isinstance(call.args[0], ast.Constant):
                        continue
                    assert isinstance(call.func, ast.Attribute)
                    if call.args[0].value == where and call.func.attr != "sequence":
                        item_rule = _rule_of(call, where)
                out[cls.name, field] = _FieldSource(None, conv.id, item_rule)
            else:
                raise CRDError(f"{where}: converter {ast.unparse(conv)!r} is not a lambda or a model function")
    return out


def _integer_bounds(function: Any) -> tuple[int, int]:
    """The (lo, hi) a _validate helper passes to ``integer(field, value, lo, hi)``."""
    where = f"_validate.{function.__name__}"
    tree = ast.parse(inspect.getsource(function))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "integer"
                and len(node.args) == 4):
            return _literal(node.args[2], where), _literal(node.args[3], where)
    raise CRDError(f"{where}: no integer(field, value, lo, hi) call to take the bounds from")


# --------------------------------------------------------------------------
# grammars as patterns (RE2 for the API server, ECMA-262 for OpenAPI tools:
# only the syntax both share)


def _decimal(hi: int, *, padded: bool) -> str:
    """Decimal numerals of 0..hi: canonical (no leading zero) or ``padded``
    (leading zeros allowed, at most as many digits as ``hi`` has).

    >>> _decimal(255, padded=False)
    '(?:0|[1-9][0-9]?|1[0-9]{2}|2[0-4][0-9]|25[0-4]|255)'
    >>> _decimal(32, padded=True)
    '(?:[0-9]|[0-2][0-9]|3[0-1]|32)'
    """
    digits = str(hi)
    k = len(digits)
    if k == 1:
        return f"(?:{_range(0, hi)})"
    if padded:
        alts = [f"[0-9]{_count(1, k - 1)}"]                 # fewer digits than hi: any
    else:
        alts = ["0", "[1-9]" + (f"[0-9]{_count(0, k - 2)}" if k > 2 else "")]
    for i, d in enumerate(digits):                           # k digits: below hi from digit i on
        low = 0 if (padded or i > 0) else 1
        rest = k - i - 1
        if int(d) > low:
            alts.append(digits[:i] + _range(low, int(d) - 1) + (f"[0-9]{_count(rest, rest)}" if rest else ""))
    alts.append(digits)
    return "(?:" + "|".join(alts) + ")"


def _count(lo: int, hi: int) -> str:
    if lo == hi:
        return "" if lo == 1 else f"{{{lo}}}"
    return "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"


def _range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"[{lo}-{hi}]"


def _caseless(word: str) -> str:
    """``udp`` -> ``[Uu][Dd][Pp]`` (no ``(?i)``: ECMA-262 lacks it)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)


_WS = "[ \\t\\n\\v\\f\\r]*"   # ASCII whitespace; the model strips any (str.strip)
_HEX = "[0-9A-Fa-f]"


def _ipv4() -> str:
    octet = _decimal(0xFF, padded=False)     # ipaddress: no leading zeros
    return f"(?:{octet}\\.){{3}}{octet}"


def _ipv6() -> str:
    """RFC 4291 text forms (RFC 3986's IPv6address), as ipaddress reads them."""
    groups = ipaddress.IPV6LENGTH // 16
    h16 = f"{_HEX}{{1,4}}"
    ls32 = f"(?:{h16}:{h16}|{_ipv4()})"
    alts = [f"(?:{h16}:){{{groups - 2}}}{ls32}"]
    for left in range(groups):              # at most `left` groups before "::"
        right = groups - 1 - left           # exactly `right` groups after it
        head = ("" if left == 0 else f"(?:{h16})?" if left == 1
                else f"(?:(?:{h16}:){_count(0, left - 1)}{h16})?")
        if right > 2:
            tail = f"(?:{h16}:){_count(right - 2, right - 2)}{ls32}"
        else:
            tail = {2: ls32, 1: h16, 0: ""}[right]
        alts.append(f"{head}::{tail}")
    return "(?:" + "|".join(alts) + ")"


def _ip_pattern() -> str:
    """``Uplink.address``: IPv4, or IPv6 with an optional zone (``fe80::1%eth0``;
    ipaddress takes any zone text without '%' and '/')."""
    return f"^(?:{_ipv4()}|{_ipv6()}(?:%[^%/]+)?)$"


def _cidr_pattern() -> str:
    """A CIDR as ``to_dict`` writes it: address/prefix-length, the length in range."""
    p4 = _decimal(ipaddress.IPV4LENGTH, padded=False)
    p6 = _decimal(ipaddress.IPV6LENGTH, padded=False)
    return f"^(?:{_ipv4()}/{p4}|{_ipv6()}(?:%[^%/]+)?/{p6})$"


def _name_pattern(without: str = "") -> str:
    """``_validate._NAME_RE`` anchored, with the characters ``without`` taken
    out of its character classes (site and uplink names: no path id separators)."""
    pattern = v._NAME_RE.pattern
    outside = re.sub(r"\[[^\]]*\]", "", pattern)
    if any(c in outside for c in without):
        raise CRDError(f"_validate._NAME_RE {pattern!r}: {without!r} outside a character class")
    pattern = re.sub(r"\[[^\]]*\]", lambda m: "".join(c for c in m.group(0) if c not in without), pattern)
    return f"^{pattern}$"


def _pattern_width(pattern: str) -> int:
    """The longest string a (bounded) pattern matches."""
    lo, hi = re._parser.parse(pattern).getwidth()  # type: ignore[attr-defined]
    return int(hi)


def _ports_pattern() -> str:
    lo, hi = _integer_bounds(v._port_pair)
    if lo != 0:
        raise CRDError(f"_validate._port_pair: ports from {lo}: the pattern assumes 0")
    port = _decimal(hi, padded=True)         # _PORT_ITEM_RE takes [0-9]{1,5}: leading zeros
    item = f"{_WS}{port}(?:{_WS}-{_WS}{port})?{_WS}"
    return f"^{item}(?:,{item}){{0,{v.MAX_PORT_ITEMS - 1}}}$"


def _protocol_token() -> str:
    lo, hi = _integer_bounds(v._one_protocol)
    if lo != 0:
        raise CRDError(f"_validate._one_protocol: protocols from {lo}: the pattern assumes 0")
    names = sorted(v.PROTOCOLS, key=lambda n: (-len(n), n))
    return "(?:" + "|".join([_caseless(n) for n in names] + [_decimal(hi, padded=True)]) + ")"


# --------------------------------------------------------------------------
# schema nodes


def _doc(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    text = (inspect.getdoc(cls) or "").replace("``", "")
    return " ".join(text.split("\n\n")[0].split())


def _with_note(owner: str, field: str, text: str) -> str:
    note = _NOTES.get((owner, field))
    return f"{text} {note}" if note else text


def _int_or_string(description: str | None = None, **rest: Any) -> dict[str, Any]:
    head = {"description": description} if description else {}
    return {**head, "x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}], **rest}


def _scalar(rule: _Rule, where: str) -> dict[str, Any]:
    """The schema of one value checked by the _validate function ``rule.kind``."""
    kind, args = rule.kind, rule.args
    if kind in ("integer", "optional_integer"):
        lo, hi = args
        return {"description": f"An integer in [{lo}, {hi}].", "type": "integer", "minimum": lo, "maximum": hi}
    if kind in ("number", "optional_number"):
        lo = args[0]
        hi = args[1] if len(args) > 1 else math.inf
        open_lo = bool(rule.kw("lo_open", False))
        upper = f"{hi}]" if math.isfinite(hi) else "inf)"
        text = f"A number in {'(' if open_lo else '['}{lo}, {upper}."
        node: dict[str, Any] = {"description": text, "type": "number", "minimum": lo}
        if open_lo:
            node["exclusiveMinimum"] = True
        if math.isfinite(hi):
            node["maximum"] = hi
        return node
    if kind == "boolean":
        return {"description": "A boolean.", "type": "boolean"}
    if kind in ("name", "endpoint_name"):
        pattern = _name_pattern(v.PATH_ID_SEPARATORS if kind == "endpoint_name" else "")
        chars = "letters, digits, '_', '-'" + ("" if kind == "endpoint_name" else ", '.'")
        width = _pattern_width(pattern[1:-1])
        return {"description": f"A name: 1-{width} characters ({chars}), starting with a letter or digit.",
                "type": "string", "minLength": 1, "maxLength": width, "pattern": pattern}
    if kind == "address":
        return {"description": "An IPv4 or IPv6 address (an IPv6 one may carry a zone: fe80::1%eth0).",
                "type": "string", "maxLength": MAX_ADDRESS_TEXT, "pattern": _ip_pattern()}
    if kind == "network":
        return {"description": "An IPv4 or IPv6 CIDR, address/prefix-length (10.1.0.0/24, fd00:1::/64).",
                "type": "string", "maxLength": MAX_ADDRESS_TEXT, "pattern": _cidr_pattern()}
    if kind == "choice":
        (allowed,) = args
        return {"description": "One of " + ", ".join(allowed) + ".", "type": "string", "enum": list(allowed)}
    if kind == "ports":
        lo, hi = _integer_bounds(v._port_pair)
        return _int_or_string(
            description=(f"Any port when null; else a port ({lo}-{hi}) or a string of comma-separated ports "
                         f"and lo-hi ranges (\"5060-5061,10000-20000\"), at most {v.MAX_PORT_ITEMS} items and "
                         f"{v.MAX_PORT_TEXT} characters."),
            minimum=lo, maximum=hi, maxLength=v.MAX_PORT_TEXT, pattern=_ports_pattern())
    if kind == "protocols":
        lo, hi = _integer_bounds(v._one_protocol)
        token = _protocol_token()
        names = ", ".join(v.PROTOCOLS)
        return {
            "description": (f"Any protocol when null; else a protocol number ({lo}-{hi}), a name ({names}; any "
                            f"case), several joined by '/' or ',' (\"tcp/udp\"), or a list of 1-"
                            f"{v.MAX_PROTOCOL_ITEMS} names and numbers (to_dict writes one number, or a list)."),
            # a number, a string or a list: no structural type says that
            "x-kubernetes-preserve-unknown-fields": True,
            "minimum": lo, "maximum": hi,
            "maxLength": v.MAX_PROTOCOL_TEXT,
            "pattern": f"^{_WS}{token}{_WS}(?:[/,]{_WS}{token}{_WS})*$",
            "minItems": 1, "maxItems": v.MAX_PROTOCOL_ITEMS,
            "items": _int_or_string(minimum=lo, maximum=hi, maxLength=v.MAX_PROTOCOL_TEXT,
                                    pattern=f"^{_WS}{token}{_WS}$"),
        }
    raise CRDError(f"{where}: the converter v.{kind}(...) has no schema in the CRD generator")


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    return {**node, "nullable": True}


def _object(cls: type, sources: dict[tuple[str, str], _FieldSource], *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The schema of an attrs class of the model, field by field."""
    hints = typing.get_type_hints(cls, vars(model))
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in attrs.fields(cls):
        if f.name in drop:
            continue
        props[f.name] = _field(cls, f, hints[f.name], sources)
        if f.default is attrs.NOTHING:
            required.append(f.name)
    node: dict[str, Any] = {"description": _doc(cls), "type": "object"}
    if required:
        node["required"] = required
    node["properties"] = props
    return node


def _strip_none(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) < len(get_args(hint)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return hint, False


def _field(cls: type, f: Any, hint: Any, sources: dict[tuple[str, str], _FieldSource]) -> dict[str, Any]:
    owner, where = cls.__name__, f"{cls.__name__}.{f.name}"
    source = sources.get((owner, f.name))
    if source is None:
        raise CRDError(f"{where}: not found in patronus/model.py")
    base, optional_hint = _strip_none(hint)
    if source.rule is not None:
        node = _scalar(source.rule, where)
        if source.rule.kind == "choice":
            literal = get_args(base) if get_origin(base) is Literal else ()
            if literal and tuple(literal) != tuple(source.rule.args[0]):
                raise CRDError(f"{where}: Literal{list(literal)} and v.choice{list(source.rule.args[0])} differ")
        nullable = source.rule.optional or source.rule.kind.startswith("optional_") or (
            optional_hint and source.rule.kind in ("ports", "protocols"))
    elif get_origin(base) is tuple and attrs.has(get_args(base)[0]):
        node = _list(owner, f.name, _object(get_args(base)[0], sources))
        nullable = False
    elif get_origin(base) is tuple and source.item_rule is not None:
        node = _list(owner, f.name, _scalar(source.item_rule, where))
        nullable = False
    elif attrs.has(base):
        node = _object(base, sources)
        nullable = _accepts_none(f.converter)
    else:
        raise CRDError(f"{where}: type {hint!r} with converter {source.function!r} has no schema in the "
                       "CRD generator")
    node["description"] = _with_note(owner, f.name, node.get("description", ""))
    if nullable:
        node = _nullable(node)
    default = f.default
    if default is not attrs.NOTHING and default is not None and not isinstance(default, attrs.Factory):
        value = f.converter(default) if f.converter else default
        node["default"] = list(value) if isinstance(value, tuple) else value
    return node


def _accepts_none(converter: Any) -> bool:
    try:
        converter(None)
    except Exception:
        return False
    return True


def _list(owner: str, field: str, item: dict[str, Any]) -> dict[str, Any]:
    rule = _LIST_RULES.get((owner, field))
    if rule is None:
        raise CRDError(f"{owner}.{field}: a list field without an entry in _LIST_RULES")
    item_text = item.pop("description", "")
    node: dict[str, Any] = {"description": f"A list of: {item_text}".strip(), "type": "array"}
    if rule.min_items:
        node["minItems"] = rule.min_items
    if rule.max_items is not None:
        node["maxItems"] = rule.max_items
    if rule.map_key:
        node["x-kubernetes-list-type"] = "map"
        node["x-kubernetes-list-map-keys"] = [rule.map_key]
        node["description"] = f"{node['description']} Each {rule.map_key} at most once."
        item = {"description": item_text, **item}
    elif rule.unique:
        node["x-kubernetes-list-type"] = "set"
        node["description"] = f"{node['description']} Each at most once."
    node["items"] = item
    return node


# --------------------------------------------------------------------------
# the resources


def _conditions() -> dict[str, Any]:
    return {
        "description": "Ready, Synced and Degraded, as Kubernetes conditions.",
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string"},
                "status": {"type": "string", "enum": list(CONDITION_STATUSES)},
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer"},
            },
        },
    }


def _status(kind: str) -> dict[str, Any]:
    props: dict[str, Any] = {"observedGeneration": {"type": "integer"}, "conditions": _conditions()}
    if kind == "Site":
        props.update({
            "state": {"description": "The site's state on the controller.", "type": "string"},
            "uplinks": {"description": "Uplinks of the site.", "type": "integer"},
            "pathsUp": {"description": "Paths of the site that are up.", "type": "integer"},
            "paths": {"description": "Paths of the site.", "type": "integer"},
        })
    elif kind == "Policy":
        route = {"type": "object", "properties": {
            "site": {"type": "string"}, "remoteSite": {"type": "string"}, "path": {"type": "string"}}}
        props.update({
            "currentPath": {"description": "The path the policy's traffic takes now.", "type": "string"},
            "routes": {"description": "The path per site pair.", "type": "array", "items": route},
        })
    return {"description": "Written by the operator.", "type": "object", "properties": props}


_READY = '.status.conditions[?(@.type=="Ready")].status'
_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "Site": [
        {"name": "Status", "type": "string", "jsonPath": ".status.state"},
        {"name": "Uplinks", "type": "integer", "jsonPath": ".status.uplinks"},
        {"name": "Paths-Up", "type": "integer", "jsonPath": ".status.pathsUp"},
        {"name": "Paths", "type": "integer", "jsonPath": ".status.paths", "priority": 1},
        {"name": "Ready", "type": "string", "jsonPath": _READY},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "Policy": [
        {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"},
        {"name": "App", "type": "string", "jsonPath": ".spec.app"},
        {"name": "Path", "type": "string", "jsonPath": ".status.currentPath"},
        {"name": "Ready", "type": "string", "jsonPath": _READY},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
}


def _model_class(kind: str) -> type:
    cls = getattr(model, kind, None)
    if cls is None or not attrs.has(cls):
        raise CRDError(f"kind {kind!r}: patronus.model has no attrs class of that name")
    return cls


def spec_schema(kind: str) -> dict[str, Any]:
    """The OpenAPI v3 schema of ``spec`` of ``kind`` ("Site" or "Policy"):
    the model class's fields without ``name``."""
    cls = _model_class(kind)
    node = _object(cls, _field_sources(), drop=("name",))
    node["description"] = (f"{node['description']} The {kind.lower()}'s name is metadata.name; spec is "
                           f"{kind}.to_dict() without it.")
    return node


def openapi_schema(kind: str) -> dict[str, Any]:
    """The whole ``openAPIV3Schema`` of ``kind``: apiVersion, kind, metadata
    (the name restricted to the model's name rule), spec and status."""
    name_rule = _field_sources()[kind, "name"].rule
    if name_rule is None:
        raise CRDError(f"{kind}.name: no _validate rule to restrict metadata.name with")
    name = _scalar(name_rule, f"{kind}.name")
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": name["maxLength"], "pattern": name["pattern"]}}},
            "spec": spec_schema(kind),
            "status": _status(kind),
        },
    }


def crd(kind: Kind) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of one kind."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "patronus-operator", "app.kubernetes.io/part-of": "patronus"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["patronus"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _COLUMNS[kind.kind],
                "schema": {"openAPIV3Schema": openapi_schema(kind.kind)},
            }],
        },
    }


def crds() -> list[dict[str, Any]]:
    """Both CustomResourceDefinitions, Site first."""
    return [crd(k) for k in KINDS.values()]


# --------------------------------------------------------------------------
# YAML out (a small emitter: the output is the same bytes with any PyYAML)

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "y", "n", "null"}


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CRDError(f"{value!r} cannot be written to a CRD")
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value, ensure_ascii=True)
    raise CRDError(f"{value!r} ({type(value).__name__}) cannot be written to a CRD")


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{_scalar_text(str(key))}:"
            if isinstance(item, (dict, list)) and item:
                lines.append(head)
                lines.extend(_yaml_lines(item, indent + 2 if isinstance(item, dict) else indent))
            else:
                lines.append(f"{head} {_inline(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                sub = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {sub[0][indent + 2:]}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_inline(item)}")
    return lines


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar_text(value)


def render(doc: dict[str, Any]) -> str:
    """A CRD as the YAML text of its file (header comment included)."""
    return HEADER + "---\n" + "\n".join(_yaml_lines(doc, 0)) + "\n"


def filename(doc: dict[str, Any]) -> str:
    """``sites.sdwan.patronus.dev.yaml``: the CRD's name."""
    return f"{doc['metadata']['name']}.yaml"


def _expected() -> dict[str, str]:
    return {filename(d): render(d) for d in crds()}


def write(out_dir: str | Path) -> list[Path]:
    """Write one YAML file per CRD into ``out_dir`` (created if missing);
    returns the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, text in _expected().items():
            path = out / name
            path.write_text(text, encoding="utf-8")
            paths.append(path)
    except OSError as e:
        raise CRDError(f"cannot write the CRDs to {out}: {e}") from e
    return paths


def check(out_dir: str | Path) -> list[str]:
    """What differs between the files in ``out_dir`` and what :func:`write`
    would write there: one message per file (a unified diff for a changed
    one); [] when they are the same."""
    out = Path(out_dir)
    expected = _expected()
    problems: list[str] = []
    for name, text in expected.items():
        path = out / name
        try:
            have = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        except OSError as e:
            problems.append(f"{path}: unreadable ({e})")
            continue
        if have != text:
            diff = list(difflib.unified_diff(have.splitlines(), text.splitlines(), f"{path} (committed)",
                                             f"{path} (from the model)", lineterm="", n=2))
            shown = diff[:60] + ([f"... {len(diff) - 60} more diff lines"] if len(diff) > 60 else [])
            problems.append(f"{path}: differs from the model\n" + "\n".join(shown))
    if out.is_dir():
        for path in sorted(out.glob(f"*.{GROUP}.yaml")):
            if path.name not in expected:
                problems.append(f"{path}: not a CRD of this version (a kind was renamed or removed?)")
    return problems


def main(args: Any) -> int:
    """``patronus crdgen``: write the CRDs to ``args.out``, or with
    ``args.check`` report what regenerating would change (exit 1) or
    nothing (exit 0)."""
    out = getattr(args, "out", None) or DEFAULT_OUT
    try:
        if getattr(args, "check", False):
            problems = check(out)
            for p in problems:
                print(p)
            if problems:
                print(f"the CRDs in {out} are not what the model gives: run `patronus crdgen --out {out}`")
                return 1
            print(f"the CRDs in {out} are up to date")
            return 0
        for path in write(out):
            print(path)
        return 0
    except CRDError as e:
        print(f"patronus crdgen: {e}", file=sys.stderr)
        return 1
