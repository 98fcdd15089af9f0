/* Flow table of the userspace data plane, and the per-packet pipeline
 * (parse -> flow lookup -> classify on miss -> account).
 *
 * Fixed capacity, chained hash over a preallocated pool, an LRU list through
 * the pool. The flow record caches the policy, so a packet of a known flow is
 * one hash lookup; the cached policy is recomputed when the rule table's
 * generation changes. Nothing leaves the table silently: LRU evictions, idle
 * and active timeouts all copy the record into the export buffer and count.
 */
#ifndef PATRONUS_FLOWTABLE_H
#define PATRONUS_FLOWTABLE_H

#include <stddef.h>
#include <stdint.h>

#include "classify.h"
#include "patronus_abi.h"
#include "sites.h"

#define PN_NIL 0xffffffffu

typedef struct {
    uint32_t capacity, mask, count;
    struct pn_flow *flows;
    /* Chain heads and links hold an entry's index + 1, 0 ending a chain, so
     * a new table is zeroed memory the kernel hands out lazily (calloc):
     * making a table of a million flows costs nothing until it fills. */
    uint32_t *bucket;        /* mask + 1 chain heads */
    uint32_t *hnext;         /* chain link, or free-list link */
    uint32_t *prev, *next;   /* LRU list: head = most recent */
    uint32_t head, tail, free_head;  /* free_head: PN_NIL when the free list is empty */
    uint32_t fresh;          /* entries [fresh, capacity) were never used */
    int64_t idle_ns, active_ns;   /* 0 = no timeout */
    struct pn_flow *exp;     /* export buffer (grows; drained by the owner) */
    size_t exp_len, exp_cap;
    uint64_t evicted, expired_idle, expired_active, export_lost;
} pn_flowtable;

int pn_ft_init(pn_flowtable *ft, uint32_t capacity, int64_t idle_ns, int64_t active_ns);
void pn_ft_free(pn_flowtable *ft);
/* Move every live flow into the export buffer (end of a capture). */
void pn_ft_flush(pn_flowtable *ft);
/* Move the flows idle for idle_ns or more at now_ns into the export buffer
 * (counted as expired_idle); returns how many. */
size_t pn_ft_expire_idle(pn_flowtable *ft, uint64_t now_ns, int64_t idle_ns);
/* Copy live flows, most recent first, into out (room for ft->count). */
size_t pn_ft_snapshot(const pn_flowtable *ft, struct pn_flow *out);

/* Per-packet pipeline state. */
typedef struct {
    const pn_classifier *cls;
    const pn_sites *sites;
    uint32_t generation;      /* bumped whenever cls or sites change */
    uint32_t npolicies;
    uint32_t ncols;           /* sites + 1: route columns, 0 = outside every site */
    uint32_t *route;          /* (npolicies + 1) x ncols path slots: row 0 = default, i + 1 = policy i */
    struct pn_policy_counter *pcount;  /* npolicies + 1, same indexing */
    uint64_t malformed[PN_NREASONS];
    uint64_t cache_hits, cache_misses;
    pn_flowtable ft;
} pn_dp;

#define PN_BURST 16

/* n frames (pointers and lengths), in bursts with prefetching: out[i] gets
 * frame i's policy index (-1: default or malformed); when `where` is not
 * NULL, where[2 i] its destination site and where[2 i + 1] its path slot
 * (PN_SITE_NONE and PN_NO_PATH for a malformed frame). */
void pn_dp_run(pn_dp *dp, const uint8_t *const *data, const size_t *len, const uint64_t *ts,
               int32_t *out, uint32_t *where, size_t n);
/* The same for captured frames: wire[i] is frame i's length on the wire (a
 * snap length may have cut len[i] shorter; csrc/parse.h pn_parse_wire).
 * wire NULL: every frame is whole. */
void pn_dp_run_wire(pn_dp *dp, const uint8_t *const *data, const size_t *len, const size_t *wire,
                    const uint64_t *ts, int32_t *out, uint32_t *where, size_t n);

/* Classification cache without accounting (PolicyTable.classify): a
 * set-associative table of flow key -> policy, PN_CACHE_WAYS ways a set,
 * line-aligned. */
#define PN_CACHE_WAYS 8
typedef struct {
    struct pn_flow_key key;
    int32_t policy;
    uint32_t generation;      /* 0 = empty */
} pn_cache_entry;

typedef struct {
    pn_cache_entry *e;        /* line-aligned, inside mem */
    uint32_t mask;
    uint32_t generation;
    uint64_t hits, misses;
    void *mem;                /* what pn_cache_free frees */
} pn_cache;

int pn_cache_init(pn_cache *c, uint32_t size_pow2);
void pn_cache_free(pn_cache *c);
/* Policy of one frame; *reason gets PN_OK or why it did not parse. The cache
 * is PN_CACHE_WAYS-way set associative: size_pow2 entries (a power of two,
 * >= 2), size_pow2 / PN_CACHE_WAYS sets (a 2-entry cache: one set of 2). */
int32_t pn_cache_classify(pn_cache *c, const pn_classifier *cls, const uint8_t *data, size_t len, int *reason);
/* n frames in bursts; malformed[reason] counts frames that did not parse. */
void pn_cache_run(pn_cache *c, const pn_classifier *cls, const uint8_t *const *data, const size_t *len,
                  int32_t *out, size_t n, uint64_t *malformed);


#endif
