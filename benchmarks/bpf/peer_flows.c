/* The XDP peer of patronus's data plane in benchmarks/test_bench_peers_xdp.py:
 * a plain eBPF flow tracker, the program a user would write (or take from
 * the Kubernetes network-observability agent) to count flows without
 * classifying them. It parses Ethernet (up to two VLAN tags), IPv4/IPv6 and
 * TCP/UDP to the 5-tuple with patronus's own parser (csrc/parse.h: the same
 * parsing work, so the comparison is of what comes after it), keeps one
 * record {packets, bytes, first_ns, last_ns} per 5-tuple in a kernel hash
 * map, and passes every frame. No classification, no path, no metadata.
 *
 * The key is struct pn_flow_key (csrc/patronus_abi.h, 40 bytes): the same
 * key patronus's flow table holds, so both programs hash and compare the
 * same bytes and the benchmark can compare their tables key for key. Bytes
 * are L3 bytes (IP header on), as patronus counts them.
 *
 * Compile-time choices (benchmarks/peers_xdp.py passes them to BCC):
 *   PEER_MAP      1: BPF_MAP_TYPE_LRU_HASH, one shared record per flow,
 *                    counted with atomic adds (any CPU may see the flow);
 *                    a full map evicts the least recently used flow.
 *                 2: BPF_MAP_TYPE_PERCPU_HASH: one record per flow per CPU,
 *                    plain adds, no eviction (a full map refuses the new
 *                    flow, counted in peer_stats_map). This is the NetObserv
 *                    agent's design (bpf/README.md there, "Flows v2":
 *                    per-CPU hash map, userspace evicts; a full map sends
 *                    the flow to userspace instead).
 *                 3: BPF_MAP_TYPE_LRU_PERCPU_HASH (per-CPU records and LRU
 *                    eviction; not in the default comparison).
 *   PEER_ENTRIES  max_entries: the flow capacity, the same number of flows
 *                 as patronus's flow_capacity for the compared size.
 *   PEER_NEW_FLOWS  benchmark builds: every run of a frame is a new flow, as
 *                 patronus's PN_BENCH_NEW_FLOWS does it (the source port, or
 *                 without ports the low half of the source address, takes
 *                 the next value of a per-CPU counter, incremented first).
 *   PEER_KTIME    stamp with bpf_ktime_get_ns() (NetObserv's clock) instead
 *                 of bpf_ktime_get_coarse_ns() (the default: tick
 *                 resolution, as patronus's jiffies clock has).
 */
#include <uapi/linux/bpf.h>

#include "patronus_abi.h"
#include "parse.h"

#ifndef PEER_MAP
#define PEER_MAP 1
#endif
#ifndef PEER_ENTRIES
#define PEER_ENTRIES 65536
#endif

struct peer_rec {
    __u64 packets;
    __u64 bytes;             /* L3 bytes */
    __u64 first_ns;
    __u64 last_ns;
};

#if PEER_MAP == 1
BPF_TABLE("lru_hash", struct pn_flow_key, struct peer_rec, peer_flows_map, PEER_ENTRIES);
#elif PEER_MAP == 2
BPF_TABLE("percpu_hash", struct pn_flow_key, struct peer_rec, peer_flows_map, PEER_ENTRIES);
#elif PEER_MAP == 3
BPF_TABLE("lru_percpu_hash", struct pn_flow_key, struct peer_rec, peer_flows_map, PEER_ENTRIES);
#else
#error "PEER_MAP is 1 (lru_hash), 2 (percpu_hash) or 3 (lru_percpu_hash)"
#endif

/* key: 0 malformed frames, 1 new flows the map refused (full), per CPU.
 * Off the hot path: a hit touches neither. */
BPF_PERCPU_ARRAY(peer_stats_map, __u64, 2);

#ifdef PEER_NEW_FLOWS
/* key: 0 -> the source port of the next run (patronus: pn_scratch.bench_seq) */
BPF_PERCPU_ARRAY(peer_seq_map, __u32, 1);
#endif

static __always_inline void peer_stat(__u32 k)
{
    __u64 *c = peer_stats_map.lookup(&k);
    if (c)
        *c += 1;
}

static __always_inline __u64 peer_now(void)
{
#ifdef PEER_KTIME
    return bpf_ktime_get_ns();
#else
    return bpf_ktime_get_coarse_ns();
#endif
}

/* Count one packet on a record found by lookup. */
static __always_inline void peer_count(struct peer_rec *r, __u32 len, __u64 now)
{
#if PEER_MAP == 1
    /* one record for every CPU: locked adds */
    __sync_fetch_and_add(&r->packets, 1);
    __sync_fetch_and_add(&r->bytes, len);
#else
    /* this CPU's record: plain adds; its first packet on this CPU stamps it */
    if (r->packets == 0)
        r->first_ns = now;
    r->packets += 1;
    r->bytes += len;
#endif
    r->last_ns = now;
}

int peer_flows(struct xdp_md *ctx)
{
    const __u8 *data = (const __u8 *)(long)ctx->data;
    const __u8 *end = (const __u8 *)(long)ctx->data_end;
    struct pn_parsed p __attribute__((aligned(8)));
    __builtin_memset(&p, 0, sizeof(p));
    if (pn_parse(data, end, &p) != PN_OK) {
        peer_stat(0);
        return XDP_PASS;
    }
#ifdef PEER_NEW_FLOWS
    __u32 zero = 0;
    __u32 *seq = peer_seq_map.lookup(&zero);
    if (seq) {
        if (p.has_ports)
            p.sport = (__u16)++*seq;
        else
            *(__u16 *)(p.src + 2) ^= (__u16)++*seq;
    }
#endif
    struct pn_flow_key key __attribute__((aligned(8)));
    pn_key_of(&p, &key);
    __u64 now = peer_now();
    struct peer_rec *r = peer_flows_map.lookup(&key);
    if (r) {
        peer_count(r, p.l3_len, now);
        return XDP_PASS;
    }
    struct peer_rec n = {.packets = 1, .bytes = p.l3_len, .first_ns = now, .last_ns = now};
    if (peer_flows_map.insert(&key, &n) != 0) {
        /* another CPU created it meanwhile (count on its record), or a
         * per-CPU hash map is full (refused: counted) */
        r = peer_flows_map.lookup(&key);
        if (r)
            peer_count(r, p.l3_len, now);
        else
            peer_stat(1);
    }
    return XDP_PASS;
}
