/* Accounting a whole capture file (csrc/capture.h) in the data plane
 * (csrc/flowtable.h), optionally on two threads: a reader walks the
 * records while the caller's thread accounts them.
 *
 * The records of a capture form a chain (each one's offset follows from the
 * one before), so reading them is a cache miss and, on the first touch of
 * an mmap, a page fault after another: on a file of 580-byte frames that
 * costs as much as classifying and accounting the frames. With two threads
 * the reader takes those while the other thread accounts the batch before;
 * the flows come out exactly as from one thread (the data plane sees the
 * same frames in the same order). */
#ifndef PATRONUS_CAPTURE_RUN_H
#define PATRONUS_CAPTURE_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "capture.h"
#include "flowtable.h"

#define PN_CAPRUN_NOMEM (-100)   /* the result array could not grow */

typedef struct {
    int32_t *ids;     /* per record: its flow's policy, -1 if not accounted (malloc'ed; the caller frees) */
    size_t n;         /* records read */
    size_t skipped;   /* records of a link type other than Ethernet (ids -1) */
    size_t snapped;   /* Ethernet records the capture's snap length cut short (accounted at their IP length) */
    int status;       /* PN_CAP_END at a clean end, a PN_CAP_ERR_* (records before it kept), or PN_CAPRUN_NOMEM */
    int threads;      /* threads that ran: 2, or 1 (asked, or no thread could be started) */
} pn_caprun_result;

/* Read every record of `cap` (opened) into `dp`. threads: 1 or 2. */
void pn_capture_run(pn_capture *cap, pn_dp *dp, int threads, pn_caprun_result *res);

#endif /* PATRONUS_CAPTURE_RUN_H */
