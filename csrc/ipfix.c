/* IPFIX (RFC 7011) data messages from flow records: see ipfix.h. */
#define _GNU_SOURCE
#include "ipfix.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

static inline uint8_t *put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return p + 2;
}

static inline uint8_t *put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}

static inline uint8_t *put64(uint8_t *p, uint64_t v)
{
    p = put32(p, (uint32_t)(v >> 32));
    return put32(p, (uint32_t)v);
}

/* One record in template order (patronus/ipfix.py, _FIELDS). */
static uint8_t *record(uint8_t *p, const struct pn_flow *f, int family, uint8_t reason, int64_t offset_ns)
{
    const struct pn_flow_key *k = &f->key;
    const struct pn_flow_rec *r = &f->rec;
    size_t a = family == 4 ? 4 : 16;
    memcpy(p, k->src, a);
    p += a;
    memcpy(p, k->dst, a);
    p += a;
    p = put16(p, k->sport);
    p = put16(p, k->dport);
    *p++ = k->proto;
    *p++ = (uint8_t)((r->dscp & 0x3F) << 2);     /* ipClassOfService */
    *p++ = r->dscp & 0x3F;                       /* ipDiffServCodePoint */
    *p++ = r->tcp_flags;
    p = put64(p, r->bytes);
    p = put64(p, r->packets);
    p = put64(p, (uint64_t)(((int64_t)r->first_ns + offset_ns) / 1000000));
    p = put64(p, (uint64_t)(((int64_t)r->last_ns + offset_ns) / 1000000));
    *p++ = reason;
    p = put32(p, r->policy < 0 ? 0xFFFFFFFFu : (uint32_t)r->policy);
    p = put32(p, r->path);
    return put32(p, r->site);
}

/* Write the headers of a message of `count` records at `msg`. */
static void head(uint8_t *msg, size_t count, size_t rsize, uint32_t export_time, uint32_t seq, uint32_t domain,
                 uint16_t template_id)
{
    uint8_t *h = put16(msg, 10);
    h = put16(h, (uint16_t)(PN_IPFIX_HEAD + count * rsize));
    h = put32(h, export_time);
    h = put32(h, seq);
    h = put32(h, domain);
    h = put16(h, template_id);
    put16(h, (uint16_t)(4 + count * rsize));
}

size_t pn_ipfix_encode(uint8_t *out, uint32_t *lens, const struct pn_flow *flows, size_t n, int family,
                       const uint8_t *reasons, uint8_t reason, int64_t offset_ns, uint16_t template_id,
                       uint32_t export_time, uint32_t seq0, uint32_t domain, size_t per, size_t *records)
{
    size_t rsize = family == 4 ? PN_IPFIX_REC_V4 : PN_IPFIX_REC_V6;
    size_t msgs = 0, in_msg = 0, total = 0;
    uint8_t *msg = out, *p = out + PN_IPFIX_HEAD;
    for (size_t i = 0; i < n; i++) {
        if (flows[i].key.family != family)
            continue;
        p = record(p, &flows[i], family, reasons ? reasons[i] : reason, offset_ns);
        total++;
        if (++in_msg == per) {
            head(msg, in_msg, rsize, export_time, seq0 + (uint32_t)(total - in_msg), domain, template_id);
            lens[msgs++] = (uint32_t)(PN_IPFIX_HEAD + in_msg * rsize);
            msg = p;
            p = msg + PN_IPFIX_HEAD;
            in_msg = 0;
        }
    }
    if (in_msg) {
        head(msg, in_msg, rsize, export_time, seq0 + (uint32_t)(total - in_msg), domain, template_id);
        lens[msgs++] = (uint32_t)(PN_IPFIX_HEAD + in_msg * rsize);
    }
    *records = total;
    return msgs;
}

#define BATCH 256
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103          /* <linux/udp.h>: generic segmentation offload for UDP */
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define GSO_MAX_SEGS 64          /* the kernel's UDP_MAX_SEGMENTS */
#define GSO_MAX_BYTES 65000      /* under the 65,507 bytes of one UDP datagram */

/* Equal-length messages back to back go out as one UDP GSO send each
 * (UDP_SEGMENT: the kernel cuts them into datagrams of that length, one
 * pass through the stack for up to 64): several in one sendmmsg. A kernel
 * without it (EIO, EINVAL, ENOPROTOOPT) gets them one datagram each. */
size_t pn_ipfix_send(int fd, const uint8_t *buf, const uint32_t *lens, size_t count, size_t *errors,
                     int *last_errno)
{
    struct mmsghdr hdr[BATCH];
    struct iovec iov[BATCH];
    size_t segs[BATCH];
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } ctl[BATCH];
    static int gso = 1;          /* cleared for good once the kernel refuses it */
    size_t sent = 0, i = 0, off = 0;
    *errors = 0;
    while (i < count) {
        size_t b = 0, o = off, j = i;
        memset(hdr, 0, sizeof(hdr));
        while (b < BATCH && j < count) {
            size_t n = 1, len = lens[j];
            while (gso && j + n < count && n < GSO_MAX_SEGS && lens[j + n] == len && (n + 1) * len <= GSO_MAX_BYTES)
                n++;
            iov[b].iov_base = (void *)(buf + o);
            iov[b].iov_len = n * len;
            hdr[b].msg_hdr.msg_iov = &iov[b];
            hdr[b].msg_hdr.msg_iovlen = 1;
            if (n > 1) {
                struct cmsghdr *c;
                hdr[b].msg_hdr.msg_control = ctl[b].buf;
                hdr[b].msg_hdr.msg_controllen = sizeof(ctl[b].buf);
                c = CMSG_FIRSTHDR(&hdr[b].msg_hdr);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                *(uint16_t *)(void *)CMSG_DATA(c) = (uint16_t)len;
            }
            segs[b++] = n;
            o += n * len;
            j += n;
        }
        int r = sendmmsg(fd, hdr, (unsigned)b, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (segs[0] > 1 && (errno == EIO || errno == EINVAL || errno == ENOPROTOOPT)) {
                gso = 0;         /* no UDP GSO here: the same messages again, one datagram each */
                continue;
            }
            *last_errno = errno; /* the first entry was refused: count its messages, go past them */
            *errors += segs[0];
            for (size_t k = 0; k < segs[0]; k++)
                off += lens[i + k];
            i += segs[0];
            continue;
        }
        for (int k = 0; k < r; k++) {
            for (size_t m = 0; m < segs[k]; m++)
                off += lens[i + m];
            i += segs[k];
            sent += segs[k];
        }
    }
    return sent;
}
