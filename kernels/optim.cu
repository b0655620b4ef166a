// Fused multi-tensor optimizer steps (SGD, AdamW) and a deterministic global gradient norm, for a
// whole parameter group in one launch. f32 master weights and optimizer state; gradients f32 or
// bf16 (entry suffix). The host uploads a table of the group's tensors (pointers, lengths, the
// per-tensor scalars) and, per chunk of `chunk` elements, the index of the tensor it belongs to;
// blocks walk the chunks grid-stride, threads the elements of a chunk (coalesced; four per access
// where every stream of the tensor is 16-byte aligned, 8-byte for bf16 gradients).
//
// Arithmetic reproduces src/optim/{sgd,adamw}.rs bit for bit: every operation is an explicit
// round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fmaf_rn, …), so NVRTC's default FMA
// contraction cannot change the operation order; sqrt and division are IEEE (__fsqrt_rn,
// __fdiv_rn). `grad_scale` (optional, one f32 on the device, e.g. the clip coefficient written by
// grad_norm_finish) multiplies each gradient first, as clip_grad_norm's in-place scaling would.
#include "common.cuh"

struct SgdTensor {
    u64 param, grad, buf, n, chunk0;
    int first, decay;
};

struct SgdCoef {
    float sign, wd, momentum, one_minus_dampening, neg_lr;
    int momentum_on, nesterov, pad;
};

struct AdamTensor {
    u64 param, grad, m, v, vmax, n, chunk0;
    float bias_correction2_sqrt, neg_step_size, decay_factor;
    int decay;
};

struct AdamCoef {
    float lerp_weight, beta2, one_minus_beta2, eps;
    int amsgrad, small;
};

struct NormTensor {
    u64 grad, n, chunk0;
};

// The element range [start, end) of chunk ci of tensor t.
template <typename Tab>
__device__ __forceinline__ void chunk_range(const Tab& t, u64 ci, int chunk, u64& start, u64& end) {
    start = (ci - t.chunk0) * (u64)chunk;
    end = min(t.n, start + (u64)chunk);
}

__device__ __forceinline__ float load_grad(const float* g, u64 i) { return g[i]; }
__device__ __forceinline__ float load_grad(const bf16* g, u64 i) { return to_acc(g[i]); }

// Four consecutive values at p + i, one 16-byte (f32) or 8-byte (bf16) access.
__device__ __forceinline__ void load4(const float* p, u64 i, float (&o)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p + i);
    o[0] = v.x;
    o[1] = v.y;
    o[2] = v.z;
    o[3] = v.w;
}
__device__ __forceinline__ void load4(const bf16* p, u64 i, float (&o)[4]) {
    const uint2 v = *reinterpret_cast<const uint2*>(p + i);
    o[0] = __uint_as_float(v.x << 16);
    o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16);
    o[3] = __uint_as_float(v.y & 0xffff0000u);
}
__device__ __forceinline__ void store4(float* p, u64 i, const float (&o)[4]) {
    float4 v;
    v.x = o[0];
    v.y = o[1];
    v.z = o[2];
    v.w = o[3];
    *reinterpret_cast<float4*>(p + i) = v;
}

// Whether a chunk can go four elements per access: chunks start at multiples of 4 and every
// stream is aligned for its vector width (0, an unused stream, is aligned).
template <typename G>
__device__ __forceinline__ bool vectorizable(int chunk, u64 f32_streams, u64 grad) {
    return (chunk & 3) == 0 && (f32_streams & 15) == 0 && (grad & (4 * sizeof(G) - 1)) == 0;
}

// g = maximize ? −grad : grad;  g = fma(w, wd, g) (decay);
// buf = g (first) | fma(g, 1 − dampening, buf·momentum);  d = nesterov ? fma(buf, momentum, g) : buf;
// w = fma(d, −lr, w).
__device__ __forceinline__ void sgd_element(float& w, float g, float& b, const SgdCoef& c, bool first, bool decay,
                                            bool scaled, float scale) {
    if (scaled) g = __fmul_rn(g, scale);
    g = __fmul_rn(g, c.sign);
    if (decay) g = __fmaf_rn(w, c.wd, g);
    float d = g;
    if (c.momentum_on) {
        b = first ? g : __fmaf_rn(g, c.one_minus_dampening, __fmul_rn(b, c.momentum));
        d = c.nesterov ? __fmaf_rn(b, c.momentum, g) : b;
    }
    w = __fmaf_rn(d, c.neg_lr, w);
}

template <typename G>
__device__ __forceinline__ void sgd_step(const SgdTensor* __restrict__ table, const unsigned* __restrict__ chunk_tensor,
                                         u64 chunks, int chunk, SgdCoef c, const float* __restrict__ grad_scale) {
    const bool scaled = grad_scale != nullptr;
    const float scale = scaled ? *grad_scale : 1.f;
    for (u64 ci = blockIdx.x; ci < chunks; ci += gridDim.x) {
        const SgdTensor t = table[chunk_tensor[ci]];
        u64 start, end;
        chunk_range(t, ci, chunk, start, end);
        float* __restrict__ w = reinterpret_cast<float*>(t.param);
        const G* __restrict__ gr = reinterpret_cast<const G*>(t.grad);
        float* __restrict__ b = reinterpret_cast<float*>(t.buf);
        const bool read_buf = c.momentum_on && !t.first;
        u64 scalar_from = start;
        if (vectorizable<G>(chunk, t.param | t.buf, t.grad)) {
            const u64 packs = (end - start) / 4;
            for (u64 p = threadIdx.x; p < packs; p += blockDim.x) {
                const u64 i = start + 4 * p;
                float w4[4], g4[4], b4[4] = {0.f, 0.f, 0.f, 0.f};
                load4(w, i, w4);
                load4(gr, i, g4);
                if (read_buf) load4(b, i, b4);
#pragma unroll
                for (int k = 0; k < 4; ++k) sgd_element(w4[k], g4[k], b4[k], c, t.first, t.decay, scaled, scale);
                store4(w, i, w4);
                if (c.momentum_on) store4(b, i, b4);
            }
            scalar_from = start + 4 * packs;
        }
        for (u64 i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
            float wi = w[i], bi = read_buf ? b[i] : 0.f;
            sgd_element(wi, load_grad(gr, i), bi, c, t.first, t.decay, scaled, scale);
            w[i] = wi;
            if (c.momentum_on) b[i] = bi;
        }
    }
}

// w = w·(1 − lr·wd) (decay);  m = lerp(m, g, 1 − β1);  v = fma((1 − β2)·g, g, v·β2);
// vmax = max(vmax, v) (amsgrad, NaN kept);  denom = sqrt(v | vmax) / sqrt(1 − β2^t) + eps;
// w = w + (−lr / (1 − β1^t))·m / denom.
__device__ __forceinline__ void adamw_element(float& w, float g, float& m, float& v, float& vmax, const AdamTensor& t,
                                              const AdamCoef& c, float lerp_weight_minus_one, bool scaled,
                                              float scale) {
    if (scaled) g = __fmul_rn(g, scale);
    if (t.decay) w = __fmul_rn(w, t.decay_factor);
    const float diff = __fsub_rn(g, m);
    m = c.small ? __fmaf_rn(c.lerp_weight, diff, m) : __fmaf_rn(lerp_weight_minus_one, diff, g);
    v = __fmaf_rn(__fmul_rn(c.one_minus_beta2, g), g, __fmul_rn(v, c.beta2));
    float second = v;
    if (c.amsgrad) {
        if (!(vmax >= v || vmax != vmax)) vmax = v;
        second = vmax;
    }
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(second), t.bias_correction2_sqrt), c.eps);
    w = __fadd_rn(w, __fdiv_rn(__fmul_rn(t.neg_step_size, m), denom));
}

template <typename G>
__device__ __forceinline__ void adamw_step(const AdamTensor* __restrict__ table, const unsigned* __restrict__ chunk_tensor,
                                           u64 chunks, int chunk, AdamCoef c, const float* __restrict__ grad_scale) {
    const bool scaled = grad_scale != nullptr;
    const float scale = scaled ? *grad_scale : 1.f;
    const float lerp_weight_minus_one = __fsub_rn(c.lerp_weight, 1.f);
    for (u64 ci = blockIdx.x; ci < chunks; ci += gridDim.x) {
        const AdamTensor t = table[chunk_tensor[ci]];
        u64 start, end;
        chunk_range(t, ci, chunk, start, end);
        float* __restrict__ w = reinterpret_cast<float*>(t.param);
        const G* __restrict__ gr = reinterpret_cast<const G*>(t.grad);
        float* __restrict__ m = reinterpret_cast<float*>(t.m);
        float* __restrict__ v = reinterpret_cast<float*>(t.v);
        float* __restrict__ vmax = reinterpret_cast<float*>(t.vmax);
        u64 scalar_from = start;
        if (vectorizable<G>(chunk, t.param | t.m | t.v | t.vmax, t.grad)) {
            const u64 packs = (end - start) / 4;
            for (u64 p = threadIdx.x; p < packs; p += blockDim.x) {
                const u64 i = start + 4 * p;
                float w4[4], g4[4], m4[4], v4[4], vm4[4] = {0.f, 0.f, 0.f, 0.f};
                load4(w, i, w4);
                load4(gr, i, g4);
                load4(m, i, m4);
                load4(v, i, v4);
                if (c.amsgrad) load4(vmax, i, vm4);
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    adamw_element(w4[k], g4[k], m4[k], v4[k], vm4[k], t, c, lerp_weight_minus_one, scaled, scale);
                store4(w, i, w4);
                store4(m, i, m4);
                store4(v, i, v4);
                if (c.amsgrad) store4(vmax, i, vm4);
            }
            scalar_from = start + 4 * packs;
        }
        for (u64 i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
            float wi = w[i], mi = m[i], vi = v[i], vmi = c.amsgrad ? vmax[i] : 0.f;
            adamw_element(wi, load_grad(gr, i), mi, vi, vmi, t, c, lerp_weight_minus_one, scaled, scale);
            w[i] = wi;
            m[i] = mi;
            v[i] = vi;
            if (c.amsgrad) vmax[i] = vmi;
        }
    }
}

#define OPTIM_KERNELS(G, SUFFIX)                                                                                 \
    KERNEL(sgd_step_##SUFFIX, const SgdTensor* __restrict__ table, const unsigned* __restrict__ chunk_tensor,   \
           u64 chunks, int chunk, SgdCoef c, const float* __restrict__ grad_scale) {                            \
        sgd_step<G>(table, chunk_tensor, chunks, chunk, c, grad_scale);                                         \
    }                                                                                                           \
    KERNEL(adamw_step_##SUFFIX, const AdamTensor* __restrict__ table, const unsigned* __restrict__ chunk_tensor, \
           u64 chunks, int chunk, AdamCoef c, const float* __restrict__ grad_scale) {                           \
        adamw_step<G>(table, chunk_tensor, chunks, chunk, c, grad_scale);                                       \
    }                                                                                                           \
    KERNEL_BOUNDED(NORM_THREADS, grad_norm_partial_##SUFFIX, const NormTensor* __restrict__ table,               \
                   const unsigned* __restrict__ chunk_tensor, u64 chunks, int chunk, int kind, double p,        \
                   double* __restrict__ partial) {                                                              \
        grad_norm_partial<G>(table, chunk_tensor, chunks, chunk, kind, p, partial);                             \
    }

// ---- Global gradient norm (clip_grad_norm), deterministic: per-chunk f64 partials in a fixed
// order, then one block adds the partials in a fixed order. kind: 0 = L2 (Σ g²), 1 = L1 (Σ |g|),
// 2 = L∞ (max |g|, NaN propagates), 3 = general p (Σ |g|^p).
constexpr int NORM_THREADS = 256;
enum { NORM_L2 = 0, NORM_L1 = 1, NORM_INF = 2, NORM_P = 3 };

__device__ __forceinline__ double norm_combine(int kind, double a, double b) {
    if (kind == NORM_INF) return (a != a || b != b) ? a + b : fmax(a, b);
    return __dadd_rn(a, b);
}

__device__ __forceinline__ double norm_term(int kind, double p, float g) {
    const double a = fabs((double)g);
    if (kind == NORM_L2) return __dmul_rn(a, a);
    if (kind == NORM_P) return pow(a, p);
    return a;
}

// Fixed-order tree reduction of one value per thread over the block (NORM_THREADS threads).
__device__ __forceinline__ double norm_block_reduce(int kind, double acc) {
    __shared__ double red[NORM_THREADS];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = NORM_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] = norm_combine(kind, red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    return red[0];
}

template <typename G>
__device__ __forceinline__ void grad_norm_partial(const NormTensor* __restrict__ table,
                                                  const unsigned* __restrict__ chunk_tensor, u64 chunks, int chunk,
                                                  int kind, double p, double* __restrict__ partial) {
    for (u64 ci = blockIdx.x; ci < chunks; ci += gridDim.x) {
        const NormTensor t = table[chunk_tensor[ci]];
        u64 start, end;
        chunk_range(t, ci, chunk, start, end);
        const G* __restrict__ gr = reinterpret_cast<const G*>(t.grad);
        double acc = 0.0;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x)
            acc = norm_combine(kind, acc, norm_term(kind, p, load_grad(gr, i)));
        const double total = norm_block_reduce(kind, acc);
        if (threadIdx.x == 0) partial[ci] = total;
        __syncthreads();  // red[] is reused by the next chunk
    }
}

OPTIM_KERNELS(float, f32)
OPTIM_KERNELS(bf16, bf16)

// One block of NORM_THREADS: norm = (Σ partials)^(1/p) (sqrt for L2, the max for L∞), written to
// out_norm[0] (f64); the clip coefficient min(1, max_norm / (norm + 1e-6)) formed in f32 as
// clip_grad_norm does (NaN kept) to out_coef[0].
KERNEL_BOUNDED(NORM_THREADS, grad_norm_finish, const double* __restrict__ partial, u64 chunks, int kind, double p,
               float max_norm, double* __restrict__ out_norm, float* __restrict__ out_coef) {
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < chunks; i += blockDim.x) acc = norm_combine(kind, acc, partial[i]);
    double total = norm_block_reduce(kind, acc);
    if (threadIdx.x == 0) {
        if (kind == NORM_L2) total = sqrt(total);
        else if (kind == NORM_P) total = pow(total, 1.0 / p);
        out_norm[0] = total;
        const float recip = __fdiv_rn(1.f, __fadd_rn((float)total, 1e-6f));
        const float coef = __fmul_rn(recip, max_norm);
        out_coef[0] = coef != coef ? coef : fminf(coef, 1.f);
    }
}

// g *= coef[0] over every tensor of the table (f32 gradients, in place), skipped when coef is 1.
KERNEL(grad_scale_f32, const NormTensor* __restrict__ table, const unsigned* __restrict__ chunk_tensor, u64 chunks,
       int chunk, const float* __restrict__ coef) {
    const float c = *coef;
    if (c == 1.f) return;
    for (u64 ci = blockIdx.x; ci < chunks; ci += gridDim.x) {
        const NormTensor t = table[chunk_tensor[ci]];
        u64 start, end;
        chunk_range(t, ci, chunk, start, end);
        float* __restrict__ g = reinterpret_cast<float*>(t.grad);
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) g[i] = __fmul_rn(g[i], c);
    }
}

// ---- EMA of a parameter group (src/diffusion/train.rs ema_update): ema ← ema − omd·(ema − w),
// each operation rounded as the CPU rounds it (no contraction), over every tensor of the table.
struct EmaTensor {
    u64 ema, param, n, chunk0;
};

KERNEL(ema_update_f32, const EmaTensor* __restrict__ table, const unsigned* __restrict__ chunk_tensor, u64 chunks,
       int chunk, float omd) {
    for (u64 ci = blockIdx.x; ci < chunks; ci += gridDim.x) {
        const EmaTensor t = table[chunk_tensor[ci]];
        u64 start, end;
        chunk_range(t, ci, chunk, start, end);
        float* __restrict__ e = reinterpret_cast<float*>(t.ema);
        const float* __restrict__ w = reinterpret_cast<const float*>(t.param);
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x)
            e[i] = __fsub_rn(e[i], __fmul_rn(omd, __fsub_rn(e[i], w[i])));
    }
}
