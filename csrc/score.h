/* Path scoring and per-group selection for patronus.paths.Selector: one
 * pass over the paths computes every profile's score (the three bands of
 * selector.py: (1, 2] meets the SLA, (0, 1) violates, 0 dead), then one pass
 * over the groups picks each group's best path per profile (lowest path
 * index on ties). The numpy version in selector.py (score_reference) is the
 * specification; tests compare the two. */
#ifndef PATRONUS_SCORE_H
#define PATRONUS_SCORE_H

#include <stddef.h>
#include <stdint.h>

/* rtt, jit, loss, bw: per path (NaN = unknown; bw may be NULL); alive: 0/1.
 * wmat [nc][4]: cost weights already divided by each limit (bandwidth term
 * last); lim [nc][3]: rtt, jitter, loss limits; wn [nc][3]: normalised
 * weights for the violation. Groups in CSR form: members[gstart[g] ..
 * gstart[g+1]) are group g's paths in ascending index order.
 * Out: scores [nc][np], best [nc][ng] (-1 for an empty group). */
void pn_score_select(size_t np, size_t nc, const double *rtt, const double *jit, const double *loss,
                     const uint8_t *alive, const double *bw, const float *wmat, const float *lim, const float *wn,
                     size_t ng, const int64_t *gstart, const int64_t *members, float *scores, int64_t *best);


/* The selection rule of selector.py for every [profile, group]: change[i]
 * = 1 when the best path should replace the current one (cur = -1: none
 * yet), forced[i] = 1 when that move ignores margin and hold-down (no
 * current path, or it is dead or violating while the best is not). */
void pn_select_changes(size_t np, size_t nc, size_t ng, const float *scores, const int64_t *best,
                       const int64_t *cur, const double *since, double margin, double hold_s, double now,
                       uint8_t *change, uint8_t *forced);

#endif
