//! Activations on f32 slices. `exp` is a branch-free polynomial (Cephes `expf` reduction, relative
//! error < 2e-7 over the clamped range) so loops over it vectorise; the loops are compiled per CPU
//! (AVX-512 / AVX2+FMA / baseline) and chosen at run time.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two for an exact reduction (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x, vectorisable: no float→int conversion and no branch (the integer part is read from the
/// mantissa of x·log2(e) + 1.5·2²³). Inputs are clamped to [−87.3, 88.37] (e^x stays a normal f32).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.max(-87.3).min(88.37);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC; // round-to-nearest(x · log2 e)
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes expf polynomial: e^r = 1 + r + r²·P(r), |r| ≤ ln2/2.
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // 2^n: the low mantissa bits of t hold n + 2^22 (two's complement offset); shift into the exponent.
    let pow2 = f32::from_bits((t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23);
    pow2 * e
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

pub fn silu_inplace(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        unsafe { super::avx512::silu_slice(v) };
        return;
    }
    silu_inplace_portable(v)
}

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn silu_inplace_portable(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = silu(*x);
    }
}

/// v[r, c] += bias[c].
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+fma+avx2",
    "x86_64+avx2+fma"
))]
pub fn add_bias_rows(v: &mut [f32], bias: &[f32]) {
    let c = bias.len();
    for row in v.chunks_exact_mut(c) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += *b;
        }
    }
}

/// v[r, c] *= scale[c].
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+fma+avx2",
    "x86_64+avx2+fma"
))]
pub fn scale_rows(v: &mut [f32], scale: &[f32]) {
    let c = scale.len();
    for row in v.chunks_exact_mut(c) {
        for (x, s) in row.iter_mut().zip(scale) {
            *x *= *s;
        }
    }
}

/// pool[c] += Σ_r v[r, c].
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+fma+avx2",
    "x86_64+avx2+fma"
))]
pub fn sum_rows(v: &[f32], pool: &mut [f32]) {
    let c = pool.len();
    for row in v.chunks_exact(c) {
        for (p, x) in pool.iter_mut().zip(row) {
            *p += *x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let r = (x as f64).exp();
            let e = ((exp(x) as f64 - r) / r).abs();
            worst = worst.max(e);
            x += 0.001_7;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(1000.0).is_finite());
        assert!((silu(-100.0)).abs() < 1e-30 && silu(100.0) == 100.0);
    }
}
