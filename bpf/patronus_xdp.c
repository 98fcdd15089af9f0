/* patronus XDP data plane: parse, classify and account every frame, write
 * the chosen path into the packet metadata, then pass, drop or redirect.
 *
 * The parser (csrc/parse.h), the structs (csrc/patronus_abi.h) and the
 * classifier's bit-vector layout (csrc/classify.h) are the userspace data
 * plane's own; patronus/dataplane/xdp.py compiles this file with BCC and
 * these -D constants (capacities, fixed for the life of the program):
 *
 *   PN_NSUM             summary words per row, one per 64-word bitmap chunk
 *                       (PN_NSUM * 4,096 >= rules)
 *   PN_ROWS             rows per table set, all fields together
 *   PN_CHUNKS           distinct 64-word bitmap chunks per table set
 *   PN_LPM              prefix entries per LPM trie (IPv6)
 *   PN_V4CHUNKS         IPv4 stride chunks per table set
 *   PN_CCACHE           entries of the classifier cache (0: none)
 *   PN_RULES            rule slots (a power of two)
 *   PN_NPOL             policies + 1 (slot 0 counts the default, -1)
 *   PN_SCOLS            destination site columns: sites + 1 (0: outside every site)
 *   PN_SITE_LPM         entries of the destination-site LPM trie (both sets)
 *   PN_FSLOTS           flow table slots (a power of two)
 *   PN_EVICT_PAGES      pages of the eviction ring buffer (a power of two)
 *
 * Rule tables are double buffered: two sets of classifier maps, `cfg.set`
 * says which one is live. A swap fills the idle set, then flips `cfg.set`
 * and bumps `cfg.generation` in one map write; flows whose record carries an
 * older generation are re-classified on their next packet, keeping counts.
 */
#include <uapi/linux/bpf.h>

#include "patronus_abi.h"
#include "parse.h"

/* key: 0. The one word userspace flips to swap tables. */
BPF_ARRAY(pn_cfg_map, struct pn_cfg, 1);
/* key: (set * PN_V4_DIRS + dir) * PN_V4_L1 + top 16 address bits -> row (site) or chunk */
BPF_ARRAY(pn_v4l1_map, __u32, 2 * PN_V4_DIRS * PN_V4_L1);
/* key: set * PN_V4CHUNKS + chunk */
BPF_ARRAY(pn_v4chunk_map, struct pn_v4chunk, 2 * PN_V4CHUNKS);
/* key: (tag, prefix) -> row, see struct pn_lpm6 */
BPF_LPM_TRIE(pn_lpm6_map, struct pn_lpm6, __u32, PN_LPM);
/* key: set */
BPF_ARRAY(pn_lut_map, struct pn_lut, 2);
/* key: (set * 2 + (0 sport, 1 dport)) * PN_PORTS + port -> row. Separate from
 * pn_lut: BCC takes seconds to describe a struct holding 64k-element arrays. */
BPF_ARRAY(pn_port_map, __u32, 4 * PN_PORTS);
BPF_ARRAY(pn_rpol_map, struct pn_rpol, 2);
/* key: set * PN_ROWS + row */
BPF_ARRAY(pn_rows_map, struct pn_row, 2 * PN_ROWS);
/* key: set * PN_CHUNKS + chunk */
BPF_ARRAY(pn_chunks_map, struct pn_chunk, 2 * PN_CHUNKS);
/* key: (set * PN_NPOL + policy + 1) * PN_SCOLS + destination site ->
 * struct pn_route (the path and verdict of that class to that site;
 * patronus_abi.h). Moving one class to another path for one site is one
 * write into the live set. Double buffered with the tables: a swap may
 * renumber sites, and a packet classified in one set reads the routes of
 * that set. */
BPF_ARRAY(pn_route_map, struct pn_route, 2 * PN_NPOL * PN_SCOLS);
/* key: struct pn_lpm6 with tag = set * 2 + 1 and an IPv6 destination
 * address -> its site (1..). The longest site subnet holding the address
 * wins; no entry: outside every site (PN_SITE_NONE). IPv4 sites are in the
 * stride table (pn_v4l1_map, direction 2): three array reads. */
#if PN_SCOLS > 1
BPF_LPM_TRIE(pn_site_map, struct pn_lpm6, __u32, PN_SITE_LPM);
#endif
/* key: path slot -> ifindex to redirect to (absent: pass to the stack) */
BPF_DEVMAP(pn_tx_map, PN_TX_SLOTS);
/* key: policy + 1 -> packets and bytes, per CPU, of what no live flow
 * record holds. A policy's count is this plus the counts of its live flows
 * (and of the flows userspace drained): a hit counts once, in its record.
 * Packets counted here: those without a record (insert_failed), evicted
 * flows' totals, and on a re-classification that changes a flow's policy
 * its totals so far, added to the old policy and taken (wrapping) from the
 * new one, so each packet stays with the policy it was classified into. */
BPF_PERCPU_ARRAY(pn_pcount_map, struct pn_policy_counter, PN_NPOL);

/* Add a flow's (packets, bytes) to a policy's count here. */
static __always_inline void pn_pcount_add(__s32 policy, __u64 packets, __u64 bytes)
{
    __u32 slot = (__u32)(policy + 1);
    struct pn_policy_counter *pc = pn_pcount_map.lookup(&slot);
    if (pc) {
        pc->packets += packets;
        pc->bytes += bytes;
    }
}
/* key: policy + 1 -> its policer (struct pn_rate; ps_per_byte 0: none) */
BPF_ARRAY(pn_rate_map, struct pn_rate, PN_NPOL);
/* key: policy + 1 -> packets and bytes its policer dropped, per CPU */
BPF_PERCPU_ARRAY(pn_qdrop_map, struct pn_policy_counter, PN_NPOL);

/* 1: the policy's rate is spent, drop the packet (counted); 0: it passes.
 * GCRA (struct pn_rate): one compare-and-swap on `tat` per passing packet;
 * a CPU that loses the race retries with the new value, and after four
 * losses the packet passes (the race is the rate being met by other CPUs
 * in the same instant, not an excess). */
static __always_inline int pn_police(__s32 policy, __u32 len, __u64 now)
{
    __u32 k = (__u32)(policy + 1);
    struct pn_rate *b = pn_rate_map.lookup(&k);
    if (!b || !b->ps_per_byte)
        return 0;
    __u64 cost = ((__u64)len * b->ps_per_byte) / 1000;
    for (int i = 0; i < 4; i++) {
        __u64 tat = b->tat;
        __u64 ntat = (tat > now ? tat : now) + cost;
        if (ntat - now > b->burst_ns) {
            struct pn_policy_counter *d = pn_qdrop_map.lookup(&k);
            if (d) {
                d->packets += 1;
                d->bytes += len;
            }
            return 1;
        }
        if (__sync_val_compare_and_swap(&b->tat, tat, ntat) == tat)
            return 0;
    }
    return 0;
}

/* key: enum pn_reason -> malformed frames, per CPU */
BPF_PERCPU_ARRAY(pn_malformed_map, __u64, PN_NREASONS);
/* key: enum pn_stat (patronus_abi.h), per CPU */
BPF_PERCPU_ARRAY(pn_stats_map, __u64, PN_NSTATS);
/* key: 0 parsed, 1 malformed: the benchmark floor program's one counter */
BPF_PERCPU_ARRAY(pn_floor_map, __u64, 2);
/* The flow table: open addressing over one array that userspace maps
 * (BPF_F_MMAPABLE) and reads in place, so exporting a million flows is a
 * memory scan, not a million syscalls. key: bucket of PN_BUCKET_SLOTS
 * slots; a flow lives in one of the PN_PROBE_BUCKETS buckets from
 * hash(key). Slot states, the compare-and-swap protocol that keeps CPUs
 * (and userspace drains) from writing one slot at once, and who adds to
 * which counter are in patronus_abi.h (PN_SLOT_*, struct pn_xslot,
 * struct pn_bucket).
 * PN_FSLOTS is a power of two. */
#define PN_FBUCKETS (PN_FSLOTS / PN_BUCKET_SLOTS)
BPF_F_TABLE("array", __u32, struct pn_bucket, pn_ftab_map, PN_FBUCKETS, BPF_F_MMAPABLE);
/* Records of flows evicted to make room (the oldest of a full probe window):
 * nothing leaves the table silently; drain() exports them. */
BPF_RINGBUF_OUTPUT(pn_evict_rb, PN_EVICT_PAGES);

/* The classifier's answer depends only on the table and the row of each of
 * the six fields, and new flows mostly repeat a combination seen before
 * (new connections between known hosts): the walk's result is cached
 * under (generation, rows), in the style of Open vSwitch's megaflows. A
 * table swap changes the generation, so old entries never match again and
 * age out of the LRU. Below 4,097 rules the walk is one summary word and
 * cheaper than the LRU lookup, so the loader compiles the cache out there
 * (PN_CCACHE 0). key: struct pn_ckey -> policy */
struct pn_ckey {
    __u32 gen;
    __u32 rows[6];            /* src, dst, sport, dport, proto, dscp */
};
#if PN_CCACHE
BPF_TABLE("lru_hash", struct pn_ckey, __s32, pn_ccache_map, PN_CCACHE);
#endif

/* Per-CPU scratch for what does not fit the 512-byte BPF stack once the
 * parser and classifier are inlined. key: 0 */
struct pn_scratch {
    struct pn_parsed p;
    union {
        struct pn_flow_key key;
        __u64 kw[5];          /* the key as words: hashing and compares */
    };
    struct pn_lpm6 k6;
    __u32 cpu1;               /* this CPU's number + 1, 0 until first asked */
    __u32 bench_seq;          /* PN_BENCH_NEW_FLOWS builds: source port of the next run */
    /* handed from pn_xdp to pn_cls (and from pn_cls to itself) across tail calls */
    __u64 now;
    __u32 h;                  /* hash of kw */
    __u32 set;                /* live table set when the packet came in (generation: ck.gen) */
    __u32 reclass;            /* 1: known flow of an older generation, 0: new flow */
    __u32 chunk;              /* next summary word pn_cls looks at */
    __s32 policy;             /* what pn_cls found, for pn_fin */
    struct pn_ckey ck;        /* generation and the row of each field */
};
BPF_PERCPU_ARRAY(pn_scratch_map, struct pn_scratch, 1);

/* struct pn_meta (patronus_abi.h) in front of the frame: tc reads `path`
 * into skb->mark; test runs read all of it back from data_out. */
static __always_inline void pn_set_meta(struct xdp_md *ctx, __u32 path, __s32 policy, __u32 site)
{
    if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct pn_meta)) == 0) {
        struct pn_meta *meta = (struct pn_meta *)(long)ctx->data_meta;
        if ((void *)(meta + 1) <= (void *)(long)ctx->data) {
            meta->path = path;
            meta->policy = policy;
            meta->site = site;
        }
    }
}


/* Trailing zeros of x != 0, without a branch: every data-dependent branch
 * inside a loop multiplies the paths the verifier walks. popcount of the
 * bits below the lowest set one, SWAR style. */
static __always_inline __u32 pn_ctz64(__u64 x)
{
    __u64 v = (x & -x) - 1;
    v = v - ((v >> 1) & 0x5555555555555555ull);
    v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (__u32)((v * 0x0101010101010101ull) >> 56);
}

/* One step down the IPv4 stride table: entry `e` of the level above is a
 * row (returned as is) or a chunk, whose entry `i` is returned. */
static __always_inline int pn_v4step(__u32 set, __u32 *e, __u32 i)
{
    if (!(*e & PN_V4_CHUNK))
        return 0;
    __u32 c = *e & ~PN_V4_CHUNK;
    __u32 k = set * PN_V4CHUNKS + (c < PN_V4CHUNKS ? c : 0);
    struct pn_v4chunk *ch = pn_v4chunk_map.lookup(&k);
    if (!ch)
        return -1;
    *e = ch->e[i & 255];
    return 0;
}

/* The entry of an IPv4 address in stride table `dir` of set `set`: a row
 * (dir 0 source, 1 destination) or a site (dir 2). */
static __always_inline int pn_v4walk(__u32 set, __u32 dir, __u32 addr, __u32 *out)
{
    __u32 k = (set * PN_V4_DIRS + dir) * PN_V4_L1 + (addr >> 16);
    __u32 *r = pn_v4l1_map.lookup(&k);
    if (!r)
        return -1;
    __u32 e = *r;
    if (pn_v4step(set, &e, addr >> 8) || pn_v4step(set, &e, addr))
        return -1;
    *out = e;
    return 0;
}

/* Row of the longest prefix holding the address (tag = set * 2 + direction). */
static __always_inline int pn_lpm(struct pn_scratch *sc, const struct pn_parsed *p, __u32 tag, __u32 *row)
{
    const __u8 *a = (tag & 1) ? p->dst : p->src;
    __u32 *r;
    if (p->family == PN_FAMILY_V4)
        return pn_v4walk(tag >> 1, tag & 1, __builtin_bswap32(*(const __u32 *)a), row);
    sc->k6.prefixlen = PN_LPM6_TAG_BITS + 128;
    sc->k6.tag = tag;
    __builtin_memcpy(sc->k6.addr, a, 16);
    r = pn_lpm6_map.lookup(&sc->k6);
    if (!r)
        return -1;
    *row = *r;
    return 0;
}

/* Destination site of a parsed packet in table set `set`. */
static __always_inline __u32 pn_site(struct pn_scratch *sc, const struct pn_parsed *p, __u32 set)
{
#if PN_SCOLS > 1
    __u32 site = PN_SITE_NONE;
    if (p->family == PN_FAMILY_V4) {
        if (pn_v4walk(set, 2, __builtin_bswap32(*(const __u32 *)p->dst), &site))
            return PN_SITE_NONE;
    } else {
        sc->k6.prefixlen = PN_LPM6_TAG_BITS + 128;
        sc->k6.tag = set * 2 + 1;
        __builtin_memcpy(sc->k6.addr, p->dst, 16);
        __u32 *v = pn_site_map.lookup(&sc->k6);
        if (v)
            site = *v;
    }
    if (site < PN_SCOLS)
        return site;
#endif
    return PN_SITE_NONE;
}

/* Chunk j (< PN_NSUM) of row r's bitmap. */
static __always_inline const struct pn_chunk *pn_chunk_of(__u32 set, const struct pn_row *r, __u64 j)
{
    /* the caller checked j; check again on the register the verifier sees
     * (behind a barrier, or clang drops the check as proven) */
    asm volatile("" : "+r"(j));
    if (j >= PN_NSUM)
        return 0;
    __u32 c = r->chunk[j];
    __u32 key = set * PN_CHUNKS + (c < PN_CHUNKS ? c : 0);
    return pn_chunks_map.lookup(&key);
}

static __always_inline const struct pn_row *pn_row(__u32 set, __u32 row)
{
    __u32 key = set * PN_ROWS + (row < PN_ROWS ? row : 0);
    return pn_rows_map.lookup(&key);
}

/* The row of every field of the packet into sc->rows: two LPM lookups, two
 * port lookups, two table reads. 0, or -1 when a map read fails. */
static __always_inline int pn_field_rows(struct pn_scratch *sc, const struct pn_parsed *p, __u32 set)
{
    struct pn_lut *lut = pn_lut_map.lookup(&set);
    if (!lut)
        return -1;
    __u32 rs, rd;
    if (pn_lpm(sc, p, set * 2, &rs) || pn_lpm(sc, p, set * 2 + 1, &rd))
        return -1;
    __u32 rsp = lut->noport[0], rdp = lut->noport[1];
    if (p->has_ports) {
        __u32 ks = set * 2 * PN_PORTS + p->sport, kd = (set * 2 + 1) * PN_PORTS + p->dport;
        __u32 *ps = pn_port_map.lookup(&ks), *pd = pn_port_map.lookup(&kd);
        if (!ps || !pd)
            return -1;
        rsp = *ps;
        rdp = *pd;
    }
    sc->ck.rows[0] = rs;
    sc->ck.rows[1] = rd;
    sc->ck.rows[2] = rsp;
    sc->ck.rows[3] = rdp;
    sc->ck.rows[4] = lut->proto[p->proto];
    sc->ck.rows[5] = lut->dscp[p->dscp & 63];
    return 0;
}

#define PN_BUSY_BITS ((__u64)PN_SLOT_BUSY << 48)

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pn_key_words builds struct pn_flow_key as little-endian words"
#endif

/* The flow key of a parsed packet as five words (struct pn_flow_key, _pad
 * zero), built with word moves: narrow stores read back as words stall. */
static __always_inline void pn_key_words(const struct pn_parsed *p, __u64 *kw)
{
    const __u64 *s = (const __u64 *)p->src, *d = (const __u64 *)p->dst;
    kw[0] = s[0];
    kw[1] = s[1];
    kw[2] = d[0];
    kw[3] = d[1];
    kw[4] = (__u64)p->sport | (__u64)p->dport << 16 | (__u64)p->proto << 32 | (__u64)p->family << 40;
}

static __always_inline struct pn_bucket *pn_bucket_at(__u32 h, __u32 i)
{
    __u32 k = (h + i) & (PN_FBUCKETS - 1);
    return pn_ftab_map.lookup(&k);
}

static __always_inline __u64 *pn_state(struct pn_xslot *x)
{
    return (__u64 *)((__u8 *)x + PN_SLOT_WORD);
}

/* The live slot holding key `w` (as 5 words), or 0. A busy slot's state
 * word carries PN_SLOT_BUSY, so it never equals a key's word. Only slots
 * whose tag matches are compared: a miss reads one line per bucket. */
static __always_inline struct pn_xslot *pn_ft_find(const __u64 *w, __u32 h)
{
    __u8 t = pn_flow_tag(h);
#pragma unroll
    for (__u32 i = 0; i < PN_PROBE_BUCKETS; i++) {
        struct pn_bucket *b = pn_bucket_at(h, i);
        if (!b)
            return 0;
#pragma unroll
        for (__u32 j = 0; j < PN_BUCKET_SLOTS; j++) {
            if (b->tag[j] != t)
                continue;
            const __u64 *s = (const __u64 *)&b->s[j];
            if (((s[4] ^ w[4]) | (s[0] ^ w[0]) | (s[1] ^ w[1]) | (s[2] ^ w[2]) | (s[3] ^ w[3])) == 0)
                return &b->s[j];
        }
        if (!b->passed)  /* no flow from an earlier home lives past here */
            return 0;
    }
    return 0;
}

/* A flow homed at bucket h now lives (+1) or no longer lives (-1) in the
 * bucket `at` places further: count it in the buckets it passed. */
static __always_inline void pn_passed(__u32 h, __u32 at, __s64 d)
{
#pragma unroll
    for (__u32 i = 0; i < PN_PROBE_BUCKETS - 1; i++) {
        if (i >= at)
            break;
        struct pn_bucket *b = pn_bucket_at(h, i);
        if (b)
            __sync_fetch_and_add(&b->passed, (__u32)d);
    }
}

/* Take a claimed slot's counts out: its policy's counter gets them and the
 * slot's sum (rec.* + shared_*) drops to 0, in one exchange per counter,
 * so a late add (a CPU that found the flow before the claim) stays in the
 * slot, for its next flow, rather than vanishing. csrc/xdptable.c takes
 * drained slots the same way. */
static __always_inline void pn_take_counts(struct pn_xslot *x)
{
    __u64 p = x->f.rec.packets, b = x->f.rec.bytes;
    __u64 sp = __sync_lock_test_and_set(&x->shared_packets, -p);
    __u64 sb = __sync_lock_test_and_set(&x->shared_bytes, -b);
    pn_pcount_add(x->f.rec.policy, p + sp, b + sb);
}

/* Claim a slot for key `w`: the first empty one in the probe window, else
 * the one idle longest (its record goes to pn_evict_rb first). Returns the
 * slot, marked busy, or 0 when another writer won the race for it. */
static __always_inline struct pn_xslot *pn_ft_insert(const __u64 *w, __u32 h, __u32 *stat)
{
    struct pn_xslot *victim = 0;
    struct pn_bucket *vb = 0;
    __u64 oldest = ~0ull, vword = 0;
    __u32 vat = 0, vj = 0;
    __u8 t = pn_flow_tag(h);
#pragma unroll
    for (__u32 i = 0; i < PN_PROBE_BUCKETS; i++) {
        struct pn_bucket *b = pn_bucket_at(h, i);
        if (!b)
            break;
#pragma unroll
        for (__u32 j = 0; j < PN_BUCKET_SLOTS; j++) {
            struct pn_xslot *x = &b->s[j];
            __u64 st = *pn_state(x);
            if (st == 0) {
                if (__sync_val_compare_and_swap(pn_state(x), 0, w[4] | PN_BUSY_BITS) == 0) {
                    b->tag[j] = t;
                    *stat = PN_ST_NEW;
                    pn_passed(h, i, 1);
                    return x;
                }
                continue;
            }
            if ((st >> 48) == 0 && x->f.rec.last_ns < oldest) {
                oldest = x->f.rec.last_ns;
                victim = x;
                vb = b;
                vword = st;
                vat = i;
                vj = j;
            }
        }
    }
    if (!victim || !vb) {
        *stat = PN_ST_INSERT_FAILED;
        return 0;
    }
    if (__sync_val_compare_and_swap(pn_state(victim), vword, vword | PN_BUSY_BITS) != vword) {
        *stat = PN_ST_INSERT_FAILED;
        return 0;
    }
    if (pn_evict_rb.ringbuf_output(victim, sizeof(*victim), 0)) {
        __u32 k = PN_ST_EXPORT_LOST;
        __u64 *c = pn_stats_map.lookup(&k);
        if (c)
            *c += 1;
    }
    __u32 k = PN_ST_EVICTED;
    __u64 *c = pn_stats_map.lookup(&k);
    if (c)
        *c += 1;
    /* its counts leave the table: its policy's counter keeps them */
    pn_take_counts(victim);
    /* the victim is ours now: move its passed counts to the new key's, then
     * retag it with the new key, still busy */
    const __u64 *vk = (const __u64 *)victim;
    __u64 vw[5] = {vk[0], vk[1], vk[2], vk[3], vword};
    __u32 vh = pn_flow_hash(vw);
    pn_passed(vh, (h + vat - vh) & (PN_FBUCKETS - 1), -1);
    pn_passed(h, vat, 1);
    if (vj < PN_BUCKET_SLOTS)
        vb->tag[vj] = t;
    __sync_val_compare_and_swap(pn_state(victim), vword | PN_BUSY_BITS, w[4] | PN_BUSY_BITS);
    *stat = PN_ST_NEW;
    return victim;
}

static __always_inline int pn_parse_frame(struct xdp_md *ctx, struct pn_parsed *p)
{
    const __u8 *data = (const __u8 *)(long)ctx->data;
    const __u8 *end = (const __u8 *)(long)ctx->data_end;
    __builtin_memset(p, 0, sizeof(*p));
    return pn_parse(data, end, p);
}

/* Count one packet on its flow record. The flow's creator CPU adds without
 * a locked instruction; see struct pn_xslot. */
static __always_inline void pn_count(struct pn_scratch *sc, struct pn_xslot *x, __u64 now)
{
    struct pn_flow_rec *r = &x->f.rec;
    __u32 l3_len = sc->p.l3_len;
    if (r->_pad == sc->cpu1) {
        r->packets += 1;
        r->bytes += l3_len;
    } else {
        __sync_fetch_and_add(&x->shared_packets, 1);
        __sync_fetch_and_add(&x->shared_bytes, l3_len);
    }
    r->last_ns = now;
    r->tcp_flags |= sc->p.tcp_flags;
    r->dscp = sc->p.dscp;
}

/* What every classified packet ends with: the path and action of (its
 * policy, its destination site) (one map value), the metadata, the verdict;
 * the policy's counter when the packet has no flow record `r` to count it. */
static __always_inline int pn_out(struct xdp_md *ctx, struct pn_cfg *cfg, struct pn_scratch *sc, __u32 set,
                                  __s32 policy, __u32 site, struct pn_flow_rec *r, __u64 now)
{
    __u32 key = (set * PN_NPOL + (__u32)(policy + 1)) * PN_SCOLS + site;
    __u32 path = PN_NO_PATH, action = XDP_PASS;
    struct pn_route *ra = pn_route_map.lookup(&key);
    if (ra) {
        path = ra->path;
        action = ra->action;
    }
    if (r)
        r->path = path;
    else
        pn_pcount_add(policy, 1, sc->p.l3_len);
    if (cfg->flags & PN_CFG_META)
        pn_set_meta(ctx, path, policy, site);
    if (action == XDP_DROP || pn_police(policy, sc->p.l3_len, now))
        return XDP_DROP;
    if (path != PN_NO_PATH && path < PN_TX_SLOTS)
        return pn_tx_map.redirect_map(path, XDP_PASS);
    return XDP_PASS;
}

/* A classified miss: insert the new flow (or re-stamp a known flow of an
 * older generation), count the packet, finish. */
static __always_inline int pn_finish_miss(struct xdp_md *ctx, struct pn_scratch *sc, __s32 policy)
{
    __u32 zero = 0;
    struct pn_cfg *cfg = pn_cfg_map.lookup(&zero);
    if (!cfg)
        return XDP_PASS;
    struct pn_parsed *p = &sc->p;
    struct pn_flow_rec *r = 0;
    struct pn_xslot *x;
    __u32 sk = PN_ST_RECLASS;
    __u64 now = sc->now;
    __u32 site = pn_site(sc, p, sc->set & 1);
    x = sc->reclass ? pn_ft_find(sc->kw, sc->h) : 0;
    if (x) {
        r = &x->f.rec;
        __u32 gen = sc->ck.gen;
        if ((__s32)(gen - r->generation) > 0) {
            /* Re-stamp it, claimed (busy) like a slot being evicted, so no
             * eviction, drain or other re-stamp runs at once: its counts so
             * far move to its old policy's counter. A packet arriving
             * meanwhile misses the lookup and may start a second record of
             * the flow (as two CPUs seeing its first packet can). */
            __u64 *stp = pn_state(x), w = sc->kw[4];
            if (__sync_val_compare_and_swap(stp, w, w | PN_BUSY_BITS) == w) {
                /* still older now that it is ours? (another CPU may have won) */
                if ((__s32)(gen - r->generation) > 0) {
                    if (r->policy != policy) {
                        __u64 tp = r->packets + x->shared_packets, tb = r->bytes + x->shared_bytes;
                        pn_pcount_add(r->policy, tp, tb);
                        pn_pcount_add(policy, -tp, -tb);
                        r->policy = policy;
                    }
                    r->site = site;
                    r->generation = gen;
                }
                pn_count(sc, x, now);
                __sync_val_compare_and_swap(stp, w | PN_BUSY_BITS, w);
            } else {
                r = 0;  /* being evicted, drained or re-stamped: count the packet by its policy */
            }
        } else {  /* another CPU re-stamped it first: the record's answer */
            pn_count(sc, x, now);
            policy = r->policy;
            site = r->site;
        }
    } else {  /* a new flow, or one drained since pn_xdp saw it */
        /* this CPU's number, for the flows it creates (until then no flow
         * names it, and pn_count takes the shared counters) */
        if (!sc->cpu1)
            sc->cpu1 = bpf_get_smp_processor_id() + 1;
        x = pn_ft_insert(sc->kw, sc->h, &sk);
        if (x) {
            r = &x->f.rec;
            __u64 *fw = (__u64 *)x;
            fw[0] = sc->kw[0];
            fw[1] = sc->kw[1];
            fw[2] = sc->kw[2];
            fw[3] = sc->kw[3];
            /* The slot's sum is 0 (plus a late add of its last flow, see
             * pn_take_counts); rec.packets/bytes may still take a plain
             * add from its last creator CPU, so leave them and add this
             * packet to the sum. Exports add shared_* in (wrapping). Plain
             * adds: the slot is ours, and atomics here wait for the cold
             * line, 30-40 ns a new flow; only a late atomic add landing
             * between this load and store could be lost. */
            x->shared_packets += 1;
            x->shared_bytes += (__u64)p->l3_len;
            r->first_ns = now;
            r->last_ns = now;
            r->policy = policy;
            r->site = site;
            r->path = PN_NO_PATH;
            r->tcp_flags = p->tcp_flags;
            r->dscp = p->dscp;
            r->_pad = sc->cpu1;
            r->generation = sc->ck.gen;
            /* publish: the slot matches lookups from here on */
            __sync_val_compare_and_swap(pn_state(x), sc->kw[4] | PN_BUSY_BITS, sc->kw[4]);
        }
    }
    __u64 *st = pn_stats_map.lookup(&sk);
    if (st)
        *st += 1;
    return pn_out(ctx, cfg, sc, sc->set & 1, policy, site, r, now);
}

/* key: PN_PROG_CLS -> pn_cls, PN_PROG_FIN -> pn_fin. A miss leaves pn_xdp
 * by tail calls: the classifier walk runs in its own program, which the
 * verifier checks once, alone, instead of once per path into it. A run
 * skips up to 8 summary words without candidates, walks the candidates of
 * one summary word (4,096 rules) and tail-calls itself for the rest, so a
 * packet takes at most PN_NSUM + 1 tail calls: the kernel's limit of 33
 * caps tables at 32 summary words (131,072 rules, checked by the loader),
 * not the verifier's budget. pn_fin inserts the flow and finishes. */
#define PN_PROG_CLS 0
#define PN_PROG_FIN 1
BPF_PROG_ARRAY(pn_progs, 2);

static __always_inline int pn_unaccounted(void)
{
    __u32 k = PN_ST_UNACCOUNTED;
    __u64 *c = pn_stats_map.lookup(&k);
    if (c)
        *c += 1;
    return XDP_PASS;
}

/* Summary words one pn_cls run looks at before it tail-calls itself. */
#define PN_CLS_SUMS 8

/* First matching rule of the six rows in sc->rows, from summary word
 * sc->chunk on: AND the six summary words, then only the bitmap words
 * whose summary bit survived. */
int pn_cls(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct pn_scratch *sc = pn_scratch_map.lookup(&zero);
    if (!sc)
        return XDP_PASS;
    __s32 policy = -1;
    __u32 set = sc->set & 1;
    __u64 c = sc->chunk;
    struct pn_rpol *rp = pn_rpol_map.lookup(&set);
    const struct pn_row *r0 = pn_row(set, sc->ck.rows[0]), *r1 = pn_row(set, sc->ck.rows[1]),
                        *r2 = pn_row(set, sc->ck.rows[2]), *r3 = pn_row(set, sc->ck.rows[3]),
                        *r4 = pn_row(set, sc->ck.rows[4]), *r5 = pn_row(set, sc->ck.rows[5]);
    if (!rp || !r0 || !r1 || !r2 || !r3 || !r4 || !r5) {
        sc->policy = -1;
        pn_progs.call(ctx, PN_PROG_FIN);
        return pn_unaccounted();
    }
    __u64 m = 0;
    for (__u32 k = 0; k < PN_CLS_SUMS; k++) {
        if (c >= PN_NSUM)
            break;
        m = r0->sum[c] & r1->sum[c] & r2->sum[c] & r3->sum[c] & r4->sum[c] & r5->sum[c];
        if (m)
            break;
        c++;
    }
    /* m != 0: summary word c has candidates, walk them, the next run starts
     * after it; m == 0: c is the first word not looked at (PN_NSUM: none) */
    int found = 0;
    __u64 next = c;
    if (m && c < PN_NSUM) {
        next = c + 1;
        const struct pn_chunk *k0 = pn_chunk_of(set, r0, c), *k1 = pn_chunk_of(set, r1, c),
                              *k2 = pn_chunk_of(set, r2, c), *k3 = pn_chunk_of(set, r3, c),
                              *k4 = pn_chunk_of(set, r4, c), *k5 = pn_chunk_of(set, r5, c);
        if (k0 && k1 && k2 && k3 && k4 && k5) {
            for (__u32 i = 0; i < PN_CHUNK_WORDS; i++) {
                if (!m)
                    break;
                __u32 b = pn_ctz64(m) & 63;
                m &= m - 1;
                __u64 x = k0->w[b] & k1->w[b] & k2->w[b] & k3->w[b] & k4->w[b] & k5->w[b];
                if (x) {
                    policy = rp->policy[((c * PN_CHUNK_WORDS + b) * 64 + pn_ctz64(x)) & (PN_RULES - 1)];
                    found = 1;
                    break;
                }
            }
        }
    }
    if (!found && next < PN_NSUM) {
        sc->chunk = next;
        pn_progs.call(ctx, PN_PROG_CLS);
    } else {
        sc->policy = policy;
#if PN_CCACHE
        pn_ccache_map.update(&sc->ck, &policy);
#endif
        pn_progs.call(ctx, PN_PROG_FIN);
    }
    return pn_unaccounted();  /* only reached when a tail call fails */
}

int pn_fin(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct pn_scratch *sc = pn_scratch_map.lookup(&zero);
    if (!sc)
        return XDP_PASS;
    return pn_finish_miss(ctx, sc, sc->policy);
}

int pn_xdp(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct pn_scratch *sc = pn_scratch_map.lookup(&zero);
    if (!sc)
        return XDP_PASS;
    struct pn_parsed *p = &sc->p;
    int rc = pn_parse_frame(ctx, p);
    if (rc != PN_OK) {
        __u32 k = rc;
        __u64 *m = pn_malformed_map.lookup(&k);
        if (m)
            *m += 1;
        struct pn_cfg *c = pn_cfg_map.lookup(&zero);
        if (c && (c->flags & PN_CFG_META))
            pn_set_meta(ctx, PN_NO_PATH, -1, PN_SITE_NONE);
        return XDP_PASS;
    }
    struct pn_cfg *cfg = pn_cfg_map.lookup(&zero);
    if (!cfg)
        return XDP_PASS;
    __u32 set = cfg->set & 1, gen = cfg->generation;
    __u64 now = bpf_jiffies64() * cfg->tick_ns + cfg->clock_base;
#ifdef PN_BENCH_NEW_FLOWS
    /* benchmark builds only: every run of one frame is a new flow (a new
     * source port), so repeated runs measure the miss path with the
     * caches as warm as traffic of many flows between few hosts has them */
    if (p->has_ports)
        p->sport = (__u16)++sc->bench_seq;
    else  /* no ports: the low half of the source address instead */
        *(__u16 *)(p->src + 2) ^= (__u16)++sc->bench_seq;
#endif
    pn_key_words(p, sc->kw);
    __u32 h = pn_flow_hash(sc->kw);
    struct pn_xslot *x = pn_ft_find(sc->kw, h);
    if (x && x->f.rec.generation == gen) {  /* the hit path */
        pn_count(sc, x, now);
        return pn_out(ctx, cfg, sc, set, x->f.rec.policy, x->f.rec.site, &x->f.rec, now);
    }
    sc->reclass = x != 0;
    sc->h = h;
    sc->now = now;
    sc->set = set;
    sc->ck.gen = gen;
    sc->chunk = 0;
    if (pn_field_rows(sc, p, set) == 0) {
#if PN_CCACHE
        __s32 *known = pn_ccache_map.lookup(&sc->ck);
#else
        __s32 *known = 0;
#endif
        if (known) {
            sc->policy = *known;
            __u32 k = PN_ST_CLASS_HIT;
            __u64 *c = pn_stats_map.lookup(&k);
            if (c)
                *c += 1;
            pn_progs.call(ctx, PN_PROG_FIN);
        } else {
            pn_progs.call(ctx, PN_PROG_CLS);
        }
    }
    /* a map read or the tail call failed: pass, counted as unaccounted
     * rather than given the default policy */
    return pn_unaccounted();
}

/* key: 0 jiffies, 1 CLOCK_MONOTONIC coarse ns, 2 jiffies again: the loader
 * runs pn_clock to find the clock's tick and base (struct pn_cfg) */
BPF_ARRAY(pn_clock_map, __u64, 3);

int pn_clock(struct xdp_md *ctx)
{
    __u32 k0 = 0, k1 = 1, k2 = 2;
    __u64 *j0 = pn_clock_map.lookup(&k0), *t = pn_clock_map.lookup(&k1), *j1 = pn_clock_map.lookup(&k2);
    if (j0 && t && j1) {
        *j0 = bpf_jiffies64();
        *t = bpf_ktime_get_coarse_ns();
        *j1 = bpf_jiffies64();
    }
    return XDP_PASS;
}

/* The floor for benchmarks: parse Ethernet/IP (the same parser), bump one
 * counter, pass. What any XDP program that looks at headers pays. */
int pn_floor(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct pn_scratch *sc = pn_scratch_map.lookup(&zero);
    if (!sc)
        return XDP_PASS;
    __u32 k = pn_parse_frame(ctx, &sc->p) == PN_OK ? 0 : 1;
    __u64 *c = pn_floor_map.lookup(&k);
    if (c)
        *c += 1;
    return XDP_PASS;
}
