// Normalisation, channel-last: batch norm (x [M, C], statistics per channel over the M rows),
// group norm (x [N, P, C], statistics per sample and group of C / G consecutive channels over the
// P positions) and layer norm (x [M, C], statistics per row). Batch and group norm share every
// kernel: batch norm is group norm with N = 1, G = C, P = M ("stat index" s = n·G + c / (C / G)).
// Storage T is f32 or bf16 for x / y / dy / dx / residual; γ, β, statistics and the parameter
// gradients are f32; arithmetic is f32.
//
// Deterministic: every reduction has a fixed order given the launch geometry (no atomics).
//   Forward statistics. Stage 1 (norm_stats_partial): block (W channels × R = 256 / W row groups),
//   W = min(C, 32) (narrow layers keep every lane busy and read whole rows), grid (ceil(C / W),
//   splits, N); thread (cl, r) of split `sp` covers rows ≡ r (mod R) of the split and keeps
//   shifted sums Σ(x − K), Σ(x − K)² (K = its first value: no cancellation for
//   |mean| ≫ σ), turned into (count, mean, M2) and merged over r with Chan's formula in order.
//   Stage 2 (norm_stats_combine): per (n, c), Chan over the splits (r-strided, then in order).
//   Stage 3 (norm_stats_finalize): per (n, g), Chan over the group's channels → mean, 1/√(σ² + ε)
//   (biased σ²), and for batch norm the running-statistic update.
//   Backward: Σ dz and Σ dz·x̂ per (n, c) the same way (partial, combine), then per (n, g)
//   k1 = Σ_g γ·Σdz / cnt, k2 = Σ_g γ·Σdz·x̂ / cnt and dγ, dβ (norm_backward_finalize); then
//   dx = invstd·(γ·dz − k1 − x̂·k2) elementwise, dz = dy·silu'(z) with z = γ·x̂ + β recomputed.
#include "common.cuh"

// Row groups of the combine blocks (block = 32 × NR threads).
#define NR 8
// Threads of the stage-1 column blocks (W × R).
#define COL_THREADS 256

// Geometry shared by batch and group norm: x is [n, p, c]; stat index n·g + ch / cg.
struct NormGeom {
    int n, p, c, g, cg;
    int rows_per_split, splits;
    int silu;
    int tile;  // W: channels per stage-1 block, min(C, 32)
};

__device__ __forceinline__ float sigmoid_f(float z) { return 1.f / (1.f + expf(-z)); }

// Chan et al.: merges (nb, mb, qb) into (na, ma, qa); q is M2 = Σ(x − mean)².
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& qa, float nb, float mb, float qb) {
    if (nb == 0.f) return;
    if (na == 0.f) {
        na = nb;
        ma = mb;
        qa = qb;
        return;
    }
    const float n = na + nb;
    const float d = mb - ma;
    const float wb = nb / n;
    ma = ma + d * wb;
    qa = qa + qb + d * d * (na * wb);
    na = n;
}

// Rows [p0, p1) of the split of this block, within one sample.
__device__ __forceinline__ void split_rows(const NormGeom& g, int sp, int& p0, int& p1) {
    p0 = sp * g.rows_per_split;
    p1 = min(g.p, p0 + g.rows_per_split);
}

// ---- forward statistics ----------------------------------------------------------------------

// Stage 1: pmean / pm2 [n][splits][c] of each split (its count is implied by the geometry).
template <typename T>
__device__ __forceinline__ void stats_partial(const T* __restrict__ x, float* __restrict__ pmean,
                                              float* __restrict__ pm2, NormGeom g) {
    __shared__ float red_n[COL_THREADS], red_m[COL_THREADS], red_q[COL_THREADS];
    const int w = g.tile, rows = COL_THREADS / w;
    const int cl = threadIdx.x % w, r = threadIdx.x / w;
    const int ch = blockIdx.x * w + cl;
    const int sp = blockIdx.y, s = blockIdx.z;
    int p0, p1;
    split_rows(g, sp, p0, p1);
    float cnt = 0.f, mean = 0.f, m2 = 0.f;
    if (r < rows && ch < g.c && p0 + r < p1) {
        const T* xs = x + (u64)s * g.p * g.c + ch;
        const float k = to_acc(xs[(u64)(p0 + r) * g.c]);
        float s1 = 0.f, s2 = 0.f;
        int n = 0;
        for (int p = p0 + r; p < p1; p += rows) {
            const float d = to_acc(xs[(u64)p * g.c]) - k;
            s1 += d;
            s2 += d * d;
            ++n;
        }
        cnt = (float)n;
        const float dm = s1 / cnt;
        mean = k + dm;
        m2 = fmaxf(s2 - s1 * dm, 0.f);
    }
    red_n[threadIdx.x] = cnt;
    red_m[threadIdx.x] = mean;
    red_q[threadIdx.x] = m2;
    __syncthreads();
    if (r == 0 && ch < g.c) {
        float na = cnt, ma = mean, qa = m2;
        for (int rr = 1; rr < rows; ++rr) chan_merge(na, ma, qa, red_n[rr * w + cl], red_m[rr * w + cl], red_q[rr * w + cl]);
        const u64 o = ((u64)s * g.splits + sp) * g.c + ch;
        pmean[o] = ma;
        pm2[o] = qa;
    }
}

// Stage 2: cmean / cm2 [n][c] over all splits. Block (32 × NR), grid (ceil(C / 32), N).
KERNEL_BOUNDED(32 * NR, norm_stats_combine, const float* __restrict__ pmean, const float* __restrict__ pm2,
               float* __restrict__ cmean, float* __restrict__ cm2, NormGeom g) {
    __shared__ float red_n[NR][32], red_m[NR][32], red_q[NR][32];
    const int cl = threadIdx.x % 32, r = threadIdx.x / 32;
    const int ch = blockIdx.x * 32 + cl;
    const int s = blockIdx.y;
    float na = 0.f, ma = 0.f, qa = 0.f;
    if (ch < g.c) {
        for (int sp = r; sp < g.splits; sp += NR) {
            int p0, p1;
            split_rows(g, sp, p0, p1);
            const u64 o = ((u64)s * g.splits + sp) * g.c + ch;
            chan_merge(na, ma, qa, (float)(p1 - p0), pmean[o], pm2[o]);
        }
    }
    red_n[r][cl] = na;
    red_m[r][cl] = ma;
    red_q[r][cl] = qa;
    __syncthreads();
    if (r == 0 && ch < g.c) {
#pragma unroll
        for (int rr = 1; rr < NR; ++rr) chan_merge(na, ma, qa, red_n[rr][cl], red_m[rr][cl], red_q[rr][cl]);
        cmean[(u64)s * g.c + ch] = ma;
        cm2[(u64)s * g.c + ch] = qa;
    }
}

// Stage 3, one thread per (n, group): mean and invstd [n·G]; when running_mean is not null
// (batch norm), running = (1 − momentum)·running + momentum·batch, the variance term M2 / (cnt − 1)
// when `unbiased`, else M2 / cnt.
KERNEL(norm_stats_finalize, const float* __restrict__ cmean, const float* __restrict__ cm2, float* __restrict__ mean,
       float* __restrict__ invstd, float* __restrict__ running_mean, float* __restrict__ running_var, NormGeom g,
       float eps, float momentum, int unbiased) {
    const u64 items = (u64)g.n * g.g;
    GRID_STRIDE_LOOP(i, items) {
        const int s = (int)(i / g.g), grp = (int)(i % g.g);
        const u64 base = (u64)s * g.c + (u64)grp * g.cg;
        float na = 0.f, ma = 0.f, qa = 0.f;
        for (int j = 0; j < g.cg; ++j) chan_merge(na, ma, qa, (float)g.p, cmean[base + j], cm2[base + j]);
        const float cnt = (float)g.p * (float)g.cg;
        const float var = qa / cnt;
        mean[i] = ma;
        invstd[i] = 1.f / sqrtf(var + eps);
        if (running_mean != nullptr) {
            const float v = unbiased ? qa / (cnt - 1.f) : var;
            running_mean[i] = (1.f - momentum) * running_mean[i] + momentum * ma;
            running_var[i] = (1.f - momentum) * running_var[i] + momentum * v;
        }
    }
}

// Eval-mode batch norm: invstd[c] = 1 / √(running_var[c] + ε).
KERNEL(batch_norm_eval_invstd, const float* __restrict__ running_var, float* __restrict__ invstd, int c, float eps) {
    GRID_STRIDE_LOOP(i, (u64)c) { invstd[i] = 1.f / sqrtf(running_var[i] + eps); }
}

// ---- elementwise passes ----------------------------------------------------------------------

// Walks the flat grid-stride indices of a [rows, c] array keeping (row, channel) without a
// division per element.
struct RowCol {
    u64 i, stride, total;
    unsigned row, srow;  // unsigned: the step past the last row may pass INT_MAX
    int ch, sch, c;
    __device__ __forceinline__ RowCol(u64 total_, int c_) : total(total_), c(c_) {
        i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
        stride = (u64)gridDim.x * blockDim.x;
        row = (unsigned)(i / c);
        ch = (int)(i % c);
        srow = (unsigned)(stride / c);
        sch = (int)(stride % c);
    }
    __device__ __forceinline__ bool ok() const { return i < total; }
    __device__ __forceinline__ void next() {
        i += stride;
        row += srow;
        ch += sch;
        if (ch >= c) {
            ch -= c;
            ++row;
        }
    }
};

__device__ __forceinline__ int stat_index(const NormGeom& g, unsigned row, int ch) {
    // Batch norm (n = 1, cg = 1) skips both divisions.
    return (g.n == 1 ? 0 : (int)(row / (unsigned)g.p) * g.g) + (g.cg == 1 ? ch : ch / g.cg);
}

// y = act(γ·(x − μ)·invstd + β) (+ residual when not null).
template <typename T>
__device__ __forceinline__ void norm_apply(const T* __restrict__ x, const float* __restrict__ gamma,
                                           const float* __restrict__ beta, const float* __restrict__ mean,
                                           const float* __restrict__ invstd, const T* __restrict__ residual,
                                           T* __restrict__ y, NormGeom g) {
    for (RowCol rc((u64)g.n * g.p * g.c, g.c); rc.ok(); rc.next()) {
        const int s = stat_index(g, rc.row, rc.ch);
        const float xh = (to_acc(x[rc.i]) - mean[s]) * invstd[s];
        float z = gamma[rc.ch] * xh + beta[rc.ch];
        if (g.silu) z = z * sigmoid_f(z);
        if (residual != nullptr) z += to_acc(residual[rc.i]);
        y[rc.i] = from_acc<T>(z);
    }
}

// dL/dz from dL/dy through the fused activation (identity unless g.silu).
__device__ __forceinline__ float act_backward(const NormGeom& g, float dy, float xh, float gm, float bt) {
    if (!g.silu) return dy;
    const float z = gm * xh + bt;
    const float sg = sigmoid_f(z);
    return dy * (sg * (1.f + z * (1.f - sg)));
}

// Backward stage 1: p1 = Σ dz, p2 = Σ dz·x̂ per (n, split, c), [n][splits][c].
template <typename T>
__device__ __forceinline__ void backward_partial(const T* __restrict__ x, const T* __restrict__ dy,
                                                 const float* __restrict__ gamma, const float* __restrict__ beta,
                                                 const float* __restrict__ mean, const float* __restrict__ invstd,
                                                 float* __restrict__ p1, float* __restrict__ p2, NormGeom g) {
    __shared__ float red1[COL_THREADS], red2[COL_THREADS];
    const int w = g.tile, rows = COL_THREADS / w;
    const int cl = threadIdx.x % w, r = threadIdx.x / w;
    const int ch = blockIdx.x * w + cl;
    const int sp = blockIdx.y, s = blockIdx.z;
    int p0, p1r;
    split_rows(g, sp, p0, p1r);
    float a1 = 0.f, a2 = 0.f;
    if (r < rows && ch < g.c) {
        const int si = s * g.g + ch / g.cg;
        const float mu = mean[si], is = invstd[si], gm = gamma[ch], bt = beta[ch];
        const u64 off = (u64)s * g.p * g.c + ch;
        for (int p = p0 + r; p < p1r; p += rows) {
            const u64 o = off + (u64)p * g.c;
            const float xh = (to_acc(x[o]) - mu) * is;
            const float dz = act_backward(g, to_acc(dy[o]), xh, gm, bt);
            a1 += dz;
            a2 += dz * xh;
        }
    }
    red1[threadIdx.x] = a1;
    red2[threadIdx.x] = a2;
    __syncthreads();
    if (r == 0 && ch < g.c) {
        for (int rr = 1; rr < rows; ++rr) {
            a1 += red1[rr * w + cl];
            a2 += red2[rr * w + cl];
        }
        const u64 o = ((u64)s * g.splits + sp) * g.c + ch;
        p1[o] = a1;
        p2[o] = a2;
    }
}

// Sums [n][splits][c] partials over the splits: o1, o2 [n][c] (+)= Σ_split p1, p2 (in a fixed
// order: split ≡ r (mod NR) per thread, then the NR groups in order). Block (32 × NR), grid
// (ceil(C / 32), N). Also the parameter-gradient reduction of layer norm (n = 1, o = dβ, dγ).
KERNEL_BOUNDED(32 * NR, norm_sum_splits, const float* __restrict__ p1, const float* __restrict__ p2,
               float* __restrict__ o1, float* __restrict__ o2, int c, int splits, int accumulate) {
    __shared__ float red1[NR][32], red2[NR][32];
    const int cl = threadIdx.x % 32, r = threadIdx.x / 32;
    const int ch = blockIdx.x * 32 + cl;
    const int s = blockIdx.y;
    float a1 = 0.f, a2 = 0.f;
    if (ch < c) {
        for (int sp = r; sp < splits; sp += NR) {
            const u64 o = ((u64)s * splits + sp) * c + ch;
            a1 += p1[o];
            a2 += p2[o];
        }
    }
    red1[r][cl] = a1;
    red2[r][cl] = a2;
    __syncthreads();
    if (r == 0 && ch < c) {
#pragma unroll
        for (int rr = 1; rr < NR; ++rr) {
            a1 += red1[rr][cl];
            a2 += red2[rr][cl];
        }
        const u64 o = (u64)s * c + ch;
        if (accumulate) {
            a1 += o1[o];
            a2 += o2[o];
        }
        o1[o] = a1;
        o2[o] = a2;
    }
}

// Backward stage 3, from sdz, sdzx [n][c]: for i < C, dβ[i] (+)= Σ_n sdz, dγ[i] (+)= Σ_n sdzx;
// for i < N·G, k1[i] = Σ_{c ∈ group} γ_c·sdz / cnt and k2 likewise with sdzx (0 when !training:
// eval-mode batch norm, whose statistics do not depend on x).
KERNEL(norm_backward_finalize, const float* __restrict__ sdz, const float* __restrict__ sdzx,
       const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta, float* __restrict__ k1,
       float* __restrict__ k2, NormGeom g, int training, int accumulate) {
    const u64 items = max((u64)g.c, (u64)g.n * g.g);
    GRID_STRIDE_LOOP(i, items) {
        if (i < (u64)g.c) {
            float b = accumulate ? dbeta[i] : 0.f, w = accumulate ? dgamma[i] : 0.f;
            float sb = 0.f, sw = 0.f;
            for (int s = 0; s < g.n; ++s) {
                sb += sdz[(u64)s * g.c + i];
                sw += sdzx[(u64)s * g.c + i];
            }
            dbeta[i] = b + sb;
            dgamma[i] = w + sw;
        }
        if (i < (u64)g.n * g.g) {
            const int s = (int)(i / g.g), grp = (int)(i % g.g);
            const u64 base = (u64)s * g.c + (u64)grp * g.cg;
            float a1 = 0.f, a2 = 0.f;
            if (training) {
                for (int j = 0; j < g.cg; ++j) {
                    const float gm = gamma[grp * g.cg + j];
                    a1 += gm * sdz[base + j];
                    a2 += gm * sdzx[base + j];
                }
                const float cnt = (float)g.p * (float)g.cg;
                a1 /= cnt;
                a2 /= cnt;
            }
            k1[i] = a1;
            k2[i] = a2;
        }
    }
}

// dx = invstd·(γ·dz − k1 − x̂·k2).
template <typename T>
__device__ __forceinline__ void backward_dx(const T* __restrict__ x, const T* __restrict__ dy,
                                            const float* __restrict__ gamma, const float* __restrict__ beta,
                                            const float* __restrict__ mean, const float* __restrict__ invstd,
                                            const float* __restrict__ k1, const float* __restrict__ k2,
                                            T* __restrict__ dx, NormGeom g) {
    for (RowCol rc((u64)g.n * g.p * g.c, g.c); rc.ok(); rc.next()) {
        const int s = stat_index(g, rc.row, rc.ch);
        const float is = invstd[s];
        const float xh = (to_acc(x[rc.i]) - mean[s]) * is;
        const float gm = gamma[rc.ch];
        const float dz = act_backward(g, to_acc(dy[rc.i]), xh, gm, beta[rc.ch]);
        dx[rc.i] = from_acc<T>(is * (gm * dz - k1[s] - xh * k2[s]));
    }
}

// ---- layer norm --------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per row (grid-stride over rows): mean, then centred squares, then y; saves mean and
// invstd per row.
template <typename T>
__device__ __forceinline__ void ln_forward(const T* __restrict__ x, const float* __restrict__ gamma,
                                           const float* __restrict__ beta, T* __restrict__ y,
                                           float* __restrict__ mean, float* __restrict__ invstd, int rows, int c,
                                           float eps) {
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const T* xr = x + (u64)row * c;
        float s = 0.f;
        for (int j = lane; j < c; j += 32) s += to_acc(xr[j]);
        const float mu = warp_sum(s) / (float)c;
        float q = 0.f;
        for (int j = lane; j < c; j += 32) {
            const float d = to_acc(xr[j]) - mu;
            q += d * d;
        }
        const float is = 1.f / sqrtf(warp_sum(q) / (float)c + eps);
        T* yr = y + (u64)row * c;
        for (int j = lane; j < c; j += 32) yr[j] = from_acc<T>((to_acc(xr[j]) - mu) * is * gamma[j] + beta[j]);
        if (lane == 0) {
            mean[row] = mu;
            invstd[row] = is;
        }
    }
}

// dx per row: is·(γ dy − k1 − x̂ k2), k1 = Σ γ dy / C, k2 = Σ γ dy x̂ / C. One warp per row.
template <typename T>
__device__ __forceinline__ void ln_backward_dx(const T* __restrict__ x, const T* __restrict__ dy,
                                               const float* __restrict__ gamma, const float* __restrict__ mean,
                                               const float* __restrict__ invstd, T* __restrict__ dx, int rows, int c) {
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const T* xr = x + (u64)row * c;
        const T* dr = dy + (u64)row * c;
        const float mu = mean[row], is = invstd[row];
        float s1 = 0.f, s2 = 0.f;
        for (int j = lane; j < c; j += 32) {
            const float gd = to_acc(dr[j]) * gamma[j];
            s1 += gd;
            s2 += gd * (to_acc(xr[j]) - mu) * is;
        }
        const float k1 = warp_sum(s1) / (float)c, k2 = warp_sum(s2) / (float)c;
        T* o = dx + (u64)row * c;
        for (int j = lane; j < c; j += 32) {
            const float xh = (to_acc(xr[j]) - mu) * is;
            o[j] = from_acc<T>(is * (to_acc(dr[j]) * gamma[j] - k1 - xh * k2));
        }
    }
}

// Parameter gradients, stage 1: p1 = Σ dy, p2 = Σ dy·x̂ per (split, c) over the split's rows.
// Block (32 × NR), grid (ceil(C / 32), splits); stage 2 is norm_sum_splits into dβ, dγ.
template <typename T>
__device__ __forceinline__ void ln_backward_params(const T* __restrict__ x, const T* __restrict__ dy,
                                                   const float* __restrict__ mean, const float* __restrict__ invstd,
                                                   float* __restrict__ p1, float* __restrict__ p2, int rows, int c,
                                                   int rows_per_split) {
    __shared__ float red1[NR][32], red2[NR][32];
    const int cl = threadIdx.x % 32, r = threadIdx.x / 32;
    const int ch = blockIdx.x * 32 + cl;
    const int sp = blockIdx.y;
    const int r0 = sp * rows_per_split, r1 = min(rows, r0 + rows_per_split);
    float a1 = 0.f, a2 = 0.f;
    if (ch < c) {
        for (int row = r0 + r; row < r1; row += NR) {
            const u64 o = (u64)row * c + ch;
            const float d = to_acc(dy[o]);
            a1 += d;
            a2 += d * ((to_acc(x[o]) - mean[row]) * invstd[row]);
        }
    }
    red1[r][cl] = a1;
    red2[r][cl] = a2;
    __syncthreads();
    if (r == 0 && ch < c) {
#pragma unroll
        for (int rr = 1; rr < NR; ++rr) {
            a1 += red1[rr][cl];
            a2 += red2[rr][cl];
        }
        p1[(u64)sp * c + ch] = a1;
        p2[(u64)sp * c + ch] = a2;
    }
}

// ---- entry points ------------------------------------------------------------------------------

#define NORM_KERNELS(T, SUFFIX)                                                                                  \
    KERNEL_BOUNDED(COL_THREADS, norm_stats_partial_##SUFFIX,   const T* __restrict__ x, float* __restrict__ pmean,     \
                   float* __restrict__ pm2, NormGeom g) {                                                        \
        stats_partial(x, pmean, pm2, g);                                                                         \
    }                                                                                                            \
    KERNEL(norm_apply_##SUFFIX, const T* __restrict__ x, const float* __restrict__ gamma,                        \
           const float* __restrict__ beta, const float* __restrict__ mean, const float* __restrict__ invstd,     \
           const T* __restrict__ residual, T* __restrict__ y, NormGeom g) {                                      \
        norm_apply(x, gamma, beta, mean, invstd, residual, y, g);                                                \
    }                                                                                                            \
    KERNEL_BOUNDED(COL_THREADS, norm_backward_partial_##SUFFIX,   const T* __restrict__ x, const T* __restrict__ dy,   \
                   const float* __restrict__ gamma, const float* __restrict__ beta,                              \
                   const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ p1,     \
                   float* __restrict__ p2, NormGeom g) {                                                         \
        backward_partial(x, dy, gamma, beta, mean, invstd, p1, p2, g);                                           \
    }                                                                                                            \
    KERNEL(norm_backward_dx_##SUFFIX, const T* __restrict__ x, const T* __restrict__ dy,                         \
           const float* __restrict__ gamma, const float* __restrict__ beta, const float* __restrict__ mean,      \
           const float* __restrict__ invstd, const float* __restrict__ k1, const float* __restrict__ k2,         \
           T* __restrict__ dx, NormGeom g) {                                                                     \
        backward_dx(x, dy, gamma, beta, mean, invstd, k1, k2, dx, g);                                            \
    }                                                                                                            \
    KERNEL(layer_norm_forward_##SUFFIX, const T* __restrict__ x, const float* __restrict__ gamma,                \
           const float* __restrict__ beta, T* __restrict__ y, float* __restrict__ mean,                          \
           float* __restrict__ invstd, int rows, int c, float eps) {                                             \
        ln_forward(x, gamma, beta, y, mean, invstd, rows, c, eps);                                               \
    }                                                                                                            \
    KERNEL(layer_norm_backward_dx_##SUFFIX, const T* __restrict__ x, const T* __restrict__ dy,                   \
           const float* __restrict__ gamma, const float* __restrict__ mean, const float* __restrict__ invstd,    \
           T* __restrict__ dx, int rows, int c) {                                                                \
        ln_backward_dx(x, dy, gamma, mean, invstd, dx, rows, c);                                                 \
    }                                                                                                            \
    KERNEL_BOUNDED(32 * NR, layer_norm_backward_params_##SUFFIX, const T* __restrict__ x,                       \
                   const T* __restrict__ dy, const float* __restrict__ mean, const float* __restrict__ invstd,   \
                   float* __restrict__ p1, float* __restrict__ p2, int rows, int c, int rows_per_split) {        \
        ln_backward_params(x, dy, mean, invstd, p1, p2, rows, c, rows_per_split);                                \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(bf16, bf16)
