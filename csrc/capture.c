/* pcap / pcapng reader; see capture.h for the contract.
 *
 * Formats: classic pcap (https://datatracker.ietf.org/doc/draft-ietf-opsawg-pcap/)
 * and pcapng (https://datatracker.ietf.org/doc/draft-ietf-opsawg-pcapng/).
 *
 * Every multi-byte field is read through rd16/rd32/rd64 with the byte order
 * of the file (pcap) or of the current section (pcapng), so the reader does
 * not depend on the host's byte order or on alignment.
 *
 * Bounds discipline: offsets are compared as `need > room` with room =
 * len - pos (never `pos + need > len`, which could wrap), and a length read
 * from the file is only used after it has been checked against the bytes
 * that are actually there.
 */
#include "capture.h"

#define PCAP_MAGIC_US 0xa1b2c3d4u
#define PCAP_MAGIC_NS 0xa1b23c4du
#define PCAP_HDR_LEN 24u
#define PCAP_REC_LEN 16u

/* The SHB block type reads the same in both byte orders on purpose: it is
 * what lets a reader find a section before knowing its byte order. */
#define NG_SHB 0x0a0d0d0au
#define NG_BYTE_ORDER_MAGIC 0x1a2b3c4du
#define NG_IDB 1u
#define NG_PB 2u  /* obsolete Packet Block, still written by old tools */
#define NG_SPB 3u
#define NG_EPB 6u
#define NG_MIN_BLOCK 12u /* type + total length + trailing total length */

#define NG_OPT_ENDOFOPT 0u
#define NG_OPT_IF_TSRESOL 9u
#define NG_OPT_IF_TSOFFSET 14u
#define NG_DEFAULT_TSRESOL 6u /* microseconds when an IDB has no if_tsresol */

#define NS_PER_S 1000000000u

/* Internal: a pcapng block was consumed but carried no packet. */
#define NG_NO_PACKET 2

static uint16_t rd16(const uint8_t *p, int be)
{
    return be ? (uint16_t)(p[0] << 8 | p[1]) : (uint16_t)(p[1] << 8 | p[0]);
}

static uint32_t rd32(const uint8_t *p, int be)
{
    if (be)
        return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

static uint64_t rd64(const uint8_t *p, int be)
{
    uint64_t a = rd32(p, be), b = rd32(p + 4, be);
    return be ? a << 32 | b : b << 32 | a;
}

/* Saturating arithmetic: a timestamp beyond year 2554 is nonsense anyway,
 * and pinning it at the maximum keeps it monotone instead of wrapping to a
 * small, plausible-looking value. */
static uint64_t mul_sat(uint64_t a, uint64_t b)
{
    return (b && a > UINT64_MAX / b) ? UINT64_MAX : a * b;
}

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static const uint64_t POW10[20] = {
    1u, 10u, 100u, 1000u, 10000u, 100000u, 1000000u, 10000000u, 100000000u,
    1000000000u, 10000000000u, 100000000000u, 1000000000000u, 10000000000000u,
    100000000000000u, 1000000000000000u, 10000000000000000u,
    100000000000000000u, 1000000000000000000u, 10000000000000000000u,
};

/* floor(a * b / 2^shift) for 1 <= shift, when the result fits in 64 bits.
 * The product needs up to 96 bits; it is formed as a hi:lo pair from two
 * 32x32->64 partial products because C11 has no portable 128-bit type. */
static uint64_t mul_shr(uint64_t a, uint32_t b, unsigned shift)
{
    uint64_t p0 = (a & 0xffffffffu) * b;
    uint64_t p1 = (a >> 32) * b;
    uint64_t lo = p0 + (p1 << 32);
    uint64_t hi = (p1 >> 32) + (lo < p0);
    if (shift >= 128)
        return 0;
    if (shift >= 64)
        return hi >> (shift - 64);
    return lo >> shift | hi << (64 - shift);
}

/* Converts a pcapng timestamp in units of if_tsresol to nanoseconds,
 * rounding down. Exact whenever the unit is a whole number of nanoseconds
 * (10^-0 .. 10^-9, 2^0). */
static uint64_t units_to_ns(uint64_t units, uint8_t tsresol)
{
    unsigned exp = tsresol & 0x7fu;
    if (!(tsresol & 0x80u)) {
        if (exp <= 9)
            return mul_sat(units, POW10[9 - exp]);
        if (exp - 9 >= 20) /* 10^20 exceeds any 64-bit count */
            return 0;
        return units / POW10[exp - 9];
    }
    if (exp == 0)
        return mul_sat(units, NS_PER_S);
    /* Whole seconds and the binary fraction separately, so the fraction's
     * product with 10^9 cannot overflow and nothing is lost to rounding. */
    uint64_t secs = exp >= 64 ? 0 : units >> exp;
    uint64_t frac = exp >= 64 ? units : units & ((UINT64_C(1) << exp) - 1);
    return add_sat(mul_sat(secs, NS_PER_S), mul_shr(frac, NS_PER_S, exp));
}

static uint64_t apply_offset(uint64_t ns, int64_t offset_s)
{
    if (offset_s >= 0)
        return add_sat(ns, mul_sat((uint64_t)offset_s, NS_PER_S));
    /* 0 - (uint64_t)x is |x| for every negative x, INT64_MIN included. */
    uint64_t back = mul_sat(UINT64_C(0) - (uint64_t)offset_s, NS_PER_S);
    return ns > back ? ns - back : 0;
}

static int fail(pn_capture *c, int status)
{
    c->status = status;
    return status;
}

/* ---- classic pcap -------------------------------------------------------- */

static int pcap_open(pn_capture *c, uint32_t magic_le)
{
    /* Seen in the file's own order the magic is always a1b2..; seen little-
     * endian it tells us whether the writer was little-endian. */
    int swapped = magic_le != PCAP_MAGIC_US && magic_le != PCAP_MAGIC_NS;
    uint32_t magic = swapped ? rd32(c->buf, 1) : magic_le;
    c->format = PN_CAP_FORMAT_PCAP;
    c->big_endian = swapped;
    c->pcap_frac_ns = magic == PCAP_MAGIC_NS ? 1u : 1000u;
    if (c->len < PCAP_HDR_LEN)
        return fail(c, PN_CAP_ERR_TRUNCATED);
    /* Only the low 16 bits are the link type; the top bits of this field
     * now carry FCS-length information that must not leak into it. */
    c->pcap_linktype = rd32(c->buf + 20, swapped) & 0xffffu;
    c->pos = PCAP_HDR_LEN;
    return PN_CAP_OK;
}

static int pcap_next(pn_capture *c, pn_cap_pkt *out)
{
    size_t room = c->len - c->pos;
    if (room == 0)
        return PN_CAP_END;
    if (room < PCAP_REC_LEN)
        return PN_CAP_ERR_TRUNCATED;
    const uint8_t *h = c->buf + c->pos;
    int be = c->big_endian;
    uint32_t caplen = rd32(h + 8, be);
    if (caplen > room - PCAP_REC_LEN)
        return PN_CAP_ERR_TRUNCATED;
    uint64_t secs = rd32(h, be), frac = rd32(h + 4, be);
    /* secs < 2^32 and frac < 2^32 keep this far below 2^64: no saturation. */
    out->ts_ns = secs * NS_PER_S + frac * c->pcap_frac_ns;
    out->caplen = caplen;
    out->wirelen = rd32(h + 12, be);
    out->linktype = c->pcap_linktype;
    out->data = h + PCAP_REC_LEN;
    c->pos += PCAP_REC_LEN + (size_t)caplen;
    return PN_CAP_OK;
}

/* ---- pcapng -------------------------------------------------------------- */

static int ng_shb(pn_capture *c, const uint8_t *body, size_t n)
{
    /* byte-order magic, major, minor, 64-bit section length */
    if (n < 16)
        return PN_CAP_ERR_BLOCK;
    /* A different major version means a layout we do not know. */
    if (rd16(body + 4, c->big_endian) != 1)
        return PN_CAP_ERR_BLOCK;
    /* Interface ids are numbered from zero again in every section. */
    c->nifaces = 0;
    return NG_NO_PACKET;
}

static int ng_idb(pn_capture *c, const uint8_t *body, size_t n)
{
    int be = c->big_endian;
    if (n < 8) /* linktype, reserved, snaplen */
        return PN_CAP_ERR_BLOCK;
    if (c->nifaces >= PN_CAP_MAX_IFACES)
        return PN_CAP_ERR_BLOCK;
    pn_cap_iface ifc = {.linktype = rd16(body, be), .tsresol = NG_DEFAULT_TSRESOL};
    const uint8_t *p = body + 8;
    n -= 8;
    while (n >= 4) {
        uint16_t code = rd16(p, be), olen = rd16(p + 2, be);
        if (code == NG_OPT_ENDOFOPT)
            break;
        size_t padded = ((size_t)olen + 3u) & ~(size_t)3u;
        if (padded > n - 4)
            return PN_CAP_ERR_BLOCK;
        /* A mis-sized timing option would silently skew every timestamp of
         * the interface, so it is an error rather than ignored. */
        if (code == NG_OPT_IF_TSRESOL) {
            if (olen != 1)
                return PN_CAP_ERR_BLOCK;
            ifc.tsresol = p[4];
        } else if (code == NG_OPT_IF_TSOFFSET) {
            if (olen != 8)
                return PN_CAP_ERR_BLOCK;
            ifc.tsoffset = (int64_t)rd64(p + 4, be);
        }
        p += 4 + padded;
        n -= 4 + padded;
    }
    c->ifaces[c->nifaces++] = ifc;
    return NG_NO_PACKET;
}

/* EPB and the obsolete PB share their layout once past the interface id
 * (and the PB's drop count): ts high, ts low, captured length, original
 * length, data, options. `body` starts at ts high. */
static int ng_packet(pn_capture *c, uint32_t ifid, const uint8_t *body, size_t n,
                     pn_cap_pkt *out)
{
    int be = c->big_endian;
    if (n < 16)
        return PN_CAP_ERR_BLOCK;
    if (ifid >= c->nifaces)
        return PN_CAP_ERR_BLOCK;
    uint32_t caplen = rd32(body + 8, be);
    if (caplen > n - 16)
        return PN_CAP_ERR_BLOCK;
    const pn_cap_iface *ifc = &c->ifaces[ifid];
    uint64_t units = (uint64_t)rd32(body, be) << 32 | rd32(body + 4, be);
    out->ts_ns = apply_offset(units_to_ns(units, ifc->tsresol), ifc->tsoffset);
    out->caplen = caplen;
    out->wirelen = rd32(body + 12, be);
    out->linktype = ifc->linktype;
    out->data = body + 16;
    return PN_CAP_OK;
}

static int ng_spb(pn_capture *c, const uint8_t *body, size_t n, pn_cap_pkt *out)
{
    if (n < 4)
        return PN_CAP_ERR_BLOCK;
    /* An SPB belongs to interface 0 by definition. */
    if (c->nifaces == 0)
        return PN_CAP_ERR_BLOCK;
    uint32_t wirelen = rd32(body, c->big_endian);
    /* An SPB has no captured-length field: what is there is the packet, up
     * to its original length (the rest is padding). */
    size_t room = n - 4;
    out->caplen = wirelen < room ? wirelen : (uint32_t)room;
    out->wirelen = wirelen;
    out->ts_ns = 0; /* SPBs carry no timestamp */
    out->linktype = c->ifaces[0].linktype;
    out->data = body + 4;
    return PN_CAP_OK;
}

/* Consumes one block. Returns PN_CAP_OK with *out filled for a packet,
 * NG_NO_PACKET for any other block, or END / an error. */
static int ng_block(pn_capture *c, pn_cap_pkt *out)
{
    size_t room = c->len - c->pos;
    if (room == 0)
        return PN_CAP_END;
    if (room < NG_MIN_BLOCK)
        return PN_CAP_ERR_TRUNCATED;
    const uint8_t *b = c->buf + c->pos;
    uint32_t type = rd32(b, c->big_endian);
    if (type == NG_SHB) {
        /* Each section states its own byte order; its length field must be
         * read in that order, so settle the order first. */
        if (rd32(b + 8, 0) == NG_BYTE_ORDER_MAGIC)
            c->big_endian = 0;
        else if (rd32(b + 8, 1) == NG_BYTE_ORDER_MAGIC)
            c->big_endian = 1;
        else
            return PN_CAP_ERR_BLOCK;
    }
    int be = c->big_endian;
    uint32_t blen = rd32(b + 4, be);
    if (blen < NG_MIN_BLOCK || blen % 4u)
        return PN_CAP_ERR_BLOCK;
    if (blen > room)
        return PN_CAP_ERR_TRUNCATED;
    /* The trailing copy of the length is what catches a corrupted length
     * that still happens to land inside the file. */
    if (rd32(b + blen - 4, be) != blen)
        return PN_CAP_ERR_BLOCK;
    const uint8_t *body = b + 8;
    size_t n = blen - NG_MIN_BLOCK;
    c->pos += blen;
    switch (type) {
    case NG_SHB:
        return ng_shb(c, body, n);
    case NG_IDB:
        return ng_idb(c, body, n);
    case NG_EPB:
        return n < 4 ? PN_CAP_ERR_BLOCK : ng_packet(c, rd32(body, be), body + 4, n - 4, out);
    case NG_PB: /* 16-bit interface id, then a 16-bit drop count */
        return n < 4 ? PN_CAP_ERR_BLOCK : ng_packet(c, rd16(body, be), body + 4, n - 4, out);
    case NG_SPB:
        return ng_spb(c, body, n, out);
    default:
        /* Name resolution, statistics, decryption secrets, custom and
         * future block types carry no packets for us. */
        return NG_NO_PACKET;
    }
}

static int pcapng_next(pn_capture *c, pn_cap_pkt *out)
{
    int st;
    while ((st = ng_block(c, out)) == NG_NO_PACKET)
        ;
    return st;
}

/* ---- public API ---------------------------------------------------------- */

/* 1 when the first n (< 4) bytes could still begin one of the magics, so a
 * file that short is reported as truncated rather than as foreign. */
static int magic_prefix(const uint8_t *buf, size_t n)
{
    static const uint8_t magics[][4] = {
        {0xd4, 0xc3, 0xb2, 0xa1}, {0xa1, 0xb2, 0xc3, 0xd4},
        {0x4d, 0x3c, 0xb2, 0xa1}, {0xa1, 0xb2, 0x3c, 0x4d},
        {0x0a, 0x0d, 0x0d, 0x0a},
    };
    for (size_t m = 0; m < sizeof magics / sizeof magics[0]; m++) {
        size_t i = 0;
        while (i < n && buf[i] == magics[m][i])
            i++;
        if (i == n)
            return 1;
    }
    return 0;
}

int pn_capture_open(pn_capture *c, const uint8_t *buf, size_t len)
{
    *c = (pn_capture){.buf = buf, .len = len, .status = PN_CAP_OK};
    if (len < 4)
        return fail(c, magic_prefix(buf, len) ? PN_CAP_ERR_TRUNCATED : PN_CAP_ERR_MAGIC);
    uint32_t magic = rd32(buf, 0);
    if (magic == PCAP_MAGIC_US || magic == PCAP_MAGIC_NS
        || rd32(buf, 1) == PCAP_MAGIC_US || rd32(buf, 1) == PCAP_MAGIC_NS)
        return pcap_open(c, magic);
    if (magic != NG_SHB)
        return fail(c, PN_CAP_ERR_MAGIC);
    c->format = PN_CAP_FORMAT_PCAPNG;
    if (len < NG_MIN_BLOCK)
        return fail(c, PN_CAP_ERR_TRUNCATED);
    /* Without a byte-order magic where it belongs this is not pcapng at
     * all; deeper in the file the same defect is a bad block instead. */
    if (rd32(buf + 8, 0) != NG_BYTE_ORDER_MAGIC && rd32(buf + 8, 1) != NG_BYTE_ORDER_MAGIC)
        return fail(c, PN_CAP_ERR_MAGIC);
    /* Read the first SHB now so a broken header fails here, not on the
     * first packet. It is an SHB, so it cannot yield a packet. */
    pn_cap_pkt unused;
    int st = ng_block(c, &unused);
    if (st != NG_NO_PACKET)
        return fail(c, st == PN_CAP_END ? PN_CAP_ERR_TRUNCATED : st);
    return PN_CAP_OK;
}

/* How far ahead of the read position the file is prefetched. Each record's
 * offset depends on the one before it, so without this every record header
 * is a cache miss the reader waits for in turn (on a file of 580-byte
 * frames, 100 ns a packet: more than classifying and accounting it); the
 * hardware prefetcher does not follow the chain across pages. */
#define PN_CAP_AHEAD 4096

int pn_capture_next(pn_capture *c, pn_cap_pkt *out)
{
    if (c->status != PN_CAP_OK)
        return c->status;
    size_t want = c->pos + PN_CAP_AHEAD < c->len ? c->pos + PN_CAP_AHEAD : c->len;
    if (c->ahead < c->pos)
        c->ahead = c->pos;
    for (; c->ahead < want; c->ahead += 64)
        __builtin_prefetch(c->buf + c->ahead);
    int st = c->format == PN_CAP_FORMAT_PCAPNG ? pcapng_next(c, out) : pcap_next(c, out);
    if (st != PN_CAP_OK)
        c->status = st;
    return st;
}

int pn_capture_format(const pn_capture *c)
{
    return c->format;
}

const char *pn_capture_strerror(int status)
{
    switch (status) {
    case PN_CAP_OK:
        return "ok";
    case PN_CAP_END:
        return "end of capture";
    case PN_CAP_ERR_MAGIC:
        return "not a pcap or pcapng file";
    case PN_CAP_ERR_TRUNCATED:
        return "capture file truncated";
    case PN_CAP_ERR_BLOCK:
        return "malformed record or block";
    case PN_CAP_ERR_LINKTYPE:
        return "unsupported link type";
    default:
        return "unknown capture status";
    }
}
