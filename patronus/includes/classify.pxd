# Declarations of csrc/classify.h. Fields of type pn_u128 (unsigned
# __int128, which Cython has no name for) are not declared: nothing here
# reads them (pn_field_starts splits them into 64-bit halves).

from libc.stdint cimport int32_t, uint32_t, uint64_t

from patronus.includes.abi cimport pn_parsed, pn_rule


cdef extern from "classify.h" nogil:
    enum pn_field_id:
        PN_F_SRC4
        PN_F_DST4
        PN_F_SRC6
        PN_F_DST6
        PN_F_SPORT
        PN_F_DPORT
        PN_F_PROTO
        PN_F_DSCP
        PN_NFIELDS

    ctypedef struct pn_field:
        uint32_t nintervals
        uint32_t *row_of
        uint32_t nrows
        uint64_t *sums
        uint32_t *chunk

    ctypedef struct pn_classifier:
        uint32_t nrules, nwords, nsum
        pn_field f[PN_NFIELDS]
        uint32_t noport_row[2]
        int32_t *rule_policy
        uint64_t *chunks
        uint32_t nchunks
        size_t memory

    int pn_classifier_build(pn_classifier *c, const pn_rule *rules, uint32_t n)
    void pn_classifier_free(pn_classifier *c)
    void pn_field_starts(const pn_field *f, uint64_t *hi, uint64_t *lo)
    int32_t pn_classify(const pn_classifier *c, const pn_parsed *p)
    int32_t pn_classify_linear(const pn_rule *rules, uint32_t n, const pn_parsed *p)
