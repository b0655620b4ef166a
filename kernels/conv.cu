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
    // 32-bit division when every index fits (uniform per launch): 64-bit division is a long
    // instruction sequence, and this kernel does five per element.
    const bool small = total < (1ull << 32);
    GRID_STRIDE_LOOP(i, total) {
        int col, ox, oy, s;
        if (small) {
            const unsigned e = (unsigned)i, row = e / (unsigned)kdim, q = row / (unsigned)g.ow;
            col = (int)(e - row * (unsigned)kdim);
            ox = (int)(row - q * (unsigned)g.ow);
            oy = (int)(q % (unsigned)g.oh);
            s = (int)(q / (unsigned)g.oh);
        } else {
            col = (int)(i % kdim);
            const u64 row = i / kdim;
            ox = (int)(row % g.ow);
            oy = (int)((row / g.ow) % g.oh);
            s = (int)(row / ((u64)g.ow * g.oh));
        }
        const int kx = col % g.k, ky = (col / g.k) % g.k, ci = col / (g.k * g.k);
        const int iy = oy * g.stride - g.pad_top + ky, ix = ox * g.stride - g.pad_left + kx;
        T v = from_acc<T>(0.f);
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[(((u64)s * g.c + ci) * g.h + iy) * g.w + ix];
        cols[i] = v;
    }
}

KERNEL(im2col_nchw_f32, const float* __restrict__ x, float* __restrict__ cols, ColGeom g) { im2col_nchw(x, cols, g); }
KERNEL(im2col_nchw_bf16, const bf16* __restrict__ x, bf16* __restrict__ cols, ColGeom g) { im2col_nchw(x, cols, g); }

// The EfficientNet stem as one direct convolution: 3 × 3 taps of NCHW f32 crops x [N, C, H, W]
// (ColGeom: k = 3, any stride and padding) into NHWC y [N·OH·OW, STEM_CO] with the bias and
// activation fused (act 0: none, 1: SiLU): y = act(Σ x · w + b), no im2col buffer and no GEMM.
// w is [STEM_CO, C·9] (torch OIHW flattened, BN folded in). Block: the weights, transposed to
// [C·9][STEM_CO] in shared memory (every thread reads the same word: broadcast); one thread per
// output pixel keeps its STEM_CO sums in registers and writes them as 16-byte stores. b may be null.
constexpr int STEM_CO = 32;
constexpr int STEM_THREADS = 128;
KERNEL_BOUNDED(STEM_THREADS, stem_conv3x3_f32, const float* __restrict__ x, const float* __restrict__ w,
               const float* __restrict__ b, float* __restrict__ y, ColGeom g, int act) {
    DYNAMIC_SHARED(float, ws);
    const int taps = g.c * 9;
    for (int e = threadIdx.x; e < taps * STEM_CO; e += blockDim.x) {
        const int co = e % STEM_CO, t = e / STEM_CO;
        ws[e] = w[co * taps + t];
    }
    __syncthreads();
    const unsigned pixels_per_sample = (unsigned)(g.oh * g.ow);
    const u64 total = (u64)g.n * pixels_per_sample;
    GRID_STRIDE_LOOP(i, total) {
        const int s = (int)(i / pixels_per_sample);
        const unsigned p = (unsigned)(i - (u64)s * pixels_per_sample);
        const int oy = (int)(p / (unsigned)g.ow), ox = (int)(p % (unsigned)g.ow);
        const int iy0 = oy * g.stride - g.pad_top, ix0 = ox * g.stride - g.pad_left;
        float acc[STEM_CO];
#pragma unroll
        for (int co = 0; co < STEM_CO; ++co) acc[co] = b ? b[co] : 0.f;
        for (int ci = 0; ci < g.c; ++ci) {
            const float* xc = x + ((u64)s * g.c + ci) * g.h * g.w;
#pragma unroll
            for (int t = 0; t < 9; ++t) {
                const int iy = iy0 + t / 3, ix = ix0 + t % 3;
                if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
                const float v = xc[(u64)iy * g.w + ix];
                const float* wt = ws + (ci * 9 + t) * STEM_CO;
#pragma unroll
                for (int co = 0; co < STEM_CO; ++co) acc[co] += v * wt[co];
            }
        }
        float4* out = reinterpret_cast<float4*>(y + i * STEM_CO);
#pragma unroll
        for (int q = 0; q < STEM_CO / 4; ++q) {
            float4 o;
            float* ov = reinterpret_cast<float*>(&o);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float z = acc[4 * q + j];
                ov[j] = act == 1 ? z / (1.f + expf(-z)) : z;
            }
            out[q] = o;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Dense convolution of NHWC activations (src/backend/gpu/conv.rs): x [N, H, W, Cin], torch OIHW
// weights w [Cout, Cin, K, K]. The GEMMs use the weights tap-major, wt [Cout, K·K, Cin] ("OHWI",
// conv_weight_to_taps), so that a row of cols is K·K contiguous runs of Cin channels copied
// straight from x. The launch layer processes the output rows r = (s·OH + oy)·OW + ox in chunks
// [row0, row0 + rows) (bounded workspace):
//   cols[r − row0][(ky·K + kx)·Cin + ci] = x[s, oy·stride − pad_top + ky, ox·stride − pad_left + kx, ci]
// (zero outside the image), then y = cols · wtᵀ, dcols = dy · wt and dwt (+)= dyᵀ · cols are GEMMs,
// and conv_weight_from_taps turns dwt back into OIHW.
struct ConvGeom {
    int n, h, w, cin, oh, ow, k, stride, pad_top, pad_left, kdim;
    int row0, rows;          // the chunk: output rows [row0, row0 + rows)
    int units;               // im2col: copy units (of U) per pixel, Cin · sizeof(T) / sizeof(U)
    int q0, nq, accumulate;  // col2im: input rows q = s·H + iy in [q0, q0 + nq); dx += instead of =
};

// im2col as a copy of U-sized units (16, 8, 4 or 2 bytes: the widest that divides a pixel's bytes
// and the alignment of x; the launch layer picks it), so any storage dtype uses one kernel. Item i
// of the chunk is unit c of tap t of row lr, i = (lr·K² + t)·units + c: cols is written in order
// (coalesced), and consecutive items read consecutive units of one pixel of x.
template <typename U>
__device__ __forceinline__ void im2col_taps(const U* __restrict__ x, U* __restrict__ cols, ConvGeom g) {
    const unsigned kk = (unsigned)(g.k * g.k), units = (unsigned)g.units;
    const u64 total = (u64)g.rows * kk * units;
    GRID_STRIDE_LOOP(i, total) {
        // total < 2³¹ (the launch layer bounds a chunk's cols): 32-bit division.
        const unsigned e = (unsigned)i;
        const unsigned c = e % units, rest = e / units;
        const unsigned t = rest % kk, lr = rest / kk;
        const int r = g.row0 + (int)lr;
        const int ox = r % g.ow, q = r / g.ow;
        const int oy = q % g.oh, s = q / g.oh;
        const int ky = (int)t / g.k, kx = (int)t - ky * g.k;
        const int iy = oy * g.stride - g.pad_top + ky, ix = ox * g.stride - g.pad_left + kx;
        U v = {};
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[(((u64)s * g.h + iy) * g.w + ix) * units + c];
        cols[i] = v;
    }
}

// V values of T stored together (one 4·sizeof(T)-byte store for V = 4).
template <typename T, int V> struct __align__(sizeof(T) * V) ConvPack { T v[V]; };

// col2im as a gather (deterministic, no atomics): one thread per V channels of a dx pixel of the
// input rows [q0, q0 + nq), channels fastest, summing in the fixed order (ky, kx) ascending the
// f32 dcols entries of its taps whose output row lies in the chunk (V = 4: float4 loads; Cin is a
// multiple of 4 and dx aligned to 4 elements). Adds to dx when `accumulate` (chunks that share
// input rows), else overwrites; the taps' products are summed unrounded and dx is rounded once.
template <typename T, int V>
__device__ __forceinline__ void col2im_taps(const float* __restrict__ dcols, T* __restrict__ dx, ConvGeom g) {
    const int cv = g.cin / V;
    const u64 total = (u64)g.nq * g.w * cv;
    GRID_STRIDE_LOOP(i, total) {
        const int ci = (int)(i % cv) * V;
        const u64 rest = i / cv;
        const int ix = (int)(rest % g.w);
        const int q = g.q0 + (int)(rest / g.w);
        const int iy = q % g.h, s = q / g.h;
        const int ty0 = iy + g.pad_top, tx0 = ix + g.pad_left;
        float acc[V];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.f;
        // Only taps ky ≡ iy + pad_top (mod stride) land on a whole output row.
        for (int ky = ty0 % g.stride; ky < g.k && ky <= ty0; ky += g.stride) {
            const int oy = (ty0 - ky) / g.stride;
            if (oy >= g.oh) continue;
            for (int kx = tx0 % g.stride; kx < g.k && kx <= tx0; kx += g.stride) {
                const int ox = (tx0 - kx) / g.stride;
                if (ox >= g.ow) continue;
                const int lr = (s * g.oh + oy) * g.ow + ox - g.row0;
                if (lr < 0 || lr >= g.rows) continue;
                const float* src = dcols + (u64)lr * g.kdim + (ky * g.k + kx) * g.cin + ci;
                if constexpr (V == 4) {
                    const float4 v = *reinterpret_cast<const float4*>(src);
                    acc[0] += v.x;
                    acc[1] += v.y;
                    acc[2] += v.z;
                    acc[3] += v.w;
                } else {
#pragma unroll
                    for (int j = 0; j < V; ++j) acc[j] += src[j];
                }
            }
        }
        const u64 at = ((u64)q * g.w + ix) * g.cin + ci;
        ConvPack<T, V>* out = reinterpret_cast<ConvPack<T, V>*>(dx + at);
        ConvPack<T, V> p;
        if (g.accumulate) {
            p = *out;
#pragma unroll
            for (int j = 0; j < V; ++j) p.v[j] = from_acc<T>(to_acc(p.v[j]) + acc[j]);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j) p.v[j] = from_acc<T>(acc[j]);
        }
        *out = p;
    }
}

struct __align__(2) ConvU2 { unsigned short v; };

#define IM2COL_KERNEL(U, SUFFIX)                                                                                \
    KERNEL(im2col_taps_##SUFFIX, const U* __restrict__ x, U* __restrict__ cols, ConvGeom g) { im2col_taps(x, cols, g); }
IM2COL_KERNEL(uint4, b16)
IM2COL_KERNEL(uint2, b8)
IM2COL_KERNEL(unsigned int, b4)
IM2COL_KERNEL(ConvU2, b2)

KERNEL(col2im_taps_f32, const float* __restrict__ dcols, float* __restrict__ dx, ConvGeom g) {
    col2im_taps<float, 1>(dcols, dx, g);
}
KERNEL(col2im_taps_f32_v4, const float* __restrict__ dcols, float* __restrict__ dx, ConvGeom g) {
    col2im_taps<float, 4>(dcols, dx, g);
}
KERNEL(col2im_taps_f32_bf16, const float* __restrict__ dcols, bf16* __restrict__ dx, ConvGeom g) {
    col2im_taps<bf16, 1>(dcols, dx, g);
}
KERNEL(col2im_taps_f32_bf16_v4, const float* __restrict__ dcols, bf16* __restrict__ dx, ConvGeom g) {
    col2im_taps<bf16, 4>(dcols, dx, g);
}

// wt[co][t][ci] = w[co][ci][t] (OIHW → tap-major), t = ky·K + kx; n = Cout·Cin·K² < 2³¹.
template <typename T>
__device__ __forceinline__ void weight_to_taps(const T* __restrict__ w, T* __restrict__ wt, int cin, int kk, int n) {
    GRID_STRIDE_LOOP(i, (u64)n) {
        const int e = (int)i;
        const int ci = e % cin, rest = e / cin;
        const int t = rest % kk, co = rest / kk;
        wt[e] = w[((u64)co * cin + ci) * kk + t];
    }
}

// w[co][ci][t] = wt[co][t][ci] (tap-major f32 → OIHW of TO, rounded once).
template <typename TO>
__device__ __forceinline__ void weight_from_taps(const float* __restrict__ wt, TO* __restrict__ w, int cin, int kk,
                                                 int n) {
    GRID_STRIDE_LOOP(i, (u64)n) {
        const int e = (int)i;
        const int t = e % kk, rest = e / kk;
        const int ci = rest % cin, co = rest / cin;
        w[e] = from_acc<TO>(wt[((u64)co * kk + t) * cin + ci]);
    }
}

KERNEL(conv_weight_to_taps_f32, const float* __restrict__ w, float* __restrict__ wt, int cin, int kk, int n) {
    weight_to_taps(w, wt, cin, kk, n);
}
KERNEL(conv_weight_to_taps_bf16, const bf16* __restrict__ w, bf16* __restrict__ wt, int cin, int kk, int n) {
    weight_to_taps(w, wt, cin, kk, n);
}
KERNEL(conv_weight_from_taps_f32, const float* __restrict__ wt, float* __restrict__ w, int cin, int kk, int n) {
    weight_from_taps(wt, w, cin, kk, n);
}
KERNEL(conv_weight_from_taps_f32_bf16, const float* __restrict__ wt, bf16* __restrict__ w, int cin, int kk, int n) {
    weight_from_taps(wt, w, cin, kk, n);
}
