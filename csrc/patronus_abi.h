/* patronus ABI: the one definition of every struct and constant shared by the
 * userspace data plane (csrc/ + patronus/_fast.pyx), the XDP programs (bpf/)
 * and the numpy dtypes (patronus/abi.py, checked against this file by
 * tests/test_abi.py). Change a layout here and only here; bump
 * PN_ABI_VERSION when you do.
 *
 * All multi-byte fields are host byte order except addresses, which keep
 * network order (as on the wire) so prefix compares are byte compares.
 */
#ifndef PATRONUS_ABI_H
#define PATRONUS_ABI_H

#include <linux/types.h>

#define PN_ABI_VERSION 2

/* address families as stored in pn_flow_key.family and pn_rule.family */
#define PN_FAMILY_ANY 0
#define PN_FAMILY_V4 4
#define PN_FAMILY_V6 6

/* protocol numbers the parser and classifier know by name */
#define PN_PROTO_ICMP 1
#define PN_PROTO_TCP 6
#define PN_PROTO_UDP 17
#define PN_PROTO_ICMPV6 58

/* parser limits */
#define PN_MAX_VLAN_TAGS 2
#define PN_MAX_IPV6_EXT 8

/* Why a frame was not classified. Index into the malformed counters;
 * PN_OK is not a counter. Keep patronus/abi.py MALFORMED_REASONS in order. */
enum pn_reason {
    PN_OK = 0,
    PN_ERR_TRUNC_L2 = 1,     /* shorter than Ethernet header or a VLAN tag */
    PN_ERR_NOT_IP = 2,       /* ethertype is neither IPv4 nor IPv6 (after tags) */
    PN_ERR_TRUNC_IP = 3,     /* shorter than the fixed IPv4 (20) / IPv6 (40) header */
    PN_ERR_BAD_VERSION = 4,  /* IP version nibble disagrees with the ethertype */
    PN_ERR_BAD_IHL = 5,      /* IPv4 IHL < 5 */
    PN_ERR_BAD_LEN = 6,      /* total/payload length beyond the frame, or < IHL */
    PN_ERR_TRUNC_EXT = 7,    /* IPv6 extension header cut short */
    PN_ERR_TRUNC_L4 = 8,     /* TCP (20) / UDP (8) header cut short */
    PN_NREASONS = 9,
};

/* Parsed packet: what classification and accounting need. */
struct pn_parsed {
    __u8 src[16];            /* IPv4 in the first 4 bytes, rest zero */
    __u8 dst[16];
    __u16 sport;             /* 0 when has_ports == 0 */
    __u16 dport;
    __u8 proto;              /* upper-layer protocol (after IPv6 ext headers) */
    __u8 family;             /* PN_FAMILY_V4 / PN_FAMILY_V6 */
    __u8 dscp;               /* 0-63 */
    __u8 has_ports;          /* TCP/UDP and not a non-first fragment */
    __u8 tcp_flags;
    __u8 _pad[3];
    __u32 l3_len;            /* IPv4 total length / 40 + IPv6 payload length */
};

/* Flow key: one row of the flow table. 40 bytes, no implicit padding. */
struct pn_flow_key {
    __u8 src[16];
    __u8 dst[16];
    __u16 sport;             /* 0 for packets without ports */
    __u16 dport;
    __u8 proto;
    __u8 family;
    __u16 _pad;
};

/* Flow record: counters of one flow. 56 bytes, no implicit padding. */
struct pn_flow_rec {
    __u64 packets;
    __u64 bytes;             /* L3 bytes (IP header included, L2 excluded) */
    __u64 first_ns;
    __u64 last_ns;
    __s32 policy;            /* index into PolicyTable.policies, -1 = default */
    __u32 path;              /* path slot the policy pointed at (last packet) */
    __u8 tcp_flags;          /* OR of every packet's TCP flags */
    __u8 dscp;               /* DSCP of the last packet */
    __u16 _pad;
    __u32 generation;        /* rule table generation `policy` and `site` were computed in */
    __u32 site;              /* destination site (PolicyTable.sites, from 1), PN_SITE_NONE: outside every site */
    __u32 _pad2;
};

/* What flows() returns, row by row: key then record. 96 bytes. */
struct pn_flow {
    struct pn_flow_key key;
    struct pn_flow_rec rec;
};

/* Rule flags: which Match fields a compiled rule sets. */
#define PN_RF_SRC   0x01
#define PN_RF_DST   0x02
#define PN_RF_SPORT 0x04
#define PN_RF_DPORT 0x08
#define PN_RF_PROTO 0x10
#define PN_RF_DSCP  0x20

/* One compiled policy. A rule table is an array of these sorted by priority
 * (lowest first); bit i of every classifier bitmap stands for rule i. */
struct pn_rule {
    __u8 src[16];            /* network order, host bits zero */
    __u8 dst[16];
    __u8 src_plen;
    __u8 dst_plen;
    __u8 family;             /* PN_FAMILY_ANY when neither src nor dst is set */
    __u8 proto;
    __u16 sport_lo, sport_hi;   /* inclusive */
    __u16 dport_lo, dport_hi;
    __u8 dscp;
    __u8 flags;              /* PN_RF_* */
    __u16 _pad;
    __s32 policy;            /* index into PolicyTable.policies */
    __u32 priority;
};

/* Per-policy counters; slot 0 counts the default (-1), slot i+1 policy i. */
struct pn_policy_counter {
    __u64 packets;
    __u64 bytes;
};

#define PN_NO_PATH 0xffffffffu

/* Destination sites. A packet's destination site is the site whose subnet
 * holds its destination address (longest prefix); sites are numbered from 1
 * in PolicyTable.sites order and 0 stands for "outside every site" (the
 * internet, or a network no site announces). The path of a packet is looked
 * up by (class, site): class 0 is the default (no policy), class i + 1 is
 * policy i, so route[class * nsites_cols + site] with nsites_cols = sites + 1.
 * Moving one class to another path for one site is one write of that entry. */
#define PN_SITE_NONE 0

/* One subnet of a site, as the data planes load them: the userspace plane
 * builds sorted intervals from these, the XDP program an LPM trie. */
struct pn_site_prefix {
    __u8 addr[16];           /* network order, host bits zero; IPv4 in the first 4 bytes */
    __u8 plen;
    __u8 family;             /* PN_FAMILY_V4 / PN_FAMILY_V6 */
    __u16 _pad;
    __u32 site;              /* 1.. */
};

/* What a (class, site) pair does: the path slot its packets take
 * (PN_NO_PATH: the local routing table decides) and the XDP verdict
 * (XDP_PASS, or XDP_DROP for a policy whose action is drop). One value, so
 * a packet reads both with one lookup and a move is one map write. */
struct pn_route {
    __u32 path;
    __u32 action;
};

/* One policy's policer in the XDP program (key policy + 1): GCRA, the
 * virtual-scheduling form of a token bucket. A packet of L bytes costs
 * L * ps_per_byte / 1000 ns of the policy's rate; it passes when the
 * theoretical arrival time `tat`, moved by its cost, stays within
 * `burst_ns` of now (then `tat` moves, by compare-and-swap: one word, no
 * lock), else it is dropped and counted. ps_per_byte 0: no limit. */
struct pn_rate {
    __u64 tat;
    __u64 ps_per_byte;
    __u64 burst_ns;
    __u64 _pad;
};

/* What the XDP program leaves in front of a frame (XDP metadata): the tc
 * program copies `path` into skb->mark; test runs read all three back. */
struct pn_meta {
    __u32 path;
    __s32 policy;
    __u32 site;
};

/* The XDP flow table (bpf/patronus_xdp.c) is an array of struct pn_bucket
 * that userspace maps and reads in place. The 64-bit word at PN_SLOT_WORD
 * of a slot (ports, proto, family, _pad of the key) is its state: 0 = empty
 * (a live key always has a family), _pad == PN_SLOT_BUSY = being written or
 * read out by its owner (claimed with a compare-and-swap), _pad == 0 = live.
 * A flow lives in one of the PN_SLOT_PROBE slots of the PN_PROBE_BUCKETS
 * buckets from its home bucket, pn_flow_hash(key) modulo the bucket count. */
#define PN_SLOT_WORD 32
#define PN_SLOT_BUSY 0xb5b5
#define PN_BUCKET_SLOTS 4
#define PN_PROBE_BUCKETS 8
#define PN_SLOT_PROBE (PN_BUCKET_SLOTS * PN_PROBE_BUCKETS)

/* One slot: a flow, plus what CPUs other than its creator counted. The CPU
 * that created the flow (rec._pad = its number + 1) adds to rec.packets and
 * rec.bytes with plain adds: XDP never runs twice at once on one CPU, so a
 * hit needs no locked instruction. Any other CPU adds to shared_* with
 * atomics. Readers report the sums (and rec._pad as 0), so the exported
 * record is a plain struct pn_flow. The counts are only meaningful summed
 * (wrapping): whoever takes a flow out (an eviction, a drain) claims the
 * slot, reads rec.* and exchanges shared_* for -rec.*, leaving the sum at
 * 0; a new flow leaves rec.* alone (its last creator may still be
 * finishing a plain add, which then counts for the new flow instead of
 * vanishing) and adds its first packet to shared_*. */
struct pn_xslot {
    struct pn_flow f;
    __u64 shared_packets;
    __u64 shared_bytes;
};

/* One bucket: its slots, and `passed`, the number of live flows whose home
 * bucket is this one or an earlier one of their window but which live in a
 * later bucket. A lookup that misses in a bucket whose `passed` is 0 stops
 * there: a new flow usually costs one bucket, not the whole window. Whoever
 * places a flow k buckets past its home adds 1 to those k buckets' counts
 * (atomically, before publishing it); whoever removes it subtracts. */
struct pn_bucket {
    __u32 passed;
    /* tag[j]: pn_flow_tag() of the key slot j holds or last held. A lookup
     * compares a slot's key only where the tag matches, so a miss reads the
     * bucket's first cache line instead of every slot's key (6 of the 8
     * lines a bucket spans). Written by whoever claims the slot, before the
     * key is published; a stale tag on an empty slot costs one compare. */
    __u8 tag[PN_BUCKET_SLOTS];
    struct pn_xslot s[PN_BUCKET_SLOTS];
    __u64 _align[7];
};

/* Flow table readers (csrc/xdptable.c) take flows out of the XDP table in
 * one of these modes. */
enum pn_take_mode {
    PN_TAKE_COPY = 0,        /* copy live flows, leave them */
    PN_TAKE_ALL = 1,         /* copy and remove every live flow */
    PN_TAKE_IDLE = 2,        /* copy and remove flows with last_ns + idle_ns <= now_ns */
};

/* ---- the XDP program's maps that userspace writes or reads (bpf/patronus_xdp.c;
 * patronus/dataplane/xdp.py). Sizes that depend on the compiled capacities
 * (PN_NSUM, PN_RULES) are given by those -D constants. ---- */

/* pn_cfg_map[0]: the one value userspace rewrites to swap tables, set the
 * clock and turn metadata on. */
struct pn_cfg {
    __u32 set;                /* live table set, 0 or 1 */
    __u32 generation;         /* bumped on every swap */
    /* "now" in CLOCK_MONOTONIC ns is jiffies * tick_ns + clock_base: the
     * verifier inlines bpf_jiffies64() as one load, where the coarse clock
     * is a helper call (about 3 ns a packet). The loader measures tick_ns
     * and clock_base (pn_clock). Replaying a capture: tick_ns 0 and
     * clock_base the packet's time. */
    __u64 clock_base;
    __u32 tick_ns;
    __u32 flags;              /* PN_CFG_* */
};

/* write struct pn_meta in front of every frame (steering, test runs); off,
 * it saves the bpf_xdp_adjust_meta call on every packet */
#define PN_CFG_META 1

/* pn_stats_map: per-CPU event counters, by index. Keep
 * patronus/abi.py STATS in this order. */
enum pn_stat {
    PN_ST_NEW = 0,            /* flows inserted */
    PN_ST_HIT = 1,            /* not counted: packets - the other three (saves a write per hit) */
    PN_ST_RECLASS = 2,        /* known flow re-classified after a table swap */
    PN_ST_INSERT_FAILED = 3,  /* lost a slot race: packet counted, no record */
    PN_ST_EVICTED = 4,        /* live flows pushed out to make room */
    PN_ST_EXPORT_LOST = 5,    /* evicted records the ring buffer had no room for */
    PN_ST_UNACCOUNTED = 6,    /* passed without a policy count: a tail call failed */
    PN_ST_CLASS_HIT = 7,      /* misses the classifier cache answered (pn_ccache_map) */
    PN_NSTATS = 8,
};

/* Prefix fields: the rules matching an address are the wildcard rules plus
 * those whose prefix contains it, and that set is fixed by the longest such
 * prefix. So every distinct prefix maps to the row of "inside this prefix
 * and no longer one" (plus a /0 entry for "inside none").
 *
 * IPv4: a 16-8-8 multibit table, three array reads at most and no loop.
 * pn_v4l1_map[(set * PN_V4_DIRS + dir) * 65536 + (addr >> 16)] is a row, or
 * PN_V4_CHUNK | c: then chunk c of the set (pn_v4chunk_map[set *
 * PN_V4CHUNKS + c]) holds the entry for the next 8 bits, again a row or a
 * chunk for the last 8. Direction 2 is not a field: its entries are
 * destination sites (0 outside every site), the same walk. */
#define PN_V4_CHUNK 0x80000000u
#define PN_V4_DIRS 3              /* source, destination, destination site */
#define PN_V4_L1 65536            /* level-1 entries per direction */
struct pn_v4chunk {
    __u32 e[256];
};

/* IPv6 prefixes: an LPM trie whose key leads with `tag` = set * 2 + (0
 * source, 1 destination), so both sets and both directions share one trie;
 * prefixlen counts its 8 bits. The destination-site trie uses the same key
 * with tag = set * 2 + 1. */
#define PN_LPM6_TAG_BITS 8
struct pn_lpm6 {
    __u32 prefixlen;
    __u8 tag;
    __u8 addr[16];
    __u8 _pad[3];
};

/* pn_lut_map[set]: direct lookups for the small fields. Row numbers include
 * each field's base in the set's row map. */
struct pn_lut {
    __u32 proto[256];
    __u32 dscp[64];
    __u32 noport[2];          /* sport, dport row of packets without ports */
};

/* Ports: pn_port_map[(set * 2 + (0 sport, 1 dport)) * PN_PORTS + port] -> row */
#define PN_PORTS 65536

/* A classifier row: bit i of the bitmap says whether rule i can match the
 * field value the row stands for; summary bit j says whether bitmap word j
 * is non-zero. The bitmap is stored as PN_NSUM chunks of PN_CHUNK_WORDS
 * words (one per summary word), deduplicated across all rows of a table set
 * (pn_chunks_map): rows differ from each other in few chunks (a prefix's
 * own rules), so at 65,536 rules the 869 MB of dense rows of the benchmark
 * table are 65 MB of chunks. */
#define PN_CHUNK_WORDS 64
#define PN_RULES_PER_SUM (PN_CHUNK_WORDS * 64)
struct pn_chunk {
    __u64 w[PN_CHUNK_WORDS];
};
#ifdef PN_NSUM
struct pn_row {
    __u64 sum[PN_NSUM];
    __u32 chunk[PN_NSUM];     /* chunk of bitmap words 64 * j .. 64 * j + 63 */
};
#endif
#ifdef PN_RULES
/* pn_rpol_map[set]: rule (priority order) -> policy index; PN_RULES is a power of two */
struct pn_rpol {
    __s32 policy[PN_RULES];
};
#endif

/* pn_tx_map: path slot -> ifindex to redirect to (a devmap of this size) */
#define PN_TX_SLOTS 256

#ifndef PN_INLINE
#define PN_INLINE static inline __attribute__((always_inline))
#endif

/* The flow table's hash of a key given as its five 64-bit words (struct
 * pn_flow_key, _pad zero); the same in the program and in userspace. */
PN_INLINE __u32 pn_flow_hash(const __u64 *w)
{
    __u64 h = (w[0] * 0x9e3779b97f4a7c15ull) ^ (w[1] * 0xc2b2ae3d27d4eb4full) ^
              (w[2] * 0x165667b19e3779f9ull) ^ (w[3] * 0xd6e8feb86659fd93ull) ^ (w[4] * 0xff51afd7ed558ccdull);
    h ^= h >> 31;
    h *= 0x94d049bb133111ebull;
    return (__u32)(h >> 32);
}

/* A flow's one-byte tag (struct pn_bucket.tag) from its hash: the top byte,
 * which the bucket index (the low bits) does not use below 2^24 buckets. */
PN_INLINE __u8 pn_flow_tag(__u32 h)
{
    return (__u8)(h >> 24);
}

#endif /* PATRONUS_ABI_H */
