# Declarations of csrc/xdptable.h: readers of the XDP flow table (an array of
# struct pn_bucket) through its memory mapping.

from libc.stdint cimport uint64_t

from patronus.includes.abi cimport pn_bucket, pn_flow, pn_xslot


cdef extern from "xdptable.h" nogil:
    # mode: enum pn_take_mode (PN_TAKE_COPY, PN_TAKE_ALL, PN_TAKE_IDLE)
    size_t pn_xdp_take(pn_bucket *table, size_t nbuckets, pn_flow *out, size_t room, int mode,
                       uint64_t now_ns, uint64_t idle_ns)
    size_t pn_xdp_count(const pn_bucket *table, size_t nbuckets)
    uint64_t pn_xdp_passed(const pn_bucket *table, size_t nbuckets)
    size_t pn_xdp_sums(const pn_bucket *table, size_t nbuckets, uint64_t *sums, size_t npol)
    size_t pn_xdp_fold(const pn_xslot *slots, size_t n, pn_flow *out)
