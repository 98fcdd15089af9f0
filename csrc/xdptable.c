#include <string.h>

#include "xdptable.h"

#define BUSY ((uint64_t)PN_SLOT_BUSY << 48)

static inline uint64_t *state_of(struct pn_xslot *x)
{
    return (uint64_t *)((uint8_t *)x + PN_SLOT_WORD);
}

/* the exported record: the creator's counts plus the other CPUs' */
static inline void export_slot(const struct pn_xslot *x, struct pn_flow *out, uint64_t state)
{
    memcpy(out, &x->f, sizeof(*out));
    out->rec.packets += __atomic_load_n(&x->shared_packets, __ATOMIC_RELAXED);
    out->rec.bytes += __atomic_load_n(&x->shared_bytes, __ATOMIC_RELAXED);
    out->rec._pad = 0;
    ((uint64_t *)out)[PN_SLOT_WORD / 8] = state;
}

size_t pn_xdp_take(struct pn_xslot *table, size_t nslots, struct pn_flow *out, size_t room, int mode,
                   uint64_t now_ns, uint64_t idle_ns)
{
    size_t n = 0;
    for (size_t i = 0; i < nslots && n < room; i++) {
        struct pn_xslot *x = &table[i];
        uint64_t *st = state_of(x);
        uint64_t w = __atomic_load_n(st, __ATOMIC_ACQUIRE);
        if (w == 0 || (w >> 48) != 0)
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
        export_slot(x, &out[n++], w);
        __atomic_store_n(st, 0, __ATOMIC_RELEASE);
    }
    return n;
}

size_t pn_xdp_count(const struct pn_xslot *table, size_t nslots)
{
    size_t n = 0;
    for (size_t i = 0; i < nslots; i++) {
        uint64_t w = __atomic_load_n((const uint64_t *)((const uint8_t *)&table[i] + PN_SLOT_WORD), __ATOMIC_RELAXED);
        n += w != 0 && (w >> 48) == 0;
    }
    return n;
}

size_t pn_xdp_fold(const struct pn_xslot *slots, size_t n, struct pn_flow *out)
{
    for (size_t i = 0; i < n; i++)
        export_slot(&slots[i], &out[i], ((const uint64_t *)&slots[i].f)[PN_SLOT_WORD / 8] & ~BUSY);
    return n;
}
