/* Top-k selection for DGCNN's kNN graph, compiled at first use by crossmoco_ray/nn/kernels.py.
 *
 * Each row keeps its k best scores in a min-heap. The scan tests 16 scores at a time against the
 * heap's smallest (a loop the compiler vectorises), so most of a row costs one vector compare per
 * 16 candidates and only the few that beat the current k-th best touch the heap. Ties keep the
 * earlier index. Plain C, no Python or torch headers: it builds in well under a second.
 */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KNN_MAX_K 256
#define BLOCK 16
#define GROUPS 64

static inline void sift_down(float *v, int64_t *ix, int64_t k, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && v[l] < v[m]) m = l;
        if (r < k && v[r] < v[m]) m = r;
        if (m == i) return;
        float tv = v[i];
        v[i] = v[m];
        v[m] = tv;
        int64_t ti = ix[i];
        ix[i] = ix[m];
        ix[m] = ti;
        i = m;
    }
}

/* Whether any of s[0..BLOCK) is above (or, for the second, at least) thr; NaN is neither. */
#if defined(__AVX512F__)
#define ANY_CMP(NAME, PRED, OP)                                                                   \
    static inline int NAME(const float *s, float thr) {                                           \
        return _mm512_cmp_ps_mask(_mm512_loadu_ps(s), _mm512_set1_ps(thr), PRED) != 0;           \
    }
#elif defined(__AVX2__)
#define ANY_CMP(NAME, PRED, OP)                                                                   \
    static inline int NAME(const float *s, float thr) {                                           \
        __m256 t = _mm256_set1_ps(thr);                                                           \
        return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(s), t, PRED),        \
                                               _mm256_cmp_ps(_mm256_loadu_ps(s + 8), t, PRED))) != 0; \
    }
#else
#define ANY_CMP(NAME, PRED, OP)                                                                   \
    static inline int NAME(const float *s, float thr) {                                           \
        int any = 0;                                                                              \
        for (int t = 0; t < BLOCK; ++t) any |= (s[t] OP thr);                                     \
        return any;                                                                               \
    }
#endif
ANY_CMP(any_above, _CMP_GT_OQ, >)
ANY_CMP(any_at_least, _CMP_GE_OQ, >=)

/* The k largest of s[0..n) by one heap scan; ix[] receives them (heap order). */
static void heap_select(const float *s, const int64_t *idx, int64_t n, int64_t k, float *v, int64_t *ix) {
    for (int64_t j = 0; j < k; ++j) {
        v[j] = s[j];
        ix[j] = idx ? idx[j] : j;
    }
    for (int64_t i = k / 2 - 1; i >= 0; --i) sift_down(v, ix, k, i);
    float thr = v[0];
    int64_t j = k;
    if (!idx) {
        for (; j + BLOCK <= n; j += BLOCK) {
            if (!any_above(s + j, thr)) continue;
            for (int t = 0; t < BLOCK; ++t) {
                if (s[j + t] > thr) {
                    v[0] = s[j + t];
                    ix[0] = j + t;
                    sift_down(v, ix, k, 0);
                    thr = v[0];
                }
            }
        }
    }
    for (; j < n; ++j) {
        if (s[j] > thr) {
            v[0] = s[j];
            ix[0] = idx ? idx[j] : j;
            sift_down(v, ix, k, 0);
            thr = v[0];
        }
    }
}

/* The k largest of s[0..n) → out[0..k), largest first when ordered; cv/ci: scratch of n entries.
 *
 * A lower bound on the k-th largest comes first: the maxima of GROUPS interleaved groups (position mod
 * GROUPS, one vector max per 64 scores) are real scores, so the k-th largest of them has at least k
 * scores at or above it. Only the scores at or above it (typically a little over k) enter the heap. */
static void select_row(const float *s, int64_t n, int64_t k, int ordered, int64_t *out, float *cv,
                       int64_t *ci) {
    float v[KNN_MAX_K];
    int64_t ix[KNN_MAX_K];
    int64_t c = 0;
    if (n >= GROUPS && 2 * k <= GROUPS) {
        float m[GROUPS], mv[KNN_MAX_K];
        int64_t mi[KNN_MAX_K];
        memcpy(m, s, sizeof(m));
        int64_t j = GROUPS;
        for (; j + GROUPS <= n; j += GROUPS)
            for (int t = 0; t < GROUPS; ++t) m[t] = s[j + t] > m[t] ? s[j + t] : m[t];
        for (; j < n; ++j) m[j % GROUPS] = s[j] > m[j % GROUPS] ? s[j] : m[j % GROUPS];
        heap_select(m, NULL, GROUPS, k, mv, mi);
        const float lower = mv[0];
        j = 0;
        for (; j + BLOCK <= n; j += BLOCK) {
            if (!any_at_least(s + j, lower)) continue;
            for (int t = 0; t < BLOCK; ++t) {
                if (s[j + t] >= lower) {
                    cv[c] = s[j + t];
                    ci[c++] = j + t;
                }
            }
        }
        for (; j < n; ++j) {
            if (s[j] >= lower) {
                cv[c] = s[j];
                ci[c++] = j;
            }
        }
    }
    if (c >= k) { /* else a NaN hid the bound, or the row is short: select from the whole row */
        heap_select(cv, ci, c, k, v, ix);
    } else {
        heap_select(s, NULL, n, k, v, ix);
    }
    if (ordered) { /* heap sort on a min-heap leaves the largest first */
        for (int64_t end = k - 1; end > 0; --end) {
            float tv = v[0];
            v[0] = v[end];
            v[end] = tv;
            int64_t ti = ix[0];
            ix[0] = ix[end];
            ix[end] = ti;
            sift_down(v, ix, end, 0);
        }
    }
    memcpy(out, ix, (size_t)k * sizeof(int64_t));
}

int64_t knn_max_k(void) { return KNN_MAX_K; }

/* Rows [row_begin, row_end) of a contiguous [rows, n] score matrix → out [rows, k]. */
int topk_rows(const float *scores, int64_t n, int64_t k, int ordered, int64_t row_begin, int64_t row_end,
              int64_t *out) {
    float *cv = (float *)malloc((size_t)n * sizeof(float));
    int64_t *ci = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    if (cv == NULL || ci == NULL) {
        free(cv);
        free(ci);
        return -1;
    }
    for (int64_t r = row_begin; r < row_end; ++r) select_row(scores + r * n, n, k, ordered, out + r * k, cv, ci);
    free(cv);
    free(ci);
    return 0;
}

/* Scores of RB rows (q[rr] points at row rr's d values) against every column of rt [d, n] → sb [RB, n].
 * Register-blocked: a tile of RB rows × JB columns is accumulated over d in registers, so each value of
 * rt is loaded once per RB rows. */
#define RB 4
#define JB 64
static void score_rows(const float *const *q, const float *rt, int64_t n, int64_t d, float *sb) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + JB <= n; j += JB) {
        __m512 acc[RB][4];
        for (int rr = 0; rr < RB; ++rr)
            for (int t = 0; t < 4; ++t) acc[rr][t] = _mm512_setzero_ps();
        for (int64_t c = 0; c < d; ++c) {
            const float *r = rt + c * n + j;
            const __m512 r0 = _mm512_loadu_ps(r), r1 = _mm512_loadu_ps(r + 16);
            const __m512 r2 = _mm512_loadu_ps(r + 32), r3 = _mm512_loadu_ps(r + 48);
            for (int rr = 0; rr < RB; ++rr) {
                const __m512 b = _mm512_set1_ps(q[rr][c]);
                acc[rr][0] = _mm512_fmadd_ps(b, r0, acc[rr][0]);
                acc[rr][1] = _mm512_fmadd_ps(b, r1, acc[rr][1]);
                acc[rr][2] = _mm512_fmadd_ps(b, r2, acc[rr][2]);
                acc[rr][3] = _mm512_fmadd_ps(b, r3, acc[rr][3]);
            }
        }
        for (int rr = 0; rr < RB; ++rr)
            for (int t = 0; t < 4; ++t) _mm512_storeu_ps(sb + rr * n + j + 16 * t, acc[rr][t]);
    }
#endif
    for (; j + JB <= n; j += JB) { /* portable: the compiler vectorises the t loops */
        float acc[RB][JB];
        memset(acc, 0, sizeof(acc));
        for (int64_t c = 0; c < d; ++c) {
            const float *r = rt + c * n + j;
            for (int rr = 0; rr < RB; ++rr) {
                const float b = q[rr][c];
                for (int t = 0; t < JB; ++t) acc[rr][t] += b * r[t];
            }
        }
        for (int rr = 0; rr < RB; ++rr) memcpy(sb + rr * n + j, acc[rr], sizeof(acc[rr]));
    }
    for (int rr = 0; rr < RB; ++rr) {
        for (int64_t jj = j; jj < n; ++jj) {
            float acc = 0.0f;
            for (int64_t c = 0; c < d; ++c) acc += q[rr][c] * rt[c * n + jj];
            sb[rr * n + jj] = acc;
        }
    }
}

/* Scores computed here, RB rows at a time into a buffer that stays in cache, then selected: row i of
 * cloud b scores point j as sum_d lhs[b, i, d] * rhs_t[b, d, j]. No [B, N, N] matrix is written to
 * memory and read back, which on these machines costs more than the selection itself.
 * Rows are flat over [B·N]; returns 0, or -1 when the buffers cannot be allocated. */
int knn_direct(const float *lhs, const float *rhs_t, int64_t n, int64_t d, int64_t k, int ordered,
               int64_t row_begin, int64_t row_end, int64_t *out) {
    float *sb = (float *)malloc((size_t)(RB * n) * sizeof(float));
    float *cv = (float *)malloc((size_t)n * sizeof(float));
    int64_t *ci = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    if (sb == NULL || cv == NULL || ci == NULL) {
        free(sb);
        free(cv);
        free(ci);
        return -1;
    }
    int64_t r = row_begin;
    while (r < row_end) {
        const int64_t b = r / n, cloud_end = (b + 1) * n;
        const int64_t stop = row_end < cloud_end ? row_end : cloud_end;
        const int rows = stop - r < RB ? (int)(stop - r) : RB;
        const float *q[RB];
        for (int rr = 0; rr < RB; ++rr) q[rr] = lhs + (r + (rr < rows ? rr : rows - 1)) * d;
        score_rows(q, rhs_t + b * d * n, n, d, sb);
        for (int rr = 0; rr < rows; ++rr) select_row(sb + rr * n, n, k, ordered, out + (r + rr) * k, cv, ci);
        r += rows;
    }
    free(sb);
    free(cv);
    free(ci);
    return 0;
}

/* The max over each row's k neighbours, per channel, and which neighbour it came from (the first of
 * equal maxima), for EdgeConv: out[r, t] = max_j a[cols[r·k + j], t], arg[r, t] = that j (one byte;
 * k <= 256). arg may be NULL. Rows [row_begin, row_end); a is [rows, o] with row stride lda (a column
 * slice of a wider matrix needs no copy); out and arg are contiguous [rows, o]. The backward sends
 * g[r, t] to da[cols[r·k + arg[r, t]], t] for channels [t_begin, t_end) of every row, so that threads
 * that split the channels never write the same element. bf16 is compared as the fp32 it widens to. */
static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}
#define AS_IS(x) (x)

#define NEIGHBOUR_MAX(NAME, T, VALUE)                                                                   \
    void NAME(const T *a, int64_t lda, const int64_t *cols, int64_t k, int64_t o, int64_t row_begin,     \
              int64_t row_end, T *out, uint8_t *arg) {                                                  \
        for (int64_t r = row_begin; r < row_end; ++r) {                                                 \
            const int64_t *c = cols + r * k;                                                            \
            T *y = out + r * o;                                                                         \
            memcpy(y, a + c[0] * lda, (size_t)o * sizeof(T));                                           \
            if (arg) {                                                                                  \
                uint8_t *p = arg + r * o;                                                               \
                memset(p, 0, (size_t)o);                                                                \
                for (int64_t j = 1; j < k; ++j) {                                                       \
                    const T *s = a + c[j] * lda;                                                        \
                    const uint8_t jj = (uint8_t)j;                                                      \
                    for (int64_t t = 0; t < o; ++t) {                                                   \
                        const int gt = VALUE(s[t]) > VALUE(y[t]);                                       \
                        y[t] = gt ? s[t] : y[t];                                                        \
                        p[t] = gt ? jj : p[t];                                                          \
                    }                                                                                   \
                }                                                                                       \
            } else {                                                                                    \
                for (int64_t j = 1; j < k; ++j) {                                                       \
                    const T *s = a + c[j] * lda;                                                        \
                    for (int64_t t = 0; t < o; ++t) y[t] = VALUE(s[t]) > VALUE(y[t]) ? s[t] : y[t];     \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }

#define NEIGHBOUR_MAX_BACKWARD(NAME, T)                                                                 \
    void NAME(const T *g, const int64_t *cols, const uint8_t *arg, int64_t k, int64_t o, int64_t rows,   \
              int64_t t_begin, int64_t t_end, T *da) {                                                  \
        for (int64_t r = 0; r < rows; ++r) {                                                            \
            const int64_t *c = cols + r * k;                                                            \
            const T *gr = g + r * o;                                                                    \
            const uint8_t *p = arg + r * o;                                                             \
            for (int64_t t = t_begin; t < t_end; ++t) da[c[p[t]] * o + t] += gr[t];                     \
        }                                                                                               \
    }

NEIGHBOUR_MAX(neighbour_max_f32, float, AS_IS)
NEIGHBOUR_MAX(neighbour_max_f64, double, AS_IS)
NEIGHBOUR_MAX(neighbour_max_bf16, uint16_t, bf16_to_float)
NEIGHBOUR_MAX_BACKWARD(neighbour_max_backward_f32, float)
NEIGHBOUR_MAX_BACKWARD(neighbour_max_backward_f64, double)
