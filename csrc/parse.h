/* Packet parser shared by the userspace data plane and the XDP program.
 *
 * Written against a (cursor, end) pointer pair with a bounds check before
 * every read, the way the BPF verifier wants it, so the same code is
 * correct in both places. Semantics (docs/ARCHITECTURE.md, "Matching"):
 * Ethernet II with up to two 802.1Q/802.1ad tags; IPv4 with options;
 * IPv6 with a walk over at most PN_MAX_IPV6_EXT extension headers; ports
 * for TCP/UDP unless the packet is a non-first fragment. Bytes past the IP
 * packet's own length (Ethernet padding) are ignored.
 */
#ifndef PATRONUS_PARSE_H
#define PATRONUS_PARSE_H

#include "patronus_abi.h"

#ifndef PN_INLINE
#define PN_INLINE static inline __attribute__((always_inline))
#endif

#define PN_RD16(p) ((__u16)(((__u16)(p)[0] << 8) | (p)[1]))

/* Copy n (4 or 16) address bytes from the packet into an 8-byte aligned
 * field of *o. In BPF, clang turns a byte loop or a memcpy from a packet
 * into byte loads and stores, and the 64-bit loads that hash the key later
 * then stall on store forwarding; word loads (the verifier allows unaligned
 * packet reads where the CPU does) and 64-bit stores avoid both. Userspace
 * compilers make a memcpy one move. */
#ifdef __BPF__
#define PN_COPY_ADDR4(dst, src) (*(__u64 *)(dst) = *(const __u32 *)(src))
#define PN_COPY_ADDR16(dst, src)                                   \
    do {                                                           \
        ((__u64 *)(dst))[0] = *(const __u64 *)(src);               \
        ((__u64 *)(dst))[1] = *(const __u64 *)((src) + 8);         \
    } while (0)
#else
#define PN_COPY_ADDR4(dst, src) __builtin_memcpy((dst), (src), 4)
#define PN_COPY_ADDR16(dst, src) __builtin_memcpy((dst), (src), 16)
#endif

/* `lim` is where the IP packet ends (its own length); `end` where the buffer
 * ends. lim <= end always, but the BPF verifier only trusts compares against
 * the buffer end, so reads are checked against both. */
PN_INLINE int pn_parse_l4(const __u8 *p, const __u8 *lim, const __u8 *end, int nonfirst, struct pn_parsed *o)
{
    if (nonfirst)
        return PN_OK;
    /* the whole fixed header must be there, not just the ports; each branch
     * reads only what its own check covers (the verifier follows branches) */
    if (o->proto == PN_PROTO_TCP) {
        if (p + 20 > lim || p + 20 > end)
            return PN_ERR_TRUNC_L4;
        o->sport = PN_RD16(p);
        o->dport = PN_RD16(p + 2);
        o->tcp_flags = p[13];
        o->has_ports = 1;
    } else if (o->proto == PN_PROTO_UDP) {
        if (p + 8 > lim || p + 8 > end)
            return PN_ERR_TRUNC_L4;
        o->sport = PN_RD16(p);
        o->dport = PN_RD16(p + 2);
        o->has_ports = 1;
    }
    return PN_OK;
}

/* `wend`: where the frame ended on the wire. It is `end` except for a frame a
 * capture's snap length cut short: its IP length is checked against the
 * wire, so the packet counts whole (as nfpcapd counts it), while every read
 * still stops at `end` (a header the cut took is a truncation). */
PN_INLINE int pn_parse_ipv4(const __u8 *p, const __u8 *end, const __u8 *wend, struct pn_parsed *o)
{
    if (p + 20 > end)
        return PN_ERR_TRUNC_IP;
    if ((p[0] >> 4) != 4)
        return PN_ERR_BAD_VERSION;
    __u32 ihl = (__u32)(p[0] & 0x0f) * 4;
    if (ihl < 20)
        return PN_ERR_BAD_IHL;
    __u32 tot = PN_RD16(p + 2);
    if (tot < ihl || p + tot > wend)
        return PN_ERR_BAD_LEN;
    o->family = PN_FAMILY_V4;
    o->dscp = p[1] >> 2;
    o->proto = p[9];
    o->l3_len = tot;
    PN_COPY_ADDR4(o->src, p + 12);
    PN_COPY_ADDR4(o->dst, p + 16);
    int nonfirst = (PN_RD16(p + 6) & 0x1fff) != 0;
    return pn_parse_l4(p + ihl, p + tot, end, nonfirst, o);
}

PN_INLINE int pn_parse_ipv6(const __u8 *p, const __u8 *end, const __u8 *wend, struct pn_parsed *o)
{
    if (p + 40 > end)
        return PN_ERR_TRUNC_IP;
    if ((p[0] >> 4) != 6)
        return PN_ERR_BAD_VERSION;
    __u32 plen = PN_RD16(p + 4);
    const __u8 *l3end = p + 40 + plen;
    if (l3end > wend)
        return PN_ERR_BAD_LEN;
    o->family = PN_FAMILY_V6;
    o->dscp = (__u8)((((p[0] & 0x0f) << 4) | (p[1] >> 4)) >> 2);
    o->l3_len = 40 + plen;
    PN_COPY_ADDR16(o->src, p + 8);
    PN_COPY_ADDR16(o->dst, p + 24);
    __u8 nh = p[6];
    const __u8 *q = p + 40;
    int nonfirst = 0;
    for (int i = 0; i < PN_MAX_IPV6_EXT; i++) {
        if (nh == 44) { /* fragment: fixed 8 bytes */
            if (q + 8 > l3end || q + 8 > end)
                return PN_ERR_TRUNC_EXT;
            nh = q[0];
            nonfirst = (PN_RD16(q + 2) >> 3) != 0;
            q += 8;
            if (nonfirst) /* what follows is fragment data, not headers */
                break;
        } else if (nh == 0 || nh == 43 || nh == 60) {
            if (q + 2 > l3end || q + 2 > end)
                return PN_ERR_TRUNC_EXT;
            __u32 hlen = ((__u32)q[1] + 1) * 8;
            if (q + hlen > l3end)
                return PN_ERR_TRUNC_EXT;
            nh = q[0];
            q += hlen;
        } else {
            break;
        }
    }
    o->proto = nh;
    return pn_parse_l4(q, l3end, end, nonfirst, o);
}

/* Parse one frame of which [data, end) was captured and [data, wend) was on
 * the wire (wend >= end) into *o (which the caller has zeroed). PN_OK or a
 * reason. */
PN_INLINE int pn_parse_wire(const __u8 *data, const __u8 *end, const __u8 *wend, struct pn_parsed *o)
{
    const __u8 *p = data;
    if (p + 14 > end)
        return PN_ERR_TRUNC_L2;
    __u16 et = PN_RD16(p + 12);
    p += 14;
    for (int i = 0; i < PN_MAX_VLAN_TAGS; i++) {
        if (et != 0x8100 && et != 0x88a8)
            break;
        if (p + 4 > end)
            return PN_ERR_TRUNC_L2;
        et = PN_RD16(p + 2);
        p += 4;
    }
    if (et == 0x0800)
        return pn_parse_ipv4(p, end, wend, o);
    if (et == 0x86dd)
        return pn_parse_ipv6(p, end, wend, o);
    return PN_ERR_NOT_IP;
}

/* Parse one whole frame [data, end) into *o (zeroed). PN_OK or a reason. */
PN_INLINE int pn_parse(const __u8 *data, const __u8 *end, struct pn_parsed *o)
{
    return pn_parse_wire(data, end, end, o);
}

/* The flow key of a parsed packet (ports 0 when it has none). */
PN_INLINE void pn_key_of(const struct pn_parsed *p, struct pn_flow_key *k)
{
    __builtin_memcpy(k->src, p->src, 16);
    __builtin_memcpy(k->dst, p->dst, 16);
    k->sport = p->sport;
    k->dport = p->dport;
    k->proto = p->proto;
    k->family = p->family;
    k->_pad = 0;
}

#endif /* PATRONUS_PARSE_H */
