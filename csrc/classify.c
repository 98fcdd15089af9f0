#include "classify.h"

#include <stdlib.h>
#include <string.h>

/* What one rule says about one field. */
enum { IV_NEVER = 0, IV_ANY = 1, IV_RANGE = 2 };
typedef struct { pn_u128 lo, hi; int kind; } iv_t;
typedef struct { pn_u128 pos; uint32_t rule; int add; } event_t;

static pn_u128 load_be(const uint8_t *b, int nbytes)
{
    pn_u128 v = 0;
    for (int i = 0; i < nbytes; i++)
        v = (v << 8) | b[i];
    return v;
}

static iv_t prefix_iv(const uint8_t *addr, unsigned plen, int nbytes)
{
    unsigned bits = (unsigned)nbytes * 8;
    pn_u128 lo = load_be(addr, nbytes);
    pn_u128 span = plen == 0 ? ~(pn_u128)0 >> (128 - bits) : ((((pn_u128)1) << (bits - plen)) - 1);
    iv_t r = { lo, lo | span, IV_RANGE };
    return r;
}

static int cmp_event(const void *a, const void *b)
{
    const event_t *x = a, *y = b;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static uint64_t hash_words(const uint64_t *w, uint32_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (uint32_t i = 0; i < n; i++) {
        h ^= w[i];
        h *= 0xbf58476d1ce4e5b9ull;
        h ^= h >> 29;
    }
    /* the last word's high bits reach the low bits (slot indexes) too */
    h ^= h >> 32;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

/* Distinct 64-word bitmap chunks of the whole classifier (c->chunks), found
 * by content through an open-addressing table of chunk id + 1. */
typedef struct {
    uint32_t cap;           /* chunks allocated */
    uint32_t *slots;
    uint32_t nslots;        /* a power of two, more than twice the chunks */
} chunkstore_t;

static int64_t chunk_intern(pn_classifier *c, chunkstore_t *cs, const uint64_t *w)
{
    if (2 * ((size_t)c->nchunks + 1) > cs->nslots) {  /* grow the index, rehash */
        uint32_t n = cs->nslots ? cs->nslots * 2 : 1024;
        uint32_t *ns = calloc(n, sizeof(uint32_t));
        if (!ns)
            return -1;
        for (uint32_t i = 0; i < c->nchunks; i++) {
            uint32_t s = (uint32_t)hash_words(c->chunks + (size_t)i * PN_CHUNK_WORDS, PN_CHUNK_WORDS) & (n - 1);
            while (ns[s])
                s = (s + 1) & (n - 1);
            ns[s] = i + 1;
        }
        free(cs->slots);
        cs->slots = ns;
        cs->nslots = n;
    }
    uint32_t mask = cs->nslots - 1;
    uint32_t s = (uint32_t)hash_words(w, PN_CHUNK_WORDS) & mask;
    for (;; s = (s + 1) & mask) {
        uint32_t id = cs->slots[s];
        if (!id)
            break;
        if (!memcmp(c->chunks + (size_t)(id - 1) * PN_CHUNK_WORDS, w, PN_CHUNK_WORDS * 8))
            return id - 1;
    }
    if (c->nchunks == cs->cap) {
        uint32_t ncap = cs->cap ? cs->cap * 2 : 64;
        uint64_t *nc = realloc(c->chunks, (size_t)ncap * PN_CHUNK_WORDS * 8);
        if (!nc)
            return -1;
        c->chunks = nc;
        cs->cap = ncap;
    }
    memcpy(c->chunks + (size_t)c->nchunks * PN_CHUNK_WORDS, w, PN_CHUNK_WORDS * 8);
    cs->slots[s] = ++c->nchunks;
    return c->nchunks - 1;
}

/* A row's summary word: bit b set iff word b of the chunk is non-zero. */
static uint64_t chunk_summary(const uint64_t *w)
{
    uint64_t m = 0;
    for (uint32_t b = 0; b < PN_CHUNK_WORDS; b++)
        m |= (uint64_t)(w[b] != 0) << b;
    return m;
}

/* Append a row (its chunk ids and summary words) to f. */
static int64_t row_append(pn_classifier *c, pn_field *f, uint32_t *cap, const uint32_t *ids, const uint64_t *sums)
{
    if (f->nrows == *cap) {
        uint32_t ncap = *cap ? *cap * 2 : 16;
        uint64_t *ns = realloc(f->sums, (size_t)ncap * c->nsum * 8);
        if (ns)
            f->sums = ns;
        uint32_t *nk = ns ? realloc(f->chunk, (size_t)ncap * c->nsum * 4) : NULL;
        if (!nk)
            return -1;
        f->chunk = nk;
        *cap = ncap;
    }
    memcpy(f->sums + (size_t)f->nrows * c->nsum, sums, (size_t)c->nsum * 8);
    memcpy(f->chunk + (size_t)f->nrows * c->nsum, ids, (size_t)c->nsum * 4);
    return f->nrows++;
}

/* Row store with de-duplication: rows with the same chunks are one row. */
typedef struct {
    pn_classifier *c;
    pn_field *f;
    uint32_t cap;           /* rows allocated */
    uint32_t *slots;        /* open-addressing table of row+1, 0 = empty */
    uint32_t nslots;
} rowstore_t;

static int64_t rowstore_add(rowstore_t *rs, const uint32_t *ids, const uint64_t *sums)
{
    pn_classifier *c = rs->c;
    pn_field *f = rs->f;
    uint32_t mask = rs->nslots - 1, h = 0x811c9dc5u;
    for (uint32_t j = 0; j < c->nsum; j++)
        h = (h ^ ids[j]) * 0x01000193u;
    uint32_t s = (uint32_t)(((uint64_t)h * 0x9E3779B97F4A7C15ull) >> 32) & mask;
    for (;; s = (s + 1) & mask) {
        uint32_t r = rs->slots[s];
        if (!r)
            break;
        if (!memcmp(f->chunk + (size_t)(r - 1) * c->nsum, ids, (size_t)c->nsum * 4))
            return r - 1;
    }
    int64_t row = row_append(c, f, &rs->cap, ids, sums);
    if (row >= 0)
        rs->slots[s] = (uint32_t)row + 1;
    return row;
}

/* Chunk ids and summary words of the chunks of `bits` (nsum x 64 words)
 * marked dirty, which are then clean. */
static int intern_dirty(pn_classifier *c, chunkstore_t *cs, const uint64_t *bits, uint8_t *dirty, uint32_t *ids,
                        uint64_t *sums)
{
    for (uint32_t j = 0; j < c->nsum; j++) {
        if (!dirty[j])
            continue;
        const uint64_t *w = bits + (size_t)j * PN_CHUNK_WORDS;
        int64_t id = chunk_intern(c, cs, w);
        if (id < 0)
            return -1;
        ids[j] = (uint32_t)id;
        sums[j] = chunk_summary(w);
        dirty[j] = 0;
    }
    return 0;
}

/* Sweep the value space [0, maxv] once, left to right, keeping the set of
 * rules whose interval covers the current point; each boundary starts a new
 * elementary interval. lut != 0 stores a direct value -> row table instead of
 * (starts, rows) for binary search (small fields: ports, protocol, DSCP). */
static int build_field(pn_classifier *c, chunkstore_t *cs, pn_field *f, const iv_t *ivs, pn_u128 maxv, int lut)
{
    uint32_t n = c->nrules, nev = 0;
    int rc = -1;
    event_t *ev = malloc(sizeof(event_t) * (2 * (size_t)n + 1));
    /* the current bitmap, padded to whole chunks; which chunks changed since
     * they were last interned, and the row's chunk ids and summary words */
    uint64_t *cur = calloc((size_t)c->nsum * PN_CHUNK_WORDS, 8);
    uint8_t *dirty = malloc(c->nsum);
    uint32_t *ids = calloc(c->nsum, sizeof(uint32_t));
    uint64_t *sums = calloc(c->nsum, 8);
    uint32_t maxint = 2 * n + 1;
    pn_u128 *starts = malloc(sizeof(pn_u128) * maxint);
    uint32_t *rowid = malloc(sizeof(uint32_t) * maxint);
    rowstore_t rs = { c, f, 0, NULL, 1 };
    while (rs.nslots < 2 * maxint)
        rs.nslots <<= 1;
    rs.slots = calloc(rs.nslots, sizeof(uint32_t));
    if (!ev || !cur || !dirty || !ids || !sums || !starts || !rowid || !rs.slots)
        goto out;
    memset(dirty, 1, c->nsum);

    for (uint32_t i = 0; i < n; i++) {
        if (ivs[i].kind == IV_ANY) {
            cur[i / 64] |= 1ull << (i % 64);
        } else if (ivs[i].kind == IV_RANGE) {
            ev[nev++] = (event_t){ ivs[i].lo, i, 1 };
            if (ivs[i].hi < maxv)
                ev[nev++] = (event_t){ ivs[i].hi + 1, i, 0 };
        }
    }
    qsort(ev, nev, sizeof(event_t), cmp_event);

    uint32_t k = 0, ni = 0;
    pn_u128 pos = 0;
    for (;;) {
        for (; k < nev && ev[k].pos == pos; k++) {
            uint32_t r = ev[k].rule;
            if (ev[k].add)
                cur[r / 64] |= 1ull << (r % 64);
            else
                cur[r / 64] &= ~(1ull << (r % 64));
            dirty[r / (64 * PN_CHUNK_WORDS)] = 1;
        }
        if (intern_dirty(c, cs, cur, dirty, ids, sums))
            goto out;
        int64_t row = rowstore_add(&rs, ids, sums);
        if (row < 0)
            goto out;
        /* one interval per boundary, even where neighbours share a row: the
         * XDP loader maps each interval back to the longest prefix holding it */
        starts[ni] = pos;
        rowid[ni++] = (uint32_t)row;
        if (k == nev)
            break;
        pos = ev[k].pos;
    }
    f->nintervals = ni;
    if (lut) {
        uint32_t nv = (uint32_t)maxv + 1, j = 0;
        f->row_of = malloc(sizeof(uint32_t) * nv);
        if (!f->row_of)
            goto out;
        for (uint32_t v = 0; v < nv; v++) {
            while (j + 1 < ni && starts[j + 1] <= v)
                j++;
            f->row_of[v] = rowid[j];
        }
        c->memory += sizeof(uint32_t) * nv;
    } else {  /* shrink to fit; a failed shrink keeps the larger buffer */
        pn_u128 *ts = realloc(starts, sizeof(pn_u128) * ni);
        uint32_t *tr = realloc(rowid, sizeof(uint32_t) * ni);
        f->starts = ts ? ts : starts;
        f->row_of = tr ? tr : rowid;
        starts = NULL;
        rowid = NULL;
        c->memory += (sizeof(pn_u128) + sizeof(uint32_t)) * ni;
    }
    uint64_t *ts = realloc(f->sums, (size_t)f->nrows * c->nsum * 8);
    uint32_t *tk = realloc(f->chunk, (size_t)f->nrows * c->nsum * 4);
    f->sums = ts ? ts : f->sums;
    f->chunk = tk ? tk : f->chunk;
    c->memory += (size_t)f->nrows * c->nsum * 12;
    rc = 0;
out:
    free(ev);
    free(cur);
    free(dirty);
    free(ids);
    free(sums);
    free(starts);
    free(rowid);
    free(rs.slots);
    return rc;
}

/* Row (in f) of the rules that accept "no value": only those that do not
 * constrain the field at all. */
static int64_t wildcard_row(pn_classifier *c, chunkstore_t *cs, pn_field *f, const iv_t *ivs)
{
    int64_t row = -1;
    uint64_t *bits = calloc((size_t)c->nsum * PN_CHUNK_WORDS, 8);
    uint8_t *dirty = malloc(c->nsum);
    uint32_t *ids = malloc(c->nsum * sizeof(uint32_t));
    uint64_t *sums = malloc(c->nsum * 8);
    if (bits && dirty && ids && sums) {
        for (uint32_t i = 0; i < c->nrules; i++)
            if (ivs[i].kind == IV_ANY)
                bits[i / 64] |= 1ull << (i % 64);
        memset(dirty, 1, c->nsum);
        /* appended without the dedupe table: one extra row at most */
        uint32_t cap = f->nrows + 1;
        uint64_t *ns = realloc(f->sums, (size_t)cap * c->nsum * 8);
        if (ns)
            f->sums = ns;
        uint32_t *nk = ns ? realloc(f->chunk, (size_t)cap * c->nsum * 4) : NULL;
        if (nk)
            f->chunk = nk;
        if (nk && !intern_dirty(c, cs, bits, dirty, ids, sums))
            row = row_append(c, f, &cap, ids, sums);
        if (row >= 0)
            c->memory += (size_t)c->nsum * 12;
    }
    free(bits);
    free(dirty);
    free(ids);
    free(sums);
    return row;
}

int pn_classifier_build(pn_classifier *c, const struct pn_rule *rules, uint32_t n)
{
    memset(c, 0, sizeof(*c));
    c->nrules = n;
    c->nwords = n ? (n + 63) / 64 : 1;
    c->nsum = (c->nwords + 63) / 64;
    c->rule_policy = malloc(sizeof(int32_t) * (n ? n : 1));
    iv_t *ivs = malloc(sizeof(iv_t) * (n ? n : 1));
    chunkstore_t cs = { 0, NULL, 0 };
    static const uint64_t zero[PN_CHUNK_WORDS];
    if (!c->rule_policy || !ivs || chunk_intern(c, &cs, zero) != 0)  /* chunk 0: all zeros */
        goto fail;
    for (uint32_t i = 0; i < n; i++)
        c->rule_policy[i] = rules[i].policy;

    static const struct { int fid, fam, flag, is_src; } pfx[] = {
        { PN_F_SRC4, PN_FAMILY_V4, PN_RF_SRC, 1 }, { PN_F_DST4, PN_FAMILY_V4, PN_RF_DST, 0 },
        { PN_F_SRC6, PN_FAMILY_V6, PN_RF_SRC, 1 }, { PN_F_DST6, PN_FAMILY_V6, PN_RF_DST, 0 },
    };
    for (int k = 0; k < 4; k++) {
        int nbytes = pfx[k].fam == PN_FAMILY_V4 ? 4 : 16;
        for (uint32_t i = 0; i < n; i++) {
            const struct pn_rule *r = &rules[i];
            if (!(r->flags & pfx[k].flag))
                /* a rule whose other prefix pins the family cannot match this one */
                ivs[i].kind = (r->family == PN_FAMILY_ANY || r->family == pfx[k].fam) ? IV_ANY : IV_NEVER;
            else if (r->family != pfx[k].fam)
                ivs[i].kind = IV_NEVER;
            else
                ivs[i] = prefix_iv(pfx[k].is_src ? r->src : r->dst, pfx[k].is_src ? r->src_plen : r->dst_plen, nbytes);
        }
        pn_u128 maxv = nbytes == 4 ? 0xffffffffu : ~(pn_u128)0;
        if (build_field(c, &cs, &c->f[pfx[k].fid], ivs, maxv, 0))
            goto fail;
    }
    for (int k = 0; k < 2; k++) {
        int flag = k ? PN_RF_DPORT : PN_RF_SPORT;
        for (uint32_t i = 0; i < n; i++) {
            const struct pn_rule *r = &rules[i];
            if (!(r->flags & flag))
                ivs[i].kind = IV_ANY;
            else
                ivs[i] = (iv_t){ k ? r->dport_lo : r->sport_lo, k ? r->dport_hi : r->sport_hi, IV_RANGE };
        }
        pn_field *f = &c->f[k ? PN_F_DPORT : PN_F_SPORT];
        if (build_field(c, &cs, f, ivs, 65535, 1))
            goto fail;
        int64_t w = wildcard_row(c, &cs, f, ivs);
        if (w < 0)
            goto fail;
        c->noport_row[k] = (uint32_t)w;
    }
    for (uint32_t i = 0; i < n; i++)
        ivs[i] = (rules[i].flags & PN_RF_PROTO) ? (iv_t){ rules[i].proto, rules[i].proto, IV_RANGE } : (iv_t){ 0, 0, IV_ANY };
    if (build_field(c, &cs, &c->f[PN_F_PROTO], ivs, 255, 1))
        goto fail;
    for (uint32_t i = 0; i < n; i++)
        ivs[i] = (rules[i].flags & PN_RF_DSCP) ? (iv_t){ rules[i].dscp, rules[i].dscp, IV_RANGE } : (iv_t){ 0, 0, IV_ANY };
    if (build_field(c, &cs, &c->f[PN_F_DSCP], ivs, 63, 1))
        goto fail;
    free(ivs);
    free(cs.slots);
    uint64_t *tc = realloc(c->chunks, (size_t)c->nchunks * PN_CHUNK_WORDS * 8);  /* shrink to fit */
    c->chunks = tc ? tc : c->chunks;
    c->memory += sizeof(int32_t) * n + (size_t)c->nchunks * PN_CHUNK_WORDS * 8;
    return 0;
fail:
    free(ivs);
    free(cs.slots);
    pn_classifier_free(c);
    return -1;
}

void pn_classifier_free(pn_classifier *c)
{
    for (int k = 0; k < PN_NFIELDS; k++) {
        free(c->f[k].starts);
        free(c->f[k].row_of);
        free(c->f[k].sums);
        free(c->f[k].chunk);
    }
    free(c->rule_policy);
    free(c->chunks);
    memset(c, 0, sizeof(*c));
}

void pn_field_starts(const pn_field *f, uint64_t *hi, uint64_t *lo)
{
    for (uint32_t i = 0; i < f->nintervals; i++) {
        hi[i] = (uint64_t)(f->starts[i] >> 64);
        lo[i] = (uint64_t)f->starts[i];
    }
}

/* Last interval whose start <= v. starts[0] is always 0. */
static inline uint32_t find_interval(const pn_field *f, pn_u128 v)
{
    uint32_t lo = 0, hi = f->nintervals;
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (f->starts[mid] <= v)
            lo = mid;
        else
            hi = mid;
    }
    return f->row_of[lo];
}

int32_t pn_classify(const pn_classifier *c, const struct pn_parsed *p)
{
    const pn_field *fs, *fd;
    pn_u128 vs, vd;
    if (p->family == PN_FAMILY_V4) {
        fs = &c->f[PN_F_SRC4];
        fd = &c->f[PN_F_DST4];
        vs = load_be(p->src, 4);
        vd = load_be(p->dst, 4);
    } else {
        fs = &c->f[PN_F_SRC6];
        fd = &c->f[PN_F_DST6];
        vs = load_be(p->src, 16);
        vd = load_be(p->dst, 16);
    }
    const uint32_t ns = c->nsum;
    uint32_t r[6];
    r[0] = find_interval(fs, vs);
    r[1] = find_interval(fd, vd);
    r[2] = p->has_ports ? c->f[PN_F_SPORT].row_of[p->sport] : c->noport_row[0];
    r[3] = p->has_ports ? c->f[PN_F_DPORT].row_of[p->dport] : c->noport_row[1];
    r[4] = c->f[PN_F_PROTO].row_of[p->proto];
    r[5] = c->f[PN_F_DSCP].row_of[p->dscp & 63];
    const pn_field *f[6] = { fs, fd, &c->f[PN_F_SPORT], &c->f[PN_F_DPORT], &c->f[PN_F_PROTO], &c->f[PN_F_DSCP] };
    const uint64_t *s0 = f[0]->sums + (size_t)r[0] * ns, *s1 = f[1]->sums + (size_t)r[1] * ns,
                   *s2 = f[2]->sums + (size_t)r[2] * ns, *s3 = f[3]->sums + (size_t)r[3] * ns,
                   *s4 = f[4]->sums + (size_t)r[4] * ns, *s5 = f[5]->sums + (size_t)r[5] * ns;
    for (uint32_t s = 0; s < ns; s++) {
        uint64_t m = s0[s] & s1[s] & s2[s] & s3[s] & s4[s] & s5[s];
        if (!m)
            continue;
        const uint64_t *k0 = c->chunks + (size_t)f[0]->chunk[(size_t)r[0] * ns + s] * PN_CHUNK_WORDS,
                       *k1 = c->chunks + (size_t)f[1]->chunk[(size_t)r[1] * ns + s] * PN_CHUNK_WORDS,
                       *k2 = c->chunks + (size_t)f[2]->chunk[(size_t)r[2] * ns + s] * PN_CHUNK_WORDS,
                       *k3 = c->chunks + (size_t)f[3]->chunk[(size_t)r[3] * ns + s] * PN_CHUNK_WORDS,
                       *k4 = c->chunks + (size_t)f[4]->chunk[(size_t)r[4] * ns + s] * PN_CHUNK_WORDS,
                       *k5 = c->chunks + (size_t)f[5]->chunk[(size_t)r[5] * ns + s] * PN_CHUNK_WORDS;
        while (m) {
            uint32_t b = (uint32_t)__builtin_ctzll(m);
            uint64_t x = k0[b] & k1[b] & k2[b] & k3[b] & k4[b] & k5[b];
            if (x)
                return c->rule_policy[(s * 64 + b) * 64 + (uint32_t)__builtin_ctzll(x)];
            m &= m - 1;
        }
    }
    return -1;
}

static int prefix_ok(const uint8_t *net, unsigned plen, const uint8_t *addr)
{
    unsigned full = plen / 8, rem = plen % 8;
    if (memcmp(net, addr, full))
        return 0;
    return !rem || ((net[full] ^ addr[full]) & (uint8_t)(0xff << (8 - rem))) == 0;
}

int32_t pn_classify_linear(const struct pn_rule *rules, uint32_t n, const struct pn_parsed *p)
{
    for (uint32_t i = 0; i < n; i++) {
        const struct pn_rule *r = &rules[i];
        if (r->family != PN_FAMILY_ANY && r->family != p->family)
            continue;
        if ((r->flags & PN_RF_SRC) && !prefix_ok(r->src, r->src_plen, p->src))
            continue;
        if ((r->flags & PN_RF_DST) && !prefix_ok(r->dst, r->dst_plen, p->dst))
            continue;
        if ((r->flags & PN_RF_SPORT) && (!p->has_ports || p->sport < r->sport_lo || p->sport > r->sport_hi))
            continue;
        if ((r->flags & PN_RF_DPORT) && (!p->has_ports || p->dport < r->dport_lo || p->dport > r->dport_hi))
            continue;
        if ((r->flags & PN_RF_PROTO) && r->proto != p->proto)
            continue;
        if ((r->flags & PN_RF_DSCP) && r->dscp != p->dscp)
            continue;
        return r->policy;
    }
    return -1;
}
