/* Reading the XDP flow table (bpf/patronus_xdp.c, pn_ftab_map) from
 * userspace through its memory mapping, with the same slot protocol the
 * program uses (patronus_abi.h, PN_SLOT_*): slots are claimed with a
 * compare-and-swap on their state word before they are emptied, so a drain
 * never races a CPU that is inserting into or evicting the same slot. */
#ifndef PATRONUS_XDPTABLE_H
#define PATRONUS_XDPTABLE_H

#include <stddef.h>
#include <stdint.h>

#include "patronus_abi.h"

/* modes: enum pn_take_mode (patronus_abi.h) */

/* Copy live slots of table[0:nbuckets] into out (room for `room` flows) as
 * plain flow records (shared counts added in), in slot order; returns how
 * many were copied. Stops early when out is full. */
size_t pn_xdp_take(struct pn_bucket *table, size_t nbuckets, struct pn_flow *out, size_t room, int mode,
                   uint64_t now_ns, uint64_t idle_ns);

/* Live slots (not empty, not busy). */
size_t pn_xdp_count(const struct pn_bucket *table, size_t nbuckets);

/* Add each live flow's packets and bytes to sums[2 * (policy + 1)] and
 * sums[2 * (policy + 1) + 1] (sums holds npol pairs); returns the number of
 * live flows. */
size_t pn_xdp_sums(const struct pn_bucket *table, size_t nbuckets, uint64_t *sums, size_t npol);

/* Sum of the buckets' passed counts (a consistency check: it equals the
 * sum, over live flows, of how many buckets past home each one lives). */
uint64_t pn_xdp_passed(const struct pn_bucket *table, size_t nbuckets);

/* Slots copied out by the program (evicted, taken while busy) as plain flow
 * records: shared counts added in, the busy mark and the creator cleared. */
size_t pn_xdp_fold(const struct pn_xslot *slots, size_t n, struct pn_flow *out);

#endif
