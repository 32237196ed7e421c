/* Weight-only quantized matrix-vector and small-batch products for CPUs.
 *
 *   y[n, r] = sum_k W[r, k] * x[n, k] (+ bias[r])      x fp32 [N, K], y fp32 [N, R], N small (decode)
 *
 * W is THUDM's layout: int8 [R, K], or int4 packed [R, K/2] with column 2j in the high nibble of byte j
 * (signed two's-complement nibbles), times an absmax scale per row [R] or per group of columns [R, K/G]
 * (fp16 or fp32); or plain fp16 [R, K] (the unquantized output layer, stored at half size).
 * fp16 rows and the portable quantized path accumulate in fp32; the AVX2 quantized path takes x as int16 and
 * sums in integers (see the comment above q8_), so it agrees with dequantize-then-matmul to ~1e-5, not exactly.
 *
 * An AVX2/FMA/F16C path is chosen at run time; portable C otherwise. OpenMP splits the output rows in small
 * dynamic chunks: with static halves, a thread that the OS preempts (another process on a 2-core machine)
 * stalls the whole product for a scheduler tick, which measured 10x slower under load.
 * int4: a sign-extended byte holds 16 * high + low nibble, so an arithmetic shift right by 4 gives the high
 * (even-column) nibble and shifting left 12 then right 12 the low one; x is split once per call into even and
 * odd columns to match.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c99 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CG_X86 1
#endif

#define MAXN 8
/* Software prefetch this many bytes ahead of the weight stream: measured 15-20% faster decode on this VM's
 * memory (2048-8192 all similar), the hardware prefetcher alone leaving the streams short of bandwidth. */
#define PREFETCH 4096

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
#pragma omp parallel for schedule(dynamic, 256)
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
#pragma omp parallel for schedule(dynamic, 256)
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

/* Sum of the eight int32 lanes, widened first: the lanes stay within int32 but their total need not. */
AVX2 static inline int64_t hsum_i32(__m256i v) {
    __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                 _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Each product keeps four independent accumulator chains per activation row when it can (NB <= 2), so that
 * FMA latency, not throughput, is never the limit; with more rows the rows themselves are independent chains. */
#define ACC(NB) ((NB) >= 4 ? 1 : 4 / (NB))
#define ZERO_ACC(NB)                                                                                              \
    for (int n = 0; n < NB; n++)                                                                                  \
        for (int a = 0; a < ACC(NB); a++) acc[n][a] = _mm256_setzero_ps();
#define SUM_ACC(NB)                                                                                               \
    for (int n = 0; n < NB; n++) {                                                                                \
        __m256 t = acc[n][0];                                                                                     \
        for (int a = 1; a < ACC(NB); a++) t = _mm256_add_ps(t, acc[n][a]);                                        \
        out[n] = hsum(t);                                                                                         \
    }

/* fp16 row over [0, k1), a multiple of 32. */
#define DEF_F16(NB)                                                                                               \
    AVX2 static inline void dot16_##NB(const uint16_t *w, const float *x, int64_t K, int64_t k1, float *out) {    \
        __m256 acc[NB][ACC(NB)];                                                                                  \
        ZERO_ACC(NB)                                                                                              \
        for (int64_t k = 0; k < k1; k += 32) {                                                                    \
            __m256 wv[4];                                                                                         \
            _mm_prefetch((const char *)(w + k + PREFETCH / 2), _MM_HINT_T0);                                      \
            for (int i = 0; i < 4; i++) wv[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 8 * i))); \
            for (int n = 0; n < NB; n++)                                                                          \
                for (int i = 0; i < 4; i++)                                                                       \
                    acc[n][i % ACC(NB)] =                                                                         \
                        _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(x + n * K + k + 8 * i), acc[n][i % ACC(NB)]);      \
        }                                                                                                         \
        SUM_ACC(NB)                                                                                               \
    }
DEF_F16(1)
DEF_F16(2)
DEF_F16(4)
DEF_F16(8)

/* Quantized rows multiply int16 activations with vpmaddwd: x is quantized once per call to int16 with one
 * absmax scale per row (relative error <= 2^-16 of the row's absmax, far inside the 1e-3 agreement with fp32
 * dequantize-then-matmul), so the inner loops stay in integers: for int4, 32 weights cost about 8 instructions.
 * Each vector lane's sum is exact in int32 within a block of columns (int8: 2048, int4: 4096, where the worst
 * case still fits); lanes and blocks add up in int64. One float multiply per row and group applies the scales. */
#define BLOCK8 2048
#define BLOCK4 4096

/* Both kernels add the two products of a step before accumulating, one accumulator per activation row: fewer
 * registers, and no copies between them (faster on cached weights, the same when streaming from memory). */

/* int8 row, columns [k0, k1) with k1 - k0 a multiple of 16 and <= BLOCK8: sum w * xq per activation row. */
#define DEF_Q8(NB)                                                                                                \
    AVX2 static inline void q8_##NB(const int8_t *w, const int16_t *xq, int64_t K, int64_t k0, int64_t k1,        \
                                    int64_t *out) {                                                               \
        __m256i acc[NB];                                                                                          \
        for (int n = 0; n < NB; n++) acc[n] = _mm256_setzero_si256();                                             \
        int64_t k = k0;                                                                                           \
        for (; k + 32 <= k1; k += 32) {                                                                           \
            _mm_prefetch((const char *)(w + k + PREFETCH), _MM_HINT_T0);                                          \
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));                         \
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k + 16)));                    \
            for (int n = 0; n < NB; n++) {                                                                        \
                const int16_t *xn = xq + n * K + k;                                                               \
                acc[n] = _mm256_add_epi32(                                                                        \
                    acc[n], _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xn)),      \
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xn + 16))))); \
            }                                                                                                     \
        }                                                                                                         \
        for (; k < k1; k += 16) {                                                                                 \
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));                         \
            for (int n = 0; n < NB; n++)                                                                          \
                acc[n] = _mm256_add_epi32(                                                                        \
                    acc[n], _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xq + n * K + k))));        \
        }                                                                                                         \
        for (int n = 0; n < NB; n++) out[n] += hsum_i32(acc[n]);                                                  \
    }

/* int4 row, columns [k0, k1) with k1 - k0 a multiple of 32 and <= BLOCK4: sum q * xq over the signed nibbles;
 * xe/xo hold the even/odd columns of xq, matching the high/low nibbles. */
#define DEF_Q4(NB)                                                                                                \
    AVX2 static inline void q4_##NB(const int8_t *w, const int16_t *xe, const int16_t *xo, int64_t H, int64_t k0, \
                                    int64_t k1, int64_t *out) {                                                   \
        __m256i acc[NB];                                                                                          \
        for (int n = 0; n < NB; n++) acc[n] = _mm256_setzero_si256();                                             \
        for (int64_t j = k0 / 2; j < k1 / 2; j += 16) {                                                           \
            _mm_prefetch((const char *)(w + j + PREFETCH), _MM_HINT_T0);                                          \
            __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j)));                           \
            __m256i hi = _mm256_srai_epi16(v, 4), lo = _mm256_srai_epi16(_mm256_slli_epi16(v, 12), 12);          \
            for (int n = 0; n < NB; n++)                                                                          \
                acc[n] = _mm256_add_epi32(                                                                        \
                    acc[n],                                                                                       \
                    _mm256_add_epi32(_mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xe + n * H + j))), \
                                     _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xo + n * H + j))))); \
        }                                                                                                         \
        for (int n = 0; n < NB; n++) out[n] += hsum_i32(acc[n]);                                                  \
    }

DEF_Q8(1)
DEF_Q8(2)
DEF_Q8(4)
DEF_Q4(1)
DEF_Q4(2)
DEF_Q4(4)

/* Activation rows go four at a time at most (see qlinear_avx2); eight rows' accumulators would also need more
 * than the 16 vector registers. */
#define DISPATCH(F, N, ...)                                                                                       \
    for (int64_t n0 = 0; n0 < (N);) {                                                                             \
        int64_t nb = (N) - n0 >= 4 ? 4 : (N) - n0 >= 2 ? 2 : 1;                                                   \
        if (nb == 4) F##_4(__VA_ARGS__);                                                                          \
        else if (nb == 2) F##_2(__VA_ARGS__);                                                                     \
        else F##_1(__VA_ARGS__);                                                                                  \
        n0 += nb;                                                                                                 \
    }

/* sum over columns [k0, k1) of one weight row against every activation row, exact in int64 */
AVX2 static void qdot(const int8_t *w, int bits, const int16_t *xq, const int16_t *xe, const int16_t *xo, int64_t N,
                      int64_t K, int64_t k0, int64_t k1, int64_t *out) {
    int64_t H = K / 2, step = bits == 8 ? 16 : 32, block = bits == 8 ? BLOCK8 : BLOCK4;
    int64_t kv = k0 + (k1 - k0) / step * step;
    for (int64_t n = 0; n < N; n++) out[n] = 0;
    for (int64_t b0 = k0; b0 < kv; b0 += block) {
        int64_t b1 = b0 + block < kv ? b0 + block : kv;
        if (bits == 8) {
            DISPATCH(q8, N, w, xq + n0 * K, K, b0, b1, out + n0)
        } else {
            DISPATCH(q4, N, w, xe + n0 * H, xo + n0 * H, H, b0, b1, out + n0)
        }
    }
    for (int64_t n = 0; n < N; n++) /* the ragged tail, in plain C */
        for (int64_t k = kv; k < k1; k++) {
            int v = bits == 8 ? w[k] : (k % 2 ? (int8_t)(w[k / 2] << 4) >> 4 : w[k / 2] >> 4);
            out[n] += (int64_t)v * xq[n * K + k];
        }
}

/* int8 decode (one activation row): four weight rows at a time share each load of x and the loop overhead. */
AVX2 static inline void q8_rows4(const int8_t *w, int64_t stride, const int16_t *x, int64_t k0, int64_t k1,
                                 int64_t *out) {
    __m256i a[4];
    for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + k)), x1 = _mm256_loadu_si256((const __m256i *)(x + k + 16));
        for (int i = 0; i < 4; i++) {
            const int8_t *wi = w + i * stride + k;
            _mm_prefetch((const char *)(wi + PREFETCH), _MM_HINT_T0);
            a[i] = _mm256_add_epi32(
                a[i], _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wi)), x0),
                                       _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wi + 16))), x1)));
        }
    }
    for (; k < k1; k += 16) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + k));
        for (int i = 0; i < 4; i++)
            a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(
                                              _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i * stride + k))), x0));
    }
    for (int i = 0; i < 4; i++) out[i] += hsum_i32(a[i]);
}

/* The same sums as qdot (int8) for four consecutive weight rows and one activation row. */
AVX2 static void q8dot_rows4(const int8_t *w, int64_t stride, const int16_t *xq, int64_t k0, int64_t k1, int64_t *out) {
    int64_t kv = k0 + (k1 - k0) / 16 * 16;
    for (int i = 0; i < 4; i++) out[i] = 0;
    for (int64_t b0 = k0; b0 < kv; b0 += BLOCK8) q8_rows4(w, stride, xq, b0, b0 + BLOCK8 < kv ? b0 + BLOCK8 : kv, out);
    for (int i = 0; i < 4; i++)
        for (int64_t k = kv; k < k1; k++) out[i] += (int64_t)w[i * stride + k] * xq[k];
}

/* x -> round(x * 32767 / absmax(x)) as int16; returns the scale absmax / 32767. Vectorized: it runs once per
 * product, and for the 4096-row products of a decode step a scalar loop here was a visible share of the time. */
AVX2 static float quantize_x(const float *x, int64_t K, int16_t *xq) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 mv = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        mv = _mm256_max_ps(mv, _mm256_andnot_ps(sign, v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float m = _mm_cvtss_f32(m4);
    int has_nan = _mm256_movemask_ps(nan) != 0;
    for (; k < K; k++) {
        has_nan |= isnan(x[k]);
        m = fabsf(x[k]) > m ? fabsf(x[k]) : m;
    }
    if (has_nan) { /* max() drops NaNs; a NaN scale makes the whole output row NaN, as in fp32 */
        memset(xq, 0, sizeof(int16_t) * K);
        return NAN;
    }
    float inv = m > 0.f ? 32767.f / m : 0.f;
    __m256 iv = _mm256_set1_ps(inv);
    for (k = 0; k + 16 <= K; k += 16) { /* cvtps rounds to nearest even, as lrintf */
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), iv));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), iv));
        _mm256_storeu_si256((__m256i *)(xq + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
    for (; k < K; k++) xq[k] = (int16_t)lrintf(x[k] * inv);
    return m / 32767.f;
}

AVX2 static void split_even_odd(const int16_t *xq, int64_t H, int16_t *xe, int16_t *xo) {
    int64_t j = 0;
    for (; j + 16 <= H; j += 16) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(xq + 2 * j)), b = _mm256_loadu_si256((const __m256i *)(xq + 2 * j + 16));
        __m256i ea = _mm256_srai_epi32(_mm256_slli_epi32(a, 16), 16), eb = _mm256_srai_epi32(_mm256_slli_epi32(b, 16), 16);
        __m256i oa = _mm256_srai_epi32(a, 16), ob = _mm256_srai_epi32(b, 16);
        _mm256_storeu_si256((__m256i *)(xe + j), _mm256_permute4x64_epi64(_mm256_packs_epi32(ea, eb), 0xd8));
        _mm256_storeu_si256((__m256i *)(xo + j), _mm256_permute4x64_epi64(_mm256_packs_epi32(oa, ob), 0xd8));
    }
    for (; j < H; j++) {
        xe[j] = xq[2 * j];
        xo[j] = xq[2 * j + 1];
    }
}

AVX2 static void qlinear_avx2(const float *x, int64_t N, int64_t K, const int8_t *w, const void *scale, int scale_f16,
                              int64_t R, int bits, int64_t G, const float *bias, float *y) {
    if (N > 4) {
        /* Passes of four activation rows: every row's int16 copy is read for each weight row, and more than four
         * rows of 4096 columns overflow the 32 KB L1. Two passes of four measured 15% faster than one of eight
         * (prefill and batched decode of a 6B model are compute-bound here, so streaming the weights twice is
         * cheaper). */
        qlinear_avx2(x, 4, K, w, scale, scale_f16, R, bits, G, bias, y);
        qlinear_avx2(x + 4 * K, N - 4, K, w, scale, scale_f16, R, bits, G, bias, y + 4 * R);
        return;
    }
    int64_t groups = G > 0 ? K / G : 1, gk = G > 0 ? G : K, H = K / 2, row_bytes = bits == 8 ? K : H;
    int16_t *xq = malloc(sizeof(int16_t) * N * K), *xe = NULL, *xo = NULL;
    float xs[MAXN];
    for (int64_t n = 0; n < N; n++) xs[n] = quantize_x(x + n * K, K, xq + n * K);
    if (bits == 4) { /* even and odd columns, to meet the high and low nibbles */
        xe = malloc(sizeof(int16_t) * N * H);
        xo = malloc(sizeof(int16_t) * N * H);
        for (int64_t n = 0; n < N; n++) split_even_odd(xq + n * K, H, xe + n * H, xo + n * H);
    }
    /* int8 decode: rows four at a time (measured faster; for int4 the single-row loop streams better) */
    int64_t R4 = N == 1 && bits == 8 ? R / 4 * 4 : 0;
#pragma omp parallel for schedule(dynamic, 256)
    for (int64_t r = 0; r < R4; r += 4) {
        float out[4] = {0.f, 0.f, 0.f, 0.f};
        int64_t acc[4];
        for (int64_t g = 0; g < groups; g++) {
            q8dot_rows4(w + r * row_bytes, row_bytes, xq, g * gk, (g + 1) * gk, acc);
            for (int i = 0; i < 4; i++)
                out[i] += get_scale(scale, scale_f16, (r + i) * groups + g) * (float)acc[i];
        }
        for (int i = 0; i < 4; i++) y[r + i] = out[i] * xs[0] + (bias ? bias[r + i] : 0.f);
    }
#pragma omp parallel for schedule(dynamic, 256)
    for (int64_t r = R4; r < R; r++) {
        float out[MAXN];
        int64_t acc[MAXN];
        const int8_t *wr = w + r * row_bytes;
        for (int64_t n = 0; n < N; n++) out[n] = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            qdot(wr, bits, xq, xe, xo, N, K, g * gk, (g + 1) * gk, acc);
            float s = get_scale(scale, scale_f16, r * groups + g);
            for (int64_t n = 0; n < N; n++)
                out[n] += s * (float)acc[n];
        }
        for (int64_t n = 0; n < N; n++) y[n * R + r] = out[n] * xs[n] + (bias ? bias[r] : 0.f);
    }
    free(xq);
    free(xe);
    free(xo);
}

AVX2 static void f16linear_avx2(const float *x, int64_t N, int64_t K, const uint16_t *w, int64_t R, const float *bias,
                                float *y) {
    int64_t kv = K / 32 * 32;
#pragma omp parallel for schedule(dynamic, 256)
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

/* Seconds spent in the two products below since the last reset: `chatglm bench` splits a decode step into the
 * weight products and the rest with it, wherever they are called from (Python or cg_decode_layer). */
static double linear_seconds;

double cg_linear_seconds(int reset) {
    double t = linear_seconds;
    if (reset) linear_seconds = 0;
    return t;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* Returns 0 on success, -1 on bad arguments. impl: 0 = best available, 1 = portable. */
int cg_qlinear(const float *x, int64_t N, int64_t K, const int8_t *w, const void *scale, int scale_f16, int64_t R,
               int bits, int64_t G, const float *bias, float *y, int impl) {
    if (N < 1 || N > MAXN || K < 1 || R < 1 || (bits != 4 && bits != 8) || (bits == 4 && K % 2) ||
        (G > 0 && (K % G || (bits == 4 && G % 2))))
        return -1;
    double t0 = now();
#ifdef CG_X86
    if (impl == 0 && cg_has_avx2())
        qlinear_avx2(x, N, K, w, scale, scale_f16, R, bits, G, bias, y);
    else
#endif
        qlinear_portable(x, N, K, w, scale, scale_f16, R, bits, G, bias, y);
    linear_seconds += now() - t0;
    return 0;
}

int cg_f16linear(const float *x, int64_t N, int64_t K, const uint16_t *w, int64_t R, const float *bias, float *y,
                 int impl) {
    if (N < 1 || N > MAXN || K < 1 || R < 1) return -1;
    double t0 = now();
#ifdef CG_X86
    if (impl == 0 && cg_has_avx2())
        f16linear_avx2(x, N, K, w, R, bias, y);
    else
#endif
        f16linear_portable(x, N, K, w, R, bias, y);
    linear_seconds += now() - t0;
    return 0;
}

/* Reads `bytes` of memory `reps` times with all threads (for the bandwidth figure of `chatglm bench`): AVX2
 * loads with the same software prefetch as the kernels, so the floor it sets is the best this machine streams. */
#ifdef CG_X86
AVX2 static int64_t read_avx2(const int64_t *buf, int64_t n, int reps) {
    int64_t total = 0;
    for (int rep = 0; rep < reps; rep++) {
#pragma omp parallel for schedule(static) reduction(+ : total)
        for (int64_t b = 0; b < n / 1024; b++) { /* 8 KB blocks */
            const __m256i *p = (const __m256i *)(buf + b * 1024);
            __m256i a0 = _mm256_setzero_si256(), a1 = a0;
            for (int i = 0; i < 256; i += 2) {
                _mm_prefetch((const char *)(p + i) + PREFETCH, _MM_HINT_T0);
                a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(p + i));
                a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(p + i + 1));
            }
            int64_t t[4];
            _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(a0, a1));
            total += t[0] + t[1] + t[2] + t[3];
        }
    }
    return total;
}
#endif

int64_t cg_read_memory(const int64_t *buf, int64_t bytes, int reps) {
    int64_t n = bytes / 8, total = 0;
#ifdef CG_X86
    if (cg_has_avx2() && n % 1024 == 0) return read_avx2(buf, n, reps);
#endif
    for (int rep = 0; rep < reps; rep++) {
#pragma omp parallel for schedule(static) reduction(+ : total)
        for (int64_t i = 0; i < n; i++) total += buf[i];
    }
    return total;
}
