// Softmax cross-entropy, mean over the batch (src/ops/loss.rs is the CPU reference): logits z [N, K]
// (f32 or bf16 storage, f32 arithmetic), target distribution q per row, either from labels with
// label smoothing ε (q = (1 − ε)·onehot(y) + ε / K; labels u32 < K) or given (soft targets, f32
// [N, K], rows summing to 1).
//   forward:  per row (one warp, columns lane, lane + 32, …, an online max / sum), lse = log Σ exp z
//             and loss_i = −Σ_j q_j (z_j − lse) = lse·Σ_j q_j − Σ_j q_j z_j; then loss_mean adds the
//             N row losses in a fixed order in one block and divides by N (deterministic).
//   backward: dz = (softmax(z) − q) · dL / N, softmax recomputed from the saved lse; dL is a device
//             f32 (the upstream gradient), so no host round trip. One thread per element, grid-stride.
// A label ≥ K makes its row's loss NaN (the CPU op rejects it on the host before).
#include "common.cuh"

__device__ __forceinline__ float loss_neg_inf() { return __int_as_float((int)0xff800000u); }

__device__ __forceinline__ float loss_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float loss_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// q from labels with label smoothing.
struct LabelTarget {
    const unsigned* labels;
    float eps;
    int k;
    __device__ __forceinline__ bool ok(int row) const { return labels[row] < (unsigned)k; }
    __device__ __forceinline__ float q(int row, int j) const {
        return eps / (float)k + (labels[row] == (unsigned)j ? 1.f - eps : 0.f);
    }
};

// q given, f32 [N, K].
struct SoftTarget {
    const float* targets;
    int k;
    __device__ __forceinline__ bool ok(int) const { return true; }
    __device__ __forceinline__ float q(int row, int j) const { return targets[(u64)row * k + j]; }
};

template <typename T, typename Q>
__device__ __forceinline__ void ce_forward(const T* __restrict__ z, Q target, float* __restrict__ row_loss,
                                           float* __restrict__ lse, int n, int k) {
    const int lane = threadIdx.x % 32;
    const int warps = gridDim.x * (blockDim.x / 32);
    for (int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < n; row += warps) {
        const T* zr = z + (u64)row * k;
        float m = loss_neg_inf(), s = 0.f, qz = 0.f, qs = 0.f;
        for (int j = lane; j < k; j += 32) {
            const float v = to_acc(zr[j]);
            if (v > m) {
                s = s * expf(m - v) + 1.f;
                m = v;
            } else {
                s += expf(v - m);
            }
            const float qj = target.q(row, j);
            qz += qj * v;
            qs += qj;
        }
        const float mx = loss_warp_max(m);
        // Lanes without a column (k < 32) hold m = −∞, s = 0: they add nothing.
        s = loss_warp_sum(lane < k ? s * expf(m - mx) : 0.f);
        qz = loss_warp_sum(qz);
        qs = loss_warp_sum(qs);
        if (lane == 0) {
            const float l = mx + logf(s);
            lse[row] = l;
            row_loss[row] = target.ok(row) ? l * qs - qz : __int_as_float(0x7fc00000);
        }
    }
}

template <typename T, typename Q>
__device__ __forceinline__ void ce_backward(const T* __restrict__ z, Q target, const float* __restrict__ lse,
                                            const float* __restrict__ dloss, T* __restrict__ dz, int n, int k) {
    const float scale = dloss[0] / (float)n;
    GRID_STRIDE_LOOP(i, (u64)n * k) {
        const int row = (int)(i / k), j = (int)(i - (u64)row * k);
        const float p = expf(to_acc(z[i]) - lse[row]);
        dz[i] = from_acc<T>((p - target.q(row, j)) * scale);
    }
}

#define LOSS_KERNELS(T, SUFFIX)                                                                                \
    KERNEL(loss_ce_forward_##SUFFIX, const T* __restrict__ z, const unsigned* __restrict__ labels,             \
           float* __restrict__ row_loss, float* __restrict__ lse, int n, int k, float eps) {                   \
        ce_forward(z, LabelTarget{labels, eps, k}, row_loss, lse, n, k);                                       \
    }                                                                                                          \
    KERNEL(loss_ce_backward_##SUFFIX, const T* __restrict__ z, const unsigned* __restrict__ labels,            \
           const float* __restrict__ lse, const float* __restrict__ dloss, T* __restrict__ dz, int n, int k,  \
           float eps) {                                                                                        \
        ce_backward(z, LabelTarget{labels, eps, k}, lse, dloss, dz, n, k);                                     \
    }                                                                                                          \
    KERNEL(loss_soft_forward_##SUFFIX, const T* __restrict__ z, const float* __restrict__ targets,             \
           float* __restrict__ row_loss, float* __restrict__ lse, int n, int k) {                              \
        ce_forward(z, SoftTarget{targets, k}, row_loss, lse, n, k);                                            \
    }                                                                                                          \
    KERNEL(loss_soft_backward_##SUFFIX, const T* __restrict__ z, const float* __restrict__ targets,            \
           const float* __restrict__ lse, const float* __restrict__ dloss, T* __restrict__ dz, int n, int k) { \
        ce_backward(z, SoftTarget{targets, k}, lse, dloss, dz, n, k);                                          \
    }

LOSS_KERNELS(float, f32)
LOSS_KERNELS(bf16, bf16)

// loss[0] = (Σ_i row_loss[i]) / n: one block of LOSS_MEAN_THREADS; thread t adds rows t, t + 256, …
// in order, then a fixed tree over the threads.
constexpr int LOSS_MEAN_THREADS = 256;

KERNEL_BOUNDED(LOSS_MEAN_THREADS, loss_mean, const float* __restrict__ row_loss, float* __restrict__ loss, int n) {
    __shared__ float part[LOSS_MEAN_THREADS];
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += LOSS_MEAN_THREADS) s += row_loss[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = LOSS_MEAN_THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = part[0] / (float)n;
}

// ---- Mean squared error (src/ops/shape.rs mse_loss), fused forward and backward, f32:
//   d = y − t;  dy = k·d with k = (float)(2 / len) (the CPU backward's product, bit for bit);
//   partial[c] = Σ d² over chunk c (f64, a fixed tree per chunk), then mse_finish adds the
//   partials in a fixed order and writes loss[0] = (float)(Σ / len). Deterministic whatever the
//   grid; the sum is in f64 where the CPU adds f32 within its chunks, so the two differ by the
//   CPU's rounding (≈ 1e-7 relative), not by the order of a parallel reduction.
constexpr int MSE_THREADS = 256;

__device__ __forceinline__ double mse_block_sum(double acc) {
    __shared__ double red[MSE_THREADS];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = MSE_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] = __dadd_rn(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    const double total = red[0];
    __syncthreads();  // red[] is reused by the block's next chunk
    return total;
}

KERNEL_BOUNDED(MSE_THREADS, mse_partial_f32, const float* __restrict__ y, const float* __restrict__ t,
               float* __restrict__ dy, float k, u64 len, int chunk, double* __restrict__ partial) {
    const u64 chunks = (len + chunk - 1) / chunk;
    for (u64 c = blockIdx.x; c < chunks; c += gridDim.x) {
        const u64 start = c * (u64)chunk;
        const u64 end = start + (u64)chunk < len ? start + (u64)chunk : len;
        double acc = 0.0;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float d = __fsub_rn(y[i], t[i]);
            dy[i] = __fmul_rn(k, d);
            acc = __dadd_rn(acc, __dmul_rn((double)d, (double)d));
        }
        const double total = mse_block_sum(acc);
        if (threadIdx.x == 0) partial[c] = total;
    }
}

KERNEL_BOUNDED(MSE_THREADS, mse_finish, const double* __restrict__ partial, u64 chunks, double len,
               float* __restrict__ loss) {
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < chunks; i += blockDim.x) acc = __dadd_rn(acc, partial[i]);
    const double total = mse_block_sum(acc);
    if (threadIdx.x == 0) loss[0] = (float)(total / len);
}
