// Shape, pooling, squeeze-excite and elementwise-backward kernels. Layouts are the CPU ops'
// (channel last): a per-sample tensor is x [N, P, C] with P the product of the middle axes, a
// pooled / per-sample vector is [N, C]. Storage T is f32 or bf16, arithmetic f32.
//
// Vectorised variants (entry `<name>_vec_<dtype>`) move 16-byte packs of V = 16 / sizeof(T)
// elements; the launch layer picks them when every pointer is 16-byte aligned and the packs do not
// cross a row (C % V == 0). Pure copies (upsample forward, concatenation, embedding gather) work
// on raw words of 16, 8, 4 or 2 bytes (entry suffix _w16 … _w2), the widest that divides every
// row, offset and address.
//
// Reductions are deterministic: fixed-order per-thread sums, fixed-order shared-memory / shuffle
// trees, then a fixed-order sum over splits. No float atomics anywhere.
#include "common.cuh"

// ------------------------------------------------------------------------------------------------
// Packs.

template <int BYTES> struct Word;
template <> struct Word<16> { typedef uint4 type; };
template <> struct Word<8> { typedef uint2 type; };
template <> struct Word<4> { typedef unsigned int type; };
template <> struct Word<2> { typedef unsigned short type; };

// V elements of T at p (16-byte aligned when V > 1), widened to f32.
template <int V, typename T> __device__ __forceinline__ void load_acc(const T* p, float (&a)[V]) {
    if constexpr (V == 1) {
        a[0] = to_acc(*p);
    } else {
        static_assert(V * sizeof(T) == 16, "packs are 16 bytes");
        union {
            uint4 raw;
            T v[V];
        } u;
        u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int k = 0; k < V; ++k) a[k] = to_acc(u.v[k]);
    }
}

// V f32 values rounded to T and stored at p (16-byte aligned when V > 1).
template <int V, typename T> __device__ __forceinline__ void store_acc(T* p, const float (&a)[V]) {
    if constexpr (V == 1) {
        *p = from_acc<T>(a[0]);
    } else {
        static_assert(V * sizeof(T) == 16, "packs are 16 bytes");
        union {
            uint4 raw;
            T v[V];
        } u;
#pragma unroll
        for (int k = 0; k < V; ++k) u.v[k] = from_acc<T>(a[k]);
        *reinterpret_cast<uint4*>(p) = u.raw;
    }
}

template <typename T> __host__ __device__ constexpr int vec_of() { return 16 / (int)sizeof(T); }

// ------------------------------------------------------------------------------------------------
// Binary elementwise maps: y[i] = op(a[i], b[i]), i < n, in packs of V (plus a scalar tail).

struct SiluBackward {  // (x, dy) → dy · σ(x) (1 + x (1 − σ(x)))
    __device__ __forceinline__ float operator()(float x, float dy) const {
        const float s = 1.f / (1.f + expf(-x));
        return dy * (s * (1.f + x * (1.f - s)));
    }
};
struct SigmoidBackward {  // (x, dy) → dy · σ(x) (1 − σ(x))
    __device__ __forceinline__ float operator()(float x, float dy) const {
        const float s = 1.f / (1.f + expf(-x));
        return dy * (s * (1.f - s));
    }
};
// For bf16 storage: the same with the fast σ (common.cuh: sigmoid_fast).
struct SiluBackwardFast {
    __device__ __forceinline__ float operator()(float x, float dy) const {
        const float s = sigmoid_fast(x);
        return dy * (s * (1.f + x * (1.f - s)));
    }
};
struct SigmoidBackwardFast {
    __device__ __forceinline__ float operator()(float x, float dy) const {
        const float s = sigmoid_fast(x);
        return dy * (s * (1.f - s));
    }
};
struct Add {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// y may be a or b (in-place update: each element is read before it is written, by one thread).
template <int V, typename T, typename Op>
__device__ __forceinline__ void map_binary(const T* a, const T* b, T* y, u64 n, Op op) {
    const u64 packs = n / V;
    GRID_STRIDE_LOOP(i, packs) {
        float av[V], bv[V], yv[V];
        load_acc<V>(a + i * V, av);
        load_acc<V>(b + i * V, bv);
#pragma unroll
        for (int k = 0; k < V; ++k) yv[k] = op(av[k], bv[k]);
        store_acc<V>(y + i * V, yv);
    }
    if constexpr (V > 1) {
        const u64 done = packs * V;
        GRID_STRIDE_LOOP(i, n - done) { y[done + i] = from_acc<T>(op(to_acc(a[done + i]), to_acc(b[done + i]))); }
    }
}

#define BINARY_KERNELS(T, SUFFIX, NAME, OP)                                                      \
    KERNEL(NAME##_##SUFFIX, const T* a, const T* b, T* y, u64 n) { map_binary<1>(a, b, y, n, OP()); } \
    KERNEL(NAME##_vec_##SUFFIX, const T* a, const T* b, T* y, u64 n) {                           \
        map_binary<vec_of<T>()>(a, b, y, n, OP());                                               \
    }

BINARY_KERNELS(float, f32, silu_backward, SiluBackward)
BINARY_KERNELS(bf16, bf16, silu_backward, SiluBackwardFast)
BINARY_KERNELS(float, f32, sigmoid_backward, SigmoidBackward)
BINARY_KERNELS(bf16, bf16, sigmoid_backward, SigmoidBackwardFast)
BINARY_KERNELS(float, f32, add, Add)
BINARY_KERNELS(bf16, bf16, add, Add)

// ------------------------------------------------------------------------------------------------
// Per-sample broadcasts over x [N, P, C] with vectors s, g [N, C]:
// y[n, p, c] = op(x[n, p, c], s[n, c], g[n, c]). Element i has c = i % C and n = i / (P·C).

struct SampleGeom {
    u64 total;  // N·P·C
    u64 per;    // P·C
    int c;
    float k;  // the op's constant (1 / P for the pooling gradients)
};

struct AddPerSample {  // x + e
    static constexpr bool X = true, S = true, G = false;
    __device__ __forceinline__ float operator()(float x, float s, float, float) const { return x + s; }
};
struct ScaleChannels {  // x · s
    static constexpr bool X = true, S = true, G = false;
    __device__ __forceinline__ float operator()(float x, float s, float, float) const { return x * s; }
};
struct ScaleChannelsPooled {  // dy · s + g / P: the SE input's gradient through the multiply and the pool
    static constexpr bool X = true, S = true, G = true;
    __device__ __forceinline__ float operator()(float x, float s, float g, float k) const { return x * s + g * k; }
};
struct PoolBackwardAdd {  // dx + g / P
    static constexpr bool X = true, S = false, G = true;
    __device__ __forceinline__ float operator()(float x, float, float g, float k) const { return x + g * k; }
};
struct PoolBackwardSet {  // g / P
    static constexpr bool X = false, S = false, G = true;
    __device__ __forceinline__ float operator()(float, float, float g, float k) const { return g * k; }
};

// x may be y (in place); C % V == 0 so a pack never crosses a row.
template <int V, typename T, typename Op>
__device__ __forceinline__ void per_sample_map(const T* x, const T* __restrict__ s, const T* __restrict__ g, T* y,
                                               SampleGeom geo, Op op) {
    const u64 packs = geo.total / V;
    GRID_STRIDE_LOOP(i, packs) {
        const u64 e = i * V;
        const u64 n = e / geo.per;
        const int c = (int)(e % (u64)geo.c);
        const u64 sc = n * geo.c + c;
        float xv[V] = {}, sv[V] = {}, gv[V] = {}, yv[V];
        if constexpr (Op::X) load_acc<V>(x + e, xv);
        if constexpr (Op::S) load_acc<V>(s + sc, sv);
        if constexpr (Op::G) load_acc<V>(g + sc, gv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            yv[j] = op(xv[j], sv[j], gv[j], geo.k);
        }
        store_acc<V>(y + e, yv);
    }
}

#define PER_SAMPLE_KERNELS(T, SUFFIX)                                                                            \
    KERNEL(add_per_sample_##SUFFIX, const T* x, const T* __restrict__ e, T* y, SampleGeom geo) {                \
        per_sample_map<1>(x, e, (const T*)nullptr, y, geo, AddPerSample());                                     \
    }                                                                                                            \
    KERNEL(add_per_sample_vec_##SUFFIX, const T* x, const T* __restrict__ e, T* y, SampleGeom geo) {            \
        per_sample_map<vec_of<T>()>(x, e, (const T*)nullptr, y, geo, AddPerSample());                           \
    }                                                                                                            \
    KERNEL(scale_channels_##SUFFIX, const T* x, const T* __restrict__ s, T* y, SampleGeom geo) {                \
        per_sample_map<1>(x, s, (const T*)nullptr, y, geo, ScaleChannels());                                    \
    }                                                                                                            \
    KERNEL(scale_channels_vec_##SUFFIX, const T* x, const T* __restrict__ s, T* y, SampleGeom geo) {            \
        per_sample_map<vec_of<T>()>(x, s, (const T*)nullptr, y, geo, ScaleChannels());                          \
    }                                                                                                            \
    KERNEL(scale_channels_backward_pooled_##SUFFIX, const T* dy, const T* __restrict__ s,                       \
           const T* __restrict__ gp, T* dx, SampleGeom geo) {                                                    \
        per_sample_map<1>(dy, s, gp, dx, geo, ScaleChannelsPooled());                                           \
    }                                                                                                            \
    KERNEL(scale_channels_backward_pooled_vec_##SUFFIX, const T* dy, const T* __restrict__ s,                   \
           const T* __restrict__ gp, T* dx, SampleGeom geo) {                                                    \
        per_sample_map<vec_of<T>()>(dy, s, gp, dx, geo, ScaleChannelsPooled());                                 \
    }                                                                                                            \
    KERNEL(global_avg_pool_backward_##SUFFIX, const T* __restrict__ gp, T* dx, SampleGeom geo, int accumulate) { \
        if (accumulate) {                                                                                        \
            per_sample_map<1>(dx, (const T*)nullptr, gp, dx, geo, PoolBackwardAdd());                           \
        } else {                                                                                                 \
            per_sample_map<1>((const T*)nullptr, (const T*)nullptr, gp, dx, geo, PoolBackwardSet());            \
        }                                                                                                        \
    }                                                                                                            \
    KERNEL(global_avg_pool_backward_vec_##SUFFIX, const T* __restrict__ gp, T* dx, SampleGeom geo,              \
           int accumulate) {                                                                                     \
        if (accumulate) {                                                                                        \
            per_sample_map<vec_of<T>()>(dx, (const T*)nullptr, gp, dx, geo, PoolBackwardAdd());                 \
        } else {                                                                                                 \
            per_sample_map<vec_of<T>()>((const T*)nullptr, (const T*)nullptr, gp, dx, geo, PoolBackwardSet());  \
        }                                                                                                        \
    }

PER_SAMPLE_KERNELS(float, f32)
PER_SAMPLE_KERNELS(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// Position reductions: out[n, c] (+)= k · Σ_p a[n, p, c] (· b[n, p, c]) — the pool forward
// (Σ x, k = 1 / P), the SE scale gradient (Σ dy · x) and the per-sample bias gradient (Σ dy).
//
// Stage 1: block (32 channels × RED_ROWS position rows), grid (ceil(C / 32), splits, N). Thread
// (cl, r) of block (bx, split, n) sums channel 32·bx + cl over the split's positions p ≡ r (mod
// RED_ROWS) in increasing order; the block adds its RED_ROWS partials in order. With one split the
// block writes out directly, otherwise partial[n][split][c] (f32) and stage 2 adds the splits in order.

constexpr int RED_ROWS = 8;

struct RedGeom {
    int n, p, c;
    int per_split;  // positions per split
    float k;
    int accumulate;
};

template <bool DOT, typename T>
__device__ __forceinline__ void position_reduce_partial(const T* __restrict__ a, const T* __restrict__ b,
                                                        T* __restrict__ out, float* __restrict__ partial,
                                                        RedGeom geo) {
    __shared__ float red[RED_ROWS][32];
    const int cl = threadIdx.x % 32, r = threadIdx.x / 32;
    const int ch = blockIdx.x * 32 + cl;
    const int n = blockIdx.z;
    // p0 < P; P + RED_ROWS + per_split < 2³¹ (checked by the launch layer), so no int overflow.
    const int p0 = blockIdx.y * geo.per_split;
    const int p1 = min(geo.p, p0 + geo.per_split);
    float acc = 0.f;
    if (ch < geo.c) {
        const u64 base = (u64)n * geo.p * geo.c + ch;
        for (int p = p0 + r; p < p1; p += RED_ROWS) {
            const u64 at = base + (u64)p * geo.c;
            if constexpr (DOT) {
                acc += to_acc(a[at]) * to_acc(b[at]);
            } else {
                acc += to_acc(a[at]);
            }
        }
    }
    red[r][cl] = acc;
    __syncthreads();
    if (r == 0 && ch < geo.c) {
        float sum = 0.f;
#pragma unroll
        for (int rr = 0; rr < RED_ROWS; ++rr) sum += red[rr][cl];
        if (gridDim.y == 1) {
            const u64 o = (u64)n * geo.c + ch;
            out[o] = from_acc<T>((geo.accumulate ? to_acc(out[o]) : 0.f) + geo.k * sum);
        } else {
            partial[((u64)n * gridDim.y + blockIdx.y) * geo.c + ch] = sum;
        }
    }
}

// Stage 2: out[n, c] (+)= k · Σ_split partial[n][split][c], splits in order.
template <typename T>
__device__ __forceinline__ void position_reduce_final(const float* __restrict__ partial, T* __restrict__ out,
                                                      RedGeom geo, int splits) {
    const u64 len = (u64)geo.n * geo.c;
    GRID_STRIDE_LOOP(i, len) {
        const u64 n = i / geo.c, ch = i % geo.c;
        const float* pp = partial + n * splits * geo.c + ch;
        float sum = 0.f;
        for (int s = 0; s < splits; ++s) sum += pp[(u64)s * geo.c];
        out[i] = from_acc<T>((geo.accumulate ? to_acc(out[i]) : 0.f) + geo.k * sum);
    }
}

#define REDUCE_KERNELS(T, SUFFIX)                                                                             \
    KERNEL_BOUNDED(32 * RED_ROWS, position_sum_##SUFFIX, const T* __restrict__ a, T* __restrict__ out,       \
                   float* __restrict__ partial, RedGeom geo) {                                                \
        position_reduce_partial<false>(a, (const T*)nullptr, out, partial, geo);                              \
    }                                                                                                         \
    KERNEL_BOUNDED(32 * RED_ROWS, position_dot_##SUFFIX, const T* __restrict__ a, const T* __restrict__ b,   \
                   T* __restrict__ out, float* __restrict__ partial, RedGeom geo) {                           \
        position_reduce_partial<true>(a, b, out, partial, geo);                                               \
    }                                                                                                         \
    KERNEL(position_reduce_##SUFFIX, const float* __restrict__ partial, T* __restrict__ out, RedGeom geo,    \
           int splits) {                                                                                      \
        position_reduce_final(partial, out, geo, splits);                                                     \
    }

REDUCE_KERNELS(float, f32)
REDUCE_KERNELS(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// Copies in words W (pure data movement: the dtype only sets the word size).

// Nearest 2× upsampling, x [rows = N·H, W, cw words] → y [N, 2H, 2W, cw]: one thread per input
// word writes its four copies.
template <typename W>
__device__ __forceinline__ void upsample2x_forward(const W* __restrict__ x, W* __restrict__ y, u64 rows, u64 w,
                                                   u64 cw) {
    const u64 total = rows * w * cw;
    const u64 out_row = 2 * w * cw;
    GRID_STRIDE_LOOP(i, total) {
        const u64 k = i % cw;
        const u64 pix = i / cw;
        const u64 ix = pix % w, r = pix / w;
        const W v = x[i];
        W* top = y + 2 * r * out_row + 2 * ix * cw + k;
        top[0] = v;
        top[cw] = v;
        top[out_row] = v;
        top[out_row + cw] = v;
    }
}

// dst[r · dst_stride + j] = src[r · src_stride + j] for r < rows, j < width (all in words):
// concatenation on the last axis (one launch per input) and its backward (one per output).
template <typename W>
__device__ __forceinline__ void copy_rows(const W* __restrict__ src, W* __restrict__ dst, u64 rows, u64 width,
                                          u64 src_stride, u64 dst_stride) {
    GRID_STRIDE_LOOP(i, rows * width) {
        const u64 r = i / width, j = i % width;
        dst[r * dst_stride + j] = src[r * src_stride + j];
    }
}

// out[l, :] = table[idx[l], :] (rows of dw words). An index outside [0, vocab) fills its row with
// all-one bytes (a NaN in every float type), so a bad index shows instead of reading out of bounds.
template <typename W>
__device__ __forceinline__ void embedding_forward(const W* __restrict__ table, const int* __restrict__ idx,
                                                  W* __restrict__ out, u64 len, int vocab, u64 dw) {
    GRID_STRIDE_LOOP(i, len * dw) {
        const u64 l = i / dw, k = i % dw;
        const int row = idx[l];
        if (row >= 0 && row < vocab) {
            out[i] = table[(u64)row * dw + k];
        } else {
            union {
                W w;
                unsigned char b[sizeof(W)];
            } u;
#pragma unroll
            for (int j = 0; j < (int)sizeof(W); ++j) u.b[j] = 0xff;
            out[i] = u.w;
        }
    }
}

#define WORD_KERNELS(BYTES)                                                                                   \
    KERNEL(upsample2x_forward_w##BYTES, const Word<BYTES>::type* __restrict__ x,                             \
           Word<BYTES>::type* __restrict__ y, u64 rows, u64 w, u64 cw) {                                      \
        upsample2x_forward(x, y, rows, w, cw);                                                                \
    }                                                                                                         \
    KERNEL(copy_rows_w##BYTES, const Word<BYTES>::type* __restrict__ src, Word<BYTES>::type* __restrict__ dst, \
           u64 rows, u64 width, u64 src_stride, u64 dst_stride) {                                             \
        copy_rows(src, dst, rows, width, src_stride, dst_stride);                                             \
    }                                                                                                         \
    KERNEL(embedding_forward_w##BYTES, const Word<BYTES>::type* __restrict__ table, const int* __restrict__ idx, \
           Word<BYTES>::type* __restrict__ out, u64 len, int vocab, u64 dw) {                                 \
        embedding_forward(table, idx, out, len, vocab, dw);                                                   \
    }

WORD_KERNELS(16)
WORD_KERNELS(8)
WORD_KERNELS(4)
WORD_KERNELS(2)

// ------------------------------------------------------------------------------------------------
// Nearest 2× upsampling backward: dx[r, x, c] = (dy[2r, 2x, c] + dy[2r, 2x+1, c])
// + (dy[2r+1, 2x, c] + dy[2r+1, 2x+1, c]) (the CPU op's order), in packs of V channels.

template <int V, typename T>
__device__ __forceinline__ void upsample2x_backward(const T* __restrict__ dy, T* __restrict__ dx, u64 rows, u64 w,
                                                    u64 c) {
    const u64 cv = c / V;
    const u64 out_row = 2 * w * c;
    GRID_STRIDE_LOOP(i, rows * w * cv) {
        const u64 k = i % cv;
        const u64 pix = i / cv;
        const u64 ix = pix % w, r = pix / w;
        const T* t = dy + 2 * r * out_row + 2 * ix * c + k * V;
        float t0[V], t1[V], b0[V], b1[V], s[V];
        load_acc<V>(t, t0);
        load_acc<V>(t + c, t1);
        load_acc<V>(t + out_row, b0);
        load_acc<V>(t + out_row + c, b1);
#pragma unroll
        for (int j = 0; j < V; ++j) s[j] = (t0[j] + t1[j]) + (b0[j] + b1[j]);
        store_acc<V>(dx + pix * c + k * V, s);
    }
}

#define UPSAMPLE_BACKWARD_KERNELS(T, SUFFIX)                                                                  \
    KERNEL(upsample2x_backward_##SUFFIX, const T* __restrict__ dy, T* __restrict__ dx, u64 rows, u64 w, u64 c) { \
        upsample2x_backward<1>(dy, dx, rows, w, c);                                                           \
    }                                                                                                         \
    KERNEL(upsample2x_backward_vec_##SUFFIX, const T* __restrict__ dy, T* __restrict__ dx, u64 rows, u64 w,  \
           u64 c) {                                                                                           \
        upsample2x_backward<vec_of<T>()>(dy, dx, rows, w, c);                                                 \
    }

UPSAMPLE_BACKWARD_KERNELS(float, f32)
UPSAMPLE_BACKWARD_KERNELS(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// Embedding backward into an f32 table gradient [V, D], deterministic without atomics: the launch
// layer groups the positions by row on the host (CSR: row v's positions are order[starts[v] ..
// starts[v + 1]], increasing), and thread (v, d) adds g[l, d] over them in that order —
// dtable[v, d] (+)= Σ_l g[l, d], exactly the CPU op's order.

template <typename T>
__device__ __forceinline__ void embedding_backward(const T* __restrict__ g, const int* __restrict__ starts,
                                                   const int* __restrict__ order, float* __restrict__ dtable,
                                                   int vocab, u64 d, int accumulate) {
    GRID_STRIDE_LOOP(i, (u64)vocab * d) {
        const u64 v = i / d, col = i % d;
        float sum = accumulate ? dtable[i] : 0.f;
        const int e = starts[v + 1];
        for (int j = starts[v]; j < e; ++j) sum += to_acc(g[(u64)order[j] * d + col]);
        dtable[i] = sum;
    }
}

#define EMBEDDING_BACKWARD_KERNEL(T, SUFFIX)                                                                   \
    KERNEL(embedding_backward_##SUFFIX, const T* __restrict__ g, const int* __restrict__ starts,               \
           const int* __restrict__ order, float* __restrict__ dtable, int vocab, u64 d, int accumulate) {      \
        embedding_backward(g, starts, order, dtable, vocab, d, accumulate);                                    \
    }

EMBEDDING_BACKWARD_KERNEL(float, f32)
EMBEDDING_BACKWARD_KERNEL(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// Deterministic sum of n f32 values, two stages: SUM_BLOCK-thread blocks, a block count fixed by n
// alone (so the result is the same on every GPU), each thread summing a fixed grid-stride set of
// packs in order, a fixed butterfly / warp order inside the block → partial[block]; then one block
// adds the partials the same way: out[0] (+)= scale · Σ.

constexpr int SUM_BLOCK = 256;

// The block's sum of v, in thread 0 (SUM_BLOCK threads, all of them calling).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[SUM_BLOCK / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int w = 0; w < SUM_BLOCK / 32; ++w) total += warp_sums[w];
    }
    return total;
}

template <int V>
__device__ __forceinline__ void sum_partial(const float* __restrict__ x, u64 n, float* __restrict__ partial) {
    const u64 packs = n / V;
    float acc = 0.f;
    GRID_STRIDE_LOOP(i, packs) {
        float v[V];
        load_acc<V>(x + i * V, v);
#pragma unroll
        for (int k = 0; k < V; ++k) acc += v[k];
    }
    if constexpr (V > 1) {
        const u64 done = packs * V;
        GRID_STRIDE_LOOP(i, n - done) acc += x[done + i];
    }
    const float total = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

KERNEL_BOUNDED(SUM_BLOCK, sum_partial_f32, const float* __restrict__ x, u64 n, float* __restrict__ partial) {
    sum_partial<1>(x, n, partial);
}
KERNEL_BOUNDED(SUM_BLOCK, sum_partial_vec_f32, const float* __restrict__ x, u64 n, float* __restrict__ partial) {
    sum_partial<4>(x, n, partial);
}

// One block: out[0] (+)= scale · Σ partial[0 .. blocks].
KERNEL_BOUNDED(SUM_BLOCK, sum_final_f32, const float* __restrict__ partial, int blocks, float* __restrict__ out,
               float scale, int accumulate) {
    float acc = 0.f;
    for (int b = threadIdx.x; b < blocks; b += SUM_BLOCK) acc += partial[b];
    const float total = block_sum(acc);
    if (threadIdx.x == 0) out[0] = (accumulate ? out[0] : 0.f) + scale * total;
}
