/* patronus steering, tc half: copy the path the XDP program chose (the
 * struct pn_meta it wrote in front of the frame) into skb->mark, so that
 * `ip rule fwmark` sends the packet into that path's routing table and
 * tunnel. Attached at clsact ingress of the same interface as pn_xdp,
 * direct action; packets without metadata pass untouched.
 *
 * -D PN_MARK_BASE: mark = PN_MARK_BASE + path slot.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

struct pn_meta {          /* bpf/patronus_xdp.c writes it */
    __u32 path;
    __s32 policy;
};

int pn_tc_mark(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    struct pn_meta *m = (void *)(long)skb->data_meta;
    if ((void *)(m + 1) > data)
        return TC_ACT_OK;
    if (m->path != 0xffffffffu)
        skb->mark = PN_MARK_BASE + m->path;
    return TC_ACT_OK;
}
