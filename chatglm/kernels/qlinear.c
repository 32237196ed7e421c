/* Weight-only quantized matrix-vector and small-batch products for CPUs.
 *
 *   y[n, r] = sum_k W[r, k] * x[n, k] (+ bias[r])      x fp32 [N, K], y fp32 [N, R], N small (decode)
 *
 * W is THUDM's layout: int8 [R, K], or int4 packed [R, K/2] with column 2j in the high nibble of byte j
 * (signed two's-complement nibbles), times an absmax scale per row [R] or per group of columns [R, K/G]
 * (fp16 or fp32); or plain fp16 [R, K] (the unquantized output layer, stored at half size).
 * Accumulation is fp32 FMA: the result equals dequantize-then-matmul up to summation order.
 *
 * An AVX2/FMA/F16C path is chosen at run time; portable C otherwise. OpenMP splits the output rows.
 * int4 trick: with u = nibble ^ 8 (0..15), s = u - 8, so sum s*x = sum u*x - 8 * sum x; u converts with an
 * unsigned widening, and x is split once per call into even and odd columns to match the nibble order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CG_X86 1
#endif

#define MAXN 8

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float get_scale(const void *scale, int f16, int64_t i) {
    return f16 ? half_to_float(((const uint16_t *)scale)[i]) : ((const float *)scale)[i];
}

int cg_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void cg_set_num_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

int cg_has_avx2(void) {
#if defined(CG_X86) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ portable */

/* Dot products of one weight row with N activation rows, over columns [k0, k1). */
static void row_portable(const int8_t *w, int bits, const float *x, int64_t N, int64_t K, int64_t k0, int64_t k1,
                         float *acc) {
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * K;
        float s = 0.f;
        if (bits == 8) {
            for (int64_t k = k0; k < k1; k++) s += (float)w[k] * xn[k];
        } else {
            for (int64_t k = k0; k < k1; k += 2) {
                int8_t b = w[k / 2];
                s += (float)(b >> 4) * xn[k] + (float)((int8_t)(b << 4) >> 4) * xn[k + 1];
            }
        }
        acc[n] = s;
    }
}

static void qlinear_portable(const float *x, int64_t N, int64_t K, const int8_t *w, const void *scale, int scale_f16,
                             int64_t R, int bits, int64_t G, const float *bias, float *y) {
    int64_t row_bytes = bits == 8 ? K : K / 2, groups = G > 0 ? K / G : 1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        float out[MAXN], acc[MAXN];
        const int8_t *wr = w + r * row_bytes;
        for (int64_t n = 0; n < N; n++) out[n] = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            int64_t k0 = G > 0 ? g * G : 0, k1 = G > 0 ? k0 + G : K;
            row_portable(wr, bits, x, N, K, k0, k1, acc);
            float s = get_scale(scale, scale_f16, r * groups + g);
            for (int64_t n = 0; n < N; n++) out[n] += s * acc[n];
        }
        for (int64_t n = 0; n < N; n++) y[n * R + r] = out[n] + (bias ? bias[r] : 0.f);
    }
}

static void f16linear_portable(const float *x, int64_t N, int64_t K, const uint16_t *w, int64_t R, const float *bias,
                               float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *wr = w + r * K;
        for (int64_t n = 0; n < N; n++) {
            const float *xn = x + n * K;
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += half_to_float(wr[k]) * xn[k];
            y[n * R + r] = s + (bias ? bias[r] : 0.f);
        }
    }
}

/* ------------------------------------------------------------------ AVX2 */
#ifdef CG_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* int8 row over [k0, k1), k1 - k0 a multiple of 16, for NB activation rows. */
#define DEF_INT8(NB)                                                                                              \
    AVX2 static inline void dot8_##NB(const int8_t *w, const float *x, int64_t K, int64_t k0, int64_t k1,         \
                                      float *out) {                                                               \
        __m256 acc[NB];                                                                                           \
        for (int n = 0; n < NB; n++) acc[n] = _mm256_setzero_ps();                                                \
        for (int64_t k = k0; k < k1; k += 16) {                                                                   \
            __m128i b = _mm_loadu_si128((const __m128i *)(w + k));                                                \
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));                                              \
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));                       \
            for (int n = 0; n < NB; n++) {                                                                        \
                acc[n] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + n * K + k), acc[n]);                             \
                acc[n] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + n * K + k + 8), acc[n]);                         \
            }                                                                                                     \
        }                                                                                                         \
        for (int n = 0; n < NB; n++) out[n] = hsum(acc[n]);                                                       \
    }
DEF_INT8(1)
DEF_INT8(2)
DEF_INT8(4)
DEF_INT8(8)

/* int4 row over columns [k0, k1), a multiple of 32; xe/xo are the even/odd columns of x ([N, K/2] each);
 * returns sum u*x (the caller subtracts 8 * sum x). */
#define DEF_INT4(NB)                                                                                              \
    AVX2 static inline void dot4_##NB(const int8_t *w, const float *xe, const float *xo, int64_t H, int64_t k0,   \
                                      int64_t k1, float *out) {                                                   \
        __m256 acc[NB];                                                                                           \
        const __m128i flip = _mm_set1_epi8((char)0x88), low = _mm_set1_epi8(0x0f);                                \
        for (int n = 0; n < NB; n++) acc[n] = _mm256_setzero_ps();                                                \
        for (int64_t j = k0 / 2; j < k1 / 2; j += 16) {                                                           \
            __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(w + j)), flip);                          \
            __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low), lo = _mm_and_si128(b, low);                    \
            __m256 h0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));                                             \
            __m256 h1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));                     \
            __m256 l0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));                                             \
            __m256 l1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));                     \
            for (int n = 0; n < NB; n++) {                                                                        \
                const float *e = xe + n * H + j, *o = xo + n * H + j;                                             \
                acc[n] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(e), acc[n]);                                         \
                acc[n] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(e + 8), acc[n]);                                     \
                acc[n] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(o), acc[n]);                                         \
                acc[n] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(o + 8), acc[n]);                                     \
            }                                                                                                     \
        }                                                                                                         \
        for (int n = 0; n < NB; n++) out[n] = hsum(acc[n]);                                                       \
    }
DEF_INT4(1)
DEF_INT4(2)
DEF_INT4(4)
DEF_INT4(8)

#define DEF_F16(NB)                                                                                               \
    AVX2 static inline void dot16_##NB(const uint16_t *w, const float *x, int64_t K, int64_t k1, float *out) {    \
        __m256 acc[NB];                                                                                           \
        for (int n = 0; n < NB; n++) acc[n] = _mm256_setzero_ps();                                                \
        for (int64_t k = 0; k < k1; k += 8) {                                                                     \
            __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k)));                               \
            for (int n = 0; n < NB; n++) acc[n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + n * K + k), acc[n]);    \
        }                                                                                                         \
        for (int n = 0; n < NB; n++) out[n] = hsum(acc[n]);                                                       \
    }
DEF_F16(1)
DEF_F16(2)
DEF_F16(4)
DEF_F16(8)

AVX2 static void dot8(const int8_t *w, const float *x, int64_t N, int64_t K, int64_t k0, int64_t k1, float *out) {
    int64_t kv = k0 + (k1 - k0) / 16 * 16;
    for (int64_t n0 = 0; n0 < N;) {
        int64_t nb = N - n0 >= 8 ? 8 : N - n0 >= 4 ? 4 : N - n0 >= 2 ? 2 : 1;
        const float *xn = x + n0 * K;
        if (nb == 8) dot8_8(w, xn, K, k0, kv, out + n0);
        else if (nb == 4) dot8_4(w, xn, K, k0, kv, out + n0);
        else if (nb == 2) dot8_2(w, xn, K, k0, kv, out + n0);
        else dot8_1(w, xn, K, k0, kv, out + n0);
        for (int64_t n = n0; n < n0 + nb; n++)
            for (int64_t k = kv; k < k1; k++) out[n] += (float)w[k] * x[n * K + k];
        n0 += nb;
    }
}

AVX2 static void dot4(const int8_t *w, const float *xe, const float *xo, int64_t N, int64_t K, int64_t k0,
                      int64_t k1, float *out) {
    int64_t H = K / 2, kv = k0 + (k1 - k0) / 32 * 32;
    for (int64_t n0 = 0; n0 < N;) {
        int64_t nb = N - n0 >= 8 ? 8 : N - n0 >= 4 ? 4 : N - n0 >= 2 ? 2 : 1;
        const float *e = xe + n0 * H, *o = xo + n0 * H;
        if (nb == 8) dot4_8(w, e, o, H, k0, kv, out + n0);
        else if (nb == 4) dot4_4(w, e, o, H, k0, kv, out + n0);
        else if (nb == 2) dot4_2(w, e, o, H, k0, kv, out + n0);
        else dot4_1(w, e, o, H, k0, kv, out + n0);
        for (int64_t n = n0; n < n0 + nb; n++)
            for (int64_t j = kv / 2; j < k1 / 2; j++) {
                int b = (uint8_t)w[j] ^ 0x88;
                out[n] += (float)(b >> 4) * xe[n * H + j] + (float)(b & 15) * xo[n * H + j];
            }
        n0 += nb;
    }
}

AVX2 static void qlinear_avx2(const float *x, int64_t N, int64_t K, const int8_t *w, const void *scale, int scale_f16,
                              int64_t R, int bits, int64_t G, const float *bias, float *y) {
    int64_t groups = G > 0 ? K / G : 1, gk = G > 0 ? G : K, H = K / 2, row_bytes = bits == 8 ? K : H;
    float *xe = NULL, *xo = NULL, *xsum = NULL;
    if (bits == 4) {
        /* split x into even and odd columns, and sum it per group: once per call */
        xe = malloc(sizeof(float) * N * H);
        xo = malloc(sizeof(float) * N * H);
        xsum = malloc(sizeof(float) * N * groups);
        for (int64_t n = 0; n < N; n++) {
            for (int64_t j = 0; j < H; j++) {
                xe[n * H + j] = x[n * K + 2 * j];
                xo[n * H + j] = x[n * K + 2 * j + 1];
            }
            for (int64_t g = 0; g < groups; g++) {
                float s = 0.f;
                for (int64_t k = g * gk; k < (g + 1) * gk; k++) s += x[n * K + k];
                xsum[n * groups + g] = s;
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        float out[MAXN], acc[MAXN];
        const int8_t *wr = w + r * row_bytes;
        for (int64_t n = 0; n < N; n++) out[n] = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            int64_t k0 = g * gk, k1 = k0 + gk;
            if (bits == 8) {
                dot8(wr, x, N, K, k0, k1, acc);
            } else {
                dot4(wr, xe, xo, N, K, k0, k1, acc);
                for (int64_t n = 0; n < N; n++) acc[n] -= 8.f * xsum[n * groups + g];
            }
            float s = get_scale(scale, scale_f16, r * groups + g);
            for (int64_t n = 0; n < N; n++) out[n] += s * acc[n];
        }
        for (int64_t n = 0; n < N; n++) y[n * R + r] = out[n] + (bias ? bias[r] : 0.f);
    }
    free(xe);
    free(xo);
    free(xsum);
}

AVX2 static void f16linear_avx2(const float *x, int64_t N, int64_t K, const uint16_t *w, int64_t R, const float *bias,
                                float *y) {
    int64_t kv = K / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *wr = w + r * K;
        float out[MAXN];
        for (int64_t n0 = 0; n0 < N;) {
            int64_t nb = N - n0 >= 8 ? 8 : N - n0 >= 4 ? 4 : N - n0 >= 2 ? 2 : 1;
            const float *xn = x + n0 * K;
            if (nb == 8) dot16_8(wr, xn, K, kv, out + n0);
            else if (nb == 4) dot16_4(wr, xn, K, kv, out + n0);
            else if (nb == 2) dot16_2(wr, xn, K, kv, out + n0);
            else dot16_1(wr, xn, K, kv, out + n0);
            for (int64_t n = n0; n < n0 + nb; n++)
                for (int64_t k = kv; k < K; k++) out[n] += half_to_float(wr[k]) * x[n * K + k];
            n0 += nb;
        }
        for (int64_t n = 0; n < N; n++) y[n * R + r] = out[n] + (bias ? bias[r] : 0.f);
    }
}
#endif

/* ------------------------------------------------------------------ entry points */

/* Returns 0 on success, -1 on bad arguments. impl: 0 = best available, 1 = portable. */
int cg_qlinear(const float *x, int64_t N, int64_t K, const int8_t *w, const void *scale, int scale_f16, int64_t R,
               int bits, int64_t G, const float *bias, float *y, int impl) {
    if (N < 1 || N > MAXN || K < 1 || R < 1 || (bits != 4 && bits != 8) || (bits == 4 && K % 2) ||
        (G > 0 && (K % G || (bits == 4 && G % 2))))
        return -1;
#ifdef CG_X86
    if (impl == 0 && cg_has_avx2()) {
        qlinear_avx2(x, N, K, w, scale, scale_f16, R, bits, G, bias, y);
        return 0;
    }
#endif
    qlinear_portable(x, N, K, w, scale, scale_f16, R, bits, G, bias, y);
    return 0;
}

int cg_f16linear(const float *x, int64_t N, int64_t K, const uint16_t *w, int64_t R, const float *bias, float *y,
                 int impl) {
    if (N < 1 || N > MAXN || K < 1 || R < 1) return -1;
#ifdef CG_X86
    if (impl == 0 && cg_has_avx2()) {
        f16linear_avx2(x, N, K, w, R, bias, y);
        return 0;
    }
#endif
    f16linear_portable(x, N, K, w, R, bias, y);
    return 0;
}

/* Dequantize rows [r0, r1) into out fp32 [r1 - r0, K] (for prefill: dequantize a block, then a BLAS matmul). */
int cg_dequant(const int8_t *w, const void *scale, int scale_f16, int64_t K, int bits, int64_t G, int64_t r0, int64_t r1,
               float *out) {
    if ((bits != 4 && bits != 8) || (bits == 4 && K % 2) || (G > 0 && K % G)) return -1;
    int64_t groups = G > 0 ? K / G : 1, gk = G > 0 ? G : K, row_bytes = bits == 8 ? K : K / 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * row_bytes;
        float *o = out + (r - r0) * K;
        for (int64_t g = 0; g < groups; g++) {
            float s = get_scale(scale, scale_f16, r * groups + g);
            for (int64_t k = g * gk; k < (g + 1) * gk; k++) {
                int v = bits == 8 ? wr[k] : (k % 2 == 0 ? wr[k / 2] >> 4 : (int8_t)(wr[k / 2] << 4) >> 4);
                o[k] = (float)v * s;
            }
        }
    }
    return 0;
}

/* Reads `bytes` of memory `reps` times with all threads (for the bandwidth figure of `chatglm bench`). */
int64_t cg_read_memory(const int64_t *buf, int64_t bytes, int reps) {
    int64_t n = bytes / 8, total = 0;
    for (int rep = 0; rep < reps; rep++) {
#pragma omp parallel for schedule(static) reduction(+ : total)
        for (int64_t i = 0; i < n; i++) total += buf[i];
    }
    return total;
}
