/* Bit-vector packet classifier (Lakshman & Stiliadis, SIGCOMM '98) with an
 * aggregated summary level (Baboescu & Varghese, SIGCOMM '01).
 *
 * Rules are numbered in priority order; bit i of a bitmap stands for rule i.
 * Each field (source and destination prefix per family, source and
 * destination port, protocol, DSCP) cuts its value space into elementary
 * intervals; every interval maps to a precomputed bitmap of the rules that
 * accept any value in it (identical bitmaps are stored once). A lookup is one
 * search per field, then an AND of the six bitmaps that stops at the first
 * set bit: the highest-priority rule matching every field. A summary bitmap
 * (bit w set iff word w is non-zero) is ANDed first, so words where any field
 * is all-zero are skipped without being read.
 *
 * Bitmaps are stored as chunks of 64 words (one per summary word), each
 * distinct chunk once for the whole classifier: rows of a field differ in
 * few chunks (those of the rules of one prefix or port range): the
 * 65,536-policy benchmark table takes about 65 MB instead of 872 MB of
 * dense rows (PolicyTable.memory_bytes).
 */
#ifndef PATRONUS_CLASSIFY_H
#define PATRONUS_CLASSIFY_H

#include <stddef.h>
#include <stdint.h>

#include "patronus_abi.h"

enum pn_field_id {
    PN_F_SRC4, PN_F_DST4, PN_F_SRC6, PN_F_DST6,
    PN_F_SPORT, PN_F_DPORT, PN_F_PROTO, PN_F_DSCP,
    PN_NFIELDS,
};

typedef unsigned __int128 pn_u128;

typedef struct {
    uint32_t nintervals;
    pn_u128 *starts;        /* sorted interval starts (prefix fields) */
    uint32_t *row_of;       /* interval -> row (prefix fields), or value -> row (LUT fields) */
    uint32_t nrows;
    uint64_t *sums;         /* nrows x nsum: bit b of word j says bitmap word 64 j + b is non-zero */
    uint32_t *chunk;        /* nrows x nsum: the chunk holding bitmap words 64 j .. 64 j + 63 */
} pn_field;


typedef struct {
    uint32_t nrules, nwords, nsum;
    pn_field f[PN_NFIELDS];
    uint32_t noport_row[2]; /* sport/dport row for packets without ports */
    int32_t *rule_policy;   /* rule (priority order) -> policy index */
    uint64_t *chunks;       /* nchunks x PN_CHUNK_WORDS, distinct; chunk 0 is all zeros */
    uint32_t nchunks;
    size_t memory;          /* bytes allocated, for users sizing big tables */
} pn_classifier;

/* rules sorted by priority (rule i = bit i). 0, or -1 when out of memory. */
int pn_classifier_build(pn_classifier *c, const struct pn_rule *rules, uint32_t n);
void pn_classifier_free(pn_classifier *c);
/* Interval starts of a prefix field split into high and low 64-bit halves
 * (IPv4 starts are in lo), for loading into BPF maps. */
void pn_field_starts(const pn_field *f, uint64_t *hi, uint64_t *lo);
int32_t pn_classify(const pn_classifier *c, const struct pn_parsed *p);

/* The obvious algorithm: test every rule in order. A baseline for benchmarks
 * and a second oracle for tests, never the data path. */
int32_t pn_classify_linear(const struct pn_rule *rules, uint32_t n, const struct pn_parsed *p);

#endif
