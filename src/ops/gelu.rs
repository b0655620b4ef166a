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
