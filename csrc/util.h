/* Small helpers shared by the userspace data plane sources. */
#ifndef PATRONUS_UTIL_H
#define PATRONUS_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* RFC 1071 Internet checksum of buf[0:len] (ones' complement of the ones'
 * complement sum), as stored in IPv4/ICMP/UDP/TCP headers. */
uint16_t pn_inet_checksum(const uint8_t *buf, size_t len);

/* 1 when addr (network order, `nbytes` long) lies inside net/plen. */
int pn_prefix_contains(const uint8_t *net, unsigned plen, const uint8_t *addr, unsigned nbytes);

#endif
