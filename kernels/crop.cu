// Single-cell crops from a plate image already on the device, and their training augmentation,
// reproducing src/profiling/crops.rs (crop_cells) and src/train/augment.rs (apply) bit for bit.
//
// crop_extract_<pixel>: image [C, H, W] (u8, u16 or f32 planes) and per cell the box origin
// (x0, y0) (the host rounds the centres exactly as the CPU does) → f32 crops [N, C, B, B]
// (layout 0, crop_cells's) or [N, B, B, C] (layout 1, the models' NHWC). One block per (cell,
// channel) plane: pass 1 takes the plane's min / max (zero padding included; exact, so any order
// gives the same bits), pass 2 writes (x − shift)·scale. Pixels outside the image are 0.
//
// crop_augment: [N, C, H, W] f32 crops → augmented crops (either layout; a distinct buffer). One
// block per plane gathers each output pixel through rot90⁻¹ → flip⁻¹ → the bilinear resize of
// the crop window (half-pixel centres, torch's source index), then, when the crop has
// illumination parameters, x·f + (m − m·f + b) with m the plane mean (f64 sum, fixed-order tree;
// exact, hence the CPU's bits, whenever the f64 sum is exact — always for values ≥ 2⁻¹⁵ in
// magnitude over ≤ 2¹⁴ pixels). Every operation is an explicit round-to-nearest intrinsic, so FMA
// contraction cannot change the CPU's operation order.
#include "common.cuh"

constexpr int CROP_THREADS = 256;
enum { NORM_NONE = 0, NORM_LEGACY = 1, NORM_MINMAX = 2 };
enum { LAYOUT_NCHW = 0, LAYOUT_NHWC = 1 };

struct CropGeom {
    int cells, c, h, w, box, norm, layout, pad;
};

__device__ __forceinline__ float pixel_f32(unsigned char v) { return (float)v; }
__device__ __forceinline__ float pixel_f32(unsigned short v) { return (float)v; }
__device__ __forceinline__ float pixel_f32(float v) { return v; }

// Output index of element e (row-major in the B×B or H×W plane) of plane (cell, ch).
__device__ __forceinline__ u64 plane_out_index(int layout, int cell, int ch, int channels, u64 plane_len, u64 e) {
    return layout == LAYOUT_NCHW ? ((u64)cell * channels + ch) * plane_len + e
                                 : ((u64)cell * plane_len + e) * channels + ch;
}

// Block-wide min and max (CROP_THREADS threads), every thread gets both.
__device__ __forceinline__ void block_min_max(float& lo, float& hi) {
    __shared__ float red_lo[CROP_THREADS / 32], red_hi[CROP_THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        red_lo[warp] = lo;
        red_hi[warp] = hi;
    }
    __syncthreads();
    lo = red_lo[0];
    hi = red_hi[0];
    for (int k = 1; k < CROP_THREADS / 32; ++k) {
        lo = fminf(lo, red_lo[k]);
        hi = fmaxf(hi, red_hi[k]);
    }
}

template <typename T>
__device__ __forceinline__ void crop_extract(const T* __restrict__ image, const int* __restrict__ origins,
                                             float* __restrict__ out, CropGeom g) {
    const int cell = blockIdx.x / g.c, ch = blockIdx.x % g.c;
    const int x0 = origins[2 * cell], y0 = origins[2 * cell + 1];
    const T* __restrict__ src = image + (u64)ch * g.h * g.w;
    const u64 plane = (u64)g.box * g.box;
    auto at = [&](u64 e) -> float {
        const int y = y0 + (int)(e / g.box), x = x0 + (int)(e % g.box);
        return (y >= 0 && y < g.h && x >= 0 && x < g.w) ? pixel_f32(src[(u64)y * g.w + x]) : 0.f;
    };
    float shift = 0.f, scale = 1.f;
    if (g.norm != NORM_NONE) {
        float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
        for (u64 e = threadIdx.x; e < plane; e += blockDim.x) {
            const float v = at(e);
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
        block_min_max(lo, hi);
        shift = lo;
        if (g.norm == NORM_LEGACY) scale = hi != 0.f ? __fdiv_rn(1.f, hi) : 0.f;
        else scale = __fdiv_rn(1.f, __fadd_rn(__fsub_rn(hi, lo), 1e-6f));
    }
    for (u64 e = threadIdx.x; e < plane; e += blockDim.x) {
        float v = at(e);
        if (g.norm != NORM_NONE) v = __fmul_rn(__fsub_rn(v, shift), scale);
        out[plane_out_index(g.layout, cell, ch, g.c, plane, e)] = v;
    }
}

#define CROP_KERNEL(T, SUFFIX)                                                                                  \
    KERNEL_BOUNDED(CROP_THREADS, crop_extract_##SUFFIX, const T* __restrict__ image,                            \
                   const int* __restrict__ origins, float* __restrict__ out, CropGeom g) {                     \
        crop_extract<T>(image, origins, out, g);                                                               \
    }

CROP_KERNEL(unsigned char, u8)
CROP_KERNEL(unsigned short, u16)
CROP_KERNEL(float, f32)

// ---- Augmentation.

struct AugGeom {
    int n, c, h, w, layout, pad;
};

// One crop's draws (src/train/augment.rs AugmentParams): crop window (sh = 0: none), flip,
// quarter turns, and whether it has illumination values (brightness[n·C + c], contrast[n·C + c]).
struct AugCrop {
    int y0, x0, sh, sw, flip, rot_k, illum, pad;
};

// torch area_pixel_compute_source_index (f32): s = max(scale·(i + 0.5) − 0.5, 0) with
// scale = in / out; taps i0 = min(⌊s⌋, in − 1), i1 = min(i0 + 1, in − 1), weight s − i0.
__device__ __forceinline__ void resize_tap(int i, int in, int out, int& i0, int& i1, float& l) {
    const float scale = __fdiv_rn((float)in, (float)out);
    const float s = fmaxf(__fsub_rn(__fmul_rn(scale, __fadd_rn((float)i, 0.5f)), 0.5f), 0.f);
    i0 = min((int)s, in - 1);
    i1 = min(i0 + 1, in - 1);
    l = __fsub_rn(s, (float)i0);
}

__device__ __forceinline__ float lerp_cpu(float a, float b, float l) { return __fadd_rn(a, __fmul_rn(__fsub_rn(b, a), l)); }

KERNEL_BOUNDED(CROP_THREADS, crop_augment, const float* __restrict__ in, const AugCrop* __restrict__ params,
               const float* __restrict__ brightness, const float* __restrict__ contrast, float* __restrict__ out,
               AugGeom g) {
    __shared__ double red[CROP_THREADS];
    const int cell = blockIdx.x / g.c, ch = blockIdx.x % g.c;
    const AugCrop a = params[cell];
    const int h = g.h, w = g.w;
    const u64 plane = (u64)h * w;
    const float* __restrict__ src = in + ((u64)cell * g.c + ch) * plane;
    const int k = a.rot_k & 3;
    const float f = a.illum ? contrast[(u64)cell * g.c + ch] : 1.f;
    const float b = a.illum ? brightness[(u64)cell * g.c + ch] : 0.f;
    const bool want_mean = a.illum && f != 1.f;
    double sum = 0.0;
    for (u64 e = threadIdx.x; e < plane; e += blockDim.x) {
        const int i = (int)(e / w), j = (int)(e % w);
        // rot90⁻¹ (square when k ≠ 0): final (i, j) ← flipped-image (y, x).
        int y = i, x = j;
        if (k == 1) {
            y = j;
            x = w - 1 - i;
        } else if (k == 2) {
            y = h - 1 - i;
            x = w - 1 - j;
        } else if (k == 3) {
            y = h - 1 - j;
            x = i;
        }
        if (a.flip) x = w - 1 - x;
        float v;
        if (a.sh > 0) {
            int ya, yb, xa, xb;
            float ly, lx;
            resize_tap(y, a.sh, h, ya, yb, ly);
            resize_tap(x, a.sw, w, xa, xb, lx);
            const float* r0 = src + (u64)(a.y0 + ya) * w + a.x0;
            const float* r1 = src + (u64)(a.y0 + yb) * w + a.x0;
            const float top = lerp_cpu(r0[xa], r0[xb], lx);
            const float bot = lerp_cpu(r1[xa], r1[xb], lx);
            v = lerp_cpu(top, bot, ly);
        } else {
            v = src[(u64)y * w + x];
        }
        out[plane_out_index(g.layout, cell, ch, g.c, plane, e)] = v;
        if (want_mean) sum = __dadd_rn(sum, (double)v);
    }
    if (!a.illum) return;  // uniform over the block
    float m = 0.f;
    if (want_mean) {
        red[threadIdx.x] = sum;
        __syncthreads();
        for (int s = CROP_THREADS / 2; s > 0; s >>= 1) {
            if ((int)threadIdx.x < s) red[threadIdx.x] = __dadd_rn(red[threadIdx.x], red[threadIdx.x + s]);
            __syncthreads();
        }
        m = (float)(red[0] / (double)plane);
    }
    const float offset = __fadd_rn(__fsub_rn(m, __fmul_rn(m, f)), b);
    // Each thread rewrites the elements it wrote above (its own writes: no barrier needed).
    for (u64 e = threadIdx.x; e < plane; e += blockDim.x) {
        const u64 o = plane_out_index(g.layout, cell, ch, g.c, plane, e);
        out[o] = __fadd_rn(__fmul_rn(out[o], f), offset);
    }
}
