# Declarations of csrc/util.h.

from libc.stdint cimport uint8_t, uint16_t


cdef extern from "util.h" nogil:
    uint16_t pn_inet_checksum(const uint8_t *buf, size_t len)
    int pn_prefix_contains(const uint8_t *net, unsigned plen, const uint8_t *addr, unsigned nbytes)
