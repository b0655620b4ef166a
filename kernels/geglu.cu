// GEGLU (src/ops/gelu.rs is the CPU reference): x [rows, 2D] → y [rows, D],
// y[r, j] = a · GELU(g) with a = x[r, j], g = x[r, D + j], GELU exact (erf form, torch's
// approximate="none"): GELU(g) = g·Φ(g), Φ(g) = ½(1 + erf(g/√2)).
// Backward: dx[r, j] = dy · GELU(g), dx[r, D + j] = dy · a · (Φ(g) + g·φ(g)), φ the normal pdf.
// One thread per (r, j), j fastest (coalesced), grid-stride; storage T is f32 or bf16, arithmetic f32.
#include "common.cuh"

__device__ __forceinline__ float geglu_cdf(float g) { return 0.5f * (1.f + erff(g * 0.70710678118654752f)); }

template <typename T>
__device__ __forceinline__ void geglu_forward(const T* __restrict__ x, T* __restrict__ y, u64 rows, int d) {
    GRID_STRIDE_LOOP(i, rows * d) {
        const u64 r = i / d;
        const u64 j = i - r * d;
        const T* xr = x + 2 * r * d;
        const float a = to_acc(xr[j]), g = to_acc(xr[d + j]);
        y[i] = from_acc<T>(a * g * geglu_cdf(g));
    }
}

template <typename T>
__device__ __forceinline__ void geglu_backward(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                               u64 rows, int d) {
    GRID_STRIDE_LOOP(i, rows * d) {
        const u64 r = i / d;
        const u64 j = i - r * d;
        const T* xr = x + 2 * r * d;
        T* dxr = dx + 2 * r * d;
        const float a = to_acc(xr[j]), g = to_acc(xr[d + j]), dyv = to_acc(dy[i]);
        const float cdf = geglu_cdf(g);
        const float pdf = 0.39894228040143268f * expf(-0.5f * g * g);
        dxr[j] = from_acc<T>(dyv * g * cdf);
        dxr[d + j] = from_acc<T>(dyv * a * (cdf + g * pdf));
    }
}

#define GEGLU_KERNELS(T, SUFFIX)                                                                              \
    KERNEL(geglu_forward_##SUFFIX, const T* __restrict__ x, T* __restrict__ y, u64 rows, int d) {             \
        geglu_forward(x, y, rows, d);                                                                         \
    }                                                                                                         \
    KERNEL(geglu_backward_##SUFFIX, const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,   \
           u64 rows, int d) {                                                                                 \
        geglu_backward(x, dy, dx, rows, d);                                                                   \
    }

GEGLU_KERNELS(float, f32)
GEGLU_KERNELS(bf16, bf16)
