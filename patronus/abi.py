"""numpy views of the structs in csrc/patronus_abi.h, and its constants.

The constants come from the compiled header (``_fast.abi_constants()``);
tests/test_abi.py checks every offset and size of the dtypes here against
the compiled header, so a layout change that forgets this file fails the
suite.

>>> NO_PATH == 0xFFFFFFFF, CFG_DTYPE.itemsize
(True, 24)
"""

from __future__ import annotations

import numpy as np

from . import _fast

__all__ = ["FLOW_DTYPE", "XSLOT_DTYPE", "BUCKET_DTYPE", "RULE_DTYPE", "POLICY_COUNTER_DTYPE", "SITE_PREFIX_DTYPE",
           "ROUTE_DTYPE", "RATE_DTYPE", "META_DTYPE", "DETAIL_DTYPE", "CFG_DTYPE", "LUT_DTYPE", "LPM6_DTYPE", "V4CHUNK_DTYPE",
           "CHUNK_DTYPE", "row_dtype", "MALFORMED_REASONS", "STATS", "CONSTANTS", "NO_PATH", "SITE_NONE"]

# every integer constant of the header, without the PN_ prefix
CONSTANTS: dict[str, int] = _fast.abi_constants()

# enum pn_reason, index 1.. (0 is PN_OK, not a counter)
MALFORMED_REASONS: tuple[str, ...] = (
    "trunc_l2", "not_ip", "trunc_ip", "bad_version", "bad_ihl", "bad_len", "trunc_ext", "trunc_l4",
)

# enum pn_stat: the XDP program's per-CPU event counters, by index
STATS: tuple[str, ...] = ("new_flows", "hits", "reclassified", "insert_failed", "evicted", "export_lost",
                          "unaccounted", "class_cache_hits")

NO_PATH: int = CONSTANTS["NO_PATH"]
SITE_NONE: int = CONSTANTS["SITE_NONE"]  # a destination outside every site's subnets

# struct pn_flow = pn_flow_key + pn_flow_rec, flattened (96 bytes)
FLOW_DTYPE = np.dtype([
    ("src", "u1", (16,)), ("dst", "u1", (16,)),
    ("sport", "<u2"), ("dport", "<u2"), ("proto", "u1"), ("family", "u1"), ("_pad0", "<u2"),
    ("packets", "<u8"), ("bytes", "<u8"), ("first_ns", "<u8"), ("last_ns", "<u8"),
    ("policy", "<i4"), ("path", "<u4"), ("tcp_flags", "u1"), ("dscp", "u1"), ("_pad1", "<u2"),
    ("generation", "<u4"), ("site", "<u4"), ("_pad2", "<u4"),
], align=True)

# struct pn_xslot: one slot of the XDP flow table (a flow plus the counts
# of CPUs other than its creator); readers fold it into FLOW_DTYPE
XSLOT_DTYPE = np.dtype([("f", FLOW_DTYPE), ("shared_packets", "<u8"), ("shared_bytes", "<u8")], align=True)
# struct pn_bucket: the XDP flow table's unit (a count, then 4 slots)
BUCKET_DTYPE = np.dtype([("passed", "<u4"), ("tag", "u1", (4,)), ("s", XSLOT_DTYPE, (4,)), ("_align", "<u8", (7,))], align=True)

RULE_DTYPE = np.dtype([
    ("src", "u1", (16,)), ("dst", "u1", (16,)),
    ("src_plen", "u1"), ("dst_plen", "u1"), ("family", "u1"), ("proto", "u1"),
    ("sport_lo", "<u2"), ("sport_hi", "<u2"), ("dport_lo", "<u2"), ("dport_hi", "<u2"),
    ("dscp", "u1"), ("flags", "u1"), ("_pad", "<u2"),
    ("policy", "<i4"), ("priority", "<u4"),
], align=True)

POLICY_COUNTER_DTYPE = np.dtype([("packets", "<u8"), ("bytes", "<u8")])

# struct pn_site_prefix: one subnet of a destination site
SITE_PREFIX_DTYPE = np.dtype([("addr", "u1", (16,)), ("plen", "u1"), ("family", "u1"), ("_pad", "<u2"),
                              ("site", "<u4")], align=True)
# struct pn_route: what one (class, site) pair does
ROUTE_DTYPE = np.dtype([("path", "<u4"), ("action", "<u4")])

# struct pn_rate: one policy's policer (GCRA)
RATE_DTYPE = np.dtype([("tat", "<u8"), ("ps_per_byte", "<u8"), ("burst_ns", "<u8"), ("_pad", "<u8")])
# struct pn_meta: what the XDP program leaves in front of a frame
META_DTYPE = np.dtype([("path", "<u4"), ("policy", "<i4"), ("site", "<u4")])
# what process(detail=True) and test_run(detail=True) return per frame
DETAIL_DTYPE = np.dtype([("policy", "<i4"), ("site", "<u4"), ("path", "<u4")])

# struct pn_cfg: the XDP program's one configuration value (pn_cfg_map[0])
CFG_DTYPE = np.dtype([("set", "<u4"), ("generation", "<u4"), ("clock_base", "<u8"), ("tick_ns", "<u4"),
                      ("flags", "<u4")], align=True)
# struct pn_lut: direct row lookups of a table set (pn_lut_map[set])
LUT_DTYPE = np.dtype([("proto", "<u4", (256,)), ("dscp", "<u4", (64,)), ("noport", "<u4", (2,))])
# struct pn_lpm6: the key of the IPv6 prefix and destination-site tries
LPM6_DTYPE = np.dtype([("prefixlen", "<u4"), ("tag", "u1"), ("addr", "u1", (16,)), ("_pad", "u1", (3,))])
# struct pn_v4chunk: 256 entries of the IPv4 stride table below level 1
V4CHUNK_DTYPE = np.dtype([("e", "<u4", (256,))])
# struct pn_chunk: CHUNK_WORDS words of a classifier bitmap
CHUNK_DTYPE = np.dtype([("w", "<u8", (CONSTANTS["CHUNK_WORDS"],))])


def row_dtype(nsum: int) -> np.dtype:
    """struct pn_row of a program compiled with ``PN_NSUM = nsum``: its
    summary words, then the chunk id of each.

    >>> row_dtype(3).itemsize
    40
    """
    return np.dtype([("sum", "<u8", (nsum,)), ("chunk", "<u4", (nsum,))], align=True)
