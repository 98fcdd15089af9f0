/* The memory bound of cached classification: what touching the same memory
 * as PolicyTable.classify costs, with no parsing, hashing or comparing.
 *
 * A cached classification of one frame must (1) read the frame's headers
 * from the trace buffer, a forward walk over the frames, and (2) read the
 * cache set its flow key hashes to, a random access into the cache table.
 * mb_touch does exactly these reads and nothing else: per frame one load from
 * each 64-byte line of bytes 12..53 of the frame (Ethernet type to the end of
 * an IPv4 TCP header) and one load from the first line of the frame's cache
 * set, with the set numbers computed beforehand (mb_sets, untimed) from the
 * same flow keys and hash as csrc/flowtable.c. Its loads are independent, so
 * the core overlaps as many misses as it can; no classifier can read the same
 * memory faster in this order, so its time per frame is a lower bound, and
 * patronus's time divided by it says how far the compute and the extra lines
 * (a set spans two or three) are from that floor.
 *
 * mb_chase measures the latency of one dependent random read (a pointer
 * chase through a random cycle of lines) over a footprint, for the
 * latency-bound view: one unoverlapped miss per frame at X ns caps the rate
 * at 1/X.
 *
 * Built by benchmarks/test_bench_peers_classify.py with the system cc as a
 * shared library and called through ctypes.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "flowhash.h"
#include "parse.h"

/* Entry index of way 0 of each frame's set in a `ways`-way cache of mask + 1
 * entries (as cache_set() computes it); UINT32_MAX for a frame that does
 * not parse. Returns the number of frames that parsed. */
size_t mb_sets(const uint8_t *buf, const int64_t *off, size_t n, uint32_t mask, uint32_t ways, uint32_t *entry)
{
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        struct pn_parsed p;
        struct pn_flow_key k;
        memset(&p, 0, sizeof(p));
        if (pn_parse(buf + off[i], buf + off[i + 1], &p) != PN_OK) {
            entry[i] = UINT32_MAX;
            continue;
        }
        pn_key_of(&p, &k);
        k._pad = (uint16_t)(0x100 | (p.has_ports << 9) | p.dscp);
        entry[i] = (uint32_t)(pn_key_hash(&k) & mask) & ~(ways - 1);
        ok++;
    }
    return ok;
}

/* The reads of a cached classification and nothing else (see the top).
 * table: the cache-sized array, entry_bytes apart; entry: from mb_sets.
 * prefetch_ahead > 0 also prefetches frame i + prefetch_ahead's lines first
 * (the burst loop's structure); 0 leaves the overlap to the out-of-order core. */
uint64_t mb_touch(const uint8_t *buf, const int64_t *off, size_t n, const uint8_t *table, size_t entry_bytes,
                  const uint32_t *entry, size_t prefetch_ahead)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        if (prefetch_ahead && i + prefetch_ahead < n) {
            size_t a = i + prefetch_ahead;
            __builtin_prefetch(buf + off[a] + 12);
            __builtin_prefetch(buf + off[a] + 53);
            if (entry[a] != UINT32_MAX)
                __builtin_prefetch(table + (size_t)entry[a] * entry_bytes);
        }
        const uint8_t *f = buf + off[i];
        acc += f[12];
        acc += f[53 < off[i + 1] - off[i] ? 53 : 12];
        if (entry[i] != UINT32_MAX)
            acc += *(const volatile uint8_t *)(table + (size_t)entry[i] * entry_bytes);
    }
    return acc;
}

/* Only the frame reads of mb_touch: the trace walk alone. */
uint64_t mb_frames(const uint8_t *buf, const int64_t *off, size_t n)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *f = buf + off[i];
        acc += f[12];
        acc += f[53 < off[i + 1] - off[i] ? 53 : 12];
    }
    return acc;
}

/* Make lines[0 .. nlines) (64 bytes each, the first 8 bytes a next index)
 * one random cycle, from a fixed seed. */
void mb_ring(uint64_t *lines, size_t nlines, uint64_t seed)
{
    uint64_t *perm = lines; /* borrow word 1 of each line for the permutation */
    for (size_t i = 0; i < nlines; i++)
        perm[i * 8 + 1] = i;
    uint64_t s = seed | 1;
    for (size_t i = nlines - 1; i > 0; i--) { /* Fisher-Yates, xorshift64 */
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        size_t j = (size_t)(s % (i + 1));
        uint64_t t = perm[i * 8 + 1];
        perm[i * 8 + 1] = perm[j * 8 + 1];
        perm[j * 8 + 1] = t;
    }
    for (size_t i = 0; i < nlines; i++)
        lines[perm[i * 8 + 1] * 8] = perm[((i + 1) % nlines) * 8 + 1];
}

/* steps dependent loads around the cycle; returns where it ended (keeps the
 * loads alive). */
uint64_t mb_chase(const uint64_t *lines, size_t steps)
{
    uint64_t i = 0;
    for (size_t s = 0; s < steps; s++)
        i = lines[i * 8];
    return i;
}
