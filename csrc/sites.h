/* Destination sites of the userspace data plane: the site whose subnet holds
 * a packet's destination address (longest prefix), as sorted elementary
 * intervals per family and a binary search. The XDP program answers the
 * same question with an LPM trie loaded from the same struct pn_site_prefix
 * array; tests/test_sites.py checks both against the Python reference.
 */
#ifndef PATRONUS_SITES_H
#define PATRONUS_SITES_H

#include <stddef.h>
#include <stdint.h>

#include "classify.h"
#include "patronus_abi.h"

typedef struct {
    uint32_t n[2];          /* intervals: [0] IPv4, [1] IPv6 */
    pn_u128 *start[2];      /* sorted; start[f][0] == 0 */
    uint32_t *site[2];      /* site of the interval that starts there (PN_SITE_NONE: none) */
    uint32_t nsites;        /* highest site number */
} pn_sites;

/* Build from n prefixes (any order; a prefix given twice keeps the later
 * one's site). 0, or -1 when out of memory or a prefix is invalid. */
int pn_sites_build(pn_sites *s, const struct pn_site_prefix *pfx, uint32_t n);
void pn_sites_free(pn_sites *s);

/* Destination site of a parsed packet. */
static inline uint32_t pn_site_of(const pn_sites *s, const struct pn_parsed *p)
{
    int f = p->family == PN_FAMILY_V6;
    uint32_t lo = 0, hi = s->n[f];
    if (hi <= 1)
        return hi ? s->site[f][0] : PN_SITE_NONE;
    pn_u128 v = 0;
    int nbytes = f ? 16 : 4;
    for (int i = 0; i < nbytes; i++)
        v = (v << 8) | p->dst[i];
    /* the last start <= v */
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (s->start[f][mid] <= v)
            lo = mid;
        else
            hi = mid;
    }
    return s->site[f][lo];
}

#endif
