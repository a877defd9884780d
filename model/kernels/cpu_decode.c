/* Kernels for one-row decode steps on x86 CPUs (AVX-512; bf16 needs AVX512-BF16): matrix-vector
 * products and RMSNorm.
 *
 * gemv: y[r] = sum_j w[r*k + j] * x[j], w row-major (n x k). Decode reads every weight once per token, so
 * what counts is streaming w at the memory's speed: four rows at a time share each load of x, and a
 * software prefetch PF bytes ahead into L2 keeps enough reads in flight (a core has few L1 fill
 * buffers: prefetching into L1 8 KB ahead streamed ~18-22 GB/s here, into L2 16 KB ahead ~25-35, torch's
 * sum over one large tensor ~30-34; torch's bf16 mv ~10 on SmolLM2's layer shapes). Rows split over
 * `threads` OpenMP threads (this library resolves libgomp to the copy torch already loaded). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#ifndef PF
#define PF 16384
#endif

static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffff) > 0x7f800000) return (uint16_t)((v.u >> 16) | 0x40); /* NaN stays NaN */
    v.u += 0x7fff + ((v.u >> 16) & 1); /* round to nearest even, as torch does */
    return (uint16_t)(v.u >> 16);
}

/* The dot products of up to 4 rows (row i at w[i]) with x: the inner loop of every matrix-vector
 * product here. The rows share each load of x. */
static inline void dot_rows_bf16(const uint16_t *const w[4], int64_t rows, const uint16_t *x, int64_t k,
                                 float out[4]) {
    const int64_t full = k / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (k - full)) - 1);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < full; j += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j);
        for (int64_t i = 0; i < rows; i++) {
            _mm_prefetch((const char *)(w[i] + j) + PF, PF_HINT);
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(w[i] + j), xv);
        }
    }
    if (tail) {
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full);
        for (int64_t i = 0; i < rows; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail, w[i] + full), xv);
    }
    for (int64_t i = 0; i < rows; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

static inline void dot_rows_f32(const float *const w[4], int64_t rows, const float *x, int64_t k, float out[4]) {
    const int64_t full = k / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - full)) - 1);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < full; j += 16) {
        __m512 xv = _mm512_loadu_ps(x + j);
        for (int64_t i = 0; i < rows; i++) {
            _mm_prefetch((const char *)(w[i] + j) + PF, PF_HINT);
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w[i] + j), xv, acc[i]);
        }
    }
    if (tail) {
        __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
        for (int64_t i = 0; i < rows; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w[i] + full), xv, acc[i]);
    }
    for (int64_t i = 0; i < rows; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

/* Rows r0.. r0+rows-1 of a row-major (n x k) matrix of either dtype; x in the same dtype. */
static inline void dot_block(const void *w, int64_t r0, int64_t rows, int64_t k, const void *x, float out[4],
                             int bf16) {
    if (bf16) {
        const uint16_t *p[4];
        for (int64_t i = 0; i < rows; i++) p[i] = (const uint16_t *)w + (r0 + i) * k;
        dot_rows_bf16(p, rows, (const uint16_t *)x, k, out);
    } else {
        const float *p[4];
        for (int64_t i = 0; i < rows; i++) p[i] = (const float *)w + (r0 + i) * k;
        dot_rows_f32(p, rows, (const float *)x, k, out);
    }
}

void herd_gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t n, int64_t k, int64_t threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < n; r0 += 4) {
        const int64_t rows = n - r0 < 4 ? n - r0 : 4;
        float out[4];
        dot_block(w, r0, rows, k, x, out, 1);
        for (int64_t i = 0; i < rows; i++) y[r0 + i] = to_bf16(out[i]);
    }
}

void herd_gemv_f32(const float *w, const float *x, float *y, int64_t n, int64_t k, int64_t threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < n; r0 += 4) {
        const int64_t rows = n - r0 < 4 ? n - r0 : 4;
        float out[4];
        dot_block(w, r0, rows, k, x, out, 0);
        for (int64_t i = 0; i < rows; i++) y[r0 + i] = out[i];
    }
}

/* RMSNorm over the last dimension of contiguous rows, fp32 inside, written as model.RMSNorm
 * computes it: fp32 y = x * rstd * w; bf16 y = bf16(w * bf16(x * rstd)). A one-row decode step
 * runs two a layer, and torch's composite costs ~30 us each here, this ~1 us. */
static inline __m512 load16(__mmask16 m, const void *p, int64_t j, int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + j);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + j);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void store16(__mmask16 m, void *p, int64_t j, __m512 v, int bf16) {
    if (!bf16) _mm512_mask_storeu_ps((float *)p + j, m, v);
    else _mm256_mask_storeu_epi16((uint16_t *)p + j, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __m512 round_bf16(__m512 v) {
    __m256bh h = _mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

/* One row; x may be fp32 while w and y are bf16 (the decode step keeps its residual in fp32). */
static inline void rms_norm_row(const void *x, int x_bf16, const void *w, void *y, int64_t d, float eps, int bf16) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
        __mmask16 m = d - j >= 16 ? 0xffff : (__mmask16)((1u << (d - j)) - 1);
        __m512 v = load16(m, x, j, x_bf16);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    __m512 rs = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / (float)d + eps));
    for (int64_t j = 0; j < d; j += 16) {
        __mmask16 m = d - j >= 16 ? 0xffff : (__mmask16)((1u << (d - j)) - 1);
        __m512 v = _mm512_mul_ps(load16(m, x, j, x_bf16), rs);
        if (bf16) v = round_bf16(v);
        store16(m, y, j, _mm512_mul_ps(v, load16(m, w, j, bf16)), bf16);
    }
}

/* bf16 is a constant in each caller, so the compiler emits one loop per dtype. */
static inline void rms_norm(const void *x, const void *w, void *y, int64_t rows, int64_t d, float eps,
                            int64_t threads, int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows > 8)
    for (int64_t r = 0; r < rows; r++)
        rms_norm_row((const char *)x + r * d * size, bf16, w, (char *)y + r * d * size, d, eps, bf16);
}

void herd_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps, int64_t threads) {
    rms_norm(x, w, y, rows, d, eps, threads, 0);
}

void herd_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t d, float eps,
                        int64_t threads) {
    rms_norm(x, w, y, rows, d, eps, threads, 1);
}

/* A whole decode step for one sequence: every layer and the output projection in one call and one
 * OpenMP team. Decode reads each weight once per token; torch runs ~20 small ops a layer around
 * those reads, whose dispatch cost here (~12-17 ms of a ~42 ms SmolLM2 fp32 token) is what this
 * removes. Rounds where model.py's bf16 path rounds (each op's bf16 output), so the two agree up to
 * summation order; fp32 is fp32 throughout. Layout as model.py: fused wqkv (q heads, k heads,
 * v heads) and w13 (gate rows, up rows), rotate-half RoPE, the cache as kv_view below. */
typedef struct {
    const void *attn_norm, *wqkv, *wo, *ffn_norm, *w13, *w2;
} herd_layer;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab;
    float eps;
    const float *inv_freq; /* head_dim / 2 */
    const herd_layer *layers;
    const void *norm, *output, *embedding;
} herd_model;

static inline float rnd(float v, int bf16) {
    if (!bf16) return v;
    union { uint32_t u; float f; } r = { (uint32_t)to_bf16(v) << 16 };
    return r.f;
}

static inline float elem(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    union { uint32_t u; float f; } r = { (uint32_t)((const uint16_t *)p)[i] << 16 };
    return r.f;
}

static inline void put(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = to_bf16(v);
    else ((float *)p)[i] = v;
}

/* y = W x over the team (an orphaned omp for): into y (fp32, rounded as the dtype), added to a
 * residual `acc` (acc = rnd(acc + rnd(y))), or stored in the dtype (`out`). */
static inline void team_matvec(const void *w, const void *x, int64_t n, int64_t k, float *y, float *acc, void *out,
                               int bf16) {
    #pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < n; r0 += 4) {
        const int64_t rows = n - r0 < 4 ? n - r0 : 4;
        float o[4];
        dot_block(w, r0, rows, k, x, o, bf16);
        for (int64_t i = 0; i < rows; i++) {
            if (y) y[r0 + i] = rnd(o[i], bf16);
            else if (acc) acc[r0 + i] = rnd(acc[r0 + i] + rnd(o[i], bf16), bf16);
            else put(out, r0 + i, o[i], bf16);
        }
    }
}

/* gate and up rows in one pass (they share x), then silu(gate) * up in the dtype. */
static inline void team_gate_up(const void *w13, const void *x, int64_t hidden, int64_t k, void *h, int bf16) {
    #pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < hidden; r0 += 2) {
        const int64_t pairs = hidden - r0 < 2 ? 1 : 2;
        const int64_t idx[4] = {r0, r0 + 1, hidden + r0, hidden + r0 + 1};
        float o[4];
        if (bf16) {
            const uint16_t *p[4];
            for (int i = 0; i < 2 * pairs; i++) p[i] = (const uint16_t *)w13 + idx[i < pairs ? i : 2 + i - pairs] * k;
            dot_rows_bf16(p, 2 * pairs, (const uint16_t *)x, k, o);
        } else {
            const float *p[4];
            for (int i = 0; i < 2 * pairs; i++) p[i] = (const float *)w13 + idx[i < pairs ? i : 2 + i - pairs] * k;
            dot_rows_f32(p, 2 * pairs, (const float *)x, k, o);
        }
        for (int64_t i = 0; i < pairs; i++) {
            const float g = rnd(o[i], bf16), u = rnd(o[pairs + i], bf16);
            put(h, r0 + i, rnd(g / (1.0f + expf(-g)), bf16) * u, bf16);
        }
    }
}

/* Where keys and values live. The cache is a pool of blocks (n_blocks, n_kv_heads, block_size,
 * head_dim) per layer: position t of a sequence is in block table[t / block_size] at row
 * t % block_size. A dense cache (slots, n_kv_heads, max_len, head_dim) is the same with one block a
 * sequence (block_size = max_len, table = {slot}). Strides are in elements. */
typedef struct {
    const int64_t *table;
    int64_t block_size, block_stride, head_stride;
} kv_view;

static inline int64_t kv_offset(const kv_view *c, int64_t g, int64_t t, int64_t hd) {
    return c->table[t / c->block_size] * c->block_stride + g * c->head_stride + (t % c->block_size) * hd;
}

/* One query against positions 0..pos of kv head g; out in the dtype. */
static inline void attend(const float *q, const char *k, const char *v, const kv_view *c, int64_t g, int64_t pos,
                          int64_t hd, float *scores, void *out, int bf16) {
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t size = bf16 ? 2 : 4;
    float best = -INFINITY;
    for (int64_t b0 = 0; b0 <= pos; b0 += c->block_size) {
        const char *kb = k + kv_offset(c, g, b0, hd) * size;
        const int64_t n = pos + 1 - b0 < c->block_size ? pos + 1 - b0 : c->block_size;
        for (int64_t t = 0; t < n; t++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < hd; j += 16) {
                __mmask16 m = hd - j >= 16 ? 0xffff : (__mmask16)((1u << (hd - j)) - 1);
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + j), load16(m, kb + t * hd * size, j, bf16), acc);
            }
            const float s = _mm512_reduce_add_ps(acc) * scale;
            scores[b0 + t] = s;
            best = s > best ? s : best;
        }
    }
    float total = 0.0f;
    for (int64_t t = 0; t <= pos; t++) total += scores[t] = expf(scores[t] - best);
    for (int64_t j = 0; j < hd; j += 16) {
        __mmask16 m = hd - j >= 16 ? 0xffff : (__mmask16)((1u << (hd - j)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b0 = 0; b0 <= pos; b0 += c->block_size) {
            const char *vb = v + kv_offset(c, g, b0, hd) * size;
            const int64_t n = pos + 1 - b0 < c->block_size ? pos + 1 - b0 : c->block_size;
            for (int64_t t = 0; t < n; t++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[b0 + t]), load16(m, vb + t * hd * size, j, bf16), acc);
        }
        store16(m, out, j, _mm512_mul_ps(acc, _mm512_set1_ps(1.0f / total)), bf16);
    }
}

/* Rotary (rotate-half, as apply_rope) on the q and k heads of one token's fp32 q|k|v, in place;
 * then its k and v heads into the layer's cache at pos. cs: cos then sin, head_dim / 2 each. */
static inline void rope_and_store(float *qkv, const float *cs, int64_t nh, int64_t nkv, int64_t hd, char *k,
                                  char *v, const kv_view *c, int64_t pos, int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t h = 0; h < nh + nkv; h++) {
        float *x = qkv + h * hd;
        for (int64_t i = 0; i < hd / 2; i++) {
            const float a = x[i], b = x[hd / 2 + i], cv = cs[i], s = cs[hd / 2 + i];
            x[i] = rnd(rnd(a * cv, bf16) + rnd(-b * s, bf16), bf16);
            x[hd / 2 + i] = rnd(rnd(b * cv, bf16) + rnd(a * s, bf16), bf16);
        }
    }
    for (int64_t g = 0; g < nkv; g++) {
        const int64_t at = kv_offset(c, g, pos, hd) * size;
        for (int64_t j = 0; j < hd; j++) {
            put(k + at, j, qkv[(nh + g) * hd + j], bf16);
            put(v + at, j, qkv[(nh + nkv + g) * hd + j], bf16);
        }
    }
}

/* The attention of a batched decode step (one new token in each of `rows` sequences), from the fused
 * q|k|v projection to the heads' outputs: rotary, the cache write at each row's own position, and
 * attention over each row's own keys. torch runs this as ~12 ops a layer, and its CPU SDPA over a
 * padded, masked span cost ~1.2 ms a layer at 32 SmolLM2 rows, where the work is ~10 MFLOP.
 * qkv (rows x (nh + 2 nkv) hd), cos/sin (rows x hd, the model's rope_cos_sin) and out (rows x nh hd) in
 * the dtype; row r's block table is at tables + r * table_stride and it writes at pos[r]. k/v: this
 * layer's cache. scratch: rows (nh + 2 nkv + 1) hd + threads max_keys floats. */
static inline void attention_step(const void *qkv, const void *cos, const void *sin, int64_t rows,
                                  const int64_t *tables, int64_t table_stride, const int64_t *pos, void *k, void *v,
                                  int64_t block_size, int64_t block_stride, int64_t head_stride, int64_t nh,
                                  int64_t nkv, int64_t hd, void *out, float *scratch, int64_t max_keys,
                                  int64_t threads, int bf16) {
    const int64_t width = (nh + 2 * nkv) * hd;
    float *q = scratch, *scores = scratch + rows * (width + hd);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const kv_view c = {tables + r * table_stride, block_size, block_stride, head_stride};
            float *x = q + r * width, *cs = q + rows * width + r * hd;
            for (int64_t j = 0; j < width; j++) x[j] = elem(qkv, r * width + j, bf16);
            for (int64_t i = 0; i < hd / 2; i++) {
                cs[i] = elem(cos, r * hd + i, bf16);
                cs[hd / 2 + i] = elem(sin, r * hd + i, bf16);
            }
            rope_and_store(x, cs, nh, nkv, hd, (char *)k, (char *)v, &c, pos[r], bf16);
        }
        float *mine = scores + omp_get_thread_num() * max_keys;
        #pragma omp for collapse(2) schedule(static)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t h = 0; h < nh; h++) {
                const kv_view c = {tables + r * table_stride, block_size, block_stride, head_stride};
                attend(q + r * width + h * hd, (const char *)k, (const char *)v, &c, h / (nh / nkv), pos[r], hd,
                       mine, (char *)out + (r * nh + h) * hd * (bf16 ? 2 : 4), bf16);
            }
    }
}

/* One entry for both dtypes: each branch passes a constant, so each compiles its own loop. */
void herd_attention_step(int64_t bf16, const void *qkv, const void *cos, const void *sin, int64_t rows,
                         const int64_t *tables, int64_t table_stride, const int64_t *pos, void *k, void *v,
                         int64_t block_size, int64_t block_stride, int64_t head_stride, int64_t nh, int64_t nkv,
                         int64_t hd, void *out, float *scratch, int64_t max_keys, int64_t threads) {
    if (bf16)
        attention_step(qkv, cos, sin, rows, tables, table_stride, pos, k, v, block_size, block_stride, head_stride,
                       nh, nkv, hd, out, scratch, max_keys, threads, 1);
    else
        attention_step(qkv, cos, sin, rows, tables, table_stride, pos, k, v, block_size, block_stride, head_stride,
                       nh, nkv, hd, out, scratch, max_keys, threads, 0);
}

/* scratch (fp32): dim + (n_heads + 2 n_kv_heads) head_dim + head_dim + n_heads (pos + 1) floats, then
 * room for max(dim, hidden) elements of the dtype. k_cache/v_cache: the whole cache; layer l at
 * + l * layer_stride; the sequence's blocks in table (kv_view). */
static inline void decode_step(const herd_model *m, int64_t token, int64_t pos, const int64_t *table,
                               int64_t block_size, void *k_cache, void *v_cache, int64_t layer_stride,
                               int64_t block_stride, int64_t head_stride, void *logits, float *scratch,
                               int64_t threads, int bf16) {
    const int64_t dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, size = bf16 ? 2 : 4;
    const kv_view c = {table, block_size, block_stride, head_stride};
    float *x = scratch, *qkv = x + dim, *cs = qkv + (nh + 2 * nkv) * hd, *scores = cs + hd;
    void *xin = scores + nh * (pos + 1);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        {
            for (int64_t j = 0; j < dim; j++) x[j] = elem(m->embedding, token * dim + j, bf16);
            for (int64_t i = 0; i < hd / 2; i++) {
                const float angle = (float)pos * m->inv_freq[i];
                cs[i] = rnd(cosf(angle), bf16);
                cs[hd / 2 + i] = rnd(sinf(angle), bf16);
            }
        }
        for (int64_t l = 0; l < m->n_layers; l++) {
            const herd_layer *L = &m->layers[l];
            char *kl = (char *)k_cache + l * layer_stride * size, *vl = (char *)v_cache + l * layer_stride * size;
            #pragma omp single
            rms_norm_row(x, 0, L->attn_norm, xin, dim, m->eps, bf16);
            team_matvec(L->wqkv, xin, (nh + 2 * nkv) * hd, dim, qkv, NULL, NULL, bf16);
            #pragma omp single
            rope_and_store(qkv, cs, nh, nkv, hd, kl, vl, &c, pos, bf16);
            #pragma omp for schedule(static)
            for (int64_t h = 0; h < nh; h++)
                attend(qkv + h * hd, kl, vl, &c, h / (nh / nkv), pos, hd, scores + h * (pos + 1),
                       (char *)xin + h * hd * size, bf16);
            team_matvec(L->wo, xin, dim, nh * hd, NULL, x, NULL, bf16);
            #pragma omp single
            rms_norm_row(x, 0, L->ffn_norm, xin, dim, m->eps, bf16);
            /* the gated hidden goes after xin's dim elements: xin is still being read */
            void *h = (char *)xin + dim * size;
            team_gate_up(L->w13, xin, m->hidden, dim, h, bf16);
            team_matvec(L->w2, h, dim, m->hidden, NULL, x, NULL, bf16);
        }
        #pragma omp single
        rms_norm_row(x, 0, m->norm, xin, dim, m->eps, bf16);
        team_matvec(m->output, xin, m->vocab, dim, NULL, NULL, logits, bf16);
    }
}

void herd_decode_f32(const herd_model *m, int64_t token, int64_t pos, const int64_t *table, int64_t block_size,
                     void *k_cache, void *v_cache, int64_t layer_stride, int64_t block_stride, int64_t head_stride,
                     void *logits, float *scratch, int64_t threads) {
    decode_step(m, token, pos, table, block_size, k_cache, v_cache, layer_stride, block_stride, head_stride, logits,
                scratch, threads, 0);
}

void herd_decode_bf16(const herd_model *m, int64_t token, int64_t pos, const int64_t *table, int64_t block_size,
                      void *k_cache, void *v_cache, int64_t layer_stride, int64_t block_stride, int64_t head_stride,
                      void *logits, float *scratch, int64_t threads) {
    decode_step(m, token, pos, table, block_size, k_cache, v_cache, layer_stride, block_stride, head_stride, logits,
                scratch, threads, 1);
}
