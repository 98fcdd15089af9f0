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

from . import abi
from .errors import ConfigError
from .model import Policy

__all__ = ["PolicyTable", "compile_rules", "flows_to_pandas", "frames_to_buffer"]

RF_SRC, RF_DST, RF_SPORT, RF_DPORT, RF_PROTO, RF_DSCP = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def compile_rules(policies: Sequence[Policy]) -> np.ndarray:
    """struct pn_rule rows, sorted by priority; ``policy`` is the index in ``policies``."""
    order = sorted(range(len(policies)), key=lambda i: policies[i].priority)
    rules = np.zeros(len(policies), dtype=abi.RULE_DTYPE)
    for row, i in enumerate(order):
        m = policies[i].match
        r = rules[row]
        flags = 0
        for field, flag in (("src", RF_SRC), ("dst", RF_DST)):
            cidr = getattr(m, field)
            if cidr is not None:
                net = ipaddress.ip_network(cidr)
                packed = net.network_address.packed
                r[field][: len(packed)] = np.frombuffer(packed, np.uint8)
                r[f"{field}_plen"] = net.prefixlen
                r["family"] = net.version
                flags |= flag
        if m.src_ports is not None:
            r["sport_lo"], r["sport_hi"] = m.src_ports
            flags |= RF_SPORT
        if m.dst_ports is not None:
            r["dport_lo"], r["dport_hi"] = m.dst_ports
            flags |= RF_DPORT
        if m.proto is not None:
            r["proto"] = m.proto
            flags |= RF_PROTO
        if m.dscp is not None:
            r["dscp"] = m.dscp
            flags |= RF_DSCP
        r["flags"] = flags
        r["policy"] = i
        r["priority"] = policies[i].priority
    return rules


def is_buffer(frames: Any) -> bool:
    """True for the ``(buffer, offsets)`` form of a batch of frames."""
    return isinstance(frames, tuple) and len(frames) == 2 and isinstance(frames[1], np.ndarray)


def frames_to_buffer(frames: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Pack frames into one contiguous buffer and an int64 offsets array (len + 1)."""
    offsets = np.zeros(len(frames) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    return np.frombuffer(b"".join(frames), dtype=np.uint8), offsets


class PolicyTable:
    """Policies compiled for classification.

    ``policies`` keeps the order the list was given in; classification returns
    indexes into it (-1: no policy matched, or the frame did not parse).
    """

    def __init__(self, policies: Iterable[Policy], *, cache_size: int = 1 << 17) -> None:
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
        self.policies: tuple[Policy, ...] = tuple(pols)
        self._index = names
        self.rules = compile_rules(self.policies)
        from . import _fast

        self._cls = _fast.Classifier(self.rules, cache_size)

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
        mode = 0 if cache else 1
        return self._run(frames, mode)

    def classify_linear(self, frames: Sequence[bytes] | tuple[Any, np.ndarray]) -> np.ndarray:
        """The same answer by scanning every rule in C: a baseline, not for production."""
        return self._run(frames, 2)

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
        return f"PolicyTable({len(self.policies)} policies, {self.memory_bytes} bytes compiled)"


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
        "path": flows["path"], "tcp_flags": flows["tcp_flags"], "dscp": flows["dscp"],
    })
    if table is not None:
        names = [p.name for p in table.policies]
        df["policy_name"] = [names[i] if i >= 0 else "(default)" for i in flows["policy"]]
    return df
