//! 1 × 1 convolution (and any GEMM with a fixed right-hand side) on NHWC rows:
//! dst[m, n] = [dst[m, n] +] bias[n] + Σ_k a[m, k] · w[n, k], optionally followed by SiLU.
//!
//! The weights are packed once, at model load, into panels of 32 output channels ([panel][k][32],
//! zero-padded), so the hot loop streams one 32-wide weight row per k and broadcasts activations.
//! On CPUs with AVX-512 an 8 × 32 register tile (16 zmm accumulators) runs over row blocks that stay
//! in L1/L2 across panels; elsewhere the `gemm` crate does the product.

use super::activation::{add_bias_rows, silu_inplace};
use super::gemm::{matmul, MatRef};

const NR: usize = 32;

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
/// Rows per block: a block of activations (≤ 64 × 1152 floats) stays in L2 across all panels.
const MB: usize = 64;

pub struct PackedPointwise {
    n: usize,
    k: usize,
    /// [n, k] as given (fallback path).
    w: Vec<f32>,
    bias: Vec<f32>,
    /// [ceil(n/32)][k][32].
    panels: Vec<f32>,
    /// bias zero-padded to a multiple of 32.
    bias_padded: Vec<f32>,
}

impl PackedPointwise {
    /// `w` is [n, k] row-major (OIHW with 1 × 1 spatial, or a dense conv's [out, in·kh·kw]).
    pub fn new(w: &[f32], bias: &[f32], n: usize, k: usize) -> Self {
        assert!(
            w.len() == n * k && bias.len() == n,
            "packed weights: shape mismatch"
        );
        let np = n.div_ceil(NR);
        // Written sequentially panel by panel (each output row read as a 32-row stripe): one pass
        // over the destination instead of 32-float-strided stores across all of it.
        let mut panels: Vec<f32> = Vec::with_capacity(np * k * NR);
        for p in 0..np {
            let rows = (n - p * NR).min(NR);
            for kk in 0..k {
                for j in 0..rows {
                    panels.push(w[(p * NR + j) * k + kk]);
                }
                panels.extend(std::iter::repeat_n(0f32, NR - rows));
            }
        }
        let mut bias_padded = vec![0f32; np * NR];
        bias_padded[..n].copy_from_slice(bias);
        // The row-major copy is only read by the fallback product (CPUs without AVX-512).
        let w = if has_avx512() { Vec::new() } else { w.to_vec() };
        PackedPointwise {
            n,
            k,
            w,
            bias: bias.to_vec(),
            panels,
            bias_padded,
        }
    }

    pub fn out_channels(&self) -> usize {
        self.n
    }

    pub fn in_channels(&self) -> usize {
        self.k
    }

    /// The weights, [n, k] row-major, as given (unpacked from the panels on AVX-512 machines,
    /// where no row-major copy is kept).
    pub fn weights(&self) -> std::borrow::Cow<'_, [f32]> {
        if !self.w.is_empty() || self.n * self.k == 0 {
            return std::borrow::Cow::Borrowed(&self.w);
        }
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for (o, row) in w.chunks_exact_mut(k).enumerate() {
            let (p, j) = (o / NR, o % NR);
            for (kk, v) in row.iter_mut().enumerate() {
                *v = self.panels[(p * k + kk) * NR + j];
            }
        }
        std::borrow::Cow::Owned(w)
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// dst (m × n) = [dst +] a (m × k) · wᵀ + bias, then SiLU if `silu`.
    pub fn forward(&self, a: &[f32], m: usize, dst: &mut [f32], accumulate: bool, silu: bool) {
        let (n, k) = (self.n, self.k);
        assert!(
            a.len() >= m * k && dst.len() >= m * n,
            "pointwise: buffers too short"
        );
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked above); a has ≥ m·k and dst ≥ m·n elements (asserted),
            // panels hold ceil(n/32)·k·32 and bias_padded ceil(n/32)·32 floats; stores are masked to n.
            unsafe { self.forward_avx512(a.as_ptr(), m, dst.as_mut_ptr(), accumulate, silu) };
            return;
        }
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        add_bias_rows(&mut dst[..m * n], &self.bias);
        matmul(
            dst,
            MatRef::rows(a, m, k),
            MatRef::transposed(&self.w, k, n),
            true,
        );
        if silu {
            silu_inplace(&mut dst[..m * n]);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn forward_avx512(
        &self,
        a: *const f32,
        m: usize,
        dst: *mut f32,
        accumulate: bool,
        silu: bool,
    ) {
        let (n, k) = (self.n, self.k);
        let np = n.div_ceil(NR);
        let mut m0 = 0;
        while m0 < m {
            let mb = MB.min(m - m0);
            for p in 0..np {
                let panel = self.panels.as_ptr().add(p * k * NR);
                let bias = self.bias_padded.as_ptr().add(p * NR);
                let (mask0, mask1) = panel_masks((n - p * NR).min(NR));
                let t = Tile {
                    k,
                    lda: k,
                    ldd: n,
                    panel,
                    bias,
                    mask0,
                    mask1,
                    accumulate,
                };
                row_tiles(&t, mb, a.add(m0 * k), k, dst.add(m0 * n + p * NR), n);
            }
            if silu {
                silu_inplace(std::slice::from_raw_parts_mut(dst.add(m0 * n), mb * n));
            }
            m0 += mb;
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Tile {
    k: usize,
    lda: usize,
    ldd: usize,
    panel: *const f32,
    bias: *const f32,
    mask0: u16,
    mask1: u16,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// MR rows × 32 columns: 2·MR zmm accumulators.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run<const MR: usize>(&self, a: *const f32, d: *mut f32) {
        use std::arch::x86_64::*;
        let (mut c0, mut c1) = tile_init::<MR>(
            self.bias,
            d,
            self.ldd,
            self.mask0,
            self.mask1,
            self.accumulate,
        );
        for kk in 0..self.k {
            let w0 = _mm512_loadu_ps(self.panel.add(kk * NR));
            let w1 = _mm512_loadu_ps(self.panel.add(kk * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*a.add(r * self.lda + kk));
                c0[r] = _mm512_fmadd_ps(av, w0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, w1, c1[r]);
            }
        }
        tile_store::<MR>(d, self.ldd, self.mask0, self.mask1, &c0, &c1);
    }
}

#[cfg(target_arch = "x86_64")]
impl RowTile for Tile {
    type A = f32;
    unsafe fn tile<const MR: usize>(&self, a: *const f32, d: *mut f32) {
        self.run::<MR>(a, d)
    }
}

/// Lane masks of the two 16-lane halves of a 32-column panel with `cols` valid columns.
#[cfg(target_arch = "x86_64")]
pub(crate) fn panel_masks(cols: usize) -> (u16, u16) {
    let half = |c: usize| {
        if c >= 16 {
            0xFFFFu16
        } else {
            ((1u32 << c) - 1) as u16
        }
    };
    (half(cols.min(16)), half(cols.saturating_sub(16)))
}

/// Accumulators of an MR × 32 tile: the bias, plus the tile of `d` when accumulating.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn tile_init<const MR: usize>(
    bias: *const f32,
    d: *const f32,
    ldd: usize,
    mask0: u16,
    mask1: u16,
    accumulate: bool,
) -> (
    [std::arch::x86_64::__m512; MR],
    [std::arch::x86_64::__m512; MR],
) {
    use std::arch::x86_64::*;
    let mut c0 = [_mm512_loadu_ps(bias); MR];
    let mut c1 = [_mm512_loadu_ps(bias.add(16)); MR];
    if accumulate {
        for r in 0..MR {
            c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(mask0, d.add(r * ldd)));
            c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(mask1, d.add(r * ldd + 16)));
        }
    }
    (c0, c1)
}

/// Stores an MR × 32 tile, masked to the panel's valid columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn tile_store<const MR: usize>(
    d: *mut f32,
    ldd: usize,
    mask0: u16,
    mask1: u16,
    c0: &[std::arch::x86_64::__m512; MR],
    c1: &[std::arch::x86_64::__m512; MR],
) {
    use std::arch::x86_64::*;
    for r in 0..MR {
        _mm512_mask_storeu_ps(d.add(r * ldd), mask0, c0[r]);
        _mm512_mask_storeu_ps(d.add(r * ldd + 16), mask1, c1[r]);
    }
}

/// An MR × 32 register tile over rows of `A` (f32 values or bf16 pairs).
#[cfg(target_arch = "x86_64")]
pub(crate) trait RowTile {
    type A;
    /// # Safety
    /// `a` holds MR rows and `d` MR rows of the tile's leading dimensions; the CPU has the
    /// features the implementation needs.
    unsafe fn tile<const MR: usize>(&self, a: *const Self::A, d: *mut f32);
}

/// Runs `t` over an `mb`-row block: tiles of 8 rows, then one tile of the remaining rows.
///
/// # Safety
/// As `RowTile::tile`, for all `mb` rows (`a` rows `lda` apart, `d` rows `ldd` apart).
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn row_tiles<T: RowTile>(
    t: &T,
    mb: usize,
    a: *const T::A,
    lda: usize,
    d: *mut f32,
    ldd: usize,
) {
    let mut r = 0;
    while r + 8 <= mb {
        t.tile::<8>(a.add(r * lda), d.add(r * ldd));
        r += 8;
    }
    let (ap, dp) = (a.add(r * lda), d.add(r * ldd));
    match mb - r {
        1 => t.tile::<1>(ap, dp),
        2 => t.tile::<2>(ap, dp),
        3 => t.tile::<3>(ap, dp),
        4 => t.tile::<4>(ap, dp),
        5 => t.tile::<5>(ap, dp),
        6 => t.tile::<6>(ap, dp),
        7 => t.tile::<7>(ap, dp),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_for_every_tail() {
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (13, 24, 7),
            (70, 40, 33),
            (9, 112, 672),
            (65, 1280, 20),
            (8, 16, 96),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31 % 19) as f32 - 9.0) / 8.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 17 % 23) as f32 - 11.0) / 16.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.1).collect();
            let p = PackedPointwise::new(&w, &bias, n, k);
            for (accumulate, silu) in [(false, false), (true, false), (false, true)] {
                let init: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32 - 2.0).collect();
                let mut d = init.clone();
                d.push(123.0); // a guard element past the end must stay untouched
                p.forward(&a, m, &mut d, accumulate, silu);
                assert_eq!(d[m * n], 123.0);
                for i in 0..m {
                    for j in 0..n {
                        let mut e: f64 = bias[j] as f64
                            + (0..k)
                                .map(|t| a[i * k + t] as f64 * w[j * k + t] as f64)
                                .sum::<f64>();
                        if accumulate {
                            e += init[i * n + j] as f64;
                        }
                        if silu {
                            e /= 1.0 + (-e).exp();
                        }
                        let got = d[i * n + j] as f64;
                        assert!(
                            (got - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "m{m} n{n} k{k} ({i},{j}): {got} vs {e}"
                        );
                    }
                }
            }
        }
    }
}
