//! GELU (exact, erf form), GEGLU and the sinusoidal timestep embedding of the diffusion U-Net.

use crate::autograd::{Buf, Float, Tape, Var};
use crate::error::{Error, Result};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)) (torch `approximate="none"`), evaluated in f64.
#[inline]
fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// dGELU/dx = Φ(x) + x·φ(x).
#[inline]
fn gelu_grad_f64(x: f64) -> f64 {
    let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
    cdf + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
}

#[inline]
fn gelu_t<T: Float>(x: T) -> T {
    T::from_f64(gelu_f64(x.to_f64()))
}

#[inline]
fn gelu_grad_t<T: Float>(x: T) -> T {
    T::from_f64(gelu_grad_f64(x.to_f64()))
}

/// f32 on AVX-512: GEGLU rows (forward `o = a·g·Φ(g)`, or backward when `dy` is given:
/// `da = dy·g·Φ(g)`, `db = dy·a·(Φ(g) + g·φ(g))`), each row [a | g] of 2d values. False (nothing
/// done) otherwise; the scalar f64 path then runs.
fn geglu_rows_f32<T: Float>(x: &[T], d: usize, out: &mut [T], dy: Option<&[T]>) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        use crate::ops::conv::{as_f32, as_f32_mut};
        if let (Some(x), Some(out)) = (as_f32(x), as_f32_mut(out)) {
            let dy = match dy.map(as_f32) {
                Some(None) => return false,
                Some(Some(v)) => Some(v),
                None => None,
            };
            // SAFETY: AVX-512F checked; slice lengths are checked inside.
            unsafe { geglu_avx512(x, d, out, dy) };
            return true;
        }
    }
    let _ = (x, d, out, dy);
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn geglu_avx512(x: &[f32], d: usize, out: &mut [f32], dy: Option<&[f32]>) {
    use crate::backend::cpu::avx512::{normal_cdf, normal_pdf};
    use std::arch::x86_64::*;
    let rows = x.len() / (2 * d);
    assert!(x.len() == rows * 2 * d);
    assert!(out.len() == if dy.is_some() { rows * 2 * d } else { rows * d });
    assert!(dy.is_none_or(|v| v.len() == rows * d));
    for r in 0..rows {
        let (a, g) = (x.as_ptr().add(r * 2 * d), x.as_ptr().add(r * 2 * d + d));
        let mut j = 0;
        while j < d {
            let m: u16 = if d - j >= 16 {
                0xFFFF
            } else {
                ((1u32 << (d - j)) - 1) as u16
            };
            let av = _mm512_maskz_loadu_ps(m, a.add(j));
            let gv = _mm512_maskz_loadu_ps(m, g.add(j));
            let cdf = normal_cdf(gv);
            match dy {
                None => {
                    let o = _mm512_mul_ps(av, _mm512_mul_ps(gv, cdf));
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(r * d + j), m, o);
                }
                Some(dy) => {
                    let dv = _mm512_maskz_loadu_ps(m, dy.as_ptr().add(r * d + j));
                    let da = _mm512_mul_ps(dv, _mm512_mul_ps(gv, cdf));
                    let grad = _mm512_fmadd_ps(gv, normal_pdf(gv), cdf);
                    let dg = _mm512_mul_ps(_mm512_mul_ps(dv, av), grad);
                    let o = out.as_mut_ptr().add(r * 2 * d + j);
                    _mm512_mask_storeu_ps(o, m, da);
                    _mm512_mask_storeu_ps(o.add(d), m, dg);
                }
            }
            j += 16;
        }
    }
}

/// y = GELU(x), exact (erf) form.
pub fn gelu<T: Float>(tape: &mut Tape<T>, x: &Var) -> Var {
    let xv = tape.value(x);
    let mut out = Buf::alloc(xv.len());
    out.par_chunks_mut(CHUNK)
        .zip(xv.par_chunks(CHUNK))
        .for_each(|(o, xs)| o.iter_mut().zip(xs).for_each(|(o, &v)| *o = gelu_t(v)));
    let xid = x.id();
    let need = tape.requires_grad(x);
    tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.par_chunks_mut(CHUNK)
                .zip(xv.par_chunks(CHUNK))
                .for_each(|(d, xs)| {
                    d.iter_mut()
                        .zip(xs)
                        .for_each(|(d, &v)| *d *= gelu_grad_t(v))
                });
            gr.add(xid, d);
        }
        Ok(())
    })
}

/// GEGLU: x [..., 2D] → x[..., :D] · GELU(x[..., D:]) [..., D] (MONAI / diffusers `GEGLU`:
/// `hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate)`; this op takes the projection).
pub fn geglu<T: Float>(tape: &mut Tape<T>, x: &Var) -> Result<Var> {
    let xs = x.shape();
    let two_d = xs.last().copied().unwrap_or(0);
    if xs.is_empty() || two_d == 0 || two_d % 2 != 0 {
        return Err(Error::Shape(format!(
            "geglu: last axis must be even and non-zero, got {xs:?}"
        )));
    }
    let d = two_d / 2;
    let rows = x.numel() / two_d;
    let rows_per = (CHUNK / two_d).max(1);
    let xv = tape.value(x);
    let mut out = Buf::alloc(rows * d);
    out.par_chunks_mut(rows_per * d)
        .zip(xv.par_chunks(rows_per * two_d))
        .for_each(|(o, xs)| {
            if geglu_rows_f32(xs, d, o, None) {
                return;
            }
            for (or, xr) in o.chunks_exact_mut(d).zip(xs.chunks_exact(two_d)) {
                let (a, g) = xr.split_at(d);
                for ((o, &a), &g) in or.iter_mut().zip(a).zip(g) {
                    *o = a * gelu_t(g);
                }
            }
        });
    let mut shape = xs.to_vec();
    shape[xs.len() - 1] = d;
    let xid = x.id();
    let need = tape.requires_grad(x);
    Ok(tape.push(&shape, out, need, move |out_id, gr| {
        if let Some(dy) = gr.take(out_id) {
            let mut dx = Buf::alloc(rows * two_d);
            dx.par_chunks_mut(rows_per * two_d)
                .zip(
                    xv.par_chunks(rows_per * two_d)
                        .zip(dy.par_chunks(rows_per * d)),
                )
                .for_each(|(dxs, (xs, dys))| {
                    if geglu_rows_f32(xs, d, dxs, Some(dys)) {
                        return;
                    }
                    for ((dxr, xr), dyr) in dxs
                        .chunks_exact_mut(two_d)
                        .zip(xs.chunks_exact(two_d))
                        .zip(dys.chunks_exact(d))
                    {
                        let (a, g) = xr.split_at(d);
                        let (da, dg) = dxr.split_at_mut(d);
                        for j in 0..d {
                            let gv = g[j].to_f64();
                            da[j] = dyr[j] * T::from_f64(gelu_f64(gv));
                            dg[j] = dyr[j] * a[j] * T::from_f64(gelu_grad_f64(gv));
                        }
                    }
                });
            gr.add(xid, dx);
        }
        Ok(())
    }))
}

/// Sinusoidal timestep embedding [t.len(), dim] (MONAI `get_timestep_embedding`): half = dim / 2,
/// freqs_i = exp(−ln(max_period)·i / half), emb = [cos(t·freqs), sin(t·freqs)], a zero column
/// appended for odd `dim`. Computed in f64 (MONAI computes in f32). A constant: not on the tape.
pub fn timestep_embedding<T: Float>(t: &[f64], dim: usize, max_period: f64) -> Vec<T> {
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (-max_period.ln() * i as f64 / half as f64).exp())
        .collect();
    let mut out = vec![T::ZERO; t.len() * dim];
    for (row, &tv) in out.chunks_exact_mut(dim.max(1)).zip(t) {
        for (i, &f) in freqs.iter().enumerate() {
            let a = tv * f;
            row[i] = T::from_f64(a.cos());
            row[half + i] = T::from_f64(a.sin());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 vector GEGLU (AVX-512 where present) against the f64 scalar path, forward and
    /// backward, including the far tails and a row length that is not a multiple of 16.
    #[test]
    fn f32_geglu_matches_f64() {
        let (rows, d) = (5, 37);
        let x64: Vec<f64> = (0..rows * 2 * d)
            .map(|i| ((i * 7919) % 1000) as f64 * 0.024 - 12.0)
            .collect();
        let dy64: Vec<f64> = (0..rows * d)
            .map(|i| ((i * 31) % 17) as f64 * 0.1 - 0.8)
            .collect();
        fn run<T: Float>(x: &[f64], dy: &[f64], rows: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
            let mut t = Tape::<T>::new(true);
            let xv: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
            let xv = t.input(&[rows, 2 * d], xv, true).unwrap();
            let y = geglu(&mut t, &xv).unwrap();
            let yv: Vec<f64> = t.data(&y).iter().map(|v| v.to_f64()).collect();
            let seed: Vec<T> = dy.iter().map(|&v| T::from_f64(v)).collect();
            let mut p = crate::autograd::Params::<T>::new();
            let g = t.backward_with(&y, seed, &mut p).unwrap();
            let gx: Vec<f64> = g.get(&xv).unwrap().iter().map(|v| v.to_f64()).collect();
            (yv, gx)
        }
        let (y32, g32) = run::<f32>(&x64, &dy64, rows, d);
        let (y64, g64) = run::<f64>(&x64, &dy64, rows, d);
        let scale = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
        let (sy, sg) = (scale(&y64), scale(&g64));
        for (a, b) in y32.iter().zip(&y64) {
            assert!((a - b).abs() <= 1e-6 * sy + 2e-6 * b.abs(), "y {a} vs {b}");
        }
        for (a, b) in g32.iter().zip(&g64) {
            assert!((a - b).abs() <= 1e-6 * sg + 2e-6 * b.abs(), "dx {a} vs {b}");
        }
    }
}
