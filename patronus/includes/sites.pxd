# Declarations of csrc/sites.h. The interval starts (pn_u128 *start[2]) are
# not declared: Cython has no name for unsigned __int128 and nothing here
# reads them.

from libc.stdint cimport uint32_t

from patronus.includes.abi cimport pn_parsed, pn_site_prefix


cdef extern from "sites.h" nogil:
    ctypedef struct pn_sites:
        uint32_t n[2]
        uint32_t *site[2]
        uint32_t nsites

    int pn_sites_build(pn_sites *s, const pn_site_prefix *pfx, uint32_t n)
    void pn_sites_free(pn_sites *s)
    uint32_t pn_site_of(const pn_sites *s, const pn_parsed *p)
