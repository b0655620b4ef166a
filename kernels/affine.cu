// y = x * mul + add, computed in f32 (f64 for double).
#include "common.cuh"

template <typename A> struct Affine {
    A mul, add;
    __device__ __forceinline__ A operator()(A x) const { return x * mul + add; }
};

#define AFFINE_KERNEL(T, SUFFIX, NAME) \
    KERNEL(NAME##_##SUFFIX, const T* __restrict__ x, T* __restrict__ y, u64 n, double mul, double add) { \
        typedef Acc<T>::type A; \
        map_unary(x, y, n, Affine<A>{(A)mul, (A)add}); \
    }

FOR_EACH_DTYPE(AFFINE_KERNEL, affine)
