/* patronus de-duplication, the far end of hitless voice: attached at clsact
 * ingress of every tunnel interface of a site (TUN devices: the packet starts
 * at its IP header; offsets are taken from the network header, so an
 * Ethernet device works too), it drops the second copy of a packet that a duplicating
 * policy sent over two paths, before it reaches the LAN.
 *
 * A packet's digest covers what the copies share and nothing the paths
 * change: addresses, protocol, IPv4 identification or IPv6 flow label,
 * length, and the first 16 bytes of the transport header and payload (ports,
 * checksum, an RTP sequence number and timestamp). The first copy records
 * (time, tunnel); a copy with the same digest arriving on another tunnel
 * within the window is dropped and counted. The same digest on the same
 * tunnel is the application sending the same bytes twice: it passes (only
 * copies made by duplication travel different tunnels). The table is an LRU
 * hash of bounded size: under a packet rate that turns it over within the
 * window, the oldest first copies are forgotten and their late twins pass
 * (counted as late: a second copy that found no first).
 *
 * -D PN_DD_ENTRIES: digests kept.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>

struct pn_dd_val {
    __u64 ts;
    __u32 ifindex;
    __u32 _pad;
};
BPF_TABLE("lru_hash", __u64, struct pn_dd_val, pn_dd_map, PN_DD_ENTRIES);
/* 0: the window in ns */
BPF_ARRAY(pn_dd_cfg, __u64, 1);
/* per CPU: 0 first copies recorded, 1 duplicates dropped, 2 copies past the
 * window (passed), 3 same digest on the same tunnel (passed), 4 not IP or
 * too short to digest (passed) */
BPF_PERCPU_ARRAY(pn_dd_stats, __u64, 5);

static __always_inline void pn_dd_count(__u32 k)
{
    __u64 *c = pn_dd_stats.lookup(&k);
    if (c)
        *c += 1;
}

static __always_inline __u64 pn_mix(__u64 h, __u64 v)
{
    h ^= v;
    h *= 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 29);
}

int pn_dedup(struct __sk_buff *skb)
{
    __u8 b[56];
    __u64 h = 0x2545F4914F6CDD1DULL;
    __u32 l4;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        if (bpf_skb_load_bytes_relative(skb, 0, b, 20, BPF_HDR_START_NET) < 0) {
            pn_dd_count(4);
            return TC_ACT_OK;
        }
        l4 = (b[0] & 0x0f) * 4;
        /* addresses, protocol, identification, total length */
        h = pn_mix(h, *(__u32 *)(b + 12));
        h = pn_mix(h, *(__u32 *)(b + 16));
        h = pn_mix(h, ((__u64)b[9] << 48) | ((__u64)*(__u16 *)(b + 4) << 16) | *(__u16 *)(b + 2));
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        if (bpf_skb_load_bytes_relative(skb, 0, b, 40, BPF_HDR_START_NET) < 0) {
            pn_dd_count(4);
            return TC_ACT_OK;
        }
        l4 = 40;
        /* flow label, payload length, next header, addresses */
        h = pn_mix(h, *(__u64 *)(b + 0));
        for (int i = 8; i < 40; i += 8)
            h = pn_mix(h, *(__u64 *)(b + i));
    } else {
        pn_dd_count(4);
        return TC_ACT_OK;
    }
    if (l4 < 20 || l4 > 60 || bpf_skb_load_bytes_relative(skb, l4, b, 16, BPF_HDR_START_NET) < 0) {
        pn_dd_count(4);
        return TC_ACT_OK;
    }
    h = pn_mix(h, *(__u64 *)(b + 0));
    h = pn_mix(h, *(__u64 *)(b + 8));

    __u32 zero = 0;
    __u64 *win = pn_dd_cfg.lookup(&zero);
    __u64 window = win ? *win : 0;
    __u64 now = bpf_ktime_get_ns();
    struct pn_dd_val *v = pn_dd_map.lookup(&h);
    if (!v) {
        /* the first copy, unless the other one is being recorded on another
         * CPU at this instant: insert only where nothing is (BPF_NOEXIST),
         * and when that loses, judge against what the winner wrote */
        struct pn_dd_val nv = {now, skb->ifindex, 0};
        if (pn_dd_map.insert(&h, &nv) == 0) {
            pn_dd_count(0);
            return TC_ACT_OK;
        }
        v = pn_dd_map.lookup(&h);
    }
    if (v) {
        if (v->ifindex != skb->ifindex) {
            /* signed: the other copy may have been stamped on another CPU a
             * moment after this one read the clock */
            if ((__s64)(now - v->ts) <= (__s64)window) {
                pn_dd_map.delete(&h);   /* a third copy is not expected: free the room */
                pn_dd_count(1);
                return TC_ACT_SHOT;
            }
            pn_dd_count(2);
        } else {
            pn_dd_count(3);
        }
        /* in place: an update would take a new LRU node for every packet */
        v->ts = now;
        v->ifindex = skb->ifindex;
        return TC_ACT_OK;
    }
    pn_dd_count(0);   /* recorded and gone again at once (evicted): pass */
    return TC_ACT_OK;
}
