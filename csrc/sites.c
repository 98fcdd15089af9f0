#include "sites.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    pn_u128 lo, hi;
    uint32_t plen, site, order;
} pfx_t;

static int cmp_pfx(const void *a, const void *b)
{
    const pfx_t *x = a, *y = b;
    if (x->lo != y->lo)
        return x->lo < y->lo ? -1 : 1;
    if (x->plen != y->plen)  /* the shorter (enclosing) prefix first */
        return x->plen < y->plen ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

typedef struct {
    pn_u128 *start;
    uint32_t *site;
    uint32_t n, cap;
} ivs_t;

/* Interval [pos, ...) belongs to `site`: a new interval, or a change of the
 * one that starts at pos; neighbours of one site merge. */
static int emit(ivs_t *o, pn_u128 pos, uint32_t site)
{
    if (o->n && o->start[o->n - 1] == pos) {
        o->site[o->n - 1] = site;
        if (o->n >= 2 && o->site[o->n - 2] == site)
            o->n--;
        return 0;
    }
    if (o->n && o->site[o->n - 1] == site)
        return 0;
    if (o->n == o->cap) {
        uint32_t nc = o->cap ? 2 * o->cap : 16;
        pn_u128 *ns = realloc(o->start, sizeof(*ns) * nc);
        if (!ns)
            return -1;
        o->start = ns;
        uint32_t *nsite = realloc(o->site, sizeof(*nsite) * nc);
        if (!nsite)
            return -1;
        o->site = nsite;
        o->cap = nc;
    }
    o->start[o->n] = pos;
    o->site[o->n] = site;
    o->n++;
    return 0;
}

/* Prefixes nest or are disjoint, so a sweep in start order with a stack of
 * the enclosing prefixes paints each elementary interval with the longest
 * prefix holding it. */
static int build_family(pn_sites *s, int f, pfx_t *v, uint32_t n, pn_u128 maxv)
{
    ivs_t o = {0};
    pfx_t *stack = malloc(sizeof(pfx_t) * (n + 1));
    uint32_t depth = 0;
    int rc = -1;
    if (!stack)
        goto out;
    qsort(v, n, sizeof(*v), cmp_pfx);
    if (emit(&o, 0, PN_SITE_NONE))
        goto out;
    for (uint32_t i = 0; i < n; i++) {
        while (depth && stack[depth - 1].hi < v[i].lo) {
            pfx_t top = stack[--depth];
            if (top.hi != maxv && emit(&o, top.hi + 1, depth ? stack[depth - 1].site : PN_SITE_NONE))
                goto out;
        }
        /* the same prefix again: the later one replaces it */
        if (depth && stack[depth - 1].lo == v[i].lo && stack[depth - 1].plen == v[i].plen)
            depth--;
        if (emit(&o, v[i].lo, v[i].site))
            goto out;
        stack[depth++] = v[i];
    }
    while (depth) {
        pfx_t top = stack[--depth];
        if (top.hi != maxv && emit(&o, top.hi + 1, depth ? stack[depth - 1].site : PN_SITE_NONE))
            goto out;
    }
    s->start[f] = o.start;
    s->site[f] = o.site;
    s->n[f] = o.n;
    o.start = NULL;
    o.site = NULL;
    rc = 0;
out:
    free(o.start);
    free(o.site);
    free(stack);
    return rc;
}

int pn_sites_build(pn_sites *s, const struct pn_site_prefix *pfx, uint32_t n)
{
    memset(s, 0, sizeof(*s));
    pfx_t *v[2] = {malloc(sizeof(pfx_t) * (n + 1)), malloc(sizeof(pfx_t) * (n + 1))};
    uint32_t cnt[2] = {0, 0};
    int rc = -1;
    if (!v[0] || !v[1])
        goto out;
    for (uint32_t i = 0; i < n; i++) {
        const struct pn_site_prefix *p = &pfx[i];
        int f = p->family == PN_FAMILY_V6;
        unsigned bits = f ? 128 : 32;
        if ((p->family != PN_FAMILY_V4 && p->family != PN_FAMILY_V6) || p->plen > bits || p->site == PN_SITE_NONE)
            goto out;
        pn_u128 lo = 0;
        for (unsigned j = 0; j < bits / 8; j++)
            lo = (lo << 8) | p->addr[j];
        pn_u128 span = p->plen == 0 ? (~(pn_u128)0 >> (128 - bits)) : ((((pn_u128)1) << (bits - p->plen)) - 1);
        lo &= ~span;
        pfx_t *e = &v[f][cnt[f]++];
        e->lo = lo;
        e->hi = lo | span;
        e->plen = p->plen;
        e->site = p->site;
        e->order = i;
        if (p->site > s->nsites)
            s->nsites = p->site;
    }
    if (build_family(s, 0, v[0], cnt[0], 0xffffffffu) || build_family(s, 1, v[1], cnt[1], ~(pn_u128)0))
        goto out;
    rc = 0;
out:
    free(v[0]);
    free(v[1]);
    if (rc)
        pn_sites_free(s);
    return rc;
}

void pn_sites_free(pn_sites *s)
{
    for (int f = 0; f < 2; f++) {
        free(s->start[f]);
        free(s->site[f]);
    }
    memset(s, 0, sizeof(*s));
}
