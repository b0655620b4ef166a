//! AVX-512 building blocks shared by the CPU kernels: vector exp / SiLU / sigmoid with the same
//! algorithm as the scalar versions in `activation.rs` (Cephes reduction, |rel err| < 4e-7).
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx512f")]
pub fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
        _mm512_set1_ps(88.37),
    );
    let magic = _mm512_set1_ps(12_582_912.0);
    let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
    let n = _mm512_sub_ps(t, magic);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_2e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.000_000_1e-1));
    let e = _mm512_fmadd_ps(
        _mm512_mul_ps(p, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    let bits = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic));
    let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        bits,
        _mm512_set1_epi32(127),
    )));
    _mm512_mul_ps(pow2, e)
}

#[inline]
#[target_feature(enable = "avx512f")]
pub fn silu(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    _mm512_div_ps(
        x,
        _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), x))),
    )
}

/// In-place SiLU over a slice.
#[target_feature(enable = "avx512f")]
pub fn silu_slice(v: &mut [f32]) {
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: c has exactly 16 elements.
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), silu(_mm512_loadu_ps(c.as_ptr()))) };
    }
    for x in chunks.into_remainder() {
        *x = super::activation::silu(*x);
    }
}

/// Φ(x), the standard normal CDF = ½ erfc(−x/√2), with erfc by the Chebyshev fit of Numerical
/// Recipes' `erfcc` (fractional error < 1.2e-7 for every argument, so GELU keeps its relative
/// accuracy in the negative tail where ½(1 + erf) would cancel).
///
/// # Safety
/// The CPU must support AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::excessive_precision)] // the published coefficients, as printed
pub fn normal_cdf(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let z = _mm512_mul_ps(x, _mm512_set1_ps(-std::f32::consts::FRAC_1_SQRT_2));
    let az = _mm512_abs_ps(z);
    let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.5), az, one));
    let mut p = _mm512_set1_ps(0.170_872_77);
    for c in [
        -0.822_152_23f32,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
        -1.265_512_23,
    ] {
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
    }
    let ans = _mm512_mul_ps(t, exp(_mm512_fnmadd_ps(az, az, p)));
    // erfc(z) = ans for z ≥ 0, 2 − ans otherwise.
    let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, _mm512_setzero_ps());
    let erfc = _mm512_mask_sub_ps(ans, neg, _mm512_set1_ps(2.0), ans);
    _mm512_mul_ps(_mm512_set1_ps(0.5), erfc)
}

/// φ(x) = exp(−x²/2)/√(2π), the standard normal density.
///
/// # Safety
/// The CPU must support AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn normal_pdf(x: __m512) -> __m512 {
    let e = exp(_mm512_mul_ps(_mm512_set1_ps(-0.5), _mm512_mul_ps(x, x)));
    _mm512_mul_ps(_mm512_set1_ps(0.398_942_28), e)
}

#[cfg(test)]
mod tests {
    #[test]
    fn vector_normal_cdf_and_pdf_match_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        use std::arch::x86_64::*;
        for i in 0..4000 {
            let x = (i as f32 - 2000.0) * 0.0075; // −15 … 15
                                                  // SAFETY: AVX-512F checked above.
            let (c, p) = unsafe {
                let v = _mm512_set1_ps(x);
                let (mut c, mut p) = ([0f32; 16], [0f32; 16]);
                _mm512_storeu_ps(c.as_mut_ptr(), super::normal_cdf(v));
                _mm512_storeu_ps(p.as_mut_ptr(), super::normal_pdf(v));
                (c[0] as f64, p[0] as f64)
            };
            let xd = x as f64;
            let ce = 0.5 * libm::erfc(-xd * std::f64::consts::FRAC_1_SQRT_2);
            let pe = (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            // Relative, growing as x² (the rounding of x² in f32 moves exp(−x²/2) by ~6e-8·x²),
            // down to 1e-36 (f32's normal range ends at 1.2e-38).
            let tol = |e: f64| {
                if e > 1e-36 {
                    2e-7 * (4.0 + xd * xd) * e
                } else {
                    1e-37
                }
            };
            assert!((c - ce).abs() <= tol(ce), "cdf({x}): {c} vs {ce}");
            assert!((p - pe).abs() <= tol(pe), "pdf({x}): {p} vs {pe}");
        }
    }

    #[test]
    fn vector_silu_matches_scalar_reference() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut v: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.19).collect();
        let orig = v.clone();
        // SAFETY: AVX-512F checked above.
        unsafe { super::silu_slice(&mut v) };
        for (a, x) in v.iter().zip(&orig) {
            let e = *x as f64 / (1.0 + (-*x as f64).exp());
            assert!(
                (*a as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()),
                "{x}: {a} vs {e}"
            );
        }
    }
}
