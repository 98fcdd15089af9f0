"""Policy compiler: a list of Policy -> the rule table the data planes run.

The table is a numpy array of ``abi.RULE_DTYPE`` (struct pn_rule) sorted by
priority, compiled by the Cython extension into per-field bit vectors
(docs/ARCHITECTURE.md, "Classifier").

>>> from patronus import PolicyTable, Policy, Match, packets
>>> table = PolicyTable([Policy("web", Match(proto="tcp", dst_ports=443), priority=20),
...                      Policy("dns", Match(proto="udp", dst_ports=53), priority=10)])
>>> table.classify([packets.udp("10.0.0.1", "10.0.0.2", 5353, 53), packets.icmp("10.0.0.1", "10.0.0.2")])
array([ 1, -1], dtype=int32)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import _fast, abi
from .errors import ConfigError
from .model import Policy

__all__ = ["PolicyTable", "Policies", "compile_rules", "flows_to_pandas", "frames_to_buffer"]

RF_SRC, RF_DST, RF_SPORT, RF_DPORT, RF_PROTO, RF_DSCP = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def compile_rules(policies: Sequence[Policy]) -> np.ndarray:
    """struct pn_rule rows, sorted by priority; ``policy`` is the index in ``policies``.

    A policy takes one row per (source port range, destination port range,
    protocol) of its match, each with the policy's index and priority, its
    rows next to each other: ``Match(proto="tcp/udp", dst_ports="53,853")``
    is four rows. A policy may take at most 4,096 rows (ConfigError naming it).

    >>> from patronus import Match
    >>> rules = compile_rules([Policy("sip", Match(proto="tcp/udp", dst_ports=[5060, (10000, 20000)]), priority=1)])
    >>> [(int(r["dport_lo"]), int(r["dport_hi"]), int(r["proto"]), int(r["policy"])) for r in rules]
    [(5060, 5060, 6, 0), (5060, 5060, 17, 0), (10000, 20000, 6, 0), (10000, 20000, 17, 0)]
    """
    from itertools import product

    max_rows = 4096  # a policy's port ranges x protocols
    order = sorted(range(len(policies)), key=lambda i: policies[i].priority)
    # per policy (in priority order) and per row, filled into the table by column
    base: dict[str, list[Any]] = {k: [] for k in ("src", "dst", "src_plen", "dst_plen", "family", "dscp", "flags",
                                                   "policy", "priority", "rows")}
    per_row: dict[str, list[int]] = {k: [] for k in ("sport_lo", "sport_hi", "dport_lo", "dport_hi", "proto")}
    nets: dict[str, tuple[bytes, int, int]] = {}  # CIDR -> (address, prefix length, family): parsed once
    for i in order:
        m = policies[i].match
        combos = (m.src_ports or ((0, 0),), m.dst_ports or ((0, 0),), m.protos or (0,))
        n = len(combos[0]) * len(combos[1]) * len(combos[2])
        if n > max_rows:
            raise ConfigError("Policy.match", policies[i].name,
                              f"takes {n:,} classifier rules ({len(combos[0])} source port ranges x "
                              f"{len(combos[1])} destination port ranges x {len(combos[2])} protocols), "
                              f"more than {max_rows:,}: merge ranges or split the policy")
        flags = family = 0
        for field, flag in (("src", RF_SRC), ("dst", RF_DST)):
            cidr = getattr(m, field)
            packed, plen = bytes(16), 0
            if cidr is not None:
                if cidr not in nets:
                    net = ipaddress.ip_network(cidr)
                    nets[cidr] = (net.network_address.packed.ljust(16, b"\0"), net.prefixlen, net.version)
                packed, plen, family = nets[cidr]
                flags |= flag
            base[field].append(packed)
            base[f"{field}_plen"].append(plen)
        flags |= (RF_SPORT if m.src_ports is not None else 0) | (RF_DPORT if m.dst_ports is not None else 0)
        flags |= (RF_PROTO if m.proto is not None else 0) | (RF_DSCP if m.dscp is not None else 0)
        for k, v in (("family", family), ("dscp", m.dscp or 0), ("flags", flags), ("policy", i),
                     ("priority", policies[i].priority), ("rows", n)):
            base[k].append(v)
        for (slo, shi), (dlo, dhi), proto in product(*combos):
            for k, v in (("sport_lo", slo), ("sport_hi", shi), ("dport_lo", dlo), ("dport_hi", dhi),
                         ("proto", proto)):
                per_row[k].append(v)
    rows = np.asarray(base.pop("rows"), dtype=np.int64)
    rules = np.zeros(int(rows.sum()), dtype=abi.RULE_DTYPE)
    for k in ("src", "dst"):
        rules[k] = np.repeat(np.frombuffer(b"".join(base.pop(k)), np.uint8).reshape(-1, 16), rows, axis=0)
    for k, col in base.items():
        rules[k] = np.repeat(np.asarray(col, dtype=rules.dtype[k]), rows)
    for k, col in per_row.items():
        rules[k] = np.asarray(col, dtype=rules.dtype[k])
    return rules


def is_buffer(frames: Any) -> bool:
    """True for the ``(buffer, offsets)`` form of a batch of frames."""
    return isinstance(frames, tuple) and len(frames) == 2 and isinstance(frames[1], np.ndarray)


def frames_to_buffer(frames: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Pack frames into one contiguous buffer and an int64 offsets array (len + 1)."""
    offsets = np.zeros(len(frames) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    return np.frombuffer(b"".join(frames), dtype=np.uint8), offsets


class Policies(tuple):
    """The policies of a table, indexed by policy id. A negative index is
    refused: -1 is the id of the default class (no policy matched), and
    ``policies[-1]`` would silently be the last policy. Use
    ``PolicyTable.policy(i)`` or ``PolicyTable.name_of(ids)``, which say
    None for the default.

    >>> from patronus import PolicyTable, Policy, Match
    >>> t = PolicyTable([Policy("dns", Match(proto="udp", dst_ports=53), priority=1)])
    >>> t.policies[0].name
    'dns'
    >>> t.policies[-1]
    Traceback (most recent call last):
    ...
    patronus.errors.ConfigError: policy id: -1 is the default class (no policy), not an index: use table.policy(i) or table.name_of(ids), which return None for it
    """

    __slots__ = ()

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i < 0:
            raise ConfigError("policy id", int(i), "is the default class (no policy), not an index: use "
                              "table.policy(i) or table.name_of(ids), which return None for it")
        return tuple.__getitem__(self, i)


def _site_table(sites: Any) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]], np.ndarray]:
    """(names, name -> subnets, struct pn_site_prefix rows) of a sites argument."""
    from . import _validate as v
    from .model import Site

    if sites is None:
        items: list[tuple[Any, Any]] = []
    elif isinstance(sites, dict):
        items = list(sites.items())
    else:
        items = []
        for s in v.sequence("PolicyTable.sites", sites):
            if not isinstance(s, Site):
                raise ConfigError("PolicyTable.sites", s, "is not a Site (or give a mapping name -> subnets)")
            items.append((s.name, s.subnets))
    if len(items) > MAX_SITES:
        raise ConfigError("PolicyTable.sites", len(items), f"sites exceed the limit of {MAX_SITES}")
    names: list[str] = []
    subnets: dict[str, tuple[str, ...]] = {}
    owner: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {}
    for name, nets in items:
        name = v.name("PolicyTable.sites", name)
        if name in subnets:
            raise ConfigError("PolicyTable.sites", name, "is a duplicate site name")
        canon = tuple(v.network(f"sites[{name!r}]", n) for n in v.sequence(f"sites[{name!r}]", nets))
        for c in canon:
            net = ipaddress.ip_network(c)
            if net in owner:
                raise ConfigError(f"sites[{name!r}]", c, f"is a subnet of site {owner[net]!r} too")
            owner[net] = name
        names.append(name)
        subnets[name] = canon
    rows = np.zeros(len(owner), dtype=abi.SITE_PREFIX_DTYPE)
    for row, (net, name) in zip(rows, owner.items()):
        packed = net.network_address.packed
        row["addr"][: len(packed)] = np.frombuffer(packed, np.uint8)
        row["plen"] = net.prefixlen
        row["family"] = net.version
        row["site"] = names.index(name) + 1
    return tuple(names), subnets, rows


MAX_SITES = 65_535


class PolicyTable:
    """Policies compiled for classification, and the destination sites.

    ``policies`` keeps the order the list was given in; classification returns
    ids into it (-1: no policy matched, or the frame did not parse: the
    default class). ``table.policy(i)`` and ``table.name_of(ids)`` turn ids
    into policies and names, None for the default.

    ``sites`` (Sites, or a mapping site name -> subnets) is where packets go:
    a packet's destination site is the site whose subnet holds its
    destination address (longest prefix), numbered from 1 in the order given
    (``site_id``); 0 is "outside every site". A data plane keeps a path per
    (class, destination site). ``Mesh.policy_table()`` passes the mesh's sites.

    >>> from patronus import Policy, Match, packets
    >>> t = PolicyTable([Policy("dns", Match(proto="udp", dst_ports=53), priority=1)],
    ...                 sites={"hq": ["10.1.0.0/24"], "br1": ["10.2.0.0/24", "fd00:2::/64"]})
    >>> ids = t.classify([packets.udp("10.1.0.9", "10.2.0.7", 5353, 53), packets.icmp("10.1.0.9", "10.2.0.7")])
    >>> t.name_of(ids)
    ['dns', None]
    >>> t.sites_of([packets.icmp("10.1.0.9", "10.2.0.7"), packets.icmp("10.1.0.9", "8.8.8.8")]).tolist()
    [2, 0]
    >>> t.site_name(2)
    'br1'
    """

    def __init__(self, policies: Iterable[Policy], *, sites: Any = None, cache_size: int = 1 << 17) -> None:
        pols = list(policies)
        names: dict[str, int] = {}
        prios: dict[int, str] = {}
        for p in pols:
            if not isinstance(p, Policy):
                raise ConfigError("PolicyTable.policies", p, "is not a Policy")
            if p.name in names:
                raise ConfigError("Policy.name", p.name, "is a duplicate policy name")
            if p.priority in prios:
                raise ConfigError("Policy.priority", p.priority, f"is already used by policy {prios[p.priority]!r}")
            names[p.name] = len(names)
            prios[p.priority] = p.name
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 2 \
                or cache_size & (cache_size - 1) or cache_size > 1 << 26:
            raise ConfigError("PolicyTable.cache_size", cache_size, "is not a power of two in [2, 2**26]")
        self.sites, self.site_subnets, self.site_prefixes = _site_table(sites)
        self.policies: Policies = Policies(pols)
        self._index = names
        self.rules = compile_rules(self.policies)

        self._cls = _fast.Classifier(self.rules, cache_size)
        self._sites = _fast.Sites(self.site_prefixes, len(self.sites))

    @property
    def classifier(self) -> Any:
        """The compiled classifier of this table (``patronus._fast.Classifier``):
        what the data planes load (``export()`` gives its rows and bitmaps)."""
        return self._cls

    @property
    def site_index(self) -> Any:
        """The compiled destination-site lookup (``patronus._fast.Sites``)."""
        return self._sites

    # -- ids -> policies and sites -------------------------------------------

    def policy(self, i: int) -> Policy | None:
        """The policy of id ``i``; None for the default class (-1)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -1 <= i < len(self.policies):
            raise ConfigError("policy id", i, f"is not -1 (default) or a policy id 0..{len(self.policies) - 1}")
        return None if i == -1 else tuple.__getitem__(self.policies, int(i))

    def name_of(self, ids: Any) -> Any:
        """The policy name of an id (None for the default class -1), or a
        list of them for an array of ids."""
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            p = self.policy(ids)
            return None if p is None else p.name
        return [self.name_of(int(i)) for i in np.asarray(ids).ravel()]

    def site_id(self, site: str | int) -> int:
        """The data planes' number of a site (1..), by name; 0 stands for
        "outside every site" and is given back as is."""
        if isinstance(site, str):
            try:
                return self.sites.index(site) + 1
            except ValueError:
                raise ConfigError("site", site, f"is not a site of this table ({', '.join(self.sites) or 'none'})") from None
        if isinstance(site, bool) or not isinstance(site, (int, np.integer)) or not 0 <= site <= len(self.sites):
            raise ConfigError("site", site, f"is not a site name or a site number 0..{len(self.sites)}")
        return int(site)

    def site_name(self, site_id: int) -> str | None:
        """The name of site number ``site_id``; None for 0 (outside every site)."""
        i = self.site_id(site_id)
        return None if i == 0 else self.sites[i - 1]

    def sites_of(self, frames: Sequence[bytes]) -> np.ndarray:
        """Destination site number per frame (0: outside every site, -1: the frame did not parse)."""
        return self._sites.lookup(list(frames))

    @property
    def by_priority(self) -> list[Policy]:
        """The policies in evaluation order."""
        return sorted(self.policies, key=lambda p: p.priority)

    @property
    def memory_bytes(self) -> int:
        """Memory of the compiled bit vectors."""
        return self._cls.memory

    def index(self, name: str) -> int:
        """Index of the policy called ``name``."""
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise ConfigError("policy", name, "is not in this table") from None

    def classify(self, frames: Sequence[bytes] | tuple[Any, np.ndarray], *, cache: bool = True) -> np.ndarray:
        """Policy index per frame (int32, -1 = no match or malformed).

        ``frames`` is a list of bytes-like frames, or a ``(buffer, offsets)``
        pair where frame i is ``buffer[offsets[i]:offsets[i+1]]``.
        ``cache=False`` skips the classification cache (every lookup is a miss).
        """
        return self._run(frames, _fast.MODE_CACHE if cache else _fast.MODE_BITVEC)

    def classify_linear(self, frames: Sequence[bytes] | tuple[Any, np.ndarray]) -> np.ndarray:
        """The same answer by scanning every rule in C: a baseline, not for production."""
        return self._run(frames, _fast.MODE_LINEAR)

    def _run(self, frames: Any, mode: int) -> np.ndarray:
        if is_buffer(frames):
            buf, offsets = frames
            out = np.empty(max(len(offsets) - 1, 0), dtype=np.int32)
            self._cls.classify_buffer(np.frombuffer(buf, np.uint8), np.ascontiguousarray(offsets, np.int64), out, mode)
            return out
        if not isinstance(frames, list):
            frames = list(frames)
        out = np.empty(len(frames), dtype=np.int32)
        self._cls.classify_list(frames, out, mode)
        return out

    def malformed(self) -> dict[str, int]:
        """Frames classify() could not parse, by reason."""
        return dict(zip(abi.MALFORMED_REASONS, self._cls.malformed()))

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return (f"PolicyTable({len(self.policies)} policies, {len(self.sites)} sites, "
                f"{self.memory_bytes} bytes compiled)")


def flows_to_pandas(flows: np.ndarray, table: PolicyTable | None = None) -> Any:
    """A pandas DataFrame of a flows array, with readable addresses and, given
    the table, policy names. Needs pandas (``pip install patronus[pandas]``).

    >>> import numpy as np
    >>> from patronus import abi
    >>> flows_to_pandas(np.zeros(0, abi.FLOW_DTYPE)).columns[:3].tolist()
    ['src', 'dst', 'sport']
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("flows_to_pandas needs pandas: pip install 'patronus[pandas]'") from None

    def addrs(col: np.ndarray) -> list[str]:
        out = []
        for raw, fam in zip(col, flows["family"]):
            b = bytes(raw)
            out.append(str(ipaddress.IPv4Address(b[:4]) if fam == 4 else ipaddress.IPv6Address(b)))
        return out

    df = pd.DataFrame({
        "src": addrs(flows["src"]), "dst": addrs(flows["dst"]),
        "sport": flows["sport"], "dport": flows["dport"], "proto": flows["proto"],
        "packets": flows["packets"], "bytes": flows["bytes"],
        "first": pd.to_datetime(flows["first_ns"].astype("int64"), unit="ns"),
        "last": pd.to_datetime(flows["last_ns"].astype("int64"), unit="ns"),
        "policy": flows["policy"],
        "site": flows["site"], "path": flows["path"], "tcp_flags": flows["tcp_flags"], "dscp": flows["dscp"],
    })
    if table is not None:
        df["policy_name"] = [table.name_of(int(i)) or "(default)" for i in flows["policy"]]
        df["site_name"] = [table.site_name(int(i)) if int(i) <= len(table.sites) else None for i in flows["site"]]
    return df
