#include <string.h>

#include "xdptable.h"

#define BUSY ((uint64_t)PN_SLOT_BUSY << 48)

static inline uint64_t *state_of(struct pn_xslot *x)
{
    return (uint64_t *)((uint8_t *)x + PN_SLOT_WORD);
}

/* The state word of a live slot (not empty, not busy), else 0. */
static inline uint64_t live_state(const struct pn_xslot *x)
{
    uint64_t w = __atomic_load_n((const uint64_t *)((const uint8_t *)x + PN_SLOT_WORD), __ATOMIC_ACQUIRE);
    return (w >> 48) == 0 ? w : 0;
}

/* A slot as a plain flow record with the given total counts. */
static inline void export_counts(const struct pn_xslot *x, struct pn_flow *out, uint64_t state, uint64_t packets,
                                 uint64_t bytes)
{
    memcpy(out, &x->f, sizeof(*out));
    out->rec.packets = packets;
    out->rec.bytes = bytes;
    out->rec._pad = 0;
    ((uint64_t *)out)[PN_SLOT_WORD / 8] = state;
}

/* A slot's totals: the creator's counts plus the other CPUs' (wrapping). */
static inline uint64_t total_packets(const struct pn_xslot *x)
{
    return x->f.rec.packets + __atomic_load_n(&x->shared_packets, __ATOMIC_RELAXED);
}

static inline uint64_t total_bytes(const struct pn_xslot *x)
{
    return x->f.rec.bytes + __atomic_load_n(&x->shared_bytes, __ATOMIC_RELAXED);
}

/* the exported record, with the totals */
static inline void export_slot(const struct pn_xslot *x, struct pn_flow *out, uint64_t state)
{
    export_counts(x, out, state, total_packets(x), total_bytes(x));
}

/* The exported record of a claimed slot that leaves the table: its counts
 * are taken out with one exchange per counter, leaving the slot's sum at 0,
 * so a late add by a CPU that found the flow before the claim stays in the
 * slot for its next flow (the program's pn_take_counts). */
static inline void take_slot(struct pn_xslot *x, struct pn_flow *out, uint64_t state)
{
    uint64_t p = __atomic_load_n(&x->f.rec.packets, __ATOMIC_RELAXED);
    uint64_t b = __atomic_load_n(&x->f.rec.bytes, __ATOMIC_RELAXED);
    export_counts(x, out, state, p + __atomic_exchange_n(&x->shared_packets, -p, __ATOMIC_ACQ_REL),
                  b + __atomic_exchange_n(&x->shared_bytes, -b, __ATOMIC_ACQ_REL));
}

/* A flow with key words 0-3 of x and state word `state`, in bucket `at`,
 * leaves: take it out of the passed counts of the buckets before it in its
 * window (the program's pn_passed, in reverse). */
static inline void unpass(struct pn_bucket *table, size_t nbuckets, const struct pn_xslot *x, uint64_t state,
                          size_t at)
{
    const uint64_t *k = (const uint64_t *)x;
    uint64_t w[5] = {k[0], k[1], k[2], k[3], state};
    size_t mask = nbuckets - 1;
    size_t home = pn_flow_hash((const __u64 *)w) & mask;
    for (size_t b = home; b != at; b = (b + 1) & mask)
        __atomic_fetch_sub(&table[b].passed, 1, __ATOMIC_RELAXED);
}

size_t pn_xdp_take(struct pn_bucket *table, size_t nbuckets, struct pn_flow *out, size_t room, int mode,
                   uint64_t now_ns, uint64_t idle_ns)
{
    size_t n = 0;
    for (size_t i = 0; i < nbuckets * PN_BUCKET_SLOTS && n < room; i++) {
        size_t bi = i / PN_BUCKET_SLOTS;
        struct pn_xslot *x = &table[bi].s[i % PN_BUCKET_SLOTS];
        uint64_t *st = state_of(x);
        uint64_t w = live_state(x);
        if (!w)
            continue;
        if (mode == PN_TAKE_COPY) {
            export_slot(x, &out[n++], w);
            continue;
        }
        if (mode == PN_TAKE_IDLE) {
            uint64_t last = __atomic_load_n(&x->f.rec.last_ns, __ATOMIC_RELAXED);
            if (last + idle_ns > now_ns)
                continue;
        }
        /* claim (lookups stop matching, no CPU can evict it), copy, free */
        uint64_t expect = w;
        if (!__atomic_compare_exchange_n(st, &expect, w | BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue; /* a CPU is evicting it: its record goes to the ring buffer */
        take_slot(x, &out[n++], w);
        unpass(table, nbuckets, x, w, bi);
        __atomic_store_n(st, 0, __ATOMIC_RELEASE);
    }
    return n;
}

size_t pn_xdp_count(const struct pn_bucket *table, size_t nbuckets)
{
    size_t n = 0;
    for (size_t b = 0; b < nbuckets; b++)
        for (size_t j = 0; j < PN_BUCKET_SLOTS; j++)
            n += live_state(&table[b].s[j]) != 0;
    return n;
}

size_t pn_xdp_sums(const struct pn_bucket *table, size_t nbuckets, uint64_t *sums, size_t npol)
{
    size_t n = 0;
    for (size_t b = 0; b < nbuckets; b++)
        for (size_t j = 0; j < PN_BUCKET_SLOTS; j++) {
            const struct pn_xslot *x = &table[b].s[j];
            uint64_t w = live_state(x);
            if (!w)
                continue;
            n++;
            size_t slot = (size_t)((int64_t)x->f.rec.policy + 1);
            if (slot < npol) {
                sums[2 * slot] += total_packets(x);
                sums[2 * slot + 1] += total_bytes(x);
            }
        }
    return n;
}

uint64_t pn_xdp_passed(const struct pn_bucket *table, size_t nbuckets)
{
    uint64_t n = 0;
    for (size_t b = 0; b < nbuckets; b++)
        n += __atomic_load_n(&table[b].passed, __ATOMIC_RELAXED);
    return n;
}

size_t pn_xdp_fold(const struct pn_xslot *slots, size_t n, struct pn_flow *out)
{
    for (size_t i = 0; i < n; i++)
        export_slot(&slots[i], &out[i], ((const uint64_t *)&slots[i].f)[PN_SLOT_WORD / 8] & ~BUSY);
    return n;
}
