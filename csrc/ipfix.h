/* IPFIX (RFC 7011) data messages from flow records (struct pn_flow): the
 * encoder and sender behind patronus.ipfix. The record layouts are the
 * templates patronus.ipfix announces (256: IPv4, 257: IPv6). */
#ifndef PATRONUS_IPFIX_H
#define PATRONUS_IPFIX_H

#include <stddef.h>
#include <stdint.h>

#include "patronus_abi.h"

#define PN_IPFIX_REC_V4 61   /* bytes of one data record, template 256 */
#define PN_IPFIX_REC_V6 85   /* template 257 */
#define PN_IPFIX_HEAD 20     /* message header (16) + set header (4) */

/* Encode the rows of `flows[0:n]` whose family is `family` (4 or 6), in
 * order, as data-only messages of at most `per` records each, back to back
 * in `out` (room for ceil(count / per) messages of PN_IPFIX_HEAD + per *
 * record size). Message k's header carries `seq0` plus the records before
 * it, `export_time` and `domain`; its length goes to lens[k]. The end
 * reason is `reasons[i]` for row i when `reasons` is not NULL, else
 * `reason`. Times are (ns + offset_ns) / 1e6. Returns the messages written;
 * *records gets the records encoded. */
size_t pn_ipfix_encode(uint8_t *out, uint32_t *lens, const struct pn_flow *flows, size_t n, int family,
                       const uint8_t *reasons, uint8_t reason, int64_t offset_ns, uint16_t template_id,
                       uint32_t export_time, uint32_t seq0, uint32_t domain, size_t per, size_t *records);

/* Send messages (back to back in `buf`, lengths in lens[0:count]) on the
 * connected datagram socket `fd` with sendmmsg, in batches. A message the
 * kernel refuses is counted in *errors (its errno in *last_errno) and
 * skipped. Returns the messages sent. */
size_t pn_ipfix_send(int fd, const uint8_t *buf, const uint32_t *lens, size_t count, size_t *errors,
                     int *last_errno);

#endif
