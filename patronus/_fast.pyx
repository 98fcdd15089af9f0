# cython: language_level=3
"""Compiled core of patronus: ABI constants, checksum and prefix helpers,
and (csrc/) the packet parser, classifier and flow table.

Private: use patronus.abi, patronus.policy and patronus.dataplane.
"""

from libc.stdint cimport uint8_t, uint16_t

cdef extern from "patronus_abi.h":
    int PN_ABI_VERSION
    int PN_NREASONS

cdef extern from "abi_layout.h":
    struct pn_layout_entry:
        const char *type
        const char *field
        size_t offset
        size_t size
    const pn_layout_entry pn_abi_layout[]

cdef extern from "util.h":
    uint16_t pn_inet_checksum(const uint8_t *buf, size_t len) nogil
    int pn_prefix_contains(const uint8_t *net, unsigned plen, const uint8_t *addr, unsigned nbytes) nogil

ABI_VERSION = PN_ABI_VERSION
NREASONS = PN_NREASONS


def abi_layout():
    """{struct: {"size": n, field: (offset, size), ...}} as compiled from patronus_abi.h."""
    out = {}
    cdef int i = 0
    while pn_abi_layout[i].type != NULL:
        e = pn_abi_layout[i]
        t = e.type.decode()
        d = out.setdefault(t, {})
        if e.field == NULL:
            d["size"] = e.size
        else:
            d[e.field.decode()] = (e.offset, e.size)
        i += 1
    return out


def inet_checksum(const uint8_t[::1] data not None):
    """RFC 1071 Internet checksum of a bytes-like object."""
    if data.shape[0] == 0:
        return 0xFFFF
    return pn_inet_checksum(&data[0], data.shape[0])


def prefix_contains(const uint8_t[::1] net not None, unsigned plen, const uint8_t[::1] addr not None):
    """True when packed address `addr` lies in packed network `net`/`plen` (same family)."""
    if net.shape[0] != addr.shape[0] or net.shape[0] not in (4, 16):
        raise ValueError("net and addr must both be 4 or both be 16 bytes")
    return bool(pn_prefix_contains(&net[0], plen, &addr[0], addr.shape[0]))
