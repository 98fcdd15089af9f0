"""The XDP program's table layout, computed from a PolicyTable: pure maths on
numpy arrays, no BPF, no root (tests/test_xdp_layout.py runs it anywhere).

The program (bpf/patronus_xdp.c) keeps the classifier of the userspace data
plane in BPF maps: bitmap rows deduplicated into chunks (``BitmapChunks``),
IPv4 prefixes and destination sites in a 16-8-8 stride table
(``v4_strides``), IPv6 prefixes in LPM tries (``lpm_entries``,
``site_entries``, ``lpm6_key``); ``Capacity`` fixes the compiled sizes.

>>> from patronus import Policy, Match, PolicyTable
>>> t = PolicyTable([Policy("a", Match(dst="10.1.0.0/16"), priority=1)], sites={"hq": ["10.9.0.0/24"]})
>>> l1, chunks = v4_strides({}, lpm_entries(t.rules, t.classifier.export(), 1),
...                         sites=site_entries(t.site_prefixes, 4))
>>> int(l1[1][0x0A01]) != int(l1[1][0x0A02]), int(l1[2][0x0A09]) & V4_CHUNK != 0, chunks.shape
(True, True, (1, 256))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import abi
from ..errors import ConfigError
from ..policy import PolicyTable

__all__ = ["Capacity", "BitmapChunks", "table_layout", "lpm_entries", "site_entries", "v4_strides", "lpm6_key",
           "pow2", "FIELDS", "ALL_FIELDS", "V4_CHUNK", "V4_DIRS", "V4_L1", "V4_FANOUT", "MAX_RULES"]

_C = abi.CONSTANTS
V4_CHUNK = _C["V4_CHUNK"]  # a stride entry that names a chunk, not a row
V4_DIRS = _C["V4_DIRS"]  # stride tables per set: source, destination, destination site
V4_L1 = _C["V4_L1"]  # level-1 entries per direction (the top 16 address bits)
V4_FANOUT = abi.V4CHUNK_DTYPE["e"].shape[0]  # entries per stride chunk (8 bits)
RULES_PER_SUM = _C["RULES_PER_SUM"]  # rules one summary word covers
EVICT_PAGES = 256  # eviction ring buffer: 1 MiB, about 10,900 records between drains
CCACHE = 1 << 16  # classifier cache entries (LRU; a row combination and its policy each)
CCACHE_MIN_RULES = RULES_PER_SUM + 1  # below, one summary word: the walk costs less than the cache lookup
MAX_RULES = 32 * RULES_PER_SUM  # pn_cls: one tail call per summary word, 33 calls at most
FIELDS = ("src4", "dst4", "src6", "dst6")


def lpm6_key(tag: int, plen: int, value: int) -> bytes:
    """struct pn_lpm6 for the first ``plen`` bits ``value`` of an IPv6
    address under ``tag`` (set * 2 + direction)."""
    key = np.zeros(1, dtype=abi.LPM6_DTYPE)
    key["prefixlen"] = _C["LPM6_TAG_BITS"] + plen
    key["tag"] = tag
    key["addr"] = np.frombuffer((value << (128 - plen)).to_bytes(16, "big") if plen else bytes(16), np.uint8)
    return key.tobytes()


def pow2(n: int, floor: int = 1) -> int:
    p = floor
    while p < n:
        p <<= 1
    return p


ALL_FIELDS = (*FIELDS, "sport", "dport", "proto", "dscp")


def nrows(export: dict[str, Any]) -> int:
    return sum(export[f]["sums"].shape[0] for f in ALL_FIELDS)


def room(export: dict[str, Any], max_policies: int | None) -> tuple[int, int]:
    """Rules a program has room for, and its summary words (4,096 rules each)."""
    max_rules = max(max_policies or 0, export["nrules"], 64)
    return max_rules, (max_rules + RULES_PER_SUM - 1) // RULES_PER_SUM


def table_layout(table: PolicyTable, export: dict[str, Any], nsum: int) -> tuple[BitmapChunks, np.ndarray, np.ndarray]:
    """A table in the program's layout at width ``nsum``: its bitmap rows and
    chunks, and its IPv4 stride table (level 1, chunks) with final rows for
    source and destination and the destination site as a third direction."""
    bitmaps = BitmapChunks(export, nsum)
    l1, v4 = v4_strides(lpm_entries(table.rules, export, 0), lpm_entries(table.rules, export, 1),
                        (bitmaps.base["src4"], bitmaps.base["dst4"]), sites=site_entries(table.site_prefixes, 4))
    return bitmaps, l1, v4


def site_entries(prefixes: np.ndarray, family: int) -> dict[tuple[int, int], int]:
    """(prefix length, prefix value) -> site of one family's site subnets."""
    bits = 32 if family == 4 else 128
    out = {}
    for row in prefixes[prefixes["family"] == family]:
        plen = int(row["plen"])
        value = int.from_bytes(row["addr"].tobytes()[: bits // 8], "big") >> (bits - plen)
        out[(plen, value)] = int(row["site"])
    return out


class Capacity:
    """Compile-time sizes of one program. A table that outgrows them needs a new Xdp."""

    def __init__(self, export: dict[str, Any], max_policies: int | None, v4_chunks: int, chunks: int,
                 headroom: float = 1.25, site_prefixes: int = 0) -> None:
        # bitmap width follows the policy count (rows cost nrows x width); the
        # rule -> policy array is a power of two so the program can mask indexes
        self.max_rules, self.nsum = room(export, max_policies)
        if self.max_rules > MAX_RULES:
            raise ConfigError("Xdp.max_policies", self.max_rules,
                              f"is more than the XDP classifier takes ({MAX_RULES:,} rules: 32 summary words, "
                              "one tail call each)")
        self.rules = pow2(self.max_rules)
        self.rows = max(int(nrows(export) * headroom), 64)
        # LPM entries per trie (IPv6): both sets, both directions, one per prefix + /0
        self.lpm = max(4 * (self.max_rules + 1), 256)
        # IPv4 stride chunks per set, grown with the room left for more rules
        grow = self.max_rules / max(export["nrules"], 1)
        # (plus two per IPv4 site subnet there is room for: a /25../32 takes two)
        self.v4_chunks = max(int(v4_chunks * headroom * grow) + 16, 64) + 2 * site_prefixes
        # distinct 64-word bitmap chunks per set (BitmapChunks)
        self.chunks = max(int(chunks * headroom * grow) + 16, 64)

    def fits(self, export: dict[str, Any], v4_chunks: int, chunks: int = 0) -> str | None:
        have = nrows(export)
        if export["nrules"] > self.max_rules:
            return f"{export['nrules']} rules > {self.max_rules} compiled in"
        if have > self.rows:
            return f"{have} bitmap rows > {self.rows} compiled in"
        if v4_chunks > self.v4_chunks:
            return f"{v4_chunks} IPv4 stride chunks > {self.v4_chunks} compiled in"
        if chunks > self.chunks:
            return f"{chunks} distinct bitmap chunks > {self.chunks} compiled in"
        return None

    def cflags(self, npol: int, slots: int) -> list[str]:
        return [f"-DPN_NSUM={self.nsum}", f"-DPN_ROWS={self.rows}",
                f"-DPN_CHUNKS={self.chunks}",
                f"-DPN_LPM={self.lpm}", f"-DPN_V4CHUNKS={self.v4_chunks}", f"-DPN_RULES={self.rules}", f"-DPN_NPOL={npol}", f"-DPN_FSLOTS={slots}",
                f"-DPN_EVICT_PAGES={EVICT_PAGES}",
                f"-DPN_CCACHE={CCACHE if self.max_rules >= CCACHE_MIN_RULES else 0}"]


def lpm_entries(rules: np.ndarray, export: dict[str, Any], k: int) -> dict[tuple[int, int], int]:
    """(prefix length, prefix value) -> row for prefix field k (src4, dst4,
    src6, dst6): each interval's row belongs to the longest rule prefix that
    holds it; (0, 0) stands for "no rule prefix holds it" unless a /0 exists."""
    fam, bits = (4, 32) if k < 2 else (6, 128)
    side, flag = ("src", _C["RF_SRC"]) if k % 2 == 0 else ("dst", _C["RF_DST"])
    by_len: dict[int, set[int]] = {}
    for r in rules:
        if r["flags"] & flag and r["family"] == fam:
            plen = int(r[f"{side}_plen"])
            value = int.from_bytes(bytes(r[side])[: bits // 8], "big")
            by_len.setdefault(plen, set()).add(value >> (bits - plen))
    lens = sorted(by_len, reverse=True)
    f = export[FIELDS[k]]
    starts = [(int(h) << 64) | int(lo) for h, lo in zip(f["start_hi"], f["start_lo"])]
    out: dict[tuple[int, int], int] = {}
    for start, row in zip(starts, f["row_of"].tolist()):
        key = (0, 0)
        for plen in lens:
            if (start >> (bits - plen)) in by_len[plen]:
                key = (plen, start >> (bits - plen))
                break
        if out.setdefault(key, row) != row:
            raise AssertionError(f"{FIELDS[k]}: prefix {key} maps to two rows")
    return out


class BitmapChunks:
    """The classifier rows of a table in the program's layout: per row its
    summary words and, for each summary word, the id of a 64-word chunk of
    its bitmap. The userspace classifier keeps its bitmaps this way already
    (each distinct chunk once, id 0 all zeros); here rows are widened to the
    program's ``nsum`` (more summary words stand for rules not there yet:
    zero, chunk 0). Rows of a field come in ALL_FIELDS order; ``base[f]`` is
    field f's first row."""

    def __init__(self, export: dict[str, Any], nsum: int) -> None:
        ens = export["nsum"]
        sums, chunk_ids, self.base = [], [], {}
        n = 0
        for f in ALL_FIELDS:
            e = export[f]
            rows = e["sums"].shape[0]
            self.base[f] = n
            n += rows
            s = np.zeros((rows, nsum), dtype=np.uint64)
            s[:, :ens] = e["sums"]
            cid = np.zeros((rows, nsum), dtype=np.uint32)
            cid[:, :ens] = e["chunk"]
            sums.append(s)
            chunk_ids.append(cid)
        self.sums = np.concatenate(sums)
        self.chunk_ids = np.concatenate(chunk_ids)
        self.chunks = export["chunks"]

    def row_values(self) -> np.ndarray:
        """struct pn_row values (``abi.row_dtype(nsum)``), one per row."""
        out = np.zeros(len(self.sums), dtype=abi.row_dtype(self.sums.shape[1]))
        out["sum"], out["chunk"] = self.sums, self.chunk_ids
        return out


def v4_strides(src: dict[tuple[int, int], int], dst: dict[tuple[int, int], int],
               base: tuple[int, int] = (0, 0), sites: dict[tuple[int, int], int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The IPv4 prefix fields as a 16-8-8 multibit table: ``l1[dir][a >> 16]``
    is a row, or ``V4_CHUNK | c`` for chunk c, whose entry for the next 8
    bits is again a row or a chunk (of the last 8 bits). Built from
    :func:`lpm_entries` by painting prefixes shortest first, each new chunk
    seeded with the row of the entry it replaces. ``base`` is added to the
    rows of each direction. The third direction holds the destination site
    of the ``sites`` prefixes (:func:`site_entries`; 0: none). Returns l1
    (V4_DIRS x V4_L1) and chunks (n x V4_FANOUT)."""
    l1 = np.zeros((V4_DIRS, V4_L1), dtype=np.uint32)
    chunks: list[np.ndarray] = []

    def chunk_of(table: np.ndarray, i: int) -> np.ndarray:
        e = int(table[i])
        if e & V4_CHUNK:
            return chunks[e & ~V4_CHUNK]
        chunks.append(np.full(V4_FANOUT, e, dtype=np.uint32))
        table[i] = V4_CHUNK | (len(chunks) - 1)
        return chunks[-1]

    for d, entries in enumerate((src, dst, sites or {})):
        top = l1[d]
        for (plen, value), row in sorted(entries.items()):
            row += base[d] if d < 2 else 0
            if plen <= 16:
                top[value << (16 - plen) : (value + 1) << (16 - plen)] = row
            elif plen <= 24:
                sub = value & ((1 << (plen - 16)) - 1)
                chunk_of(top, value >> (plen - 16))[sub << (24 - plen) : (sub + 1) << (24 - plen)] = row
            else:
                mid = chunk_of(top, value >> (plen - 16))
                sub = value & ((1 << (plen - 24)) - 1)
                chunk_of(mid, (value >> (plen - 24)) & 255)[sub << (32 - plen) : (sub + 1) << (32 - plen)] = row
    return l1, (np.stack(chunks) if chunks else np.zeros((0, V4_FANOUT), dtype=np.uint32))


