#include <string.h>

#include "xdptable.h"

#define BUSY ((uint64_t)PN_SLOT_BUSY << 48)

static inline uint64_t *state_of(struct pn_flow *f)
{
    return (uint64_t *)((uint8_t *)f + PN_SLOT_WORD);
}

size_t pn_xdp_take(struct pn_flow *table, size_t nslots, struct pn_flow *out, size_t room, int mode,
                   uint64_t now_ns, uint64_t idle_ns)
{
    size_t n = 0;
    for (size_t i = 0; i < nslots && n < room; i++) {
        struct pn_flow *f = &table[i];
        uint64_t *st = state_of(f);
        uint64_t w = __atomic_load_n(st, __ATOMIC_ACQUIRE);
        if (w == 0 || (w >> 48) != 0)
            continue;
        if (mode == PN_TAKE_COPY) {
            memcpy(&out[n++], f, sizeof(*f));
            continue;
        }
        if (mode == PN_TAKE_IDLE) {
            uint64_t last = __atomic_load_n(&f->rec.last_ns, __ATOMIC_RELAXED);
            if (last + idle_ns > now_ns)
                continue;
        }
        /* claim (lookups stop matching, no CPU can evict it), copy, free */
        uint64_t expect = w;
        if (!__atomic_compare_exchange_n(st, &expect, w | BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue; /* a CPU is evicting it: its record goes to the ring buffer */
        memcpy(&out[n], f, sizeof(*f));
        ((uint64_t *)&out[n])[PN_SLOT_WORD / 8] = w;
        n++;
        __atomic_store_n(st, 0, __ATOMIC_RELEASE);
    }
    return n;
}

size_t pn_xdp_count(const struct pn_flow *table, size_t nslots)
{
    size_t n = 0;
    for (size_t i = 0; i < nslots; i++) {
        uint64_t w = __atomic_load_n((const uint64_t *)((const uint8_t *)&table[i] + PN_SLOT_WORD), __ATOMIC_RELAXED);
        n += w != 0 && (w >> 48) == 0;
    }
    return n;
}
