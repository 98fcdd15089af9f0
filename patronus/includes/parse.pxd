# Declarations of csrc/parse.h (inline functions; pn_parse_ipv4/ipv6/l4 are
# its internals and are left out).

from libc.stdint cimport uint8_t

from patronus.includes.abi cimport pn_flow_key, pn_parsed


cdef extern from "parse.h" nogil:
    # *o zeroed by the caller; returns PN_OK or an enum pn_reason
    int pn_parse(const uint8_t *data, const uint8_t *end, pn_parsed *o)
    void pn_key_of(const pn_parsed *p, pn_flow_key *k)
