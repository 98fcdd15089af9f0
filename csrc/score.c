#include <math.h>

#include "score.h"

#define BW_HALF 10.0f

static inline float nonneg(double v)
{
    return (v > 0.0) ? (float)v : 0.0f; /* NaN and negatives -> 0, as np.fmax(x, 0) */
}

void pn_score_select(size_t np, size_t nc, const double *rtt, const double *jit, const double *loss,
                     const uint8_t *alive, const double *bw, const float *wmat, const float *lim, const float *wn,
                     size_t ng, const int64_t *gstart, const int64_t *members, float *scores, int64_t *best)
{
    for (size_t p = 0; p < np; p++) {
        const int ok = alive[p] && !isnan(rtt[p]);
        const float x0 = nonneg(rtt[p]), x1 = nonneg(jit[p]), x2 = nonneg(loss[p]);
        const float x3 = bw ? BW_HALF / (nonneg(bw[p]) + BW_HALF) : 0.0f;
        for (size_t c = 0; c < nc; c++) {
            const float *w = wmat + 4 * c, *l = lim + 3 * c;
            float s = 0.0f;
            if (ok) {
                const float cost = w[0] * x0 + w[1] * x1 + w[2] * x2 + w[3] * x3;
                if (x0 <= l[0] && x1 <= l[1] && x2 <= l[2]) {
                    s = 1.0f + 1.0f / (1.0f + cost);
                } else {
                    const float *n = wn + 3 * c;
                    float over = 1.0f;
                    float r0 = x0 / l[0] - 1.0f, r1 = x1 / l[1] - 1.0f, r2 = x2 / l[2] - 1.0f;
                    over += n[0] * (r0 > 0.0f ? r0 : 0.0f) + n[1] * (r1 > 0.0f ? r1 : 0.0f) +
                            n[2] * (r2 > 0.0f ? r2 : 0.0f);
                    s = 0.999f / (over + 1e-3f * cost);
                }
            }
            scores[c * np + p] = s;
        }
    }
    for (size_t c = 0; c < nc; c++) {
        const float *sc = scores + c * np;
        for (size_t g = 0; g < ng; g++) {
            int64_t b = -1;
            float top = -1.0f;
            for (int64_t i = gstart[g]; i < gstart[g + 1]; i++) {
                const int64_t p = members[i];
                if (sc[p] > top) { /* strict: the lowest index wins ties */
                    top = sc[p];
                    b = p;
                }
            }
            best[c * ng + g] = b;
        }
    }
}

void pn_select_changes(size_t np, size_t nc, size_t ng, const float *scores, const int64_t *best,
                       const int64_t *cur, const double *since, double margin, double hold_s, double now,
                       uint8_t *change, uint8_t *forced)
{
    for (size_t c = 0; c < nc; c++) {
        const float *sc = scores + c * np;
        for (size_t g = 0; g < ng; g++) {
            const size_t i = c * ng + g;
            const int64_t b = best[i], cu = cur[i];
            const double sb = b >= 0 ? sc[b] : -1.0, s0 = cu >= 0 ? sc[cu] : -1.0;
            const int f = cu < 0 || (s0 < 1.0 && sb >= 1.0) || (s0 <= 0.0 && sb > 0.0);
            const int better = sb > s0 + margin && now - since[i] >= hold_s;
            forced[i] = (uint8_t)f;
            change[i] = (uint8_t)(b >= 0 && b != cu && (f || better));
        }
    }
}
