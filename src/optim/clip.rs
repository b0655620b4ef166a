//! Gradient clipping as torch.nn.utils.clip_grad_norm_ / clip_grad_value_.

use super::{run_items, CHUNK, PARALLEL_MIN_ELEMS};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Scales `grads` in place so that their joint `norm_type`-norm is at most `max_norm`, and returns
/// the norm before clipping, as torch.nn.utils.clip_grad_norm_:
/// `coef = min(1, max_norm / (total + 1e-6))`, every gradient multiplied by `coef`.
///
/// `norm_type` is any p > 0 or `f64::INFINITY` (max |g|). The norm is accumulated in f64 (torch
/// accumulates in f32) and returned as f64; the coefficient is then formed in f32 from the norm
/// rounded to f32, as torch does (`reciprocal(total + 1e-6) · max_norm`, NaN kept).
/// A non-finite norm is an `Error::NonFinite` naming the first non-finite gradient element when
/// `error_if_nonfinite`; otherwise the gradients are scaled by the (NaN or 0) coefficient as in torch.
pub fn clip_grad_norm(
    grads: &mut [&mut [f32]],
    max_norm: f64,
    norm_type: f64,
    error_if_nonfinite: bool,
) -> Result<f64> {
    if norm_type.is_nan() || norm_type <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "clip_grad_norm: norm_type must be > 0 or infinity, got {norm_type}"
        )));
    }
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "clip_grad_norm: max_norm must be >= 0, got {max_norm}"
        )));
    }
    let total = total_norm(grads, norm_type);
    if !total.is_finite() && error_if_nonfinite {
        let culprit = grads
            .iter()
            .enumerate()
            .find_map(|(i, g)| {
                g.iter()
                    .position(|v| !v.is_finite())
                    .map(|j| format!("gradient #{i} element {j} is {}", g[j]))
            })
            .unwrap_or_else(|| "no element is non-finite; the norm overflowed".to_string());
        return Err(Error::NonFinite(format!(
            "clip_grad_norm: the total norm of order {norm_type} is {total} ({culprit})"
        )));
    }
    let recip = 1.0f32 / (total as f32 + 1e-6f32);
    let coef = recip * max_norm as f32;
    let coef = if coef.is_nan() { coef } else { coef.min(1.0) };
    if coef != 1.0 {
        for_each_chunk(grads, |c| c.iter_mut().for_each(|v| *v *= coef));
    }
    Ok(total)
}

/// Clamps every gradient element to [−clip, clip] in place, as torch.nn.utils.clip_grad_value_
/// (`clamp(min=−clip, max=clip)`: NaN stays NaN; a negative `clip` sets everything to `clip`).
pub fn clip_grad_value(grads: &mut [&mut [f32]], clip: f64) {
    let (lo, hi) = (-clip as f32, clip as f32);
    for_each_chunk(grads, |c| {
        for v in c.iter_mut() {
            let t = if *v < lo { lo } else { *v };
            *v = if t > hi { hi } else { t };
        }
    });
}

fn for_each_chunk(grads: &mut [&mut [f32]], f: impl Fn(&mut [f32]) + Sync + Send) {
    let total: usize = grads.iter().map(|g| g.len()).sum();
    let items: Vec<&mut [f32]> = grads.iter_mut().flat_map(|g| g.chunks_mut(CHUNK)).collect();
    run_items(items, total, f);
}

/// The joint norm over every gradient, from per-chunk partials combined in a fixed order (the
/// same bits serially and in parallel).
fn total_norm(grads: &[&mut [f32]], p: f64) -> f64 {
    let total: usize = grads.iter().map(|g| g.len()).sum();
    let chunks: Vec<&[f32]> = grads.iter().flat_map(|g| g.chunks(CHUNK)).collect();
    let partial = |c: &[f32]| -> f64 {
        if p == f64::INFINITY {
            max_abs(c)
        } else if p == 2.0 {
            sum_squares(c)
        } else if p == 1.0 {
            c.iter().map(|v| (*v as f64).abs()).sum()
        } else {
            c.iter().map(|v| (*v as f64).abs().powf(p)).sum()
        }
    };
    let partials: Vec<f64> = if total >= PARALLEL_MIN_ELEMS && crate::threads::num_threads() > 1 {
        crate::threads::install(|| chunks.par_iter().map(|c| partial(c)).collect())
    } else {
        chunks.iter().map(|c| partial(c)).collect()
    };
    if p == f64::INFINITY {
        partials.iter().fold(0.0, |m: f64, &v| {
            if v.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(v)
            }
        })
    } else if p == 2.0 {
        partials.iter().sum::<f64>().sqrt()
    } else if p == 1.0 {
        partials.iter().sum()
    } else {
        partials.iter().sum::<f64>().powf(1.0 / p)
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            let v = *v as f64;
            *a += v * v;
        }
    }
    let tail: f64 = it
        .remainder()
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum();
    acc.iter().sum::<f64>() + tail
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn max_abs(x: &[f32]) -> f64 {
    let mut m = 0f32;
    let mut nan = false;
    for v in x {
        m = m.max(v.abs());
        nan |= v.is_nan();
    }
    if nan {
        f64::NAN
    } else {
        m as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_closed_forms() {
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![-4.0f32];
        let n2 = clip_grad_norm(&mut [&mut a, &mut b], 10.0, 2.0, true).unwrap();
        assert_eq!(n2, 5.0);
        assert_eq!((a[0], b[0]), (3.0, -4.0)); // coef clamped to 1: untouched
        let n1 = clip_grad_norm(&mut [&mut a, &mut b], 1e9, 1.0, true).unwrap();
        assert_eq!(n1, 7.0);
        let n3 = clip_grad_norm(&mut [&mut a, &mut b], 1e9, 3.0, true).unwrap();
        assert!((n3 - 91f64.cbrt()).abs() < 1e-12);
        let ninf = clip_grad_norm(&mut [&mut a, &mut b], 2.0, f64::INFINITY, true).unwrap();
        assert_eq!(ninf, 4.0);
        assert!(
            (b[0] + 2.0).abs() < 1e-5 && (a[0] - 1.5).abs() < 1e-5,
            "{a:?} {b:?}"
        );
    }

    #[test]
    fn bad_norm_type_is_rejected() {
        let mut a = vec![1.0f32];
        for p in [0.0, -2.0, f64::NAN] {
            assert!(matches!(
                clip_grad_norm(&mut [&mut a], 1.0, p, false),
                Err(Error::InvalidArgument(m)) if m.contains("norm_type")
            ));
        }
    }

    #[test]
    fn nan_without_error_poisons_like_torch() {
        let mut a = vec![1.0f32, f32::NAN];
        let n = clip_grad_norm(&mut [&mut a], 1.0, 2.0, false).unwrap();
        assert!(n.is_nan() && a.iter().all(|v| v.is_nan()));
        let mut b = vec![1.0f32, f32::INFINITY];
        let n = clip_grad_norm(&mut [&mut b], 1.0, 2.0, false).unwrap();
        assert!(n.is_infinite() && b[0] == 0.0 && b[1].is_nan());
    }

    #[test]
    fn value_clip_keeps_nan_and_handles_negative_clip() {
        let mut a = vec![-2.0f32, 0.25, 3.0, f32::NAN];
        clip_grad_value(&mut [&mut a], 0.5);
        assert_eq!(&a[..3], &[-0.5, 0.25, 0.5]);
        assert!(a[3].is_nan());
        let mut b = vec![-2.0f32, 1.0];
        clip_grad_value(&mut [&mut b], -1.0);
        assert_eq!(b, [-1.0, -1.0]);
    }

    /// Large inputs go through the chunked parallel path and give the serial sum's value.
    #[test]
    fn large_norm_matches_direct_sum() {
        let mut g: Vec<f32> = (0..400_003)
            .map(|i| ((i % 17) as f32 - 8.0) * 0.125)
            .collect();
        let direct: f64 = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let n = clip_grad_norm(&mut [&mut g], 1.0, 2.0, false).unwrap();
        assert!((n - direct).abs() <= 1e-12 * direct);
        let after: f64 = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }
}
