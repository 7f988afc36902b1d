/* Small-batch linear layers for the CPU: y[m, n] = sum_k x[m, k] * w[n, k] + b[n].
 *
 * Decoding one token per sequence multiplies a handful of rows by every weight matrix, so the
 * step is bound by how fast the weights stream from memory. torch's CPU GEMV reads them at a
 * fraction of the machine's bandwidth; this kernel streams each weight row once, with fp32
 * accumulation, and splits the rows over the OpenMP threads torch uses.
 *
 * Compiled on the user's machine by lmstack.model.cpu_kernels (-O3 -march=native -fopenmp)
 * and called through ctypes; no torch headers are needed. bf16 tensors are passed as
 * uint16_t and rounded to nearest-even on output, as torch does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifdef __AVX512F__
/* The weight loads of one 16-lane step, full and masked: fp32 as is, bf16 widened. */
static inline __m512 ld_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 ldm_f32(__mmask16 mk, const float *p) { return _mm512_maskz_loadu_ps(mk, p); }
static inline __m512 ld_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 ldm_bf16(__mmask16 mk, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}

/* One weight row against one fp32 input row: a single sequential stream per thread, four
 * independent accumulators. (Interleaving several rows was 30% slower on the machines we
 * measured: the hardware prefetcher follows one stream best.) One body serves both weight
 * types: the loads are the only difference, and the macro keeps them inlined in the loop. */
#define DEFINE_DOT(NAME, WT, LD, LDM)                                                                   \
    static inline float NAME(const WT *w, const float *x, int64_t K) {                                \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),         \
               a3 = _mm512_setzero_ps();                                                              \
        int64_t k = 0;                                                                                \
        for (; k + 64 <= K; k += 64) {                                                                \
            a0 = _mm512_fmadd_ps(LD(w + k), _mm512_loadu_ps(x + k), a0);                              \
            a1 = _mm512_fmadd_ps(LD(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);                    \
            a2 = _mm512_fmadd_ps(LD(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);                    \
            a3 = _mm512_fmadd_ps(LD(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);                    \
        }                                                                                             \
        for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(LD(w + k), _mm512_loadu_ps(x + k), a0);     \
        if (k < K) {                                                                                  \
            const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1u);                                   \
            a1 = _mm512_fmadd_ps(LDM(mk, w + k), _mm512_maskz_loadu_ps(mk, x + k), a1);               \
        }                                                                                             \
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));     \
    }

DEFINE_DOT(dot_f32, float, ld_f32, ldm_f32)
DEFINE_DOT(dot_bf16, uint16_t, ld_bf16, ldm_bf16)
#undef DEFINE_DOT

#ifdef __AVX512BF16__
/* bf16 x bf16 pairs straight into fp32 sums (AVX512-BF16 VDPBF16PS): half the instructions
 * of widening the weights first, so the bf16 kernel stays bound by memory, not by the core. */
static inline float dot_bf16x(const uint16_t *w, const uint16_t *x, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
#define LD(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
    for (; k + 128 <= K; k += 128) {
        a0 = _mm512_dpbf16_ps(a0, LD(w + k), LD(x + k));
        a1 = _mm512_dpbf16_ps(a1, LD(w + k + 32), LD(x + k + 32));
        a2 = _mm512_dpbf16_ps(a2, LD(w + k + 64), LD(x + k + 64));
        a3 = _mm512_dpbf16_ps(a3, LD(w + k + 96), LD(x + k + 96));
    }
    for (; k + 32 <= K; k += 32) a0 = _mm512_dpbf16_ps(a0, LD(w + k), LD(x + k));
#undef LD
    if (k < K) {
        const __mmask32 mk = (__mmask32)((1ull << (K - k)) - 1ull);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(mk, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif
#else
static inline float dot_f32(const float *w, const float *x, int64_t K) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; k++) s += w[k] * x[k];
    return s;
}

static inline float dot_bf16(const uint16_t *w, const float *x, int64_t K) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; k++) s += bf16_to_f32(w[k]) * x[k];
    return s;
}
#endif

/* Rows [n0, n1) of the output for all M input rows, fp32 sums into acc[m * N + n]. Weight
 * rows are fp32 (wbf == NULL) or bf16 (wf == NULL); a row is re-read from L1 for m > 0. */
static void rows(const float *x, const uint16_t *xbf, const float *wf, const uint16_t *wbf, float *acc,
                 int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    if (wf) {
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < M; m++) acc[m * N + n] = dot_f32(wf + n * K, x + m * K, K);
    } else {
#ifdef __AVX512BF16__
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < M; m++) acc[m * N + n] = dot_bf16x(wbf + n * K, xbf + m * K, K);
        (void)x;
#else
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < M; m++) acc[m * N + n] = dot_bf16(wbf + n * K, x + m * K, K);
        (void)xbf;
#endif
    }
}

static int pick_threads(int64_t N, int64_t K, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (N * K < (int64_t)1 << 15) return 1; /* too small to pay for waking a thread */
    return nthreads;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* Up to MAXMAT weight matrices that read the same input rows x (M x K): matrix i (N[i] x K,
 * bias b[i] or NULL) writes y[i] (M x N[i]). All their rows are split over the threads in one
 * parallel region, so q/k/v (or gate/up) cost one call instead of three. With swiglu, the two
 * matrices are gate and up of one MLP and y[0] = silu(gate) * up (y[1] is unused). Pointers
 * come as int64 so the Python side can pass plain integers. Returns 0, or 1 when out of memory. */
#define MAXMAT 4

static int group(int bf16, const void *x, int nmat, const int64_t *w, const int64_t *b, const int64_t *y,
                 const int64_t *N, int64_t M, int64_t K, int swiglu, int nthreads) {
    if (nmat < 1 || nmat > MAXMAT || (swiglu && (nmat != 2 || N[0] != N[1]))) return 2;
    int64_t off[MAXMAT + 1], rows_total = 0;
    for (int i = 0; i < nmat; i++) {
        off[i] = rows_total;
        rows_total += N[i];
    }
    off[nmat] = rows_total;
    float *xf = NULL;
    float *acc = (float *)malloc(sizeof(float) * (size_t)(M * rows_total));
    if (bf16) xf = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (!acc || (bf16 && !xf)) {
        free(xf);
        free(acc);
        return 1;
    }
    const float *xs = (const float *)x;
    if (bf16) {
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xs = xf;
    }
    /* In the threaded region, each thread takes a contiguous range of the concatenated rows. */
    int nt = pick_threads(rows_total, K, nthreads);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    {
        const int t = 0, T = 1;
        (void)nt;
#endif
        const int64_t blocks = (rows_total + 3) / 4;
        const int64_t r0 = blocks * t / T * 4, r1e = blocks * (t + 1) / T * 4;
        const int64_t r1 = r1e < rows_total ? r1e : rows_total;
        for (int i = 0; i < nmat; i++) {
            const int64_t lo = r0 > off[i] ? r0 : off[i], hi = r1 < off[i + 1] ? r1 : off[i + 1];
            if (lo >= hi) continue;
            /* acc for matrix i is the (M x N[i]) block starting at M * off[i] */
            rows(xs, (const uint16_t *)x, bf16 ? NULL : (const float *)(intptr_t)w[i],
                 bf16 ? (const uint16_t *)(intptr_t)w[i] : NULL, acc + M * off[i], M, N[i], K,
                 lo - off[i], hi - off[i]);
        }
    }
    for (int i = 0; i < nmat; i++) {
        float *a = acc + M * off[i];
        if (b[i])
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = 0; n < N[i]; n++)
                    a[m * N[i] + n] += bf16 ? bf16_to_f32(((const uint16_t *)(intptr_t)b[i])[n])
                                               : ((const float *)(intptr_t)b[i])[n];
    }
    if (swiglu) {
        const float *g = acc, *u = acc + M * off[1];
        for (int64_t j = 0; j < M * N[0]; j++) {
            if (bf16) { /* round where torch's bf16 ops round: gate, silu(gate), up, product */
                const float gr = bf16_to_f32(f32_to_bf16(g[j]));
                const float sr = bf16_to_f32(f32_to_bf16(silu(gr)));
                ((uint16_t *)(intptr_t)y[0])[j] = f32_to_bf16(sr * bf16_to_f32(f32_to_bf16(u[j])));
            } else {
                ((float *)(intptr_t)y[0])[j] = silu(g[j]) * u[j];
            }
        }
    } else {
        for (int i = 0; i < nmat; i++) {
            const float *a = acc + M * off[i];
            if (bf16)
                for (int64_t j = 0; j < M * N[i]; j++) ((uint16_t *)(intptr_t)y[i])[j] = f32_to_bf16(a[j]);
            else
                memcpy((void *)(intptr_t)y[i], a, sizeof(float) * (size_t)(M * N[i]));
        }
    }
    free(xf);
    free(acc);
    return 0;
}

int lm_small_linear_group(int bf16, const void *x, int nmat, const int64_t *w, const int64_t *b, const int64_t *y,
                          const int64_t *N, int64_t M, int64_t K, int swiglu, int nthreads) {
    return group(bf16, x, nmat, w, b, y, N, M, K, swiglu, nthreads);
}

int lm_small_linear(int bf16, const void *x, const void *w, const void *b, void *y,
                    int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t ws[1] = {(int64_t)(intptr_t)w}, bs[1] = {(int64_t)(intptr_t)b}, ys[1] = {(int64_t)(intptr_t)y};
    const int64_t Ns[1] = {N};
    return group(bf16, x, 1, ws, bs, ys, Ns, M, K, 0, nthreads);
}

/* RMSNorm of M rows of K: y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32; in bf16 the
 * normalised row is rounded to bf16 before the weight multiplies it, as the reference models do. */
int lm_rmsnorm(int bf16, const void *x, const void *w, void *y, int64_t M, int64_t K, float eps) {
    for (int64_t m = 0; m < M; m++) {
        float ss = 0.0f;
        if (bf16) {
            const uint16_t *xr = (const uint16_t *)x + m * K;
            for (int64_t k = 0; k < K; k++) { const float v = bf16_to_f32(xr[k]); ss += v * v; }
            const float r = 1.0f / sqrtf(ss / (float)K + eps);
            uint16_t *yr = (uint16_t *)y + m * K;
            const uint16_t *wr = (const uint16_t *)w;
            for (int64_t k = 0; k < K; k++)
                yr[k] = f32_to_bf16(bf16_to_f32(wr[k]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[k]) * r)));
        } else {
            const float *xr = (const float *)x + m * K;
            for (int64_t k = 0; k < K; k++) ss += xr[k] * xr[k];
            const float r = 1.0f / sqrtf(ss / (float)K + eps);
            float *yr = (float *)y + m * K;
            const float *wr = (const float *)w;
            for (int64_t k = 0; k < K; k++) yr[k] = wr[k] * (xr[k] * r);
        }
    }
    return 0;
}

/* Rotary positions, in place, on the q and k of one decode step: x (B, H, D) rows of head
 * size D with the rotate-half layout, cos/sin (B, D) per row, sin signed as in the model's
 * tables (first half negated): x[j] <- x[j] cos[j] + x[(j + D/2) % D] sin[j]. In bf16 each
 * product and the sum are rounded as torch's bf16 ops round them. */
int lm_rope(int bf16, void *x, const void *cos, const void *sin, int64_t B, int64_t H, int64_t D) {
    const int64_t half = D / 2;
    float row[1024];
    if (D > 1024 || D % 2) return 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t o = (b * H + h) * D;
            if (bf16) {
                uint16_t *xr = (uint16_t *)x + o;
                const uint16_t *c = (const uint16_t *)cos + b * D, *s = (const uint16_t *)sin + b * D;
                for (int64_t j = 0; j < D; j++) row[j] = bf16_to_f32(xr[j]);
                for (int64_t j = 0; j < D; j++) {
                    const float a = bf16_to_f32(f32_to_bf16(row[j] * bf16_to_f32(c[j])));
                    const float r = bf16_to_f32(f32_to_bf16(row[(j + half) % D] * bf16_to_f32(s[j])));
                    xr[j] = f32_to_bf16(a + r);
                }
            } else {
                float *xr = (float *)x + o;
                const float *c = (const float *)cos + b * D, *s = (const float *)sin + b * D;
                memcpy(row, xr, sizeof(float) * (size_t)D);
                for (int64_t j = 0; j < D; j++) xr[j] = row[j] * c[j] + row[(j + half) % D] * s[j];
            }
        }
    return 0;
}

/* Attention of one query per sequence over its cached keys (a decode step, every row seeing
 * the same S keys): q (B, G, R, D) contiguous, R query heads per kv head; k and v (B, G, S, D)
 * with element strides (sb, sg, ss) and unit stride along D; out (B, G, R, D). Softmax in
 * fp32; bf16 inputs are widened and the output rounded once. */
int lm_decode_attention(int bf16, const void *q, const void *k, const void *v, void *out,
                        int64_t B, int64_t G, int64_t R, int64_t S, int64_t D,
                        int64_t sb, int64_t sg, int64_t ss, float scale, int nthreads) {
    if (D > 1024) return 2;
    const int64_t n = B * G * R;
    int nt = (n * S * D < ((int64_t)1 << 18)) ? 1 : (nthreads < 1 ? 1 : nthreads);
    int fail = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : fail)
#endif
    for (int64_t i = 0; i < n; i++) {
        const int64_t b = i / (G * R), g = (i / R) % G;
        const int64_t kv = b * sb + g * sg;
        float qf[1024], acc[1024];
        float *p = (float *)malloc(sizeof(float) * (size_t)S);
        if (!p) {
            fail = 1;
            continue;
        }
        for (int64_t d = 0; d < D; d++) {
            qf[d] = bf16 ? bf16_to_f32(((const uint16_t *)q)[i * D + d]) : ((const float *)q)[i * D + d];
            acc[d] = 0.0f;
        }
        float mx = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            float dot = 0.0f;
            if (bf16) {
                const uint16_t *kr = (const uint16_t *)k + kv + s * ss;
                for (int64_t d = 0; d < D; d++) dot += qf[d] * bf16_to_f32(kr[d]);
            } else {
                const float *kr = (const float *)k + kv + s * ss;
                for (int64_t d = 0; d < D; d++) dot += qf[d] * kr[d];
            }
            p[s] = dot * scale;
            if (p[s] > mx) mx = p[s];
        }
        float sum = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            p[s] = expf(p[s] - mx);
            sum += p[s];
        }
        for (int64_t s = 0; s < S; s++) {
            const float w = p[s] / sum;
            if (bf16) {
                const uint16_t *vr = (const uint16_t *)v + kv + s * ss;
                for (int64_t d = 0; d < D; d++) acc[d] += w * bf16_to_f32(vr[d]);
            } else {
                const float *vr = (const float *)v + kv + s * ss;
                for (int64_t d = 0; d < D; d++) acc[d] += w * vr[d];
            }
        }
        for (int64_t d = 0; d < D; d++) {
            if (bf16)
                ((uint16_t *)out)[i * D + d] = f32_to_bf16(acc[d]);
            else
                ((float *)out)[i * D + d] = acc[d];
        }
        free(p);
    }
    return fail;
}

/* Group-wise int4 weights (lmstack.quant's layout) against a few fp32 rows, dequantised in
 * registers: y[m, n] = sum_g s[n, g] * sum_{j < G} (c[n, gG + j] - 8) * x[m, gG + j] + b[n].
 * w is (N, K/2) bytes, the low nibble holding the even column; s is (N, K/G) fp32. Each weight
 * byte is read once for all M rows, so a decode step streams K/2 bytes per output instead of
 * the 4K of an fp32 weight. x is split into its even and odd columns once, so the nibbles need
 * no interleaving. Returns 2 for what it does not take (the caller falls back). */
int lm_int4_linear(int bf16, const float *x, const uint8_t *w, const float *s, const float *b, float *y,
                   int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    if (bf16 || M < 1 || M > 16 || G < 2 || G % 32 || K % G) return 2;  /* fp32 activations only */
    const int64_t H = K / 2, NG = K / G, HG = G / 2;
    float *xe = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (!xe) return 3;
    float *xo = xe + M * H;
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < H; j++) {
            xe[m * H + j] = x[m * K + 2 * j];
            xo[m * H + j] = x[m * K + 2 * j + 1];
        }
#ifdef _OPENMP
#pragma omp parallel for num_threads(pick_threads(N, K, nthreads)) schedule(static)
#endif
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * H;
        const float *sr = s + n * NG;
        float acc[16] = {0};
#ifdef __AVX512F__
        const __m128i lo4 = _mm_set1_epi8(0x0F);
        const __m512 eight = _mm512_set1_ps(8.0f);
        __m512 total[16];
        for (int64_t m = 0; m < M; m++) total[m] = _mm512_setzero_ps();
        for (int64_t g = 0; g < NG; g++) {
            __m512 part[16];
            for (int64_t m = 0; m < M; m++) part[m] = _mm512_setzero_ps();
            for (int64_t j = g * HG; j < (g + 1) * HG; j += 16) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(wr + j));
                const __m512 we = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, lo4))), eight);
                const __m512 wo = _mm512_sub_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), lo4))), eight);
                for (int64_t m = 0; m < M; m++) {
                    part[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + m * H + j), part[m]);
                    part[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xo + m * H + j), part[m]);
                }
            }
            const __m512 sc = _mm512_set1_ps(sr[g]);
            for (int64_t m = 0; m < M; m++) total[m] = _mm512_fmadd_ps(part[m], sc, total[m]);
        }
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_reduce_add_ps(total[m]);
#else
        for (int64_t g = 0; g < NG; g++) {
            for (int64_t m = 0; m < M; m++) {
                float part = 0.0f;
                for (int64_t j = g * HG; j < (g + 1) * HG; j++)
                    part += (float)((wr[j] & 15) - 8) * xe[m * H + j] + (float)((wr[j] >> 4) - 8) * xo[m * H + j];
                acc[m] += sr[g] * part;
            }
        }
#endif
        for (int64_t m = 0; m < M; m++) y[m * N + n] = acc[m] + (b ? b[n] : 0.0f);
    }
    free(xe);
    return 0;
}
