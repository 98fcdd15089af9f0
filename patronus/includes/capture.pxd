# Declarations of csrc/capture.h. pn_capture is embedded by value and only
# handled through the functions, so its fields are not declared.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "capture.h" nogil:
    enum pn_cap_status:
        PN_CAP_OK
        PN_CAP_END
        PN_CAP_ERR_MAGIC
        PN_CAP_ERR_TRUNCATED
        PN_CAP_ERR_BLOCK
        PN_CAP_ERR_LINKTYPE

    enum:
        PN_CAP_FORMAT_PCAP
        PN_CAP_FORMAT_PCAPNG
        PN_CAP_MAX_IFACES

    ctypedef struct pn_cap_pkt:
        const uint8_t *data
        uint32_t caplen, wirelen
        uint64_t ts_ns
        uint32_t linktype

    ctypedef struct pn_capture:
        pass

    int pn_capture_open(pn_capture *c, const uint8_t *buf, size_t len)
    int pn_capture_next(pn_capture *c, pn_cap_pkt *out)
    int pn_capture_format(const pn_capture *c)
    const char *pn_capture_strerror(int status)
