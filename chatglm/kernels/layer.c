/* One decoder layer of a CPU decode step (one new token per row) in one call: the two norms, the four quantized
 * products, RoPE, the K/V cache write, attention, the MLP activation and both residuals, composed from the kernels
 * of qlinear.c and ops.c in the models' order of operations.
 *
 * What this saves is Python: with the ops called one by one from the model code, a 6B int4 step spent 11-19 ms
 * per token outside the weight products (`chatglm bench`'s "everything else"; module calls, views, the cache
 * write), time in which the memory bus, the limit of a decode step, sat idle. The models' PyTorch code stays the
 * reference; tests compare the two.
 *
 * Both families in one function, as their layers differ only in a few choices:
 *   ChatGLM2/3:  x = x + attn(rms(x));                    x = x + mlp(rms(x))           SwiGLU, pair RoPE
 *   ChatGLM-6B:  h = ln(x); x = h * alpha + attn(h);      h = ln(x); x = h * alpha + mlp(h)   GELU, 2D RoPE
 * Built with -std=c99 (no a*b+c contraction), so the residuals round as PyTorch's elementwise ops do.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* qlinear.c and ops.c */
int cg_qlinear(const float *x, int64_t N, int64_t K, const int8_t *w, const void *scale, int scale_f16, int64_t R,
               int bits, int64_t G, const float *bias, float *y, int impl);
void cg_rms_norm(const float *x, const float *w, float eps, float *y, int64_t N, int64_t C);
void cg_rope_pairs(float *x, int64_t B, int64_t NH, int64_t xb, int64_t xh, const float *tab, int64_t tb, int64_t R);
int cg_rope_halves(float *x, int64_t B, int64_t NH, int64_t xb, int64_t xh, int64_t D, const float *cos_t,
                   const float *sin_t, int64_t n, const int64_t *pos, const int64_t *block);
int cg_attend(const float *q, int64_t qb, int64_t qh, const float *k, const float *v, int64_t kb, int64_t kg,
              int64_t ks, const uint8_t *mask, float *y, int64_t B, int64_t H, int64_t G, int64_t S, int64_t D,
              float q_div, float score_scale, float masked, float *scratch, int impl);
void cg_gelu(const float *x, float *y, int64_t n, int impl);
void cg_swiglu(const float *x, float *y, int64_t N, int64_t F, int impl);

typedef struct { /* a quantized linear layer, as cg_qlinear takes it */
    const int8_t *w;
    const void *scale;
    const float *bias;
    int64_t rows, cols, group;
    int32_t bits, scale_f16;
} cg_qweight;

typedef struct { /* one layer: shapes and weights, built once per layer */
    int32_t glm1;        /* ChatGLM-6B's LayerNorm, 2D RoPE, GELU and alpha residual; else ChatGLM2/3's */
    int32_t interleaved; /* QKV rows per head [q_h, k_h, v_h]; else [all q | k groups | v groups] */
    int64_t hidden, heads, kv_heads, head_dim, ffn; /* ffn: the MLP's width after the activation */
    float eps, alpha;
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* biases: LayerNorm only */
    cg_qweight qkv, dense, up, down;
    float q_div, score_scale, masked; /* cg_attend's */
} cg_layer;

typedef struct { /* what the layers of one decode step share */
    int64_t batch;
    const float *rope; /* ChatGLM2/3: [B, pairs, 2] (cos, sin), rows rope_stride apart */
    int64_t rope_stride, rope_pairs;
    const float *cos_t, *sin_t; /* ChatGLM-6B: [rope_rows, D/2] tables and the two positions of each row */
    int64_t rope_rows;
    const int64_t *pos, *block;
    float *k, *v; /* the cache, [L, B, G, capacity, D] at these strides (in floats), last dim contiguous */
    int64_t kl, kb, kg, ks;
    const int64_t *cols; /* the column each row writes its new key and value at */
    int64_t S;           /* keys attended to after the write */
    const uint8_t *mask; /* [B, S], nonzero = masked, or NULL */
    float *scratch;      /* cg_layer_scratch() floats */
    int32_t impl;
} cg_step;

/* The structs' sizes, which the ctypes mirrors in __init__.py are checked against before any call. */
int64_t cg_sizeof_qweight(void) { return sizeof(cg_qweight); }
int64_t cg_sizeof_layer(void) { return sizeof(cg_layer); }
int64_t cg_sizeof_step(void) { return sizeof(cg_step); }

int64_t cg_layer_scratch(const cg_layer *L, int64_t B, int64_t S) {
    return B * (2 * L->hidden + L->qkv.rows + L->heads * L->head_dim + L->up.rows + L->ffn + L->hidden) +
           B * L->heads * (S + L->head_dim);
}

static int linear(const cg_qweight *p, const float *x, int64_t B, float *y, int impl) {
    return cg_qlinear(x, B, p->cols, p->w, p->scale, p->scale_f16, p->rows, p->bits, p->group, p->bias, y, impl);
}

/* torch.nn.LayerNorm's CPU formula, (x * rstd + (-rstd * mean)) * w + b, with the moments in double */
static void layer_norm(const float *x, const float *w, const float *b, float eps, float *y, int64_t N, int64_t C) {
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * C;
        double s = 0, ss = 0;
        for (int64_t c = 0; c < C; c++) s += xr[c];
        double mean = s / C;
        for (int64_t c = 0; c < C; c++) ss += (xr[c] - mean) * (xr[c] - mean);
        float rstd = (float)(1.0 / sqrt(ss / C + eps)), shift = -rstd * (float)mean;
        for (int64_t c = 0; c < C; c++) y[n * C + c] = (xr[c] * rstd + shift) * w[c] + b[c];
    }
}

static void norm(const cg_layer *L, const float *x, const float *w, const float *b, float *y, int64_t B) {
    if (L->glm1)
        layer_norm(x, w, b, L->eps, y, B, L->hidden);
    else
        cg_rms_norm(x, w, L->eps, y, B, L->hidden);
}

/* x [B, hidden] in place: x = layer(x), the new keys and values written to the cache. Returns -1 where a kernel
 * refuses its arguments (a guard: the Python wrapper checks the shapes first). */
int cg_decode_layer(const cg_layer *L, const cg_step *s, int64_t layer, float *x) {
    int64_t B = s->batch, C = L->hidden, H = L->heads, G = L->kv_heads, D = L->head_dim, QKV = L->qkv.rows;
    int64_t U = L->up.rows, F = L->ffn;
    float *h = s->scratch, *qkv = h + B * C, *att = qkv + B * QKV, *o = att + B * H * D, *u = o + B * C;
    float *a = u + B * U, *x2 = a + B * F, *sc = x2 + B * C;
    int impl = s->impl;
    /* where q, k and v of each row and head sit in the QKV output */
    int64_t qh = L->interleaved ? 3 * D : D, k0 = L->interleaved ? D : H * D;
    int64_t v0 = L->interleaved ? 2 * D : (H + G) * D;

    norm(L, x, L->norm1_w, L->norm1_b, h, B);
    if (linear(&L->qkv, h, B, qkv, impl)) return -1;
    if (L->glm1) {
        if (cg_rope_halves(qkv, B, H, QKV, qh, D, s->cos_t, s->sin_t, s->rope_rows, s->pos, s->block) ||
            cg_rope_halves(qkv + k0, B, G, QKV, qh, D, s->cos_t, s->sin_t, s->rope_rows, s->pos, s->block))
            return -1;
    } else {
        cg_rope_pairs(qkv, B, H, QKV, qh, s->rope, s->rope_stride, s->rope_pairs);
        cg_rope_pairs(qkv + k0, B, G, QKV, qh, s->rope, s->rope_stride, s->rope_pairs);
    }
    float *kc = s->k + layer * s->kl, *vc = s->v + layer * s->kl;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < G; g++) {
            int64_t at = b * s->kb + g * s->kg + s->cols[b] * s->ks, from = b * QKV + g * qh;
            memcpy(kc + at, qkv + k0 + from, sizeof(float) * D);
            memcpy(vc + at, qkv + v0 + from, sizeof(float) * D);
        }
    if (cg_attend(qkv, QKV, qh, kc, vc, s->kb, s->kg, s->ks, s->mask, att, B, H, G, s->S, D, L->q_div,
                  L->score_scale, L->masked, sc, impl))
        return -1;
    if (linear(&L->dense, att, B, o, impl)) return -1;
    for (int64_t i = 0; i < B * C; i++) x2[i] = L->glm1 ? h[i] * L->alpha + o[i] : x[i] + o[i];

    norm(L, x2, L->norm2_w, L->norm2_b, h, B);
    if (linear(&L->up, h, B, u, impl)) return -1;
    if (L->glm1)
        cg_gelu(u, a, B * F, impl);
    else
        cg_swiglu(u, a, B, F, impl);
    if (linear(&L->down, a, B, o, impl)) return -1;
    for (int64_t i = 0; i < B * C; i++) x[i] = L->glm1 ? h[i] * L->alpha + o[i] : x2[i] + o[i];
    return 0;
}
