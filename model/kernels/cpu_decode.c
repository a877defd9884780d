/* Kernels for one-row decode steps on x86 CPUs (AVX-512; bf16 needs AVX512-BF16): matrix-vector
 * products and RMSNorm.
 *
 * gemv: y[r] = sum_j w[r*k + j] * x[j], w row-major (n x k). Decode reads every weight once per token, so
 * what counts is streaming w at the memory's speed: four rows at a time share each load of x, and a
 * software prefetch PF bytes ahead keeps enough reads in flight (on SmolLM2's small per-layer
 * matrices torch's bf16 mv streamed ~10 GB/s here, these loops ~20-25). Rows split over `threads`
 * OpenMP threads (this library resolves libgomp to the copy torch already loaded). */
#include <immintrin.h>
#include <stdint.h>

#ifndef PF
#define PF 8192
#endif

static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffff) > 0x7f800000) return (uint16_t)((v.u >> 16) | 0x40); /* NaN stays NaN */
    v.u += 0x7fff + ((v.u >> 16) & 1); /* round to nearest even, as torch does */
    return (uint16_t)(v.u >> 16);
}

void herd_gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t n, int64_t k, int64_t threads) {
    const int64_t full = k / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (k - full)) - 1);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < n; r0 += 4) {
        const int64_t rows = n - r0 < 4 ? n - r0 : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t j = 0; j < full; j += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j);
            for (int64_t i = 0; i < rows; i++) {
                const uint16_t *p = w + (r0 + i) * k + j;
                _mm_prefetch((const char *)p + PF, _MM_HINT_T0);
                acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(p), xv);
            }
        }
        if (tail) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full);
            for (int64_t i = 0; i < rows; i++)
                acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (r0 + i) * k + full), xv);
        }
        for (int64_t i = 0; i < rows; i++) y[r0 + i] = to_bf16(_mm512_reduce_add_ps(acc[i]));
    }
}

void herd_gemv_f32(const float *w, const float *x, float *y, int64_t n, int64_t k, int64_t threads) {
    const int64_t full = k / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - full)) - 1);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < n; r0 += 4) {
        const int64_t rows = n - r0 < 4 ? n - r0 : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t j = 0; j < full; j += 16) {
            __m512 xv = _mm512_loadu_ps(x + j);
            for (int64_t i = 0; i < rows; i++) {
                const float *p = w + (r0 + i) * k + j;
                _mm_prefetch((const char *)p + PF, _MM_HINT_T0);
                acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(p), xv, acc[i]);
            }
        }
        if (tail) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
            for (int64_t i = 0; i < rows; i++)
                acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + (r0 + i) * k + full), xv, acc[i]);
        }
        for (int64_t i = 0; i < rows; i++) y[r0 + i] = _mm512_reduce_add_ps(acc[i]);
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

/* bf16 is a constant in each caller, so the compiler emits one loop per dtype. */
static inline void rms_norm(const void *x, const void *w, void *y, int64_t rows, int64_t d, float eps,
                            int64_t threads, int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * d * size;
        char *yr = (char *)y + r * d * size;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; j += 16) {
            __mmask16 m = d - j >= 16 ? 0xffff : (__mmask16)((1u << (d - j)) - 1);
            __m512 v = load16(m, xr, j, bf16);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        __m512 rs = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / (float)d + eps));
        for (int64_t j = 0; j < d; j += 16) {
            __mmask16 m = d - j >= 16 ? 0xffff : (__mmask16)((1u << (d - j)) - 1);
            __m512 v = _mm512_mul_ps(load16(m, xr, j, bf16), rs);
            if (bf16) v = round_bf16(v);
            store16(m, yr, j, _mm512_mul_ps(v, load16(m, w, j, bf16)), bf16);
        }
    }
}

void herd_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps, int64_t threads) {
    rms_norm(x, w, y, rows, d, eps, threads, 0);
}

void herd_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t d, float eps,
                        int64_t threads) {
    rms_norm(x, w, y, rows, d, eps, threads, 1);
}
