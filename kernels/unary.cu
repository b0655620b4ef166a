// Elementwise activations: y = op(x), computed in f32 (f64 for double).
#include "common.cuh"

struct Silu {
    template <typename A> __device__ __forceinline__ A operator()(A x) const { return x / (A(1) + exp_acc(-x)); }
};

struct Sigmoid {
    template <typename A> __device__ __forceinline__ A operator()(A x) const { return A(1) / (A(1) + exp_acc(-x)); }
};

// The 16-bit storage types use the fast σ (common.cuh: sigmoid_fast).
struct SiluFast {
    __device__ __forceinline__ float operator()(float x) const { return x * sigmoid_fast(x); }
};

struct SigmoidFast {
    __device__ __forceinline__ float operator()(float x) const { return sigmoid_fast(x); }
};

#define UNARY_KERNEL(T, SUFFIX, NAME, OP) \
    KERNEL(NAME##_##SUFFIX, const T* __restrict__ x, T* __restrict__ y, u64 n) { \
        map_unary(x, y, n, OP()); \
    }

UNARY_KERNEL(float, f32, silu, Silu)
UNARY_KERNEL(double, f64, silu, Silu)
UNARY_KERNEL(f16, f16, silu, SiluFast)
UNARY_KERNEL(bf16, bf16, silu, SiluFast)
UNARY_KERNEL(float, f32, sigmoid, Sigmoid)
UNARY_KERNEL(double, f64, sigmoid, Sigmoid)
UNARY_KERNEL(f16, f16, sigmoid, SigmoidFast)
UNARY_KERNEL(bf16, bf16, sigmoid, SigmoidFast)

// Casts between f32 and bf16 (round to nearest even; widening is exact): the bf16 working copies
// of f32 master weights and the f32 gradients of bf16 activations in mixed-precision training.
// Eight elements per step (one 16-byte bf16 pack, two f32 packs); x and y 16-byte aligned, no overlap.
template <typename S, typename D>
__device__ __forceinline__ void cast_map(const S* __restrict__ x, D* __restrict__ y, u64 n) {
    union In {
        uint4 raw[sizeof(S) / 2];
        S v[8];
    };
    union Out {
        uint4 raw[sizeof(D) / 2];
        D v[8];
    };
    const u64 packs = n / 8;
    const uint4* xp = reinterpret_cast<const uint4*>(x);
    uint4* yp = reinterpret_cast<uint4*>(y);
    GRID_STRIDE_LOOP(i, packs) {
        In a;
        Out b;
#pragma unroll
        for (int k = 0; k < (int)(sizeof(S) / 2); ++k) a.raw[k] = xp[i * (sizeof(S) / 2) + k];
#pragma unroll
        for (int k = 0; k < 8; ++k) b.v[k] = from_acc<D>(to_acc(a.v[k]));
#pragma unroll
        for (int k = 0; k < (int)(sizeof(D) / 2); ++k) yp[i * (sizeof(D) / 2) + k] = b.raw[k];
    }
    const u64 done = packs * 8;
    GRID_STRIDE_LOOP(i, n - done) { y[done + i] = from_acc<D>(to_acc(x[done + i])); }
}

KERNEL(cast_f32_to_bf16, const float* __restrict__ x, bf16* __restrict__ y, u64 n) { cast_map(x, y, n); }
KERNEL(cast_bf16_to_f32, const bf16* __restrict__ x, float* __restrict__ y, u64 n) { cast_map(x, y, n); }

// y[r, c] = op(y[r, c] + b[c]) in place over rows × ch (op 0: none, 1: SiLU, 2: sigmoid), V
// channels per thread (16-byte accesses for V = 16 / sizeof(T); ch a multiple of V, y and b
// aligned to V elements): a GEMM's bias and activation epilogue in one pass.
template <typename T, int V> struct __align__(sizeof(T) * V) BiasPack { T v[V]; };

template <typename T, int V>
__device__ __forceinline__ void bias_act(T* __restrict__ y, const T* __restrict__ b, u64 rows, int ch, int op) {
    typedef BiasPack<T, V> P;
    const unsigned groups = (unsigned)(ch / V);
    const u64 total = rows * groups;
    const bool small = total < (1ull << 32);
    GRID_STRIDE_LOOP(i, total) {
        const unsigned grp = small ? (unsigned)i % groups : (unsigned)(i % groups);
        P* at = reinterpret_cast<P*>(y + i * V);
        P yv = *at;
        const P bv = *reinterpret_cast<const P*>(b + grp * V);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float z = to_acc(yv.v[j]) + to_acc(bv.v[j]);
            yv.v[j] = from_acc<T>(op == 1 ? Silu()(z) : op == 2 ? Sigmoid()(z) : z);
        }
        *at = yv;
    }
}

KERNEL(bias_act_f32, float* __restrict__ y, const float* __restrict__ b, u64 rows, int ch, int op) {
    bias_act<float, 1>(y, b, rows, ch, op);
}
KERNEL(bias_act_f32_v, float* __restrict__ y, const float* __restrict__ b, u64 rows, int ch, int op) {
    bias_act<float, 4>(y, b, rows, ch, op);
}
KERNEL(bias_act_bf16, bf16* __restrict__ y, const bf16* __restrict__ b, u64 rows, int ch, int op) {
    bias_act<bf16, 1>(y, b, rows, ch, op);
}
KERNEL(bias_act_bf16_v, bf16* __restrict__ y, const bf16* __restrict__ b, u64 rows, int ch, int op) {
    bias_act<bf16, 8>(y, b, rows, ch, op);
}
