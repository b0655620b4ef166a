//! Convolutions on NHWC activations (one sample: rows = pixels, columns = channels).

use super::activation::silu;

/// Geometry of a 2-D convolution over one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub oh: usize,
    pub ow: usize,
}

/// Fused depthwise k×k conv + bias + SiLU, with per-channel sums of the output added to `pool`
/// (for the squeeze-excite mean). `input` [h·w, c], `weights` [k·k, c] (tap-major, BN folded),
/// `out` [oh·ow, c]. Channels are processed in register-resident blocks of 64, then 16, then one.
pub fn depthwise_bias_silu(
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    out: &mut [f32],
    pool: &mut [f32],
    g: &ConvGeom,
) {
    let c = bias.len();
    assert!(
        input.len() >= g.h * g.w * c
            && out.len() >= g.oh * g.ow * c
            && weights.len() >= g.k * g.k * c
            && pool.len() >= c
    );
    #[cfg(target_arch = "x86_64")]
    if c % 16 == 0 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F present; buffer lengths asserted above; c is a multiple of 16 so every
        // 16-lane access stays inside a pixel's channel row.
        unsafe {
            dw_avx512::run(
                input.as_ptr(),
                weights.as_ptr(),
                bias.as_ptr(),
                out.as_mut_ptr(),
                pool.as_mut_ptr(),
                g,
                c,
            )
        };
        return;
    }
    depthwise_portable(input, weights, bias, out, pool, g)
}

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn depthwise_portable(
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    out: &mut [f32],
    pool: &mut [f32],
    g: &ConvGeom,
) {
    let c = bias.len();
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let win = g.window(oy, ox);
            let orow = &mut out[(oy * g.ow + ox) * c..][..c];
            let mut cb = 0;
            while cb + 64 <= c {
                dw_block::<64>(input, weights, bias, orow, pool, g, c, cb, &win);
                cb += 64;
            }
            while cb + 16 <= c {
                dw_block::<16>(input, weights, bias, orow, pool, g, c, cb, &win);
                cb += 16;
            }
            while cb < c {
                dw_block::<1>(input, weights, bias, orow, pool, g, c, cb, &win);
                cb += 1;
            }
        }
    }
}

/// Valid tap range of one output pixel: input origin (iy0, ix0) and the taps ky0..ky1 × kx0..kx1
/// that fall inside the image.
struct Window {
    iy0: isize,
    ix0: isize,
    ky0: usize,
    ky1: usize,
    kx0: usize,
    kx1: usize,
}

impl ConvGeom {
    fn window(&self, oy: usize, ox: usize) -> Window {
        let iy0 = (oy * self.stride) as isize - self.pad_top as isize;
        let ix0 = (ox * self.stride) as isize - self.pad_left as isize;
        let span = |origin: isize, size: usize| {
            let lo = (-origin).max(0) as usize;
            let hi = ((size as isize - origin).min(self.k as isize)).max(0) as usize;
            (lo, hi)
        };
        let ((ky0, ky1), (kx0, kx1)) = (span(iy0, self.h), span(ix0, self.w));
        Window {
            iy0,
            ix0,
            ky0,
            ky1,
            kx0,
            kx1,
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_block<const B: usize>(
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    orow: &mut [f32],
    pool: &mut [f32],
    g: &ConvGeom,
    c: usize,
    cb: usize,
    win: &Window,
) {
    let mut acc = [0f32; B];
    acc.copy_from_slice(&bias[cb..cb + B]);
    for ky in win.ky0..win.ky1 {
        let iy = (win.iy0 + ky as isize) as usize;
        for kx in win.kx0..win.kx1 {
            let ix = (win.ix0 + kx as isize) as usize;
            let src = &input[(iy * g.w + ix) * c + cb..][..B];
            let wt = &weights[(ky * g.k + kx) * c + cb..][..B];
            for j in 0..B {
                acc[j] += src[j] * wt[j];
            }
        }
    }
    let (o, p) = (&mut orow[cb..cb + B], &mut pool[cb..cb + B]);
    for j in 0..B {
        let y = silu(acc[j]);
        o[j] = y;
        p[j] += y;
    }
}

#[cfg(target_arch = "x86_64")]
mod dw_avx512 {
    use super::{ConvGeom, Window};
    use crate::backend::cpu::avx512::silu;
    use std::arch::x86_64::*;

    /// Caller guarantees AVX-512F, c % 16 == 0 and buffers of the sizes `depthwise_bias_silu` asserts.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run(
        input: *const f32,
        weights: *const f32,
        bias: *const f32,
        out: *mut f32,
        pool: *mut f32,
        g: &ConvGeom,
        c: usize,
    ) {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let px = Px {
                    win: g.window(oy, ox),
                    out: out.add((oy * g.ow + ox) * c),
                };
                let mut cb = 0;
                while cb + 64 <= c {
                    block::<4>(input, weights, bias, pool, g, c, cb, &px);
                    cb += 64;
                }
                while cb + 32 <= c {
                    block::<2>(input, weights, bias, pool, g, c, cb, &px);
                    cb += 32;
                }
                while cb < c {
                    block::<1>(input, weights, bias, pool, g, c, cb, &px);
                    cb += 16;
                }
            }
        }
    }

    struct Px {
        win: Window,
        out: *mut f32,
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const V: usize>(
        input: *const f32,
        weights: *const f32,
        bias: *const f32,
        pool: *mut f32,
        g: &ConvGeom,
        c: usize,
        cb: usize,
        px: &Px,
    ) {
        let mut acc = [_mm512_setzero_ps(); V];
        for v in 0..V {
            acc[v] = _mm512_loadu_ps(bias.add(cb + 16 * v));
        }
        let w = &px.win;
        for ky in w.ky0..w.ky1 {
            let iy = (w.iy0 + ky as isize) as usize;
            for kx in w.kx0..w.kx1 {
                let ix = (w.ix0 + kx as isize) as usize;
                let src = input.add((iy * g.w + ix) * c + cb);
                let wt = weights.add((ky * g.k + kx) * c + cb);
                for v in 0..V {
                    acc[v] = _mm512_fmadd_ps(
                        _mm512_loadu_ps(src.add(16 * v)),
                        _mm512_loadu_ps(wt.add(16 * v)),
                        acc[v],
                    );
                }
            }
        }
        for v in 0..V {
            let y = silu(acc[v]);
            _mm512_storeu_ps(px.out.add(cb + 16 * v), y);
            let p = pool.add(cb + 16 * v);
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), y));
        }
    }
}

/// im2col of one NCHW sample for a dense k×k conv: `cols` [oh·ow, c·k·k], column order (c, ky, kx)
/// to match OIHW weights; zero outside the image.
pub fn im2col_nchw(input: &[f32], c: usize, g: &ConvGeom, cols: &mut [f32]) {
    let kk = g.k * g.k;
    let row_len = c * kk;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let row = &mut cols[(oy * g.ow + ox) * row_len..][..row_len];
            for ch in 0..c {
                let plane = &input[ch * g.h * g.w..][..g.h * g.w];
                for ky in 0..g.k {
                    let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                    for kx in 0..g.k {
                        let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                        row[ch * kk + ky * g.k + kx] =
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                plane[iy as usize * g.w + ix as usize]
                            } else {
                                0.0
                            };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct NCHW-indexed reference in f64.
    #[test]
    fn depthwise_matches_direct_formula() {
        // 3: portable path; 48 and 144: AVX-512 blocks of 64/32/16 where the CPU has them.
        for c in [3, 48, 144] {
            depthwise_case(c);
        }
    }

    fn depthwise_case(c: usize) {
        let (h, w, k, s) = (7, 6, 5, 2);
        let g = ConvGeom {
            h,
            w,
            k,
            stride: s,
            pad_top: 1,
            pad_left: 2,
            oh: 4,
            ow: 3,
        };
        let input: Vec<f32> = (0..h * w * c)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let wts: Vec<f32> = (0..k * k * c)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let bias: Vec<f32> = (0..c).map(|i| 0.1 * (i % 7) as f32 - 0.3).collect();
        let mut out = vec![0f32; g.oh * g.ow * c];
        let mut pool = vec![0f32; c];
        depthwise_bias_silu(&input, &wts, &bias, &mut out, &mut pool, &g);
        let mut pool_ref = vec![0f64; c];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                for ch in 0..c {
                    let mut a = bias[ch] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - 1;
                            let ix = (ox * s + kx) as isize - 2;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                a += input[(iy as usize * w + ix as usize) * c + ch] as f64
                                    * wts[(ky * k + kx) * c + ch] as f64;
                            }
                        }
                    }
                    let y = a / (1.0 + (-a).exp());
                    pool_ref[ch] += y;
                    let got = out[(oy * g.ow + ox) * c + ch] as f64;
                    assert!((got - y).abs() < 1e-5, "({oy},{ox},{ch}) {got} vs {y}");
                }
            }
        }
        for ch in 0..c {
            assert!((pool[ch] as f64 - pool_ref[ch]).abs() < 1e-4);
        }
    }
}
