# Declarations of csrc/flowtable.h: the userspace flow table, the per-packet
# pipeline (pn_dp) and the classification cache.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from patronus.includes.abi cimport PN_NREASONS, pn_flow, pn_flow_key, pn_policy_counter
from patronus.includes.classify cimport pn_classifier
from patronus.includes.sites cimport pn_sites


cdef extern from "flowtable.h" nogil:
    enum:
        PN_BURST
    const uint32_t PN_NIL

    ctypedef struct pn_flowtable:
        uint32_t capacity, mask, count
        pn_flow *flows
        int64_t idle_ns, active_ns
        pn_flow *exp
        size_t exp_len, exp_cap
        uint64_t evicted, expired_idle, expired_active, export_lost

    int pn_ft_init(pn_flowtable *ft, uint32_t capacity, int64_t idle_ns, int64_t active_ns)
    void pn_ft_free(pn_flowtable *ft)
    void pn_ft_flush(pn_flowtable *ft)
    size_t pn_ft_expire_idle(pn_flowtable *ft, uint64_t now_ns, int64_t idle_ns)
    size_t pn_ft_snapshot(const pn_flowtable *ft, pn_flow *out)

    ctypedef struct pn_dp:
        const pn_classifier *cls
        const pn_sites *sites
        uint32_t generation
        uint32_t npolicies
        uint32_t ncols
        uint32_t *route
        pn_policy_counter *pcount
        uint64_t malformed[PN_NREASONS]
        uint64_t cache_hits, cache_misses
        pn_flowtable ft

    void pn_dp_run(pn_dp *dp, const uint8_t *const *data, const size_t *len, const uint64_t *ts,
                   int32_t *out, uint32_t *where, size_t n)

    ctypedef struct pn_cache_entry:
        pn_flow_key key
        int32_t policy
        uint32_t generation

    ctypedef struct pn_cache:
        pn_cache_entry *e
        uint32_t mask
        uint32_t generation
        uint64_t hits, misses

    int pn_cache_init(pn_cache *c, uint32_t size_pow2)
    void pn_cache_free(pn_cache *c)
    int32_t pn_cache_classify(pn_cache *c, const pn_classifier *cls, const uint8_t *data, size_t len,
                              int *reason)
    void pn_cache_run(pn_cache *c, const pn_classifier *cls, const uint8_t *const *data, const size_t *len,
                      int32_t *out, size_t n, uint64_t *malformed)
