#include "abi_layout.h"
#include "patronus_abi.h"

#define FIELD(S, f) { #S, #f, offsetof(struct S, f), sizeof(((struct S *)0)->f) }
#define SIZE(S) { #S, NULL, 0, sizeof(struct S) }

const struct pn_layout_entry pn_abi_layout[] = {
    SIZE(pn_flow_key),
    FIELD(pn_flow_key, src), FIELD(pn_flow_key, dst), FIELD(pn_flow_key, sport),
    FIELD(pn_flow_key, dport), FIELD(pn_flow_key, proto), FIELD(pn_flow_key, family),
    SIZE(pn_flow_rec),
    FIELD(pn_flow_rec, packets), FIELD(pn_flow_rec, bytes), FIELD(pn_flow_rec, first_ns),
    FIELD(pn_flow_rec, last_ns), FIELD(pn_flow_rec, policy), FIELD(pn_flow_rec, path),
    FIELD(pn_flow_rec, tcp_flags), FIELD(pn_flow_rec, dscp), FIELD(pn_flow_rec, generation),
    FIELD(pn_flow_rec, site),
    SIZE(pn_flow),
    FIELD(pn_flow, key), FIELD(pn_flow, rec),
    SIZE(pn_xslot),
    FIELD(pn_xslot, f), FIELD(pn_xslot, shared_packets), FIELD(pn_xslot, shared_bytes),
    SIZE(pn_bucket),
    FIELD(pn_bucket, passed), FIELD(pn_bucket, s),
    SIZE(pn_rule),
    FIELD(pn_rule, src), FIELD(pn_rule, dst), FIELD(pn_rule, src_plen), FIELD(pn_rule, dst_plen),
    FIELD(pn_rule, family), FIELD(pn_rule, proto), FIELD(pn_rule, sport_lo), FIELD(pn_rule, sport_hi),
    FIELD(pn_rule, dport_lo), FIELD(pn_rule, dport_hi), FIELD(pn_rule, dscp), FIELD(pn_rule, flags),
    FIELD(pn_rule, policy), FIELD(pn_rule, priority),
    SIZE(pn_policy_counter),
    FIELD(pn_policy_counter, packets), FIELD(pn_policy_counter, bytes),
    SIZE(pn_site_prefix),
    FIELD(pn_site_prefix, addr), FIELD(pn_site_prefix, plen), FIELD(pn_site_prefix, family),
    FIELD(pn_site_prefix, site),
    SIZE(pn_route),
    FIELD(pn_route, path), FIELD(pn_route, action),
    SIZE(pn_meta),
    FIELD(pn_meta, path), FIELD(pn_meta, policy), FIELD(pn_meta, site),
    { NULL, NULL, 0, 0 },
};
