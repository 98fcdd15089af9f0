#include "abi_layout.h"
#define PN_NSUM PN_LAYOUT_NSUM
#define PN_RULES PN_LAYOUT_RULES
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
    FIELD(pn_bucket, passed), FIELD(pn_bucket, tag), FIELD(pn_bucket, s),
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
    SIZE(pn_rate),
    FIELD(pn_rate, tat), FIELD(pn_rate, ps_per_byte), FIELD(pn_rate, burst_ns),
    SIZE(pn_meta),
    FIELD(pn_meta, path), FIELD(pn_meta, policy), FIELD(pn_meta, site),
    SIZE(pn_cfg),
    FIELD(pn_cfg, set), FIELD(pn_cfg, generation), FIELD(pn_cfg, clock_base), FIELD(pn_cfg, tick_ns),
    FIELD(pn_cfg, flags),
    SIZE(pn_lut),
    FIELD(pn_lut, proto), FIELD(pn_lut, dscp), FIELD(pn_lut, noport),
    SIZE(pn_lpm6),
    FIELD(pn_lpm6, prefixlen), FIELD(pn_lpm6, tag), FIELD(pn_lpm6, addr),
    SIZE(pn_v4chunk),
    FIELD(pn_v4chunk, e),
    SIZE(pn_chunk),
    FIELD(pn_chunk, w),
    SIZE(pn_row),
    FIELD(pn_row, sum), FIELD(pn_row, chunk),
    SIZE(pn_rpol),
    FIELD(pn_rpol, policy),
    { NULL, NULL, 0, 0 },
};

#define CONST(c) { #c, (unsigned long long)(c) }

const struct pn_const_entry pn_abi_constants[] = {
    CONST(PN_ABI_VERSION),
    CONST(PN_NO_PATH), CONST(PN_SITE_NONE), CONST(PN_NREASONS), CONST(PN_NSTATS),
    CONST(PN_CFG_META),
    CONST(PN_TAKE_COPY), CONST(PN_TAKE_ALL), CONST(PN_TAKE_IDLE),
    CONST(PN_V4_CHUNK), CONST(PN_V4_DIRS), CONST(PN_V4_L1), CONST(PN_PORTS), CONST(PN_LPM6_TAG_BITS),
    CONST(PN_CHUNK_WORDS), CONST(PN_RULES_PER_SUM), CONST(PN_TX_SLOTS),
    CONST(PN_SLOT_WORD), CONST(PN_SLOT_BUSY), CONST(PN_BUCKET_SLOTS), CONST(PN_PROBE_BUCKETS),
    CONST(PN_SLOT_PROBE),
    CONST(PN_RF_SRC), CONST(PN_RF_DST), CONST(PN_RF_SPORT), CONST(PN_RF_DPORT), CONST(PN_RF_PROTO),
    CONST(PN_RF_DSCP),
    CONST(PN_FAMILY_ANY), CONST(PN_FAMILY_V4), CONST(PN_FAMILY_V6),
    CONST(PN_LAYOUT_NSUM), CONST(PN_LAYOUT_RULES),
    { NULL, 0 },
};
