/* Test harness for csrc/capture.c, built by tests/test_capture_c.py with
 * AddressSanitizer and UBSan.
 *
 *   capture_dump FILE|-            one line per packet, "ts_ns caplen wirelen
 *                                  linktype", then "status CODE NAME"
 *   capture_dump --prefixes FILE   reads every prefix of FILE and checks each
 *                                  yields a prefix of the full packet list and
 *                                  ends in END or ERR_TRUNCATED
 *   capture_dump --mutate FILE     reads FILE with every single byte replaced
 *                                  by a few values; prints status counts
 *
 * Every input is copied into a heap block of exactly its size, so any read
 * past the end (or before the start) is an ASan report, not silent slack
 * as it would be in an mmap or a larger buffer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capture.h"

#define MAX_PKTS 4096

typedef struct {
    uint64_t ts_ns;
    uint32_t caplen, wirelen, linktype;
    size_t offset; /* of data within the buffer */
} rec;

static const char *status_name(int st)
{
    switch (st) {
    case PN_CAP_OK: return "OK";
    case PN_CAP_END: return "END";
    case PN_CAP_ERR_MAGIC: return "ERR_MAGIC";
    case PN_CAP_ERR_TRUNCATED: return "ERR_TRUNCATED";
    case PN_CAP_ERR_BLOCK: return "ERR_BLOCK";
    case PN_CAP_ERR_LINKTYPE: return "ERR_LINKTYPE";
    default: return "UNKNOWN";
    }
}

static volatile unsigned sink;

/* Reads the whole capture; fills recs (up to MAX_PKTS) and returns the final
 * status. Touches every byte of every packet so ASan sees the data range. */
static int run(const uint8_t *buf, size_t len, rec *recs, size_t *npkts, int *format)
{
    pn_capture c;
    pn_cap_pkt p;
    *npkts = 0;
    *format = -1;
    int st = pn_capture_open(&c, buf, len);
    if (st != PN_CAP_OK)
        return st;
    *format = pn_capture_format(&c);
    while ((st = pn_capture_next(&c, &p)) == PN_CAP_OK) {
        if (p.data < buf || p.caplen > len || (size_t)(p.data - buf) > len - p.caplen) {
            fprintf(stderr, "packet data outside the buffer\n");
            exit(3);
        }
        unsigned s = 0;
        for (uint32_t i = 0; i < p.caplen; i++)
            s += p.data[i];
        sink += s;
        if (*npkts < MAX_PKTS)
            recs[*npkts] = (rec){p.ts_ns, p.caplen, p.wirelen, p.linktype, (size_t)(p.data - buf)};
        (*npkts)++;
    }
    /* The status must stick. */
    if (pn_capture_next(&c, &p) != st) {
        fprintf(stderr, "status not sticky\n");
        exit(3);
    }
    if (strcmp(pn_capture_strerror(st), "unknown capture status") == 0) {
        fprintf(stderr, "status %d has no message\n", st);
        exit(3);
    }
    return st;
}

static uint8_t *read_all(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *tmp = malloc(cap);
    size_t got;
    while (tmp && (got = fread(tmp + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap)
            tmp = realloc(tmp, cap *= 2);
    }
    if (!tmp) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    if (f != stdin)
        fclose(f);
    uint8_t *exact = malloc(n ? n : 1);
    if (n)
        memcpy(exact, tmp, n);
    free(tmp);
    *len = n;
    return exact;
}

static uint8_t *copy_exact(const uint8_t *src, size_t n)
{
    /* malloc(0) may return NULL; one byte of slack-free space is fine since
     * the reader is told the length is 0. */
    uint8_t *p = malloc(n ? n : 1);
    if (!p)
        exit(2);
    if (n)
        memcpy(p, src, n);
    return p;
}

static rec full[MAX_PKTS], part[MAX_PKTS];

static int prefixes(const uint8_t *buf, size_t len)
{
    size_t nfull, npart, last = 0;
    int fmt;
    run(buf, len, full, &nfull, &fmt);
    for (size_t l = 0; l <= len; l++) {
        uint8_t *cut = copy_exact(buf, l);
        int st = run(cut, l, part, &npart, &fmt);
        free(cut);
        if (st != PN_CAP_END && st != PN_CAP_ERR_TRUNCATED) {
            printf("prefix %zu: status %s\n", l, status_name(st));
            return 1;
        }
        if (npart > nfull || npart < last || npart > MAX_PKTS) {
            printf("prefix %zu: %zu packets (full %zu, previous %zu)\n", l, npart, nfull, last);
            return 1;
        }
        for (size_t i = 0; i < npart; i++)
            if (memcmp(&part[i], &full[i], sizeof part[i]) != 0) {
                printf("prefix %zu: packet %zu differs\n", l, i);
                return 1;
            }
        last = npart;
    }
    printf("prefixes ok %zu\n", len + 1);
    return 0;
}

static int mutate(const uint8_t *buf, size_t len)
{
    size_t counts[8] = {0}, n;
    int fmt;
    for (size_t i = 0; i < len; i++) {
        uint8_t vals[] = {0x00, 0xff, (uint8_t)(buf[i] ^ 0x01), (uint8_t)(buf[i] ^ 0x80),
                          (uint8_t)(buf[i] + 4), (uint8_t)(buf[i] - 4)};
        for (size_t v = 0; v < sizeof vals; v++) {
            uint8_t *m = copy_exact(buf, len);
            m[i] = vals[v];
            int st = run(m, len, part, &n, &fmt);
            free(m);
            counts[st + 4 >= 0 && st + 4 < 8 ? st + 4 : 7]++;
        }
    }
    printf("mutate");
    for (int st = -4; st <= 1; st++)
        printf(" %s=%zu", status_name(st), counts[st + 4]);
    printf(" other=%zu\n", counts[7]);
    return counts[4] || counts[7]; /* OK and unknown are never final statuses */
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--prefixes") == 0) {
        size_t len;
        uint8_t *buf = read_all(argv[2], &len);
        int rc = prefixes(buf, len);
        free(buf);
        return rc;
    }
    if (argc == 3 && strcmp(argv[1], "--mutate") == 0) {
        size_t len;
        uint8_t *buf = read_all(argv[2], &len);
        int rc = mutate(buf, len);
        free(buf);
        return rc;
    }
    if (argc != 2) {
        fprintf(stderr, "usage: %s [--prefixes|--mutate] FILE|-\n", argv[0]);
        return 2;
    }
    size_t len, npkts;
    int fmt;
    uint8_t *buf = read_all(argv[1], &len);
    static rec recs[MAX_PKTS];
    int st = run(buf, len, recs, &npkts, &fmt);
    if (fmt >= 0)
        printf("format %d\n", fmt);
    for (size_t i = 0; i < npkts && i < MAX_PKTS; i++)
        printf("%llu %u %u %u\n", (unsigned long long)recs[i].ts_ns, recs[i].caplen,
               recs[i].wirelen, recs[i].linktype);
    if (npkts > MAX_PKTS)
        printf("... %zu packets\n", npkts);
    printf("status %d %s\n", st, status_name(st));
    free(buf);
    return 0;
}
