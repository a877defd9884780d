/* Attention over ragged rows (model.ragged.RaggedRows) on x86 CPUs with AVX-512, fp32.
 *
 * Rows of different lengths lie end to end as one flat sequence. Token i of a row starting at s sees
 * the keys [s, s + prefix[i]) (a prefix its row shares: a context that every continuation packed after
 * it sees) and [s + seg[i], i] (its own segment up to itself); prefix and seg are row-relative. torch's SDPA can only run this on padded rows
 * with a dense mask: it computes every (query, key) pair of the padded square, gathers q/k/v into
 * that layout and back, and rotates q and k in ~6 separate ops. This kernel rotates q and k in place,
 * reads them where the projection wrote them, computes only the visible pairs and writes each head's
 * output in the flat layout the output projection reads.
 *
 * Per (row, kv head) task: the row's keys transposed into a thread's scratch (head_dim x T), so 16
 * scores of one query come from head_dim FMAs over contiguous loads, each load shared by the q heads
 * of that kv head; softmax over the visible scores; then the weighted sum of the value rows, each
 * value row's load shared the same way. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }

/* e^x, 16 lanes: Cody-Waite reduction by ln 2 and Cephes' degree-5 polynomial (within 2 ulp of expf
 * over the range softmax uses, x <= 0). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Rotate-half rotary on the q and k heads of each token, in place, as model.apply_rope computes it:
 * x1 cos - x2 sin | x2 cos + x1 sin, with cos/sin (n x hd) per token. */
static void rope_rows(float *qkv, const float *cos, const float *sin, int64_t n, int64_t heads, int64_t width,
                      int64_t hd) {
    const int64_t half = hd / 2;
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *c = cos + i * hd, *s = sin + i * hd;
        for (int64_t h = 0; h < heads; h++) {
            float *x = qkv + i * width + h * hd;
            for (int64_t j = 0; j < half; j += 16) {
                const __mmask16 m = tail16(half - j);
                const __m512 a = _mm512_maskz_loadu_ps(m, x + j), b = _mm512_maskz_loadu_ps(m, x + half + j);
                const __m512 lo = _mm512_add_ps(_mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, c + j)),
                                                _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b),
                                                              _mm512_maskz_loadu_ps(m, s + j)));
                const __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, c + half + j)),
                                                _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, s + half + j)));
                _mm512_mask_storeu_ps(x + j, m, lo);
                _mm512_mask_storeu_ps(x + half + j, m, hi);
            }
        }
    }
}

#define INLINE static inline __attribute__((always_inline))

/* Scores of H queries (q: H x hd, already scaled) against keys [a, b) of the transposed keys kt
 * (hd x T), into sc + u * stride for query u. The queries share each load of the keys; KC blocks of
 * 16 keys at a time give H * KC independent FMA chains (one chain would wait on the FMA latency at
 * every step). H, KC: constants, so the accumulators stay in registers. */
INLINE void scores(const float *q, int64_t hd, const float *kt, int64_t T, int64_t a, int64_t b, float *sc,
                   int64_t stride, const int H, const int KC) {
    int64_t j = a;
    for (; j + 16 * KC <= b; j += 16 * KC) {
        __m512 acc[4][4];
        for (int u = 0; u < H; u++)
            for (int c = 0; c < KC; c++) acc[u][c] = _mm512_setzero_ps();
        const float *p = kt + j;
        for (int64_t d = 0; d < hd; d++, p += T) {
            __m512 key[4];
            for (int c = 0; c < KC; c++) key[c] = _mm512_loadu_ps(p + 16 * c);
            for (int u = 0; u < H; u++) {
                const __m512 x = _mm512_set1_ps(q[u * hd + d]);
                for (int c = 0; c < KC; c++) acc[u][c] = _mm512_fmadd_ps(x, key[c], acc[u][c]);
            }
        }
        for (int u = 0; u < H; u++)
            for (int c = 0; c < KC; c++) _mm512_storeu_ps(sc + u * stride + (j - a) + 16 * c, acc[u][c]);
    }
    for (; j < b; j += 16) { /* the last keys, 16 at a time: two chains a query over alternate dimensions */
        const __mmask16 m = tail16(b - j);
        __m512 acc[4][2];
        for (int u = 0; u < H; u++) acc[u][0] = acc[u][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d++) {
            const __m512 key = _mm512_maskz_loadu_ps(m, kt + d * T + j);
            for (int u = 0; u < H; u++)
                acc[u][d & 1] = _mm512_fmadd_ps(_mm512_set1_ps(q[u * hd + d]), key, acc[u][d & 1]);
        }
        for (int u = 0; u < H; u++)
            _mm512_mask_storeu_ps(sc + u * stride + (j - a), m, _mm512_add_ps(acc[u][0], acc[u][1]));
    }
}

/* Softmax of the n scores at w, in place; returns 1 / their sum of exponentials (the weights are left
 * unnormalised: the weighted sum scales once at the end). */
static inline float softmax_weights(float *w, int64_t n) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) best = _mm512_mask_max_ps(best, tail16(n - j), best, _mm512_loadu_ps(w + j));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail16(n - j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + j), top));
        _mm512_mask_storeu_ps(w + j, m, e);
        total = _mm512_mask_add_ps(total, m, total, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* out_u = inv_u * sum_j w_u[j] v[key(j)] for H queries over the same n visible keys (the first n1 at
 * 0.., the rest at s2..); value rows `width` apart, shared by the queries; NC = head_dim / 16. */
INLINE void weighted_values(const float *w, int64_t stride, int64_t n, int64_t n1, int64_t s2, const float *v,
                            int64_t width, const float *inv, float *out, int64_t out_stride, const int H,
                            const int NC) {
    __m512 acc[4][8];
    for (int u = 0; u < H; u++)
        for (int c = 0; c < NC; c++) acc[u][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const float *row = v + (j < n1 ? j : s2 + (j - n1)) * width;
        __m512 val[8];
        for (int c = 0; c < NC; c++) val[c] = _mm512_loadu_ps(row + 16 * c);
        for (int u = 0; u < H; u++) {
            const __m512 x = _mm512_set1_ps(w[u * stride + j]);
            for (int c = 0; c < NC; c++) acc[u][c] = _mm512_fmadd_ps(x, val[c], acc[u][c]);
        }
    }
    for (int u = 0; u < H; u++)
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(out + u * out_stride + 16 * c, _mm512_mul_ps(acc[u][c], _mm512_set1_ps(inv[u])));
}

/* H consecutive q heads (from h) of token i against its visible keys. */
INLINE void attend_heads(const float *qkv, int64_t i, int64_t h, int64_t n1, int64_t s2, const float *kt,
                         int64_t T, const float *v, int64_t hd, int64_t width, float scale, float *q, float *sc,
                         int64_t stride, float *out, const int H, const int NC) {
    const int64_t n = n1 + (i + 1 - s2);
    for (int u = 0; u < H; u++)
        for (int64_t d = 0; d < hd; d += 16)
            _mm512_storeu_ps(q + u * hd + d,
                             _mm512_mul_ps(_mm512_loadu_ps(qkv + i * width + (h + u) * hd + d), _mm512_set1_ps(scale)));
    const int KC = H == 1 ? 4 : 2;
    scores(q, hd, kt, T, 0, n1, sc, stride, H, KC);
    scores(q, hd, kt, T, s2, i + 1, sc + n1, stride, H, KC);
    float inv[4];
    for (int u = 0; u < H; u++) inv[u] = softmax_weights(sc + u * stride, n);
    weighted_values(sc, stride, n, n1, s2, v, width, inv, out + h * hd, hd, H, NC);
}

/* Attention of one row's queries for kv head g and its q heads, up to 16 / NC at a time (the
 * accumulators of weighted_values fill 16 registers). qkv: the row's first token; the row is T
 * tokens; prefix/seg row-relative; scratch: kt (hd x longest), scores (4 x longest), q (4 x hd). */
INLINE void row_head(const float *qkv, int64_t T, const int64_t *prefix, const int64_t *seg, int64_t g, int64_t nq,
                     int64_t nkv, int64_t hd, int64_t width, float *out, float *scratch, int64_t longest,
                     const int NC) {
    const int64_t rep = nq / nkv, most = 16 / NC < 4 ? 16 / NC : 4;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *k = qkv + (nq + g) * hd, *v = qkv + (nq + nkv + g) * hd;
    float *kt = scratch, *sc = scratch + hd * longest, *q = sc + 4 * longest;
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < hd; d++) kt[d * T + t] = k[t * width + d];
    for (int64_t i = 0; i < T; i++) {
        float *o = out + i * nq * hd;
        for (int64_t h = g * rep; h < (g + 1) * rep;) {
            const int64_t H = (g + 1) * rep - h < most ? (g + 1) * rep - h : most;
            switch (H) {
            case 1: attend_heads(qkv, i, h, prefix[i], seg[i], kt, T, v, hd, width, scale, q, sc, longest, o, 1, NC); break;
            case 2: attend_heads(qkv, i, h, prefix[i], seg[i], kt, T, v, hd, width, scale, q, sc, longest, o, 2, NC); break;
            case 3: attend_heads(qkv, i, h, prefix[i], seg[i], kt, T, v, hd, width, scale, q, sc, longest, o, 3, NC); break;
            default: attend_heads(qkv, i, h, prefix[i], seg[i], kt, T, v, hd, width, scale, q, sc, longest, o, 4, NC); break;
            }
            h += H;
        }
    }
}

/* qkv (n x (nq + 2 nkv) hd): rotated in place; cos/sin (n x hd); starts (rows + 1): row boundaries in
 * tokens; prefix/seg (n): row-relative, as model.ragged.RaggedRows (prefix[i] <= seg[i] <= i's place
 * in its row); out (n x nq hd); hd one of 16, 32, 64, 128. scratch: threads ((hd + 4) longest + 4 hd)
 * floats, longest the longest row. */
void herd_ragged_attention_f32(float *qkv, const float *cos, const float *sin, const int64_t *starts,
                               const int64_t *prefix, const int64_t *seg, int64_t rows, int64_t nq, int64_t nkv,
                               int64_t hd, float *out, float *scratch, int64_t longest, int64_t threads) {
    const int64_t width = (nq + 2 * nkv) * hd;
    #pragma omp parallel num_threads(threads)
    {
        rope_rows(qkv, cos, sin, starts[rows], nq + nkv, width, hd); /* ends in a barrier */
        float *mine = scratch + omp_get_thread_num() * ((hd + 4) * longest + 4 * hd);
        #pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t g = 0; g < nkv; g++) {
                const int64_t s = starts[r], T = starts[r + 1] - s;
                const float *x = qkv + s * width;
                float *o = out + s * nq * hd;
                switch (hd / 16) {
                case 1: row_head(x, T, prefix + s, seg + s, g, nq, nkv, hd, width, o, mine, longest, 1); break;
                case 2: row_head(x, T, prefix + s, seg + s, g, nq, nkv, hd, width, o, mine, longest, 2); break;
                case 4: row_head(x, T, prefix + s, seg + s, g, nq, nkv, hd, width, o, mine, longest, 4); break;
                default: row_head(x, T, prefix + s, seg + s, g, nq, nkv, hd, width, o, mine, longest, 8); break;
                }
            }
    }
}
