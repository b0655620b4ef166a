// Shared by every kernels/*.cu. Self-contained on purpose: no CUDA toolkit headers, so NVRTC can
// compile the kernels on a machine that has only the driver and libnvrtc (no cuda_fp16.h there).
#pragma once

typedef unsigned long long u64;

// 16-bit float storage types. Arithmetic always happens in Acc<T> (f32, or f64 for double).
struct __align__(2) f16 { unsigned short bits; };
struct __align__(2) bf16 { unsigned short bits; };

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(f16 x) {
#ifdef PHENO_EMU
    _Float16 h;
    __builtin_memcpy(&h, &x.bits, 2);
    return (float)h;
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}
// bf16 is the top half of an f32: widening is exact.
__device__ __forceinline__ float to_acc(bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ f16 from_acc<f16>(float v) {
    f16 h;
#ifdef PHENO_EMU
    _Float16 r = (_Float16)v;
    __builtin_memcpy(&h.bits, &r, 2);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#endif
    return h;
}
template <> __device__ __forceinline__ bf16 from_acc<bf16>(float v) {
    bf16 h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#else
    // Round to nearest even by hand before sm_80 (no cvt.bf16); NaN stays a quiet NaN.
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {
        h.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
#endif
    return h;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// σ(x) with the fast exponential and division (relative error ~1e-6; 0 for x → −∞, since
// __fdividef(1, ∞) = 0), for bf16 and f16 results, whose rounding (2^-9, 2^-12) is far coarser.
// With expf and IEEE division the bf16 SiLU was compute-bound on an H200: the same 450 G
// elements/s as f32, 43% of the copy bandwidth (BENCHMARKS.md).
__device__ __forceinline__ float sigmoid_fast(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

#define GRID_STRIDE_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// y[i] = op(x[i]) for i < n, computed in Acc<T>. The body moves 16 bytes per load and store
// (x and y must be 16-byte aligned: the caching allocator hands out 256-byte aligned blocks);
// the last n % (16 / sizeof(T)) elements go one by one. x and y must not overlap.
template <typename T, typename Op>
__device__ __forceinline__ void map_unary(const T* __restrict__ x, T* __restrict__ y, u64 n, Op op) {
    constexpr int V = 16 / sizeof(T);
    union Pack {
        uint4 raw;
        T v[V];
    };
    const u64 packs = n / V;
    const uint4* xp = reinterpret_cast<const uint4*>(x);
    uint4* yp = reinterpret_cast<uint4*>(y);
    GRID_STRIDE_LOOP(i, packs) {
        Pack p;
        p.raw = xp[i];
#pragma unroll
        for (int k = 0; k < V; ++k) p.v[k] = from_acc<T>(op(to_acc(p.v[k])));
        yp[i] = p.raw;
    }
    const u64 done = packs * V;
    GRID_STRIDE_LOOP(i, n - done) { y[done + i] = from_acc<T>(op(to_acc(x[done + i]))); }
}

// A kernel entry point: KERNEL(name, params...) { body }. Under PHENO_EMU (the CPU emulation the
// tests build with g++, tests/gpu/cuda_emu.hpp) it also exports emu__<name>, the launcher.
#ifdef PHENO_EMU
#define KERNEL(name, ...) \
    extern "C" void name(__VA_ARGS__); \
    extern "C" int emu__##name(const emu::Cfg* cfg, void** args) { return emu::launch(name, cfg, args); } \
    extern "C" void name(__VA_ARGS__)
#define KERNEL_BOUNDED(threads, name, ...) KERNEL(name, __VA_ARGS__)
#else
#define KERNEL(name, ...) extern "C" __global__ void name(__VA_ARGS__)
// With __launch_bounds__(threads): the kernel is only ever launched with at most `threads` threads.
#define KERNEL_BOUNDED(threads, name, ...) extern "C" __global__ void __launch_bounds__(threads) name(__VA_ARGS__)
#endif

// Dynamic shared memory as a T* named `name` (16-byte aligned).
#ifdef PHENO_EMU
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu::dynamic_shared())
#else
#define DYNAMIC_SHARED(T, name) \
    extern __shared__ __align__(16) unsigned char name##_bytes[]; \
    T* name = reinterpret_cast<T*>(name##_bytes)
#endif

// One extern "C" entry point per dtype: NAME_f32, NAME_f64, NAME_f16, NAME_bf16.
#define FOR_EACH_DTYPE(M, ...) \
    M(float, f32, __VA_ARGS__) \
    M(double, f64, __VA_ARGS__) \
    M(f16, f16, __VA_ARGS__) \
    M(bf16, bf16, __VA_ARGS__)
