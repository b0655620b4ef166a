//! Opt-in bf16 variant of the packed 1 × 1 convolution / GEMM of `pointwise.rs`:
//! dst[m, n] = [dst[m, n] +] bias[n] + Σ_k bf16(a[m, k]) · bf16(w[n, k]), optionally followed by SiLU.
//!
//! Uses the stable `std::arch::x86_64` AVX512_BF16 intrinsics (`_mm512_dpbf16_ps`,
//! `_mm512_cvtne2ps_pbh`; stable since Rust 1.89): k is processed in pairs. The weights are rounded
//! to bf16 (round-to-nearest-even) once, at construction, and packed as pairs into panels of 32
//! output channels, [ceil(n/32)][ceil(k/2)][32 lanes][2]; each block of up to 64 activation rows is
//! converted to bf16 pairs once (`vcvtne2ps2bf16`, RNE) and reused across all panels. Odd k is padded
//! with a zero. Products of two bf16 values are exact in f32 and accumulate in f32; bias, the residual
//! (accumulate) and SiLU are applied in f32 exactly as in the f32 kernel. Same 8 × 32 register tile.
//!
//! AMX tiles are not used: their intrinsics are nightly-only in Rust and Linux requires an
//! `arch_prctl(ARCH_REQ_XCOMP_PERM)` permission request per process.
//!
//! Construction fails with `Error::Unsupported` on CPUs (or targets) without AVX512_BF16, so a
//! `PackedPointwiseBf16` only exists where its kernel can run.

use super::pointwise::PackedPointwise;
#[cfg(target_arch = "x86_64")]
use super::pointwise::{panel_masks, row_tiles, tile_init, tile_store, RowTile};
use crate::error::{Error, Result};
#[cfg(target_arch = "x86_64")]
use std::cell::RefCell;

const NR: usize = 32;
/// Rows per block (as in the f32 kernel).
const MB: usize = 64;

/// f32 → bf16 bits, round to nearest even (NaN stays a quiet NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Whether this CPU can run the bf16 kernel.
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub struct PackedPointwiseBf16 {
    n: usize,
    k: usize,
    /// ceil(k / 2).
    k2: usize,
    /// [ceil(n/32)][k2][32] bf16 pairs; low half = even k, high half = odd k (zero past k).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    panels: Vec<u32>,
    /// bias zero-padded to a multiple of 32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    bias_padded: Vec<f32>,
}

impl PackedPointwiseBf16 {
    /// `w` is [n, k] row-major. Fails with `Error::Unsupported` without AVX512_BF16.
    pub fn new(w: &[f32], bias: &[f32], n: usize, k: usize) -> Result<Self> {
        if !bf16_supported() {
            return Err(Error::Unsupported(
                "bf16 precision needs a CPU with AVX512_BF16 (e.g. Intel Sapphire Rapids or AMD Zen 4); use f32".into(),
            ));
        }
        if w.len() != n * k || bias.len() != n {
            return Err(Error::Shape(format!(
                "bf16 pointwise: weights have {} values and bias {}, expected {n}·{k} and {n}",
                w.len(),
                bias.len()
            )));
        }
        let (np, k2) = (n.div_ceil(NR), k.div_ceil(2));
        let mut panels = vec![0u32; np * k2 * NR];
        for o in 0..n {
            let (p, j) = (o / NR, o % NR);
            for t in 0..k2 {
                let lo = f32_to_bf16(w[o * k + 2 * t]) as u32;
                let hi = if 2 * t + 1 < k {
                    f32_to_bf16(w[o * k + 2 * t + 1]) as u32
                } else {
                    0
                };
                panels[(p * k2 + t) * NR + j] = lo | (hi << 16);
            }
        }
        let mut bias_padded = vec![0f32; np * NR];
        bias_padded[..n].copy_from_slice(bias);
        Ok(PackedPointwiseBf16 {
            n,
            k,
            k2,
            panels,
            bias_padded,
        })
    }

    pub fn from_f32(p: &PackedPointwise) -> Result<Self> {
        Self::new(&p.weights(), p.bias(), p.out_channels(), p.in_channels())
    }

    pub fn out_channels(&self) -> usize {
        self.n
    }

    pub fn in_channels(&self) -> usize {
        self.k
    }

    /// dst (m × n) = [dst +] bf16(a) (m × k) · bf16(w)ᵀ + bias, then SiLU if `silu`.
    pub fn forward(&self, a: &[f32], m: usize, dst: &mut [f32], accumulate: bool, silu: bool) {
        let (n, k) = (self.n, self.k);
        assert!(
            a.len() >= m * k && dst.len() >= m * n,
            "pointwise bf16: buffers too short"
        );
        #[cfg(target_arch = "x86_64")]
        A_BF16.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < MB * self.k2 {
                buf.resize(MB * self.k2, 0);
            }
            // SAFETY: construction checked AVX512F + AVX512_BF16; a has ≥ m·k and dst ≥ m·n elements
            // (asserted); buf holds MB·k2 pairs; panels hold ceil(n/32)·k2·32 pairs and bias_padded
            // ceil(n/32)·32 floats; loads of a and stores to dst are masked to k and n.
            unsafe {
                self.forward_avx512bf16(
                    a.as_ptr(),
                    m,
                    dst.as_mut_ptr(),
                    accumulate,
                    silu,
                    buf.as_mut_ptr(),
                )
            };
        });
        #[cfg(not(target_arch = "x86_64"))]
        {
            // Unreachable: `new` fails off x86_64. Kept total rather than panicking.
            let _ = (a, m, dst, accumulate, silu);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn forward_avx512bf16(
        &self,
        a: *const f32,
        m: usize,
        dst: *mut f32,
        accumulate: bool,
        silu: bool,
        abuf: *mut u32,
    ) {
        use super::activation::silu_inplace;
        let (n, k2) = (self.n, self.k2);
        let np = n.div_ceil(NR);
        let mut m0 = 0;
        while m0 < m {
            let mb = MB.min(m - m0);
            for r in 0..mb {
                pack_row(a.add((m0 + r) * self.k), self.k, abuf.add(r * k2));
            }
            for p in 0..np {
                let panel = self.panels.as_ptr().add(p * k2 * NR);
                let bias = self.bias_padded.as_ptr().add(p * NR);
                let (mask0, mask1) = panel_masks((n - p * NR).min(NR));
                let t = Tile {
                    k2,
                    ldd: n,
                    panel,
                    bias,
                    mask0,
                    mask1,
                    accumulate,
                };
                row_tiles(&t, mb, abuf as *const u32, k2, dst.add(m0 * n + p * NR), n);
            }
            if silu {
                silu_inplace(std::slice::from_raw_parts_mut(dst.add(m0 * n), mb * n));
            }
            m0 += mb;
        }
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per-thread bf16 copy of one block of activation rows, [MB][k2] pairs.
    static A_BF16: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Converts one row of k floats to ceil(k/2) bf16 pairs (RNE), the odd tail padded with zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_row(src: *const f32, k: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i < k {
        let rem = k - i;
        let (lo, hi) = if rem >= 32 {
            (
                _mm512_loadu_ps(src.add(i)),
                _mm512_loadu_ps(src.add(i + 16)),
            )
        } else {
            let m0 = if rem >= 16 {
                0xFFFFu16
            } else {
                ((1u32 << rem) - 1) as u16
            };
            let m1 = if rem <= 16 {
                0
            } else {
                ((1u32 << (rem - 16)) - 1) as u16
            };
            (
                _mm512_maskz_loadu_ps(m0, src.add(i)),
                _mm512_maskz_loadu_ps(m1, src.add(i + 16)),
            )
        };
        // Lower 16 bf16 from `lo`, upper 16 from `hi`: element order is preserved, so 32-bit lane j
        // holds the pair (src[i + 2j], src[i + 2j + 1]).
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        let pairs = rem.min(32).div_ceil(2);
        let mask = if pairs >= 16 {
            0xFFFFu16
        } else {
            ((1u32 << pairs) - 1) as u16
        };
        _mm512_mask_storeu_epi32(dst.add(i / 2) as *mut _, mask, v);
        i += 32;
    }
}

#[cfg(target_arch = "x86_64")]
struct Tile {
    k2: usize,
    ldd: usize,
    panel: *const u32,
    bias: *const f32,
    mask0: u16,
    mask1: u16,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// MR rows × 32 columns: 2·MR zmm f32 accumulators, one `vdpbf16ps` per (row, half, k pair).
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn run<const MR: usize>(&self, a: *const u32, d: *mut f32) {
        use std::arch::x86_64::*;
        let (mut c0, mut c1) = tile_init::<MR>(
            self.bias,
            d,
            self.ldd,
            self.mask0,
            self.mask1,
            self.accumulate,
        );
        for t in 0..self.k2 {
            let w0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(self.panel.add(t * NR) as *const _));
            let w1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(self.panel.add(t * NR + 16) as *const _));
            for r in 0..MR {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(r * self.k2 + t) as i32));
                c0[r] = _mm512_dpbf16_ps(c0[r], av, w0);
                c1[r] = _mm512_dpbf16_ps(c1[r], av, w1);
            }
        }
        tile_store::<MR>(d, self.ldd, self.mask0, self.mask1, &c0, &c1);
    }
}

#[cfg(target_arch = "x86_64")]
impl RowTile for Tile {
    type A = u32;
    unsafe fn tile<const MR: usize>(&self, a: *const u32, d: *mut f32) {
        self.run::<MR>(a, d)
    }
}

/// A 1 × 1 conv with its f32 packing and, when bf16 precision is selected, a bf16 packing;
/// `forward` runs the bf16 kernel when that packing exists.
pub struct Pointwise {
    pub f32: PackedPointwise,
    bf16: Option<PackedPointwiseBf16>,
}

impl Pointwise {
    pub fn new(f32: PackedPointwise) -> Self {
        Pointwise { f32, bf16: None }
    }

    /// Builds (true) or drops (false) the bf16 packing. Fails with `Error::Unsupported` without AVX512_BF16.
    pub fn set_bf16(&mut self, on: bool) -> Result<()> {
        if !on {
            self.bf16 = None;
        } else if self.bf16.is_none() {
            self.bf16 = Some(PackedPointwiseBf16::from_f32(&self.f32)?);
        }
        Ok(())
    }

    pub fn is_bf16(&self) -> bool {
        self.bf16.is_some()
    }

    pub fn forward(&self, a: &[f32], m: usize, dst: &mut [f32], accumulate: bool, silu: bool) {
        match &self.bf16 {
            Some(b) => b.forward(a, m, dst, accumulate, silu),
            None => self.f32.forward(a, m, dst, accumulate, silu),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(bf16_to_f32(f32_to_bf16(-2.5)), -2.5);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: ties to even (1 + 2⁻⁶).
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)),
            1.0 + 1.0 / 64.0
        );
        // Just above the halfway point rounds up.
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0)),
            1.0 + 1.0 / 128.0
        );
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }

    #[test]
    fn unsupported_cpu_errors_instead_of_crashing() {
        let r = PackedPointwiseBf16::new(&[1.0; 6], &[0.0; 2], 2, 3);
        match (bf16_supported(), r) {
            (true, Ok(p)) => assert_eq!((p.out_channels(), p.in_channels()), (2, 3)),
            (false, Err(Error::Unsupported(m))) => assert!(m.contains("AVX512_BF16"), "{m}"),
            (s, r) => panic!("supported {s}, construction {:?}", r.err()),
        }
        if bf16_supported() {
            assert!(matches!(
                PackedPointwiseBf16::new(&[1.0; 5], &[0.0; 2], 2, 3),
                Err(Error::Shape(_))
            ));
        }
    }

    #[test]
    fn matches_f64_reference_of_rounded_inputs() {
        if !bf16_supported() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let r = |x: f32| bf16_to_f32(f32_to_bf16(x)) as f64;
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (13, 24, 7),
            (70, 40, 33),
            (9, 112, 672),
            (65, 1280, 20),
            (8, 16, 96),
            (3, 32, 45),
        ] {
            // Values that are not exactly representable in bf16, so rounding matters.
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31 % 19) as f32 - 9.0) / 7.0 + (i % 13) as f32 * 1e-3)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 17 % 23) as f32 - 11.0) / 13.0 + (i % 7) as f32 * 7e-4)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.1).collect();
            let p = PackedPointwiseBf16::new(&w, &bias, n, k).unwrap_or_else(|e| panic!("{e}"));
            let mut rounding_mattered = false;
            for (accumulate, silu) in [(false, false), (true, false), (false, true)] {
                let init: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32 - 2.0).collect();
                let mut d = init.clone();
                d.push(123.0); // a guard element past the end must stay untouched
                p.forward(&a, m, &mut d, accumulate, silu);
                assert_eq!(d[m * n], 123.0);
                for i in 0..m {
                    for j in 0..n {
                        let (mut e, mut exact, mut mag) =
                            (bias[j] as f64, bias[j] as f64, bias[j].abs() as f64);
                        for t in 0..k {
                            let (x, y) = (a[i * k + t], w[j * k + t]);
                            e += r(x) * r(y);
                            exact += x as f64 * y as f64;
                            mag += (x as f64 * y as f64).abs();
                        }
                        if accumulate {
                            e += init[i * n + j] as f64;
                            exact += init[i * n + j] as f64;
                            mag += init[i * n + j].abs() as f64;
                        }
                        if silu {
                            e /= 1.0 + (-e).exp();
                            exact /= 1.0 + (-exact).exp();
                        }
                        let got = d[i * n + j] as f64;
                        // f32 accumulation of exact bf16 products.
                        assert!(
                            (got - e).abs() <= 1e-5 * (1.0 + mag),
                            "m{m} n{n} k{k} ({i},{j}): {got} vs rounded-input {e}"
                        );
                        // bf16 input rounding: relative 2⁻⁹ per factor, ~4e-3 of Σ|a·w| at worst.
                        assert!(
                            (got - exact).abs() <= 1e-2 * (1.0 + mag),
                            "m{m} n{n} k{k} ({i},{j}): {got} vs exact {exact}"
                        );
                        rounding_mattered |= (e - exact).abs() > 1e-5 * (1.0 + mag);
                    }
                }
            }
            assert!(
                k < 8 || rounding_mattered,
                "m{m} n{n} k{k}: inputs were exact in bf16, the test proves nothing"
            );
        }
    }

    #[test]
    fn dispatch_follows_the_selected_precision() {
        if !bf16_supported() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let (n, k, m) = (4, 3, 2);
        let w = vec![1.0 + 1.0 / 512.0; n * k]; // rounds to 1.0 in bf16
        let a = vec![1.0f32; m * k];
        let mut p = Pointwise::new(PackedPointwise::new(&w, &[0.0; 4], n, k));
        let mut d = vec![0f32; m * n];
        p.forward(&a, m, &mut d, false, false);
        assert!(
            d.iter()
                .all(|&v| (v - 3.0 * (1.0 + 1.0 / 512.0)).abs() < 1e-6),
            "{d:?}"
        );
        p.set_bf16(true).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.is_bf16());
        p.forward(&a, m, &mut d, false, false);
        assert!(d.iter().all(|&v| v == 3.0), "{d:?}");
        p.set_bf16(false).unwrap_or_else(|e| panic!("{e}"));
        p.forward(&a, m, &mut d, false, false);
        assert!(
            d.iter()
                .all(|&v| (v - 3.0 * (1.0 + 1.0 / 512.0)).abs() < 1e-6),
            "{d:?}"
        );
    }
}
