// Elementwise activations: y = op(x), computed in f32 (f64 for double).
#include "common.cuh"

struct Silu {
    template <typename A> __device__ __forceinline__ A operator()(A x) const { return x / (A(1) + exp_acc(-x)); }
};

struct Sigmoid {
    template <typename A> __device__ __forceinline__ A operator()(A x) const { return A(1) / (A(1) + exp_acc(-x)); }
};

#define UNARY_KERNEL(T, SUFFIX, NAME, OP) \
    KERNEL(NAME##_##SUFFIX, const T* __restrict__ x, T* __restrict__ y, u64 n) { \
        map_unary(x, y, n, OP()); \
    }

FOR_EACH_DTYPE(UNARY_KERNEL, silu, Silu)
FOR_EACH_DTYPE(UNARY_KERNEL, sigmoid, Sigmoid)
