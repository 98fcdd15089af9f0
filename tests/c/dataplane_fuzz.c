/* Fuzz harness for the userspace data plane: csrc/parse.h, classify.c,
 * sites.c and flowtable.c, built with -fsanitize=address,undefined by
 * tests/adversarial/test_sanitizers.py (`make fuzz` runs it longer).
 *
 *   dataplane_fuzz FILE|-     runs one input; exit 0 and a summary line on
 *                             stdout, or exit 1 and a message on stderr when
 *                             an invariant breaks (a sanitizer report exits
 *                             with its own code)
 *   dataplane_fuzz -v FILE|-  also prints one line per frame, "frame I RC
 *                             POLICY SITE" (RC: enum pn_reason) and, for a
 *                             parsed frame, " FAMILY PROTO SPORT DPORT DSCP
 *                             HAS_PORTS TCP_FLAGS L3_LEN SRC DST" (hex)
 *
 * Input (little-endian; any byte string is accepted: a short input is read
 * as if zero-padded, values out of range are folded into range, see
 * canon_rule and the site checks):
 *
 *   header, 32 bytes:
 *     u16 nrules, u16 nprefixes, u16 nframes, u16 capacity (flow table;
 *     0 is tried, must be refused, then 1 is used), u8 cache_log2 (folded
 *     into 1..12), u8 flags (bit 0: bump the generation half way through),
 *     u16 npolicies, u64 idle_ns, u64 active_ns (0: no timeout), u32 zero
 *   nrules x struct pn_rule (56 bytes), in priority order
 *   nprefixes x struct pn_site_prefix (24 bytes)
 *   nframes x { u64 ts_ns, u16 len, len bytes }
 *
 * Checks, per input:
 *   - pn_classifier_build / pn_sites_build succeed (pn_sites_build must
 *     refuse a table holding an invalid prefix; it is then rebuilt without)
 *   - every frame is parsed in a heap block of exactly its length, so any
 *     overread is an ASan report; parsed fields are in range
 *   - pn_classify == pn_classify_linear for every parsed frame
 *   - pn_site_of == a brute-force longest-prefix scan (later duplicate wins)
 *   - pn_dp_run over all frames at once equals a straightforward model of
 *     the flow table (LRU list, idle / active timeouts, eviction at
 *     capacity, generation bump): per-frame policy, site and path, the
 *     route index within (npolicies + 1) x (nsites + 1), the export buffer
 *     and the counters, pn_ft_snapshot after the run, pn_ft_flush after
 *     that; count <= capacity after every frame when run one frame at a time
 *     (which must give the same answers as the burst run)
 *   - pn_cache_run and pn_cache_classify (8-way cache of 2^cache_log2
 *     entries) == pn_classify_linear of each frame, twice over
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "classify.h"
#include "flowtable.h"
#include "parse.h"
#include "sites.h"

_Static_assert(sizeof(struct pn_rule) == 56, "struct pn_rule layout");
_Static_assert(sizeof(struct pn_site_prefix) == 24, "struct pn_site_prefix layout");

#define MAX_SITE 64

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("dataplane_fuzz: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* ---------------------------------------------------------------- input */

typedef struct {
    const uint8_t *p;
    size_t n, off;
} reader;

/* Copy n bytes, zero past the end of the input. */
static void take(reader *r, void *dst, size_t n)
{
    size_t have = r->off < r->n ? r->n - r->off : 0;
    size_t k = have < n ? have : n;
    memcpy(dst, r->p + r->off, k);
    memset((uint8_t *)dst + k, 0, n - k);
    r->off += n;
}

static uint64_t take_le(reader *r, int nbytes)
{
    uint8_t b[8];
    uint64_t v = 0;
    take(r, b, (size_t)nbytes);
    for (int i = nbytes - 1; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}

static int at_end(const reader *r) { return r->off >= r->n; }

static uint8_t *read_all(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    size_t cap = 1 << 16, n = 0, got;
    uint8_t *buf = xmalloc(cap);
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            buf = realloc(buf, cap *= 2);
            if (!buf)
                exit(2);
        }
    }
    if (f != stdin)
        fclose(f);
    *len = n;
    return buf;
}

/* ----------------------------------------------------- prefixes, oracles */

static void mask_host_bits(uint8_t *a, unsigned plen, unsigned nbytes)
{
    for (unsigned i = 0; i < 16; i++) {
        if (i >= nbytes) {
            a[i] = 0;
        } else if (plen <= 8 * i) {
            a[i] = 0;
        } else if (plen < 8 * (i + 1)) {
            a[i] &= (uint8_t)(0xff << (8 * (i + 1) - plen));
        }
    }
}

/* Bit by bit, unlike the byte-wise code under test. */
static int in_prefix(const uint8_t *net, unsigned plen, const uint8_t *addr)
{
    for (unsigned b = 0; b < plen; b++) {
        unsigned bit = 7 - b % 8;
        if (((net[b / 8] >> bit) & 1) != ((addr[b / 8] >> bit) & 1))
            return 0;
    }
    return 1;
}

/* A well-formed rule, as patronus.policy.compile_rules makes them: family
 * set iff a prefix is (or a family-only rule), plen within the family, host
 * bits zero, lo <= hi, dscp 6 bits, policy in [0, npolicies). */
static void canon_rule(struct pn_rule *r, uint32_t npolicies)
{
    r->flags &= 0x3f;
    if (r->flags & (PN_RF_SRC | PN_RF_DST)) {
        if (r->family != PN_FAMILY_V4 && r->family != PN_FAMILY_V6)
            r->family = (r->family & 1) ? PN_FAMILY_V6 : PN_FAMILY_V4;
    } else if (r->family != PN_FAMILY_V4 && r->family != PN_FAMILY_V6) {
        r->family = PN_FAMILY_ANY;
    }
    unsigned nbytes = r->family == PN_FAMILY_V6 ? 16 : 4, bits = 8 * nbytes;
    if (r->src_plen > bits)
        r->src_plen = (uint8_t)(r->src_plen % (bits + 1));
    if (r->dst_plen > bits)
        r->dst_plen = (uint8_t)(r->dst_plen % (bits + 1));
    if (!(r->flags & PN_RF_SRC)) {
        r->src_plen = 0;
        memset(r->src, 0, 16);
    }
    if (!(r->flags & PN_RF_DST)) {
        r->dst_plen = 0;
        memset(r->dst, 0, 16);
    }
    mask_host_bits(r->src, r->src_plen, nbytes);
    mask_host_bits(r->dst, r->dst_plen, nbytes);
    if (r->sport_lo > r->sport_hi) {
        uint16_t t = r->sport_lo;
        r->sport_lo = r->sport_hi;
        r->sport_hi = t;
    }
    if (r->dport_lo > r->dport_hi) {
        uint16_t t = r->dport_lo;
        r->dport_lo = r->dport_hi;
        r->dport_hi = t;
    }
    r->dscp &= 63;
    r->_pad = 0;
    r->policy = (int32_t)((uint32_t)r->policy % npolicies);
}

static int prefix_valid(const struct pn_site_prefix *s)
{
    return (s->family == PN_FAMILY_V4 && s->plen <= 32) || (s->family == PN_FAMILY_V6 && s->plen <= 128)
               ? s->site != PN_SITE_NONE
               : 0;
}

/* Longest prefix holding the destination; of equal prefixes the later. */
static uint32_t site_brute(const struct pn_site_prefix *pfx, uint32_t n, const struct pn_parsed *p)
{
    int best = -1;
    uint32_t site = PN_SITE_NONE;
    for (uint32_t i = 0; i < n; i++) {
        if (pfx[i].family != p->family)
            continue;
        uint8_t net[16];
        memcpy(net, pfx[i].addr, 16);
        mask_host_bits(net, pfx[i].plen, p->family == PN_FAMILY_V6 ? 16 : 4);
        if (in_prefix(net, pfx[i].plen, p->dst) && (int)pfx[i].plen >= best) {
            best = pfx[i].plen;
            site = pfx[i].site;
        }
    }
    return site;
}

static void check_parsed(size_t i, const struct pn_parsed *p, size_t len)
{
    if (p->family != PN_FAMILY_V4 && p->family != PN_FAMILY_V6)
        fail("frame %zu: parsed family %u", i, p->family);
    if (p->dscp > 63)
        fail("frame %zu: parsed dscp %u", i, p->dscp);
    if (p->has_ports > 1 || (p->has_ports && p->proto != PN_PROTO_TCP && p->proto != PN_PROTO_UDP))
        fail("frame %zu: has_ports %u with proto %u", i, p->has_ports, p->proto);
    if (!p->has_ports && (p->sport || p->dport))
        fail("frame %zu: ports %u/%u without has_ports", i, p->sport, p->dport);
    if (p->l3_len + 14 > len)
        fail("frame %zu: l3_len %u in a frame of %zu bytes", i, p->l3_len, len);
    if (p->family == PN_FAMILY_V4) {
        static const uint8_t zero[12];
        if (memcmp(p->src + 4, zero, 12) || memcmp(p->dst + 4, zero, 12))
            fail("frame %zu: IPv4 address with bytes past the fourth", i);
    }
}

/* ------------------------------------------------------ flow table model */

typedef struct {
    struct pn_flow f;
    int live;
} mflow;

typedef struct {
    uint32_t cap, count;
    mflow *v;             /* v[0] most recent .. v[count - 1] least */
    struct pn_flow *exp;  /* what pn_ft must have exported, in order */
    size_t nexp;
    uint64_t evicted, expired_idle, expired_active, hits, misses;
    int64_t idle_ns, active_ns;
} model;

static void model_export(model *m, const struct pn_flow *f) { m->exp[m->nexp++] = *f; }

static void model_remove(model *m, uint32_t at)
{
    model_export(m, &m->v[at].f);
    memmove(&m->v[at], &m->v[at + 1], sizeof(mflow) * (m->count - at - 1));
    m->count--;
}

static void model_to_front(model *m, uint32_t at)
{
    mflow t = m->v[at];
    memmove(&m->v[1], &m->v[0], sizeof(mflow) * at);
    m->v[0] = t;
}

/* One parsed frame through the model; returns the record it touched. */
static const struct pn_flow_rec *model_account(model *m, const struct pn_parsed *p, uint64_t ts, uint32_t generation,
                                               int32_t policy_now, uint32_t site_now, const uint32_t *route,
                                               uint32_t ncols)
{
    if (m->idle_ns)
        while (m->count && (int64_t)(ts - m->v[m->count - 1].f.rec.last_ns) >= m->idle_ns) {
            model_remove(m, m->count - 1);
            m->expired_idle++;
        }
    struct pn_flow_key key;
    pn_key_of(p, &key);
    uint32_t at = 0;
    while (at < m->count && memcmp(&m->v[at].f.key, &key, sizeof key))
        at++;
    struct pn_flow_rec *r;
    if (at < m->count) {
        r = &m->v[at].f.rec;
        if (m->active_ns && (int64_t)(ts - r->first_ns) >= m->active_ns) {
            model_export(m, &m->v[at].f);
            m->expired_active++;
            r->packets = r->bytes = 0;
            r->first_ns = ts;
            r->tcp_flags = 0;
        }
        if (r->generation != generation) {
            r->policy = policy_now;
            r->site = site_now;
            r->generation = generation;
            m->misses++;
        } else {
            m->hits++;
        }
        model_to_front(m, at);
    } else {
        if (m->count == m->cap) {
            model_remove(m, m->count - 1);
            m->evicted++;
        }
        memmove(&m->v[1], &m->v[0], sizeof(mflow) * m->count);
        m->count++;
        memset(&m->v[0], 0, sizeof(mflow));
        m->v[0].f.key = key;
        r = &m->v[0].f.rec;
        r->first_ns = ts;
        r->policy = policy_now;
        r->site = site_now;
        r->generation = generation;
        m->misses++;
    }
    r = &m->v[0].f.rec;
    r->packets++;
    r->bytes += p->l3_len;
    r->last_ns = ts;
    r->tcp_flags |= p->tcp_flags;
    r->dscp = p->dscp;
    r->path = route[(uint32_t)(r->policy + 1) * ncols + r->site];
    return r;
}

static void check_flow(const char *what, size_t i, const struct pn_flow *got, const struct pn_flow *want)
{
    if (memcmp(got, want, sizeof *got) == 0)
        return;
    fail("%s %zu differs: got packets %" PRIu64 " bytes %" PRIu64 " first %" PRIu64 " last %" PRIu64
         " policy %d site %u path %u gen %u proto %u; want packets %" PRIu64 " bytes %" PRIu64
         " first %" PRIu64 " last %" PRIu64 " policy %d site %u path %u gen %u proto %u",
         what, i, got->rec.packets, got->rec.bytes, got->rec.first_ns, got->rec.last_ns, got->rec.policy,
         got->rec.site, got->rec.path, got->rec.generation, got->key.proto, want->rec.packets, want->rec.bytes,
         want->rec.first_ns, want->rec.last_ns, want->rec.policy, want->rec.site, want->rec.path,
         want->rec.generation, want->key.proto);
}

/* ----------------------------------------------------------------- main */

typedef struct {
    uint8_t **data;
    size_t *len;
    uint64_t *ts;
    size_t n;
} frames;

int main(int argc, char **argv)
{
    int verbose = 0;
    if (argc == 3 && strcmp(argv[1], "-v") == 0) {
        verbose = 1;
        argv++;
        argc--;
    }
    if (argc != 2) {
        fprintf(stderr, "usage: %s [-v] FILE|-\n", argv[0]);
        return 2;
    }
    size_t inlen;
    uint8_t *in = read_all(argv[1], &inlen);
    reader rd = {in, inlen, 0};

    uint32_t nrules = (uint32_t)take_le(&rd, 2), nprefixes = (uint32_t)take_le(&rd, 2);
    uint32_t nframes = (uint32_t)take_le(&rd, 2), capacity = (uint32_t)take_le(&rd, 2);
    uint32_t cache_log2 = (uint32_t)take_le(&rd, 1), flags = (uint32_t)take_le(&rd, 1);
    uint32_t npolicies = (uint32_t)take_le(&rd, 2);
    int64_t idle_ns = (int64_t)take_le(&rd, 8), active_ns = (int64_t)take_le(&rd, 8);
    take_le(&rd, 4);
    if (npolicies == 0)
        npolicies = 1;
    cache_log2 = 1 + cache_log2 % 12;

    /* rules: exactly sized, so the classifier reading past them is caught */
    struct pn_rule *rules = xmalloc(sizeof(struct pn_rule) * nrules);
    for (uint32_t i = 0; i < nrules; i++) {
        take(&rd, &rules[i], sizeof rules[i]);
        canon_rule(&rules[i], npolicies);
    }
    pn_classifier cls;
    if (pn_classifier_build(&cls, rules, nrules))
        fail("pn_classifier_build failed on %u rules", nrules);

    /* site prefixes: as given first (an invalid one must be refused), then
     * the valid ones, site numbers folded into 1..MAX_SITE */
    struct pn_site_prefix *pfx = xmalloc(sizeof(struct pn_site_prefix) * nprefixes);
    uint32_t nvalid = 0;
    int any_invalid = 0;
    for (uint32_t i = 0; i < nprefixes; i++)
        take(&rd, &pfx[i], sizeof pfx[i]);
    pn_sites sites;
    int rc = pn_sites_build(&sites, pfx, nprefixes);
    for (uint32_t i = 0; i < nprefixes; i++) {
        if (!prefix_valid(&pfx[i])) {
            any_invalid = 1;
            continue;
        }
        pfx[nvalid] = pfx[i];
        pfx[nvalid].site = 1 + (pfx[nvalid].site - 1) % MAX_SITE;
        pfx[nvalid]._pad = 0;
        nvalid++;
    }
    if (any_invalid && rc == 0)
        fail("pn_sites_build accepted an invalid prefix");
    if (!any_invalid && rc != 0)
        fail("pn_sites_build refused %u valid prefixes", nprefixes);
    if (rc == 0)
        pn_sites_free(&sites);
    if (pn_sites_build(&sites, pfx, nvalid))
        fail("pn_sites_build refused %u valid prefixes", nvalid);
    uint32_t maxsite = 0;
    for (uint32_t i = 0; i < nvalid; i++)
        if (pfx[i].site > maxsite)
            maxsite = pfx[i].site;
    if (sites.nsites != maxsite)
        fail("nsites %u, highest site %u", sites.nsites, maxsite);
    for (int f = 0; f < 2; f++) {
        if (sites.n[f] == 0 || sites.start[f][0] != 0)
            fail("sites family %d: %u intervals, first start not 0", f, sites.n[f]);
        for (uint32_t j = 1; j < sites.n[f]; j++)
            if (sites.start[f][j] <= sites.start[f][j - 1] || sites.site[f][j] == sites.site[f][j - 1])
                fail("sites family %d: interval %u not sorted or not merged", f, j);
    }

    /* frames: each in a heap block of exactly its length */
    frames fr = {xcalloc(nframes, sizeof(uint8_t *)), xcalloc(nframes, sizeof(size_t)),
                 xcalloc(nframes, sizeof(uint64_t)), 0};
    for (uint32_t i = 0; i < nframes && !at_end(&rd); i++) {
        fr.ts[i] = take_le(&rd, 8);
        fr.len[i] = (size_t)take_le(&rd, 2);
        fr.data[i] = xmalloc(fr.len[i]);
        take(&rd, fr.data[i], fr.len[i]);
        fr.n++;
    }
    size_t n = fr.n;

    /* 1. parse, classify two ways, site two ways */
    struct pn_parsed *parsed = xcalloc(n, sizeof(struct pn_parsed));
    int *prc = xcalloc(n, sizeof(int));
    int32_t *want_policy = xcalloc(n, sizeof(int32_t));
    uint32_t *want_site = xcalloc(n, sizeof(uint32_t));
    uint64_t want_malformed[PN_NREASONS] = {0};
    size_t nparsed = 0;
    for (size_t i = 0; i < n; i++) {
        prc[i] = pn_parse(fr.data[i], fr.data[i] + fr.len[i], &parsed[i]);
        if (prc[i] < PN_OK || prc[i] >= PN_NREASONS)
            fail("frame %zu: pn_parse returned %d", i, prc[i]);
        want_policy[i] = -1;
        want_site[i] = PN_SITE_NONE;
        if (prc[i] != PN_OK) {
            want_malformed[prc[i]]++;
            continue;
        }
        nparsed++;
        check_parsed(i, &parsed[i], fr.len[i]);
        int32_t fast = pn_classify(&cls, &parsed[i]);
        want_policy[i] = pn_classify_linear(rules, nrules, &parsed[i]);
        if (fast != want_policy[i])
            fail("frame %zu: pn_classify %d, pn_classify_linear %d", i, fast, want_policy[i]);
        if (want_policy[i] < -1 || want_policy[i] >= (int32_t)npolicies)
            fail("frame %zu: policy %d of %u", i, want_policy[i], npolicies);
        uint32_t s = pn_site_of(&sites, &parsed[i]);
        want_site[i] = site_brute(pfx, nvalid, &parsed[i]);
        if (s != want_site[i])
            fail("frame %zu: pn_site_of %u, longest prefix %u", i, s, want_site[i]);
    }
    for (size_t i = 0; verbose && i < n; i++) {
        const struct pn_parsed *p = &parsed[i];
        printf("frame %zu %d %d %u", i, prc[i], want_policy[i], want_site[i]);
        if (prc[i] == PN_OK) {
            printf(" %u %u %u %u %u %u %u %u ", p->family, p->proto, p->sport, p->dport, p->dscp, p->has_ports,
                   p->tcp_flags, p->l3_len);
            for (int j = 0; j < (p->family == PN_FAMILY_V6 ? 16 : 4); j++)
                printf("%02x", p->src[j]);
            putchar(' ');
            for (int j = 0; j < (p->family == PN_FAMILY_V6 ? 16 : 4); j++)
                printf("%02x", p->dst[j]);
        }
        putchar('\n');
    }

    /* 2. the data plane, all frames in bursts (in two calls, with a
     * generation bump between them when flags bit 0 is set), against the model */
    uint32_t ncols = sites.nsites + 1;
    size_t nroutes = ((size_t)npolicies + 1) * ncols;
    uint32_t *route = xmalloc(sizeof(uint32_t) * nroutes);
    for (size_t j = 0; j < nroutes; j++)
        route[j] = (uint32_t)j; /* path = route index: checkable */

    pn_dp dp[2];
    for (int d = 0; d < 2; d++) {
        memset(&dp[d], 0, sizeof dp[d]);
        dp[d].cls = &cls;
        dp[d].sites = &sites;
        dp[d].generation = 1;
        dp[d].npolicies = npolicies;
        dp[d].ncols = ncols;
        dp[d].route = route;
        dp[d].pcount = xcalloc(npolicies + 1, sizeof(struct pn_policy_counter));
        if (capacity == 0 && pn_ft_init(&dp[d].ft, 0, idle_ns, active_ns) == 0)
            fail("pn_ft_init accepted capacity 0");
        if (pn_ft_init(&dp[d].ft, capacity ? capacity : 1, idle_ns, active_ns))
            fail("pn_ft_init(%u) failed", capacity);
    }
    uint32_t cap = dp[0].ft.capacity;
    model m = {cap, 0, xcalloc(cap, sizeof(mflow)), xcalloc(2 * n + cap, sizeof(struct pn_flow)), 0,
               0, 0, 0, 0, 0, idle_ns, active_ns};
    struct pn_policy_counter *want_pcount = xcalloc(npolicies + 1, sizeof(struct pn_policy_counter));

    int32_t *out = xmalloc(sizeof(int32_t) * n), *out1 = xmalloc(sizeof(int32_t) * n);
    uint32_t *where = xmalloc(sizeof(uint32_t) * 2 * n), *where1 = xmalloc(sizeof(uint32_t) * 2 * n);
    size_t half = (flags & 1) ? n / 2 : n;
    pn_dp_run(&dp[0], (const uint8_t *const *)fr.data, fr.len, fr.ts, out, where, half);
    if (half < n) {
        dp[0].generation++;
        pn_dp_run(&dp[0], (const uint8_t *const *)fr.data + half, fr.len + half, fr.ts + half, out + half,
                  where + 2 * half, n - half);
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t gen = i < half ? 1 : 2;
        if (prc[i] != PN_OK) {
            if (out[i] != -1 || where[2 * i] != PN_SITE_NONE || where[2 * i + 1] != PN_NO_PATH)
                fail("frame %zu (malformed %d): policy %d site %u path %u", i, prc[i], out[i], where[2 * i],
                     where[2 * i + 1]);
            continue;
        }
        const struct pn_flow_rec *r = model_account(&m, &parsed[i], fr.ts[i], gen, want_policy[i], want_site[i],
                                                    route, ncols);
        if (r->site != want_site[i])
            fail("frame %zu: model site %u, frame site %u (the site is a function of the key)", i, r->site,
                 want_site[i]);
        size_t idx = (size_t)(r->policy + 1) * ncols + r->site;
        want_pcount[r->policy + 1].packets++;
        want_pcount[r->policy + 1].bytes += parsed[i].l3_len;
        if (out[i] != r->policy || where[2 * i] != r->site || where[2 * i + 1] != r->path)
            fail("frame %zu: pn_dp_run policy %d site %u path %u, model policy %d site %u path %u", i, out[i],
                 where[2 * i], where[2 * i + 1], r->policy, r->site, r->path);
        if (where[2 * i + 1] >= nroutes || where[2 * i + 1] != idx)
            fail("frame %zu: route index %u, want %zu of %zu", i, where[2 * i + 1], idx, nroutes);
    }
    pn_flowtable *ft = &dp[0].ft;
    if (ft->count > ft->capacity || ft->count != m.count)
        fail("flow count %u, capacity %u, model %u", ft->count, ft->capacity, m.count);
    if (memcmp(dp[0].malformed, want_malformed, sizeof want_malformed))
        fail("pn_dp_run malformed counters differ");
    if (memcmp(dp[0].pcount, want_pcount, sizeof(struct pn_policy_counter) * (npolicies + 1)))
        fail("policy counters differ");
    if (ft->evicted != m.evicted || ft->expired_idle != m.expired_idle || ft->expired_active != m.expired_active ||
        dp[0].cache_hits != m.hits || dp[0].cache_misses != m.misses || ft->export_lost)
        fail("counters: evicted %" PRIu64 "/%" PRIu64 " idle %" PRIu64 "/%" PRIu64 " active %" PRIu64 "/%" PRIu64
             " hits %" PRIu64 "/%" PRIu64 " misses %" PRIu64 "/%" PRIu64 " (got/model)",
             ft->evicted, m.evicted, ft->expired_idle, m.expired_idle, ft->expired_active, m.expired_active,
             dp[0].cache_hits, m.hits, dp[0].cache_misses, m.misses);
    if (ft->exp_len != m.nexp)
        fail("export buffer %zu flows, model %zu", ft->exp_len, m.nexp);
    for (size_t j = 0; j < m.nexp; j++)
        check_flow("exported flow", j, &ft->exp[j], &m.exp[j]);
    struct pn_flow *snap = xmalloc(sizeof(struct pn_flow) * ft->count);
    size_t ns = pn_ft_snapshot(ft, snap);
    if (ns != m.count)
        fail("snapshot %zu flows, model %u", ns, m.count);
    for (size_t j = 0; j < ns; j++)
        check_flow("snapshot flow", j, &snap[j], &m.v[j].f);
    size_t exported = ft->exp_len;
    pn_ft_flush(ft);
    if (ft->count != 0 || ft->head != PN_NIL || ft->tail != PN_NIL || ft->exp_len != exported + ns)
        fail("after flush: count %u, export %zu (want %zu)", ft->count, ft->exp_len, exported + ns);
    for (size_t j = 0; j < ns; j++) /* least recent first */
        check_flow("flushed flow", j, &ft->exp[exported + j], &snap[ns - 1 - j]);

    /* 3. one frame at a time (where = NULL every other frame): same answers,
     * count <= capacity throughout */
    for (size_t i = 0; i < n; i++) {
        if (i == half)
            dp[1].generation++;
        uint32_t *w = (i & 1) ? &where1[2 * i] : NULL;
        pn_dp_run(&dp[1], (const uint8_t *const *)&fr.data[i], &fr.len[i], &fr.ts[i], &out1[i], w, 1);
        if (dp[1].ft.count > dp[1].ft.capacity)
            fail("frame %zu: flow count %u > capacity %u", i, dp[1].ft.count, dp[1].ft.capacity);
        if (out1[i] != out[i] || (w && (w[0] != where[2 * i] || w[1] != where[2 * i + 1])))
            fail("frame %zu: one at a time policy %d, in bursts %d", i, out1[i], out[i]);
    }
    if (dp[1].ft.exp_len != exported)
        fail("one at a time exported %zu flows, in bursts %zu", dp[1].ft.exp_len, exported);
    for (size_t j = 0; j < exported; j++)
        check_flow("one-at-a-time exported flow", j, &dp[1].ft.exp[j], &ft->exp[j]);

    /* 4. the classification cache, cold then warm, burst and single */
    pn_cache cache;
    if (pn_cache_init(&cache, 1u << cache_log2))
        fail("pn_cache_init failed");
    for (int pass = 0; pass < 2; pass++) {
        uint64_t mal[PN_NREASONS] = {0};
        pn_cache_run(&cache, &cls, (const uint8_t *const *)fr.data, fr.len, out1, n, mal);
        if (memcmp(mal, want_malformed, sizeof mal))
            fail("pn_cache_run pass %d: malformed counters differ", pass);
        for (size_t i = 0; i < n; i++) {
            if (out1[i] != want_policy[i])
                fail("frame %zu: pn_cache_run pass %d %d, pn_classify_linear %d", i, pass, out1[i], want_policy[i]);
            int reason = -7;
            int32_t one = pn_cache_classify(&cache, &cls, fr.data[i], fr.len[i], &reason);
            if (one != want_policy[i] || reason != prc[i])
                fail("frame %zu: pn_cache_classify %d reason %d, want %d reason %d", i, one, reason,
                     want_policy[i], prc[i]);
        }
        cache.generation++; /* what a rule table change does */
    }
    if (cache.hits + cache.misses != 4 * nparsed)
        fail("cache hits %" PRIu64 " + misses %" PRIu64 " != %zu lookups", cache.hits, cache.misses, 4 * nparsed);

    printf("ok rules %u prefixes %u frames %zu parsed %zu flows %zu exported %zu evicted %" PRIu64
           " idle %" PRIu64 " active %" PRIu64 "\n",
           nrules, nvalid, n, nparsed, ns, exported, m.evicted, m.expired_idle, m.expired_active);

    pn_cache_free(&cache);
    for (int d = 0; d < 2; d++) {
        pn_ft_free(&dp[d].ft);
        free(dp[d].pcount);
    }
    free(snap);
    free(out);
    free(out1);
    free(where);
    free(where1);
    free(want_pcount);
    free(m.v);
    free(m.exp);
    free(route);
    free(parsed);
    free(prc);
    free(want_policy);
    free(want_site);
    for (size_t i = 0; i < n; i++)
        free(fr.data[i]);
    free(fr.data);
    free(fr.len);
    free(fr.ts);
    pn_sites_free(&sites);
    free(pfx);
    pn_classifier_free(&cls);
    free(rules);
    free(in);
    return 0;
}
