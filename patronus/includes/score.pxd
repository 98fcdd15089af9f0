# Declarations of csrc/score.h: path scoring and selection (patronus.paths.Selector).

from libc.stdint cimport int64_t, uint8_t


cdef extern from "score.h" nogil:
    void pn_score_select(size_t npaths, size_t nc, const double *rtt, const double *jit, const double *loss,
                         const uint8_t *alive, const double *bw, const float *wmat, const float *lim,
                         const float *wn, size_t ng, const int64_t *gstart, const int64_t *members,
                         float *scores, int64_t *best)
    void pn_select_changes(size_t npaths, size_t nc, size_t ng, const float *scores, const int64_t *best,
                           const int64_t *cur, const double *since, double margin, double hold_s, double now,
                           uint8_t *change, uint8_t *forced)
