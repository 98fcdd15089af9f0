#include "flowtable.h"

#include <stdlib.h>
#include <string.h>

#include "flowhash.h"
#include "parse.h"

static inline int key_eq(const struct pn_flow_key *a, const struct pn_flow_key *b)
{
    return memcmp(a, b, sizeof(*a)) == 0;
}

static inline void cache_key(const struct pn_parsed *p, struct pn_flow_key *key)
{
    pn_key_of(p, key);
    /* DSCP and "has ports" are not in the flow key but rules match on them */
    key->_pad = (uint16_t)(0x100 | (p->has_ports << 9) | p->dscp);
}

/* Stage one of a burst of pn_dp_run: parse m frames, build their keys and
 * hash them. rc[j] != PN_OK: k, h unset. */
static inline void parse_burst(const uint8_t *const *data, const size_t *len, const size_t *wire, size_t m,
                               struct pn_parsed *p, struct pn_flow_key *k, uint64_t *h, int *rc)
{
    for (size_t j = 0; j < m; j++) {
        memset(&p[j], 0, sizeof(p[j]));
        const uint8_t *end = data[j] + len[j];
        rc[j] = pn_parse_wire(data[j], end, wire && wire[j] > len[j] ? data[j] + wire[j] : end, &p[j]);
        if (rc[j] == PN_OK) {
            pn_key_of(&p[j], &k[j]);
            h[j] = pn_key_hash(&k[j]);
        }
    }
}

int pn_ft_init(pn_flowtable *ft, uint32_t capacity, int64_t idle_ns, int64_t active_ns)
{
    memset(ft, 0, sizeof(*ft));
    if (capacity == 0)
        return -1;
    uint32_t nb = 1;
    while (nb < capacity && nb < (1u << 31))
        nb <<= 1;
    ft->capacity = capacity;
    ft->mask = nb - 1;
    ft->idle_ns = idle_ns;
    ft->active_ns = active_ns;
    ft->flows = calloc(capacity, sizeof(struct pn_flow));
    ft->bucket = calloc(nb, sizeof(uint32_t));
    ft->hnext = malloc(sizeof(uint32_t) * capacity);
    ft->prev = malloc(sizeof(uint32_t) * capacity);
    ft->next = malloc(sizeof(uint32_t) * capacity);
    if (!ft->flows || !ft->bucket || !ft->hnext || !ft->prev || !ft->next) {
        pn_ft_free(ft);
        return -1;
    }
    ft->free_head = PN_NIL;
    ft->fresh = 0;
    ft->head = ft->tail = PN_NIL;
    return 0;
}

void pn_ft_free(pn_flowtable *ft)
{
    free(ft->flows);
    free(ft->bucket);
    free(ft->hnext);
    free(ft->prev);
    free(ft->next);
    free(ft->exp);
    memset(ft, 0, sizeof(*ft));
}

static void export_push(pn_flowtable *ft, const struct pn_flow *f)
{
    if (ft->exp_len == ft->exp_cap) {
        size_t ncap = ft->exp_cap ? ft->exp_cap * 2 : 1024;
        struct pn_flow *n = realloc(ft->exp, ncap * sizeof(*n));
        if (!n) {
            ft->export_lost++;
            return;
        }
        ft->exp = n;
        ft->exp_cap = ncap;
    }
    ft->exp[ft->exp_len++] = *f;
}

static inline void lru_unlink(pn_flowtable *ft, uint32_t i)
{
    uint32_t p = ft->prev[i], n = ft->next[i];
    if (p != PN_NIL)
        ft->next[p] = n;
    else
        ft->head = n;
    if (n != PN_NIL)
        ft->prev[n] = p;
    else
        ft->tail = p;
}

static inline void lru_push_head(pn_flowtable *ft, uint32_t i)
{
    ft->prev[i] = PN_NIL;
    ft->next[i] = ft->head;
    if (ft->head != PN_NIL)
        ft->prev[ft->head] = i;
    ft->head = i;
    if (ft->tail == PN_NIL)
        ft->tail = i;
}

/* Take entry i out of the table into the export buffer. */
static void remove_entry(pn_flowtable *ft, uint32_t i, uint64_t *counter)
{
    export_push(ft, &ft->flows[i]);
    (*counter)++;
    uint32_t b = (uint32_t)pn_key_hash(&ft->flows[i].key) & ft->mask;
    uint32_t *link = &ft->bucket[b];
    while (*link != i + 1)
        link = &ft->hnext[*link - 1];
    *link = ft->hnext[i];
    lru_unlink(ft, i);
    ft->hnext[i] = ft->free_head + 1;  /* PN_NIL + 1 == 0: the end */
    ft->free_head = i;
    ft->count--;
}

void pn_ft_flush(pn_flowtable *ft)
{
    uint64_t flushed = 0;
    while (ft->tail != PN_NIL)
        remove_entry(ft, ft->tail, &flushed);
}

size_t pn_ft_expire_idle(pn_flowtable *ft, uint64_t now_ns, int64_t idle_ns)
{
    size_t n = 0;
    if (idle_ns < 0)
        return 0;
    /* least recently used first: the walk stops at the first flow still active */
    while (ft->tail != PN_NIL && (int64_t)(now_ns - ft->flows[ft->tail].rec.last_ns) >= idle_ns) {
        remove_entry(ft, ft->tail, &ft->expired_idle);
        n++;
    }
    return n;
}

size_t pn_ft_snapshot(const pn_flowtable *ft, struct pn_flow *out)
{
    size_t n = 0;
    for (uint32_t i = ft->head; i != PN_NIL; i = ft->next[i])
        out[n++] = ft->flows[i];
    return n;
}

/* Everything after parsing: idle expiry, flow lookup or insert, classify on
 * a miss, account. `b` is the key's bucket. */
static inline const struct pn_flow_rec *dp_account(pn_dp *dp, const struct pn_parsed *p, const struct pn_flow_key *key,
                                 uint32_t b, uint64_t ts)
{
    pn_flowtable *ft = &dp->ft;
    if (ft->idle_ns)
        while (ft->tail != PN_NIL && (int64_t)(ts - ft->flows[ft->tail].rec.last_ns) >= ft->idle_ns)
            remove_entry(ft, ft->tail, &ft->expired_idle);

    uint32_t i = ft->bucket[b] - 1;  /* 0 - 1 == PN_NIL */
    while (i != PN_NIL && !key_eq(&ft->flows[i].key, key))
        i = ft->hnext[i] - 1;

    struct pn_flow_rec *r;
    if (i != PN_NIL) {
        r = &ft->flows[i].rec;
        if (ft->active_ns && (int64_t)(ts - r->first_ns) >= ft->active_ns) {
            export_push(ft, &ft->flows[i]);
            ft->expired_active++;
            r->packets = r->bytes = 0;
            r->first_ns = ts;
            r->tcp_flags = 0;
        }
        if (r->generation != dp->generation) {
            r->policy = pn_classify(dp->cls, p);
            r->site = pn_site_of(dp->sites, p);
            r->generation = dp->generation;
            dp->cache_misses++;
        } else {
            dp->cache_hits++;
        }
        if (ft->head != i) {
            lru_unlink(ft, i);
            lru_push_head(ft, i);
        }
    } else {
        if (ft->count == ft->capacity)
            remove_entry(ft, ft->tail, &ft->evicted);
        if (ft->free_head != PN_NIL) {
            i = ft->free_head;
            ft->free_head = ft->hnext[i] - 1;
        } else {
            i = ft->fresh++;  /* count < capacity: one is left */
        }
        ft->hnext[i] = ft->bucket[b];
        ft->bucket[b] = i + 1;
        ft->count++;
        lru_push_head(ft, i);
        ft->flows[i].key = *key;
        r = &ft->flows[i].rec;
        memset(r, 0, sizeof(*r));
        r->first_ns = ts;
        r->policy = pn_classify(dp->cls, p);
        r->site = pn_site_of(dp->sites, p);
        r->generation = dp->generation;
        dp->cache_misses++;
    }
    r->packets++;
    r->bytes += p->l3_len;
    r->last_ns = ts;
    r->tcp_flags |= p->tcp_flags;
    r->dscp = p->dscp;
    uint32_t slot = (uint32_t)(r->policy + 1);
    r->path = dp->route[slot * dp->ncols + r->site];
    dp->pcount[slot].packets++;
    dp->pcount[slot].bytes += p->l3_len;
    return r;
}

/* Frames in bursts: parse and hash a burst, prefetch the buckets, then the
 * flow records, then account in frame order. The prefetches are only hints
 * (an eviction inside the burst may change a bucket), so the result is
 * exactly that of one frame at a time. */
void pn_dp_run(pn_dp *dp, const uint8_t *const *data, const size_t *len, const uint64_t *ts,
               int32_t *out, uint32_t *where, size_t n)
{
    pn_dp_run_wire(dp, data, len, NULL, ts, out, where, n);
}

void pn_dp_run_wire(pn_dp *dp, const uint8_t *const *data, const size_t *len, const size_t *wire,
                    const uint64_t *ts, int32_t *out, uint32_t *where, size_t n)
{
    pn_flowtable *ft = &dp->ft;
    struct pn_parsed p[PN_BURST];
    struct pn_flow_key k[PN_BURST];
    uint64_t h[PN_BURST];
    uint32_t b[PN_BURST];
    int rc[PN_BURST];
    for (size_t base = 0; base < n; base += PN_BURST) {
        size_t m = n - base < PN_BURST ? n - base : PN_BURST;
        /* the next burst's headers load while this one is accounted */
        for (size_t j = base + PN_BURST; j < n && j < base + 2 * PN_BURST; j++)
            __builtin_prefetch(data[j]);
        parse_burst(data + base, len + base, wire ? wire + base : NULL, m, p, k, h, rc);
        for (size_t j = 0; j < m; j++) {
            if (rc[j] == PN_OK) {
                b[j] = (uint32_t)h[j] & ft->mask;
                __builtin_prefetch(&ft->bucket[b[j]]);
            }
        }
        for (size_t j = 0; j < m; j++) {
            if (rc[j] == PN_OK) {
                uint32_t h = ft->bucket[b[j]];
                if (h)
                    __builtin_prefetch(&ft->flows[h - 1]);
            }
        }
        for (size_t j = 0; j < m; j++) {
            uint32_t site = PN_SITE_NONE, path = PN_NO_PATH;
            if (rc[j] != PN_OK) {
                dp->malformed[rc[j]]++;
                out[base + j] = -1;
            } else {
                const struct pn_flow_rec *r = dp_account(dp, &p[j], &k[j], b[j], ts[base + j]);
                out[base + j] = r->policy;
                site = r->site;
                path = r->path;
            }
            if (where) {
                where[2 * (base + j)] = site;
                where[2 * (base + j) + 1] = path;
            }
        }
    }
}

int pn_cache_init(pn_cache *c, uint32_t size_pow2)
{
    /* a power of two, at least one set (PN_CACHE_WAYS entries, or 2 for a
     * 2-entry cache) */
    if (size_pow2 < 2 || (size_pow2 & (size_pow2 - 1))) {
        c->e = NULL;
        c->mem = NULL;
        return -1;
    }
    /* line-aligned, so every set starts where the prefetches expect it
     * (calloc's 16-byte alignment spread a 96-byte set over three lines);
     * still calloc, so a big table's pages are zeroed when first touched */
    c->mem = calloc((size_t)size_pow2 * sizeof(pn_cache_entry) + 63, 1);
    c->e = c->mem ? (pn_cache_entry *)(((uintptr_t)c->mem + 63) & ~(uintptr_t)63) : NULL;
    c->mask = size_pow2 - 1;
    c->generation = 1;
    c->hits = c->misses = 0;
    return c->e ? 0 : -1;
}

void pn_cache_free(pn_cache *c)
{
    free(c->mem);
    c->mem = NULL;
    c->e = NULL;
}

/* What pn_classify reads of a packet, back from a cache key (cache_key()
 * keeps DSCP and "has ports" in _pad). */
static inline void parsed_of_key(const struct pn_flow_key *k, struct pn_parsed *p)
{
    memset(p, 0, sizeof(*p));
    memcpy(p->src, k->src, 16);
    memcpy(p->dst, k->dst, 16);
    p->sport = k->sport;
    p->dport = k->dport;
    p->proto = k->proto;
    p->family = k->family;
    p->dscp = (uint8_t)(k->_pad & 63);
    p->has_ports = (uint8_t)((k->_pad >> 9) & 1);
}

/* W-way set associative, ways in recency order (way 0 the most recently
 * used): a hit moves its entry to the front, a miss drops the last way. */
static inline __attribute__((always_inline)) int32_t cache_lookup_w(pn_cache *c, const pn_classifier *cls,
                                                                    const struct pn_flow_key *key, uint64_t h,
                                                                    uint64_t *hits, const unsigned W)
{
    pn_cache_entry *e = &c->e[(h & c->mask) & ~(uint64_t)(W - 1)];
    if (e[0].generation == c->generation && key_eq(&e[0].key, key)) {
        (*hits)++;
        return e[0].policy;
    }
    for (unsigned w = 1; w < W; w++) {
        if (e[w].generation == c->generation && key_eq(&e[w].key, key)) {
            pn_cache_entry t = e[w];
            memmove(&e[1], &e[0], w * sizeof(*e));
            e[0] = t;
            (*hits)++;
            return t.policy;
        }
    }
    c->misses++;
    struct pn_parsed p;
    parsed_of_key(key, &p);
    memmove(&e[1], &e[0], (W - 1) * sizeof(*e));
    e[0].key = *key;
    e[0].generation = c->generation;
    e[0].policy = pn_classify(cls, &p);
    return e[0].policy;
}

/* The set of hash h: PN_CACHE_WAYS ways, 2 in a 2-entry cache. */
static inline unsigned cache_ways(const pn_cache *c)
{
    return c->mask >= PN_CACHE_WAYS - 1 ? PN_CACHE_WAYS : 2;
}

static inline const char *cache_set(const pn_cache *c, uint64_t h)
{
    return (const char *)&c->e[(h & c->mask) & ~(uint64_t)(cache_ways(c) - 1)];
}

static inline int32_t cache_lookup(pn_cache *c, const pn_classifier *cls, const struct pn_flow_key *key, uint64_t h,
                                   uint64_t *hits)
{
    if (cache_ways(c) == PN_CACHE_WAYS)
        return cache_lookup_w(c, cls, key, h, hits, PN_CACHE_WAYS);
    return cache_lookup_w(c, cls, key, h, hits, 2);
}

/* The cache key of a frame, or why it did not parse. The frames nearly all
 * traffic is made of (untagged IPv4 without options, or IPv6 without
 * extension headers, carrying TCP, UDP or neither, not a later fragment, with
 * consistent lengths) are read straight into the key, without pn_parse's
 * zeroed struct pn_parsed and its copy into the key; everything else goes
 * through pn_parse, whose answer the fast path reproduces exactly (the
 * sanitizer fuzz test compares both with the linear classifier). */
static inline __attribute__((always_inline)) int cache_parse(const uint8_t *d, size_t len, struct pn_flow_key *k)
{
    if (len >= 38 && d[12] == 0x08 && d[13] == 0x00 && d[14] == 0x45) {
        /* branch-free on the protocol: TCP, UDP and the rest come in random
         * order; bytes 20..23 of the IP packet are in the frame (len >= 38) */
        const uint8_t *ip = d + 14;
        uint32_t tot = PN_RD16(ip + 2), proto = ip[9];
        uint32_t tcp = proto == PN_PROTO_TCP, udp = proto == PN_PROTO_UDP, ports = tcp | udp;
        if (tot >= 20 + 20 * tcp + 8 * udp && tot <= len - 14 && (PN_RD16(ip + 6) & 0x1fff) == 0) {
            uint16_t keep = (uint16_t)-ports;
            memset(k, 0, 32);
            memcpy(k->src, ip + 12, 4);
            memcpy(k->dst, ip + 16, 4);
            k->sport = PN_RD16(ip + 20) & keep;
            k->dport = PN_RD16(ip + 22) & keep;
            k->proto = (uint8_t)proto;
            k->family = PN_FAMILY_V4;
            k->_pad = (uint16_t)(0x100 | (ports << 9) | (ip[1] >> 2));
            return PN_OK;
        }
    } else if (len >= 54 && d[12] == 0x86 && d[13] == 0xdd && (d[14] >> 4) == 6) {
        const uint8_t *ip = d + 14;
        uint32_t plen = PN_RD16(ip + 4), nh = ip[6];
        uint32_t need = nh == PN_PROTO_TCP ? 20 : nh == PN_PROTO_UDP ? 8 : 0;
        if (nh != 0 && nh != 43 && nh != 44 && nh != 60 && plen >= need && plen <= len - 54) {
            uint32_t ports = nh == PN_PROTO_TCP || nh == PN_PROTO_UDP;
            memcpy(k->src, ip + 8, 16);
            memcpy(k->dst, ip + 24, 16);
            k->sport = ports ? PN_RD16(ip + 40) : 0;
            k->dport = ports ? PN_RD16(ip + 42) : 0;
            k->proto = (uint8_t)nh;
            k->family = PN_FAMILY_V6;
            k->_pad = (uint16_t)(0x100 | (ports << 9) | ((((ip[0] & 0x0f) << 4) | (ip[1] >> 4)) >> 2));
            return PN_OK;
        }
    }
    struct pn_parsed p;
    memset(&p, 0, sizeof(p));
    int rc = pn_parse(d, d + len, &p);
    if (rc == PN_OK)
        cache_key(&p, k);
    return rc;
}

int32_t pn_cache_classify(pn_cache *c, const pn_classifier *cls, const uint8_t *data, size_t len, int *reason)
{
    struct pn_flow_key key;
    int rc = cache_parse(data, len, &key);
    *reason = rc;
    if (rc != PN_OK)
        return -1;
    uint64_t hits = 0;
    int32_t policy = cache_lookup(c, cls, &key, pn_key_hash(&key), &hits);
    c->hits += hits;
    return policy;
}

/* Bursts of PN_BURST frames: parse and hash a burst, prefetch the first two
 * lines of each frame's cache set (way 0 and 1; later ways are rarely hit),
 * then resolve the burst in frame order. Before parsing a burst, prefetch
 * the headers of the next one: a trace is far bigger than the caches and the
 * frames' first reads were the largest stall of the loop (half of its
 * samples in perf record before this prefetch). */
void pn_cache_run(pn_cache *c, const pn_classifier *cls, const uint8_t *const *data, const size_t *len,
                  int32_t *out, size_t n, uint64_t *malformed)
{
    struct pn_flow_key k[PN_BURST];
    uint64_t h[PN_BURST];
    int rc[PN_BURST];
    uint64_t hits = 0;
    for (size_t base = 0; base < n; base += PN_BURST) {
        size_t m = n - base < PN_BURST ? n - base : PN_BURST;
        for (size_t j = base + PN_BURST; j < base + 2 * PN_BURST && j < n; j++) {
            /* bytes 12..53: Ethernet type to the end of a TCP header over IPv4
             * (integer arithmetic: a short frame's +53 may be past its end) */
            __builtin_prefetch((const void *)((uintptr_t)data[j] + 12));
            __builtin_prefetch((const void *)((uintptr_t)data[j] + 53));
        }
        for (size_t j = 0; j < m; j++) {
            rc[j] = cache_parse(data[base + j], len[base + j], &k[j]);
            if (rc[j] == PN_OK) {
                h[j] = pn_key_hash(&k[j]);
                const char *set = cache_set(c, h[j]);
                __builtin_prefetch(set);
                __builtin_prefetch(set + 2 * sizeof(pn_cache_entry) - 1);
            }
        }
        for (size_t j = 0; j < m; j++) {
            if (rc[j] != PN_OK) {
                malformed[rc[j]]++;
                out[base + j] = -1;
            } else {
                out[base + j] = cache_lookup(c, cls, &k[j], h[j], &hits);
            }
        }
    }
    c->hits += hits;
}
