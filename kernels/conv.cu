// Dense convolution helpers. im2col of NCHW images for a k × k convolution as one GEMM:
// cols[(s·OH + oy)·OW + ox][(ci·K + ky)·K + kx] = x[s, ci, oy·stride − pad_top + ky, ox·stride − pad_left + kx]
// (zero outside the image), the column order of torch's OIHW weights flattened to [out, in·K·K].
#include "common.cuh"

struct ColGeom {
    int n, c, h, w, k, stride, pad_top, pad_left, oh, ow;
};

template <typename T>
__device__ __forceinline__ void im2col_nchw(const T* __restrict__ x, T* __restrict__ cols, ColGeom g) {
    const int kdim = g.c * g.k * g.k;
    const u64 total = (u64)g.n * g.oh * g.ow * kdim;
    GRID_STRIDE_LOOP(i, total) {
        const int col = (int)(i % kdim);
        const u64 row = i / kdim;
        const int kx = col % g.k, ky = (col / g.k) % g.k, ci = col / (g.k * g.k);
        const int ox = (int)(row % g.ow), oy = (int)((row / g.ow) % g.oh), s = (int)(row / ((u64)g.ow * g.oh));
        const int iy = oy * g.stride - g.pad_top + ky, ix = ox * g.stride - g.pad_left + kx;
        T v = from_acc<T>(0.f);
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[(((u64)s * g.c + ci) * g.h + iy) * g.w + ix];
        cols[i] = v;
    }
}

KERNEL(im2col_nchw_f32, const float* __restrict__ x, float* __restrict__ cols, ColGeom g) { im2col_nchw(x, cols, g); }
KERNEL(im2col_nchw_bf16, const bf16* __restrict__ x, bf16* __restrict__ cols, ColGeom g) { im2col_nchw(x, cols, g); }

// ------------------------------------------------------------------------------------------------
// Dense convolution of NHWC activations (src/backend/gpu/conv.rs): x [N, H, W, Cin], torch OIHW
// weights w [Cout, Cin, K, K] used as [Cout, kdim = Cin·K²]. The launch layer processes the output
// rows r = (s·OH + oy)·OW + ox in chunks [row0, row0 + rows) (bounded workspace):
//   cols[r − row0][(ci·K + ky)·K + kx] = x[s, oy·stride − pad_top + ky, ox·stride − pad_left + kx, ci]
// (zero outside the image), then y = cols · wᵀ, dcols = dy · w and dw (+)= dyᵀ · cols are GEMMs.
struct ConvGeom {
    int n, h, w, cin, oh, ow, k, stride, pad_top, pad_left, kdim;
    int row0, rows;          // the chunk: output rows [row0, row0 + rows)
    int ct, rb;              // im2col tile: ct channels × rb rows per block
    int q0, nq, accumulate;  // col2im: input rows q = s·H + iy in [q0, q0 + nq); dx += instead of =
};

// im2col, tiled through shared memory so both sides are coalesced: block (bx, by) copies rows
// [bx·rb, bx·rb + rb) of the chunk, channels [by·ct, by·ct + ct). It reads x with the channel
// fastest (contiguous in NHWC), stores tile[row][ci][tap], then writes each row's contiguous run
// cols[row][ci0·K² .. (ci0 + cte)·K²). Dynamic shared memory: rb·ct·K² elements of T.
template <typename T>
__device__ __forceinline__ void im2col_nhwc(const T* __restrict__ x, T* __restrict__ cols, ConvGeom g) {
    DYNAMIC_SHARED(T, tile);
    const int kk = g.k * g.k;
    const int ci0 = blockIdx.y * g.ct;
    const int cte = min(g.ct, g.cin - ci0);
    const int per_row = cte * kk;
    const int lr0 = blockIdx.x * g.rb;
    const int total = min(g.rb, g.rows - lr0) * per_row;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
        const int ci = e % cte;
        const int rest = e / cte;
        const int t = rest % kk, rr = rest / kk;
        const int r = g.row0 + lr0 + rr;
        const int ox = r % g.ow, q = r / g.ow;
        const int oy = q % g.oh, s = q / g.oh;
        const int iy = oy * g.stride - g.pad_top + t / g.k, ix = ox * g.stride - g.pad_left + t % g.k;
        T v = from_acc<T>(0.f);
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[(((u64)s * g.h + iy) * g.w + ix) * g.cin + ci0 + ci];
        tile[rr * per_row + ci * kk + t] = v;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
        const int rr = e / per_row, j = e % per_row;
        cols[(u64)(lr0 + rr) * g.kdim + (u64)ci0 * kk + j] = tile[e];
    }
}

// col2im as a gather (deterministic, no atomics): one thread per dx element of the input rows
// [q0, q0 + nq), channel fastest, summing in the fixed order (ky, kx) ascending the dcols entries
// of its taps whose output row lies in the chunk; adds to dx when `accumulate` (chunks that share
// input rows), else overwrites. dcols is TC (T, or f32 for a bf16 dx: the taps' products are
// summed unrounded and dx is rounded once).
template <typename TC, typename T>
__device__ __forceinline__ void col2im_nhwc(const TC* __restrict__ dcols, T* __restrict__ dx, ConvGeom g) {
    const u64 total = (u64)g.nq * g.w * g.cin;
    const int kk = g.k * g.k;
    GRID_STRIDE_LOOP(i, total) {
        const int ci = (int)(i % g.cin);
        const u64 rest = i / g.cin;
        const int ix = (int)(rest % g.w);
        const int q = g.q0 + (int)(rest / g.w);
        const int iy = q % g.h, s = q / g.h;
        const int ty0 = iy + g.pad_top, tx0 = ix + g.pad_left;
        float acc = 0.f;
        // Only taps ky ≡ iy + pad_top (mod stride) land on a whole output row.
        for (int ky = ty0 % g.stride; ky < g.k && ky <= ty0; ky += g.stride) {
            const int oy = (ty0 - ky) / g.stride;
            if (oy >= g.oh) continue;
            for (int kx = tx0 % g.stride; kx < g.k && kx <= tx0; kx += g.stride) {
                const int ox = (tx0 - kx) / g.stride;
                if (ox >= g.ow) continue;
                const int lr = (s * g.oh + oy) * g.ow + ox - g.row0;
                if (lr < 0 || lr >= g.rows) continue;
                acc += to_acc(dcols[(u64)lr * g.kdim + ci * kk + ky * g.k + kx]);
            }
        }
        const u64 at = ((u64)q * g.w + ix) * g.cin + ci;
        dx[at] = from_acc<T>(g.accumulate ? to_acc(dx[at]) + acc : acc);
    }
}

#define CONV_KERNELS(T, SUFFIX)                                                                                 \
    KERNEL_BOUNDED(256, im2col_nhwc_##SUFFIX, const T* __restrict__ x, T* __restrict__ cols, ConvGeom g) {     \
        im2col_nhwc(x, cols, g);                                                                                \
    }                                                                                                           \
    KERNEL(col2im_nhwc_##SUFFIX, const T* __restrict__ dcols, T* __restrict__ dx, ConvGeom g) {                \
        col2im_nhwc<T, T>(dcols, dx, g);                                                                        \
    }

CONV_KERNELS(float, f32)
CONV_KERNELS(bf16, bf16)

KERNEL(col2im_nhwc_f32_bf16, const float* __restrict__ dcols, bf16* __restrict__ dx, ConvGeom g) {
    col2im_nhwc<float, bf16>(dcols, dx, g);
}
