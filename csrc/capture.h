/* Reader for capture files: classic pcap and pcapng, either byte order.
 *
 * The caller hands over the whole file as one buffer (normally an mmap) and
 * gets packets that point into it, so reading allocates nothing and copies
 * nothing. Every length in the file is checked against the buffer before it
 * is used: a hostile or damaged file yields an error status, never a read
 * outside [buf, buf + len).
 *
 * Plain C11 plus libc headers only; the state is a plain struct so it can be
 * embedded by value (e.g. in a Cython cdef class) and needs no cleanup.
 */
#ifndef PATRONUS_CAPTURE_H
#define PATRONUS_CAPTURE_H

#include <stddef.h>
#include <stdint.h>

enum pn_cap_status {
    PN_CAP_OK = 0,
    PN_CAP_END = 1,              /* clean end of file */
    PN_CAP_ERR_MAGIC = -1,       /* neither a pcap nor a pcapng file */
    PN_CAP_ERR_TRUNCATED = -2,   /* file ends inside a header or record */
    PN_CAP_ERR_BLOCK = -3,       /* a record or pcapng block is inconsistent */
    PN_CAP_ERR_LINKTYPE = -4,    /* reserved for callers rejecting a linktype;
                                    the reader itself never returns it */
};

#define PN_CAP_FORMAT_PCAP 0
#define PN_CAP_FORMAT_PCAPNG 1

/* pcapng interfaces remembered per section; a section declaring more is
 * rejected with PN_CAP_ERR_BLOCK rather than silently mis-attributed. */
#define PN_CAP_MAX_IFACES 64

typedef struct {
    const uint8_t *data;   /* points into the caller's buffer */
    uint32_t caplen, wirelen;
    uint64_t ts_ns;        /* capture timestamp, nanoseconds since the epoch */
    uint32_t linktype;     /* LINKTYPE_* of this packet's interface (1 = Ethernet) */
} pn_cap_pkt;

typedef struct {
    uint32_t linktype;
    uint8_t tsresol;       /* raw if_tsresol byte: bit 7 = power of 2, low bits = exponent */
    uint8_t _pad[3];
    int64_t tsoffset;      /* if_tsoffset, seconds added to every timestamp */
} pn_cap_iface;

typedef struct pn_capture {
    const uint8_t *buf;
    size_t len;
    size_t pos;            /* offset of the next record / block */
    size_t ahead;          /* bytes up to here have been prefetched */
    int format;            /* PN_CAP_FORMAT_* */
    int status;            /* PN_CAP_OK while reading, else returned forever after */
    int big_endian;        /* byte order of the file (pcap) or current section (pcapng) */
    /* classic pcap */
    uint32_t pcap_linktype;
    uint32_t pcap_frac_ns; /* nanoseconds per unit of the fraction field: 1000 or 1 */
    /* pcapng: interfaces of the current section, indexed by interface id */
    uint32_t nifaces;
    pn_cap_iface ifaces[PN_CAP_MAX_IFACES];
} pn_capture;

/* buf holds the whole file (the caller mmaps it). Returns PN_CAP_OK or an error. */
int pn_capture_open(pn_capture *c, const uint8_t *buf, size_t len);

/* Next packet: PN_CAP_OK with *out filled, PN_CAP_END at a clean end, or a
 * negative error (a truncated last record gives PN_CAP_ERR_TRUNCATED; the
 * caller keeps every packet read before it). Once END or an error has been
 * returned, every later call returns the same status. */
int pn_capture_next(pn_capture *c, pn_cap_pkt *out);

/* 0 = pcap, 1 = pcapng (valid after open) */
int pn_capture_format(const pn_capture *c);

/* Static, human-readable description of a status code. */
const char *pn_capture_strerror(int status);

#endif /* PATRONUS_CAPTURE_H */
