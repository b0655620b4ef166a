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
