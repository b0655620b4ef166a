//! Batch normalisation over the channels of NHWC activations (last axis), training and eval mode,
//! optionally fused with SiLU, with backward.
//!
//! Training mode normalises with the batch statistics (biased variance) and updates the running
//! statistics: `running = (1 − m)·running + m·batch`, the variance term unbiased (n / (n − 1)) when
//! `unbiased_running_var` (torch, and TF's fused batch norm). `m` is torch's `momentum` (0.1);
//! Keras' `momentum` 0.99 is `m = 1 − 0.99` ([`BatchNormConfig::keras`]).
//! Only the BN input is saved for backward; the normalised value and the activation are recomputed.

use crate::autograd::{Buf, Float, Tape, Var};
use crate::error::{Error, Result};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    pub eps: f64,
    /// Weight of the new batch statistic in the running average (torch convention).
    pub momentum: f64,
    pub unbiased_running_var: bool,
}

impl BatchNormConfig {
    /// torch.nn.BatchNorm2d: momentum 0.1.
    pub fn torch(eps: f64) -> Self {
        BatchNormConfig {
            eps,
            momentum: 0.1,
            unbiased_running_var: true,
        }
    }
    /// Keras BatchNormalization(momentum = `keras_momentum`, e.g. 0.99).
    pub fn keras(eps: f64, keras_momentum: f64) -> Self {
        BatchNormConfig {
            eps,
            momentum: 1.0 - keras_momentum,
            unbiased_running_var: true,
        }
    }
}

/// Activation fused after the normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Silu,
}

/// Running statistics updated in training mode (read in eval mode).
pub struct Running<'a, T> {
    pub mean: &'a mut [T],
    pub var: &'a mut [T],
}

const CHUNK_ROWS: usize = 512;

/// Per-channel Σx and Σx² in f64 over rows of a [M, C] matrix.
fn moments<T: Float>(x: &[T], c: usize) -> (Vec<f64>, Vec<f64>) {
    // Per-chunk partial sums collected in chunk order and added sequentially: the result does not
    // depend on how rayon splits the work (bitwise reproducible training).
    let parts: Vec<(Vec<f64>, Vec<f64>)> = x
        .par_chunks(CHUNK_ROWS * c)
        .map(|rows| {
            let (mut ls, mut lq) = (vec![T::ZERO; c], vec![T::ZERO; c]);
            for r in rows.chunks_exact(c) {
                for ((a, b), &v) in ls.iter_mut().zip(lq.iter_mut()).zip(r) {
                    *a += v;
                    *b += v * v;
                }
            }
            (
                ls.iter().map(|v| v.to_f64()).collect(),
                lq.iter().map(|v| v.to_f64()).collect(),
            )
        })
        .collect();
    sum_parts(parts, c)
}

/// Adds per-chunk (Σ, Σ) partials in order.
fn sum_parts(parts: Vec<(Vec<f64>, Vec<f64>)>, c: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut s, mut q) = (vec![0f64; c], vec![0f64; c]);
    for (s2, q2) in parts {
        s.iter_mut().zip(&s2).for_each(|(a, b)| *a += b);
        q.iter_mut().zip(&q2).for_each(|(a, b)| *a += b);
    }
    (s, q)
}

/// y = act(γ·(x − μ)/√(σ² + ε) + β) over the last axis of `x` (any rank ≥ 2; NHWC for images).
pub fn batch_norm<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    gamma: &Var,
    beta: &Var,
    running: Running<'_, T>,
    cfg: &BatchNormConfig,
    act: Act,
) -> Result<Var> {
    let c = *x.shape().last().unwrap_or(&0);
    let m = x.numel() / c.max(1);
    if c == 0 || gamma.numel() != c || beta.numel() != c {
        return Err(Error::Shape(format!(
            "batch norm: channels {c} (input {:?}) but γ has {} and β {} values",
            x.shape(),
            gamma.numel(),
            beta.numel()
        )));
    }
    if running.mean.len() != c || running.var.len() != c {
        return Err(Error::Shape(format!(
            "batch norm: running statistics have {}/{} values, expected {c}",
            running.mean.len(),
            running.var.len()
        )));
    }
    let training = tape.training();
    if training && m < 2 {
        return Err(Error::InvalidArgument(format!(
            "batch norm in training mode needs more than one value per channel, got input {:?}",
            x.shape()
        )));
    }
    let xv = tape.value(x);
    let (gv, bv) = (tape.value(gamma), tape.value(beta));
    // mean and 1/√(var + ε) used for normalisation, per channel.
    let (mean, invstd): (Vec<T>, Vec<T>) = if training {
        let (s, q) = moments(&xv, c);
        let mf = m as f64;
        let mut mean = Vec::with_capacity(c);
        let mut inv = Vec::with_capacity(c);
        for j in 0..c {
            let mu = s[j] / mf;
            let var = (q[j] / mf - mu * mu).max(0.0);
            mean.push(T::from_f64(mu));
            inv.push(T::from_f64(1.0 / (var + cfg.eps).sqrt()));
            let mo = cfg.momentum;
            let unb = if cfg.unbiased_running_var {
                var * mf / (mf - 1.0)
            } else {
                var
            };
            running.mean[j] = T::from_f64((1.0 - mo) * running.mean[j].to_f64() + mo * mu);
            running.var[j] = T::from_f64((1.0 - mo) * running.var[j].to_f64() + mo * unb);
        }
        (mean, inv)
    } else {
        (
            running.mean.to_vec(),
            running
                .var
                .iter()
                .map(|v| T::from_f64(1.0 / (v.to_f64() + cfg.eps).sqrt()))
                .collect(),
        )
    };
    // y = x·a + b with a = γ·invstd, b = β − μ·a.
    let a: Vec<T> = (0..c).map(|j| gv[j] * invstd[j]).collect();
    let b: Vec<T> = (0..c).map(|j| bv[j] - mean[j] * a[j]).collect();
    let mut out = Buf::alloc(m * c);
    out.par_chunks_mut(CHUNK_ROWS * c)
        .zip(xv.par_chunks(CHUNK_ROWS * c))
        .for_each(|(o, xs)| affine_act(o, xs, &a, &b, act));
    let (xid, gid, bid) = (x.id(), gamma.id(), beta.id());
    let need = tape.requires_grad(x) || tape.requires_grad(gamma) || tape.requires_grad(beta);
    Ok(tape.push(x.shape(), out, need, move |out_id, gr| {
        let Some(mut d) = gr.take(out_id) else {
            return Ok(());
        };
        // Pass 1: d ← dL/dy (through the activation), Σ dy and Σ dy·x̂ per channel.
        let parts: Vec<(Vec<f64>, Vec<f64>)> = d
            .par_chunks_mut(CHUNK_ROWS * c)
            .zip(xv.par_chunks(CHUNK_ROWS * c))
            .map(|(ds, xs)| {
                let (l1, l2) = bn_reduce(ds, xs, &a, &b, &mean, &invstd, act);
                (
                    l1.iter().map(|v| v.to_f64()).collect(),
                    l2.iter().map(|v| v.to_f64()).collect(),
                )
            })
            .collect();
        let (sdy, sdyx) = sum_parts(parts, c);
        gr.accumulate(gid, c, |acc, _| {
            for j in 0..c {
                acc[j] += T::from_f64(sdyx[j]);
            }
        });
        gr.accumulate(bid, c, |acc, _| {
            for j in 0..c {
                acc[j] += T::from_f64(sdy[j]);
            }
        });
        if gr.wants(xid) {
            if training {
                // dx = a·(dy − Σdy/M − x̂·Σdy·x̂/M)
                let mf = m as f64;
                let k1: Vec<T> = (0..c).map(|j| T::from_f64(sdy[j] / mf)).collect();
                let k2: Vec<T> = (0..c).map(|j| T::from_f64(sdyx[j] / mf)).collect();
                d.par_chunks_mut(CHUNK_ROWS * c)
                    .zip(xv.par_chunks(CHUNK_ROWS * c))
                    .for_each(|(ds, xs)| bn_dx(ds, xs, &a, &mean, &invstd, &k1, &k2));
            } else {
                for r in d.chunks_exact_mut(c) {
                    r.iter_mut().zip(&a).for_each(|(v, &s)| *v *= s);
                }
            }
            gr.add(xid, d);
        }
        Ok(())
    }))
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn affine_act<T: Float>(o: &mut [T], xs: &[T], a: &[T], b: &[T], act: Act) {
    let c = a.len();
    for (or, xr) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
        for (((o, &x), &a), &b) in or.iter_mut().zip(xr).zip(a).zip(b) {
            *o = x * a + b;
        }
        if act == Act::Silu {
            or.iter_mut().for_each(|v| *v = v.silu());
        }
    }
}

/// Turns `ds` (dL/d output) into dL/dy in place and returns per-channel Σdy, Σdy·x̂ of this chunk.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn bn_reduce<T: Float>(
    ds: &mut [T],
    xs: &[T],
    a: &[T],
    b: &[T],
    mean: &[T],
    invstd: &[T],
    act: Act,
) -> (Vec<T>, Vec<T>) {
    let c = a.len();
    let (mut s1, mut s2) = (vec![T::ZERO; c], vec![T::ZERO; c]);
    for (dr, xr) in ds.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
        if act == Act::Silu {
            for (((d, &x), &a), &b) in dr.iter_mut().zip(xr).zip(a).zip(b) {
                *d *= (x * a + b).silu_grad();
            }
        }
        for j in 0..c {
            let xh = (xr[j] - mean[j]) * invstd[j];
            s1[j] += dr[j];
            s2[j] += dr[j] * xh;
        }
    }
    (s1, s2)
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn bn_dx<T: Float>(ds: &mut [T], xs: &[T], a: &[T], mean: &[T], invstd: &[T], k1: &[T], k2: &[T]) {
    let c = a.len();
    for (dr, xr) in ds.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
        for j in 0..c {
            let xh = (xr[j] - mean[j]) * invstd[j];
            dr[j] = a[j] * (dr[j] - k1[j] - xh * k2[j]);
        }
    }
}
