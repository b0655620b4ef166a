// Fused multi-tensor optimizer steps (SGD, AdamW) and a deterministic global gradient norm, for a
// whole parameter group in one launch. f32 master weights and optimizer state; gradients f32 or
// bf16 (entry suffix). The host uploads a table of the group's tensors (pointers, lengths, the
// per-tensor scalars) and, per chunk of `chunk` elements, the index of the tensor it belongs to;
// blocks walk the chunks grid-stride, threads the elements of a chunk (coalesced).
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

// g = maximize ? −grad : grad;  g = fma(w, wd, g) (decay);
// buf = g (first) | fma(g, 1 − dampening, buf·momentum);  d = nesterov ? fma(buf, momentum, g) : buf;
// w = fma(d, −lr, w).
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
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            float g = load_grad(gr, i);
            if (scaled) g = __fmul_rn(g, scale);
            g = __fmul_rn(g, c.sign);
            const float wi = w[i];
            if (t.decay) g = __fmaf_rn(wi, c.wd, g);
            float d = g;
            if (c.momentum_on) {
                const float buf = t.first ? g : __fmaf_rn(g, c.one_minus_dampening, __fmul_rn(b[i], c.momentum));
                b[i] = buf;
                d = c.nesterov ? __fmaf_rn(buf, c.momentum, g) : buf;
            }
            w[i] = __fmaf_rn(d, c.neg_lr, wi);
        }
    }
}

// w = w·(1 − lr·wd) (decay);  m = lerp(m, g, 1 − β1);  v = fma((1 − β2)·g, g, v·β2);
// vmax = max(vmax, v) (amsgrad, NaN kept);  denom = sqrt(v | vmax) / sqrt(1 − β2^t) + eps;
// w = w + (−lr / (1 − β1^t))·m / denom.
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
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            float g = load_grad(gr, i);
            if (scaled) g = __fmul_rn(g, scale);
            float wi = w[i];
            if (t.decay) wi = __fmul_rn(wi, t.decay_factor);
            float mi = m[i];
            const float diff = __fsub_rn(g, mi);
            mi = c.small ? __fmaf_rn(c.lerp_weight, diff, mi) : __fmaf_rn(lerp_weight_minus_one, diff, g);
            const float vi = __fmaf_rn(__fmul_rn(c.one_minus_beta2, g), g, __fmul_rn(v[i], c.beta2));
            float second = vi;
            if (c.amsgrad) {
                const float vm = vmax[i];
                const bool keep = vm >= vi || vm != vm;
                if (!keep) vmax[i] = vi;
                second = keep ? vm : vi;
            }
            const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(second), t.bias_correction2_sqrt), c.eps);
            m[i] = mi;
            v[i] = vi;
            w[i] = __fadd_rn(wi, __fdiv_rn(__fmul_rn(t.neg_step_size, mi), denom));
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
