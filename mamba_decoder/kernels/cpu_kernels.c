/* CPU kernels of the fast backend, compiled at first use by kernels/cpu_native.py and called
 * through ctypes (plain C, no Python or torch headers: it builds in about a second).
 *
 * Every loop over `j` runs over VL = 16 channels, the innermost, contiguous axis of the
 * (B, L, ED) activations, so the compiler turns it into one 512-bit (or two 256-bit) vector op;
 * the state of VL channels, (N, VL), lives in L1. exp/log are branch-free polynomials
 * (vectorizable; a libm call per element would not be). No OpenMP: the caller splits the work
 * into independent (batch, channel range) tasks and runs them on its own threads (ctypes drops
 * the GIL), so no second thread pool competes with torch's.
 *
 * Selective scan (Mamba-1), per batch b, channel d, state n:
 *   delta_t = softplus(dt_t + bias)      (or dt_t + bias)
 *   h_t = exp(delta_t A_n) h_{t-1} + delta_t B_tn x_t
 *   y_t = sum_n h_tn C_tn + D x_t;   out_t = y_t * silu(z_t)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VL 16

typedef int64_t i64;

/* exp(x), |rel err| < 2e-7 for x in [-87, 88]; clamped outside (exp(-87) ~ 1.6e-38, never a
 * denormal). Cody-Waite reduction x = n ln2 + r, degree-6 Taylor in r, times 2^n by its bits.
 * EXP_REDUCED declares n and p = exp(r) for a clamped x of type T (float, or the vector type vf
 * below: the same operations either way). */
#define EXP_REDUCED(T, x, n, p)                                                           \
    T n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round via 1.5 * 2^23 */ \
    T r_ = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;                     \
    T p = ((((((r_ * (1.0f / 720.0f) + 1.0f / 120.0f) * r_ + 1.0f / 24.0f) * r_ + 1.0f / 6.0f) \
             * r_ + 0.5f) * r_ + 1.0f) * r_ + 1.0f)

/* 2 atanh(s) / s for s^2 = s2 in [0, 1/9]: log1p(e) = s * LOG1P_SERIES(s2), s = e / (2 + e). */
#define LOG1P_SERIES(s2)                                                                   \
    (2.0f * (((((((s2 * (1.0f / 15.0f) + 1.0f / 13.0f) * s2 + 1.0f / 11.0f) * s2 + 1.0f / 9.0f) \
                * s2 + 1.0f / 7.0f) * s2 + 1.0f / 5.0f) * s2 + 1.0f / 3.0f) * s2 + 1.0f))

static inline float vexp(float x) {
    /* clamped to the finite range, NaN kept (a NaN fails both tests): one vmaxps / vminps each,
     * with the constant as the first operand (x > -87 ? x : -87 would turn NaN into exp(-87)) */
    x = -87.0f > x ? -87.0f : x;
    x = 88.0f < x ? 88.0f : x;
    EXP_REDUCED(float, x, n, p);
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return p * s.f;
}

/* log1p(e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) in [0, 1/3] (no cancellation). */
static inline float vlog1p01(float e) {
    float s = e / (2.0f + e);
    return s * LOG1P_SERIES(s * s);
}

/* torch's softplus (beta 1, threshold 20): x > 20 -> x, else log1p(exp(x)). */
static inline float vsoftplus(float x) {
    float ax = x < 0.0f ? -x : x;
    float sp = (x > 0.0f ? x : 0.0f) + vlog1p01(vexp(-ax));
    return x > 20.0f ? x : sp;
}

static inline float vsigmoid(float x) { return 1.0f / (1.0f + vexp(-x)); }

/* The same exp (and sigmoid, softplus) on a whole vector of VL lanes, in GCC/Clang vector
 * extensions, for the scan's per-step work on full vectors: written as `omp simd` loops over
 * 16-float stack arrays, GCC left the step's z gate as scalar code (at N=4 it took 40 of 92 ms
 * at B8 L2048 ED1024; 6 of 47 ms in vector types). Unaligned loads and stores through vfu
 * (element alignment). */
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4)));

static inline vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

static inline vf vexp_v(vf x) {
    const vf zero = {0}, lo = zero - 87.0f, hi = zero + 88.0f;
    x = vsel(lo > x, lo, x);   /* NaN kept, as in vexp */
    x = vsel(hi < x, hi, x);
    EXP_REDUCED(vf, x, n, p);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

static inline vf vsigmoid_v(vf x) { return 1.0f / (1.0f + vexp_v(-x)); }

static inline vf vsoftplus_v(vf x) {   /* vsoftplus, lane by lane */
    const vf zero = {0};
    const vf ax = vsel(x < zero, -x, x);
    const vf e = vexp_v(-ax);
    const vf s = e / (2.0f + e), s2 = s * s;
    const vf sp = vsel(x > zero, x, zero) + s * LOG1P_SERIES(s2);
    return vsel(x > 20.0f + zero, x, sp);
}

/* Pointers and strides (in elements) of one scan call. x, dt, z, gout, gx, gdt, gz, out:
 * (B, L, ED) with unit stride along ED; Bm, Cm: (B, L, N) by strides; At: (N, ED) contiguous
 * (A transposed); D, bias: (ED,) or NULL; z: NULL for no gate; h0: (B, ED, N) by strides or
 * NULL (zeros). hsave: (B, n_chunks, N, ED) contiguous, the state before each chunk of
 * `chunk` steps (NULL: not kept). hfin: (B, ED, N) contiguous or NULL. */
typedef struct {
    i64 Bsz, L, ED, N, chunk;
    int softplus;
    const float *x, *dt, *z, *Bm, *Cm, *At, *D, *bias, *h0;
    i64 sx_b, sx_l, sdt_b, sdt_l, sz_b, sz_l;
    i64 sB_b, sB_l, sB_n, sC_b, sC_l, sC_n;
    i64 sh0_b, sh0_d, sh0_n;
    float *out, *hsave, *hfin;
    i64 so_b, so_l;
    /* backward only */
    const float *gout, *ghfin;
    i64 sg_b, sg_l;
    float *gx, *gdt, *gz;           /* (B, L, ED) contiguous */
    float *gA, *gD, *gbias;         /* per batch: (B, N, ED), (B, ED), (B, ED) */
    float *gB, *gC;                 /* per channel split: (n_split, B, L, N) */
    float *gh0;                     /* (B, ED, N) contiguous */
    i64 n_split;
} ScanArgs;

/* Load VL values of a row at channel d0 (vl valid, the rest `pad`). */
static inline void load_row(float *dst, const float *row, i64 d0, int vl, float pad) {
    if (vl == VL) { for (int j = 0; j < VL; j++) dst[j] = row[d0 + j]; return; }
    _Pragma("omp simd") for (int j = 0; j < VL; j++) dst[j] = j < vl ? row[d0 + j] : pad;
}

static inline void store_row(float *row, const float *src, i64 d0, int vl) {
    if (vl == VL) { for (int j = 0; j < VL; j++) row[d0 + j] = src[j]; return; }
    for (int j = 0; j < vl; j++) row[d0 + j] = src[j];
}

/* delta of VL channels at one step (into dl), and, if sg != NULL, d delta / d dt. */
static inline void step_delta(const ScanArgs *a, const float *dtrow, const float *bias, i64 d0, int vl,
                              float *dl, float *sg) {
    float dtv[VL];
    load_row(dtv, dtrow, d0, vl, 0.0f);
    _Pragma("omp simd") for (int j = 0; j < VL; j++) {
        float v = dtv[j] + bias[j];
        dl[j] = a->softplus ? vsoftplus(v) : v;
        if (sg) sg[j] = a->softplus ? (v > 20.0f ? 1.0f : vsigmoid(v)) : 1.0f;
    }
}

/* Forward of batch b, channels [d0, d1). Time is the outer loop and the channel vectors of the
 * range the inner one, so each step reads one contiguous run of every row (a loop over time per
 * vector would touch a new page of each tensor every step, out of the prefetchers' reach: 5x
 * slower measured). The range's states, (nvec, N, VL), stay in L1/L2. */
void scan_fwd(const ScanArgs *a, i64 b, i64 d0, i64 d1) {
    const i64 L = a->L, ED = a->ED, N = a->N;
    const i64 nvec = (d1 - d0 + VL - 1) / VL;
    float *h = (float *)malloc(sizeof(float) * nvec * N * VL);
    float *At = (float *)malloc(sizeof(float) * nvec * N * VL);
    float *bias = (float *)malloc(sizeof(float) * nvec * VL);
    float *Dv = (float *)malloc(sizeof(float) * nvec * VL);
    for (i64 v = 0; v < nvec; v++) {
        const i64 dv = d0 + v * VL;
        const int vl = (int)(d1 - dv < VL ? d1 - dv : VL);
        _Pragma("omp simd") for (int j = 0; j < VL; j++) {
            bias[v * VL + j] = (a->bias && j < vl) ? a->bias[dv + j] : 0.0f;
            Dv[v * VL + j] = (a->D && j < vl) ? a->D[dv + j] : 0.0f;
        }
        for (i64 n = 0; n < N; n++) {
            load_row(At + (v * N + n) * VL, a->At + n * ED, dv, vl, 0.0f);
            _Pragma("omp simd") for (int j = 0; j < VL; j++)
                h[(v * N + n) * VL + j] = (a->h0 && j < vl)
                    ? a->h0[b * a->sh0_b + (dv + j) * a->sh0_d + n * a->sh0_n] : 0.0f;
        }
    }
    for (i64 t = 0; t < L; t++) {
        if (a->hsave && t % a->chunk == 0) {
            float *hs = a->hsave + (b * ((L + a->chunk - 1) / a->chunk) + t / a->chunk) * N * ED;
            for (i64 v = 0; v < nvec; v++) {
                const i64 dv = d0 + v * VL;
                const int vl = (int)(d1 - dv < VL ? d1 - dv : VL);
                for (i64 n = 0; n < N; n++) store_row(hs + n * ED, h + (v * N + n) * VL, dv, vl);
            }
        }
        const float *dtrow = a->dt + b * a->sdt_b + t * a->sdt_l, *xrow = a->x + b * a->sx_b + t * a->sx_l;
        const float *zrow = a->z ? a->z + b * a->sz_b + t * a->sz_l : NULL;
        float *orow = a->out + b * a->so_b + t * a->so_l;
        const float *Bt = a->Bm + b * a->sB_b + t * a->sB_l;
        const float *Ct = a->Cm + b * a->sC_b + t * a->sC_l;
        for (i64 v = 0; v < nvec; v++) {
            const i64 dv = d0 + v * VL;
            const int vl = (int)(d1 - dv < VL ? d1 - dv : VL);
            if (vl == VL) {   /* a whole vector: every step in registers (vf) */
                const vf dtv = *(const vfu *)(dtrow + dv) + *(const vfu *)(bias + v * VL);
                const vf dlv = a->softplus ? vsoftplus_v(dtv) : dtv;
                const vf xv = *(const vfu *)(xrow + dv), dxv = dlv * xv;
                vf yv = *(const vfu *)(Dv + v * VL) * xv;
                for (i64 n = 0; n < N; n++) {
                    vfu *hn = (vfu *)(h + (v * N + n) * VL);
                    const vf hv = vexp_v(dlv * *(const vfu *)(At + (v * N + n) * VL)) * *hn + dxv * Bt[n * a->sB_n];
                    *hn = hv;
                    yv += hv * Ct[n * a->sC_n];
                }
                if (zrow) {
                    const vf zv = *(const vfu *)(zrow + dv);
                    yv *= zv * vsigmoid_v(zv);
                }
                *(vfu *)(orow + dv) = yv;
                continue;
            }
            float dl[VL], xv[VL], dx[VL], y[VL];   /* the last, partial vector of the range */
            step_delta(a, dtrow, bias + v * VL, dv, vl, dl, NULL);
            load_row(xv, xrow, dv, vl, 0.0f);
            _Pragma("omp simd") for (int j = 0; j < VL; j++) { dx[j] = dl[j] * xv[j]; y[j] = Dv[v * VL + j] * xv[j]; }
            for (i64 n = 0; n < N; n++) {
                const float bn = Bt[n * a->sB_n], cn = Ct[n * a->sC_n];
                float *hn = h + (v * N + n) * VL;
                const float *An = At + (v * N + n) * VL;
                _Pragma("omp simd") for (int j = 0; j < VL; j++) {
                    float hv = vexp(dl[j] * An[j]) * hn[j] + dx[j] * bn;
                    hn[j] = hv;
                    y[j] += hv * cn;
                }
            }
            if (zrow) {
                float zv[VL];
                load_row(zv, zrow, dv, vl, 0.0f);
                _Pragma("omp simd") for (int j = 0; j < VL; j++) y[j] *= zv[j] * vsigmoid(zv[j]);
            }
            store_row(orow, y, dv, vl);
        }
    }
    if (a->hfin)
        for (i64 v = 0; v < nvec; v++) {
            const i64 dv = d0 + v * VL;
            const int vl = (int)(d1 - dv < VL ? d1 - dv : VL);
            for (i64 n = 0; n < N; n++)
                for (int j = 0; j < vl; j++) a->hfin[(b * ED + dv + j) * N + n] = h[(v * N + n) * VL + j];
        }
    free(h); free(At); free(bias); free(Dv);
}

/* Backward of batch b, channels [d0, d1) (channel split `split` of n_split). Recomputes each
 * chunk's states from hsave, then runs the chunk in reverse. gA, gD, gbias are this batch's rows
 * (no other task writes them); gB, gC are this split's rows. */
void scan_bwd(const ScanArgs *a, i64 b, i64 d0, i64 d1, i64 split) {
    const i64 L = a->L, ED = a->ED, N = a->N, K = a->chunk;
    const i64 n_chunks = (L + K - 1) / K;
    const i64 nvec = (d1 - d0 + VL - 1) / VL;
    float *lam = (float *)calloc((size_t)(nvec * N * VL), sizeof(float));  /* dL/dh, per vector */
    float *hbuf = (float *)malloc(sizeof(float) * (K + 1) * N * VL);       /* h before, after each step */
    float *abuf = (float *)malloc(sizeof(float) * K * N * VL);             /* exp(delta A) */
    float *dbuf = (float *)malloc(sizeof(float) * K * VL * 2);             /* delta, d delta / d dt */
    float *gBl = (float *)malloc(sizeof(float) * K * N * VL);              /* lane partials */
    float *gCl = (float *)malloc(sizeof(float) * K * N * VL);
    float *At = (float *)malloc(sizeof(float) * nvec * N * VL);
    float *gA = (float *)calloc((size_t)(nvec * N * VL), sizeof(float));
    float *gD = (float *)calloc((size_t)(nvec * VL), sizeof(float));
    float *gb = (float *)calloc((size_t)(nvec * VL), sizeof(float));
    for (i64 v = 0; v < nvec; v++) {
        i64 dv = d0 + v * VL;
        int vl = (int)(d1 - dv < VL ? d1 - dv : VL);
        for (i64 n = 0; n < N; n++) {
            load_row(At + (v * N + n) * VL, a->At + n * ED, dv, vl, 0.0f);
            if (a->ghfin)
                for (int j = 0; j < vl; j++) lam[(v * N + n) * VL + j] = a->ghfin[(b * ED + dv + j) * N + n];
        }
    }
    for (i64 c = n_chunks - 1; c >= 0; c--) {
        const i64 t0 = c * K, t1 = (t0 + K < L) ? t0 + K : L, T = t1 - t0;
        memset(gBl, 0, sizeof(float) * T * N * VL);
        memset(gCl, 0, sizeof(float) * T * N * VL);
        for (i64 v = 0; v < nvec; v++) {
            const i64 dv = d0 + v * VL;
            const int vl = (int)(d1 - dv < VL ? d1 - dv : VL);
            const float *Av = At + v * N * VL;
            float bias[VL], Dv[VL];
            _Pragma("omp simd") for (int j = 0; j < VL; j++) {
                bias[j] = (a->bias && j < vl) ? a->bias[dv + j] : 0.0f;
                Dv[j] = (a->D && j < vl) ? a->D[dv + j] : 0.0f;
            }
            /* recompute: hbuf[0] = state before the chunk, hbuf[s + 1] after step t0 + s */
            const float *hs = a->hsave + (b * n_chunks + c) * N * ED;
            for (i64 n = 0; n < N; n++) load_row(hbuf + n * VL, hs + n * ED, dv, vl, 0.0f);
            for (i64 s = 0; s < T; s++) {
                const i64 t = t0 + s;
                float *dl = dbuf + s * 2 * VL, xv[VL], dx[VL];
                step_delta(a, a->dt + b * a->sdt_b + t * a->sdt_l, bias, dv, vl, dl, dl + VL);
                load_row(xv, a->x + b * a->sx_b + t * a->sx_l, dv, vl, 0.0f);
                _Pragma("omp simd") for (int j = 0; j < VL; j++) dx[j] = dl[j] * xv[j];
                const float *Bt = a->Bm + b * a->sB_b + t * a->sB_l;
                for (i64 n = 0; n < N; n++) {
                    const float bn = Bt[n * a->sB_n];
                    const float *hp = hbuf + (s * N + n) * VL;
                    float *hn = hbuf + ((s + 1) * N + n) * VL, *an = abuf + (s * N + n) * VL;
                    _Pragma("omp simd") for (int j = 0; j < VL; j++) {
                        float e = vexp(dl[j] * Av[n * VL + j]);
                        an[j] = e;
                        hn[j] = e * hp[j] + dx[j] * bn;
                    }
                }
            }
            float *lv = lam + v * N * VL, *gAv = gA + v * N * VL, *gDv = gD + v * VL, *gbv = gb + v * VL;
            for (i64 s = T - 1; s >= 0; s--) {
                const i64 t = t0 + s;
                const float *dl = dbuf + s * 2 * VL, *sg = dl + VL;
                float xv[VL], go[VL], gy[VL], gxv[VL], gdl[VL];
                load_row(xv, a->x + b * a->sx_b + t * a->sx_l, dv, vl, 0.0f);
                load_row(go, a->gout + b * a->sg_b + t * a->sg_l, dv, vl, 0.0f);
                const float *Bt = a->Bm + b * a->sB_b + t * a->sB_l;
                const float *Ct = a->Cm + b * a->sC_b + t * a->sC_l;
                if (a->z) {
                    float zv[VL], y[VL], gzv[VL];
                    load_row(zv, a->z + b * a->sz_b + t * a->sz_l, dv, vl, 0.0f);
                    _Pragma("omp simd") for (int j = 0; j < VL; j++) y[j] = Dv[j] * xv[j];
                    for (i64 n = 0; n < N; n++) {
                        const float cn = Ct[n * a->sC_n];
                        const float *hn = hbuf + ((s + 1) * N + n) * VL;
                        _Pragma("omp simd") for (int j = 0; j < VL; j++) y[j] += hn[j] * cn;
                    }
                    _Pragma("omp simd") for (int j = 0; j < VL; j++) {
                        float sz = vsigmoid(zv[j]);
                        gy[j] = go[j] * zv[j] * sz;
                        gzv[j] = go[j] * y[j] * sz * (1.0f + zv[j] * (1.0f - sz));
                    }
                    store_row(a->gz + (b * L + t) * ED, gzv, dv, vl);
                } else {
                    _Pragma("omp simd") for (int j = 0; j < VL; j++) gy[j] = go[j];
                }
                _Pragma("omp simd") for (int j = 0; j < VL; j++) {
                    gxv[j] = gy[j] * Dv[j];
                    gDv[j] += gy[j] * xv[j];
                    gdl[j] = 0.0f;
                }
                for (i64 n = 0; n < N; n++) {
                    const float bn = Bt[n * a->sB_n], cn = Ct[n * a->sC_n];
                    const float *hn = hbuf + ((s + 1) * N + n) * VL, *hp = hbuf + (s * N + n) * VL;
                    const float *an = abuf + (s * N + n) * VL, *Avn = Av + n * VL;
                    float *ln = lv + n * VL, *gAn = gAv + n * VL;
                    float *gBn = gBl + (s * N + n) * VL, *gCn = gCl + (s * N + n) * VL;
                    _Pragma("omp simd") for (int j = 0; j < VL; j++) {
                        float lj = ln[j] + gy[j] * cn;             /* dL/dh_t */
                        gCn[j] += gy[j] * hn[j];
                        gBn[j] += lj * dl[j] * xv[j];
                        gxv[j] += lj * dl[j] * bn;
                        float ga = lj * hp[j] * an[j];             /* dL/d(delta A) */
                        gdl[j] += lj * xv[j] * bn + ga * Avn[j];
                        gAn[j] += ga * dl[j];
                        ln[j] = lj * an[j];                        /* to h_{t-1} */
                    }
                }
                float gdt[VL];
                _Pragma("omp simd") for (int j = 0; j < VL; j++) { gdt[j] = gdl[j] * sg[j]; gbv[j] += gdt[j]; }
                store_row(a->gx + (b * L + t) * ED, gxv, dv, vl);
                store_row(a->gdt + (b * L + t) * ED, gdt, dv, vl);
            }
            /* lanes past ED (vl < VL) add zeros to gBl, gCl: their x, gout and h are 0 */
        }
        /* lane sums into this split's rows: gB[split][b][t][n] */
        for (i64 s = 0; s < T; s++)
            for (i64 n = 0; n < N; n++) {
                float sb = 0.0f, sc = 0.0f;
                _Pragma("omp simd") for (int j = 0; j < VL; j++) { sb += gBl[(s * N + n) * VL + j]; sc += gCl[(s * N + n) * VL + j]; }
                const i64 o = ((split * a->Bsz + b) * L + t0 + s) * N + n;
                a->gB[o] = sb;
                a->gC[o] = sc;
            }
    }
    for (i64 v = 0; v < nvec; v++) {
        const i64 dv = d0 + v * VL;
        const int vl = (int)(d1 - dv < VL ? d1 - dv : VL);
        for (i64 n = 0; n < N; n++) {
            store_row(a->gA + (b * N + n) * ED, gA + (v * N + n) * VL, dv, vl);
            for (int j = 0; j < vl; j++) a->gh0[(b * ED + dv + j) * N + n] = lam[(v * N + n) * VL + j];
        }
        store_row(a->gD + b * ED, gD + v * VL, dv, vl);
        store_row(a->gbias + b * ED, gb + v * VL, dv, vl);
    }
    free(lam); free(hbuf); free(abuf); free(dbuf); free(gBl); free(gCl); free(At);
    free(gA); free(gD); free(gb);
}

/* Causal depthwise conv + SiLU in (B, L, ED) layout, batch b, channels [d0, d1):
 * out[b, t, d] = silu(bias[d] + sum_k wT[k, d] x[b, t - (K-1) + k, d])  (x before t = 0 is 0).
 * x by strides (unit along ED: a half of in_proj's output); wT (K, ED), out (B, L, ED) contiguous. */
void causal_conv_silu(const float *x, i64 sx_b, i64 sx_l, const float *wT, const float *bias,
                      float *out, i64 L, i64 ED, i64 K, i64 b, i64 d0, i64 d1) {
    /* Streams over the channels of each step: for K = 4 one loop over four input rows (the
     * staged 16-channel version spilled its accumulator through the stack between taps: 33-45 ms
     * at B8 L2048 ED1024, against 2 ms to copy the same 64 MB); other K accumulate tap by tap
     * in the output row. The first K-1 steps skip the taps before 0. */
    const float *xb = x + b * sx_b;
    for (i64 t = 0; t < L; t++) {
        float *orow = out + (b * L + t) * ED;
        const i64 k0 = t < K - 1 ? K - 1 - t : 0;
        const i64 t0 = t - (K - 1);                      /* tap k reads row t0 + k (k >= k0: >= 0) */
        if (K == 4 && k0 == 0) {   /* Mamba's d_conv: four streams, no inner loop */
            const float *x0 = xb + t0 * sx_l, *x1 = x0 + sx_l, *x2 = x0 + 2 * sx_l, *x3 = x0 + 3 * sx_l;
            const float *w0 = wT, *w1 = wT + ED, *w2 = wT + 2 * ED, *w3 = wT + 3 * ED;
            _Pragma("omp simd") for (i64 d = d0; d < d1; d++) {
                float acc = bias[d] + w0[d] * x0[d] + w1[d] * x1[d] + w2[d] * x2[d] + w3[d] * x3[d];
                orow[d] = acc * vsigmoid(acc);
            }
            continue;
        }
        for (i64 d = d0; d < d1; d++) orow[d] = bias[d];
        for (i64 k = k0; k < K; k++) {
            const float *xk = xb + (t0 + k) * sx_l, *wk = wT + k * ED;
            _Pragma("omp simd") for (i64 d = d0; d < d1; d++) orow[d] += wk[d] * xk[d];
        }
        _Pragma("omp simd") for (i64 d = d0; d < d1; d++) orow[d] = orow[d] * vsigmoid(orow[d]);
    }
}

/* SwiGLU of rows [r0, r1): h13 (rows, 2I) = [h1 | h3] contiguous -> out (rows, I) =
 * silu(h1) * h3 * scale[r] (scale NULL: 1). One pass instead of three torch ops. */
void swiglu_rows(const float *h13, const float *scale, float *out, i64 I, i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; r++) {
        const float *h1 = h13 + r * 2 * I, *h3 = h1 + I;
        float *o = out + r * I;
        const float s = scale ? scale[r] : 1.0f;
        _Pragma("omp simd") for (i64 i = 0; i < I; i++) o[i] = h1[i] * vsigmoid(h1[i]) * h3[i] * s;
    }
}

/* RMSNorm of rows [r0, r1): out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (w NULL: 1). x rows
 * by stride sx (unit along D), out contiguous. One read of x, one write (torch: four passes). */
void rms_norm_rows(const float *x, i64 sx, const float *w, float eps, float *out, i64 D, i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; r++) {
        const float *xr = x + r * sx;
        float *o = out + r * D;
        float ss = 0.0f;
        _Pragma("omp simd reduction(+:ss)") for (i64 i = 0; i < D; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        if (w) { _Pragma("omp simd") for (i64 i = 0; i < D; i++) o[i] = xr[i] * inv * w[i]; }
        else   { _Pragma("omp simd") for (i64 i = 0; i < D; i++) o[i] = xr[i] * inv; }
    }
}

/* Causal softmax numerators of rows [r0, r1) of one query block of attention scores, in place:
 * s (n, ld) holds q . k for keys 0..end-1; row r is query position first + r and sees keys
 * j <= first + r. Each row becomes exp(scale (s_j - max)) for its keys and 0 past them, and
 * inv[r] = 1 / (its sum): the caller scales the rows of P V by inv (one multiply per output
 * instead of per score). One read and one write of each score. */
void attn_softmax_rows(float *s, i64 ld, i64 end, i64 first, float scale, float *inv, i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; r++) {
        float *row = s + r * ld;
        i64 n = first + r + 1;
        if (n > end) n = end;
        float m = -INFINITY;
        _Pragma("omp simd reduction(max:m)") for (i64 j = 0; j < n; j++) m = row[j] > m ? row[j] : m;
        const float ms = m * scale;
        float sum = 0.0f;
        _Pragma("omp simd reduction(+:sum)") for (i64 j = 0; j < n; j++) {
            float e = vexp(row[j] * scale - ms);
            row[j] = e;
            sum += e;
        }
        for (i64 j = n; j < end; j++) row[j] = 0.0f;
        inv[r] = 1.0f / sum;
    }
}

/* out row r (stride so, Dv values) = ot[:, r] * inv[r], for rows [r0, r1): the (Dv, n) product
 * P V transposed (as oneDNN wrote it) back to rows, normalized. In 16 x 16 tiles: a row-by-row
 * gather would read ot down its columns (stride n floats), and at n = 256 those lines alias in
 * a few L1 sets (measured 5x slower). */
void attn_store_rows(const float *ot, i64 n, i64 Dv, const float *inv, float *out, i64 so, i64 r0, i64 r1) {
    for (i64 rb = r0; rb < r1; rb += 16) {
        const i64 re = rb + 16 < r1 ? rb + 16 : r1;
        for (i64 db = 0; db < Dv; db += 16) {
            const i64 de = db + 16 < Dv ? db + 16 : Dv;
            float tile[16][16];
            for (i64 d = db; d < de; d++)
                for (i64 r = rb; r < re; r++) tile[r - rb][d - db] = ot[d * n + r];
            for (i64 r = rb; r < re; r++) {
                const float w = inv[r];
                float *o = out + r * so;
                for (i64 d = db; d < de; d++) o[d] = tile[r - rb][d - db] * w;
            }
        }
    }
}
