# Declarations of csrc/ipfix.h.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t

from patronus.includes.abi cimport pn_flow


cdef extern from "ipfix.h" nogil:
    enum:
        PN_IPFIX_REC_V4
        PN_IPFIX_REC_V6
        PN_IPFIX_HEAD

    size_t pn_ipfix_encode(uint8_t *out, uint32_t *lens, const pn_flow *flows, size_t n, int family,
                           const uint8_t *reasons, uint8_t reason, int64_t offset_ns, uint16_t template_id,
                           uint32_t export_time, uint32_t seq0, uint32_t domain, size_t per, size_t *records)
    size_t pn_ipfix_send(int fd, const uint8_t *buf, const uint32_t *lens, size_t count, size_t *errors,
                         int *last_errno)
