// Multi-head scaled-dot-product attention, flash style (src/ops/attention.rs is the CPU reference):
// q [N, Lq, H·D], k [N, Lk, H·D], v [N, Lk, H·Dv] → o [N, Lq, H·Dv]; head h is channels
// h·D..(h+1)·D (resp. h·Dv..) of the last axis; o = softmax(scale · q kᵀ) v per (sample, head).
// No Lq × Lk buffer: the forward walks 32-key tiles with an online softmax and keeps the per-row
// log-sum-exp lse [N, H, Lq] (f32); the backward recomputes P = exp(scale · q kᵀ − lse) per tile.
//
// Geometry: blocks of ATT_WARPS warps. Every kernel is templated on DB, a bound (32, 64 or 128) on
// D and Dv that sizes the shared tiles (static shared memory, < 48 KiB) and the per-lane accumulators
// (DB / 32 channels per lane), and on R, the rows (queries or keys) each warp owns.
//   forward, dq: block = (query tile of ATT_WARPS·R rows, head, sample); lane j of a warp scores key
//                j of the current key tile against the warp's R queries (k tile padded to DB + 1
//                floats per row: conflict-free), then lane c accumulates output channels c + 32·t.
//   dk / dv:     block = (key tile of ATT_WARPS·R keys, head, sample); lane i scores query i of the
//                current 32-query tile against the warp's R keys, then accumulates channels.
// Every output element is owned by one thread and summed in a fixed order (key tiles ascending for
// o and dq, query tiles ascending for dk and dv): deterministic, no atomics.
// Storage T is f32 or bf16; tiles are widened to f32 in shared memory, arithmetic is f32.
// Heads wider than 128 (D or Dv up to 1024, any value) run as GEMMs over chunks of query rows,
// with the row-wise kernels at the end of the file between them.
//
// Backward: Δ = rowsum(dO ∘ O) (attention_backward_delta), dS = P ∘ (dO vᵀ − Δ),
// dq = scale · dS k, dk = scale · dSᵀ q, dv = Pᵀ dO.
#include "common.cuh"

struct AttnGeom {
    int n, lq, lk, h, d, dv;
    float scale;
};

constexpr int ATT_WARPS = 4;
constexpr int ATT_THREADS = 32 * ATT_WARPS;
// __launch_bounds__(ATT_THREADS, 4): at least 4 blocks per multiprocessor (≤ 128 registers; the
// shared tiles are < 48 KiB each). Without the minimum, ptxas trades a few spills for occupancy
// on some instantiations.
#define ATT_BOUNDS ATT_THREADS, 4
// Keys per tile (forward, dq) and queries per tile (dk / dv): one per lane.
constexpr int ATT_TILE = 32;
// Rows per warp: the forward's queries; the backward's queries (dq) or keys (dk / dv), fewer at
// DB = 128 so the backward's four tiles fit the 48 KiB of static shared memory.
constexpr int ATT_FWD_ROWS = 4;
template <int DB> struct AttBwd { static constexpr int ROWS = DB >= 128 ? 2 : 4; };

__device__ __forceinline__ float att_neg_inf() { return __int_as_float((int)0xff800000u); }

__device__ __forceinline__ float att_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float att_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// dst[r·stride + c] = src[sample n, row row0 + r, head h, channel c] as f32 for r < rows, c < cols
// (src is [N, len, heads·cols]); rows at or past len are zeros. Columns cols.. are left alone
// (att_zero_pad zeroes them once per kernel).
template <typename T>
__device__ __forceinline__ void att_load(float* dst, int stride, const T* __restrict__ src, int n, int len, int heads,
                                         int cols, int h, int row0, int rows) {
    const int total = rows * cols;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
        const int r = e / cols, c = e - r * cols;
        const int row = row0 + r;
        dst[r * stride + c] =
            row < len ? to_acc(src[((u64)n * len + row) * heads * cols + (u64)h * cols + c]) : 0.f;
    }
}

// dst[r·stride + c] = 0 for r < rows, cols ≤ c < DB: the channels past D (or Dv) that the per-lane
// accumulators read but never store. Disjoint from what att_load writes: no barrier needed between.
template <int DB>
__device__ __forceinline__ void att_zero_pad(float* dst, int stride, int cols, int rows) {
    const int pad = DB - cols;
    for (int e = threadIdx.x; e < rows * pad; e += blockDim.x) {
        const int r = e / pad;
        dst[r * stride + cols + e - r * pad] = 0.f;
    }
}

template <int DB, int R, typename T>
__device__ __forceinline__ void att_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                            T* __restrict__ o, float* __restrict__ lse, AttnGeom g) {
    constexpr int BQ = ATT_WARPS * R, CT = DB / 32;
    __shared__ float q_s[BQ][DB];
    __shared__ float k_s[ATT_TILE][DB + 1];
    __shared__ float v_s[ATT_TILE][DB];
    __shared__ float p_s[ATT_WARPS][R][ATT_TILE];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    const int h = blockIdx.y, n = blockIdx.z, q0 = blockIdx.x * BQ;
    att_load(&q_s[0][0], DB, q, n, g.lq, g.h, g.d, h, q0, BQ);
    att_zero_pad<DB>(&v_s[0][0], DB, g.dv, ATT_TILE);
    float m[R], l[R], acc[R][CT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = att_neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int t = 0; t < CT; ++t) acc[r][t] = 0.f;
    }
    for (int k0 = 0; k0 < g.lk; k0 += ATT_TILE) {
        __syncthreads();  // the previous tile's readers are done
        att_load(&k_s[0][0], DB + 1, k, n, g.lk, g.h, g.d, h, k0, ATT_TILE);
        att_load(&v_s[0][0], DB, v, n, g.lk, g.h, g.dv, h, k0, ATT_TILE);
        __syncthreads();
        const int cnt = min(ATT_TILE, g.lk - k0);
        const bool valid = lane < cnt;
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = 0.f;
#pragma unroll 8
        for (int d = 0; d < g.d; ++d) {
            const float kd = k_s[lane][d];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] += q_s[w * R + r][d] * kd;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            // cnt ≥ 1: the tile maximum, hence mn, is finite.
            const float sr = valid ? s[r] * g.scale : att_neg_inf();
            const float mn = fmaxf(m[r], att_warp_max(sr));
            const float alpha = expf(m[r] - mn);
            const float p = valid ? expf(sr - mn) : 0.f;
            l[r] = l[r] * alpha + att_warp_sum(p);
            m[r] = mn;
#pragma unroll
            for (int t = 0; t < CT; ++t) acc[r][t] *= alpha;
            p_s[w][r][lane] = p;
        }
        __syncwarp();
        for (int j = 0; j < cnt; ++j) {
            float vv[CT];
#pragma unroll
            for (int t = 0; t < CT; ++t) vv[t] = v_s[j][lane + 32 * t];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float pj = p_s[w][r][j];
#pragma unroll
                for (int t = 0; t < CT; ++t) acc[r][t] += pj * vv[t];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = q0 + w * R + r;
        if (row >= g.lq) continue;
        const float inv = 1.f / l[r];
        T* orow = o + ((u64)n * g.lq + row) * g.h * g.dv + (u64)h * g.dv;
#pragma unroll
        for (int t = 0; t < CT; ++t) {
            const int c = lane + 32 * t;
            if (c < g.dv) orow[c] = from_acc<T>(acc[r][t] * inv);
        }
        if (lane == 0) lse[((u64)n * g.h + h) * g.lq + row] = m[r] + logf(l[r]);
    }
}

// Δ[n, h, i] = Σ_c dO[n, i, h·Dv + c] · O[n, i, h·Dv + c]: one warp per (n, i, h), grid-stride.
template <typename T>
__device__ __forceinline__ void att_delta(const T* __restrict__ o, const T* __restrict__ dout,
                                          float* __restrict__ delta, AttnGeom g) {
    const u64 rows = (u64)g.n * g.lq * g.h;
    const int lane = threadIdx.x % 32;
    const u64 warps = (u64)gridDim.x * (blockDim.x / 32);
    for (u64 rr = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; rr < rows; rr += warps) {
        float acc = 0.f;
        for (int c = lane; c < g.dv; c += 32) acc += to_acc(o[rr * g.dv + c]) * to_acc(dout[rr * g.dv + c]);
        acc = att_warp_sum(acc);
        if (lane == 0) {
            const u64 n = rr / ((u64)g.lq * g.h), rem = rr % ((u64)g.lq * g.h);
            const u64 i = rem / g.h, h = rem % g.h;
            delta[(n * g.h + h) * g.lq + i] = acc;
        }
    }
}

template <int DB, int R, typename T>
__device__ __forceinline__ void att_backward_dq(const T* __restrict__ q, const T* __restrict__ k,
                                                const T* __restrict__ v, const T* __restrict__ dout,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                T* __restrict__ dq, AttnGeom g) {
    constexpr int BQ = ATT_WARPS * R, CT = DB / 32;
    __shared__ float q_s[BQ][DB];
    __shared__ float do_s[BQ][DB];
    __shared__ float k_s[ATT_TILE][DB + 1];
    __shared__ float v_s[ATT_TILE][DB + 1];
    __shared__ float ds_s[ATT_WARPS][R][ATT_TILE];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    const int h = blockIdx.y, n = blockIdx.z, q0 = blockIdx.x * BQ;
    att_load(&q_s[0][0], DB, q, n, g.lq, g.h, g.d, h, q0, BQ);
    att_load(&do_s[0][0], DB, dout, n, g.lq, g.h, g.dv, h, q0, BQ);
    att_zero_pad<DB>(&k_s[0][0], DB + 1, g.d, ATT_TILE);
    // Rows past Lq get lse = +∞: their probabilities are 0.
    float lse_r[R], del_r[R], acc[R][CT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = q0 + w * R + r;
        const u64 at = ((u64)n * g.h + h) * g.lq + row;
        lse_r[r] = row < g.lq ? lse[at] : -att_neg_inf();
        del_r[r] = row < g.lq ? delta[at] : 0.f;
#pragma unroll
        for (int t = 0; t < CT; ++t) acc[r][t] = 0.f;
    }
    for (int k0 = 0; k0 < g.lk; k0 += ATT_TILE) {
        __syncthreads();
        att_load(&k_s[0][0], DB + 1, k, n, g.lk, g.h, g.d, h, k0, ATT_TILE);
        att_load(&v_s[0][0], DB + 1, v, n, g.lk, g.h, g.dv, h, k0, ATT_TILE);
        __syncthreads();
        const int cnt = min(ATT_TILE, g.lk - k0);
        const bool valid = lane < cnt;
        float s[R], dp[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 8
        for (int d = 0; d < g.d; ++d) {
            const float kd = k_s[lane][d];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] += q_s[w * R + r][d] * kd;
        }
#pragma unroll 8
        for (int c = 0; c < g.dv; ++c) {
            const float vc = v_s[lane][c];
#pragma unroll
            for (int r = 0; r < R; ++r) dp[r] += do_s[w * R + r][c] * vc;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float p = valid ? expf(s[r] * g.scale - lse_r[r]) : 0.f;
            ds_s[w][r][lane] = p * (dp[r] - del_r[r]);
        }
        __syncwarp();
        for (int j = 0; j < cnt; ++j) {
            float kk[CT];
#pragma unroll
            for (int t = 0; t < CT; ++t) kk[t] = k_s[j][lane + 32 * t];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float dsj = ds_s[w][r][j];
#pragma unroll
                for (int t = 0; t < CT; ++t) acc[r][t] += dsj * kk[t];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (q0 + w * R + r >= g.lq) continue;
        T* row = dq + ((u64)n * g.lq + q0 + w * R + r) * g.h * g.d + (u64)h * g.d;
#pragma unroll
        for (int t = 0; t < CT; ++t) {
            const int c = lane + 32 * t;
            if (c < g.d) row[c] = from_acc<T>(acc[r][t] * g.scale);
        }
    }
}

template <int DB, int R, typename T>
__device__ __forceinline__ void att_backward_dkv(const T* __restrict__ q, const T* __restrict__ k,
                                                 const T* __restrict__ v, const T* __restrict__ dout,
                                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                                 T* __restrict__ dk, T* __restrict__ dv, AttnGeom g) {
    constexpr int BK = ATT_WARPS * R, CT = DB / 32;
    __shared__ float k_s[BK][DB];
    __shared__ float v_s[BK][DB];
    __shared__ float q_s[ATT_TILE][DB + 1];
    __shared__ float do_s[ATT_TILE][DB + 1];
    __shared__ float lse_s[ATT_TILE], del_s[ATT_TILE];
    __shared__ float p_s[ATT_WARPS][R][ATT_TILE];
    __shared__ float ds_s[ATT_WARPS][R][ATT_TILE];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    const int h = blockIdx.y, n = blockIdx.z, k0 = blockIdx.x * BK;
    att_load(&k_s[0][0], DB, k, n, g.lk, g.h, g.d, h, k0, BK);
    att_load(&v_s[0][0], DB, v, n, g.lk, g.h, g.dv, h, k0, BK);
    att_zero_pad<DB>(&q_s[0][0], DB + 1, g.d, ATT_TILE);
    att_zero_pad<DB>(&do_s[0][0], DB + 1, g.dv, ATT_TILE);
    float dk_acc[R][CT], dv_acc[R][CT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int t = 0; t < CT; ++t) dk_acc[r][t] = dv_acc[r][t] = 0.f;
    }
    const u64 stats = ((u64)n * g.h + h) * g.lq;
    for (int q0 = 0; q0 < g.lq; q0 += ATT_TILE) {
        __syncthreads();
        att_load(&q_s[0][0], DB + 1, q, n, g.lq, g.h, g.d, h, q0, ATT_TILE);
        att_load(&do_s[0][0], DB + 1, dout, n, g.lq, g.h, g.dv, h, q0, ATT_TILE);
        for (int i = threadIdx.x; i < ATT_TILE; i += blockDim.x) {
            const bool ok = q0 + i < g.lq;
            lse_s[i] = ok ? lse[stats + q0 + i] : 0.f;
            del_s[i] = ok ? delta[stats + q0 + i] : 0.f;
        }
        __syncthreads();
        const int cnt = min(ATT_TILE, g.lq - q0);
        const bool valid = lane < cnt;
        float s[R], dp[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 8
        for (int d = 0; d < g.d; ++d) {
            const float qd = q_s[lane][d];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] += k_s[w * R + r][d] * qd;
        }
#pragma unroll 8
        for (int c = 0; c < g.dv; ++c) {
            const float oc = do_s[lane][c];
#pragma unroll
            for (int r = 0; r < R; ++r) dp[r] += v_s[w * R + r][c] * oc;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float p = valid && k0 + w * R + r < g.lk ? expf(s[r] * g.scale - lse_s[lane]) : 0.f;
            p_s[w][r][lane] = p;
            ds_s[w][r][lane] = p * (dp[r] - del_s[lane]);
        }
        __syncwarp();
        for (int i = 0; i < cnt; ++i) {
            float qq[CT], oo[CT];
#pragma unroll
            for (int t = 0; t < CT; ++t) {
                qq[t] = q_s[i][lane + 32 * t];
                oo[t] = do_s[i][lane + 32 * t];
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float pi = p_s[w][r][i], dsi = ds_s[w][r][i];
#pragma unroll
                for (int t = 0; t < CT; ++t) {
                    dv_acc[r][t] += pi * oo[t];
                    dk_acc[r][t] += dsi * qq[t];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (k0 + w * R + r >= g.lk) continue;
        const u64 key = (u64)n * g.lk + k0 + w * R + r;
        T* dkr = dk + key * g.h * g.d + (u64)h * g.d;
        T* dvr = dv + key * g.h * g.dv + (u64)h * g.dv;
#pragma unroll
        for (int t = 0; t < CT; ++t) {
            const int c = lane + 32 * t;
            if (c < g.d) dkr[c] = from_acc<T>(dk_acc[r][t] * g.scale);
            if (c < g.dv) dvr[c] = from_acc<T>(dv_acc[r][t]);
        }
    }
}

#define ATT_KERNELS(T, SUFFIX, DB)                                                                              \
    KERNEL_BOUNDED(ATT_BOUNDS, attention_forward_d##DB##_##SUFFIX, const T* __restrict__ q,                   \
                   const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse, \
                   AttnGeom g) {                                                                                \
        att_forward<DB, ATT_FWD_ROWS>(q, k, v, o, lse, g);                                                      \
    }                                                                                                           \
    KERNEL_BOUNDED(ATT_BOUNDS, attention_backward_dq_d##DB##_##SUFFIX, const T* __restrict__ q,               \
                   const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,               \
                   const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,         \
                   AttnGeom g) {                                                                                \
        att_backward_dq<DB, AttBwd<DB>::ROWS>(q, k, v, dout, lse, delta, dq, g);                               \
    }                                                                                                           \
    KERNEL_BOUNDED(ATT_BOUNDS, attention_backward_dkv_d##DB##_##SUFFIX, const T* __restrict__ q,              \
                   const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,               \
                   const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk,         \
                   T* __restrict__ dv, AttnGeom g) {                                                            \
        att_backward_dkv<DB, AttBwd<DB>::ROWS>(q, k, v, dout, lse, delta, dk, dv, g);                          \
    }

ATT_KERNELS(float, f32, 32)
ATT_KERNELS(float, f32, 64)
ATT_KERNELS(float, f32, 128)
ATT_KERNELS(bf16, bf16, 32)
ATT_KERNELS(bf16, bf16, 64)
ATT_KERNELS(bf16, bf16, 128)

KERNEL(attention_backward_delta_f32, const float* __restrict__ o, const float* __restrict__ dout,
       float* __restrict__ delta, AttnGeom g) {
    att_delta(o, dout, delta, g);
}
KERNEL(attention_backward_delta_bf16, const bf16* __restrict__ o, const bf16* __restrict__ dout,
       float* __restrict__ delta, AttnGeom g) {
    att_delta(o, dout, delta, g);
}

// ---------------------------------------------------------------------------------------------
// Wide heads (D or Dv above 128): the products run as cuBLAS GEMMs on tensor cores over chunks of
// query rows (src/backend/gpu/attention.rs); these kernels are the row-wise steps between them.
// A chunk holds `rows` = N · rq score rows (sample-major, rq query rows [q0, q0 + rq) per sample)
// of `lk` f32 scores each, row stride `ld`. One warp per row, grid-stride over rows; every value
// is computed by one lane in a fixed order (deterministic, no atomics).
struct AttnRows {
    int rows, rq, q0;    // the chunk's rows, query rows per sample, first query row
    int lk, ld;          // keys (valid columns), row stride
    int h, heads, lq;    // head, heads, query length: the lse / Δ index [N, H, Lq]
};

// lse / Δ index of chunk row r: sample r / rq, query q0 + r % rq.
__device__ __forceinline__ u64 att_row_index(const AttnRows& c, int r) {
    const int n = r / c.rq;
    return ((u64)n * c.heads + c.h) * c.lq + c.q0 + (r - n * c.rq);
}

// s holds scale · q kᵀ. p = softmax(s) row-wise (as T), lse = max + log Σ exp(s − max) (f32).
template <typename T>
__device__ __forceinline__ void att_softmax_rows(const float* __restrict__ s, T* __restrict__ p, float* __restrict__ lse,
                                                 AttnRows c) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < c.rows; r += gridDim.x * warps) {
        const float* row = s + (u64)r * c.ld;
        // Each lane's running max and sum over its columns (online rescaling), then the warp's.
        float m = att_neg_inf(), l = 0.f;
        for (int j = lane; j < c.lk; j += 32) {
            const float x = row[j];
            const float mn = fmaxf(m, x);
            l = l * expf(m - mn) + expf(x - mn);
            m = mn;
        }
        const float mw = att_warp_max(m);
        l = att_warp_sum(m == att_neg_inf() ? 0.f : l * expf(m - mw));
        const float inv = 1.f / l;
        T* out = p + (u64)r * c.ld;
        for (int j = lane; j < c.lk; j += 32) out[j] = from_acc<T>(expf(row[j] - mw) * inv);
        if (lane == 0) lse[att_row_index(c, r)] = mw + logf(l);
    }
}

// s holds scale · q kᵀ, dp = dO vᵀ: p = exp(s − lse) and ds = p ∘ (dp − Δ), both as T.
template <typename T>
__device__ __forceinline__ void att_ds_rows(const float* __restrict__ s, const float* __restrict__ dp,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            T* __restrict__ p, T* __restrict__ ds, AttnRows c) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < c.rows; r += gridDim.x * warps) {
        const u64 at = att_row_index(c, r);
        const float lr = lse[at], dr = delta[at];
        const u64 base = (u64)r * c.ld;
        for (int j = lane; j < c.lk; j += 32) {
            const float pv = expf(s[base + j] - lr);
            p[base + j] = from_acc<T>(pv);
            ds[base + j] = from_acc<T>(pv * (dp[base + j] - dr));
        }
    }
}

#define ATT_ROW_KERNELS(T, SUFFIX)                                                                              \
    KERNEL(attention_softmax_rows_##SUFFIX, const float* __restrict__ s, T* __restrict__ p,                     \
           float* __restrict__ lse, AttnRows c) {                                                               \
        att_softmax_rows(s, p, lse, c);                                                                         \
    }                                                                                                           \
    KERNEL(attention_ds_rows_##SUFFIX, const float* __restrict__ s, const float* __restrict__ dp,               \
           const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ p, T* __restrict__ ds, \
           AttnRows c) {                                                                                        \
        att_ds_rows(s, dp, lse, delta, p, ds, c);                                                               \
    }

ATT_ROW_KERNELS(float, f32)
ATT_ROW_KERNELS(bf16, bf16)
