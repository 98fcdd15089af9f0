/* Accounting a whole capture, on one thread or two (capture_run.h). */
#include "capture_run.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define LINKTYPE_ETHERNET 1
#define BATCH 1024   /* records a batch: ~100 us of accounting, so one wake-up per batch costs nothing */
#define RING 4       /* batches in flight */

struct batch {
    const uint8_t *ptr[BATCH];
    size_t len[BATCH];
    size_t wire[BATCH];   /* length on the wire (a snap length may have cut len shorter) */
    uint64_t ts[BATCH];
    uint32_t at[BATCH];   /* record number - first, of each Ethernet record */
    size_t m;             /* Ethernet records */
    size_t snapped;       /* of which cut short by the snap length */
    size_t first, count;  /* records [first, first + count) */
    int last;             /* the reader's final batch */
};

struct ring {
    pthread_mutex_t mu;
    pthread_cond_t filled, freed;
    size_t head, tail;    /* batches published, batches consumed */
    int stop;             /* the consumer gave up: the reader stops */
    pn_capture *cap;
    int status;           /* the reader's last status */
    size_t skipped, total;
    struct batch b[RING];
};

/* Fill one batch from the capture; returns 1 when the capture ended (or failed). */
static int fill(pn_capture *cap, struct batch *b, size_t first, size_t *skipped, int *status)
{
    pn_cap_pkt pkt;
    b->m = b->count = b->snapped = 0;
    b->first = first;
    int st = PN_CAP_OK;
    while (b->count < BATCH) {
        st = pn_capture_next(cap, &pkt);
        if (st != PN_CAP_OK)
            break;
        if (pkt.linktype == LINKTYPE_ETHERNET) {
            b->ptr[b->m] = pkt.data;
            b->len[b->m] = pkt.caplen;
            b->wire[b->m] = pkt.wirelen;
            b->snapped += pkt.wirelen > pkt.caplen;
            b->ts[b->m] = pkt.ts_ns;
            b->at[b->m] = (uint32_t)b->count;
            b->m++;
        } else {
            (*skipped)++;
        }
        b->count++;
    }
    b->last = st != PN_CAP_OK;
    *status = st;
    return b->last;
}

/* Account one batch into res->ids (grown as needed); 0, or -1 out of memory. */
static int account(pn_dp *dp, const struct batch *b, pn_caprun_result *res, size_t *room)
{
    size_t need = b->first + b->count;
    if (need > *room) {
        size_t nroom = *room ? *room : 4096;
        while (nroom < need)
            nroom *= 2;
        int32_t *grown = realloc(res->ids, nroom * sizeof(int32_t));
        if (!grown)
            return -1;
        res->ids = grown;
        *room = nroom;
    }
    int32_t out[BATCH];
    int32_t *ids = res->ids + b->first;
    for (size_t j = 0; j < b->count; j++)
        ids[j] = -1;
    pn_dp_run_wire(dp, b->ptr, b->len, b->wire, b->ts, out, NULL, b->m);
    res->snapped += b->snapped;
    for (size_t j = 0; j < b->m; j++)
        ids[b->at[j]] = out[j];
    res->n = need;
    return 0;
}

static void *reader(void *arg)
{
    struct ring *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        while (r->head - r->tail == RING && !r->stop)
            pthread_cond_wait(&r->freed, &r->mu);
        int stop = r->stop;
        pthread_mutex_unlock(&r->mu);
        if (stop)
            return NULL;
        struct batch *b = &r->b[r->head % RING];   /* ours: the consumer is behind head */
        int st, last = fill(r->cap, b, r->total, &r->skipped, &st);
        r->total += b->count;
        pthread_mutex_lock(&r->mu);
        r->status = st;
        r->head++;
        pthread_cond_signal(&r->filled);
        pthread_mutex_unlock(&r->mu);
        if (last)
            return NULL;
    }
}

static void run_one(pn_capture *cap, pn_dp *dp, pn_caprun_result *res)
{
    struct batch *b = malloc(sizeof(*b));
    size_t room = 0, first = 0;
    if (!b) {
        res->status = PN_CAPRUN_NOMEM;
        return;
    }
    for (;;) {
        int st, last = fill(cap, b, first, &res->skipped, &st);
        first += b->count;
        if (account(dp, b, res, &room)) {
            res->status = PN_CAPRUN_NOMEM;
            break;
        }
        if (last) {
            res->status = st;
            break;
        }
    }
    free(b);
}

void pn_capture_run(pn_capture *cap, pn_dp *dp, int threads, pn_caprun_result *res)
{
    memset(res, 0, sizeof(*res));
    res->threads = 1;
    struct ring *r = threads > 1 ? calloc(1, sizeof(*r)) : NULL;
    pthread_t th;
    if (r) {
        r->cap = cap;
        r->status = PN_CAP_OK;
        pthread_mutex_init(&r->mu, NULL);
        pthread_cond_init(&r->filled, NULL);
        pthread_cond_init(&r->freed, NULL);
        if (pthread_create(&th, NULL, reader, r) != 0) {   /* no thread: the same work on this one */
            pthread_cond_destroy(&r->freed);
            pthread_cond_destroy(&r->filled);
            pthread_mutex_destroy(&r->mu);
            free(r);
            r = NULL;
        }
    }
    if (!r) {
        run_one(cap, dp, res);
        return;
    }
    res->threads = 2;
    size_t room = 0;
    int failed = 0;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        while (r->tail == r->head)
            pthread_cond_wait(&r->filled, &r->mu);
        pthread_mutex_unlock(&r->mu);
        const struct batch *b = &r->b[r->tail % RING];   /* published: the reader is done with it */
        int last = b->last;
        failed = account(dp, b, res, &room) != 0;
        pthread_mutex_lock(&r->mu);
        r->tail++;
        if (failed)
            r->stop = 1;
        pthread_cond_signal(&r->freed);
        pthread_mutex_unlock(&r->mu);
        if (last || failed)
            break;
    }
    pthread_join(th, NULL);
    res->skipped = r->skipped;
    res->status = failed ? PN_CAPRUN_NOMEM : r->status;
    pthread_cond_destroy(&r->freed);
    pthread_cond_destroy(&r->filled);
    pthread_mutex_destroy(&r->mu);
    free(r);
}
