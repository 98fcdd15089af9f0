# Declarations of csrc/patronus_abi.h: the structs and constants shared by the
# userspace data plane, the XDP programs and patronus/abi.py. Fields are
# declared with <stdint.h> types; the header's __u8/__u16/... are the same.
# Struct pn_row and pn_rpol are left out: their size depends on the -D
# capacities (PN_NSUM, PN_RULES) the XDP program is compiled with.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "patronus_abi.h" nogil:
    enum:
        PN_ABI_VERSION

        PN_FAMILY_ANY
        PN_FAMILY_V4
        PN_FAMILY_V6

        PN_PROTO_ICMP
        PN_PROTO_TCP
        PN_PROTO_UDP
        PN_PROTO_ICMPV6

        PN_MAX_VLAN_TAGS
        PN_MAX_IPV6_EXT

        PN_RF_SRC
        PN_RF_DST
        PN_RF_SPORT
        PN_RF_DPORT
        PN_RF_PROTO
        PN_RF_DSCP

        PN_SITE_NONE

        PN_SLOT_WORD
        PN_SLOT_BUSY
        PN_BUCKET_SLOTS
        PN_PROBE_BUCKETS
        PN_SLOT_PROBE

        PN_CFG_META
        PN_V4_DIRS
        PN_V4_L1
        PN_LPM6_TAG_BITS
        PN_PORTS
        PN_CHUNK_WORDS
        PN_RULES_PER_SUM
        PN_TX_SLOTS

    # unsigned (0xffffffffu / 0x80000000u): typed so Python sees them positive
    const uint32_t PN_NO_PATH
    const uint32_t PN_V4_CHUNK

    enum pn_reason:
        PN_OK
        PN_ERR_TRUNC_L2
        PN_ERR_NOT_IP
        PN_ERR_TRUNC_IP
        PN_ERR_BAD_VERSION
        PN_ERR_BAD_IHL
        PN_ERR_BAD_LEN
        PN_ERR_TRUNC_EXT
        PN_ERR_TRUNC_L4
        PN_NREASONS

    struct pn_parsed:
        uint8_t src[16]
        uint8_t dst[16]
        uint16_t sport
        uint16_t dport
        uint8_t proto
        uint8_t family
        uint8_t dscp
        uint8_t has_ports
        uint8_t tcp_flags
        uint32_t l3_len

    struct pn_flow_key:
        uint8_t src[16]
        uint8_t dst[16]
        uint16_t sport
        uint16_t dport
        uint8_t proto
        uint8_t family

    struct pn_flow_rec:
        uint64_t packets
        uint64_t bytes
        uint64_t first_ns
        uint64_t last_ns
        int32_t policy
        uint32_t path
        uint8_t tcp_flags
        uint8_t dscp
        uint32_t generation
        uint32_t site

    struct pn_flow:
        pn_flow_key key
        pn_flow_rec rec

    struct pn_rule:
        uint8_t src[16]
        uint8_t dst[16]
        uint8_t src_plen
        uint8_t dst_plen
        uint8_t family
        uint8_t proto
        uint16_t sport_lo, sport_hi
        uint16_t dport_lo, dport_hi
        uint8_t dscp
        uint8_t flags
        int32_t policy
        uint32_t priority

    struct pn_policy_counter:
        uint64_t packets
        uint64_t bytes

    struct pn_site_prefix:
        uint8_t addr[16]
        uint8_t plen
        uint8_t family
        uint32_t site

    struct pn_route:
        uint32_t path
        uint32_t action

    struct pn_meta:
        uint32_t path
        int32_t policy
        uint32_t site

    struct pn_xslot:
        pn_flow f
        uint64_t shared_packets
        uint64_t shared_bytes

    struct pn_bucket:
        uint64_t passed
        pn_xslot s[PN_BUCKET_SLOTS]

    enum pn_take_mode:
        PN_TAKE_COPY
        PN_TAKE_ALL
        PN_TAKE_IDLE

    struct pn_cfg:
        uint32_t set
        uint32_t generation
        uint64_t clock_base
        uint32_t tick_ns
        uint32_t flags

    enum pn_stat:
        PN_ST_NEW
        PN_ST_HIT
        PN_ST_RECLASS
        PN_ST_INSERT_FAILED
        PN_ST_EVICTED
        PN_ST_EXPORT_LOST
        PN_ST_UNACCOUNTED
        PN_ST_CLASS_HIT
        PN_NSTATS

    struct pn_v4chunk:
        uint32_t e[256]

    struct pn_lpm6:
        uint32_t prefixlen
        uint8_t tag
        uint8_t addr[16]

    struct pn_lut:
        uint32_t proto[256]
        uint32_t dscp[64]
        uint32_t noport[2]

    struct pn_chunk:
        uint64_t w[PN_CHUNK_WORDS]

    uint32_t pn_flow_hash(const uint64_t *w)
