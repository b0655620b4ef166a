//! Group normalisation (torch.nn.GroupNorm, optionally fused with SiLU) and layer normalisation
//! (torch.nn.LayerNorm over the last axis), with backward, on channels-last activations.
//!
//! Statistics use the biased variance, computed in two passes (mean, then centred squares) with
//! per-chunk partial sums in `T` added in f64 in chunk order: the result does not depend on the
//! thread count or on work stealing. Only the input (plus per-group mean and 1/σ) is saved for
//! backward; the normalised value and the activation are recomputed.

use crate::autograd::{Buf, Float, Tape, Var};
use crate::error::{Error, Result};
use crate::ops::norm::Act;
use rayon::prelude::*;
use std::sync::Arc;

/// Spatial positions (rows of C channels) per parallel task / partial sum.
const CHUNK_ROWS: usize = 256;

/// Shape of a group-norm input: (samples, positions per sample, channels).
fn gn_dims(x: &Var, groups: usize, gamma: &Var, beta: &Var) -> Result<(usize, usize, usize)> {
    let xs = x.shape();
    if xs.len() < 2 || xs.contains(&0) {
        return Err(Error::Shape(format!(
            "group_norm: input must be a non-empty [N, …, C], got {xs:?}"
        )));
    }
    let (n, c) = (xs[0], xs[xs.len() - 1]);
    if groups == 0 || c % groups != 0 {
        return Err(Error::InvalidArgument(format!(
            "group_norm: {c} channels (input {xs:?}) are not divisible into {groups} groups"
        )));
    }
    if gamma.shape() != [c] || beta.shape() != [c] {
        return Err(Error::Shape(format!(
            "group_norm: γ {:?} and β {:?} must be [{c}] for input {xs:?}",
            gamma.shape(),
            beta.shape()
        )));
    }
    Ok((n, x.numel() / n / c, c))
}

fn check_eps(eps: f64, what: &str) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "{what}: eps must be finite and ≥ 0, got {eps}"
        )));
    }
    Ok(())
}

/// Per-sample, per-channel Σ f(rows) over `[N, P, C]` data: tasks of (sample, chunk of
/// `CHUNK_ROWS` positions) across the pool, partials added in f64 in chunk order. Returns [N, C].
fn sample_channel_sums<T: Float>(
    x: &[T],
    n: usize,
    p: usize,
    c: usize,
    f: impl Fn(usize, &[T], &mut [T]) + Sync,
) -> Vec<f64> {
    let nch = p.div_ceil(CHUNK_ROWS);
    let per = p * c;
    let parts: Vec<Vec<T>> = (0..n * nch)
        .into_par_iter()
        .map(|t| {
            let (s, j) = (t / nch, t % nch);
            let lo = s * per + j * CHUNK_ROWS * c;
            let hi = (lo + CHUNK_ROWS * c).min((s + 1) * per);
            let mut acc = vec![T::ZERO; c];
            f(s, &x[lo..hi], &mut acc);
            acc
        })
        .collect();
    let mut out = vec![0f64; n * c];
    for (t, part) in parts.iter().enumerate() {
        let s = t / nch;
        out[s * c..(s + 1) * c]
            .iter_mut()
            .zip(part)
            .for_each(|(o, &v)| *o += v.to_f64());
    }
    out
}

/// Mutable chunks of (sample, chunk) tasks over `[N, P, C]` data, with their offsets.
fn chunks_mut<T>(d: &mut [T], per: usize, c: usize) -> Vec<(usize, usize, &mut [T])> {
    let mut v = Vec::new();
    for (s, ds) in d.chunks_mut(per).enumerate() {
        for (j, ch) in ds.chunks_mut(CHUNK_ROWS * c).enumerate() {
            v.push((s, s * per + j * CHUNK_ROWS * c, ch));
        }
    }
    v
}

/// Σ per (sample, group) of per-(sample, channel) values.
fn group_sum(v: &[f64], n: usize, c: usize, groups: usize) -> Vec<f64> {
    let cg = c / groups;
    (0..n * groups)
        .map(|t| {
            let (s, g) = (t / groups, t % groups);
            v[s * c + g * cg..s * c + (g + 1) * cg].iter().sum()
        })
        .collect()
}

/// y = act(γ·(x − μ)/√(σ² + ε) + β) with μ, σ² per sample and group of `C / groups` consecutive
/// channels over all positions (torch.nn.GroupNorm, then SiLU for [`Act::Silu`]). x is [N, …, C].
pub fn group_norm<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    gamma: &Var,
    beta: &Var,
    groups: usize,
    eps: f64,
    act: Act,
) -> Result<Var> {
    let (n, p, c) = gn_dims(x, groups, gamma, beta)?;
    check_eps(eps, "group_norm")?;
    let cg = c / groups;
    let cnt = (p * cg) as f64;
    let per = p * c;
    let xv = tape.value(x);
    let (gv, bv) = (tape.value(gamma), tape.value(beta));
    // Pass 1: means.
    let s1 = sample_channel_sums(&xv, n, p, c, |_, rows, acc| {
        for r in rows.chunks_exact(c) {
            acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
        }
    });
    let mean: Vec<f64> = group_sum(&s1, n, c, groups)
        .into_iter()
        .map(|v| v / cnt)
        .collect();
    // Per-(sample, channel) mean broadcast of the group mean.
    let mean_c: Vec<T> = (0..n * c)
        .map(|t| T::from_f64(mean[(t / c) * groups + (t % c) / cg]))
        .collect();
    // Pass 2: centred squares.
    let s2 = sample_channel_sums(&xv, n, p, c, |s, rows, acc| {
        let m = &mean_c[s * c..(s + 1) * c];
        for r in rows.chunks_exact(c) {
            for ((a, &v), &mu) in acc.iter_mut().zip(r).zip(m) {
                let d = v - mu;
                *a += d * d;
            }
        }
    });
    let invstd: Vec<f64> = group_sum(&s2, n, c, groups)
        .into_iter()
        .map(|v| 1.0 / (v / cnt + eps).sqrt())
        .collect();
    // y = x·a + b per (sample, channel): a = γ·invstd, b = β − μ·a.
    let mut a = vec![T::ZERO; n * c];
    let mut b = vec![T::ZERO; n * c];
    for s in 0..n {
        for ch in 0..c {
            let gi = s * groups + ch / cg;
            let av = gv[ch].to_f64() * invstd[gi];
            a[s * c + ch] = T::from_f64(av);
            b[s * c + ch] = T::from_f64(bv[ch].to_f64() - mean[gi] * av);
        }
    }
    let mut out = Buf::alloc(n * per);
    chunks_mut(&mut out, per, c)
        .into_par_iter()
        .for_each(|(s, off, o)| {
            let (ar, br) = (&a[s * c..(s + 1) * c], &b[s * c..(s + 1) * c]);
            affine_act(o, &xv[off..off + o.len()], ar, br, act);
        });
    let (xid, gid, bid) = (x.id(), gamma.id(), beta.id());
    let need = tape.requires_grad(x) || tape.requires_grad(gamma) || tape.requires_grad(beta);
    let (a, b) = (Arc::new(a), Arc::new(b));
    Ok(tape.push(x.shape(), out, need, move |out_id, gr| {
        let Some(mut d) = gr.take(out_id) else {
            return Ok(());
        };
        // x̂ = x·pc + qc per (sample, channel): pc = invstd, qc = −μ·invstd.
        let mut pc = vec![T::ZERO; n * c];
        let mut qc = vec![T::ZERO; n * c];
        for t in 0..n * c {
            let gi = (t / c) * groups + (t % c) / cg;
            pc[t] = T::from_f64(invstd[gi]);
            qc[t] = T::from_f64(-mean[gi] * invstd[gi]);
        }
        // Pass 1: d ← dL/dz through the activation; Σ dz and Σ dz·x̂ per (sample, channel).
        let nch = p.div_ceil(CHUNK_ROWS);
        let parts: Vec<(Vec<T>, Vec<T>)> = chunks_mut(&mut d, per, c)
            .into_par_iter()
            .map(|(s, off, ds)| {
                let r = s * c..(s + 1) * c;
                gn_reduce(
                    ds,
                    &xv[off..off + ds.len()],
                    &a[r.clone()],
                    &b[r.clone()],
                    &pc[r.clone()],
                    &qc[r],
                    act,
                )
            })
            .collect();
        let (mut sdz, mut sdzx) = (vec![0f64; n * c], vec![0f64; n * c]);
        for (t, (l1, l2)) in parts.iter().enumerate() {
            let s = t / nch;
            for ch in 0..c {
                sdz[s * c + ch] += l1[ch].to_f64();
                sdzx[s * c + ch] += l2[ch].to_f64();
            }
        }
        gr.accumulate(gid, c, |acc, _| {
            for ch in 0..c {
                acc[ch] += T::from_f64((0..n).map(|s| sdzx[s * c + ch]).sum());
            }
        });
        gr.accumulate(bid, c, |acc, _| {
            for ch in 0..c {
                acc[ch] += T::from_f64((0..n).map(|s| sdz[s * c + ch]).sum());
            }
        });
        if gr.wants(xid) {
            // dx = is·(γ dz − k1 − x̂ k2), k1 = Σ_g γ·Σdz / M, k2 = Σ_g γ·Σdz·x̂ / M
            //    = (is γ)·dz + (−is² k2)·x + (−is k1 + is² k2 μ).
            let gf: Vec<f64> = gv.iter().map(|v| v.to_f64()).collect();
            let wz: Vec<f64> = (0..n * c).map(|t| gf[t % c] * sdz[t]).collect();
            let wzx: Vec<f64> = (0..n * c).map(|t| gf[t % c] * sdzx[t]).collect();
            let k1 = group_sum(&wz, n, c, groups);
            let k2 = group_sum(&wzx, n, c, groups);
            let (mut cd, mut cx, mut c0) = (
                vec![T::ZERO; n * c],
                vec![T::ZERO; n * c],
                vec![T::ZERO; n * c],
            );
            for t in 0..n * c {
                let gi = (t / c) * groups + (t % c) / cg;
                let (is, mu) = (invstd[gi], mean[gi]);
                let (k1, k2) = (k1[gi] / cnt, k2[gi] / cnt);
                cd[t] = T::from_f64(is * gf[t % c]);
                cx[t] = T::from_f64(-is * is * k2);
                c0[t] = T::from_f64(-is * k1 + is * is * k2 * mu);
            }
            chunks_mut(&mut d, per, c)
                .into_par_iter()
                .for_each(|(s, off, ds)| {
                    let r = s * c..(s + 1) * c;
                    lin3(
                        ds,
                        &xv[off..off + ds.len()],
                        &cd[r.clone()],
                        &cx[r.clone()],
                        &c0[r],
                    );
                });
            gr.add(xid, d);
        }
        Ok(())
    }))
}

/// o = act(x·a + b) per row of `a.len()` channels.
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

/// Turns `ds` into dL/dz (through the activation of z = x·a + b) in place and returns per-channel
/// Σ dz and Σ dz·x̂ (x̂ = x·pc + qc) of this chunk.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn gn_reduce<T: Float>(
    ds: &mut [T],
    xs: &[T],
    a: &[T],
    b: &[T],
    pc: &[T],
    qc: &[T],
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
            let xh = xr[j] * pc[j] + qc[j];
            s1[j] += dr[j];
            s2[j] += dr[j] * xh;
        }
    }
    (s1, s2)
}

/// d = d·cd + x·cx + c0 per row of `cd.len()` channels.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn lin3<T: Float>(ds: &mut [T], xs: &[T], cd: &[T], cx: &[T], c0: &[T]) {
    let c = cd.len();
    for (dr, xr) in ds.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
        for j in 0..c {
            dr[j] = dr[j] * cd[j] + xr[j] * cx[j] + c0[j];
        }
    }
}

/// Rows per parallel task of layer norm.
const LN_ROWS: usize = 64;

/// y = γ·(x − μ)/√(σ² + ε) + β over the last axis of `x` (torch.nn.LayerNorm(C), biased variance).
pub fn layer_norm<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    gamma: &Var,
    beta: &Var,
    eps: f64,
) -> Result<Var> {
    let xs = x.shape();
    let c = *xs.last().unwrap_or(&0);
    if xs.is_empty() || c == 0 {
        return Err(Error::Shape(format!(
            "layer_norm: input must have a non-empty last axis, got {xs:?}"
        )));
    }
    if gamma.shape() != [c] || beta.shape() != [c] {
        return Err(Error::Shape(format!(
            "layer_norm: γ {:?} and β {:?} must be [{c}] for input {xs:?}",
            gamma.shape(),
            beta.shape()
        )));
    }
    check_eps(eps, "layer_norm")?;
    let m = x.numel() / c;
    let xv = tape.value(x);
    let (gv, bv) = (tape.value(gamma), tape.value(beta));
    let inv_c = T::from_f64(1.0 / c as f64);
    let eps_t = T::from_f64(eps);
    let mut out = Buf::alloc(m * c);
    let mut stats = vec![T::ZERO; 2 * m]; // (mean, invstd) per row
    out.par_chunks_mut(LN_ROWS * c)
        .zip(xv.par_chunks(LN_ROWS * c))
        .zip(stats.par_chunks_mut(2 * LN_ROWS))
        .for_each(|((o, xs), st)| {
            for ((or, xr), st) in o
                .chunks_exact_mut(c)
                .zip(xs.chunks_exact(c))
                .zip(st.chunks_exact_mut(2))
            {
                let mu = xr.iter().copied().sum::<T>() * inv_c;
                let var = xr.iter().map(|&v| (v - mu) * (v - mu)).sum::<T>() * inv_c;
                let is = T::ONE / (var + eps_t).sqrt();
                st[0] = mu;
                st[1] = is;
                for (((o, &x), &g), &b) in or.iter_mut().zip(xr).zip(gv.iter()).zip(bv.iter()) {
                    *o = (x - mu) * is * g + b;
                }
            }
        });
    let (xid, gid, bid) = (x.id(), gamma.id(), beta.id());
    let need = tape.requires_grad(x) || tape.requires_grad(gamma) || tape.requires_grad(beta);
    Ok(tape.push(xs, out, need, move |out_id, gr| {
        let Some(mut d) = gr.take(out_id) else {
            return Ok(());
        };
        let want_x = gr.wants(xid);
        // One pass over row chunks: partial Σ dy·x̂ and Σ dy per channel, then dx in place.
        let parts: Vec<(Vec<T>, Vec<T>)> = d
            .par_chunks_mut(LN_ROWS * c)
            .zip(xv.par_chunks(LN_ROWS * c))
            .zip(stats.par_chunks(2 * LN_ROWS))
            .map(|((ds, xs), st)| {
                let (mut dg, mut db) = (vec![T::ZERO; c], vec![T::ZERO; c]);
                for ((dr, xr), st) in ds
                    .chunks_exact_mut(c)
                    .zip(xs.chunks_exact(c))
                    .zip(st.chunks_exact(2))
                {
                    let (mu, is) = (st[0], st[1]);
                    let (mut s1, mut s2) = (T::ZERO, T::ZERO);
                    for j in 0..c {
                        let xh = (xr[j] - mu) * is;
                        dg[j] += dr[j] * xh;
                        db[j] += dr[j];
                        let gd = dr[j] * gv[j];
                        s1 += gd;
                        s2 += gd * xh;
                    }
                    if want_x {
                        let (k1, k2) = (s1 * inv_c, s2 * inv_c);
                        for j in 0..c {
                            let xh = (xr[j] - mu) * is;
                            dr[j] = is * (dr[j] * gv[j] - k1 - xh * k2);
                        }
                    }
                }
                (dg, db)
            })
            .collect();
        let (mut dg, mut db) = (vec![T::ZERO; c], vec![T::ZERO; c]);
        for (g, b) in &parts {
            dg.iter_mut().zip(g).for_each(|(a, &v)| *a += v);
            db.iter_mut().zip(b).for_each(|(a, &v)| *a += v);
        }
        gr.accumulate(gid, c, |acc, _| {
            acc.iter_mut().zip(&dg).for_each(|(a, &v)| *a += v)
        });
        gr.accumulate(bid, c, |acc, _| {
            acc.iter_mut().zip(&db).for_each(|(a, &v)| *a += v)
        });
        if want_x {
            gr.add(xid, d);
        }
        Ok(())
    }))
}
