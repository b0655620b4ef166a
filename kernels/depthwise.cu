// Depthwise 2-D convolution, NHWC, no bias: x [N, H, W, C], w [C, K, K] (torch's [C, 1, K, K]),
// y [N, OH, OW, C]; oy·stride − pad_top + ky is the input row of tap ky (likewise columns).
// Forward and input gradient: one thread per output / input pixel and 1 or 16 / sizeof(T) channels,
// channels fastest (coalesced), weights tap-major.
// Weight gradient: per-split partial sums in registers, then a fixed-order sum over splits
// (deterministic, no atomics). Storage T is f32 or bf16; arithmetic and the weight gradient are f32.
#include "common.cuh"

struct DwGeom {
    int n, h, w, c, oh, ow, stride, pad_top, pad_left;
};

// V channels of T loaded or stored together (one 16-byte access when V · sizeof(T) = 16).
template <typename T, int V> struct __align__(sizeof(T) * V) DwPack { T v[V]; };

// Splits item i of a grid-stride loop over pixels × (C / V) channel groups into the channel
// group and the pixel: 32-bit division when every item index fits (`small`, uniform per launch).
__device__ __forceinline__ void dw_split(u64 i, unsigned groups, bool small, unsigned& grp, u64& pix) {
    if (small) {
        const unsigned e = (unsigned)i;
        grp = e % groups;
        pix = e / groups;
    } else {
        grp = (unsigned)(i % groups);
        pix = i / groups;
    }
}

// (sample, row, column) of pixel index pix of an [N, rows, cols] grid (32-bit when small).
__device__ __forceinline__ void dw_pixel(u64 pix, int rows, int cols, bool small, int& s, int& y, int& x) {
    if (small) {
        const unsigned p = (unsigned)pix, q = p / (unsigned)cols;
        x = (int)(p - q * (unsigned)cols);
        y = (int)(q % (unsigned)rows);
        s = (int)(q / (unsigned)rows);
    } else {
        const u64 q = pix / (u64)cols;
        x = (int)(pix - q * (u64)cols);
        y = (int)(q % (u64)rows);
        s = (int)(q / (u64)rows);
    }
}

// Forward: one thread per output pixel and V consecutive channels (channels fastest: coalesced,
// 16-byte loads and stores for V = 16 / sizeof(T)). wt is tap-major [K·K, C] (depthwise_weight_taps).
// Epilogue: y = act(acc + b[c]) with b (may be null: no bias) and act 0 (none) or 1 (SiLU), so the
// inference path needs no separate bias and activation passes.
template <int K, typename T, int V>
__device__ __forceinline__ void dw_forward(const T* __restrict__ x, const T* __restrict__ wt, const T* __restrict__ b,
                                           T* __restrict__ y, DwGeom g, int act) {
    typedef DwPack<T, V> P;
    const unsigned groups = (unsigned)(g.c / V);
    const u64 total = (u64)g.n * g.oh * g.ow * groups;
    const bool small = total < (1ull << 32);
    GRID_STRIDE_LOOP(i, total) {
        unsigned grp;
        u64 pix;
        dw_split(i, groups, small, grp, pix);
        int s, oy, ox;
        dw_pixel(pix, g.oh, g.ow, small, s, oy, ox);
        const int ch = (int)grp * V;
        const int iy0 = oy * g.stride - g.pad_top, ix0 = ox * g.stride - g.pad_left;
        const T* xs = x + (u64)s * g.h * g.w * g.c + ch;
        float acc[V];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
            const int iy = iy0 + ky;
            if (iy < 0 || iy >= g.h) continue;
#pragma unroll
            for (int kx = 0; kx < K; ++kx) {
                const int ix = ix0 + kx;
                if (ix < 0 || ix >= g.w) continue;
                const P xv = *reinterpret_cast<const P*>(xs + ((u64)iy * g.w + ix) * g.c);
                const P wv = *reinterpret_cast<const P*>(wt + (ky * K + kx) * g.c + ch);
#pragma unroll
                for (int j = 0; j < V; ++j) acc[j] += to_acc(xv.v[j]) * to_acc(wv.v[j]);
            }
        }
        if (b) {
            const P bv = *reinterpret_cast<const P*>(b + ch);
#pragma unroll
            for (int j = 0; j < V; ++j) acc[j] += to_acc(bv.v[j]);
        }
        if (act == 1) {
#pragma unroll
            for (int j = 0; j < V; ++j) acc[j] = acc[j] / (1.f + expf(-acc[j]));
        }
        P out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = from_acc<T>(acc[j]);
        *reinterpret_cast<P*>(y + pix * g.c + ch) = out;
    }
}

// dx[s, iy, ix, c] = Σ over taps (ky, kx) whose output (oy, ox) = ((iy + pad_top − ky) / stride, …)
// is whole and in range of dy[s, oy, ox, c] · w[c, ky, kx]: one thread per input pixel and V
// channels, taps in a fixed order. wt is tap-major [K·K, C].
template <int K, typename T, int V>
__device__ __forceinline__ void dw_backward_x(const T* __restrict__ dy, const T* __restrict__ wt, T* __restrict__ dx,
                                              DwGeom g) {
    typedef DwPack<T, V> P;
    const unsigned groups = (unsigned)(g.c / V);
    const u64 total = (u64)g.n * g.h * g.w * groups;
    const bool small = total < (1ull << 32);
    GRID_STRIDE_LOOP(i, total) {
        unsigned grp;
        u64 pix;
        dw_split(i, groups, small, grp, pix);
        int s, iy, ix;
        dw_pixel(pix, g.h, g.w, small, s, iy, ix);
        const int ch = (int)grp * V;
        const T* dys = dy + (u64)s * g.oh * g.ow * g.c + ch;
        float acc[V];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
            const int ty = iy + g.pad_top - ky;
            if (ty < 0) continue;
            const int oy = ty / g.stride;
            if (oy * g.stride != ty || oy >= g.oh) continue;
#pragma unroll
            for (int kx = 0; kx < K; ++kx) {
                const int tx = ix + g.pad_left - kx;
                if (tx < 0) continue;
                const int ox = tx / g.stride;
                if (ox * g.stride != tx || ox >= g.ow) continue;
                const P dv = *reinterpret_cast<const P*>(dys + ((u64)oy * g.ow + ox) * g.c);
                const P wv = *reinterpret_cast<const P*>(wt + (ky * K + kx) * g.c + ch);
#pragma unroll
                for (int j = 0; j < V; ++j) acc[j] += to_acc(dv.v[j]) * to_acc(wv.v[j]);
            }
        }
        P out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = from_acc<T>(acc[j]);
        *reinterpret_cast<P*>(dx + pix * g.c + ch) = out;
    }
}

// wt[t][c] = w[c][t]: the weights tap-major for the forward and input-gradient kernels.
template <typename T>
__device__ __forceinline__ void dw_weight_taps(const T* __restrict__ w, T* __restrict__ wt, int c, int kk) {
    GRID_STRIDE_LOOP(i, (u64)c * kk) {
        const int e = (int)i;
        const int ch = e % c, t = e / c;
        wt[e] = w[ch * kk + t];
    }
}
KERNEL(depthwise_weight_taps_f32, const float* __restrict__ w, float* __restrict__ wt, int c, int kk) {
    dw_weight_taps(w, wt, c, kk);
}
KERNEL(depthwise_weight_taps_bf16, const bf16* __restrict__ w, bf16* __restrict__ wt, int c, int kk) {
    dw_weight_taps(w, wt, c, kk);
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
    // positions < 2³¹ (the launch layer checks): 32-bit index arithmetic.
    const unsigned positions = (unsigned)g.n * g.oh * g.ow;
    const unsigned p0 = blockIdx.y * (unsigned)positions_per_split;
    const unsigned p1 = min(positions, p0 + (unsigned)positions_per_split);
    float acc[K * K];
#pragma unroll
    for (int t = 0; t < K * K; ++t) acc[t] = 0.f;
    if (ch < g.c) {
        for (unsigned p = p0 + r; p < p1; p += DW_ROWS) {
            const unsigned q = p / (unsigned)g.ow;
            const int ox = (int)(p - q * (unsigned)g.ow);
            const int oy = (int)(q % (unsigned)g.oh);
            const int s = (int)(q / (unsigned)g.oh);
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
    KERNEL(depthwise_forward_k##K##_##SUFFIX, const T* __restrict__ x, const T* __restrict__ wt,              \
           const T* __restrict__ b, T* __restrict__ y, DwGeom g, int act) {                                    \
        dw_forward<K, T, 1>(x, wt, b, y, g, act);                                                              \
    }                                                                                                          \
    KERNEL(depthwise_forward_k##K##_##SUFFIX##_v, const T* __restrict__ x, const T* __restrict__ wt,          \
           const T* __restrict__ b, T* __restrict__ y, DwGeom g, int act) {                                    \
        dw_forward<K, T, 16 / sizeof(T)>(x, wt, b, y, g, act);                                                 \
    }                                                                                                          \
    KERNEL(depthwise_backward_x_k##K##_##SUFFIX, const T* __restrict__ dy, const T* __restrict__ wt,          \
           T* __restrict__ dx, DwGeom g) {                                                                     \
        dw_backward_x<K, T, 1>(dy, wt, dx, g);                                                                 \
    }                                                                                                          \
    KERNEL(depthwise_backward_x_k##K##_##SUFFIX##_v, const T* __restrict__ dy, const T* __restrict__ wt,      \
           T* __restrict__ dx, DwGeom g) {                                                                     \
        dw_backward_x<K, T, 16 / sizeof(T)>(dy, wt, dx, g);                                                    \
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
