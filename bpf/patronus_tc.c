/* patronus steering, tc half: copy the path the XDP program chose (the
 * struct pn_meta of patronus_abi.h it wrote in front of the frame) into skb->mark, so that
 * `ip rule fwmark` sends the packet into that path's routing table and
 * tunnel. Attached at clsact ingress of the same interface as pn_xdp,
 * direct action; packets without metadata pass untouched.
 *
 * It also applies the policy's QoS marking: the DSCP of the policy
 * (pn_dscp_map) is written into the IPv4 TOS (checksum updated with
 * bpf_l3_csum_replace) or the IPv6 traffic class. Untagged frames only.
 *
 * Duplication: a policy that sends a copy of each packet over a second
 * path (pn_dup_map) gets it cloned here, to that path's tunnel.
 *
 * -D PN_MARK_BASE: mark = PN_MARK_BASE + path slot; -D PN_NPOL: policies + 1;
 * -D PN_DUP_ENTRIES: room for (policy, site) pairs that duplicate.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>

#include "patronus_abi.h"

/* key: policy + 1 -> DSCP + 1 to write (0: leave the packet's own) */
BPF_ARRAY(pn_dscp_map, __u8, PN_NPOL);

/* Duplication (hitless voice): key (policy + 1, destination site column) ->
 * ifindex of the tunnel that carries a copy (the second-best path of the
 * pair); absent: no copy. One map write turns it on, moves or ends it. */
struct pn_dup_key {
    __u32 cls;
    __u32 site;
};
BPF_HASH(pn_dup_map, struct pn_dup_key, __u32, PN_DUP_ENTRIES);
/* key: policy + 1 -> copies sent (0) and copies the kernel refused (1), per CPU */
BPF_PERCPU_ARRAY(pn_dup_count, struct pn_policy_counter, PN_NPOL);

static __always_inline void pn_dscp(struct __sk_buff *skb, __u32 k)
{
    __u8 *d = pn_dscp_map.lookup(&k);
    if (!d || !*d)
        return;
    __u8 dscp = (__u8)(*d - 1);
    __u8 *eth = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if ((void *)(eth + ETH_HLEN + 2) > end)
        return;
    __u16 proto = (eth[12] << 8) | eth[13];
    if (proto == ETH_P_IP) {
        __u8 vihl = eth[ETH_HLEN], tos = eth[ETH_HLEN + 1];
        __u8 ntos = (__u8)((dscp << 2) | (tos & 3));
        if (ntos == tos)
            return;
        __be16 from = bpf_htons((__u16)(vihl << 8 | tos)), to = bpf_htons((__u16)(vihl << 8 | ntos));
        bpf_l3_csum_replace(skb, ETH_HLEN + 10, from, to, 2);
        bpf_skb_store_bytes(skb, ETH_HLEN + 1, &ntos, 1, 0);
    } else if (proto == ETH_P_IPV6) {
        __u8 b0 = eth[ETH_HLEN], b1 = eth[ETH_HLEN + 1];
        __u8 tc = (__u8)(((b0 & 0x0f) << 4) | (b1 >> 4));
        __u8 ntc = (__u8)((dscp << 2) | (tc & 3));
        __u8 nb[2] = {(__u8)((b0 & 0xf0) | (ntc >> 4)), (__u8)(((ntc & 0x0f) << 4) | (b1 & 0x0f))};
        bpf_skb_store_bytes(skb, ETH_HLEN, nb, 2, 0);
    }
}

int pn_tc_mark(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    struct pn_meta *m = (void *)(long)skb->data_meta;
    if ((void *)(m + 1) > data)
        return TC_ACT_OK;
    if (m->path != PN_NO_PATH)
        skb->mark = PN_MARK_BASE + m->path;
    __u32 k = (__u32)(m->policy + 1);
    struct pn_dup_key dk = {k, m->site};
    pn_dscp(skb, k);   /* before the copy: both copies carry the policy's DSCP */
    __u32 *ifindex = pn_dup_map.lookup(&dk);
    if (ifindex && *ifindex) {
        /* the copy leaves by the second tunnel's egress (an L3 device: the
         * kernel takes the Ethernet header off); the original goes on to
         * routing and the first */
        struct pn_policy_counter *c = pn_dup_count.lookup(&k);
        long rc = bpf_clone_redirect(skb, *ifindex, 0);
        if (c) {
            if (rc == 0)
                c->packets += 1;
            else
                c->bytes += 1;
        }
    }
    return TC_ACT_OK;
}
