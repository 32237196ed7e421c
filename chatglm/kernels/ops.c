/* The small fp32 ops of a CPU decode step, each one call instead of the handful of PyTorch ops it replaces.
 *
 * In a quantized 6B decode step the weight products take ~90% of the time; most of the rest was PyTorch's
 * per-op dispatch (~5-50 us each, ~60 ops per layer), not arithmetic. These ops keep the reference's order of
 * operations (the PyTorch code in chatglm/models is the reference; tests compare the two):
 *   cg_rms_norm      y = w * (x * rsqrt(mean(x^2) + eps))                    (ChatGLM2/3)
 *   cg_rope_pairs    rotate adjacent pairs (2i, 2i+1) of the first 2R dims   (ChatGLM2/3)
 *   cg_rope_halves   rotate_half RoPE on each half of a head, two positions  (ChatGLM-6B's 2D RoPE)
 *   cg_attend        one query per row against a strided K/V cache, grouped heads, optional pad mask
 *   cg_gelu          ChatGLM-6B's tanh GELU                                  (its MLP)
 *   cg_swiglu        silu(gate) * up over the two halves of each row         (ChatGLM2/3's MLP)
 * Built with -std=c99, so the compiler does not contract a*b+c into an FMA: rotations round as PyTorch's do.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CG_X86 1
#define AVX2 __attribute__((target("avx2,fma")))
#endif

int cg_has_avx2(void); /* qlinear.c */

/* ------------------------------------------------------------------ norms */

void cg_rms_norm(const float *x, const float *w, float eps, float *y, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * C;
        float *yr = y + n * C;
        /* the mean of squares in double (at least as exact as PyTorch's cascade sum), four chains for speed */
        double ss[4] = {0, 0, 0, 0};
        int64_t c = 0;
        for (; c + 4 <= C; c += 4)
            for (int i = 0; i < 4; i++) ss[i] += (double)xr[c + i] * xr[c + i];
        for (; c < C; c++) ss[0] += (double)xr[c] * xr[c];
        float r = 1.0f / sqrtf((float)((ss[0] + ss[1] + ss[2] + ss[3]) / C) + eps);
        for (c = 0; c < C; c++) yr[c] = w[c] * (xr[c] * r);
    }
}

/* ------------------------------------------------------------------ rotary embeddings (in place) */

/* x: [B, NH, D] at strides (xb, xh), last dim contiguous; tab: [B, R, 2] (cos, sin) at stride tb. */
void cg_rope_pairs(float *x, int64_t B, int64_t NH, int64_t xb, int64_t xh, const float *tab, int64_t tb,
                   int64_t R) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++) {
            float *p = x + b * xb + h * xh;
            const float *t = tab + b * tb;
            for (int64_t i = 0; i < R; i++) {
                float x0 = p[2 * i], x1 = p[2 * i + 1], c = t[2 * i], s = t[2 * i + 1];
                p[2 * i] = x0 * c - x1 * s;
                p[2 * i + 1] = x1 * c + x0 * s;
            }
        }
}

/* ChatGLM-6B: x * cos + rotate_half(x) * sin on dims [0, D/2) at position pos[b] and on [D/2, D) at block[b].
 * cos, sin: [n, D/2] contiguous tables, each row cat(freqs, freqs). Returns -1 (changing nothing) when a
 * position is outside the tables. */
int cg_rope_halves(float *x, int64_t B, int64_t NH, int64_t xb, int64_t xh, int64_t D, const float *cos_t,
                   const float *sin_t, int64_t n, const int64_t *pos, const int64_t *block) {
    int64_t half = D / 2, q = D / 4, ts = D / 2;
    for (int64_t b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= n || block[b] < 0 || block[b] >= n) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++)
            for (int part = 0; part < 2; part++) {
                float *p = x + b * xb + h * xh + part * half;
                int64_t row = (part ? block[b] : pos[b]) * ts;
                const float *c = cos_t + row, *s = sin_t + row;
                for (int64_t i = 0; i < q; i++) {
                    float a = p[i], z = p[i + q];
                    p[i] = a * c[i] + (-z) * s[i];
                    p[i + q] = z * c[i + q] + a * s[i + q];
                }
            }
    return 0;
}

/* ------------------------------------------------------------------ single-query attention */

/* One head: scores of q against S keys (rows ks apart), softmax, then the probability-weighted sum of the values.
 * sc: S floats of scratch; qq: D floats. */
static void head_portable(const float *q, const float *k, const float *v, int64_t ks, const uint8_t *mr, int64_t S,
                          int64_t D, float q_div, float score_scale, float masked, float *sc, float *qq, float *out) {
    for (int64_t d = 0; d < D; d++) qq[d] = q[d] / q_div;
    float mx = -INFINITY, sum = 0;
    for (int64_t s = 0; s < S; s++) {
        float score = 0;
        if (mr && mr[s])
            score = masked;
        else
            for (int64_t d = 0; d < D; d++) score += qq[d] * k[s * ks + d];
        sc[s] = score * score_scale;
        mx = sc[s] > mx ? sc[s] : mx;
    }
    for (int64_t s = 0; s < S; s++) sum += sc[s] = expf(sc[s] - mx);
    for (int64_t d = 0; d < D; d++) out[d] = 0;
    for (int64_t s = 0; s < S; s++)
        for (int64_t d = 0; d < D; d++) out[d] += sc[s] / sum * v[s * ks + d];
}

#ifdef CG_X86
AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* head_portable with the dot products and the weighted sum in registers (eight 8-wide accumulators per pass of
 * 64 dims over all positions, so the output is stored once). */
AVX2 static void head_avx2(const float *q, const float *k, const float *v, int64_t ks, const uint8_t *mr, int64_t S,
                           int64_t D, float q_div, float score_scale, float masked, float *sc, float *qq, float *out) {
    for (int64_t d = 0; d < D; d++) qq[d] = q[d] / q_div;
    int64_t D16 = D / 16 * 16;
    float mx = -INFINITY, sum = 0;
    int64_t s = 0;
    for (; s + 4 <= S; s += 4) { /* four keys at a time: eight independent FMA chains */
        __m256 a[4][2];
        for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D16; d += 16) {
            __m256 q0 = _mm256_loadu_ps(qq + d), q1 = _mm256_loadu_ps(qq + d + 8);
            for (int i = 0; i < 4; i++) {
                const float *kr = k + (s + i) * ks + d;
                a[i][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kr), a[i][0]);
                a[i][1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kr + 8), a[i][1]);
            }
        }
        for (int i = 0; i < 4; i++) {
            float score = hsum8(_mm256_add_ps(a[i][0], a[i][1]));
            for (int64_t d = D16; d < D; d++) score += qq[d] * k[(s + i) * ks + d];
            sc[s + i] = score;
        }
    }
    for (; s < S; s++) {
        float score = 0;
        for (int64_t d = 0; d < D; d++) score += qq[d] * k[s * ks + d];
        sc[s] = score;
    }
    for (s = 0; s < S; s++) { /* masked keys were computed too (their rows exist); their score is replaced */
        sc[s] = (mr && mr[s] ? masked : sc[s]) * score_scale;
        mx = sc[s] > mx ? sc[s] : mx;
    }
    for (s = 0; s < S; s++) sum += sc[s] = expf(sc[s] - mx);
    float inv = 1.0f / sum;
    for (s = 0; s < S; s++) sc[s] *= inv;
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (s = 0; s < S; s++) {
            if (sc[s] == 0) continue; /* masked, or exp underflowed */
            __m256 p = _mm256_set1_ps(sc[s]);
            const float *vr = v + s * ks + d0;
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * i), a[i]);
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + d0 + 8 * i, a[i]);
    }
    for (; d0 < D; d0++) {
        float a = 0;
        for (s = 0; s < S; s++) a += sc[s] * v[s * ks + d0];
        out[d0] = a;
    }
}
#endif

/* y[b, h] = softmax(score_scale * ((q[b, h] / q_div) . k[b, g, s])) @ v[b, g] over s < S, head h reading KV
 * group g = h / (H / G). q: [B, H, D] at strides (qb, qh); k, v: [B, G, S, D] at strides (kb, kg, ks), last
 * dims contiguous; mask: [B, S] bytes, nonzero = masked (its score is `masked` before score_scale), or NULL;
 * y: [B, H, D] contiguous; scratch: B * H * (S + D) floats. Returns -1 on bad arguments. */
int cg_attend(const float *q, int64_t qb, int64_t qh, const float *k, const float *v, int64_t kb, int64_t kg,
              int64_t ks, const uint8_t *mask, float *y, int64_t B, int64_t H, int64_t G, int64_t S, int64_t D,
              float q_div, float score_scale, float masked, float *scratch, int impl) {
    if (B < 1 || H < 1 || G < 1 || H % G || S < 1 || D < 1) return -1;
    int fast = 0;
#ifdef CG_X86
    fast = impl == 0 && cg_has_avx2();
#endif
    int64_t per = H / G;
    /* threads only for long contexts: at a few dozen positions the whole call is a few microseconds */
#pragma omp parallel for schedule(static) if (B * H * S * D >= (1 << 17))
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, g = h / per;
        float *sc = scratch + bh * (S + D);
        const float *qr = q + b * qb + h * qh, *kr = k + b * kb + g * kg, *vr = v + b * kb + g * kg;
        const uint8_t *mr = mask ? mask + b * S : 0;
#ifdef CG_X86
        if (fast) {
            head_avx2(qr, kr, vr, ks, mr, S, D, q_div, score_scale, masked, sc, sc + S, y + bh * D);
            continue;
        }
#endif
        head_portable(qr, kr, vr, ks, mr, S, D, q_div, score_scale, masked, sc, sc + S, y + bh * D);
    }
    return 0;
}

/* ------------------------------------------------------------------ activations */

#define GELU_C 0.7978845608028654f /* sqrt(2 / pi), as the original writes it */

static void gelu_portable(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        y[i] = 0.5f * x[i] * (1.0f + tanhf(GELU_C * x[i] * (1.0f + 0.044715f * x[i] * x[i])));
}

static void swiglu_portable(const float *gate, const float *up, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#ifdef CG_X86
/* e^x for x in [-87, 88] (clamped outside), within 2 ulp: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2].
 * PyTorch's own vectorized exp is a polynomial of the same kind; the agreement tests bound the difference. */
AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* tanh(u) = 1 - 2 / (e^(2u) + 1): exact at the ends, absolute error ~1e-7 near 0 (where GELU's 1 + tanh hides it) */
AVX2 static void gelu_avx2(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), two = _mm256_set1_ps(2.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_C), v),
                                 _mm256_add_ps(one, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), v)));
        __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(_mm256_add_ps(u, u)), one)));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
    }
    gelu_portable(x + i, y + i, n - i);
}

AVX2 static void swiglu_avx2(const float *x, float *y, int64_t F) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= F; i += 8) {
        __m256 g = _mm256_loadu_ps(x + i);
        __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(silu, _mm256_loadu_ps(x + F + i)));
    }
    swiglu_portable(x + i, x + F + i, y + i, F - i);
}
#endif

/* y = gelu(x) over n values, in chunks over the threads */
void cg_gelu(const float *x, float *y, int64_t n, int impl) {
    int fast = 0;
#ifdef CG_X86
    fast = impl == 0 && cg_has_avx2();
#endif
    const int64_t chunk = 4096;
#pragma omp parallel for schedule(static) if (n >= 4 * chunk)
    for (int64_t c = 0; c < n; c += chunk) {
        int64_t m = n - c < chunk ? n - c : chunk;
#ifdef CG_X86
        if (fast) {
            gelu_avx2(x + c, y + c, m);
            continue;
        }
#endif
        gelu_portable(x + c, y + c, m);
    }
}

/* x: [N, 2F] (gate, up) -> y: [N, F] = silu(gate) * up */
void cg_swiglu(const float *x, float *y, int64_t N, int64_t F, int impl) {
    int fast = 0;
#ifdef CG_X86
    fast = impl == 0 && cg_has_avx2();
#endif
#pragma omp parallel for schedule(static) if (N * F >= (1 << 13))
    for (int64_t n = 0; n < N; n++) {
#ifdef CG_X86
        if (fast) {
            swiglu_avx2(x + n * 2 * F, y + n * F, F);
            continue;
        }
#endif
        swiglu_portable(x + n * 2 * F, x + n * 2 * F + F, y + n * F, F);
    }
}
