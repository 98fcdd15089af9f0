"""numpy views of the structs in csrc/patronus_abi.h.

tests/test_abi.py checks every offset and size here against the compiled
header, so a layout change that forgets this file fails the suite.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FLOW_DTYPE", "XSLOT_DTYPE", "BUCKET_DTYPE", "RULE_DTYPE", "POLICY_COUNTER_DTYPE", "SITE_PREFIX_DTYPE",
           "ROUTE_DTYPE", "META_DTYPE", "DETAIL_DTYPE", "MALFORMED_REASONS", "NO_PATH", "SITE_NONE"]

# enum pn_reason, index 1.. (0 is PN_OK, not a counter)
MALFORMED_REASONS: tuple[str, ...] = (
    "trunc_l2", "not_ip", "trunc_ip", "bad_version", "bad_ihl", "bad_len", "trunc_ext", "trunc_l4",
)

NO_PATH = 0xFFFFFFFF
SITE_NONE = 0  # a destination outside every site's subnets

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
BUCKET_DTYPE = np.dtype([("passed", "<u8"), ("s", XSLOT_DTYPE, (4,))], align=True)

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
# struct pn_meta: what the XDP program leaves in front of a frame
META_DTYPE = np.dtype([("path", "<u4"), ("policy", "<i4"), ("site", "<u4")])
# what process(detail=True) and test_run(detail=True) return per frame
DETAIL_DTYPE = np.dtype([("policy", "<i4"), ("site", "<u4"), ("path", "<u4")])
