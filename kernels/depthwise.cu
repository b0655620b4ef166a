// Depthwise 2-D convolution, NHWC, no bias: x [N, H, W, C], w [C, K, K] (torch's [C, 1, K, K]),
// y [N, OH, OW, C]; oy·stride − pad_top + ky is the input row of tap ky (likewise columns).
// Forward and input gradient: one thread per output / input element, channel fastest (coalesced).
// Weight gradient: per-split partial sums in registers, then a fixed-order sum over splits
// (deterministic, no atomics). Storage T is f32 or bf16; arithmetic and the weight gradient are f32.
#include "common.cuh"

struct DwGeom {
    int n, h, w, c, oh, ow, stride, pad_top, pad_left;
};

template <int K, typename T>
__device__ __forceinline__ void dw_forward(const T* __restrict__ x, const T* __restrict__ wt, T* __restrict__ y,
                                           DwGeom g) {
    const u64 total = (u64)g.n * g.oh * g.ow * g.c;
    GRID_STRIDE_LOOP(i, total) {
        const int ch = (int)(i % g.c);
        u64 r = i / g.c;
        const int ox = (int)(r % g.ow);
        r /= g.ow;
        const int oy = (int)(r % g.oh);
        const int s = (int)(r / g.oh);
        const int iy0 = oy * g.stride - g.pad_top, ix0 = ox * g.stride - g.pad_left;
        const T* xs = x + (u64)s * g.h * g.w * g.c + ch;
        const T* ws = wt + (u64)ch * K * K;
        float acc = 0.f;
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
            const int iy = iy0 + ky;
            if (iy < 0 || iy >= g.h) continue;
#pragma unroll
            for (int kx = 0; kx < K; ++kx) {
                const int ix = ix0 + kx;
                if (ix < 0 || ix >= g.w) continue;
                acc += to_acc(xs[((u64)iy * g.w + ix) * g.c]) * to_acc(ws[ky * K + kx]);
            }
        }
        y[i] = from_acc<T>(acc);
    }
}

// dx[s, iy, ix, c] = Σ over taps (ky, kx) whose output (oy, ox) = ((iy + pad_top − ky) / stride, …)
// is whole and in range of dy[s, oy, ox, c] · w[c, ky, kx].
template <int K, typename T>
__device__ __forceinline__ void dw_backward_x(const T* __restrict__ dy, const T* __restrict__ wt, T* __restrict__ dx,
                                              DwGeom g) {
    const u64 total = (u64)g.n * g.h * g.w * g.c;
    GRID_STRIDE_LOOP(i, total) {
        const int ch = (int)(i % g.c);
        u64 r = i / g.c;
        const int ix = (int)(r % g.w);
        r /= g.w;
        const int iy = (int)(r % g.h);
        const int s = (int)(r / g.h);
        const T* dys = dy + (u64)s * g.oh * g.ow * g.c + ch;
        const T* ws = wt + (u64)ch * K * K;
        float acc = 0.f;
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
            const int ty = iy + g.pad_top - ky;
            if (ty < 0 || ty % g.stride != 0) continue;
            const int oy = ty / g.stride;
            if (oy >= g.oh) continue;
#pragma unroll
            for (int kx = 0; kx < K; ++kx) {
                const int tx = ix + g.pad_left - kx;
                if (tx < 0 || tx % g.stride != 0) continue;
                const int ox = tx / g.stride;
                if (ox >= g.ow) continue;
                acc += to_acc(dys[((u64)oy * g.ow + ox) * g.c]) * to_acc(ws[ky * K + kx]);
            }
        }
        dx[i] = from_acc<T>(acc);
    }
}

// Weight gradient, stage 1. Block (32 channels × DW_ROWS position groups); grid (ceil(C / 32),
// splits). Thread (cl, r) of block (bx, split) sums, for channel 32·bx + cl, every K² tap over the
// output positions p ≡ r (mod DW_ROWS) of the split's range, then the block adds its DW_ROWS
// partials in shared memory: partial[split][c][tap].
constexpr int DW_ROWS = 8;

template <int K, typename T>
__device__ __forceinline__ void dw_backward_w_partial(const T* __restrict__ x, const T* __restrict__ dy,
                                                      float* __restrict__ partial, DwGeom g, int positions_per_split) {
    __shared__ float red[DW_ROWS][K * K][32];
    const int cl = threadIdx.x % 32, r = threadIdx.x / 32;
    const int ch = blockIdx.x * 32 + cl;
    const long long positions = (long long)g.n * g.oh * g.ow;
    const long long p0 = (long long)blockIdx.y * positions_per_split;
    const long long p1 = min(positions, p0 + positions_per_split);
    float acc[K * K];
#pragma unroll
    for (int t = 0; t < K * K; ++t) acc[t] = 0.f;
    if (ch < g.c) {
        for (long long p = p0 + r; p < p1; p += DW_ROWS) {
            const int ox = (int)(p % g.ow);
            const long long q = p / g.ow;
            const int oy = (int)(q % g.oh);
            const int s = (int)(q / g.oh);
            const float d = to_acc(dy[(u64)p * g.c + ch]);
            const int iy0 = oy * g.stride - g.pad_top, ix0 = ox * g.stride - g.pad_left;
            const T* xs = x + (u64)s * g.h * g.w * g.c + ch;
#pragma unroll
            for (int ky = 0; ky < K; ++ky) {
                const int iy = iy0 + ky;
                if (iy < 0 || iy >= g.h) continue;
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    const int ix = ix0 + kx;
                    if (ix < 0 || ix >= g.w) continue;
                    acc[ky * K + kx] += d * to_acc(xs[((u64)iy * g.w + ix) * g.c]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < K * K; ++t) red[r][t][cl] = acc[t];
    __syncthreads();
    // Thread (cl, r) now adds tap rows t ≡ r (mod DW_ROWS) over the DW_ROWS groups, in order.
    for (int t = r; t < K * K; t += DW_ROWS) {
        float sum = 0.f;
#pragma unroll
        for (int rr = 0; rr < DW_ROWS; ++rr) sum += red[rr][t][cl];
        if (ch < g.c) partial[((u64)blockIdx.y * g.c + ch) * (K * K) + t] = sum;
    }
}

#define DW_KERNELS(T, SUFFIX, K)                                                                               \
    KERNEL(depthwise_forward_k##K##_##SUFFIX, const T* __restrict__ x, const T* __restrict__ w,               \
           T* __restrict__ y, DwGeom g) {                                                                      \
        dw_forward<K>(x, w, y, g);                                                                             \
    }                                                                                                          \
    KERNEL(depthwise_backward_x_k##K##_##SUFFIX, const T* __restrict__ dy, const T* __restrict__ w,           \
           T* __restrict__ dx, DwGeom g) {                                                                     \
        dw_backward_x<K>(dy, w, dx, g);                                                                        \
    }                                                                                                          \
    KERNEL_BOUNDED(32 * DW_ROWS, depthwise_backward_w_k##K##_##SUFFIX, const T* __restrict__ x,               \
                   const T* __restrict__ dy, float* __restrict__ partial, DwGeom g, int positions_per_split) { \
        dw_backward_w_partial<K>(x, dy, partial, g, positions_per_split);                                      \
    }

DW_KERNELS(float, f32, 3)
DW_KERNELS(float, f32, 5)
DW_KERNELS(bf16, bf16, 3)
DW_KERNELS(bf16, bf16, 5)

// Weight gradient, stage 2: dw[i] (+)= Σ_split partial[split][i], splits in order; i < len = C·K².
KERNEL(depthwise_backward_w_reduce, const float* __restrict__ partial, float* __restrict__ dw, u64 len, int splits,
       int accumulate) {
    GRID_STRIDE_LOOP(i, len) {
        float sum = accumulate ? dw[i] : 0.f;
        for (int s = 0; s < splits; ++s) sum += partial[(u64)s * len + i];
        dw[i] = sum;
    }
}
