//! Elementwise ops with backward: SiLU, sigmoid, add, per-channel scale (squeeze-excite), dropout,
//! drop-connect (stochastic depth), global average pooling, linear layers.

use crate::autograd::{Buf, Float, Tape, Var};
use crate::backend::cpu::gemm::{gemm_t, View};
use crate::error::{Error, Result};
use rand::Rng;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// y = x·σ(x).
pub fn silu<T: Float>(tape: &mut Tape<T>, x: &Var) -> Var {
    let xv = tape.value(x);
    let mut out = Buf::alloc(xv.len());
    out.par_chunks_mut(CHUNK)
        .zip(xv.par_chunks(CHUNK))
        .for_each(|(o, xs)| o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v.silu()));
    let xid = x.id();
    let need = tape.requires_grad(x);
    tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.par_chunks_mut(CHUNK)
                .zip(xv.par_chunks(CHUNK))
                .for_each(|(d, xs)| d.iter_mut().zip(xs).for_each(|(d, &v)| *d *= v.silu_grad()));
            gr.add(xid, d);
        }
        Ok(())
    })
}

/// y = σ(x).
pub fn sigmoid<T: Float>(tape: &mut Tape<T>, x: &Var) -> Var {
    let out: Vec<T> = tape.data(x).iter().map(|v| v.sigmoid()).collect();
    let saved = std::sync::Arc::new(out.clone());
    let xid = x.id();
    let need = tape.requires_grad(x);
    tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.iter_mut()
                .zip(saved.iter())
                .for_each(|(d, &s)| *d *= s * (T::ONE - s));
            gr.add(xid, d);
        }
        Ok(())
    })
}

/// y = a + b (same shapes).
pub fn add<T: Float>(tape: &mut Tape<T>, a: &Var, b: &Var) -> Result<Var> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!(
            "add: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        )));
    }
    let (av, bv) = (tape.value(a), tape.value(b));
    let mut out = Buf::alloc(av.len());
    out.par_chunks_mut(CHUNK)
        .zip(av.par_chunks(CHUNK).zip(bv.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = x + y;
            }
        });
    let (aid, bid) = (a.id(), b.id());
    let need = tape.requires_grad(a) || tape.requires_grad(b);
    Ok(tape.push(a.shape(), out, need, move |out_id, gr| {
        if let Some(d) = gr.take(out_id) {
            match (gr.wants(aid), gr.wants(bid)) {
                (true, true) => {
                    let mut copy = Buf::alloc(d.len());
                    copy.par_chunks_mut(CHUNK)
                        .zip(d.par_chunks(CHUNK))
                        .for_each(|(c, s)| c.copy_from_slice(s));
                    gr.add(bid, copy);
                    gr.add(aid, d);
                }
                (true, false) => gr.add(aid, d),
                (false, _) => gr.add(bid, d),
            }
        }
        Ok(())
    }))
}

/// y[n, p, c] = x[n, p, c] · s[n, c] for x [N, …, C] and s [N, C] (the squeeze-excite multiply).
pub fn scale_channels<T: Float>(tape: &mut Tape<T>, x: &Var, s: &Var) -> Result<Var> {
    let xs = x.shape();
    let (n, c) = (xs[0], *xs.last().unwrap_or(&0));
    if xs.len() < 2 || s.shape() != [n, c] {
        return Err(Error::Shape(format!(
            "scale_channels: x {:?} needs a scale of shape [{n}, {c}], got {:?}",
            xs,
            s.shape()
        )));
    }
    let per = x.numel() / n.max(1);
    let (xv, sv) = (tape.value(x), tape.value(s));
    let mut out = Buf::alloc(xv.len());
    out.par_chunks_mut(per)
        .zip(xv.par_chunks(per))
        .enumerate()
        .for_each(|(i, (o, xr))| {
            let sr = &sv[i * c..(i + 1) * c];
            for (or, xp) in o.chunks_exact_mut(c).zip(xr.chunks_exact(c)) {
                for ((o, &a), &b) in or.iter_mut().zip(xp).zip(sr) {
                    *o = a * b;
                }
            }
        });
    let (xid, sid) = (x.id(), s.id());
    let need = tape.requires_grad(x) || tape.requires_grad(s);
    Ok(tape.push(xs, out, need, move |out_id, gr| {
        let Some(mut d) = gr.take(out_id) else {
            return Ok(());
        };
        if gr.wants(sid) {
            let ds: Vec<T> = d
                .par_chunks(per)
                .zip(xv.par_chunks(per))
                .flat_map_iter(|(dr, xr)| {
                    let mut acc = vec![T::ZERO; c];
                    for (dp, xp) in dr.chunks_exact(c).zip(xr.chunks_exact(c)) {
                        for ((a, &u), &v) in acc.iter_mut().zip(dp).zip(xp) {
                            *a += u * v;
                        }
                    }
                    acc
                })
                .collect();
            gr.add(sid, ds);
        }
        if gr.wants(xid) {
            d.par_chunks_mut(per).enumerate().for_each(|(i, dr)| {
                let sr = &sv[i * c..(i + 1) * c];
                for dp in dr.chunks_exact_mut(c) {
                    dp.iter_mut().zip(sr).for_each(|(v, &s)| *v *= s);
                }
            });
            gr.add(xid, d);
        }
        Ok(())
    }))
}

/// Mean over all axes between the first and the last: [N, …, C] → [N, C].
pub fn global_avg_pool<T: Float>(tape: &mut Tape<T>, x: &Var) -> Result<Var> {
    let xs = x.shape().to_vec();
    if xs.len() < 2 {
        return Err(Error::Shape(format!(
            "global_avg_pool: needs [N, …, C], got {xs:?}"
        )));
    }
    let (n, c) = (xs[0], xs[xs.len() - 1]);
    let per = x.numel() / n.max(1);
    let p = per / c.max(1);
    if p == 0 {
        return Err(Error::Shape(format!("global_avg_pool: empty input {xs:?}")));
    }
    let inv = T::ONE / T::from_usize(p);
    let xv = tape.value(x);
    let out: Vec<T> = xv
        .par_chunks(per)
        .flat_map_iter(|xr| {
            let mut acc = vec![T::ZERO; c];
            for xp in xr.chunks_exact(c) {
                acc.iter_mut().zip(xp).for_each(|(a, &v)| *a += v);
            }
            acc.into_iter().map(move |v| v * inv)
        })
        .collect();
    let xid = x.id();
    let need = tape.requires_grad(x);
    Ok(tape.push(&[n, c], out, need, move |out_id, gr| {
        if let Some(d) = gr.take(out_id) {
            gr.accumulate(xid, n * per, |acc, _| {
                acc.par_chunks_mut(per).enumerate().for_each(|(i, ar)| {
                    let dr = &d[i * c..(i + 1) * c];
                    for ap in ar.chunks_exact_mut(c) {
                        ap.iter_mut().zip(dr).for_each(|(a, &g)| *a += g * inv);
                    }
                });
            });
        }
        Ok(())
    }))
}

/// y = x·Wᵀ + b for x [..., In] (rank ≥ 2; leading axes flattened into rows), W [Out, In]
/// (trailing 1 × 1 dims allowed), b [Out] (optional) → [..., Out].
pub fn linear<T: Float>(tape: &mut Tape<T>, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(Error::Shape(format!(
            "linear: input must be [..., In] of rank ≥ 2, got {xs:?}"
        )));
    }
    let inp = xs[xs.len() - 1];
    let n: usize = xs[..xs.len() - 1].iter().product();
    let out_f = w.shape().first().copied().unwrap_or(0);
    let mut out_shape = xs.to_vec();
    out_shape[xs.len() - 1] = out_f;
    if w.numel() != out_f * inp || out_f == 0 || b.is_some_and(|b| b.numel() != out_f) {
        return Err(Error::Shape(format!(
            "linear: weight {:?} / bias {:?} do not fit input features {inp}",
            w.shape(),
            b.map(|b| b.shape().to_vec())
        )));
    }
    let (xv, wv) = (tape.value(x), tape.value(w));
    let bv = b.map(|b| tape.value(b));
    let mut out = Buf::<T>::alloc(n * out_f);
    // f32 / AVX-512: the strided AVX-512 GEMM (weights packed per call).
    let done = n * out_f * inp > 0
        && crate::ops::conv::sgemm_linear(
            &mut out,
            &xv,
            &wv,
            bv.as_deref().map(|b| &b[..]),
            n,
            inp,
            out_f,
        );
    if !done {
        // f64, CPUs without AVX-512, or an empty product: the `gemm` crate.
        if let Some(bv) = &bv {
            for r in out.chunks_exact_mut(out_f) {
                r.copy_from_slice(bv);
            }
        }
        gemm_t(
            n,
            out_f,
            inp,
            &mut out,
            b.is_some(),
            View::rows(&xv, inp),
            View::t(&wv, inp),
            true,
        );
    }
    let (xid, wid, bid) = (x.id(), w.id(), b.map(|b| b.id()));
    let need =
        tape.requires_grad(x) || tape.requires_grad(w) || b.is_some_and(|b| tape.requires_grad(b));
    Ok(tape.push(&out_shape, out, need, move |out_id, gr| {
        let Some(d) = gr.take(out_id) else {
            return Ok(());
        };
        gr.accumulate_uninit(wid, out_f * inp, |acc, fresh| {
            if n == 0 {
                if fresh {
                    acc.fill(T::ZERO);
                }
                return;
            }
            if crate::ops::conv::sgemm_weight_grad(acc, &d, &xv, n, out_f, inp, !fresh) {
                return;
            }
            gemm_t(
                out_f,
                inp,
                n,
                acc,
                !fresh,
                View::t(&d, out_f),
                View::rows(&xv, inp),
                true,
            )
        });
        if let Some(bid) = bid {
            gr.accumulate(bid, out_f, |acc, _| {
                for r in d.chunks_exact(out_f) {
                    acc.iter_mut().zip(r).for_each(|(a, &g)| *a += g);
                }
            });
        }
        // dX [N, In] (+)= dY [N, Out] · W [Out, In], into the gradient in place.
        gr.accumulate_uninit(xid, n * inp, |acc, fresh| {
            crate::ops::conv::par_rows_gemm_nn(acc, &d, &wv, n, out_f, inp, !fresh)
        });
        Ok(())
    }))
}

/// Elementwise dropout: in training each value is zeroed with probability `p` and the rest scaled
/// by 1 / (1 − p) (torch.nn.Dropout); identity in eval mode or when p = 0.
pub fn dropout<T: Float>(tape: &mut Tape<T>, x: &Var, p: f64, rng: &mut impl Rng) -> Result<Var> {
    check_p(p, "dropout")?;
    if !tape.training() || p == 0.0 {
        return Ok(x.clone());
    }
    let keep = T::from_f64(if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 });
    let mask: Vec<T> = (0..x.numel())
        .map(|_| if rng.gen::<f64>() < p { T::ZERO } else { keep })
        .collect();
    mask_op(tape, x, mask, 1)
}

/// Drop-connect / stochastic depth ("row" mode of torchvision's StochasticDepth): in training each
/// sample (first axis) is zeroed with probability `p`, kept samples scaled by 1 / (1 − p).
pub fn drop_connect<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    p: f64,
    rng: &mut impl Rng,
) -> Result<Var> {
    check_p(p, "drop-connect")?;
    if !tape.training() || p == 0.0 {
        return Ok(x.clone());
    }
    let n = x.shape()[0];
    let keep = T::from_f64(if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 });
    let mask: Vec<T> = (0..n)
        .map(|_| if rng.gen::<f64>() < p { T::ZERO } else { keep })
        .collect();
    let per = x.numel() / n.max(1);
    mask_op(tape, x, mask, per)
}

fn check_p(p: f64, what: &str) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::InvalidArgument(format!(
            "{what} probability must be in [0, 1], got {p}"
        )));
    }
    Ok(())
}

/// y = x · mask[i / group] (mask entries broadcast over groups of `group` values).
fn mask_op<T: Float>(tape: &mut Tape<T>, x: &Var, mask: Vec<T>, group: usize) -> Result<Var> {
    let group = group.max(1);
    let xv = tape.value(x);
    let mut out = Buf::alloc(xv.len());
    // Chunks of whole groups (or, for small groups, many groups) across the pool.
    let per = group * (CHUNK / group).max(1);
    out.par_chunks_mut(per)
        .zip(xv.par_chunks(per))
        .enumerate()
        .for_each(|(i, (o, xs))| {
            let ms = &mask[i * (per / group)..];
            for ((o, xs), &m) in o.chunks_mut(group).zip(xs.chunks(group)).zip(ms) {
                o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v * m);
            }
        });
    let xid = x.id();
    let need = tape.requires_grad(x);
    Ok(tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.par_chunks_mut(per).enumerate().for_each(|(i, ds)| {
                let ms = &mask[i * (per / group)..];
                for (ds, &m) in ds.chunks_mut(group).zip(ms) {
                    ds.iter_mut().for_each(|v| *v *= m);
                }
            });
            gr.add(xid, d);
        }
        Ok(())
    }))
}
