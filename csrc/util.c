#include "util.h"

uint16_t pn_inet_checksum(const uint8_t *buf, size_t len)
{
    uint64_t sum = 0;
    size_t i = 0;
    for (; i + 1 < len; i += 2)
        sum += (uint32_t)buf[i] << 8 | buf[i + 1];
    if (i < len)
        sum += (uint32_t)buf[i] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

int pn_prefix_contains(const uint8_t *net, unsigned plen, const uint8_t *addr, unsigned nbytes)
{
    if (plen > nbytes * 8)
        return 0;
    unsigned full = plen / 8, rem = plen % 8;
    for (unsigned i = 0; i < full; i++)
        if (net[i] != addr[i])
            return 0;
    if (rem) {
        uint8_t mask = (uint8_t)(0xff << (8 - rem));
        if ((net[full] & mask) != (addr[full] & mask))
            return 0;
    }
    return 1;
}
